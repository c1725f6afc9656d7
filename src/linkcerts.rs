//! Where a shard or a router gets its link certificate: one Secret of the
//! release namespace, read and watched by name (the only Secret its
//! ServiceAccount may read), turned into a ready rustls configuration. A new
//! version of the Secret (a renewal) replaces the configuration for the
//! handshakes that follow; links already up are not touched. A version that
//! does not parse is refused with a warning, and the previous one stays.

use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use tokio::sync::watch;

use crate::proto::linktls::{self, CA_KEY, CERT_KEY, KEY_KEY, LinkIdentity};

fn identity(s: &Secret) -> Result<LinkIdentity, String> {
    let text = |key: &str| -> Result<String, String> {
        let v = s
            .data
            .as_ref()
            .and_then(|d| d.get(key))
            .ok_or_else(|| format!("no key {key}"))?;
        String::from_utf8(v.0.clone()).map_err(|_| format!("{key} is not UTF-8"))
    };
    Ok(LinkIdentity {
        cert_pem: text(CERT_KEY)?,
        key_pem: text(KEY_KEY)?,
        ca_pem: text(CA_KEY)?,
    })
}

/// Follows the Secret `name` in `namespace`, publishing each version that
/// `build` turns into a configuration. None until the first one.
pub fn follow<T, F>(
    client: Client,
    namespace: String,
    name: String,
    build: F,
) -> watch::Receiver<Option<Arc<T>>>
where
    T: Send + Sync + 'static,
    F: Fn(&LinkIdentity) -> Result<Arc<T>, String> + Send + 'static,
{
    let (tx, rx) = watch::channel(None);
    tokio::spawn(async move {
        let api: Api<Secret> = Api::namespaced(client, &namespace);
        let cfg = watcher::Config::default().fields(&format!("metadata.name={name}"));
        let mut versions = std::pin::pin!(watcher(api, cfg).default_backoff().applied_objects());
        let mut seen: Option<LinkIdentity> = None;
        while let Some(r) = versions.next().await {
            let secret = match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(secret = %format!("{namespace}/{name}"), error = %e, "watching the link certificate");
                    continue;
                }
            };
            let id = match identity(&secret) {
                Ok(id) => id,
                Err(e) => {
                    tracing::warn!(secret = %format!("{namespace}/{name}"), error = %e, "link certificate not applied");
                    continue;
                }
            };
            if seen.as_ref() == Some(&id) {
                continue;
            }
            match build(&id) {
                Ok(config) => {
                    tracing::info!(secret = %format!("{namespace}/{name}"), renewed = seen.is_some(), "link certificate in force for new links");
                    seen = Some(id);
                    if tx.send(Some(config)).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!(secret = %format!("{namespace}/{name}"), error = %e, "link certificate not applied")
                }
            }
        }
    });
    rx
}

/// A shard's server configuration from its Secret.
pub fn follow_server(
    client: Client,
    namespace: String,
    name: String,
) -> watch::Receiver<Option<Arc<rustls::ServerConfig>>> {
    follow(client, namespace, name, linktls::server_config)
}

/// A router's client configuration from its Secret.
pub fn follow_client(
    client: Client,
    namespace: String,
    name: String,
) -> watch::Receiver<Option<Arc<rustls::ClientConfig>>> {
    follow(client, namespace, name, linktls::client_config)
}
