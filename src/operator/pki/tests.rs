//! Issued certificates in real TLS handshakes (rustls, in memory): what a
//! shard accepts as a router, and what a router accepts as shard K.

use std::time::{Duration, SystemTime};

use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::*;
use crate::proto::linktls::{self, LinkIdentity};

const DAY: Duration = Duration::from_secs(86_400);

struct Pki {
    ca: Issued,
    shard0: Issued,
    shard1: Issued,
    router: Issued,
}

fn pki() -> Pki {
    let ca = new_ca("sp", "system", 365 * DAY).expect("ca");
    Pki {
        shard0: issue_shard(&ca.key_pem, "sp", "system", 0, 30 * DAY).expect("shard 0"),
        shard1: issue_shard(&ca.key_pem, "sp", "system", 1, 30 * DAY).expect("shard 1"),
        router: issue_router(&ca.key_pem, "sp", "system", 30 * DAY).expect("router"),
        ca,
    }
}

fn id(leaf: &Issued, ca: &Issued) -> LinkIdentity {
    LinkIdentity {
        cert_pem: leaf.cert_pem.clone(),
        key_pem: leaf.key_pem.clone(),
        ca_pem: ca.cert_pem.clone(),
    }
}

/// Runs one handshake over an in-memory pipe and a byte both ways; Ok when
/// both sides accepted each other.
async fn handshake(server: &LinkIdentity, client: &LinkIdentity, dial: &str) -> Result<(), String> {
    let acceptor = TlsAcceptor::from(linktls::server_config(server)?);
    let connector = TlsConnector::from(linktls::client_config(client)?);
    let (a, b) = tokio::io::duplex(64 * 1024);
    let name = ServerName::try_from(dial.to_string()).map_err(|e| e.to_string())?;
    let srv = tokio::spawn(async move {
        let mut s = acceptor.accept(a).await.map_err(|e| e.to_string())?;
        let mut byte = [0u8; 1];
        s.read_exact(&mut byte).await.map_err(|e| e.to_string())?;
        s.write_all(&byte).await.map_err(|e| e.to_string())?;
        s.flush().await.map_err(|e| e.to_string())?;
        Ok::<(), String>(())
    });
    let cli = async {
        let mut c = connector
            .connect(name, b)
            .await
            .map_err(|e| e.to_string())?;
        let suite = c.get_ref().1.negotiated_cipher_suite().map(|s| s.suite());
        if suite != Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256) {
            return Err(format!("negotiated {suite:?}, not AES-128-GCM"));
        }
        c.write_all(b"x").await.map_err(|e| e.to_string())?;
        let mut byte = [0u8; 1];
        c.read_exact(&mut byte).await.map_err(|e| e.to_string())?;
        Ok::<(), String>(())
    };
    let c = cli.await;
    let s = srv.await.map_err(|e| e.to_string())?;
    c.and(s)
}

#[tokio::test]
async fn a_router_and_the_shard_it_dialled_accept_each_other() {
    let p = pki();
    handshake(
        &id(&p.shard0, &p.ca),
        &id(&p.router, &p.ca),
        &shard_server_name("sp", "system", 0),
    )
    .await
    .expect("router <-> shard 0");
}

#[tokio::test]
async fn a_router_refuses_another_shard_at_the_address_it_dialled() {
    let p = pki();
    let e = handshake(
        &id(&p.shard1, &p.ca),
        &id(&p.router, &p.ca),
        &shard_server_name("sp", "system", 0),
    )
    .await
    .expect_err("shard 1's certificate where shard 0 was dialled");
    assert!(e.contains("NotValidForName") || e.contains("name"), "{e}");
}

#[tokio::test]
async fn a_shard_refuses_a_client_with_a_shard_certificate() {
    let p = pki();
    // Shard 1's key, presented as a client: serverAuth only.
    handshake(
        &id(&p.shard0, &p.ca),
        &id(&p.shard1, &p.ca),
        &shard_server_name("sp", "system", 0),
    )
    .await
    .expect_err("a shard certificate used as a router's");
}

#[tokio::test]
async fn a_shard_refuses_a_self_signed_or_foreign_client_certificate() {
    let p = pki();
    // Another CA (another release, or an attacker's) with a router-shaped
    // certificate.
    let other = new_ca("sp", "system", 365 * DAY).expect("other ca");
    let forged = issue_router(&other.key_pem, "sp", "system", 30 * DAY).expect("forged");
    let client = LinkIdentity {
        cert_pem: forged.cert_pem,
        key_pem: forged.key_pem,
        // It trusts the real CA, so only the shard's check can refuse it.
        ca_pem: p.ca.cert_pem.clone(),
    };
    handshake(
        &id(&p.shard0, &p.ca),
        &client,
        &shard_server_name("sp", "system", 0),
    )
    .await
    .expect_err("a router certificate from another CA");
}

#[tokio::test]
async fn a_shard_refuses_a_client_without_a_certificate() {
    let p = pki();
    let acceptor =
        TlsAcceptor::from(linktls::server_config(&id(&p.shard0, &p.ca)).expect("server"));
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(p.ca.cert_pem.as_bytes()) {
        roots.add(c.expect("pem")).expect("root");
    }
    use rustls::pki_types::pem::PemObject;
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = TlsConnector::from(std::sync::Arc::new(config));
    let (a, b) = tokio::io::duplex(64 * 1024);
    let srv = tokio::spawn(async move {
        let mut s = acceptor.accept(a).await?;
        let mut byte = [0u8; 1];
        s.read_exact(&mut byte).await.map(|_| ())
    });
    let name = ServerName::try_from(shard_server_name("sp", "system", 0)).expect("name");
    // TLS 1.3: the client may finish before the server's verdict arrives;
    // the server's side is the one that must refuse. The client stays
    // connected and sends a byte, which an accepting server would read.
    let client = connector.connect(name, b).await;
    let mut client = client.ok();
    if let Some(c) = client.as_mut() {
        let _ = c.write_all(b"x").await;
        let _ = c.flush().await;
    }
    let verdict = srv.await.expect("join");
    drop(client);
    assert!(
        verdict.is_err(),
        "the shard accepted a client without a certificate"
    );
}

#[test]
fn a_certificate_is_due_in_the_last_third_of_its_life() {
    let now = SystemTime::now();
    assert!(!due(now + 25 * DAY, 30 * DAY, now));
    assert!(due(now + 9 * DAY, 30 * DAY, now));
    assert!(due(now - DAY, 30 * DAY, now), "expired");
}

#[test]
fn issued_material_does_not_print_its_key() {
    let p = pki();
    let shown = format!("{:?} {:?}", p.router, id(&p.router, &p.ca));
    assert!(!shown.contains("PRIVATE KEY"), "{shown}");
}
