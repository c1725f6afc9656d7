//! Lease-based ownership (coordination.k8s.io/v1 Lease), used for shard
//! fencing and operator leader election.
//!
//! Acquiring writes this process as `holderIdentity` with optimistic
//! concurrency (resourceVersion), so two contenders cannot both win. Expiry
//! is judged like client-go does: by how long this process has watched the
//! Lease stay unchanged, not by comparing clocks with the holder.
//!
//! The holder must call [`Held::renew`] well within the duration; when
//! renewing has failed for longer than [`LeaseConfig::fence_after`], the
//! holder must stop acting (fence itself) before anyone else could take
//! over: `fence_after` is shorter than the duration by a safety margin.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, OwnerReference};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};

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
    /// How often a contender re-reads the Lease.
    pub retry_every: Duration,
    /// Owner put on the Lease when it is created (the release's operator
    /// Deployment), so uninstalling the release garbage-collects it.
    pub owner: Option<OwnerReference>,
    /// Labels put on the Lease when it is created.
    pub labels: std::collections::BTreeMap<String, String>,
}

impl LeaseConfig {
    /// After this long without a successful renewal, stop acting.
    pub fn fence_after(&self) -> Duration {
        self.duration.saturating_sub(self.duration / 3)
    }
}

/// Lease API failures.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// The API server said no or could not be reached.
    #[error("lease api: {0}")]
    Api(#[from] kube::Error),
    /// Someone else holds it now.
    #[error("lease taken by {0:?}")]
    Lost(Option<String>),
}

/// A Lease we hold.
#[derive(Debug)]
pub struct Held {
    api: Api<Lease>,
    cfg: LeaseConfig,
    lease: Lease,
    /// When the last renewal (or the acquisition) succeeded.
    pub renewed_at: Instant,
}

fn now() -> MicroTime {
    MicroTime(Timestamp::now())
}

fn secs(d: Duration) -> i32 {
    i32::try_from(d.as_secs().max(1)).unwrap_or(i32::MAX)
}

/// Tries once to take the Lease; `observed` tracks (resourceVersion, when
/// first seen) across calls to judge expiry.
async fn try_acquire(
    api: &Api<Lease>,
    cfg: &LeaseConfig,
    observed: &mut Option<(String, Instant)>,
) -> Result<Option<Lease>, kube::Error> {
    let current = match api.get_opt(&cfg.name).await? {
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
            return match api.create(&PostParams::default(), &lease).await {
                Ok(l) => Ok(Some(l)),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(None),
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
            match observed {
                Some((seen_rv, since)) if *seen_rv == rv => since.elapsed() > duration,
                _ => {
                    *observed = Some((rv.clone(), Instant::now()));
                    false
                }
            }
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
    match api.replace(&cfg.name, &PostParams::default(), &next).await {
        Ok(l) => Ok(Some(l)),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(None),
        Err(e) => Err(e),
    }
}

/// Waits until the Lease is ours (free, released, or expired), or until
/// `stop` resolves (then None).
pub async fn acquire(
    api: Api<Lease>,
    cfg: LeaseConfig,
    stop: impl std::future::Future<Output = ()>,
) -> Option<Held> {
    tokio::pin!(stop);
    let mut observed = None;
    loop {
        match try_acquire(&api, &cfg, &mut observed).await {
            Ok(Some(lease)) => {
                tracing::info!(lease = %cfg.name, holder = %cfg.holder, "lease acquired");
                return Some(Held {
                    api,
                    cfg,
                    lease,
                    renewed_at: Instant::now(),
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
        }
    }
}

impl Held {
    /// The configuration it was acquired with.
    pub fn config(&self) -> &LeaseConfig {
        &self.cfg
    }

    /// Renews the claim. `Lost` if someone else holds it now.
    pub async fn renew(&mut self) -> Result<(), LeaseError> {
        let mut next = self.lease.clone();
        if let Some(spec) = next.spec.as_mut() {
            spec.renew_time = Some(now());
        }
        match self
            .api
            .replace(&self.cfg.name, &PostParams::default(), &next)
            .await
        {
            Ok(l) => {
                self.lease = l;
                self.renewed_at = Instant::now();
                Ok(())
            }
            Err(kube::Error::Api(e)) if e.code == 409 => {
                // Someone wrote it: still ours only if we are still the holder.
                let current = self.api.get(&self.cfg.name).await?;
                let holder = current
                    .spec
                    .as_ref()
                    .and_then(|s| s.holder_identity.clone());
                if holder.as_deref() == Some(&self.cfg.holder) {
                    self.lease = current;
                    Box::pin(self.renew()).await
                } else {
                    Err(LeaseError::Lost(holder))
                }
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Whether we must stop acting: renewal has failed for too long.
    pub fn must_fence(&self) -> bool {
        self.renewed_at.elapsed() > self.cfg.fence_after()
    }

    /// Gives the Lease up at once, so a successor need not wait for expiry.
    pub async fn release(mut self) -> Result<(), LeaseError> {
        if let Some(spec) = self.lease.spec.as_mut() {
            spec.holder_identity = None;
            spec.lease_duration_seconds = Some(1);
            spec.renew_time = Some(now());
        }
        self.api
            .replace(&self.cfg.name, &PostParams::default(), &self.lease)
            .await?;
        tracing::info!(lease = %self.cfg.name, "lease released");
        Ok(())
    }
}
