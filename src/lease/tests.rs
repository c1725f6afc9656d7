//! Lease scenarios over a fake API server that stores one Lease with
//! optimistic concurrency, can delay or withhold its answers, and runs on
//! tokio's paused clock, so timings are exact and the tests instant.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::client::Body;
use kube::{Api, Client};
use serde_json::{Value, json};
use tokio::time::Instant;

use super::*;

const DURATION: Duration = Duration::from_secs(15);

/// How the fake answers.
#[derive(Default)]
struct State {
    /// The stored Lease, with its resourceVersion.
    lease: Option<Lease>,
    /// Version counter.
    rv: u64,
    /// Every answer waits this long first.
    delay: Duration,
    /// Requests are received but never answered.
    hang: bool,
    /// Requests answered, as "METHOD".
    calls: Vec<String>,
}

#[derive(Clone, Default)]
struct Fake(Arc<Mutex<State>>);

impl Fake {
    fn start(&self) -> Client {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let state = self.0.clone();
        tokio::spawn(async move {
            // Withheld answers are kept here, so the client sees no error,
            // only silence.
            let mut withheld = Vec::new();
            while let Some((req, send)) = handle.next_request().await {
                let (parts, body) = req.into_parts();
                let bytes = body.collect_bytes().await.unwrap_or_default();
                let (hang, delay) = {
                    let s = state.lock().expect("state");
                    (s.hang, s.delay)
                };
                if hang {
                    withheld.push(send);
                    continue;
                }
                let state = state.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let (status, v) = answer(&state, parts.method.as_str(), &bytes);
                    let resp = Response::builder()
                        .status(status)
                        .header("content-type", "application/json")
                        .body(Body::from(v.to_string().into_bytes()))
                        .expect("response");
                    send.send_response(resp);
                });
            }
        });
        Client::new(service, "sp")
    }

    fn set(&self, f: impl FnOnce(&mut State)) {
        f(&mut self.0.lock().expect("state"));
    }

    fn holder(&self) -> Option<String> {
        let s = self.0.lock().expect("state");
        s.lease
            .as_ref()
            .and_then(|l| l.spec.as_ref())
            .and_then(|s| s.holder_identity.clone())
    }

    /// Another process writes the Lease (takes it, or renews it as `holder`).
    fn write_as(&self, holder: &str) {
        self.set(|s| {
            s.rv += 1;
            s.lease = Some(lease(holder, s.rv));
        });
    }

    fn writes(&self) -> usize {
        let s = self.0.lock().expect("state");
        s.calls.iter().filter(|c| *c != "GET").count()
    }
}

fn lease(holder: &str, rv: u64) -> Lease {
    Lease {
        metadata: ObjectMeta {
            name: Some("shardpool-shard-0".into()),
            namespace: Some("sp".into()),
            resource_version: Some(rv.to_string()),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(15),
            ..Default::default()
        }),
    }
}

fn status(code: u16, reason: &str) -> (StatusCode, Value) {
    (
        StatusCode::from_u16(code).expect("code"),
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "reason": reason, "code": code, "message": reason}),
    )
}

fn answer(state: &Mutex<State>, method: &str, body: &[u8]) -> (StatusCode, Value) {
    let mut s = state.lock().expect("state");
    s.calls.push(method.to_string());
    match method {
        "GET" => match &s.lease {
            Some(l) => (StatusCode::OK, serde_json::to_value(l).expect("json")),
            None => status(404, "NotFound"),
        },
        "POST" | "PUT" => {
            let Ok(mut l) = serde_json::from_slice::<Lease>(body) else {
                return status(400, "BadRequest");
            };
            let current = s
                .lease
                .as_ref()
                .and_then(|c| c.metadata.resource_version.clone());
            let conflict = match method {
                "POST" => current.is_some(),
                _ => current != l.metadata.resource_version,
            };
            if conflict {
                return status(409, "Conflict");
            }
            s.rv += 1;
            l.metadata.resource_version = Some(s.rv.to_string());
            s.lease = Some(l.clone());
            let code = if method == "POST" { 201 } else { 200 };
            (
                StatusCode::from_u16(code).expect("code"),
                serde_json::to_value(&l).expect("json"),
            )
        }
        _ => status(405, "MethodNotAllowed"),
    }
}

fn config(holder: &str) -> LeaseConfig {
    let (renew_every, retry_every, request_timeout) = LeaseConfig::timings(DURATION);
    LeaseConfig {
        name: "shardpool-shard-0".into(),
        holder: holder.into(),
        duration: DURATION,
        renew_every,
        retry_every,
        request_timeout,
        owner: None,
        labels: Default::default(),
    }
}

async fn take(fake: &Fake, holder: &str) -> Held {
    let api: Api<Lease> = Api::namespaced(fake.start(), "sp");
    acquire(api, config(holder), std::future::pending())
        .await
        .expect("acquired")
}

#[tokio::test(start_paused = true)]
async fn acquire_creates_a_missing_lease() {
    let fake = Fake::default();
    let t0 = Instant::now();
    let held = take(&fake, "pod-a").await;
    assert_eq!(fake.holder().as_deref(), Some("pod-a"));
    assert_eq!(held.valid_until(), t0 + DURATION);
}

#[tokio::test(start_paused = true)]
async fn a_contender_takes_the_lease_only_after_seeing_it_unchanged_for_its_duration() {
    let fake = Fake::default();
    fake.write_as("pod-a");
    let api: Api<Lease> = Api::namespaced(fake.start(), "sp");
    let t0 = Instant::now();
    let contender = tokio::spawn(acquire(api, config("pod-b"), std::future::pending()));
    // pod-a renews at 5 s: the contender's count starts again from there.
    tokio::time::sleep(Duration::from_secs(5)).await;
    fake.write_as("pod-a");
    tokio::time::sleep(Duration::from_secs(14)).await;
    assert_eq!(
        fake.holder().as_deref(),
        Some("pod-a"),
        "taken before expiry"
    );
    assert!(!contender.is_finished());
    let held = contender.await.expect("task").expect("acquired");
    let took = t0.elapsed();
    assert_eq!(fake.holder().as_deref(), Some("pod-b"));
    // Seen unchanged for more than 15 s since the renewal at 5 s.
    assert!(
        took > Duration::from_secs(20) && took < Duration::from_secs(22),
        "took {took:?}"
    );
    assert!(held.valid_until() > Instant::now());
}

#[tokio::test(start_paused = true)]
async fn validity_counts_from_when_the_renew_request_was_sent() {
    let fake = Fake::default();
    let mut held = take(&fake, "pod-a").await;
    fake.set(|s| s.delay = Duration::from_millis(900));
    tokio::time::sleep(Duration::from_secs(5)).await;
    let sent = Instant::now();
    held.renew().await.expect("renewed");
    assert!(Instant::now() >= sent + Duration::from_millis(900));
    assert_eq!(held.valid_until(), sent + DURATION, "not from the answer");
}

#[tokio::test(start_paused = true)]
async fn a_renewal_the_api_server_does_not_answer_times_out() {
    let fake = Fake::default();
    let mut held = take(&fake, "pod-a").await;
    let before = held.valid_until();
    fake.set(|s| s.hang = true);
    let t0 = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(60), held.renew())
        .await
        .expect("renew returned on its own");
    assert!(matches!(r, Err(LeaseError::Timeout(_))), "{r:?}");
    assert_eq!(t0.elapsed(), config("pod-a").request_timeout);
    assert_eq!(
        held.valid_until(),
        before,
        "a failed renewal extends nothing"
    );
}

#[tokio::test(start_paused = true)]
async fn a_claim_lapses_while_the_api_server_hangs_and_returns_after() {
    let fake = Fake::default();
    let keeper = keep(take(&fake, "pod-a").await);
    let validity = keeper.validity();
    let t0 = Instant::now();
    fake.set(|s| s.hang = true);
    // Valid for the duration from the acquisition, then lapsed; not lost.
    tokio::time::sleep(DURATION - Duration::from_millis(100)).await;
    assert!(validity.may_act());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !validity.may_act(),
        "still acting {:?} after the last renewal",
        t0.elapsed()
    );
    assert!(matches!(validity.claim(), Claim::Until(_)));
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert!(!validity.may_act());
    // The API server answers again: renewed, valid again, same holder.
    fake.set(|s| s.hang = false);
    // An attempt sent during the hang times out first (2 s), then the
    // next one (0.5 s later) succeeds.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(validity.may_act());
    assert_eq!(fake.holder().as_deref(), Some("pod-a"));
    let lost = tokio::time::timeout(Duration::from_secs(1), keeper.lost()).await;
    assert!(lost.is_err(), "a lapse is not a loss");
}

#[tokio::test(start_paused = true)]
async fn a_lease_another_holder_took_is_lost() {
    let fake = Fake::default();
    let keeper = keep(take(&fake, "pod-a").await);
    let validity = keeper.validity();
    fake.write_as("pod-b");
    let by = tokio::time::timeout(Duration::from_secs(10), keeper.lost())
        .await
        .expect("lost within a renew interval");
    assert_eq!(by.as_deref(), Some("pod-b"));
    assert!(!validity.may_act());
    // The fake stays pod-b's: the loser wrote nothing after learning.
    let writes = fake.writes();
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert_eq!(fake.writes(), writes);
    assert_eq!(fake.holder().as_deref(), Some("pod-b"));
}

#[tokio::test(start_paused = true)]
async fn release_frees_the_lease_for_a_successor_at_once() {
    let fake = Fake::default();
    let keeper = keep(take(&fake, "pod-a").await);
    keeper.release().await.expect("released");
    assert_eq!(fake.holder(), None);
    let t0 = Instant::now();
    let _b = take(&fake, "pod-b").await;
    assert!(t0.elapsed() < Duration::from_secs(1));
}
