//! One source's pool: deadpool managing raw [`ServerConn`]s, kept warm at
//! `minIdle`, trimmed after `idleTimeout`, renewed after `maxLifetime`.
//!
//! Storm control: every connection attempt of the shard first takes a
//! permit of one shard-wide semaphore, so a shard taking over a thousand
//! sources opens at most that many connections at a time.
//!
//! Fencing: a connection is opened only while the shard's Lease claim is
//! valid ([`Validity`]), checked before and again after connecting; and the
//! first connection of a pool first ends every backend of the source that
//! another shard process opened ([`super::fence`]). Other creators wait for
//! that on `fence_lock` before they connect.
//!
//! Lock discipline: `password` is a std RwLock held only to clone the
//! string; `health` is a std Mutex held only to read or replace it. Neither
//! is held across an await. `fence_lock` is a tokio Mutex held across the
//! first connection's connect and fencing, and only until `fenced` is set.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use deadpool::managed::{self, Metrics, RecycleError, RecycleResult};

use super::connect_limit::{ConnectLimit, Purpose, Slot};
use super::fence;
use super::scram::KeyCache;
use super::server::{ConnectError, ConnectParams, ServerConn};
use crate::crd::Fencing;
use crate::lease::Validity;

/// Longest wait for a previous owner's backends to disappear after they
/// were told to terminate.
const FENCE_WAIT: Duration = Duration::from_secs(5);

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
    /// The server-side statement_timeout, when set: a server that has not
    /// answered a request for this long (plus a grace) is unreachable.
    pub statement_timeout: Option<Duration>,
}

/// Opens server connections for one source.
pub struct Manager {
    params: ConnectParams,
    settings: PoolSettings,
    /// The current password; replaced when its Secret changes, so new
    /// connections use it while open ones carry on.
    password: RwLock<String>,
    /// Shard-wide limit on concurrent connection attempts.
    connect_limit: Arc<ConnectLimit>,
    /// A connection [`maintain`] opened outside the pool, waiting for the
    /// pool's next create to take it (see [`maintain_with`]). Lock held
    /// only to put or take.
    stash: Mutex<Option<ServerConn>>,
    /// The shard's Lease claim: no connection is opened without it.
    validity: Validity,
    /// Whether to end other shard processes' backends before the first
    /// connection, and what they start with.
    fencing: Fencing,
    /// `application_name` prefix shared by every shard process's
    /// connections of this source.
    fence_prefix: String,
    /// Set once this pool has fenced the source (or fencing is disabled).
    fenced: AtomicBool,
    /// Held by the one creator that fences; the others wait on it before
    /// connecting. See the module's lock discipline.
    fence_lock: tokio::sync::Mutex<()>,
    /// Set when the source is being closed: no connection is opened.
    closing: AtomicBool,
    /// Connection attempts under way (a drain waits for them to end).
    opening: AtomicUsize,
    /// Set once the pool first held minIdle connections and its size cap
    /// was lifted to maxSize (see [`warm_up_cap`]).
    warm: AtomicBool,
    /// When a connection past its lifetime was last closed for renewal
    /// (milliseconds from `origin`, 0: never): renewals of one pool are
    /// [`RENEW_SPACING`] apart, whichever path (maintenance or checkout)
    /// closes them. Compare-and-swap only, no lock.
    renewed_at_ms: AtomicU64,
    /// Time origin of `renewed_at_ms`.
    origin: Instant,
    /// SCRAM keys derived from the password, for every connection of the
    /// source (see [`super::scram`]).
    scram_keys: KeyCache,
    /// Outcome of the latest attempt, for status and backoff.
    health: Mutex<Health>,
    /// Successful connection attempts (metrics).
    connects_ok: AtomicU64,
    /// Failed connection attempts (metrics).
    connects_failed: AtomicU64,
    /// Backends of other shard processes this pool ended (metrics).
    fenced_backends: AtomicU64,
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
    /// The last failure was fencing (the warehouse refused or the previous
    /// owner's backends lingered), not the connection itself.
    pub fencing: bool,
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
    /// A manager for one source. `fence_prefix` is what every shard
    /// process's connections of the source start their application_name
    /// with (see [`fence::identity`]).
    pub fn new(
        params: ConnectParams,
        settings: PoolSettings,
        password: String,
        connect_limit: Arc<ConnectLimit>,
    ) -> Self {
        Manager {
            params,
            settings,
            password: RwLock::new(password),
            connect_limit,
            stash: Mutex::default(),
            validity: Validity::always(),
            fencing: Fencing::Disabled,
            fence_prefix: String::new(),
            fenced: AtomicBool::new(true),
            fence_lock: tokio::sync::Mutex::new(()),
            closing: AtomicBool::new(false),
            opening: AtomicUsize::new(0),
            warm: AtomicBool::new(false),
            renewed_at_ms: AtomicU64::new(0),
            origin: Instant::now(),
            scram_keys: KeyCache::default(),
            health: Mutex::default(),
            connects_ok: AtomicU64::new(0),
            connects_failed: AtomicU64::new(0),
            fenced_backends: AtomicU64::new(0),
        }
    }

    /// Opens connections only while `validity` allows it.
    pub fn with_validity(mut self, validity: Validity) -> Self {
        self.validity = validity;
        self
    }

    /// Fences the source by the database before its first connection:
    /// `prefix` is the application_name prefix of every shard process's
    /// connections of the source.
    pub fn with_fencing(mut self, fencing: Fencing, prefix: String) -> Self {
        self.fenced = AtomicBool::new(fencing == Fencing::Disabled);
        self.fencing = fencing;
        self.fence_prefix = prefix;
        self
    }

    /// The pool settings.
    pub fn settings(&self) -> &PoolSettings {
        &self.settings
    }

    /// Whether the shard's Lease claim currently allows opening connections.
    pub fn may_open(&self) -> bool {
        self.validity.may_act() && !self.closing.load(Ordering::Acquire)
    }

    /// Opens no more connections (the source is being closed).
    pub fn close(&self) {
        self.closing.store(true, Ordering::Release);
    }

    /// The application_name of the pool's connections.
    pub fn application_name(&self) -> &str {
        &self.params.application_name
    }

    /// Connection attempts under way, and a connection opened but not in
    /// the pool yet (a drain waits for both).
    pub fn opening(&self) -> usize {
        let stashed = self.stash.lock().map(|s| s.is_some()).unwrap_or(true);
        self.opening.load(Ordering::Acquire) + usize::from(stashed)
    }

    /// Backends of earlier owners this pool ended.
    pub fn fenced_backends(&self) -> u64 {
        self.fenced_backends.load(Ordering::Relaxed)
    }

    /// Records a failure seen on an open connection (the warehouse stopped
    /// answering), so status and backoff see it.
    pub fn record_failure(&self, message: String) {
        if let Ok(mut h) = self.health.lock() {
            h.last_error = Some(message);
            h.failures = h.failures.saturating_add(1);
            h.failed_at = Some(Instant::now());
            h.fencing = false;
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

    /// Takes the pool's renewal turn: true when no connection was closed
    /// for renewal in the last [`RENEW_SPACING`] (the caller closes one).
    fn may_renew(&self) -> bool {
        let now = u64::try_from(self.origin.elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let last = self.renewed_at_ms.load(Ordering::Acquire);
        let spacing = u64::try_from(RENEW_SPACING.as_millis()).unwrap_or(u64::MAX);
        if last != 0 && now.saturating_sub(last) < spacing {
            return false;
        }
        self.renewed_at_ms
            .compare_exchange(last, now, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Whether the pool has held minIdle connections since it was built
    /// (a pool refilling after a connection ended stays warm).
    pub fn is_warm(&self) -> bool {
        self.warm.load(Ordering::Acquire)
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
                    h.fencing = matches!(e, ConnectError::Fence(_));
                }
            }
        }
    }

    /// Connects (bounded by connectTimeout, under the shard-wide limit:
    /// in `slot`, or in a demand slot when None).
    async fn connect(&self, slot: Option<Slot>) -> Result<ServerConn, ConnectError> {
        self.connect_with(&self.params, slot).await
    }

    /// Connects with `params` (the source's, or the fencing name's).
    async fn connect_with(
        &self,
        params: &ConnectParams,
        slot: Option<Slot>,
    ) -> Result<ServerConn, ConnectError> {
        let _slot = match slot {
            Some(slot) => slot,
            None => self
                .connect_limit
                .acquire(Purpose::Demand)
                .await
                .map_err(|_| ConnectError::Closed)?,
        };
        let password = self.password.read().map(|p| p.clone()).unwrap_or_default();
        match tokio::time::timeout(
            self.settings.connect_timeout,
            ServerConn::connect_with_keys(params, &password, &self.scram_keys),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(ConnectError::Timeout),
        }
    }

    /// The first connection of this process: opened under a name outside
    /// every source's application_name pattern, it ends the predecessors'
    /// backends, and takes the pool's name only once they are gone, so no
    /// moment shows the source's backends under two owners.
    async fn connect_and_fence(&self, slot: Option<Slot>) -> Result<ServerConn, ConnectError> {
        let began = Instant::now();
        let mut params = self.params.clone();
        params.application_name = fence::fencing_name(&self.params.application_name);
        let mut conn = self.connect_with(&params, slot).await?;
        let named = match self.fence(&mut conn).await {
            Ok(()) => {
                let sql = format!(
                    "SET application_name = {}",
                    fence::literal(&self.params.application_name)
                );
                tokio::time::timeout(self.settings.connect_timeout, conn.query(&sql))
                    .await
                    .map_err(|_| ConnectError::Timeout)
                    .and_then(|r| r.map_err(|e| ConnectError::Protocol(e.to_string())))
            }
            Err(e) => Err(e),
        };
        match named {
            Ok(_) => {
                // Once per pool: the moment a moved source serves again.
                tracing::info!(
                    application_name = %self.params.application_name,
                    ms = u64::try_from(began.elapsed().as_millis()).unwrap_or(u64::MAX),
                    "fenced; first connection open"
                );
                Ok(conn)
            }
            Err(e) => {
                tokio::spawn(conn.terminate());
                Err(e)
            }
        }
    }

    /// Ends other shard processes' backends of the source, over `conn`.
    async fn fence(&self, conn: &mut ServerConn) -> Result<(), ConnectError> {
        let id = fence::Identity {
            application_name: self.params.application_name.clone(),
            prefix: self.fence_prefix.clone(),
        };
        let bound = self.settings.connect_timeout + FENCE_WAIT;
        let ended = tokio::time::timeout(bound, fence::fence(conn, &id, FENCE_WAIT))
            .await
            .map_err(|_| {
                ConnectError::Fence(fence::FenceError::Io(format!("no answer within {bound:?}")))
            })?
            .map_err(ConnectError::Fence)?;
        if ended > 0 {
            self.fenced_backends
                .fetch_add(u64::try_from(ended).unwrap_or(u64::MAX), Ordering::Relaxed);
            tracing::warn!(
                application_name = %self.params.application_name,
                ended,
                "fenced: ended server connections another shard process still held for this source"
            );
        }
        self.fenced.store(true, Ordering::Release);
        Ok(())
    }
}

impl Manager {
    /// Opens one connection for the pool (fencing first if no connection
    /// of this process did yet), in `slot` of the connect limit or, when
    /// None, in a demand slot.
    pub async fn open(&self, slot: Option<Slot>) -> Result<ServerConn, ConnectError> {
        let _opening = Opening::new(&self.opening);
        tracing::debug!(
            application_name = %self.params.application_name,
            demand = slot.is_none(),
            opening = self.opening.load(Ordering::Relaxed),
            "opening a server connection"
        );
        if self.closing.load(Ordering::Acquire) {
            return Err(ConnectError::Closed);
        }
        if !self.validity.may_act() {
            return Err(ConnectError::NoLease);
        }
        // The first creator fences; the others wait for it before they
        // connect, so no connection of ours exists beside a predecessor's.
        let fencer = if self.fenced.load(Ordering::Acquire) {
            None
        } else {
            let guard = self.fence_lock.lock().await;
            (!self.fenced.load(Ordering::Acquire)).then_some(guard)
        };
        let result = match fencer {
            None => self.connect(slot).await,
            Some(_) => self.connect_and_fence(slot).await,
        };
        drop(fencer);
        // The claim may have lapsed while connecting: open nothing then.
        if result.is_ok() && (!self.validity.may_act() || self.closing.load(Ordering::Acquire)) {
            if let Ok(conn) = result {
                tokio::spawn(conn.terminate());
            }
            return Err(ConnectError::NoLease);
        }
        self.record(&result);
        result.map(|mut conn| {
            conn.retire_at = retire_at(conn.created, self.settings.max_lifetime);
            conn
        })
    }
}

/// Counts a connection attempt as under way while it lives.
struct Opening<'a>(&'a AtomicUsize);

impl<'a> Opening<'a> {
    fn new(n: &'a AtomicUsize) -> Self {
        n.fetch_add(1, Ordering::AcqRel);
        Opening(n)
    }
}

impl Drop for Opening<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl managed::Manager for Manager {
    type Type = ServerConn;
    type Error = ConnectError;

    async fn create(&self) -> Result<ServerConn, ConnectError> {
        let stashed = self.stash.lock().ok().and_then(|mut s| s.take());
        match stashed {
            Some(conn) if !self.closing.load(Ordering::Acquire) => Ok(conn),
            Some(conn) => {
                tokio::spawn(conn.terminate());
                Err(ConnectError::Closed)
            }
            None => self.open(None).await,
        }
    }

    async fn recycle(&self, conn: &mut ServerConn, _: &Metrics) -> RecycleResult<ConnectError> {
        if !conn.idle_and_alive() {
            tracing::debug!(application_name = %self.params.application_name, broken = conn.is_broken(), "a checkout found an idle connection closed or unreadable; replaced");
            return Err(RecycleError::message(
                "connection closed or in an unknown state",
            ));
        }
        if conn.expired(Instant::now()) && self.may_renew() {
            return Err(RecycleError::message("max lifetime reached"));
        }
        Ok(())
    }
}

/// The deadpool pool type of one source.
pub type Pool = managed::Pool<Manager>;

/// A checked-out connection; returned to the pool on drop.
pub type Conn = managed::Object<Manager>;

/// The size a pool is capped at until it first holds minIdle connections:
/// queries that arrive while it warms (a handover under load) wait for the
/// warming connections instead of opening more, so the warehouse sees at
/// most minIdle connections of the source until its demand needs more.
fn warm_up_cap(s: &PoolSettings) -> usize {
    match s.min_idle {
        0 => s.max_size,
        n => n.min(s.max_size),
    }
    .max(1)
}

/// Lifts the warm-up cap once the pool holds minIdle connections: from
/// then on demand may grow it to maxSize. Checkouts call it first (hot
/// path: one atomic load once warm).
pub fn lift_cap_when_warm(pool: &Pool) {
    let m = pool.manager();
    if m.warm.load(Ordering::Acquire) {
        return;
    }
    let s = &m.settings;
    if pool.status().size >= s.min_idle.min(s.max_size) {
        m.warm.store(true, Ordering::Release);
        let max = s.max_size.max(1);
        if pool.status().max_size < max {
            pool.resize(max);
        }
    }
}

/// Builds a source's pool (opens nothing yet; see [`maintain`]), capped
/// at minIdle until warm (see [`warm_up_cap`]).
pub fn build(manager: Manager) -> Result<Pool, managed::BuildError> {
    let s = manager.settings.clone();
    Pool::builder(manager)
        .max_size(warm_up_cap(&s))
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

/// The part of maxLifetime by which a connection's renewal may come early,
/// at random: a tenth.
const LIFETIME_SPREAD: u32 = 10;

/// When a connection opened at `created` is renewed: maxLifetime less a
/// random part of up to a tenth of it, so that the connections a warm-up
/// or a handover opened together are not all renewed together (6,000
/// sources warmed in the same minutes would otherwise reconnect 72,000
/// times in the same minutes an hour later).
pub fn retire_at(created: Instant, lifetime: Duration) -> Option<Instant> {
    let early = (lifetime / LIFETIME_SPREAD).mul_f64(rand::random::<f64>());
    created.checked_add(lifetime.saturating_sub(early))
}

/// Least time between two renewals of one pool's connections: renewal
/// goes one connection at a time, and the maintenance tick (500 ms)
/// replaces each before the next goes, so a pool is never more than one
/// below minIdle for it. A connection past its lifetime waits for its
/// turn (still serving); a pool renews at most one connection a second.
pub const RENEW_SPACING: Duration = Duration::from_secs(1);

/// One maintenance pass: drop idle connections that broke or sat past
/// idleTimeout (keeping minIdle), renew one past its lifetime when it is
/// the pool's turn ([`RENEW_SPACING`]), then open connections up to
/// minIdle. Returns how many were opened. Backs off while the source
/// keeps failing.
pub async fn maintain(pool: &Pool) -> usize {
    maintain_with(pool, true).await
}

/// [`maintain`], asking each idle connection's socket whether the server
/// closed it only when `probe` (one system call per idle connection: at
/// thousands of them, shards call this every 500 ms with `probe` every
/// fourth time; a checkout asks the socket of the connection it takes in
/// any case).
pub async fn maintain_with(pool: &Pool, probe: bool) -> usize {
    let manager = pool.manager();
    let s = manager.settings.clone();
    let now = Instant::now();
    // Each idle connection's socket is asked at most once per pass.
    let mut dead: Vec<i32> = Vec::new();
    let mut alive = |conn: &ServerConn| {
        let ok = if probe {
            conn.idle_and_alive()
        } else {
            conn.idle_unbroken()
        };
        if !ok {
            dead.push(conn.backend_pid);
        }
        ok
    };
    let mut fresh = 0usize;
    // The idle connection longest past its renewal time: renewed first.
    let mut overdue: Option<(Instant, i32)> = None;
    // A retain that keeps everything: deadpool's only look at idle objects.
    // Trim: retain sees only idle connections. Recently used ones stay and
    // count towards minIdle; stale ones stay only to make up minIdle.
    pool.retain(|conn, m| {
        let usable = alive(conn) && !conn.expired(now);
        if usable && m.last_used() <= s.idle_timeout {
            fresh += 1;
        }
        if let Some(at) = conn.retire_at.filter(|_| conn.expired(now)) {
            if overdue.is_none_or(|(o, _)| at < o) {
                overdue = Some((at, conn.backend_pid));
            }
        }
        true
    });
    let mut stale_quota = s.min_idle.saturating_sub(fresh);
    let removed = pool.retain(|conn, m| {
        if !conn.idle_unbroken() || dead.contains(&conn.backend_pid) {
            tracing::debug!(
                application_name = %manager.params.application_name,
                broken = conn.is_broken(),
                unread = !conn.idle_unbroken() && !conn.is_broken(),
                "an idle connection was closed by its server, ended by the kernel (keepalive unanswered) or broke; dropped"
            );
            return false;
        }
        if m.last_used() > s.idle_timeout {
            if stale_quota == 0 {
                // Idle too long and not needed for minIdle: trimmed.
                tracing::debug!(application_name = %manager.params.application_name, "an idle connection past idleTimeout trimmed");
                return false;
            }
            stale_quota -= 1;
        }
        if conn.expired(now) {
            // Past its lifetime: the most overdue one is closed (and
            // replaced below) when it is the pool's turn to renew; the
            // others keep serving until a later turn.
            let first = overdue.is_some_and(|(_, pid)| pid == conn.backend_pid);
            return !(first && manager.may_renew());
        }
        true
    });
    for conn in removed.removed {
        tokio::spawn(conn.terminate());
    }
    if !manager.may_open() {
        return 0;
    }
    let h = manager.health();
    if let Some(at) = h.failed_at {
        if at.elapsed() < backoff(h.failures) {
            return 0;
        }
    }
    let target = s.min_idle.min(s.max_size);
    // Until the pool is first warm, one connection per pass: a shard that
    // takes over thousands of sources gives every one its first connection
    // before any gets its second (passes run back to back while warming).
    let budget = if manager.warm.load(Ordering::Acquire) {
        target
    } else {
        1
    };
    let mut opened = 0;
    while opened < budget {
        let status = pool.status();
        if status.size >= target {
            break;
        }
        // Queue for a warm-up slot holding nothing of the pool, so its
        // idle connections keep serving while this waits.
        let Ok(slot) = manager.connect_limit.acquire(Purpose::Warm).await else {
            break;
        };
        let status = pool.status();
        if status.size >= target || !manager.may_open() {
            break;
        }
        // Connect outside the pool, so that its idle connections keep
        // serving meanwhile. (Holding them for the connect, as the refill
        // once did, made every query that came meanwhile open a connection
        // of its own: pools of 13-14 at minIdle 12 under load.)
        let Ok(conn) = manager.open(Some(slot)).await else {
            break;
        };
        // Then hand it to the pool: take every idle connection plus one
        // more, whose create takes the stashed connection. Nothing in this
        // waits (idle objects and the stash are at hand), and it runs
        // unconstrained by the runtime's cooperative budget, so on the
        // shard's one runtime thread no query gets in between; the idle
        // connections go back at once.
        let status = pool.status();
        if status.size >= target {
            // A query's own connect made up the shortfall meanwhile.
            tokio::spawn(conn.terminate());
            break;
        }
        if let Ok(mut stash) = manager.stash.lock() {
            *stash = Some(conn);
        }
        let want = status.available + 1;
        let gets = (0..want).map(|_| pool.get());
        let held: Vec<Conn> = tokio::task::unconstrained(futures::future::join_all(gets))
            .await
            .into_iter()
            .flatten()
            .collect();
        let unused = manager.stash.lock().ok().and_then(|mut s| s.take());
        drop(held);
        if let Some(conn) = unused {
            // Not taken (the pool was closed, or a connection came back).
            tokio::spawn(conn.terminate());
            break;
        }
        opened += 1;
    }
    lift_cap_when_warm(pool);
    opened
}

/// How long warming waits after `failures` failed attempts in a row: 250 ms
/// doubling to at most 2 s, so a warehouse back from a restart or a network
/// fault is warm again within seconds (attempts are bounded shard-wide by
/// the connect limit whatever this is).
pub fn backoff(failures: u32) -> Duration {
    Duration::from_millis(250u64.saturating_mul(1 << failures.min(3)))
}

/// Takes out of the pool the idle connections beyond `wanted` open ones
/// (idle or in use), for the caller to close; the most recently used stay
/// (the warmest backends, next in line under LIFO). Connections in use are
/// never taken.
pub fn take_idle_beyond(pool: &Pool, wanted: usize) -> Vec<ServerConn> {
    let (open, idle, _) = counts(pool);
    let mut surplus = open.saturating_sub(wanted).min(idle);
    // Oldest returned first in the queue: those go.
    pool.retain(|_, _| {
        let keep = surplus == 0;
        surplus = surplus.saturating_sub(1);
        keep
    })
    .removed
}

/// Current counts: (open, idle, in use).
pub fn counts(pool: &Pool) -> (usize, usize, usize) {
    let s = pool.status();
    (s.size, s.available, s.size.saturating_sub(s.available))
}
