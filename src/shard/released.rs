//! A move's release told over the routers' links (protocol version 6).
//!
//! A moved source's next owner learns that the previous one let go of it
//! from the API server: the hand-over write, then its own watch. At full
//! size during a rescale that was two trips through a busy API server
//! (0.8 s and 0.5 s median) in every held query's wait. So the previous
//! owner also tells its routers at once, as soon as its last connection of
//! the source is closed, and each router passes the note to the next
//! owner. The next owner opens the source on the note when its own view of
//! the DataSource agrees: assigned to it, and still named as served by the
//! shard the note comes from. The write still follows and stays the record
//! (it names the new owner, and a restarted shard decides from it alone);
//! the note only saves the wait. A note that never arrives costs nothing
//! but that wait; a note from a shard that does not serve the source is
//! ignored; the database fence ([`super::fence`]) stays behind both.
//!
//! Lock discipline: both maps are std Mutexes held for one map operation
//! or to copy the routers' outboxes, never across an await. Not on any
//! query's path: a few operations per moved source.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::proto::frame::{Frame, Kind};
use crate::proto::outbox::Outbox;

/// How long a note is believed: long enough for the next owner's watch to
/// show the move, short enough that a note cannot outlive the move it was
/// about (a source moving away and back within it is the only way to hit
/// a stale one, and the fence still stands behind that).
pub const BELIEVED: Duration = Duration::from_secs(10);

/// Most notes kept (a router repeating notes cannot grow the map).
const MAX_NOTES: usize = 20_000;

/// The notes a shard heard and the routers it tells.
#[derive(Debug)]
pub struct Released {
    /// This shard's index: notes for other shards are dropped.
    shard: u32,
    /// key -> (the shard that said it released the source, when heard).
    heard: Mutex<HashMap<String, (u32, Instant)>>,
    /// Keys heard since the main loop last took them.
    fresh: Mutex<HashSet<String>>,
    /// Wakes the main loop when `fresh` gained a key.
    wake: Notify,
    /// Outboxes of the routers connected with version 6, by connection.
    routers: Mutex<HashMap<u64, Arc<Outbox>>>,
    /// Next connection id for `routers`.
    next: AtomicU64,
}

/// Keeps a router's outbox in [`Released`] while its connection lives.
pub struct Registered {
    released: Arc<Released>,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        if let Ok(mut r) = self.released.routers.lock() {
            r.remove(&self.id);
        }
    }
}

impl Released {
    /// For shard `shard`.
    pub fn new(shard: u32) -> Released {
        Released {
            shard,
            heard: Mutex::default(),
            fresh: Mutex::default(),
            wake: Notify::new(),
            routers: Mutex::default(),
            next: AtomicU64::new(0),
        }
    }

    /// Adds a router connection's outbox until the guard drops.
    pub fn register(self: &Arc<Self>, outbox: Arc<Outbox>) -> Registered {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut r) = self.routers.lock() {
            r.insert(id, outbox);
        }
        Registered {
            released: self.clone(),
            id,
        }
    }

    /// Tells every connected router that this shard let go of `key` and
    /// hands it to `to`. Call only once no server connection of the source
    /// is open or opening here. Returns how many routers were told.
    pub fn tell(&self, key: &str, to: u32) -> usize {
        let outboxes: Vec<Arc<Outbox>> = match self.routers.lock() {
            Ok(r) => r.values().cloned().collect(),
            Err(_) => return 0,
        };
        let payload = crate::proto::released::encode(key, self.shard, to);
        outboxes
            .iter()
            .filter(|o| {
                o.push(Frame::new(0, Kind::Released, payload.clone()))
                    .is_ok()
            })
            .count()
    }

    /// Notes what a router passed on; wakes the main loop. Notes for
    /// another shard are dropped.
    pub fn hear(&self, note: crate::proto::released::Released) -> bool {
        if note.to != self.shard || note.from == self.shard {
            return false;
        }
        let now = Instant::now();
        if let Ok(mut h) = self.heard.lock() {
            if h.len() >= MAX_NOTES {
                h.retain(|_, (_, at)| now.duration_since(*at) < BELIEVED);
            }
            if h.len() >= MAX_NOTES {
                return false;
            }
            h.insert(note.key.clone(), (note.from, now));
        }
        if let Ok(mut f) = self.fresh.lock() {
            f.insert(note.key);
        }
        self.wake.notify_one();
        true
    }

    /// The shard that said it released `key`, if it said so less than
    /// [`BELIEVED`] ago.
    pub fn by(&self, key: &str) -> Option<u32> {
        let h = self.heard.lock().ok()?;
        h.get(key)
            .filter(|(_, at)| at.elapsed() < BELIEVED)
            .map(|(from, _)| *from)
    }

    /// Forgets the note about `key` (the source was opened, or is held).
    pub fn forget(&self, key: &str) {
        if let Ok(mut h) = self.heard.lock() {
            h.remove(key);
        }
    }

    /// Waits until a note was heard since the last [`Released::take_fresh`].
    pub async fn notified(&self) {
        self.wake.notified().await;
    }

    /// The keys heard since the last call.
    pub fn take_fresh(&self) -> HashSet<String> {
        self.fresh
            .lock()
            .map(|mut f| std::mem::take(&mut *f))
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::released::{Released as Note, decode};
    use bytes::BytesMut;

    fn note(key: &str, from: u32, to: u32) -> Note {
        Note {
            key: key.into(),
            from,
            to,
        }
    }

    #[test]
    fn a_note_for_this_shard_is_believed_and_wakes_the_loop() {
        let r = Released::new(4);
        assert!(r.hear(note("a/x", 2, 4)));
        assert!(!r.hear(note("a/y", 2, 5)), "a note for another shard");
        assert!(!r.hear(note("a/z", 4, 4)), "a note from itself");
        assert_eq!(r.by("a/x"), Some(2));
        assert_eq!(r.by("a/y"), None);
        assert_eq!(r.take_fresh(), HashSet::from(["a/x".to_string()]));
        assert!(r.take_fresh().is_empty());
        r.forget("a/x");
        assert_eq!(r.by("a/x"), None);
    }

    #[test]
    fn a_release_is_told_to_every_connected_router_until_it_leaves() {
        let r = Arc::new(Released::new(2));
        let (a, b) = (Arc::new(Outbox::default()), Arc::new(Outbox::default()));
        let ga = r.register(a.clone());
        let _gb = r.register(b.clone());
        assert_eq!(r.tell("team/orders", 7), 2);
        for o in [&a, &b] {
            let mut buf = BytesMut::new();
            o.take_pending(&mut buf);
            let f = Frame::decode(&mut buf).ok().flatten().expect("a frame");
            assert_eq!((f.session, f.kind), (0, Kind::Released));
            assert_eq!(decode(&f.payload), Some(note("team/orders", 2, 7)));
        }
        drop(ga);
        assert_eq!(r.tell("team/orders", 7), 1);
    }
}
