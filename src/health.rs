//! The endpoints every role serves on its metrics port: `/healthz` (the
//! process is alive), `/readyz` (it should receive traffic) and `/metrics`
//! (Prometheus, OpenMetrics text, with the role's own metrics and
//! `shardpool_runtime_workers`, the threads running its tasks).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Readiness flag shared between a role and its probe endpoint.
#[derive(Debug, Clone, Default)]
pub struct Ready(Arc<AtomicBool>);

impl Ready {
    /// Sets readiness.
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Relaxed);
    }

    /// Current readiness.
    pub fn get(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

async fn readyz(State(ready): State<Ready>) -> (StatusCode, &'static str) {
    if ready.get() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

async fn metrics(State(registry): State<Arc<Registry>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        crate::metrics::encode(&registry),
    )
}

/// Serves the probes and metrics on `addr` until `shutdown` resolves.
pub async fn serve(
    addr: SocketAddr,
    ready: Ready,
    mut registry: Registry,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let workers = Gauge::<i64>::default();
    workers.set(
        i64::try_from(tokio::runtime::Handle::current().metrics().num_workers())
            .unwrap_or(i64::MAX),
    );
    registry.register(
        "shardpool_runtime_workers",
        "Threads running this process's tasks (SHARDPOOL_WORKER_THREADS; 1 = one thread)",
        workers,
    );
    let registry = Arc::new(registry);
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(ready)
        .merge(
            Router::new()
                .route("/metrics", get(metrics))
                .with_state(registry),
        );
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}
