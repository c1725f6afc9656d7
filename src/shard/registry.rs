//! The sources this shard currently serves, by `namespace/name`.
//!
//! Lock discipline: `sources` is a std RwLock held only to look up, insert
//! or remove an `Arc<Source>`; never across an await. Lookups happen once
//! per session open, not per query. `demand` is a std Mutex held only to
//! note or test a key.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use super::pool::Pool;

/// One served source.
#[derive(Debug)]
pub struct Source {
    /// `namespace/name`.
    pub key: String,
    /// Its pool.
    pub pool: Pool,
    /// DataSource generation the source is served at: the pool's, or a
    /// later one that changed only `spec.limits` (applied in place).
    pub generation: std::sync::atomic::AtomicI64,
    /// The spec the pool was built from, without `limits`: a change to
    /// anything in it rebuilds the pool.
    pub pool_spec: String,
    /// ParameterStatus values of its server, learnt from the first connection.
    pub server_params: RwLock<Vec<(String, String)>>,
    /// Sessions currently holding a server connection (mid-transaction).
    pub busy: AtomicUsize,
    /// Routers' sessions on the source, idle or not: the most connections
    /// they could use at once (a stopping shard keeps that many open while
    /// it still serves; see [`super::sources::thin`]).
    pub sessions: AtomicUsize,
    /// Set when the source leaves this shard (or is rebuilt): sessions take
    /// no new transaction on it and send the router elsewhere.
    pub retired: std::sync::atomic::AtomicBool,
    /// Cancelled when a drain's deadline passes: sessions still holding a
    /// server connection end their transaction and give it up at once.
    pub kill: tokio_util::sync::CancellationToken,
    /// The password Secret: (namespace, name, key).
    pub secret: (String, String, String),
    /// resourceVersion of the Secret the current password came from.
    pub secret_version: std::sync::Mutex<String>,
    /// Counters for the metrics endpoint.
    pub stats: SourceStats,
    /// Admission in front of the pool (`spec.limits`).
    pub admission: Arc<super::admission::Admission>,
    /// Costs by query tag.
    pub tags: Arc<super::tags::TagCosts>,
}

/// A source's counters, bumped on the session path (relaxed atomics).
#[derive(Debug, Default)]
pub struct SourceStats {
    /// Server connection checkouts (one per transaction or single query).
    pub transactions: std::sync::atomic::AtomicU64,
    /// Checkouts that failed (no connection within acquireTimeout).
    pub checkout_errors: std::sync::atomic::AtomicU64,
}

impl Source {
    /// DataSource generation the source is served at.
    pub fn generation(&self) -> i64 {
        self.generation.load(Ordering::Relaxed)
    }

    /// Sessions mid-transaction, or asking the pool for a connection.
    pub fn busy(&self) -> usize {
        self.busy.load(Ordering::SeqCst)
    }

    /// Routers' sessions on the source now.
    pub fn sessions(&self) -> usize {
        self.sessions.load(Ordering::SeqCst)
    }

    /// Server connections open (idle or in use) or being opened.
    pub fn open_or_opening(&self) -> usize {
        self.pool.status().size + self.pool.manager().opening()
    }
}

/// All served sources.
#[derive(Debug, Default)]
pub struct Registry {
    /// key -> source; see the module's lock discipline.
    sources: RwLock<HashMap<String, Arc<Source>>>,
    /// Keys that a router asked for and this shard does not serve (yet):
    /// a shard taking over hundreds of sources opens these first, since
    /// clients are waiting on them. Bounded by [`DEMAND_KEYS`].
    demand: std::sync::Mutex<HashSet<String>>,
    /// Keys taken out of `sources` whose drain and acknowledgement still
    /// run (see `sources::release`): this shard still has connections of
    /// them, so it must not disown them. A std Mutex held only to insert,
    /// remove or test a key.
    releasing: std::sync::Mutex<HashSet<String>>,
    /// Keys opened on a release told over the links (see
    /// [`super::released`]) whose hand-over write the watch has not shown
    /// yet. Their status may also be written onto a version that names no
    /// shard as serving them (the previous owner's write only cleared the
    /// field). A std Mutex held only to insert, remove or test a key.
    told: std::sync::Mutex<HashSet<String>>,
}

/// Most keys remembered as asked for (a router asking for sources that do
/// not exist cannot grow the set).
pub const DEMAND_KEYS: usize = 10_000;

impl Registry {
    /// The source with this key, if served.
    pub fn get(&self, key: &str) -> Option<Arc<Source>> {
        self.sources.read().ok()?.get(key).cloned()
    }

    /// Adds or replaces a source; returns the one it replaced.
    pub fn insert(&self, source: Arc<Source>) -> Option<Arc<Source>> {
        self.sources
            .write()
            .ok()?
            .insert(source.key.clone(), source)
    }

    /// Notes that a client asked for `key`, which is not served here.
    pub fn note_demand(&self, key: &str) {
        if let Ok(mut d) = self.demand.lock() {
            if d.len() < DEMAND_KEYS {
                d.insert(key.to_owned());
            }
        }
    }

    /// Whether a client asked for `key` since it was last opened; forgets it.
    pub fn take_demand(&self, key: &str) -> bool {
        self.demand
            .lock()
            .map(|mut d| d.remove(key))
            .unwrap_or(false)
    }

    /// Whether a client asked for `key` and it is still not served.
    pub fn demanded(&self, key: &str) -> bool {
        self.demand.lock().map(|d| d.contains(key)).unwrap_or(false)
    }

    /// Keeps only the noted demand for which `keep` holds.
    pub fn retain_demand(&self, keep: impl Fn(&str) -> bool) {
        if let Ok(mut d) = self.demand.lock() {
            d.retain(|k| keep(k));
        }
    }

    /// Removes a source.
    pub fn remove(&self, key: &str) -> Option<Arc<Source>> {
        self.sources.write().ok()?.remove(key)
    }

    /// Notes that a removed source's release (drain, then acknowledgement)
    /// runs (`true`) or ended (`false`).
    pub fn set_releasing(&self, key: &str, running: bool) {
        mark(&self.releasing, key, running);
    }

    /// Whether a removed source's release still runs (or the lock is
    /// poisoned: then assume it does).
    pub fn releasing(&self, key: &str) -> bool {
        self.releasing
            .lock()
            .map(|r| r.contains(key))
            .unwrap_or(true)
    }

    /// How many removed sources' releases still run.
    pub fn releases_running(&self) -> usize {
        self.releasing.lock().map(|r| r.len()).unwrap_or(0)
    }

    /// Notes that `key` is opened on a release told over the links (`true`),
    /// or that the watch showed the hand-over write, or it left (`false`).
    pub fn set_told(&self, key: &str, told: bool) {
        mark(&self.told, key, told);
    }

    /// Whether `key` was opened on a release told over the links and the
    /// watch has not shown its hand-over write yet.
    pub fn told(&self, key: &str) -> bool {
        self.told.lock().map(|t| t.contains(key)).unwrap_or(false)
    }

    /// Every served source.
    pub fn all(&self) -> Vec<Arc<Source>> {
        self.sources
            .read()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Sessions mid-transaction, over all sources.
    pub fn busy(&self) -> usize {
        self.all().iter().map(|s| s.busy()).sum()
    }
}

/// Puts `key` into `set` (`on`) or takes it out; the lock is held for that
/// only.
fn mark(set: &std::sync::Mutex<HashSet<String>>, key: &str, on: bool) {
    if let Ok(mut s) = set.lock() {
        if on {
            s.insert(key.to_owned());
        } else {
            s.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demand_is_remembered_until_taken_and_bounded() {
        let r = Registry::default();
        assert!(!r.demanded("t/a"));
        r.note_demand("t/a");
        r.note_demand("t/a");
        assert!(r.demanded("t/a"));
        assert!(r.take_demand("t/a"));
        assert!(!r.demanded("t/a"), "opened: forgotten");
        assert!(!r.take_demand("t/a"));
        for i in 0..DEMAND_KEYS + 50 {
            r.note_demand(&format!("t/s{i}"));
        }
        assert!(r.demanded("t/s0"));
        assert!(!r.demanded(&format!("t/s{}", DEMAND_KEYS)), "bounded");
        r.retain_demand(|k| k == "t/s1");
        assert!(r.demanded("t/s1") && !r.demanded("t/s0"));
    }

    #[test]
    fn a_release_is_remembered_until_it_ends() {
        let r = Registry::default();
        assert!(!r.releasing("t/a"));
        r.set_releasing("t/a", true);
        assert!(r.releasing("t/a") && !r.releasing("t/b"));
        r.set_releasing("t/a", false);
        assert!(!r.releasing("t/a"));
    }
}
