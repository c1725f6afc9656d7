//! How a shard learns that a password Secret changed, with no more access
//! than it needs. By default a shard may read Secrets only in the tenant
//! namespaces the platform team granted it (a RoleBinding per namespace,
//! made by the chart from `shard.tenantNamespaces`), so it watches Secret
//! metadata (never values) one namespace at a time: only the namespaces of
//! the sources it serves, started when the first source there opens and
//! stopped when the last one leaves. With the cluster-wide opt-in
//! (`shard.secretsClusterWide`) one watch covers every namespace.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::Secret;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Api, Client};

/// Metadata of one Secret (no data).
pub type SecretMeta = PartialObjectMeta<Secret>;

/// Watches of Secret metadata, cluster-wide or per namespace.
pub struct SecretWatch {
    /// Client for the watches (no read timeout).
    client: Client,
    /// The one cluster-wide watch, with the opt-in.
    cluster: Option<Store<SecretMeta>>,
    /// Per-namespace watches otherwise, by namespace. Lock held only to
    /// look up, start or stop a watch; never across an await.
    namespaces: Mutex<HashMap<String, (Store<SecretMeta>, tokio::task::AbortHandle)>>,
}

impl SecretWatch {
    /// A watch for a shard; `cluster_wide` is the chart's opt-in.
    pub fn new(client: Client, cluster_wide: bool) -> Self {
        let cluster = cluster_wide.then(|| {
            crate::watch::store(
                Api::<SecretMeta>::all(client.clone()),
                watcher::Config::default(),
                None,
            )
        });
        SecretWatch {
            client,
            cluster,
            namespaces: Mutex::default(),
        }
    }

    /// Waits until the cluster-wide watch (if any) has listed once.
    pub async fn ready(&self) {
        if let Some(s) = &self.cluster {
            let _ = s.wait_until_ready().await;
        }
    }

    /// The metadata of Secret `ns/name`, when the watch of `ns` has seen
    /// it. Starts watching `ns` if nothing watched it yet (the first answer
    /// comes on a later call, once the watch has listed).
    pub fn get(&self, ns: &str, name: &str) -> Option<Arc<SecretMeta>> {
        let key = ObjectRef::new(name).within(ns);
        if let Some(s) = &self.cluster {
            return s.get(&key);
        }
        let mut map = self.namespaces.lock().ok()?;
        let (store, _) = map.entry(ns.to_string()).or_insert_with(|| {
            tracing::debug!(namespace = ns, "watching secret metadata");
            crate::watch::stoppable(
                Api::<SecretMeta>::namespaced(self.client.clone(), ns),
                watcher::Config::default(),
                None,
            )
        });
        store.get(&key)
    }

    /// Stops the watches of namespaces where this shard serves nothing.
    pub fn retain(&self, needed: &HashSet<&str>) {
        if let Ok(mut map) = self.namespaces.lock() {
            map.retain(|ns, (_, task)| {
                let keep = needed.contains(ns.as_str());
                if !keep {
                    tracing::debug!(namespace = %ns, "no longer watching secret metadata");
                    task.abort();
                }
                keep
            });
        }
    }
}

impl Drop for SecretWatch {
    fn drop(&mut self) {
        if let Ok(map) = self.namespaces.lock() {
            for (_, task) in map.values() {
                task.abort();
            }
        }
    }
}
