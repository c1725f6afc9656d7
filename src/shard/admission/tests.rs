//! Scenarios for the admission queue: who goes next, what is refused.

use super::*;

fn limits(capacity: usize) -> Limits {
    Limits {
        capacity,
        ..Limits::default()
    }
}

fn client(name: &str, weight: u32) -> ClientId {
    ClientId {
        name: Arc::from(name),
        weight,
    }
}

fn far() -> Instant {
    Instant::now() + Duration::from_secs(60)
}

fn admitted(e: Result<Entry, Refused>) -> Permit {
    match e {
        Ok(Entry::Admitted(p)) => p,
        other => panic!("expected admission, got {other:?}"),
    }
}

fn queued(e: Result<Entry, Refused>) -> Ticket {
    match e {
        Ok(Entry::Queued(t)) => t,
        other => panic!("expected to queue, got {other:?}"),
    }
}

/// Whether the ticket was granted (without waiting).
fn granted(t: &mut Ticket) -> bool {
    t.grant
        .as_mut()
        .is_some_and(|rx| matches!(rx.try_recv(), Ok(())))
        .then(|| {
            t.done = true;
            t.grant = None;
            // The slot is the test's to give back.
        })
        .is_some()
}

/// Admits in the order the queue chooses, one slot at a time, and returns
/// the clients in that order.
fn order(
    adm: &Arc<Admission>,
    mut tickets: Vec<(&'static str, Ticket)>,
    first: Permit,
) -> Vec<&'static str> {
    let mut out = Vec::new();
    drop(first);
    while !tickets.is_empty() {
        let i = tickets
            .iter_mut()
            .position(|(_, t)| granted(t))
            .expect("one ticket is granted after each release");
        let (name, t) = tickets.remove(i);
        out.push(name);
        drop(t);
        // The grant took the slot: give it back as the transaction ends.
        adm.release(&Arc::from(name));
    }
    out
}

#[tokio::test]
async fn admits_up_to_capacity_then_queues() {
    let adm = Arc::new(Admission::new(limits(2)));
    let a = client("a", 1);
    let p1 = admitted(adm.enter(&a, far()));
    let _p2 = admitted(adm.enter(&a, far()));
    let mut t = queued(adm.enter(&a, far()));
    assert_eq!(adm.depth(), (1, 2));
    assert_eq!(t.position(), 1);
    drop(p1);
    let _p3 = tokio::time::timeout(Duration::from_secs(1), t.admitted())
        .await
        .expect("admitted once a slot is free");
    assert_eq!(adm.depth(), (0, 2));
}

#[tokio::test]
async fn a_client_with_one_waits_behind_at_most_one_of_a_heavy_client() {
    let adm = Arc::new(Admission::new(limits(1)));
    let (a, b) = (client("a", 1), client("b", 1));
    let first = admitted(adm.enter(&a, far()));
    let mut tickets = Vec::new();
    for _ in 0..20 {
        tickets.push(("a", queued(adm.enter(&a, far()))));
    }
    tickets.push(("b", queued(adm.enter(&b, far()))));
    let got = order(&adm, tickets, first);
    let at = got.iter().position(|c| *c == "b").expect("b admitted");
    assert!(
        at <= 1,
        "b admitted after {at} of a's transactions: {got:?}"
    );
}

#[tokio::test]
async fn arrival_order_when_fairness_is_off() {
    let adm = Arc::new(Admission::new(Limits {
        fair: false,
        ..limits(1)
    }));
    let (a, b) = (client("a", 1), client("b", 1));
    let first = admitted(adm.enter(&a, far()));
    let mut tickets = Vec::new();
    for _ in 0..20 {
        tickets.push(("a", queued(adm.enter(&a, far()))));
    }
    tickets.push(("b", queued(adm.enter(&b, far()))));
    let got = order(&adm, tickets, first);
    assert_eq!(got.last(), Some(&"b"), "{got:?}");
}

#[tokio::test]
async fn weights_share_a_contended_pool() {
    let adm = Arc::new(Admission::new(limits(1)));
    let (a, b) = (client("a", 3), client("b", 1));
    let first = admitted(adm.enter(&a, far()));
    let mut tickets = Vec::new();
    for _ in 0..40 {
        tickets.push(("a", queued(adm.enter(&a, far()))));
        tickets.push(("b", queued(adm.enter(&b, far()))));
    }
    let got = order(&adm, tickets, first);
    // While both are backlogged (the first 40 admissions), 3 of a's per b's.
    let a_share = got[..40].iter().filter(|c| **c == "a").count();
    assert!(
        (28..=32).contains(&a_share),
        "a got {a_share} of 40: {got:?}"
    );
}

#[tokio::test]
async fn a_full_queue_refuses_at_once() {
    let adm = Arc::new(Admission::new(Limits {
        max_queued: 2,
        ..limits(1)
    }));
    let a = client("a", 1);
    let _p = admitted(adm.enter(&a, far()));
    let _t1 = queued(adm.enter(&a, far()));
    let t2 = queued(adm.enter(&a, far()));
    assert_eq!(adm.enter(&a, far()).err(), Some(Refused::QueueFull(2)));
    assert_eq!(adm.stats.refused[0].load(Ordering::Relaxed), 1);
    // A waiter that gives up frees its place.
    drop(t2);
    let _t3 = queued(adm.enter(&a, far()));
    assert_eq!(adm.depth(), (2, 1));
}

#[tokio::test]
async fn max_concurrent_lets_other_clients_by() {
    let adm = Arc::new(Admission::new(Limits {
        max_concurrent: Some(1),
        ..limits(3)
    }));
    let (a, b) = (client("a", 1), client("b", 1));
    let _pa = admitted(adm.enter(&a, far()));
    let mut ta = queued(adm.enter(&a, far()));
    assert!(!granted(&mut ta), "a is at its cap");
    let _pb = admitted(adm.enter(&b, far()));
    assert_eq!(adm.depth(), (1, 2));
    assert!(matches!(
        ta.timed_out(),
        Refused::Timeout {
            capped: true,
            max_concurrent: 1,
            ..
        }
    ));
}

#[tokio::test(start_paused = true)]
async fn rate_waits_for_a_token_or_refuses_when_none_comes_in_time() {
    let adm = Arc::new(Admission::new(Limits {
        rate: Some((10.0, 2.0)),
        ..limits(10)
    }));
    let a = client("a", 1);
    let _p1 = admitted(adm.enter(&a, far()));
    let _p2 = admitted(adm.enter(&a, far()));
    // The bucket is empty: the next token is 100 ms away.
    let t0 = Instant::now();
    let mut t = queued(adm.enter(&a, far()));
    assert_eq!(t.position(), 0, "waiting for its token, not in the queue");
    let _p3 = t.admitted().await;
    assert_eq!(t0.elapsed(), Duration::from_millis(100));
    // Tokens for 200 ms ahead are taken; a 50 ms deadline cannot be met.
    let _t4 = queued(adm.enter(&a, far()));
    let r = adm.enter(&a, Instant::now() + Duration::from_millis(50));
    assert!(matches!(r, Err(Refused::Rate { .. })), "{r:?}");
    assert_eq!(adm.stats.refused[2].load(Ordering::Relaxed), 1);
    // Another client has its own bucket.
    let _pb = admitted(adm.enter(&client("b", 1), far()));
}

#[tokio::test]
async fn a_grant_racing_a_give_up_returns_the_slot() {
    let adm = Arc::new(Admission::new(limits(1)));
    let a = client("a", 1);
    let p = admitted(adm.enter(&a, far()));
    let t = queued(adm.enter(&a, far()));
    drop(p); // grants the ticket
    assert_eq!(adm.depth(), (0, 1));
    drop(t); // gave up before reading the grant
    assert_eq!(adm.depth(), (0, 0));
    let _p = admitted(adm.enter(&a, far()));
}

#[tokio::test]
async fn idle_clients_are_swept() {
    let adm = Arc::new(Admission::new(limits(2)));
    let busy = client("busy", 1);
    let _held = admitted(adm.enter(&busy, far()));
    for i in 0..1000 {
        drop(admitted(adm.enter(&client(&format!("c{i}"), 1), far())));
    }
    let st = adm.lock();
    assert!(
        st.clients.len() <= SWEEP_MIN,
        "{} entries",
        st.clients.len()
    );
    assert!(st.clients.contains_key("busy"), "an entry in use stays");
}
