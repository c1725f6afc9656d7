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
    /// Sources by the phase their status shows (Pending: none yet).
    pub phases: Family<PhaseLabel, Gauge>,
    /// Per shard: 1 while its Lease has a holder whose renewal is current.
    pub lease_held: Family<ShardLabel, Gauge>,
    /// Per shard: the Lease's leaseTransitions (holder changes so far).
    pub lease_transitions: Family<ShardLabel, Gauge>,
}

/// Labels of a per-phase series.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabel {
    /// Pending, Connecting, Ready, Degraded, Paused or Error.
    pub phase: &'static str,
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
            phases: Family::default(),
            lease_held: Family::default(),
            lease_transitions: Family::default(),
        };
        for phase in crate::crd::Phase::ALL.map(crate::crd::Phase::as_str) {
            let _ = m.phases.get_or_create(&PhaseLabel { phase });
        }
        reg.register(
            "shardpool_operator_sources",
            "Sources by the phase their status shows (Pending: not served yet)",
            m.phases.clone(),
        );
        reg.register(
            "shardpool_operator_shard_lease_held",
            "1 while the shard's Lease has a holder whose renewal is current",
            m.lease_held.clone(),
        );
        reg.register(
            "shardpool_operator_shard_lease_transitions",
            "Holder changes of the shard's Lease so far (its leaseTransitions)",
            m.lease_transitions.clone(),
        );
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

    /// Records how many sources are in each phase.
    pub fn record_phases(&self, phases: impl Iterator<Item = Option<crate::crd::Phase>>) {
        let all = crate::crd::Phase::ALL;
        let mut counts = [0i64; crate::crd::Phase::ALL.len()];
        for p in phases {
            let p = p.unwrap_or(crate::crd::Phase::Pending);
            if let Some(i) = all.iter().position(|x| *x == p) {
                counts[i] += 1;
            }
        }
        for (phase, n) in all.iter().zip(counts) {
            self.phases
                .get_or_create(&PhaseLabel {
                    phase: phase.as_str(),
                })
                .set(n);
        }
    }

    /// Records, for shards `0..count`, whether each Lease is held (a holder
    /// whose renewTime + leaseDurationSeconds is after `now`) and its
    /// transitions.
    pub fn record_leases(
        &self,
        count: u32,
        leases: &[std::sync::Arc<k8s_openapi::api::coordination::v1::Lease>],
        now: k8s_openapi::jiff::Timestamp,
    ) {
        self.lease_held.clear();
        self.lease_transitions.clear();
        for k in 0..count {
            let name = crate::lease::shard_lease_name(k);
            let spec = leases
                .iter()
                .find(|l| l.metadata.name.as_deref() == Some(name.as_str()))
                .and_then(|l| l.spec.clone())
                .unwrap_or_default();
            let holder = spec
                .holder_identity
                .as_deref()
                .is_some_and(|h| !h.is_empty());
            let current = match (spec.renew_time.as_ref(), spec.lease_duration_seconds) {
                (Some(t), Some(d)) => {
                    let until =
                        t.0.checked_add(k8s_openapi::jiff::SignedDuration::from_secs(i64::from(d)));
                    until.is_ok_and(|u| u > now)
                }
                _ => false,
            };
            let l = ShardLabel {
                shard: k.to_string(),
            };
            self.lease_held
                .get_or_create(&l)
                .set(i64::from(holder && current));
            self.lease_transitions
                .get_or_create(&l)
                .set(i64::from(spec.lease_transitions.unwrap_or(0)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
    use k8s_openapi::jiff::{SignedDuration, Timestamp};
    use std::sync::Arc;

    fn lease(k: u32, holder: &str, renewed: Timestamp, transitions: i32) -> Arc<Lease> {
        Arc::new(Lease {
            metadata: kube::api::ObjectMeta {
                name: Some(crate::lease::shard_lease_name(k)),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(holder.into()),
                renew_time: Some(MicroTime(renewed)),
                lease_duration_seconds: Some(15),
                lease_transitions: Some(transitions),
                ..Default::default()
            }),
        })
    }

    #[test]
    fn a_lease_is_held_only_with_a_holder_and_a_current_renewal() {
        let m = OperatorMetrics::register(&mut Registry::default());
        let now = Timestamp::now();
        let stale = now - SignedDuration::from_secs(60);
        let leases = [
            lease(0, "shard-0-a", now, 3),
            lease(1, "shard-1-a", stale, 1),
            lease(2, "", now, 0),
        ];
        m.record_leases(4, &leases, now);
        let held = |k: u32| {
            m.lease_held
                .get_or_create(&ShardLabel {
                    shard: k.to_string(),
                })
                .get()
        };
        assert_eq!([held(0), held(1), held(2), held(3)], [1, 0, 0, 0]);
        let transitions = m
            .lease_transitions
            .get_or_create(&ShardLabel { shard: "0".into() })
            .get();
        assert_eq!(transitions, 3);
    }

    #[test]
    fn phases_are_counted_and_unset_is_pending() {
        use crate::crd::Phase;
        let m = OperatorMetrics::register(&mut Registry::default());
        m.record_phases(
            [
                None,
                Some(Phase::Ready),
                Some(Phase::Ready),
                Some(Phase::Error),
            ]
            .into_iter(),
        );
        let n = |phase| m.phases.get_or_create(&PhaseLabel { phase }).get();
        assert_eq!(
            (n("Pending"), n("Ready"), n("Error"), n("Degraded")),
            (1, 2, 1, 0)
        );
    }
}
