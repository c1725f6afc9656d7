//! End-to-end tests of the router's client-facing handshake: a tiny server
//! on 127.0.0.1 runs `handshake`, then answers simple queries with a single
//! row, and real clients (tokio-postgres, and psql when installed) or raw
//! byte streams talk to it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use shardpool::router::pgwire::codec::{self, CodecError};
use shardpool::router::pgwire::startup::{Handshake, Limits, StartupError, handshake};
use shardpool::router::pgwire::users::Users;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_postgres::{NoTls, SimpleQueryMessage};

const BI_PASSWORD: &str = "correct horse battery";
const SVC_PASSWORD: &str = "from-a-verifier";

/// What the server made of one connection.
#[derive(Debug)]
enum Outcome {
    Session {
        user: String,
        database: String,
        params: Vec<(String, String)>,
    },
    Cancel {
        pid: u32,
        secret: u32,
    },
    Failed(StartupError),
    Panicked,
}

struct Server {
    port: u16,
    outcomes: mpsc::UnboundedReceiver<Outcome>,
}

impl Server {
    async fn start(limits: Limits) -> Server {
        let svc = postgres_protocol::password::scram_sha_256(SVC_PASSWORD.as_bytes());
        let table =
            format!("# test users\nbi:{BI_PASSWORD}:tenants.acme,tenants.globex\nsvc:{svc}:*\n");
        let users = Arc::new(Users::parse(&table).expect("user table"));
        let limits = Arc::new(limits);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("local addr").port();
        let (tx, outcomes) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    continue;
                };
                let (users, limits, tx) = (users.clone(), limits.clone(), tx.clone());
                tokio::spawn(async move {
                    let task = tokio::spawn(serve(sock, users, limits));
                    let outcome = task.await.unwrap_or(Outcome::Panicked);
                    let _ = tx.send(outcome);
                });
            }
        });
        Server { port, outcomes }
    }

    async fn outcome(&mut self) -> Outcome {
        tokio::time::timeout(Duration::from_secs(20), self.outcomes.recv())
            .await
            .expect("server outcome in time")
            .expect("server still running")
    }

    fn config(&self, user: &str, password: &str) -> tokio_postgres::Config {
        let mut c = tokio_postgres::Config::new();
        c.host("127.0.0.1")
            .port(self.port)
            .user(user)
            .password(password)
            .dbname("tenants.acme")
            .application_name("router-it")
            .connect_timeout(Duration::from_secs(10));
        c
    }

    async fn raw(&self) -> TcpStream {
        TcpStream::connect(("127.0.0.1", self.port))
            .await
            .expect("connect")
    }
}

/// Runs the handshake, then plays a one-row database until the client
/// leaves.
async fn serve(mut sock: TcpStream, users: Arc<Users>, limits: Arc<Limits>) -> Outcome {
    let (user, database, params) = match handshake(&mut sock, &users, &limits).await {
        Ok(Handshake::Session {
            user,
            database,
            params,
        }) => (user, database, params),
        Ok(Handshake::Cancel { pid, secret }) => return Outcome::Cancel { pid, secret },
        Err(e) => return Outcome::Failed(e),
    };
    let mut out = BytesMut::new();
    for (k, v) in [
        ("server_version", "15.0"),
        ("server_encoding", "UTF8"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("integer_datetimes", "on"),
        ("standard_conforming_strings", "on"),
    ] {
        codec::parameter_status(&mut out, k, v);
    }
    codec::backend_key_data(&mut out, 4242, 0x5ec2e7);
    codec::ready_for_query(&mut out, b'I');
    loop {
        if sock.write_all(&out).await.is_err() {
            break;
        }
        out.clear();
        match codec::read_message(&mut sock, 1 << 20).await {
            Ok(Some((b'Q', _))) => select_one(&mut out),
            Ok(Some((b'X', _)) | None) | Err(_) => break,
            Ok(Some(_)) => {
                let mut e = codec::PgError::fatal("0A000", "only simple queries are supported");
                e.severity = "ERROR";
                codec::error_response(&mut out, &e);
                codec::ready_for_query(&mut out, b'I');
            }
        }
    }
    Outcome::Session {
        user,
        database,
        params,
    }
}

/// Appends a typed backend message.
fn msg(buf: &mut BytesMut, tag: u8, body: impl FnOnce(&mut BytesMut)) {
    let mut b = BytesMut::new();
    body(&mut b);
    buf.put_u8(tag);
    buf.put_u32(u32::try_from(b.len() + 4).expect("small message"));
    buf.put_slice(&b);
}

/// The response to `SELECT 1`.
fn select_one(out: &mut BytesMut) {
    msg(out, b'T', |b| {
        b.put_i16(1);
        b.put_slice(b"?column?\0");
        b.put_i32(0); // table oid
        b.put_i16(0); // column number
        b.put_i32(23); // int4
        b.put_i16(4);
        b.put_i32(-1);
        b.put_i16(0); // text
    });
    msg(out, b'D', |b| {
        b.put_i16(1);
        b.put_i32(1);
        b.put_slice(b"1");
    });
    msg(out, b'C', |b| b.put_slice(b"SELECT 1\0"));
    codec::ready_for_query(out, b'I');
}

async fn select_one_with(config: &tokio_postgres::Config) -> Result<String, tokio_postgres::Error> {
    let (client, conn) = config.connect(NoTls).await?;
    let conn = tokio::spawn(conn);
    let messages = client.simple_query("SELECT 1").await?;
    let value = messages
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
            _ => None,
        })
        .expect("a row");
    drop(client);
    conn.await.expect("connection task").expect("clean close");
    Ok(value)
}

fn assert_auth_failure(err: &tokio_postgres::Error, user: &str) {
    let db = err.as_db_error().expect("a server error");
    assert_eq!(
        db.code(),
        &tokio_postgres::error::SqlState::INVALID_PASSWORD
    );
    assert_eq!(db.severity(), "FATAL");
    let pattern =
        regex::Regex::new(r#"^password authentication failed for user "([^"]*)"$"#).expect("regex");
    let caps = pattern.captures(db.message()).expect("message pattern");
    assert_eq!(&caps[1], user);
}

/// A StartupMessage carrying `params`.
fn startup_message(params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&196_608u32.to_be_bytes());
    for (k, v) in params {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut packet = u32::try_from(body.len() + 4)
        .expect("small packet")
        .to_be_bytes()
        .to_vec();
    packet.extend_from_slice(&body);
    packet
}

/// A SASLInitialResponse for SCRAM-SHA-256 carrying `data`.
fn sasl_initial(data: &[u8]) -> Vec<u8> {
    let mut body = b"SCRAM-SHA-256\0".to_vec();
    body.extend_from_slice(&u32::try_from(data.len()).expect("small").to_be_bytes());
    body.extend_from_slice(data);
    let mut m = vec![b'p'];
    m.extend_from_slice(&u32::try_from(body.len() + 4).expect("small").to_be_bytes());
    m.extend_from_slice(&body);
    m
}

/// Splits backend output into (type, body) messages.
fn frames(mut buf: &[u8]) -> Vec<(u8, &[u8])> {
    let mut out = Vec::new();
    while let Some((&tag, rest)) = buf.split_first() {
        let (len, rest) = rest.split_first_chunk::<4>().expect("length");
        let len = u32::from_be_bytes(*len) as usize - 4;
        out.push((tag, &rest[..len]));
        buf = &rest[len..];
    }
    out
}

/// Reads whatever the server sends until it closes the connection.
async fn read_to_close(sock: &mut TcpStream) -> Vec<u8> {
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), sock.read_to_end(&mut buf)).await;
    match read {
        Ok(Ok(_)) => {}
        // A reset after the server closed with unread input is fine too.
        Ok(Err(e)) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset),
        Err(_) => panic!("server did not close the connection"),
    }
    buf
}

#[tokio::test]
async fn correct_password_connects_and_queries() {
    let mut server = Server::start(Limits::default()).await;
    let value = select_one_with(&server.config("bi", BI_PASSWORD))
        .await
        .expect("connect and query");
    assert_eq!(value, "1");
    match server.outcome().await {
        Outcome::Session {
            user,
            database,
            params,
        } => {
            assert_eq!(user, "bi");
            assert_eq!(database, "tenants.acme");
            assert!(
                params
                    .iter()
                    .any(|(k, v)| k == "application_name" && v == "router-it"),
                "{params:?}"
            );
            assert!(params.iter().all(|(k, _)| k != "user" && k != "database"));
        }
        other => panic!("unexpected outcome {other:?}"),
    }
}

#[tokio::test]
async fn wrong_password_is_rejected() {
    let mut server = Server::start(Limits::default()).await;
    let err = select_one_with(&server.config("bi", "incorrect horse"))
        .await
        .expect_err("wrong password must fail");
    assert_auth_failure(&err, "bi");
    match server.outcome().await {
        Outcome::Failed(StartupError::Auth { user }) => assert_eq!(user, "bi"),
        other => panic!("unexpected outcome {other:?}"),
    }
}

#[tokio::test]
async fn unknown_user_looks_like_wrong_password() {
    let mut server = Server::start(Limits::default()).await;
    let err = select_one_with(&server.config("mallory", BI_PASSWORD))
        .await
        .expect_err("unknown user must fail");
    assert_auth_failure(&err, "mallory");
    match server.outcome().await {
        Outcome::Failed(StartupError::Auth { user }) => assert_eq!(user, "mallory"),
        other => panic!("unexpected outcome {other:?}"),
    }
}

#[tokio::test]
async fn verifier_password_works() {
    let mut server = Server::start(Limits::default()).await;
    let value = select_one_with(&server.config("svc", SVC_PASSWORD))
        .await
        .expect("connect with a verifier-stored password");
    assert_eq!(value, "1");
    assert!(matches!(server.outcome().await, Outcome::Session { .. }));
    let err = select_one_with(&server.config("svc", "nope"))
        .await
        .expect_err("wrong password must fail");
    assert_auth_failure(&err, "svc");
    assert!(matches!(
        server.outcome().await,
        Outcome::Failed(StartupError::Auth { .. })
    ));
}

#[tokio::test]
async fn garbage_is_rejected_and_server_keeps_serving() {
    let mut server = Server::start(Limits::default()).await;
    let startup = startup_message(&[("user", "bi")]);
    let with_tail = |tail: &[u8]| [&startup[..], tail].concat();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("random bytes", vec![0x9c, 0x3e, 0x51, 0xd7]),
        ("tiny length", vec![0, 0, 0, 3]),
        ("huge length", vec![0xff, 0xff, 0xff, 0xff]),
        ("http", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
        ("protocol 2.0", vec![0, 0, 0, 8, 0, 2, 0, 0]),
        ("protocol 3.2", vec![0, 0, 0, 9, 0, 3, 0, 2, 0]),
        ("truncated", vec![0, 0, 0, 16, 0, 3]),
        (
            "no terminator",
            vec![0, 0, 0, 12, 0, 3, 0, 0, b'u', b's', 0, b'x'],
        ),
        ("no user", startup_message(&[("database", "x")])),
        ("not sasl", with_tail(b"Q\0\0\0\x05\0")),
        ("bad sasl length", with_tail(b"p\0\0\0\x02")),
        ("bad mechanism", with_tail(b"p\0\0\0\x0aPLAIN\0")),
        (
            "channel binding",
            with_tail(&sasl_initial(b"p=tls-server-end-point,,n=,r=abc")),
        ),
        (
            "scram garbage",
            with_tail(&sasl_initial(b"\xff\xfe\0\x01\x02\x03")),
        ),
    ];
    for (name, bytes) in &cases {
        let mut sock = server.raw().await;
        sock.write_all(bytes).await.expect("write");
        sock.shutdown().await.expect("shutdown");
        let reply = read_to_close(&mut sock).await;
        let outcome = server.outcome().await;
        let expected = match (*name, &outcome) {
            ("random bytes" | "huge length" | "http", Outcome::Failed(e)) => {
                matches!(e, StartupError::Codec(CodecError::TooLarge))
            }
            ("tiny length" | "no terminator", Outcome::Failed(e)) => {
                matches!(e, StartupError::Codec(CodecError::Malformed(_)))
            }
            ("protocol 2.0" | "protocol 3.2", Outcome::Failed(e)) => {
                matches!(e, StartupError::Codec(CodecError::UnsupportedProtocol(_)))
            }
            ("truncated", Outcome::Failed(e)) => {
                matches!(e, StartupError::Codec(CodecError::Io(_)))
            }
            ("bad sasl length", Outcome::Failed(e)) => {
                matches!(e, StartupError::Codec(CodecError::Malformed(_)))
            }
            (_, Outcome::Failed(StartupError::Protocol(_))) => true,
            _ => false,
        };
        assert!(expected, "{name}: unexpected outcome {outcome:?}");
        // Whatever the server said last was a FATAL error, except after a
        // truncated packet (the reply may be lost to a reset if the server
        // closed with input still unread).
        if *name == "truncated" {
            assert!(reply.is_empty(), "{name}: {reply:?}");
        } else if !reply.is_empty() {
            let frames = frames(&reply);
            let (tag, body) = frames.last().expect("whole messages");
            assert_eq!(*tag, b'E', "{name}: {reply:?}");
            assert!(body.starts_with(b"SFATAL\0"), "{name}: {reply:?}");
        }
    }
    let value = select_one_with(&server.config("bi", BI_PASSWORD))
        .await
        .expect("server still accepts connections");
    assert_eq!(value, "1");
    assert!(matches!(server.outcome().await, Outcome::Session { .. }));
}

#[tokio::test]
async fn encryption_requests_are_declined_and_cancel_is_passed_on() {
    let mut server = Server::start(Limits::default()).await;
    let ssl = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
    let gss = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30];

    // SSL and GSS requests get 'N' each; a third one is a violation.
    let mut sock = server.raw().await;
    for req in [&ssl, &gss] {
        sock.write_all(req).await.expect("write");
        let mut b = [0u8; 1];
        sock.read_exact(&mut b).await.expect("reply");
        assert_eq!(&b, b"N");
    }
    sock.write_all(&ssl).await.expect("write");
    let reply = read_to_close(&mut sock).await;
    assert_eq!(reply.first(), Some(&b'E'));
    assert!(matches!(
        server.outcome().await,
        Outcome::Failed(StartupError::Protocol(_))
    ));

    // A cancel request after a declined SSL request: no reply at all.
    let mut sock = server.raw().await;
    sock.write_all(&ssl).await.expect("write");
    let mut b = [0u8; 1];
    sock.read_exact(&mut b).await.expect("reply");
    assert_eq!(&b, b"N");
    let mut cancel = vec![0, 0, 0, 16, 0x04, 0xd2, 0x16, 0x2e];
    cancel.extend_from_slice(&77u32.to_be_bytes());
    cancel.extend_from_slice(&0xdead_beefu32.to_be_bytes());
    sock.write_all(&cancel).await.expect("write");
    match server.outcome().await {
        Outcome::Cancel { pid, secret } => assert_eq!((pid, secret), (77, 0xdead_beef)),
        other => panic!("unexpected outcome {other:?}"),
    }
    assert!(read_to_close(&mut sock).await.is_empty());
}

#[tokio::test]
async fn silent_client_is_disconnected_after_timeout() {
    let limits = Limits {
        startup_timeout: Duration::from_millis(300),
        ..Limits::default()
    };
    let mut server = Server::start(limits).await;
    let started = Instant::now();
    let mut sock = server.raw().await;
    let reply = read_to_close(&mut sock).await;
    let elapsed = started.elapsed();
    assert!(reply.is_empty(), "nothing is sent on timeout: {reply:?}");
    assert!(elapsed >= Duration::from_millis(250), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
    assert!(matches!(
        server.outcome().await,
        Outcome::Failed(StartupError::Timeout)
    ));

    // A client that stalls in the middle of authentication is cut off too.
    let mut sock = server.raw().await;
    sock.write_all(&startup_message(&[("user", "bi")]))
        .await
        .expect("write");
    let reply = read_to_close(&mut sock).await;
    assert_eq!(
        reply.first(),
        Some(&b'R'),
        "only the sasl request: {reply:?}"
    );
    assert!(matches!(
        server.outcome().await,
        Outcome::Failed(StartupError::Timeout)
    ));
}

#[tokio::test]
async fn psql_connects_with_sslmode_prefer() {
    let psql_available = std::process::Command::new("psql")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !psql_available {
        eprintln!("psql not on PATH, skipping");
        return;
    }
    let mut server = Server::start(Limits::default()).await;
    let conninfo = format!(
        "host=127.0.0.1 port={} user=bi dbname=tenants.acme sslmode=prefer",
        server.port
    );
    let output = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new("psql")
            .arg(&conninfo)
            .args(["-X", "-Atc", "select 1"])
            .env("PGPASSWORD", BI_PASSWORD)
            .env("PGCONNECT_TIMEOUT", "10")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("psql finished in time")
    .expect("psql ran");
    assert!(
        output.status.success(),
        "psql failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "1");
    match server.outcome().await {
        Outcome::Session { user, database, .. } => {
            assert_eq!((user.as_str(), database.as_str()), ("bi", "tenants.acme"));
        }
        other => panic!("unexpected outcome {other:?}"),
    }

    // And a wrong password is reported by psql with the server's message.
    let output = tokio::process::Command::new("psql")
        .arg(&conninfo)
        .args(["-X", "-Atc", "select 1"])
        .env("PGPASSWORD", "wrong")
        .kill_on_drop(true)
        .output()
        .await
        .expect("psql ran");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("password authentication failed for user \"bi\""),
        "{stderr}"
    );
}
