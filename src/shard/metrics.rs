//! The shard's metrics. Shard-wide series are ordinary prometheus-client
//! metrics updated where things happen; per-source series are read from
//! the [`Registry`] of served sources at scrape time by [`SourcesCollector`],
//! so a source that leaves the shard leaves no stale series behind.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;

use super::clients::ClientMetrics;
use super::registry::Registry;
use crate::metrics::{SourceLabels, latency_buckets};

/// Direction of a handover, seen from this shard.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Direction {
    /// `in` (taken over) or `out` (released).
    pub direction: &'static str,
}

/// Which conditional write the API server refused.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Refused {
    /// `claim` (taking a source over) or `status` (reporting it).
    pub write: &'static str,
}

/// What became of a release note (see [`super::released`]).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NoteOutcome {
    /// `told` (this shard let go of a source and told at least one
    /// router), `heard` (a router passed one on to this shard) or `opened`
    /// (this shard opened a source on one, before the watch showed the
    /// hand-over write).
    pub outcome: &'static str,
}

/// Shard-wide metrics; cheap to clone (every handle is an `Arc`).
#[derive(Debug, Clone)]
pub struct ShardMetrics {
    /// Time a transaction waited for a server connection of its source.
    pub checkout_wait: Histogram,
    /// Router sessions open on this shard.
    pub sessions: Gauge,
    /// Sources taken over and released.
    pub handovers: Family<Direction, Counter>,
    /// Release notes told, heard and acted on.
    pub notes: Family<NoteOutcome, Counter>,
    /// 1 while this process holds the shard's Lease.
    pub lease_held: Gauge,
    /// 1 while this process's claim on the Lease is certainly valid (it
    /// opens connections only then); 0 after a failed renewal lapsed it.
    pub lease_valid: Gauge,
    /// 1 while draining after SIGTERM.
    pub draining: Gauge,
    /// Conditional DataSource writes refused because the object changed
    /// since this shard read it (409), by write.
    pub conflicts: Family<Refused, Counter>,
    /// Phase-change Events the rate limits held back.
    pub events_suppressed: Counter,
    /// Per-client transactions and admission waits (bounded labels).
    pub clients: Arc<ClientMetrics>,
}

impl ShardMetrics {
    /// Creates the metrics and registers them, with the per-source collector.
    pub fn register(
        reg: &mut prometheus_client::registry::Registry,
        sources: Arc<Registry>,
        client_series: usize,
    ) -> ShardMetrics {
        let m = ShardMetrics {
            checkout_wait: Histogram::new(latency_buckets()),
            sessions: Gauge::default(),
            handovers: Family::default(),
            notes: Family::default(),
            lease_held: Gauge::default(),
            lease_valid: Gauge::default(),
            draining: Gauge::default(),
            conflicts: Family::default(),
            events_suppressed: Counter::default(),
            clients: Arc::new(ClientMetrics::new(client_series)),
        };
        reg.register(
            "shardpool_client_transactions",
            "Transactions admitted, by client identity (the busiest ones; the rest as other)",
            m.clients.transactions.clone(),
        );
        reg.register(
            "shardpool_client_admission_wait_seconds",
            "Time a transaction waited for admission, by client identity (the busiest ones; the rest as other)",
            m.clients.wait.clone(),
        );
        // Both series from the start: a dashboard shows 0, not "no data",
        // on a shard that has not handed anything over yet.
        for direction in ["in", "out"] {
            let _ = m.handovers.get_or_create(&Direction { direction });
        }
        for outcome in ["told", "heard", "opened"] {
            let _ = m.notes.get_or_create(&NoteOutcome { outcome });
        }
        reg.register(
            "shardpool_shard_release_notes",
            "Release notes of moved sources: told to the routers, heard from them, and sources opened on one before the API server showed the hand-over",
            m.notes.clone(),
        );
        reg.register(
            "shardpool_shard_phase_events_suppressed",
            "Phase-change Events of DataSources not published because of the rate limits",
            m.events_suppressed.clone(),
        );
        reg.register(
            "shardpool_shard_write_conflicts",
            "Conditional DataSource writes refused because the object changed since it was read",
            m.conflicts.clone(),
        );
        reg.register(
            "shardpool_shard_checkout_wait_seconds",
            "Time a transaction waited for a server connection",
            m.checkout_wait.clone(),
        );
        reg.register(
            "shardpool_shard_sessions",
            "Router sessions open on this shard",
            m.sessions.clone(),
        );
        reg.register(
            "shardpool_shard_handovers",
            "Sources taken over (in) and released (out) by this shard",
            m.handovers.clone(),
        );
        reg.register(
            "shardpool_shard_lease_held",
            "1 while this process holds the shard Lease",
            m.lease_held.clone(),
        );
        reg.register(
            "shardpool_shard_lease_valid",
            "1 while this process's Lease claim is valid (new connections may be opened)",
            m.lease_valid.clone(),
        );
        reg.register(
            "shardpool_shard_draining",
            "1 while this process drains after SIGTERM",
            m.draining.clone(),
        );
        reg.register_collector(Box::new(SourcesCollector(sources)));
        m
    }
}

/// Per-source pool series, read from the served sources at scrape time.
#[derive(Debug)]
pub struct SourcesCollector(pub Arc<Registry>);

/// Labels of one connection-state series.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    namespace: String,
    source: String,
    state: &'static str,
}

/// Labels of one admission-refusal series.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    namespace: String,
    source: String,
    reason: &'static str,
}

/// Labels of one connect-outcome series.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    namespace: String,
    source: String,
    result: &'static str,
}

fn labels(key: &str) -> SourceLabels {
    let (ns, name) = key.split_once('/').unwrap_or(("", key));
    SourceLabels {
        namespace: ns.to_string(),
        source: name.to_string(),
    }
}

impl Collector for SourcesCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut all = self.0.all();
        all.sort_by(|a, b| a.key.cmp(&b.key));
        ConstGauge::new(all.len() as i64).encode(enc.encode_descriptor(
            "shardpool_shard_sources",
            "Sources served by this shard.",
            None,
            MetricType::Gauge,
        )?)?;

        let mut m = enc.encode_descriptor(
            "shardpool_pool_connections",
            "Server connections of a source's pool, by state.",
            None,
            MetricType::Gauge,
        )?;
        for s in &all {
            let (_, idle, in_use) = super::pool::counts(&s.pool);
            let l = labels(&s.key);
            for (state, v) in [("idle", idle), ("in_use", in_use)] {
                let ls = StateLabels {
                    namespace: l.namespace.clone(),
                    source: l.source.clone(),
                    state,
                };
                ConstGauge::new(v as i64).encode(m.encode_family(&ls)?)?;
            }
        }

        let mut m = enc.encode_descriptor(
            "shardpool_pool_max_size",
            "The source's pool.maxSize: the most server connections its pool opens.",
            None,
            MetricType::Gauge,
        )?;
        for s in &all {
            let max = s.pool.manager().settings().max_size;
            ConstGauge::new(i64::try_from(max).unwrap_or(i64::MAX))
                .encode(m.encode_family(&labels(&s.key))?)?;
        }

        let mut m = enc.encode_descriptor(
            "shardpool_pool_ready",
            "1 while the source's phase on this shard is Ready (minIdle connections open, no recent connection errors).",
            None,
            MetricType::Gauge,
        )?;
        for s in &all {
            let min_idle = s.pool.manager().settings().min_idle;
            let ready = super::status::observe(s, min_idle).phase == crate::crd::Phase::Ready;
            ConstGauge::new(i64::from(ready)).encode(m.encode_family(&labels(&s.key))?)?;
        }

        let mut m = enc.encode_descriptor(
            "shardpool_pool_transactions",
            "Transactions (server connection checkouts) run for a source.",
            None,
            MetricType::Counter,
        )?;
        for s in &all {
            let v = s.stats.transactions.load(Ordering::Relaxed);
            ConstCounter::new(v).encode(m.encode_family(&labels(&s.key))?)?;
        }

        let mut m = enc.encode_descriptor(
            "shardpool_pool_checkout_errors",
            "Transactions refused because no server connection was available in time.",
            None,
            MetricType::Counter,
        )?;
        for s in &all {
            let v = s.stats.checkout_errors.load(Ordering::Relaxed);
            ConstCounter::new(v).encode(m.encode_family(&labels(&s.key))?)?;
        }

        let mut m = enc.encode_descriptor(
            "shardpool_pool_connects",
            "Connection attempts to a source's server, by result.",
            None,
            MetricType::Counter,
        )?;
        for s in &all {
            let (ok, failed) = s.pool.manager().connects();
            let l = labels(&s.key);
            for (result, v) in [("ok", ok), ("error", failed)] {
                let ls = ResultLabels {
                    namespace: l.namespace.clone(),
                    source: l.source.clone(),
                    result,
                };
                ConstCounter::new(v).encode(m.encode_family(&ls)?)?;
            }
        }

        let mut m = enc.encode_descriptor(
            "shardpool_pool_fenced_backends",
            "Server connections of other shard processes this shard ended before opening the source.",
            None,
            MetricType::Counter,
        )?;
        for s in &all {
            let v = s.pool.manager().fenced_backends();
            ConstCounter::new(v).encode(m.encode_family(&labels(&s.key))?)?;
        }

        let mut m = enc.encode_descriptor(
            "shardpool_admission_queued",
            "Transactions of a source waiting for admission now.",
            None,
            MetricType::Gauge,
        )?;
        for s in &all {
            let (queued, _) = s.admission.depth();
            ConstGauge::new(i64::try_from(queued).unwrap_or(i64::MAX))
                .encode(m.encode_family(&labels(&s.key))?)?;
        }

        // Wait and refusal series only for sources that ever queued or
        // refused: thousands of idle sources add nothing but series.
        let contended: Vec<_> = all
            .iter()
            .filter(|s| {
                let a = &s.admission.stats;
                a.queued_total.load(Ordering::Relaxed) > 0
                    || a.refused.iter().any(|r| r.load(Ordering::Relaxed) > 0)
            })
            .collect();
        let mut m = enc.encode_descriptor(
            "shardpool_admission_wait_seconds",
            "Time from a transaction's arrival to its admission (sources that ever queued).",
            None,
            MetricType::Histogram,
        )?;
        for s in &contended {
            s.admission
                .stats
                .wait
                .encode(m.encode_family(&labels(&s.key))?)?;
        }
        let mut m = enc.encode_descriptor(
            "shardpool_admission_refused",
            "Transactions refused admission, by reason: queue_full (limits.maxQueued), timeout (pool.acquireTimeout), rate (limits.perClient.rate).",
            None,
            MetricType::Counter,
        )?;
        for s in &contended {
            let l = labels(&s.key);
            for (i, reason) in super::admission::REASONS.iter().enumerate() {
                let ls = ReasonLabels {
                    namespace: l.namespace.clone(),
                    source: l.source.clone(),
                    reason,
                };
                let v = s.admission.stats.refused[i].load(Ordering::Relaxed);
                ConstCounter::new(v).encode(m.encode_family(&ls)?)?;
            }
        }

        // Costs by tag: only sources whose transactions carried tags.
        let tagged: Vec<_> = all
            .iter()
            .map(|s| (s, s.tags.snapshot()))
            .filter(|(_, t)| !t.is_empty())
            .collect();
        for (name, help, pick) in [
            (
                "shardpool_tag_transactions",
                "Transactions by source and query tag (leading /* shardpool:tag=... */ comment, application_name or HTTP tag; the busiest tags per source, the rest as other).",
                0,
            ),
            (
                "shardpool_tag_server_seconds",
                "Time transactions held a server connection, by source and query tag.",
                1,
            ),
            (
                "shardpool_tag_rows",
                "Rows the server returned, by source and query tag.",
                2,
            ),
        ] {
            let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (s, costs) in &tagged {
                let l = labels(&s.key);
                for (tag, c) in costs {
                    let ls = TagLabels {
                        namespace: l.namespace.clone(),
                        source: l.source.clone(),
                        tag: tag.to_string(),
                    };
                    match pick {
                        0 => ConstCounter::new(c.transactions).encode(m.encode_family(&ls)?)?,
                        1 => ConstCounter::new(c.server_time.as_secs_f64())
                            .encode(m.encode_family(&ls)?)?,
                        _ => ConstCounter::new(c.rows).encode(m.encode_family(&ls)?)?,
                    }
                }
            }
        }
        Ok(())
    }
}

/// Labels of one tag-cost series.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TagLabels {
    namespace: String,
    source: String,
    tag: String,
}
