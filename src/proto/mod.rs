//! The router-to-shard protocol: persistent TCP connections multiplexing
//! many client sessions. Each frame carries a session id, a kind and a
//! payload; `Messages` payloads are PostgreSQL protocol messages passed
//! through verbatim in both directions, so the shard runs exactly what the
//! client sent and the client sees exactly what the warehouse answered.
//!
//! A connection starts with the router sending [`HELLO`]; the shard answers
//! with the same 8 bytes. A shard that does not know version 2 closes the
//! connection instead, and the router falls back to [`HELLO_V1`]. After
//! that both sides send frames:
//!
//! ```text
//! u32 session | u8 kind | u32 payload length | payload
//! ```
//!
//! Router to shard: `Open` (payload: `namespace/name`), `Messages`, `Cancel`,
//! `Close`. Shard to router: `Opened` (payload: ParameterStatus messages of
//! the source's server, to replay to the client) or `Closed` (payload: an
//! ErrorResponse), and `Messages`.
//!
//! Version 2 adds liveness: the router sends `Ping` (session 0) every
//! [`liveness::PING_EVERY`], the shard answers `Pong`; either side that
//! hears nothing from the other for its silence limit closes the connection
//! (see [`liveness`]).
//!
//! Version 3 adds per-session flow control: a side that holds more than
//! [`flow::HIGH_WATER`] bytes of one session's frames sends `Pause` for
//! that session, and `Resume` once it is below [`flow::LOW_WATER`]; the
//! other side stops producing that session's frames meanwhile. Readers
//! never wait for one session, so a slow client holds back only itself.
//!
//! Version 4 lets `Open` carry the client's named prepared statements:
//! after `namespace/name`, a NUL byte and the client's Parse messages. The
//! shard registers them for the session without sending them anywhere
//! (each is prepared on a server connection when a Bind or Describe needs
//! it), so a session that moves to another shard process keeps them.
//!
//! Version 5 lets `Open` say who the session is for (client identity,
//! its weight, a cost tag; see [`open`]), so the shard's admission queue
//! can be fair across clients and enforce per-client quotas. The shard may
//! send `Notice` (a NoticeResponse for the client, such as "still waiting
//! for a connection") and, when asked, `Admitted` with the time the
//! transaction waited.
//!
//! Version 6 adds `Released` on session 0, in both directions: a shard
//! that let go of a source tells its routers which shard it hands the
//! source to, and each router passes the note on to that shard, which then
//! opens the source without waiting for the API server to carry the same
//! news (see [`released`]).

pub mod flow;
pub mod frame;
pub mod linktls;
pub mod liveness;
pub mod open;
pub mod outbox;
pub mod pg;
pub mod released;
pub mod stream;

/// First bytes of every router-to-shard connection, in both directions:
/// version 2 (with liveness pings).
pub const HELLO: &[u8; 8] = b"SHPOOL02";

/// Version 3 of the greeting: version 2 with per-session flow control.
pub const HELLO_V3: &[u8; 8] = b"SHPOOL03";

/// Version 4 of the greeting: version 3, and `Open` may carry the
/// session's named prepared statements.
pub const HELLO_V4: &[u8; 8] = b"SHPOOL04";

/// Version 5 of the greeting: version 4, `Open` names the client, and
/// the shard may send `Notice` and `Admitted`.
pub const HELLO_V5: &[u8; 8] = b"SHPOOL05";

/// Version 6 of the greeting: version 5, and `Released` notes between
/// shards through the routers.
pub const HELLO_V6: &[u8; 8] = b"SHPOOL06";

/// Splits an `Open` payload into the source key and the Parse messages
/// that follow it (version 4; empty otherwise).
pub fn split_open(payload: &[u8]) -> (&[u8], &[u8]) {
    match payload.iter().position(|&b| b == 0) {
        Some(i) => (&payload[..i], &payload[i + 1..]),
        None => (payload, &[]),
    }
}

/// Version 1 of the greeting (no pings), still accepted by shards and
/// spoken by routers to shards that do not know version 2.
pub const HELLO_V1: &[u8; 8] = b"SHPOOL01";
