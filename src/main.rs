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
    Operator,
    /// Hold the pools of the sources assigned to shard K while holding its Lease.
    Shard {
        /// Shard index K.
        #[arg(long, env = "SHARDPOOL_SHARD_INDEX")]
        index: u32,
    },
    /// Accept PostgreSQL-protocol and HTTP clients and forward to the owning shard.
    Router,
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
        Role::Operator | Role::Shard { .. } | Role::Router => {
            shardpool::telemetry::init();
            tracing::error!(role = ?cli.role, "this role is not implemented in this build");
            ExitCode::from(2)
        }
    }
}
