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

/// (namespace, name) of a Secret.
type SecretKey = (String, String);

/// A Secret as read: its resourceVersion, the Secret, and when.
type Cached = (String, Arc<Secret>, std::time::Instant);

/// Most Secrets whose values a shard keeps (see [`SecretCache`]).
const CACHE_ENTRIES: usize = 4096;

/// How long a Secret read stands in for one the metadata watch has not
/// seen yet.
const SECRET_REUSE: std::time::Duration = std::time::Duration::from_secs(10);

/// Secret reads a standby makes at once while it prefetches.
const PREFETCH_CONCURRENCY: usize = 4;

/// Secret values a shard read, by namespace/name, with the
/// resourceVersion they were read at. A shard taking over hundreds of
/// sources that share a Secret reads it once, not once per source (one
/// API round trip less per source in a handover). An entry is used only
/// while the metadata watch shows the same resourceVersion; a Secret the
/// watch has not seen is read again.
///
/// Lock discipline: `entries` and `reads` are held only to look up or
/// store an entry; a read's own tokio Mutex is held across its one API
/// call.
#[derive(Default)]
pub struct SecretCache {
    /// (namespace, name) -> (resourceVersion, the Secret, when read).
    entries: Mutex<HashMap<SecretKey, Cached>>,
    /// (namespace, name) -> the lock a read of it holds: the builds that
    /// miss together wait for one read instead of each making its own.
    reads: Mutex<HashMap<SecretKey, Arc<tokio::sync::Mutex<()>>>>,
}

impl std::fmt::Debug for SecretCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.entries.lock().map(|e| e.len()).unwrap_or(0);
        write!(f, "SecretCache({n} entries)")
    }
}

impl SecretCache {
    /// The Secret `ns/name` as read at `version`, if it was.
    pub fn get(&self, ns: &str, name: &str, version: &str) -> Option<Arc<Secret>> {
        let e = self.entries.lock().ok()?;
        let (v, s, _) = e.get(&(ns.to_string(), name.to_string()))?;
        (v == version).then(|| s.clone())
    }

    /// The Secret `ns/name` if it was read less than `within` ago, at
    /// whatever version: for when the metadata watch has not seen it yet.
    pub fn recent(&self, ns: &str, name: &str, within: std::time::Duration) -> Option<Arc<Secret>> {
        let e = self.entries.lock().ok()?;
        let (_, s, at) = e.get(&(ns.to_string(), name.to_string()))?;
        (at.elapsed() < within).then(|| s.clone())
    }

    /// The lock to hold while reading `ns/name` from the API server.
    pub fn read_lock(&self, ns: &str, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        let Ok(mut r) = self.reads.lock() else {
            return Arc::default();
        };
        if r.len() >= CACHE_ENTRIES {
            r.retain(|_, l| Arc::strong_count(l) > 1);
        }
        r.entry((ns.to_string(), name.to_string()))
            .or_default()
            .clone()
    }

    /// Keeps `secret` as read (at its own resourceVersion).
    pub fn put(&self, ns: &str, name: &str, secret: Arc<Secret>) {
        let Some(version) = secret.metadata.resource_version.clone() else {
            return;
        };
        if let Ok(mut e) = self.entries.lock() {
            if e.len() >= CACHE_ENTRIES {
                e.clear();
            }
            e.insert(
                (ns.to_string(), name.to_string()),
                (version, secret, std::time::Instant::now()),
            );
        }
    }

    /// The Secret `ns/name`, read from the API server only when the
    /// metadata watch does not show the version read before. Builds that
    /// miss together (hundreds of sources sharing a Secret in a rollout)
    /// wait for one read, then hit.
    pub async fn read(
        &self,
        client: &Client,
        watch: &SecretWatch,
        ns: &str,
        name: &str,
    ) -> Result<Arc<Secret>, String> {
        let watched = watch
            .get(ns, name)
            .and_then(|m| m.metadata.resource_version.clone());
        let cached = |watched: &Option<String>| match watched {
            Some(v) => self.get(ns, name, v),
            // The watch of the namespace has not listed yet (a shard that
            // just took over sources there): a value read moments ago is as
            // good as a new read, and a newer version the watch shows later
            // reaches the pools through refresh_passwords.
            None => self.recent(ns, name, SECRET_REUSE),
        };
        if let Some(s) = cached(&watched) {
            return Ok(s);
        }
        let lock = self.read_lock(ns, name);
        let _reading = lock.lock().await;
        if let Some(s) = cached(&watched) {
            return Ok(s);
        }
        let secret = Arc::new(fetch(client, ns, name).await?);
        self.put(ns, name, secret.clone());
        Ok(secret)
    }

    /// Reads the Secrets `wanted` (namespace, name) into the cache and
    /// starts the metadata watches of their namespaces: what a standby does
    /// for the sources of its shard while it waits for the Lease, so that
    /// taking over builds every pool without an API round trip while the
    /// clients wait. Returns how many it could not read (a build reads
    /// those again and reports why).
    pub async fn prefetch(
        &self,
        client: &Client,
        watch: &SecretWatch,
        wanted: HashSet<(String, String)>,
    ) -> usize {
        use futures::StreamExt;
        futures::stream::iter(wanted)
            .map(|(ns, name)| async move { self.read(client, watch, &ns, &name).await.is_err() })
            .buffer_unordered(PREFETCH_CONCURRENCY)
            .filter(|failed| std::future::ready(*failed))
            .count()
            .await
    }
}

/// Reads Secret `ns/name`; errors say why without any value.
pub async fn fetch(client: &Client, ns: &str, name: &str) -> Result<Secret, String> {
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    let secret = api.get_opt(name).await.map_err(|e| match e {
        kube::Error::Api(s) if s.code == 403 => format!(
            "the shard may not read secret {ns}/{name}: namespace {ns} is not one of the chart's shard.tenantNamespaces (add it, or bind the shard's secrets ClusterRole there)"
        ),
        e => format!("reading secret {ns}/{name}: {e}"),
    })?;
    secret.ok_or_else(|| format!("secret {ns}/{name} not found"))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(version: &str) -> Arc<Secret> {
        let mut s = Secret::default();
        s.metadata.resource_version = Some(version.into());
        Arc::new(s)
    }

    #[test]
    fn a_cached_secret_is_used_only_at_the_version_it_was_read() {
        let c = SecretCache::default();
        assert!(c.get("t", "pw", "1").is_none());
        c.put("t", "pw", secret("1"));
        assert!(c.get("t", "pw", "1").is_some());
        assert!(
            c.get("t", "pw", "2").is_none(),
            "a newer version is read again"
        );
        assert!(c.get("u", "pw", "1").is_none());
        c.put("t", "pw", secret("2"));
        assert!(c.get("t", "pw", "1").is_none());
        assert!(c.get("t", "pw", "2").is_some());
        for i in 0..CACHE_ENTRIES + 1 {
            c.put("t", &format!("s{i}"), secret("1"));
        }
        assert!(c.entries.lock().expect("lock").len() <= CACHE_ENTRIES);
    }

    /// A fake API server: GET of a Secret answers it (resourceVersion
    /// "5") unless its name starts with "missing" (404); the metadata
    /// watches' list requests get a 503 (the watch has not listed yet, as
    /// at a standby's start). Records the paths of the Secret GETs.
    fn fake_api() -> (Client, Arc<Mutex<Vec<String>>>) {
        use http::{Request, Response};
        use kube::client::Body;
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let gets: Arc<Mutex<Vec<String>>> = Arc::default();
        let record = gets.clone();
        tokio::spawn(async move {
            while let Some((req, send)) = handle.next_request().await {
                let path = req.uri().path().to_string();
                let name = path.rsplit('/').next().unwrap_or_default().to_string();
                let single = req.uri().query().is_none_or(|q| !q.contains("watch"))
                    && path.split('/').count() == 7;
                let (code, body) = if !single {
                    (
                        503,
                        serde_json::json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "code": 503, "message": "not now"}),
                    )
                } else if name.starts_with("missing") {
                    record.lock().expect("gets").push(path);
                    (
                        404,
                        serde_json::json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "code": 404, "reason": "NotFound", "message": "not found"}),
                    )
                } else {
                    record.lock().expect("gets").push(path);
                    (
                        200,
                        serde_json::json!({"apiVersion": "v1", "kind": "Secret",
                        "metadata": {"name": name, "namespace": "t", "resourceVersion": "5"},
                        "data": {"password": "c2VjcmV0"}}),
                    )
                };
                let resp = Response::builder()
                    .status(code)
                    .header("content-type", "application/json")
                    .body(Body::from(body.to_string().into_bytes()))
                    .expect("response");
                send.send_response(resp);
            }
        });
        (Client::new(service, "t"), gets)
    }

    #[tokio::test]
    async fn a_standby_reads_its_sources_secrets_once_and_taking_over_reads_none() {
        let (client, gets) = fake_api();
        let watch = SecretWatch::new(client.clone(), false);
        let cache = SecretCache::default();
        let wanted: HashSet<(String, String)> = [("t", "pw-a"), ("t", "pw-b"), ("t", "missing")]
            .into_iter()
            .map(|(n, s)| (n.to_string(), s.to_string()))
            .collect();
        let failed = cache.prefetch(&client, &watch, wanted).await;
        assert_eq!(
            failed, 1,
            "the missing one is told, and read again by its build"
        );
        let mut read = gets.lock().expect("gets").clone();
        read.sort();
        assert_eq!(
            read,
            [
                "/api/v1/namespaces/t/secrets/missing",
                "/api/v1/namespaces/t/secrets/pw-a",
                "/api/v1/namespaces/t/secrets/pw-b"
            ]
        );
        assert!(cache.get("t", "pw-a", "5").is_some());
        // Taking over: every build of a source using pw-a or pw-b finds it
        // (the watch has not listed: the read of moments ago stands in).
        for _ in 0..3 {
            let s = cache
                .read(&client, &watch, "t", "pw-a")
                .await
                .expect("cached");
            assert_eq!(s.metadata.resource_version.as_deref(), Some("5"));
            cache
                .read(&client, &watch, "t", "pw-b")
                .await
                .expect("cached");
        }
        assert_eq!(
            gets.lock().expect("gets").len(),
            3,
            "no read after the prefetch"
        );
        assert!(cache.read(&client, &watch, "t", "missing").await.is_err());
        assert_eq!(
            gets.lock().expect("gets").len(),
            4,
            "a failed one is read again"
        );
    }

    #[test]
    fn a_secret_read_moments_ago_stands_in_until_the_watch_has_seen_it() {
        let c = SecretCache::default();
        let long = std::time::Duration::from_secs(60);
        assert!(c.recent("t", "pw", long).is_none());
        c.put("t", "pw", secret("7"));
        assert!(c.recent("t", "pw", long).is_some());
        assert!(
            c.recent("t", "pw", std::time::Duration::ZERO).is_none(),
            "older than asked"
        );
        // One lock per Secret, shared by everyone reading it.
        let a = c.read_lock("t", "pw");
        let b = c.read_lock("t", "pw");
        assert!(Arc::ptr_eq(&a, &b));
        assert!(!Arc::ptr_eq(&a, &c.read_lock("t", "other")));
    }
}
