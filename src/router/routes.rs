//! The routing table: which shard pod serves a source, rebuilt from watches
//! (never from any Secret): DataSource -> `status.shard` K -> holder of the
//! Lease `shardpool-shard-K` -> that pod's IP. A move a shard told over its
//! link (see [`super::relay`]) stands in for `status.shard` until the watch
//! shows it, for at most [`MOVE_BELIEVED`].

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::runtime::reflector::{ObjectRef, Store};

use crate::crd::{DataSource, Phase};
use crate::lease::shard_lease_name as lease_name;

/// Why a source cannot be reached now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// No such DataSource (or not visible to this client).
    #[error("unknown source")]
    Unknown,
    /// Paused by its owner.
    #[error("source is paused")]
    Paused,
    /// Not assigned to a shard yet.
    #[error("source is not assigned to a shard yet")]
    Unassigned,
    /// The shard has no live holder (handover or pod loss).
    #[error("shard {0} has no serving pod right now")]
    NoHolder(u32),
}

impl RouteError {
    /// Whether waiting may help (handover, assignment in progress).
    pub fn transient(&self) -> bool {
        matches!(self, RouteError::Unassigned | RouteError::NoHolder(_))
    }
}

/// Watch-fed stores the table reads.
#[derive(Clone)]
pub struct Routes {
    /// DataSources, all namespaces.
    pub sources: Store<DataSource>,
    /// Shard Leases in the release namespace.
    pub leases: Store<Lease>,
    /// Shard pods in the release namespace.
    pub pods: Store<Pod>,
    /// Namespace of the Leases and pods.
    pub namespace: String,
    /// Port of the shards' router endpoint.
    pub shard_port: u16,
    /// Signalled on every change of the Leases or pods: a session compares
    /// its epoch at an idle point to see whether its shard may have moved.
    pub changed: std::sync::Arc<crate::watch::Changed>,
    /// Moves told by shards that the watch may not show yet; see
    /// [`Routes::moved`].
    pub moves: Arc<Moves>,
}

/// How long a told move stands in for the watch.
pub const MOVE_BELIEVED: Duration = Duration::from_secs(10);

/// Most told moves kept.
const MAX_MOVES: usize = 20_000;

/// Moves told by shards: `namespace/name` -> (from, to, when told). A std
/// Mutex held for one map operation; taken once per session attach, never
/// per query.
#[derive(Debug, Default)]
pub struct Moves(Mutex<HashMap<String, (u32, u32, Instant)>>);

impl Moves {
    /// Notes that shard `from` let go of `key` and handed it to `to`.
    pub fn note(&self, key: &str, from: u32, to: u32) {
        let now = Instant::now();
        if let Ok(mut m) = self.0.lock() {
            if m.len() >= MAX_MOVES {
                m.retain(|_, (_, _, at)| now.duration_since(*at) < MOVE_BELIEVED);
            }
            if m.len() < MAX_MOVES {
                m.insert(key.to_string(), (from, to, now));
            }
        }
    }

    /// The shard to try for `key` whose DataSource names `shard`: the one a
    /// move told less than [`MOVE_BELIEVED`] ago handed it to, if it was
    /// handed away from `shard`; else `shard`. A move the watch shows, or
    /// an old one, is forgotten.
    pub fn apply(&self, key: &str, shard: u32) -> u32 {
        let Ok(mut m) = self.0.lock() else {
            return shard;
        };
        let Some(&(from, to, at)) = m.get(key) else {
            return shard;
        };
        if from == shard && at.elapsed() < MOVE_BELIEVED {
            return to;
        }
        m.remove(key);
        shard
    }
}

impl Routes {
    /// Changes of the Leases and pods so far (cheap; read per transaction).
    pub fn epoch(&self) -> u64 {
        self.changed.epoch()
    }

    /// Whether the DataSource exists (metrics label only known sources, so
    /// client-chosen names cannot grow the series without bound).
    pub fn known(&self, namespace: &str, name: &str) -> bool {
        self.sources
            .get(&ObjectRef::new(name).within(namespace))
            .is_some()
    }

    /// The address of the shard pod serving `namespace/name`.
    pub fn resolve(&self, namespace: &str, name: &str) -> Result<(u32, SocketAddr), RouteError> {
        let ds = self
            .sources
            .get(&ObjectRef::new(name).within(namespace))
            .ok_or(RouteError::Unknown)?;
        if ds.spec.paused {
            return Err(RouteError::Paused);
        }
        let status = ds.status.as_ref();
        let shard = status
            .and_then(|s| s.shard)
            .and_then(|s| u32::try_from(s).ok())
            .ok_or(RouteError::Unassigned)?;
        if status.and_then(|s| s.phase) == Some(Phase::Paused) {
            return Err(RouteError::Paused);
        }
        let shard = self.moves.apply(&format!("{namespace}/{name}"), shard);
        Ok((shard, self.shard_addr(shard)?))
    }

    /// The address of the pod holding shard `shard`'s Lease.
    pub fn shard_addr(&self, shard: u32) -> Result<SocketAddr, RouteError> {
        let lease = self
            .leases
            .get(&ObjectRef::new(&lease_name(shard)).within(&self.namespace))
            .ok_or(RouteError::NoHolder(shard))?;
        let holder = lease
            .spec
            .as_ref()
            .and_then(|s| s.holder_identity.clone())
            .filter(|h| !h.is_empty())
            .ok_or(RouteError::NoHolder(shard))?;
        let pod = self
            .pods
            .get(&ObjectRef::new(&holder).within(&self.namespace))
            .ok_or(RouteError::NoHolder(shard))?;
        let ip: IpAddr = pod
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.as_deref())
            .and_then(|ip| ip.parse().ok())
            .ok_or(RouteError::NoHolder(shard))?;
        if pod.metadata.deletion_timestamp.is_some() && pod.name_any() != holder {
            return Err(RouteError::NoHolder(shard));
        }
        Ok(SocketAddr::new(ip, self.shard_port))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_told_move_stands_in_only_while_the_watch_names_the_old_shard() {
        let m = Moves::default();
        assert_eq!(m.apply("t/a", 3), 3);
        m.note("t/a", 3, 8);
        assert_eq!(m.apply("t/a", 3), 8, "the watch still names the old shard");
        assert_eq!(m.apply("t/b", 3), 3, "another source");
        assert_eq!(m.apply("t/a", 8), 8, "the watch shows the move");
        assert_eq!(m.apply("t/a", 3), 3, "forgotten once shown");
        m.note("t/a", 3, 8);
        assert_eq!(
            m.apply("t/a", 5),
            5,
            "moved elsewhere since: the watch wins"
        );
        assert_eq!(m.apply("t/a", 3), 3);
    }
}
