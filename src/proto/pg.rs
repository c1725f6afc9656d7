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

/// A message length field below 4.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
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
}
