//! The router's metrics, per front end (`pg`, `http`) and per source.
//! Sessions clone their per-source counters once at attach time, so the
//! query path bumps an atomic and observes one histogram, nothing more.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::metrics::latency_buckets;

/// Labels of a per-front-end series.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Frontend {
    /// `pg` or `http`.
    pub frontend: &'static str,
}

/// Labels of a per-source series.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceFrontend {
    /// `pg` or `http`.
    pub frontend: &'static str,
    /// The DataSource's namespace.
    pub namespace: String,
    /// The DataSource's name.
    pub source: String,
}

/// Labels of an error series.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// `pg` or `http`.
    pub frontend: &'static str,
    /// The DataSource's namespace.
    pub namespace: String,
    /// The DataSource's name.
    pub source: String,
    /// SQLSTATE class (two characters), e.g. `42`, `57`.
    pub class: String,
}

/// Every router metric; cheap to clone.
#[derive(Debug, Clone)]
pub struct RouterMetrics {
    /// Client connections open, per front end.
    pub clients: Family<Frontend, Gauge>,
    /// Connections refused because the front end is at its limit.
    pub refused: Family<Frontend, Counter>,
    /// Failed logins (bad password, unknown user, bad token).
    pub auth_failures: Family<Frontend, Counter>,
    /// Queries answered (one per ReadyForQuery on pg, one per request on http).
    pub queries: Family<SourceFrontend, Counter>,
    /// Errors returned to clients, by SQLSTATE class.
    pub errors: Family<ErrorLabels, Counter>,
    /// Query latency as the router sees it (shard round trip included).
    pub latency: Family<Frontend, Histogram, fn() -> Histogram>,
    /// Sessions or requests held because their shard was handing over.
    pub held: Counter,
    /// Batches sent again to a new owner after a drain (nothing had run).
    pub replayed: Counter,
    /// Release notes of moved sources passed on between shards.
    pub relayed: Counter,
    /// Client sessions this router ended while draining, by where: at an
    /// idle point, or inside a transaction at the deadline.
    pub drained: Family<DrainedAt, Counter>,
}

/// Where a drained session ended.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DrainedAt {
    /// "idle" or "deadline".
    pub at: &'static str,
}

fn histogram() -> Histogram {
    Histogram::new(latency_buckets())
}

impl RouterMetrics {
    /// Creates and registers the router's metrics.
    pub fn register(reg: &mut Registry) -> RouterMetrics {
        let m = RouterMetrics {
            clients: Family::default(),
            refused: Family::default(),
            auth_failures: Family::default(),
            queries: Family::default(),
            errors: Family::default(),
            latency: Family::new_with_constructor(histogram),
            held: Counter::default(),
            replayed: Counter::default(),
            relayed: Counter::default(),
            drained: Family::default(),
        };
        for at in ["idle", "deadline"] {
            let _ = m.drained.get_or_create(&DrainedAt { at });
        }
        reg.register(
            "shardpool_router_drained_sessions",
            "Client sessions ended because the router was draining, by where (idle point or deadline)",
            m.drained.clone(),
        );
        // Front-end series exist from the start (a dashboard shows 0, not
        // "no data", before the first client).
        for frontend in ["pg", "http"] {
            let f = Frontend { frontend };
            let _ = m.clients.get_or_create(&f);
            let _ = m.refused.get_or_create(&f);
            let _ = m.auth_failures.get_or_create(&f);
            let _ = m.latency.get_or_create(&f);
        }
        reg.register(
            "shardpool_router_clients",
            "Client connections open",
            m.clients.clone(),
        );
        reg.register(
            "shardpool_router_refused",
            "Client connections refused at the connection limit",
            m.refused.clone(),
        );
        reg.register(
            "shardpool_router_auth_failures",
            "Failed client authentications",
            m.auth_failures.clone(),
        );
        reg.register(
            "shardpool_router_queries",
            "Queries answered, per source",
            m.queries.clone(),
        );
        reg.register(
            "shardpool_router_errors",
            "Errors returned to clients, per source and SQLSTATE class",
            m.errors.clone(),
        );
        reg.register(
            "shardpool_router_query_duration_seconds",
            "Query latency through the router",
            m.latency.clone(),
        );
        reg.register(
            "shardpool_router_handover_held",
            "Sessions or requests held while their shard handed over",
            m.held.clone(),
        );
        reg.register(
            "shardpool_router_handover_replayed",
            "Batches re-sent to a source's new owner after a drain",
            m.replayed.clone(),
        );
        reg.register(
            "shardpool_router_handover_notes_relayed",
            "Release notes of moved sources passed on from their old shard to their new one",
            m.relayed.clone(),
        );
        m
    }

    /// Counts an error for a source. Callers pass `known = false` for a
    /// name that is no DataSource: it is counted under empty labels, so
    /// client-chosen names never become series.
    pub fn error(&self, frontend: &'static str, ns: &str, name: &str, known: bool, code: &str) {
        let (ns, name) = if known { (ns, name) } else { ("", "") };
        self.errors
            .get_or_create(&ErrorLabels {
                frontend,
                namespace: ns.to_string(),
                source: name.to_string(),
                class: crate::metrics::sqlstate_class(code),
            })
            .inc();
    }
}
