//! One client connection to the router: handshake, routing, then passing
//! the client's messages to the owning shard and the shard's answers back.
//!
//! Handover: the router remembers the batches sent since the session was
//! last idle. If the shard answers `Closed` with SQLSTATE 57P01 before any
//! response to them (it drained without running them), the router waits
//! for the shard's next owner (bounded by `handoverTimeout`) and sends them
//! there. A batch that may have run is never sent twice: a shard lost
//! mid-transaction ends the client connection with a retryable error. A
//! link found gone when a transaction is to go out, with nothing owed
//! before it, sends it to the owner at once: the client waits for its
//! answer, so nothing it sends would ever trigger the move.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, watch};
use tracing::Instrument;

use super::Router;
use super::drain::{Drain, must_end, restarting};
use super::link::{Link, OpenAs};
use super::metrics::{Frontend, SourceFrontend};
use super::pgwire::codec::{self, PgError};
use super::pgwire::startup::{self, Handshake, StartupError};
use super::replay::{MAX_REPLAY_BYTES, Pushed, Replay};
use super::routes::RouteError;
use super::statements::Named;
use super::tls;
use crate::proto::flow::Inbox;
use crate::proto::frame::{Frame, Kind};
use crate::proto::pg;
use crate::proto::pg::{DRAINING, sync_points};
use crate::proto::stream::MaybeTls;

/// Where a session currently runs.
pub(crate) struct Attached {
    pub(crate) link: Arc<Link>,
    pub(crate) id: u32,
    pub(crate) inbox: Inbox,
    /// True while the shard holds this session paused (it has more of the
    /// client's messages queued than its bound): the client is not read.
    pub(crate) paused: watch::Receiver<bool>,
}

/// A client-visible failure: an ErrorResponse, then the connection ends.
pub(crate) struct Fatal(pub(crate) PgError);

fn fatal(code: &str, message: impl Into<String>) -> Fatal {
    Fatal(PgError::fatal(code, message))
}

const PG: Frontend = Frontend { frontend: "pg" };

/// Answers a connection over the client limit: SQLSTATE 53300, then close.
pub async fn refuse(mut stream: TcpStream) {
    let mut out = BytesMut::new();
    codec::error_response(
        &mut out,
        &PgError::fatal("53300", "sorry, too many clients already"),
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(&out)).await;
}

/// Serves one client connection to its end; `_slot` is its place under the
/// client limit, given back when the connection ends.
pub async fn serve(
    tcp: TcpStream,
    peer: SocketAddr,
    router: Arc<Router>,
    _slot: OwnedSemaphorePermit,
) {
    let _ = tcp.set_nodelay(true);
    let clients = router.metrics.clients.get_or_create(&PG).clone();
    clients.inc();
    let _open = guard::Dec(clients);
    let mut stream =
        match tls::negotiate(tcp, router.tls.as_ref(), router.limits.startup_timeout).await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "encryption negotiation failed");
                return;
            }
        };
    let creds = router.auth.current();
    let hs = match startup::handshake(&mut stream, &creds.users, &router.limits).await {
        Ok(h) => h,
        Err(e) => {
            if matches!(e, StartupError::Auth { .. }) {
                router.metrics.auth_failures.get_or_create(&PG).inc();
            }
            tracing::debug!(%peer, error = %e, "handshake failed");
            return;
        }
    };
    match hs {
        Handshake::Cancel { pid, secret } => router.cancel(pid, secret).await,
        Handshake::Session {
            user,
            database,
            params,
        } => {
            let app = params
                .iter()
                .find(|(k, _)| k == "application_name")
                .map(|(_, v)| v.as_str())
                .unwrap_or("");
            let tls = stream.is_tls();
            let span = tracing::info_span!("client", %peer, %user, %database, tls);
            let r = &router;
            async move {
                match stream {
                    MaybeTls::Plain(mut tcp) => {
                        let (mut rd, mut wr) = tcp.split();
                        session(&mut rd, &mut wr, r, &user, &database, app).await;
                    }
                    MaybeTls::Tls(tls) => {
                        let (mut rd, mut wr) = tokio::io::split(*tls);
                        session(&mut rd, &mut wr, r, &user, &database, app).await;
                    }
                }
            }
            .instrument(span)
            .await;
        }
    }
}

/// Runs an authenticated session; a failure is told to the client.
async fn session<R, W>(
    rd: &mut R,
    wr: &mut W,
    router: &Router,
    user: &str,
    database: &str,
    app: &str,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    if let Err(Fatal(err)) = run(rd, wr, router, user, database, app).await {
        if let Some((ns, name)) = source_name(database, router.default_namespace.as_deref()) {
            let known = router.routes.known(ns, name);
            router.metrics.error("pg", ns, name, known, &err.code);
        }
        let mut out = BytesMut::new();
        codec::error_response(&mut out, &err);
        let _ = wr.write_all(&out).await;
        let _ = wr.flush().await;
        tracing::debug!(code = %err.code, message = %err.message, "session ended with an error");
    }
}

/// Splits `namespace.name`; a bare name uses the default namespace.
fn source_name<'a>(database: &'a str, default_ns: Option<&'a str>) -> Option<(&'a str, &'a str)> {
    match database.split_once('.') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() => Some((ns, name)),
        Some(_) => None,
        None => default_ns.map(|ns| (ns, database)),
    }
}

/// Opens a session on the shard that serves `ns/name` now, holding the
/// client (up to handoverTimeout) while no shard can take it: no holder,
/// a shard handing over (57P01), or a shard that does not answer.
pub(crate) async fn attach(
    router: &Router,
    ns: &str,
    name: &str,
    statements: Option<&Bytes>,
    who: &OpenAs,
) -> Result<(Attached, Bytes), Fatal> {
    let deadline = tokio::time::Instant::now() + router.handover_timeout;
    let key = format!("{ns}/{name}");
    let mut counted = false;
    loop {
        let attempt: Result<(), Option<Fatal>> = match router.routes.resolve(ns, name) {
            // The link too is had within the hold: a shard that accepts
            // connections but does not finish the handshake, or other
            // sessions' connects queued before this one, cost the client
            // no more than handoverTimeout.
            Ok((shard, addr)) => {
                match tokio::time::timeout_at(deadline, router.links.get(addr, shard))
                    .await
                    .unwrap_or_else(|_| {
                        Err(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "no link within handoverTimeout",
                        ))
                    }) {
                    Ok(link) => match link.open(&key, statements, who).await {
                        Some((id, mut inbox, paused)) => {
                            // Bounded by the hold deadline too: a shard that
                            // cannot open the session in time (its pool still
                            // connecting) costs the client no more than
                            // handoverTimeout before a retryable error.
                            let wait_until =
                                deadline.max(tokio::time::Instant::now() + Duration::from_secs(1));
                            match tokio::time::timeout_at(wait_until, inbox.recv()).await {
                                Ok(Some(f)) if f.kind == Kind::Opened => {
                                    if counted {
                                        tracing::debug!(
                                            shard,
                                            %addr,
                                            id,
                                            held_ms = (router.handover_timeout
                                                - deadline.saturating_duration_since(tokio::time::Instant::now()))
                                            .as_millis() as u64,
                                            "held session attached"
                                        );
                                    }
                                    return Ok((
                                        Attached {
                                            link,
                                            id,
                                            inbox,
                                            paused,
                                        },
                                        f.payload,
                                    ));
                                }
                                Ok(Some(f))
                                    if f.kind == Kind::Closed
                                        && pg::error_code(
                                            f.payload.get(5..).unwrap_or_default(),
                                        ) == Some(DRAINING) =>
                                {
                                    link.forget(id);
                                    Err(None)
                                }
                                Ok(Some(f)) => {
                                    if f.kind == Kind::Closed {
                                        link.forget(id);
                                    } else {
                                        link.close(id).await;
                                    }
                                    Err(Some(fatal(
                                        "08006",
                                        format!(
                                            "shard refused the session: {}",
                                            pg::error_field(
                                                f.payload.get(5..).unwrap_or_default(),
                                                b'M'
                                            )
                                            .unwrap_or("")
                                        ),
                                    )))
                                }
                                Ok(None) => Err(None),
                                Err(_) => {
                                    // Not opened in time: drop the half-open session.
                                    link.close(id).await;
                                    Err(None)
                                }
                            }
                        }
                        None => Err(None),
                    },
                    Err(e) => {
                        tracing::debug!(%addr, error = %e, "cannot reach shard");
                        Err(None)
                    }
                }
            }
            Err(RouteError::Unknown) => Err(Some(fatal(
                "3D000",
                format!("database \"{ns}.{name}\" does not exist"),
            ))),
            Err(RouteError::Paused) => Err(Some(fatal(
                "57P03",
                format!("source {ns}.{name} is paused"),
            ))),
            Err(_) => Err(None),
        };
        if let Err(Some(f)) = attempt {
            return Err(f);
        }
        if !counted {
            router.metrics.held.inc();
            counted = true;
        }
        if tokio::time::Instant::now() >= deadline {
            let why = match router.routes.resolve(ns, name) {
                Err(e) => e.to_string(),
                Ok(_) => "its shard did not accept the session".to_string(),
            };
            return Err(fatal(
                "57P03",
                format!("source {ns}.{name} is not available: {why}; retry later"),
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn run<R, W>(
    rd: &mut R,
    wr: &mut W,
    router: &Router,
    user: &str,
    database: &str,
    app: &str,
) -> Result<(), Fatal>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let Some((ns, name)) = source_name(database, router.default_namespace.as_deref()) else {
        return Err(fatal(
            "3D000",
            format!("database \"{database}\" does not exist"),
        ));
    };
    // Denied and unknown look the same to the client.
    if !router.auth.current().users.may_access(user, ns) {
        return Err(fatal(
            "3D000",
            format!("database \"{database}\" does not exist"),
        ));
    }
    // The routing table's epoch this session last resolved at: when it
    // moves, the session checks at its next idle point whether its source
    // now lives elsewhere (a new Lease holder: an orphaned or replaced pod).
    let mut epoch = router.routes.epoch();
    let who = OpenAs {
        client: user.to_string(),
        weight: router.auth.current().weights.of(user),
        tag: app.to_string(),
        report_admission: false,
    };
    let (mut at, params) = attach(router, ns, name, None, &who).await?;
    let (pid, secret) = router.register(at.link.clone(), at.id);
    // Looked up once: the query path only bumps these.
    let queries = router
        .metrics
        .queries
        .get_or_create(&SourceFrontend {
            frontend: "pg",
            namespace: ns.to_string(),
            source: name.to_string(),
        })
        .clone();
    let latency = router.metrics.latency.get_or_create(&PG).clone();
    // When the oldest unanswered sync point was sent.
    let mut sent_at: Option<Instant> = None;
    let _unregister = scopeguard(router, pid);

    let mut out = BytesMut::with_capacity(512);
    out.extend_from_slice(&params);
    codec::backend_key_data(&mut out, pid, secret);
    codec::ready_for_query(&mut out, b'I');
    wr.write_all(&out)
        .await
        .map_err(|_| fatal("08006", "client gone"))?;
    let mut inbuf = BytesMut::with_capacity(16 * 1024);
    let mut pending = 0usize;
    let mut status = b'I';
    // Batches (with their sync points) sent since the last idle point: what
    // a successor must run if the shard drains before answering. A batch
    // need not end at a Sync (the client's bytes arrive as TCP delivers
    // them), so an idle point only retires batches up to the last one that
    // held a sync point; later ones stay until theirs is answered.
    let mut replay = Replay::new(MAX_REPLAY_BYTES);
    let mut replayable = true;
    let mut attached = true;
    // Named prepared statements, taken along when the session moves.
    let mut named = Named::default();
    // The router's drain (SIGTERM): end at the next idle point, or now.
    let mut drain = router.drain.clone();
    loop {
        tokio::select! {
            r = drain.changed() => {
                // The sender lives as long as the process; were it gone,
                // the process is ending: end now.
                let d = if r.is_err() { Drain::Now } else { *drain.borrow_and_update() };
                let idle = pending == 0 && status == b'I';
                if must_end(d, idle) {
                    if attached {
                        at.link.close(at.id).await;
                    }
                    return Err(ended_by_drain(router, idle));
                }
            }
            // Not while the shard holds the session paused: the client's
            // bytes wait in its socket, and TCP holds the client back.
            r = at.paused.changed(), if attached => {
                // The sender lives as long as the inbox (both share the
                // session's flow state), so this does not fail while
                // attached; were it to, treat it as a lost link.
                if r.is_err() {
                    if pending > 0 || status != b'I' {
                        return Err(fatal("08006", "connection to the pool shard was lost during a transaction; the transaction's outcome is unknown, retry it"));
                    }
                    attached = false;
                }
            }
            r = rd.read_buf(&mut inbuf), if !(attached && *at.paused.borrow()) => {
                match r {
                    Ok(0) | Err(_) => {
                        if pending > 0 {
                            // A client that gave up waiting: where it waited.
                            tracing::debug!(
                                shard = %at.link.addr,
                                id = at.id,
                                attached,
                                link_alive = at.link.alive(),
                                pending,
                                waited_ms = sent_at.map_or(0, |t| t.elapsed().as_millis() as u64),
                                "client left before its answer"
                            );
                        }
                        break;
                    }
                    Ok(_) => {}
                }
                // Every complete message goes out in one frame.
                let mut end = 0;
                let mut terminate = false;
                let mut walk = pg::messages(&inbuf);
                for m in walk.by_ref() {
                    if m.len() > router.limits.max_message {
                        return Err(fatal("08P01", "message too large"));
                    }
                    if m.tag == b'X' { terminate = true; break; }
                    named.observe(&m);
                    end += m.len();
                }
                if walk.bad().is_some() {
                    return Err(fatal("08P01", "invalid message length"));
                }
                // An incomplete message that already says it is too large.
                if let Some(head) = inbuf.get(end..end + 5).filter(|_| !terminate) {
                    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
                    if len + 1 > router.limits.max_message {
                        return Err(fatal("08P01", "message too large"));
                    }
                }
                if end > 0 {
                    let batch = inbuf.split_to(end).freeze();
                    if attached && pending == 0 && status == b'I' && replay.is_empty() {
                        let now = router.routes.epoch();
                        if now != epoch {
                            epoch = now;
                            // Idle, nothing owed: move if the source lives
                            // on another pod now. Nothing is lost: the next
                            // transaction has not been sent anywhere yet.
                            if let Ok((_, addr)) = router.routes.resolve(ns, name) {
                                if addr != at.link.addr {
                                    tracing::info!(from = %at.link.addr, to = %addr, "source moved; following it");
                                    at.link.close(at.id).await;
                                    attached = false;
                                }
                            }
                        }
                    }
                    if !attached {
                        // Unanswered batches (no Sync yet) died with the old
                        // link: the new shard needs them before this one.
                        epoch = router.routes.epoch();
                        at = move_to_owner(router, ns, name, &mut named, &who, &replay, pid).await?;
                        attached = true;
                    }
                    // Whether anything that may have run is unanswered: a
                    // Sync or Query sent, or a transaction open.
                    let owed_before = pending > 0 || status != b'I';
                    let syncs = sync_points(&batch);
                    pending += syncs;
                    if pending > 0 && sent_at.is_none() {
                        sent_at = Some(Instant::now());
                    }
                    if replay.push(batch.clone(), syncs) == Pushed::Overflowed {
                        let mut notice = BytesMut::new();
                        pg::put_notice(&mut notice, "NOTICE", "01000", &format!(
                            "shardpool: more than {} MiB of this transaction's messages are unanswered; if its pool shard hands the source over before the transaction ends, it fails instead of moving with it",
                            MAX_REPLAY_BYTES >> 20));
                        wr.write_all(&notice).await.map_err(|_| fatal("08006", "client gone"))?;
                    }
                    if !at.link.send(Frame::new(at.id, Kind::Messages, batch)).await {
                        // The link died before this batch went out. With
                        // nothing owed before it, nothing of this
                        // transaction can have run (unsynced batches roll
                        // back with the shard's session): it goes to the
                        // owner now. The client waits for its answer and
                        // sends nothing more, so waiting for its next bytes
                        // would hold it until it gives up.
                        if owed_before {
                            return Err(fatal("08006", "connection to the pool shard was lost during a transaction; the transaction's outcome is unknown, retry it"));
                        }
                        tracing::info!(shard = %at.link.addr, "link to the shard gone before the transaction went out; sending it to the source's owner");
                        epoch = router.routes.epoch();
                        at = move_to_owner(router, ns, name, &mut named, &who, &replay, pid).await?;
                    }
                }
                if terminate { break; }
            }
            f = at.inbox.recv(), if attached => {
                match f {
                    Some(f) if f.kind == Kind::Messages => {
                        replayable = false;
                        for m in pg::messages(&f.payload) {
                            if m.tag == b'Z' {
                                pending = pending.saturating_sub(1);
                                status = m.body().first().copied().unwrap_or(b'I');
                                queries.inc();
                                if let Some(t0) = sent_at.take() {
                                    latency.observe(t0.elapsed().as_secs_f64());
                                    if pending > 0 {
                                        sent_at = Some(Instant::now());
                                    }
                                }
                            } else if m.tag == b'E' {
                                if let Some(code) = pg::error_code(m.body()) {
                                    router.metrics.error("pg", ns, name, true, code);
                                }
                            }
                        }
                        wr.write_all(&f.payload).await.map_err(|_| fatal("08006", "client gone"))?;
                        if pending == 0 && status == b'I' {
                            replay.idle();
                            replayable = true;
                            // An idle point while the router drains: the
                            // transaction is done, the session ends here.
                            if must_end(*drain.borrow(), true) {
                                at.link.close(at.id).await;
                                return Err(ended_by_drain(router, true));
                            }
                        }
                    }
                    Some(f) if f.kind == Kind::Notice => {
                        // Says nothing of whether the batch ran: the
                        // session stays replayable.
                        wr.write_all(&f.payload).await.map_err(|_| fatal("08006", "client gone"))?;
                    }
                    Some(f) if f.kind == Kind::Closed && f.payload.is_empty() => {
                        // The server's own FATAL was already passed on.
                        at.link.forget(at.id);
                        attached = false;
                        break;
                    }
                    Some(f) if f.kind == Kind::Closed => {
                        at.link.forget(at.id);
                        let body = f.payload.get(5..).unwrap_or_default();
                        if pg::error_code(body) == Some(DRAINING) && replayable && !replay.lost() {
                            // Nothing ran: hand the batches to the next owner.
                            tracing::info!("shard handing over; holding the session");
                            router.metrics.replayed.inc();
                            epoch = router.routes.epoch();
                            at = move_to_owner(router, ns, name, &mut named, &who, &replay, pid).await?;
                        } else {
                            let msg = pg::error_field(body, b'M').unwrap_or("shard closed the session").to_string();
                            return Err(fatal(pg::error_code(body).unwrap_or("08006"), msg));
                        }
                    }
                    Some(_) => {}
                    None => {
                        // The link to the shard died.
                        if pending == 0 && status == b'I' {
                            attached = false; // reattach on the next batch
                        } else {
                            return Err(fatal("08006", "connection to the pool shard was lost during a transaction; the transaction's outcome is unknown, retry it"));
                        }
                    }
                }
            }
        }
    }
    if attached {
        at.link.close(at.id).await;
    }
    Ok(())
}

/// Opens the session on the source's owner now (holding it, as
/// [`attach`] does, while there is none), with the client's named
/// statements, and sends it the batches since the last idle point: only
/// when none of them can have run (the shard said so, or none was synced).
async fn move_to_owner(
    router: &Router,
    ns: &str,
    name: &str,
    named: &mut Named,
    who: &OpenAs,
    replay: &Replay,
    pid: u32,
) -> Result<Attached, Fatal> {
    if replay.lost() {
        return Err(fatal(
            "08006",
            "lost the pool shard while this session's unanswered messages were past the replay bound; retry",
        ));
    }
    let statements = named.encoded().clone();
    let (at, _) = attach(router, ns, name, Some(&statements), who).await?;
    router.retarget(pid, at.link.clone(), at.id);
    for b in replay.batches() {
        if !at
            .link
            .send(Frame::new(at.id, Kind::Messages, b.clone()))
            .await
        {
            return Err(fatal(
                "08006",
                "lost the pool shard while moving the session; retry",
            ));
        }
    }
    Ok(at)
}

/// The 57P01 a drained session ends with, counted by where it ended.
fn ended_by_drain(router: &Router, idle: bool) -> Fatal {
    let at = if idle { "idle" } else { "deadline" };
    router
        .metrics
        .drained
        .get_or_create(&super::metrics::DrainedAt { at })
        .inc();
    tracing::info!(at, "session ended: the router is draining");
    Fatal(restarting(!idle))
}

mod guard {
    use prometheus_client::metrics::gauge::Gauge;

    /// Decrements a gauge when dropped.
    pub(super) struct Dec(pub(super) Gauge);

    impl Drop for Dec {
        fn drop(&mut self) {
            self.0.dec();
        }
    }
}

/// Unregisters a cancel key when the session ends.
struct Unregister<'a>(&'a Router, u32);

impl Drop for Unregister<'_> {
    fn drop(&mut self) {
        self.0.unregister(self.1);
    }
}

fn scopeguard(router: &Router, pid: u32) -> Unregister<'_> {
    Unregister(router, pid)
}

#[cfg(test)]
mod tests {
    use super::source_name;

    #[test]
    fn database_names() {
        assert_eq!(source_name("tenants.acme", None), Some(("tenants", "acme")));
        assert_eq!(
            source_name("tenants.acme.eu", None),
            Some(("tenants", "acme.eu"))
        );
        assert_eq!(
            source_name("acme", Some("tenants")),
            Some(("tenants", "acme"))
        );
        assert_eq!(source_name("acme", None), None);
        assert_eq!(source_name(".acme", None), None);
        assert_eq!(source_name("tenants.", None), None);
    }
}
