//! The query router (`shardpool router`): accepts PostgreSQL clients,
//! authenticates them (SCRAM-SHA-256 against the router's users), finds the
//! shard pod that owns the requested source from a watch-fed routing table,
//! and passes the session through a multiplexed link to that pod. It keeps
//! no state of its own: everything is rebuilt from watches on restart.

pub mod auth;
pub mod drain;
pub mod http;
pub mod jwt;
pub mod link;
pub mod metrics;
pub mod pgwire;
pub mod relay;
pub mod replay;
pub mod routes;
pub mod session;
pub mod statements;
pub mod tls;
pub mod weights;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::runtime::watcher;

use crate::crd::{DataSource, parse_duration};
use crate::health::{self, Ready};
use crate::proto::frame::{Frame, Kind};
use link::{Link, Links};
use pgwire::startup::Limits;
use routes::Routes;

/// Router settings, from flags and the environment.
#[derive(Clone, clap::Args)]
pub struct RouterConfig {
    /// Namespace of the shard Leases and pods (the release namespace).
    #[arg(long, env = "POD_NAMESPACE")]
    pub namespace: String,
    /// PostgreSQL protocol listen address.
    #[arg(long, env = "SHARDPOOL_PG_LISTEN", default_value = "0.0.0.0:5432")]
    pub pg_listen: SocketAddr,
    /// Address of /healthz and /readyz.
    #[arg(long, env = "POD_IP", default_value = "127.0.0.1")]
    pub pod_ip: IpAddr,
    /// Port of /healthz and /readyz.
    #[arg(long, env = "SHARDPOOL_METRICS_PORT", default_value_t = 9090)]
    pub metrics_port: u16,
    /// Router users: lines `name:password:ns1,ns2` (password or SCRAM verifier).
    #[arg(long, env = "SHARDPOOL_ROUTER_USERS", hide_env_values = true)]
    pub users: String,
    /// Admission weights: lines `identity=weight` (1-100; default 1). The
    /// identity is a router user, a JWT's `sub`, or `token-` and the first
    /// 8 hex digits of a static token's SHA-256.
    #[arg(long, env = "SHARDPOOL_CLIENT_WEIGHTS", default_value = "")]
    pub weights: String,
    /// How long to hold a session whose shard is handing over.
    #[arg(long, env = "SHARDPOOL_HANDOVER_TIMEOUT", default_value = "10s")]
    pub handover_timeout: String,
    /// Namespace used when a client names a source without one.
    #[arg(long, env = "SHARDPOOL_DEFAULT_NAMESPACE")]
    pub default_namespace: Option<String>,
    /// Port of the shards' router endpoint.
    #[arg(long, env = "SHARDPOOL_SHARD_PORT", default_value_t = 6432)]
    pub shard_port: u16,
    /// HTTP/JSON API listen address.
    #[arg(long, env = "SHARDPOOL_HTTP_LISTEN", default_value = "0.0.0.0:8080")]
    pub http_listen: SocketAddr,
    /// HTTP bearer tokens: lines `token:ns1,ns2`. Without any, the HTTP API
    /// answers 401 to everything.
    #[arg(
        long,
        env = "SHARDPOOL_HTTP_TOKENS",
        hide_env_values = true,
        default_value = ""
    )]
    pub http_tokens: String,
    /// Key verifying HMAC-SHA256 (HS256) JWT bearer tokens on the HTTP API
    /// (at least 32 bytes); without it only static tokens are accepted.
    #[arg(long, env = "SHARDPOOL_JWT_KEY", hide_env_values = true)]
    pub jwt_key: Option<String>,
    /// Longest lifetime (exp - now) accepted for a JWT.
    #[arg(long, env = "SHARDPOOL_JWT_MAX_TTL", default_value = "1h")]
    pub jwt_max_ttl: String,
    /// Release name (in the shards' link certificate names).
    #[arg(long, env = "SHARDPOOL_RELEASE", default_value = "shardpool")]
    pub release: String,
    /// Mutual TLS on the links to shards (certificate from the Secret
    /// `shardpool-link-router`); false only when the release turned it off.
    #[arg(long, env = "SHARDPOOL_LINK_TLS", default_value_t = true, action = clap::ArgAction::Set)]
    pub link_tls: bool,
    /// Name of the auth Secret (in the router's namespace) to watch: its
    /// changed users, tokens and JWT key apply without a restart. Unset:
    /// the values from the environment stay for the process's life.
    #[arg(long, env = "SHARDPOOL_AUTH_SECRET")]
    pub auth_secret: Option<String>,
    /// PEM certificate chain offered to PostgreSQL clients asking for TLS.
    #[arg(long, env = "SHARDPOOL_TLS_CERT", hide_env_values = true)]
    pub tls_cert: Option<String>,
    /// PEM private key of that certificate.
    #[arg(long, env = "SHARDPOOL_TLS_KEY", hide_env_values = true)]
    pub tls_key: Option<String>,
    /// Refuse PostgreSQL clients that do not ask for TLS.
    #[arg(long, env = "SHARDPOOL_TLS_REQUIRED", default_value_t = false)]
    pub tls_required: bool,
    /// Most PostgreSQL client connections at once; more are refused with
    /// SQLSTATE 53300, like PostgreSQL's max_connections.
    #[arg(long, env = "SHARDPOOL_MAX_CLIENTS", default_value_t = 10_000)]
    pub max_clients: usize,
    /// Largest client message accepted, in bytes.
    #[arg(long, env = "SHARDPOOL_MAX_MESSAGE_BYTES", default_value_t = 1 << 20)]
    pub max_message_bytes: usize,
    /// Time a client has from connecting to being authenticated.
    #[arg(long, env = "SHARDPOOL_STARTUP_TIMEOUT", default_value = "10s")]
    pub startup_timeout: String,
    /// Largest HTTP result, in bytes of row data, answered as one JSON
    /// document (NDJSON streams are not limited: they are sent as they come).
    #[arg(long, env = "SHARDPOOL_MAX_RESULT_BYTES", default_value_t = 16 << 20)]
    pub max_result_bytes: usize,
    /// After SIGTERM: how long to go on accepting and serving with
    /// readiness failed, while the Service's endpoints drop this pod.
    #[arg(long, env = "SHARDPOOL_DRAIN_DELAY", default_value = "5s")]
    pub drain_delay: String,
    /// After that: how long sessions have to finish their transactions
    /// before the ones still inside one are ended (57P01).
    #[arg(long, env = "SHARDPOOL_DRAIN_TIMEOUT", default_value = "20s")]
    pub drain_timeout: String,
}

impl std::fmt::Debug for RouterConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouterConfig")
            .field("namespace", &self.namespace)
            .field("pg_listen", &self.pg_listen)
            .field("handover_timeout", &self.handover_timeout)
            .finish_non_exhaustive()
    }
}

/// Where a client's cancel key leads.
struct CancelTarget {
    secret: u32,
    link: Arc<Link>,
    session: u32,
}

/// State shared by every client connection.
pub struct Router {
    /// Who may log in, and to which namespaces (users, HTTP tokens, JWT
    /// key), kept current from the auth Secret.
    pub auth: Arc<auth::Auth>,
    /// Startup limits.
    pub limits: Limits,
    /// The routing table.
    pub routes: Routes,
    /// Links to shard pods.
    pub links: Links,
    /// Hold time during a handover.
    pub handover_timeout: Duration,
    /// Namespace for bare source names.
    pub default_namespace: Option<String>,
    /// TLS for PostgreSQL clients, when a certificate is configured.
    pub tls: Option<tls::ClientTls>,
    /// Counters and histograms served at /metrics.
    pub metrics: metrics::RouterMetrics,
    /// Cancel keys handed to clients -> the session to cancel. Std Mutex,
    /// held only to insert, look up or remove.
    cancels: Mutex<HashMap<u32, CancelTarget>>,
    /// The drain state every session follows (see [`drain`]); the sender
    /// stays in [`run`].
    pub drain: tokio::sync::watch::Receiver<drain::Drain>,
}

impl Router {
    /// Gives a session a cancel key.
    pub fn register(&self, link: Arc<Link>, session: u32) -> (u32, u32) {
        let secret = rand::random::<u32>();
        let Ok(mut map) = self.cancels.lock() else {
            return (0, secret);
        };
        loop {
            let pid = rand::random::<u32>() & 0x7fff_ffff;
            if pid != 0 && !map.contains_key(&pid) {
                map.insert(
                    pid,
                    CancelTarget {
                        secret,
                        link,
                        session,
                    },
                );
                return (pid, secret);
            }
        }
    }

    /// Points a cancel key at the session's new shard after a handover.
    pub fn retarget(&self, pid: u32, link: Arc<Link>, session: u32) {
        if let Ok(mut map) = self.cancels.lock() {
            if let Some(t) = map.get_mut(&pid) {
                t.link = link;
                t.session = session;
            }
        }
    }

    /// Forgets a cancel key.
    pub fn unregister(&self, pid: u32) {
        if let Ok(mut map) = self.cancels.lock() {
            map.remove(&pid);
        }
    }

    /// Forwards a CancelRequest to the shard running the session.
    pub async fn cancel(&self, pid: u32, secret: u32) {
        let target = self.cancels.lock().ok().and_then(|m| {
            m.get(&pid)
                .filter(|t| t.secret == secret)
                .map(|t| (t.link.clone(), t.session))
        });
        if let Some((link, session)) = target {
            link.send(Frame::new(session, Kind::Cancel, Bytes::new()))
                .await;
        }
    }
}

/// Runs the router until SIGTERM; returns the exit code.
pub async fn run(cfg: RouterConfig) -> anyhow::Result<i32> {
    let jwt_max_ttl = parse_duration(&cfg.jwt_max_ttl)?;
    let credentials = auth::Credentials::parse(
        &cfg.users,
        &cfg.http_tokens,
        cfg.jwt_key.as_deref(),
        &cfg.weights,
        jwt_max_ttl,
    )
    .map_err(anyhow::Error::msg)?;
    let auth = Arc::new(auth::Auth::new(credentials, jwt_max_ttl));
    let handover_timeout = parse_duration(&cfg.handover_timeout)?;
    let drain_times = drain::DrainTimes {
        delay: parse_duration(&cfg.drain_delay)?,
        deadline: parse_duration(&cfg.drain_timeout)?,
    };
    let (drain_tx, drain_rx) = drain::channel();
    let limits = Limits {
        startup_timeout: parse_duration(&cfg.startup_timeout)?,
        max_message: cfg.max_message_bytes.max(1024),
    };
    let tls = match (
        cfg.tls_cert.as_deref().filter(|c| !c.is_empty()),
        cfg.tls_key.as_deref().filter(|k| !k.is_empty()),
    ) {
        (Some(cert), Some(key)) => {
            Some(tls::ClientTls::new(cert, key, cfg.tls_required).map_err(anyhow::Error::msg)?)
        }
        (None, None) if cfg.tls_required => {
            anyhow::bail!("SHARDPOOL_TLS_REQUIRED needs SHARDPOOL_TLS_CERT and SHARDPOOL_TLS_KEY")
        }
        (None, None) => None,
        _ => anyhow::bail!("SHARDPOOL_TLS_CERT and SHARDPOOL_TLS_KEY go together"),
    };
    let clients = crate::apiclient::connect().await?;
    let ready = Ready::default();
    let mut prom = prometheus_client::registry::Registry::default();
    let metrics = metrics::RouterMetrics::register(&mut prom);
    health::spawn(
        SocketAddr::new(cfg.pod_ip, cfg.metrics_port),
        ready.clone(),
        prom,
        std::future::pending(),
    )?;

    let shards = watcher::Config::default().labels("app.kubernetes.io/component=shard");
    let changed = Arc::new(crate::watch::Changed::default());
    let routes = Routes {
        sources: crate::watch::store(
            Api::<DataSource>::all(clients.watches.clone()),
            watcher::Config::default(),
            None,
        ),
        leases: crate::watch::store(
            Api::<Lease>::namespaced(clients.watches.clone(), &cfg.namespace),
            shards.clone(),
            Some(changed.clone()),
        ),
        pods: crate::watch::store(
            Api::<Pod>::namespaced(clients.watches.clone(), &cfg.namespace),
            shards,
            Some(changed.clone()),
        ),
        namespace: cfg.namespace.clone(),
        shard_port: cfg.shard_port,
        changed,
        moves: Arc::default(),
    };
    let _ = tokio::join!(
        routes.sources.wait_until_ready(),
        routes.leases.wait_until_ready(),
        routes.pods.wait_until_ready()
    );
    let link_tls = cfg.link_tls.then(|| link::LinkTls {
        config: crate::linkcerts::follow_client(
            clients.watches.clone(),
            cfg.namespace.clone(),
            crate::proto::linktls::ROUTER_SECRET.to_string(),
        ),
        release: cfg.release.clone(),
        namespace: cfg.namespace.clone(),
    });
    if let Some(t) = &link_tls {
        let mut rx = t.config.clone();
        if tokio::time::timeout(Duration::from_secs(10), rx.wait_for(Option::is_some))
            .await
            .is_err()
        {
            tracing::warn!("no link certificate yet; links to shards fail until it arrives");
        }
    }
    if let Some(name) = cfg.auth_secret.clone().filter(|n| !n.is_empty()) {
        tokio::spawn(auth::follow(
            clients.watches.clone(),
            cfg.namespace.clone(),
            name,
            auth.clone(),
        ));
    }
    let router = Arc::new(Router {
        auth,
        limits,
        routes,
        links: Links::new(link_tls),
        handover_timeout,
        default_namespace: cfg.default_namespace.clone(),
        tls,
        metrics,
        cancels: Mutex::default(),
        drain: drain_rx,
    });
    if let Some(notes) = router.links.notes() {
        tokio::spawn(relay::run(router.clone(), notes));
    }
    let listener = tokio::net::TcpListener::bind(cfg.pg_listen).await?;
    let http_listener = tokio::net::TcpListener::bind(cfg.http_listen).await?;
    let app = http::app(Arc::new(http::Http {
        router: router.clone(),
        max_result: cfg.max_result_bytes,
    }));
    let (http_stop, mut http_stopped) = tokio::sync::watch::channel(false);
    let http_task = tokio::spawn(async move {
        let stop = async move {
            let _ = http_stopped.wait_for(|s| *s).await;
        };
        // Graceful: on `stop` it accepts no more, and requests in flight
        // finish.
        if let Err(e) = axum::serve(http_listener, app)
            .with_graceful_shutdown(stop)
            .await
        {
            tracing::error!(error = %e, "http api stopped");
        }
    });
    tracing::info!(pg = %cfg.pg_listen, http = %cfg.http_listen, "router serving");
    ready.set(true);
    let slots = Arc::new(tokio::sync::Semaphore::new(cfg.max_clients.max(1)));
    let accept = |r: std::io::Result<(tokio::net::TcpStream, SocketAddr)>| match r {
        Ok((stream, peer)) => match slots.clone().try_acquire_owned() {
            Ok(slot) => {
                tokio::spawn(session::serve(stream, peer, router.clone(), slot));
            }
            Err(_) => {
                router
                    .metrics
                    .refused
                    .get_or_create(&metrics::Frontend { frontend: "pg" })
                    .inc();
                tokio::spawn(session::refuse(stream));
            }
        },
        Err(e) => tracing::warn!(error = %e, "accept failed"),
    };
    let term = crate::shutdown::signal();
    tokio::pin!(term);
    loop {
        tokio::select! {
            _ = &mut term => break,
            r = listener.accept() => accept(r),
        }
    }

    // Drain (see the drain module): out of the endpoints first, still
    // serving; then no new connections, sessions end at idle points; at
    // the deadline the rest end.
    ready.set(false);
    tracing::info!(delay = ?drain_times.delay, "router draining: readiness off, serving until the endpoints drop this pod");
    let delay = tokio::time::sleep(drain_times.delay);
    tokio::pin!(delay);
    loop {
        tokio::select! {
            _ = &mut delay => break,
            r = listener.accept() => accept(r),
        }
    }
    drop(listener);
    let _ = drain_tx.send(drain::Drain::AtIdle);
    let _ = http_stop.send(true);
    let max = cfg.max_clients.max(1);
    let sessions = || max.saturating_sub(slots.available_permits());
    let open = sessions();
    tracing::info!(sessions = open, deadline = ?drain_times.deadline, "router draining: no new connections; sessions end at their next idle point");
    let deadline = tokio::time::Instant::now() + drain_times.deadline;
    while sessions() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let left = sessions();
    if left > 0 {
        tracing::warn!(
            sessions = left,
            "drain deadline: ending sessions still inside a transaction (57P01)"
        );
        let _ = drain_tx.send(drain::Drain::Now);
        let until = tokio::time::Instant::now() + Duration::from_secs(2);
        while sessions() > 0 && tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let http_left = deadline.saturating_duration_since(tokio::time::Instant::now());
    if tokio::time::timeout(http_left.max(Duration::from_secs(1)), http_task)
        .await
        .is_err()
    {
        tracing::warn!("drain deadline: HTTP requests still running are ended");
    }
    tracing::info!(sessions = open, left, "router drained; exiting");
    Ok(0)
}
