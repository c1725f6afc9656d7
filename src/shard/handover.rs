//! Moves between shards without overlap (DESIGN guarantee 5), as one state
//! machine per source. The status field `servingShard` says which shard
//! holds a source's pool:
//!
//! 1. The shard a source is assigned to opens it only when `servingShard`
//!    is unset, is itself, or names a shard whose Lease has no live holder
//!    (that shard is gone). Before opening it claims the source by writing
//!    `servingShard`; the pool's first connection then fences the source by
//!    the database (see [`super::fence`]), which covers a previous owner
//!    that is alive but unreachable.
//! 2. A shard that loses a source (reassigned, paused or deleted) stops
//!    taking transactions on it, lets running ones finish until the drain
//!    deadline, ends the rest, waits until no server connection of it is
//!    open or opening, and only then clears `servingShard` (a JSON patch
//!    that tests the value first): that is the acknowledgement the next
//!    owner waits for. When the source moved to another shard, the same
//!    write hands it over: it sets `servingShard` to the new shard (if the
//!    assignment still names it), so the next owner opens it on seeing the
//!    write, without a claim of its own. At full size a claim was one more
//!    API write in every moved source's critical path (0.75 s median with
//!    666 sources moving at once). Just before that write it tells its
//!    routers, which pass the note to the new owner (see
//!    [`super::released`]): the new owner opens on the note when its view
//!    still names the old shard as serving, without waiting for the write
//!    and its own watch (together 1.3 s median at full size). It reports
//!    the source once the write shows, or, should the old shard die or
//!    lose the API server between note and write, once the old shard's
//!    Lease has expired ([`may_report`]); a stopping shard waits for its
//!    hand-over writes before it lets go of its Lease.
//! 3. A shard named in `servingShard` that neither holds the source nor is
//!    assigned it (a hand-over to it that another move overtook, a claim
//!    whose pool never opened, a release its previous process did not
//!    finish) clears the field, or the next owner would wait for it for as
//!    long as it lives.
//!
//! [`step`] is the pure decision (what to do next with one source, given
//! its DataSource, what this shard holds, and which shards are alive);
//! `sources` carries the steps out. The router follows `status.shard`;
//! until the new owner has opened the source it answers session opens
//! with 57P01 and the router holds them.

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, ResourceExt};
use serde_json::json;

use crate::crd::DataSource;
use crate::lease::shard_lease_name as lease_name;

/// Field manager of the shards' status writes.
pub const FIELD_MANAGER: &str = "shardpool-shard";

/// The key of a DataSource: `namespace/name`.
pub fn key(ds: &DataSource) -> String {
    format!("{}/{}", ds.namespace().unwrap_or_default(), ds.name_any())
}

/// Whether `shard` should serve the source: assigned to it and not paused.
pub fn wanted(ds: &DataSource, shard: u32) -> bool {
    !ds.spec.paused && ds.status.as_ref().and_then(|s| s.shard) == Some(shard as i32)
}

/// Whether the shard with this index has a live Lease holder.
pub fn shard_alive(leases: &Store<Lease>, namespace: &str, shard: u32) -> bool {
    leases
        .get(&ObjectRef::new(&lease_name(shard)).within(namespace))
        .is_some_and(|l| crate::lease::has_live_holder(&l, Timestamp::now()))
}

/// Whether `shard` may open the source now: nobody else serves it, or the
/// shard named as serving it has no live Lease holder.
pub fn may_open(ds: &DataSource, shard: u32, alive: impl Fn(u32) -> bool) -> bool {
    match ds.status.as_ref().and_then(|s| s.serving_shard) {
        None => true,
        Some(s) if s == shard as i32 => true,
        Some(other) => u32::try_from(other).map(|o| !alive(o)).unwrap_or(true),
    }
}

/// What to do next with one source on this shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Not ours, not held: nothing to do.
    Idle,
    /// Ours, but another live shard still serves it: wait for its
    /// acknowledgement (it clears `servingShard`).
    AwaitRelease {
        /// The shard that still serves it.
        from: u32,
    },
    /// Ours and free: write `servingShard` first, then open the pool.
    ClaimAndOpen,
    /// Ours and already named as serving (a restart, a hand-over from the
    /// previous owner, or a claim whose pool failed to build), or the
    /// shard named as serving it said it let go of it: open the pool.
    Open,
    /// Held with an older spec: open a pool from the new spec, drain the old.
    Rebuild,
    /// Held and current.
    Serve,
    /// Held but no longer ours: drain, close, then acknowledge.
    Release,
    /// Not ours and not held, but `servingShard` names this shard: clear it
    /// (nothing to drain).
    Disown,
}

/// The next step for a source, from its DataSource (None when deleted),
/// the generation of the pool this shard holds (None when it holds none),
/// which shards are alive, and which shard said over the links that it
/// released the source to this one (see [`super::released`]; believed only
/// when the DataSource still names that shard as serving it).
pub fn step(
    ds: Option<&DataSource>,
    shard: u32,
    held: Option<i64>,
    alive: impl Fn(u32) -> bool,
    released_by: Option<u32>,
) -> Step {
    let ours = ds.filter(|ds| wanted(ds, shard));
    let named = ds.and_then(|ds| ds.status.as_ref()?.serving_shard) == Some(shard as i32);
    match (ours, held) {
        (None, None) if named => Step::Disown,
        (None, None) => Step::Idle,
        (None, Some(_)) => Step::Release,
        (Some(ds), Some(g)) if ds.metadata.generation.unwrap_or(0) == g => Step::Serve,
        (Some(_), Some(_)) => Step::Rebuild,
        (Some(ds), None) => {
            let serving = ds.status.as_ref().and_then(|s| s.serving_shard);
            if serving == Some(shard as i32) {
                Step::Open
            } else if may_open(ds, shard, alive) {
                Step::ClaimAndOpen
            } else if released_by.is_some() && serving == released_by.map(|s| s as i32) {
                // The serving shard let go of it and said so: its hand-over
                // write (which names this shard) is on its way.
                Step::Open
            } else {
                Step::AwaitRelease {
                    from: serving.and_then(|s| u32::try_from(s).ok()).unwrap_or(0),
                }
            }
        }
    }
}

/// Whether this shard may write the status of a source it holds (the write
/// names it as serving the source, onto the version it read): the watch
/// shows it serving the source (its claim, or the previous owner's
/// hand-over to it), or it opened the source on a release told over the
/// links (`told`, see [`super::released`]) and nobody else may still serve
/// it: the field is unset (the previous owner's write only cleared it, or
/// its successor disowned it) or names a shard whose Lease has no live
/// holder (it stopped, crashed or was cut off between its note and its
/// hand-over write; the write then stands in for the claim a successor
/// makes of a dead shard's source, see [`may_open`]). Without the last
/// case such a source stayed unreported for good: held, served, but never
/// Ready.
pub fn may_report(ds: &DataSource, shard: u32, told: bool, alive: impl Fn(u32) -> bool) -> bool {
    let serving = ds.status.as_ref().and_then(|s| s.serving_shard);
    serving == Some(shard as i32) || (told && may_open(ds, shard, alive))
}

/// Claims the source for `shard` before its pool opens, on exactly the
/// version of the DataSource the decision was made on: when the object
/// changed since (a release or a reassignment the watch has not delivered
/// yet), the API server answers 409 and nothing is written; the next sync
/// decides again from the newer object.
pub async fn claim(
    client: &Client,
    ds: &DataSource,
    shard: u32,
    pod: &str,
) -> Result<(), kube::Error> {
    let status = json!({"servingShard": shard, "servedBy": pod, "phase": "Connecting"});
    crate::crd::apply_status_at(
        client,
        &ds.namespace().unwrap_or_default(),
        &ds.name_any(),
        FIELD_MANAGER,
        status,
        ds.metadata.resource_version.as_deref(),
    )
    .await
    .map(|_| ())
}

/// Acknowledges that `shard` closed the source's pool, in one conditional
/// JSON patch. With `to` (the shard the source is assigned to now) it
/// hands the source over: `servingShard` becomes `to`, and `phase` Pending
/// (assigned, not picked up yet), if `servingShard` still names `shard`
/// and `status.shard` still names `to`. Otherwise, or when the assignment
/// changed since, it clears `servingShard` if it still names `shard`. Call
/// only when no server connection of the source is open or opening on
/// this shard.
pub async fn release(
    client: &Client,
    key: &str,
    shard: u32,
    to: Option<u32>,
) -> Result<(), kube::Error> {
    let (ns, name) = key.split_once('/').unwrap_or(("", key));
    let api: Api<DataSource> = Api::namespaced(client.clone(), ns);
    if let Some(to) = to.filter(|&to| to != shard) {
        let hand_over = json!([
            {"op": "test", "path": "/status/servingShard", "value": shard},
            {"op": "test", "path": "/status/shard", "value": to},
            {"op": "replace", "path": "/status/servingShard", "value": to},
            {"op": "add", "path": "/status/phase", "value": "Pending"},
        ]);
        match patch(&api, name, hand_over).await {
            // 422: a test failed; the plain acknowledgement below decides.
            Err(kube::Error::Api(e)) if e.code == 422 => {}
            other => return other,
        }
    }
    let clear = json!([
        {"op": "test", "path": "/status/servingShard", "value": shard},
        {"op": "remove", "path": "/status/servingShard"},
    ]);
    match patch(&api, name, clear).await {
        // 422: the test failed, someone else serves it now.
        Err(kube::Error::Api(e)) if e.code == 422 => Ok(()),
        other => other,
    }
}

/// Applies a JSON patch to the status; a deleted source (404) is done.
async fn patch(
    api: &Api<DataSource>,
    name: &str,
    ops: serde_json::Value,
) -> Result<(), kube::Error> {
    let ops: json_patch::Patch = serde_json::from_value(ops).map_err(kube::Error::SerdeError)?;
    match api
        .patch_status(name, &PatchParams::default(), &Patch::<()>::Json(ops))
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests;
