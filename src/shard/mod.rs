//! The pool shard (`shardpool shard --index K`): holds the pools of the
//! sources assigned to shard K, only while it holds the Lease
//! `shardpool-shard-K`, and runs routers' sessions on them.
//!
//! Life of a shard process: standby (caches synced, waiting for the Lease;
//! ready, so a rollout can proceed), then serving (pools warm, endpoint open), then on
//! SIGTERM thinning (still serving, it closes the idle connections that no
//! attached session could use), draining (no new transactions, running
//! ones finish until the deadline, the rest are ended), closing what is
//! left and releasing the Lease.
//!
//! A shard that cannot renew its Lease (the API server hung, down, or out
//! of reach) keeps serving on the connections it has and opens no new ones
//! once its claim may have expired; it exits only when it learns that
//! another holder owns the Lease. That is safe because a successor ends a
//! predecessor's connections before opening its own ([`fence`]).

pub mod admission;
pub mod checkout;
pub mod clients;
pub mod connect_limit;
pub mod fence;
pub mod handover;
pub mod metrics;
pub mod opening;
pub mod phase_events;
pub mod pool;
pub mod prepared;
pub mod registry;
pub mod released;
pub mod scram;
pub mod secrets;
pub mod serve;
pub mod server;
pub mod session;
pub mod sources;
pub mod status;
pub mod tags;
pub mod tls;
pub mod topn;

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Api, Client, Resource};
use tokio::sync::watch;

use crate::crd::DataSource;
use crate::health::{self, Ready};
use crate::lease::{self, LeaseConfig};

/// Least time between two passes over the DataSources started by watch
/// changes (see the main loop).
const SYNC_SPACING: Duration = Duration::from_millis(50);

/// Maintenance rounds (every 500 ms) per look at the idle connections'
/// sockets (see [`pool::maintain_with`]).
const PROBE_EVERY: u32 = 4;

/// How long a stopping shard spends at most closing, while it still
/// serves, the connections no session could use (see [`sources::thin`]);
/// 9,000 took 0.8-1.4 s on the test machine.
const THIN_WAIT: Duration = Duration::from_secs(5);

/// How long a stopping shard, its pools closed, waits at most for the
/// hand-over writes of sources that moved away just before SIGTERM.
const RELEASE_WRITES_WAIT: Duration = Duration::from_secs(10);

/// Shard settings, from flags and the pod's environment.
#[derive(Debug, Clone, clap::Args)]
pub struct ShardConfig {
    /// Shard index K.
    #[arg(long, env = "SHARDPOOL_SHARD_INDEX")]
    pub index: u32,
    /// This pod's name (Lease holder identity).
    #[arg(long, env = "POD_NAME")]
    pub pod_name: String,
    /// Namespace of the Lease.
    #[arg(long, env = "POD_NAMESPACE")]
    pub namespace: String,
    /// Address to serve routers and probes on.
    #[arg(long, env = "POD_IP", default_value = "127.0.0.1")]
    pub pod_ip: IpAddr,
    /// Port of the router endpoint.
    #[arg(long, env = "SHARDPOOL_SHARD_PORT", default_value_t = 6432)]
    pub port: u16,
    /// Port of /healthz and /readyz.
    #[arg(long, env = "SHARDPOOL_METRICS_PORT", default_value_t = 9090)]
    pub metrics_port: u16,
    /// Lease duration in seconds.
    #[arg(long, env = "SHARDPOOL_LEASE_SECONDS", default_value_t = 15)]
    pub lease_seconds: u64,
    /// Most connection attempts in flight at once, shard-wide (storm control).
    #[arg(long, env = "SHARDPOOL_CONNECT_CONCURRENCY", default_value_t = 32)]
    pub connect_concurrency: usize,
    /// Longest wait for running transactions on SIGTERM, in seconds.
    #[arg(long, env = "SHARDPOOL_DRAIN_SECONDS", default_value_t = 45)]
    pub drain_seconds: u64,
    /// Name of the Deployment that owns the shard's Lease (the operator's;
    /// set by the operator), so uninstalling the release removes the Lease.
    #[arg(long, env = "SHARDPOOL_OWNER_DEPLOYMENT")]
    pub owner_deployment: Option<String>,
    /// UID of that Deployment.
    #[arg(long, env = "SHARDPOOL_OWNER_UID")]
    pub owner_uid: Option<String>,
    /// Watch Secret metadata in every namespace with one watch (the chart's
    /// `shard.secretsClusterWide` opt-in, which grants cluster-wide Secret
    /// read); otherwise one watch per namespace the shard serves.
    #[arg(long, env = "SHARDPOOL_SECRETS_CLUSTER_WIDE", default_value_t = false)]
    pub secrets_cluster_wide: bool,
    /// Mutual TLS on the router links (certificate from the Secret
    /// `shardpool-link-shard-K`); false only when the release turned it off
    /// (links.mutualTLS), which lets anything that reaches the port in.
    #[arg(long, env = "SHARDPOOL_LINK_TLS", default_value_t = true, action = clap::ArgAction::Set)]
    pub link_tls: bool,
    /// Client identities with per-client metric series of their own (the
    /// busiest ones); the rest count as `other`.
    #[arg(long, env = "SHARDPOOL_CLIENT_SERIES", default_value_t = 20)]
    pub client_series: usize,
}

impl ShardConfig {
    /// The Lease's owner reference, when the operator passed one.
    pub fn lease_owner(
        &self,
    ) -> Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference> {
        let (name, uid) = (self.owner_deployment.clone()?, self.owner_uid.clone()?);
        Some(
            k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
                api_version: "apps/v1".into(),
                kind: "Deployment".into(),
                name,
                uid,
                controller: Some(false),
                block_owner_deletion: Some(false),
            },
        )
    }
}

/// Runs the shard until SIGTERM; returns the process exit code.
pub async fn run(cfg: ShardConfig) -> anyhow::Result<i32> {
    let clients = crate::apiclient::connect().await?;
    let client = clients.requests.clone();
    let ready = Ready::default();
    let (stop_tx, stop_rx) = watch::channel(false);
    let term = crate::shutdown::signal();
    tokio::pin!(term);

    // Probes: a standby turns ready once its caches have synced (below),
    // so a rollout stops the old pod only when the new one could take over
    // at once (listing 6,000 DataSources took 11 s under load, and was
    // 11 s of every handover of the full-size rollout).
    let registry = Arc::new(registry::Registry::default());
    let mut prom = prometheus_client::registry::Registry::default();
    let metrics = Arc::new(metrics::ShardMetrics::register(
        &mut prom,
        registry.clone(),
        cfg.client_series,
    ));
    let connect_limit = Arc::new(connect_limit::ConnectLimit::new(cfg.connect_concurrency));
    connect_limit.register(&mut prom);
    let probe_addr = SocketAddr::new(cfg.pod_ip, cfg.metrics_port);
    let mut probe_stop = stop_rx.clone();
    health::spawn(probe_addr, ready.clone(), prom, async move {
        let _ = probe_stop.wait_for(|s| *s).await;
    })?;

    let duration = Duration::from_secs(cfg.lease_seconds.max(1));
    let (renew_every, retry_every, request_timeout) = LeaseConfig::timings(duration);
    let lease_cfg = LeaseConfig {
        name: crate::lease::shard_lease_name(cfg.index),
        holder: cfg.pod_name.clone(),
        duration,
        renew_every,
        retry_every,
        request_timeout,
        owner: cfg.lease_owner(),
        labels: [
            (
                "app.kubernetes.io/name".to_string(),
                "shardpool".to_string(),
            ),
            (
                "app.kubernetes.io/component".to_string(),
                "shard".to_string(),
            ),
            ("shardpool.dev/shard".to_string(), cfg.index.to_string()),
        ]
        .into(),
    };
    // The link certificate before the Lease: holding the Lease says
    // "routers can reach me", which the operator waits for before it moves
    // sources to a new shard.
    let mut link_tls = cfg.link_tls.then(|| {
        crate::linkcerts::follow_server(
            clients.watches.clone(),
            cfg.namespace.clone(),
            crate::proto::linktls::shard_secret(cfg.index),
        )
    });
    if let Some(rx) = link_tls.as_mut() {
        // Routers are refused until the certificate is known; the operator
        // issues it before it creates the shard.
        if tokio::time::timeout(Duration::from_secs(10), rx.wait_for(Option::is_some))
            .await
            .is_err()
        {
            tracing::warn!(secret = %crate::proto::linktls::shard_secret(cfg.index), "no link certificate yet; refusing routers until it arrives");
        }
    } else {
        tracing::warn!(
            "mutual TLS on router links is off (links.mutualTLS=false): anything that reaches this port can use the pools"
        );
    }
    let changed = Arc::new(crate::watch::Changed::default());
    let (store, feed) = crate::watch::store_fed(
        Api::<DataSource>::all(clients.watches.clone()),
        watcher::Config::default(),
        changed.clone(),
    );
    let lease_store = crate::watch::store(
        Api::<Lease>::namespaced(clients.watches.clone(), &cfg.namespace),
        watcher::Config::default().labels("app.kubernetes.io/component=shard"),
        Some(changed.clone()),
    );
    // Secret metadata only (no values in memory): a changed resourceVersion
    // of a referenced Secret triggers one read of that Secret.
    let secrets = Arc::new(secrets::SecretWatch::new(
        clients.watches.clone(),
        cfg.secrets_cluster_wide,
    ));
    let secret_cache = Arc::new(secrets::SecretCache::default());
    // Synced while standby: a pod that takes the Lease over (a rollout)
    // opens its sources at once instead of listing thousands first.
    let synced = async {
        tokio::join!(
            store.wait_until_ready(),
            lease_store.wait_until_ready(),
            secrets.ready()
        )
    };
    tokio::select! {
        _ = synced => {}
        _ = &mut term => {
            tracing::info!("terminated while standby");
            return Ok(0);
        }
    }
    ready.set(true);
    let leases: Api<Lease> = Api::namespaced(client.clone(), &cfg.namespace);
    tracing::info!(shard = cfg.index, "standby: waiting for the lease");
    // The passwords of the shard's sources, read while standby: taking
    // the Lease over then opens every source at once.
    let wanted: std::collections::HashSet<(String, String)> = store
        .state()
        .iter()
        .filter(|ds| handover::wanted(ds, cfg.index))
        .flat_map(|ds| sources::secrets_of(ds))
        .collect();
    let prefetch = {
        let (client, secrets, cache) = (client.clone(), secrets.clone(), secret_cache.clone());
        tokio::spawn(async move {
            let began = std::time::Instant::now();
            let n = wanted.len();
            let failed = cache.prefetch(&client, &secrets, wanted).await;
            tracing::info!(
                secrets = n,
                failed,
                ms = u64::try_from(began.elapsed().as_millis()).unwrap_or(u64::MAX),
                "standby: read the passwords of the shard's sources"
            );
        })
    };
    // Tried at once when the Lease watch shows it released (a rollout's
    // predecessor done draining), else every retry_every.
    let lease_ref = ObjectRef::new(&lease_cfg.name).within(&cfg.namespace);
    let released = || async {
        loop {
            changed.notified().await;
            let free = lease_store.get(&lease_ref).is_none_or(|l| {
                !crate::lease::has_live_holder(&l, k8s_openapi::jiff::Timestamp::now())
            });
            if free {
                return;
            }
        }
    };
    let Some(held) = lease::acquire_nudged(leases, lease_cfg, &mut term, released).await else {
        prefetch.abort();
        tracing::info!("terminated while standby");
        return Ok(0);
    };
    // Renewal on its own task: nothing here waits for the API server.
    let keeper = lease::keep(held);
    let validity = keeper.validity();
    let token = fence::process_token();
    tracing::info!(shard = cfg.index, token = %token, "serving");

    // Serving.
    metrics.lease_held.set(1);
    let (draining_tx, draining_rx) = watch::channel(false);
    let listener = tokio::net::TcpListener::bind(SocketAddr::new(cfg.pod_ip, cfg.port)).await?;
    let released = Arc::new(released::Released::new(cfg.index));
    let links = tokio::spawn(serve::serve(
        listener,
        link_tls,
        registry.clone(),
        released.clone(),
        metrics.clone(),
        draining_rx,
        stop_rx.clone(),
    ));

    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "shardpool-shard".into(),
            instance: Some(cfg.pod_name.clone()),
        },
    );
    let drain_timeout = Duration::from_secs(cfg.drain_seconds);
    let sync_cx = sources::SyncContext {
        client: &client,
        store: &store,
        leases: &lease_store,
        namespace: &cfg.namespace,
        shard: cfg.index,
        pod: &cfg.pod_name,
        token: &token,
        validity: &validity,
        connect_limit: &connect_limit,
        metrics: &metrics,
        recorder: &recorder,
        drain_timeout,
        secrets: &secrets,
        secret_cache: &secret_cache,
        released: &released,
    };
    let failures: Arc<Mutex<status::BuildFailures>> = Arc::default();
    // Status and rotated passwords on a task of their own: their API calls
    // never delay opening, draining or maintaining pools.
    tokio::spawn(report(
        client.clone(),
        store.clone(),
        lease_store.clone(),
        cfg.namespace.clone(),
        secrets.clone(),
        cfg.index,
        cfg.pod_name.clone(),
        registry.clone(),
        failures.clone(),
        metrics.clone(),
        status::Events::new(recorder.clone(), metrics.events_suppressed.clone()),
        stop_rx.clone(),
    ));
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut status_tick = tokio::time::interval(Duration::from_secs(2));
    let mut resync = tokio::time::interval(Duration::from_secs(30));
    let maintaining = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut rounds: u32 = 0;
    let mut opening = opening::Opening::default();
    let _ = feed.take();
    sources::sync(&sync_cx, &registry, &failures, &mut opening);
    // Changes are decided per changed DataSource ([`sources::sync_some`]),
    // at most every SYNC_SPACING: at thousands of sources the watch reports
    // hundreds of changes a second (status writes during a warm-up), and
    // one pass covers them all. A full pass runs at start, after the watch
    // listed anew, and every 30 s.
    let mut last_sync = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = &mut term => break,
            by = keeper.lost() => {
                // Another holder owns the Lease: its first connection of each
                // source ends ours anyway; close them now and stop.
                tracing::error!(holder = ?by, "the shard's Lease belongs to another holder; closing every pool and exiting");
                ready.set(false);
                let closing = registry.all().into_iter().map(|s| async move {
                    sources::retire(&s);
                    s.kill.cancel();
                    sources::close(&s).await;
                });
                let _ = tokio::time::timeout(Duration::from_secs(2), futures::future::join_all(closing)).await;
                metrics.lease_held.set(0);
                let _ = stop_tx.send(true);
                return Ok(3);
            }
            _ = changed.notified() => {
                tokio::time::sleep_until(last_sync + SYNC_SPACING).await;
                last_sync = tokio::time::Instant::now();
                match feed.take() {
                    crate::watch::Batch::Everything => {
                        sources::sync(&sync_cx, &registry, &failures, &mut opening);
                    }
                    crate::watch::Batch::Some(touched) => {
                        // A Lease change (the shared signal) may free the
                        // sources waiting for another shard.
                        let keys: std::collections::HashSet<String> = touched
                            .iter()
                            .map(|r| format!("{}/{}", r.namespace.as_deref().unwrap_or_default(), r.name))
                            .chain(opening.awaiting().cloned())
                            .collect();
                        sources::sync_some(&sync_cx, &registry, &failures, &mut opening, keys);
                    }
                }
            }
            _ = released.notified() => {
                // A previous owner said it let go of these (see [`released`]).
                let keys = released.take_fresh();
                sources::sync_some(&sync_cx, &registry, &failures, &mut opening, keys);
            }
            done = opening.next_done() => {
                let key = done.0.clone();
                let failed = done.2.is_err();
                sources::opened(&sync_cx, &registry, &failures, done);
                if failed {
                    // Tried again with the other failures, every 2 s.
                    opening.refill(&sync_cx, &registry);
                } else {
                    // Its DataSource may have changed while it was opened
                    // (a claim refused as stale, a new assignment).
                    sources::sync_some(&sync_cx, &registry, &failures, &mut opening, [key]);
                }
            }
            _ = resync.tick() => {
                // Retry sources that failed to build (e.g. a Secret created later).
                if let Ok(mut f) = failures.lock() {
                    f.clear();
                }
                sources::sync(&sync_cx, &registry, &failures, &mut opening);
            }
            _ = status_tick.tick() => {
                // What turns with time rather than with a change: another
                // shard's Lease expiring, a failed build tried again.
                let mut keys: std::collections::HashSet<String> = opening.awaiting().cloned().collect();
                if let Ok(f) = failures.lock() {
                    keys.extend(f.keys().cloned());
                }
                sources::sync_some(&sync_cx, &registry, &failures, &mut opening, keys);
            }
            _ = tick.tick() => {
                metrics.lease_valid.set(i64::from(validity.may_act()));
                // One maintenance pass at a time: overlapping passes would
                // each see the same shortfall and open it twice.
                if !maintaining.swap(true, std::sync::atomic::Ordering::AcqRel) {
                    let registry = registry.clone();
                    let maintaining = maintaining.clone();
                    // Idle sockets asked every 2 s (PROBE_EVERY ticks).
                    rounds = rounds.wrapping_add(1);
                    let probe = rounds % PROBE_EVERY == 0;
                    tokio::spawn(async move {
                        sources::maintain_all(&registry, probe).await;
                        maintaining.store(false, std::sync::atomic::Ordering::Release);
                    });
                }
            }
        }
    }

    // Sources still being claimed are left: none has a connection yet, and
    // a claim that landed names this shard, whose successor may open it.
    drop(opening);
    // On SIGTERM, in steps: thin (still serving), drain (no new
    // transactions; running ones finish within the deadline, the rest are
    // ended), close what is left; the Lease is released only when no
    // server connection is open.
    tracing::info!(
        sessions = registry.all().iter().map(|s| s.sessions()).sum::<usize>(),
        "SIGTERM: closing the connections no session could use, still serving"
    );
    ready.set(false);
    let deadline = tokio::time::Instant::now() + drain_timeout;
    let began = std::time::Instant::now();
    let all = registry.all();
    // Still serving: the connections no attached session could use are
    // closed first (the bulk of them), so that the clients are held only
    // while the few left close (see [`sources::thin`]). A maintenance pass
    // still running would open them again: it ends first (no new one
    // starts, the loop above has ended).
    let maintenance_ends = tokio::time::Instant::now() + Duration::from_secs(1);
    while maintaining.load(std::sync::atomic::Ordering::Acquire)
        && tokio::time::Instant::now() < maintenance_ends
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // One source at a time, yielding after each: closing a connection
    // never waits (each Terminate is written in one poll), so closing all
    // of them in one step would hold the runtime's one thread for the
    // whole second, and the sessions served meanwhile with it.
    let thin_until = tokio::time::Instant::now() + THIN_WAIT;
    let mut thinned = 0;
    for s in &all {
        if tokio::time::Instant::now() >= thin_until {
            break;
        }
        thinned += sources::thin(s).await;
        tokio::task::yield_now().await;
    }
    let thinned_at = began.elapsed();
    tracing::info!(busy = registry.busy(), thinned, "SIGTERM: draining");
    metrics.draining.set(1);
    let _ = draining_tx.send(true);
    let held_from = std::time::Instant::now();
    // In steps over every source at once: no new transactions anywhere,
    // the running ones finish, then every connection is closed.
    for s in &all {
        sources::retire(s);
    }
    let finishing = all.iter().map(|s| {
        let (recorder, store) = (&recorder, &store);
        async move {
            let ended = sources::finish_transactions(s, deadline).await;
            if ended > 0 {
                let (ns, name) = s.key.split_once('/').unwrap_or(("", &s.key));
                let regarding = store
                    .get(&ObjectRef::new(name).within(ns))
                    .map(|ds| ds.object_ref(&()));
                sources::report_ended(
                    recorder,
                    regarding.as_ref(),
                    &s.key,
                    cfg.index,
                    ended,
                    drain_timeout,
                )
                .await;
            }
            ended
        }
    });
    let ended: usize = futures::future::join_all(finishing).await.into_iter().sum();
    let finished = held_from.elapsed();
    let connections: usize = all.iter().map(|s| s.pool.status().size).sum();
    futures::future::join_all(all.iter().map(|s| async move {
        sources::close(s).await;
        sources::wait_closed(s).await;
    }))
    .await;
    // Sources that moved away before SIGTERM drain on their own tasks and
    // end with the hand-over write; the Lease goes only after those, or
    // after RELEASE_WRITES_WAIT (an API server that does not answer), but
    // never much past the drain deadline (the grace period ends 5 s after
    // it). Their next owners may have opened them on this shard's note
    // already: the write is what reports them Ready at once, not only
    // once this Lease has expired.
    let writes_due =
        (tokio::time::Instant::now() + RELEASE_WRITES_WAIT).min(deadline + Duration::from_secs(2));
    while registry.releases_running() > 0 && tokio::time::Instant::now() < writes_due {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let unwritten = registry.releases_running();
    if unwritten > 0 {
        tracing::warn!(
            unwritten,
            "exiting before every hand-over was written; their next owners report them once this Lease has expired"
        );
    }
    let closed = held_from.elapsed();
    if let Err(e) = keeper.release().await {
        tracing::warn!(error = %e, "lease release failed; the successor waits for expiry");
    }
    // Each step's time; the successor (and the held clients) wait from
    // the drain's start on.
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    tracing::info!(
        thin_ms = ms(thinned_at),
        thinned,
        transactions_ms = ms(finished),
        close_ms = ms(closed - finished),
        release_ms = ms(held_from.elapsed() - closed),
        connections,
        "lease released after the drain"
    );
    metrics.lease_held.set(0);
    let _ = stop_tx.send(true);
    // Every link tells its sessions to go elsewhere before it closes.
    let _ = tokio::time::timeout(Duration::from_secs(3), links).await;
    tracing::info!(ended, "drained; exiting");
    Ok(0)
}

/// Writes status and picks up rotated passwords every 2 s until `stop`.
#[allow(clippy::too_many_arguments)]
async fn report(
    client: Client,
    store: Store<DataSource>,
    leases: Store<Lease>,
    namespace: String,
    secrets: Arc<secrets::SecretWatch>,
    shard: u32,
    pod: String,
    registry: Arc<registry::Registry>,
    failures: Arc<Mutex<status::BuildFailures>>,
    metrics: Arc<metrics::ShardMetrics>,
    mut events: status::Events,
    mut stop: watch::Receiver<bool>,
) {
    let mut written = status::Written::new();
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        sources::refresh_passwords(&client, &secrets, &registry).await;
        let failed = failures.lock().map(|f| f.clone()).unwrap_or_default();
        status::write(
            &client,
            &store,
            shard,
            &pod,
            &registry,
            &failed,
            &mut written,
            &metrics,
            &mut events,
            |s| handover::shard_alive(&leases, &namespace, s),
        )
        .await;
    }
}
