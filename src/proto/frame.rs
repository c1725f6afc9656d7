//! Frame encoding and decoding for the router-to-shard protocol.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Header size: session (4) + kind (1) + length (4).
pub const HEADER: usize = 9;

/// Largest payload accepted; a peer sending more is cut off.
pub const MAX_PAYLOAD: usize = 64 * 1024 * 1024;

/// The most [`Frame::decode`] reserves ahead of the bytes it has.
const RESERVE_STEP: usize = 256 * 1024;

/// What a frame means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Router: open a session on the source named by the payload.
    Open,
    /// Shard: the session is open; payload holds ParameterStatus messages.
    Opened,
    /// Either way: PostgreSQL protocol messages.
    Messages,
    /// Router: cancel the session's running query.
    Cancel,
    /// Router: the client went away; drop the session.
    Close,
    /// Shard: the session ended; payload holds an ErrorResponse (may be empty).
    Closed,
    /// Router (session 0): are you there? Links of protocol version 2 only.
    Ping,
    /// Shard (session 0): the answer to a Ping.
    Pong,
    /// Either way (protocol version 3): the receiver holds more than its
    /// bound of this session's frames; stop sending the session's frames
    /// (stop reading its client, or its server connection) until `Resume`.
    Pause,
    /// Either way (protocol version 3): send the session's frames again.
    Resume,
    /// Shard (protocol version 5): a NoticeResponse for the client that
    /// says nothing about whether its messages ran (the admission queue's
    /// "still waiting").
    Notice,
    /// Shard (protocol version 5, when the Open asked): the transaction was
    /// admitted after waiting the payload's u64 microseconds.
    Admitted,
    /// Either way (protocol version 6, session 0): a shard let go of a
    /// source and hands it to another shard (see [`super::released`]). A
    /// shard sends it to its routers, a router passes it on to the shard
    /// named in it.
    Released,
}

impl Kind {
    fn byte(self) -> u8 {
        match self {
            Kind::Open => b'O',
            Kind::Opened => b'o',
            Kind::Messages => b'M',
            Kind::Cancel => b'X',
            Kind::Close => b'C',
            Kind::Closed => b'c',
            Kind::Ping => b'P',
            Kind::Pong => b'p',
            Kind::Pause => b'H',
            Kind::Resume => b'R',
            Kind::Notice => b'N',
            Kind::Admitted => b'A',
            Kind::Released => b'D',
        }
    }

    fn from_byte(b: u8) -> Option<Kind> {
        Some(match b {
            b'O' => Kind::Open,
            b'o' => Kind::Opened,
            b'M' => Kind::Messages,
            b'X' => Kind::Cancel,
            b'C' => Kind::Close,
            b'c' => Kind::Closed,
            b'P' => Kind::Ping,
            b'p' => Kind::Pong,
            b'H' => Kind::Pause,
            b'R' => Kind::Resume,
            b'N' => Kind::Notice,
            b'A' => Kind::Admitted,
            b'D' => Kind::Released,
            _ => return None,
        })
    }
}

/// One frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Session the frame belongs to.
    pub session: u32,
    /// What it means.
    pub kind: Kind,
    /// Its bytes.
    pub payload: Bytes,
}

/// A peer sent something that is not a frame.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// Unknown kind byte.
    #[error("unknown frame kind {0:#04x}")]
    Kind(u8),
    /// Payload above [`MAX_PAYLOAD`].
    #[error("frame payload of {0} bytes is too large")]
    TooLarge(usize),
}

impl Frame {
    /// A frame with the given parts.
    pub fn new(session: u32, kind: Kind, payload: impl Into<Bytes>) -> Frame {
        Frame {
            session,
            kind,
            payload: payload.into(),
        }
    }

    /// Appends the encoded frame to `buf`.
    pub fn encode(&self, buf: &mut BytesMut) {
        buf.reserve(HEADER + self.payload.len());
        buf.put_u32(self.session);
        buf.put_u8(self.kind.byte());
        // Payloads are bounded by MAX_PAYLOAD (< u32::MAX) wherever they are built.
        buf.put_u32(u32::try_from(self.payload.len()).unwrap_or(u32::MAX));
        buf.put_slice(&self.payload);
    }

    /// Takes one complete frame off the front of `buf`, if there is one.
    pub fn decode(buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        if buf.len() < HEADER {
            return Ok(None);
        }
        let kind = Kind::from_byte(buf[4]).ok_or(FrameError::Kind(buf[4]))?;
        let len = u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]) as usize;
        if len > MAX_PAYLOAD {
            return Err(FrameError::TooLarge(len));
        }
        if buf.len() < HEADER + len {
            // Room for what is likely to arrive next, not for what the
            // header claims: a peer must send the bytes to make us hold them.
            buf.reserve((HEADER + len - buf.len()).min(RESERVE_STEP));
            return Ok(None);
        }
        let session = buf.get_u32();
        buf.advance(5);
        let payload = buf.split_to(len).freeze();
        Ok(Some(Frame {
            session,
            kind,
            payload,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_partial_input() {
        let mut buf = BytesMut::new();
        Frame::new(7, Kind::Messages, &b"Q\0\0\0\x0dSELECT 1\0"[..]).encode(&mut buf);
        Frame::new(8, Kind::Close, Bytes::new()).encode(&mut buf);
        let whole = buf.clone();
        // Byte by byte: nothing until complete.
        let mut partial = BytesMut::new();
        let mut got = Vec::new();
        for b in whole.iter() {
            partial.put_u8(*b);
            while let Some(f) = Frame::decode(&mut partial).expect("valid") {
                got.push(f);
            }
        }
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].session, 7);
        assert_eq!(got[0].kind, Kind::Messages);
        assert_eq!(&got[0].payload[..1], b"Q");
        assert_eq!(got[1].kind, Kind::Close);
        assert!(partial.is_empty());
    }

    #[test]
    fn garbage_is_an_error() {
        let mut buf = BytesMut::from(&[0, 0, 0, 1, b'?', 0, 0, 0, 0][..]);
        assert_eq!(Frame::decode(&mut buf), Err(FrameError::Kind(b'?')));
        let mut buf = BytesMut::from(&[0, 0, 0, 1, b'M', 0xff, 0xff, 0xff, 0xff][..]);
        assert!(matches!(
            Frame::decode(&mut buf),
            Err(FrameError::TooLarge(_))
        ));
    }

    #[test]
    fn a_header_alone_does_not_reserve_its_claimed_length() {
        let mut buf = BytesMut::new();
        buf.put_u32(1);
        buf.put_u8(b'M');
        buf.put_u32(u32::try_from(MAX_PAYLOAD).unwrap_or(u32::MAX));
        assert_eq!(Frame::decode(&mut buf), Ok(None));
        assert!(
            buf.capacity() <= 2 * RESERVE_STEP,
            "reserved {}",
            buf.capacity()
        );
    }
}
