//! Writes each served source's phase, connection counts and last error to
//! its DataSource status with server-side apply (field manager
//! `shardpool-shard`), only when they changed, at most once per pass, and
//! each only onto the version of the DataSource that showed the source
//! assigned to this shard (a conditional apply; 409 means "decide again").

use std::collections::HashMap;

use futures::StreamExt;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::events::Recorder;
use kube::runtime::reflector::Store;
use kube::{Client, Resource, ResourceExt};
use serde_json::json;

use super::handover::{self, FIELD_MANAGER};
use super::phase_events;
use super::pool;
use super::registry::Registry;
use crate::crd::{DataSource, Phase, reason};

/// Why a source could not be served, by key; shown in its status (no secrets).
pub type BuildFailures = HashMap<String, String>;

/// Status writes in flight at once.
const STATUS_CONCURRENCY: usize = 16;

/// What was last written per source, to write only changes.
pub type Written = HashMap<String, Entry>;

/// The last status write of one source.
#[derive(Debug, Clone)]
pub struct Entry {
    /// What it said.
    obs: Observed,
    /// The resourceVersion it was made on. While the watch still shows this
    /// version the write has not come back yet, and another write now
    /// would be refused (409): the next one waits for it.
    on_version: Option<String>,
    /// The DataSource's uid: a source deleted and created again under the
    /// same name is a new object, whose status nothing has written yet.
    uid: Option<String>,
}

/// Whether a status that now says `obs` is due, after `last` was written.
///
/// The connection counts are written with a change of phase, error or
/// generation, never on their own: they change with every transaction and
/// every replaced connection, and thousands of sources writing them would
/// keep the API server busy for nothing (the live counts are metrics:
/// `shardpool_pool_connections`). The status says what the pool held when
/// its phase last changed.
fn due(last: Option<&Entry>, obs: &Observed, version: Option<&str>, uid: Option<&str>) -> bool {
    let Some(last) = last else { return true };
    if last.uid.as_deref() != uid {
        return true;
    }
    if last.on_version.is_some() && last.on_version.as_deref() == version {
        return false;
    }
    last.obs.phase != obs.phase
        || last.obs.last_error != obs.last_error
        || last.obs.generation != obs.generation
}

/// The status fields a shard owns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    /// Phase.
    pub phase: Phase,
    /// (open, idle, in use).
    pub counts: (usize, usize, usize),
    /// Secret-free error.
    pub last_error: Option<String>,
    /// Generation acted on.
    pub generation: i64,
}

/// Computes the phase of a served source.
pub fn observe(s: &super::registry::Source, min_idle: usize) -> Observed {
    let counts = pool::counts(&s.pool);
    let manager = s.pool.manager();
    let health = manager.health();
    let (connected, _) = manager.connects();
    Observed {
        phase: phase_of(counts.0, min_idle, manager.is_warm(), &health, connected),
        counts,
        last_error: health.last_error,
        generation: s.generation(),
    }
}

/// The phase of a served source from its open connections, whether its
/// pool has been warm (held minIdle) since it was built, its recent
/// connection outcome and its successful connects (pure).
///
/// A warm pool refilling without a failed attempt stays Ready: renewing a
/// connection after maxLifetime, or replacing one the server closed, is
/// upkeep, not a change a status write or an Event should tell (at 72,000
/// connections renewed hourly that would be thousands of writes a minute).
pub fn phase_of(
    open: usize,
    min_idle: usize,
    warm: bool,
    health: &pool::Health,
    connected: u64,
) -> Phase {
    if (open >= min_idle || warm) && health.failures == 0 {
        Phase::Ready
    } else if health.fencing {
        // The warehouse refused fencing: configured, reachable, not opened.
        Phase::Degraded
    } else if health.failures > 0 && open == 0 && connected == 0 {
        // Never connected on this shard: misconfigured or unreachable. A
        // source that served and now fails (a warehouse restarting, a
        // network fault) is Degraded instead, and recovers on its own.
        Phase::Error
    } else if health.failures > 0 {
        Phase::Degraded
    } else {
        Phase::Connecting
    }
}

/// One pass: observe every source this shard is responsible for and apply
/// the changed ones.
#[allow(clippy::too_many_arguments)]
pub async fn write(
    client: &Client,
    store: &Store<DataSource>,
    shard: u32,
    pod: &str,
    registry: &Registry,
    failures: &BuildFailures,
    written: &mut Written,
    metrics: &super::metrics::ShardMetrics,
    events: &mut Events,
    alive: impl Fn(u32) -> bool,
) {
    let mut due_now = Vec::new();
    for ds in store.state() {
        if !handover::wanted(&ds, shard) {
            continue;
        }
        let key = handover::key(&ds);
        let obs = if let Some(s) = registry.get(&key) {
            observe(&s, usize::try_from(ds.spec.pool.min_idle).unwrap_or(0))
        } else if let Some(err) = failures.get(&key) {
            Observed {
                phase: Phase::Error,
                counts: (0, 0, 0),
                last_error: Some(err.clone()),
                generation: ds.metadata.generation.unwrap_or(0),
            }
        } else {
            continue;
        };
        if !due(
            written.get(&key),
            &obs,
            ds.metadata.resource_version.as_deref(),
            ds.metadata.uid.as_deref(),
        ) {
            continue;
        }
        // A source this shard holds is written only once the watch shows
        // the claim or the hand-over to it (a write before that would be
        // refused, 409), or, when it was opened on a release told over the
        // links, shows no live shard serving it (see handover::may_report).
        let serving = ds.status.as_ref().and_then(|s| s.serving_shard);
        if serving == Some(shard as i32) {
            registry.set_told(&key, false);
        }
        if registry.get(&key).is_some()
            && !handover::may_report(&ds, shard, registry.told(&key), &alive)
        {
            continue;
        }
        due_now.push((ds, key, obs));
    }
    // Independent writes, several in flight: a shard taking over hundreds
    // of sources reports them in a few round trips' time.
    let done: Vec<(String, Entry, Option<PhaseEvent>)> = futures::stream::iter(due_now)
        .map(|(ds, key, obs)| async move {
            match apply(client, &ds, shard, pod, &obs).await {
                Ok(after) => {
                    let before = ds.metadata.resource_version.clone();
                    // A write that changed nothing leaves the version as it
                    // was: then there is nothing to wait for.
                    let on_version = if after.is_some() && after != before { before } else { None };
                    let (reason, message) = ready_condition(&obs, shard);
                    let was = ds.status.as_ref().and_then(|s| s.phase);
                    let event = phase_events::event(was, obs.phase, reason, &message)
                        .map(|e| (e, ds.object_ref(&())));
                    Some((
                        key,
                        Entry {
                            obs,
                            on_version,
                            uid: ds.metadata.uid.clone(),
                        },
                        event,
                    ))
                }
                Err(e) if crate::crd::is_conflict(&e) => {
                    metrics
                        .conflicts
                        .get_or_create(&super::metrics::Refused { write: "status" })
                        .inc();
                    // Changed since this pass read it (perhaps reassigned and
                    // already claimed by another shard): decided again on
                    // the next pass, from the newer object.
                    tracing::debug!(source = %key, "status not written: the DataSource changed since it was read");
                    None
                }
                Err(e) => {
                    tracing::warn!(source = %key, error = %e, "status write failed");
                    None
                }
            }
        })
        .buffer_unordered(STATUS_CONCURRENCY)
        .filter_map(futures::future::ready)
        .collect()
        .await;
    for (key, entry, event) in done {
        if let Some((event, regarding)) = event {
            events.publish(&key, event, regarding);
        }
        written.insert(key, entry);
    }
    written.retain(|k, _| registry.get(k).is_some() || failures.contains_key(k));
    events
        .gate
        .retain(|k| registry.get(k).is_some() || failures.contains_key(k));
}

/// A phase change's Event and the DataSource it is about.
type PhaseEvent = (kube::runtime::events::Event, ObjectReference);

/// Publishes phase-change Events through the gate (see [`phase_events`]).
pub struct Events {
    /// The recorder (its writes are bounded by a timeout each).
    recorder: Recorder,
    /// Which changes become Events. Used only by the status task.
    gate: phase_events::EventGate,
    /// Changes the gate held back.
    suppressed: prometheus_client::metrics::counter::Counter,
}

impl Events {
    /// Events through `recorder`, counting suppressed ones in `suppressed`.
    pub fn new(
        recorder: Recorder,
        suppressed: prometheus_client::metrics::counter::Counter,
    ) -> Events {
        Events {
            recorder,
            gate: phase_events::EventGate::default(),
            suppressed,
        }
    }

    /// Publishes `event` about `key` in the background, if the gate allows.
    fn publish(
        &mut self,
        key: &str,
        event: kube::runtime::events::Event,
        regarding: ObjectReference,
    ) {
        if !self.gate.allow(key, std::time::Instant::now()) {
            self.suppressed.inc();
            return;
        }
        let recorder = self.recorder.clone();
        let key = key.to_string();
        tokio::spawn(async move {
            let publish = recorder.publish(&event, &regarding);
            match tokio::time::timeout(std::time::Duration::from_secs(10), publish).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(source = %key, error = %e, "event not published"),
                Err(_) => tracing::debug!(source = %key, "event not published: no answer"),
            }
        });
    }
}

/// The Ready condition's reason and message for `obs`.
fn ready_condition(obs: &Observed, shard: u32) -> (&'static str, String) {
    match obs.phase {
        Phase::Ready => (
            reason::POOL_WARM,
            format!("{} connections open on shard {shard}", obs.counts.0),
        ),
        Phase::Connecting => (
            reason::CONNECTING,
            format!("opening connections on shard {shard}"),
        ),
        Phase::Degraded => (
            reason::CONNECTION_ERRORS,
            obs.last_error.clone().unwrap_or_default(),
        ),
        Phase::Error => (
            reason::CANNOT_CONNECT,
            obs.last_error.clone().unwrap_or_default(),
        ),
        Phase::Pending | Phase::Paused => (reason::NOT_SERVING, String::new()),
    }
}

async fn apply(
    client: &Client,
    ds: &DataSource,
    shard: u32,
    pod: &str,
    obs: &Observed,
) -> Result<Option<String>, kube::Error> {
    let _ns = ds.namespace().unwrap_or_default();
    let ready = obs.phase == Phase::Ready;
    let previous = ds
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
        .filter(|c| (c.status == "True") == ready)
        .map(|c| c.last_transition_time.clone());
    let since = previous.unwrap_or_else(|| Time(Timestamp::now()));
    let (reason, message) = ready_condition(obs, shard);
    let status = json!({
            "phase": obs.phase,
            "connections": {"open": obs.counts.0, "idle": obs.counts.1, "inUse": obs.counts.2},
            "lastError": obs.last_error,
            "observedGeneration": obs.generation,
            "servedBy": pod,
            "servingShard": shard,
            "conditions": [{
                "type": "Ready",
                "status": if ready { "True" } else { "False" },
                "reason": reason,
                "message": message,
                "observedGeneration": obs.generation,
                "lastTransitionTime": since,
            }],
    });
    // Only onto the version this pass saw assigned to this shard: a write
    // still in flight when the source was reassigned, released and claimed
    // by its next shard must not name this shard as serving it again.
    crate::crd::apply_status_at(
        client,
        &ds.namespace().unwrap_or_default(),
        &ds.name_any(),
        FIELD_MANAGER,
        status,
        ds.metadata.resource_version.as_deref(),
    )
    .await
}

#[cfg(test)]
mod due_tests {
    use super::*;

    fn obs(phase: Phase, counts: (usize, usize, usize)) -> Observed {
        Observed {
            phase,
            counts,
            last_error: None,
            generation: 1,
        }
    }

    fn entry(o: Observed, on: Option<&str>, _ago: std::time::Duration) -> Entry {
        Entry {
            obs: o,
            on_version: on.map(str::to_string),
            uid: Some("u1".into()),
        }
    }

    #[test]
    fn a_change_of_phase_is_written_once_the_last_write_came_back() {
        let last = entry(
            obs(Phase::Connecting, (3, 3, 0)),
            Some("10"),
            Default::default(),
        );
        let now = obs(Phase::Ready, (12, 12, 0));
        assert!(
            due(None, &now, Some("10"), Some("u1")),
            "nothing written yet"
        );
        assert!(
            !due(Some(&last), &now, Some("10"), Some("u1")),
            "the watch has not shown the last write: a write now is refused"
        );
        assert!(due(Some(&last), &now, Some("11"), Some("u1")));
    }

    #[test]
    fn connection_counts_alone_are_never_written() {
        let old = entry(
            obs(Phase::Ready, (12, 12, 0)),
            None,
            std::time::Duration::from_secs(3600),
        );
        assert!(!due(
            Some(&old),
            &obs(Phase::Ready, (12, 10, 2)),
            Some("11"),
            Some("u1")
        ));
        assert!(!due(
            Some(&old),
            &obs(Phase::Ready, (14, 12, 2)),
            Some("11"),
            Some("u1")
        ));
        assert!(due(
            Some(&old),
            &obs(Phase::Degraded, (14, 12, 2)),
            Some("11"),
            Some("u1")
        ));
    }

    #[test]
    fn a_source_created_again_under_the_same_name_is_written() {
        let old = entry(obs(Phase::Ready, (4, 4, 0)), None, Default::default());
        let now = obs(Phase::Ready, (4, 4, 0));
        assert!(!due(Some(&old), &now, Some("20"), Some("u1")));
        assert!(
            due(Some(&old), &now, Some("20"), Some("u2")),
            "a new object with the same name and phase has no status yet"
        );
    }
}

#[cfg(test)]
mod phase_tests {
    use super::*;

    fn failing(n: u32) -> pool::Health {
        pool::Health {
            last_error: (n > 0).then(|| "connection refused".into()),
            failures: n,
            ..Default::default()
        }
    }

    #[test]
    fn a_warm_pool_refilling_without_failures_stays_ready() {
        let ok = failing(0);
        // Warming: below minIdle and never warm.
        assert_eq!(phase_of(3, 12, false, &ok, 3), Phase::Connecting);
        assert_eq!(phase_of(12, 12, false, &ok, 12), Phase::Ready);
        // One connection renewed after maxLifetime (or closed by the
        // server) and not yet replaced: still Ready.
        assert_eq!(phase_of(11, 12, true, &ok, 13), Phase::Ready);
        // The refill fails: Degraded; never connected at all: Error.
        assert_eq!(phase_of(11, 12, true, &failing(1), 13), Phase::Degraded);
        assert_eq!(phase_of(0, 12, false, &failing(2), 0), Phase::Error);
        let fencing = pool::Health {
            fencing: true,
            ..failing(1)
        };
        assert_eq!(phase_of(0, 12, false, &fencing, 0), Phase::Degraded);
    }
}
