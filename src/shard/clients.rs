//! Per-client metrics with bounded label cardinality: the `top` client
//! identities by transaction volume get series of their own, every other
//! identity counts under `other`. An identity not yet labelled is tracked
//! as a candidate (at most `4 * top` of them, the least busy forgotten
//! first); when a candidate has run more transactions than the least busy
//! labelled identity has since it got its label, the two swap: the
//! evicted identity's series are removed and it counts as `other` from
//! then on, and the promoted one's series start at zero. Every series is
//! monotonic, and at most `top + 1` exist per metric.
//!
//! Lock discipline: `book` is a std Mutex held for one map update per
//! transaction (after admission, off the wait), never across an await.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;

/// The label of one client series.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClientLabel {
    /// A client identity, or `other`.
    pub client: String,
}

/// Label of the identities without series of their own.
pub const OTHER: &str = "other";

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
    book: Mutex<Book>,
    /// Identities with series of their own.
    top: usize,
}

#[derive(Debug, Default)]
struct Book {
    /// Labelled identities and their transactions since labelled.
    labelled: HashMap<Arc<str>, u64>,
    /// Other identities and their transactions since they became
    /// candidates.
    candidates: HashMap<Arc<str>, u64>,
}

impl ClientMetrics {
    /// Series for at most `top` identities (and `other`).
    pub fn new(top: usize) -> ClientMetrics {
        ClientMetrics {
            transactions: Family::default(),
            wait: Family::new_with_constructor(wait_histogram),
            book: Mutex::new(Book::default()),
            top,
        }
    }

    /// Records one admitted transaction of `client` that waited `wait`
    /// seconds for admission.
    pub fn record(&self, client: &Arc<str>, wait: f64) {
        let label = self.label(client);
        self.transactions.get_or_create(&label).inc();
        self.wait.get_or_create(&label).observe(wait);
    }

    /// The label `client` counts under now, updating the book.
    fn label(&self, client: &Arc<str>) -> ClientLabel {
        let mut book = self.book.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = book.labelled.get_mut(client) {
            *n += 1;
            return ClientLabel {
                client: client.to_string(),
            };
        }
        if book.labelled.len() < self.top {
            book.labelled.insert(client.clone(), 1);
            return ClientLabel {
                client: client.to_string(),
            };
        }
        let count = {
            let n = book.candidates.entry(client.clone()).or_insert(0);
            *n += 1;
            *n
        };
        let least = book
            .labelled
            .iter()
            .min_by_key(|(_, n)| **n)
            .map(|(k, n)| (k.clone(), *n));
        if let Some((evicted, n)) = least {
            if count > n {
                book.labelled.remove(&evicted);
                book.candidates.remove(client);
                book.labelled.insert(client.clone(), 0);
                book.candidates.insert(evicted.clone(), 0);
                let gone = ClientLabel {
                    client: evicted.to_string(),
                };
                self.transactions.remove(&gone);
                self.wait.remove(&gone);
                // This transaction was counted as a candidate's: it still
                // goes to `other`, the new series starts at zero.
            }
        }
        if book.candidates.len() > self.top.max(1) * 4 {
            let quiet = book
                .candidates
                .iter()
                .filter(|(k, _)| *k != client)
                .min_by_key(|(_, n)| **n)
                .map(|(k, _)| k.clone());
            if let Some(k) = quiet {
                book.candidates.remove(&k);
            }
        }
        ClientLabel {
            client: OTHER.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> Arc<str> {
        Arc::from(s)
    }

    fn count(m: &ClientMetrics, client: &str) -> Option<u64> {
        let l = ClientLabel {
            client: client.to_string(),
        };
        // get_or_create would make the series: look at the book instead for
        // labelled-ness, then read.
        let labelled = m.book.lock().ok()?.labelled.contains_key(client) || client == OTHER;
        labelled.then(|| m.transactions.get_or_create(&l).get())
    }

    #[test]
    fn the_first_identities_get_series_the_rest_count_as_other() {
        let m = ClientMetrics::new(2);
        m.record(&id("a"), 0.0);
        m.record(&id("b"), 0.0);
        m.record(&id("c"), 0.0);
        assert_eq!(count(&m, "a"), Some(1));
        assert_eq!(count(&m, "b"), Some(1));
        assert_eq!(count(&m, "c"), None);
        assert_eq!(count(&m, OTHER), Some(1));
    }

    #[test]
    fn a_busier_identity_takes_the_least_busy_ones_series() {
        let m = ClientMetrics::new(2);
        for _ in 0..5 {
            m.record(&id("a"), 0.0);
        }
        m.record(&id("b"), 0.0);
        for _ in 0..3 {
            m.record(&id("c"), 0.0);
        }
        // c passed b's 1 transaction at its second: b is `other` now.
        assert_eq!(count(&m, "b"), None);
        assert_eq!(count(&m, "c"), Some(1), "series started at promotion");
        assert_eq!(count(&m, "a"), Some(5));
        assert_eq!(count(&m, OTHER), Some(2));
        let series = m.book.lock().expect("lock").labelled.len();
        assert_eq!(series, 2);
    }

    #[test]
    fn candidates_are_bounded() {
        let m = ClientMetrics::new(1);
        m.record(&id("a"), 0.0);
        m.record(&id("a"), 0.0);
        for i in 0..100 {
            m.record(&id(&format!("c{i}")), 0.0);
        }
        let book = m.book.lock().expect("lock");
        assert!(book.candidates.len() <= 5, "{}", book.candidates.len());
    }
}
