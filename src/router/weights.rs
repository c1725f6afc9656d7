//! Admission weights of client identities, from the router's auth Secret
//! (key `weights`, lines `identity=weight`). A source's owning shard lets
//! waiting transactions in round-robin over client identities; a client
//! of weight 3 gets three turns for every one of a client of weight 1
//! while both have transactions waiting. Unlisted identities weigh 1.

use std::collections::HashMap;

/// Highest weight: one client gets at most this many turns per turn of a
/// weight-1 client.
pub const MAX_WEIGHT: u32 = 100;

/// The parsed table.
#[derive(Debug, Default, Clone)]
pub struct Weights(HashMap<String, u32>);

impl Weights {
    /// Parses lines `identity=weight`; blank lines and `#` comments are
    /// ignored. Errors name the line.
    pub fn parse(s: &str) -> Result<Weights, String> {
        let mut map = HashMap::new();
        for (i, line) in s.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let n = i + 1;
            let (id, w) = line
                .rsplit_once('=')
                .ok_or(format!("line {n}: expected identity=weight"))?;
            let id = id.trim();
            if id.is_empty() {
                return Err(format!("line {n}: empty identity"));
            }
            let w: u32 = w
                .trim()
                .parse()
                .map_err(|_| format!("line {n}: weight is not a whole number"))?;
            if !(1..=MAX_WEIGHT).contains(&w) {
                return Err(format!("line {n}: weight must be 1-{MAX_WEIGHT}"));
            }
            if map.insert(id.to_string(), w).is_some() {
                return Err(format!("line {n}: duplicate identity {id}"));
            }
        }
        Ok(Weights(map))
    }

    /// The weight of `identity` (1 when unlisted).
    pub fn of(&self, identity: &str) -> u32 {
        self.0.get(identity).copied().unwrap_or(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_defaults() {
        let w = Weights::parse("# BI backends\nalice=3\n bob = 1 \n\n").expect("parses");
        assert_eq!(w.of("alice"), 3);
        assert_eq!(w.of("bob"), 1);
        assert_eq!(w.of("carol"), 1);
    }

    #[test]
    fn bad_lines_are_named() {
        for (text, msg) in [
            ("alice", "line 1: expected identity=weight"),
            ("ok=1\n=2", "line 2: empty identity"),
            ("a=x", "line 1: weight is not a whole number"),
            ("a=0", "line 1: weight must be 1-100"),
            ("a=101", "line 1: weight must be 1-100"),
            ("a=1\na=2", "line 2: duplicate identity a"),
        ] {
            assert_eq!(Weights::parse(text).err().as_deref(), Some(msg), "{text}");
        }
    }
}
