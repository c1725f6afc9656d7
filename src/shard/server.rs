//! One server connection to a warehouse, spoken to in raw PostgreSQL
//! protocol so that client messages pass through unchanged. Connecting does
//! the startup and authentication and records the server's parameters and
//! cancel key.
//!
//! Authentication is SCRAM-SHA-256 (postgres-protocol), with channel
//! binding (SCRAM-SHA-256-PLUS, `tls-server-end-point`) whenever the
//! connection is TLS and the server offers it, so that a man in the middle
//! that terminates TLS cannot relay the exchange. A server that asks for
//! the password in cleartext or as an MD5 hash gets nothing unless the
//! source allows it (`spec.allowLegacyPasswordAuth`) and the connection is
//! encrypted: a downgrade by a man in the middle is refused before a byte
//! of the password leaves.

use std::time::Instant;

use bytes::{Buf, BytesMut};
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::message::{backend, frontend};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::scram::{self, Binding, Exchange, KeyCache};
use super::tls::{self, ServerStream, TlsSettings};
use crate::proto::pg;

/// Where and as whom to connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectParams {
    /// Warehouse host.
    pub host: String,
    /// Warehouse port.
    pub port: u16,
    /// Database.
    pub database: String,
    /// Login role.
    pub user: String,
    /// `shardpool/<ns>/<name>/<shard>`: makes every connection traceable in
    /// pg_stat_activity.
    pub application_name: String,
    /// Server-side statement_timeout, in PostgreSQL syntax (e.g. `30s`).
    pub statement_timeout: Option<String>,
    /// TLS mode and configuration.
    pub tls: TlsSettings,
    /// Answer a cleartext or MD5 password request (on TLS connections
    /// only); refused otherwise.
    pub legacy_password_auth: bool,
}

/// How a connection authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    /// The server asked for nothing (trust).
    None,
    /// The password in cleartext (allowed by the source, over TLS).
    Cleartext,
    /// An MD5 hash of the password (allowed by the source, over TLS).
    Md5,
    /// SCRAM-SHA-256 without channel binding.
    Scram,
    /// SCRAM-SHA-256-PLUS: bound to the TLS connection.
    ScramPlus,
}

/// Why a connection could not be opened. Messages never hold the password.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// TCP or I/O failure.
    #[error("connect to {addr}: {source}")]
    Io {
        /// host:port
        addr: String,
        /// cause
        source: std::io::Error,
    },
    /// The server refused, with its SQLSTATE and message.
    #[error("server error {code}: {message}")]
    Server {
        /// SQLSTATE
        code: String,
        /// server's message
        message: String,
    },
    /// The server asked for something this client does not do.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// The server broke the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// connectTimeout elapsed.
    #[error("connect timed out")]
    Timeout,
    /// TLS could not be set up as the source's tls mode requires.
    #[error("tls to {addr}: {source}")]
    Tls {
        /// host:port
        addr: String,
        /// cause
        source: tls::TlsError,
    },
    /// The shard's Lease claim may have lapsed: it opens no connection.
    #[error("not opening connections: this shard's Lease is not renewed")]
    NoLease,
    /// The source is being closed on this shard.
    #[error("the source is closing on this shard")]
    Closed,
    /// Earlier owners' connections could not be ended first.
    #[error("fencing: {0}")]
    Fence(super::fence::FenceError),
    /// The server asked for the password in a form this source does not
    /// allow; nothing was sent.
    #[error("{0}")]
    InsecureAuth(String),
}

impl ConnectError {
    /// The SQLSTATE a client gets when this keeps a query from running:
    /// the server's own for its refusals (57P03 while it starts up, 28P01
    /// for a bad password, ...), class 08 for connection failures.
    pub fn sqlstate(&self) -> &str {
        match self {
            ConnectError::Server { code, .. } if !code.is_empty() => code,
            ConnectError::Io { .. }
            | ConnectError::Timeout
            | ConnectError::Tls { .. }
            | ConnectError::Server { .. } => "08001",
            ConnectError::Unsupported(_) | ConnectError::Fence(_) => "08004",
            ConnectError::Protocol(_) => "08P01",
            ConnectError::NoLease | ConnectError::Closed => "57P01",
            ConnectError::InsecureAuth(_) => "28000",
        }
    }
}

/// The ReadyForQuery messages of one chunk of server messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ready {
    /// How many the chunk holds (each answers one Query or Sync).
    pub count: usize,
    /// The transaction status of the last one ('I', 'T' or 'E'); 'I' when
    /// there is none.
    pub last_status: u8,
    /// DataRow messages in the chunk (rows returned, for cost attribution).
    pub rows: u64,
}

impl Default for Ready {
    fn default() -> Self {
        Ready {
            count: 0,
            last_status: b'I',
            rows: 0,
        }
    }
}

/// An open, idle-or-busy server connection.
#[derive(Debug)]
pub struct ServerConn {
    stream: ServerStream,
    /// Bytes read from the server not yet handed out.
    rbuf: BytesMut,
    /// Cancel key sent by the server (BackendKeyData).
    pub backend_pid: i32,
    /// Cancel secret sent by the server.
    pub backend_secret: i32,
    /// ParameterStatus values as of the end of startup.
    pub params: Vec<(String, String)>,
    /// When it was opened.
    pub created: Instant,
    /// When the pool renews it (maxLifetime less a random part of it, set
    /// by the pool that opened it; None: kept until it breaks).
    pub retire_at: Option<Instant>,
    /// Set when its state is unknown (I/O error, abandoned mid-transaction):
    /// the pool discards it instead of reusing it.
    pub broken: bool,
    /// Server-side names of the statements prepared on it.
    pub prepared: std::collections::HashSet<bytes::Bytes>,
    /// How it authenticated.
    pub auth: AuthMethod,
}

impl ServerConn {
    /// Opens and authenticates a connection; the caller bounds the time.
    pub async fn connect(p: &ConnectParams, password: &str) -> Result<ServerConn, ConnectError> {
        Self::connect_with_keys(p, password, &KeyCache::default()).await
    }

    /// [`ServerConn::connect`], with the source's SCRAM keys kept in `keys`
    /// (derived once per password, salt and count; see [`super::scram`]).
    pub async fn connect_with_keys(
        p: &ConnectParams,
        password: &str,
        keys: &KeyCache,
    ) -> Result<ServerConn, ConnectError> {
        let addr = format!("{}:{}", p.host, p.port);
        let io = |source| ConnectError::Io {
            addr: addr.clone(),
            source,
        };
        let stream = TcpStream::connect((p.host.as_str(), p.port))
            .await
            .map_err(io)?;
        stream.set_nodelay(true).map_err(io)?;
        // A warehouse that vanishes without a word (host gone, network cut)
        // is noticed on idle connections within 25-30 s. The first probe
        // comes after 10-15 s, at random per connection: the connections a
        // warm-up or a handover opens in one burst would otherwise probe in
        // one burst every 10 s for as long as they live, and a burst larger
        // than a CPU's input queue (net.core.netdev_max_backlog, 1,000 by
        // default; loopback goes through it) loses probes: three lost in a
        // row end a healthy connection (thousands a minute at 72,000
        // connections on one host, see bench/scale.sh).
        let keepalive = socket2::TcpKeepalive::new()
            .with_time(keepalive_time())
            .with_interval(std::time::Duration::from_secs(5))
            .with_retries(3);
        socket2::SockRef::from(&stream)
            .set_tcp_keepalive(&keepalive)
            .map_err(io)?;
        let stream = tls::negotiate(stream, &p.host, &p.tls)
            .await
            .map_err(|source| ConnectError::Tls {
                addr: addr.clone(),
                source,
            })?;
        let mut conn = ServerConn {
            stream,
            rbuf: BytesMut::with_capacity(8192),
            backend_pid: 0,
            backend_secret: 0,
            params: Vec::new(),
            created: Instant::now(),
            retire_at: None,
            broken: false,
            prepared: Default::default(),
            auth: AuthMethod::None,
        };
        let mut out = BytesMut::new();
        let mut startup: Vec<(&str, &str)> = vec![
            ("user", p.user.as_str()),
            ("database", p.database.as_str()),
            ("application_name", p.application_name.as_str()),
            ("client_encoding", "UTF8"),
        ];
        let options;
        if let Some(t) = &p.statement_timeout {
            options = format!("-c statement_timeout={t}");
            startup.push(("options", options.as_str()));
        }
        frontend::startup_message(startup, &mut out).map_err(io)?;
        conn.stream.write_all(&out).await.map_err(io)?;
        conn.authenticate(&p.user, password, p.legacy_password_auth, keys)
            .await
            .map_err(|e| match e {
                ConnectError::Io { source, .. } => io(source),
                other => other,
            })?;
        Ok(conn)
    }

    async fn read_backend(&mut self) -> Result<backend::Message, ConnectError> {
        loop {
            let parsed = backend::Message::parse(&mut self.rbuf)
                .map_err(|e| ConnectError::Protocol(e.to_string()))?;
            if let Some(m) = parsed {
                return Ok(m);
            }
            let n = self
                .stream
                .read_buf(&mut self.rbuf)
                .await
                .map_err(|source| ConnectError::Io {
                    addr: String::new(),
                    source,
                })?;
            if n == 0 {
                return Err(ConnectError::Protocol(
                    "server closed the connection during startup".into(),
                ));
            }
        }
    }

    async fn send(&mut self, out: &BytesMut) -> Result<(), ConnectError> {
        self.stream
            .write_all(out)
            .await
            .map_err(|source| ConnectError::Io {
                addr: String::new(),
                source,
            })
    }

    /// Refuses a cleartext or MD5 request unless the source allows it and
    /// the connection is encrypted.
    fn legacy_allowed(&self, what: &str, allowed: bool) -> Result<(), ConnectError> {
        if !allowed {
            return Err(ConnectError::InsecureAuth(format!(
                "the warehouse asked for the password {what}; refused, nothing was sent (only SCRAM-SHA-256 is used unless spec.allowLegacyPasswordAuth is true)"
            )));
        }
        if !self.is_tls() {
            return Err(ConnectError::InsecureAuth(format!(
                "the warehouse asked for the password {what} on a connection without TLS; refused, nothing was sent (spec.allowLegacyPasswordAuth needs TLS: set tls.mode to require or verify-full)"
            )));
        }
        Ok(())
    }

    async fn authenticate(
        &mut self,
        user: &str,
        password: &str,
        legacy: bool,
        keys: &KeyCache,
    ) -> Result<(), ConnectError> {
        let mut scram: Option<Exchange> = None;
        loop {
            let mut out = BytesMut::new();
            match self.read_backend().await? {
                backend::Message::AuthenticationOk => {}
                backend::Message::AuthenticationCleartextPassword => {
                    self.legacy_allowed("in cleartext", legacy)?;
                    frontend::password_message(password.as_bytes(), &mut out).map_err(proto)?;
                    self.send(&out).await?;
                    self.auth = AuthMethod::Cleartext;
                }
                backend::Message::AuthenticationMd5Password(body) => {
                    self.legacy_allowed("as an MD5 hash", legacy)?;
                    let hash = md5_hash(user.as_bytes(), password.as_bytes(), body.salt());
                    frontend::password_message(hash.as_bytes(), &mut out).map_err(proto)?;
                    self.send(&out).await?;
                    self.auth = AuthMethod::Md5;
                }
                backend::Message::AuthenticationSasl(body) => {
                    let mut mechs = body.mechanisms();
                    let (mut plain, mut plus) = (false, false);
                    while let Some(m) = fallible_next(&mut mechs)? {
                        plain |= m == scram::SCRAM_SHA_256;
                        plus |= m == scram::SCRAM_SHA_256_PLUS;
                    }
                    // Bind to the TLS connection whenever the server offers
                    // it. On TLS without an offer, say "I could bind" ('y'):
                    // a server that did offer it (and a man in the middle
                    // removed the offer) then fails the exchange.
                    let end_point = if plus {
                        tls::server_end_point(&self.stream)
                    } else {
                        None
                    };
                    let (mechanism, binding, method) = match end_point {
                        Some(hash) => (
                            scram::SCRAM_SHA_256_PLUS,
                            Binding::ServerEndPoint(hash),
                            AuthMethod::ScramPlus,
                        ),
                        None if !plain => {
                            return Err(ConnectError::Unsupported(
                                "server offers no SCRAM-SHA-256 this client can use".into(),
                            ));
                        }
                        None if self.is_tls() && !plus => (
                            scram::SCRAM_SHA_256,
                            Binding::Unrequested,
                            AuthMethod::Scram,
                        ),
                        None => (
                            scram::SCRAM_SHA_256,
                            Binding::Unsupported,
                            AuthMethod::Scram,
                        ),
                    };
                    let s = Exchange::new(binding);
                    frontend::sasl_initial_response(mechanism, &s.client_first(), &mut out)
                        .map_err(proto)?;
                    self.send(&out).await?;
                    scram = Some(s);
                    self.auth = method;
                }
                backend::Message::AuthenticationSaslContinue(body) => {
                    let mut s = scram
                        .take()
                        .ok_or_else(|| ConnectError::Protocol("unexpected SASL continue".into()))?;
                    // The key derivation (PBKDF2: thousands of HMAC rounds)
                    // runs once per password, salt and count of the source,
                    // off the runtime's thread, which serves every session
                    // and probe of the process; later connections find the
                    // keys in `keys`.
                    let data = body.data();
                    let derived = match s
                        .derivation(data, password, keys)
                        .map_err(|_| auth_failed(user))?
                    {
                        None => None,
                        Some(d) => {
                            Some(tokio::task::spawn_blocking(move || d.run()).await.map_err(
                                |_| ConnectError::Protocol("SCRAM computation failed".into()),
                            )?)
                        }
                    };
                    let message = s
                        .client_final(data, password, keys, derived)
                        .map_err(|_| auth_failed(user))?;
                    frontend::sasl_response(&message, &mut out).map_err(proto)?;
                    self.send(&out).await?;
                    scram = Some(s);
                }
                backend::Message::AuthenticationSaslFinal(body) => {
                    let s = scram
                        .as_mut()
                        .ok_or_else(|| ConnectError::Protocol("unexpected SASL final".into()))?;
                    s.verify(body.data())
                        .map_err(|_| ConnectError::Protocol("server signature mismatch".into()))?;
                }
                backend::Message::ParameterStatus(body) => {
                    let name = body.name().map_err(proto)?.to_owned();
                    let value = body.value().map_err(proto)?.to_owned();
                    self.params.push((name, value));
                }
                backend::Message::BackendKeyData(body) => {
                    self.backend_pid = body.process_id();
                    self.backend_secret = body.secret_key();
                }
                backend::Message::NoticeResponse(_) => {}
                backend::Message::ReadyForQuery(_) => return Ok(()),
                backend::Message::ErrorResponse(body) => {
                    let mut code = String::new();
                    let mut message = String::new();
                    let mut fields = body.fields();
                    while let Some(f) = fallible_next(&mut fields)? {
                        match f.type_() {
                            b'C' => code = String::from_utf8_lossy(f.value_bytes()).into_owned(),
                            b'M' => message = String::from_utf8_lossy(f.value_bytes()).into_owned(),
                            _ => {}
                        }
                    }
                    return Err(ConnectError::Server { code, message });
                }
                backend::Message::AuthenticationGss
                | backend::Message::AuthenticationSspi
                | backend::Message::AuthenticationKerberosV5
                | backend::Message::AuthenticationScmCredential => {
                    return Err(ConnectError::Unsupported(
                        "server asks for GSS/SSPI/Kerberos authentication".into(),
                    ));
                }
                _ => {
                    return Err(ConnectError::Protocol(
                        "unexpected message during startup".into(),
                    ));
                }
            }
        }
    }

    /// Writes client bytes to the server.
    pub async fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        let r = self.stream.write_all(bytes).await;
        if r.is_err() {
            self.broken = true;
        }
        r
    }

    /// Reads until at least one complete message is buffered, then returns
    /// every complete message as one chunk, with what its ReadyForQuery
    /// messages said. A FATAL error in the chunk marks the connection
    /// broken (`is_broken`): the server is closing it.
    ///
    /// Hot path (once per answer): no allocation beyond the buffer's own.
    pub async fn read_messages(&mut self) -> std::io::Result<(BytesMut, Ready)> {
        loop {
            let mut ready = Ready::default();
            let mut walk = pg::messages(&self.rbuf);
            let mut fatal = false;
            for m in walk.by_ref() {
                if m.tag == b'D' {
                    ready.rows += 1;
                } else if m.tag == b'Z' {
                    ready.count += 1;
                    ready.last_status = m.body().first().copied().unwrap_or(b'I');
                } else if m.tag == b'E' && pg::is_fatal(m.body()) {
                    // The server ends the connection after a FATAL.
                    fatal = true;
                }
            }
            let (end, bad) = (walk.consumed(), walk.bad().copied());
            if fatal {
                self.broken = true;
            }
            if let Some(e) = bad {
                self.broken = true;
                return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, e));
            }
            if end > 0 {
                return Ok((self.rbuf.split_to(end), ready));
            }
            match self.stream.read_buf(&mut self.rbuf).await {
                Ok(0) => {
                    self.broken = true;
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "server closed the connection",
                    ));
                }
                Ok(_) => {}
                Err(e) => {
                    self.broken = true;
                    return Err(e);
                }
            }
        }
    }

    /// Runs one simple query to completion, discarding its results; used to
    /// reset a connection's state. Err if the server reported an error.
    pub async fn simple(&mut self, sql: &str) -> std::io::Result<()> {
        let mut out = BytesMut::new();
        frontend::query(sql, &mut out)?;
        self.write_all(&out).await?;
        let mut failed = None;
        loop {
            let (chunk, ready) = self.read_messages().await?;
            for m in pg::messages(&chunk) {
                if m.tag == b'E' {
                    failed = pg::error_field(m.body(), b'M').map(str::to_owned);
                }
            }
            if ready.count > 0 {
                return match failed {
                    Some(m) => Err(std::io::Error::other(m)),
                    None => Ok(()),
                };
            }
        }
    }

    /// Runs one simple query and returns its rows as text (NULL as None).
    /// An ErrorResponse becomes [`QueryError::Server`] with its SQLSTATE.
    /// For shardpool's own short queries (fencing), not for client traffic.
    pub async fn query(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>, QueryError> {
        let mut out = BytesMut::new();
        frontend::query(sql, &mut out)?;
        self.write_all(&out).await?;
        let mut rows = Vec::new();
        let mut failed = None;
        loop {
            let (chunk, ready) = self.read_messages().await?;
            for m in pg::messages(&chunk) {
                let body = m.body();
                match m.tag {
                    b'E' => {
                        failed = Some(QueryError::Server {
                            code: pg::error_code(body).unwrap_or("XX000").to_string(),
                            message: pg::error_field(body, b'M').unwrap_or("").to_string(),
                        })
                    }
                    b'S' => {
                        // A setting changed (SET application_name): keep
                        // what clients are told on open current.
                        if let Some((name, value)) = parameter_status(body) {
                            match self.params.iter_mut().find(|(k, _)| *k == name) {
                                Some(p) => p.1 = value,
                                None => self.params.push((name, value)),
                            }
                        }
                    }
                    b'D' => rows.push(data_row(body).ok_or_else(|| {
                        QueryError::Io(std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            "malformed DataRow",
                        ))
                    })?),
                    _ => {}
                }
            }
            if ready.count > 0 {
                return match failed {
                    Some(e) => Err(e),
                    None => Ok(rows),
                };
            }
        }
    }

    /// Says goodbye to the server and closes the socket.
    pub async fn terminate(mut self) {
        let mut out = BytesMut::new();
        frontend::terminate(&mut out);
        let _ = self.stream.write_all(&out).await;
        // TLS ends with its close_notify; plain TCP needs no shutdown
        // before the close that dropping the socket does (one system call
        // less per connection: a shard closes thousands at once when it
        // hands its sources over).
        if self.stream.is_tls() {
            let _ = self.stream.shutdown().await;
        }
    }

    /// Whether it is due for renewal at `now` (see `retire_at`).
    pub fn expired(&self, now: Instant) -> bool {
        self.retire_at.is_some_and(|at| now >= at)
    }

    /// Whether an idle connection is still usable: the server has neither
    /// closed it nor sent anything unasked (such as the FATAL of an
    /// administrator's pg_terminate_backend). Never blocks.
    pub fn idle_and_alive(&self) -> bool {
        if !self.idle_unbroken() {
            return false;
        }
        // Peek at the socket itself (under TLS too: any record from an
        // idle server is an alert or a close), not at the runtime's cached
        // readiness, which a server that closed a moment ago has not
        // updated yet. Would-block is the only answer of a live, idle one;
        // EOF, unexpected bytes or an error mean not reusable.
        let mut probe = [std::mem::MaybeUninit::<u8>::uninit(); 1];
        matches!(
            socket2::SockRef::from(tls::tcp(&self.stream)).peek(&mut probe),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
        )
    }

    /// [`ServerConn::idle_and_alive`] without asking the socket: nothing
    /// broke it and nothing unread is buffered. No system call.
    pub fn idle_unbroken(&self) -> bool {
        !self.broken && !self.rbuf.has_remaining()
    }

    /// Whether the connection can no longer be used (I/O error, protocol
    /// error, or the server sent a FATAL error).
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// Whether the connection runs TLS.
    pub fn is_tls(&self) -> bool {
        self.stream.is_tls()
    }
}

/// Idle time before a server connection's first keepalive probe: 10 s
/// plus up to 5 s at random (see [`ServerConn::connect_with_keys`]).
fn keepalive_time() -> std::time::Duration {
    std::time::Duration::from_millis(rand::random_range(10_000..15_000))
}

/// Why one of shardpool's own queries failed.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// The connection failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The server answered with an error.
    #[error("{code}: {message}")]
    Server {
        /// SQLSTATE
        code: String,
        /// server's message
        message: String,
    },
}

/// The text values of a DataRow body (NULL as None).
fn data_row(body: &[u8]) -> Option<Vec<Option<String>>> {
    let n = u16::from_be_bytes([*body.first()?, *body.get(1)?]);
    let mut rest = body.get(2..)?;
    let mut row = Vec::with_capacity(usize::from(n));
    for _ in 0..n {
        let len = i32::from_be_bytes(rest.get(..4)?.try_into().ok()?);
        rest = rest.get(4..)?;
        if len < 0 {
            row.push(None);
        } else {
            let len = usize::try_from(len).ok()?;
            row.push(Some(String::from_utf8_lossy(rest.get(..len)?).into_owned()));
            rest = rest.get(len..)?;
        }
    }
    Some(row)
}

/// Asks the server to cancel the query running on the connection with this key.
pub async fn cancel(host: &str, port: u16, pid: i32, secret: i32) -> std::io::Result<()> {
    let mut s = TcpStream::connect((host, port)).await?;
    let mut out = BytesMut::new();
    frontend::cancel_request(pid, secret, &mut out);
    s.write_all(&out).await?;
    // The server closes the connection when done; wait briefly for that.
    let mut sink = [0u8; 1];
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), s.read(&mut sink)).await;
    Ok(())
}

/// Name and value of a ParameterStatus body (two C strings).
fn parameter_status(body: &[u8]) -> Option<(String, String)> {
    let mut parts = body.split(|b| *b == 0);
    let name = std::str::from_utf8(parts.next()?).ok()?;
    let value = std::str::from_utf8(parts.next()?).ok()?;
    Some((name.to_owned(), value.to_owned()))
}

fn proto(e: std::io::Error) -> ConnectError {
    ConnectError::Protocol(e.to_string())
}

fn auth_failed(user: &str) -> ConnectError {
    ConnectError::Server {
        code: "28P01".into(),
        message: format!("SCRAM authentication failed for user \"{user}\""),
    }
}

fn fallible_next<I>(it: &mut I) -> Result<Option<I::Item>, ConnectError>
where
    I: fallible_iterator::FallibleIterator<Error = std::io::Error>,
{
    it.next().map_err(proto)
}
