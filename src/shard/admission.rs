//! Admission of a source's transactions to its pool: at most `capacity`
//! (the pool's maxSize) run at once; the others wait in a bounded queue
//! and are let in as transactions end. Within the queue, admission is fair
//! across client identities (start-time fair queueing: each waiting
//! transaction gets a virtual finish tag `start + 1/weight`, where `start`
//! is the later of the queue's virtual time and the tag of the client's
//! previous transaction; the smallest tag goes first), so a client with a
//! hundred queued transactions delays a client with one by about one
//! transaction. Per-client quotas (most running at once, transactions per
//! second as a token bucket) are enforced here too. The shard that owns a
//! source is its only admitter, so every limit is exact cluster-wide.
//!
//! Lock discipline: `state` is a std Mutex held only for bookkeeping
//! (never across an await); grants are oneshot sends under it. Hot path:
//! with a free slot and nobody waiting, `enter` admits under one lock and
//! one map lookup, and the permit's drop takes the lock once more.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use prometheus_client::metrics::histogram::Histogram;
use tokio::sync::oneshot;
use tokio::time::Instant;

/// A source's admission limits (from `spec.limits` and `pool.maxSize`).
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Transactions running at once: the pool's maxSize.
    pub capacity: usize,
    /// Most transactions waiting at once.
    pub max_queued: usize,
    /// A client waiting this long is told so.
    pub notice_after: Duration,
    /// Fair across client identities (true) or in arrival order.
    pub fair: bool,
    /// Most transactions of one client running at once.
    pub max_concurrent: Option<usize>,
    /// Per-client token bucket: transactions per second and bucket size.
    pub rate: Option<(f64, f64)>,
    /// Longest a statement may run before the shard cancels it.
    pub statement_timeout: Option<Duration>,
    /// Admit everything at once, without bookkeeping or per-client series
    /// (the pool alone bounds the connections): only for measuring what
    /// admission costs (bench/pgbench.sh), set by the DataSource
    /// annotation [`BYPASS_ANNOTATION`].
    pub bypass: bool,
}

/// DataSource annotation that turns admission off for the source
/// (`"true"`): a benchmark's baseline, not a setting for production.
pub const BYPASS_ANNOTATION: &str = "shardpool.dev/benchmark-bypass-admission";

impl Default for Limits {
    fn default() -> Self {
        Limits {
            capacity: 10,
            max_queued: 1000,
            notice_after: Duration::from_secs(2),
            fair: true,
            max_concurrent: None,
            rate: None,
            statement_timeout: None,
            bypass: false,
        }
    }
}

/// Who a transaction belongs to, as the router told the shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientId {
    /// The router user, or the bearer token's subject.
    pub name: Arc<str>,
    /// Its share of the source when the pool is contended (1-100).
    pub weight: u32,
}

impl ClientId {
    /// A client the router named nothing for (links older than version 5).
    pub fn anonymous() -> ClientId {
        ClientId {
            name: Arc::from("unknown"),
            weight: 1,
        }
    }
}

/// Why a transaction was not admitted. Each becomes SQLSTATE 53300 (HTTP
/// 429) with a message naming the limit.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Refused {
    /// The queue already held limits.maxQueued transactions.
    #[error("too many transactions waiting for this source: limits.maxQueued ({0}) reached")]
    QueueFull(usize),
    /// Waited pool.acquireTimeout without being admitted.
    #[error(
        "waited pool.acquireTimeout ({}) in this source's queue without a free connection{}",
        secs(.waited),
        if *.capped { format!(" (this client already ran limits.perClient.maxConcurrent = {} transactions)", .max_concurrent) } else { String::new() }
    )]
    Timeout {
        /// The wait.
        waited: Duration,
        /// Whether the client's own maxConcurrent held it back.
        capped: bool,
        /// The cap, when `capped`.
        max_concurrent: usize,
    },
    /// The client's token bucket would not refill before the deadline.
    #[error(
        "client over limits.perClient.rate ({rate}/s, burst {burst}) for this source; next transaction possible in {}",
        secs(.retry_in)
    )]
    Rate {
        /// The configured rate.
        rate: f64,
        /// The bucket size.
        burst: f64,
        /// When a token would be there.
        retry_in: Duration,
    },
}

impl Refused {
    /// Its place in [`REASONS`] and [`AdmissionStats::refused`].
    fn index(&self) -> usize {
        match self {
            Refused::QueueFull(_) => 0,
            Refused::Timeout { .. } => 1,
            Refused::Rate { .. } => 2,
        }
    }
}

/// A duration for a message: `1.2s`, `350ms`.
fn secs(d: &Duration) -> String {
    if *d >= Duration::from_secs(1) {
        format!("{:.1}s", d.as_secs_f64())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// Refusal reasons, in metric order.
pub const REASONS: [&str; 3] = ["queue_full", "timeout", "rate"];

/// A source's admission counters, read by the metrics collector.
#[derive(Debug)]
pub struct AdmissionStats {
    /// Refusals by reason, in [`REASONS`] order.
    pub refused: [AtomicU64; 3],
    /// Time from asking to admission of each admitted transaction.
    pub wait: Histogram,
    /// Transactions that had to queue (not admitted at once).
    pub queued_total: AtomicU64,
}

impl AdmissionStats {
    /// Counts a refusal and hands it back.
    fn refuse(&self, r: Refused) -> Refused {
        self.refused[r.index()].fetch_add(1, Ordering::Relaxed);
        r
    }
}

impl Default for AdmissionStats {
    fn default() -> Self {
        AdmissionStats {
            refused: Default::default(),
            wait: Histogram::new(crate::metrics::latency_buckets()),
            queued_total: AtomicU64::new(0),
        }
    }
}

/// One source's admission queue.
#[derive(Debug)]
pub struct Admission {
    /// Bookkeeping; see the module's lock discipline.
    state: Mutex<State>,
    /// Counters for the metrics endpoint.
    pub stats: AdmissionStats,
    /// limits.statement_timeout in microseconds (0: none), read once per
    /// transaction without the lock.
    ceiling_us: AtomicU64,
    /// limits.bypass, read without the lock.
    bypass: AtomicBool,
}

#[derive(Debug)]
struct State {
    limits: Limits,
    /// Admitted transactions not yet ended.
    running: usize,
    /// Tickets not yet admitted (queued or waiting for a token).
    queued: usize,
    /// Virtual time: the start tag of the last transaction admitted.
    vtime: f64,
    /// Ticket numbers, and the tags of arrival order.
    seq: u64,
    /// Clients with something running, waiting, or a bucket not yet
    /// full; idle ones until the next sweep.
    clients: HashMap<Arc<str>, Client>,
    /// Size of `clients` at which idle entries are swept.
    sweep_at: usize,
}

/// Idle client entries kept at least until the map has this many.
const SWEEP_MIN: usize = 64;

#[derive(Debug, Default)]
struct Client {
    running: usize,
    /// Live tickets (queued or waiting for a token).
    tickets: usize,
    waiters: VecDeque<Waiter>,
    /// Finish tag of the client's last queued transaction.
    last_finish: f64,
    /// Token bucket as GCRA: the theoretical arrival time of the next
    /// transaction.
    tat: Option<Instant>,
}

#[derive(Debug)]
struct Waiter {
    seq: u64,
    start: f64,
    finish: f64,
    grant: oneshot::Sender<()>,
}

/// What `enter` decided.
#[derive(Debug)]
pub enum Entry {
    /// Admitted at once.
    Admitted(Permit),
    /// Must wait: [`Ticket::admitted`] resolves when it may run.
    Queued(Ticket),
}

impl Admission {
    /// A queue with these limits.
    pub fn new(limits: Limits) -> Admission {
        Admission {
            ceiling_us: AtomicU64::new(ceiling_us(&limits)),
            bypass: AtomicBool::new(limits.bypass),
            state: Mutex::new(State {
                limits,
                running: 0,
                queued: 0,
                vtime: 0.0,
                seq: 0,
                clients: HashMap::new(),
                sweep_at: SWEEP_MIN,
            }),
            stats: AdmissionStats::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Bookkeeping is consistent at every unlock: a panic elsewhere
        // while holding it cannot leave it half-written.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Replaces the limits (a spec change); waiters are let in if the new
    /// ones allow.
    pub fn set_limits(&self, limits: Limits) {
        self.ceiling_us
            .store(ceiling_us(&limits), Ordering::Relaxed);
        self.bypass.store(limits.bypass, Ordering::Relaxed);
        let mut st = self.lock();
        st.limits = limits;
        st.dispatch();
    }

    /// Turns the bypass on or off (the annotation changed). Transactions
    /// admitted under the other setting end as they were admitted.
    pub fn set_bypass(&self, on: bool) {
        if self.bypass.swap(on, Ordering::Relaxed) != on {
            tracing::info!(
                bypass = on,
                "admission bypass changed (benchmark annotation)"
            );
        }
    }

    /// Whether admission is bypassed (see [`Limits::bypass`]).
    pub fn bypassed(&self) -> bool {
        self.bypass.load(Ordering::Relaxed)
    }

    /// limits.perClient.statementTimeout, if set.
    pub fn statement_ceiling(&self) -> Option<Duration> {
        match self.ceiling_us.load(Ordering::Relaxed) {
            0 => None,
            us => Some(Duration::from_micros(us)),
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> Limits {
        self.lock().limits.clone()
    }

    /// Transactions waiting now, and running now.
    pub fn depth(&self) -> (usize, usize) {
        let st = self.lock();
        (st.queued, st.running)
    }

    /// Asks to run one transaction of `client`, which must start by
    /// `deadline`. Refused at once when the queue is full or the client's
    /// token bucket cannot refill in time.
    pub fn enter(self: &Arc<Self>, client: &ClientId, deadline: Instant) -> Result<Entry, Refused> {
        if self.bypassed() {
            return Ok(Entry::Admitted(Permit {
                admission: None,
                client: client.name.clone(),
            }));
        }
        let now = Instant::now();
        let mut st = self.lock();
        let st = &mut *st;
        let (rate_limit, capacity, max_queued, cap) = (
            st.limits.rate,
            st.limits.capacity,
            st.limits.max_queued,
            st.limits.max_concurrent.unwrap_or(usize::MAX),
        );
        // The token bucket first: a transaction over the rate waits for its
        // token (reserved now), or is refused at once if it cannot come.
        let mut ready_at = None;
        if let Some((rate, burst)) = rate_limit {
            let interval = Duration::from_secs_f64(1.0 / rate);
            let tolerance = interval.mul_f64((burst - 1.0).max(0.0));
            let c = st.client(&client.name, now);
            let tat = c.tat.map_or(now, |t| t.max(now));
            let allowed = tat.checked_sub(tolerance).unwrap_or(now).max(now);
            if allowed > deadline {
                let retry_in = allowed - now;
                st.forget_if_idle(&client.name, now);
                return Err(self.stats.refuse(Refused::Rate {
                    rate,
                    burst,
                    retry_in,
                }));
            }
            if allowed > now {
                ready_at = Some(allowed);
            }
            // Checked below: a refusal for a full queue gives it back.
            c.tat = Some(tat + interval);
        }
        let running = st.running;
        let c = st.client(&client.name, now);
        if ready_at.is_none() && running < capacity && c.running < cap {
            c.running += 1;
            st.running += 1;
            self.stats.wait.observe(0.0);
            return Ok(Entry::Admitted(Permit {
                admission: Some(self.clone()),
                client: client.name.clone(),
            }));
        }
        if st.queued >= max_queued {
            if let (Some((rate, _)), Some(c)) = (rate_limit, st.clients.get_mut(&client.name)) {
                // The token was not used.
                if let Some(t) = c.tat.as_mut() {
                    *t -= Duration::from_secs_f64(1.0 / rate);
                }
            }
            st.forget_if_idle(&client.name, now);
            return Err(self.stats.refuse(Refused::QueueFull(max_queued)));
        }
        if let Some(c) = st.clients.get_mut(&client.name) {
            c.tickets += 1;
        }
        st.queued += 1;
        st.seq += 1;
        self.stats.queued_total.fetch_add(1, Ordering::Relaxed);
        let mut ticket = Ticket {
            admission: self.clone(),
            client: client.clone(),
            seq: st.seq,
            asked: now,
            ready_at,
            grant: None,
            done: false,
        };
        if ready_at.is_none() {
            ticket.grant = Some(st.join(&ticket));
        }
        Ok(Entry::Queued(ticket))
    }

    fn release(&self, client: &Arc<str>) {
        let mut st = self.lock();
        st.running = st.running.saturating_sub(1);
        if let Some(c) = st.clients.get_mut(client) {
            c.running = c.running.saturating_sub(1);
        }
        st.dispatch();
    }
}

fn ceiling_us(l: &Limits) -> u64 {
    l.statement_timeout.map_or(0, |d| {
        u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
    })
}

impl State {
    /// Queues `ticket`'s transaction behind the client's earlier ones and
    /// lets in whatever may run now. Returns where the grant arrives.
    fn join(&mut self, ticket: &Ticket) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        let (fair, vtime, seq) = (self.limits.fair, self.vtime, ticket.seq);
        let c = self.clients.entry(ticket.client.name.clone()).or_default();
        let (start, finish) = if fair {
            let start = vtime.max(c.last_finish);
            (start, start + 1.0 / f64::from(ticket.client.weight.max(1)))
        } else {
            (seq as f64, seq as f64)
        };
        c.last_finish = finish;
        c.waiters.push_back(Waiter {
            seq,
            start,
            finish,
            grant: tx,
        });
        self.dispatch();
        rx
    }

    /// Admits waiting transactions while there is room: each time the
    /// smallest finish tag among clients below their own cap.
    fn dispatch(&mut self) {
        let cap = self.limits.max_concurrent.unwrap_or(usize::MAX);
        while self.running < self.limits.capacity {
            let next = self
                .clients
                .iter()
                .filter(|(_, c)| c.running < cap)
                .filter_map(|(k, c)| c.waiters.front().map(|w| (w.finish, w.seq, k)))
                .min_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)))
                .map(|(_, _, k)| k.clone());
            let Some(key) = next else { break };
            let Some(c) = self.clients.get_mut(&key) else {
                break;
            };
            let Some(w) = c.waiters.pop_front() else {
                break;
            };
            // The ticket holds its receiver until it is dropped, and its
            // drop takes the waiter out under this lock first: the send
            // cannot fail. Were it to, the slot stays free.
            if w.grant.send(()).is_ok() {
                c.running += 1;
                c.tickets = c.tickets.saturating_sub(1);
                self.running += 1;
                self.queued = self.queued.saturating_sub(1);
                if self.limits.fair {
                    self.vtime = self.vtime.max(w.start);
                }
            }
        }
    }

    /// The entry of `client`, made when missing. Idle entries are kept
    /// (no map insert and remove per transaction on the hot path) and
    /// swept once the map has doubled since the last sweep.
    fn client(&mut self, client: &Arc<str>, now: Instant) -> &mut Client {
        if !self.clients.contains_key(client) {
            if self.clients.len() >= self.sweep_at {
                self.clients.retain(|_, c| {
                    c.running > 0 || c.tickets > 0 || c.tat.is_some_and(|t| t > now)
                });
                self.sweep_at = (2 * self.clients.len()).max(SWEEP_MIN);
            }
            self.clients.insert(client.clone(), Client::default());
        }
        self.clients.entry(client.clone()).or_default()
    }

    /// Drops a client's entry once nothing of it is left (its fairness tag
    /// then starts afresh, and its bucket is full again anyway).
    fn forget_if_idle(&mut self, client: &Arc<str>, now: Instant) {
        if let Some(c) = self.clients.get(client) {
            if c.running == 0 && c.tickets == 0 && c.tat.is_none_or(|t| t <= now) {
                self.clients.remove(client);
            }
        }
    }

    /// Queued transactions that go before the one with this finish tag: a
    /// scan under the lock, once per NOTICE, over at most limits.maxQueued
    /// (the CRD bounds it at 10,000).
    fn ahead_of(&self, finish: f64, seq: u64) -> usize {
        self.clients
            .values()
            .flat_map(|c| c.waiters.iter())
            .filter(|w| (w.finish, w.seq) < (finish, seq))
            .count()
    }
}

/// One admitted transaction's slot; given back when dropped.
#[derive(Debug)]
pub struct Permit {
    /// None when admission is bypassed: nothing to give back.
    admission: Option<Arc<Admission>>,
    client: Arc<str>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(a) = &self.admission {
            a.release(&self.client);
        }
    }
}

/// A transaction waiting for admission. Dropping it leaves the queue (or
/// gives back a slot granted meanwhile).
#[derive(Debug)]
pub struct Ticket {
    admission: Arc<Admission>,
    client: ClientId,
    seq: u64,
    asked: Instant,
    /// When its token is there (rate limit); it joins the queue then.
    ready_at: Option<Instant>,
    /// Where the grant arrives, once in the queue.
    grant: Option<oneshot::Receiver<()>>,
    /// Admitted (a Permit owns the slot now).
    done: bool,
}

impl Ticket {
    /// Waits until the transaction may run. Cancel-safe: dropping the
    /// future keeps the ticket's place.
    pub async fn admitted(&mut self) -> Permit {
        if let Some(t) = self.ready_at {
            tokio::time::sleep_until(t).await;
            self.ready_at = None;
            let mut st = self.admission.lock();
            let rx = st.join(self);
            drop(st);
            self.grant = Some(rx);
        }
        if let Some(rx) = self.grant.as_mut() {
            // The sender lives in the queue until it grants; it is never
            // dropped otherwise while this ticket lives.
            let _ = rx.await;
        }
        self.done = true;
        self.grant = None;
        let waited = self.asked.elapsed().as_secs_f64();
        self.admission.stats.wait.observe(waited);
        Permit {
            admission: Some(self.admission.clone()),
            client: self.client.name.clone(),
        }
    }

    /// 1-based place in the admission order now (0 while waiting for a
    /// token: not in the queue yet).
    pub fn position(&self) -> usize {
        let st = self.admission.lock();
        let Some(c) = st.clients.get(&self.client.name) else {
            return 0;
        };
        match c.waiters.iter().find(|w| w.seq == self.seq) {
            Some(w) => st.ahead_of(w.finish, w.seq) + 1,
            None => 0,
        }
    }

    /// Why this ticket would be refused if its wait ended now.
    pub fn timed_out(&self) -> Refused {
        let st = self.admission.lock();
        let cap = st.limits.max_concurrent;
        let capped = match (cap, st.clients.get(&self.client.name)) {
            (Some(cap), Some(c)) => c.running >= cap,
            _ => false,
        };
        self.admission.stats.refuse(Refused::Timeout {
            waited: self.asked.elapsed(),
            capped,
            max_concurrent: cap.unwrap_or(0),
        })
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let admission = self.admission.clone();
        // Under the lock grants are final: dispatch sends only while
        // holding it.
        let mut st = admission.lock();
        let granted = self
            .grant
            .as_mut()
            .is_some_and(|rx| matches!(rx.try_recv(), Ok(())));
        let name = self.client.name.clone();
        if granted {
            // Admitted just as it gave up: the slot goes back.
            st.running = st.running.saturating_sub(1);
            if let Some(c) = st.clients.get_mut(&name) {
                c.running = c.running.saturating_sub(1);
            }
        } else {
            st.queued = st.queued.saturating_sub(1);
            if let Some(c) = st.clients.get_mut(&name) {
                c.tickets = c.tickets.saturating_sub(1);
                c.waiters.retain(|w| w.seq != self.seq);
            }
        }
        st.forget_if_idle(&name, Instant::now());
        st.dispatch();
    }
}

#[cfg(test)]
mod tests;
