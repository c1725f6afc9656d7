//! The operator's metrics: reconcile passes (count, failures by reason,
//! duration), the assignment's shape (sources and summed maxSize per
//! shard), assignments and moves written, rollouts started, leadership.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::metrics::latency_buckets;

/// Labels of a per-shard series.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShardLabel {
    /// Shard index.
    pub shard: String,
}

/// Labels of a reconcile outcome.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    /// `ok`, or the error's reason (e.g. `ApiError`, `TemplateInvalid`).
    pub result: &'static str,
}

/// Every operator metric; cheap to clone.
#[derive(Debug, Clone)]
pub struct OperatorMetrics {
    /// Reconcile passes by outcome.
    pub reconciles: Family<Outcome, Counter>,
    /// Duration of a reconcile pass.
    pub duration: Histogram,
    /// Sources assigned to each shard, as of the last pass.
    pub sources: Family<ShardLabel, Gauge>,
    /// Summed maxSize of the sources on each shard, as of the last pass.
    pub load: Family<ShardLabel, Gauge>,
    /// First assignments written.
    pub assigned: Counter,
    /// Moves written (a source sent to another shard).
    pub moves: Counter,
    /// Shard Deployments updated to a new template.
    pub rollouts: Counter,
    /// 1 while this replica leads.
    pub leader: Gauge,
}

impl OperatorMetrics {
    /// Creates and registers the operator's metrics.
    pub fn register(reg: &mut Registry) -> OperatorMetrics {
        let m = OperatorMetrics {
            reconciles: Family::default(),
            duration: Histogram::new(latency_buckets()),
            sources: Family::default(),
            load: Family::default(),
            assigned: Counter::default(),
            moves: Counter::default(),
            rollouts: Counter::default(),
            leader: Gauge::default(),
        };
        reg.register(
            "shardpool_operator_reconciles",
            "Reconcile passes by outcome",
            m.reconciles.clone(),
        );
        reg.register(
            "shardpool_operator_reconcile_duration_seconds",
            "Duration of one reconcile pass over every source",
            m.duration.clone(),
        );
        reg.register(
            "shardpool_operator_shard_sources",
            "Sources assigned to each shard",
            m.sources.clone(),
        );
        reg.register(
            "shardpool_operator_shard_load",
            "Summed pool maxSize of the sources assigned to each shard",
            m.load.clone(),
        );
        reg.register(
            "shardpool_operator_assignments",
            "First assignments of sources to shards",
            m.assigned.clone(),
        );
        reg.register(
            "shardpool_operator_moves",
            "Sources moved from one shard to another",
            m.moves.clone(),
        );
        reg.register(
            "shardpool_operator_rollouts",
            "Shard Deployments updated to a new template",
            m.rollouts.clone(),
        );
        reg.register(
            "shardpool_operator_leader",
            "1 while this replica leads",
            m.leader.clone(),
        );
        m
    }

    /// Records the assignment's shape: sources and load per shard.
    pub fn record_spread(&self, count: u32, per_shard: &[(u64, u64)]) {
        self.sources.clear();
        self.load.clear();
        for k in 0..count {
            let (n, w) = per_shard.get(k as usize).copied().unwrap_or((0, 0));
            let l = ShardLabel {
                shard: k.to_string(),
            };
            self.sources
                .get_or_create(&l)
                .set(i64::try_from(n).unwrap_or(i64::MAX));
            self.load
                .get_or_create(&l)
                .set(i64::try_from(w).unwrap_or(i64::MAX));
        }
    }
}
