//! Taking a server connection for one transaction. The wait is bounded by
//! the source's `acquireTimeout`, and within it a failure to connect is not
//! final: a warehouse that restarts or fails over comes back while queries
//! wait, so they are retried until the deadline. An error that does reach
//! the client carries its true class: the server's own SQLSTATE for its
//! refusals (57P03 while starting up), 08001 when it cannot be reached, and
//! 53300 only when every connection stayed busy for the whole wait.
//!
//! Hot path: an idle connection is handed out by the first `get`; the
//! retry loop runs only while connections cannot be had.

use std::time::Duration;

use deadpool::managed::{PoolError, TimeoutType, Timeouts};
use tokio::time::Instant;

use super::pool::{Conn, Pool};
use super::server::ConnectError;

/// Pause between attempts while the warehouse refuses connections.
const CONNECT_RETRY: Duration = Duration::from_millis(100);

/// Pause between attempts while the shard may not open connections and
/// waits for one of its open ones to be returned.
const RETURN_POLL: Duration = Duration::from_millis(20);

/// Why no connection was had.
#[derive(Debug, thiserror::Error)]
pub enum CheckoutError {
    /// Every connection stayed busy for the whole wait.
    #[error("no server connection became free within acquireTimeout ({0:?})")]
    Exhausted(Duration),
    /// The warehouse could not be connected to within the wait.
    #[error("cannot connect to the warehouse within acquireTimeout ({waited:?}): {error}")]
    Connect {
        /// How long the query waited.
        waited: Duration,
        /// The last attempt's error.
        error: ConnectError,
    },
    /// This shard cannot serve the source now (closing, or its Lease is
    /// not renewed and no connection of it is open): nothing ran, the
    /// router may send the transaction to the source's next owner.
    #[error("this shard cannot serve the source now: {0}")]
    Handover(String),
}

impl CheckoutError {
    /// The SQLSTATE the client gets.
    pub fn sqlstate(&self) -> &str {
        match self {
            CheckoutError::Exhausted(_) => "53300",
            CheckoutError::Connect { error, .. } => error.sqlstate(),
            CheckoutError::Handover(_) => crate::proto::pg::DRAINING,
        }
    }
}

/// Takes a connection from `pool` within `wait`, retrying while it cannot
/// connect (see the module doc).
pub async fn get(pool: &Pool, wait: Duration) -> Result<Conn, CheckoutError> {
    let started = Instant::now();
    let deadline = started + wait;
    let create = pool.manager().settings().connect_timeout + Duration::from_secs(1);
    let mut last: Option<ConnectError> = None;
    loop {
        super::pool::lift_cap_when_warm(pool);
        let remaining = deadline.saturating_duration_since(Instant::now());
        let timeouts = Timeouts {
            wait: Some(remaining),
            create: Some(create.min(remaining.max(Duration::from_millis(1)))),
            recycle: Some(Duration::from_secs(5)),
        };
        let pause = match pool.timeout_get(&timeouts).await {
            Ok(conn) => {
                note_growth(pool, &conn);
                return Ok(conn);
            }
            Err(PoolError::Backend(ConnectError::Closed)) | Err(PoolError::Closed) => {
                return Err(CheckoutError::Handover("the source is closing".into()));
            }
            Err(PoolError::Backend(ConnectError::NoLease)) => {
                // Serve on what is open; with nothing open, nothing returns.
                if pool.status().size == 0 {
                    return Err(CheckoutError::Handover(ConnectError::NoLease.to_string()));
                }
                RETURN_POLL
            }
            Err(PoolError::Backend(e)) => {
                last = Some(e);
                CONNECT_RETRY
            }
            Err(PoolError::Timeout(TimeoutType::Create)) => {
                last = Some(ConnectError::Timeout);
                CONNECT_RETRY
            }
            Err(PoolError::Timeout(_)) => Duration::ZERO,
            Err(e) => {
                last = Some(ConnectError::Protocol(e.to_string()));
                CONNECT_RETRY
            }
        };
        let now = Instant::now();
        if now >= deadline {
            return Err(match last {
                Some(error) => CheckoutError::Connect {
                    waited: now - started,
                    error,
                },
                None => CheckoutError::Exhausted(wait),
            });
        }
        tokio::time::sleep(pause.min(deadline - now)).await;
    }
}

/// Logs (debug) a connection opened for this checkout that took the pool
/// above minIdle: the pool grows for demand here, and only here.
///
/// Hot path: a reused connection costs one field read; the pool's status
/// (a lock) is read only for a connection opened for this checkout.
fn note_growth(pool: &Pool, conn: &Conn) {
    let m = deadpool::managed::Object::metrics(conn);
    if m.recycle_count > 0 || m.created.elapsed() >= Duration::from_secs(1) {
        return;
    }
    let status = pool.status();
    if status.size > pool.manager().settings().min_idle {
        tracing::debug!(
            application_name = %pool.manager().application_name(),
            size = status.size,
            idle = status.available,
            waiting = status.waiting,
            opening = pool.manager().opening(),
            "a query opened a connection above minIdle"
        );
    }
}
