//! The write half of a multiplexed router-shard connection. Sessions encode
//! their frames straight into one shared buffer; a flusher task writes
//! whatever accumulated, after letting every other task the runtime already
//! has ready run first, so that all the frames produced in one turn of the
//! scheduler share one syscall (and wake the peer once).
//!
//! Hot path: a send is a lock, a memcpy and, when the buffer was empty, a
//! permit for the flusher; no allocation, no per-frame queue node. The
//! flusher swaps the buffer out under the lock and writes it without it.
//!
//! Lock discipline: `pending` is held only to append a frame or to swap the
//! buffer, never across an await.
//!
//! Backpressure: above [`HIGH_WATER`] bytes waiting, senders wait until the
//! flusher has taken the buffer (bounded memory per connection).

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::BytesMut;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;

use super::frame::Frame;

/// Bytes waiting to be written above which senders wait for the flusher.
pub const HIGH_WATER: usize = 1 << 20;

/// Buffer capacity kept between writes; a larger one (after a burst) is
/// given back.
const KEEP_CAPACITY: usize = 256 * 1024;

/// The connection is closed: the frame was not sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("connection closed")]
pub struct Closed;

/// Frames waiting for one connection's flusher.
#[derive(Debug, Default)]
pub struct Outbox {
    /// Encoded frames not yet handed to the flusher; see the lock discipline.
    pending: Mutex<BytesMut>,
    /// Permit for the flusher: given when `pending` goes from empty to
    /// non-empty, and on close.
    wake: Notify,
    /// Wakes senders waiting for room once the flusher took the buffer, and
    /// on close.
    room: Notify,
    /// Set by [`Outbox::close`] (or a failed write): sends are refused, the
    /// flusher writes what is left and returns.
    closed: AtomicBool,
}

impl Outbox {
    /// Queues `f`; waits while more than [`HIGH_WATER`] bytes are queued.
    pub async fn send(&self, f: Frame) -> Result<(), Closed> {
        loop {
            let room = self.room.notified();
            tokio::pin!(room);
            // Registered before the check, so a flush in between is not missed.
            room.as_mut().enable();
            {
                let mut buf = self.pending.lock().map_err(|_| Closed)?;
                if self.closed.load(Ordering::Acquire) {
                    return Err(Closed);
                }
                if buf.len() < HIGH_WATER {
                    let was_empty = buf.is_empty();
                    f.encode(&mut buf);
                    drop(buf);
                    if was_empty {
                        self.wake.notify_one();
                    }
                    return Ok(());
                }
            }
            room.await;
        }
    }

    /// Queues a control frame (a pong, a pause or a resume) without waiting
    /// for room. Readers use it: a reader that waited for its own
    /// connection's outbox could deadlock with the peer's reader doing the
    /// same. Control frames are few and small, so this stays bounded.
    pub fn push(&self, f: Frame) -> Result<(), Closed> {
        let mut buf = self.pending.lock().map_err(|_| Closed)?;
        if self.closed.load(Ordering::Acquire) {
            return Err(Closed);
        }
        let was_empty = buf.is_empty();
        f.encode(&mut buf);
        drop(buf);
        if was_empty {
            self.wake.notify_one();
        }
        Ok(())
    }

    /// Moves what is queued into `into` (tests of code that queues frames).
    #[cfg(test)]
    pub(crate) fn take_pending(&self, into: &mut BytesMut) {
        if let Ok(mut b) = self.pending.lock() {
            into.extend_from_slice(&b);
            b.clear();
        }
    }

    /// Refuses further frames; what is queued is still written.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.wake.notify_one();
        self.room.notify_waiters();
    }

    /// Whether [`Outbox::close`] was called or a write failed.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Writes queued frames to `wr` until the outbox is closed and empty, or
    /// a write fails (then it is closed too).
    pub async fn flush_to<W>(&self, mut wr: W) -> std::io::Result<()>
    where
        W: AsyncWrite + Unpin,
    {
        let r = self.flush_loop(&mut wr).await;
        self.close();
        let _ = wr.shutdown().await;
        r
    }

    async fn flush_loop<W>(&self, wr: &mut W) -> std::io::Result<()>
    where
        W: AsyncWrite + Unpin,
    {
        let mut out = BytesMut::with_capacity(64 * 1024);
        loop {
            self.wake.notified().await;
            // Sessions woken by the same poll of the sockets queue their
            // frames before this write.
            tokio::task::yield_now().await;
            {
                let mut buf = self
                    .pending
                    .lock()
                    .map_err(|_| std::io::Error::other("outbox lock poisoned"))?;
                std::mem::swap(&mut *buf, &mut out);
            }
            self.room.notify_waiters();
            if !out.is_empty() {
                wr.write_all(&out).await?;
                // A TLS stream may hold the last record until flushed.
                wr.flush().await?;
                out.clear();
                if out.capacity() > KEEP_CAPACITY {
                    out = BytesMut::with_capacity(64 * 1024);
                }
            }
            if self.is_closed() && self.pending.lock().map(|b| b.is_empty()).unwrap_or(true) {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::frame::Kind;
    use std::sync::Arc;
    use tokio::io::AsyncReadExt;

    fn frame(session: u32, len: usize) -> Frame {
        Frame::new(session, Kind::Messages, vec![b'x'; len])
    }

    async fn read_frames(mut rd: tokio::io::DuplexStream) -> Vec<Frame> {
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        while rd.read_buf(&mut buf).await.expect("read") > 0 {
            while let Some(f) = Frame::decode(&mut buf).expect("valid frames") {
                got.push(f);
            }
        }
        got
    }

    #[tokio::test(flavor = "current_thread")]
    async fn frames_of_one_turn_arrive_in_order_and_close_flushes_the_rest() {
        let out = Arc::new(Outbox::default());
        let (wr, rd) = tokio::io::duplex(1 << 16);
        let flusher = tokio::spawn({
            let out = out.clone();
            async move { out.flush_to(wr).await }
        });
        let reader = tokio::spawn(read_frames(rd));
        for i in 0..100 {
            out.send(frame(i, 10)).await.expect("open");
        }
        out.close();
        assert_eq!(out.send(frame(1000, 1)).await, Err(Closed));
        flusher.await.expect("joins").expect("flushes");
        let got = reader.await.expect("joins");
        let ids: Vec<u32> = got.iter().map(|f| f.session).collect();
        assert_eq!(ids, (0..100).collect::<Vec<_>>());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_slow_reader_holds_senders_at_the_high_water_mark() {
        let out = Arc::new(Outbox::default());
        // A pipe that holds 64 KiB and is not read yet.
        let (wr, rd) = tokio::io::duplex(64 * 1024);
        tokio::spawn({
            let out = out.clone();
            async move { out.flush_to(wr).await }
        });
        let sender = tokio::spawn({
            let out = out.clone();
            async move {
                for i in 0..64u32 {
                    out.send(frame(i, 64 * 1024)).await.expect("open");
                }
            }
        });
        // 4 MiB offered; the flusher is stuck on the pipe, so the sender
        // must stop at about HIGH_WATER queued plus what the flusher holds.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(!sender.is_finished(), "sender was not held back");
        let queued = out.pending.lock().expect("lock").len();
        assert!(
            queued <= HIGH_WATER + 64 * 1024 + 9,
            "{queued} bytes queued"
        );
        // Reading drains everything; the sender finishes.
        let reader = tokio::spawn(read_frames(rd));
        sender.await.expect("sender finishes");
        out.close();
        let got = reader.await.expect("joins");
        assert_eq!(got.len(), 64);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_failed_write_closes_the_outbox() {
        let out = Arc::new(Outbox::default());
        let (wr, rd) = tokio::io::duplex(1024);
        drop(rd);
        let flusher = tokio::spawn({
            let out = out.clone();
            async move { out.flush_to(wr).await }
        });
        out.send(frame(1, 10))
            .await
            .expect("queued before the write fails");
        assert!(flusher.await.expect("joins").is_err());
        assert!(out.is_closed());
        assert_eq!(out.send(frame(2, 10)).await, Err(Closed));
    }
}
