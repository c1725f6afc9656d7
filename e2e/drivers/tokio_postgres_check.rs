//! Runs tokio-postgres (Rust's PostgreSQL driver) through the shardpool
//! router and checks each result; built and run by e2e/tests/drivers_test.go
//! as `cargo run --example tokio-postgres-check`. Connection settings come
//! from the environment: ROUTER_HOST, ROUTER_USER, ROUTER_PASSWORD,
//! ROUTER_DB (namespace.name) and EXPECT_COUNT (rows in the orders table).
//! Prints one line per check; exits 1 if any failed.

use std::time::{Duration, Instant};

use tokio_postgres::error::SqlState;
use tokio_postgres::{Config, NoTls};

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        eprintln!("{name} is not set");
        std::process::exit(2)
    })
}

struct Checks(Vec<String>);

impl Checks {
    fn check(&mut self, name: &str, ok: bool, detail: impl std::fmt::Display) {
        println!("{} {name}: {detail}", if ok { "ok  " } else { "FAIL" });
        if !ok {
            self.0.push(name.to_string());
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut cfg = Config::new();
    cfg.host(env("ROUTER_HOST"))
        .port(5432)
        .user(env("ROUTER_USER"))
        .password(env("ROUTER_PASSWORD"))
        .dbname(env("ROUTER_DB"))
        .connect_timeout(Duration::from_secs(10));
    let want: i64 = env("EXPECT_COUNT").parse().unwrap_or(-1);
    let (mut client, conn) = match cfg.connect(NoTls).await {
        Ok(c) => c,
        Err(e) => {
            println!("FAIL connect: {e}");
            std::process::exit(1)
        }
    };
    tokio::spawn(conn);
    let mut c = Checks(Vec::new());

    // Simple query protocol.
    let rows = client.simple_query("SELECT count(*) FROM orders").await;
    let got = rows.as_ref().ok().and_then(|r| {
        r.iter().find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_string),
            _ => None,
        })
    });
    c.check(
        "simple query",
        got == Some(want.to_string()),
        format!("{got:?}"),
    );

    // Extended protocol: a prepared statement with binary parameters, reused.
    match client
        .prepare("SELECT count(*) FROM orders WHERE id <= $1")
        .await
    {
        Ok(stmt) => {
            let mut counts = Vec::new();
            for limit in [10i32, 20, 30] {
                let n: Option<i64> = client
                    .query_one(&stmt, &[&limit])
                    .await
                    .ok()
                    .map(|r| r.get(0));
                counts.push(n);
            }
            c.check(
                "prepared statement, binary parameters, reused",
                counts == vec![Some(10), Some(20), Some(30)],
                format!("{counts:?}"),
            );
        }
        Err(e) => c.check("prepared statement, binary parameters, reused", false, e),
    }

    // Transactions: rollback discards, commit keeps (within the transaction).
    match client.transaction().await {
        Ok(tx) => {
            let created = tx
                .batch_execute(
                    "CREATE TEMP TABLE t (x int) ON COMMIT DROP; INSERT INTO t VALUES (1), (2)",
                )
                .await;
            let n: Option<i64> = tx
                .query_one("SELECT count(*) FROM t", &[])
                .await
                .ok()
                .map(|r| r.get(0));
            let done = tx.commit().await;
            c.check(
                "transaction sees its writes and commits",
                created.is_ok() && n == Some(2) && done.is_ok(),
                format!("{n:?}"),
            );
        }
        Err(e) => c.check("transaction sees its writes and commits", false, e),
    }

    // Errors keep their SQLSTATE; the connection stays usable.
    let err = client.query_one("SELECT 1/0", &[]).await.err();
    let code = err.as_ref().and_then(|e| e.code()).cloned();
    c.check(
        "division by zero is 22012",
        code == Some(SqlState::DIVISION_BY_ZERO),
        format!("{code:?}"),
    );
    let ok = client
        .query_one("SELECT 7", &[])
        .await
        .map(|r| r.get::<_, i32>(0))
        .ok();
    c.check("usable after an error", ok == Some(7), format!("{ok:?}"));

    // Cancel: the router forwards the CancelRequest to the shard's server.
    let token = client.cancel_token();
    let canceller = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        token.cancel_query(NoTls).await
    });
    let started = Instant::now();
    let err = client.simple_query("SELECT pg_sleep(20)").await.err();
    let took = started.elapsed();
    let code = err.as_ref().and_then(|e| e.code()).cloned();
    let sent = canceller.await.map(|r| r.is_ok()).unwrap_or(false);
    c.check(
        "cancel stops pg_sleep with 57014",
        sent && code == Some(SqlState::QUERY_CANCELED) && took < Duration::from_secs(5),
        format!("{code:?} after {:.2}s", took.as_secs_f64()),
    );
    let ok = client
        .query_one("SELECT 9", &[])
        .await
        .map(|r| r.get::<_, i32>(0))
        .ok();
    c.check("usable after cancel", ok == Some(9), format!("{ok:?}"));

    println!("{} failed", c.0.len());
    std::process::exit(if c.0.is_empty() { 0 } else { 1 });
}
