//! Framing for the PostgreSQL v3 wire protocol: reading the untyped
//! startup-phase packets and typed frontend messages from a client, and
//! appending backend messages to an output buffer. Everything read from the
//! network is length-checked against a caller-supplied maximum before any
//! buffer is allocated, and malformed input is reported as a [`CodecError`].

use std::fmt;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Request code of an SSLRequest packet.
pub const SSL_REQUEST_CODE: u32 = 80_877_103;
/// Request code of a GSSENCRequest packet.
pub const GSSENC_REQUEST_CODE: u32 = 80_877_104;
/// Request code of a CancelRequest packet.
pub const CANCEL_REQUEST_CODE: u32 = 80_877_102;
/// Protocol version 3.0 as sent in a StartupMessage.
pub const PROTOCOL_3_0: u32 = 196_608;

/// Errors while decoding frontend messages.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The underlying stream failed or ended in the middle of a message.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// The announced message length exceeds the configured maximum.
    #[error("message too large")]
    TooLarge,
    /// The message does not follow the protocol's layout.
    #[error("malformed message: {0}")]
    Malformed(&'static str),
    /// A StartupMessage asked for a protocol version other than 3.0.
    #[error("unsupported protocol version {}.{}", .0 >> 16, .0 & 0xffff)]
    UnsupportedProtocol(u32),
}

/// A packet of the startup phase (these have no type byte).
#[derive(Clone, PartialEq, Eq)]
pub enum StartupPacket {
    /// The client asks for TLS.
    SslRequest,
    /// The client asks for GSSAPI encryption.
    GssEncRequest,
    /// The client asks to cancel the query running on another connection.
    Cancel {
        /// Backend process id from BackendKeyData.
        pid: u32,
        /// Secret key from BackendKeyData.
        secret: u32,
    },
    /// A protocol 3.0 StartupMessage with its parameters, in order.
    Startup {
        /// Key/value pairs as sent (user, database, options, ...).
        params: Vec<(String, String)>,
    },
}

impl fmt::Debug for StartupPacket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::SslRequest => f.write_str("SslRequest"),
            Self::GssEncRequest => f.write_str("GssEncRequest"),
            // The cancel secret is a credential: never print it.
            Self::Cancel { pid, .. } => f
                .debug_struct("Cancel")
                .field("pid", pid)
                .finish_non_exhaustive(),
            Self::Startup { params } => f.debug_struct("Startup").field("params", params).finish(),
        }
    }
}

/// Reads one startup-phase packet: a 4-byte big-endian length (counting
/// itself), a 4-byte request code or protocol version, then the payload.
///
/// Packets shorter than 8 bytes or longer than `max_len` are rejected
/// before their body is read.
pub async fn read_startup<R: AsyncRead + Unpin>(
    r: &mut R,
    max_len: usize,
) -> Result<StartupPacket, CodecError> {
    let len = r.read_u32().await? as usize;
    if len < 8 {
        return Err(CodecError::Malformed("invalid startup packet length"));
    }
    if len > max_len {
        return Err(CodecError::TooLarge);
    }
    let code = r.read_u32().await?;
    let body_len = len - 8;
    match code {
        SSL_REQUEST_CODE | GSSENC_REQUEST_CODE => {
            if body_len != 0 {
                return Err(CodecError::Malformed("invalid encryption request length"));
            }
            Ok(if code == SSL_REQUEST_CODE {
                StartupPacket::SslRequest
            } else {
                StartupPacket::GssEncRequest
            })
        }
        CANCEL_REQUEST_CODE => {
            if body_len != 8 {
                return Err(CodecError::Malformed("invalid cancel request length"));
            }
            let pid = r.read_u32().await?;
            let secret = r.read_u32().await?;
            Ok(StartupPacket::Cancel { pid, secret })
        }
        PROTOCOL_3_0 => {
            let mut body = vec![0u8; body_len];
            r.read_exact(&mut body).await?;
            let params = parse_startup_params(&body)?;
            Ok(StartupPacket::Startup { params })
        }
        other => Err(CodecError::UnsupportedProtocol(other)),
    }
}

/// Parses the NUL-terminated key/value pairs of a StartupMessage, which end
/// with an extra NUL byte.
fn parse_startup_params(mut body: &[u8]) -> Result<Vec<(String, String)>, CodecError> {
    let mut params = Vec::new();
    loop {
        let key = take_cstr(&mut body).ok_or(CodecError::Malformed(
            "missing terminator in startup packet",
        ))?;
        if key.is_empty() {
            if !body.is_empty() {
                return Err(CodecError::Malformed("trailing data in startup packet"));
            }
            return Ok(params);
        }
        let value = take_cstr(&mut body).ok_or(CodecError::Malformed(
            "missing terminator in startup packet",
        ))?;
        let key = std::str::from_utf8(key)
            .map_err(|_| CodecError::Malformed("startup parameter is not utf-8"))?;
        let value = std::str::from_utf8(value)
            .map_err(|_| CodecError::Malformed("startup parameter is not utf-8"))?;
        params.push((key.to_owned(), value.to_owned()));
    }
}

/// Splits a NUL-terminated string off the front of `buf`, returning it
/// without the NUL, or `None` when there is no NUL.
pub fn take_cstr<'a>(buf: &mut &'a [u8]) -> Option<&'a [u8]> {
    let pos = buf.iter().position(|&b| b == 0)?;
    let (s, rest) = buf.split_at(pos);
    *buf = &rest[1..];
    Some(s)
}

/// Reads one typed frontend message: a type byte, a 4-byte big-endian
/// length counting itself, and the body. Returns the type byte and the body,
/// or `None` if the stream ended cleanly before a new message began.
pub async fn read_message<R: AsyncRead + Unpin>(
    r: &mut R,
    max_len: usize,
) -> Result<Option<(u8, Bytes)>, CodecError> {
    let mut tag = [0u8; 1];
    if r.read(&mut tag).await? == 0 {
        return Ok(None);
    }
    let len = r.read_u32().await? as usize;
    if len < 4 {
        return Err(CodecError::Malformed("invalid message length"));
    }
    if len > max_len {
        return Err(CodecError::TooLarge);
    }
    let mut body = BytesMut::zeroed(len - 4);
    r.read_exact(&mut body).await?;
    Ok(Some((tag[0], body.freeze())))
}

// Backend message framing is shared with the shard (proto::pg).
use crate::proto::pg::{put_cstr, put_message as message};

/// AuthenticationOk.
pub fn authentication_ok(buf: &mut BytesMut) {
    message(buf, b'R', |b| b.put_u32(0));
}

/// AuthenticationSASL listing the offered mechanisms.
pub fn authentication_sasl(buf: &mut BytesMut, mechanisms: &[&str]) {
    message(buf, b'R', |b| {
        b.put_u32(10);
        for m in mechanisms {
            put_cstr(b, m);
        }
        b.put_u8(0);
    });
}

/// AuthenticationSASLContinue carrying a server challenge.
pub fn authentication_sasl_continue(buf: &mut BytesMut, data: &[u8]) {
    message(buf, b'R', |b| {
        b.put_u32(11);
        b.put_slice(data);
    });
}

/// AuthenticationSASLFinal carrying the server's final SASL message.
pub fn authentication_sasl_final(buf: &mut BytesMut, data: &[u8]) {
    message(buf, b'R', |b| {
        b.put_u32(12);
        b.put_slice(data);
    });
}

/// ParameterStatus reporting a run-time parameter.
pub fn parameter_status(buf: &mut BytesMut, name: &str, value: &str) {
    crate::proto::pg::put_parameter(buf, name, value);
}

/// BackendKeyData with the identifiers a client needs to cancel queries.
pub fn backend_key_data(buf: &mut BytesMut, pid: u32, secret: u32) {
    message(buf, b'K', |b| {
        b.put_u32(pid);
        b.put_u32(secret);
    });
}

/// ReadyForQuery with a transaction status of b'I', b'T' or b'E'.
pub fn ready_for_query(buf: &mut BytesMut, status: u8) {
    crate::proto::pg::put_ready(buf, status);
}

/// An error to report to the client in an ErrorResponse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgError {
    /// "FATAL" (the connection ends) or "ERROR".
    pub severity: &'static str,
    /// Five-character SQLSTATE.
    pub code: String,
    /// Primary human-readable message.
    pub message: String,
    /// Optional secondary detail.
    pub detail: Option<String>,
    /// Optional hint.
    pub hint: Option<String>,
}

impl PgError {
    /// A FATAL error with only a code and a message.
    pub fn fatal(code: &str, message: impl Into<String>) -> Self {
        Self {
            severity: "FATAL",
            code: code.to_owned(),
            message: message.into(),
            detail: None,
            hint: None,
        }
    }
}

/// ErrorResponse with fields S, V, C, M and optionally D and H.
pub fn error_response(buf: &mut BytesMut, err: &PgError) {
    crate::proto::pg::put_error_fields(
        buf,
        err.severity,
        &err.code,
        &err.message,
        err.detail.as_deref(),
        err.hint.as_deref(),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn startup_bytes(code: u32, body: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&((body.len() + 8) as u32).to_be_bytes());
        v.extend_from_slice(&code.to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    async fn startup(bytes: &[u8]) -> Result<StartupPacket, CodecError> {
        let mut r = bytes;
        read_startup(&mut r, 10_000).await
    }

    #[tokio::test]
    async fn startup_packets() {
        let p = startup(&startup_bytes(SSL_REQUEST_CODE, b"")).await;
        assert_eq!(p.expect("ssl"), StartupPacket::SslRequest);
        let p = startup(&startup_bytes(GSSENC_REQUEST_CODE, b"")).await;
        assert_eq!(p.expect("gss"), StartupPacket::GssEncRequest);
        let mut cancel = 7u32.to_be_bytes().to_vec();
        cancel.extend_from_slice(&9u32.to_be_bytes());
        let p = startup(&startup_bytes(CANCEL_REQUEST_CODE, &cancel)).await;
        assert_eq!(
            p.expect("cancel"),
            StartupPacket::Cancel { pid: 7, secret: 9 }
        );
        let p = startup(&startup_bytes(PROTOCOL_3_0, b"user\0bi\0database\0x\0\0")).await;
        assert_eq!(
            p.expect("startup"),
            StartupPacket::Startup {
                params: vec![
                    ("user".into(), "bi".into()),
                    ("database".into(), "x".into())
                ]
            }
        );
    }

    #[tokio::test]
    async fn startup_garbage() {
        let cases: Vec<Vec<u8>> = vec![
            vec![],
            vec![0, 0, 0, 3],
            vec![0xff, 0xff, 0xff, 0xff],
            startup_bytes(0x0002_0000, b""),
            startup_bytes(0x0003_0002, b"\0"),
            startup_bytes(PROTOCOL_3_0, b"user\0bi\0"),
            startup_bytes(PROTOCOL_3_0, b"user\0bi"),
            startup_bytes(PROTOCOL_3_0, b"user\0\xff\0\0"),
            startup_bytes(PROTOCOL_3_0, b"user\0bi\0\0junk"),
            startup_bytes(PROTOCOL_3_0, b""),
            startup_bytes(SSL_REQUEST_CODE, b"x"),
            startup_bytes(CANCEL_REQUEST_CODE, b"1234"),
            startup_bytes(PROTOCOL_3_0, b"user\0bi\0\0")[..10].to_vec(),
        ];
        for c in cases {
            assert!(startup(&c).await.is_err(), "{c:?} accepted");
        }
        let p = startup(&startup_bytes(0x0002_0000, b"")).await;
        assert!(matches!(
            p,
            Err(CodecError::UnsupportedProtocol(0x0002_0000))
        ));
        let p = startup(&[0x7f, 0, 0, 0]).await;
        assert!(matches!(p, Err(CodecError::TooLarge)));
    }

    #[tokio::test]
    async fn typed_messages() {
        let mut r: &[u8] = b"p\0\0\0\x07abcQ\0\0\0\x04";
        let m = read_message(&mut r, 100).await.expect("read");
        assert_eq!(m, Some((b'p', Bytes::from_static(b"abc"))));
        let m = read_message(&mut r, 100).await.expect("read");
        assert_eq!(m, Some((b'Q', Bytes::new())));
        assert_eq!(read_message(&mut r, 100).await.expect("eof"), None);

        let mut r: &[u8] = b"p\0\0\0\x03";
        assert!(read_message(&mut r, 100).await.is_err());
        let mut r: &[u8] = b"p\0\0\x01\x00";
        assert!(matches!(
            read_message(&mut r, 100).await,
            Err(CodecError::TooLarge)
        ));
        let mut r: &[u8] = b"p\0\0\0\x09ab";
        assert!(read_message(&mut r, 100).await.is_err());
        let mut r: &[u8] = b"p\0";
        assert!(read_message(&mut r, 100).await.is_err());
    }

    #[test]
    fn backend_messages() {
        let mut b = BytesMut::new();
        authentication_ok(&mut b);
        assert_eq!(&b[..], b"R\0\0\0\x08\0\0\0\0");
        b.clear();
        authentication_sasl(&mut b, &["SCRAM-SHA-256"]);
        assert_eq!(&b[..], b"R\0\0\0\x17\0\0\0\x0aSCRAM-SHA-256\0\0");
        b.clear();
        ready_for_query(&mut b, b'I');
        assert_eq!(&b[..], b"Z\0\0\0\x05I");
        b.clear();
        backend_key_data(&mut b, 1, 2);
        assert_eq!(&b[..], b"K\0\0\0\x0c\0\0\0\x01\0\0\0\x02");
        b.clear();
        parameter_status(&mut b, "a", "b\0c");
        assert_eq!(&b[..], b"S\0\0\0\x09a\0bc\0");
        b.clear();
        let mut e = PgError::fatal("28P01", "no");
        e.hint = Some("h".into());
        error_response(&mut b, &e);
        assert_eq!(
            &b[..],
            &b"E\0\0\0\x21SFATAL\0VFATAL\0C28P01\0Mno\0Hh\0\0"[..]
        );
    }
}
