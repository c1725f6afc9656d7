//! Per-client metrics with bounded label cardinality: the busiest client
//! identities get series of their own, every other identity counts under
//! `other` (see [`TopN`]).
//!
//! Lock discipline: `book` is a std Mutex held for one map update per
//! transaction (after admission, off the wait), never across an await.

use std::collections::HashMap;
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
    /// Who is labelled, and the series handles of each label (so the hot
    /// path neither formats a label nor looks one up in the families);
    /// see the lock discipline.
    book: Mutex<Book>,
}

#[derive(Debug)]
struct Book {
    top: TopN,
    /// Handles by label; `None` key: `other`.
    series: HashMap<Option<Arc<str>>, (Counter, Histogram)>,
}

impl ClientMetrics {
    /// Series for at most `top` identities (and `other`).
    pub fn new(top: usize) -> ClientMetrics {
        ClientMetrics {
            transactions: Family::default(),
            wait: Family::new_with_constructor(wait_histogram),
            book: Mutex::new(Book {
                top: TopN::new(top),
                series: HashMap::new(),
            }),
        }
    }

    /// Records one admitted transaction of `client` that waited `wait`
    /// seconds for admission.
    pub fn record(&self, client: &Arc<str>, wait: f64) {
        let (counter, histogram) = {
            let mut book = self.book.lock().unwrap_or_else(|p| p.into_inner());
            let seen = book.top.see(client);
            if let Some(gone) = seen.evicted {
                book.series.remove(&Some(gone.clone()));
                let gone = ClientLabel {
                    client: gone.to_string(),
                };
                self.transactions.remove(&gone);
                self.wait.remove(&gone);
            }
            let key = seen.labelled.then(|| client.clone());
            match book.series.get(&key) {
                Some(h) => h.clone(),
                None => {
                    let label = ClientLabel {
                        client: key.as_deref().unwrap_or(OTHER).to_string(),
                    };
                    let h = (
                        self.transactions.get_or_create(&label).clone(),
                        self.wait.get_or_create(&label).clone(),
                    );
                    book.series.insert(key, h.clone());
                    h
                }
            }
        };
        counter.inc();
        histogram.observe(wait);
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
