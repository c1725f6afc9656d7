//! Named prepared statements under transaction pooling (as PgBouncer 1.21+
//! does it): a client's statement `S` is prepared on the server under a
//! name derived from its text and parameter types, `sp<hash>`, so identical
//! statements of many clients share one server-side statement. Each server
//! connection remembers which names it has; when a Bind or Describe needs a
//! statement the current connection lacks, the session's Parse is sent
//! first and its ParseComplete is swallowed on the way back.
//!
//! [`Expect`] keeps the responses owed by the server in order, so that the
//! swallowed ones are exactly the injected ones even with pipelining.

use std::collections::{HashMap, HashSet, VecDeque};

use bytes::{BufMut, Bytes, BytesMut};

use crate::proto::pg;

/// A response the server owes, in request order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// ParseComplete of a Parse; `swallow` if the client did not send it.
    Parse {
        /// Injected by the shard.
        swallow: bool,
    },
    /// CloseComplete of a Close the client sent.
    Close,
    /// CloseComplete of a Close the shard injected (dropped on the way back).
    CloseSwallow,
    /// ReadyForQuery of a Sync or simple Query.
    Ready,
}

/// A client's named statements: client name -> (server name, Parse body
/// rewritten to the server name).
#[derive(Debug, Default)]
pub struct Statements {
    by_client_name: HashMap<Bytes, (Bytes, Bytes)>,
}

fn cstr(buf: &[u8]) -> Option<(&[u8], &[u8])> {
    let end = buf.iter().position(|&b| b == 0)?;
    Some((&buf[..end], &buf[end + 1..]))
}

/// The server-side name of a statement: `sp` + 16 hex digits of a stable
/// hash of its query text and parameter types.
pub fn server_name(query_and_types: &[u8]) -> Bytes {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in query_and_types {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    Bytes::from(format!("sp{h:016x}"))
}

fn message(t: u8, body: &[u8], out: &mut BytesMut) {
    out.put_u8(t);
    out.put_u32(u32::try_from(body.len() + 4).unwrap_or(u32::MAX));
    out.put_slice(body);
}

/// Outcome of rewriting one client batch.
#[derive(Debug)]
pub struct Rewritten {
    /// Bytes to send to the server.
    pub bytes: Bytes,
    /// Responses they will produce, in order (append to the session's queue).
    pub expect: Vec<Expect>,
    /// Server statement names this batch prepares on the connection.
    pub prepares: Vec<Bytes>,
}

impl Statements {
    /// Registers the named statements of `parses` (Parse messages the
    /// router carried over) without preparing them anywhere: each is
    /// prepared on a server connection when a Bind or Describe needs it.
    pub fn learn(&mut self, parses: &[u8]) {
        for m in pg::messages(parses) {
            if m.tag != b'P' {
                continue;
            }
            if let Some((name, tail)) = cstr(m.body()).filter(|(n, _)| !n.is_empty()) {
                let (server, sbody) = server_parse(tail);
                self.by_client_name
                    .insert(Bytes::copy_from_slice(name), (server, sbody));
            }
        }
    }
}

/// The server name of a statement and its Parse body under that name.
fn server_parse(tail: &[u8]) -> (Bytes, Bytes) {
    let server = server_name(tail);
    let mut sbody = BytesMut::with_capacity(tail.len() + server.len() + 1);
    sbody.put_slice(&server);
    sbody.put_u8(0);
    sbody.put_slice(tail);
    (server, sbody.freeze())
}

/// Rewrites a client batch for a server connection that has `prepared`.
/// A statement name the client never prepared passes through unchanged, so
/// the server gives its usual error.
pub fn rewrite(batch: &[u8], stmts: &mut Statements, prepared: &HashSet<Bytes>) -> Rewritten {
    let mut out = BytesMut::with_capacity(batch.len() + 64);
    let mut expect = Vec::new();
    let mut prepares: Vec<Bytes> = Vec::new();
    let has =
        |name: &Bytes, prepares: &Vec<Bytes>| prepared.contains(name) || prepares.contains(name);
    let mut walk = pg::messages(batch);
    for m in walk.by_ref() {
        let (t, msg, body) = (m.tag, m.bytes, m.body());
        match t {
            b'P' => {
                let Some((name, tail)) = cstr(body) else {
                    out.put_slice(msg);
                    expect.push(Expect::Parse { swallow: false });
                    continue;
                };
                if name.is_empty() {
                    out.put_slice(msg);
                    expect.push(Expect::Parse { swallow: false });
                    continue;
                }
                let (server, sbody) = server_parse(tail);
                stmts.by_client_name.insert(
                    Bytes::copy_from_slice(name),
                    (server.clone(), sbody.clone()),
                );
                if has(&server, &prepares) {
                    // Already there: close and re-parse keeps the reply a real one.
                    let mut close = BytesMut::new();
                    close.put_u8(b'S');
                    close.put_slice(&server);
                    close.put_u8(0);
                    message(b'C', &close, &mut out);
                    // The client sent a Parse, not a Close: swallow the CloseComplete.
                    expect.push(Expect::CloseSwallow);
                }
                message(b'P', &sbody, &mut out);
                expect.push(Expect::Parse { swallow: false });
                prepares.push(server);
            }
            b'B' | b'D' => {
                // Bind: portal\0 statement\0 ...; Describe: 'S' statement\0 or 'P' portal\0.
                let (prefix, stmt, tail) = if t == b'B' {
                    match cstr(body)
                        .and_then(|(portal, r)| cstr(r).map(|(s, tail)| (portal, s, tail)))
                    {
                        Some((portal, s, tail)) => (Some(portal), s, tail),
                        None => {
                            out.put_slice(msg);
                            continue;
                        }
                    }
                } else if body.first() == Some(&b'S') {
                    match cstr(&body[1..]) {
                        Some((s, tail)) => (None, s, tail),
                        None => {
                            out.put_slice(msg);
                            continue;
                        }
                    }
                } else {
                    out.put_slice(msg);
                    continue;
                };
                let Some((server, sbody)) = (!stmt.is_empty())
                    .then(|| stmts.by_client_name.get(stmt))
                    .flatten()
                    .cloned()
                else {
                    out.put_slice(msg);
                    continue;
                };
                if !has(&server, &prepares) {
                    message(b'P', &sbody, &mut out);
                    expect.push(Expect::Parse { swallow: true });
                    prepares.push(server.clone());
                }
                let mut nbody = BytesMut::with_capacity(body.len() + 24);
                match prefix {
                    Some(portal) => {
                        nbody.put_slice(portal);
                        nbody.put_u8(0);
                    }
                    None => nbody.put_u8(b'S'),
                }
                nbody.put_slice(&server);
                nbody.put_u8(0);
                nbody.put_slice(tail);
                message(t, &nbody, &mut out);
            }
            b'C' => {
                // Close 'S' name: the client forgets it; the shared server
                // statement stays for the other sessions. Answer it ourselves
                // by closing a name that does not exist (a real CloseComplete).
                if body.first() == Some(&b'S') {
                    if let Some((name, _)) = cstr(&body[1..]) {
                        if !name.is_empty() && stmts.by_client_name.remove(name).is_some() {
                            let mut close = BytesMut::new();
                            close.put_u8(b'S');
                            close.put_slice(b"shardpool_never_prepared");
                            close.put_u8(0);
                            message(b'C', &close, &mut out);
                            expect.push(Expect::Close);
                            continue;
                        }
                    }
                }
                out.put_slice(msg);
                expect.push(Expect::Close);
            }
            b'S' | b'Q' => {
                out.put_slice(msg);
                expect.push(Expect::Ready);
            }
            _ => out.put_slice(msg),
        }
    }
    // Anything after the last complete message (there should be nothing).
    out.put_slice(walk.rest());
    Rewritten {
        bytes: out.freeze(),
        expect,
        prepares,
    }
}

/// Filters a chunk of server messages against the owed responses: drops
/// the swallowed ones and pops what was answered. Returns the bytes for
/// the client (the input itself when nothing was dropped).
pub fn filter(chunk: Bytes, owed: &mut VecDeque<Expect>) -> Bytes {
    let mut drop_ranges: Vec<(usize, usize)> = Vec::new();
    let mut walk = pg::messages(&chunk);
    loop {
        let pos = walk.consumed();
        let Some(m) = walk.next() else { break };
        let n = m.len();
        match m.tag {
            b'1' => {
                // Pop up to the Parse this answers.
                while let Some(e) = owed.pop_front() {
                    if let Expect::Parse { swallow } = e {
                        if swallow {
                            drop_ranges.push((pos, pos + n));
                        }
                        break;
                    }
                }
            }
            b'3' => {
                while let Some(e) = owed.pop_front() {
                    match e {
                        Expect::Close => break,
                        Expect::CloseSwallow => {
                            drop_ranges.push((pos, pos + n));
                            break;
                        }
                        _ => {}
                    }
                }
            }
            b'Z' => {
                // Everything up to the Sync is answered (or skipped by an error).
                while let Some(e) = owed.pop_front() {
                    if e == Expect::Ready {
                        break;
                    }
                }
            }
            _ => {}
        }
    }
    if drop_ranges.is_empty() {
        return chunk;
    }
    let mut out = BytesMut::with_capacity(chunk.len());
    let mut at = 0;
    for (a, b) in drop_ranges {
        out.put_slice(&chunk[at..a]);
        at = b;
    }
    out.put_slice(&chunk[at..]);
    out.freeze()
}

/// Whether a batch touches statements at all (else it passes unchanged and
/// only its sync points are owed).
pub fn needs_rewrite(batch: &[u8]) -> bool {
    pg::messages(batch).any(|m| matches!(m.tag, b'P' | b'B' | b'D' | b'C'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(t: u8, body: &[u8]) -> Vec<u8> {
        let mut b = BytesMut::new();
        message(t, body, &mut b);
        b.to_vec()
    }

    fn parse(name: &str, q: &str) -> Vec<u8> {
        msg(b'P', format!("{name}\0{q}\0\0\0").as_bytes())
    }

    fn bind(stmt: &str) -> Vec<u8> {
        msg(b'B', format!("\0{stmt}\0\0\0\0\0\0\0").as_bytes())
    }

    fn types(bytes: &[u8]) -> Vec<u8> {
        pg::messages(bytes).map(|m| m.tag).collect()
    }

    #[test]
    fn named_statement_is_renamed_and_reinjected_on_another_connection() {
        let mut stmts = Statements::default();
        let first: Vec<u8> = [
            parse("S_1", "select 1"),
            bind("S_1"),
            msg(b'E', b"\0\0\0\0\0"),
            msg(b'S', b""),
        ]
        .concat();
        let r = rewrite(&first, &mut stmts, &HashSet::new());
        assert_eq!(types(&r.bytes), b"PBES");
        assert!(
            !r.bytes.windows(3).any(|w| w == b"S_1"),
            "client name leaked to the server"
        );
        assert_eq!(r.prepares.len(), 1);
        // Next transaction on a connection that lacks the statement.
        let second: Vec<u8> = [bind("S_1"), msg(b'E', b"\0\0\0\0\0"), msg(b'S', b"")].concat();
        let r2 = rewrite(&second, &mut stmts, &HashSet::new());
        assert_eq!(types(&r2.bytes), b"PBES");
        assert_eq!(
            r2.expect,
            vec![Expect::Parse { swallow: true }, Expect::Ready]
        );
        // On a connection that has it: nothing injected.
        let have: HashSet<Bytes> = r.prepares.into_iter().collect();
        let r3 = rewrite(&second, &mut stmts, &have);
        assert_eq!(types(&r3.bytes), b"BES");
    }

    #[test]
    fn injected_parse_complete_is_swallowed_in_order() {
        let mut owed: VecDeque<Expect> = [
            Expect::Parse { swallow: false },
            Expect::Ready,
            Expect::Parse { swallow: true },
            Expect::Ready,
        ]
        .into();
        let mut chunk = BytesMut::new();
        chunk.extend_from_slice(&msg(b'1', b""));
        chunk.extend_from_slice(&msg(b'Z', b"I"));
        chunk.extend_from_slice(&msg(b'1', b""));
        chunk.extend_from_slice(&msg(b'2', b""));
        chunk.extend_from_slice(&msg(b'Z', b"I"));
        let out = filter(chunk.freeze(), &mut owed);
        assert_eq!(types(&out), b"1Z2Z");
        assert!(owed.is_empty());
    }

    #[test]
    fn identical_statements_share_a_server_name() {
        assert_eq!(
            server_name(b"select 1\0\0\0"),
            server_name(b"select 1\0\0\0")
        );
        assert_ne!(
            server_name(b"select 1\0\0\0"),
            server_name(b"select 2\0\0\0")
        );
    }

    #[test]
    fn statements_carried_over_are_prepared_when_a_bind_needs_them() {
        // A session that moved here: the router sent its Parse with Open.
        let mut stmts = Statements::default();
        stmts.learn(&[parse("S_1", "select 1"), parse("", "select 2")].concat());
        let batch: Vec<u8> = [bind("S_1"), msg(b'E', b"\0\0\0\0\0"), msg(b'S', b"")].concat();
        let r = rewrite(&batch, &mut stmts, &HashSet::new());
        assert_eq!(types(&r.bytes), b"PBES", "the Parse is injected first");
        assert_eq!(r.expect.first(), Some(&Expect::Parse { swallow: true }));
        // A name it never learnt passes through for the server's own error.
        let mut none = Statements::default();
        none.learn(&[parse("", "select 2")].concat());
        let r = rewrite(&batch, &mut none, &HashSet::new());
        assert_eq!(types(&r.bytes), b"BES");
    }
}
