//! Persistent, multiplexed connections from this router to shard pods: one
//! per shard address, shared by every client session routed there. A reader
//! task hands incoming frames to their sessions; sessions encode theirs into
//! the link's [`Outbox`], whose flusher writes a scheduler turn's worth at once.
//!
//! Liveness: a watchdog pings the shard and fails the link when it has been
//! silent for [`liveness::ROUTER_SILENCE`] (a frozen or partitioned shard),
//! which closes every session's inbox: a session waiting for an answer
//! tells its client the transaction's outcome is unknown (08006), an idle
//! one re-attaches on its next transaction.
//!
//! Lock discipline: `sessions` (std Mutex) is held only to insert, look up
//! or remove a session's sender, never across an await; `links` likewise.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsConnector;

use crate::proto::flow::{self, Inbox, Intake};
use crate::proto::frame::{Frame, Kind};
use crate::proto::liveness::{self, LastHeard};
use crate::proto::outbox::Outbox;
use crate::proto::stream::MaybeTls;
use crate::proto::{HELLO, HELLO_V1, HELLO_V3, HELLO_V4, HELLO_V5, HELLO_V6};

/// One connection to one shard pod.
pub struct Link {
    /// Where it goes.
    pub addr: SocketAddr,
    /// Frames to write (shared buffer and its flusher task).
    out: Arc<Outbox>,
    /// session id -> its intake (see [`flow`]).
    sessions: Mutex<HashMap<u32, Intake>>,
    /// Whether the shard speaks protocol version 3 (per-session flow control).
    flow: bool,
    /// Whether the shard speaks version 4 (Open carries prepared statements).
    carries: bool,
    /// Whether the shard speaks version 5 (Open names the client).
    names: bool,
    /// Whether the shard speaks version 6 (`Released` notes).
    relays: bool,
    /// Next session id to try (see [`free_id`]; taken under `sessions`).
    next_id: AtomicU32,
    /// Set when the connection failed; a new one is made on next use.
    dead: AtomicBool,
    /// The socket (a second handle), shut down when the link fails so that
    /// the reader blocked on it returns at once.
    socket: socket2::Socket,
}

/// Who a session is for, told to shards of link protocol version 5.
#[derive(Debug, Clone, Default)]
pub struct OpenAs {
    /// The client identity: router user, or bearer token subject.
    pub client: String,
    /// Its admission weight.
    pub weight: u32,
    /// The session's cost tag (application_name).
    pub tag: String,
    /// Whether the shard should send `Admitted` frames (HTTP sessions).
    pub report_admission: bool,
}

/// A link's byte stream: mutual TLS over TCP, or plain TCP when the
/// release turned mutual TLS off.
type LinkStream = MaybeTls<tokio_rustls::client::TlsStream<crate::proto::linktls::LinkIo>>;

/// Mutual TLS towards shards: the router's client configuration (None until
/// its certificate is known) and what a shard's certificate must say.
pub struct LinkTls {
    /// Current configuration, renewed with the router's Secret.
    pub config: watch::Receiver<Option<Arc<rustls::ClientConfig>>>,
    /// Release name (in the shards' certificate names).
    pub release: String,
    /// Release namespace (likewise).
    pub namespace: String,
}

/// Greets a shard with `hello`; Ok(false) if it does not speak that
/// version (it closed the connection or answered otherwise).
async fn greet(stream: &mut LinkStream, hello: &[u8; 8]) -> std::io::Result<bool> {
    stream.write_all(hello).await?;
    stream.flush().await?;
    let mut answer = [0u8; 8];
    match tokio::time::timeout(HELLO_TIMEOUT, stream.read_exact(&mut answer)).await {
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "shard did not greet",
        )),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Ok(Err(e)) => Err(e),
        Ok(Ok(_)) => Ok(&answer == hello),
    }
}

/// Bound on a TCP connect to a shard.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Bound on a shard's answer to the greeting (a frozen shard accepts TCP
/// connections in the kernel but never answers).
const HELLO_TIMEOUT: Duration = Duration::from_secs(1);

/// Connects to shard `shard` at `addr`, with mutual TLS when configured:
/// the shard must present the certificate of exactly that shard. Returns
/// the stream and a second handle on its socket.
async fn dial(
    addr: SocketAddr,
    shard: u32,
    tls: Option<&LinkTls>,
) -> std::io::Result<(LinkStream, socket2::Socket)> {
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::TimedOut, "connect to shard timed out")
        })??;
    stream.set_nodelay(true)?;
    let socket = socket2::SockRef::from(&stream).try_clone()?;
    let Some(tls) = tls else {
        return Ok((MaybeTls::Plain(stream), socket));
    };
    let config = tls
        .config
        .borrow()
        .clone()
        .ok_or_else(|| std::io::Error::other("no link certificate yet"))?;
    let name = ServerName::try_from(crate::proto::linktls::shard_server_name(
        &tls.release,
        &tls.namespace,
        shard,
    ))
    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let tls = tokio::time::timeout(
        CONNECT_TIMEOUT,
        TlsConnector::from(config).connect(name, crate::proto::linktls::link_io(stream)),
    )
    .await
    .map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "TLS handshake with shard timed out",
        )
    })??;
    Ok((MaybeTls::Tls(Box::new(tls)), socket))
}

impl Link {
    /// Connects and greets a shard: version 3 (liveness pings, per-session
    /// flow control), else 2 (pings), else 1, for shards of older releases.
    async fn connect(
        addr: SocketAddr,
        shard: u32,
        tls: Option<&LinkTls>,
        notes: mpsc::Sender<Bytes>,
    ) -> std::io::Result<Arc<Link>> {
        let mut version = 0;
        let mut stream = None;
        for (v, hello) in [
            (6, HELLO_V6),
            (5, HELLO_V5),
            (4, HELLO_V4),
            (3, HELLO_V3),
            (2, HELLO),
            (1, HELLO_V1),
        ] {
            let (mut s, socket) = dial(addr, shard, tls).await?;
            if greet(&mut s, hello).await? {
                version = v;
                stream = Some((s, socket));
                break;
            }
        }
        let Some((stream, socket)) = stream else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "peer is not a shardpool shard",
            ));
        };
        let (pings, flow, carries, names) =
            (version >= 2, version >= 3, version >= 4, version >= 5);
        if version < 3 {
            tracing::info!(shard = %addr, version, "shard speaks an older link protocol: no per-session flow control{}", if pings { "" } else { ", no liveness checks" });
        }
        let watch_socket = socket.try_clone()?;
        let (mut rd, wr) = tokio::io::split(stream);
        let out = Arc::new(Outbox::default());
        let link = Arc::new(Link {
            addr,
            out: out.clone(),
            sessions: Mutex::default(),
            flow,
            carries,
            names,
            relays: version >= 6,
            next_id: AtomicU32::new(1),
            dead: AtomicBool::new(false),
            socket,
        });
        let writer_link = link.clone();
        tokio::spawn(async move {
            let _ = out.flush_to(wr).await;
            writer_link.fail();
        });
        let heard = Arc::new(LastHeard::default());
        if pings {
            let (heard, out, link) = (heard.clone(), link.out.clone(), link.clone());
            tokio::spawn(async move {
                if liveness::watchdog(heard, liveness::ROUTER_SILENCE, out, true, watch_socket)
                    .await
                {
                    tracing::warn!(shard = %link.addr, silent_ms = liveness::ROUTER_SILENCE.as_millis() as u64, "shard stopped answering; closing the link");
                }
                link.fail();
            });
        }
        let reader_link = link.clone();
        tokio::spawn(async move {
            let mut buf = BytesMut::with_capacity(64 * 1024);
            'read: loop {
                match rd.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => heard.touch(),
                }
                loop {
                    match Frame::decode(&mut buf) {
                        Ok(Some(f)) if f.kind == Kind::Pong => {}
                        Ok(Some(f)) if f.kind == Kind::Released && f.session == 0 => {
                            // Passed on by the relay task; a hint only, so
                            // dropped rather than waited for when it lags.
                            if notes.try_send(f.payload).is_err() {
                                tracing::debug!(shard = %reader_link.addr, "release note dropped: relay behind");
                            }
                        }
                        Ok(Some(f)) if matches!(f.kind, Kind::Pause | Kind::Resume) => {
                            if let Ok(s) = reader_link.sessions.lock() {
                                if let Some(intake) = s.get(&f.session) {
                                    intake.hold(f.kind == Kind::Pause);
                                }
                            }
                        }
                        Ok(Some(f)) => {
                            // Never waits on a version 3 link (a session
                            // that falls behind is paused), so one slow
                            // client holds back no other session here.
                            let intake = reader_link
                                .sessions
                                .lock()
                                .ok()
                                .and_then(|s| s.get(&f.session).cloned());
                            match intake {
                                Some(intake) => {
                                    let _ = intake.deliver(f).await;
                                }
                                None => {
                                    tracing::debug!(shard = %reader_link.addr, session = f.session, kind = ?f.kind, "frame for a session this link no longer has")
                                }
                            }
                        }
                        Ok(None) => break,
                        Err(e) => {
                            tracing::warn!(shard = %reader_link.addr, error = %e, "malformed frame from shard");
                            break 'read;
                        }
                    }
                }
            }
            reader_link.fail();
        });
        Ok(link)
    }

    /// Marks the link dead and ends every session on it (their inboxes close).
    fn fail(&self) {
        let first = !self.dead.swap(true, Ordering::Relaxed);
        self.out.close();
        let _ = self.socket.shutdown(std::net::Shutdown::Both);
        if let Ok(mut s) = self.sessions.lock() {
            if first {
                tracing::debug!(shard = %self.addr, sessions = s.len(), "link closed");
            }
            s.clear();
        }
    }

    /// Whether the link still works.
    pub fn alive(&self) -> bool {
        !self.dead.load(Ordering::Relaxed)
    }

    /// Opens a session on `source` (`namespace/name`); its frames arrive on
    /// the returned inbox, which closes if the link dies. The watch is true
    /// while the shard holds the session paused.
    pub async fn open(
        self: &Arc<Self>,
        source: &str,
        statements: Option<&Bytes>,
        who: &OpenAs,
    ) -> Option<(u32, Inbox, watch::Receiver<bool>)> {
        let (id, inbox, paused) = {
            let mut sessions = self.sessions.lock().ok()?;
            let id = free_id(&self.next_id, sessions.len(), |id| {
                sessions.contains_key(&id)
            })?;
            let (intake, inbox, paused) = flow::session(id, self.out.clone(), self.flow);
            sessions.insert(id, intake);
            (id, inbox, paused)
        };
        let payload = match statements.filter(|s| self.carries && !s.is_empty()) {
            _ if self.names => crate::proto::open::encode(
                source,
                &who.client,
                who.weight,
                &who.tag,
                who.report_admission,
                statements.map_or(&[][..], |s| &s[..]),
            ),
            Some(s) => {
                let mut p = BytesMut::with_capacity(source.len() + 1 + s.len());
                p.extend_from_slice(source.as_bytes());
                p.extend_from_slice(&[0]);
                p.extend_from_slice(s);
                p.freeze()
            }
            None => Bytes::copy_from_slice(source.as_bytes()),
        };
        self.send(Frame::new(id, Kind::Open, payload))
            .await
            .then_some((id, inbox, paused))
    }

    /// Passes a `Released` note on to this shard; false if it does not
    /// speak version 6 or the link is gone.
    pub fn relay(&self, note: Bytes) -> bool {
        self.relays && self.alive() && self.out.push(Frame::new(0, Kind::Released, note)).is_ok()
    }

    /// Queues a frame; false if the link is gone.
    pub async fn send(&self, f: Frame) -> bool {
        self.alive() && self.out.send(f).await.is_ok()
    }

    /// Forgets a session the shard has ended (it sent `Closed`): nothing
    /// to tell it. Without this the link would keep the session's intake
    /// until the link itself ends: one per held retry and per moved
    /// session, on links that live for weeks.
    pub fn forget(&self, id: u32) {
        if let Ok(mut s) = self.sessions.lock() {
            s.remove(&id);
        }
    }

    /// Forgets a session (after telling the shard).
    pub async fn close(&self, id: u32) {
        if let Ok(mut s) = self.sessions.lock() {
            s.remove(&id);
        }
        let _ = self.send(Frame::new(id, Kind::Close, Bytes::new())).await;
    }
}

/// `Released` notes waiting for the relay task (a rescale moves a few
/// hundred sources per shard at once); more are dropped (the API server
/// still carries the news).
const RELAY_QUEUE: usize = 4096;

/// Addresses whose connect locks are kept before unused ones are dropped
/// (times four): shard pods come and go with rollouts.
const MAX_LINK_ADDRS: usize = 64;

/// Links by shard address.
pub struct Links {
    /// addr -> link; see the module's lock discipline.
    links: Mutex<HashMap<SocketAddr, Arc<Link>>>,
    /// addr -> the lock a connect to it holds (a tokio Mutex, held across
    /// the connect), guarding when and why the last connect there failed:
    /// the sessions a handover held all ask for the new pod's link at
    /// once, one TLS handshake serves them all, and one failure answers
    /// every session that waited for it (they do not each try in turn).
    connecting: Mutex<HashMap<SocketAddr, Arc<tokio::sync::Mutex<Option<Failed>>>>>,
    /// Mutual TLS settings; None when the release turned it off.
    tls: Option<LinkTls>,
    /// Where the links put the `Released` notes their shards send.
    notes: mpsc::Sender<Bytes>,
    /// The other end, taken once by the relay task.
    notes_out: Mutex<Option<mpsc::Receiver<Bytes>>>,
}

impl Links {
    /// Links made with `tls` (None: plain TCP).
    pub fn new(tls: Option<LinkTls>) -> Links {
        let (notes, notes_out) = mpsc::channel(RELAY_QUEUE);
        Links {
            links: Mutex::default(),
            connecting: Mutex::default(),
            tls,
            notes,
            notes_out: Mutex::new(Some(notes_out)),
        }
    }

    /// The `Released` notes shards send over these links (once; None after).
    pub fn notes(&self) -> Option<mpsc::Receiver<Bytes>> {
        self.notes_out.lock().ok()?.take()
    }

    /// A live link to shard `shard` at `addr`, reusing the existing one.
    pub async fn get(&self, addr: SocketAddr, shard: u32) -> std::io::Result<Arc<Link>> {
        let live = || {
            self.links
                .lock()
                .ok()
                .and_then(|m| m.get(&addr).cloned())
                .filter(|l| l.alive())
        };
        if let Some(l) = live() {
            return Ok(l);
        }
        // One connect per address at a time; the others wait for it and
        // take its link.
        let lock = match self.connecting.lock() {
            Ok(mut c) => {
                if c.len() > 4 * MAX_LINK_ADDRS {
                    c.retain(|_, l| Arc::strong_count(l) > 1);
                }
                c.entry(addr).or_default().clone()
            }
            Err(_) => Arc::default(),
        };
        let asked = std::time::Instant::now();
        let mut last_failure = lock.lock().await;
        if let Some(l) = live() {
            return Ok(l);
        }
        if let Some(f) = last_failure.as_ref().filter(|f| f.at >= asked) {
            // The connect this one waited for failed: its answer stands.
            return Err(std::io::Error::new(f.kind, f.error.clone()));
        }
        let link = match Link::connect(addr, shard, self.tls.as_ref(), self.notes.clone()).await {
            Ok(link) => link,
            Err(e) => {
                *last_failure = Some(Failed {
                    at: std::time::Instant::now(),
                    kind: e.kind(),
                    error: e.to_string(),
                });
                return Err(e);
            }
        };
        if let Ok(mut m) = self.links.lock() {
            // Another session may have connected meanwhile; keep one.
            if let Some(existing) = m.get(&addr) {
                if existing.alive() {
                    return Ok(existing.clone());
                }
            }
            m.insert(addr, link.clone());
        }
        Ok(link)
    }
}

/// A connect to a shard address that failed: when, and why.
#[derive(Debug)]
struct Failed {
    at: std::time::Instant,
    kind: std::io::ErrorKind,
    error: String,
}

/// The next session id for a link with `in_use` open sessions: never 0
/// (the link's own frames, such as pings), and never one an open session
/// holds, also after the counter wraps. None only if every id is taken.
fn free_id(next: &AtomicU32, in_use: usize, taken: impl Fn(u32) -> bool) -> Option<u32> {
    (0..=in_use.saturating_add(1))
        .map(|_| next.fetch_add(1, Ordering::Relaxed))
        .find(|&id| id != 0 && !taken(id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ids_skip_zero_and_ids_in_use_after_wrapping() {
        let next = AtomicU32::new(u32::MAX);
        let taken = [1u32, 2];
        let free = |id: u32| taken.contains(&id);
        assert_eq!(free_id(&next, taken.len(), free), Some(u32::MAX));
        assert_eq!(free_id(&next, taken.len(), free), Some(3));
    }

    /// Sessions held by a handover all ask for the new pod's link at once.
    /// When the one connect they wait for fails (here: a pod that accepts
    /// TCP but never greets), its failure answers all of them; they do not
    /// each try again in turn, the last one waiting for all the others.
    #[tokio::test]
    async fn one_failed_connect_answers_every_session_that_waited_for_it() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = accepted.clone();
        tokio::spawn(async move {
            let mut silent = Vec::new();
            while let Ok((sock, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                silent.push(sock);
            }
        });
        let links = Arc::new(Links::new(None));
        let asks: Vec<_> = (0..4)
            .map(|_| {
                let links = links.clone();
                tokio::spawn(async move { links.get(addr, 0).await.is_err() })
            })
            .collect();
        for ask in asks {
            assert!(
                ask.await.expect("task"),
                "no link to a shard that never greets"
            );
        }
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "one connect attempt for the four sessions that asked together"
        );
        // A later ask tries again.
        assert!(links.get(addr, 0).await.is_err());
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn no_id_when_every_candidate_is_taken() {
        let next = AtomicU32::new(5);
        assert_eq!(free_id(&next, 3, |_| true), None);
    }
}
