//! Lease-based ownership (coordination.k8s.io/v1 Lease), used for shard
//! fencing and operator leader election.
//!
//! Acquiring writes this process as `holderIdentity` with optimistic
//! concurrency (resourceVersion), so two contenders cannot both win. Expiry
//! is judged like client-go does: by how long this process has watched the
//! Lease stay unchanged, not by comparing clocks with the holder.
//!
//! The holder's own view of its claim is a [`Claim`]: valid until the
//! Lease duration after the moment the last successful renew request was
//! *sent* (an observer starts counting after that write landed, so the
//! holder's view always ends first). [`keep`] renews on a task of its own,
//! every request bounded by [`LeaseConfig::request_timeout`], so a hung API
//! server delays nothing else. A holder that cannot renew is not told to
//! exit: it learns that its claim lapsed ([`Validity::may_act`] turns
//! false) and keeps trying; only a Lease that names another holder ends the
//! tenure ([`Keeper::lost`]).

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, OwnerReference};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

/// Which Lease, who we are, and the timings.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    /// Lease name, e.g. `shardpool-shard-3`.
    pub name: String,
    /// Our identity (the pod name).
    pub holder: String,
    /// How long a holder's claim lasts without renewal.
    pub duration: Duration,
    /// How often the holder renews.
    pub renew_every: Duration,
    /// How often a contender re-reads the Lease, and how soon a holder
    /// retries a failed renewal.
    pub retry_every: Duration,
    /// Bound on one API request (a read or a write); well under
    /// `renew_every`, so a hung API server costs one attempt, not the claim.
    pub request_timeout: Duration,
    /// Owner put on the Lease when it is created (the release's operator
    /// Deployment), so uninstalling the release garbage-collects it.
    pub owner: Option<OwnerReference>,
    /// Labels put on the Lease when it is created.
    pub labels: std::collections::BTreeMap<String, String>,
}

impl LeaseConfig {
    /// Timings derived from the Lease duration: renew every third of it,
    /// retry every half second, each request bounded by the smaller of 2 s
    /// and half the renew interval.
    pub fn timings(duration: Duration) -> (Duration, Duration, Duration) {
        let renew_every = (duration / 3).max(Duration::from_millis(300));
        let request_timeout = (renew_every / 2).min(Duration::from_secs(2));
        (renew_every, Duration::from_millis(500), request_timeout)
    }
}

/// Lease API failures.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// The API server said no or could not be reached.
    #[error("lease api: {0}")]
    Api(#[from] kube::Error),
    /// The API server did not answer within the request timeout.
    #[error("lease api: no answer within {0:?}")]
    Timeout(Duration),
    /// Someone else holds it now.
    #[error("lease taken by {0:?}")]
    Lost(Option<String>),
}

/// The holder's view of its claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// Ours until this instant, unless renewed (may lie in the past: lapsed).
    Until(Instant),
    /// The Lease names another holder (or none, after our release).
    Lost(Option<String>),
}

/// A cheap, cloneable view of the claim for code that must not act without
/// it (opening server connections, leading).
#[derive(Debug, Clone)]
pub struct Validity(watch::Receiver<Claim>);

impl Validity {
    /// Whether the claim is certainly still ours now.
    pub fn may_act(&self) -> bool {
        matches!(*self.0.borrow(), Claim::Until(t) if Instant::now() < t)
    }

    /// The current claim.
    pub fn claim(&self) -> Claim {
        self.0.borrow().clone()
    }

    /// A validity that is always granted (tests and tools without a Lease).
    pub fn always() -> Validity {
        let far = Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600);
        let (tx, rx) = watch::channel(Claim::Until(far));
        // The receiver keeps the last value after the sender is gone.
        drop(tx);
        Validity(rx)
    }

    /// A validity driven by hand (tests).
    pub fn manual(claim: Claim) -> (watch::Sender<Claim>, Validity) {
        let (tx, rx) = watch::channel(claim);
        (tx, Validity(rx))
    }
}

/// A Lease we hold.
#[derive(Debug)]
pub struct Held {
    api: Api<Lease>,
    cfg: LeaseConfig,
    lease: Lease,
    /// When the claim lapses unless renewed: the send time of the last
    /// successful write plus the duration.
    valid_until: Instant,
}

fn now() -> MicroTime {
    MicroTime(Timestamp::now())
}

fn secs(d: Duration) -> i32 {
    i32::try_from(d.as_secs().max(1)).unwrap_or(i32::MAX)
}

/// Runs one API request with the configured bound.
async fn bounded<T>(
    cfg: &LeaseConfig,
    f: impl std::future::Future<Output = Result<T, kube::Error>>,
) -> Result<T, LeaseError> {
    match tokio::time::timeout(cfg.request_timeout, f).await {
        Ok(r) => r.map_err(LeaseError::from),
        Err(_) => Err(LeaseError::Timeout(cfg.request_timeout)),
    }
}

/// Tracks how long a contender has seen the Lease unchanged: expiry is
/// judged by this process's clock, from when it first saw a version.
#[derive(Debug, Default)]
struct Observed(Option<(String, Instant)>);

impl Observed {
    /// Whether a Lease at `rv` with this duration, held by someone else,
    /// has stayed unchanged for longer than its duration.
    fn expired(&mut self, rv: &str, duration: Duration) -> bool {
        match &self.0 {
            Some((seen, since)) if seen == rv => since.elapsed() > duration,
            _ => {
                self.0 = Some((rv.to_string(), Instant::now()));
                false
            }
        }
    }
}

/// Tries once to take the Lease.
async fn try_acquire(
    api: &Api<Lease>,
    cfg: &LeaseConfig,
    observed: &mut Observed,
) -> Result<Option<Lease>, LeaseError> {
    let current = match bounded(cfg, api.get_opt(&cfg.name)).await? {
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(cfg.name.clone()),
                    labels: Some(cfg.labels.clone()),
                    owner_references: cfg.owner.clone().map(|o| vec![o]),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(cfg.holder.clone()),
                    lease_duration_seconds: Some(secs(cfg.duration)),
                    acquire_time: Some(now()),
                    renew_time: Some(now()),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match bounded(cfg, api.create(&PostParams::default(), &lease)).await {
                Ok(l) => Ok(Some(l)),
                Err(LeaseError::Api(kube::Error::Api(e))) if e.code == 409 => Ok(None),
                Err(e) => Err(e),
            };
        }
        Some(l) => l,
    };
    let spec = current.spec.clone().unwrap_or_default();
    let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
    let rv = current
        .metadata
        .resource_version
        .clone()
        .unwrap_or_default();
    let free = match &holder {
        None => true,
        Some(h) if *h == cfg.holder => true,
        Some(_) => {
            let duration = Duration::from_secs(
                u64::try_from(spec.lease_duration_seconds.unwrap_or(15)).unwrap_or(15),
            );
            observed.expired(&rv, duration)
        }
    };
    if !free {
        return Ok(None);
    }
    let transitions =
        spec.lease_transitions.unwrap_or(0) + i32::from(holder.as_deref() != Some(&cfg.holder));
    let mut next = current.clone();
    next.spec = Some(LeaseSpec {
        holder_identity: Some(cfg.holder.clone()),
        lease_duration_seconds: Some(secs(cfg.duration)),
        acquire_time: Some(now()),
        renew_time: Some(now()),
        lease_transitions: Some(transitions),
        ..Default::default()
    });
    match bounded(cfg, api.replace(&cfg.name, &PostParams::default(), &next)).await {
        Ok(l) => Ok(Some(l)),
        Err(LeaseError::Api(kube::Error::Api(e))) if e.code == 409 => Ok(None),
        Err(e) => Err(e),
    }
}

/// Waits until the Lease is ours (free, released, or expired), or until
/// `stop` resolves (then None). Tries every `retry_every`.
pub async fn acquire(
    api: Api<Lease>,
    cfg: LeaseConfig,
    stop: impl std::future::Future<Output = ()>,
) -> Option<Held> {
    acquire_nudged(api, cfg, stop, std::future::pending).await
}

/// [`acquire`], also trying as soon as a future from `nudge` resolves:
/// a standby shard's watch of the Leases says when its predecessor
/// released the Lease, which would otherwise wait for the next retry
/// (up to `retry_every`) in every rollout.
pub async fn acquire_nudged<F: std::future::Future<Output = ()>>(
    api: Api<Lease>,
    cfg: LeaseConfig,
    stop: impl std::future::Future<Output = ()>,
    mut nudge: impl FnMut() -> F,
) -> Option<Held> {
    tokio::pin!(stop);
    let mut observed = Observed::default();
    loop {
        let sent = Instant::now();
        match try_acquire(&api, &cfg, &mut observed).await {
            Ok(Some(lease)) => {
                tracing::info!(lease = %cfg.name, holder = %cfg.holder, "lease acquired");
                let valid_until = sent + cfg.duration;
                return Some(Held {
                    api,
                    cfg,
                    lease,
                    valid_until,
                });
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(lease = %cfg.name, error = %e, "lease acquisition attempt failed")
            }
        }
        tokio::select! {
            _ = &mut stop => return None,
            _ = tokio::time::sleep(cfg.retry_every) => {}
            _ = nudge() => {}
        }
    }
}

impl Held {
    /// The configuration it was acquired with.
    pub fn config(&self) -> &LeaseConfig {
        &self.cfg
    }

    /// Until when the claim is valid without another renewal.
    pub fn valid_until(&self) -> Instant {
        self.valid_until
    }

    /// Renews the claim once, every request bounded by the request
    /// timeout. On success the claim is valid for the duration from when
    /// the request was sent. `Lost` if someone else holds it now.
    pub async fn renew(&mut self) -> Result<(), LeaseError> {
        let sent = Instant::now();
        let mut next = self.lease.clone();
        if let Some(spec) = next.spec.as_mut() {
            spec.renew_time = Some(now());
        }
        let written = bounded(
            &self.cfg,
            self.api
                .replace(&self.cfg.name, &PostParams::default(), &next),
        )
        .await;
        match written {
            Ok(l) => {
                self.lease = l;
                self.valid_until = sent + self.cfg.duration;
                Ok(())
            }
            Err(LeaseError::Api(kube::Error::Api(e))) if e.code == 409 => {
                // Someone wrote it: still ours only if we are still the holder.
                let current = bounded(&self.cfg, self.api.get(&self.cfg.name)).await?;
                let holder = current
                    .spec
                    .as_ref()
                    .and_then(|s| s.holder_identity.clone());
                if holder.as_deref() != Some(&self.cfg.holder) {
                    return Err(LeaseError::Lost(holder));
                }
                let sent = Instant::now();
                let mut next = current;
                if let Some(spec) = next.spec.as_mut() {
                    spec.renew_time = Some(now());
                }
                let l = bounded(
                    &self.cfg,
                    self.api
                        .replace(&self.cfg.name, &PostParams::default(), &next),
                )
                .await?;
                self.lease = l;
                self.valid_until = sent + self.cfg.duration;
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Gives the Lease up at once, so a successor need not wait for expiry.
    pub async fn release(mut self) -> Result<(), LeaseError> {
        if let Some(spec) = self.lease.spec.as_mut() {
            spec.holder_identity = None;
            spec.lease_duration_seconds = Some(1);
            spec.renew_time = Some(now());
        }
        bounded(
            &self.cfg,
            self.api
                .replace(&self.cfg.name, &PostParams::default(), &self.lease),
        )
        .await?;
        tracing::info!(lease = %self.cfg.name, "lease released");
        Ok(())
    }
}

/// The renewal task of a held Lease and the claim it maintains.
#[derive(Debug)]
pub struct Keeper {
    /// The claim as the renewal task last wrote it.
    claim: watch::Receiver<Claim>,
    /// Asks the renewal task to stop and hand the Lease back.
    stop: Option<oneshot::Sender<()>>,
    /// The renewal task; returns the Lease unless it was lost.
    task: tokio::task::JoinHandle<Option<Held>>,
}

/// Renews `held` on a task of its own until it is lost or
/// [`Keeper::release`]d. A failed or timed-out renewal is retried every
/// `retry_every`; once the claim has lapsed it is logged once, and renewal
/// goes on (the API server may come back, and nobody may have taken over).
pub fn keep(held: Held) -> Keeper {
    let (tx, rx) = watch::channel(Claim::Until(held.valid_until));
    let (stop_tx, mut stop_rx) = oneshot::channel();
    let task = tokio::spawn(async move {
        let mut held = held;
        let mut next = Instant::now() + held.cfg.renew_every;
        let mut lapsed_logged = false;
        loop {
            tokio::select! {
                _ = &mut stop_rx => return Some(held),
                _ = tokio::time::sleep_until(next) => {}
            }
            match held.renew().await {
                Ok(()) => {
                    if lapsed_logged {
                        tracing::info!(lease = %held.cfg.name, "lease renewed again after a lapse");
                    }
                    lapsed_logged = false;
                    let _ = tx.send(Claim::Until(held.valid_until));
                    next = Instant::now() + held.cfg.renew_every;
                }
                Err(LeaseError::Lost(by)) => {
                    tracing::error!(lease = %held.cfg.name, holder = ?by, "lease lost to another holder");
                    let _ = tx.send(Claim::Lost(by));
                    return None;
                }
                Err(e) => {
                    let lapsed = Instant::now() >= held.valid_until;
                    if lapsed && !lapsed_logged {
                        tracing::error!(lease = %held.cfg.name, error = %e, "lease not renewed in time: the claim may have expired; acting only on what is already open, and retrying");
                        lapsed_logged = true;
                    } else if !lapsed {
                        tracing::warn!(lease = %held.cfg.name, error = %e, "lease renewal failed; retrying");
                    }
                    next = Instant::now() + held.cfg.retry_every;
                }
            }
        }
    });
    Keeper {
        claim: rx,
        stop: Some(stop_tx),
        task,
    }
}

impl Keeper {
    /// A view of the claim for code that must not act without it.
    pub fn validity(&self) -> Validity {
        Validity(self.claim.clone())
    }

    /// Resolves when another holder owns the Lease; never otherwise.
    pub async fn lost(&self) -> Option<String> {
        let mut rx = self.claim.clone();
        loop {
            if let Claim::Lost(by) = &*rx.borrow_and_update() {
                return by.clone();
            }
            if rx.changed().await.is_err() {
                // The task ended without saying Lost (released): never resolve.
                std::future::pending::<()>().await;
            }
        }
    }

    /// Stops renewing and gives the Lease up (bounded by the request
    /// timeout). Nothing to release if it was lost meanwhile.
    pub async fn release(mut self) -> Result<(), LeaseError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match (&mut self.task).await {
            Ok(Some(held)) => held.release().await,
            Ok(None) => Err(LeaseError::Lost(None)),
            Err(_) => Err(LeaseError::Lost(None)),
        }
    }
}

impl Drop for Keeper {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests;

/// Name of shard K's Lease (and of its Deployment): every role finds shard
/// K's holder by it.
pub fn shard_lease_name(index: u32) -> String {
    format!("shardpool-shard-{index}")
}

/// Whether `lease` has a holder whose claim has not run out at `now` (as
/// its watchers see it: renewTime plus leaseDurationSeconds, 15 s when
/// unset; a holder with no renewTime yet counts as live).
pub fn has_live_holder(lease: &Lease, now: Timestamp) -> bool {
    let Some(spec) = lease.spec.as_ref() else {
        return false;
    };
    if spec.holder_identity.as_deref().is_none_or(str::is_empty) {
        return false;
    }
    let duration = k8s_openapi::jiff::SignedDuration::from_secs(i64::from(
        spec.lease_duration_seconds.unwrap_or(15),
    ));
    match spec.renew_time.as_ref() {
        Some(t) => {
            t.0.checked_add(duration)
                .map(|end| end > now)
                .unwrap_or(true)
        }
        None => true,
    }
}
