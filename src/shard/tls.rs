//! TLS to warehouses, with libpq's `sslmode` meanings: `disable` (plain
//! TCP), `prefer` (TLS when the server offers it, unverified, plain
//! otherwise), `require` (TLS or fail, unverified) and `verify-full` (TLS
//! with the chain checked against the source's CA bundle and the host name
//! checked). rustls with the ring provider; the negotiation is
//! PostgreSQL's SSLRequest, answered `S` or `N`.

use std::io;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::crd::TlsMode;
use crate::proto::stream::MaybeTls;

/// PostgreSQL's SSLRequest code.
const SSL_REQUEST: u32 = 80_877_103;

/// A source's TLS mode with its ready-built client configuration.
#[derive(Clone)]
pub struct TlsSettings {
    mode: TlsMode,
    /// The CA bundle of verify-full, kept to compare settings.
    ca_pem: Option<String>,
    /// None for `disable`.
    config: Option<Arc<ClientConfig>>,
}

impl std::fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSettings")
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl PartialEq for TlsSettings {
    fn eq(&self, other: &Self) -> bool {
        self.mode == other.mode && self.ca_pem == other.ca_pem
    }
}

impl Eq for TlsSettings {}

impl Default for TlsSettings {
    fn default() -> Self {
        TlsSettings {
            mode: TlsMode::Disable,
            ca_pem: None,
            config: None,
        }
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl TlsSettings {
    /// Settings for a mode; `ca_pem` is required by (and only used by)
    /// verify-full.
    pub fn new(mode: TlsMode, ca_pem: Option<&str>) -> Result<TlsSettings, String> {
        let builder = || {
            ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .map_err(|e| format!("tls: {e}"))
        };
        let config = match mode {
            TlsMode::Disable => None,
            TlsMode::Prefer | TlsMode::Require => Some(
                builder()?
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(NoVerify(provider())))
                    .with_no_client_auth(),
            ),
            TlsMode::VerifyFull => {
                let pem = ca_pem.ok_or("tls mode verify-full needs caSecretRef")?;
                let mut roots = RootCertStore::empty();
                let mut n = 0;
                for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                    let cert = cert.map_err(|e| format!("CA bundle: {e}"))?;
                    roots.add(cert).map_err(|e| format!("CA bundle: {e}"))?;
                    n += 1;
                }
                if n == 0 {
                    return Err("CA bundle holds no PEM certificate".into());
                }
                Some(
                    builder()?
                        .with_root_certificates(roots)
                        .with_no_client_auth(),
                )
            }
        };
        Ok(TlsSettings {
            mode,
            ca_pem: ca_pem
                .filter(|_| mode == TlsMode::VerifyFull)
                .map(str::to_string),
            config: config.map(Arc::new),
        })
    }

    /// The mode.
    pub fn mode(&self) -> TlsMode {
        self.mode
    }
}

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Socket failure during the negotiation.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// require/verify-full, and the server answered `N`.
    #[error("server does not support TLS (tls mode {0})")]
    Refused(&'static str),
    /// The host is not a valid DNS name or IP address for verification.
    #[error("host {0:?} is not a valid TLS server name")]
    BadName(String),
    /// The TLS handshake failed (certificate, protocol).
    #[error("tls handshake: {0}")]
    Handshake(io::Error),
}

/// A server connection's byte stream: plain TCP or TLS over it.
pub type ServerStream = MaybeTls<TlsStream<TcpStream>>;

/// The TCP socket underneath a server stream.
pub fn tcp(s: &ServerStream) -> &TcpStream {
    match s {
        MaybeTls::Plain(s) => s,
        MaybeTls::Tls(s) => s.get_ref().0,
    }
}

fn mode_name(mode: TlsMode) -> &'static str {
    match mode {
        TlsMode::Disable => "disable",
        TlsMode::Prefer => "prefer",
        TlsMode::Require => "require",
        TlsMode::VerifyFull => "verify-full",
    }
}

/// Negotiates TLS on a fresh connection according to the settings.
pub async fn negotiate(
    mut tcp: TcpStream,
    host: &str,
    settings: &TlsSettings,
) -> Result<ServerStream, TlsError> {
    let Some(config) = settings.config.clone() else {
        return Ok(MaybeTls::Plain(tcp));
    };
    let mut req = [0u8; 8];
    req[..4].copy_from_slice(&8u32.to_be_bytes());
    req[4..].copy_from_slice(&SSL_REQUEST.to_be_bytes());
    tcp.write_all(&req).await?;
    let answer = tcp.read_u8().await?;
    match answer {
        b'S' => {}
        b'N' if settings.mode == TlsMode::Prefer => return Ok(MaybeTls::Plain(tcp)),
        b'N' => return Err(TlsError::Refused(mode_name(settings.mode))),
        _ => {
            return Err(TlsError::Io(io::Error::new(
                io::ErrorKind::InvalidData,
                "unexpected answer to SSLRequest",
            )));
        }
    }
    let name =
        ServerName::try_from(host.to_string()).map_err(|_| TlsError::BadName(host.to_string()))?;
    let tls = TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(TlsError::Handshake)?;
    Ok(MaybeTls::Tls(Box::new(tls)))
}

/// The `tls-server-end-point` channel binding data (RFC 5929, section
/// 4.1) of a TLS connection, for SCRAM-SHA-256-PLUS: a hash of the
/// server's certificate, made with the hash function of the certificate's
/// signature algorithm (SHA-256 when that is MD5 or SHA-1). None on plain
/// TCP, and for signature algorithms with no single hash function (Ed25519,
/// RSASSA-PSS).
pub fn server_end_point(s: &ServerStream) -> Option<Vec<u8>> {
    let MaybeTls::Tls(tls) = s else {
        return None;
    };
    let cert = tls.get_ref().1.peer_certificates()?.first()?;
    end_point_hash(cert.as_ref())
}

/// [`server_end_point`] of a DER certificate.
pub fn end_point_hash(der: &[u8]) -> Option<Vec<u8>> {
    use sha2::Digest;
    use x509_cert::der::Decode;
    let cert = x509_cert::Certificate::from_der(der).ok()?;
    match cert.signature_algorithm.oid.to_string().as_str() {
        // md5, sha1, sha256 WithRSAEncryption; ecdsa-with-SHA1, -SHA256.
        "1.2.840.113549.1.1.4"
        | "1.2.840.113549.1.1.5"
        | "1.2.840.113549.1.1.11"
        | "1.2.840.10045.4.1"
        | "1.2.840.10045.4.3.2" => Some(sha2::Sha256::digest(der).to_vec()),
        // sha384WithRSAEncryption, ecdsa-with-SHA384.
        "1.2.840.113549.1.1.12" | "1.2.840.10045.4.3.3" => Some(sha2::Sha384::digest(der).to_vec()),
        // sha512WithRSAEncryption, ecdsa-with-SHA512.
        "1.2.840.113549.1.1.13" | "1.2.840.10045.4.3.4" => Some(sha2::Sha512::digest(der).to_vec()),
        _ => None,
    }
}

/// `prefer` and `require`: encryption without authentication of the
/// server, as libpq does. Handshake signatures are still checked.
#[derive(Debug)]
struct NoVerify(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verify_full_needs_a_ca_bundle() {
        let e = TlsSettings::new(TlsMode::VerifyFull, None).unwrap_err();
        assert!(e.contains("caSecretRef"), "{e}");
        let e = TlsSettings::new(TlsMode::VerifyFull, Some("not pem")).unwrap_err();
        assert!(e.contains("no PEM certificate"), "{e}");
        assert!(TlsSettings::new(TlsMode::Require, None).is_ok());
        assert!(TlsSettings::new(TlsMode::Disable, None).is_ok());
    }
}
