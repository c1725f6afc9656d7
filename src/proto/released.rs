//! The `Released` note's payload (protocol version 6):
//!
//! ```text
//! key NUL from NUL to
//! ```
//!
//! `key` is the source (`namespace/name`), `from` the shard that let go of
//! it (decimal), `to` the shard it is assigned to now (decimal). The shard
//! `from` sends it only once no server connection of the source is open or
//! opening on it: from then on `to` may open the source at once. The same
//! news reaches `to` later through the API server (the `servingShard`
//! hand-over write), which stays the record; the note only saves the wait.

use bytes::{BufMut, Bytes, BytesMut};

/// Longest key carried (a namespace and a name of at most 253 bytes each).
pub const MAX_KEY: usize = 512;

/// What a `Released` note says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Released {
    /// `namespace/name`.
    pub key: String,
    /// The shard that let go of the source.
    pub from: u32,
    /// The shard the source is handed to.
    pub to: u32,
}

/// Encodes a note.
pub fn encode(key: &str, from: u32, to: u32) -> Bytes {
    let (from, to) = (from.to_string(), to.to_string());
    let mut p = BytesMut::with_capacity(key.len() + from.len() + to.len() + 2);
    p.put_slice(key.as_bytes());
    p.put_u8(0);
    p.put_slice(from.as_bytes());
    p.put_u8(0);
    p.put_slice(to.as_bytes());
    p.freeze()
}

/// Decodes a note; None when it is not one (a field missing or not a
/// number, a key that is empty, too long, not UTF-8 or without a `/`).
pub fn decode(payload: &[u8]) -> Option<Released> {
    let mut fields = payload.split(|&b| b == 0);
    let key = std::str::from_utf8(fields.next()?).ok()?;
    let number = |f: Option<&[u8]>| -> Option<u32> { std::str::from_utf8(f?).ok()?.parse().ok() };
    let from = number(fields.next())?;
    let to = number(fields.next())?;
    if fields.next().is_some() || key.len() > MAX_KEY || !key.contains('/') {
        return None;
    }
    Some(Released {
        key: key.to_string(),
        from,
        to,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_note_round_trips() {
        let p = encode("team-a/orders", 3, 8);
        assert_eq!(&p[..], b"team-a/orders\x003\x008");
        assert_eq!(
            decode(&p),
            Some(Released {
                key: "team-a/orders".into(),
                from: 3,
                to: 8
            })
        );
    }

    #[test]
    fn anything_else_is_not_a_note() {
        for bad in [
            &b""[..],
            b"team-a/orders",
            b"team-a/orders\x003",
            b"team-a/orders\x003\x00x",
            b"team-a/orders\x00-1\x008",
            b"team-a/orders\x003\x008\x009",
            b"orders\x003\x008",
            b"\xff/x\x003\x008",
        ] {
            assert_eq!(decode(bad), None, "{bad:?}");
        }
        let long = format!("{}/x", "n".repeat(MAX_KEY));
        assert_eq!(decode(&encode(&long, 1, 2)), None);
    }
}
