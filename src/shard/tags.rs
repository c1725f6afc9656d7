//! Cost attribution by query tag. A transaction's tag is the one its first
//! statement carries as a leading SQL comment, `/* shardpool:tag=dash-42 */`,
//! or else its session's (the client's application_name, or the HTTP
//! request's `tag`). Per source and tag the shard counts transactions, the
//! time they held a server connection, and the rows the server returned.
//! Untagged transactions are not counted here (the source's own series
//! count everything). At most [`TAGS_PER_SOURCE`] tags per source get
//! series of their own, the busiest (see [`TopN`]); the rest count as
//! `other`.
//!
//! Lock discipline: `book` is a std Mutex taken once per tagged
//! transaction, when it ends; never across an await. Hot path: an
//! untagged transaction costs the comment check (a few byte compares) and
//! nothing else.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::topn::{OTHER, TopN};

/// Most tags per source with series of their own.
pub const TAGS_PER_SOURCE: usize = 20;

/// Longest tag kept (longer ones are cut).
pub const MAX_TAG: usize = 64;

const PREFIX: &[u8] = b"/* shardpool:tag=";

/// The tag a leading SQL comment gives the batch `payload` (its first
/// message, when it is a Query or a Parse). Tags are letters, digits and
/// `._:-`; anything else ends the tag.
pub fn comment_tag(payload: &[u8]) -> Option<Arc<str>> {
    let (&kind, rest) = payload.split_first()?;
    let body = rest.get(4..)?;
    let sql = match kind {
        b'Q' => body,
        // Parse: statement name, NUL, then the query.
        b'P' => {
            let nul = body.iter().position(|&b| b == 0)?;
            body.get(nul + 1..)?
        }
        _ => return None,
    };
    let start = sql.iter().position(|b| !b.is_ascii_whitespace())?;
    let tail = sql.get(start..)?.strip_prefix(PREFIX)?;
    let len = tail
        .iter()
        .take(MAX_TAG)
        .take_while(|&&b| b.is_ascii_alphanumeric() || b"._:-".contains(&b))
        .count();
    if len == 0 {
        return None;
    }
    std::str::from_utf8(&tail[..len]).ok().map(Arc::from)
}

/// A session's tag from its application_name or HTTP `tag`: cut to
/// [`MAX_TAG`] bytes at a character boundary; None when empty.
pub fn session_tag(name: &str) -> Option<Arc<str>> {
    let name = name.trim();
    if name.is_empty() {
        return None;
    }
    let mut end = name.len().min(MAX_TAG);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    Some(Arc::from(&name[..end]))
}

/// What one tag cost.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Cost {
    /// Transactions.
    pub transactions: u64,
    /// Time they held a server connection.
    pub server_time: Duration,
    /// DataRow messages the server sent them.
    pub rows: u64,
}

/// A source's costs by tag.
#[derive(Debug, Default)]
pub struct TagCosts {
    /// Who is labelled, and the costs; see the lock discipline.
    book: Mutex<Book>,
}

#[derive(Debug)]
struct Book {
    top: TopN,
    costs: HashMap<Arc<str>, Cost>,
}

impl Default for Book {
    fn default() -> Self {
        Book {
            top: TopN::new(TAGS_PER_SOURCE),
            costs: HashMap::new(),
        }
    }
}

impl TagCosts {
    /// Adds one transaction's cost under `tag`.
    pub fn record(&self, tag: &Arc<str>, server_time: Duration, rows: u64) {
        let mut book = self.book.lock().unwrap_or_else(|p| p.into_inner());
        let seen = book.top.see(tag);
        if let Some(gone) = seen.evicted {
            book.costs.remove(&gone);
        }
        let key = if seen.labelled {
            tag.clone()
        } else {
            Arc::from(OTHER)
        };
        let c = book.costs.entry(key).or_default();
        c.transactions += 1;
        c.server_time += server_time;
        c.rows += rows;
    }

    /// The costs by label, sorted by label.
    pub fn snapshot(&self) -> Vec<(Arc<str>, Cost)> {
        let book = self.book.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<_> = book.costs.iter().map(|(k, c)| (k.clone(), *c)).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }
}

/// One transaction's running cost, recorded under its tag when dropped
/// (when the connection goes back to the pool or is discarded).
#[derive(Debug)]
pub struct Charge {
    /// Where it is recorded.
    pub costs: Arc<TagCosts>,
    /// The transaction's tag.
    pub tag: Arc<str>,
    /// When it took its connection.
    pub since: Instant,
    /// Rows returned so far.
    pub rows: u64,
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.costs
            .record(&self.tag, self.since.elapsed(), self.rows);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(sql: &str) -> Vec<u8> {
        let mut b = vec![b'Q'];
        b.extend_from_slice(&((sql.len() + 5) as u32).to_be_bytes());
        b.extend_from_slice(sql.as_bytes());
        b.push(0);
        b
    }

    #[test]
    fn leading_comments_tag_queries_and_parses() {
        let t = comment_tag(&query("  /* shardpool:tag=dashboard-42 */ select 1"));
        assert_eq!(t.as_deref(), Some("dashboard-42"));
        let mut parse = vec![b'P', 0, 0, 0, 0];
        parse.extend_from_slice(b"s1\0/* shardpool:tag=etl.nightly */select 2\0\0\0");
        assert_eq!(comment_tag(&parse).as_deref(), Some("etl.nightly"));
        assert_eq!(
            comment_tag(&query("select 1 /* shardpool:tag=late */")),
            None
        );
        assert_eq!(comment_tag(&query("/* other comment */ select 1")), None);
        assert_eq!(comment_tag(&query("/* shardpool:tag= */")), None);
        assert_eq!(comment_tag(b"B\0\0\0\x04"), None);
        assert_eq!(comment_tag(b"Q"), None);
        let long = format!("/* shardpool:tag={} */", "x".repeat(100));
        assert_eq!(comment_tag(&query(&long)).map(|t| t.len()), Some(MAX_TAG));
    }

    #[test]
    fn session_tags_are_bounded() {
        assert_eq!(session_tag("  "), None);
        assert_eq!(session_tag("psql").as_deref(), Some("psql"));
        let t = session_tag(&"é".repeat(100)).expect("tag");
        assert!(t.len() <= MAX_TAG);
    }

    #[test]
    fn costs_add_up_per_tag_with_the_rest_as_other() {
        let c = TagCosts::default();
        let ms = Duration::from_millis;
        for i in 0..TAGS_PER_SOURCE {
            c.record(&Arc::from(format!("t{i:02}")), ms(10), 2);
        }
        c.record(&Arc::from("t00"), ms(5), 1);
        c.record(&Arc::from("late"), ms(1), 7);
        let snap = c.snapshot();
        let get = |k: &str| snap.iter().find(|(t, _)| &**t == k).map(|(_, c)| *c);
        assert_eq!(
            get("t00"),
            Some(Cost {
                transactions: 2,
                server_time: ms(15),
                rows: 3
            })
        );
        assert_eq!(get(OTHER).map(|c| c.rows), Some(7));
        assert_eq!(snap.len(), TAGS_PER_SOURCE + 1);
    }
}
