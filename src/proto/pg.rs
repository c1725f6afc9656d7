//! Just enough of the PostgreSQL message format for passing messages
//! through without decoding them: where one message ends, and the few
//! messages shardpool itself has to write.

use bytes::{BufMut, Bytes, BytesMut};

/// The type and total length (type byte included) of the first complete
/// typed message in `buf`, or None if it is not complete yet. Err for a
/// length below 4, which no valid message has.
pub fn next_message(buf: &[u8]) -> Result<Option<(u8, usize)>, BadLength> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if len < 4 {
        return Err(BadLength(len));
    }
    let total = len + 1;
    if buf.len() < total {
        Ok(None)
    } else {
        Ok(Some((buf[0], total)))
    }
}

/// One complete typed message in a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Message<'a> {
    /// Type byte.
    pub tag: u8,
    /// The whole message: type byte, length and body.
    pub bytes: &'a [u8],
}

impl<'a> Message<'a> {
    /// The body, after the type byte and the length.
    pub fn body(&self) -> &'a [u8] {
        self.bytes.get(5..).unwrap_or_default()
    }

    /// Total length, type byte included.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Never true: a message has at least its type and length.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

/// The complete typed messages at the front of a buffer, in order: the one
/// walk over PostgreSQL messages that every part of shardpool uses. It
/// stops at the first incomplete message, or at an invalid length (then
/// [`Messages::bad`] says so); [`Messages::consumed`] is how many bytes the
/// messages it yielded take.
#[derive(Debug, Clone)]
pub struct Messages<'a> {
    /// What is left.
    rest: &'a [u8],
    /// Bytes yielded so far.
    consumed: usize,
    /// Set when it stopped at an invalid length.
    bad: Option<BadLength>,
}

/// Iterates over the complete messages at the front of `buf`.
pub fn messages(buf: &[u8]) -> Messages<'_> {
    Messages {
        rest: buf,
        consumed: 0,
        bad: None,
    }
}

impl<'a> Messages<'a> {
    /// Bytes of the messages yielded so far.
    pub fn consumed(&self) -> usize {
        self.consumed
    }

    /// The invalid length it stopped at, if any.
    pub fn bad(&self) -> Option<&BadLength> {
        self.bad.as_ref()
    }

    /// The bytes after the messages yielded so far.
    pub fn rest(&self) -> &'a [u8] {
        self.rest
    }
}

impl<'a> Iterator for Messages<'a> {
    type Item = Message<'a>;

    fn next(&mut self) -> Option<Message<'a>> {
        if self.bad.is_some() {
            return None;
        }
        match next_message(self.rest) {
            Ok(Some((tag, n))) => {
                let (bytes, rest) = self.rest.split_at(n);
                self.rest = rest;
                self.consumed += n;
                Some(Message { tag, bytes })
            }
            Ok(None) => None,
            Err(e) => {
                self.bad = Some(e);
                None
            }
        }
    }
}

/// SQLSTATE of a shard's `Closed` frame when nothing of the session ran
/// there (the shard is handing the source over, or does not serve it): the
/// router may send the session to the next owner.
pub const DRAINING: &str = "57P01";

/// Number of sync points (Query, Sync) in a batch of client messages:
/// each one is answered by exactly one ReadyForQuery.
pub fn sync_points(batch: &[u8]) -> usize {
    messages(batch)
        .filter(|m| m.tag == b'Q' || m.tag == b'S')
        .count()
}

/// A message length field below 4.
#[derive(Debug, Clone, Copy, thiserror::Error, PartialEq, Eq)]
#[error("message length {0} is invalid")]
pub struct BadLength(pub usize);

/// Appends one typed backend message whose body `body` writes; the length
/// field is filled in afterwards. Every backend message shardpool builds
/// goes through here.
pub fn put_message(buf: &mut BytesMut, tag: u8, body: impl FnOnce(&mut BytesMut)) {
    buf.put_u8(tag);
    let start = buf.len();
    buf.put_u32(0);
    body(buf);
    // Built from our own bounded data; saturate rather than wrap.
    let len = u32::try_from(buf.len() - start).unwrap_or(u32::MAX);
    buf[start..start + 4].copy_from_slice(&len.to_be_bytes());
}

/// Appends `s` as a C string. Interior NUL bytes cannot be represented on
/// the wire and are dropped.
pub fn put_cstr(buf: &mut BytesMut, s: &str) {
    for part in s.split('\0') {
        buf.put_slice(part.as_bytes());
    }
    buf.put_u8(0);
}

/// Appends an ErrorResponse: severity (S and V), SQLSTATE, message and the
/// optional detail and hint.
pub fn put_error_fields(
    buf: &mut BytesMut,
    severity: &str,
    code: &str,
    message: &str,
    detail: Option<&str>,
    hint: Option<&str>,
) {
    put_message(buf, b'E', |b| {
        for (field, value) in [
            (b'S', Some(severity)),
            (b'V', Some(severity)),
            (b'C', Some(code)),
            (b'M', Some(message)),
            (b'D', detail),
            (b'H', hint),
        ] {
            if let Some(v) = value {
                b.put_u8(field);
                put_cstr(b, v);
            }
        }
        b.put_u8(0);
    });
}

/// Appends a NoticeResponse with severity (NOTICE, WARNING, ...),
/// SQLSTATE and message: the client shows it and carries on.
pub fn put_notice(buf: &mut BytesMut, severity: &str, code: &str, message: &str) {
    put_message(buf, b'N', |b| {
        for (field, value) in [
            (b'S', severity),
            (b'V', severity),
            (b'C', code),
            (b'M', message),
        ] {
            b.put_u8(field);
            put_cstr(b, value);
        }
        b.put_u8(0);
    });
}

/// Appends an ErrorResponse with severity, SQLSTATE and message.
pub fn put_error(buf: &mut BytesMut, severity: &str, code: &str, message: &str) {
    put_error_fields(buf, severity, code, message, None, None);
}

/// An ErrorResponse as bytes.
pub fn error(severity: &str, code: &str, message: &str) -> Bytes {
    let mut b = BytesMut::new();
    put_error(&mut b, severity, code, message);
    b.freeze()
}

/// Appends ReadyForQuery with the given transaction status.
pub fn put_ready(buf: &mut BytesMut, status: u8) {
    put_message(buf, b'Z', |b| b.put_u8(status));
}

/// Appends a ParameterStatus message.
pub fn put_parameter(buf: &mut BytesMut, name: &str, value: &str) {
    put_message(buf, b'S', |b| {
        put_cstr(b, name);
        put_cstr(b, value);
    });
}

/// Whether an ErrorResponse body is FATAL or PANIC (the server closes the
/// connection after it). Reads the non-localized severity when present.
pub fn is_fatal(body: &[u8]) -> bool {
    matches!(
        error_field(body, b'V').or_else(|| error_field(body, b'S')),
        Some("FATAL" | "PANIC")
    )
}

/// The SQLSTATE ('C' field) of an ErrorResponse body, if present.
pub fn error_code(body: &[u8]) -> Option<&str> {
    error_field(body, b'C')
}

/// One field of an ErrorResponse or NoticeResponse body.
pub fn error_field(body: &[u8], field: u8) -> Option<&str> {
    let mut rest = body;
    while let Some((&f, tail)) = rest.split_first() {
        if f == 0 {
            return None;
        }
        let end = tail.iter().position(|&b| b == 0)?;
        if f == field {
            return std::str::from_utf8(&tail[..end]).ok();
        }
        rest = &tail[end + 1..];
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_and_finds_messages() {
        let mut b = BytesMut::new();
        put_error(&mut b, "ERROR", "42P01", "relation \"x\" does not exist");
        put_ready(&mut b, b'I');
        let (t, n) = next_message(&b).expect("valid").expect("complete");
        assert_eq!(t, b'E');
        assert_eq!(error_code(&b[5..n]), Some("42P01"));
        assert_eq!(
            error_field(&b[5..n], b'M'),
            Some("relation \"x\" does not exist")
        );
        let (t2, n2) = next_message(&b[n..]).expect("valid").expect("complete");
        assert_eq!((t2, n2), (b'Z', 6));
        assert_eq!(next_message(&b[..3]), Ok(None));
        assert_eq!(next_message(&[b'Z', 0, 0, 0, 1]), Err(BadLength(1)));
    }

    #[test]
    fn the_message_walk_stops_at_an_incomplete_or_invalid_message() {
        let mut b = BytesMut::new();
        put_error(&mut b, "ERROR", "42P01", "no");
        put_ready(&mut b, b'T');
        let whole = b.len();
        b.extend_from_slice(&[b'D', 0, 0, 0, 9, 1]); // incomplete
        let mut walk = messages(&b);
        let got: Vec<(u8, usize)> = walk.by_ref().map(|m| (m.tag, m.len())).collect();
        assert_eq!(got[1], (b'Z', 6));
        assert_eq!(got.len(), 2);
        assert_eq!(walk.consumed(), whole);
        assert_eq!(walk.rest(), &[b'D', 0, 0, 0, 9, 1]);
        assert!(walk.bad().is_none());
        let ready = messages(&b).nth(1).expect("ReadyForQuery");
        assert_eq!(ready.body(), b"T");
        let mut bad = messages(&[b'Z', 0, 0, 0, 5, b'I', b'Z', 0, 0, 0, 2]);
        assert_eq!(bad.by_ref().count(), 1);
        assert_eq!(bad.bad(), Some(&BadLength(2)));
        assert_eq!(bad.next(), None, "stays stopped");
        assert_eq!(
            sync_points(&[b'Q', 0, 0, 0, 4, b'S', 0, 0, 0, 4, b'H', 0, 0, 0, 4]),
            2
        );
    }
}
