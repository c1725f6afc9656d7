//! One reconcile pass over the whole fleet, as a pipeline: read the shard
//! template, compute the assignment (pure), write changed assignments to
//! status, then bring the shard Deployments in line (pure build, then
//! server-side apply), rolling at most one shard at a time.

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, ObjectReference, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{OwnerReference, Time};
use k8s_openapi::jiff::Timestamp;
use kube::Resource;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::Store;
use kube::{Api, Client, ResourceExt};
use serde_json::json;

use futures::StreamExt;

use super::assign::{self, SourceLoad};
use super::metrics::OperatorMetrics;
use super::template::{self, HASH_ANNOTATION, ShardTemplate};
use super::{OperatorConfig, shard_name};
use crate::crd::{DataSource, Phase};

/// Field manager of everything the operator writes.
pub const FIELD_MANAGER: &str = "shardpool-operator";

/// What a pass needs.
pub struct Context {
    /// API client.
    pub client: Client,
    /// Settings.
    pub cfg: OperatorConfig,
    /// The operator's own Deployment, owner of the shard workloads (so that
    /// uninstalling the chart removes them through garbage collection).
    pub owner: Option<OwnerReference>,
    /// Publishes Kubernetes Events (assignments, moves, rollouts, errors).
    pub recorder: Recorder,
    /// Counters and gauges served at /metrics.
    pub metrics: OperatorMetrics,
    /// Assignments written whose write the watch has not shown yet, by
    /// source key: (shard, shard count, the resourceVersion written on).
    /// Until the store moves past that version a pass does not write the
    /// same assignment again (with thousands of sources and a lagging
    /// watch, every pass would otherwise rewrite them all, and each
    /// rewrite makes the shards' claims on the older version fail).
    /// Lock held only to read or update, never across an await.
    pub unseen: std::sync::Mutex<std::collections::HashMap<String, (u32, u32, String)>>,
}

/// Why a pass failed; `reason()` is the metric label and Event reason.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The template ConfigMap is missing or unreadable.
    #[error("shard template {0}: {1}")]
    Template(String, String),
    /// An API call failed.
    #[error("kubernetes api: {0}")]
    Api(#[from] kube::Error),
}

impl Error {
    /// Short, stable name of the failure.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Template(..) => "TemplateInvalid",
            Error::Api(_) => "ApiError",
        }
    }
}

/// Finds the Deployment that runs this operator pod (pod -> ReplicaSet ->
/// Deployment), as an owner reference for the shard workloads.
pub async fn own_deployment(client: &Client, cfg: &OperatorConfig) -> Option<OwnerReference> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), &cfg.namespace);
    let pod = pods.get(&cfg.pod_name).await.ok()?;
    let rs_ref = pod
        .owner_references()
        .iter()
        .find(|o| o.kind == "ReplicaSet")?
        .clone();
    let rss: Api<ReplicaSet> = Api::namespaced(client.clone(), &cfg.namespace);
    let rs = rss.get(&rs_ref.name).await.ok()?;
    let d = rs
        .owner_references()
        .iter()
        .find(|o| o.kind == "Deployment")?
        .clone();
    Some(OwnerReference {
        api_version: "apps/v1".into(),
        kind: "Deployment".into(),
        name: d.name,
        uid: d.uid,
        controller: Some(false),
        block_owner_deletion: Some(false),
    })
}

fn read_template(ctx: &Context, configmaps: &Store<ConfigMap>) -> Result<ShardTemplate, Error> {
    let name = ctx.cfg.shard_template.clone();
    let cm = configmaps
        .state()
        .into_iter()
        .find(|c| c.name_any() == name)
        .ok_or_else(|| Error::Template(name.clone(), "not found".into()))?;
    let yaml = cm
        .data
        .as_ref()
        .and_then(|d| d.get("template.yaml"))
        .ok_or_else(|| Error::Template(name.clone(), "no key template.yaml".into()))?;
    ShardTemplate::parse(yaml).map_err(|e| Error::Template(name, e.to_string()))
}

/// What a pass reads, all kept current by watches.
pub struct Stores {
    /// Every DataSource.
    pub sources: Store<DataSource>,
    /// Shard Deployments of this release.
    pub deployments: Store<Deployment>,
    /// The shard template ConfigMap.
    pub configmaps: Store<ConfigMap>,
    /// Shard Leases.
    pub leases: Store<Lease>,
    /// Shard pods of this release.
    pub pods: Store<Pod>,
}

/// Publishes a failed pass as a Warning Event on the operator's own
/// Deployment (`kubectl describe deployment` shows it), reason = the error's.
pub async fn report(ctx: &Context, e: &Error) {
    let Some(owner) = ctx.owner.as_ref() else {
        return;
    };
    let target = k8s_openapi::api::core::v1::ObjectReference {
        api_version: Some(owner.api_version.clone()),
        kind: Some(owner.kind.clone()),
        name: Some(owner.name.clone()),
        namespace: Some(ctx.cfg.namespace.clone()),
        uid: Some(owner.uid.clone()),
        ..Default::default()
    };
    let ev = Event {
        type_: EventType::Warning,
        reason: e.reason().into(),
        note: Some(e.to_string()),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(err) = ctx.recorder.publish(&ev, &target).await {
        tracing::debug!(error = %err, "event not published");
    }
}

/// The whole pass.
pub async fn reconcile(ctx: &Context, stores: &Stores) -> Result<(), Error> {
    let template = read_template(ctx, &stores.configmaps)?;
    let mut template = template;
    let total: u64 = stores.sources.state().iter().map(|d| weight(d)).sum();
    let count = template.shard_count(total);
    if count != template.count && template.autoscale.is_some() {
        tracing::debug!(count, total, "autoscaled shard count");
    }
    template.count = count;
    let leases = stores.leases.state();
    let now = Timestamp::now();
    let alive = |k: u32| {
        let name = shard_name(k);
        leases
            .iter()
            .any(|l| l.name_any() == name && crate::lease::has_live_holder(l, now))
    };
    // The shards first: a shard the count adds starts its pod while the
    // sources that will move to it wait for its Lease (see `limit_moves`).
    ensure_shards(ctx, &template, stores).await?;
    let desired = assign_all(ctx, &stores.sources, template.count, &alive).await?;
    ctx.metrics.record_phases(
        stores
            .sources
            .state()
            .iter()
            .map(|d| d.status.as_ref().and_then(|s| s.phase)),
    );
    ctx.metrics.record_leases(
        template.count,
        &stores.leases.state(),
        k8s_openapi::jiff::Timestamp::now(),
    );
    remove_shards(ctx, &template, stores, &desired).await
}

/// Whether shard `index` finished taking over after a template change: its
/// Deployment settled, its Lease held by a pod of the current template, and
/// every source assigned to it served by that pod and past connecting.
pub fn shard_settled(index: u32, d: &Deployment, hash: &str, stores: &Stores) -> bool {
    if rolling(d) {
        return false;
    }
    let name = shard_name(index);
    let holder = stores
        .leases
        .state()
        .into_iter()
        .find(|l| l.name_any() == name)
        .and_then(|l| l.spec.as_ref().and_then(|s| s.holder_identity.clone()))
        .filter(|h| !h.is_empty());
    let Some(holder) = holder else { return false };
    let holder_current = stores.pods.state().iter().any(|p| {
        p.name_any() == holder
            && p.annotations().get(HASH_ANNOTATION).map(String::as_str) == Some(hash)
    });
    if !holder_current {
        return false;
    }
    stores.sources.state().iter().all(|ds| {
        let st = ds.status.as_ref();
        if ds.spec.paused || st.and_then(|s| s.shard) != Some(index as i32) {
            return true;
        }
        st.and_then(|s| s.served_by.as_deref()) == Some(holder.as_str())
            && matches!(
                st.and_then(|s| s.phase),
                Some(Phase::Ready | Phase::Degraded | Phase::Error)
            )
    })
}

/// Computes the assignment and writes every changed one; returns the shard
/// of each source, by key.
async fn assign_all(
    ctx: &Context,
    sources: &Store<DataSource>,
    count: u32,
    alive: &dyn Fn(u32) -> bool,
) -> Result<Vec<Option<u32>>, Error> {
    let mut all = sources.state();
    all.sort_by_key(|d| (d.namespace(), d.name_any()));
    let loads: Vec<SourceLoad> = all
        .iter()
        .map(|d| SourceLoad {
            key: format!("{}/{}", d.namespace().unwrap_or_default(), d.name_any()),
            weight: weight(d),
            current: d
                .status
                .as_ref()
                .and_then(|s| s.shard)
                .and_then(|s| u32::try_from(s).ok()),
            placed_among: d
                .status
                .as_ref()
                .and_then(|s| s.assigned_among)
                .and_then(|s| u32::try_from(s).ok()),
        })
        .collect();
    let mut result = assign::assign(&loads, count, ctx.cfg.epsilon);
    let deferred = limit_moves(&all, &loads, &mut result, ctx.cfg.max_moves, alive);
    let mut spread = vec![(0u64, 0u64); count as usize];
    for (load, target) in loads.iter().zip(&result) {
        if let Some(slot) = target.and_then(|t| spread.get_mut(t as usize)) {
            slot.0 += 1;
            slot.1 += load.weight;
        }
    }
    ctx.metrics.record_spread(count, &spread);
    // Every pass records the shard count it considered, so only a shard
    // added after this pass can attract the source later; a source whose
    // move the budget deferred keeps the count it had, or it would never
    // move (see `recorded_among`).
    let mut writes = Vec::new();
    let unseen = match ctx.unseen.lock() {
        Ok(mut u) => {
            // Forget writes the watch has shown (or whose source is gone).
            let versions: std::collections::HashMap<&str, Option<&str>> = loads
                .iter()
                .zip(&all)
                .map(|(l, d)| (l.key.as_str(), d.metadata.resource_version.as_deref()))
                .collect();
            u.retain(|k, (_, _, on)| versions.get(k.as_str()) == Some(&Some(on.as_str())));
            u.clone()
        }
        Err(_) => Default::default(),
    };
    for (((ds, load), target), deferred) in all.iter().zip(&loads).zip(&result).zip(&deferred) {
        let Some(target) = *target else { continue };
        let among = recorded_among(load, count, *deferred);
        if let Some((t, a, on)) = unseen.get(&load.key) {
            if *t == target && *a == among && ds.metadata.resource_version.as_deref() == Some(on) {
                // Written already; the watch has not shown it yet.
                continue;
            }
        }
        let paused_phase_missing =
            ds.spec.paused && ds.status.as_ref().and_then(|s| s.phase) != Some(Phase::Paused);
        // A count that changes no later decision is not written (see
        // `placement_matters`): most sources in a rescale.
        let placed = load.placed_among == Some(among)
            || !assign::placement_matters(&load.key, load.placed_among, among);
        if load.current == Some(target) && !paused_phase_missing && placed {
            continue;
        }
        let event = if load.current == Some(target) {
            tracing::debug!(source = %load.key, among, "recording the shard count");
            None
        } else if let Some(from) = load.current {
            tracing::info!(source = %load.key, from, to = target, "moving source");
            ctx.metrics.moves.inc();
            Some((
                "Moved",
                format!("moved from shard {from} to shard {target}"),
            ))
        } else {
            tracing::info!(source = %load.key, shard = target, "assigning source");
            ctx.metrics.assigned.inc();
            Some(("Assigned", format!("assigned to shard {target}")))
        };
        writes.push((ds, target, among, event));
    }
    // Independent writes, many in flight: a first sync of thousands of
    // sources is bounded by round trips, not by the API server.
    let outcomes: Vec<Result<Option<(ObjectReference, Event)>, Error>> =
        futures::stream::iter(writes)
            .map(|(ds, target, among, event)| async move {
                let after = write_assignment(ctx, ds, target, among).await?;
                let before = ds.metadata.resource_version.clone();
                if let (Some(before), true) = (before, after.is_some()) {
                    if after.as_deref() != Some(before.as_str()) {
                        if let Ok(mut u) = ctx.unseen.lock() {
                            u.insert(
                                format!("{}/{}", ds.namespace().unwrap_or_default(), ds.name_any()),
                                (target, among, before),
                            );
                        }
                    }
                }
                Ok(event.map(|(reason, note)| {
                    let ev = Event {
                        type_: EventType::Normal,
                        reason: reason.into(),
                        note: Some(note),
                        action: "Assign".into(),
                        secondary: None,
                    };
                    (ds.object_ref(&()), ev)
                }))
            })
            .buffer_unordered(ASSIGN_CONCURRENCY)
            .collect()
            .await;
    let mut events = Vec::new();
    let mut failure = None;
    for o in outcomes {
        match o {
            Ok(Some(ev)) => events.push(ev),
            Ok(None) => {}
            Err(e) => failure = Some(e),
        }
    }
    // Events only describe what was written: published in the background,
    // so they never delay the assignments themselves.
    if !events.is_empty() {
        let recorder = ctx.recorder.clone();
        tokio::spawn(async move {
            futures::stream::iter(events)
                .for_each_concurrent(EVENT_CONCURRENCY, |(target, ev)| {
                    let recorder = recorder.clone();
                    async move {
                        if let Err(e) = recorder.publish(&ev, &target).await {
                            tracing::debug!(error = %e, "event not published");
                        }
                    }
                })
                .await;
        });
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(result),
    }
}

/// Event publications in flight at once (background).
const EVENT_CONCURRENCY: usize = 8;

/// A source's weight in the load bound: its pool's maxSize.
fn weight(d: &DataSource) -> u64 {
    u64::try_from(d.spec.pool.max_size).unwrap_or(1).max(1)
}

/// Whether a source is between shards: assigned to one, still served by
/// (or not yet released by) another.
fn moving(d: &DataSource) -> bool {
    let s = d.status.as_ref();
    matches!(
        (s.and_then(|s| s.shard), s.and_then(|s| s.serving_shard)),
        (Some(a), Some(b)) if a != b
    )
}

/// Holds moves back: at most `max` sources between shards at once, and
/// none to a shard without a live Lease holder (a shard a scale-up just
/// added is a pod still starting: the source would wait unserved, 12 s on
/// the local cluster, with the router answering 57P03 past its hold). A
/// held-back move keeps its current shard this pass and is chosen again
/// by a later pass. Returns, per source, whether its move was deferred.
pub fn limit_moves(
    all: &[std::sync::Arc<DataSource>],
    loads: &[SourceLoad],
    result: &mut [Option<u32>],
    max: usize,
    alive: &dyn Fn(u32) -> bool,
) -> Vec<bool> {
    let in_flight = all.iter().filter(|d| moving(d)).count();
    limit_moves_with(in_flight, loads, result, max, alive)
}

/// [`limit_moves`] given the number of moves already in flight (pure).
pub fn limit_moves_with(
    in_flight: usize,
    loads: &[SourceLoad],
    result: &mut [Option<u32>],
    max: usize,
    alive: &dyn Fn(u32) -> bool,
) -> Vec<bool> {
    let mut budget = max.saturating_sub(in_flight);
    let mut deferred = vec![false; result.len()];
    for ((load, target), d) in loads.iter().zip(result.iter_mut()).zip(&mut deferred) {
        if let (Some(cur), Some(t)) = (load.current, *target) {
            if cur != t {
                if budget == 0 || !alive(t) {
                    tracing::debug!(source = %load.key, from = cur, to = t, budget, "move deferred");
                    *target = Some(cur);
                    *d = true;
                } else {
                    budget -= 1;
                }
            }
        }
    }
    deferred
}

/// The shard count to record with a source's assignment
/// (`status.assignedAmong`): the pass's count, except for a source whose
/// move the budget deferred, which keeps the count it was placed among, so
/// that the shard it should move to still counts as added since and a
/// later pass moves it. Recording the new count there made a rescale of
/// thousands of sources stop after the first budget's worth of moves (177
/// of 6,000 sources moved from 8 to 9 shards).
pub fn recorded_among(load: &SourceLoad, count: u32, deferred: bool) -> u32 {
    if deferred {
        load.placed_among.unwrap_or(count)
    } else {
        count
    }
}

/// Assignment writes in flight at once.
const ASSIGN_CONCURRENCY: usize = 32;

async fn write_assignment(
    ctx: &Context,
    ds: &DataSource,
    shard: u32,
    among: u32,
) -> Result<Option<String>, Error> {
    let generation = ds.metadata.generation.unwrap_or(0);
    let since = ds
        .status
        .as_ref()
        .and_then(|s| {
            s.conditions
                .iter()
                .find(|c| c.type_ == "Assigned" && c.status == "True")
        })
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| Time(Timestamp::now()));
    let mut status = json!({
        "shard": shard,
        "assignedAmong": among,
        "conditions": [{
            "type": "Assigned",
            "status": "True",
            "reason": crate::crd::reason::ASSIGNED,
            "message": format!("assigned to shard {shard}"),
            "observedGeneration": generation,
            "lastTransitionTime": since,
        }],
    });
    if ds.spec.paused {
        status["phase"] = json!("Paused");
    }
    Ok(crate::crd::apply_status_at(
        &ctx.client,
        &ds.namespace().unwrap_or_default(),
        &ds.name_any(),
        FIELD_MANAGER,
        status,
        None,
    )
    .await?)
}

/// Whether a shard Deployment is still rolling out.
fn rolling(d: &Deployment) -> bool {
    let generation = d.metadata.generation.unwrap_or(0);
    let Some(s) = d.status.as_ref() else {
        return true;
    };
    s.observed_generation.unwrap_or(0) < generation
        || s.updated_replicas.unwrap_or(0) < 1
        || s.available_replicas.unwrap_or(0) < 1
        || s.replicas.unwrap_or(0) > 1
        || s.unavailable_replicas.unwrap_or(0) > 0
}

/// Creates the shards the count lacks and rolls one changed shard at a time.
async fn ensure_shards(ctx: &Context, t: &ShardTemplate, stores: &Stores) -> Result<(), Error> {
    let api: Api<Deployment> = Api::namespaced(ctx.client.clone(), &ctx.cfg.namespace);
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    let existing = stores.deployments.state();
    let find = |name: &str| existing.iter().find(|d| d.name_any() == name).cloned();
    let hash = t.hash();
    // A shard is in rollout from its update until its new pod serves every
    // source; only one at a time.
    let mut busy = existing.iter().any(|d| {
        let index = d
            .labels()
            .get("shardpool.dev/shard")
            .and_then(|s| s.parse::<u32>().ok());
        let updated =
            d.annotations().get(HASH_ANNOTATION).map(String::as_str) == Some(hash.as_str());
        rolling(d) || (updated && index.is_some_and(|k| !shard_settled(k, d, &hash, stores)))
    });
    for k in 0..t.count {
        let name = shard_name(k);
        let want = template::deployment(
            t,
            &ctx.cfg.release,
            &ctx.cfg.namespace,
            k,
            ctx.owner.as_ref(),
        );
        match find(&name) {
            None => {
                tracing::info!(shard = k, "creating shard");
                api.patch(&name, &pp, &Patch::Apply(&want)).await?;
            }
            Some(d) => {
                let current = d.annotations().get(HASH_ANNOTATION).cloned();
                if current.as_deref() == Some(hash.as_str()) {
                    continue;
                }
                if busy {
                    tracing::debug!(
                        shard = k,
                        "template changed; waiting for the shard in rollout"
                    );
                    continue;
                }
                tracing::info!(shard = k, "rolling shard to the new template");
                api.patch(&name, &pp, &Patch::Apply(&want)).await?;
                ctx.metrics.rollouts.inc();
                let ev = Event {
                    type_: EventType::Normal,
                    reason: "RollingShard".into(),
                    note: Some(format!(
                        "shard {k} updated to template {hash}; the next shard waits until its new pod serves every source"
                    )),
                    action: "Rollout".into(),
                    secondary: None,
                };
                if let Err(e) = ctx.recorder.publish(&ev, &d.object_ref(&())).await {
                    tracing::debug!(shard = k, error = %e, "event not published");
                }
                busy = true;
            }
        }
    }
    Ok(())
}

/// Removes the shards beyond the count once no source is assigned to them
/// (`desired`: this pass's assignment).
async fn remove_shards(
    ctx: &Context,
    t: &ShardTemplate,
    stores: &Stores,
    desired: &[Option<u32>],
) -> Result<(), Error> {
    let api: Api<Deployment> = Api::namespaced(ctx.client.clone(), &ctx.cfg.namespace);
    // Shards beyond the count go once no source is assigned to them.
    for d in stores.deployments.state() {
        let index = d
            .labels()
            .get("shardpool.dev/shard")
            .and_then(|s| s.parse::<u32>().ok());
        let Some(index) = index else { continue };
        if index >= t.count && !desired.contains(&Some(index)) {
            tracing::info!(shard = index, "removing shard");
            api.delete(&d.name_any(), &DeleteParams::background())
                .await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn source(name: &str, shard: Option<i32>, serving: Option<i32>) -> Arc<DataSource> {
        let ds: DataSource = serde_json::from_value(json!({
            "apiVersion": "shardpool.dev/v1alpha1",
            "kind": "DataSource",
            "metadata": {"name": name, "namespace": "t"},
            "spec": {"host": "h", "database": "d", "user": "u",
                     "passwordSecretRef": {"name": "s", "key": "k"}},
            "status": {"shard": shard, "servingShard": serving},
        }))
        .expect("a DataSource");
        Arc::new(ds)
    }

    fn load(d: &DataSource) -> SourceLoad {
        SourceLoad {
            key: d.name_any(),
            weight: 1,
            current: d.status.as_ref().and_then(|s| s.shard).map(|s| s as u32),
            placed_among: None,
        }
    }

    #[test]
    fn moves_beyond_the_budget_wait() {
        // One source already between shards; budget 3 leaves room for 2 moves.
        let all = vec![
            source("a", Some(0), Some(1)),
            source("b", Some(0), Some(0)),
            source("c", Some(0), Some(0)),
            source("d", Some(1), Some(1)),
            source("e", None, None),
        ];
        let loads: Vec<SourceLoad> = all.iter().map(|d| load(d)).collect();
        let mut result = vec![Some(0), Some(2), Some(2), Some(2), Some(1)];
        limit_moves(&all, &loads, &mut result, 3, &|_| true);
        assert_eq!(result, vec![Some(0), Some(2), Some(2), Some(1), Some(1)]);
        // A first assignment is never held back.
        let mut result = vec![Some(0), Some(2), Some(2), Some(2), Some(1)];
        limit_moves(&all, &loads, &mut result, 0, &|_| true);
        assert_eq!(result, vec![Some(0), Some(0), Some(0), Some(1), Some(1)]);
    }

    /// Passes of the operator over `fleet` at `shards` shards, each move
    /// acknowledged before the next pass (the budget is the only brake):
    /// returns how often each source moved.
    fn rescale_passes(fleet: &mut [SourceLoad], shards: u32, budget: usize) -> Vec<u32> {
        let mut moved = vec![0u32; fleet.len()];
        for _ in 0..200 {
            let mut result = crate::operator::assign::assign(fleet, shards, 0.1);
            let deferred = limit_moves_with(0, fleet, &mut result, budget, &|_| true);
            let mut changed = false;
            for (i, (s, (t, d))) in fleet
                .iter_mut()
                .zip(result.iter().zip(&deferred))
                .enumerate()
            {
                let among = recorded_among(s, shards, *d);
                let moves = s.current != *t;
                if moves {
                    moved[i] += 1;
                    changed = true;
                }
                // Written with a move, else only where it matters, as the
                // operator does.
                let record = moves
                    || crate::operator::assign::placement_matters(&s.key, s.placed_among, among);
                changed |= record && s.placed_among != Some(among);
                s.current = *t;
                if record {
                    s.placed_among = Some(among);
                }
            }
            if !changed {
                return moved;
            }
        }
        panic!("the assignment never settled");
    }

    #[test]
    fn a_rescale_larger_than_the_move_budget_moves_its_share_over_several_passes() {
        // 6,000 sources on 8 shards, then 9, at most 100 moves per pass: a
        // ninth of the sources must reach the new shard, a budget at a
        // time, and none may move twice.
        let mut fleet: Vec<SourceLoad> = (0..6000)
            .map(|i| SourceLoad {
                key: format!("scale-{}/src-{i}", i % 7),
                weight: 16,
                current: None,
                placed_among: None,
            })
            .collect();
        rescale_passes(&mut fleet, 8, 100);
        let moved = rescale_passes(&mut fleet, 9, 100);
        let share = moved.iter().filter(|&&m| m > 0).count() as f64 / fleet.len() as f64;
        assert!(
            (0.09..=0.14).contains(&share),
            "{:.1} % of the sources moved to the ninth shard; want 9-14 %",
            share * 100.0
        );
        assert!(moved.iter().all(|&m| m <= 1), "a source moved twice");
        assert!(fleet.iter().all(|s| s.current.is_some_and(|c| c < 9)));
    }

    // Scenarios over the fake API server: given the watch caches, one pass
    // makes exactly these writes.
    mod scenarios {
        use http::Method;
        use serde_json::{Value, json};

        use super::super::reconcile;
        use crate::operator::fixture::{
            ApiServer, Call, World, context, lease, settled_deployment, shard_pod, shard_template,
            source,
        };

        const STATUS_A: &str =
            "PATCH /apis/shardpool.dev/v1alpha1/namespaces/t/datasources/a/status";
        const SHARD_0: &str = "PATCH /apis/apps/v1/namespaces/sp/deployments/shardpool-shard-0";
        const SHARD_1: &str = "PATCH /apis/apps/v1/namespaces/sp/deployments/shardpool-shard-1";

        /// The writes that are not Events (those go out in the background).
        fn object_writes(api: &ApiServer) -> Vec<String> {
            api.writes()
                .into_iter()
                .filter(|w| !w.contains("/events"))
                .collect()
        }

        fn is_event(reason: &'static str) -> impl Fn(&Call) -> bool {
            move |c| c.path.contains("/events") && c.body["reason"] == reason
        }

        #[tokio::test]
        async fn a_new_source_is_assigned_and_every_shard_created() {
            let (client, api) = ApiServer::start();
            let ctx = context(client, 100);
            let world = World {
                sources: vec![source("t", "a", Value::Null)],
                template: Some(shard_template(2, "{}")),
                ..Default::default()
            };
            reconcile(&ctx, &world.stores())
                .await
                .expect("the pass succeeds");
            assert_eq!(object_writes(&api), [SHARD_0, SHARD_1, STATUS_A]);
            let status = &api.calls()[2].body["status"];
            assert!(matches!(status["shard"].as_i64(), Some(0 | 1)), "{status}");
            assert_eq!(status["assignedAmong"], 2);
            assert_eq!(status["conditions"][0]["type"], "Assigned");
            assert_eq!(status["conditions"][0]["status"], "True");
            let ev = api
                .wait_for(is_event("Assigned"))
                .await
                .expect("an Assigned Event");
            assert_eq!(ev.body["regarding"]["name"], "a");
            assert_eq!(ev.body["type"], "Normal");
        }

        #[tokio::test]
        async fn a_source_moves_to_a_new_shard_only_once_it_holds_its_lease() {
            // Two sources on shard 0 of 1; among 2, `mover` prefers shard 1
            // and `stayer` shard 0.
            let prefers = |want: u32| {
                (0..100)
                    .map(|i| format!("s{i}"))
                    .find(|n| {
                        let key = format!("t/{n}");
                        let (s0, s1) = (
                            crate::operator::assign::score(&key, 0),
                            crate::operator::assign::score(&key, 1),
                        );
                        (s1 > s0) == (want == 1)
                    })
                    .expect("a source with that preference")
            };
            let (mover, stayer) = (prefers(1), prefers(0));
            let t = shard_template(2, "{}");
            let on_0 = |name: &str| {
                source(
                    "t",
                    name,
                    json!({"shard": 0, "servingShard": 0, "assignedAmong": 1,
                           "servedBy": "p0", "phase": "Ready"}),
                )
            };
            let world = |leases| World {
                sources: vec![on_0(&mover), on_0(&stayer)],
                deployments: vec![settled_deployment(&t, 0), settled_deployment(&t, 1)],
                leases,
                template: Some(t.clone()),
                ..Default::default()
            };
            let writes_of = |api: &ApiServer, name: &str| -> Vec<Call> {
                let path = format!("/datasources/{name}/status");
                api.calls()
                    .into_iter()
                    .filter(|c| c.method == Method::PATCH && c.path.ends_with(&path))
                    .collect()
            };
            // Shard 1's pod has not taken its Lease yet: the mover stays and
            // is not written (it keeps assignedAmong 1, so it still moves
            // later).
            let (client, api) = ApiServer::start();
            reconcile(&context(client, 100), &world(vec![lease(0, "p0")]).stores())
                .await
                .expect("pass");
            assert!(writes_of(&api, &mover).is_empty(), "{:?}", api.writes());
            // Once shard 1 holds its Lease the mover moves.
            let (client, api) = ApiServer::start();
            reconcile(
                &context(client, 100),
                &world(vec![lease(0, "p0"), lease(1, "p1")]).stores(),
            )
            .await
            .expect("pass");
            let writes = writes_of(&api, &mover);
            assert_eq!(writes.len(), 1, "{:?}", api.writes());
            assert_eq!(writes[0].body["status"]["shard"], 1);
            assert_eq!(writes[0].body["status"]["assignedAmong"], 2);
        }

        #[tokio::test]
        async fn a_second_pass_over_what_the_first_wrote_writes_nothing() {
            let t = shard_template(2, "{}");
            let (client, api) = ApiServer::start();
            let first = World {
                sources: vec![source("t", "a", Value::Null)],
                template: Some(t.clone()),
                ..Default::default()
            };
            reconcile(&context(client, 100), &first.stores())
                .await
                .expect("the first pass succeeds");
            let written = api
                .calls()
                .into_iter()
                .find(|c| c.path.ends_with("/datasources/a/status"))
                .expect("a status write")
                .body["status"]
                .clone();

            let (client, api) = ApiServer::start();
            let second = World {
                sources: vec![source("t", "a", written)],
                deployments: vec![settled_deployment(&t, 0), settled_deployment(&t, 1)],
                template: Some(t),
                ..Default::default()
            };
            reconcile(&context(client, 100), &second.stores())
                .await
                .expect("the second pass succeeds");
            assert_eq!(
                api.writes(),
                Vec::<String>::new(),
                "no churn from a settled pass"
            );
        }

        #[tokio::test]
        async fn a_template_change_rolls_one_shard_at_a_time() {
            let old = shard_template(2, "{}");
            let new = shard_template(2, "{rev: \"2\"}");
            assert_ne!(old.hash(), new.hash());
            // A source on each shard; shard 0's served by `served_by`.
            let on_shard_0 = |served_by: &str, phase: &str| {
                source(
                    "t",
                    "a",
                    json!({"shard": 0, "servingShard": 0, "assignedAmong": 2,
                           "servedBy": served_by, "phase": phase}),
                )
            };
            let on_shard_1 = || {
                source(
                    "t",
                    "b",
                    json!({"shard": 1, "servingShard": 1, "assignedAmong": 2,
                           "servedBy": "old-1", "phase": "Ready"}),
                )
            };
            let old_pods = || vec![shard_pod("old-0", &old), shard_pod("old-1", &old)];

            // Both shards on the old template: only shard 0 is updated.
            let (client, api) = ApiServer::start();
            let world = World {
                sources: vec![on_shard_0("old-0", "Ready"), on_shard_1()],
                deployments: vec![settled_deployment(&old, 0), settled_deployment(&old, 1)],
                leases: vec![lease(0, "old-0"), lease(1, "old-1")],
                pods: old_pods(),
                template: Some(new.clone()),
            };
            reconcile(&context(client, 100), &world.stores())
                .await
                .expect("pass");
            assert_eq!(object_writes(&api), [SHARD_0]);
            let ev = api
                .wait_for(is_event("RollingShard"))
                .await
                .expect("a RollingShard Event");
            assert_eq!(ev.body["regarding"]["name"], "shardpool-shard-0");

            // Shard 0 rolled out, but its new pod is still a standby: shard 1 waits.
            let rolled = |holder: &str, served_by: &str, phase: &str| {
                let mut pods = old_pods();
                pods.push(shard_pod("new-0", &new));
                World {
                    sources: vec![on_shard_0(served_by, phase), on_shard_1()],
                    deployments: vec![settled_deployment(&new, 0), settled_deployment(&old, 1)],
                    leases: vec![lease(0, holder), lease(1, "old-1")],
                    pods,
                    template: Some(new.clone()),
                }
            };
            for (holder, served_by, phase) in [
                ("old-0", "old-0", "Ready"),
                ("new-0", "old-0", "Ready"),
                ("new-0", "new-0", "Connecting"),
            ] {
                let (client, api) = ApiServer::start();
                reconcile(
                    &context(client, 100),
                    &rolled(holder, served_by, phase).stores(),
                )
                .await
                .expect("pass");
                assert_eq!(
                    object_writes(&api),
                    Vec::<String>::new(),
                    "lease {holder}, served by {served_by}, {phase}: shard 1 must wait"
                );
            }

            // The new pod holds the Lease and serves its source: shard 1 goes.
            let (client, api) = ApiServer::start();
            reconcile(
                &context(client, 100),
                &rolled("new-0", "new-0", "Ready").stores(),
            )
            .await
            .expect("pass");
            assert_eq!(object_writes(&api), [SHARD_1]);
        }

        #[tokio::test]
        async fn a_shard_beyond_the_count_stays_until_its_sources_may_leave() {
            let t = shard_template(1, "{}");
            let world = || World {
                sources: vec![source(
                    "t",
                    "a",
                    json!({"shard": 1, "servingShard": 1, "assignedAmong": 2,
                           "servedBy": "p1", "phase": "Ready"}),
                )],
                deployments: vec![settled_deployment(&t, 0), settled_deployment(&t, 1)],
                leases: vec![lease(0, "p0"), lease(1, "p1")],
                template: Some(t.clone()),
                ..Default::default()
            };
            // No move budget: the source stays on shard 1, and so does shard 1;
            // nothing is written (the deferred move keeps its assignedAmong).
            let (client, api) = ApiServer::start();
            reconcile(&context(client, 0), &world().stores())
                .await
                .expect("pass");
            assert!(object_writes(&api).is_empty(), "{:?}", object_writes(&api));
            assert!(api.calls().iter().all(|c| c.method != Method::DELETE));

            // With a budget the source moves to shard 0 and shard 1 is removed.
            let (client, api) = ApiServer::start();
            reconcile(&context(client, 100), &world().stores())
                .await
                .expect("pass");
            assert_eq!(
                object_writes(&api),
                [
                    STATUS_A,
                    "DELETE /apis/apps/v1/namespaces/sp/deployments/shardpool-shard-1"
                ]
            );
            assert_eq!(api.calls()[0].body["status"]["shard"], 0);
            let ev = api
                .wait_for(is_event("Moved"))
                .await
                .expect("a Moved Event");
            assert_eq!(ev.body["note"], "moved from shard 1 to shard 0");
        }

        #[tokio::test]
        async fn a_missing_template_fails_the_pass_without_writing() {
            let (client, api) = ApiServer::start();
            let world = World {
                sources: vec![source("t", "a", Value::Null)],
                ..Default::default()
            };
            let err = reconcile(&context(client, 100), &world.stores())
                .await
                .expect_err("no template, no pass");
            assert_eq!(err.reason(), "TemplateInvalid");
            assert!(
                err.to_string().contains("shardpool-shard-template"),
                "{err}"
            );
            assert_eq!(api.writes(), Vec::<String>::new());
        }
    }
}
