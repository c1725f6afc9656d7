//! The `shardpool` binary: one image, four roles picked by subcommand.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Sharded, warm connection pools to PostgreSQL-compatible warehouses.
#[derive(Parser, Debug)]
#[command(name = "shardpool", version, about)]
struct Cli {
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
    Router(shardpool::router::RouterConfig),
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
        Role::Shard(cfg) => run(shardpool::shard::run(cfg)),
        Role::Operator(cfg) => run(shardpool::operator::run(cfg)),
        Role::Router(cfg) => run(shardpool::router::run(cfg)),
    }
}

/// Runs a role on a multi-threaded runtime with logging set up.
fn run(role: impl std::future::Future<Output = anyhow::Result<i32>>) -> ExitCode {
    shardpool::telemetry::init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
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
