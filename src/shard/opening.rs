//! Sources being claimed and built, owned by the shard's main loop.
//!
//! A sync pass only queues the sources it finds to open; at most
//! [`OPEN_CONCURRENCY`] are claimed and built at once (each is two API
//! round trips: the claim, the password Secret), and each serves as soon
//! as it is built. The next one started is a source a client is already
//! waiting for (the router asked this shard for it), else the oldest
//! queued. Before, a pass claimed its whole batch and only then looked at
//! the DataSources again, so a source released while a batch of a hundred
//! was being claimed waited for all of them: 5-7 s per moved source in a
//! rescale under load.
//!
//! No locking: the main loop owns it and polls [`Opening::next_done`]
//! beside its other events.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;

use super::handover::Step;
use super::registry::{Registry, Source};
use super::sources::{SyncContext, open_one};
use crate::crd::DataSource;

/// Sources claimed and built at once.
pub const OPEN_CONCURRENCY: usize = 16;

/// What opening one source gave: its key, the generation it was built
/// at, and the source (None: not claimed, decide again).
pub type Opened = (String, i64, Result<Option<Source>, String>);

/// One source to open: key, DataSource, and what to do.
pub type ToOpen = (String, Arc<DataSource>, Step);

/// The queue and the sources being opened now.
#[derive(Default)]
pub struct Opening<'a> {
    /// Waiting, oldest first; replaced by every full pass.
    queue: VecDeque<ToOpen>,
    /// Keys in `queue` (a pass over one source asks this, not the queue).
    queued: HashSet<String>,
    /// Being claimed or built.
    running: FuturesUnordered<BoxFuture<'a, Opened>>,
    /// Keys in `running` (a pass does not queue them again).
    in_progress: HashSet<String>,
    /// Sources assigned here that another live shard still serves: decided
    /// again every few seconds and whenever a Lease changes, since that
    /// shard's Lease may expire with no change to the DataSource.
    awaiting: HashSet<String>,
}

impl<'a> Opening<'a> {
    /// Replaces the queue by what a sync pass found to open, less what is
    /// being opened already.
    pub fn plan(&mut self, to_open: Vec<ToOpen>) {
        self.queue = to_open
            .into_iter()
            .filter(|(k, _, _)| !self.in_progress.contains(k))
            .collect();
        self.queued = self.queue.iter().map(|(k, _, _)| k.clone()).collect();
    }

    /// Queues one source (a pass that looked at it alone), or replaces its
    /// queued entry with the newer DataSource; one being opened is left
    /// (it is decided again when its opening ends).
    pub fn upsert(&mut self, job: ToOpen) {
        if self.in_progress.contains(&job.0) {
            return;
        }
        if self.queued.contains(&job.0) {
            if let Some(queued) = self.queue.iter_mut().find(|(k, _, _)| *k == job.0) {
                *queued = job;
            }
        } else {
            self.queued.insert(job.0.clone());
            self.queue.push_back(job);
        }
    }

    /// Takes a source off the queue (no longer to be opened here).
    pub fn forget(&mut self, key: &str) {
        if self.queued.remove(key) {
            self.queue.retain(|(k, _, _)| k != key);
        }
    }

    /// Whether a source is queued or being opened.
    pub fn has(&self, key: &str) -> bool {
        self.queued.contains(key) || self.in_progress.contains(key)
    }

    /// Records whether a source waits for another shard's release.
    pub fn set_awaiting(&mut self, key: &str, waits: bool) {
        if waits {
            if !self.awaiting.contains(key) {
                self.awaiting.insert(key.to_string());
            }
        } else {
            self.awaiting.remove(key);
        }
    }

    /// Forgets every waiting source (a full pass finds them again).
    pub fn clear_awaiting(&mut self) {
        self.awaiting.clear();
    }

    /// The sources waiting for another shard's release.
    pub fn awaiting(&self) -> impl Iterator<Item = &String> {
        self.awaiting.iter()
    }

    /// Starts queued sources while fewer than [`OPEN_CONCURRENCY`] run,
    /// demanded ones first.
    pub fn refill(&mut self, cx: &'a SyncContext<'a>, registry: &Registry) {
        self.start_with(
            |(k, ds, step)| Box::pin(open_one(cx, k, ds, step)),
            |k| registry.demanded(k),
        );
    }

    /// [`Opening::refill`] with the job and the demand test given.
    fn start_with(
        &mut self,
        start: impl Fn(ToOpen) -> BoxFuture<'a, Opened>,
        demanded: impl Fn(&str) -> bool,
    ) {
        while self.running.len() < OPEN_CONCURRENCY {
            let i = self
                .queue
                .iter()
                .position(|(k, _, _)| demanded(k))
                .unwrap_or(0);
            let Some(job) = self.queue.remove(i) else {
                return;
            };
            self.queued.remove(&job.0);
            self.in_progress.insert(job.0.clone());
            self.running.push(start(job));
        }
    }

    /// The next source done (cancel safe; pending forever while idle, so
    /// that a `select!` branch on it stays quiet).
    pub async fn next_done(&mut self) -> Opened {
        loop {
            if let Some(done) = self.running.next().await {
                self.in_progress.remove(&done.0);
                return done;
            }
            std::future::pending::<()>().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn job(k: &str) -> ToOpen {
        let ds: DataSource = serde_json::from_value(serde_json::json!({
            "apiVersion": "shardpool.dev/v1alpha1",
            "kind": "DataSource",
            "metadata": {"name": k, "namespace": "t"},
            "spec": {"host": "h", "database": "d", "user": "u",
                     "passwordSecretRef": {"name": "s", "key": "k"}},
        }))
        .expect("a DataSource");
        (format!("t/{k}"), Arc::new(ds), Step::ClaimAndOpen)
    }

    #[tokio::test]
    async fn demanded_sources_start_first_and_at_most_the_bound_run() {
        let started = Arc::new(Mutex::new(Vec::new()));
        let start = |(k, _, _): ToOpen| -> BoxFuture<'static, Opened> {
            started.lock().expect("lock").push(k.clone());
            Box::pin(async move { (k, 1, Ok(None)) })
        };
        let mut o = Opening::default();
        o.plan((0..40).map(|i| job(&format!("s{i}"))).collect());
        o.start_with(start, |k| k == "t/s30" || k == "t/s35");
        {
            let s = started.lock().expect("lock");
            assert_eq!(s.len(), OPEN_CONCURRENCY);
            assert_eq!(s[0], "t/s30", "a source a client waits for goes first");
            assert_eq!(s[1], "t/s35");
            assert_eq!(s[2], "t/s0", "then the oldest queued");
        }
        // A pass that finds the running ones again does not queue them twice.
        o.plan((0..40).map(|i| job(&format!("s{i}"))).collect());
        assert_eq!(o.queue.len(), 40 - OPEN_CONCURRENCY);
        // One done: its slot goes to the next queued source.
        let done = o.next_done().await;
        assert!(!o.in_progress.contains(&done.0));
        o.start_with(start, |_| false);
        assert_eq!(started.lock().expect("lock").len(), OPEN_CONCURRENCY + 1);
        assert_eq!(o.running.len(), OPEN_CONCURRENCY);
    }

    #[test]
    fn one_source_at_a_time_is_queued_replaced_and_taken_off() {
        let mut o = Opening::default();
        o.upsert(job("a"));
        o.upsert(job("b"));
        o.upsert(job("a"));
        assert_eq!(o.queue.len(), 2, "queued once");
        assert_eq!(o.queue[0].0, "t/a", "keeps its place");
        o.forget("t/a");
        o.forget("t/zz");
        assert_eq!(
            o.queue.iter().map(|j| j.0.as_str()).collect::<Vec<_>>(),
            ["t/b"]
        );
        assert!(!o.queued.contains("t/a"));
        // One being opened is not queued again.
        o.in_progress.insert("t/c".into());
        o.upsert(job("c"));
        assert_eq!(o.queue.len(), 1);
        // A full pass replaces the queue and its index.
        o.plan(vec![job("d")]);
        assert_eq!(o.queued.iter().collect::<Vec<_>>(), ["t/d"]);
        o.upsert(job("d"));
        assert_eq!(o.queue.len(), 1);
    }

    #[test]
    fn sources_waiting_for_a_release_are_remembered_until_decided_otherwise() {
        let mut o = Opening::default();
        o.set_awaiting("t/a", true);
        o.set_awaiting("t/b", true);
        o.set_awaiting("t/a", false);
        assert_eq!(o.awaiting().collect::<Vec<_>>(), ["t/b"]);
        o.clear_awaiting();
        assert_eq!(o.awaiting().count(), 0);
    }
}
