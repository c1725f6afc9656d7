//! Keeps the link PKI in Secrets of the release namespace (see [`super::pki`]
//! for what is issued): `shardpool-link-ca` (the CA's certificate and key,
//! and the bundle every side trusts), `shardpool-link-router` and one
//! `shardpool-link-shard-K` per possible shard. Each leaf Secret holds
//! `tls.crt`, `tls.key` and `ca.crt`. A pass creates what is missing and
//! renews what is in the last third of its life, or was signed by a CA
//! that is no longer the current one. A renewed CA goes into the bundle
//! beside the previous one (until that expires), so that links made with
//! either keep verifying while every side picks up its new certificate.
//! Secrets are read and written by name only; values never reach a log.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::PostParams;
use kube::{Api, Client};
use sha2::Digest;

use super::pki::{self, Issued};
use crate::proto::linktls::{CA_KEY, CA_SECRET, CERT_KEY, KEY_KEY, ROUTER_SECRET, shard_secret};

/// End of validity of what a Secret holds, in Unix seconds.
const NOT_AFTER: &str = "shardpool.dev/not-after";

/// SHA-256 (hex) of the CA certificate that signed a leaf.
const ISSUER: &str = "shardpool.dev/issuer";

/// Where and for how long.
#[derive(Debug, Clone)]
pub struct LinkPki {
    /// Release name (in certificate names).
    pub release: String,
    /// Release namespace (where the Secrets live).
    pub namespace: String,
    /// How many shards may exist (Secrets for 0..shards).
    pub shards: u32,
    /// CA lifetime.
    pub ca_lifetime: Duration,
    /// Leaf lifetime.
    pub cert_lifetime: Duration,
    /// Owner of the Secrets (the operator's Deployment), so that
    /// uninstalling removes them.
    pub owner: Option<OwnerReference>,
}

/// Why a pass failed.
#[derive(Debug, thiserror::Error)]
pub enum LinkPkiError {
    /// An API call failed.
    #[error("link PKI secret {0}: {1}")]
    Api(String, kube::Error),
    /// A certificate could not be made or a stored key not read.
    #[error("link PKI secret {0}: {1}")]
    Pki(String, pki::PkiError),
}

fn text(s: &Secret, key: &str) -> Option<String> {
    s.data
        .as_ref()
        .and_then(|d| d.get(key))
        .and_then(|v| String::from_utf8(v.0.clone()).ok())
}

fn not_after(s: &Secret) -> Option<SystemTime> {
    let secs: u64 = s
        .metadata
        .annotations
        .as_ref()?
        .get(NOT_AFTER)?
        .parse()
        .ok()?;
    Some(UNIX_EPOCH + Duration::from_secs(secs))
}

fn fingerprint(pem: &str) -> String {
    sha2::Sha256::digest(pem.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn secret(
    cfg: &LinkPki,
    name: &str,
    data: [(&str, &str); 3],
    not_after: SystemTime,
    issuer: Option<&str>,
) -> Secret {
    let secs = not_after
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut annotations = BTreeMap::from([(NOT_AFTER.to_string(), secs.to_string())]);
    if let Some(i) = issuer {
        annotations.insert(ISSUER.to_string(), i.to_string());
    }
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(cfg.namespace.clone()),
            labels: Some(BTreeMap::from([
                (
                    "app.kubernetes.io/name".to_string(),
                    "shardpool".to_string(),
                ),
                (
                    "app.kubernetes.io/instance".to_string(),
                    cfg.release.clone(),
                ),
                (
                    "app.kubernetes.io/component".to_string(),
                    "link-pki".to_string(),
                ),
            ])),
            annotations: Some(annotations),
            owner_references: cfg.owner.clone().map(|o| vec![o]),
            ..ObjectMeta::default()
        },
        data: Some(
            data.into_iter()
                .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
                .collect(),
        ),
        type_: Some("Opaque".into()),
        ..Secret::default()
    }
}

async fn write(
    api: &Api<Secret>,
    existing: Option<Secret>,
    mut s: Secret,
) -> Result<(), kube::Error> {
    let name = s.metadata.name.clone().unwrap_or_default();
    match existing {
        Some(old) => {
            s.metadata.resource_version = old.metadata.resource_version;
            api.replace(&name, &PostParams::default(), &s).await?;
        }
        None => {
            api.create(&PostParams::default(), &s).await?;
        }
    }
    Ok(())
}

/// One pass: the CA, then the routers' and every shard's certificate.
/// Returns how many Secrets it wrote.
pub async fn ensure(client: &Client, cfg: &LinkPki) -> Result<usize, LinkPkiError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), &cfg.namespace);
    let now = SystemTime::now();
    let api_err = |name: &str| {
        let name = name.to_string();
        move |e| LinkPkiError::Api(name, e)
    };
    let mut written = 0;

    // The CA.
    let current = api.get_opt(CA_SECRET).await.map_err(api_err(CA_SECRET))?;
    let usable = current.as_ref().and_then(|s| {
        let (cert, key, bundle) = (text(s, CERT_KEY)?, text(s, KEY_KEY)?, text(s, CA_KEY)?);
        let end = not_after(s)?;
        (!pki::due(end, cfg.ca_lifetime, now)).then_some((cert, key, bundle))
    });
    let (ca_cert, ca_key, bundle) = match usable {
        Some(ca) => ca,
        None => {
            let ca = pki::new_ca(&cfg.release, &cfg.namespace, cfg.ca_lifetime)
                .map_err(|e| LinkPkiError::Pki(CA_SECRET.into(), e))?;
            // The previous CA stays trusted while it is valid: leaves it
            // signed keep verifying until they are renewed.
            let mut bundle = ca.cert_pem.clone();
            if let Some(old) = current.as_ref() {
                if let (Some(cert), Some(end)) = (text(old, CERT_KEY), not_after(old)) {
                    if end > now {
                        bundle.push_str(&cert);
                    }
                }
            }
            let s = secret(
                cfg,
                CA_SECRET,
                [
                    (CERT_KEY, &ca.cert_pem),
                    (KEY_KEY, &ca.key_pem),
                    (CA_KEY, &bundle),
                ],
                ca.not_after,
                None,
            );
            write(&api, current, s).await.map_err(api_err(CA_SECRET))?;
            tracing::info!(secret = CA_SECRET, "link CA issued");
            written += 1;
            (ca.cert_pem, ca.key_pem, bundle)
        }
    };
    let issuer = fingerprint(&ca_cert);

    // The leaves.
    let mut leaves: Vec<(String, Option<u32>)> = vec![(ROUTER_SECRET.to_string(), None)];
    leaves.extend((0..cfg.shards).map(|k| (shard_secret(k), Some(k))));
    for (name, shard) in leaves {
        let existing = api.get_opt(&name).await.map_err(api_err(&name))?;
        let fresh = existing.as_ref().is_some_and(|s| {
            let signed_by_current = s
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(ISSUER))
                .is_some_and(|i| *i == issuer);
            let end = not_after(s).unwrap_or(UNIX_EPOCH);
            signed_by_current
                && !pki::due(end, cfg.cert_lifetime, now)
                && text(s, CA_KEY).as_deref() == Some(bundle.as_str())
                && text(s, CERT_KEY).is_some()
                && text(s, KEY_KEY).is_some()
        });
        if fresh {
            continue;
        }
        let leaf: Issued = match shard {
            Some(k) => {
                pki::issue_shard(&ca_key, &cfg.release, &cfg.namespace, k, cfg.cert_lifetime)
            }
            None => pki::issue_router(&ca_key, &cfg.release, &cfg.namespace, cfg.cert_lifetime),
        }
        .map_err(|e| LinkPkiError::Pki(name.clone(), e))?;
        let s = secret(
            cfg,
            &name,
            [
                (CERT_KEY, &leaf.cert_pem),
                (KEY_KEY, &leaf.key_pem),
                (CA_KEY, &bundle),
            ],
            leaf.not_after,
            Some(&issuer),
        );
        write(&api, existing, s).await.map_err(api_err(&name))?;
        tracing::info!(secret = %name, "link certificate issued");
        written += 1;
    }
    Ok(written)
}
