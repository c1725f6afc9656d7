//! The startup phase of a client connection: decline SSL/GSS encryption
//! requests, pass cancel requests on to the caller, read the StartupMessage,
//! and authenticate the user with SCRAM-SHA-256 against the router's user
//! table. The whole phase is bounded by a timeout. On success the caller
//! has a session with AuthenticationOk already sent and goes on to write
//! ParameterStatus, BackendKeyData and ReadyForQuery itself.

use std::fmt;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::codec::{self, CodecError, PgError, StartupPacket};
use super::scram::{self, ScramError, ScramServer};
use super::users::Users;

/// PostgreSQL's own cap on the size of a startup packet.
const MAX_STARTUP_PACKET: usize = 10_000;
/// PostgreSQL's cap on the size of a SASL message.
const MAX_AUTH_MESSAGE: usize = 65_535;
/// How many SSLRequest/GSSENCRequest packets a client may send before its
/// StartupMessage (one of each, as libpq may do).
const MAX_ENCRYPTION_REQUESTS: usize = 2;

/// Bounds on the startup phase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Time allowed from accept to AuthenticationOk.
    pub startup_timeout: Duration,
    /// Largest frontend message accepted (startup packets and SASL messages
    /// are further capped at PostgreSQL's own, smaller limits).
    pub max_message: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            startup_timeout: Duration::from_secs(10),
            max_message: 1 << 20,
        }
    }
}

/// The outcome of a successful startup phase.
#[derive(Clone, PartialEq, Eq)]
pub enum Handshake {
    /// An authenticated session; AuthenticationOk has been sent.
    Session {
        /// The authenticated user.
        user: String,
        /// The requested database (the user name if none was given).
        database: String,
        /// Every other startup parameter, in the order sent.
        params: Vec<(String, String)>,
    },
    /// A CancelRequest; nothing has been sent back, per protocol.
    Cancel {
        /// Backend process id to cancel.
        pid: u32,
        /// Secret key proving the right to cancel.
        secret: u32,
    },
}

impl fmt::Debug for Handshake {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Session {
                user,
                database,
                params,
            } => f
                .debug_struct("Session")
                .field("user", user)
                .field("database", database)
                .field("params", params)
                .finish(),
            Self::Cancel { pid, .. } => f
                .debug_struct("Cancel")
                .field("pid", pid)
                .finish_non_exhaustive(),
        }
    }
}

/// Why the startup phase ended without a session.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// A frontend message could not be decoded.
    #[error("{0}")]
    Codec(#[from] CodecError),
    /// The client did not finish the startup phase in time.
    #[error("startup timed out")]
    Timeout,
    /// Wrong password or unknown user.
    #[error("password authentication failed for user \"{user}\"")]
    Auth {
        /// The user name from the startup packet.
        user: String,
    },
    /// The client broke the protocol or left in the middle of it.
    #[error("protocol violation: {0}")]
    Protocol(&'static str),
    /// Writing to the client failed.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

/// Runs the startup phase on `stream`, bounded by `limits.startup_timeout`.
/// On timeout nothing more is written. Errors the client can be told about
/// are sent as a FATAL ErrorResponse before returning.
pub async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    users: &Users,
    limits: &Limits,
) -> Result<Handshake, StartupError> {
    tokio::time::timeout(
        limits.startup_timeout,
        run(stream, users, limits.max_message),
    )
    .await
    .unwrap_or(Err(StartupError::Timeout))
}

async fn run<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    users: &Users,
    max_message: usize,
) -> Result<Handshake, StartupError> {
    let mut out = BytesMut::with_capacity(256);
    let max_startup = max_message.min(MAX_STARTUP_PACKET);
    let max_auth = max_message.min(MAX_AUTH_MESSAGE);

    let mut encryption_requests = 0;
    let mut params = loop {
        match codec::read_startup(stream, max_startup).await {
            Ok(StartupPacket::SslRequest | StartupPacket::GssEncRequest) => {
                encryption_requests += 1;
                if encryption_requests > MAX_ENCRYPTION_REQUESTS {
                    let msg = "too many encryption requests";
                    let err = PgError::fatal("08P01", msg);
                    return Err(fail(stream, &mut out, &err, StartupError::Protocol(msg)).await);
                }
                stream.write_all(b"N").await?;
                stream.flush().await?;
            }
            Ok(StartupPacket::Cancel { pid, secret }) => {
                return Ok(Handshake::Cancel { pid, secret });
            }
            Ok(StartupPacket::Startup { params }) => break params,
            Err(e) => return Err(codec_fail(stream, &mut out, e).await),
        }
    };

    let Some(user) = take_param(&mut params, "user").filter(|u| !u.is_empty()) else {
        let err = PgError::fatal(
            "28000",
            "no PostgreSQL user name specified in startup packet",
        );
        let ret = StartupError::Protocol("no user name in startup packet");
        return Err(fail(stream, &mut out, &err, ret).await);
    };
    let database = take_param(&mut params, "database")
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| user.clone());

    codec::authentication_sasl(&mut out, &[scram::MECHANISM]);
    send(stream, &mut out).await?;

    let mut scram = ScramServer::new_for_user(&user, users.verifier(&user));

    // SASLInitialResponse: mechanism NUL, i32 length (-1: none), data.
    let initial = read_sasl(stream, &mut out, max_auth).await?;
    let client_first = match parse_initial_response(&initial) {
        Ok(Some(data)) => data,
        Ok(None) => {
            // No initial response: ask for it with an empty challenge.
            codec::authentication_sasl_continue(&mut out, b"");
            send(stream, &mut out).await?;
            read_sasl(stream, &mut out, max_auth).await?
        }
        Err(msg) => {
            let err = PgError::fatal("08P01", msg);
            return Err(fail(stream, &mut out, &err, StartupError::Protocol(msg)).await);
        }
    };
    let server_first = match scram.handle_client_first(&client_first) {
        Ok(m) => m,
        Err(e) => return Err(scram_fail(stream, &mut out, user, e).await),
    };
    codec::authentication_sasl_continue(&mut out, &server_first);
    send(stream, &mut out).await?;

    let client_final = read_sasl(stream, &mut out, max_auth).await?;
    let server_final = match scram.handle_client_final(&client_final) {
        Ok(m) => m,
        Err(e) => return Err(scram_fail(stream, &mut out, user, e).await),
    };
    codec::authentication_sasl_final(&mut out, &server_final);
    codec::authentication_ok(&mut out);
    send(stream, &mut out).await?;

    Ok(Handshake::Session {
        user,
        database,
        params,
    })
}

/// Removes the first parameter called `name` and returns its value.
fn take_param(params: &mut Vec<(String, String)>, name: &str) -> Option<String> {
    let i = params.iter().position(|(k, _)| k == name)?;
    Some(params.remove(i).1)
}

/// Splits a SASLInitialResponse body. `Ok(None)` means the client sent no
/// initial response (length -1).
fn parse_initial_response(body: &Bytes) -> Result<Option<Bytes>, &'static str> {
    let mut rest = &body[..];
    let mechanism = codec::take_cstr(&mut rest).ok_or("malformed sasl initial response")?;
    if mechanism != scram::MECHANISM.as_bytes() {
        return Err("client selected an invalid sasl authentication mechanism");
    }
    let (len, data) = rest
        .split_first_chunk::<4>()
        .ok_or("malformed sasl initial response")?;
    let len = i32::from_be_bytes(*len);
    if len == -1 && data.is_empty() {
        return Ok(None);
    }
    if usize::try_from(len).ok() != Some(data.len()) {
        return Err("malformed sasl initial response");
    }
    Ok(Some(body.slice(body.len() - data.len()..)))
}

/// Reads a SASLInitialResponse or SASLResponse ('p') message body.
async fn read_sasl<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    out: &mut BytesMut,
    max_len: usize,
) -> Result<Bytes, StartupError> {
    match codec::read_message(stream, max_len).await {
        Ok(Some((b'p', body))) => Ok(body),
        Ok(Some(_)) => {
            let msg = "expected sasl response";
            let err = PgError::fatal("08P01", msg);
            Err(fail(stream, out, &err, StartupError::Protocol(msg)).await)
        }
        Ok(None) => Err(StartupError::Protocol("client closed the connection")),
        Err(e) => Err(codec_fail(stream, out, e).await),
    }
}

/// Writes and flushes `out`, leaving it empty for reuse.
async fn send<S: AsyncWrite + Unpin>(stream: &mut S, out: &mut BytesMut) -> std::io::Result<()> {
    stream.write_all(out).await?;
    stream.flush().await?;
    out.clear();
    Ok(())
}

/// Tells the client about `err` (best effort) and returns `ret`.
async fn fail<S: AsyncWrite + Unpin>(
    stream: &mut S,
    out: &mut BytesMut,
    err: &PgError,
    ret: StartupError,
) -> StartupError {
    out.clear();
    codec::error_response(out, err);
    // The client may already be gone; the original error matters more.
    let _ = send(stream, out).await;
    ret
}

/// Reports a decoding error to the client, unless the stream itself failed.
async fn codec_fail<S: AsyncWrite + Unpin>(
    stream: &mut S,
    out: &mut BytesMut,
    e: CodecError,
) -> StartupError {
    let err = match &e {
        CodecError::Io(_) => return StartupError::Codec(e),
        CodecError::TooLarge => PgError::fatal("08P01", "invalid message length"),
        CodecError::Malformed(msg) => PgError::fatal("08P01", *msg),
        CodecError::UnsupportedProtocol(v) => PgError::fatal(
            "0A000",
            format!(
                "unsupported frontend protocol {}.{}: server supports 3.0",
                v >> 16,
                v & 0xffff
            ),
        ),
    };
    fail(stream, out, &err, StartupError::Codec(e)).await
}

/// Reports a failed SCRAM exchange. A wrong proof and an unknown user look
/// the same to the client.
async fn scram_fail<S: AsyncWrite + Unpin>(
    stream: &mut S,
    out: &mut BytesMut,
    user: String,
    e: ScramError,
) -> StartupError {
    let reason = match e {
        ScramError::BadPassword | ScramError::NonceMismatch => {
            let err = PgError::fatal(
                "28P01",
                format!("password authentication failed for user \"{user}\""),
            );
            return fail(stream, out, &err, StartupError::Auth { user }).await;
        }
        ScramError::Malformed(_) => "malformed scram message",
        ScramError::Unsupported(_) => "unsupported scram feature",
        ScramError::ChannelBindingMismatch => "scram channel binding check failed",
        ScramError::InvalidVerifier(_) => "invalid scram verifier",
        ScramError::OutOfOrder => "scram message out of order",
    };
    let err = PgError::fatal("08P01", e.to_string());
    fail(stream, out, &err, StartupError::Protocol(reason)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initial_response_layout() {
        let b = Bytes::from_static(b"SCRAM-SHA-256\0\0\0\0\x03abc");
        assert_eq!(
            parse_initial_response(&b),
            Ok(Some(Bytes::from_static(b"abc")))
        );
        let b = Bytes::from_static(b"SCRAM-SHA-256\0\xff\xff\xff\xff");
        assert_eq!(parse_initial_response(&b), Ok(None));
        for bad in [
            &b"SCRAM-SHA-256\0\0\0\0\x04abc"[..],
            b"SCRAM-SHA-256\0\0\0\0\x02abc",
            b"SCRAM-SHA-256\0\xff\xff\xff\xffabc",
            b"SCRAM-SHA-256\0\xff\xff\xff\xfe",
            b"SCRAM-SHA-256\0\0\0",
            b"SCRAM-SHA-256",
            b"SCRAM-SHA-256-PLUS\0\0\0\0\0",
            b"",
        ] {
            assert!(
                parse_initial_response(&Bytes::copy_from_slice(bad)).is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn cancel_debug_hides_secret() {
        let h = Handshake::Cancel {
            pid: 42,
            secret: 987_654_321,
        };
        let dbg = format!("{h:?}");
        assert!(dbg.contains("42") && !dbg.contains("987654321"), "{dbg}");
    }
}
