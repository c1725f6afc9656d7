//! Kubernetes API clients for every role. Every call is bounded: a hung
//! or unreachable API server costs a role one timeout per call, never a
//! stuck control loop.
//!
//! Two clients share the configuration found by `Config::infer()`:
//! `requests` bounds each request's answer (reads, writes, status, Events);
//! `watches` keeps no read timeout, because a watch may legitimately stay
//! silent for minutes (kube-runtime's watcher bounds those streams itself).

use std::time::Duration;

use kube::{Client, Config};

/// Longest wait for the API server to accept a connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest wait for an answer to one request (from when it was sent).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The two clients of a role.
#[derive(Clone)]
pub struct Clients {
    /// For requests: every answer bounded by [`REQUEST_TIMEOUT`].
    pub requests: Client,
    /// For watches: connecting bounded, reading not.
    pub watches: Client,
}

/// Builds both clients from the environment (KUBECONFIG or in-cluster).
pub async fn connect() -> anyhow::Result<Clients> {
    let base = Config::infer().await?;
    let mut requests = base.clone();
    requests.connect_timeout = Some(CONNECT_TIMEOUT);
    requests.read_timeout = Some(REQUEST_TIMEOUT);
    requests.write_timeout = Some(REQUEST_TIMEOUT);
    requests.reset_reader_on_write = true;
    let mut watches = base;
    watches.connect_timeout = Some(CONNECT_TIMEOUT);
    watches.write_timeout = Some(REQUEST_TIMEOUT);
    Ok(Clients {
        requests: Client::try_from(requests)?,
        watches: Client::try_from(watches)?,
    })
}
