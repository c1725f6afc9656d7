//! The client side of SCRAM-SHA-256 and SCRAM-SHA-256-PLUS (RFC 5802,
//! RFC 7677, PostgreSQL's SASL exchange) for the shard's server
//! connections, with the keys derived from the password kept per source.
//!
//! Deriving them is PBKDF2 with the server's iteration count (4,096 by
//! default: about 1 ms of CPU), and it is the same for every connection of
//! a source: the salt and count belong to the role, not to the connection.
//! A source opens 12 connections at warm-up and again at every handover, a
//! shard thousands, so [`KeyCache`] keeps the derived client and server keys
//! for the last (password, salt, iterations) seen and later connections
//! only compute the per-exchange HMACs. PgBouncer keeps them the same way.
//! The cache holds a digest of the password it was derived from, never the
//! password; a rotated password or a new salt derives again.

use std::sync::Mutex;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use sha2::{Digest, Sha256};

use crate::scram::{constant_time_eq, hi, hmac_sha256, normalize};

/// Mechanism names as the server lists them.
pub const SCRAM_SHA_256: &str = "SCRAM-SHA-256";
/// With channel binding.
pub const SCRAM_SHA_256_PLUS: &str = "SCRAM-SHA-256-PLUS";

/// Why an exchange failed (short, secret-free).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScramError {
    /// The server's message does not parse.
    #[error("malformed SCRAM message from the server: {0}")]
    Malformed(&'static str),
    /// The server's nonce does not extend ours.
    #[error("the server's SCRAM nonce does not extend the client's")]
    Nonce,
    /// The server reported an error.
    #[error("the server ended the SCRAM exchange: {0}")]
    Server(String),
    /// The server did not prove it knows the password.
    #[error("server signature mismatch")]
    Signature,
    /// A message came out of order.
    #[error("unexpected SCRAM message")]
    State,
}

/// What the client says about channel binding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Binding {
    /// Not over TLS: "n".
    Unsupported,
    /// Over TLS, but the server offered no binding: "y" (a server that did
    /// offer it, its offer removed on the way, then fails the exchange).
    Unrequested,
    /// tls-server-end-point with this hash of the server's certificate.
    ServerEndPoint(Vec<u8>),
}

impl Binding {
    fn gs2_header(&self) -> &'static str {
        match self {
            Binding::Unsupported => "n,,",
            Binding::Unrequested => "y,,",
            Binding::ServerEndPoint(_) => "p=tls-server-end-point,,",
        }
    }

    fn cbind_input(&self) -> Vec<u8> {
        let mut v = self.gs2_header().as_bytes().to_vec();
        if let Binding::ServerEndPoint(hash) = self {
            v.extend_from_slice(hash);
        }
        v
    }
}

/// The keys derived from one (password, salt, iterations).
#[derive(Clone)]
struct Keys {
    password_digest: [u8; 32],
    salt: Vec<u8>,
    iterations: u32,
    client_key: [u8; 32],
    server_key: [u8; 32],
}

/// Derived keys of one source, shared by its connections.
///
/// Lock discipline: a std Mutex held only to read or replace the entry,
/// never across an await or the key derivation.
#[derive(Default)]
pub struct KeyCache {
    entry: Mutex<Option<Keys>>,
}

impl std::fmt::Debug for KeyCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyCache").finish_non_exhaustive()
    }
}

impl KeyCache {
    fn get(&self, digest: &[u8; 32], salt: &[u8], iterations: u32) -> Option<([u8; 32], [u8; 32])> {
        let guard = self.entry.lock().ok()?;
        guard
            .as_ref()
            .filter(|k| {
                &k.password_digest == digest && k.salt == salt && k.iterations == iterations
            })
            .map(|k| (k.client_key, k.server_key))
    }

    fn put(&self, keys: Keys) {
        if let Ok(mut guard) = self.entry.lock() {
            *guard = Some(keys);
        }
    }
}

/// The server's first message: its nonce, the salt and the iteration count.
struct ServerFirst<'a> {
    nonce: &'a str,
    salt: Vec<u8>,
    iterations: u32,
}

fn parse_server_first(msg: &str) -> Result<ServerFirst<'_>, ScramError> {
    let mut parts = msg.split(',');
    let nonce = parts
        .next()
        .and_then(|p| p.strip_prefix("r="))
        .ok_or(ScramError::Malformed("no nonce"))?;
    let salt = parts
        .next()
        .and_then(|p| p.strip_prefix("s="))
        .ok_or(ScramError::Malformed("no salt"))?;
    let salt = B64
        .decode(salt)
        .map_err(|_| ScramError::Malformed("salt is not base64"))?;
    let iterations = parts
        .next()
        .and_then(|p| p.strip_prefix("i="))
        .and_then(|i| i.parse::<u32>().ok())
        .filter(|i| *i > 0)
        .ok_or(ScramError::Malformed("no iteration count"))?;
    Ok(ServerFirst {
        nonce,
        salt,
        iterations,
    })
}

/// One exchange, from the client's first message to checking the server's
/// signature.
pub struct Exchange {
    binding: Binding,
    client_nonce: String,
    /// Set by [`Exchange::client_final`]: the signature the server must send.
    expected: Option<[u8; 32]>,
}

/// What [`Exchange::client_final`] needs from a slow derivation: the
/// normalized password and the server's salt and count. None when the
/// cache had the keys.
pub struct Derivation {
    password: Vec<u8>,
    salt: Vec<u8>,
    iterations: u32,
}

impl Derivation {
    /// Runs PBKDF2 (call it off the runtime's threads).
    pub fn run(self) -> DerivedKeys {
        let salted = hi(&self.password, &self.salt, self.iterations);
        DerivedKeys {
            client_key: hmac_sha256(&salted, &[b"Client Key"]),
            server_key: hmac_sha256(&salted, &[b"Server Key"]),
        }
    }
}

/// Keys from a [`Derivation`].
pub struct DerivedKeys {
    client_key: [u8; 32],
    server_key: [u8; 32],
}

impl Exchange {
    /// A new exchange with a fresh random nonce.
    pub fn new(binding: Binding) -> Exchange {
        let bytes: [u8; 18] = rand::random();
        Exchange {
            binding,
            client_nonce: B64.encode(bytes),
            expected: None,
        }
    }

    fn client_first_bare(&self) -> String {
        format!("n=,r={}", self.client_nonce)
    }

    /// The client's first message (the SASLInitialResponse data).
    pub fn client_first(&self) -> Vec<u8> {
        format!("{}{}", self.binding.gs2_header(), self.client_first_bare()).into_bytes()
    }

    /// What to derive for the server's first message, unless `cache` has
    /// the keys already: Ok(None) when it does.
    pub fn derivation(
        &self,
        server_first: &[u8],
        password: &str,
        cache: &KeyCache,
    ) -> Result<Option<Derivation>, ScramError> {
        let msg =
            std::str::from_utf8(server_first).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let first = parse_server_first(msg)?;
        let normalized = normalize(password).into_owned();
        let digest: [u8; 32] = Sha256::digest(&normalized).into();
        if cache.get(&digest, &first.salt, first.iterations).is_some() {
            return Ok(None);
        }
        Ok(Some(Derivation {
            password: normalized,
            salt: first.salt,
            iterations: first.iterations,
        }))
    }

    /// The client's final message for the server's first message, with
    /// the keys from `derived` (a derivation just run, which is kept in
    /// `cache`) or else from `cache`.
    pub fn client_final(
        &mut self,
        server_first: &[u8],
        password: &str,
        cache: &KeyCache,
        derived: Option<DerivedKeys>,
    ) -> Result<Vec<u8>, ScramError> {
        let msg =
            std::str::from_utf8(server_first).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        if let Some(err) = msg.strip_prefix("e=") {
            return Err(ScramError::Server(err.to_string()));
        }
        let first = parse_server_first(msg)?;
        if first.nonce.len() <= self.client_nonce.len()
            || !first.nonce.starts_with(&self.client_nonce)
        {
            return Err(ScramError::Nonce);
        }
        let digest: [u8; 32] = Sha256::digest(normalize(password)).into();
        let (client_key, server_key) = match derived {
            Some(d) => {
                cache.put(Keys {
                    password_digest: digest,
                    salt: first.salt.clone(),
                    iterations: first.iterations,
                    client_key: d.client_key,
                    server_key: d.server_key,
                });
                (d.client_key, d.server_key)
            }
            None => cache
                .get(&digest, &first.salt, first.iterations)
                .ok_or(ScramError::State)?,
        };
        let without_proof = format!(
            "c={},r={}",
            B64.encode(self.binding.cbind_input()),
            first.nonce
        );
        let auth_message = format!("{},{},{}", self.client_first_bare(), msg, without_proof);
        let stored_key: [u8; 32] = Sha256::digest(client_key).into();
        let signature = hmac_sha256(&stored_key, &[auth_message.as_bytes()]);
        let proof: Vec<u8> = client_key
            .iter()
            .zip(signature)
            .map(|(k, s)| k ^ s)
            .collect();
        self.expected = Some(hmac_sha256(&server_key, &[auth_message.as_bytes()]));
        Ok(format!("{without_proof},p={}", B64.encode(proof)).into_bytes())
    }

    /// Checks the server's final message: its signature proves it knows
    /// the password's keys (constant-time comparison).
    pub fn verify(&self, server_final: &[u8]) -> Result<(), ScramError> {
        let expected = self.expected.ok_or(ScramError::State)?;
        let msg =
            std::str::from_utf8(server_final).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        if let Some(err) = msg.strip_prefix("e=") {
            return Err(ScramError::Server(err.to_string()));
        }
        let v = msg
            .split(',')
            .next()
            .and_then(|p| p.strip_prefix("v="))
            .ok_or(ScramError::Malformed("no verifier"))?;
        let got = B64
            .decode(v)
            .map_err(|_| ScramError::Malformed("verifier is not base64"))?;
        let got: [u8; 32] = got.try_into().map_err(|_| ScramError::Signature)?;
        if constant_time_eq(&got, &expected) {
            Ok(())
        } else {
            Err(ScramError::Signature)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_keys_are_kept_per_password_salt_and_count() {
        let mut ex = Exchange::new(Binding::Unsupported);
        ex.client_nonce = "rOprNGfwEbeRWgbNEkqO".into();
        // The server-first message of RFC 7677's example exchange.
        let server_first = b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
        let cache = KeyCache::default();
        let d = ex
            .derivation(server_first, "pencil", &cache)
            .expect("parses")
            .expect("nothing cached yet");
        let keys = d.run();
        let out = ex
            .client_final(server_first, "pencil", &cache, Some(keys))
            .expect("final");
        let out = String::from_utf8(out).expect("text");
        assert!(
            out.starts_with("c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p="),
            "{out}"
        );
        // Cached now: the same salt and count derive nothing.
        assert!(
            ex.derivation(server_first, "pencil", &cache)
                .expect("parses")
                .is_none()
        );
        // Another password, or another salt, derives again.
        assert!(
            ex.derivation(server_first, "pencil2", &cache)
                .expect("parses")
                .is_some()
        );
        let other_salt = b"r=rOprNGfwEbeRWgbNEkqO%hv,s=QSXCR+Q6sek8bf92,i=4096";
        assert!(
            ex.derivation(other_salt, "pencil", &cache)
                .expect("parses")
                .is_some()
        );
    }

    use crate::router::pgwire::scram::{ScramServer, Verifier};

    /// One exchange of this client with the router's SCRAM server (itself
    /// checked against postgres-protocol's client) holding verifier `v`,
    /// keys kept in `cache`; returns whether they had to be derived.
    fn against_router_server(
        password: &str,
        v: &Verifier,
        cache: &KeyCache,
    ) -> Result<bool, String> {
        let mut server = ScramServer::new(Some(v));
        let mut ex = Exchange::new(Binding::Unsupported);
        let first = server
            .handle_client_first(&ex.client_first())
            .map_err(|e| e.to_string())?;
        let d = ex
            .derivation(&first, password, cache)
            .map_err(|e| e.to_string())?;
        let derived = d.is_some();
        let last = ex
            .client_final(&first, password, cache, d.map(Derivation::run))
            .map_err(|e| e.to_string())?;
        let fin = server
            .handle_client_final(&last)
            .map_err(|e| e.to_string())?;
        ex.verify(&fin).map_err(|e| e.to_string())?;
        Ok(derived)
    }

    #[test]
    fn exchanges_with_a_scram_server_derive_the_keys_once() {
        for pw in [
            "s3cret".to_string(),
            "pässwörd".into(),
            "a\u{00A0}b".into(),
            "x".repeat(200),
        ] {
            let v = Verifier::from_password(&pw);
            let cache = KeyCache::default();
            assert_eq!(
                against_router_server(&pw, &v, &cache),
                Ok(true),
                "{pw}: first derives"
            );
            assert_eq!(
                against_router_server(&pw, &v, &cache),
                Ok(false),
                "{pw}: kept keys pass"
            );
            assert_eq!(
                against_router_server(&pw, &v, &cache),
                Ok(false),
                "{pw}: and again"
            );
            // A wrong password derives its own keys and fails.
            assert!(against_router_server("wrong", &v, &cache).is_err(), "{pw}");
            // A new verifier (new salt) derives again.
            let v2 = Verifier::from_password(&pw);
            assert_eq!(
                against_router_server(&pw, &v2, &cache),
                Ok(true),
                "{pw}: new salt"
            );
        }
    }

    #[test]
    fn bad_server_messages_are_refused() {
        let mut ex = Exchange::new(Binding::Unsupported);
        let cache = KeyCache::default();
        let nonce = ex.client_nonce.clone();
        assert_eq!(
            ex.client_final(
                b"r=someone-else,s=QSXCR+Q6sek8bf92,i=4096",
                "x",
                &cache,
                None
            )
            .err(),
            Some(ScramError::Nonce)
        );
        assert_eq!(
            ex.client_final(format!("r={nonce}").as_bytes(), "x", &cache, None)
                .err(),
            Some(ScramError::Malformed("no salt"))
        );
        assert_eq!(
            ex.client_final(
                format!("r={nonce}x,s=QSXCR+Q6sek8bf92,i=0").as_bytes(),
                "x",
                &cache,
                None
            )
            .err(),
            Some(ScramError::Malformed("no iteration count"))
        );
        assert_eq!(ex.verify(b"v=AAAA").err(), Some(ScramError::State));
    }
}
