//! The client's named prepared statements, kept by the router so that a
//! session that moves to another shard process (a handover, a rollout, a
//! re-route after an orphaned pod) takes them along: the new shard learns
//! them with the session's `Open` (link protocol version 4) and prepares
//! each on a server connection when a Bind or Describe needs it. Drivers
//! such as pgx cache statements per connection and would otherwise get
//! "prepared statement does not exist" (26000) after every move.
//!
//! Bounded: past [`MAX_BYTES`] of Parse messages new statements are not
//! kept (they work until the session moves; after a move they are unknown,
//! as without this).

use std::collections::HashMap;

use bytes::{Bytes, BytesMut};

use crate::proto::pg::Message;

/// Most bytes of Parse messages kept per session.
pub const MAX_BYTES: usize = 4 << 20;

/// Named statements of one client session. Owned by its session task.
#[derive(Debug, Default)]
pub struct Named {
    /// Statement name -> the client's Parse message.
    by_name: HashMap<Bytes, Bytes>,
    /// Summed length of the kept Parse messages.
    bytes: usize,
    /// The encoded form, rebuilt only after a change.
    encoded: Option<Bytes>,
}

fn name_of(body: &[u8]) -> Option<&[u8]> {
    let end = body.iter().position(|&b| b == 0)?;
    Some(&body[..end])
}

impl Named {
    /// Follows one message the client sent: a named Parse is kept (a new
    /// one under an existing name replaces it), a Close of a statement
    /// forgets it. Hot path: one tag compare for every other message.
    pub fn observe(&mut self, m: &Message<'_>) {
        match m.tag {
            b'P' => {
                let Some(name) = name_of(m.body()).filter(|n| !n.is_empty()) else {
                    return;
                };
                let old = self.by_name.get(name).map_or(0, Bytes::len);
                if self.bytes - old + m.bytes.len() > MAX_BYTES {
                    return;
                }
                self.bytes = self.bytes - old + m.bytes.len();
                self.by_name.insert(
                    Bytes::copy_from_slice(name),
                    Bytes::copy_from_slice(m.bytes),
                );
                self.encoded = None;
            }
            b'C' if m.body().first() == Some(&b'S') => {
                let Some(name) = m.body().get(1..).and_then(name_of) else {
                    return;
                };
                if let Some(old) = self.by_name.remove(name) {
                    self.bytes -= old.len();
                    self.encoded = None;
                }
            }
            _ => {}
        }
    }

    /// Every kept Parse message, one after the other (empty when none).
    pub fn encoded(&mut self) -> &Bytes {
        self.encoded.get_or_insert_with(|| {
            let mut out = BytesMut::with_capacity(self.bytes);
            for parse in self.by_name.values() {
                out.extend_from_slice(parse);
            }
            out.freeze()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::pg;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![tag];
        m.extend_from_slice(&u32::try_from(body.len() + 4).expect("small").to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    fn feed(n: &mut Named, bytes: &[u8]) {
        for m in pg::messages(bytes) {
            n.observe(&m);
        }
    }

    #[test]
    fn named_parses_are_kept_and_closes_forget_them() {
        let mut n = Named::default();
        let mut batch = msg(b'P', b"s1\0SELECT 1\0\0\0");
        batch.extend(msg(b'P', b"\0SELECT 2\0\0\0")); // unnamed: not kept
        batch.extend(msg(b'P', b"s2\0SELECT 3\0\0\0"));
        batch.extend(msg(b'S', b""));
        feed(&mut n, &batch);
        let kept: Vec<_> = pg::messages(n.encoded())
            .map(|m| m.bytes.to_vec())
            .collect();
        assert_eq!(kept.len(), 2);
        assert!(kept.contains(&msg(b'P', b"s1\0SELECT 1\0\0\0")));
        feed(&mut n, &msg(b'C', b"Ss1\0"));
        feed(&mut n, &msg(b'C', b"Pportal\0")); // a portal: nothing to forget
        let kept: Vec<_> = pg::messages(n.encoded())
            .map(|m| m.bytes.to_vec())
            .collect();
        assert_eq!(kept, vec![msg(b'P', b"s2\0SELECT 3\0\0\0")]);
    }

    #[test]
    fn the_kept_bytes_are_bounded() {
        let mut n = Named::default();
        let big = vec![b'x'; 1 << 20];
        for i in 0..8 {
            let mut body = format!("s{i}\0").into_bytes();
            body.extend_from_slice(&big);
            body.extend_from_slice(b"\0\0\0");
            feed(&mut n, &msg(b'P', &body));
        }
        assert!(n.encoded().len() <= MAX_BYTES);
        assert_eq!(pg::messages(n.encoded()).count(), 3);
    }
}
