//! Fencing by the database and by the Lease claim, against a real
//! PostgreSQL: a new owner's first connection ends every backend another
//! shard process holds for the source before the new owner opens its own;
//! a warehouse that refuses leaves the source unopened with a clear error,
//! unless fencing is disabled; a process whose claim lapsed opens nothing.

mod support;

use std::sync::Arc;
use std::time::Duration;

use shardpool::crd::Fencing;
use shardpool::lease::{Claim, Validity};
use shardpool::shard::connect_limit::ConnectLimit;
use shardpool::shard::fence::{self, FenceError};
use shardpool::shard::pool::{self, Manager, Pool, PoolSettings};
use shardpool::shard::server::{ConnectError, ConnectParams};
use support::TestPg;
use tokio::time::Instant;

fn settings(min_idle: usize, max_size: usize) -> PoolSettings {
    PoolSettings {
        min_idle,
        max_size,
        connect_timeout: Duration::from_secs(5),
        acquire_timeout: Duration::from_secs(5),
        idle_timeout: Duration::from_secs(600),
        max_lifetime: Duration::from_secs(3600),
        statement_timeout: None,
    }
}

/// A pool of shard `shard` (process `token`) for source `ns/name`, logging
/// in as `user`/`password` to `db`.
#[allow(clippy::too_many_arguments)]
fn owner(
    pg: &TestPg,
    db: &str,
    user: &str,
    password: &str,
    shard: u32,
    token: &str,
    fencing: Fencing,
    validity: Validity,
) -> Pool {
    let id = fence::identity("tenants", "acme", shard, token);
    let params = ConnectParams {
        host: "127.0.0.1".into(),
        port: pg.port,
        database: db.into(),
        user: user.into(),
        application_name: id.application_name,
        statement_timeout: None,
        tls: Default::default(),
        legacy_password_auth: false,
    };
    let m = Manager::new(
        params,
        settings(3, 5),
        password.into(),
        Arc::new(ConnectLimit::new(8)),
    )
    .with_validity(validity)
    .with_fencing(fencing, id.prefix);
    pool::build(m).expect("pool")
}

/// application_name of every backend of the source, sorted.
fn backends(pg: &TestPg) -> Vec<String> {
    let out = pg.psql(
        "postgres",
        "SELECT application_name FROM pg_stat_activity WHERE application_name LIKE 'shardpool/tenants/acme/%' ORDER BY 1",
    );
    out.lines().map(str::to_string).collect()
}

async fn warm(pool: &Pool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while pool.status().size < 3 {
        pool::maintain(pool).await;
        assert!(Instant::now() < deadline, "pool did not warm");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_new_owner_ends_the_previous_owners_connections_before_opening_its_own() {
    let pg = TestPg::start("fence-terminate");
    let old = owner(
        &pg,
        "postgres",
        &pg.user,
        &pg.password,
        0,
        "old000",
        Fencing::Terminate,
        Validity::always(),
    );
    warm(&old).await;
    assert_eq!(backends(&pg), vec!["shardpool/tenants/acme/0/old000"; 3]);

    // Sample pg_stat_activity while the new owner opens its pool: no
    // sample may show both owners' connections except the single fencing
    // connection, before the old ones are gone.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (port, user, password, stop) =
            (pg.port, pg.user.clone(), pg.password.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut worst = 0usize;
            let mut samples = 0usize;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let out = std::process::Command::new("psql")
                    .args(["-X", "-At", "-h", "127.0.0.1", "-p", &port.to_string(), "-U", &user, "-d", "postgres", "-c",
                        "SELECT count(*) FILTER (WHERE application_name LIKE '%/old000'), count(*) FILTER (WHERE application_name LIKE '%/new111') FROM pg_stat_activity"])
                    .env("PGPASSWORD", &password)
                    .output()
                    .expect("psql");
                let line = String::from_utf8_lossy(&out.stdout).trim().to_string();
                let mut parts = line.split('|').map(|v| v.parse::<usize>().unwrap_or(0));
                let (a, b) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
                if a > 0 {
                    worst = worst.max(b);
                }
                samples += 1;
            }
            (worst, samples)
        })
    };
    let new = owner(
        &pg,
        "postgres",
        &pg.user,
        &pg.password,
        1,
        "new111",
        Fencing::Terminate,
        Validity::always(),
    );
    warm(&new).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (worst, samples) = sampler.join().expect("sampler");
    assert_eq!(backends(&pg), vec!["shardpool/tenants/acme/1/new111"; 3]);
    assert_eq!(new.manager().fenced_backends(), 3);
    assert!(samples > 0);
    assert!(
        worst <= 1,
        "{worst} connections of the new owner beside the old one's (only the fencing connection may be)"
    );
    drop(old);
}

#[tokio::test]
async fn connections_of_the_same_process_are_not_fenced() {
    let pg = TestPg::start("fence-own");
    let first = owner(
        &pg,
        "postgres",
        &pg.user,
        &pg.password,
        0,
        "same00",
        Fencing::Terminate,
        Validity::always(),
    );
    warm(&first).await;
    // A rebuild after a spec change: a second pool in the same process.
    let second = owner(
        &pg,
        "postgres",
        &pg.user,
        &pg.password,
        0,
        "same00",
        Fencing::Terminate,
        Validity::always(),
    );
    warm(&second).await;
    assert_eq!(backends(&pg).len(), 6);
    assert_eq!(second.manager().fenced_backends(), 0);
}

/// A role and a database where the role may not call pg_terminate_backend.
fn refusing_warehouse(pg: &TestPg) -> (&'static str, &'static str, &'static str) {
    pg.psql(
        "postgres",
        "CREATE ROLE nofence LOGIN PASSWORD 'nofence-pw'",
    );
    pg.psql("postgres", "CREATE DATABASE nofence OWNER nofence");
    pg.psql(
        "nofence",
        "REVOKE EXECUTE ON FUNCTION pg_terminate_backend(integer, bigint) FROM PUBLIC",
    );
    ("nofence", "nofence", "nofence-pw")
}

#[tokio::test]
async fn a_warehouse_that_refuses_termination_leaves_the_source_unopened_with_a_clear_error() {
    let pg = TestPg::start("fence-refused");
    let (db, user, pw) = refusing_warehouse(&pg);
    // Refused even with nothing to end: the warehouse's permission is
    // checked on every first connection, so a source that cannot be fenced
    // says so as soon as it is set up, not at its first handover.
    let alone = owner(
        &pg,
        db,
        user,
        pw,
        0,
        "alone0",
        Fencing::Terminate,
        Validity::always(),
    );
    assert!(alone.get().await.is_err());
    drop(alone);
    let old = owner(
        &pg,
        db,
        user,
        pw,
        0,
        "old000",
        Fencing::Disabled,
        Validity::always(),
    );
    let kept = old.get().await.expect("an owner that does not fence opens");
    let new = owner(
        &pg,
        db,
        user,
        pw,
        1,
        "new111",
        Fencing::Terminate,
        Validity::always(),
    );
    let err = match new.get().await {
        Ok(_) => panic!("opened beside the previous owner"),
        Err(deadpool::managed::PoolError::Backend(e)) => e,
        Err(e) => panic!("unexpected {e}"),
    };
    let ConnectError::Fence(FenceError::Refused { ref code, .. }) = err else {
        panic!("not a fencing refusal: {err}");
    };
    assert_eq!(code, "42501");
    let msg = err.to_string();
    assert!(msg.contains("spec.fencing"), "{msg}");
    assert!(!msg.contains(pw), "the password leaked: {msg}");
    assert_eq!(new.status().size, 0);
    let h = new.manager().health();
    assert!(h.fencing && h.failures > 0, "{h:?}");
    // Nothing of the new owner stays; the old one's connection is intact.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(backends(&pg), vec!["shardpool/tenants/acme/0/old000"]);
    drop(kept);
}

#[tokio::test]
async fn fencing_disabled_skips_the_step() {
    let pg = TestPg::start("fence-disabled");
    let (db, user, pw) = refusing_warehouse(&pg);
    let old = owner(
        &pg,
        db,
        user,
        pw,
        0,
        "old000",
        Fencing::Disabled,
        Validity::always(),
    );
    let kept = old.get().await.expect("first owner");
    let new = owner(
        &pg,
        db,
        user,
        pw,
        1,
        "new111",
        Fencing::Disabled,
        Validity::always(),
    );
    let c = new.get().await.expect("opens without fencing");
    assert_eq!(
        backends(&pg),
        vec![
            "shardpool/tenants/acme/0/old000",
            "shardpool/tenants/acme/1/new111"
        ]
    );
    drop((c, kept));
}

#[tokio::test]
async fn no_connection_is_opened_once_the_lease_claim_has_lapsed() {
    let pg = TestPg::start("fence-lease");
    let (claim, validity) =
        Validity::manual(Claim::Until(Instant::now() + Duration::from_secs(60)));
    let pool = owner(
        &pg,
        "postgres",
        &pg.user,
        &pg.password,
        0,
        "lease0",
        Fencing::Terminate,
        validity,
    );
    let held = pool.get().await.expect("opens under a valid claim");
    // The claim lapses (renewals failed): open connections serve on, new
    // ones are not opened, and warming does nothing.
    claim.send_replace(Claim::Until(Instant::now()));
    drop(held);
    let again = pool
        .get()
        .await
        .expect("an open connection is still handed out");
    let second = pool.get().await;
    assert!(
        matches!(
            second,
            Err(deadpool::managed::PoolError::Backend(ConnectError::NoLease))
        ),
        "{second:?}"
    );
    assert_eq!(pool::maintain(&pool).await, 0);
    assert_eq!(backends(&pg).len(), 1);
    // A lost Lease: the same.
    claim.send_replace(Claim::Lost(Some("successor".into())));
    assert!(pool.get().await.is_err());
    // Renewed again: it opens.
    claim.send_replace(Claim::Until(Instant::now() + Duration::from_secs(60)));
    let third = pool.get().await.expect("opens again");
    assert_eq!(backends(&pg).len(), 2);
    assert_eq!(
        pool.manager().health().failures,
        0,
        "a lapse is no warehouse failure"
    );
    drop((again, third));
}
