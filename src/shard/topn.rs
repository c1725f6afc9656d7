//! Which keys (client identities, cost tags) get metric series of their
//! own: at most `top` of them, the busiest; every other key counts under
//! `other`. A key not yet labelled is a candidate (at most `4 * top` are
//! tracked, the least busy forgotten first); when a candidate has been
//! seen more often than the least busy labelled key since that one got its
//! label, the two swap. The evicted key's series are removed by the
//! caller and it counts as `other` from then on; the promoted key's series
//! start at zero. Every series stays monotonic, and at most `top + 1`
//! exist per metric.

use std::collections::HashMap;
use std::sync::Arc;

/// Label of the keys without series of their own.
pub const OTHER: &str = "other";

/// The book of labelled keys. Not synchronised: its owner holds it in a
/// lock (see there).
#[derive(Debug, Default)]
pub struct TopN {
    /// Labelled keys and how often each was seen since it got its label.
    labelled: HashMap<Arc<str>, u64>,
    /// Other keys and how often each was seen since it became a candidate.
    candidates: HashMap<Arc<str>, u64>,
    /// Most labelled keys.
    top: usize,
}

/// What [`TopN::see`] decided.
#[derive(Debug, PartialEq, Eq)]
pub struct Seen {
    /// Whether this occurrence counts under the key's own label.
    pub labelled: bool,
    /// A key that lost its label: its series are to be removed.
    pub evicted: Option<Arc<str>>,
}

impl TopN {
    /// A book of at most `top` labelled keys.
    pub fn new(top: usize) -> TopN {
        TopN {
            top,
            ..TopN::default()
        }
    }

    /// Records one occurrence of `key`.
    pub fn see(&mut self, key: &Arc<str>) -> Seen {
        if let Some(n) = self.labelled.get_mut(key) {
            *n += 1;
            return Seen {
                labelled: true,
                evicted: None,
            };
        }
        if self.labelled.len() < self.top {
            self.labelled.insert(key.clone(), 1);
            return Seen {
                labelled: true,
                evicted: None,
            };
        }
        let count = {
            let n = self.candidates.entry(key.clone()).or_insert(0);
            *n += 1;
            *n
        };
        let mut evicted = None;
        let least = self
            .labelled
            .iter()
            .min_by_key(|(_, n)| **n)
            .map(|(k, n)| (k.clone(), *n));
        if let Some((least, n)) = least {
            if count > n {
                self.labelled.remove(&least);
                self.candidates.remove(key);
                self.labelled.insert(key.clone(), 0);
                self.candidates.insert(least.clone(), 0);
                evicted = Some(least);
            }
        }
        if self.candidates.len() > self.top.max(1) * 4 {
            let quiet = self
                .candidates
                .iter()
                .filter(|(k, _)| *k != key)
                .min_by_key(|(_, n)| **n)
                .map(|(k, _)| k.clone());
            if let Some(k) = quiet {
                self.candidates.remove(&k);
            }
        }
        // This occurrence was counted as a candidate's: it goes to `other`
        // even when it promoted the key (whose series start at zero).
        Seen {
            labelled: false,
            evicted,
        }
    }

    /// Whether `key` has its own label now.
    pub fn is_labelled(&self, key: &str) -> bool {
        self.labelled.contains_key(key)
    }

    /// Candidates tracked.
    pub fn candidates(&self) -> usize {
        self.candidates.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn see(b: &mut TopN, k: &str) -> Seen {
        b.see(&Arc::from(k))
    }

    #[test]
    fn the_first_keys_get_labels_the_rest_count_as_other() {
        let mut b = TopN::new(2);
        assert!(see(&mut b, "a").labelled);
        assert!(see(&mut b, "b").labelled);
        assert!(!see(&mut b, "c").labelled);
    }

    #[test]
    fn a_busier_key_takes_the_least_busy_ones_label() {
        let mut b = TopN::new(2);
        for _ in 0..5 {
            see(&mut b, "a");
        }
        see(&mut b, "b");
        assert_eq!(see(&mut b, "c").evicted, None);
        let s = see(&mut b, "c");
        assert_eq!(s.evicted.as_deref(), Some("b"));
        assert!(!s.labelled, "the promoting occurrence counts as other");
        assert!(see(&mut b, "c").labelled);
        assert!(b.is_labelled("a") && !b.is_labelled("b"));
    }

    #[test]
    fn candidates_are_bounded() {
        let mut b = TopN::new(1);
        see(&mut b, "a");
        see(&mut b, "a");
        for i in 0..100 {
            see(&mut b, &format!("c{i}"));
        }
        assert!(b.candidates() <= 5, "{}", b.candidates());
    }
}
