//! TLS for the router's PostgreSQL clients: the certificate and key come
//! from the router's configuration (a `kubernetes.io/tls` Secret in the
//! chart). The SSLRequest (and a GSSENCRequest before it, declined) is
//! handled here, before the startup phase, so that the startup phase and
//! the session then run on whichever stream resulted. With `required`, a
//! client that does not ask for TLS is refused before it sends anything
//! else (SQLSTATE 28000).

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use super::pgwire::codec::{self, GSSENC_REQUEST_CODE, PgError, SSL_REQUEST_CODE};
use crate::proto::stream::MaybeTls;

/// A client connection: plain TCP or TLS over it.
pub type ClientStream = MaybeTls<tokio_rustls::server::TlsStream<TcpStream>>;

/// The router's TLS settings for clients.
pub struct ClientTls {
    acceptor: TlsAcceptor,
    /// Refuse clients that do not ask for TLS.
    pub required: bool,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("required", &self.required)
            .finish_non_exhaustive()
    }
}

impl ClientTls {
    /// From a PEM certificate chain and its PEM private key.
    pub fn new(cert_pem: &str, key_pem: &str, required: bool) -> Result<ClientTls, String> {
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(cert_pem.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(|e| format!("router TLS certificate: {e}"))?;
        if certs.is_empty() {
            return Err("router TLS certificate: no PEM certificate".into());
        }
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| format!("router TLS key: {e}"))?;
        let config =
            ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .map_err(|e| format!("router TLS: {e}"))?
                .with_no_client_auth()
                .with_single_cert(certs, key)
                .map_err(|e| format!("router TLS certificate and key: {e}"))?;
        Ok(ClientTls {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            required,
        })
    }
}

/// Why a connection ended before its startup phase.
#[derive(Debug, thiserror::Error)]
pub enum NegotiateError {
    /// Socket failure.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The TLS handshake failed or took too long.
    #[error("tls handshake: {0}")]
    Handshake(String),
    /// TLS is required and the client did not ask for it.
    #[error("client did not request TLS")]
    NotRequested,
}

/// The first 8 bytes, once the client has sent them (None: fewer came
/// before EOF or the deadline).
async fn peek8(
    tcp: &TcpStream,
    deadline: tokio::time::Instant,
) -> std::io::Result<Option<[u8; 8]>> {
    let mut head = [0u8; 8];
    loop {
        let n = match tokio::time::timeout_at(deadline, tcp.peek(&mut head)).await {
            Ok(r) => r?,
            Err(_) => return Ok(None),
        };
        if n == 8 {
            return Ok(Some(head));
        }
        if n == 0 || tokio::time::Instant::now() >= deadline {
            return Ok(None);
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Answers the encryption requests before the startup packet: TLS when the
/// client asks and a certificate is configured, `N` to GSSAPI encryption.
/// Without TLS configured the stream is passed on untouched (the startup
/// phase declines an SSLRequest itself).
pub async fn negotiate(
    mut tcp: TcpStream,
    tls: Option<&ClientTls>,
    timeout: Duration,
) -> Result<ClientStream, NegotiateError> {
    let Some(tls) = tls else {
        return Ok(MaybeTls::Plain(tcp));
    };
    let deadline = tokio::time::Instant::now() + timeout;
    for _ in 0..2 {
        let Some(head) = peek8(&tcp, deadline).await? else {
            break;
        };
        let length = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
        let code = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
        if length != 8 {
            break;
        }
        if code == GSSENC_REQUEST_CODE {
            tcp.read_exact(&mut [0u8; 8]).await?;
            tcp.write_all(b"N").await?;
            continue;
        }
        if code != SSL_REQUEST_CODE {
            break;
        }
        tcp.read_exact(&mut [0u8; 8]).await?;
        tcp.write_all(b"S").await?;
        let accepted = tokio::time::timeout_at(deadline, tls.acceptor.accept(tcp))
            .await
            .map_err(|_| NegotiateError::Handshake("timed out".into()))?
            .map_err(|e| NegotiateError::Handshake(e.to_string()))?;
        return Ok(MaybeTls::Tls(Box::new(accepted)));
    }
    if tls.required {
        let mut out = BytesMut::new();
        codec::error_response(
            &mut out,
            &PgError::fatal(
                "28000",
                "this router accepts TLS connections only (use sslmode=require or stronger)",
            ),
        );
        let _ = tokio::time::timeout(Duration::from_secs(1), tcp.write_all(&out)).await;
        return Err(NegotiateError::NotRequested);
    }
    Ok(MaybeTls::Plain(tcp))
}
