//! Which sources this shard serves: DataSources whose `status.shard` is this
//! shard's index and that are not paused. Builds a pool for each (reading
//! the password from its Secret), rebuilds one whose spec changed, and
//! drains and closes the ones that left. Other sources' pools are never
//! touched by a change to one source.

use std::collections::HashMap;

use futures::StreamExt;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Secret;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, ResourceExt};
use tokio::sync::Semaphore;

use super::handover;
use super::metrics::{Direction, ShardMetrics};
use super::pool::{self, Manager, PoolSettings};
use super::registry::{Registry, Source};
use super::server::ConnectParams;
use super::tls::TlsSettings;
use crate::crd::{DataSource, parse_duration};

/// Why a source could not be served; shown in its status (no secrets).
pub type BuildFailures = HashMap<String, String>;

/// The key of a DataSource: `namespace/name`.
pub fn key(ds: &DataSource) -> String {
    format!("{}/{}", ds.namespace().unwrap_or_default(), ds.name_any())
}

/// Whether this shard should serve the source.
pub fn wanted(ds: &DataSource, shard: u32) -> bool {
    !ds.spec.paused && ds.status.as_ref().and_then(|s| s.shard) == Some(shard as i32)
}

/// Pool settings and connection parameters from a DataSource spec.
pub fn settings(ds: &DataSource, shard: u32) -> Result<(ConnectParams, PoolSettings), String> {
    let p = &ds.spec.pool;
    let d = |s: &str| parse_duration(s).map_err(|e| e.to_string());
    // verify-full gets its CA bundle in `build` (read from its Secret).
    let tls = match ds.spec.tls.mode {
        crate::crd::TlsMode::VerifyFull => TlsSettings::default(),
        mode => TlsSettings::new(mode, None)?,
    };
    let params = ConnectParams {
        host: ds.spec.host.clone(),
        port: u16::try_from(ds.spec.port).map_err(|_| "port out of range".to_string())?,
        database: ds.spec.database.clone(),
        user: ds.spec.user.clone(),
        application_name: format!(
            "shardpool/{}/{}/{}",
            ds.namespace().unwrap_or_default(),
            ds.name_any(),
            shard
        ),
        statement_timeout: p.statement_timeout.clone(),
        tls,
    };
    let settings = PoolSettings {
        min_idle: usize::try_from(p.min_idle).unwrap_or(0),
        max_size: usize::try_from(p.max_size).unwrap_or(1).max(1),
        connect_timeout: d(&p.connect_timeout)?,
        acquire_timeout: d(&p.acquire_timeout)?,
        idle_timeout: d(&p.idle_timeout)?,
        max_lifetime: d(&p.max_lifetime)?,
    };
    Ok((params, settings))
}

/// Reads a password from a Secret; returns it with the Secret's
/// resourceVersion. Errors name the Secret and key, never the value.
pub async fn read_secret(
    client: &Client,
    ns: &str,
    name: &str,
    key: &str,
) -> Result<(String, String), String> {
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    let secret = api
        .get_opt(name)
        .await
        .map_err(|e| format!("reading secret {ns}/{name}: {e}"))?;
    let secret = secret.ok_or_else(|| format!("secret {ns}/{name} not found"))?;
    let value = secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .ok_or_else(|| format!("secret {ns}/{name} has no key {key:?}"))?;
    let password = String::from_utf8(value.0.clone())
        .map_err(|_| format!("secret {ns}/{name} key {key:?} is not UTF-8"))?;
    Ok((
        password,
        secret.metadata.resource_version.unwrap_or_default(),
    ))
}

/// Picks up rotated passwords: for each served source whose Secret changed
/// (by resourceVersion, from the metadata watch), the new password is used
/// for connections opened from now on; open ones carry on.
pub async fn refresh_passwords(
    client: &Client,
    secrets: &Store<PartialObjectMeta<Secret>>,
    registry: &Registry,
) {
    for s in registry.all() {
        let (ns, name, key) = &s.secret;
        let Some(meta) = secrets.get(&ObjectRef::new(name).within(ns)) else {
            continue;
        };
        let rv = meta.metadata.resource_version.clone().unwrap_or_default();
        let known = s
            .secret_version
            .lock()
            .map(|v| v.clone())
            .unwrap_or_default();
        if rv == known {
            continue;
        }
        match read_secret(client, ns, name, key).await {
            Ok((password, version)) => {
                s.pool.manager().set_password(password);
                if let Ok(mut v) = s.secret_version.lock() {
                    *v = version;
                }
                tracing::info!(source = %s.key, secret = %format!("{ns}/{name}"), "password rotated; new connections use it");
            }
            Err(e) => tracing::warn!(source = %s.key, error = %e, "cannot read the rotated secret"),
        }
    }
}

/// What [`sync`] needs besides the registry.
pub struct SyncContext<'a> {
    /// API client.
    pub client: &'a Client,
    /// DataSources.
    pub store: &'a Store<DataSource>,
    /// Shard Leases (who is alive).
    pub leases: &'a Store<Lease>,
    /// Namespace of the Leases.
    pub namespace: &'a str,
    /// This shard's index.
    pub shard: u32,
    /// This pod's name.
    pub pod: &'a str,
    /// Shard-wide connection attempt limit.
    pub connect_limit: &'a Arc<Semaphore>,
    /// Handover counters.
    pub metrics: &'a ShardMetrics,
}

/// Brings the registry in line with the DataSources: opens sources assigned
/// here (after the previous owner released them), drains and releases the
/// ones that left.
pub async fn sync(cx: &SyncContext<'_>, registry: &Registry, failures: &mut BuildFailures) {
    let (client, store, shard, connect_limit) = (cx.client, cx.store, cx.shard, cx.connect_limit);
    let mut desired: HashMap<String, Arc<DataSource>> = HashMap::new();
    for ds in store.state() {
        if wanted(&ds, shard) {
            desired.insert(key(&ds), ds);
        }
    }
    for s in registry.all() {
        if !desired.contains_key(&s.key) {
            tracing::info!(source = %s.key, "source left this shard; draining");
            if let Some(old) = registry.remove(&s.key) {
                let client = client.clone();
                let released = cx
                    .metrics
                    .handovers
                    .get_or_create(&Direction { direction: "out" })
                    .clone();
                tokio::spawn(async move {
                    drain(old.clone()).await;
                    if let Err(e) = handover::release(&client, &old.key, shard).await {
                        tracing::warn!(source = %old.key, error = %e, "release acknowledgement failed");
                    } else {
                        released.inc();
                        tracing::info!(source = %old.key, "released");
                    }
                });
            }
        }
    }
    failures.retain(|k, _| desired.contains_key(k));
    // Which sources to (re)build now; the rest wait for their previous owner.
    let mut to_open = Vec::new();
    for (k, ds) in desired {
        let generation = ds.metadata.generation.unwrap_or(0);
        match registry.get(&k) {
            Some(current) if current.generation == generation => continue,
            Some(_) => {}
            None if !handover::may_open(&ds, shard, cx.leases, cx.namespace) => {
                tracing::debug!(source = %k, "waiting for the previous shard to release the source");
                continue;
            }
            None => {}
        }
        to_open.push((k, ds));
    }
    // Claim and build concurrently (API round trips dominate at scale);
    // connection attempts are bounded separately by `connect_limit`.
    let results: Vec<(String, i64, Result<Source, String>)> = futures::stream::iter(to_open)
        .map(|(k, ds)| async move {
            let generation = ds.metadata.generation.unwrap_or(0);
            let fresh = registry.get(&k).is_none();
            let serving = ds.status.as_ref().and_then(|s| s.serving_shard);
            if fresh && serving != Some(shard as i32) {
                if let Err(e) = handover::claim(client, &ds, shard, cx.pod).await {
                    return (k, generation, Err(format!("cannot claim the source: {e}")));
                }
                cx.metrics
                    .handovers
                    .get_or_create(&Direction { direction: "in" })
                    .inc();
            }
            let r = build(client, &ds, shard, connect_limit).await;
            (k, generation, r)
        })
        .buffer_unordered(16)
        .collect()
        .await;
    for (k, generation, r) in results {
        match r {
            Ok(source) => {
                failures.remove(&k);
                tracing::info!(source = %k, generation, "pool created");
                if let Some(old) = registry.insert(Arc::new(source)) {
                    tokio::spawn(drain(old));
                }
            }
            Err(e) => {
                tracing::warn!(source = %k, error = %e, "cannot serve source");
                failures.insert(k, e);
            }
        }
    }
}

async fn build(
    client: &Client,
    ds: &DataSource,
    shard: u32,
    connect_limit: &Arc<Semaphore>,
) -> Result<Source, String> {
    let (mut params, settings) = settings(ds, shard)?;
    let ns = ds.namespace().unwrap_or_default();
    if ds.spec.tls.mode == crate::crd::TlsMode::VerifyFull {
        let r = ds
            .spec
            .tls
            .ca_secret_ref
            .as_ref()
            .ok_or("tls mode verify-full needs caSecretRef")?;
        let (ca, _) = read_secret(client, &ns, &r.name, &r.key).await?;
        params.tls = TlsSettings::new(crate::crd::TlsMode::VerifyFull, Some(&ca))
            .map_err(|e| format!("secret {ns}/{} key {:?}: {e}", r.name, r.key))?;
    }
    let r = &ds.spec.password_secret_ref;
    let (password, version) = read_secret(client, &ns, &r.name, &r.key).await?;
    let manager = Manager::new(params, settings, password, connect_limit.clone());
    let pool = pool::build(manager).map_err(|e| e.to_string())?;
    Ok(Source {
        key: key(ds),
        pool,
        generation: ds.metadata.generation.unwrap_or(0),
        server_params: Default::default(),
        busy: Default::default(),
        retired: Default::default(),
        secret: (ns, r.name.clone(), r.key.clone()),
        secret_version: std::sync::Mutex::new(version),
        stats: Default::default(),
    })
}

/// Waits (bounded) for the source's transactions to finish, then closes
/// its idle connections politely and the pool.
pub async fn drain(source: Arc<Source>) {
    source
        .retired
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while source.busy() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    close(&source).await;
}

/// Closes every idle connection with a Terminate, then the pool.
pub async fn close(source: &Source) {
    let removed = source.pool.retain(|_, _| false);
    let closing = removed.removed.into_iter().map(|c| c.terminate());
    futures::future::join_all(closing).await;
    source.pool.close();
}

/// One maintenance pass over every source: warm to minIdle, trim idle.
pub async fn maintain_all(registry: &Registry) {
    use futures::StreamExt;
    let sources = registry.all();
    futures::stream::iter(sources)
        .for_each_concurrent(64, |s| async move {
            pool::maintain(&s.pool).await;
            let known = s
                .server_params
                .read()
                .map(|p| !p.is_empty())
                .unwrap_or(true);
            if !known && s.pool.status().available > 0 {
                if let Ok(conn) = s.pool.get().await {
                    if let Ok(mut p) = s.server_params.write() {
                        *p = conn.params.clone();
                    }
                }
            }
        })
        .await;
}
