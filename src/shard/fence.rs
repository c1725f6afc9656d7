//! Fencing by the database (DESIGN guarantee 2). Lease fencing alone cannot
//! stop a process that is frozen, partitioned or orphaned: it never runs
//! the code that would fence it. So before a shard process opens the first
//! server connection of a source, it asks the warehouse to end every
//! backend of that source that another shard process opened, and waits
//! until they are gone.
//!
//! Every server connection names its source and its process in
//! `application_name`: `shardpool/<ns>/<name>/<shard>/<token>`, the token
//! being random per process. The first connection of a pool (it is the
//! fencing connection, then the pool's first member) runs
//! `pg_terminate_backend` on every backend whose application_name starts
//! with the source's prefix and is not its own, which PostgreSQL allows for
//! backends of the same role. PostgreSQL keeps at most 63 bytes of
//! application_name, so a name that does not fit is shortened, with a hash
//! of the full `<ns>/<name>` keeping it unique.

use std::time::Duration;

use sha2::{Digest, Sha256};

use super::server::{QueryError, ServerConn};

/// Longest application_name PostgreSQL keeps (NAMEDATALEN - 1).
pub const MAX_APPLICATION_NAME: usize = 63;

/// How a process's server connections of one source name themselves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The full application_name of this process's connections.
    pub application_name: String,
    /// What every shard process's connections of the source start with.
    pub prefix: String,
}

/// Room kept after the prefix for `<shard>/<token>`: a shard index of up
/// to five digits and the six-character token. The prefix depends on the
/// source only, never on the shard, so every shard computes the same one.
const OWNER_ROOM: usize = 5 + 1 + 6;

/// The identity of `shard`'s connections to `ns/name` in the process with
/// this `token`.
pub fn identity(ns: &str, name: &str, shard: u32, token: &str) -> Identity {
    let owner = format!("{shard}/{token}");
    let prefix = format!("shardpool/{ns}/{name}/");
    if prefix.len() + OWNER_ROOM <= MAX_APPLICATION_NAME {
        return Identity {
            application_name: format!("{prefix}{owner}"),
            prefix,
        };
    }
    // Too long: keep the start of `ns/name` readable, make it unique with a
    // hash of the whole.
    let digest = Sha256::digest(format!("{ns}/{name}").as_bytes());
    let hash: String = digest.iter().take(6).map(|b| format!("{b:02x}")).collect();
    let room =
        MAX_APPLICATION_NAME.saturating_sub("shardpool/".len() + 1 + hash.len() + 1 + OWNER_ROOM);
    let whole = format!("{ns}/{name}");
    let mut cut = room.min(whole.len());
    while !whole.is_char_boundary(cut) {
        cut -= 1;
    }
    let prefix = format!("shardpool/{}~{hash}/", &whole[..cut]);
    Identity {
        application_name: format!("{prefix}{owner}"),
        prefix,
    }
}

/// A random token naming this process in its connections (6 characters
/// of [a-z0-9]).
pub fn process_token() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    (0..6)
        .map(|_| char::from(ALPHABET[rand::random_range(0..ALPHABET.len())]))
        .collect()
}

/// Why fencing did not complete; the source's pool does not open.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FenceError {
    /// The warehouse refused (permission, or no pg_terminate_backend).
    #[error(
        "the warehouse refused to end the previous owner's connections ({code}: {message}); let the role signal its own backends, or set spec.fencing to Disabled"
    )]
    Refused {
        /// SQLSTATE
        code: String,
        /// server's message
        message: String,
    },
    /// Terminated backends were still there when the wait ended.
    #[error("{0} connection(s) of a previous owner still open after {1:?}")]
    Lingering(usize, Duration),
    /// The fencing connection failed.
    #[error("fencing connection failed: {0}")]
    Io(String),
}

/// The application_name of a process's first connection while it fences:
/// `shardpool-fencing/...`, which no source's pattern (and so no other
/// fencer, and no check for two owners) matches. PostgreSQL truncates it
/// to 63 bytes, which is harmless: it is set to the pool's name afterwards.
pub fn fencing_name(application_name: &str) -> String {
    let rest = application_name
        .strip_prefix("shardpool/")
        .unwrap_or(application_name);
    let mut name = format!("shardpool-fencing/{rest}");
    while name.len() > MAX_APPLICATION_NAME {
        name.pop();
    }
    name
}

/// Quotes a string as an SQL literal (standard_conforming_strings).
pub fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// The WHERE clause matching other processes' backends of the source.
fn others(id: &Identity) -> String {
    format!(
        "pid <> pg_backend_pid() AND substr(application_name, 1, {}) = {} AND application_name <> {}",
        id.prefix.chars().count(),
        literal(&id.prefix),
        literal(&id.application_name)
    )
}

fn fail(e: QueryError) -> FenceError {
    match e {
        QueryError::Server { code, message } => FenceError::Refused { code, message },
        QueryError::Io(e) => FenceError::Io(e.to_string()),
    }
}

/// Ends every backend of the source opened by another shard process and
/// waits (up to `wait`) until pg_stat_activity shows none. Runs on `conn`,
/// this process's first connection of the source. Returns how many were
/// ended.
pub async fn fence(
    conn: &mut ServerConn,
    id: &Identity,
    wait: Duration,
) -> Result<usize, FenceError> {
    let filter = others(id);
    let ended = conn
        .query(&format!(
            "SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity WHERE {filter}"
        ))
        .await
        .map_err(fail)?
        .len();
    if ended == 0 {
        // Nothing to wait for (a clean handover: the predecessor closed
        // its connections before it let go): one round trip less for
        // every source's first connection.
        return Ok(0);
    }
    let count = format!("SELECT count(*) FROM pg_stat_activity WHERE {filter}");
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let rows = conn.query(&count).await.map_err(fail)?;
        let left = rows
            .first()
            .and_then(|r| r.first().cloned().flatten())
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(0);
        if left == 0 {
            return Ok(ended);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(FenceError::Lingering(left, wait));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names_are_spelled_out() {
        let id = identity("tenants", "acme", 3, "k2x9aa");
        assert_eq!(id.application_name, "shardpool/tenants/acme/3/k2x9aa");
        assert_eq!(id.prefix, "shardpool/tenants/acme/");
        assert!(id.application_name.starts_with(&id.prefix));
    }

    #[test]
    fn long_names_fit_and_stay_unique() {
        let ns = "customer-namespace-with-a-long-name";
        let a = identity(ns, "warehouse-of-the-first-customer", 12, "abcdef");
        let b = identity(ns, "warehouse-of-the-first-customer-2", 12, "abcdef");
        for id in [&a, &b] {
            assert!(id.application_name.len() <= MAX_APPLICATION_NAME, "{id:?}");
            assert!(id.application_name.starts_with(&id.prefix));
            assert!(id.application_name.ends_with("/12/abcdef"));
        }
        assert_ne!(a.prefix, b.prefix, "two sources, one prefix");
        // Another process of the same source, on any shard, shares the prefix.
        let c = identity(ns, "warehouse-of-the-first-customer", 4, "zzzzzz");
        assert_eq!(a.prefix, c.prefix);
        assert_ne!(a.application_name, c.application_name);
        let d = identity(ns, "warehouse-of-the-first-customer", 99_999, "zzzzzz");
        assert_eq!(a.prefix, d.prefix);
        assert!(d.application_name.len() <= MAX_APPLICATION_NAME, "{d:?}");
        // Near the limit, short and long shard indices agree too.
        for name in [
            "n234567890123456789012345678901234",
            "n2345678901234567890123456789012345678",
        ] {
            let p1 = identity("tenants", name, 1, "aaaaaa").prefix;
            let p2 = identity("tenants", name, 12345, "aaaaaa").prefix;
            assert_eq!(p1, p2, "{name}");
        }
    }

    #[test]
    fn a_source_is_not_the_prefix_of_another() {
        // `acme` must not match `acme2`'s connections: the prefix ends in '/'.
        let a = identity("t", "acme", 0, "aaaaaa");
        let b = identity("t", "acme2", 0, "bbbbbb");
        assert!(!b.application_name.starts_with(&a.prefix));
    }

    #[test]
    fn tokens_are_short_and_vary() {
        let a = process_token();
        assert_eq!(a.len(), 6);
        assert!(
            a.bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        );
        assert!((0..20).any(|_| process_token() != a));
    }

    #[test]
    fn the_filter_quotes_names() {
        let id = identity("t", "o'brien", 0, "aaaaaa");
        let f = others(&id);
        assert!(f.contains("'shardpool/t/o''brien/'"), "{f}");
        assert!(f.contains("pid <> pg_backend_pid()"));
    }

    #[test]
    fn the_fencing_name_matches_no_source_pattern() {
        let id = identity("tenants", "acme", 3, "k2x9aa");
        let f = fencing_name(&id.application_name);
        assert_eq!(f, "shardpool-fencing/tenants/acme/3/k2x9aa");
        assert!(!f.starts_with(&id.prefix));
        let long = identity(&"n".repeat(60), "x", 1, "abcdef");
        let f = fencing_name(&long.application_name);
        assert!(f.len() <= MAX_APPLICATION_NAME && !f.starts_with("shardpool/"));
    }
}
