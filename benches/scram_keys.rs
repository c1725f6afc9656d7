//! What the shards' SCRAM key cache saves, side by side in one run: a
//! throwaway PostgreSQL (SCRAM-SHA-256, 4,096 iterations), SOURCES sources
//! of CONNS connections each opened one after another, in rounds that
//! alternate (ABBA) between deriving the keys for every connection (no
//! cache: what every connection did before) and deriving them once per
//! source ([`KeyCache`], as the shard's pools do). It prints, per setting,
//! the process's CPU time (user + system, /proc/self/stat, every thread:
//! the derivation runs on the blocking pool) and the wall time per
//! connection, as medians over the rounds, and their ratios.
//!
//!   bench/scram.sh                       # release build; writes bench/results/scram-<date>.txt
//!   ROUNDS=6 SOURCES=20 CONNS=12 cargo bench --bench scram_keys

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use shardpool::shard::scram::KeyCache;
use shardpool::shard::server::{ConnectParams, ServerConn};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// CPU seconds of this process so far (utime + stime, clock ticks of 1/100 s).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name, which is in parentheses.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of the line: 12 and 13 here.
    (ticks(11) + ticks(12)) / 100.0
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

#[tokio::main]
async fn main() {
    let rounds = env("ROUNDS", 4);
    let sources = env("SOURCES", 20);
    let conns = env("CONNS", 12);
    let pg = support::TestPg::start("scrambench");
    let params = |s: usize| ConnectParams {
        host: "127.0.0.1".into(),
        port: pg.port,
        database: "postgres".into(),
        user: pg.user.clone(),
        application_name: format!("shardpool/bench/s{s}/0"),
        statement_timeout: None,
        tls: Default::default(),
        legacy_password_auth: false,
    };
    let mut cpu = [Vec::new(), Vec::new()];
    let mut wall = [Vec::new(), Vec::new()];
    for round in 0..rounds {
        let order = if round % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for kept in order {
            let cpu0 = cpu_seconds();
            let t0 = Instant::now();
            let mut open = Vec::new();
            for s in 0..sources {
                let cache = KeyCache::default();
                let p = params(s);
                for _ in 0..conns {
                    let conn = if kept {
                        ServerConn::connect_with_keys(&p, &pg.password, &cache).await
                    } else {
                        ServerConn::connect(&p, &pg.password).await
                    };
                    open.push(conn.expect("connects"));
                }
            }
            let took = t0.elapsed();
            let used = cpu_seconds() - cpu0;
            for c in open {
                c.terminate().await;
            }
            let n = (sources * conns) as f64;
            cpu[usize::from(kept)].push(used * 1000.0 / n);
            wall[usize::from(kept)].push(took.as_secs_f64() * 1000.0 / n);
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    let (cpu_fresh, cpu_kept) = (median(cpu[0].clone()), median(cpu[1].clone()));
    let (wall_fresh, wall_kept) = (median(wall[0].clone()), median(wall[1].clone()));
    println!(
        "SCRAM-SHA-256 (4096 iterations), {sources} sources x {conns} connections per round, {rounds} rounds (ABBA), medians:"
    );
    println!(
        "  keys derived per connection: {cpu_fresh:.3} ms CPU, {wall_fresh:.3} ms wall per connection"
    );
    println!(
        "  keys kept per source:        {cpu_kept:.3} ms CPU, {wall_kept:.3} ms wall per connection"
    );
    println!(
        "  kept / derived: CPU {:.2}, wall {:.2}",
        cpu_kept / cpu_fresh,
        wall_kept / wall_fresh
    );
    println!(
        "  rounds, CPU ms per connection: derived {:?}, kept {:?}",
        cpu[0], cpu[1]
    );
}
