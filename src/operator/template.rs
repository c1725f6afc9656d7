//! The shard template: what every shard Deployment looks like, read from the
//! ConfigMap the Helm chart renders (`<release>-shard-template`, key
//! `template.yaml`). A hash of it, stamped on each shard's pod template,
//! tells which shards run an old template and must be rolled.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction,
    LocalObjectReference, ObjectFieldSelector, PodSecurityContext, PodSpec, PodTemplateSpec, Probe,
    ResourceRequirements, SeccompProfile, SecurityContext, Toleration,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::{Deserialize, Serialize};

/// Annotation carrying the template hash on shard Deployments and pods.
pub const HASH_ANNOTATION: &str = "shardpool.dev/template-hash";

/// The shard settings the platform team controls through Helm values.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ShardTemplate {
    /// Number of shards (the fixed count, or the fallback when autoscaling).
    pub count: u32,
    /// Shard count from the total pool size instead of `count`.
    #[serde(default)]
    pub autoscale: Option<Autoscale>,
    /// ServiceAccount of shard pods.
    pub service_account_name: String,
    /// Image of the shardpool binary.
    pub image: String,
    /// Pull policy.
    #[serde(default)]
    pub image_pull_policy: Option<String>,
    /// Drain time on shutdown.
    #[serde(default = "default_grace")]
    pub termination_grace_period_seconds: i64,
    /// RUST_LOG of shards.
    #[serde(default)]
    pub log_level: Option<String>,
    /// SHARDPOOL_LOG_FORMAT of shards.
    #[serde(default)]
    pub log_format: Option<String>,
    /// Runtime threads of a shard process (SHARDPOOL_WORKER_THREADS: 1 one
    /// thread, 0 one per core; unset = the binary's default, 1).
    #[serde(default)]
    pub worker_threads: Option<u32>,
    /// Server connections a shard process opens at the same moment, at
    /// most (SHARDPOOL_CONNECT_CONCURRENCY; unset = the binary's default).
    #[serde(default)]
    pub connect_limit: Option<u32>,
    /// Resources of the shard container.
    #[serde(default)]
    pub resources: Option<ResourceRequirements>,
    /// Extra pod annotations (changing them rolls the shards).
    #[serde(default)]
    pub pod_annotations: Option<BTreeMap<String, String>>,
    /// Node selector.
    #[serde(default)]
    pub node_selector: Option<BTreeMap<String, String>>,
    /// Tolerations.
    #[serde(default)]
    pub tolerations: Option<Vec<Toleration>>,
    /// Pull secrets.
    #[serde(default)]
    pub image_pull_secrets: Option<Vec<LocalObjectReference>>,
    /// How fast an unresponsive (frozen, wedged) shard process is restarted.
    #[serde(default)]
    pub liveness: Option<Liveness>,
    /// Shards may read Secrets in every namespace (the chart granted it):
    /// they watch Secret metadata with one cluster-wide watch.
    #[serde(default)]
    pub secrets_cluster_wide: bool,
    /// Mutual TLS on router links (the chart's links.mutualTLS); unset
    /// means on.
    #[serde(default, rename = "linkTLS")]
    pub link_tls: Option<bool>,
}

/// The shard container's liveness probe. A shard that stops answering holds
/// its sources hostage (its Lease stays held, nobody else may open them), so
/// it is restarted within seconds; the replacement process of the same pod
/// takes the Lease back at once and fences the old process's connections.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Liveness {
    /// Seconds between probes.
    #[serde(default = "one")]
    pub period_seconds: i32,
    /// Seconds a probe may take.
    #[serde(default = "one")]
    pub timeout_seconds: i32,
    /// Failed probes in a row before the restart.
    #[serde(default = "three")]
    pub failure_threshold: i32,
    /// Seconds between SIGTERM and SIGKILL when the probe restarts the
    /// process (a frozen process cannot drain anyway).
    #[serde(default = "one")]
    pub termination_grace_period_seconds: i64,
}

fn one<T: From<u8>>() -> T {
    T::from(1)
}

fn three() -> i32 {
    3
}

impl Default for Liveness {
    fn default() -> Self {
        Liveness {
            period_seconds: 1,
            timeout_seconds: 1,
            failure_threshold: 3,
            termination_grace_period_seconds: 1,
        }
    }
}

/// Autoscaling of the shard count from the summed maxSize of all sources.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Autoscale {
    /// Summed pool maxSize one shard is sized for.
    pub connections_per_shard: u64,
    /// Fewest shards.
    pub min: u32,
    /// Most shards.
    pub max: u32,
}

fn default_grace() -> i64 {
    60
}

impl ShardTemplate {
    /// Parses `template.yaml`.
    pub fn parse(yaml: &str) -> Result<ShardTemplate, serde_yaml::Error> {
        serde_yaml::from_str(yaml)
    }

    /// Shards wanted for `total` summed maxSize: the fixed count, or
    /// ceil(total / connectionsPerShard) within [min, max].
    pub fn shard_count(&self, total: u64) -> u32 {
        match &self.autoscale {
            None => self.count,
            Some(a) => {
                let min = a.min.max(1);
                let max = a.max.max(min);
                let want = total.div_ceil(a.connections_per_shard.max(1));
                u32::try_from(want).unwrap_or(u32::MAX).clamp(min, max)
            }
        }
    }

    /// A stable hash of everything that shapes a shard pod (not the count).
    pub fn hash(&self) -> String {
        let mut t = self.clone();
        t.count = 0;
        t.autoscale = None;
        let json = serde_json::to_vec(&t).unwrap_or_default();
        // FNV-1a: stable across Rust releases, enough to detect a change.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in json {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        format!("{h:016x}")
    }
}

/// Labels of shard K's objects.
pub fn labels(release: &str, index: u32) -> BTreeMap<String, String> {
    [
        ("app.kubernetes.io/name", "shardpool".to_string()),
        ("app.kubernetes.io/instance", release.to_string()),
        ("app.kubernetes.io/component", "shard".to_string()),
        (
            "app.kubernetes.io/managed-by",
            "shardpool-operator".to_string(),
        ),
        ("shardpool.dev/shard", index.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..Default::default()
    }
}

/// The desired Deployment of shard `index` (pure: no client).
pub fn deployment(
    t: &ShardTemplate,
    release: &str,
    namespace: &str,
    index: u32,
    owner: Option<&OwnerReference>,
) -> Deployment {
    let name = super::shard_name(index);
    let labels = labels(release, index);
    let selector: BTreeMap<String, String> = labels
        .iter()
        .filter(|(k, _)| k.as_str() != "app.kubernetes.io/managed-by")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let hash = t.hash();
    let mut pod_annotations = t.pod_annotations.clone().unwrap_or_default();
    pod_annotations.insert(HASH_ANNOTATION.into(), hash.clone());
    let container = Container {
        name: "shard".into(),
        image: Some(t.image.clone()),
        image_pull_policy: t.image_pull_policy.clone(),
        args: Some(vec!["shard".into(), "--index".into(), index.to_string()]),
        env: Some(
            vec![
                env(
                    "RUST_LOG",
                    t.log_level.clone().unwrap_or_else(|| "info".into()),
                ),
                env(
                    "SHARDPOOL_LOG_FORMAT",
                    t.log_format.clone().unwrap_or_else(|| "json".into()),
                ),
                field_env("POD_NAME", "metadata.name"),
                field_env("POD_NAMESPACE", "metadata.namespace"),
                field_env("POD_IP", "status.podIP"),
                env(
                    "SHARDPOOL_DRAIN_SECONDS",
                    (t.termination_grace_period_seconds - 5).max(1).to_string(),
                ),
            ]
            .into_iter()
            .chain(
                t.worker_threads
                    .map(|n| env("SHARDPOOL_WORKER_THREADS", n.to_string())),
            )
            .chain(
                t.connect_limit
                    .map(|n| env("SHARDPOOL_CONNECT_CONCURRENCY", n.to_string())),
            )
            .chain(
                t.secrets_cluster_wide
                    .then(|| env("SHARDPOOL_SECRETS_CLUSTER_WIDE", "true")),
            )
            .chain((t.link_tls == Some(false)).then(|| env("SHARDPOOL_LINK_TLS", "false")))
            .chain(owner.into_iter().flat_map(|o| {
                // The shard's Lease gets the same owner as its Deployment.
                [
                    env("SHARDPOOL_OWNER_DEPLOYMENT", o.name.clone()),
                    env("SHARDPOOL_OWNER_UID", o.uid.clone()),
                ]
            }))
            .collect(),
        ),
        ports: Some(vec![
            ContainerPort {
                name: Some("shard".into()),
                container_port: 6432,
                ..Default::default()
            },
            ContainerPort {
                name: Some("metrics".into()),
                container_port: 9090,
                ..Default::default()
            },
        ]),
        readiness_probe: Some(Probe {
            http_get: Some(HTTPGetAction {
                path: Some("/readyz".into()),
                port: IntOrString::String("metrics".into()),
                ..Default::default()
            }),
            period_seconds: Some(1),
            ..Default::default()
        }),
        liveness_probe: {
            let l = t.liveness.clone().unwrap_or_default();
            Some(Probe {
                http_get: Some(HTTPGetAction {
                    path: Some("/healthz".into()),
                    port: IntOrString::String("metrics".into()),
                    ..Default::default()
                }),
                period_seconds: Some(l.period_seconds.max(1)),
                timeout_seconds: Some(l.timeout_seconds.max(1)),
                failure_threshold: Some(l.failure_threshold.max(1)),
                termination_grace_period_seconds: Some(l.termination_grace_period_seconds.max(1)),
                ..Default::default()
            })
        },
        resources: t.resources.clone(),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    Deployment {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: Some(namespace.into()),
            labels: Some(labels.clone()),
            annotations: Some([(HASH_ANNOTATION.to_string(), hash)].into()),
            owner_references: owner.map(|o| vec![o.clone()]),
            ..Default::default()
        },
        spec: Some(DeploymentSpec {
            replicas: Some(1),
            selector: LabelSelector {
                match_labels: Some(selector),
                ..Default::default()
            },
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(IntOrString::Int(1)),
                    max_unavailable: Some(IntOrString::Int(0)),
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    annotations: Some(pod_annotations),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some(t.service_account_name.clone()),
                    termination_grace_period_seconds: Some(t.termination_grace_period_seconds),
                    containers: vec![container],
                    node_selector: t.node_selector.clone(),
                    tolerations: t.tolerations.clone(),
                    image_pull_secrets: t.image_pull_secrets.clone(),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(65532),
                        run_as_group: Some(65532),
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".into(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template() -> ShardTemplate {
        ShardTemplate::parse(
            "count: 2\nserviceAccountName: sp-shard\nimage: shardpool:1\npodAnnotations: {}\n",
        )
        .expect("parses")
    }

    #[test]
    fn autoscale_sizes_from_total_max_size_within_bounds() {
        let mut t = template();
        assert_eq!(t.shard_count(1_000_000), 2, "fixed count without autoscale");
        t.autoscale = Some(Autoscale {
            connections_per_shard: 1000,
            min: 2,
            max: 5,
        });
        assert_eq!(t.shard_count(0), 2);
        assert_eq!(t.shard_count(2000), 2);
        assert_eq!(t.shard_count(2001), 3);
        assert_eq!(t.shard_count(4000), 4);
        assert_eq!(t.shard_count(90_000), 5);
        let h = t.hash();
        t.autoscale = None;
        assert_eq!(h, t.hash(), "autoscale settings do not roll the shards");
    }

    #[test]
    fn hash_ignores_count_and_sees_annotations() {
        let a = template();
        let mut b = a.clone();
        b.count = 7;
        assert_eq!(a.hash(), b.hash());
        b.pod_annotations = Some([("rev".to_string(), "2".to_string())].into());
        assert_ne!(a.hash(), b.hash());
    }

    #[test]
    fn deployment_rolls_one_pod_at_a_time() {
        let d = deployment(&template(), "sp", "ns", 3, None);
        assert_eq!(d.metadata.name.as_deref(), Some("shardpool-shard-3"));
        let spec = d.spec.expect("spec");
        let ru = spec
            .strategy
            .and_then(|s| s.rolling_update)
            .expect("rolling update");
        assert_eq!(ru.max_surge, Some(IntOrString::Int(1)));
        assert_eq!(ru.max_unavailable, Some(IntOrString::Int(0)));
        let pod = spec.template.spec.expect("pod spec");
        assert_eq!(
            pod.containers[0].args.as_deref(),
            Some(&["shard".to_string(), "--index".into(), "3".into()][..])
        );
        assert_eq!(
            spec.template
                .metadata
                .and_then(|m| m.labels)
                .and_then(|l| l.get("shardpool.dev/shard").cloned())
                .as_deref(),
            Some("3")
        );
    }

    /// The value of the shard container's environment variable `name`.
    fn shard_env(t: &ShardTemplate, name: &str) -> Option<String> {
        let d = deployment(t, "sp", "ns", 0, None);
        d.spec
            .and_then(|s| s.template.spec)
            .and_then(|p| p.containers[0].env.clone())
            .unwrap_or_default()
            .into_iter()
            .find(|e| e.name == name)
            .and_then(|e| e.value)
    }

    #[test]
    fn worker_threads_reach_the_shard_process() {
        let env_of = |t: &ShardTemplate| shard_env(t, "SHARDPOOL_WORKER_THREADS");
        let mut t = template();
        assert_eq!(env_of(&t), None, "unset: the binary's default");
        t.worker_threads = Some(0);
        assert_eq!(env_of(&t).as_deref(), Some("0"));
        let h = t.hash();
        t.worker_threads = Some(1);
        assert_ne!(h, t.hash(), "a change rolls the shards");
    }

    #[test]
    fn the_connect_limit_reaches_the_shard_process() {
        let env_of = |t: &ShardTemplate| shard_env(t, "SHARDPOOL_CONNECT_CONCURRENCY");
        let mut t = template();
        assert_eq!(env_of(&t), None, "unset: the binary's default");
        t.connect_limit = Some(64);
        assert_eq!(env_of(&t).as_deref(), Some("64"));
    }

    #[test]
    fn the_cluster_wide_secrets_opt_in_reaches_the_shard_process_only_when_set() {
        let env_of = |t: &ShardTemplate| shard_env(t, "SHARDPOOL_SECRETS_CLUSTER_WIDE");
        let mut t = template();
        assert_eq!(env_of(&t), None, "off by default: per-namespace watches");
        t.secrets_cluster_wide = true;
        assert_eq!(env_of(&t).as_deref(), Some("true"));
    }
}
