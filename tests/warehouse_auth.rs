//! How a shard authenticates to a warehouse (no Kubernetes): it never
//! sends a password in a form the source does not allow, and it binds
//! SCRAM to the TLS connection whenever it can. A fake server shows what
//! reaches the wire when a server (or a man in the middle) asks for a
//! cleartext or MD5 password; a real PostgreSQL shows that the allowed
//! legacy methods work over TLS only, and that SCRAM-SHA-256-PLUS is used
//! and accepted over TLS.

mod support;

use std::time::Duration;

use shardpool::crd::TlsMode;
use shardpool::shard::server::{AuthMethod, ConnectError, ConnectParams, ServerConn};
use shardpool::shard::tls::TlsSettings;
use support::TestPg;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

fn params(port: u16, user: &str, tls: TlsSettings, legacy: bool) -> ConnectParams {
    ConnectParams {
        host: "127.0.0.1".into(),
        port,
        database: "postgres".into(),
        user: user.into(),
        application_name: "shardpool-auth-test".into(),
        statement_timeout: None,
        tls,
        legacy_password_auth: legacy,
    }
}

/// A fake warehouse on a loopback port: reads the startup message, sends
/// `request` (an Authentication message), then records every byte the
/// client sends until it closes the connection (or 3 s pass).
async fn fake_server(request: Vec<u8>) -> (u16, tokio::task::JoinHandle<Vec<u8>>) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = l.local_addr().expect("addr").port();
    let task = tokio::spawn(async move {
        let (mut s, _) = l.accept().await.expect("accept");
        let len = s.read_u32().await.expect("startup length") as usize;
        let mut startup = vec![0; len - 4];
        s.read_exact(&mut startup).await.expect("startup");
        s.write_all(&request).await.expect("send request");
        let mut after = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut after)).await;
        after
    });
    (port, task)
}

fn auth_request(code: u32, extra: &[u8]) -> Vec<u8> {
    let mut m = vec![b'R'];
    m.extend_from_slice(&(8 + extra.len() as u32).to_be_bytes());
    m.extend_from_slice(&code.to_be_bytes());
    m.extend_from_slice(extra);
    m
}

async fn against_fake(request: Vec<u8>, legacy: bool) -> (ConnectError, Vec<u8>) {
    let (port, server) = fake_server(request).await;
    let p = params(port, "bi", TlsSettings::default(), legacy);
    let err = ServerConn::connect(&p, "s3cret-Pa55word")
        .await
        .expect_err("the connection must fail");
    let sent = server.await.expect("fake server");
    (err, sent)
}

#[tokio::test]
async fn a_cleartext_password_request_is_refused_and_nothing_is_sent() {
    for legacy in [false, true] {
        let (err, sent) = against_fake(auth_request(3, &[]), legacy).await;
        let msg = err.to_string();
        assert!(
            matches!(err, ConnectError::InsecureAuth(_)),
            "legacy={legacy}: {msg}"
        );
        assert!(
            msg.contains("cleartext") && msg.contains("nothing was sent"),
            "{msg}"
        );
        if legacy {
            assert!(msg.contains("without TLS"), "{msg}");
        } else {
            assert!(msg.contains("allowLegacyPasswordAuth"), "{msg}");
        }
        assert_eq!(err.sqlstate(), "28000");
        assert!(
            !sent.contains(&b'p'),
            "legacy={legacy}: the client sent a password message: {sent:?}"
        );
        assert!(
            !String::from_utf8_lossy(&sent).contains("s3cret"),
            "the password reached the wire"
        );
    }
}

#[tokio::test]
async fn an_md5_password_request_is_refused_and_nothing_is_sent() {
    for legacy in [false, true] {
        let (err, sent) = against_fake(auth_request(5, &[1, 2, 3, 4]), legacy).await;
        let msg = err.to_string();
        assert!(
            matches!(err, ConnectError::InsecureAuth(_)),
            "legacy={legacy}: {msg}"
        );
        assert!(msg.contains("MD5"), "{msg}");
        assert!(
            !sent.contains(&b'p'),
            "legacy={legacy}: the client sent a password message: {sent:?}"
        );
    }
}

fn require() -> TlsSettings {
    TlsSettings::new(TlsMode::Require, None).expect("require")
}

#[tokio::test]
async fn legacy_methods_work_only_when_allowed_and_over_tls() {
    let pg = TestPg::start_tls("auth-legacy");
    pg.psql(
        "postgres",
        "CREATE ROLE clear_user LOGIN PASSWORD 'clear-Pw-1'",
    );
    pg.psql(
        "postgres",
        "SET password_encryption = 'md5'; CREATE ROLE md5_user LOGIN PASSWORD 'md5-Pw-1'",
    );
    pg.hba_first("host all md5_user 127.0.0.1/32 md5");
    pg.hba_first("host all clear_user 127.0.0.1/32 password");

    for (user, pw, method) in [
        ("clear_user", "clear-Pw-1", AuthMethod::Cleartext),
        ("md5_user", "md5-Pw-1", AuthMethod::Md5),
    ] {
        // Allowed, over TLS: works.
        let conn = ServerConn::connect(&params(pg.port, user, require(), true), pw)
            .await
            .unwrap_or_else(|e| panic!("{user} allowed over TLS: {e}"));
        assert!(conn.is_tls());
        assert_eq!(conn.auth, method, "{user}");
        // Not allowed: refused, even over TLS.
        let err = ServerConn::connect(&params(pg.port, user, require(), false), pw)
            .await
            .expect_err("not allowed");
        assert!(
            matches!(err, ConnectError::InsecureAuth(_)),
            "{user}: {err}"
        );
        // Allowed, but plain TCP: refused.
        let err = ServerConn::connect(&params(pg.port, user, TlsSettings::default(), true), pw)
            .await
            .expect_err("no TLS");
        assert!(err.to_string().contains("without TLS"), "{user}: {err}");
    }
}

#[tokio::test]
async fn scram_is_bound_to_the_tls_connection_when_the_server_offers_it() {
    let pg = TestPg::start_tls("auth-plus");
    // Over TLS: SCRAM-SHA-256-PLUS, and the server accepted the binding
    // (a wrong certificate hash fails the exchange).
    let conn = ServerConn::connect(&params(pg.port, &pg.user, require(), false), &pg.password)
        .await
        .expect("SCRAM over TLS");
    assert!(conn.is_tls());
    assert_eq!(conn.auth, AuthMethod::ScramPlus);
    // Plain TCP: SCRAM-SHA-256 without binding.
    let conn = ServerConn::connect(
        &params(pg.port, &pg.user, TlsSettings::default(), false),
        &pg.password,
    )
    .await
    .expect("SCRAM over TCP");
    assert!(!conn.is_tls());
    assert_eq!(conn.auth, AuthMethod::Scram);
    // A wrong password still fails (the binding does not weaken the check).
    let err = ServerConn::connect(&params(pg.port, &pg.user, require(), false), "wrong")
        .await
        .expect_err("wrong password");
    assert_eq!(err.sqlstate(), "28P01", "{err}");
}
