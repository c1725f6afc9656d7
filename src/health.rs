//! The endpoints every role serves on its metrics port: `/healthz` (the
//! process is alive and its runtime makes progress), `/readyz` (it should
//! receive traffic) and `/metrics` (Prometheus, OpenMetrics text, with the
//! role's own metrics and `shardpool_runtime_workers`, the threads running
//! its tasks).
//!
//! They are served by a thread of their own with a one-thread runtime, not
//! by the role's runtime: a shard whose runtime is saturated (releasing or
//! warming thousands of sources on one worker thread while the host's CPU
//! is taken) still answers its probes, so the liveness probe does not kill
//! a busy process and throw its pools away. What liveness checks instead is
//! progress: a heartbeat task on the role's runtime stamps the time every
//! 250 ms, and `/healthz` fails once no stamp came for [`STALL_LIMIT`] (a
//! runtime wedged by a task that never yields). A frozen process (SIGSTOP)
//! answers nothing at all, as before.
//!
//! The heartbeat also measures how late it ran (`shardpool_runtime_lag_seconds`,
//! a histogram) and logs a warning for every beat more than
//! [`LAG_WARNING`] late: a task holding the runtime's thread delays every
//! other one (link pongs, watch events, opening pools), and this says when
//! and for how long.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

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

/// How long the role's runtime may go without running its heartbeat
/// before `/healthz` reports it stalled.
pub const STALL_LIMIT: Duration = Duration::from_secs(10);

/// How often the heartbeat stamps the time.
const BEAT_EVERY: Duration = Duration::from_millis(250);

/// A beat this late is logged as a warning.
pub const LAG_WARNING: Duration = Duration::from_millis(1000);

/// The last time the role's runtime ran its heartbeat task.
#[derive(Debug, Clone)]
struct Heartbeat {
    origin: Instant,
    /// Milliseconds from `origin` to the latest beat; written by the
    /// heartbeat task on the role's runtime, read by the probe thread.
    last_ms: Arc<AtomicU64>,
    limit: Duration,
}

impl Heartbeat {
    fn since_last(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.origin.elapsed().saturating_sub(last)
    }
}

async fn healthz(State(beat): State<Heartbeat>) -> (StatusCode, String) {
    let quiet = beat.since_last();
    if quiet > beat.limit {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "runtime stalled: no progress for {:.1}s\n",
                quiet.as_secs_f64()
            ),
        )
    } else {
        (StatusCode::OK, "ok\n".into())
    }
}

/// Starts the probes and metrics on `addr`, on their own thread, until
/// `shutdown` resolves, and the heartbeat on the current runtime. Binds
/// before returning (a taken port is an error here, not a silent process
/// without probes); returns the bound address.
pub fn spawn(
    addr: SocketAddr,
    ready: Ready,
    registry: Registry,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<SocketAddr> {
    spawn_with(addr, ready, registry, shutdown, STALL_LIMIT)
}

/// [`spawn`] with a stall limit of its own (tests).
pub fn spawn_with(
    addr: SocketAddr,
    ready: Ready,
    mut registry: Registry,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    stall_limit: Duration,
) -> std::io::Result<SocketAddr> {
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
    let lag = prometheus_client::metrics::histogram::Histogram::new([
        0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ]);
    registry.register_with_unit(
        "shardpool_runtime_lag",
        "How late the runtime ran a task due at a known time (its heartbeat, every 250 ms)",
        prometheus_client::registry::Unit::Seconds,
        lag.clone(),
    );
    let beat = Heartbeat {
        origin: Instant::now(),
        last_ms: Arc::default(),
        limit: stall_limit,
    };
    let stamp = beat.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(BEAT_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let due = every.tick().await;
            let late = due.elapsed();
            lag.observe(late.as_secs_f64());
            if late >= LAG_WARNING {
                tracing::warn!(
                    late_ms = u64::try_from(late.as_millis()).unwrap_or(u64::MAX),
                    "runtime lag: a task held the runtime's threads"
                );
            }
            let ms = u64::try_from(stamp.origin.elapsed().as_millis()).unwrap_or(u64::MAX);
            stamp.last_ms.store(ms, Ordering::Relaxed);
        }
    });
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    let bound = listener.local_addr()?;
    let registry = Arc::new(registry);
    let app = Router::new()
        .route("/healthz", get(healthz))
        .with_state(beat)
        .merge(
            Router::new()
                .route("/readyz", get(readyz))
                .with_state(ready),
        )
        .merge(
            Router::new()
                .route("/metrics", get(metrics))
                .with_state(registry),
        );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("probes".into())
        .spawn(move || {
            let served = runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener)?;
                axum::serve(listener, app)
                    .with_graceful_shutdown(shutdown)
                    .await
            });
            if let Err(e) = served {
                tracing::error!(error = %e, "probe endpoint stopped");
            }
        })?;
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// The status code of `GET path`, or None without an answer in 1 s.
    fn status(addr: SocketAddr, path: &str) -> Option<u16> {
        get(addr, path)?.split_whitespace().nth(1)?.parse().ok()
    }

    /// The whole answer to `GET path`, or None without one in 1 s.
    fn get(addr: SocketAddr, path: &str) -> Option<String> {
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        Some(out)
    }

    /// The value of one sample line of the metrics text.
    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
    }

    #[test]
    fn probes_answer_while_the_runtime_is_busy_and_fail_once_it_stalls() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let ready = Ready::default();
        ready.set(true);
        let addr = rt
            .block_on(async {
                spawn_with(
                    SocketAddr::from(([127, 0, 0, 1], 0)),
                    ready,
                    Registry::default(),
                    std::future::pending(),
                    Duration::from_millis(1500),
                )
            })
            .expect("probes");
        std::thread::sleep(Duration::from_millis(400));
        assert_eq!(status(addr, "/healthz"), Some(200));
        // A task that never yields takes the runtime's only worker for 4 s.
        rt.spawn(async { std::thread::sleep(Duration::from_secs(4)) });
        std::thread::sleep(Duration::from_millis(300));
        let asked = Instant::now();
        assert_eq!(
            status(addr, "/healthz"),
            Some(200),
            "busy, within the limit"
        );
        assert_eq!(status(addr, "/readyz"), Some(200));
        assert!(
            asked.elapsed() < Duration::from_millis(500),
            "{:?}",
            asked.elapsed()
        );
        // Past the stall limit: live no more.
        std::thread::sleep(Duration::from_millis(1700));
        assert_eq!(status(addr, "/healthz"), Some(503));
        // The task ends; the heartbeat resumes.
        std::thread::sleep(Duration::from_millis(2500));
        assert_eq!(status(addr, "/healthz"), Some(200));
        // The stall shows as one beat about 4 s late.
        let text = get(addr, "/metrics").expect("metrics");
        let all = sample(&text, "shardpool_runtime_lag_seconds_count").expect("count");
        let under =
            sample(&text, "shardpool_runtime_lag_seconds_bucket{le=\"2.5\"}").expect("bucket");
        let under_5 =
            sample(&text, "shardpool_runtime_lag_seconds_bucket{le=\"5.0\"}").expect("bucket");
        assert!(all >= 4.0, "beats before and after: {text}");
        assert_eq!(under_5 - under, 1.0, "one beat 2.5-5 s late: {text}");
        assert_eq!(all, under_5, "{text}");
    }
}
