//! The shard's internal endpoint for routers: accepts persistent
//! connections, demultiplexes frames into sessions, and writes every
//! session's answers back through the connection's [`Outbox`], whose
//! flusher writes a scheduler turn's worth at once (few syscalls under load).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::Instrument;

use super::metrics::ShardMetrics;
use super::registry::Registry;
use super::session;
use crate::proto::flow::{self, Intake};
use crate::proto::frame::{Frame, Kind};
use crate::proto::liveness::{self, LastHeard};
use crate::proto::outbox::Outbox;
use crate::proto::pg;
use crate::proto::{HELLO, HELLO_V1, HELLO_V3};

/// Serves routers on `listener` until `stop` flips to true.
pub async fn serve(
    listener: TcpListener,
    registry: Arc<Registry>,
    metrics: Arc<ShardMetrics>,
    draining: watch::Receiver<bool>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, peer)) => {
                    let registry = registry.clone();
                    let draining = draining.clone();
                    let metrics = metrics.clone();
                    tokio::spawn(async move {
                        if let Err(e) = connection(stream, peer, registry, metrics, draining).await {
                            tracing::debug!(%peer, error = %e, "router connection ended");
                        }
                    });
                }
                Err(e) => tracing::warn!(error = %e, "accept failed"),
            },
            _ = stop.changed() => if *stop.borrow() { return },
        }
    }
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    registry: Arc<Registry>,
    metrics: Arc<ShardMetrics>,
    draining: watch::Receiver<bool>,
) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let socket = socket2::SockRef::from(&stream).try_clone()?;
    let (mut rd, mut wr) = stream.into_split();
    let mut hello = [0u8; 8];
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        rd.read_exact(&mut hello),
    )
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no hello"))??;
    // Version 3 routers ping and pause sessions; version 2 routers ping;
    // version 1 routers (older releases) do neither.
    let flow = &hello == HELLO_V3;
    let pinged = flow || &hello == HELLO;
    if !pinged && &hello != HELLO_V1 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "not a shardpool router",
        ));
    }
    wr.write_all(&hello).await?;
    tracing::debug!(%peer, pinged, flow, "router connected");

    let outbox = Arc::new(Outbox::default());
    let writer = tokio::spawn({
        let outbox = outbox.clone();
        async move {
            let _ = outbox.flush_to(wr).await;
        }
    });
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
        if rd.read_buf(&mut buf).await? == 0 {
            break;
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
                Kind::Pause | Kind::Resume if flow => {
                    if let Some(intake) = sessions.get(&id) {
                        intake.hold(frame.kind == Kind::Pause);
                    }
                }
                Kind::Open => {
                    let key = String::from_utf8_lossy(&frame.payload).into_owned();
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
                        None => false,
                    };
                    if gone {
                        sessions.remove(&id);
                    }
                }
                Kind::Opened | Kind::Closed | Kind::Pong | Kind::Pause | Kind::Resume => {
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
    Ok(())
}
