//! Per-client metrics with bounded label cardinality: the busiest client
//! identities get series of their own, every other identity counts under
//! `other` (see [`TopN`]).
//!
//! Lock discipline: `book` is a std Mutex held for one map update per
//! transaction (after admission, off the wait), never across an await.

use std::sync::{Arc, Mutex};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;

use super::topn::{OTHER, TopN};

/// The label of one client series.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClientLabel {
    /// A client identity, or `other`.
    pub client: String,
}

type WaitFamily = Family<ClientLabel, Histogram, fn() -> Histogram>;

fn wait_histogram() -> Histogram {
    Histogram::new(crate::metrics::latency_buckets())
}

/// The per-client series and who has one.
#[derive(Debug)]
pub struct ClientMetrics {
    /// Transactions admitted, by client.
    pub transactions: Family<ClientLabel, Counter>,
    /// Time from asking to admission, by client.
    pub wait: WaitFamily,
    /// Who is labelled; see the lock discipline.
    book: Mutex<TopN>,
}

impl ClientMetrics {
    /// Series for at most `top` identities (and `other`).
    pub fn new(top: usize) -> ClientMetrics {
        ClientMetrics {
            transactions: Family::default(),
            wait: Family::new_with_constructor(wait_histogram),
            book: Mutex::new(TopN::new(top)),
        }
    }

    /// Records one admitted transaction of `client` that waited `wait`
    /// seconds for admission.
    pub fn record(&self, client: &Arc<str>, wait: f64) {
        let seen = self
            .book
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .see(client);
        if let Some(gone) = seen.evicted {
            let gone = ClientLabel {
                client: gone.to_string(),
            };
            self.transactions.remove(&gone);
            self.wait.remove(&gone);
        }
        let label = ClientLabel {
            client: if seen.labelled {
                client.to_string()
            } else {
                OTHER.to_string()
            },
        };
        self.transactions.get_or_create(&label).inc();
        self.wait.get_or_create(&label).observe(wait);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_follow_the_book() {
        let m = ClientMetrics::new(1);
        let (a, b) = (Arc::from("a"), Arc::from("b"));
        m.record(&a, 0.0);
        m.record(&b, 0.0);
        m.record(&b, 0.0); // b passes a: a's series goes
        m.record(&b, 0.0);
        let get = |c: &str| {
            m.transactions
                .get_or_create(&ClientLabel { client: c.into() })
                .get()
        };
        assert_eq!(get("b"), 1);
        assert_eq!(get(OTHER), 2);
    }
}
