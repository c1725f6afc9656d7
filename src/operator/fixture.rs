//! A fake API server for the reconcile pass's unit tests: a tower-test mock
//! service behind a real [`kube::Client`] that answers the calls a pass
//! makes (status and Deployment applies, deletes, Events) and records them,
//! so that a test reads as a scenario: given these objects in the watch
//! caches, one pass makes exactly these writes.
//!
//! Only pure reconcile logic is proven here; that the writes have the
//! intended effect on a real API server is the e2e suite's job.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use k8s_openapi::api::apps::v1::{Deployment, DeploymentStatus};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::client::Body;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher;
use kube::{Client, Resource};
use serde_json::{Value, json};

use super::OperatorConfig;
use super::metrics::OperatorMetrics;
use super::reconcile::{Context, Stores};
use super::template::{self, HASH_ANNOTATION, ShardTemplate};
use crate::crd::DataSource;

/// Namespace of the release in every scenario.
pub const NS: &str = "sp";

/// One request the pass made.
#[derive(Debug, Clone)]
pub struct Call {
    /// HTTP method.
    pub method: Method,
    /// Path without the query string.
    pub path: String,
    /// The JSON body (Null when there was none).
    pub body: Value,
}

impl Call {
    /// Whether this is a write (anything but GET).
    pub fn is_write(&self) -> bool {
        self.method != Method::GET
    }
}

/// The fake API server: every request it answered, in order.
pub struct ApiServer {
    /// Filled by the serving task, read by the test.
    calls: Arc<Mutex<Vec<Call>>>,
}

impl ApiServer {
    /// Starts the fake server; the client talks only to it.
    pub fn start() -> (Client, ApiServer) {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let calls: Arc<Mutex<Vec<Call>>> = Arc::default();
        let record = calls.clone();
        tokio::spawn(async move {
            while let Some((req, send)) = handle.next_request().await {
                let (parts, body) = req.into_parts();
                let bytes = body.collect_bytes().await.unwrap_or_default();
                let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                let call = Call {
                    method: parts.method.clone(),
                    path: parts.uri.path().to_string(),
                    body,
                };
                let (status, answer) = answer(&call);
                if let Ok(mut c) = record.lock() {
                    c.push(call);
                }
                let resp = Response::builder()
                    .status(status)
                    .header("content-type", "application/json")
                    .body(Body::from(answer.to_string().into_bytes()))
                    .expect("a valid response");
                send.send_response(resp);
            }
        });
        (Client::new(service, NS), ApiServer { calls })
    }

    /// The requests answered so far.
    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().map(|c| c.clone()).unwrap_or_default()
    }

    /// The writes answered so far, as "METHOD path".
    pub fn writes(&self) -> Vec<String> {
        self.calls()
            .into_iter()
            .filter(Call::is_write)
            .map(|c| format!("{} {}", c.method, c.path))
            .collect()
    }

    /// Waits (up to a second) until a call matches; Events are published in
    /// the background, after the pass returns.
    pub async fn wait_for(&self, what: impl Fn(&Call) -> bool) -> Option<Call> {
        for _ in 0..100 {
            if let Some(c) = self.calls().into_iter().find(|c| what(c)) {
                return Some(c);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        None
    }
}

/// The answer to one call: what a real API server would send back, as far
/// as the client needs to decode it.
fn answer(call: &Call) -> (StatusCode, Value) {
    let p: Vec<&str> = call.path.trim_matches('/').split('/').collect();
    match (call.method.as_str(), p.as_slice()) {
        // Server-side apply of a DataSource's status: the object back.
        (
            "PATCH",
            [
                "apis",
                "shardpool.dev",
                "v1alpha1",
                "namespaces",
                ns,
                "datasources",
                name,
                "status",
            ],
        ) => {
            let mut ds = source_json(ns, name);
            ds["status"] = call.body["status"].clone();
            (StatusCode::OK, ds)
        }
        // Apply of a Deployment, or an Event (created or patched): the body back.
        ("PATCH", ["apis", "apps", "v1", "namespaces", _, "deployments", _])
        | ("POST", ["apis", "events.k8s.io", "v1", "namespaces", _, "events"])
        | ("PATCH", ["apis", "events.k8s.io", "v1", "namespaces", _, "events", _]) => {
            (StatusCode::OK, call.body.clone())
        }
        ("DELETE", ["apis", "apps", "v1", "namespaces", _, "deployments", _]) => (
            StatusCode::OK,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Success", "metadata": {}}),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                   "reason": "NotFound", "code": 404, "message": "not served by the fixture",
                   "metadata": {}}),
        ),
    }
}

/// A DataSource's JSON with a fixed spec.
fn source_json(ns: &str, name: &str) -> Value {
    json!({
        "apiVersion": "shardpool.dev/v1alpha1",
        "kind": "DataSource",
        "metadata": {"name": name, "namespace": ns, "generation": 1},
        "spec": {"host": "warehouse", "database": "db", "user": "bi",
                 "passwordSecretRef": {"name": "pw", "key": "password"},
                 "pool": {"maxSize": 10}},
    })
}

/// A DataSource `ns/name` with `status` (JSON, may be Null).
pub fn source(ns: &str, name: &str, status: Value) -> DataSource {
    let mut v = source_json(ns, name);
    if !status.is_null() {
        v["status"] = status;
    }
    serde_json::from_value(v).expect("a valid DataSource")
}

/// The shard template with `count` shards and `annotations` on shard pods
/// (changing them changes the template's hash).
pub fn shard_template(count: u32, annotations: &str) -> ShardTemplate {
    ShardTemplate::parse(&format!(
        "count: {count}\nserviceAccountName: sp-shard\nimage: shardpool:1\npodAnnotations: {annotations}\n"
    ))
    .expect("a valid template")
}

/// Shard `k`'s Deployment as built from `t`, rolled out and available.
pub fn settled_deployment(t: &ShardTemplate, k: u32) -> Deployment {
    let mut d = template::deployment(t, "shardpool", NS, k, None);
    d.metadata.generation = Some(1);
    d.status = Some(DeploymentStatus {
        observed_generation: Some(1),
        replicas: Some(1),
        updated_replicas: Some(1),
        available_replicas: Some(1),
        ready_replicas: Some(1),
        unavailable_replicas: Some(0),
        ..Default::default()
    });
    d
}

/// Shard `k`'s Lease, held by `holder`.
pub fn lease(k: u32, holder: &str) -> Lease {
    Lease {
        metadata: ObjectMeta {
            name: Some(super::shard_name(k)),
            namespace: Some(NS.into()),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(holder.into()),
            ..Default::default()
        }),
    }
}

/// A shard pod `name` running template `t`.
pub fn shard_pod(name: &str, t: &ShardTemplate) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(NS.into()),
            annotations: Some([(HASH_ANNOTATION.to_string(), t.hash())].into()),
            ..Default::default()
        },
        ..Default::default()
    }
}

/// What the watch caches hold at the start of a pass.
#[derive(Default)]
pub struct World {
    /// DataSources.
    pub sources: Vec<DataSource>,
    /// Shard Deployments.
    pub deployments: Vec<Deployment>,
    /// Shard Leases.
    pub leases: Vec<Lease>,
    /// Shard pods.
    pub pods: Vec<Pod>,
    /// The shard template, rendered into its ConfigMap.
    pub template: Option<ShardTemplate>,
}

/// A reader over `objects`, as a watch would have filled it.
fn store<K>(objects: Vec<K>) -> Store<K>
where
    K: Resource<DynamicType = ()> + Clone + std::fmt::Debug + Send + Sync + 'static,
{
    let (reader, mut writer) = reflector::store();
    for o in objects {
        writer.apply_watcher_event(&watcher::Event::Apply(o));
    }
    reader
}

impl World {
    /// The caches a pass reads.
    pub fn stores(self) -> Stores {
        let configmaps = self
            .template
            .map(|t| ConfigMap {
                metadata: ObjectMeta {
                    name: Some("shardpool-shard-template".into()),
                    namespace: Some(NS.into()),
                    ..Default::default()
                },
                data: Some(
                    [(
                        "template.yaml".to_string(),
                        serde_yaml::to_string(&t).expect("serialisable"),
                    )]
                    .into(),
                ),
                ..Default::default()
            })
            .into_iter()
            .collect();
        Stores {
            sources: store(self.sources),
            deployments: store(self.deployments),
            configmaps: store(configmaps),
            leases: store(self.leases),
            pods: store(self.pods),
        }
    }
}

/// A pass's context over `client`, with `max_moves` as the move budget.
pub fn context(client: Client, max_moves: usize) -> Context {
    let mut registry = prometheus_client::registry::Registry::default();
    Context {
        client: client.clone(),
        cfg: OperatorConfig {
            pod_name: "operator-0".into(),
            namespace: NS.into(),
            release: "shardpool".into(),
            shard_template: "shardpool-shard-template".into(),
            pod_ip: std::net::IpAddr::from([127, 0, 0, 1]),
            metrics_port: 0,
            epsilon: 0.25,
            max_moves,
            link_tls: true,
            max_shards: 16,
            link_ca_lifetime: "8760h".into(),
            link_cert_lifetime: "720h".into(),
        },
        owner: None,
        recorder: Recorder::new(
            client,
            Reporter {
                controller: "shardpool-operator".into(),
                instance: None,
            },
        ),
        metrics: OperatorMetrics::register(&mut registry),
        unseen: Default::default(),
    }
}
