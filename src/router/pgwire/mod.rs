//! Client-facing PostgreSQL wire protocol (v3) for the router: framing of
//! frontend and backend messages, the server side of SCRAM-SHA-256, the
//! router's user table, and the startup/authentication handshake that turns
//! a freshly accepted connection into an authenticated session (or a cancel
//! request). TLS is not offered here; SSL and GSS encryption requests are
//! declined so that clients fall back to plaintext.

pub mod codec;
pub mod scram;
pub mod startup;
pub mod users;
