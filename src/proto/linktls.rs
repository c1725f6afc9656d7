//! Mutual TLS on the router-to-shard links (rustls, ring). Both sides trust
//! only the link CA that the operator keeps (a bundle: during a CA rotation
//! the old and the new one). A shard presents its server certificate, whose
//! only name says which shard it is, and demands a client certificate for
//! the `clientAuth` purpose from the same CA: without one, with a
//! self-signed one, or with a shard's (`serverAuth`) certificate, the
//! handshake fails before a single frame is read. A router presents its
//! client certificate and checks that the shard it dialled is the shard it
//! meant.
//!
//! Certificates are used only by new handshakes: links that are up when a
//! certificate is renewed keep running on the session keys they have.

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// The transport under a link's TLS: the socket behind a 64 KiB read
/// buffer. rustls asks its transport for at most 4 KiB per read, so on a
/// bare socket a burst of frames from many sessions costs a read system
/// call per 4 KiB; behind this buffer it costs one per 64 KiB, as on a
/// plain link.
pub type LinkIo = tokio::io::BufReader<tokio::net::TcpStream>;

/// Wraps a connected link socket for TLS; see [`LinkIo`].
pub fn link_io(stream: tokio::net::TcpStream) -> LinkIo {
    tokio::io::BufReader::with_capacity(64 * 1024, stream)
}

/// The material one side of a link needs (PEM).
#[derive(Clone, PartialEq, Eq)]
pub struct LinkIdentity {
    /// Its certificate (chain).
    pub cert_pem: String,
    /// Its private key.
    pub key_pem: String,
    /// The CA bundle it trusts.
    pub ca_pem: String,
}

impl std::fmt::Debug for LinkIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LinkIdentity(..)")
    }
}

/// The DNS name in shard K's certificate, which routers verify.
pub fn shard_server_name(release: &str, namespace: &str, shard: u32) -> String {
    format!("shard-{shard}.{release}.{namespace}.shardpool.link")
}

/// The DNS name in the routers' client certificate.
pub fn router_client_name(release: &str, namespace: &str) -> String {
    format!("router.{release}.{namespace}.shardpool.link")
}

/// The CA's Secret (release namespace).
pub const CA_SECRET: &str = "shardpool-link-ca";

/// The routers' Secret.
pub const ROUTER_SECRET: &str = "shardpool-link-router";

/// Shard K's Secret.
pub fn shard_secret(shard: u32) -> String {
    format!("shardpool-link-shard-{shard}")
}

/// Keys of the link Secrets: `tls.crt`, `tls.key`, `ca.crt`.
pub const CERT_KEY: &str = "tls.crt";
/// See [`CERT_KEY`].
pub const KEY_KEY: &str = "tls.key";
/// See [`CERT_KEY`].
pub const CA_KEY: &str = "ca.crt";

/// ring's provider with AES-128-GCM first (both ends are ours, so the
/// first suite is the one used). Link records are small, one or a few
/// PostgreSQL messages each: per record AES-128 does 10 rounds where
/// AES-256 does 14, and 128-bit keys are ample for a key that lives as long
/// as one link.
pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::crypto::ring::cipher_suite;
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites = vec![
        cipher_suite::TLS13_AES_128_GCM_SHA256,
        cipher_suite::TLS13_AES_256_GCM_SHA384,
    ];
    Arc::new(p)
}

fn parts(
    id: &LinkIdentity,
) -> Result<
    (
        Vec<CertificateDer<'static>>,
        PrivateKeyDer<'static>,
        Arc<RootCertStore>,
    ),
    String,
> {
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(id.cert_pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| format!("link certificate: {e}"))?;
    if certs.is_empty() {
        return Err("link certificate: no PEM certificate".into());
    }
    let key = PrivateKeyDer::from_pem_slice(id.key_pem.as_bytes())
        .map_err(|e| format!("link key: {e}"))?;
    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(id.ca_pem.as_bytes()) {
        let ca = ca.map_err(|e| format!("link CA bundle: {e}"))?;
        roots.add(ca).map_err(|e| format!("link CA bundle: {e}"))?;
    }
    if roots.is_empty() {
        return Err("link CA bundle: no PEM certificate".into());
    }
    Ok((certs, key, Arc::new(roots)))
}

/// A shard's side: its server certificate, and routers' client
/// certificates required.
pub fn server_config(id: &LinkIdentity) -> Result<Arc<ServerConfig>, String> {
    let (certs, key, roots) = parts(id)?;
    let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(|e| format!("link client verifier: {e}"))?;
    let config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| format!("link TLS: {e}"))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| format!("link certificate and key: {e}"))?;
    Ok(Arc::new(config))
}

/// A router's side: its client certificate, and the shards' server
/// certificates checked against the bundle (the name is checked per
/// connection: see `shard_server_name`).
pub fn client_config(id: &LinkIdentity) -> Result<Arc<ClientConfig>, String> {
    let (certs, key, roots) = parts(id)?;
    let config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| format!("link TLS: {e}"))?
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .map_err(|e| format!("link certificate and key: {e}"))?;
    Ok(Arc::new(config))
}
