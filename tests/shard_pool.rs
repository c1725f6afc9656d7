//! The shard's server connections and pools against a real PostgreSQL
//! (no Kubernetes): authentication, application_name, minIdle warm-up,
//! secret-free errors, TLS modes.

mod support;

use std::sync::Arc;
use std::time::Duration;

use shardpool::crd::TlsMode;
use shardpool::shard::connect_limit::{ConnectLimit, Purpose};
use shardpool::shard::pool::{self, Manager, PoolSettings};
use shardpool::shard::server::{ConnectError, ConnectParams, ServerConn};
use shardpool::shard::tls::TlsSettings;
use support::TestPg;

fn params(pg: &TestPg, app: &str) -> ConnectParams {
    ConnectParams {
        host: "127.0.0.1".into(),
        port: pg.port,
        database: "postgres".into(),
        user: pg.user.clone(),
        application_name: app.into(),
        statement_timeout: Some("2s".into()),
        tls: Default::default(),
        legacy_password_auth: false,
    }
}

fn settings(min_idle: usize, max_size: usize) -> PoolSettings {
    PoolSettings {
        min_idle,
        max_size,
        connect_timeout: Duration::from_secs(5),
        acquire_timeout: Duration::from_secs(5),
        idle_timeout: Duration::from_secs(600),
        max_lifetime: Duration::from_secs(3600),
        statement_timeout: Some(Duration::from_secs(2)),
    }
}

#[tokio::test]
async fn connects_with_scram_and_names_itself() {
    let pg = TestPg::start("connect");
    let conn = ServerConn::connect(&params(&pg, "shardpool/t/one/0"), &pg.password)
        .await
        .expect("connects");
    assert!(
        conn.params.iter().any(|(k, _)| k == "server_version"),
        "server parameters recorded"
    );
    assert_ne!(conn.backend_pid, 0, "cancel key recorded");
    let seen = pg.psql(
        "postgres",
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'shardpool/t/one/0'",
    );
    assert_eq!(seen, "1");
    // The spec's statementTimeout is set on the connection.
    let mut conn = conn;
    let err = conn
        .simple("SELECT pg_sleep(3)")
        .await
        .expect_err("statement_timeout of 2s applies");
    assert!(err.to_string().contains("statement timeout"), "{err}");
    conn.simple("SELECT 1")
        .await
        .expect("the connection is still usable");
    conn.terminate().await;
}

#[tokio::test]
async fn wrong_password_is_a_clear_secret_free_error() {
    let pg = TestPg::start("badpw");
    let secret = "not-the-password-Xy9";
    let err = ServerConn::connect(&params(&pg, "shardpool/t/bad/0"), secret)
        .await
        .expect_err("must fail");
    match &err {
        ConnectError::Server { code, .. } => assert_eq!(code, "28P01"),
        other => panic!("unexpected error: {other}"),
    }
    assert!(
        !err.to_string().contains(secret),
        "error leaks the password: {err}"
    );
}

#[tokio::test]
async fn pool_warms_to_exactly_min_idle() {
    let pg = TestPg::start("warm");
    let limit = Arc::new(ConnectLimit::new(2));
    let pool = pool::build(Manager::new(
        params(&pg, "shardpool/t/warm/0"),
        settings(5, 8),
        pg.password.clone(),
        limit.clone(),
    ))
    .expect("pool");
    // Warming opens one connection per pass; passes repeat until warm.
    while pool::maintain(&pool).await > 0 {}
    assert!(
        (1..=2).contains(&limit.peak()),
        "connects at once: {} (limit 2)",
        limit.peak()
    );
    assert_eq!(limit.connecting(), 0);
    let seen = pg.psql(
        "postgres",
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'shardpool/t/warm/0'",
    );
    assert_eq!(seen, "5", "minIdle connections, no more");
    assert_eq!(pool::counts(&pool), (5, 5, 0));
    // Checking out and returning does not open more.
    {
        let _a = pool.get().await.expect("get");
        let _b = pool.get().await.expect("get");
    }
    pool::maintain(&pool).await;
    assert_eq!(pool::counts(&pool).0, 5);
}

#[tokio::test]
async fn queries_during_warm_up_use_the_warming_connections_instead_of_opening_more() {
    let pg = TestPg::start("warmcap");
    let pool = pool::build(Manager::new(
        params(&pg, "shardpool/t/warmcap/0"),
        settings(4, 8),
        pg.password.clone(),
        Arc::new(ConnectLimit::new(8)),
    ))
    .expect("pool");
    // Three queries arrive while the pool warms (a handover under load).
    let clients: Vec<_> = (0..3)
        .map(|_| {
            let p = pool.clone();
            tokio::spawn(async move {
                let c = p.get().await.expect("get");
                tokio::time::sleep(Duration::from_millis(300)).await;
                drop(c);
            })
        })
        .collect();
    pool::maintain(&pool).await;
    for c in clients {
        c.await.expect("client");
    }
    while pool::maintain(&pool).await > 0 {}
    let seen = pg.psql(
        "postgres",
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'shardpool/t/warmcap/0'",
    );
    assert_eq!(
        seen, "4",
        "minIdle connections, not minIdle plus the queries"
    );
    // Once warm, demand above minIdle grows the pool, up to maxSize.
    let held: Vec<_> = futures::future::join_all((0..6).map(|_| pool.get()))
        .await
        .into_iter()
        .map(|r| r.expect("get"))
        .collect();
    assert_eq!(pool::counts(&pool).0, 6);
    drop(held);
}

/// A pool waiting for a warm-up slot (other sources' warm-up holds the
/// whole warm-up share) keeps serving from its idle connection, and a
/// checkout that needs a new connection takes a slot kept for demand.
/// Before the warm-up queued holding nothing, it held every idle
/// connection of its source until its last connect was done.
#[tokio::test]
async fn warm_up_queued_for_a_slot_holds_none_of_the_pools_connections() {
    let pg = TestPg::start("hostage");
    let limit = Arc::new(ConnectLimit::new(4));
    let pool = pool::build(Manager::new(
        params(&pg, "shardpool/t/hostage/0"),
        settings(4, 8),
        pg.password.clone(),
        limit.clone(),
    ))
    .expect("pool");
    assert_eq!(pool::maintain(&pool).await, 1, "one per pass while warming");
    assert_eq!(pool::counts(&pool), (1, 1, 0));
    let warm_pid = pool.get().await.expect("get").backend_pid;
    let mut others = Vec::new();
    for _ in 0..3 {
        others.push(limit.acquire(Purpose::Warm).await.expect("slot"));
    }
    let warming = {
        let pool = pool.clone();
        tokio::spawn(async move { pool::maintain(&pool).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let first = tokio::time::timeout(Duration::from_millis(500), pool.get())
        .await
        .expect("the idle connection is not held by the queued warm-up")
        .expect("get");
    assert_eq!(
        first.backend_pid, warm_pid,
        "the warm connection served at once (not held by the queued warm-up)"
    );
    let second = tokio::time::timeout(Duration::from_secs(3), pool.get())
        .await
        .expect("demand takes a reserved slot, not a place behind warm-up")
        .expect("get");
    assert_ne!(first.backend_pid, second.backend_pid);
    assert!(!warming.is_finished(), "warm-up still waits for its share");
    drop((first, second));
    drop(others);
    let opened = tokio::time::timeout(Duration::from_secs(5), warming)
        .await
        .expect("warm-up goes on once its share frees")
        .expect("joins");
    assert_eq!(opened, 1);
    assert_eq!(pool::counts(&pool).0, 3);
}

/// Whether the server sees the connection named `app` as TLS.
fn server_sees_tls(pg: &TestPg, app: &str) -> String {
    pg.psql(
        "postgres",
        &format!(
            "SELECT string_agg(ssl::text, ',') FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) WHERE application_name = '{app}'"
        ),
    )
}

#[tokio::test]
async fn tls_modes_against_a_server_with_tls() {
    let pg = TestPg::start_tls("tls");
    let ca = pg.ca_pem.clone().expect("ca");
    let connect = |mode: TlsMode, ca: Option<String>, host: &'static str, app: &'static str| {
        let mut p = params(&pg, app);
        p.host = host.into();
        p.tls = TlsSettings::new(mode, ca.as_deref()).expect("tls settings");
        let password = pg.password.clone();
        async move { ServerConn::connect(&p, &password).await }
    };
    let mut open = Vec::new();
    for (mode, ca, host, app) in [
        (TlsMode::Prefer, None, "127.0.0.1", "tls-prefer"),
        (TlsMode::Require, None, "127.0.0.1", "tls-require"),
        (
            TlsMode::VerifyFull,
            Some(ca.clone()),
            "127.0.0.1",
            "tls-verify-ip",
        ),
        (
            TlsMode::VerifyFull,
            Some(ca.clone()),
            "localhost",
            "tls-verify-dns",
        ),
    ] {
        let conn = connect(mode, ca, host, app)
            .await
            .unwrap_or_else(|e| panic!("{mode:?} to {host}: {e}"));
        assert!(conn.is_tls(), "{mode:?} must run TLS");
        assert_eq!(server_sees_tls(&pg, app), "true", "{app}: server side");
        open.push(conn);
    }
    let plain = connect(TlsMode::Disable, None, "127.0.0.1", "tls-disable")
        .await
        .expect("disable connects");
    assert!(!plain.is_tls());
    assert_eq!(server_sees_tls(&pg, "tls-disable"), "false");

    // verify-full against a CA that did not sign the server's certificate.
    let other = pg.dir.join("other");
    std::fs::create_dir_all(&other).expect("dir");
    support::make_certs(&other, "other-", false);
    let other_ca = std::fs::read_to_string(other.join("other-ca.crt")).expect("other ca");
    let err = connect(
        TlsMode::VerifyFull,
        Some(other_ca),
        "127.0.0.1",
        "tls-wrong-ca",
    )
    .await
    .expect_err("an unknown issuer must be refused");
    let msg = err.to_string();
    assert!(matches!(err, ConnectError::Tls { .. }), "{msg}");
    assert!(
        msg.contains("certificate") || msg.contains("Certificate"),
        "{msg}"
    );
    assert!(!msg.contains(&pg.password), "no secret in {msg}");
    assert_eq!(
        server_sees_tls(&pg, "tls-wrong-ca"),
        "",
        "no session opened"
    );
}

#[tokio::test]
async fn tls_required_against_a_server_without_tls_fails_clearly() {
    let pg = TestPg::start("notls");
    let mut p = params(&pg, "notls-require");
    p.tls = TlsSettings::new(TlsMode::Require, None).expect("tls settings");
    let err = ServerConn::connect(&p, &pg.password)
        .await
        .expect_err("require must not fall back to plain text");
    assert!(
        err.to_string()
            .contains("server does not support TLS (tls mode require)"),
        "{err}"
    );
    // prefer falls back to plain text.
    p.tls = TlsSettings::new(TlsMode::Prefer, None).expect("tls settings");
    p.application_name = "notls-prefer".into();
    let conn = ServerConn::connect(&p, &pg.password)
        .await
        .expect("prefer connects");
    assert!(!conn.is_tls());
}

/// Sequential checkouts reuse the most recently returned connection (LIFO,
/// as PgBouncer does), so under a light steady load the connections a
/// burst opened sit idle and are trimmed after idleTimeout. (Round-robin
/// would touch every one of them in turn and keep them all open.)
#[tokio::test]
async fn light_load_after_a_burst_trims_to_what_is_used() {
    let pg = TestPg::start("lifo");
    let app = "shardpool/t/lifo/0";
    let mut s = settings(1, 4);
    s.idle_timeout = Duration::from_secs(1);
    let pool = pool::build(Manager::new(
        params(&pg, app),
        s,
        pg.password.clone(),
        Arc::new(ConnectLimit::new(4)),
    ))
    .expect("pool");
    // Warm (as the shard's maintenance does first), then a burst: four at once.
    while pool::maintain(&pool).await > 0 {}
    {
        let mut held = Vec::new();
        for _ in 0..4 {
            held.push(pool.get().await.expect("get"));
        }
    }
    assert_eq!(pool::counts(&pool), (4, 4, 0));
    // Then one query at a time for longer than idleTimeout.
    let mut pids = std::collections::BTreeSet::new();
    let until = std::time::Instant::now() + Duration::from_millis(2500);
    while std::time::Instant::now() < until {
        let mut conn = pool.get().await.expect("get");
        conn.simple("SELECT 1").await.expect("query");
        pids.insert(conn.backend_pid);
        drop(conn);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        pids.len(),
        1,
        "one server connection served every query: {pids:?}"
    );
    pool::maintain(&pool).await;
    assert_eq!(pool::counts(&pool).0, 1, "the idle ones were trimmed");
    let mut seen = String::new();
    for _ in 0..50 {
        seen = pg.psql(
            "postgres",
            &format!("SELECT count(*) FROM pg_stat_activity WHERE application_name = '{app}'"),
        );
        if seen == "1" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(seen, "1", "the server sees one connection left");
}

/// The backend pids of the pool's idle connections (all of them when
/// nothing is checked out).
fn idle_pids(pool: &pool::Pool) -> std::collections::BTreeSet<i32> {
    let mut pids = std::collections::BTreeSet::new();
    pool.retain(|conn, _| {
        pids.insert(conn.backend_pid);
        true
    });
    pids
}

#[test]
fn renewal_times_spread_over_the_last_tenth_of_the_lifetime() {
    let created = std::time::Instant::now();
    let life = Duration::from_secs(1000);
    let at: Vec<Duration> = (0..200)
        .map(|_| pool::retire_at(created, life).expect("in range") - created)
        .collect();
    assert!(
        at.iter().all(|d| *d <= life && *d >= life - life / 10),
        "{at:?}"
    );
    let distinct: std::collections::BTreeSet<_> = at.iter().collect();
    assert!(
        distinct.len() > 150,
        "spread, not one instant: {}",
        distinct.len()
    );
}

#[tokio::test]
async fn connections_past_their_lifetime_are_renewed_one_at_a_time() {
    let pg = TestPg::start("renew");
    let app = "shardpool/t/renew/0";
    let mut s = settings(6, 8);
    s.max_lifetime = Duration::from_secs(2);
    let pool = pool::build(Manager::new(
        params(&pg, app),
        s,
        pg.password.clone(),
        Arc::new(ConnectLimit::new(8)),
    ))
    .expect("pool");
    while pool::maintain(&pool).await > 0 {}
    let first = idle_pids(&pool);
    assert_eq!(first.len(), 6);
    // Maintenance every 100 ms for 9 s: every connection passes its
    // lifetime (1.8-2 s) within the same 0.2 s, and renewals go one a
    // second.
    let mut prev = first.clone();
    let mut renewed_in_one_pass = 0;
    let mut renewals = Vec::new();
    let started = std::time::Instant::now();
    let until = started + Duration::from_millis(9000);
    while std::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(100)).await;
        pool::maintain(&pool).await;
        let now = idle_pids(&pool);
        assert_eq!(now.len(), 6, "minIdle open after every pass: {now:?}");
        let gone = prev.difference(&now).count();
        renewed_in_one_pass = renewed_in_one_pass.max(gone);
        if gone > 0 {
            renewals.push(started.elapsed());
        }
        prev = now;
    }
    let closest = renewals
        .windows(2)
        .map(|w| w[1] - w[0])
        .min()
        .unwrap_or(Duration::MAX);
    assert!(
        closest >= pool::RENEW_SPACING - Duration::from_millis(150),
        "renewals {renewals:?}: two within {closest:?}"
    );
    assert_eq!(
        renewed_in_one_pass, 1,
        "connections renewed in one maintenance pass (at most 1, or the pool drops below minIdle)"
    );
    assert!(
        first.is_disjoint(&prev),
        "every connection was renewed after its lifetime: {first:?} -> {prev:?}"
    );
    // The warehouse sees the new connections only.
    let mut seen = String::new();
    for _ in 0..50 {
        seen = pg.psql(
            "postgres",
            &format!("SELECT string_agg(pid::text, ',' ORDER BY pid) FROM pg_stat_activity WHERE application_name = '{app}'"),
        );
        let want: Vec<String> = prev.iter().map(|p| p.to_string()).collect();
        if seen == want.join(",") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let want: Vec<String> = prev.iter().map(|p| p.to_string()).collect();
    assert_eq!(
        seen,
        want.join(","),
        "the server holds exactly the pool's connections"
    );
}

/// An idle connection whose server went away is found by a maintenance
/// pass that asks the sockets (every fourth in a shard) and replaced, and
/// only by such a pass: the others make no system call per idle connection.
/// A checkout never hands it out either way.
#[tokio::test]
async fn maintenance_asks_idle_sockets_only_when_told_to() {
    let pg = TestPg::start("probe");
    let pool = pool::build(Manager::new(
        params(&pg, "shardpool/t/probe/0"),
        settings(3, 3),
        pg.password.clone(),
        Arc::new(ConnectLimit::new(2)),
    ))
    .expect("pool");
    while pool::maintain(&pool).await > 0 {}
    let before = idle_pids(&pool);
    assert_eq!(before.len(), 3);
    let victim = *before.iter().next().expect("a pid");
    pg.psql(
        "postgres",
        &format!("SELECT pg_terminate_backend({victim})"),
    );
    // The server's FATAL and close reach the socket.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(pool::maintain_with(&pool, false).await, 0);
    assert_eq!(idle_pids(&pool), before, "not asked, not found");
    assert_eq!(
        pool::maintain_with(&pool, true).await,
        1,
        "found and replaced"
    );
    let after = idle_pids(&pool);
    assert_eq!(after.len(), 3);
    assert!(!after.contains(&victim), "{after:?}");
}

/// A pool one below minIdle refills while queries keep taking and giving
/// back connections: the refill must not take the idle connections away
/// from them while it connects (they would each open one more, and the
/// warehouse would see the pool above minIdle with no demand for it).
#[tokio::test]
async fn a_refill_under_load_opens_exactly_the_missing_connection() {
    let pg = TestPg::start("refill");
    let pool = pool::build(Manager::new(
        params(&pg, "shardpool/t/refill/0"),
        settings(6, 12),
        pg.password.clone(),
        Arc::new(ConnectLimit::new(4)),
    ))
    .expect("pool");
    while pool::maintain(&pool).await > 0 {}
    assert_eq!(pool::counts(&pool).0, 6);
    // Warm: queries may grow it to maxSize from now on (as a checkout does).
    pool::lift_cap_when_warm(&pool);
    assert_eq!(pool.status().max_size, 12);
    let peak = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for round in 0..5 {
        // One connection lost (the server ended it, say).
        let lost = pool.retain({
            let mut once = true;
            move |_, _| !std::mem::take(&mut once)
        });
        assert_eq!(lost.removed.len(), 1, "round {round}");
        // Two clients, each holding one connection at a time, for a
        // moment, with pauses between.
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let clients: Vec<_> = (0..2)
            .map(|_| {
                let (pool, stop, peak) = (pool.clone(), stop.clone(), peak.clone());
                tokio::spawn(async move {
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        if let Ok(conn) = pool.get().await {
                            peak.fetch_max(
                                pool.status().size,
                                std::sync::atomic::Ordering::Relaxed,
                            );
                            tokio::time::sleep(Duration::from_millis(1)).await;
                            drop(conn);
                        }
                        // A client between two queries holds nothing.
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(20)).await;
        while pool::maintain(&pool).await > 0 {}
        peak.fetch_max(pool.status().size, std::sync::atomic::Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(20)).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for c in clients {
            c.await.expect("client");
        }
        assert_eq!(
            pool::counts(&pool).0,
            6,
            "round {round}: refilled to minIdle"
        );
    }
    assert_eq!(
        peak.load(std::sync::atomic::Ordering::Relaxed),
        6,
        "the pool went above minIdle with two clients and six connections"
    );
    let seen = pg.psql(
        "postgres",
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'shardpool/t/refill/0'",
    );
    assert_eq!(seen, "6");
}

/// A stopping shard first closes, while it still serves, the idle
/// connections that its sessions could not use (`sources::thin`, through
/// `pool::take_idle_beyond`): connections in use stay, the most recently
/// used idle ones stay up to the count wanted, the rest are closed on the
/// server too, and the pool goes on serving on what is left.
#[tokio::test]
async fn a_stopping_shard_closes_what_no_session_could_use_and_keeps_serving() {
    let pg = TestPg::start("thin");
    let app = "shardpool/t/thin/0";
    let pool = pool::build(Manager::new(
        params(&pg, app),
        settings(8, 8),
        pg.password.clone(),
        Arc::new(ConnectLimit::new(4)),
    ))
    .expect("pool");
    while pool::maintain(&pool).await > 0 {}
    assert_eq!(pool::counts(&pool), (8, 8, 0));
    let server_sees = || {
        pg.psql(
            "postgres",
            &format!("SELECT count(*) FROM pg_stat_activity WHERE application_name = '{app}'"),
        )
    };

    // Two transactions running, one more idle connection used last: three
    // sessions attached want three connections.
    let mut a = pool.get().await.expect("get");
    let mut b = pool.get().await.expect("get");
    let warm = {
        let mut c = pool.get().await.expect("get");
        c.simple("SELECT 1").await.expect("query");
        c.backend_pid
    };
    let in_use = [a.backend_pid, b.backend_pid];
    let taken = pool::take_idle_beyond(&pool, 3);
    assert_eq!(taken.len(), 5, "8 open, 3 wanted");
    assert!(
        taken
            .iter()
            .all(|c| !in_use.contains(&c.backend_pid) && c.backend_pid != warm),
        "neither a connection in use nor the one used last is taken"
    );
    futures::future::join_all(taken.into_iter().map(|c| c.terminate())).await;
    assert_eq!(pool::counts(&pool), (3, 1, 2));
    assert_eq!(idle_pids(&pool).into_iter().collect::<Vec<_>>(), [warm]);
    let mut seen = String::new();
    for _ in 0..50 {
        seen = server_sees();
        if seen == "3" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(seen, "3", "the server sees the closed ones gone");

    // The running transactions go on; the pool serves on what is left.
    a.simple("SELECT 1")
        .await
        .expect("in use before, still usable");
    b.simple("SELECT 1")
        .await
        .expect("in use before, still usable");
    drop((a, b));
    let mut c = pool.get().await.expect("get");
    c.simple("SELECT 1").await.expect("query");
    drop(c);
    assert_eq!(pool::counts(&pool).0, 3, "nothing reopened");

    // No session attached: every idle connection goes.
    let taken = pool::take_idle_beyond(&pool, 0);
    assert_eq!(taken.len(), 3);
    futures::future::join_all(taken.into_iter().map(|c| c.terminate())).await;
    assert_eq!(pool::counts(&pool), (0, 0, 0));
}
