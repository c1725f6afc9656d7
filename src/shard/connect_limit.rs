//! Storm control: the shard-wide bound on server connections being opened
//! at the same moment. A shard that takes over thousands of sources (at
//! start, in a rollout, after a rescale) warms them all through this one
//! gate, so the warehouses and the shard's own CPU see at most `limit`
//! TCP connects, TLS handshakes and password exchanges at once. Every
//! attempt holds a slot from its first byte to its last: the fencing
//! connection, warm-up, replacements and connections opened for a query.
//!
//! The gate also counts: how many attempts hold a slot now, and the most
//! that ever did (exported as metrics; the scale benchmark reads them to
//! show that no shard went above its limit).

use std::sync::atomic::Ordering;

use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{Semaphore, SemaphorePermit};

/// The gate; shared by every pool of the shard process.
#[derive(Debug)]
pub struct ConnectLimit {
    /// One permit per attempt that may run.
    permits: Semaphore,
    /// The configured bound.
    limit: usize,
    /// Attempts holding a permit now.
    connecting: Gauge,
    /// The most attempts that held a permit at the same moment.
    peak: Gauge,
}

/// A slot: held for one connection attempt, given back on drop.
#[derive(Debug)]
pub struct Slot<'a> {
    _permit: SemaphorePermit<'a>,
    connecting: &'a Gauge,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.connecting.dec();
    }
}

/// The gate was closed (the process is stopping).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("connect limit closed")]
pub struct Closed;

impl ConnectLimit {
    /// A gate of `limit` slots (at least one).
    pub fn new(limit: usize) -> ConnectLimit {
        let limit = limit.max(1);
        ConnectLimit {
            permits: Semaphore::new(limit),
            limit,
            connecting: Gauge::default(),
            peak: Gauge::default(),
        }
    }

    /// Waits for a slot.
    pub async fn acquire(&self) -> Result<Slot<'_>, Closed> {
        let permit = self.permits.acquire().await.map_err(|_| Closed)?;
        let now = self.connecting.inc() + 1;
        self.peak.inner().fetch_max(now, Ordering::Relaxed);
        Ok(Slot {
            _permit: permit,
            connecting: &self.connecting,
        })
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
                let _slot = gate.acquire().await.expect("open");
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
}
