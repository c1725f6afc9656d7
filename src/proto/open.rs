//! The `Open` frame's payload. Up to version 4 it is the source key,
//! optionally followed by a NUL and the client's Parse messages. From
//! version 5 it is
//!
//! ```text
//! key NUL client NUL weight NUL tag NUL flags NUL statements
//! ```
//!
//! where `client` is the identity the router authenticated (user name or
//! token subject), `weight` its decimal share under contention, `tag` the
//! session's cost tag (its application_name; may be empty), `flags` a set
//! of ASCII letters (`a`: send `Admitted` frames) and `statements` the
//! Parse messages as in version 4.

use bytes::{BufMut, Bytes, BytesMut};

/// Most bytes of a client name or tag carried (longer ones are cut).
pub const MAX_NAME: usize = 128;

/// What a version 5 `Open` says.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Open<'a> {
    /// `namespace/name`.
    pub key: &'a [u8],
    /// Client identity.
    pub client: &'a [u8],
    /// Its weight (1-100).
    pub weight: u32,
    /// Cost tag of the session.
    pub tag: &'a [u8],
    /// Whether the router wants `Admitted` frames (HTTP sessions).
    pub report_admission: bool,
    /// The client's named Parse messages.
    pub statements: &'a [u8],
}

/// A field without NULs, at most [`MAX_NAME`] bytes, cut at a character
/// boundary.
fn clean(s: &str) -> &[u8] {
    let s = s.split('\0').next().unwrap_or("");
    let mut end = s.len().min(MAX_NAME);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s.as_bytes()[..end]
}

/// Encodes a version 5 `Open`.
pub fn encode(
    key: &str,
    client: &str,
    weight: u32,
    tag: &str,
    report_admission: bool,
    statements: &[u8],
) -> Bytes {
    let (client, tag) = (clean(client), clean(tag));
    let weight = weight.clamp(1, 100).to_string();
    let mut p = BytesMut::with_capacity(
        key.len() + client.len() + tag.len() + weight.len() + statements.len() + 6,
    );
    for field in [key.as_bytes(), client, weight.as_bytes(), tag] {
        p.put_slice(field);
        p.put_u8(0);
    }
    if report_admission {
        p.put_u8(b'a');
    }
    p.put_u8(0);
    p.put_slice(statements);
    p.freeze()
}

/// Decodes a version 5 `Open`; None when a field is missing.
pub fn decode(payload: &[u8]) -> Option<Open<'_>> {
    let mut rest = payload;
    let mut field = || {
        let i = rest.iter().position(|&b| b == 0)?;
        let (f, r) = (&rest[..i], &rest[i + 1..]);
        rest = r;
        Some(f)
    };
    let key = field()?;
    let client = field()?;
    let weight = std::str::from_utf8(field()?).ok()?.parse::<u32>().ok()?;
    let tag = field()?;
    let flags = field()?;
    Some(Open {
        key,
        client,
        weight: weight.clamp(1, 100),
        tag,
        report_admission: flags.contains(&b'a'),
        statements: rest,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_with_binary_statements() {
        let stmts = b"P\0\0\0\x08s\0x\0\0\0";
        let b = encode("tenants/acme", "alice", 3, "dash-1", true, stmts);
        let o = decode(&b).expect("decodes");
        assert_eq!(o.key, b"tenants/acme");
        assert_eq!(o.client, b"alice");
        assert_eq!(o.weight, 3);
        assert_eq!(o.tag, b"dash-1");
        assert!(o.report_admission);
        assert_eq!(o.statements, stmts);
    }

    #[test]
    fn fields_are_cleaned_and_bounded() {
        let long = "é".repeat(100);
        let b = encode("a/b", "bob\0evil", 0, &long, false, b"");
        let o = decode(&b).expect("decodes");
        assert_eq!(o.client, b"bob");
        assert_eq!(o.weight, 1);
        assert!(o.tag.len() <= MAX_NAME && std::str::from_utf8(o.tag).is_ok());
        assert!(!o.report_admission);
    }

    #[test]
    fn truncated_payloads_are_refused() {
        assert!(decode(b"a/b\0alice\0").is_none());
        assert!(
            decode(b"a/b\0alice\0x\0\0\0").is_none(),
            "weight not a number"
        );
    }
}
