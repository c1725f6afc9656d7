//! The router's user table: who may log in, with which SCRAM verifier, and
//! which namespaces (tenants) each user may reach. It is parsed from a
//! simple text format, one `name:password:ns1,ns2` entry per line, where the
//! password is either plaintext (turned into a verifier at once and then
//! dropped) or a PostgreSQL `SCRAM-SHA-256$...` verifier. Nothing in this
//! module ever prints password or key material.

use std::collections::HashMap;
use std::fmt;

use super::scram::Verifier;

/// An error in the user table. It names the line, never its content,
/// since the line holds a password.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("user table line {line}: {reason}")]
pub struct UsersError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// Which namespaces a user may access.
#[derive(Clone, PartialEq, Eq)]
enum Access {
    All,
    Only(Vec<String>),
}

struct Entry {
    verifier: Verifier,
    access: Access,
}

/// The parsed user table.
pub struct Users {
    entries: HashMap<String, Entry>,
}

impl Users {
    /// Parses lines of `name:password:ns1,ns2`. Blank lines and lines
    /// starting with `#` are ignored; the namespace list may be `*`. The
    /// password may itself contain `:`: the name ends at the first colon
    /// and the namespace list starts after the last one. Whitespace around
    /// the name and the namespaces is ignored; the password is taken
    /// verbatim, spaces included.
    pub fn parse(s: &str) -> Result<Users, UsersError> {
        let mut entries = HashMap::new();
        for (idx, text) in s.lines().enumerate() {
            let line = idx + 1;
            let err = |reason| UsersError { line, reason };
            let trimmed = text.trim();
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }
            let (name, rest) = text
                .split_once(':')
                .ok_or(err("expected name:password:namespaces"))?;
            let (password, namespaces) = rest
                .rsplit_once(':')
                .ok_or(err("expected name:password:namespaces"))?;
            let name = name.trim();
            if name.is_empty() {
                return Err(err("empty user name"));
            }
            if name.contains('\0') {
                return Err(err("invalid user name"));
            }
            if password.is_empty() {
                return Err(err("empty password"));
            }
            if entries.contains_key(name) {
                return Err(err("duplicate user"));
            }
            let access = parse_access(namespaces).map_err(err)?;
            let verifier = if password.starts_with("SCRAM-SHA-256$") {
                Verifier::parse(password).map_err(|_| err("invalid scram verifier"))?
            } else if is_md5_hash(password) {
                return Err(err("md5 password hashes are not supported"));
            } else {
                Verifier::from_password(password)
            };
            entries.insert(name.to_owned(), Entry { verifier, access });
        }
        Ok(Users { entries })
    }

    /// The verifier of `user`, or `None` if there is no such user.
    pub fn verifier(&self, user: &str) -> Option<&Verifier> {
        self.entries.get(user).map(|e| &e.verifier)
    }

    /// Whether `user` exists and may access `namespace`.
    pub fn may_access(&self, user: &str, namespace: &str) -> bool {
        match self.entries.get(user).map(|e| &e.access) {
            Some(Access::All) => true,
            Some(Access::Only(list)) => list.iter().any(|ns| ns == namespace),
            None => false,
        }
    }
}

fn parse_access(s: &str) -> Result<Access, &'static str> {
    let s = s.trim();
    if s == "*" {
        return Ok(Access::All);
    }
    let mut list = Vec::new();
    for ns in s.split(',') {
        let ns = ns.trim();
        if ns.is_empty() {
            return Err("empty namespace");
        }
        if ns == "*" {
            return Err("'*' must be the only namespace");
        }
        if !list.iter().any(|n| n == ns) {
            list.push(ns.to_owned());
        }
    }
    Ok(Access::Only(list))
}

/// PostgreSQL's md5 hash format: "md5" followed by 32 hex digits.
fn is_md5_hash(p: &str) -> bool {
    p.len() == 35 && p.starts_with("md5") && p.as_bytes()[3..].iter().all(u8::is_ascii_hexdigit)
}

impl fmt::Debug for Users {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        struct Ns<'a>(&'a Access);
        impl fmt::Debug for Ns<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                match self.0 {
                    Access::All => f.write_str("*"),
                    Access::Only(list) => f.debug_list().entries(list).finish(),
                }
            }
        }
        let mut names: Vec<_> = self.entries.iter().collect();
        names.sort_unstable_by(|a, b| a.0.cmp(b.0));
        f.debug_map()
            .entries(names.into_iter().map(|(n, e)| (n, Ns(&e.access))))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "\
# users of the router
bi:hunter2:tenants-acme,tenants-globex

admin:pa:ss:wo:rd:*
  # indented comment
ro : secret : a , b\r
";

    #[test]
    fn parses_and_answers() {
        let stored = postgres_protocol::password::scram_sha_256(b"v3rifier");
        let table = format!("{TABLE}svc:{stored}:tenants-acme\n");
        let users = Users::parse(&table).expect("parse");
        assert!(users.verifier("bi").is_some());
        assert!(users.verifier("admin").is_some());
        assert!(users.verifier("ro").is_some());
        assert!(users.verifier("svc").is_some());
        assert!(users.verifier("nobody").is_none());
        assert!(users.may_access("bi", "tenants-acme"));
        assert!(users.may_access("bi", "tenants-globex"));
        assert!(!users.may_access("bi", "tenants-initech"));
        assert!(users.may_access("admin", "anything"));
        assert!(users.may_access("ro", "a"));
        assert!(users.may_access("ro", "b"));
        assert!(users.may_access("svc", "tenants-acme"));
        assert!(!users.may_access("nobody", "a"));
        assert!(Users::parse("").expect("empty").verifier("x").is_none());
    }

    #[test]
    fn passwords_work() {
        use super::super::scram::ScramServer;
        use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
        let stored = postgres_protocol::password::scram_sha_256(b"v3rifier");
        let users = Users::parse(&format!("{TABLE}svc:{stored}:*\n")).expect("parse");
        for (user, pw) in [
            ("bi", "hunter2"),
            ("admin", "pa:ss:wo:rd"),
            ("ro", " secret "),
            ("svc", "v3rifier"),
        ] {
            let mut server = ScramServer::new(users.verifier(user));
            let mut client = ScramSha256::new(pw.as_bytes(), ChannelBinding::unsupported());
            let first = server.handle_client_first(client.message()).expect("first");
            client.update(&first).expect("update");
            let fin = server.handle_client_final(client.message()).expect(user);
            client.finish(&fin).expect("finish");
        }
    }

    #[test]
    fn errors_name_the_line_only() {
        for (table, line, reason) in [
            ("bi:hunter2", 1, "expected name:password:namespaces"),
            (
                "# c\n\nbi-no-colon-hunter2",
                3,
                "expected name:password:namespaces",
            ),
            (":hunter2:*", 1, "empty user name"),
            ("bi::*", 1, "empty password"),
            ("bi:hunter2:", 1, "empty namespace"),
            ("bi:hunter2:a,,b", 1, "empty namespace"),
            ("bi:hunter2:a,*", 1, "'*' must be the only namespace"),
            ("bi:hunter2:*\nbi:hunter3:*", 2, "duplicate user"),
            (
                "bi:SCRAM-SHA-256$4096:hunter2$x:y:*",
                1,
                "invalid scram verifier",
            ),
            (
                "bi:md5d41d8cd98f00b204e9800998ecf8427e:*",
                1,
                "md5 password hashes are not supported",
            ),
        ] {
            let err = Users::parse(table).expect_err(table);
            assert_eq!(err, UsersError { line, reason });
            let msg = err.to_string();
            assert!(!msg.contains("hunter"), "{msg}");
        }
    }

    #[test]
    fn debug_hides_secrets() {
        let users = Users::parse(TABLE).expect("parse");
        let dbg = format!("{users:?}");
        assert!(dbg.contains("bi") && dbg.contains("tenants-acme"), "{dbg}");
        for secret in ["hunter2", "pa:ss", "secret"] {
            assert!(!dbg.contains(secret), "{dbg}");
        }
        assert!(!format!("{:?}", users.verifier("bi")).contains("hunter2"));
    }
}
