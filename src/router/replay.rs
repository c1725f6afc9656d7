//! What a router session must be able to send again: the batches of client
//! messages sent since its last idle point. If the shard hands the source
//! over before answering any of them (it closes the session with 57P01),
//! the session opens on the next owner and sends them there, and the client
//! never notices. At an idle point the answered batches are dropped; those
//! sent after the last sync point stay (nothing of them was answered).
//!
//! The list is bounded in bytes: a long transaction, or a COPY that streams
//! gigabytes, would otherwise keep all of it. Past the bound the list is
//! dropped and the session has no replay until its next idle point with
//! nothing unsynced; the client is told once, with a NOTICE. A hand-over in
//! that window ends the session with an error instead of replaying.

use std::collections::VecDeque;

use bytes::Bytes;

/// Default bound on the bytes kept for replay per session.
pub const MAX_REPLAY_BYTES: usize = 8 << 20;

/// The result of recording a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Kept for replay.
    Kept,
    /// This batch passed the bound: the list was dropped (tell the client).
    Overflowed,
    /// The list was already dropped; not kept.
    NotKept,
}

/// One session's replay list.
#[derive(Debug)]
pub struct Replay {
    /// Batches with their sync point counts, oldest first.
    batches: VecDeque<(Bytes, usize)>,
    /// Sum of the batches' lengths.
    bytes: usize,
    /// The bound.
    limit: usize,
    /// Set when the bound was passed; cleared at an idle point.
    lost: bool,
    /// While lost: whether the last batch sent had no sync point (so an
    /// idle point does not mean everything was answered).
    lost_unsynced: bool,
}

impl Replay {
    /// An empty list bounded at `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Replay {
            batches: VecDeque::new(),
            bytes: 0,
            limit,
            lost: false,
            lost_unsynced: false,
        }
    }

    /// Records a batch that was (or is about to be) sent.
    pub fn push(&mut self, batch: Bytes, syncs: usize) -> Pushed {
        if self.lost {
            self.lost_unsynced = syncs == 0;
            return Pushed::NotKept;
        }
        self.bytes += batch.len();
        self.batches.push_back((batch, syncs));
        if self.bytes <= self.limit {
            return Pushed::Kept;
        }
        self.batches.clear();
        self.bytes = 0;
        self.lost = true;
        self.lost_unsynced = syncs == 0;
        Pushed::Overflowed
    }

    /// At an idle point (every sync point answered): drops the batches up
    /// to the last one that held a sync point, and ends a lost window when
    /// nothing unsynced was sent in it.
    pub fn idle(&mut self) {
        if let Some(last) = self.batches.iter().rposition(|(_, syncs)| *syncs > 0) {
            for (b, _) in self.batches.drain(..=last) {
                self.bytes -= b.len();
            }
        }
        if self.lost && !self.lost_unsynced {
            self.lost = false;
        }
    }

    /// Whether the batches since the idle point are no longer all kept.
    pub fn lost(&self) -> bool {
        self.lost
    }

    /// Whether nothing is kept.
    pub fn is_empty(&self) -> bool {
        self.batches.is_empty()
    }

    /// The kept batches, oldest first.
    pub fn batches(&self) -> impl Iterator<Item = &Bytes> {
        self.batches.iter().map(|(b, _)| b)
    }

    /// Bytes kept.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(n: usize) -> Bytes {
        Bytes::from(vec![b'x'; n])
    }

    #[test]
    fn answered_batches_go_at_an_idle_point_and_unsynced_ones_stay() {
        let mut r = Replay::new(1000);
        assert_eq!(r.push(b(10), 1), Pushed::Kept);
        assert_eq!(r.push(b(20), 0), Pushed::Kept);
        assert_eq!(r.push(b(30), 1), Pushed::Kept);
        assert_eq!(r.push(b(40), 0), Pushed::Kept);
        r.idle();
        assert_eq!(r.batches().map(Bytes::len).collect::<Vec<_>>(), [40]);
        assert_eq!(r.bytes(), 40);
    }

    #[test]
    fn an_idle_point_keeps_the_batches_after_the_last_sync() {
        let batch = |s: &'static str| Bytes::from_static(s.as_bytes());
        let kept = |r: &Replay| r.batches().cloned().collect::<Vec<_>>();
        // Parse/Bind/Execute arrived without their Sync, then the Sync
        // alone: answered together, both retire.
        let mut r = Replay::new(1000);
        r.push(batch("PBDE"), 0);
        r.push(batch("S"), 1);
        r.idle();
        assert!(r.is_empty());
        // A statement answered, the next one's Parse/Bind already sent:
        // those stay for a successor.
        r.push(batch("PBDES"), 1);
        r.push(batch("PB"), 0);
        r.idle();
        assert_eq!(kept(&r), [batch("PB")]);
        r.idle();
        assert_eq!(kept(&r), [batch("PB")], "nothing answered, nothing retired");
    }

    #[test]
    fn passing_the_bound_drops_the_list_once_and_says_so_once() {
        let mut r = Replay::new(100);
        assert_eq!(r.push(b(60), 1), Pushed::Kept);
        assert_eq!(r.push(b(60), 0), Pushed::Overflowed);
        assert!(r.lost() && r.is_empty() && r.bytes() == 0);
        assert_eq!(r.push(b(60), 0), Pushed::NotKept);
        assert!(r.is_empty());
    }

    #[test]
    fn the_lost_window_ends_at_an_idle_point_with_nothing_unsynced() {
        let mut r = Replay::new(100);
        r.push(b(200), 0);
        assert!(r.lost());
        // Idle, but the last batch had no sync point: still lost (an
        // unanswered tail was not kept).
        r.idle();
        assert!(r.lost());
        r.push(b(5), 1);
        r.idle();
        assert!(!r.lost());
        assert_eq!(r.push(b(5), 1), Pushed::Kept);
    }
}
