//! Short-lived bearer tokens for the HTTP API: JWTs signed with HMAC-SHA256
//! by the BI backend, with the key the router reads from its Secret, so the
//! backend never holds a long-lived credential in its requests. A token
//! carries `exp` (required, at most `max_ttl` ahead), optionally `nbf`, and
//! `ns`: the namespaces it may reach (`*` for all). Only HS256 is accepted.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode};
use serde::Deserialize;

/// Verifies tokens against one key.
pub struct JwtVerifier {
    key: DecodingKey,
    validation: Validation,
    max_ttl: Duration,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("max_ttl", &self.max_ttl)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Deserialize)]
struct Claims {
    exp: u64,
    /// Namespaces the token may reach.
    ns: Vec<String>,
    /// Who the token is for: the client identity for fair admission.
    #[serde(default)]
    sub: Option<String>,
}

/// Why a token was refused (the message goes to the client: no secrets).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JwtError {
    /// Bad signature, algorithm, format or claims.
    #[error("invalid token: {0}")]
    Invalid(String),
    /// Past its `exp` (or before its `nbf`).
    #[error("token expired or not yet valid")]
    Expired,
    /// `exp` further ahead than the router allows.
    #[error("token lifetime exceeds {0} s")]
    TooLong(u64),
}

impl JwtVerifier {
    /// A verifier for `key` (at least 32 bytes), refusing tokens that live
    /// longer than `max_ttl`.
    pub fn new(key: &[u8], max_ttl: Duration) -> Result<JwtVerifier, String> {
        if key.len() < 32 {
            return Err("jwt key shorter than 32 bytes".into());
        }
        let mut validation = Validation::new(Algorithm::HS256);
        validation.algorithms = vec![Algorithm::HS256];
        validation.set_required_spec_claims(&["exp"]);
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.validate_aud = false;
        validation.leeway = 30;
        Ok(JwtVerifier {
            key: DecodingKey::from_secret(key),
            validation,
            max_ttl,
        })
    }

    /// The namespaces a valid token may reach.
    pub fn verify(&self, token: &str) -> Result<Vec<String>, JwtError> {
        self.verify_subject(token).map(|(ns, _)| ns)
    }

    /// The namespaces a valid token may reach, and its `sub` claim.
    pub fn verify_subject(&self, token: &str) -> Result<(Vec<String>, Option<String>), JwtError> {
        use jsonwebtoken::errors::ErrorKind;
        let data =
            decode::<Claims>(token, &self.key, &self.validation).map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature | ErrorKind::ImmatureSignature => JwtError::Expired,
                ErrorKind::InvalidSignature => JwtError::Invalid("bad signature".into()),
                ErrorKind::InvalidAlgorithm => JwtError::Invalid("algorithm must be HS256".into()),
                _ => JwtError::Invalid(e.to_string()),
            })?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        if data.claims.exp.saturating_sub(now) > self.max_ttl.as_secs() {
            return Err(JwtError::TooLong(self.max_ttl.as_secs()));
        }
        let ns: Vec<String> = data
            .claims
            .ns
            .into_iter()
            .filter(|n| !n.is_empty())
            .collect();
        if ns.is_empty() {
            return Err(JwtError::Invalid("claim ns names no namespace".into()));
        }
        Ok((ns, data.claims.sub.filter(|s| !s.is_empty())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode};
    use serde_json::json;

    const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    }

    fn token(alg: Algorithm, key: &[u8], claims: serde_json::Value) -> String {
        encode(&Header::new(alg), &claims, &EncodingKey::from_secret(key)).expect("encodes")
    }

    #[test]
    fn accepts_a_fresh_token_and_refuses_the_rest() {
        let v = JwtVerifier::new(KEY, Duration::from_secs(3600)).expect("verifier");
        let good = token(
            Algorithm::HS256,
            KEY,
            json!({"exp": now() + 60, "ns": ["tenants"]}),
        );
        assert_eq!(v.verify(&good), Ok(vec!["tenants".to_string()]));
        let expired = token(
            Algorithm::HS256,
            KEY,
            json!({"exp": now() - 120, "ns": ["t"]}),
        );
        assert_eq!(v.verify(&expired), Err(JwtError::Expired));
        let early = token(
            Algorithm::HS256,
            KEY,
            json!({"exp": now() + 600, "nbf": now() + 300, "ns": ["t"]}),
        );
        assert_eq!(v.verify(&early), Err(JwtError::Expired));
        let other_key = token(
            Algorithm::HS256,
            b"another key of thirty-two bytes!",
            json!({"exp": now() + 60, "ns": ["t"]}),
        );
        assert!(matches!(v.verify(&other_key), Err(JwtError::Invalid(_))));
        let hs512 = token(
            Algorithm::HS512,
            KEY,
            json!({"exp": now() + 60, "ns": ["t"]}),
        );
        assert!(matches!(v.verify(&hs512), Err(JwtError::Invalid(_))));
        let long = token(
            Algorithm::HS256,
            KEY,
            json!({"exp": now() + 7200, "ns": ["t"]}),
        );
        assert_eq!(v.verify(&long), Err(JwtError::TooLong(3600)));
        let no_exp = token(Algorithm::HS256, KEY, json!({"ns": ["t"]}));
        assert!(matches!(v.verify(&no_exp), Err(JwtError::Invalid(_))));
        let no_ns = token(Algorithm::HS256, KEY, json!({"exp": now() + 60, "ns": []}));
        assert!(matches!(v.verify(&no_ns), Err(JwtError::Invalid(_))));
        // alg "none", hand-made.
        let none = format!(
            "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{}.",
            base64::Engine::encode(
                &base64::engine::general_purpose::URL_SAFE_NO_PAD,
                format!(r#"{{"exp":{},"ns":["t"]}}"#, now() + 60)
            )
        );
        assert!(matches!(v.verify(&none), Err(JwtError::Invalid(_))));
        assert!(JwtVerifier::new(b"short", Duration::from_secs(60)).is_err());
    }
}
