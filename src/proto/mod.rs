//! The router-to-shard protocol: persistent TCP connections multiplexing
//! many client sessions. Each frame carries a session id, a kind and a
//! payload; `Messages` payloads are PostgreSQL protocol messages passed
//! through verbatim in both directions, so the shard runs exactly what the
//! client sent and the client sees exactly what the warehouse answered.
//!
//! A connection starts with the router sending [`HELLO`]; the shard answers
//! with the same 8 bytes. After that both sides send frames:
//!
//! ```text
//! u32 session | u8 kind | u32 payload length | payload
//! ```
//!
//! Router to shard: `Open` (payload: `namespace/name`), `Messages`, `Cancel`,
//! `Close`. Shard to router: `Opened` (payload: ParameterStatus messages of
//! the source's server, to replay to the client) or `Closed` (payload: an
//! ErrorResponse), and `Messages`.

pub mod frame;
pub mod outbox;
pub mod pg;
pub mod stream;

/// First bytes of every router-to-shard connection, in both directions.
pub const HELLO: &[u8; 8] = b"SHPOOL01";
