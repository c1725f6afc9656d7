//! Per-session flow control on a shared link. The link's reader hands each
//! session's frames to it through an [`Intake`] that never waits: the frames
//! queue, and their bytes are counted. When a session's queue passes
//! [`HIGH_WATER`], the reader asks the peer to pause that session (a
//! `Pause` frame); when the session has taken enough frames to be under
//! [`LOW_WATER`] again, its [`Inbox`] asks the peer to resume. The peer
//! holds only that session: it stops reading the session's client (router)
//! or its server connection (shard), and TCP pushes back from there. Every
//! other session on the link carries on.
//!
//! On links of protocol versions 1 and 2 (a peer of an older release) there
//! are no pause frames: the reader waits while a session holds more than
//! [`HIGH_WATER`] bytes, as those versions did with their bounded queues.
//!
//! Hot path: a delivery is an atomic add and an unbounded channel send; a
//! receive an atomic subtract. No lock.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use bytes::Bytes;
use tokio::sync::{Notify, mpsc, watch};

use super::frame::{Frame, HEADER, Kind};
use super::outbox::Outbox;

/// Bytes of one session's frames queued at the receiver above which it asks
/// the peer to pause the session.
pub const HIGH_WATER: usize = 1 << 20;

/// Bytes queued below which a paused session is resumed.
pub const LOW_WATER: usize = 256 << 10;

/// What the reader and the session share.
struct Shared {
    /// Session id (for the pause and resume frames).
    id: u32,
    /// Bytes of frames delivered and not yet taken (frame header included).
    queued: AtomicUsize,
    /// Set while the peer has been asked to pause this session.
    asked: AtomicBool,
    /// Whether the link speaks version 3 (pause frames).
    flow: bool,
    /// The link's outbox, for pause and resume frames.
    out: Arc<Outbox>,
    /// Woken when the session takes a frame (links without flow control).
    taken: Notify,
    /// True while the peer holds this session paused (it sent `Pause`).
    held: watch::Sender<bool>,
}

/// The reader's end of one session (clones share it).
#[derive(Clone)]
pub struct Intake {
    /// Frames to the session (unbounded: bounded by the pause protocol).
    tx: mpsc::UnboundedSender<Frame>,
    /// Shared with the [`Inbox`].
    shared: Arc<Shared>,
}

/// The session's end: its frames, in order.
pub struct Inbox {
    /// Frames from the reader.
    rx: mpsc::UnboundedReceiver<Frame>,
    /// Shared with the [`Intake`].
    shared: Arc<Shared>,
}

/// A session's channel on a link whose outbox is `out`; `flow` when the
/// link speaks protocol version 3. The third value is true while the peer
/// holds the session paused: the session produces no frames meanwhile.
pub fn session(id: u32, out: Arc<Outbox>, flow: bool) -> (Intake, Inbox, watch::Receiver<bool>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let (held, held_rx) = watch::channel(false);
    let shared = Arc::new(Shared {
        id,
        queued: AtomicUsize::new(0),
        asked: AtomicBool::new(false),
        flow,
        out,
        taken: Notify::new(),
        held,
    });
    (
        Intake {
            tx,
            shared: shared.clone(),
        },
        Inbox { rx, shared },
        held_rx,
    )
}

fn cost(f: &Frame) -> usize {
    HEADER + f.payload.len()
}

impl Intake {
    /// Hands a frame to the session; false when the session is gone. With
    /// flow control it never waits (the peer is asked to pause past
    /// [`HIGH_WATER`]); without, it waits while the session is over it.
    pub async fn deliver(&self, f: Frame) -> bool {
        let s = &self.shared;
        if !s.flow {
            while s.queued.load(Ordering::Acquire) > HIGH_WATER {
                let taken = s.taken.notified();
                tokio::pin!(taken);
                taken.as_mut().enable();
                if s.queued.load(Ordering::Acquire) <= HIGH_WATER || self.tx.is_closed() {
                    break;
                }
                taken.await;
            }
        }
        let n = cost(&f);
        let queued = s.queued.fetch_add(n, Ordering::AcqRel) + n;
        if self.tx.send(f).is_err() {
            return false;
        }
        if s.flow && queued > HIGH_WATER && !s.asked.swap(true, Ordering::AcqRel) {
            let _ = s.out.push(Frame::new(s.id, Kind::Pause, Bytes::new()));
        }
        true
    }

    /// The peer paused (true) or resumed (false) this session.
    pub fn hold(&self, paused: bool) {
        self.shared.held.send_replace(paused);
    }

    /// Whether the session has ended (its inbox was dropped).
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

impl Inbox {
    /// The next frame; None when the link or the session's reader is gone.
    pub async fn recv(&mut self) -> Option<Frame> {
        let f = self.rx.recv().await?;
        let s = &self.shared;
        let left = s.queued.fetch_sub(cost(&f), Ordering::AcqRel) - cost(&f);
        if !s.flow {
            s.taken.notify_one();
        } else if left <= LOW_WATER && s.asked.swap(false, Ordering::AcqRel) {
            let _ = s.out.push(Frame::new(s.id, Kind::Resume, Bytes::new()));
        }
        Some(f)
    }

    /// Bytes queued for the session (for tests and metrics).
    pub fn queued(&self) -> usize {
        self.shared.queued.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;

    fn frame(id: u32, len: usize) -> Frame {
        Frame::new(id, Kind::Messages, Bytes::from(vec![b'x'; len]))
    }

    fn control(out: &Outbox) -> Vec<(u32, Kind)> {
        // What the reader queued on the link: decoded from the outbox.
        let mut buf = BytesMut::new();
        out.take_pending(&mut buf);
        let mut got = Vec::new();
        while let Ok(Some(f)) = Frame::decode(&mut buf) {
            got.push((f.session, f.kind));
        }
        got
    }

    #[tokio::test]
    async fn a_session_over_its_bound_is_paused_once_and_resumed_once_drained() {
        let out = Arc::new(Outbox::default());
        let (intake, mut inbox, _) = session(7, out.clone(), true);
        // 2 MiB for one session: the reader never waits, and asks for one pause.
        for _ in 0..32 {
            assert!(intake.deliver(frame(7, 64 * 1024)).await);
        }
        assert_eq!(control(&out), vec![(7, Kind::Pause)]);
        // Taking frames down to the low-water mark resumes it, once.
        while inbox.queued() > LOW_WATER {
            inbox.recv().await.expect("frame");
        }
        assert_eq!(control(&out), vec![(7, Kind::Resume)]);
        while inbox.queued() > 0 {
            inbox.recv().await.expect("frame");
        }
        assert!(control(&out).is_empty());
    }

    #[tokio::test]
    async fn a_paused_session_does_not_hold_back_another() {
        let out = Arc::new(Outbox::default());
        let (slow, _slow_inbox, _) = session(1, out.clone(), true);
        let (fast, mut fast_inbox, _) = session(2, out.clone(), true);
        // The slow session never reads; 8 MiB arrive for it.
        for _ in 0..128 {
            assert!(slow.deliver(frame(1, 64 * 1024)).await);
        }
        // The other session's frame is delivered and received at once.
        let got = tokio::time::timeout(std::time::Duration::from_millis(100), async {
            fast.deliver(frame(2, 10)).await;
            fast_inbox.recv().await
        })
        .await
        .expect("not held back");
        assert_eq!(got.map(|f| f.session), Some(2));
        assert_eq!(control(&out), vec![(1, Kind::Pause)]);
    }

    #[tokio::test]
    async fn without_flow_control_the_reader_waits_past_the_bound() {
        let out = Arc::new(Outbox::default());
        let (intake, mut inbox, _) = session(3, out.clone(), false);
        for _ in 0..16 {
            assert!(intake.deliver(frame(3, 64 * 1024)).await);
        }
        // Over the bound now: the next delivery waits until a frame is taken.
        let waiting = intake.deliver(frame(3, 64 * 1024));
        tokio::pin!(waiting);
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(50), waiting.as_mut())
                .await
                .is_err(),
            "delivery past the bound did not wait"
        );
        inbox.recv().await.expect("frame");
        assert!(waiting.await);
        assert!(control(&out).is_empty(), "no pause frames on old links");
    }

    #[tokio::test]
    async fn the_peer_pausing_a_session_is_seen_by_it() {
        let out = Arc::new(Outbox::default());
        let (intake, _inbox, mut held) = session(4, out, true);
        assert!(!*held.borrow());
        intake.hold(true);
        held.changed().await.expect("open");
        assert!(*held.borrow());
        intake.hold(false);
        held.changed().await.expect("open");
        assert!(!*held.borrow());
    }
}
