//! Which sources this shard serves: DataSources whose `status.shard` is this
//! shard's index and that are not paused. Carries out the hand-off steps
//! ([`handover::step`]): builds a pool for each source (reading the password
//! from its Secret), rebuilds one whose spec changed, and drains, closes and
//! releases the ones that left. Other sources' pools are never touched by a
//! change to one source.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::connect_limit::ConnectLimit;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ObjectReference, Secret};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, Resource, ResourceExt};
use tokio::time::Instant;

use super::admission;
use super::fence;
use super::handover::{self, Step};
use super::metrics::{Direction, ShardMetrics};
use super::opening::{Opening, ToOpen};
use super::pool::{self, Manager, PoolSettings};
use super::registry::{Registry, Source};
use super::secrets::SecretWatch;
use super::server::ConnectParams;
use super::status::BuildFailures;
use super::tls::TlsSettings;
use crate::crd::{DataSource, parse_duration};
use crate::lease::Validity;

/// Pool settings and connection parameters from a DataSource spec, for
/// `shard` in the process with this `token`.
pub fn settings(
    ds: &DataSource,
    shard: u32,
    token: &str,
) -> Result<(ConnectParams, PoolSettings), String> {
    let p = &ds.spec.pool;
    let d = |s: &str| parse_duration(s).map_err(|e| e.to_string());
    // verify-full gets its CA bundle in `build` (read from its Secret).
    let tls = match ds.spec.tls.mode {
        crate::crd::TlsMode::VerifyFull => TlsSettings::default(),
        mode => TlsSettings::new(mode, None)?,
    };
    let ns = ds.namespace().unwrap_or_default();
    let params = ConnectParams {
        host: ds.spec.host.clone(),
        port: u16::try_from(ds.spec.port).map_err(|_| "port out of range".to_string())?,
        database: ds.spec.database.clone(),
        user: ds.spec.user.clone(),
        application_name: fence::identity(&ns, &ds.name_any(), shard, token).application_name,
        statement_timeout: p.statement_timeout.clone(),
        tls,
        legacy_password_auth: ds.spec.allow_legacy_password_auth,
    };
    let settings = PoolSettings {
        min_idle: usize::try_from(p.min_idle).unwrap_or(0),
        max_size: usize::try_from(p.max_size).unwrap_or(1).max(1),
        connect_timeout: d(&p.connect_timeout)?,
        acquire_timeout: d(&p.acquire_timeout)?,
        idle_timeout: d(&p.idle_timeout)?,
        max_lifetime: d(&p.max_lifetime)?,
        statement_timeout: p.statement_timeout.as_deref().map(d).transpose()?,
    };
    Ok((params, settings))
}

/// The spec without `limits`: what the pool is built from.
pub fn pool_spec(ds: &DataSource) -> String {
    let mut spec = ds.spec.clone();
    spec.limits = Default::default();
    serde_json::to_string(&spec).unwrap_or_default()
}

/// A spec change that touched only `limits`: applied to the served
/// source's admission in place (its pool and connections stay). False
/// when the pool must be rebuilt.
fn retune(registry: &Registry, key: &str, ds: &DataSource) -> bool {
    let Some(s) = registry.get(key) else {
        return false;
    };
    if s.pool_spec != pool_spec(ds) {
        return false;
    }
    match limits(ds) {
        Ok(l) => {
            s.admission.set_limits(l);
            let generation = ds.metadata.generation.unwrap_or(0);
            s.generation.store(generation, Ordering::Relaxed);
            tracing::info!(source = %key, generation, "admission limits changed; pool kept");
            true
        }
        Err(_) => false,
    }
}

/// Admission limits from a DataSource spec (see [`crate::crd::LimitsSpec`]).
pub fn limits(ds: &DataSource) -> Result<admission::Limits, String> {
    let l = &ds.spec.limits;
    let per = l.per_client.as_ref();
    let rate = per
        .and_then(|p| p.rate)
        .filter(|r| r.is_finite() && *r > 0.0);
    let burst = per.and_then(|p| p.burst).map(f64::from);
    Ok(admission::Limits {
        capacity: usize::try_from(ds.spec.pool.max_size).unwrap_or(1).max(1),
        max_queued: usize::try_from(l.max_queued).unwrap_or(0),
        notice_after: parse_duration(&l.notice_after).map_err(|e| e.to_string())?,
        fair: l.fairness == crate::crd::Fairness::Fair,
        max_concurrent: per
            .and_then(|p| p.max_concurrent)
            .and_then(|m| usize::try_from(m).ok())
            .map(|m| m.max(1)),
        rate: rate.map(|r| (r, burst.unwrap_or(r.ceil()).max(1.0))),
        statement_timeout: per
            .and_then(|p| p.statement_timeout.as_deref())
            .map(parse_duration)
            .transpose()
            .map_err(|e| e.to_string())?,
        bypass: bypass_annotated(ds),
    })
}

/// Whether the DataSource carries [`admission::BYPASS_ANNOTATION`]: "true".
fn bypass_annotated(ds: &DataSource) -> bool {
    ds.annotations()
        .get(admission::BYPASS_ANNOTATION)
        .is_some_and(|v| v == "true")
}

/// Reads a password from a Secret; returns it with the Secret's
/// resourceVersion. Errors name the Secret and key, never the value.
pub async fn read_secret(
    client: &Client,
    ns: &str,
    name: &str,
    key: &str,
) -> Result<(String, String), String> {
    let secret = super::secrets::fetch(client, ns, name).await?;
    value_of(&secret, ns, name, key)
}

/// Like [`read_secret`], through the shard's cache ([`SecretCache::read`]).
async fn read_secret_cached(
    cx: &SyncContext<'_>,
    ns: &str,
    name: &str,
    key: &str,
) -> Result<(String, String), String> {
    let secret = cx
        .secret_cache
        .read(cx.client, cx.secrets, ns, name)
        .await?;
    value_of(&secret, ns, name, key)
}

/// The Secrets (namespace, name) a source's pool is built from: its
/// password's and, with verify-full, its CA's.
pub fn secrets_of(ds: &DataSource) -> Vec<(String, String)> {
    let ns = ds.namespace().unwrap_or_default();
    let mut out = vec![(ns.clone(), ds.spec.password_secret_ref.name.clone())];
    if ds.spec.tls.mode == crate::crd::TlsMode::VerifyFull {
        if let Some(r) = &ds.spec.tls.ca_secret_ref {
            out.push((ns, r.name.clone()));
        }
    }
    out
}

/// The UTF-8 value of `key` in `secret`, with the Secret's resourceVersion.
fn value_of(secret: &Secret, ns: &str, name: &str, key: &str) -> Result<(String, String), String> {
    let value = secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .ok_or_else(|| format!("secret {ns}/{name} has no key {key:?}"))?;
    let password = String::from_utf8(value.0.clone())
        .map_err(|_| format!("secret {ns}/{name} key {key:?} is not UTF-8"))?;
    Ok((
        password,
        secret.metadata.resource_version.clone().unwrap_or_default(),
    ))
}

/// Picks up rotated passwords: for each served source whose Secret changed
/// (by resourceVersion, from the metadata watch), the new password is used
/// for connections opened from now on; open ones carry on.
pub async fn refresh_passwords(client: &Client, secrets: &SecretWatch, registry: &Registry) {
    let sources = registry.all();
    for s in &sources {
        let (ns, name, key) = &s.secret;
        let Some(meta) = secrets.get(ns, name) else {
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
    let needed: HashSet<&str> = sources.iter().map(|s| s.secret.0.as_str()).collect();
    secrets.retain(&needed);
}

/// What [`sync`] needs besides the registry.
pub struct SyncContext<'a> {
    /// API client (bounded requests).
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
    /// This process's token in its connections' application_name.
    pub token: &'a str,
    /// The shard's Lease claim: pools open connections only under it.
    pub validity: &'a Validity,
    /// Shard-wide connection attempt limit.
    pub connect_limit: &'a Arc<ConnectLimit>,
    /// Handover counters.
    pub metrics: &'a ShardMetrics,
    /// Events about the sources (drains past their deadline).
    pub recorder: &'a Recorder,
    /// How long a source leaving this shard may take to finish its
    /// transactions before they are ended.
    pub drain_timeout: Duration,
    /// Secret metadata (which version of each Secret is current).
    pub secrets: &'a SecretWatch,
    /// Secret values read, by version.
    pub secret_cache: &'a super::secrets::SecretCache,
    /// Releases told over the routers' links: heard from other shards, and
    /// told for the sources this shard lets go of.
    pub released: &'a Arc<super::released::Released>,
}

/// One [`handover::step`]: decides one source (its DataSource as the store
/// has it now, None when gone) and carries out what needs no waiting: a
/// release (drained and acknowledged in the background), limits retuned in
/// place. Returns the job when the source must be claimed or built. Makes
/// no API call of its own, so a pass is quick however much it queues.
fn decide(
    cx: &SyncContext<'_>,
    registry: &Arc<Registry>,
    opening: &mut Opening<'_>,
    k: &str,
    ds: Option<&Arc<DataSource>>,
) -> Option<ToOpen> {
    let alive = |s: u32| handover::shard_alive(cx.leases, cx.namespace, s);
    let served = registry.get(k);
    let held = served.as_ref().map(|s| s.generation());
    if let (Some(s), Some(ds)) = (&served, ds) {
        // An annotation, not the spec: no new generation.
        s.admission.set_bypass(bypass_annotated(ds));
    }
    let told = cx.released.by(k);
    if told.is_some() && held.is_some() {
        cx.released.forget(k);
    }
    let step = match handover::step(ds.map(AsRef::as_ref), cx.shard, held, alive, told) {
        // Its previous pool here still drains (it left and came back):
        // opened again only once that release ended.
        Step::Open | Step::ClaimAndOpen if registry.releasing(k) => {
            Step::AwaitRelease { from: cx.shard }
        }
        s => s,
    };
    opening.set_awaiting(k, matches!(step, Step::AwaitRelease { .. }));
    if step == Step::Open && told.is_some() {
        let serving = ds.and_then(|ds| ds.status.as_ref()?.serving_shard);
        if serving != Some(cx.shard as i32) && !registry.told(k) {
            registry.set_told(k, true);
            cx.metrics
                .notes
                .get_or_create(&super::metrics::NoteOutcome { outcome: "opened" })
                .inc();
        }
    }
    match step {
        Step::Idle | Step::Serve => None,
        Step::AwaitRelease { from } => {
            tracing::debug!(source = %k, from, "waiting for the previous shard to release the source");
            None
        }
        Step::Rebuild if ds.is_some_and(|ds| retune(registry, k, ds)) => None,
        Step::ClaimAndOpen | Step::Open | Step::Rebuild => {
            ds.map(|ds| (k.to_string(), ds.clone(), step))
        }
        Step::Release => {
            release(cx, registry, k, ds.map(AsRef::as_ref));
            None
        }
        Step::Disown => {
            // Not while this shard still drains it or opens it: then it has
            // (or may get) connections of it; the end of either decides
            // again.
            if !registry.releasing(k) && !opening.has(k) {
                disown(cx, k);
            }
            None
        }
    }
}

/// A pass over every DataSource and every held source: at start, after the
/// watch listed anew, and every 30 s. Between them, [`sync_some`] decides
/// only the sources whose DataSource changed.
pub fn sync<'a>(
    cx: &'a SyncContext<'a>,
    registry: &Arc<Registry>,
    failures: &Mutex<BuildFailures>,
    opening: &mut Opening<'a>,
) {
    let began = std::time::Instant::now();
    let shard = cx.shard;
    opening.clear_awaiting();
    let mut seen: HashSet<String> = HashSet::new();
    let mut to_open = Vec::new();
    for ds in cx.store.state() {
        let k = handover::key(&ds);
        to_open.extend(decide(cx, registry, opening, &k, Some(&ds)));
        seen.insert(k);
    }
    // Held sources whose DataSource is gone.
    for s in registry.all() {
        if !seen.contains(&s.key) {
            decide(cx, registry, opening, &s.key, None);
        }
    }
    if let Ok(mut f) = failures.lock() {
        f.retain(|k, _| {
            let (ns, name) = k.split_once('/').unwrap_or(("", k));
            cx.store
                .get(&ObjectRef::new(name).within(ns))
                .is_some_and(|ds| handover::wanted(&ds, shard))
        });
    }
    opening.plan(to_open);
    opening.refill(cx, registry);
    // Demand for sources not (or no longer) coming here is forgotten.
    registry.retain_demand(|k| {
        let (ns, name) = k.split_once('/').unwrap_or(("", k));
        registry.get(k).is_none()
            && cx
                .store
                .get(&ObjectRef::new(name).within(ns))
                .is_some_and(|ds| handover::wanted(&ds, shard))
    });
    // A pass holds the main loop (and, with one runtime thread, everything).
    let took = began.elapsed();
    if took >= std::time::Duration::from_millis(250) {
        tracing::warn!(
            sources = seen.len(),
            ms = u64::try_from(took.as_millis()).unwrap_or(u64::MAX),
            "slow pass over the DataSources"
        );
    }
}

/// Decides the sources with these keys (`namespace/name`) only: the ones
/// whose DataSource changed, those waiting for another shard's release,
/// one whose opening just ended. The work is per changed source, not per
/// source: at thousands of sources a full pass took 30 ms of CPU, and
/// status writes during a warm-up or a rescale change hundreds a second.
pub fn sync_some<'a>(
    cx: &'a SyncContext<'a>,
    registry: &Arc<Registry>,
    failures: &Mutex<BuildFailures>,
    opening: &mut Opening<'a>,
    keys: impl IntoIterator<Item = String>,
) {
    for k in keys {
        let (ns, name) = k.split_once('/').unwrap_or(("", &k));
        let ds = cx.store.get(&ObjectRef::new(name).within(ns));
        match decide(cx, registry, opening, &k, ds.as_ref()) {
            Some(job) => opening.upsert(job),
            None => opening.forget(&k),
        }
        let wanted = ds.as_ref().is_some_and(|ds| handover::wanted(ds, cx.shard));
        if !wanted {
            if let Ok(mut f) = failures.lock() {
                f.remove(&k);
            }
        }
        if !wanted || registry.get(&k).is_some() {
            registry.take_demand(&k);
        }
    }
    opening.refill(cx, registry);
}

/// Claims (when `step` says so) and builds one source; see
/// [`super::opening`].
pub async fn open_one(
    cx: &SyncContext<'_>,
    k: String,
    ds: Arc<DataSource>,
    step: Step,
) -> (String, i64, Result<Option<Source>, String>) {
    let shard = cx.shard;
    let generation = ds.metadata.generation.unwrap_or(0);
    // Taken over: claimed here, handed over by the previous owner's
    // acknowledgement (servingShard names this shard, phase Pending), or
    // told over the links (servingShard still names the previous owner).
    let taken_over = match step {
        Step::ClaimAndOpen => {
            let began = std::time::Instant::now();
            match handover::claim(cx.client, &ds, shard, cx.pod).await {
                Ok(()) => {
                    tracing::debug!(
                        source = %k,
                        ms = u64::try_from(began.elapsed().as_millis()).unwrap_or(u64::MAX),
                        "claimed"
                    );
                }
                Err(e) if crate::crd::is_conflict(&e) => {
                    cx.metrics
                        .conflicts
                        .get_or_create(&super::metrics::Refused { write: "claim" })
                        .inc();
                    tracing::debug!(source = %k, "not claimed: the DataSource changed since it was read; deciding again");
                    return (k, generation, Ok(None));
                }
                Err(e) => {
                    return (k, generation, Err(format!("cannot claim the source: {e}")));
                }
            }
            true
        }
        Step::Open => {
            let status = ds.status.as_ref();
            status.and_then(|s| s.phase) == Some(crate::crd::Phase::Pending)
                || status.and_then(|s| s.serving_shard) != Some(shard as i32)
        }
        _ => false,
    };
    if taken_over {
        cx.metrics
            .handovers
            .get_or_create(&Direction { direction: "in" })
            .inc();
    }
    let r = build(cx, &ds).await.map(Some);
    (k, generation, r)
}

/// Puts a source [`open_one`] built into service (or records why it could
/// not be built).
pub fn opened(
    cx: &SyncContext<'_>,
    registry: &Registry,
    failures: &Mutex<BuildFailures>,
    (k, generation, r): (String, i64, Result<Option<Source>, String>),
) {
    match r {
        Ok(None) => {}
        Ok(Some(source)) => {
            registry.take_demand(&k);
            cx.released.forget(&k);
            if let Ok(mut f) = failures.lock() {
                f.remove(&k);
            }
            tracing::info!(source = %k, generation, "pool created");
            if let Some(old) = registry.insert(Arc::new(source)) {
                // A rebuild: the old pool drains beside the new one.
                let deadline = Instant::now() + cx.drain_timeout;
                tokio::spawn(async move {
                    drain(&old, deadline).await;
                });
            }
        }
        Err(e) => {
            tracing::warn!(source = %k, error = %e, "cannot serve source");
            if let Ok(mut f) = failures.lock() {
                f.insert(k, e);
            }
        }
    }
}

/// Takes a source that left this shard out of the registry, and in the
/// background drains and closes it, then acknowledges the move.
fn release(cx: &SyncContext<'_>, registry: &Arc<Registry>, key: &str, ds: Option<&DataSource>) {
    let Some(old) = registry.remove(key) else {
        return;
    };
    // Handed straight to the shard it is assigned to, unless paused.
    let to = ds
        .filter(|ds| !ds.spec.paused)
        .and_then(|ds| ds.status.as_ref()?.shard)
        .and_then(|s| u32::try_from(s).ok());
    registry.set_releasing(key, true);
    registry.set_told(key, false);
    let releasing = registry.clone();
    tracing::info!(source = %key, to, "source left this shard; draining");
    let client = cx.client.clone();
    let recorder = cx.recorder.clone();
    let told = cx.released.clone();
    let told_count = cx
        .metrics
        .notes
        .get_or_create(&super::metrics::NoteOutcome { outcome: "told" })
        .clone();
    let shard = cx.shard;
    let regarding = ds.map(|ds| ds.object_ref(&()));
    let released = cx
        .metrics
        .handovers
        .get_or_create(&Direction { direction: "out" })
        .clone();
    let deadline = Instant::now() + cx.drain_timeout;
    let timeout = cx.drain_timeout;
    tokio::spawn(async move {
        let ended = drain(&old, deadline).await;
        // Every connection is closed: now the next owner may open it. Told
        // over the routers' links first (at once), then written (the record).
        if let Some(to) = to.filter(|&to| to != shard) {
            let routers = told.tell(&old.key, to);
            if routers > 0 {
                told_count.inc();
            }
            tracing::debug!(source = %old.key, to, routers, "release told over the links");
        }
        if ended > 0 {
            report_ended(
                &recorder,
                regarding.as_ref(),
                &old.key,
                shard,
                ended,
                timeout,
            )
            .await;
        }
        for attempt in 0u32.. {
            match handover::release(&client, &old.key, shard, to).await {
                Ok(()) => {
                    released.inc();
                    releasing.set_releasing(&old.key, false);
                    tracing::info!(source = %old.key, "released");
                    return;
                }
                Err(e) if attempt < 60 => {
                    tracing::warn!(source = %old.key, error = %e, "release acknowledgement failed; retrying");
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
                Err(e) => {
                    releasing.set_releasing(&old.key, false);
                    tracing::error!(source = %old.key, error = %e, "release acknowledgement failed; giving up (the next owner opens the source once this shard's Lease has expired)");
                    return;
                }
            }
        }
    });
}

/// Clears `servingShard` of a source this shard neither holds nor is
/// assigned (see [`handover::Step::Disown`]), in the background; a failure
/// is tried again when the source is next decided.
fn disown(cx: &SyncContext<'_>, key: &str) {
    let client = cx.client.clone();
    let shard = cx.shard;
    let key = key.to_string();
    tokio::spawn(async move {
        match handover::release(&client, &key, shard, None).await {
            Ok(()) => tracing::info!(source = %key, "no longer named as serving it"),
            Err(e) => {
                tracing::warn!(source = %key, error = %e, "cannot clear servingShard; trying again later")
            }
        }
    });
}

/// Logs and reports (as a Warning Event on the DataSource) connections
/// ended because their transactions outlived the drain deadline.
pub async fn report_ended(
    recorder: &Recorder,
    regarding: Option<&ObjectReference>,
    key: &str,
    shard: u32,
    ended: usize,
    timeout: Duration,
) {
    let note = format!(
        "shard {shard} ended {ended} server connection(s) still in a transaction {}s after the drain began, before handing the source over",
        timeout.as_secs()
    );
    tracing::warn!(source = %key, ended, "{note}");
    let Some(regarding) = regarding else { return };
    let ev = Event {
        type_: EventType::Warning,
        reason: "DrainDeadlineExceeded".into(),
        note: Some(note),
        action: "Drain".into(),
        secondary: None,
    };
    match tokio::time::timeout(Duration::from_secs(10), recorder.publish(&ev, regarding)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(source = %key, error = %e, "event not published"),
        Err(_) => tracing::debug!(source = %key, "event not published: no answer"),
    }
}

async fn build(cx: &SyncContext<'_>, ds: &DataSource) -> Result<Source, String> {
    let (mut params, settings) = settings(ds, cx.shard, cx.token)?;
    let limits = limits(ds)?;
    let ns = ds.namespace().unwrap_or_default();
    if ds.spec.tls.mode == crate::crd::TlsMode::VerifyFull {
        let r = ds
            .spec
            .tls
            .ca_secret_ref
            .as_ref()
            .ok_or("tls mode verify-full needs caSecretRef")?;
        let (ca, _) = read_secret_cached(cx, &ns, &r.name, &r.key).await?;
        params.tls = TlsSettings::new(crate::crd::TlsMode::VerifyFull, Some(&ca))
            .map_err(|e| format!("secret {ns}/{} key {:?}: {e}", r.name, r.key))?;
    }
    let r = &ds.spec.password_secret_ref;
    let (password, version) = read_secret_cached(cx, &ns, &r.name, &r.key).await?;
    let prefix = fence::identity(&ns, &ds.name_any(), cx.shard, cx.token).prefix;
    let manager = Manager::new(params, settings, password, cx.connect_limit.clone())
        .with_validity(cx.validity.clone())
        .with_fencing(ds.spec.fencing, prefix);
    let pool = pool::build(manager).map_err(|e| e.to_string())?;
    Ok(Source {
        key: handover::key(ds),
        pool,
        generation: ds.metadata.generation.unwrap_or(0).into(),
        pool_spec: pool_spec(ds),
        server_params: Default::default(),
        busy: Default::default(),
        sessions: Default::default(),
        retired: Default::default(),
        kill: Default::default(),
        secret: (ns, r.name.clone(), r.key.clone()),
        secret_version: std::sync::Mutex::new(version),
        stats: Default::default(),
        admission: Arc::new(admission::Admission::new(limits)),
        tags: Default::default(),
    })
}

/// Retires a source and closes every server connection of it: no new
/// transaction and no new connection from now; running transactions may
/// finish until `deadline`, then the sessions still holding a connection
/// end theirs (FATAL 57P01 to their clients) and give it up. Returns only
/// when no connection of the source is open or being opened on this shard,
/// with how many transactions were ended past the deadline.
pub async fn drain(source: &Source, deadline: Instant) -> usize {
    retire(source);
    let ended = finish_transactions(source, deadline).await;
    close(source).await;
    wait_closed(source).await;
    ended
}

/// The first step of a drain: no new transaction and no new connection.
pub fn retire(source: &Source) {
    source.retired.store(true, Ordering::SeqCst);
    source.pool.manager().close();
}

/// The second: waits until no session of a retired source holds a
/// connection; at `deadline` ends the transactions still running (and
/// waits up to 5 s for their sessions to give the connections up).
/// Returns how many were ended.
pub async fn finish_transactions(source: &Source, deadline: Instant) -> usize {
    while source.busy() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let ended = source.busy();
    if ended > 0 {
        source.kill.cancel();
        let bound = Instant::now() + Duration::from_secs(5);
        while source.busy() > 0 && Instant::now() < bound {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    ended
}

/// The last: waits until no connection of the source is open or being
/// opened on this shard (after [`close`]).
pub async fn wait_closed(source: &Source) {
    let mut next_log = Instant::now() + Duration::from_secs(5);
    while source.open_or_opening() > 0 {
        if Instant::now() >= next_log {
            tracing::error!(source = %source.key, open = source.open_or_opening(), "connections still open after the drain; waiting for them before handing the source over");
            source.kill.cancel();
            next_log += Duration::from_secs(5);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The first step of a stopping shard, taken while it still serves: closes
/// the idle connections of a source that its routers' sessions could not
/// use (it keeps as many open, idle or in use, as sessions are attached:
/// every session may run one transaction at a time). Returns how many it
/// closed. At full size a shard holds 9,000 connections and closing them
/// took 0.8-1.4 s on the test machine; done here, that time no longer
/// holds the clients of the shard's sources, whose transactions stop only
/// when the few connections left are to be closed. Nothing reopens what
/// was closed: maintenance has stopped, and a transaction that finds no
/// idle connection opens one as before.
pub async fn thin(source: &Source) -> usize {
    let removed = pool::take_idle_beyond(&source.pool, source.sessions());
    let closed = removed.len();
    futures::future::join_all(removed.into_iter().map(|c| c.terminate())).await;
    closed
}

/// Closes every idle connection with a Terminate, then the pool.
pub async fn close(source: &Source) {
    let removed = source.pool.retain(|_, _| false);
    let closing = removed.removed.into_iter().map(|c| c.terminate());
    futures::future::join_all(closing).await;
    source.pool.close();
}

/// Ends every idle connection of a source (the warehouse stopped answering
/// one of them, so the others are suspect): the next transactions connect
/// afresh, which a reachable warehouse answers and an unreachable one
/// fails within connectTimeout.
pub fn purge_idle(source: &Source) {
    let removed = source.pool.retain(|_, _| false);
    for conn in removed.removed {
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(1), conn.terminate()).await;
        });
    }
}

/// Maintenance passes over every source: warm to minIdle, trim idle.
/// Passes repeat while they open connections (a warming pool opens one
/// per pass, so warm-up goes breadth-first over the sources), at most
/// 32 in a row; the next tick goes on. With `probe`, the first pass asks
/// every idle connection's socket whether its server closed it (see
/// [`pool::maintain_with`]); the repeats do not.
pub async fn maintain_all(registry: &Registry, probe: bool) {
    for pass in 0..32 {
        if maintain_pass(registry, probe && pass == 0).await == 0 {
            break;
        }
    }
}

/// One pass; returns how many connections it opened.
async fn maintain_pass(registry: &Registry, probe: bool) -> usize {
    use futures::StreamExt;
    let sources = registry.all();
    let opened = std::sync::atomic::AtomicUsize::new(0);
    let opened_ref = &opened;
    futures::stream::iter(sources)
        .for_each_concurrent(64, |s| async move {
            let n = pool::maintain_with(&s.pool, probe).await;
            opened_ref.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
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
    opened.into_inner()
}
