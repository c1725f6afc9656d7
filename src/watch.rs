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
        let Ok(delay) = std::time::Duration::try_from(k8s_openapi::jiff::Timestamp::now().duration_since(written)) else {
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
    stoppable(api, cfg, changed).0
}

/// [`store`], with a handle that stops the watch (for caches that live only
/// while something needs them, such as one namespace's Secrets).
pub fn stoppable<K>(
    api: Api<K>,
    cfg: watcher::Config,
    changed: Option<Arc<Changed>>,
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
            watcher::Event::Apply(o) | watcher::Event::Delete(o) => late.note(&kind, o.meta()),
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
                Ok(_) => {}
            }
            if let Some(c) = &changed {
                c.touch();
            }
            futures::future::ready(())
        },
    ));
    (store, task.abort_handle())
}
