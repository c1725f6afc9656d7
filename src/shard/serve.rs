//! The shard's internal endpoint for routers: accepts persistent
//! connections, demultiplexes frames into sessions, and writes every
//! session's answers back through the connection's [`Outbox`], whose
//! flusher writes a scheduler turn's worth at once (few syscalls under load).
//!
//! With mutual TLS (the default) a connection is a router only once its
//! TLS handshake succeeded with a client certificate from the link CA (see
//! [`crate::proto::linktls`]); anything else is closed before a single
//! frame, or even the greeting, is read.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::BytesMut;
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tracing::Instrument;

use super::admission::ClientId;
use super::metrics::{NoteOutcome, ShardMetrics};
use super::registry::Registry;
use super::released::Released;
use super::session;
use crate::proto::flow::{self, Intake};
use crate::proto::frame::{Frame, Kind};
use crate::proto::liveness::{self, LastHeard};
use crate::proto::outbox::Outbox;
use crate::proto::pg;
use crate::proto::stream::MaybeTls;
use crate::proto::{HELLO, HELLO_V1, HELLO_V3, HELLO_V4, HELLO_V5, HELLO_V6};

/// Bound on a router's TLS handshake.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The link's TLS: the current server configuration (None until the
/// shard's certificate is known: connections are refused meanwhile), or no
/// TLS at all when the release turned mutual TLS off.
pub type LinkTls = Option<watch::Receiver<Option<Arc<ServerConfig>>>>;

/// Longest wait, once `stop` flips, for the links to tell their sessions
/// to go elsewhere and close.
const LINK_CLOSE_BOUND: std::time::Duration = std::time::Duration::from_secs(2);

/// Serves routers on `listener` until `stop` flips to true; then every
/// link ends its sessions with "handing over" (see [`connection`]) and
/// this returns once they have closed (bounded by [`LINK_CLOSE_BOUND`]).
pub async fn serve(
    listener: TcpListener,
    tls: LinkTls,
    registry: Arc<Registry>,
    released: Arc<Released>,
    metrics: Arc<ShardMetrics>,
    draining: watch::Receiver<bool>,
    mut stop: watch::Receiver<bool>,
) {
    // One task per router connection; reaped as they end.
    let mut links = tokio::task::JoinSet::new();
    let link_stop = stop.clone();
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, peer)) => {
                    let registry = registry.clone();
                    let released = released.clone();
                    let draining = draining.clone();
                    let metrics = metrics.clone();
                    let stop = link_stop.clone();
                    let config = tls.as_ref().map(|rx| rx.borrow().clone());
                    links.spawn(async move {
                        let r = match admit(stream, peer, config).await {
                            Ok(Some((stream, socket))) => {
                                connection(stream, socket, peer, registry, released, metrics, draining, stop).await
                            }
                            Ok(None) => Ok(()),
                            Err(e) => Err(e),
                        };
                        if let Err(e) = r {
                            tracing::debug!(%peer, error = %e, "router connection ended");
                        }
                    });
                }
                Err(e) => tracing::warn!(error = %e, "accept failed"),
            },
            Some(_) = links.join_next(), if !links.is_empty() => {}
            r = stop.wait_for(|s| *s) => {
                if r.is_ok() {
                    break;
                }
                // The process dropped the sender: it is gone already.
                return;
            }
        }
    }
    drop(listener);
    let closing = async { while links.join_next().await.is_some() {} };
    if tokio::time::timeout(LINK_CLOSE_BOUND, closing)
        .await
        .is_err()
    {
        tracing::warn!(links = links.len(), "router links still closing at exit");
    }
}

/// A link's byte stream on the shard side.
type LinkStream = MaybeTls<tokio_rustls::server::TlsStream<crate::proto::linktls::LinkIo>>;

/// Admits a router connection: plain TCP when the release turned mutual TLS
/// off (`config` None), else only after a TLS handshake in which the client
/// proved a router certificate. Ok(None): refused (logged); nothing of the
/// protocol was read. Also returns a second handle on the socket.
async fn admit(
    stream: TcpStream,
    peer: SocketAddr,
    config: Option<Option<Arc<ServerConfig>>>,
) -> std::io::Result<Option<(LinkStream, socket2::Socket)>> {
    stream.set_nodelay(true)?;
    let socket = socket2::SockRef::from(&stream).try_clone()?;
    let config = match config {
        None => return Ok(Some((MaybeTls::Plain(stream), socket))),
        Some(None) => return Err(std::io::Error::other("no link certificate yet; refusing")),
        Some(Some(config)) => config,
    };
    let accepted = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        TlsAcceptor::from(config).accept(crate::proto::linktls::link_io(stream)),
    )
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no TLS handshake"))?;
    match accepted {
        Ok(s) => Ok(Some((MaybeTls::Tls(Box::new(s)), socket))),
        Err(e) => {
            tracing::warn!(%peer, error = %e, "link handshake refused (not a router of this release)");
            Ok(None)
        }
    }
}

/// One router connection. When `stop` flips (the process leaves after its
/// drain, or lost its Lease) every session still open is ended with
/// "handing over" (57P01) before the link closes: a query the router sent
/// that this shard never ran is then replayed on the next owner instead of
/// failing with "outcome unknown" when the link drops under it.
#[allow(clippy::too_many_arguments)]
async fn connection<S>(
    stream: S,
    socket: socket2::Socket,
    peer: SocketAddr,
    registry: Arc<Registry>,
    released: Arc<Released>,
    metrics: Arc<ShardMetrics>,
    draining: watch::Receiver<bool>,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    let mut hello = [0u8; 8];
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        rd.read_exact(&mut hello),
    )
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no hello"))??;
    // Version 3 routers ping and pause sessions; version 2 routers ping;
    // version 1 routers (older releases) do neither.
    // Version 4 routers also send prepared statements with Open.
    // Version 5 routers also say who each session is for.
    // Version 6 routers also carry `Released` notes between shards.
    let relays = &hello == HELLO_V6;
    let names = relays || &hello == HELLO_V5;
    let carries = names || &hello == HELLO_V4;
    let flow = carries || &hello == HELLO_V3;
    let pinged = flow || &hello == HELLO;
    if !pinged && &hello != HELLO_V1 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "not a shardpool router",
        ));
    }
    wr.write_all(&hello).await?;
    wr.flush().await?;
    tracing::debug!(%peer, pinged, flow, "router connected");

    let outbox = Arc::new(Outbox::default());
    let writer = tokio::spawn({
        let outbox = outbox.clone();
        async move {
            let _ = outbox.flush_to(wr).await;
        }
    });
    // Told of every source this shard lets go of while the link lives.
    let _told = relays.then(|| released.register(outbox.clone()));
    let heard = Arc::new(LastHeard::default());
    if pinged {
        // A router silent for this long is gone (frozen, partitioned): its
        // sessions end, and their connections go back or are discarded.
        let (heard, outbox) = (heard.clone(), outbox.clone());
        tokio::spawn(async move {
            if liveness::watchdog(heard, liveness::SHARD_SILENCE, outbox, false, socket).await {
                tracing::warn!(%peer, "router silent; closing its connection");
            }
        });
    }

    let mut sessions: HashMap<u32, Intake> = HashMap::new();
    let mut buf = BytesMut::with_capacity(64 * 1024);
    'read: loop {
        tokio::select! {
            r = rd.read_buf(&mut buf) => if r? == 0 {
                break;
            },
            _ = stop.wait_for(|s| *s) => {
                tracing::debug!(%peer, sessions = sessions.len(), "stopping: telling the router's sessions to go elsewhere");
                for id in sessions.keys() {
                    let msg = pg::error(
                        "FATAL",
                        pg::DRAINING,
                        "shard is handing over; retry on its successor",
                    );
                    let _ = outbox.push(Frame::new(*id, Kind::Closed, msg));
                }
                break;
            }
        }
        heard.touch();
        loop {
            let frame = match Frame::decode(&mut buf) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(%peer, error = %e, "malformed frame; closing router connection");
                    break 'read;
                }
            };
            let id = frame.session;
            match frame.kind {
                Kind::Ping => {
                    let _ = outbox.push(liveness::pong());
                }
                Kind::Released if relays && id == 0 => {
                    match crate::proto::released::decode(&frame.payload) {
                        Some(note) => {
                            tracing::debug!(%peer, source = %note.key, from = note.from, "told the source was released to this shard");
                            if released.hear(note) {
                                metrics
                                    .notes
                                    .get_or_create(&NoteOutcome { outcome: "heard" })
                                    .inc();
                            }
                        }
                        None => {
                            tracing::warn!(%peer, "malformed Released note; closing router connection");
                            break 'read;
                        }
                    }
                }
                Kind::Pause | Kind::Resume if flow => {
                    if let Some(intake) = sessions.get(&id) {
                        intake.hold(frame.kind == Kind::Pause);
                    }
                }
                Kind::Open => {
                    let mut client = ClientId::anonymous();
                    let mut report = false;
                    let mut tag = None;
                    let (key, statements) = if names {
                        let Some(open) = crate::proto::open::decode(&frame.payload) else {
                            tracing::warn!(%peer, "malformed Open; closing router connection");
                            break 'read;
                        };
                        client = ClientId {
                            name: Arc::from(String::from_utf8_lossy(open.client).as_ref()),
                            weight: open.weight,
                        };
                        report = open.report_admission;
                        tag = crate::shard::tags::session_tag(&String::from_utf8_lossy(open.tag));
                        (open.key, open.statements)
                    } else if carries {
                        crate::proto::split_open(&frame.payload)
                    } else {
                        (&frame.payload[..], &[][..])
                    };
                    let statements = frame.payload.slice_ref(statements);
                    let key = String::from_utf8_lossy(key).into_owned();
                    if *draining.borrow() {
                        // Nothing may start here any more: the router holds
                        // the session and tries again (the next owner).
                        let msg = pg::error(
                            "FATAL",
                            pg::DRAINING,
                            "shard is handing over; retry on its successor",
                        );
                        let _ = outbox.send(Frame::new(id, Kind::Closed, msg)).await;
                        continue;
                    }
                    let Some(source) = registry.get(&key) else {
                        registry.note_demand(&key);
                        let msg = pg::error(
                            "FATAL",
                            pg::DRAINING,
                            &format!("source {key} is not served by this shard"),
                        );
                        let _ = outbox.send(Frame::new(id, Kind::Closed, msg)).await;
                        continue;
                    };
                    let (intake, inbox, paused) = flow::session(id, outbox.clone(), flow);
                    sessions.insert(id, intake);
                    // The span wraps the future: entered on every poll, never
                    // held across an await.
                    let span = tracing::debug_span!("session", id, source = %key);
                    tokio::spawn(
                        session::run(
                            id,
                            source,
                            statements,
                            session::Peer {
                                client,
                                tag,
                                report_admission: report,
                                notices: names,
                            },
                            inbox,
                            paused,
                            outbox.clone(),
                            draining.clone(),
                            metrics.clone(),
                        )
                        .instrument(span),
                    );
                }
                Kind::Close => {
                    if let Some(intake) = sessions.remove(&id) {
                        let _ = intake.deliver(frame).await;
                    }
                }
                Kind::Messages | Kind::Cancel => {
                    // Never waits on a version 3 link: a session that falls
                    // behind is paused, the others carry on.
                    let gone = match sessions.get(&id) {
                        Some(intake) => !intake.deliver(frame).await,
                        None if frame.kind == Kind::Messages => {
                            // Nothing of it ran here. A session that ended
                            // on its own told the router so already (this
                            // crossed it); any other router waiting for an
                            // answer would wait for its client's timeout.
                            let msg = pg::error(
                                "FATAL",
                                pg::DRAINING,
                                "this shard has no such session; retry on the source's owner",
                            );
                            let _ = outbox.send(Frame::new(id, Kind::Closed, msg)).await;
                            false
                        }
                        None => false,
                    };
                    if gone {
                        tracing::debug!(%peer, session = id, "a frame for a session that has ended; dropped");
                        sessions.remove(&id);
                    }
                }
                Kind::Opened
                | Kind::Closed
                | Kind::Pong
                | Kind::Pause
                | Kind::Resume
                | Kind::Notice
                | Kind::Admitted
                | Kind::Released => {
                    tracing::warn!(%peer, "router sent a shard-side frame; closing");
                    break 'read;
                }
            }
        }
        // Sessions that ended on their own.
        sessions.retain(|_, intake| !intake.is_closed());
    }
    // Sessions see their inboxes close; what they queued is still written.
    drop(sessions);
    outbox.close();
    let _ = writer.await;
    // The writer ended with a FIN. Read (and drop) what the router still
    // sends until it closes its end: a socket closed with unread bytes is
    // reset, and a reset discards the frames still on their way, such as
    // the `Closed` that tells a session to go to the next owner (its
    // client would wait for its timeout instead).
    let _ = tokio::time::timeout(LINK_CLOSE_BOUND / 2, async {
        let mut sink = [0u8; 4096];
        while let Ok(n) = rd.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A shard endpoint serving no source on a loopback port, and a router
    /// link to it past the greeting (version 6). Flip the sender to stop.
    async fn linked() -> (TcpStream, watch::Sender<bool>, tokio::task::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let registry = Arc::new(Registry::default());
        let mut reg = prometheus_client::registry::Registry::default();
        let metrics = Arc::new(ShardMetrics::register(&mut reg, registry.clone(), 10));
        // The sender stays with the endpoint's task: never draining.
        let (draining_tx, draining) = watch::channel(false);
        let (stop_tx, stop) = watch::channel(false);
        let server = tokio::spawn(async move {
            let _draining = draining_tx;
            serve(
                listener,
                None,
                registry,
                Arc::new(Released::new(0)),
                metrics,
                draining,
                stop,
            )
            .await;
        });
        let mut link = TcpStream::connect(addr).await.expect("connect");
        link.write_all(HELLO_V6).await.expect("hello");
        let mut hello = [0u8; 8];
        link.read_exact(&mut hello).await.expect("greeting");
        assert_eq!(&hello, HELLO_V6);
        (link, stop_tx, server)
    }

    /// Reads frames from `link` until one for `session` arrives (2 s at most).
    async fn frame_for(link: &mut TcpStream, buf: &mut BytesMut, session: u32) -> Option<Frame> {
        let read = async {
            loop {
                while let Ok(Some(f)) = Frame::decode(buf) {
                    if f.session == session {
                        return Some(f);
                    }
                }
                match link.read_buf(buf).await {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                }
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(2), read)
            .await
            .ok()
            .flatten()
    }

    /// A router sending a transaction on a session this shard does not
    /// know (it ended here, crossing the router's send) is told at once,
    /// with the SQLSTATE that lets it send the transaction to the source's
    /// owner: it never waits for an answer that cannot come. The link
    /// goes on serving.
    #[tokio::test]
    async fn messages_for_a_session_the_shard_does_not_know_are_answered_with_closed() {
        let (mut link, stop_tx, server) = linked().await;

        let mut query = BytesMut::new();
        query.extend_from_slice(b"Q\0\0\0\x0dSELECT 1\0");
        let mut out = BytesMut::new();
        Frame::new(7, Kind::Messages, query.freeze()).encode(&mut out);
        link.write_all(&out).await.expect("send");
        let mut buf = BytesMut::new();
        let answer = frame_for(&mut link, &mut buf, 7)
            .await
            .expect("an answer for session 7 within 2 s");
        assert_eq!(answer.kind, Kind::Closed, "the session is closed");
        assert_eq!(
            pg::error_code(answer.payload.get(5..).unwrap_or_default()),
            Some(pg::DRAINING),
            "nothing ran: the router may retry on the owner"
        );

        let mut ping = BytesMut::new();
        liveness::ping().encode(&mut ping);
        link.write_all(&ping).await.expect("ping");
        let pong = frame_for(&mut link, &mut buf, 0)
            .await
            .expect("the link still answers");
        assert_eq!(pong.kind, Kind::Pong);

        let _ = stop_tx.send(true);
        server.await.expect("serve ends on stop");
    }

    /// A stopping shard closes its end of a link only after the router
    /// closed its own: until then it reads (and drops) what still comes, so
    /// the connection ends with two FINs, never a reset (which would
    /// discard the frames still on their way to the router).
    #[tokio::test]
    async fn a_stopping_shard_reads_until_the_router_closes_and_never_resets_the_link() {
        let (mut link, stop_tx, server) = linked().await;

        let _ = stop_tx.send(true);
        // The shard's FIN: it has nothing more to say.
        let mut buf = [0u8; 1024];
        let eof = tokio::time::timeout(std::time::Duration::from_secs(2), async {
            loop {
                match link.read(&mut buf).await {
                    Ok(0) => return Ok(()),
                    Ok(_) => {}
                    Err(e) => return Err(e),
                }
            }
        })
        .await
        .expect("the shard closes its end within 2 s");
        assert!(eof.is_ok(), "a FIN, not a reset: {eof:?}");
        // The router, not having read that yet, still sends.
        let mut ping = BytesMut::new();
        liveness::ping().encode(&mut ping);
        for _ in 0..3 {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            link.write_all(&ping)
                .await
                .expect("the shard still reads what the router sends after its FIN");
        }
        link.shutdown().await.expect("the router closes its end");
        server.await.expect("serve ends on stop");
    }
}
