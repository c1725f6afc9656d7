//! Taking a connection while the warehouse restarts, against a real
//! PostgreSQL: a query that arrives while the server is down waits (up to
//! acquireTimeout) and runs once it is back; one that waits in vain gets
//! the true class of the failure (08, or the server's own code), never the
//! 53300 that says the pool was full.

mod support;

use std::sync::Arc;
use std::time::Duration;

use shardpool::shard::checkout::{self, CheckoutError};
use shardpool::shard::connect_limit::ConnectLimit;
use shardpool::shard::pool::{self, Manager, Pool, PoolSettings};
use shardpool::shard::server::ConnectParams;
use support::TestPg;
use tokio::time::Instant;

fn pool(pg: &TestPg, max_size: usize) -> Pool {
    let params = ConnectParams {
        host: "127.0.0.1".into(),
        port: pg.port,
        database: "postgres".into(),
        user: pg.user.clone(),
        application_name: "shardpool/tenants/restart/0/aaaaaa".into(),
        statement_timeout: None,
        tls: Default::default(),
        legacy_password_auth: false,
    };
    let settings = PoolSettings {
        min_idle: 2,
        max_size,
        connect_timeout: Duration::from_secs(2),
        acquire_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(600),
        max_lifetime: Duration::from_secs(3600),
        statement_timeout: None,
    };
    let m = Manager::new(
        params,
        settings,
        pg.password.clone(),
        Arc::new(ConnectLimit::new(8)),
    );
    pool::build(m).expect("pool")
}

#[tokio::test]
async fn a_query_arriving_while_the_warehouse_restarts_waits_and_then_runs() {
    let mut pg = TestPg::start("restart-wait");
    let p = pool(&pg, 4);
    while pool::maintain(&p).await < 2 && p.status().size < 2 {}
    assert_eq!(p.status().size, 2);
    pg.stop();
    let waiting = {
        let p = p.clone();
        tokio::spawn(async move {
            let t0 = Instant::now();
            let r = checkout::get(&p, Duration::from_secs(10)).await;
            (
                r.map(|mut c| async move { c.query("SELECT 1").await.is_ok() }),
                t0.elapsed(),
            )
        })
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !waiting.is_finished(),
        "the query failed while the warehouse was down"
    );
    pg.start_again();
    pg.ready();
    let up = Instant::now();
    let (r, waited) = waiting.await.expect("task");
    let works = match r {
        Ok(q) => q.await,
        Err(e) => panic!(
            "failed after the warehouse came back: {e} ({})",
            e.sqlstate()
        ),
    };
    assert!(works, "the connection handed out does not work");
    assert!(
        up.elapsed() < Duration::from_secs(2),
        "answered {:?} after the warehouse was ready",
        up.elapsed()
    );
    assert!(waited >= Duration::from_millis(1500));
    // The dead connections were not handed out; the pool is back.
    pool::maintain(&p).await;
    assert!(p.status().size <= 4);
}

#[tokio::test]
async fn a_warehouse_that_stays_down_fails_with_class_08_within_acquire_timeout() {
    let mut pg = TestPg::start("restart-down");
    let p = pool(&pg, 4);
    drop(p.get().await.expect("up"));
    pg.stop();
    let t0 = Instant::now();
    let err = match checkout::get(&p, Duration::from_secs(1)).await {
        Ok(_) => panic!("a connection while the warehouse is down"),
        Err(e) => e,
    };
    let took = t0.elapsed();
    assert!(matches!(err, CheckoutError::Connect { .. }), "{err}");
    assert_eq!(err.sqlstate(), "08001", "{err}");
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(2),
        "{took:?}"
    );
    pg.start_again();
    pg.ready();
}

#[tokio::test]
async fn only_a_pool_that_stays_full_answers_53300() {
    let pg = TestPg::start("restart-full");
    let p = pool(&pg, 1);
    let held = p.get().await.expect("one");
    let t0 = Instant::now();
    let err = match checkout::get(&p, Duration::from_millis(300)).await {
        Ok(_) => panic!("a second connection from a pool of one"),
        Err(e) => e,
    };
    assert!(matches!(err, CheckoutError::Exhausted(_)), "{err}");
    assert_eq!(err.sqlstate(), "53300");
    assert!(t0.elapsed() < Duration::from_secs(1));
    drop(held);
}
