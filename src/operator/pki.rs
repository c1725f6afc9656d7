//! The PKI of the router-to-shard links: a small CA that the operator keeps
//! in a Secret, and the certificates it issues from it. Each shard K gets a
//! server certificate whose only name is [`shard_server_name`] for K, so a
//! router that dials shard K's address and finds any other certificate
//! there (another shard's, a pod that took over the IP) refuses it. Routers
//! get a client certificate for the `clientAuth` purpose only; shard
//! certificates are `serverAuth` only, so a shard's key cannot act as a
//! router. Pure: no API calls; `reconcile` stores and renews what this
//! issues.
//!
//! The CA is re-created from its key and its distinguished name (which this
//! module fixes per release), so the operator needs no certificate parser
//! to sign with a CA it loaded from its Secret.

use std::time::{Duration, SystemTime};

pub use crate::proto::linktls::{router_client_name, shard_server_name};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

/// Why a certificate could not be made. Never holds key material.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// rcgen refused the parameters or the key.
    #[error("certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
}

/// A certificate with its private key, PEM encoded.
#[derive(Clone, PartialEq, Eq)]
pub struct Issued {
    /// Certificate (PEM).
    pub cert_pem: String,
    /// Private key (PKCS#8 PEM).
    pub key_pem: String,
    /// End of validity.
    pub not_after: SystemTime,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued")
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

fn ca_name(release: &str, namespace: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(
        DnType::CommonName,
        format!("shardpool link CA {release}.{namespace}"),
    );
    dn
}

fn validity(p: &mut CertificateParams, lifetime: Duration) -> SystemTime {
    let now = SystemTime::now();
    // A minute of slack for clocks that disagree.
    let start = now - Duration::from_secs(60);
    let end = now + lifetime;
    p.not_before = start.into();
    p.not_after = end.into();
    end
}

fn ca_params(release: &str, namespace: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = ca_name(release, namespace);
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p
}

/// A new CA for the release's links, valid for `lifetime`.
pub fn new_ca(release: &str, namespace: &str, lifetime: Duration) -> Result<Issued, PkiError> {
    let key = KeyPair::generate()?;
    let mut p = ca_params(release, namespace);
    let not_after = validity(&mut p, lifetime);
    let cert = p.self_signed(&key)?;
    Ok(Issued {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        not_after,
    })
}

fn leaf(
    ca_key_pem: &str,
    release: &str,
    namespace: &str,
    name: String,
    purpose: ExtendedKeyUsagePurpose,
    lifetime: Duration,
) -> Result<Issued, PkiError> {
    let ca_key = KeyPair::from_pem(ca_key_pem)?;
    let issuer = Issuer::new(ca_params(release, namespace), ca_key);
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::new(vec![name.clone()])?;
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, name);
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![purpose];
    let not_after = validity(&mut p, lifetime);
    let cert = p.signed_by(&key, &issuer)?;
    Ok(Issued {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        not_after,
    })
}

/// Shard K's server certificate, signed by the CA whose key is `ca_key_pem`.
pub fn issue_shard(
    ca_key_pem: &str,
    release: &str,
    namespace: &str,
    shard: u32,
    lifetime: Duration,
) -> Result<Issued, PkiError> {
    leaf(
        ca_key_pem,
        release,
        namespace,
        shard_server_name(release, namespace, shard),
        ExtendedKeyUsagePurpose::ServerAuth,
        lifetime,
    )
}

/// The routers' client certificate.
pub fn issue_router(
    ca_key_pem: &str,
    release: &str,
    namespace: &str,
    lifetime: Duration,
) -> Result<Issued, PkiError> {
    leaf(
        ca_key_pem,
        release,
        namespace,
        router_client_name(release, namespace),
        ExtendedKeyUsagePurpose::ClientAuth,
        lifetime,
    )
}

/// Whether a certificate valid until `not_after` and issued for `lifetime`
/// is due for renewal at `now`: in the last third of its life.
pub fn due(not_after: SystemTime, lifetime: Duration, now: SystemTime) -> bool {
    match not_after.duration_since(now) {
        Ok(left) => left < lifetime / 3,
        Err(_) => true,
    }
}

#[cfg(test)]
mod tests;
