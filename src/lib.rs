//! shardpool keeps warm connection pools to thousands of PostgreSQL-compatible
//! warehouses inside a Kubernetes cluster, sharded so that every warehouse's
//! pool lives in exactly one pod, and reached through a thin query router.
//! This library holds every role's code; the `shardpool` binary picks a role
//! by subcommand. See DESIGN.md in the shared notes for the architecture.
#![forbid(unsafe_code)]

pub mod apiclient;
pub mod crd;
pub mod health;
pub mod lease;
pub mod linkcerts;
pub mod metrics;
pub mod operator;
pub mod proto;
pub mod router;
pub mod scram;
pub mod shard;
pub mod shutdown;
pub mod telemetry;
pub mod watch;
