//! Who may use the router, kept current without a restart. The credentials
//! (PostgreSQL users with their namespaces, static HTTP tokens, the JWT key,
//! the clients' admission weights)
//! come from the router's auth Secret. At start they are read from the
//! environment the pod was given; when the router knows the Secret's name
//! it also watches that one Secret (by name: its ServiceAccount may read no
//! other) and swaps in every new version that parses. A version that does
//! not parse is refused with a warning that names the key, never a value,
//! and the previous credentials stay. Sessions already authenticated are
//! not touched: a credential is checked once, at login or per request.
//!
//! Lock discipline: `current` is held only to clone or replace the `Arc`,
//! never across an await.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};

use super::http::Tokens;
use super::jwt::JwtVerifier;
use super::pgwire::users::Users;

/// One consistent set of credentials.
pub struct Credentials {
    /// PostgreSQL users.
    pub users: Users,
    /// Static HTTP bearer tokens.
    pub tokens: Tokens,
    /// Verifier of signed short-lived tokens, when a key is configured.
    pub jwt: Option<JwtVerifier>,
    /// Admission weights of client identities.
    pub weights: super::weights::Weights,
}

impl Credentials {
    /// Parses the three values; errors name the key, never a value.
    pub fn parse(
        users: &str,
        tokens: &str,
        jwt_key: Option<&str>,
        weights: &str,
        jwt_max_ttl: Duration,
    ) -> Result<Credentials, String> {
        let weights =
            super::weights::Weights::parse(weights).map_err(|e| format!("weights: {e}"))?;
        let users = Users::parse(users).map_err(|e| format!("users: {e}"))?;
        let tokens = Tokens::parse(tokens).map_err(|e| format!("tokens: {e}"))?;
        let jwt = match jwt_key.filter(|k| !k.is_empty()) {
            Some(k) => Some(
                JwtVerifier::new(k.as_bytes(), jwt_max_ttl).map_err(|e| format!("jwtKey: {e}"))?,
            ),
            None => None,
        };
        Ok(Credentials {
            users,
            tokens,
            jwt,
            weights,
        })
    }
}

/// The router's current credentials.
pub struct Auth {
    /// Replaced whole on every accepted change; see the lock discipline.
    current: RwLock<Arc<Credentials>>,
    /// For parsing later versions of the Secret.
    jwt_max_ttl: Duration,
}

impl Auth {
    /// Starts with `initial`.
    pub fn new(initial: Credentials, jwt_max_ttl: Duration) -> Auth {
        Auth {
            current: RwLock::new(Arc::new(initial)),
            jwt_max_ttl,
        }
    }

    /// The credentials in force now.
    pub fn current(&self) -> Arc<Credentials> {
        match self.current.read() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Swaps in the credentials of a Secret version; Err (credentials
    /// unchanged) when it does not parse.
    pub fn apply(&self, secret: &Secret) -> Result<(), String> {
        let text = |key: &str| -> Result<Option<String>, String> {
            match secret.data.as_ref().and_then(|d| d.get(key)) {
                None => Ok(None),
                Some(v) => String::from_utf8(v.0.clone())
                    .map(Some)
                    .map_err(|_| format!("{key}: not UTF-8")),
            }
        };
        let users = text("users")?.ok_or("users: missing")?;
        let tokens = text("tokens")?.unwrap_or_default();
        let jwt = text("jwtKey")?;
        let weights = text("weights")?.unwrap_or_default();
        let next = Credentials::parse(&users, &tokens, jwt.as_deref(), &weights, self.jwt_max_ttl)?;
        match self.current.write() {
            Ok(mut c) => *c = Arc::new(next),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(next),
        }
        Ok(())
    }
}

/// Watches the Secret `name` in `namespace` and applies every version of
/// it, until the process ends.
pub async fn follow(client: Client, namespace: String, name: String, auth: Arc<Auth>) {
    let api: Api<Secret> = Api::namespaced(client, &namespace);
    let cfg = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut versions = std::pin::pin!(watcher(api, cfg).default_backoff().applied_objects());
    let mut seen: Option<String> = None;
    while let Some(r) = versions.next().await {
        match r {
            Ok(secret) => {
                let version = secret.metadata.resource_version.clone();
                if version.is_some() && version == seen {
                    continue;
                }
                match auth.apply(&secret) {
                    Ok(()) => {
                        if seen.is_some() {
                            tracing::info!(secret = %format!("{namespace}/{name}"), "auth secret changed; new credentials in force");
                        }
                        seen = version;
                    }
                    Err(e) => {
                        tracing::warn!(secret = %format!("{namespace}/{name}"), error = %e, "auth secret not applied; the previous credentials stay")
                    }
                }
            }
            Err(e) => {
                tracing::warn!(secret = %format!("{namespace}/{name}"), error = %e, "watching the auth secret")
            }
        }
    }
}
