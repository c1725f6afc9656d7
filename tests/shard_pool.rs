//! The shard's server connections and pools against a real PostgreSQL
//! (no Kubernetes): authentication, application_name, minIdle warm-up,
//! secret-free errors.

mod support;

use std::sync::Arc;
use std::time::Duration;

use shardpool::shard::pool::{self, Manager, PoolSettings};
use shardpool::shard::server::{ConnectError, ConnectParams, ServerConn};
use support::TestPg;
use tokio::sync::Semaphore;

fn params(pg: &TestPg, app: &str) -> ConnectParams {
    ConnectParams {
        host: "127.0.0.1".into(),
        port: pg.port,
        database: "postgres".into(),
        user: pg.user.clone(),
        application_name: app.into(),
        statement_timeout: Some("2s".into()),
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
    let limit = Arc::new(Semaphore::new(2));
    let pool = pool::build(Manager::new(
        params(&pg, "shardpool/t/warm/0"),
        settings(5, 8),
        pg.password.clone(),
        limit,
    ))
    .expect("pool");
    for _ in 0..3 {
        pool::maintain(&pool).await;
    }
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
