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

use futures::StreamExt;
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
    let slim = watcher(api, cfg).modify(|o| {
        let meta = o.meta_mut();
        meta.managed_fields = None;
        if let Some(a) = meta.annotations.as_mut() {
            a.remove("kubectl.kubernetes.io/last-applied-configuration");
        }
    });
    let task = tokio::spawn(reflector::reflector(writer, slim).default_backoff().touched_objects().for_each(
        move |r| {
            if let Err(e) = r {
                tracing::warn!(kind = %K::kind(&K::DynamicType::default()), error = %e, "watch error");
            }
            if let Some(c) = &changed {
                c.touch();
            }
            futures::future::ready(())
        },
    ));
    (store, task.abort_handle())
}
