//! Watch-fed caches shared by every role: a kube-runtime reflector per
//! resource kind, with backoff, optionally signalling a [`Changed`] on every
//! change so a control loop can react at once (and a hot path can tell
//! cheaply whether anything changed since it last looked).
//!
//! Cached objects drop what no role reads (managedFields and kubectl's
//! last-applied-configuration copy of the spec): with thousands of
//! DataSources in every process's cache, they were most of its memory.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::{StreamExt, TryStreamExt};
use kube::Api;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use tokio::sync::Notify;

/// Change signal of one or more stores: wakes a waiting loop, and counts.
#[derive(Debug, Default)]
pub struct Changed {
    /// Woken after every change (a permit is kept when nobody waits).
    notify: Notify,
    /// Bumped after every change; read on hot paths (relaxed).
    epoch: AtomicU64,
}

impl Changed {
    /// Resolves after the next change (or at once if one happened since the
    /// last call).
    pub async fn notified(&self) {
        self.notify.notified().await;
    }

    /// How many changes so far.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Records a change.
    pub fn touch(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.notify.notify_one();
    }
}

/// Drops what no role reads from a cached object's metadata.
fn slim(meta: &mut kube::api::ObjectMeta) {
    meta.managed_fields = None;
    if let Some(a) = meta.annotations.as_mut() {
        a.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
}

/// An event delivered this long after the write it reports is logged.
const LATE_AFTER: std::time::Duration = std::time::Duration::from_secs(5);

/// Tells when watch events arrive late: the newest `managedFields` time of
/// an object (the write this event reports, to the second) against the
/// clock. A process whose runtime is starved, or a slow API server, shows
/// here as a view of the cluster seconds behind it. One warning per
/// [`LATE_AFTER`] at most, with the count and the worst delay since the
/// last one.
#[derive(Default)]
struct Lateness {
    /// Late events since the last warning, and the longest delay among them.
    late: usize,
    worst: std::time::Duration,
    /// When the last warning was logged.
    warned: Option<std::time::Instant>,
}

impl Lateness {
    fn note(&mut self, kind: &str, meta: &kube::api::ObjectMeta) {
        // Being deleted: the deletion is not a field write, no time to tell.
        if meta.deletion_timestamp.is_some() {
            return;
        }
        let Some(written) = meta
            .managed_fields
            .iter()
            .flatten()
            .filter_map(|f| f.time.as_ref())
            .map(|t| t.0)
            .max()
        else {
            return;
        };
        let Ok(delay) = std::time::Duration::try_from(
            k8s_openapi::jiff::Timestamp::now().duration_since(written),
        ) else {
            return;
        };
        // The write time has whole seconds: add one before judging.
        if delay < LATE_AFTER + std::time::Duration::from_secs(1) {
            return;
        }
        self.late += 1;
        self.worst = self.worst.max(delay);
        if self.warned.is_none_or(|w| w.elapsed() >= LATE_AFTER) {
            tracing::warn!(%kind, events = self.late, worst_seconds = self.worst.as_secs(), "watch events arriving late (seconds after their write)");
            self.late = 0;
            self.worst = std::time::Duration::ZERO;
            self.warned = Some(std::time::Instant::now());
        }
    }
}

/// Which objects of a store changed since its consumer last looked: their
/// keys (a set, so an object written a hundred times is one entry, and the
/// size is bounded by the number of objects), or everything after the watch
/// listed anew (the store was replaced as a whole).
pub struct Feed<K: kube::Resource>
where
    K::DynamicType: Eq + std::hash::Hash,
{
    /// Filled by the watch task, emptied by the consumer; held only to
    /// insert one key or to swap the set out (never across an await).
    pending: std::sync::Mutex<Pending<K>>,
}

struct Pending<K: kube::Resource>
where
    K::DynamicType: Eq + std::hash::Hash,
{
    keys: std::collections::HashSet<ObjectRef<K>>,
    everything: bool,
}

impl<K: kube::Resource> Default for Feed<K>
where
    K::DynamicType: Eq + std::hash::Hash,
{
    fn default() -> Self {
        Feed {
            pending: std::sync::Mutex::new(Pending {
                keys: Default::default(),
                everything: false,
            }),
        }
    }
}

/// What changed since the last [`Feed::take`].
#[derive(PartialEq, Eq)]
pub enum Batch<K: kube::Resource>
where
    K::DynamicType: Eq + std::hash::Hash,
{
    /// These objects (each as it is in the store now, or gone from it).
    Some(std::collections::HashSet<ObjectRef<K>>),
    /// Everything: look at the whole store.
    Everything,
}

impl<K: kube::Resource> std::fmt::Debug for Batch<K>
where
    K::DynamicType: Eq + std::hash::Hash,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Batch::Some(keys) => {
                let mut names: Vec<String> = keys.iter().map(ToString::to_string).collect();
                names.sort();
                f.debug_tuple("Some").field(&names).finish()
            }
            Batch::Everything => f.write_str("Everything"),
        }
    }
}

impl<K: kube::Resource> Feed<K>
where
    K::DynamicType: Eq + std::hash::Hash,
{
    /// Records that one object changed.
    pub fn note(&self, key: ObjectRef<K>) {
        if let Ok(mut p) = self.pending.lock() {
            if !p.everything {
                p.keys.insert(key);
            }
        }
    }

    /// Records that the store was listed anew.
    pub fn everything(&self) {
        if let Ok(mut p) = self.pending.lock() {
            p.everything = true;
            p.keys = Default::default();
        }
    }

    /// What changed since the last call, emptying the feed.
    pub fn take(&self) -> Batch<K> {
        let Ok(mut p) = self.pending.lock() else {
            return Batch::Everything;
        };
        if std::mem::take(&mut p.everything) {
            return Batch::Everything;
        }
        Batch::Some(std::mem::take(&mut p.keys))
    }
}

/// Starts a reflector for `api` filtered by `cfg` and returns its store.
/// `changed`, when given, is signalled after every change (and every error).
pub fn store<K>(
    api: Api<K>,
    cfg: watcher::Config,
    changed: Option<Arc<Changed>>,
) -> reflector::Store<K>
where
    K: kube::Resource
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    stoppable(api, cfg, changed, None).0
}

/// [`store`], and a [`Feed`] of the objects that changed.
pub fn store_fed<K>(
    api: Api<K>,
    cfg: watcher::Config,
    changed: Arc<Changed>,
) -> (reflector::Store<K>, Arc<Feed<K>>)
where
    K: kube::Resource
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let feed = Arc::new(Feed::default());
    let (store, _) = stoppable(api, cfg, Some(changed), Some(feed.clone()));
    (store, feed)
}

/// [`store`], with a handle that stops the watch (for caches that live only
/// while something needs them, such as one namespace's Secrets).
pub fn stoppable<K>(
    api: Api<K>,
    cfg: watcher::Config,
    changed: Option<Arc<Changed>>,
    feed: Option<Arc<Feed<K>>>,
) -> (reflector::Store<K>, tokio::task::AbortHandle)
where
    K: kube::Resource
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let (store, writer) = reflector::store();
    let kind = K::kind(&K::DynamicType::default()).to_string();
    let mut late = Lateness::default();
    let mut listing: Option<(std::time::Instant, usize)> = None;
    let slim = watcher(api, cfg).map_ok(move |mut ev| {
        match &mut ev {
            watcher::Event::Init => listing = Some((std::time::Instant::now(), 0)),
            watcher::Event::InitApply(_) => {
                if let Some((_, n)) = listing.as_mut() {
                    *n += 1;
                }
            }
            watcher::Event::InitDone => {
                if let Some((began, n)) = listing.take() {
                    tracing::info!(%kind, objects = n, seconds = began.elapsed().as_secs_f64(), "listed");
                }
            }
            // A delete reports the object as last written: no delay to tell.
            watcher::Event::Apply(o) => late.note(&kind, o.meta()),
            watcher::Event::Delete(_) => {}
        }
        ev.modify(|o| slim(o.meta_mut()))
    });
    let task = tokio::spawn(reflector::reflector(writer, slim).default_backoff().for_each(
        move |r| {
            match r {
                Err(e) => {
                    tracing::warn!(kind = %K::kind(&K::DynamicType::default()), error = %e, "watch error");
                }
                // The store swaps in a new list only at its end.
                Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => return futures::future::ready(()),
                Ok(watcher::Event::InitDone) => {
                    if let Some(f) = &feed {
                        f.everything();
                    }
                }
                Ok(watcher::Event::Apply(o) | watcher::Event::Delete(o)) => {
                    if let Some(f) = &feed {
                        f.note(ObjectRef::from_obj(&o));
                    }
                }
            }
            if let Some(c) = &changed {
                c.touch();
            }
            futures::future::ready(())
        },
    ));
    (store, task.abort_handle())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ConfigMap;

    fn key(name: &str) -> ObjectRef<ConfigMap> {
        ObjectRef::new(name).within("ns")
    }

    #[test]
    fn a_feed_gives_each_changed_object_once_then_nothing() {
        let feed = Feed::<ConfigMap>::default();
        for _ in 0..100 {
            feed.note(key("a"));
        }
        feed.note(key("b"));
        let Batch::Some(keys) = feed.take() else {
            panic!("not a list anew")
        };
        assert_eq!(keys.len(), 2);
        assert!(keys.contains(&key("a")) && keys.contains(&key("b")));
        assert_eq!(feed.take(), Batch::Some(Default::default()));
    }

    #[test]
    fn after_a_new_list_the_feed_asks_for_everything_once() {
        let feed = Feed::<ConfigMap>::default();
        feed.note(key("a"));
        feed.everything();
        // Keys noted until the consumer looks are covered by everything.
        feed.note(key("b"));
        assert_eq!(feed.take(), Batch::Everything);
        feed.note(key("c"));
        let Batch::Some(keys) = feed.take() else {
            panic!("everything twice")
        };
        assert_eq!(keys.into_iter().collect::<Vec<_>>(), vec![key("c")]);
    }

    #[test]
    fn a_late_event_is_told_by_its_write_time() {
        let meta = |ago: i64| kube::api::ObjectMeta {
            managed_fields: Some(vec![
                k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry {
                    time: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                        k8s_openapi::jiff::Timestamp::now()
                            - k8s_openapi::jiff::SignedDuration::from_secs(ago),
                    )),
                    ..Default::default()
                },
            ]),
            ..Default::default()
        };
        let mut late = Lateness::default();
        late.note("ConfigMap", &meta(1));
        assert_eq!((late.late, late.warned.is_some()), (0, false));
        late.note("ConfigMap", &meta(30));
        assert!(late.warned.is_some(), "30 s late is reported");
        late.note("ConfigMap", &meta(30));
        assert_eq!(late.late, 1, "counted until the next warning");
        late.note("ConfigMap", &kube::api::ObjectMeta::default());
        assert_eq!(late.late, 1, "no write time, nothing to tell");
    }
}
