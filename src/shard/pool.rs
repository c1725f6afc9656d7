//! One source's pool: deadpool managing raw [`ServerConn`]s, kept warm at
//! `minIdle`, trimmed after `idleTimeout`, renewed after `maxLifetime`.
//!
//! Storm control: every connection attempt of the shard first takes a
//! permit of one shard-wide semaphore, so a shard taking over a thousand
//! sources opens at most that many connections at a time.
//!
//! Lock discipline: `password` is a std RwLock held only to clone the
//! string; `health` is a std Mutex held only to read or replace it. Neither
//! is held across an await.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use deadpool::managed::{self, Metrics, RecycleError, RecycleResult};
use tokio::sync::Semaphore;

use super::server::{ConnectError, ConnectParams, ServerConn};

/// Pool settings of one source, from its spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolSettings {
    /// Connections kept open.
    pub min_idle: usize,
    /// Most connections.
    pub max_size: usize,
    /// Bound on one connection attempt.
    pub connect_timeout: Duration,
    /// Bound on waiting for a free connection.
    pub acquire_timeout: Duration,
    /// Idle connections above min_idle are closed after this.
    pub idle_timeout: Duration,
    /// Connections are replaced after this.
    pub max_lifetime: Duration,
}

/// Opens server connections for one source.
pub struct Manager {
    params: ConnectParams,
    settings: PoolSettings,
    /// The current password; replaced when its Secret changes, so new
    /// connections use it while open ones carry on.
    password: RwLock<String>,
    /// Shard-wide limit on concurrent connection attempts.
    connect_limit: Arc<Semaphore>,
    /// Outcome of the latest attempt, for status and backoff.
    health: Mutex<Health>,
    /// Successful connection attempts (metrics).
    connects_ok: AtomicU64,
    /// Failed connection attempts (metrics).
    connects_failed: AtomicU64,
}

/// Recent connection outcome of a source.
#[derive(Debug, Clone, Default)]
pub struct Health {
    /// The last attempt's error, secret-free; None after a success.
    pub last_error: Option<String>,
    /// Consecutive failures.
    pub failures: u32,
    /// When the last attempt failed.
    pub failed_at: Option<Instant>,
}

impl std::fmt::Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manager")
            .field("params", &self.params)
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Manager {
    /// A manager for one source.
    pub fn new(
        params: ConnectParams,
        settings: PoolSettings,
        password: String,
        connect_limit: Arc<Semaphore>,
    ) -> Self {
        Manager {
            params,
            settings,
            password: RwLock::new(password),
            connect_limit,
            health: Mutex::default(),
            connects_ok: AtomicU64::new(0),
            connects_failed: AtomicU64::new(0),
        }
    }

    /// Connection attempts so far: (succeeded, failed).
    pub fn connects(&self) -> (u64, u64) {
        (
            self.connects_ok.load(Ordering::Relaxed),
            self.connects_failed.load(Ordering::Relaxed),
        )
    }

    /// Uses `password` for connections opened from now on.
    pub fn set_password(&self, password: String) {
        if let Ok(mut p) = self.password.write() {
            *p = password;
        }
    }

    /// Recent connection outcome.
    pub fn health(&self) -> Health {
        self.health.lock().map(|h| h.clone()).unwrap_or_default()
    }

    /// The connection parameters (host, database, application_name, ...).
    pub fn params(&self) -> &ConnectParams {
        &self.params
    }

    fn record(&self, result: &Result<ServerConn, ConnectError>) {
        match result {
            Ok(_) => self.connects_ok.fetch_add(1, Ordering::Relaxed),
            Err(_) => self.connects_failed.fetch_add(1, Ordering::Relaxed),
        };
        if let Ok(mut h) = self.health.lock() {
            match result {
                Ok(_) => *h = Health::default(),
                Err(e) => {
                    h.last_error = Some(e.to_string());
                    h.failures = h.failures.saturating_add(1);
                    h.failed_at = Some(Instant::now());
                }
            }
        }
    }
}

impl managed::Manager for Manager {
    type Type = ServerConn;
    type Error = ConnectError;

    async fn create(&self) -> Result<ServerConn, ConnectError> {
        let _permit = self
            .connect_limit
            .acquire()
            .await
            .map_err(|_| ConnectError::Protocol("shard is shutting down".into()))?;
        let password = self.password.read().map(|p| p.clone()).unwrap_or_default();
        let result = match tokio::time::timeout(
            self.settings.connect_timeout,
            ServerConn::connect(&self.params, &password),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(ConnectError::Timeout),
        };
        self.record(&result);
        result
    }

    async fn recycle(&self, conn: &mut ServerConn, _: &Metrics) -> RecycleResult<ConnectError> {
        if !conn.idle_and_alive() {
            return Err(RecycleError::message(
                "connection closed or in an unknown state",
            ));
        }
        if conn.created.elapsed() > self.settings.max_lifetime {
            return Err(RecycleError::message("max lifetime reached"));
        }
        Ok(())
    }
}

/// The deadpool pool type of one source.
pub type Pool = managed::Pool<Manager>;

/// A checked-out connection; returned to the pool on drop.
pub type Conn = managed::Object<Manager>;

/// Builds a source's pool (opens nothing yet; see [`maintain`]).
pub fn build(manager: Manager) -> Result<Pool, managed::BuildError> {
    let s = manager.settings.clone();
    Pool::builder(manager)
        .max_size(s.max_size.max(1))
        .wait_timeout(Some(s.acquire_timeout))
        .create_timeout(Some(s.connect_timeout + Duration::from_secs(1)))
        .recycle_timeout(Some(Duration::from_secs(5)))
        // The most recently returned connection goes out first (as in
        // PgBouncer): a light load keeps reusing one warm server backend,
        // and connections a burst opened stay idle long enough to be
        // trimmed after idleTimeout. Round-robin would touch them all.
        .queue_mode(managed::QueueMode::Lifo)
        .runtime(deadpool::Runtime::Tokio1)
        .build()
}

/// One maintenance pass: drop idle connections past idleTimeout (keeping
/// minIdle) or maxLifetime, then open connections up to minIdle. Returns
/// how many were opened. Backs off while the source keeps failing.
pub async fn maintain(pool: &Pool) -> usize {
    let manager = pool.manager();
    let s = manager.settings.clone();
    // Trim: retain sees only idle connections. Recently used ones stay and
    // count towards minIdle; stale ones stay only to make up minIdle.
    let usable =
        |conn: &ServerConn| conn.created.elapsed() <= s.max_lifetime && conn.idle_and_alive();
    let mut fresh = 0usize;
    // A retain that keeps everything: deadpool's only look at idle objects.
    pool.retain(|conn, m| {
        if usable(conn) && m.last_used() <= s.idle_timeout {
            fresh += 1;
        }
        true
    });
    let mut stale_quota = s.min_idle.saturating_sub(fresh);
    let removed = pool.retain(|conn, m| {
        if !usable(conn) {
            return false;
        }
        if m.last_used() <= s.idle_timeout {
            return true;
        }
        if stale_quota > 0 {
            stale_quota -= 1;
            return true;
        }
        false
    });
    for conn in removed.removed {
        tokio::spawn(conn.terminate());
    }
    let h = manager.health();
    if let Some(at) = h.failed_at {
        let backoff = Duration::from_millis(500u64.saturating_mul(1 << h.failures.min(6)));
        if at.elapsed() < backoff.min(Duration::from_secs(30)) {
            return 0;
        }
    }
    let status = pool.status();
    let missing = s.min_idle.min(s.max_size).saturating_sub(status.size);
    if missing == 0 {
        return 0;
    }
    // Holding every idle object plus `missing` more at once forces the pool
    // to open exactly the missing ones (briefly holding the idle ones).
    let want = status.available + missing;
    let mut held = Vec::with_capacity(want);
    let gets = (0..want).map(|_| pool.get());
    held.extend(futures::future::join_all(gets).await.into_iter().flatten());
    held.len().saturating_sub(status.available)
}

/// Current counts: (open, idle, in use).
pub fn counts(pool: &Pool) -> (usize, usize, usize) {
    let s = pool.status();
    (s.size, s.available, s.size.saturating_sub(s.available))
}
