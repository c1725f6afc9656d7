//! Passes shards' `Released` notes on (link protocol version 6): a shard
//! that let go of a moved source tells its routers which shard it handed
//! the source to; this task notes the move in the routing table (so held
//! sessions go to the new shard before the watch shows the assignment)
//! and passes the note to that shard over its link, so it opens the source
//! without waiting for the API server to carry the release (see
//! `shard::released`). Every router does so: the next owner hears the note
//! once per router, and acts on the first.

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc;

use super::Router;
use crate::proto::released;

/// Runs until the links are gone (the process ends).
pub async fn run(router: Arc<Router>, mut notes: mpsc::Receiver<Bytes>) {
    while let Some(payload) = notes.recv().await {
        let Some(note) = released::decode(&payload) else {
            tracing::warn!("malformed release note from a shard; dropped");
            continue;
        };
        router.routes.moves.note(&note.key, note.from, note.to);
        router.metrics.relayed.inc();
        let addr = match router.routes.shard_addr(note.to) {
            Ok(addr) => addr,
            Err(e) => {
                tracing::debug!(source = %note.key, to = note.to, error = %e, "release note not passed on");
                continue;
            }
        };
        // A link the held sessions need anyway; connecting it (rarely
        // needed) does not hold up the next notes.
        let router = router.clone();
        tokio::spawn(async move {
            let passed = match router.links.get(addr, note.to).await {
                Ok(link) => link.relay(payload),
                Err(_) => false,
            };
            if !passed {
                tracing::debug!(source = %note.key, to = note.to, "release note not passed on: no version 6 link");
            }
        });
    }
}
