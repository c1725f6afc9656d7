//! SCRAM-SHA-256 primitives (RFC 5802, RFC 7677) shared by both sides the
//! project speaks: the router verifying its clients
//! (`router::pgwire::scram`) and the shards authenticating to warehouses
//! (`shard::scram`). Pure functions, no state.

use std::borrow::Cow;

use hmac::digest::Key;
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

/// SASLprep the password if it is valid for it; otherwise use it as is,
/// like PostgreSQL and libpq.
pub fn normalize(password: &str) -> Cow<'_, [u8]> {
    match stringprep::saslprep(password) {
        Ok(Cow::Borrowed(p)) => Cow::Borrowed(p.as_bytes()),
        Ok(Cow::Owned(p)) => Cow::Owned(p.into_bytes()),
        Err(_) => Cow::Borrowed(password.as_bytes()),
    }
}

/// An HMAC-SHA-256 instance keyed with `key`. HMAC accepts keys of any
/// length (RFC 2104): longer than a block they are hashed, shorter they are
/// zero-padded. Doing that here keeps key setup infallible.
fn hmac_keyed(key: &[u8]) -> HmacSha256 {
    let mut k = Key::<HmacSha256>::default();
    if key.len() > k.len() {
        let digest = Sha256::digest(key);
        k[..digest.len()].copy_from_slice(&digest);
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    HmacSha256::new(&k)
}

/// HMAC-SHA-256 of the concatenated `parts` under `key`.
pub fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut mac = hmac_keyed(key);
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

/// Hi() of RFC 5802: PBKDF2-HMAC-SHA-256 with one output block (the
/// pbkdf2 crate).
pub fn hi(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
    let mut out = [0u8; 32];
    pbkdf2::pbkdf2_hmac::<Sha256>(password, salt, iterations, &mut out);
    out
}

/// Equality that takes the same time wherever the inputs differ (subtle).
pub fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    subtle::ConstantTimeEq::ct_eq(&a[..], &b[..]).into()
}
