//! The HTTP/JSON front end: `POST /v1/namespaces/{ns}/datasources/{name}/query`
//! with `{"sql", "params", "timeoutMs"}`, answered with the columns (name
//! and type), the rows, the row count, the command tag and the elapsed time.
//! Bearer tokens come from the router's configuration, each scoped to
//! namespaces; an unknown source and a forbidden one both answer 404.
//!
//! The query runs as one extended-protocol batch (Parse, Bind, Describe,
//! Execute, Sync) on the owning shard, through the same links as the
//! PostgreSQL front end; parameters and results travel as text.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::{BufMut, Bytes, BytesMut};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::Router;
use super::link::OpenAs;
use super::metrics::{Frontend, SourceFrontend};
use super::session::{Fatal, attach};
use crate::proto::frame::{Frame, Kind};
use crate::proto::pg;

/// Bearer tokens: SHA-256 of the token -> allowed namespaces (`*` = all).
#[derive(Default)]
pub struct Tokens {
    by_digest: HashMap<[u8; 32], Vec<String>>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokens({} tokens)", self.by_digest.len())
    }
}

impl Tokens {
    /// Parses lines `token:ns1,ns2` (blank lines and `#` comments ignored).
    /// Errors name the line number only: the line holds a secret.
    pub fn parse(s: &str) -> Result<Tokens, String> {
        let mut by_digest = HashMap::new();
        for (i, line) in s.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((token, namespaces)) = line.rsplit_once(':') else {
                return Err(format!(
                    "http token line {}: expected token:namespaces",
                    i + 1
                ));
            };
            if token.len() < 16 {
                return Err(format!(
                    "http token line {}: token shorter than 16 characters",
                    i + 1
                ));
            }
            let ns: Vec<String> = namespaces
                .split(',')
                .map(|n| n.trim().to_string())
                .filter(|n| !n.is_empty())
                .collect();
            if ns.is_empty() {
                return Err(format!("http token line {}: no namespaces", i + 1));
            }
            by_digest.insert(Sha256::digest(token.as_bytes()).into(), ns);
        }
        Ok(Tokens { by_digest })
    }

    /// The namespaces a presented token may reach, if it is valid. Looked up
    /// by digest, so the comparison does not depend on the token's bytes.
    fn namespaces(&self, token: &str) -> Option<&Vec<String>> {
        self.by_digest
            .get(&<[u8; 32]>::from(Sha256::digest(token.as_bytes())))
    }
}

/// The client identity of a static token: `token-` and the first 8 hex
/// digits of its SHA-256 (names the token without revealing it).
pub fn token_identity(token: &str) -> String {
    let d = Sha256::digest(token.as_bytes());
    format!("token-{:02x}{:02x}{:02x}{:02x}", d[0], d[1], d[2], d[3])
}

/// Shared state of the HTTP front end.
pub struct Http {
    /// The router (routing table, links).
    pub router: Arc<Router>,
    /// Largest result (bytes of row data) answered as one JSON document;
    /// larger ones are refused (54000) and should be streamed as NDJSON.
    pub max_result: usize,
}

/// Request body.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct QueryRequest {
    /// One SQL statement.
    sql: String,
    /// Positional parameters ($1, $2, ...).
    #[serde(default)]
    params: Vec<Value>,
    /// Server-side time limit in milliseconds (default 30 s, at most 10 min).
    timeout_ms: Option<u64>,
    /// Cost tag the shard counts the query under (like a PostgreSQL
    /// client's application_name).
    tag: Option<String>,
}

/// The axum application.
pub fn app(state: Arc<Http>) -> axum::Router {
    axum::Router::new()
        .route(
            "/v1/namespaces/{ns}/datasources/{name}/query",
            axum::routing::post(measured),
        )
        .route("/healthz", axum::routing::get(|| async { "ok\n" }))
        .with_state(state)
}

/// The SQLSTATE of an error response, for the metrics wrapper.
#[derive(Debug, Clone)]
struct SqlState(String);

fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    let body = json!({"error": {"sqlstate": code, "message": message.into()}});
    let mut r = (status, Json(body)).into_response();
    r.extensions_mut().insert(SqlState(code.to_string()));
    retry_after(&mut r);
    r
}

/// Retry-After on the answers a client should retry: 503 and 429.
fn retry_after(r: &mut Response) {
    if matches!(
        r.status(),
        StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS
    ) {
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
}

/// Response header: milliseconds the query waited in its source's
/// admission queue on the owning shard.
pub const QUEUE_HEADER: &str = "shardpool-queue-ms";

/// The wait an `Admitted` frame reports.
fn admitted_wait(f: &Frame) -> Option<Duration> {
    let b: [u8; 8] = f.payload.get(..8)?.try_into().ok()?;
    Some(Duration::from_micros(u64::from_be_bytes(b)))
}

/// Adds the queue-time header when the shard reported one.
fn with_queue_time(mut r: Response, waited: Option<Duration>) -> Response {
    if let Some(w) = waited {
        let ms = format!("{:.3}", w.as_secs_f64() * 1000.0);
        if let Ok(v) = HeaderValue::from_str(&ms) {
            r.headers_mut().insert(QUEUE_HEADER, v);
        }
    }
    r
}

/// The answer for the server's ErrorResponse `body`: its SQLSTATE,
/// message, detail and hint, with the status saying whose fault it was.
fn server_error(body: &[u8]) -> Response {
    let code = pg::error_code(body).unwrap_or("XX000");
    let e = json!({"error": {
        "sqlstate": code,
        "message": pg::error_field(body, b'M'),
        "detail": pg::error_field(body, b'D'),
        "hint": pg::error_field(body, b'H'),
    }});
    let mut r = (status_for(code), Json(e)).into_response();
    r.extensions_mut().insert(SqlState(code.to_string()));
    retry_after(&mut r);
    r
}

/// HTTP status for a SQLSTATE: whose fault it was.
pub fn status_for(code: &str) -> StatusCode {
    match code.get(..2).unwrap_or("") {
        "22" | "23" | "42" | "2B" | "0A" | "25" | "34" | "26" | "44" => StatusCode::BAD_REQUEST,
        "28" => StatusCode::BAD_GATEWAY,
        // A source's admission limits (queue full, waited too long, rate).
        "53" if code == "53300" => StatusCode::TOO_MANY_REQUESTS,
        "53" | "08" => StatusCode::SERVICE_UNAVAILABLE,
        "57" if code == "57014" => StatusCode::GATEWAY_TIMEOUT,
        "57" => StatusCode::SERVICE_UNAVAILABLE,
        "3D" => StatusCode::NOT_FOUND,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// Type name of a PostgreSQL type OID, for the `columns` of a response.
pub fn type_name(oid: u32) -> String {
    match oid {
        16 => "bool",
        17 => "bytea",
        18 => "char",
        19 => "name",
        20 => "int8",
        21 => "int2",
        23 => "int4",
        25 => "text",
        26 => "oid",
        114 => "json",
        700 => "float4",
        701 => "float8",
        1042 => "bpchar",
        1043 => "varchar",
        1082 => "date",
        1083 => "time",
        1114 => "timestamp",
        1184 => "timestamptz",
        1186 => "interval",
        1700 => "numeric",
        2950 => "uuid",
        3802 => "jsonb",
        _ => return format!("oid:{oid}"),
    }
    .to_string()
}

/// A text-format value as JSON: booleans, integers, floats and JSON as
/// themselves; everything else (numeric included, to keep its precision)
/// as a string.
pub fn json_value(oid: u32, text: &str) -> Value {
    match oid {
        16 => Value::Bool(text == "t"),
        20 | 21 | 23 | 26 => text
            .parse::<i64>()
            .map(Value::from)
            .unwrap_or_else(|_| Value::String(text.into())),
        700 | 701 => text
            .parse::<f64>()
            .ok()
            .and_then(serde_json::Number::from_f64)
            .map(Value::Number)
            .unwrap_or_else(|| Value::String(text.into())),
        114 | 3802 => serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.into())),
        _ => Value::String(text.into()),
    }
}

fn param_text(v: &Value) -> Option<String> {
    match v {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

/// The extended-protocol batch for one query with text parameters.
pub fn batch(sql: &str, params: &[Value]) -> Bytes {
    let mut out = BytesMut::with_capacity(sql.len() + 64);
    pg::put_message(&mut out, b'P', |b| {
        b.put_u8(0);
        b.put_slice(sql.as_bytes());
        b.put_u8(0);
        b.put_u16(0);
    });
    pg::put_message(&mut out, b'B', |b| {
        b.put_u8(0);
        b.put_u8(0);
        b.put_u16(0); // all parameters in text
        b.put_u16(u16::try_from(params.len()).unwrap_or(u16::MAX));
        for p in params {
            match param_text(p) {
                None => b.put_i32(-1),
                Some(s) => {
                    b.put_i32(i32::try_from(s.len()).unwrap_or(i32::MAX));
                    b.put_slice(s.as_bytes());
                }
            }
        }
        b.put_u16(0); // all results in text
    });
    pg::put_message(&mut out, b'D', |b| {
        b.put_u8(b'P');
        b.put_u8(0);
    });
    pg::put_message(&mut out, b'E', |b| {
        b.put_u8(0);
        b.put_u32(0);
    });
    pg::put_message(&mut out, b'S', |_| {});
    out.freeze()
}

/// What came back for one batch.
#[derive(Debug, Default)]
pub struct Outcome {
    /// (name, type OID) per column.
    pub columns: Vec<(String, u32)>,
    /// Rows of text values (None = NULL).
    pub rows: Vec<Vec<Option<String>>>,
    /// CommandComplete tag.
    pub tag: Option<String>,
    /// ErrorResponse body, if the query failed.
    pub error: Option<Bytes>,
    /// ReadyForQuery seen.
    pub done: bool,
    /// Bytes of row data absorbed (DataRow bodies), for the buffered limit.
    pub row_bytes: usize,
}

fn cstr(b: &[u8]) -> Option<(&str, &[u8])> {
    let end = b.iter().position(|&c| c == 0)?;
    Some((std::str::from_utf8(&b[..end]).ok()?, &b[end + 1..]))
}

/// Folds a chunk of backend messages into the outcome.
pub fn absorb(out: &mut Outcome, chunk: &[u8]) -> Result<(), &'static str> {
    for m in pg::messages(chunk) {
        let body = m.body();
        match m.tag {
            b'T' => {
                let count = u16::from_be_bytes([
                    *body.first().ok_or("short")?,
                    *body.get(1).ok_or("short")?,
                ]);
                let mut b = &body[2..];
                for _ in 0..count {
                    let (name, tail) = cstr(b).ok_or("bad row description")?;
                    let oid = tail.get(6..10).ok_or("bad row description")?;
                    out.columns.push((
                        name.to_string(),
                        u32::from_be_bytes([oid[0], oid[1], oid[2], oid[3]]),
                    ));
                    b = tail.get(18..).ok_or("bad row description")?;
                }
            }
            b'D' => {
                out.row_bytes += body.len();
                let count = u16::from_be_bytes([
                    *body.first().ok_or("short")?,
                    *body.get(1).ok_or("short")?,
                ]);
                let mut b = &body[2..];
                let mut row = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    let len = i32::from_be_bytes(
                        b.get(..4)
                            .ok_or("bad data row")?
                            .try_into()
                            .map_err(|_| "bad data row")?,
                    );
                    b = &b[4..];
                    if len < 0 {
                        row.push(None);
                    } else {
                        let len = len as usize;
                        let v = b.get(..len).ok_or("bad data row")?;
                        row.push(Some(String::from_utf8_lossy(v).into_owned()));
                        b = &b[len..];
                    }
                }
                out.rows.push(row);
            }
            b'C' => out.tag = cstr(body).map(|(s, _)| s.to_string()),
            b'E' => out.error = Some(Bytes::copy_from_slice(body)),
            b'Z' => out.done = true,
            _ => {}
        }
    }
    Ok(())
}

/// One row as a JSON array, typed by its columns.
fn row_json(row: &[Option<String>], columns: &[(String, u32)]) -> Value {
    Value::Array(
        row.iter()
            .zip(columns.iter())
            .map(|(v, (_, oid))| v.as_deref().map_or(Value::Null, |t| json_value(*oid, t)))
            .collect(),
    )
}

/// The `columns` array.
fn columns_json(columns: &[(String, u32)]) -> Vec<Value> {
    columns
        .iter()
        .map(|(n, oid)| json!({"name": n, "type": type_name(*oid)}))
        .collect()
}

/// The whole answer as one JSON document, written row by row (no second
/// copy of the rows as JSON values).
fn document(out: &Outcome, elapsed_ms: f64) -> serde_json::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(out.row_bytes + 8 * out.rows.len() + 256);
    buf.extend_from_slice(b"{\"columns\":");
    serde_json::to_writer(&mut buf, &columns_json(&out.columns))?;
    buf.extend_from_slice(b",\"rows\":[");
    for (i, r) in out.rows.iter().enumerate() {
        if i > 0 {
            buf.push(b',');
        }
        serde_json::to_writer(&mut buf, &row_json(r, &out.columns))?;
    }
    buf.extend_from_slice(b"],\"rowCount\":");
    serde_json::to_writer(&mut buf, &out.rows.len())?;
    buf.extend_from_slice(b",\"commandTag\":");
    serde_json::to_writer(&mut buf, &out.tag)?;
    buf.extend_from_slice(b",\"elapsedMs\":");
    serde_json::to_writer(&mut buf, &elapsed_ms)?;
    buf.push(b'}');
    Ok(buf)
}

/// Whether the client asked for newline-delimited JSON.
fn wants_ndjson(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| {
            v.split(',')
                .any(|m| m.trim().starts_with("application/x-ndjson"))
        })
}

/// Lines (each ending in a newline) for the rows absorbed so far, which
/// are then dropped: a streamed result is never held whole.
fn drain_rows(out: &mut Outcome) -> Vec<u8> {
    let mut buf = Vec::new();
    for r in out.rows.drain(..) {
        if serde_json::to_writer(&mut buf, &row_json(&r, &out.columns)).is_ok() {
            buf.push(b'\n');
        }
    }
    buf
}

fn line(v: &Value) -> Bytes {
    let mut b = serde_json::to_vec(v).unwrap_or_default();
    b.push(b'\n');
    Bytes::from(b)
}

/// Rows queued towards a streaming client before reading from the shard
/// pauses (backpressure reaches the warehouse through the shard).
const NDJSON_QUEUE: usize = 16;

/// Streams a result as NDJSON: `{"columns": [...]}`, one JSON array per
/// row, then `{"rowCount", "commandTag", "elapsedMs"}`. An error before the
/// first row gets its HTTP status like the JSON answer; one after that
/// (or the timeout) ends the stream with an `{"error": ...}` line.
async fn stream_ndjson(
    mut at: super::session::Attached,
    started: Instant,
    timeout: Duration,
) -> Response {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut out = Outcome::default();
    let mut waited = None;
    // Until the columns are known, failures keep their status codes.
    while out.columns.is_empty() && !out.done {
        match tokio::time::timeout_at(deadline, at.inbox.recv()).await {
            Ok(Some(f)) if f.kind == Kind::Admitted => waited = admitted_wait(&f),
            Err(_) => {
                at.link
                    .send(Frame::new(at.id, Kind::Cancel, Bytes::new()))
                    .await;
                at.link.close(at.id).await;
                return error(
                    StatusCode::GATEWAY_TIMEOUT,
                    "57014",
                    format!("query exceeded timeoutMs={}", timeout.as_millis()),
                );
            }
            Ok(Some(f)) if f.kind == Kind::Messages => {
                if let Err(e) = absorb(&mut out, &f.payload) {
                    at.link.close(at.id).await;
                    return error(StatusCode::BAD_GATEWAY, "08P01", e);
                }
            }
            Ok(Some(f)) if f.kind == Kind::Closed => {
                let body = f.payload.get(5..).unwrap_or_default();
                let code = pg::error_code(body).unwrap_or("08006").to_string();
                let msg = pg::error_field(body, b'M').unwrap_or("shard closed the session");
                return error(StatusCode::SERVICE_UNAVAILABLE, &code, msg);
            }
            Ok(Some(_)) => {}
            Ok(None) => {
                return error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "08006",
                    "lost the pool shard; retry",
                );
            }
        }
    }
    if out.columns.is_empty() {
        // Done without a result set: an error, or a command without rows.
        at.link.close(at.id).await;
        if let Some(body) = &out.error {
            return with_queue_time(server_error(body), waited);
        }
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(NDJSON_QUEUE);
    tokio::spawn(async move {
        let mut sent = 0usize;
        let mut first = line(&json!({"columns": columns_json(&out.columns)}));
        let rows = drain_rows(&mut out);
        sent += rows.iter().filter(|&&b| b == b'\n').count();
        if !rows.is_empty() {
            let mut b = BytesMut::from(&first[..]);
            b.extend_from_slice(&rows);
            first = b.freeze();
        }
        let mut alive = tx.send(first).await.is_ok();
        let mut failure: Option<Value> = None;
        while alive && !out.done && failure.is_none() {
            match tokio::time::timeout_at(deadline, at.inbox.recv()).await {
                Err(_) => {
                    at.link
                        .send(Frame::new(at.id, Kind::Cancel, Bytes::new()))
                        .await;
                    failure = Some(json!({"sqlstate": "57014",
                        "message": format!("query exceeded timeoutMs={}", timeout.as_millis())}));
                }
                Ok(Some(f)) if f.kind == Kind::Messages => {
                    if let Err(e) = absorb(&mut out, &f.payload) {
                        failure = Some(json!({"sqlstate": "08P01", "message": e}));
                    }
                    let rows = drain_rows(&mut out);
                    if !rows.is_empty() {
                        sent += rows.iter().filter(|&&b| b == b'\n').count();
                        alive = tx.send(Bytes::from(rows)).await.is_ok();
                    }
                }
                Ok(Some(f)) if f.kind == Kind::Closed => {
                    let body = f.payload.get(5..).unwrap_or_default();
                    failure = Some(json!({"sqlstate": pg::error_code(body).unwrap_or("08006"),
                        "message": pg::error_field(body, b'M').unwrap_or("shard closed the session")}));
                }
                Ok(Some(_)) => {}
                Ok(None) => {
                    failure = Some(json!({"sqlstate": "08006", "message": "lost the pool shard"}));
                }
            }
        }
        if failure.is_none() {
            if let Some(body) = &out.error {
                failure = Some(json!({"sqlstate": pg::error_code(body).unwrap_or("XX000"),
                    "message": pg::error_field(body, b'M')}));
            }
        }
        let last = match failure {
            Some(e) => json!({"error": e, "rowCount": sent}),
            None => json!({
                "rowCount": sent,
                "commandTag": out.tag,
                "elapsedMs": started.elapsed().as_secs_f64() * 1000.0,
            }),
        };
        if alive {
            let _ = tx.send(line(&last)).await;
        }
        at.link.close(at.id).await;
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<Bytes, std::convert::Infallible>(b), rx))
    });
    with_queue_time(
        (
            [(header::CONTENT_TYPE, "application/x-ndjson")],
            axum::body::Body::from_stream(stream),
        )
            .into_response(),
        waited,
    )
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

const HTTP: Frontend = Frontend { frontend: "http" };

/// Runs [`query`] and records its outcome: one query, its latency, and its
/// SQLSTATE class when it failed.
async fn measured(
    State(http): State<Arc<Http>>,
    Path((ns, name)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let started = Instant::now();
    let m = &http.router.metrics;
    let r = query(
        State(http.clone()),
        Path((ns.clone(), name.clone())),
        headers,
        body,
    )
    .await;
    let code = r.extensions().get::<SqlState>().map(|c| c.0.clone());
    if r.status() == StatusCode::UNAUTHORIZED {
        m.auth_failures.get_or_create(&HTTP).inc();
        return r;
    }
    m.latency
        .get_or_create(&HTTP)
        .observe(started.elapsed().as_secs_f64());
    // Only existing sources get their own series (the path is the client's).
    let known = http.router.routes.known(&ns, &name);
    let (lns, lname) = if known {
        (ns.clone(), name.clone())
    } else {
        (String::new(), String::new())
    };
    m.queries
        .get_or_create(&SourceFrontend {
            frontend: "http",
            namespace: lns,
            source: lname,
        })
        .inc();
    if let Some(code) = code {
        m.error("http", &ns, &name, known, &code);
    }
    r
}

async fn query(
    State(http): State<Arc<Http>>,
    Path((ns, name)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let started = Instant::now();
    let Some(token) = bearer(&headers) else {
        return error(StatusCode::UNAUTHORIZED, "28000", "missing bearer token");
    };
    let creds = http.router.auth.current();
    let (allowed, identity): (Vec<String>, String) =
        match (creds.tokens.namespaces(token), &creds.jwt) {
            (Some(ns), _) => (ns.clone(), token_identity(token)),
            (None, Some(jwt)) if token.matches('.').count() == 2 => match jwt.verify_subject(token)
            {
                Ok((ns, sub)) => (ns, sub.unwrap_or_else(|| "jwt".into())),
                Err(e) => return error(StatusCode::UNAUTHORIZED, "28000", e.to_string()),
            },
            _ => return error(StatusCode::UNAUTHORIZED, "28000", "invalid bearer token"),
        };
    if !allowed.iter().any(|a| a == "*" || *a == ns) {
        return error(
            StatusCode::NOT_FOUND,
            "3D000",
            format!("source {ns}/{name} does not exist"),
        );
    }
    let req: QueryRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "08P01",
                format!("invalid request body: {e}"),
            );
        }
    };
    let timeout = Duration::from_millis(req.timeout_ms.unwrap_or(30_000).clamp(1, 600_000));
    let who = OpenAs {
        weight: creds.weights.of(&identity),
        client: identity,
        tag: req.tag.clone().unwrap_or_default(),
        report_admission: true,
    };
    let mut at = match attach(&http.router, &ns, &name, None, &who).await {
        Ok((at, _)) => at,
        Err(Fatal(e)) => return error(status_for(&e.code), &e.code, e.message),
    };
    // One send for both answers' shapes, within the request's time limit.
    let sent = tokio::time::timeout(
        timeout,
        at.link.send(Frame::new(
            at.id,
            Kind::Messages,
            batch(&req.sql, &req.params),
        )),
    )
    .await;
    if sent != Ok(true) {
        at.link.close(at.id).await;
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "08006",
            "lost the pool shard; retry",
        );
    }
    if wants_ndjson(&headers) {
        return stream_ndjson(at, started, timeout).await;
    }
    let mut out = Outcome::default();
    let mut waited = None;
    let max_result = http.max_result;
    let run = async {
        while !out.done {
            match at.inbox.recv().await {
                Some(f) if f.kind == Kind::Admitted => waited = admitted_wait(&f),
                Some(f) if f.kind == Kind::Messages => {
                    if let Err(e) = absorb(&mut out, &f.payload) {
                        return Err(error(StatusCode::BAD_GATEWAY, "08P01", e));
                    }
                    if out.row_bytes > max_result {
                        // Stop the query; closing the session below
                        // discards its server connection.
                        at.link
                            .send(Frame::new(at.id, Kind::Cancel, Bytes::new()))
                            .await;
                        return Err(error(
                            StatusCode::BAD_REQUEST,
                            "54000",
                            format!(
                                "result larger than {max_result} bytes; ask for Accept: application/x-ndjson to stream it, or narrow the query"
                            ),
                        ));
                    }
                }
                Some(f) if f.kind == Kind::Closed => {
                    let body = f.payload.get(5..).unwrap_or_default();
                    let code = pg::error_code(body).unwrap_or("08006").to_string();
                    let msg = pg::error_field(body, b'M')
                        .unwrap_or("shard closed the session")
                        .to_string();
                    return Err(error(StatusCode::SERVICE_UNAVAILABLE, &code, msg));
                }
                Some(_) => {}
                None => {
                    return Err(error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "08006",
                        "lost the pool shard; retry",
                    ));
                }
            }
        }
        Ok(())
    };
    let result = tokio::time::timeout(timeout, run).await;
    let response = match result {
        Err(_) => {
            at.link
                .send(Frame::new(at.id, Kind::Cancel, Bytes::new()))
                .await;
            error(
                StatusCode::GATEWAY_TIMEOUT,
                "57014",
                format!("query exceeded timeoutMs={}", timeout.as_millis()),
            )
        }
        Ok(Err(r)) => r,
        Ok(Ok(())) => match out.error.take() {
            Some(body) => server_error(&body),
            None => {
                let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
                // Encoding up to maxResultBytes of rows is CPU work: done on
                // the blocking pool, so the runtime's thread keeps serving
                // every other client meanwhile.
                match tokio::task::spawn_blocking(move || document(&out, elapsed_ms)).await {
                    Ok(Ok(body)) => {
                        ([(header::CONTENT_TYPE, "application/json")], body).into_response()
                    }
                    _ => error(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "XX000",
                        "encoding the result failed",
                    ),
                }
            }
        },
    };
    at.link.close(at.id).await;
    with_queue_time(response, waited)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstate_classes_map_to_whose_fault() {
        assert_eq!(status_for("42P01"), StatusCode::BAD_REQUEST);
        assert_eq!(status_for("22012"), StatusCode::BAD_REQUEST);
        assert_eq!(status_for("57014"), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(status_for("53300"), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(status_for("53200"), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(status_for("28P01"), StatusCode::BAD_GATEWAY);
        assert_eq!(status_for("XX000"), StatusCode::INTERNAL_SERVER_ERROR);
    }

    #[test]
    fn values_keep_their_json_types() {
        assert_eq!(json_value(23, "42"), json!(42));
        assert_eq!(json_value(16, "t"), json!(true));
        assert_eq!(json_value(1700, "83750.00"), json!("83750.00"));
        assert_eq!(json_value(3802, "{\"a\":1}"), json!({"a": 1}));
        assert_eq!(json_value(701, "NaN"), json!("NaN"));
    }

    #[test]
    fn tokens_scope_namespaces_and_hide_secrets() {
        let t = Tokens::parse("# comment\nabcdefghijklmnop1234:tenants,other\n").expect("parses");
        assert_eq!(t.namespaces("abcdefghijklmnop1234").map(Vec::len), Some(2));
        assert!(t.namespaces("nope").is_none());
        assert!(!format!("{t:?}").contains("abcdef"));
        let e = Tokens::parse("short:ns").expect_err("too short");
        assert!(!e.contains("short:"), "{e}");
    }

    #[test]
    fn absorbs_a_result() {
        let mut b = BytesMut::new();
        pg::put_message(&mut b, b'T', |b| {
            b.put_u16(1);
            b.put_slice(b"n\0");
            b.put_u32(0);
            b.put_u16(0);
            b.put_u32(23);
            b.put_i16(4);
            b.put_i32(-1);
            b.put_i16(0);
        });
        pg::put_message(&mut b, b'D', |b| {
            b.put_u16(1);
            b.put_i32(1);
            b.put_slice(b"7");
        });
        pg::put_message(&mut b, b'C', |b| b.put_slice(b"SELECT 1\0"));
        pg::put_ready(&mut b, b'I');
        let mut out = Outcome::default();
        absorb(&mut out, &b).expect("valid");
        assert_eq!(out.columns, vec![("n".to_string(), 23)]);
        assert_eq!(out.rows, vec![vec![Some("7".to_string())]]);
        assert_eq!(out.row_bytes, 7, "count, one length, one byte of value");
        let doc: Value =
            serde_json::from_slice(&document(&out, 1.5).expect("encodes")).expect("valid JSON");
        assert_eq!(
            doc,
            json!({
                "columns": [{"name": "n", "type": "int4"}],
                "rows": [[7]],
                "rowCount": 1,
                "commandTag": "SELECT 1",
                "elapsedMs": 1.5,
            })
        );
        assert_eq!(out.tag.as_deref(), Some("SELECT 1"));
        assert!(out.done);
    }
}
