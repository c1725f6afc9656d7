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

/// Appends an ErrorResponse with severity, SQLSTATE and message.
pub fn put_error(buf: &mut BytesMut, severity: &str, code: &str, message: &str) {
    let start = buf.len();
    buf.put_u8(b'E');
    buf.put_u32(0);
    for (field, value) in [
        (b'S', severity),
        (b'V', severity),
        (b'C', code),
        (b'M', message),
    ] {
        buf.put_u8(field);
        buf.put_slice(value.as_bytes());
        buf.put_u8(0);
    }
    buf.put_u8(0);
    patch_len(buf, start);
}

/// An ErrorResponse as bytes.
pub fn error(severity: &str, code: &str, message: &str) -> Bytes {
    let mut b = BytesMut::new();
    put_error(&mut b, severity, code, message);
    b.freeze()
}

/// Appends ReadyForQuery with the given transaction status.
pub fn put_ready(buf: &mut BytesMut, status: u8) {
    buf.put_u8(b'Z');
    buf.put_u32(5);
    buf.put_u8(status);
}

/// Appends a ParameterStatus message.
pub fn put_parameter(buf: &mut BytesMut, name: &str, value: &str) {
    let start = buf.len();
    buf.put_u8(b'S');
    buf.put_u32(0);
    buf.put_slice(name.as_bytes());
    buf.put_u8(0);
    buf.put_slice(value.as_bytes());
    buf.put_u8(0);
    patch_len(buf, start);
}

fn patch_len(buf: &mut BytesMut, start: usize) {
    let len = u32::try_from(buf.len() - start - 1).unwrap_or(u32::MAX);
    buf[start + 1..start + 5].copy_from_slice(&len.to_be_bytes());
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
