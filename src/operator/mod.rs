//! The operator (`shardpool operator`): assigns every DataSource to a shard
//! (rendezvous hashing with bounded load, [`assign`]), writes the
//! assignment to the DataSource's status, and owns one Deployment per shard
//! built from the shard template ([`template`]), rolling them one at a time
//! when the template changes. Leader-elected through a Lease, so extra
//! replicas wait as standbys; it holds no state outside the API server.
//!
//! It never touches a shard's pods or a warehouse connection: restarting or
//! upgrading it leaves every pool alone.

pub mod assign;
#[cfg(test)]
mod fixture;
pub mod links;
pub mod metrics;
pub mod pki;
pub mod reconcile;
pub mod template;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kube::runtime::watcher;

use crate::crd::DataSource;
use crate::health::{self, Ready};
use crate::lease::{self, LeaseConfig};

/// Name of shard K's Deployment and Lease.
pub fn shard_name(index: u32) -> String {
    crate::lease::shard_lease_name(index)
}

/// Operator settings, from flags and the pod's environment.
#[derive(Debug, Clone, clap::Args)]
pub struct OperatorConfig {
    /// This pod's name (leader identity; its Deployment owns the shards).
    #[arg(long, env = "POD_NAME")]
    pub pod_name: String,
    /// Namespace of the release (shard workloads, Leases, template).
    #[arg(long, env = "POD_NAMESPACE")]
    pub namespace: String,
    /// Helm release name (labels).
    #[arg(long, env = "SHARDPOOL_RELEASE", default_value = "shardpool")]
    pub release: String,
    /// ConfigMap holding the shard template.
    #[arg(long, env = "SHARDPOOL_SHARD_TEMPLATE")]
    pub shard_template: String,
    /// Address of /healthz and /readyz.
    #[arg(long, env = "POD_IP", default_value = "127.0.0.1")]
    pub pod_ip: IpAddr,
    /// Port of /healthz and /readyz.
    #[arg(long, env = "SHARDPOOL_METRICS_PORT", default_value_t = 9090)]
    pub metrics_port: u16,
    /// Load bound: no shard above (1 + epsilon) times the mean summed maxSize.
    #[arg(long, env = "SHARDPOOL_LOAD_EPSILON", default_value_t = 0.25)]
    pub epsilon: f64,
    /// Most sources between shards at once (moves beyond wait for a later pass).
    #[arg(long, env = "SHARDPOOL_MAX_MOVES", default_value_t = 100)]
    pub max_moves: usize,
    /// Mutual TLS on the router-to-shard links: the operator keeps the
    /// link CA and every link certificate in Secrets (see [`links`]).
    #[arg(long, env = "SHARDPOOL_LINK_TLS", default_value_t = true, action = clap::ArgAction::Set)]
    pub link_tls: bool,
    /// Most shards that may exist: link certificates are kept for 0..N.
    #[arg(long, env = "SHARDPOOL_MAX_SHARDS", default_value_t = 16)]
    pub max_shards: u32,
    /// Lifetime of the link CA (renewed in its last third).
    #[arg(long, env = "SHARDPOOL_LINK_CA_LIFETIME", default_value = "8760h")]
    pub link_ca_lifetime: String,
    /// Lifetime of a link certificate (renewed in its last third).
    #[arg(long, env = "SHARDPOOL_LINK_CERT_LIFETIME", default_value = "720h")]
    pub link_cert_lifetime: String,
}

/// Runs the operator until SIGTERM; returns the exit code.
pub async fn run(cfg: OperatorConfig) -> anyhow::Result<i32> {
    let clients = crate::apiclient::connect().await?;
    let client = clients.requests.clone();
    let ready = Ready::default();
    ready.set(true);
    let mut prom = prometheus_client::registry::Registry::default();
    let metrics = metrics::OperatorMetrics::register(&mut prom);
    health::spawn(
        SocketAddr::new(cfg.pod_ip, cfg.metrics_port),
        ready.clone(),
        prom,
        std::future::pending(),
    )?;
    let term = crate::shutdown::signal();
    tokio::pin!(term);

    // The operator's own Deployment owns the shard workloads and every
    // Lease, so uninstalling the release removes them through GC.
    let owner = reconcile::own_deployment(&client, &cfg).await;
    if owner.is_none() {
        tracing::warn!(
            "cannot find the operator's own Deployment; shard workloads and Leases get no owner reference"
        );
    }
    let duration = Duration::from_secs(15);
    let (renew_every, _, request_timeout) = LeaseConfig::timings(duration);
    let lease_cfg = LeaseConfig {
        name: format!("{}-operator", cfg.release),
        holder: cfg.pod_name.clone(),
        duration,
        renew_every,
        retry_every: Duration::from_secs(2),
        request_timeout,
        owner: owner.clone(),
        labels: [
            (
                "app.kubernetes.io/name".to_string(),
                "shardpool".to_string(),
            ),
            (
                "app.kubernetes.io/component".to_string(),
                "operator".to_string(),
            ),
        ]
        .into(),
    };
    let leases: Api<Lease> = Api::namespaced(client.clone(), &cfg.namespace);
    let Some(held) = lease::acquire(leases, lease_cfg, &mut term).await else {
        return Ok(0);
    };
    // Renewal on its own task; a pass runs only while the claim is valid.
    let keeper = lease::keep(held);
    let leading = keeper.validity();
    tracing::info!("leading");
    metrics.leader.set(1);

    let changed = Arc::new(crate::watch::Changed::default());
    let sources = crate::watch::store(
        Api::<DataSource>::all(clients.watches.clone()),
        watcher::Config::default(),
        Some(changed.clone()),
    );
    let shard_selector = format!(
        "app.kubernetes.io/component=shard,app.kubernetes.io/instance={}",
        cfg.release
    );
    let deployments = crate::watch::store(
        Api::<Deployment>::namespaced(clients.watches.clone(), &cfg.namespace),
        watcher::Config::default().labels(&shard_selector),
        Some(changed.clone()),
    );
    let leases_store = crate::watch::store(
        Api::<Lease>::namespaced(clients.watches.clone(), &cfg.namespace),
        watcher::Config::default().labels("app.kubernetes.io/component=shard"),
        Some(changed.clone()),
    );
    let pods = crate::watch::store(
        Api::<k8s_openapi::api::core::v1::Pod>::namespaced(clients.watches.clone(), &cfg.namespace),
        watcher::Config::default().labels(&shard_selector),
        Some(changed.clone()),
    );
    let configmaps = crate::watch::store(
        Api::<ConfigMap>::namespaced(clients.watches.clone(), &cfg.namespace),
        watcher::Config::default().fields(&format!("metadata.name={}", cfg.shard_template)),
        Some(changed.clone()),
    );
    let _ = tokio::join!(
        sources.wait_until_ready(),
        deployments.wait_until_ready(),
        configmaps.wait_until_ready(),
        leases_store.wait_until_ready(),
        pods.wait_until_ready()
    );
    let stores = reconcile::Stores {
        sources,
        deployments,
        configmaps,
        leases: leases_store,
        pods,
    };
    let ctx = reconcile::Context {
        client: client.clone(),
        cfg: cfg.clone(),
        owner,
        recorder: kube::runtime::events::Recorder::new(
            client.clone(),
            kube::runtime::events::Reporter {
                controller: "shardpool-operator".into(),
                instance: Some(cfg.pod_name.clone()),
            },
        ),
        metrics: metrics.clone(),
        unseen: Default::default(),
    };
    let link_pki = if cfg.link_tls {
        Some(links::LinkPki {
            release: cfg.release.clone(),
            namespace: cfg.namespace.clone(),
            shards: cfg.max_shards,
            ca_lifetime: crate::crd::parse_duration(&cfg.link_ca_lifetime)?,
            cert_lifetime: crate::crd::parse_duration(&cfg.link_cert_lifetime)?,
            owner: ctx.owner.clone(),
        })
    } else {
        None
    };
    // The link PKI is checked before the first pass (a shard needs its
    // certificate before it can serve) and then every half minute.
    let mut pki_checked: Option<std::time::Instant> = None;
    let mut periodic = tokio::time::interval(Duration::from_secs(10));
    loop {
        tokio::select! {
            _ = &mut term => break,
            by = keeper.lost() => {
                tracing::error!(holder = ?by, "lost leadership; exiting");
                metrics.leader.set(0);
                return Ok(3);
            }
            _ = changed.notified() => {
                // Debounce bursts (an initial list, a helm upgrade).
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            _ = periodic.tick() => {}
        }
        if !leading.may_act() {
            // Not renewed in time: another replica may lead now. Act again
            // once the claim is renewed (or exit when it is lost).
            tracing::debug!("leadership claim lapsed; not reconciling");
            continue;
        }
        if let Some(p) = &link_pki {
            if pki_checked.is_none_or(|t| t.elapsed() >= Duration::from_secs(30)) {
                match links::ensure(&client, p).await {
                    Ok(_) => pki_checked = Some(std::time::Instant::now()),
                    Err(e) => tracing::warn!(error = %e, "link PKI not kept; retrying"),
                }
            }
        }
        let started = std::time::Instant::now();
        // A pass is abandoned at SIGTERM or when leadership is lost: every
        // write in it stands on its own, and a long pass (thousands of
        // assignment writes) must neither delay the release of the
        // leadership to the next replica nor go on writing without it.
        let result = tokio::select! {
            r = reconcile::reconcile(&ctx, &stores) => r,
            _ = &mut term => {
                tracing::info!("SIGTERM during a pass; abandoning it");
                break;
            }
            by = keeper.lost() => {
                tracing::error!(holder = ?by, "lost leadership during a pass; exiting");
                metrics.leader.set(0);
                return Ok(3);
            }
        };
        metrics.duration.observe(started.elapsed().as_secs_f64());
        let outcome = match &result {
            Ok(()) => "ok",
            Err(e) => e.reason(),
        };
        metrics
            .reconciles
            .get_or_create(&metrics::Outcome { result: outcome })
            .inc();
        if let Err(e) = result {
            tracing::warn!(error = %e, reason = e.reason(), "reconcile failed; retrying");
            reconcile::report(&ctx, &e).await;
        }
    }
    if let Err(e) = keeper.release().await {
        tracing::warn!(error = %e, "leader lease release failed");
    }
    Ok(0)
}
