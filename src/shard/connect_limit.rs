//! Storm control: the shard-wide bound on server connections being opened
//! at the same moment. A shard that takes over thousands of sources (at
//! start, in a rollout, after a rescale) warms them all through this one
//! gate, so the warehouses and the shard's own CPU see at most `limit`
//! TCP connects, TLS handshakes and password exchanges at once. Every
//! attempt holds a slot from its first byte to its last: the fencing
//! connection, warm-up, replacements and connections opened for a query.
//!
//! Two purposes share the gate. A connection a checkout is waiting for
//! (demand) may take any slot. Warm-up (a pool filling up to minIdle) may
//! hold at most `limit - reserved` slots, and waits for them in arrival
//! order before it touches its pool; so a query on a source that is still
//! warming waits behind at most one round of warm-up connects, not behind
//! thousands of them.
//!
//! Warm-up also yields to demand: while a checkout's connect is waiting or
//! running, a warm-up attempt with its share's permit waits (at most
//! [`WARM_YIELDS_AT_MOST`]) before it connects. A shard that takes over
//! hundreds of sources starts its warm-up at once, and the first
//! connections of the sources clients wait for (a fence and a password
//! exchange each) otherwise share the warehouse and the CPU with a full
//! share of warm-up connects: at full size they took 0.3-0.9 s.
//!
//! The gate also counts: how many attempts hold a slot now, and the most
//! that ever did (exported as metrics; the scale benchmark reads them to
//! show that no shard went above its limit).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

/// Longest wait of one warm-up attempt for demand to clear: warm-up slows
/// down under demand, it never stops.
pub const WARM_YIELDS_AT_MOST: Duration = Duration::from_secs(1);

/// What a connection attempt is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// A checkout waits for it: any slot.
    Demand,
    /// Warm-up or replacement with nobody waiting: only the warm-up share.
    Warm,
}

/// The gate; shared by every pool of the shard process.
#[derive(Debug)]
pub struct ConnectLimit {
    /// One permit per attempt that may run, whatever its purpose.
    permits: Arc<Semaphore>,
    /// Taken first by warm-up attempts: `limit` minus the slots kept for
    /// demand. FIFO, so warm-up is served in arrival order.
    warming: Arc<Semaphore>,
    /// The configured bound.
    limit: usize,
    /// Demand attempts waiting for a slot or holding one.
    demand: Arc<AtomicUsize>,
    /// Told when `demand` falls to zero (warm-up waiting for it goes on).
    demand_clear: Arc<Notify>,
    /// Attempts holding a permit now.
    connecting: Gauge,
    /// The most attempts that held a permit at the same moment.
    peak: Gauge,
}

/// A slot: held for one connection attempt, given back on drop.
#[derive(Debug)]
pub struct Slot {
    /// The warm-up share's permit (warm-up only); released with `_permit`.
    _warm: Option<OwnedSemaphorePermit>,
    /// Counts a demand attempt until the slot is given back (demand only).
    _demand: Option<DemandMark>,
    _permit: OwnedSemaphorePermit,
    connecting: Gauge,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.connecting.dec();
    }
}

/// One demand attempt, counted in `demand` while it lives.
#[derive(Debug)]
struct DemandMark {
    demand: Arc<AtomicUsize>,
    clear: Arc<Notify>,
}

impl DemandMark {
    fn new(demand: &Arc<AtomicUsize>, clear: &Arc<Notify>) -> Self {
        demand.fetch_add(1, Ordering::SeqCst);
        DemandMark {
            demand: demand.clone(),
            clear: clear.clone(),
        }
    }
}

impl Drop for DemandMark {
    fn drop(&mut self) {
        if self.demand.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.clear.notify_waiters();
        }
    }
}

/// The gate was closed (the process is stopping).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("connect limit closed")]
pub struct Closed;

impl ConnectLimit {
    /// A gate of `limit` slots (at least one); a quarter of them (at least
    /// one, when there are two or more) are kept for demand.
    pub fn new(limit: usize) -> ConnectLimit {
        let limit = limit.max(1);
        let reserved = if limit >= 2 { (limit / 4).max(1) } else { 0 };
        ConnectLimit {
            permits: Arc::new(Semaphore::new(limit)),
            warming: Arc::new(Semaphore::new(limit - reserved)),
            limit,
            demand: Arc::default(),
            demand_clear: Arc::default(),
            connecting: Gauge::default(),
            peak: Gauge::default(),
        }
    }

    /// Waits for a slot for `purpose`.
    pub async fn acquire(&self, purpose: Purpose) -> Result<Slot, Closed> {
        let (warm, demand) = match purpose {
            Purpose::Demand => (
                None,
                Some(DemandMark::new(&self.demand, &self.demand_clear)),
            ),
            Purpose::Warm => {
                let warm = self
                    .warming
                    .clone()
                    .acquire_owned()
                    .await
                    .map_err(|_| Closed)?;
                self.yield_to_demand().await;
                (Some(warm), None)
            }
        };
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Closed)?;
        let now = self.connecting.inc() + 1;
        self.peak.inner().fetch_max(now, Ordering::Relaxed);
        Ok(Slot {
            _warm: warm,
            _demand: demand,
            _permit: permit,
            connecting: self.connecting.clone(),
        })
    }

    /// Waits while demand attempts wait or run, at most
    /// [`WARM_YIELDS_AT_MOST`].
    async fn yield_to_demand(&self) {
        let until = tokio::time::Instant::now() + WARM_YIELDS_AT_MOST;
        loop {
            // Registered before the test: a fall to zero in between wakes it.
            let cleared = self.demand_clear.notified();
            if self.demand.load(Ordering::SeqCst) == 0 {
                return;
            }
            if tokio::time::timeout_at(until, cleared).await.is_err() {
                return;
            }
        }
    }

    /// The configured bound.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Attempts running now.
    pub fn connecting(&self) -> i64 {
        self.connecting.get()
    }

    /// The most attempts that ran at the same moment.
    pub fn peak(&self) -> i64 {
        self.peak.get()
    }

    /// Registers `shardpool_shard_connect_limit`, `_connecting` and
    /// `_connecting_peak`.
    pub fn register(&self, reg: &mut prometheus_client::registry::Registry) {
        let limit = Gauge::<i64>::default();
        limit.set(i64::try_from(self.limit).unwrap_or(i64::MAX));
        reg.register(
            "shardpool_shard_connect_limit",
            "Server connections this process opens at the same moment, at most",
            limit,
        );
        reg.register(
            "shardpool_shard_connecting",
            "Server connections being opened now",
            self.connecting.clone(),
        );
        reg.register(
            "shardpool_shard_connecting_peak",
            "The most server connections that were being opened at the same moment",
            self.peak.clone(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test(flavor = "current_thread")]
    async fn no_more_than_the_limit_run_at_once_and_the_peak_says_so() {
        let gate = Arc::new(ConnectLimit::new(3));
        let mut tasks = Vec::new();
        for _ in 0..10 {
            let gate = gate.clone();
            tasks.push(tokio::spawn(async move {
                let _slot = gate.acquire(Purpose::Demand).await.expect("open");
                assert!(gate.connecting() <= 3, "{} at once", gate.connecting());
                tokio::time::sleep(Duration::from_millis(5)).await;
            }));
        }
        for t in tasks {
            t.await.expect("joins");
        }
        assert_eq!(
            gate.peak(),
            3,
            "ten attempts against three slots fill all three"
        );
        assert_eq!(gate.connecting(), 0, "every slot given back");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn demand_overtakes_queued_warm_up() {
        let gate = Arc::new(ConnectLimit::new(4));
        // Warm-up holds its whole share (3 of 4) and more of it queues.
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(gate.acquire(Purpose::Warm).await.expect("open"));
        }
        let queued = {
            let gate = gate.clone();
            tokio::spawn(async move { gate.acquire(Purpose::Warm).await.map(|_| ()) })
        };
        tokio::task::yield_now().await;
        // A checkout's connect still gets the reserved slot at once.
        let demand =
            tokio::time::timeout(Duration::from_millis(100), gate.acquire(Purpose::Demand))
                .await
                .expect("demand is not queued behind warm-up")
                .expect("open");
        assert_eq!(gate.connecting(), 4);
        assert!(!queued.is_finished(), "warm-up stays within its share");
        drop(demand);
        tokio::task::yield_now().await;
        assert!(
            !queued.is_finished(),
            "a freed reserved slot does not go to warm-up"
        );
        held.pop();
        tokio::time::timeout(Duration::from_secs(1), queued)
            .await
            .expect("warm-up goes on once its share frees")
            .expect("joins")
            .expect("open");
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn warm_up_waits_while_demand_connects_but_never_longer_than_the_bound() {
        let gate = Arc::new(ConnectLimit::new(8));
        let warm = |gate: &Arc<ConnectLimit>| {
            let gate = gate.clone();
            tokio::spawn(async move { gate.acquire(Purpose::Warm).await.map(|_| ()) })
        };
        // No demand: warm-up connects at once.
        warm(&gate).await.expect("joins").expect("open");
        // A checkout connecting: warm-up waits for it to end.
        let demand = gate.acquire(Purpose::Demand).await.expect("open");
        let waiting = warm(&gate);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!waiting.is_finished(), "warm-up yields to a demand connect");
        drop(demand);
        tokio::time::timeout(Duration::from_millis(10), waiting)
            .await
            .expect("goes on once demand cleared")
            .expect("joins")
            .expect("open");
        // Demand that never clears slows warm-up by the bound, no more.
        let _busy = gate.acquire(Purpose::Demand).await.expect("open");
        let began = tokio::time::Instant::now();
        warm(&gate).await.expect("joins").expect("open");
        assert_eq!(began.elapsed(), WARM_YIELDS_AT_MOST);
    }
}
