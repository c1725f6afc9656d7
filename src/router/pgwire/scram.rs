//! Server side of SCRAM-SHA-256 (RFC 5802, RFC 7677) as PostgreSQL speaks
//! it: mechanism "SCRAM-SHA-256" without channel binding, the user name
//! taken from the startup packet rather than from the SASL exchange, and
//! verifiers stored in PostgreSQL's `SCRAM-SHA-256$<iter>:<salt>$<stored>:<server>`
//! format. Unknown users run the same exchange against a mock verifier so
//! that they cannot be told apart from a wrong password.

use std::fmt::{self, Write as _};
use std::ops::Range;
use std::sync::OnceLock;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use rand::Rng;
use sha2::{Digest, Sha256};

use crate::scram::{constant_time_eq, hi, hmac_sha256, normalize};

/// SASL mechanism name offered to clients.
pub const MECHANISM: &str = "SCRAM-SHA-256";

/// PostgreSQL's default iteration count for new verifiers.
const DEFAULT_ITERATIONS: u32 = 4096;
/// PostgreSQL's default salt length.
const SALT_LEN: usize = 16;
/// Random bytes in the server's part of the nonce.
const SERVER_NONCE_LEN: usize = 18;
/// Prefix of a stored SCRAM-SHA-256 verifier.
const VERIFIER_PREFIX: &str = "SCRAM-SHA-256$";

/// Errors of the SCRAM exchange and of verifier parsing. None of them
/// carries secret material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScramError {
    /// A client message does not follow the SCRAM grammar.
    #[error("malformed scram message: {0}")]
    Malformed(&'static str),
    /// The client asked for something this server does not implement.
    #[error("unsupported scram feature: {0}")]
    Unsupported(&'static str),
    /// The channel-binding echo in client-final does not match client-first.
    #[error("scram channel binding check failed")]
    ChannelBindingMismatch,
    /// The nonce in client-final is not the one the server issued.
    #[error("scram nonce mismatch")]
    NonceMismatch,
    /// The client proof is wrong (or the user is unknown).
    #[error("password authentication failed")]
    BadPassword,
    /// A stored verifier could not be parsed.
    #[error("invalid scram verifier: {0}")]
    InvalidVerifier(&'static str),
    /// A message arrived in the wrong phase of the exchange.
    #[error("scram message out of order")]
    OutOfOrder,
}

/// What the server stores for a user: enough to verify a client proof and
/// to prove itself, but not the password.
#[derive(Clone)]
pub struct Verifier {
    iterations: u32,
    salt: Vec<u8>,
    stored_key: [u8; 32],
    server_key: [u8; 32],
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier")
            .field("iterations", &self.iterations)
            .finish_non_exhaustive()
    }
}

impl Verifier {
    /// Derives a verifier from a plaintext password with a fresh random
    /// salt and 4096 iterations, normalising the password with SASLprep
    /// when possible, as PostgreSQL does.
    pub fn from_password(password: &str) -> Verifier {
        let mut salt = [0u8; SALT_LEN];
        rand::rng().fill_bytes(&mut salt);
        Self::from_password_salted(password, &salt, DEFAULT_ITERATIONS)
    }

    fn from_password_salted(password: &str, salt: &[u8], iterations: u32) -> Verifier {
        let salted = hi(&normalize(password), salt, iterations);
        let client_key = hmac_sha256(&salted, &[b"Client Key"]);
        Verifier {
            iterations,
            salt: salt.to_vec(),
            stored_key: Sha256::digest(client_key).into(),
            server_key: hmac_sha256(&salted, &[b"Server Key"]),
        }
    }

    /// Parses PostgreSQL's stored form
    /// `SCRAM-SHA-256$<iterations>:<base64 salt>$<base64 StoredKey>:<base64 ServerKey>`.
    pub fn parse(s: &str) -> Result<Verifier, ScramError> {
        let rest = s
            .strip_prefix(VERIFIER_PREFIX)
            .ok_or(ScramError::InvalidVerifier("unknown format"))?;
        let (params, keys) = rest
            .split_once('$')
            .ok_or(ScramError::InvalidVerifier("missing keys"))?;
        let (iterations, salt) = params
            .split_once(':')
            .ok_or(ScramError::InvalidVerifier("missing salt"))?;
        let (stored_key, server_key) = keys
            .split_once(':')
            .ok_or(ScramError::InvalidVerifier("missing server key"))?;
        let iterations: u32 = iterations
            .parse()
            .map_err(|_| ScramError::InvalidVerifier("invalid iteration count"))?;
        if iterations == 0 {
            return Err(ScramError::InvalidVerifier("invalid iteration count"));
        }
        let salt = STANDARD
            .decode(salt)
            .map_err(|_| ScramError::InvalidVerifier("invalid salt"))?;
        if salt.is_empty() {
            return Err(ScramError::InvalidVerifier("invalid salt"));
        }
        Ok(Verifier {
            iterations,
            salt,
            stored_key: decode_key(stored_key)
                .ok_or(ScramError::InvalidVerifier("invalid stored key"))?,
            server_key: decode_key(server_key)
                .ok_or(ScramError::InvalidVerifier("invalid server key"))?,
        })
    }

    /// The PBKDF2 iteration count clients must use.
    pub fn iterations(&self) -> u32 {
        self.iterations
    }
}

/// Decodes exactly 32 bytes of standard base64 without allocating.
fn decode_key(s: &str) -> Option<[u8; 32]> {
    let mut buf = [0u8; 48];
    let n = STANDARD.decode_slice(s, &mut buf).ok()?;
    if n != 32 {
        return None;
    }
    let mut key = [0u8; 32];
    key.copy_from_slice(&buf[..32]);
    Some(key)
}

/// Per-process material for the mock verifier of unknown users.
struct Mock {
    secret: [u8; 32],
    verifier: Verifier,
}

fn mock() -> &'static Mock {
    static MOCK: OnceLock<Mock> = OnceLock::new();
    MOCK.get_or_init(|| {
        let mut rng = rand::rng();
        let mut secret = [0u8; 32];
        let mut salt = [0u8; SALT_LEN];
        let mut stored_key = [0u8; 32];
        let mut server_key = [0u8; 32];
        rng.fill_bytes(&mut secret);
        rng.fill_bytes(&mut salt);
        rng.fill_bytes(&mut stored_key);
        rng.fill_bytes(&mut server_key);
        Mock {
            secret,
            verifier: Verifier {
                iterations: DEFAULT_ITERATIONS,
                salt: salt.to_vec(),
                stored_key,
                server_key,
            },
        }
    })
}

enum State {
    Initial,
    /// After server-first. `auth` holds "client-first-bare,server-first,"
    /// and gets client-final-without-proof appended to form AuthMessage.
    SentFirst {
        auth: String,
        nonce: Range<usize>,
        cbind: &'static str,
    },
    Done,
}

/// One SCRAM-SHA-256 exchange, server side.
pub struct ScramServer {
    verifier: Verifier,
    /// The user is unknown: go through the motions, then fail.
    mock: bool,
    state: State,
}

impl fmt::Debug for ScramServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.state {
            State::Initial => "initial",
            State::SentFirst { .. } => "sent-first",
            State::Done => "done",
        };
        f.debug_struct("ScramServer")
            .field("state", &state)
            .finish_non_exhaustive()
    }
}

impl ScramServer {
    /// Starts an exchange against `verifier`; `None` means the user is
    /// unknown, in which case a per-process mock verifier is used and the
    /// exchange always fails at the end.
    pub fn new(verifier: Option<&Verifier>) -> Self {
        match verifier {
            Some(v) => Self::with(v.clone(), false),
            None => Self::with(mock().verifier.clone(), true),
        }
    }

    /// Like [`ScramServer::new`], but for an unknown user the mock salt is
    /// derived from the user name, so that it stays stable across attempts
    /// and differs between names, as a real user's salt would.
    pub fn new_for_user(user: &str, verifier: Option<&Verifier>) -> Self {
        match verifier {
            Some(v) => Self::with(v.clone(), false),
            None => {
                let m = mock();
                let salt = hmac_sha256(&m.secret, &[b"mock salt\0", user.as_bytes()]);
                let verifier = Verifier {
                    iterations: m.verifier.iterations,
                    salt: salt[..SALT_LEN].to_vec(),
                    stored_key: m.verifier.stored_key,
                    server_key: m.verifier.server_key,
                };
                Self::with(verifier, true)
            }
        }
    }

    fn with(verifier: Verifier, mock: bool) -> Self {
        Self {
            verifier,
            mock,
            state: State::Initial,
        }
    }

    /// Handles client-first-message and returns server-first-message.
    pub fn handle_client_first(&mut self, msg: &[u8]) -> Result<Vec<u8>, ScramError> {
        let mut nonce = [0u8; SERVER_NONCE_LEN];
        rand::rng().fill_bytes(&mut nonce);
        let mut nonce_b64 = [0u8; 24];
        let n = STANDARD
            .encode_slice(nonce, &mut nonce_b64)
            .map_err(|_| ScramError::Malformed("nonce"))?;
        let nonce_b64 =
            std::str::from_utf8(&nonce_b64[..n]).map_err(|_| ScramError::Malformed("nonce"))?;
        self.client_first_with_nonce(msg, nonce_b64)
    }

    fn client_first_with_nonce(
        &mut self,
        msg: &[u8],
        server_nonce: &str,
    ) -> Result<Vec<u8>, ScramError> {
        if !matches!(self.state, State::Initial) {
            return Err(ScramError::OutOfOrder);
        }
        self.state = State::Done;
        let msg = std::str::from_utf8(msg).map_err(|_| ScramError::Malformed("not utf-8"))?;

        // gs2-header: cbind-flag "," [authzid] ","
        let (cbind, rest) = if let Some(rest) = msg.strip_prefix("n,") {
            ("biws", rest) // base64("n,,")
        } else if let Some(rest) = msg.strip_prefix("y,") {
            ("eSws", rest) // base64("y,,")
        } else if msg.starts_with("p=") {
            return Err(ScramError::Unsupported("channel binding"));
        } else {
            return Err(ScramError::Malformed("invalid gs2 header"));
        };
        let bare = match rest.strip_prefix(',') {
            Some(bare) => bare,
            None if rest.starts_with("a=") => {
                return Err(ScramError::Unsupported("authorization identity"));
            }
            None => return Err(ScramError::Malformed("invalid gs2 header")),
        };

        // client-first-message-bare: [m=...,] n=user,r=nonce[,ext...]
        let mut attrs = bare.split(',');
        let user = attrs.next().unwrap_or_default();
        if user.starts_with("m=") {
            return Err(ScramError::Unsupported("mandatory extension"));
        }
        if !user.starts_with("n=") {
            return Err(ScramError::Malformed("missing user name"));
        }
        let client_nonce = attrs
            .next()
            .and_then(|a| a.strip_prefix("r="))
            .ok_or(ScramError::Malformed("missing nonce"))?;
        if client_nonce.is_empty() || !client_nonce.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
            return Err(ScramError::Malformed("invalid nonce"));
        }
        if !attrs.all(is_attribute) {
            return Err(ScramError::Malformed("invalid attribute"));
        }

        // AuthMessage prefix, with server-first built in place.
        let salt_len = base64::encoded_len(self.verifier.salt.len(), true).unwrap_or(0);
        let mut auth = String::with_capacity(bare.len() + client_nonce.len() + salt_len + 200);
        auth.push_str(bare);
        auth.push(',');
        let server_first_start = auth.len();
        auth.push_str("r=");
        let nonce_start = auth.len();
        auth.push_str(client_nonce);
        auth.push_str(server_nonce);
        let nonce_end = auth.len();
        auth.push_str(",s=");
        STANDARD.encode_string(&self.verifier.salt, &mut auth);
        // Writing to a String cannot fail.
        let _ = write!(auth, ",i={}", self.verifier.iterations);
        let server_first = auth.as_bytes()[server_first_start..].to_vec();
        auth.push(',');

        self.state = State::SentFirst {
            auth,
            nonce: nonce_start..nonce_end,
            cbind,
        };
        Ok(server_first)
    }

    /// Handles client-final-message, verifies the proof, and returns
    /// server-final-message ("v=...") on success.
    pub fn handle_client_final(&mut self, msg: &[u8]) -> Result<Vec<u8>, ScramError> {
        let State::SentFirst {
            mut auth,
            nonce,
            cbind,
        } = std::mem::replace(&mut self.state, State::Done)
        else {
            return Err(ScramError::OutOfOrder);
        };
        let msg = std::str::from_utf8(msg).map_err(|_| ScramError::Malformed("not utf-8"))?;

        // client-final-message: c=...,r=...[,ext...],p=...
        let (without_proof, proof) = msg
            .rsplit_once(",p=")
            .ok_or(ScramError::Malformed("missing proof"))?;
        let mut attrs = without_proof.split(',');
        let c = attrs
            .next()
            .and_then(|a| a.strip_prefix("c="))
            .ok_or(ScramError::Malformed("missing channel binding"))?;
        let r = attrs
            .next()
            .and_then(|a| a.strip_prefix("r="))
            .ok_or(ScramError::Malformed("missing nonce"))?;
        if !attrs.all(is_attribute) {
            return Err(ScramError::Malformed("invalid attribute"));
        }
        let proof = decode_key(proof).ok_or(ScramError::Malformed("invalid proof"))?;
        if c != cbind {
            return Err(ScramError::ChannelBindingMismatch);
        }
        if r != &auth[nonce] {
            return Err(ScramError::NonceMismatch);
        }

        auth.push_str(without_proof);
        let v = &self.verifier;
        let client_signature = hmac_sha256(&v.stored_key, &[auth.as_bytes()]);
        let mut client_key = proof;
        for (k, s) in client_key.iter_mut().zip(client_signature) {
            *k ^= s;
        }
        let computed: [u8; 32] = Sha256::digest(client_key).into();
        let matches = constant_time_eq(&computed, &v.stored_key);
        if !matches || self.mock {
            return Err(ScramError::BadPassword);
        }

        let server_signature = hmac_sha256(&v.server_key, &[auth.as_bytes()]);
        let mut out = Vec::with_capacity(46);
        out.extend_from_slice(b"v=");
        let mut sig = [0u8; 44];
        let n = STANDARD
            .encode_slice(server_signature, &mut sig)
            .map_err(|_| ScramError::Malformed("signature"))?;
        out.extend_from_slice(&sig[..n]);
        Ok(out)
    }
}

/// An extension attribute: a single letter, '=', and a value.
fn is_attribute(a: &str) -> bool {
    let b = a.as_bytes();
    b.len() >= 2 && b[0].is_ascii_alphabetic() && b[1] == b'='
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

    /// Runs a full exchange with postgres-protocol's client.
    fn exchange(
        server: &mut ScramServer,
        password: &str,
        cb: ChannelBinding,
    ) -> Result<(), ScramError> {
        let mut client = ScramSha256::new(password.as_bytes(), cb);
        let server_first = server.handle_client_first(client.message())?;
        client
            .update(&server_first)
            .expect("client accepts server-first");
        let server_final = server.handle_client_final(client.message())?;
        client
            .finish(&server_final)
            .expect("client verifies the server signature");
        Ok(())
    }

    #[test]
    fn full_exchange_with_postgres_protocol_client() {
        let v = Verifier::from_password("s3cret");
        exchange(
            &mut ScramServer::new(Some(&v)),
            "s3cret",
            ChannelBinding::unsupported(),
        )
        .expect("n,, exchange");
        exchange(
            &mut ScramServer::new(Some(&v)),
            "s3cret",
            ChannelBinding::unrequested(),
        )
        .expect("y,, exchange");
        assert_eq!(
            exchange(
                &mut ScramServer::new(Some(&v)),
                "wrong",
                ChannelBinding::unsupported()
            ),
            Err(ScramError::BadPassword)
        );
    }

    #[test]
    fn unusual_passwords() {
        // Longer than an HMAC block, non-ASCII, and SASLprep-mapped.
        for pw in [
            "x".repeat(200),
            "pässwörd".into(),
            "a\u{00A0}b".into(),
            "\u{FB01}".into(),
        ] {
            let v = Verifier::from_password(&pw);
            exchange(
                &mut ScramServer::new(Some(&v)),
                &pw,
                ChannelBinding::unsupported(),
            )
            .expect("exchange");
        }
    }

    #[test]
    fn parses_postgres_verifiers() {
        let stored = postgres_protocol::password::scram_sha_256(b"hunter2");
        let v = Verifier::parse(&stored).expect("verifier");
        assert_eq!(v.iterations(), 4096);
        exchange(
            &mut ScramServer::new(Some(&v)),
            "hunter2",
            ChannelBinding::unsupported(),
        )
        .expect("exchange");
        assert_eq!(
            exchange(
                &mut ScramServer::new(Some(&v)),
                "hunter3",
                ChannelBinding::unsupported()
            ),
            Err(ScramError::BadPassword)
        );
        // Debug never shows key material.
        let dbg = format!("{v:?}");
        assert!(!dbg.contains(&STANDARD.encode(v.stored_key)));
        assert!(!dbg.contains("salt"));

        for bad in [
            "",
            "md5abc",
            "SCRAM-SHA-256$",
            "SCRAM-SHA-256$4096:c2FsdA==",
            "SCRAM-SHA-256$0:c2FsdA==$AAAA:AAAA",
            "SCRAM-SHA-256$x:c2FsdA==$AAAA:AAAA",
            "SCRAM-SHA-256$4096:$AAAA:AAAA",
            "SCRAM-SHA-256$4096:c2FsdA==$AAAA:AAAA",
            "SCRAM-SHA-256$4096:!!$AAAA:AAAA",
        ] {
            assert!(Verifier::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn rfc7677_test_vector() {
        let salt = STANDARD.decode("W22ZaJ0SNY7soEsUEjb6gQ==").expect("salt");
        let v = Verifier::from_password_salted("pencil", &salt, 4096);
        let mut s = ScramServer::new(Some(&v));
        let first = s
            .client_first_with_nonce(
                b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO",
                "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0",
            )
            .expect("server-first");
        assert_eq!(
            first,
            b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
        );
        let fin = s
            .handle_client_final(
                b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
            )
            .expect("server-final");
        assert_eq!(fin, b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=");
    }

    #[test]
    fn unknown_user_always_fails() {
        // Even a client that somehow matched the mock could not succeed;
        // here we just check the exchange runs to the end and fails.
        for mut s in [
            ScramServer::new(None),
            ScramServer::new_for_user("ghost", None),
        ] {
            assert_eq!(
                exchange(&mut s, "anything", ChannelBinding::unsupported()),
                Err(ScramError::BadPassword)
            );
        }
        // The mock salt is stable per user name and differs between names.
        let salt_of = |user: &str| {
            let mut s = ScramServer::new_for_user(user, None);
            let first = s.handle_client_first(b"n,,n=,r=abc").expect("first");
            let first = String::from_utf8(first).expect("utf-8");
            first.split(',').nth(1).map(str::to_owned).expect("salt")
        };
        assert_eq!(salt_of("ghost"), salt_of("ghost"));
        assert_ne!(salt_of("ghost"), salt_of("phantom"));
    }

    #[test]
    fn rejects_malformed_client_first() {
        for (msg, err) in [
            (
                &b"p=tls-server-end-point,,n=,r=abc"[..],
                ScramError::Unsupported("channel binding"),
            ),
            (
                b"n,a=admin,n=,r=abc",
                ScramError::Unsupported("authorization identity"),
            ),
            (
                b"n,,m=ext,n=,r=abc",
                ScramError::Unsupported("mandatory extension"),
            ),
            (b"x,,n=,r=abc", ScramError::Malformed("invalid gs2 header")),
            (b"n,,r=abc", ScramError::Malformed("missing user name")),
            (b"n,,n=", ScramError::Malformed("missing nonce")),
            (b"n,,n=,r=", ScramError::Malformed("invalid nonce")),
            (b"n,,n=,r=a b", ScramError::Malformed("invalid nonce")),
            (b"n,,n=,r=ab,,", ScramError::Malformed("invalid attribute")),
            (b"n,,n=,r=\xff", ScramError::Malformed("not utf-8")),
            (b"", ScramError::Malformed("invalid gs2 header")),
        ] {
            let mut s = ScramServer::new(None);
            assert_eq!(s.handle_client_first(msg), Err(err), "{msg:?}");
        }
        let mut s = ScramServer::new(None);
        assert_eq!(
            s.handle_client_final(b"c=biws"),
            Err(ScramError::OutOfOrder)
        );
    }

    #[test]
    fn rejects_bad_client_final() {
        let v = Verifier::from_password("pw");
        let start = || {
            let mut s = ScramServer::new(Some(&v));
            let first = s.handle_client_first(b"n,,n=,r=abc").expect("first");
            let first = String::from_utf8(first).expect("utf-8");
            let nonce = first
                .split(',')
                .next()
                .and_then(|r| r.strip_prefix("r="))
                .map(str::to_owned)
                .expect("nonce");
            (s, nonce)
        };
        let proof = STANDARD.encode([0u8; 32]);

        let (mut s, nonce) = start();
        let msg = format!("c=eSws,r={nonce},p={proof}");
        assert_eq!(
            s.handle_client_final(msg.as_bytes()),
            Err(ScramError::ChannelBindingMismatch)
        );

        let (mut s, _) = start();
        let msg = format!("c=biws,r=abcdef,p={proof}");
        assert_eq!(
            s.handle_client_final(msg.as_bytes()),
            Err(ScramError::NonceMismatch)
        );

        let (mut s, nonce) = start();
        let msg = format!("c=biws,r={nonce},p={proof}");
        assert_eq!(
            s.handle_client_final(msg.as_bytes()),
            Err(ScramError::BadPassword)
        );
        // The exchange is over after a failure.
        assert_eq!(
            s.handle_client_final(msg.as_bytes()),
            Err(ScramError::OutOfOrder)
        );

        let (mut s, nonce) = start();
        let msg = format!("c=biws,r={nonce},p=AAAA");
        assert_eq!(
            s.handle_client_final(msg.as_bytes()),
            Err(ScramError::Malformed("invalid proof"))
        );

        let (mut s, nonce) = start();
        let msg = format!("c=biws,r={nonce}");
        assert_eq!(
            s.handle_client_final(msg.as_bytes()),
            Err(ScramError::Malformed("missing proof"))
        );
    }

    #[test]
    fn errors_do_not_leak() {
        let err = ScramError::BadPassword.to_string();
        assert_eq!(err, "password authentication failed");
        let dbg = format!(
            "{:?}",
            ScramServer::new(Some(&Verifier::from_password("pw")))
        );
        assert!(!dbg.contains("pw\""));
    }
}
