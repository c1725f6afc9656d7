//! One client session on this shard, under transaction pooling: a server
//! connection is taken from the source's pool when the session's first
//! message after an idle point arrives, and given back at the
//! ReadyForQuery that ends the transaction (status 'I' with every Sync or
//! Query answered). Messages pass through unchanged.
//!
//! While the shard drains, a session that holds no server connection
//! answers its next batch with `Closed` carrying SQLSTATE 57P01 before
//! running anything, so the router can safely send it to the next owner.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;

use bytes::{Bytes, BytesMut};
use tokio::sync::watch;

use std::collections::VecDeque;

use super::admission::{ClientId, Entry, Permit, Ticket};
use super::checkout::{self, CheckoutError};
use super::metrics::ShardMetrics;
use super::pool::Conn;
use super::prepared::{self, Expect, Statements};
use super::registry::Source;
use super::server;
use super::tags::{self, Charge};
use crate::proto::flow::Inbox;
use crate::proto::frame::{Frame, Kind};
use crate::proto::outbox::Outbox;
use crate::proto::pg;

use crate::proto::pg::{DRAINING, sync_points};

/// Marks a source busy for as long as it lives: from before a session asks
/// the pool for a connection until the connection is given back, so a drain
/// that sees zero busy knows no connection can appear afterwards. The count
/// goes up before the session reads `retired`, and a drain sets `retired`
/// before it reads the count, both SeqCst: one of the two sees the other.
struct Busy(Arc<Source>);

impl Busy {
    fn new(s: &Arc<Source>) -> Busy {
        s.busy.fetch_add(1, Ordering::SeqCst);
        Busy(s.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Who the session is for, and what its router understands (from the
/// link's protocol version and the Open frame).
#[derive(Debug, Clone)]
pub struct Peer {
    /// The client identity for admission (anonymous before version 5).
    pub client: ClientId,
    /// The session's cost tag (application_name, or the HTTP `tag`).
    pub tag: Option<Arc<str>>,
    /// Send `Admitted` frames (the router's HTTP sessions ask).
    pub report_admission: bool,
    /// The router passes `Notice` frames on (version 5).
    pub notices: bool,
}

/// A checked-out connection and what the session owes it.
struct Held {
    conn: Conn,
    /// Sync points sent and not yet answered.
    pending: usize,
    /// Transaction status of the last ReadyForQuery.
    status: u8,
    /// When the server last sent something (or was last sent a request
    /// while owing nothing): the answer deadline counts from here.
    heard: Instant,
    /// What the transaction cost, recorded under its tag at its end.
    charge: Option<Charge>,
    /// limits.perClient.statementTimeout: a request unanswered this long
    /// is cancelled on the server.
    ceiling: Option<Duration>,
    /// When the oldest unanswered request was sent.
    asked: Instant,
    /// A cancel was sent for that request.
    cancelled: bool,
    /// The admission slot, given back with the connection.
    _permit: Permit,
    _busy: Busy,
}

/// Time the server gets beyond statementTimeout to answer: past it, the
/// server is taken to be unreachable (a blackholed network answers nothing,
/// not even the timeout's own error).
pub const ANSWER_GRACE: Duration = Duration::from_secs(2);

/// How a session ends or goes on after asking for a connection.
// Not boxed: it is moved into the session once per transaction, and a box
// would be an allocation per transaction on the hot path.
#[allow(clippy::large_enum_variant)]
enum Checkout {
    Got(Held),
    /// An error was answered; the session goes on.
    Answered,
    /// The session is over.
    End,
}

/// What a session does while its transaction waits for admission.
enum Waited {
    Admitted(Permit),
    /// Refused, or cancelled by the client: answered with this error.
    Answer(&'static str, String),
    /// The client left.
    End,
}

/// Waits for admission: tells a waiting wire client so after
/// `limits.noticeAfter`, gives up at `deadline`, and keeps reading the
/// session's frames (a Cancel ends the wait with 57014, a Close or a lost
/// link ends the session; anything else waits in `backlog`).
#[allow(clippy::too_many_arguments)]
async fn queue(
    id: u32,
    source: &Source,
    mut ticket: Ticket,
    deadline: Instant,
    peer: &Peer,
    outbox: &Outbox,
    rx: &mut Inbox,
    backlog: &mut VecDeque<Frame>,
) -> Waited {
    let asked = Instant::now();
    let notice_at = asked + source.admission.limits().notice_after;
    let mut noticed = !peer.notices;
    loop {
        tokio::select! {
            biased;
            p = ticket.admitted() => return Waited::Admitted(p),
            () = tokio::time::sleep_until(deadline) => {
                let e = ticket.timed_out();
                return Waited::Answer("53300", format!("{}: {e}", source.key));
            }
            () = tokio::time::sleep_until(notice_at), if !noticed => {
                noticed = true;
                let text = match ticket.position() {
                    0 => format!("shardpool: waiting for this client's rate limit on {} (limits.perClient.rate)", source.key),
                    n => format!(
                        "shardpool: all connections of {} are busy; this transaction is number {n} in the queue after {:.1}s",
                        source.key,
                        asked.elapsed().as_secs_f64()
                    ),
                };
                let mut b = BytesMut::new();
                pg::put_notice(&mut b, "NOTICE", "01000", &text);
                let _ = outbox.send(Frame::new(id, Kind::Notice, b.freeze())).await;
            }
            f = rx.recv() => match f {
                None => return Waited::End,
                Some(f) if f.kind == Kind::Close => return Waited::End,
                Some(f) if f.kind == Kind::Cancel => {
                    return Waited::Answer("57014", "canceling statement due to user request (while it waited for a connection)".into());
                }
                Some(f) => backlog.push_back(f),
            },
        }
    }
}

/// Takes a connection for the transaction that `frame` starts, or answers
/// why not: first a place under the source's admission limits, then a
/// connection of its pool, both within acquireTimeout. Counted busy
/// before asking, and re-checked for a drain after.
#[allow(clippy::too_many_arguments)]
async fn checkout(
    id: u32,
    source: &Arc<Source>,
    frame: &Frame,
    peer: &Peer,
    outbox: &Outbox,
    rx: &mut Inbox,
    backlog: &mut VecDeque<Frame>,
    draining: &watch::Receiver<bool>,
    metrics: &ShardMetrics,
) -> Checkout {
    let busy = Busy::new(source);
    if *draining.borrow() || source.retired.load(Ordering::SeqCst) {
        let msg = pg::error(
            "FATAL",
            DRAINING,
            "shard is handing over; retry on its successor",
        );
        let _ = outbox.send(Frame::new(id, Kind::Closed, msg)).await;
        return Checkout::End;
    }
    let asked = Instant::now();
    let wait = source.pool.manager().settings().acquire_timeout;
    let deadline = asked + wait;
    let refusal = match source.admission.enter(&peer.client, deadline) {
        Ok(Entry::Admitted(p)) => Ok(p),
        Ok(Entry::Queued(t)) => {
            match queue(id, source, t, deadline, peer, outbox, rx, backlog).await {
                Waited::Admitted(p) => Ok(p),
                Waited::Answer(code, msg) => Err((code, msg)),
                Waited::End => return Checkout::End,
            }
        }
        Err(e) => Err(("53300", format!("{}: {e}", source.key))),
    };
    let permit = match refusal {
        Ok(p) => p,
        Err((code, msg)) => {
            metrics.checkout_wait.observe(asked.elapsed().as_secs_f64());
            if code == "53300" {
                source.stats.checkout_errors.fetch_add(1, Ordering::Relaxed);
            }
            return answer_error(id, frame, outbox, code, &msg).await;
        }
    };
    if !source.admission.bypassed() {
        metrics
            .clients
            .record(&peer.client.name, asked.elapsed().as_secs_f64());
    }
    if peer.report_admission {
        let waited = u64::try_from(asked.elapsed().as_micros()).unwrap_or(u64::MAX);
        let _ = outbox
            .send(Frame::new(
                id,
                Kind::Admitted,
                Bytes::copy_from_slice(&waited.to_be_bytes()),
            ))
            .await;
    }
    let got = checkout::get(
        &source.pool,
        deadline.saturating_duration_since(Instant::now()),
    )
    .await;
    metrics.checkout_wait.observe(asked.elapsed().as_secs_f64());
    match got {
        Ok(conn) => {
            source.stats.transactions.fetch_add(1, Ordering::Relaxed);
            let charge = tags::comment_tag(&frame.payload)
                .or_else(|| peer.tag.clone())
                .map(|tag| Charge {
                    costs: source.tags.clone(),
                    tag,
                    since: Instant::now(),
                    rows: 0,
                });
            Checkout::Got(Held {
                charge,
                ceiling: source.admission.statement_ceiling(),
                asked: Instant::now(),
                cancelled: false,
                conn,
                pending: 0,
                status: b'I',
                heard: Instant::now(),
                _permit: permit,
                _busy: busy,
            })
        }
        Err(e @ CheckoutError::Handover(_)) => {
            let msg = pg::error("FATAL", e.sqlstate(), &e.to_string());
            let _ = outbox.send(Frame::new(id, Kind::Closed, msg)).await;
            Checkout::End
        }
        Err(e) => {
            source.stats.checkout_errors.fetch_add(1, Ordering::Relaxed);
            answer_error(id, frame, outbox, e.sqlstate(), &e.to_string()).await
        }
    }
}

/// Answers the batch `frame` (a transaction that did not start) with an
/// error, and a ReadyForQuery for each of its sync points.
async fn answer_error(id: u32, frame: &Frame, outbox: &Outbox, code: &str, msg: &str) -> Checkout {
    let syncs = sync_points(&frame.payload);
    let mut out = BytesMut::new();
    pg::put_error(&mut out, "ERROR", code, msg);
    for _ in 0..syncs {
        pg::put_ready(&mut out, b'I');
    }
    match outbox
        .send(Frame::new(id, Kind::Messages, out.freeze()))
        .await
    {
        Ok(()) => Checkout::Answered,
        Err(_) => Checkout::End,
    }
}

/// Asks the server to cancel what runs on `conn` (in the background).
fn cancel_running(source: &Source, conn: &Conn) {
    let p = source.pool.manager().params();
    let (host, port, pid, secret) = (
        p.host.clone(),
        p.port,
        conn.backend_pid,
        conn.backend_secret,
    );
    tokio::spawn(async move {
        if let Err(e) = server::cancel(&host, port, pid, secret).await {
            tracing::warn!(error = %e, "cancel request failed");
        }
    });
}

/// Ends a connection whose state is unknown: asks the server to cancel
/// what runs on it, takes it out of the pool and closes it.
fn discard(source: &Source, conn: Conn) {
    let p = source.pool.manager().params();
    let (host, port) = (p.host.clone(), p.port);
    let conn = deadpool::managed::Object::take(conn);
    let (pid, secret) = (conn.backend_pid, conn.backend_secret);
    tokio::spawn(async move {
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            server::cancel(&host, port, pid, secret),
        )
        .await;
        conn.terminate().await;
    });
}

/// Runs a session until the router closes it or it fails.
/// `statements` are the client's named Parse messages the router carried
/// over from the session's previous shard (link protocol version 4).
#[allow(clippy::too_many_arguments)]
pub async fn run(
    id: u32,
    source: Arc<Source>,
    statements: Bytes,
    peer: Peer,
    mut rx: Inbox,
    mut paused: watch::Receiver<bool>,
    outbox: Arc<Outbox>,
    draining: watch::Receiver<bool>,
    metrics: Arc<ShardMetrics>,
) {
    metrics.sessions.inc();
    let _open = OpenSession(&metrics);
    let _attached = Attached::new(&source);
    // The client needs its server's parameters (server_version, encoding,
    // DateStyle, ...): learnt from the first connection of the pool.
    let mut params = source
        .server_params
        .read()
        .map(|p| p.clone())
        .unwrap_or_default();
    if params.is_empty() {
        let busy = Busy::new(&source);
        if !source.retired.load(Ordering::SeqCst) {
            let wait = source.pool.manager().settings().acquire_timeout;
            if let Ok(conn) = checkout::get(&source.pool, wait).await {
                params = conn.params.clone();
                if let Ok(mut p) = source.server_params.write() {
                    p.clone_from(&params);
                }
            }
        }
        drop(busy);
    }
    if outbox
        .send(Frame::new(id, Kind::Opened, opened_payload(&params)))
        .await
        .is_err()
    {
        return;
    }
    // The server must answer a request within this (statementTimeout plus
    // a grace); unset when the source has no statement timeout.
    let answer_within = source
        .pool
        .manager()
        .settings()
        .statement_timeout
        .map(|t| t + ANSWER_GRACE);
    // One timer, re-armed at most once per `answer_within`: the hot path
    // only records when the server last spoke.
    let answer_timer = tokio::time::sleep(Duration::from_secs(3600));
    tokio::pin!(answer_timer);
    let mut armed = false;
    // limits.perClient.statementTimeout, when set: one timer like the above.
    let ceiling_timer = tokio::time::sleep(Duration::from_secs(3600));
    tokio::pin!(ceiling_timer);
    let mut ceiling_armed = false;
    let mut held: Option<Held> = None;
    let mut stmts = Statements::default();
    stmts.learn(&statements);
    let mut owed: VecDeque<Expect> = VecDeque::new();
    // Frames that arrived while a transaction waited for admission.
    let mut backlog: VecDeque<Frame> = VecDeque::new();
    loop {
        let frame = match held.as_mut() {
            _ if !backlog.is_empty() => match backlog.pop_front() {
                Some(f) => f,
                None => continue,
            },
            None => match rx.recv().await {
                Some(f) => f,
                None => break,
            },
            Some(h) => {
                tokio::select! {
                    f = rx.recv() => match f { Some(f) => f, None => break },
                    // The router paused this session (its client reads
                    // slowly): leave the server's answer in the socket
                    // until it resumes. TCP holds the warehouse back.
                    r = paused.changed() => {
                        if r.is_err() { break }
                        continue;
                    }
                    r = h.conn.read_messages(), if !*paused.borrow() => {
                        match r {
                            Ok((chunk, ready)) => {
                                h.heard = Instant::now();
                                if ready.count > 0 {
                                    h.pending = h.pending.saturating_sub(ready.count);
                                    h.status = ready.last_status;
                                    // The next request's time starts now.
                                    h.asked = h.heard;
                                    h.cancelled = false;
                                }
                                if let Some(c) = h.charge.as_mut() {
                                    c.rows += ready.rows;
                                }
                                let chunk = prepared::filter(chunk.freeze(), &mut owed);
                                if outbox.send(Frame::new(id, Kind::Messages, chunk)).await.is_err() {
                                    break;
                                }
                                if h.conn.is_broken() {
                                    // A FATAL went to the client: the server is
                                    // closing, so is the session (no further
                                    // error: the client has the server's).
                                    let _ = outbox.send(Frame::new(id, Kind::Closed, Bytes::new())).await;
                                    return;
                                }
                                if h.pending == 0 && h.status == b'I' {
                                    held = None; // back to the pool
                                }
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "server connection lost mid-transaction");
                                let msg = pg::error("FATAL", "08006", "server connection lost; the transaction was not completed");
                                let _ = outbox.send(Frame::new(id, Kind::Closed, msg)).await;
                                return;
                            }
                        }
                        continue;
                    }
                    () = &mut answer_timer, if armed => {
                        armed = false;
                        let (Some(limit), true) = (answer_within, h.pending > 0) else { continue };
                        let silent = h.heard.elapsed();
                        if silent < limit {
                            answer_timer.as_mut().reset(h.heard + limit);
                            armed = true;
                            continue;
                        }
                        // The warehouse is unreachable: this connection's
                        // state is unknown, and the idle ones are suspect.
                        let msg = format!("no answer from the warehouse within statementTimeout + {}s; the connection was closed and the transaction's outcome is unknown", ANSWER_GRACE.as_secs());
                        tracing::warn!(source = %source.key, silent_ms = silent.as_millis() as u64, "{msg}");
                        source.pool.manager().record_failure(msg.clone());
                        if let Some(h) = held.take() {
                            discard(&source, h.conn);
                        }
                        super::sources::purge_idle(&source);
                        let _ = outbox.send(Frame::new(id, Kind::Closed, pg::error("FATAL", "08006", &msg))).await;
                        return;
                    }
                    () = &mut ceiling_timer, if ceiling_armed => {
                        ceiling_armed = false;
                        let (Some(limit), true, false) = (h.ceiling, h.pending > 0, h.cancelled) else { continue };
                        if h.asked.elapsed() < limit {
                            ceiling_timer.as_mut().reset(h.asked + limit);
                            ceiling_armed = true;
                            continue;
                        }
                        h.cancelled = true;
                        cancel_running(&source, &h.conn);
                        if peer.notices {
                            let mut b = BytesMut::new();
                            pg::put_notice(&mut b, "NOTICE", "01000", &format!(
                                "shardpool: cancelling the statement: it ran past limits.perClient.statementTimeout ({limit:?}) of {}", source.key));
                            let _ = outbox.send(Frame::new(id, Kind::Notice, b.freeze())).await;
                        }
                        continue;
                    }
                    () = source.kill.cancelled() => {
                        if let Some(h) = held.take() {
                            discard(&source, h.conn);
                        }
                        let msg = pg::error("FATAL", DRAINING, "terminating the transaction: the shard is handing the source over and the drain deadline has passed");
                        let _ = outbox.send(Frame::new(id, Kind::Closed, msg)).await;
                        return;
                    }
                }
            }
        };
        match frame.kind {
            Kind::Messages => {
                if held.is_none() {
                    match checkout(
                        id,
                        &source,
                        &frame,
                        &peer,
                        &outbox,
                        &mut rx,
                        &mut backlog,
                        &draining,
                        &metrics,
                    )
                    .await
                    {
                        Checkout::Got(h) => held = Some(h),
                        Checkout::Answered => continue,
                        Checkout::End => return,
                    }
                }
                let Some(h) = held.as_mut() else { continue };
                let syncs = sync_points(&frame.payload);
                if h.pending == 0 {
                    h.heard = Instant::now();
                    h.asked = h.heard;
                    h.cancelled = false;
                }
                h.pending += syncs;
                if let (Some(limit), false, true) = (answer_within, armed, h.pending > 0) {
                    answer_timer.as_mut().reset(h.heard + limit);
                    armed = true;
                }
                if let (Some(limit), false, true) = (h.ceiling, ceiling_armed, h.pending > 0) {
                    ceiling_timer.as_mut().reset(h.asked + limit);
                    ceiling_armed = true;
                }
                let bytes = if prepared::needs_rewrite(&frame.payload) {
                    let r = prepared::rewrite(&frame.payload, &mut stmts, &h.conn.prepared);
                    owed.extend(r.expect);
                    h.conn.prepared.extend(r.prepares);
                    r.bytes
                } else {
                    owed.extend((0..syncs).map(|_| Expect::Ready));
                    frame.payload.clone()
                };
                if let Err(e) = h.conn.write_all(&bytes).await {
                    tracing::warn!(error = %e, "writing to the server failed");
                    let msg = pg::error("FATAL", "08006", "server connection lost");
                    let _ = outbox.send(Frame::new(id, Kind::Closed, msg)).await;
                    return;
                }
            }
            Kind::Cancel => {
                if let Some(h) = held.as_ref() {
                    cancel_running(&source, &h.conn);
                }
            }
            Kind::Close => break,
            _ => {}
        }
    }
    // The client is gone. A connection left mid-transaction or mid-query
    // has unknown state: discard it rather than hand it to someone else.
    // Out of the pool at once (maintenance opens a replacement), with a
    // cancel first: a backend busy with a query reads no Terminate.
    if let Some(h) = held.take() {
        if h.pending > 0 || h.status != b'I' {
            discard(&source, h.conn);
        }
    }
}

/// Counts a session on its source for as long as it lives.
struct Attached(Arc<Source>);

impl Attached {
    fn new(s: &Arc<Source>) -> Attached {
        s.sessions.fetch_add(1, Ordering::SeqCst);
        Attached(s.clone())
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        self.0.sessions.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Counts a session as open for as long as it lives.
struct OpenSession<'a>(&'a ShardMetrics);

impl Drop for OpenSession<'_> {
    fn drop(&mut self) {
        self.0.sessions.dec();
    }
}

/// The ParameterStatus messages to replay to a client opening a session.
pub fn opened_payload(params: &[(String, String)]) -> Bytes {
    let mut out = BytesMut::new();
    for (k, v) in params {
        pg::put_parameter(&mut out, k, v);
    }
    out.freeze()
}
