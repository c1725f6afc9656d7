//! Prometheus metrics shared by every role: the registry type each role
//! fills, the label sets they have in common, the latency buckets, and the
//! text encoding served at `/metrics` (next to the probes, see [`crate::health`]).
//!
//! Hot paths hold cloned metric handles (an `Arc` around an atomic), looked
//! up once per session, never a label lookup per query.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::registry::Registry;

/// Labels of a per-source series.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    /// The DataSource's namespace.
    pub namespace: String,
    /// The DataSource's name.
    pub source: String,
}

/// Latency buckets from 100 µs to 30 s, for query and reconcile durations.
pub fn latency_buckets() -> impl Iterator<Item = f64> {
    [
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        5.0, 10.0, 30.0,
    ]
    .into_iter()
}

/// The registry in the OpenMetrics text format.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::with_capacity(16 * 1024);
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, registry) {
        tracing::warn!(error = %e, "encoding metrics failed");
    }
    out
}

/// The SQLSTATE class (first two characters) of a code, for error labels.
pub fn sqlstate_class(code: &str) -> String {
    code.get(..2).unwrap_or("XX").to_string()
}
