//! The routing table: which shard pod serves a source, rebuilt from watches
//! (never from any Secret): DataSource -> `status.shard` K -> holder of the
//! Lease `shardpool-shard-K` -> that pod's IP.

use std::net::{IpAddr, SocketAddr};

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
        Ok((shard, SocketAddr::new(ip, self.shard_port)))
    }
}
