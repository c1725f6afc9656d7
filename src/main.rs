//! The `shardpool` binary: one image, four roles picked by subcommand.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Sharded, warm connection pools to PostgreSQL-compatible warehouses.
#[derive(Parser, Debug)]
#[command(name = "shardpool", version, about)]
struct Cli {
    /// Threads that run the role's tasks: 1 runs everything on one thread
    /// (on the query path the least CPU per query: no cross-thread wake-ups,
    /// and whatever the sessions queued for a router-shard link in one turn
    /// of the scheduler goes out in one write; see bench/), 0 one per core,
    /// N a pool of N. Scale routers and shards out rather than up.
    #[arg(
        long,
        global = true,
        env = "SHARDPOOL_WORKER_THREADS",
        default_value_t = 1
    )]
    worker_threads: usize,
    #[command(subcommand)]
    role: Role,
}

#[derive(Subcommand, Debug)]
enum Role {
    /// Print the DataSource CustomResourceDefinition as YAML.
    Crd,
    /// Reconcile DataSources: assign shards, own shard workloads, roll them.
    Operator(shardpool::operator::OperatorConfig),
    /// Hold the pools of the sources assigned to shard K while holding its Lease.
    Shard(shardpool::shard::ShardConfig),
    /// Accept PostgreSQL-protocol and HTTP clients and forward to the owning shard.
    Router(Box<shardpool::router::RouterConfig>),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.role {
        Role::Crd => match shardpool::crd::crd_yaml() {
            Ok(yaml) => {
                print!("{yaml}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: cannot render the CRD: {e}");
                ExitCode::FAILURE
            }
        },
        Role::Shard(cfg) => run(cli.worker_threads, shardpool::shard::run(cfg)),
        Role::Operator(cfg) => run(cli.worker_threads, shardpool::operator::run(cfg)),
        Role::Router(cfg) => run(cli.worker_threads, shardpool::router::run(*cfg)),
    }
}

/// Runs a role with logging set up, on one thread (`threads` = 1) or a
/// pool of `threads` (0: one per core).
fn run(threads: usize, role: impl std::future::Future<Output = anyhow::Result<i32>>) -> ExitCode {
    shardpool::telemetry::init();
    let mut builder = match threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        0 => tokio::runtime::Builder::new_multi_thread(),
        n => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
    };
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(role) {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "exiting");
            ExitCode::FAILURE
        }
    }
}
