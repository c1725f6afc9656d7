//! Liveness of a router-shard connection. A peer that is frozen, partitioned
//! or gone keeps its TCP connection looking open (the kernel still
//! acknowledges, or nothing says it closed), so silence is what tells: the
//! reader records when it last read anything ([`LastHeard::touch`], one
//! clock read per read, no timer on the hot path), and a watchdog task
//! checks it a few times a second. On the router it also sends the Pings
//! that keep an idle link audible. When the silence limit passes, the
//! watchdog shuts the socket down, which ends the reader and the writer
//! and so every session on the connection.
//!
//! A process whose own runtime was held (CPU-starved on a busy host, or a
//! task that ran long) read nothing meanwhile either, so the silence it
//! sees includes its own stall: the watchdog counts how late its own
//! checks ran since it last heard the peer and does not hold that part
//! against the peer, and it lets the reader run once more before it gives
//! the peer up. A frozen peer is still cut off within the limit plus one
//! check when this process runs on time; under a stall the verdict waits
//! for the time the process actually ran.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use super::frame::{Frame, Kind};
use super::outbox::Outbox;

/// How often the router pings each shard.
pub const PING_EVERY: Duration = Duration::from_millis(500);

/// Silence after which the router gives a shard up (queries that may have
/// run get 08006; the rest are held and re-routed).
pub const ROUTER_SILENCE: Duration = Duration::from_millis(2500);

/// Silence after which a shard gives a router up (its sessions end and
/// their server connections go back or are discarded).
pub const SHARD_SILENCE: Duration = Duration::from_secs(10);

/// When a connection last heard from its peer.
#[derive(Debug)]
pub struct LastHeard {
    /// When the connection started.
    base: Instant,
    /// Milliseconds after `base` of the last read (relaxed: a watchdog
    /// that reads a slightly old value waits one more check).
    ms: AtomicU64,
}

impl Default for LastHeard {
    fn default() -> Self {
        LastHeard {
            base: Instant::now(),
            ms: AtomicU64::new(0),
        }
    }
}

impl LastHeard {
    /// Records that the peer was heard now.
    pub fn touch(&self) {
        let ms = u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.ms.store(ms, Ordering::Relaxed);
    }

    /// The time of the last read, in milliseconds after the start (a
    /// changed value means the peer was heard).
    fn stamp(&self) -> u64 {
        self.ms.load(Ordering::Relaxed)
    }

    /// How long the peer has been silent.
    pub fn silent_for(&self) -> Duration {
        let heard = self.base + Duration::from_millis(self.ms.load(Ordering::Relaxed));
        Instant::now().saturating_duration_since(heard)
    }
}

/// A Ping frame (session 0, no payload).
pub fn ping() -> Frame {
    Frame::new(0, Kind::Ping, Bytes::new())
}

/// A Pong frame (session 0, no payload).
pub fn pong() -> Frame {
    Frame::new(0, Kind::Pong, Bytes::new())
}

/// Watches one connection until the peer has been silent for `silence`
/// (then shuts `socket` down and returns true) or `out` closes (the
/// connection ended otherwise: returns false). With `pings`, also sends a
/// Ping through `out` every [`PING_EVERY`].
pub async fn watchdog(
    heard: Arc<LastHeard>,
    silence: Duration,
    out: Arc<Outbox>,
    pings: bool,
    socket: socket2::Socket,
) -> bool {
    let check = (silence / 5).min(PING_EVERY);
    let mut tick = tokio::time::interval(check);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_ping = Instant::now();
    // How late this task's own checks ran since the peer was last heard.
    let mut own_stall = Duration::ZERO;
    let mut heard_stamp = heard.stamp();
    let peer_silence = |own_stall: Duration| heard.silent_for().saturating_sub(own_stall);
    loop {
        let due = tick.tick().await;
        if out.is_closed() {
            return false;
        }
        let stamp = heard.stamp();
        if stamp != heard_stamp {
            heard_stamp = stamp;
            own_stall = Duration::ZERO;
        }
        own_stall += due.elapsed();
        if peer_silence(own_stall) > silence {
            // Data the runtime has not polled yet is read first: the
            // reader runs before this task resumes.
            tokio::task::yield_now().await;
            if peer_silence(own_stall) > silence {
                let _ = socket.shutdown(std::net::Shutdown::Both);
                out.close();
                return true;
            }
        }
        if pings && last_ping.elapsed() >= PING_EVERY {
            last_ping = Instant::now();
            if out.send(ping()).await.is_err() {
                return false;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test(start_paused = true)]
    async fn silence_is_measured_from_the_last_read() {
        let h = LastHeard::default();
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(h.silent_for() >= Duration::from_secs(2));
        h.touch();
        assert!(h.silent_for() < Duration::from_millis(10));
    }

    /// A peer that stops answering is given up within the silence limit
    /// plus one check; its socket is shut down, so a reader blocked on it
    /// returns at once.
    #[tokio::test]
    async fn a_silent_peer_is_cut_off_and_a_talking_one_is_not() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (ours, theirs) = tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
        let ours = ours.expect("connect");
        let (_theirs, _) = theirs.expect("accept");
        let socket = socket2::SockRef::from(&ours).try_clone().expect("dup");
        let (mut rd, _wr) = ours.into_split();
        let heard = Arc::new(LastHeard::default());
        let out = Arc::new(Outbox::default());
        let silence = Duration::from_millis(300);
        let started = std::time::Instant::now();
        let dog = tokio::spawn(watchdog(heard.clone(), silence, out.clone(), true, socket));
        // The peer never writes: the blocked read ends when the dog bites.
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(5), rd.read(&mut buf))
            .await
            .expect("the read returned");
        assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
        assert!(dog.await.expect("task"), "not reported dead");
        let took = started.elapsed();
        assert!(took >= silence && took < silence * 3, "{took:?}");
        // Pings were queued meanwhile (a ping every PING_EVERY at most).
        assert!(out.is_closed());

        // A peer heard all along is left alone.
        let heard = Arc::new(LastHeard::default());
        let out = Arc::new(Outbox::default());
        let (a, b) = tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
        let a = a.expect("connect");
        let _b = b.expect("accept");
        let socket = socket2::SockRef::from(&a).try_clone().expect("dup");
        let dog = tokio::spawn(watchdog(heard.clone(), silence, out.clone(), false, socket));
        for _ in 0..10 {
            heard.touch();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(!dog.is_finished());
        out.close();
        assert!(
            !dog.await.expect("task"),
            "a closed connection is not a dead peer"
        );
    }

    /// A process whose runtime is held (CPU-starved, a long task) does not
    /// give up a peer it could not read meanwhile: the silence it sees is
    /// its own. A stall is the clock moving while no task runs
    /// (`advance`); the peer's next bytes are read after the watchdog's
    /// late check, the worst order. A peer silent while this process runs
    /// on time is still given up within the limit plus one check.
    #[tokio::test(start_paused = true)]
    async fn a_stalled_process_does_not_blame_its_peer() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (ours, theirs) = tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
        let ours = ours.expect("connect");
        let _theirs = theirs.expect("accept");
        let socket = socket2::SockRef::from(&ours).try_clone().expect("dup");
        let heard = Arc::new(LastHeard::default());
        let out = Arc::new(Outbox::default());
        let silence = Duration::from_millis(300);
        let dog = tokio::spawn(watchdog(heard.clone(), silence, out.clone(), false, socket));
        for _ in 0..5 {
            heard.touch();
            tokio::time::sleep(Duration::from_millis(50)).await;
            // Held for four times the limit; the watchdog runs first after it.
            tokio::time::advance(silence * 4).await;
            // The watchdog checks (and checks again after a yield) before
            // the peer is heard of again.
            tokio::time::sleep(Duration::from_millis(10)).await;
            assert!(
                !dog.is_finished(),
                "the watchdog gave its peer up after a stall of its own"
            );
        }
        // Running on time, the peer silent from now: given up.
        heard.touch();
        let quiet = Instant::now();
        let bitten = tokio::time::timeout(Duration::from_secs(5), dog)
            .await
            .expect("given up")
            .expect("task");
        assert!(bitten);
        let took = quiet.elapsed();
        assert!(
            took >= silence && took <= silence + silence / 5 + Duration::from_millis(100),
            "{took:?}"
        );
    }
}
