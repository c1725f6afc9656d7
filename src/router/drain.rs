//! Router drain on SIGTERM, so that replacing a router pod costs its
//! clients a reconnect and never a transaction:
//!
//! 1. readiness fails at once, and the router goes on accepting and serving
//!    for `delay` while the Service's endpoints drop the pod;
//! 2. it stops accepting connections and tells every session to end at its
//!    next idle point ([`Drain::AtIdle`]): a session finishes its current
//!    transaction, then gets a FATAL ErrorResponse with SQLSTATE 57P01
//!    ("the router is restarting"), which drivers and pools take as a
//!    reason to reconnect; HTTP requests in flight finish;
//! 3. at the deadline, sessions still inside a transaction get the same
//!    57P01 and are closed ([`Drain::Now`]); their transactions roll back.

use std::time::Duration;

use tokio::sync::watch;

use super::pgwire::codec::PgError;

/// What sessions are told to do; only ever moves forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Drain {
    /// Normal operation.
    Serving,
    /// End at the next idle point (no transaction open, nothing unanswered).
    AtIdle,
    /// End now (the drain deadline passed).
    Now,
}

/// SQLSTATE admin_shutdown: drivers and pools reconnect on it.
pub const RESTARTING: &str = "57P01";

/// The error a drained session ends with.
pub fn restarting(at_deadline: bool) -> PgError {
    let message = if at_deadline {
        "terminating connection because the shardpool router is restarting and the transaction outlived its drain deadline; reconnect and retry"
    } else {
        "terminating connection because the shardpool router is restarting; reconnect"
    };
    PgError::fatal(RESTARTING, message)
}

/// Whether a session in this state must end now: `idle` is true when no
/// transaction is open and nothing sent is unanswered.
pub fn must_end(drain: Drain, idle: bool) -> bool {
    match drain {
        Drain::Serving => false,
        Drain::AtIdle => idle,
        Drain::Now => true,
    }
}

/// How long each step takes, from the chart's values.
#[derive(Debug, Clone, Copy)]
pub struct DrainTimes {
    /// Serving on after readiness failed, for the endpoints to update.
    pub delay: Duration,
    /// From the end of `delay` until open transactions are ended.
    pub deadline: Duration,
}

/// The sessions' side of the drain: one sender in the router's main task,
/// a receiver in every session.
pub fn channel() -> (watch::Sender<Drain>, watch::Receiver<Drain>) {
    watch::channel(Drain::Serving)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_end_at_idle_points_and_all_at_the_deadline() {
        assert!(!must_end(Drain::Serving, true));
        assert!(!must_end(Drain::AtIdle, false), "a transaction finishes");
        assert!(must_end(Drain::AtIdle, true));
        assert!(must_end(Drain::Now, false));
        assert!(Drain::Serving < Drain::AtIdle && Drain::AtIdle < Drain::Now);
        let e = restarting(false);
        assert_eq!(e.code, RESTARTING);
        assert!(e.message.contains("restarting"));
    }
}
