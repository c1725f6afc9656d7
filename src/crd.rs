//! The `DataSource` custom resource: one customer warehouse that shardpool
//! keeps a warm pool for. These types are the schema's source of truth:
//! `shardpool crd` prints the CustomResourceDefinition generated from them,
//! and every constraint the API server can enforce at admission (required
//! fields, ranges, enums, patterns, CEL rules) is declared here so that
//! `kubectl apply` rejects a bad resource before any shardpool process sees it.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of shardpool's resources.
pub const GROUP: &str = "shardpool.dev";

/// Pattern of every duration field: one or more `<integer><unit>` parts with
/// units `ms`, `s`, `m`, `h` (for example `500ms`, `30s`, `1h30m`).
pub const DURATION_PATTERN: &str = r"^([0-9]+(ms|s|m|h))+$";

/// A host name (RFC 1123 labels), an IPv4 address, or an IPv6 address.
pub const HOST_PATTERN: &str = r"^(([a-zA-Z0-9]([-a-zA-Z0-9]{0,61}[a-zA-Z0-9])?)(\.[a-zA-Z0-9]([-a-zA-Z0-9]{0,61}[a-zA-Z0-9])?)*\.?|[0-9a-fA-F]*:[0-9a-fA-F:.]*)$";

/// A Kubernetes object name (DNS subdomain).
pub const OBJECT_NAME_PATTERN: &str =
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";

/// A key in a Secret's data.
pub const SECRET_KEY_PATTERN: &str = r"^[-._a-zA-Z0-9]+$";

/// Condition reasons written to `status.conditions` (each one is described
/// in the CRD, so `kubectl explain datasource.status.conditions` shows it).
pub mod reason {
    /// Assigned=True: the operator placed the source on a shard.
    pub const ASSIGNED: &str = "Assigned";
    /// Ready=True: minIdle connections are open.
    pub const POOL_WARM: &str = "PoolWarm";
    /// Ready=False: the pool is opening its connections.
    pub const CONNECTING: &str = "Connecting";
    /// Ready=False: serving, below minIdle or with connection errors.
    pub const CONNECTION_ERRORS: &str = "ConnectionErrors";
    /// Ready=False: the pool cannot be opened.
    pub const CANNOT_CONNECT: &str = "CannotConnect";
    /// Ready=False: paused, or no shard serves the source.
    pub const NOT_SERVING: &str = "NotServing";
    /// Every reason above.
    pub const ALL: [&str; 6] = [
        ASSIGNED,
        POOL_WARM,
        CONNECTING,
        CONNECTION_ERRORS,
        CANNOT_CONNECT,
        NOT_SERVING,
    ];
}

/// A connection pool to one PostgreSQL-compatible warehouse (PostgreSQL,
/// Redshift, CockroachDB, TimescaleDB, Aurora, ...). shardpool assigns it to
/// exactly one pool shard, which keeps `pool.minIdle` connections open and
/// serves queries routed to `<namespace>.<name>`.
// clippy reads two printcolumns with the same `type_` as a duplicated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "shardpool.dev",
    version = "v1alpha1",
    kind = "DataSource",
    namespaced,
    status = "DataSourceStatus",
    shortname = "dsrc",
    category = "shardpool",
    doc = "A PostgreSQL-compatible warehouse whose connection pool shardpool keeps warm on exactly one shard.",
    printcolumn(
        name = "Shard",
        type_ = "integer",
        json_path = ".status.shard",
        description = "Pool shard that owns this source"
    ),
    printcolumn(
        name = "Phase",
        type_ = "string",
        json_path = ".status.phase",
        description = "Lifecycle phase"
    ),
    printcolumn(
        name = "Open",
        type_ = "integer",
        json_path = ".status.connections.open",
        description = "Open server connections"
    ),
    printcolumn(
        name = "Host",
        type_ = "string",
        json_path = ".spec.host",
        description = "Warehouse host",
        priority = 1
    ),
    printcolumn(
        name = "Database",
        type_ = "string",
        json_path = ".spec.database",
        description = "Database on the warehouse",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("!self.allowLegacyPasswordAuth || self.tls.mode != 'disable'").message("allowLegacyPasswordAuth needs TLS (tls.mode must not be disable): the password would cross the network in the clear").field_path(".allowLegacyPasswordAuth"))]
pub struct DataSourceSpec {
    /// Host name or IP address of the warehouse.
    #[schemars(length(min = 1, max = 253), regex(pattern = HOST_PATTERN))]
    pub host: String,

    /// TCP port of the warehouse, 1-65535.
    #[serde(default = "default_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,

    /// Database to connect to (a PostgreSQL identifier: at most 63 bytes).
    #[schemars(length(min = 1, max = 63))]
    #[x_kube(validation = kube::core::Rule::new("size(bytes(self)) <= 63").message("must be at most 63 bytes (PostgreSQL identifier limit)"))]
    pub database: String,

    /// Role to log in as (a PostgreSQL identifier: at most 63 bytes).
    #[schemars(length(min = 1, max = 63))]
    #[x_kube(validation = kube::core::Rule::new("size(bytes(self)) <= 63").message("must be at most 63 bytes (PostgreSQL identifier limit)"))]
    pub user: String,

    /// Secret in the same namespace holding the password. It is read by the
    /// shard that owns the source; a changed value is used for new connections.
    pub password_secret_ref: SecretKeyRef,

    /// TLS towards the warehouse.
    #[serde(default)]
    pub tls: TlsSpec,

    /// Pool sizing and timeouts. Durations are written as `<integer><unit>`
    /// parts with units ms, s, m, h, for example `500ms`, `30s` or `1h30m`.
    #[serde(default)]
    pub pool: PoolSpec,

    /// When true the source's pool is closed and queries to it are refused;
    /// the assignment to a shard is kept.
    #[serde(default)]
    pub paused: bool,

    /// How a shard makes sure that no earlier owner (a frozen, partitioned
    /// or orphaned shard process) still holds connections of this source
    /// before it opens its own. Terminate: its first connection ends them
    /// with pg_terminate_backend (a role may end its own backends) and waits
    /// until they are gone; if the warehouse refuses, the pool does not open
    /// and the source is Degraded with the reason in lastError. Disabled:
    /// the step is skipped, and only the shard Lease fences (a frozen owner
    /// may then keep its connections beside its successor's).
    #[serde(default)]
    pub fencing: Fencing,

    /// Whether a shard answers a warehouse that asks for the password in
    /// cleartext or as an MD5 hash (older servers, some managed services).
    /// False: only SCRAM-SHA-256 is used, and a connection whose server asks
    /// for anything weaker fails with nothing sent (a man in the middle
    /// cannot downgrade the exchange to capture the password). True: such
    /// requests are answered on TLS connections only; not allowed with
    /// tls.mode disable.
    #[serde(default)]
    pub allow_legacy_password_auth: bool,

    /// Admission in front of the pool: how many transactions may wait for
    /// a connection, how waiting clients share it, and per-client quotas.
    /// The owning shard enforces them, and every source has exactly one
    /// owner, so each limit is exact for the whole cluster however many
    /// routers there are. Changing them does not reopen the pool.
    #[serde(default)]
    pub limits: LimitsSpec,
}

/// Admission limits of one source.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LimitsSpec {
    /// Most transactions waiting for a connection at once, 0-10000. Past
    /// it a transaction is refused at once (SQLSTATE 53300, HTTP 429); one
    /// still waiting after pool.acquireTimeout is refused the same way.
    #[serde(default = "default_max_queued")]
    #[schemars(range(min = 0, max = 10000))]
    pub max_queued: i32,
    /// A PostgreSQL client whose transaction has waited this long gets a
    /// NOTICE saying it is queued and at which position.
    #[serde(default = "default_notice_after")]
    #[schemars(length(max = 32), regex(pattern = DURATION_PATTERN))]
    pub notice_after: String,
    /// How waiting transactions are admitted. Fair: round-robin over client
    /// identities (router user or token subject), weighted by the router's
    /// per-identity weights, so a client with many queued transactions
    /// delays one with few by about one transaction. Arrival: in arrival
    /// order, whoever sent them.
    #[serde(default)]
    pub fairness: Fairness,
    /// Quotas per client identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_client: Option<PerClientSpec>,
}

/// How a source's waiting transactions are admitted.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Fairness {
    // Round-robin over client identities, weighted.
    #[default]
    Fair,
    // First come, first served.
    Arrival,
}

/// Quotas of one client identity on one source.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("!has(self.burst) || has(self.rate)").message("burst needs rate").field_path(".burst"))]
// The API server checks a whole-number value against the minimum cut to a
// whole number (0), so `rate: 0` would pass the range alone.
#[x_kube(validation = kube::core::Rule::new("!has(self.rate) || self.rate >= 0.01").message("rate must be at least 0.01 per second").field_path(".rate"))]
pub struct PerClientSpec {
    /// Most transactions of one client running at once, 1-1000; more wait
    /// in the queue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_concurrent: Option<i32>,
    /// Transactions per second of one client (a token bucket), 0.01-100000.
    /// A transaction without a token waits for one; one that could not get
    /// a token within pool.acquireTimeout is refused at once (53300, 429).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.01, max = 100000.0))]
    pub rate: Option<f64>,
    /// Transactions one client may start at once above the rate (the
    /// bucket's size), 1-100000; default: one second's worth of rate (at
    /// least 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100000))]
    pub burst: Option<i32>,
    /// Longest one statement of a client may run: past it the shard
    /// cancels it on the warehouse (the client gets SQLSTATE 57014, after
    /// a NOTICE naming this limit). A ceiling the client cannot raise with
    /// SET, unlike pool.statementTimeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32), regex(pattern = DURATION_PATTERN))]
    pub statement_timeout: Option<String>,
}

fn default_max_queued() -> i32 {
    1000
}
fn default_notice_after() -> String {
    "2s".into()
}

impl Default for LimitsSpec {
    fn default() -> Self {
        Self {
            max_queued: default_max_queued(),
            notice_after: default_notice_after(),
            fairness: Fairness::default(),
            per_client: None,
        }
    }
}

/// Fencing by the database before a shard opens a source.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Fencing {
    // End every backend of the source that another shard process opened.
    #[default]
    Terminate,
    // Skip the step (warehouses that refuse pg_terminate_backend).
    Disabled,
}

fn default_port() -> i32 {
    5432
}

/// A key in a Secret of the DataSource's namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253), regex(pattern = OBJECT_NAME_PATTERN))]
    pub name: String,
    /// Key within the Secret's data.
    #[schemars(length(min = 1, max = 253), regex(pattern = SECRET_KEY_PATTERN))]
    pub key: String,
}

/// TLS settings, with libpq's sslmode meanings.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("self.mode != 'verify-full' || has(self.caSecretRef)").message("verify-full needs caSecretRef").field_path(".caSecretRef"))]
pub struct TlsSpec {
    /// disable: plain TCP; prefer: TLS when the server offers it; require:
    /// TLS without certificate checks; verify-full: TLS with the certificate
    /// chain checked against caSecretRef and the host name checked.
    #[serde(default)]
    pub mode: TlsMode,
    /// Secret key holding the PEM CA bundle used by verify-full.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret_ref: Option<SecretKeyRef>,
}

/// libpq-style TLS mode.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum TlsMode {
    // Plain TCP.
    Disable,
    // TLS when the server offers it, plain TCP otherwise.
    #[default]
    Prefer,
    // TLS without certificate verification.
    Require,
    // TLS with certificate chain and host name verification.
    VerifyFull,
}

/// Pool sizing and timeouts. Durations are written as `<integer><unit>`
/// parts with units ms, s, m, h, for example `500ms`, `30s` or `1h30m`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("self.minIdle <= self.maxSize").message("minIdle must not exceed maxSize").field_path(".minIdle"))]
pub struct PoolSpec {
    /// Connections kept open even when idle (warm), 0-1000.
    #[serde(default = "default_min_idle")]
    #[schemars(range(min = 0, max = 1000))]
    pub min_idle: i32,
    /// Most connections open at once, 1-1000.
    #[serde(default = "default_max_size")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_size: i32,
    /// Time allowed to open one server connection (TCP, TLS, authentication).
    #[serde(default = "default_connect_timeout")]
    #[schemars(length(max = 32), regex(pattern = DURATION_PATTERN))]
    pub connect_timeout: String,
    /// Time a query may wait for a free connection before it fails.
    #[serde(default = "default_acquire_timeout")]
    #[schemars(length(max = 32), regex(pattern = DURATION_PATTERN))]
    pub acquire_timeout: String,
    /// Idle connections above minIdle are closed after this long.
    #[serde(default = "default_idle_timeout")]
    #[schemars(length(max = 32), regex(pattern = DURATION_PATTERN))]
    pub idle_timeout: String,
    /// Connections are replaced after this long: each at a random moment
    /// in the last tenth of it, one at a time per source (at most one a
    /// second).
    #[serde(default = "default_max_lifetime")]
    #[schemars(length(max = 32), regex(pattern = DURATION_PATTERN))]
    pub max_lifetime: String,
    /// Server-side statement_timeout for every query; unset means none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32), regex(pattern = DURATION_PATTERN))]
    pub statement_timeout: Option<String>,
}

fn default_min_idle() -> i32 {
    1
}
fn default_max_size() -> i32 {
    10
}
fn default_connect_timeout() -> String {
    "10s".into()
}
fn default_acquire_timeout() -> String {
    "5s".into()
}
fn default_idle_timeout() -> String {
    "10m".into()
}
fn default_max_lifetime() -> String {
    "1h".into()
}

impl Default for PoolSpec {
    fn default() -> Self {
        Self {
            min_idle: default_min_idle(),
            max_size: default_max_size(),
            connect_timeout: default_connect_timeout(),
            acquire_timeout: default_acquire_timeout(),
            idle_timeout: default_idle_timeout(),
            max_lifetime: default_max_lifetime(),
            statement_timeout: None,
        }
    }
}

/// Observed state, written by the operator (assignment) and the owning shard
/// (phase, connections), each with its own server-side-apply field manager.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct DataSourceStatus {
    /// Index of the pool shard that owns the source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard: Option<i32>,
    /// Lifecycle phase: Pending (no shard has picked the source up yet),
    /// Connecting (its shard is opening the pool), Ready (minIdle
    /// connections open, queries served), Degraded (serving, but below
    /// minIdle or with recent connection errors), Paused (spec.paused; the
    /// pool is closed), Error (the pool cannot be opened; see lastError).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// Conditions and their reasons. Assigned (written by the operator):
    /// True with reason Assigned once the source has a shard (status.shard).
    /// Ready (written by the owning shard): True with reason PoolWarm when
    /// minIdle connections are open; False with reason Connecting while the
    /// pool opens its connections, ConnectionErrors when it serves but is
    /// below minIdle or saw connection errors (the message is lastError),
    /// CannotConnect when the pool cannot be opened (lastError says why: the
    /// password Secret, a namespace not in the chart's tenantNamespaces, TLS,
    /// authentication, the warehouse unreachable), NotServing when the
    /// source is paused or no shard serves it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Server connections of the owning shard's pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections: Option<ConnectionCounts>,
    /// Generation of the spec the shard last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Last connection or configuration error; never contains a secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Number of shards when the operator last placed or kept the source: it
    /// moves only to a shard added since, or when its shard is removed or
    /// overloaded. Not rewritten when the new count could not change where
    /// the source goes (its preferred shard is not one added or removed
    /// since): in a rescale that is most sources.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assigned_among: Option<i32>,
    /// The shard holding the source's pool now; cleared by that shard once it
    /// has closed the pool, which lets the next owner open it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serving_shard: Option<i32>,
    /// The shard pod holding the source's pool now (changes on handover).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub served_by: Option<String>,
}

/// Lifecycle phase of a source.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    // Not yet assigned to a shard, or its shard has not picked it up.
    Pending,
    // The shard is opening the pool.
    Connecting,
    // minIdle connections were opened and no attempt failed since: queries
    // are served (a connection being renewed or replaced keeps it Ready).
    Ready,
    // Serving, but recent connection attempts failed.
    Degraded,
    // spec.paused is true: the pool is closed.
    Paused,
    // The pool cannot be opened (see lastError).
    Error,
}

impl Phase {
    /// Every phase.
    pub const ALL: [Phase; 6] = [
        Phase::Pending,
        Phase::Connecting,
        Phase::Ready,
        Phase::Degraded,
        Phase::Paused,
        Phase::Error,
    ];

    /// The name the status and the metrics use.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::Connecting => "Connecting",
            Phase::Ready => "Ready",
            Phase::Degraded => "Degraded",
            Phase::Paused => "Paused",
            Phase::Error => "Error",
        }
    }
}

/// Connection counts of one source's pool.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionCounts {
    /// Open server connections.
    pub open: i32,
    /// Open and idle.
    pub idle: i32,
    /// Open and running a transaction.
    pub in_use: i32,
}

/// A duration field that does not match [`DURATION_PATTERN`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid duration {0:?}: expected <integer><unit> parts with units ms, s, m, h")]
pub struct DurationError(pub String);

/// Parses a duration written as in the schema (`500ms`, `30s`, `1h30m`).
pub fn parse_duration(s: &str) -> Result<Duration, DurationError> {
    let err = || DurationError(s.to_owned());
    if s.is_empty() {
        return Err(err());
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(err());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| err())?;
        rest = &rest[digits..];
        let (unit, len) = if rest.starts_with("ms") {
            (Duration::from_millis(1), 2)
        } else if rest.starts_with('s') {
            (Duration::from_secs(1), 1)
        } else if rest.starts_with('m') {
            (Duration::from_secs(60), 1)
        } else if rest.starts_with('h') {
            (Duration::from_secs(3600), 1)
        } else {
            return Err(err());
        };
        rest = &rest[len..];
        let part = unit
            .checked_mul(u32::try_from(n).map_err(|_| err())?)
            .ok_or_else(err)?;
        total = total.checked_add(part).ok_or_else(err)?;
    }
    Ok(total)
}

/// Server-side applies `status` (a JSON object with the fields this writer
/// owns) to a DataSource's status subresource under `field_manager`.
pub async fn apply_status(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    field_manager: &str,
    status: serde_json::Value,
) -> Result<(), kube::Error> {
    apply_status_at(client, namespace, name, field_manager, status, None)
        .await
        .map(|_| ())
}

/// [`apply_status`], applied only to the object's version `resource_version`
/// when one is given: the API server answers 409 Conflict when the object
/// changed since (see [`is_conflict`]). A writer whose decision rests on
/// what it saw (a shard reporting a source as its own) passes the version
/// it saw, so a write that was overtaken by a reassignment cannot land on
/// the newer object. Returns the object's resourceVersion after the write
/// (unchanged when the write changed nothing).
pub async fn apply_status_at(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    field_manager: &str,
    status: serde_json::Value,
    resource_version: Option<&str>,
) -> Result<Option<String>, kube::Error> {
    let api: kube::Api<DataSource> = kube::Api::namespaced(client.clone(), namespace);
    let mut patch = serde_json::json!({"apiVersion": "shardpool.dev/v1alpha1", "kind": "DataSource", "status": status});
    if let Some(rv) = resource_version {
        patch["metadata"] = serde_json::json!({"name": name, "resourceVersion": rv});
    }
    let pp = kube::api::PatchParams::apply(field_manager).force();
    let written = api
        .patch_status(name, &pp, &kube::api::Patch::Apply(patch))
        .await?;
    Ok(written.metadata.resource_version)
}

/// Whether an API error is 409 Conflict: the object changed since the
/// version a conditional write named.
pub fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

/// The CustomResourceDefinition as YAML, exactly as `crds/datasource.yaml`.
pub fn crd_yaml() -> Result<String, serde_yaml::Error> {
    let body = serde_yaml::to_string(&DataSource::crd())?;
    Ok(format!(
        "# Generated by `shardpool crd` from src/crd.rs; do not edit (run `make generate`).\n{body}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        for bad in ["", "10", "s", "1d", "1.5s", "-1s", "99999999999999h"] {
            assert!(parse_duration(bad).is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn duration_pattern_agrees_with_parser() {
        // The API server checks DURATION_PATTERN; the shard parses. They must
        // accept exactly the same strings.
        let re = regex::Regex::new(DURATION_PATTERN).expect("pattern compiles");
        for s in [
            "500ms", "1h30m", "10s", "1m1s1ms", "0s", "", "10", "s", "1d", "1.5s", "-1s", "1 s",
            "5M", "1ms1", "ms",
        ] {
            assert_eq!(re.is_match(s), parse_duration(s).is_ok(), "{s:?}");
        }
    }

    #[test]
    fn crd_has_names_columns_and_rules() {
        let crd = DataSource::crd();
        assert_eq!(crd.spec.group, GROUP);
        // Not "ds": kubectl resolves that to DaemonSets.
        assert_eq!(
            crd.spec.names.short_names.as_deref(),
            Some(&["dsrc".to_string()][..])
        );
        let v = &crd.spec.versions[0];
        let cols: Vec<_> = v
            .additional_printer_columns
            .iter()
            .flatten()
            .map(|c| (c.name.as_str(), c.priority.unwrap_or(0)))
            .collect();
        assert_eq!(
            cols,
            [
                ("Shard", 0),
                ("Phase", 0),
                ("Open", 0),
                ("Host", 1),
                ("Database", 1),
                ("Age", 0)
            ],
            "host and database only at -o wide"
        );
        let status = v
            .schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .and_then(|s| s.properties.as_ref())
            .and_then(|p| p.get("status"))
            .and_then(|s| s.properties.as_ref())
            .expect("status properties");
        let described = |field: &str| {
            status
                .get(field)
                .and_then(|f| f.description.clone())
                .unwrap_or_default()
        };
        for r in reason::ALL {
            assert!(
                described("conditions").contains(r),
                "condition reason {r} is not described in the CRD"
            );
        }
        for p in Phase::ALL.map(Phase::as_str) {
            assert!(described("phase").contains(p), "phase {p} is not described");
        }
        let yaml = crd_yaml().expect("crd serializes");
        assert!(yaml.contains("self.minIdle <= self.maxSize"));
        assert!(yaml.contains("x-kubernetes-list-map-keys"));
    }

    #[test]
    fn spec_defaults_fill_in() {
        let spec: DataSourceSpec = serde_json::from_value(serde_json::json!({
            "host": "db.example.com", "database": "sales", "user": "bi",
            "passwordSecretRef": {"name": "db", "key": "password"}
        }))
        .expect("minimal spec parses");
        assert_eq!(spec.port, 5432);
        assert_eq!(spec.tls.mode, TlsMode::Prefer);
        assert_eq!(spec.pool, PoolSpec::default());
        assert_eq!(spec.fencing, Fencing::Terminate);
    }
}
