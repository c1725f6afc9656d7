//! Events for a source's phase changes (to Ready, Degraded or Error), so
//! that `kubectl describe datasource` shows when its pool changed state and
//! why. Two token buckets keep them from flooding the API server: one per
//! source (a few changes in a row pass, then one per interval: a flapping
//! warehouse gives one a minute, not one per flap), and one per shard
//! process (a shard
//! that takes over thousands of sources at once does not write thousands
//! of Events at once). What the limits hold back is counted, not queued.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use kube::runtime::events::{Event, EventType};

use crate::crd::Phase;

/// A token bucket.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// Tokens now.
    tokens: f64,
    /// When `tokens` was last brought up to date.
    at: Instant,
}

impl Bucket {
    /// Takes a token if there is one after refilling at `rate` per second
    /// up to `burst`.
    fn take(&mut self, now: Instant, rate: f64, burst: f64) -> bool {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        self.at = now;
        if self.tokens < 1.0 {
            return false;
        }
        self.tokens -= 1.0;
        true
    }
}

/// Decides which phase changes become Events. Owned by the status task
/// (no locking).
#[derive(Debug)]
pub struct EventGate {
    /// Per source: changes in a row that pass, and the interval at which
    /// one more passes after that.
    source_burst: f64,
    source_every: Duration,
    /// Per shard process: Events per second, and the burst.
    rate: f64,
    burst: f64,
    /// The shard process's bucket.
    shard: Bucket,
    /// Each source's bucket.
    sources: HashMap<String, Bucket>,
}

impl Default for EventGate {
    /// Per source 3 in a row, then one a minute; per shard 10 a second,
    /// bursts of 50.
    fn default() -> Self {
        EventGate::new(3, Duration::from_secs(60), 10.0, 50.0, Instant::now())
    }
}

impl EventGate {
    /// A gate whose buckets start full at `now`.
    pub fn new(
        source_burst: u32,
        source_every: Duration,
        rate: f64,
        burst: f64,
        now: Instant,
    ) -> Self {
        EventGate {
            source_burst: f64::from(source_burst),
            source_every,
            rate,
            burst,
            shard: Bucket {
                tokens: burst,
                at: now,
            },
            sources: HashMap::new(),
        }
    }

    /// Whether `key` may get an Event at `now` (taking its tokens if so).
    pub fn allow(&mut self, key: &str, now: Instant) -> bool {
        let full = Bucket {
            tokens: self.source_burst,
            at: now,
        };
        let mut source = self.sources.get(key).copied().unwrap_or(full);
        let source_rate = 1.0 / self.source_every.as_secs_f64().max(0.001);
        if !source.take(now, source_rate, self.source_burst) {
            self.sources.insert(key.to_string(), source);
            return false;
        }
        if !self.shard.take(now, self.rate, self.burst) {
            return false;
        }
        self.sources.insert(key.to_string(), source);
        true
    }

    /// Forgets sources for which `keep` is false (no longer served).
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        self.sources.retain(|k, _| keep(k));
    }
}

/// The Event for a change from `before` to `after`, when it is one that
/// gets an Event: into Ready (Normal), Degraded or Error (Warning).
/// `reason` is the Ready condition's reason, `message` its message (never
/// a secret: it is the status's lastError at most).
pub fn event(before: Option<Phase>, after: Phase, reason: &str, message: &str) -> Option<Event> {
    if before == Some(after) {
        return None;
    }
    let (type_, name) = match after {
        Phase::Ready => (EventType::Normal, "Ready"),
        Phase::Degraded => (EventType::Warning, "Degraded"),
        Phase::Error => (EventType::Warning, "Error"),
        Phase::Pending | Phase::Connecting | Phase::Paused => return None,
    };
    let from = before.map_or_else(|| "none".to_string(), |p| format!("{p:?}"));
    Some(Event {
        type_,
        reason: name.into(),
        note: Some(format!("{from} -> {name} ({reason}): {message}")),
        action: "Serve".into(),
        secondary: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flapping_source_gets_a_few_events_then_one_per_interval() {
        let t0 = Instant::now();
        let mut g = EventGate::new(3, Duration::from_secs(60), 10.0, 50.0, t0);
        let at = |s: u64| t0 + Duration::from_secs(s);
        // Error, then Ready once fixed, then Degraded: each is an Event.
        assert!(g.allow("t/a", at(0)));
        assert!(g.allow("t/a", at(5)));
        assert!(g.allow("t/a", at(10)));
        // Flapping every 5 s from then on: one more per minute.
        let flaps = (3..60u64).filter(|i| g.allow("t/a", at(i * 5))).count();
        assert!(
            (4..=5).contains(&flaps),
            "{flaps} Events in 285 s of flapping"
        );
        assert!(g.allow("t/b", at(11)), "others are not held back");
    }

    #[test]
    fn thousands_of_sources_at_once_get_the_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut g = EventGate::new(3, Duration::from_secs(60), 10.0, 50.0, t0);
        let first = (0..1000).filter(|i| g.allow(&format!("t/{i}"), t0)).count();
        assert_eq!(first, 50);
        let later = t0 + Duration::from_secs(2);
        let next = (1000..2000)
            .filter(|i| g.allow(&format!("t/{i}"), later))
            .count();
        assert_eq!(next, 20, "10 per second for 2 s");
    }

    #[test]
    fn only_changes_into_ready_degraded_or_error_are_events() {
        assert!(event(Some(Phase::Ready), Phase::Ready, "PoolWarm", "").is_none());
        assert!(event(Some(Phase::Ready), Phase::Connecting, "Connecting", "").is_none());
        assert!(event(None, Phase::Paused, "NotServing", "").is_none());
        let e =
            event(Some(Phase::Connecting), Phase::Ready, "PoolWarm", "12 open").expect("an event");
        assert_eq!(e.reason, "Ready");
        assert!(matches!(e.type_, EventType::Normal));
        assert_eq!(
            e.note.as_deref(),
            Some("Connecting -> Ready (PoolWarm): 12 open")
        );
        let e = event(
            Some(Phase::Ready),
            Phase::Degraded,
            "ConnectionErrors",
            "refused",
        )
        .expect("an event");
        assert!(matches!(e.type_, EventType::Warning));
        assert_eq!(e.reason, "Degraded");
        let e = event(None, Phase::Error, "CannotConnect", "no Secret").expect("an event");
        assert_eq!(e.reason, "Error");
    }
}
