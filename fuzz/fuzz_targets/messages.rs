//! Everything that parses protocol bytes after the startup phase, fed
//! arbitrary input: client message framing (router), the batch rewrite of
//! named prepared statements (shard), the router<->shard frame decoder,
//! and the backend-message readers (shard's response filter, HTTP API's
//! result reader, error field lookups). None may panic.
#![no_main]

use std::collections::{HashSet, VecDeque};

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use shardpool::proto::frame::Frame;
use shardpool::proto::pg;
use shardpool::router::http::{Outcome, absorb};
use shardpool::shard::prepared::{self, Expect, Statements};

fuzz_target!(|data: &[u8]| {
    // Client side: framing, then the shard's rewrite of the batch.
    let mut walk = pg::messages(data);
    for m in walk.by_ref() {
        let _ = m.body();
    }
    assert!(walk.consumed() + walk.rest().len() == data.len());
    let _ = pg::sync_points(data);
    if prepared::needs_rewrite(data) {
        let mut stmts = Statements::default();
        let r = prepared::rewrite(data, &mut stmts, &HashSet::new());
        // The server's answers to a rewritten batch, filtered by what the
        // rewrite said it owes.
        let mut owed: VecDeque<Expect> = r.expect.into_iter().collect();
        let _ = prepared::filter(Bytes::copy_from_slice(data), &mut owed);
    }

    // Router <-> shard frames.
    let mut buf = BytesMut::from(data);
    while let Ok(Some(_)) = Frame::decode(&mut buf) {}

    // Backend side: the HTTP API's reader and error field lookups.
    let mut out = Outcome::default();
    let _ = absorb(&mut out, data);
    let _ = pg::error_code(data);
    let _ = pg::error_field(data, b'M');
});
