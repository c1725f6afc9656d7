//! Moves between shards without overlap (DESIGN guarantee 5). The status
//! field `servingShard` says which shard holds a source's pool:
//!
//! 1. The shard a source is assigned to opens it only when `servingShard`
//!    is unset, is itself, or names a shard whose Lease has no live holder
//!    (that shard is gone, and a dead shard holds no connections). Before
//!    opening it claims the source by writing `servingShard`.
//! 2. A shard that loses a source (reassigned) stops taking transactions on
//!    it, lets running ones finish, closes the pool, and only then clears
//!    `servingShard` (a JSON patch that tests the value first): that is the
//!    acknowledgement the next owner waits for.
//!
//! The router follows `status.shard`; until the new owner has opened the
//! source it answers session opens with 57P01 and the router holds them.

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Patch, PatchParams};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, ResourceExt};
use serde_json::json;

use super::lease_name;
use super::status::FIELD_MANAGER;
use crate::crd::DataSource;

/// Whether the shard with this index has a live Lease holder.
pub fn shard_alive(leases: &Store<Lease>, namespace: &str, shard: u32) -> bool {
    let Some(lease) = leases.get(&ObjectRef::new(&lease_name(shard)).within(namespace)) else {
        return false;
    };
    let Some(spec) = lease.spec.as_ref() else {
        return false;
    };
    if spec.holder_identity.as_deref().is_none_or(str::is_empty) {
        return false;
    }
    let duration = SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(15)));
    match spec.renew_time.as_ref() {
        Some(t) => {
            t.0.checked_add(duration)
                .map(|end| end > Timestamp::now())
                .unwrap_or(true)
        }
        None => true,
    }
}

/// Whether `shard` may open the source now.
pub fn may_open(ds: &DataSource, shard: u32, leases: &Store<Lease>, namespace: &str) -> bool {
    match ds.status.as_ref().and_then(|s| s.serving_shard) {
        None => true,
        Some(s) if s == shard as i32 => true,
        Some(other) => u32::try_from(other)
            .map(|o| !shard_alive(leases, namespace, o))
            .unwrap_or(true),
    }
}

/// Claims the source for `shard` before its pool opens.
pub async fn claim(
    client: &Client,
    ds: &DataSource,
    shard: u32,
    pod: &str,
) -> Result<(), kube::Error> {
    let status = json!({"servingShard": shard, "servedBy": pod, "phase": "Connecting"});
    crate::crd::apply_status(
        client,
        &ds.namespace().unwrap_or_default(),
        &ds.name_any(),
        FIELD_MANAGER,
        status,
    )
    .await
}

/// Acknowledges that `shard` closed the source's pool: clears
/// `servingShard` if it still names `shard`.
pub async fn release(client: &Client, key: &str, shard: u32) -> Result<(), kube::Error> {
    let (ns, name) = key.split_once('/').unwrap_or(("", key));
    let api: Api<DataSource> = Api::namespaced(client.clone(), ns);
    let ops: json_patch::Patch = serde_json::from_value(json!([
        {"op": "test", "path": "/status/servingShard", "value": shard},
        {"op": "remove", "path": "/status/servingShard"},
    ]))
    .map_err(kube::Error::SerdeError)?;
    match api
        .patch_status(name, &PatchParams::default(), &Patch::<()>::Json(ops))
        .await
    {
        Ok(_) => Ok(()),
        // 422: the test failed, someone else serves it now; 404: deleted.
        Err(kube::Error::Api(e)) if e.code == 422 || e.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}
