//! The hand-off state machine: which step each situation leads to, and the
//! exact writes of a claim and of an acknowledgement (over a fake API
//! server that records requests and answers with a chosen status).

use std::sync::{Arc, Mutex};

use http::{Request, Response, StatusCode};
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};

use super::*;

fn source(shard: Option<i32>, serving: Option<i32>, paused: bool, generation: i64) -> DataSource {
    let mut status = json!({});
    if let Some(s) = shard {
        status["shard"] = json!(s);
    }
    if let Some(s) = serving {
        status["servingShard"] = json!(s);
    }
    serde_json::from_value(json!({
        "apiVersion": "shardpool.dev/v1alpha1",
        "kind": "DataSource",
        "metadata": {"name": "acme", "namespace": "tenants", "generation": generation,
                     "resourceVersion": "41"},
        "spec": {"host": "db", "database": "acme", "user": "bi", "paused": paused,
                 "passwordSecretRef": {"name": "pw", "key": "password"}},
        "status": status,
    }))
    .expect("a valid DataSource")
}

fn none_alive(_: u32) -> bool {
    false
}

fn all_alive(_: u32) -> bool {
    true
}

#[test]
fn a_source_of_another_shard_that_we_do_not_hold_is_left_alone() {
    let ds = source(Some(2), Some(2), false, 1);
    assert_eq!(step(Some(&ds), 1, None, all_alive, None), Step::Idle);
    assert_eq!(step(None, 1, None, all_alive, None), Step::Idle);
}

#[test]
fn a_free_source_is_claimed_before_it_is_opened() {
    let ds = source(Some(1), None, false, 1);
    assert_eq!(
        step(Some(&ds), 1, None, all_alive, None),
        Step::ClaimAndOpen
    );
}

#[test]
fn a_source_still_served_by_a_live_shard_waits_for_its_release() {
    let ds = source(Some(1), Some(0), false, 1);
    assert_eq!(
        step(Some(&ds), 1, None, all_alive, None),
        Step::AwaitRelease { from: 0 }
    );
    assert!(!may_open(&ds, 1, all_alive));
    // Shard 0 is gone (no live Lease holder): it holds nothing any more.
    assert_eq!(
        step(Some(&ds), 1, None, none_alive, None),
        Step::ClaimAndOpen
    );
    assert!(may_open(&ds, 1, none_alive));
    // Only the shard named as serving matters.
    assert!(!may_open(&ds, 1, |k| k == 0));
    assert!(may_open(&ds, 1, |k| k == 2));
}

#[test]
fn a_release_told_by_the_serving_shard_opens_without_waiting_for_its_write() {
    let ds = source(Some(1), Some(0), false, 1);
    // Shard 0 said it let go of the source: open, no claim (its hand-over
    // write names shard 1).
    assert_eq!(step(Some(&ds), 1, None, all_alive, Some(0)), Step::Open);
    // A note from a shard that does not serve it changes nothing.
    assert_eq!(
        step(Some(&ds), 1, None, all_alive, Some(2)),
        Step::AwaitRelease { from: 0 }
    );
    // Nor does one about a source not (yet) assigned here, or held here.
    let elsewhere = source(Some(2), Some(0), false, 1);
    assert_eq!(
        step(Some(&elsewhere), 1, None, all_alive, Some(0)),
        Step::Idle
    );
    let held = source(Some(1), Some(0), false, 1);
    assert_eq!(
        step(Some(&held), 1, Some(1), all_alive, Some(0)),
        Step::Serve
    );
}

#[test]
fn a_source_opened_on_a_note_is_reported_once_no_live_shard_may_serve_it() {
    let from = |serving| source(Some(1), serving, false, 1);
    // The hand-over write (or a claim) shows: reported, told or not.
    assert!(may_report(&from(Some(1)), 1, false, all_alive));
    assert!(may_report(&from(Some(1)), 1, true, all_alive));
    // Opened on the note; the previous owner still named and alive: its
    // hand-over write is on its way, the report waits for it.
    assert!(!may_report(&from(Some(0)), 1, true, all_alive));
    // The previous owner cleared the field, or it died (or was cut off)
    // before its write: reported, and the write names this shard.
    assert!(may_report(&from(None), 1, true, all_alive));
    assert!(may_report(&from(Some(0)), 1, true, none_alive));
    // Not opened on a note: a source held here is reported only once the
    // watch shows this shard serving it.
    assert!(!may_report(&from(None), 1, false, all_alive));
    assert!(!may_report(&from(Some(0)), 1, false, none_alive));
}

#[test]
fn a_source_this_shard_claimed_earlier_is_opened_without_a_new_claim() {
    let ds = source(Some(1), Some(1), false, 1);
    assert_eq!(step(Some(&ds), 1, None, all_alive, None), Step::Open);
}

#[test]
fn a_held_source_is_served_while_its_spec_is_unchanged_and_rebuilt_after() {
    let ds = source(Some(1), Some(1), false, 3);
    assert_eq!(step(Some(&ds), 1, Some(3), all_alive, None), Step::Serve);
    assert_eq!(step(Some(&ds), 1, Some(2), all_alive, None), Step::Rebuild);
}

#[test]
fn a_held_source_that_moved_paused_or_vanished_is_released() {
    let moved = source(Some(2), Some(1), false, 1);
    assert_eq!(
        step(Some(&moved), 1, Some(1), all_alive, None),
        Step::Release
    );
    let paused = source(Some(1), Some(1), true, 2);
    assert_eq!(
        step(Some(&paused), 1, Some(1), all_alive, None),
        Step::Release
    );
    assert!(!wanted(&paused, 1));
    assert_eq!(step(None, 1, Some(1), all_alive, None), Step::Release);
}

#[test]
fn a_shard_named_as_serving_what_it_neither_holds_nor_is_assigned_disowns_it() {
    // Handed to shard 1, then moved on to shard 2 before shard 1 opened it.
    let moved_on = source(Some(2), Some(1), false, 1);
    assert_eq!(
        step(Some(&moved_on), 1, None, all_alive, None),
        Step::Disown
    );
    // Shard 2 waits for shard 1 until then.
    assert_eq!(
        step(Some(&moved_on), 2, None, all_alive, None),
        Step::AwaitRelease { from: 1 }
    );
    let paused = source(Some(1), Some(1), true, 1);
    assert_eq!(step(Some(&paused), 1, None, all_alive, None), Step::Disown);
    // Another shard's name is not ours to clear.
    assert_eq!(step(Some(&moved_on), 3, None, all_alive, None), Step::Idle);
}

#[test]
fn keys_name_namespace_and_source() {
    assert_eq!(key(&source(None, None, false, 1)), "tenants/acme");
}

/// One request the fake answered.
#[derive(Debug, Clone)]
struct Call {
    method: String,
    path: String,
    query: String,
    content_type: String,
    body: Value,
}

/// A fake API server answering every request with `code` (and the body of
/// a DataSource on success).
fn fake(code: u16) -> (Client, Arc<Mutex<Vec<Call>>>) {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let calls: Arc<Mutex<Vec<Call>>> = Arc::default();
    let record = calls.clone();
    tokio::spawn(async move {
        while let Some((req, send)) = handle.next_request().await {
            let (parts, body) = req.into_parts();
            let bytes = body.collect_bytes().await.unwrap_or_default();
            record.lock().expect("calls").push(Call {
                method: parts.method.to_string(),
                path: parts.uri.path().to_string(),
                query: parts.uri.query().unwrap_or_default().to_string(),
                content_type: parts
                    .headers
                    .get("content-type")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string(),
                body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            });
            let answer = if code < 300 {
                serde_json::to_value(source(Some(1), None, false, 1)).expect("json")
            } else {
                json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                       "code": code, "reason": "Test", "message": "test"})
            };
            let resp = Response::builder()
                .status(StatusCode::from_u16(code).expect("code"))
                .header("content-type", "application/json")
                .body(Body::from(answer.to_string().into_bytes()))
                .expect("response");
            send.send_response(resp);
        }
    });
    (Client::new(service, "sp"), calls)
}

#[tokio::test]
async fn a_claim_applies_serving_shard_under_the_shard_field_manager() {
    let (client, calls) = fake(200);
    let ds = source(Some(1), None, false, 1);
    claim(&client, &ds, 1, "shard-1-pod")
        .await
        .expect("claimed");
    let calls = calls.lock().expect("calls").clone();
    assert_eq!(calls.len(), 1);
    let c = &calls[0];
    assert_eq!(c.method, "PATCH");
    assert_eq!(
        c.path,
        "/apis/shardpool.dev/v1alpha1/namespaces/tenants/datasources/acme/status"
    );
    assert!(c.content_type.contains("apply-patch"), "{}", c.content_type);
    assert!(
        c.query.contains("fieldManager=shardpool-shard"),
        "{}",
        c.query
    );
    assert_eq!(c.body["status"]["servingShard"], json!(1));
    assert_eq!(c.body["status"]["servedBy"], json!("shard-1-pod"));
    assert_eq!(c.body["status"]["phase"], json!("Connecting"));
    // Conditional on the version the decision was made on.
    assert_eq!(c.body["metadata"]["resourceVersion"], json!("41"));
}

#[tokio::test]
async fn a_claim_on_an_object_that_changed_since_is_a_conflict_not_a_failure() {
    let (client, _) = fake(409);
    let ds = source(Some(1), None, false, 1);
    let e = claim(&client, &ds, 1, "shard-1-pod")
        .await
        .expect_err("409 is an error");
    assert!(crate::crd::is_conflict(&e), "{e}");
    let (client, _) = fake(500);
    let e = claim(&client, &ds, 1, "shard-1-pod")
        .await
        .expect_err("500 is an error");
    assert!(!crate::crd::is_conflict(&e), "{e}");
}

#[tokio::test]
async fn an_acknowledgement_clears_serving_shard_only_if_it_still_names_this_shard() {
    let (client, calls) = fake(200);
    release(&client, "tenants/acme", 1, None)
        .await
        .expect("released");
    let calls = calls.lock().expect("calls").clone();
    assert_eq!(calls.len(), 1);
    let c = &calls[0];
    assert_eq!(c.method, "PATCH");
    assert!(c.content_type.contains("json-patch"), "{}", c.content_type);
    assert_eq!(
        c.body,
        json!([
            {"op": "test", "path": "/status/servingShard", "value": 1},
            {"op": "remove", "path": "/status/servingShard"},
        ])
    );
}

#[tokio::test]
async fn an_acknowledgement_someone_else_overtook_or_of_a_deleted_source_is_done() {
    for code in [422, 404] {
        let (client, _) = fake(code);
        assert!(
            release(&client, "tenants/acme", 1, None).await.is_ok(),
            "{code}"
        );
    }
    let (client, _) = fake(500);
    assert!(release(&client, "tenants/acme", 1, None).await.is_err());
}

#[tokio::test]
async fn a_move_is_handed_straight_to_the_assigned_shard_in_one_conditional_write() {
    let (client, calls) = fake(200);
    release(&client, "tenants/acme", 1, Some(2))
        .await
        .expect("handed over");
    let calls = calls.lock().expect("calls").clone();
    assert_eq!(calls.len(), 1);
    assert!(calls[0].content_type.contains("json-patch"));
    assert_eq!(
        calls[0].body,
        json!([
            {"op": "test", "path": "/status/servingShard", "value": 1},
            {"op": "test", "path": "/status/shard", "value": 2},
            {"op": "replace", "path": "/status/servingShard", "value": 2},
            {"op": "add", "path": "/status/phase", "value": "Pending"},
        ])
    );
}

#[tokio::test]
async fn a_hand_over_whose_assignment_changed_since_falls_back_to_clearing() {
    // 422 to the hand-over (a test failed): the plain acknowledgement is
    // sent next, and its own 422 means someone else serves it already.
    let (client, calls) = fake(422);
    release(&client, "tenants/acme", 1, Some(2))
        .await
        .expect("done");
    let calls = calls.lock().expect("calls").clone();
    assert_eq!(calls.len(), 2);
    assert_eq!(
        calls[1].body,
        json!([
            {"op": "test", "path": "/status/servingShard", "value": 1},
            {"op": "remove", "path": "/status/servingShard"},
        ])
    );
    // Handing over to itself is only a clear.
    let (client, calls) = fake(200);
    release(&client, "tenants/acme", 1, Some(1))
        .await
        .expect("done");
    assert_eq!(calls.lock().expect("calls").len(), 1);
    assert_eq!(
        calls.lock().expect("calls")[0].body[1]["op"],
        json!("remove")
    );
}
