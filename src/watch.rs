//! Watch-fed caches shared by every role: a kube-runtime reflector per
//! resource kind, with backoff, optionally waking a [`Notify`] on every
//! change so a control loop can react at once.
//!
//! Cached objects drop what no role reads (managedFields and kubectl's
//! last-applied-configuration copy of the spec): with thousands of
//! DataSources in every process's cache, they were most of its memory.

use std::sync::Arc;

use futures::StreamExt;
use kube::Api;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use tokio::sync::Notify;

/// Starts a reflector for `api` filtered by `cfg` and returns its store.
/// `notify`, when given, is woken after every change (and every error).
pub fn store<K>(
    api: Api<K>,
    cfg: watcher::Config,
    notify: Option<Arc<Notify>>,
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
    let (store, writer) = reflector::store();
    let slim = watcher(api, cfg).modify(|o| {
        let meta = o.meta_mut();
        meta.managed_fields = None;
        if let Some(a) = meta.annotations.as_mut() {
            a.remove("kubectl.kubernetes.io/last-applied-configuration");
        }
    });
    tokio::spawn(reflector::reflector(writer, slim).default_backoff().touched_objects().for_each(
        move |r| {
            if let Err(e) = r {
                tracing::warn!(kind = %K::kind(&K::DynamicType::default()), error = %e, "watch error");
            }
            if let Some(n) = &notify {
                n.notify_one();
            }
            futures::future::ready(())
        },
    ));
    store
}
