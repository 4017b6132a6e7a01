//! The `MeteringCollector` custom resource: a collector StatefulSet described by the sidecar's own configuration.
//!
//! `spec.pipeline` is [`tally_sidecar::config::Config`], so the CRD schema and the collector's parser are one type.
//! Rules the API server can check at admission are CEL `x-kubernetes-validations`, so `kubectl apply` of a wrong
//! resource fails with a message that says what to fix.

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tally_sidecar::config::Config;

/// The field manager of every write the operator makes (children and status).
pub const FIELD_MANAGER: &str = "tally-operator";

/// Admission refuses a smaller `storage.size` (a transition rule: it only runs on updates).
const STORAGE_NO_SHRINK_RULE: &str = "!isQuantity(string(self)) || !isQuantity(string(oldSelf)) || \
     quantity(string(self)).compareTo(quantity(string(oldSelf))) >= 0";
/// What a user who tried to shrink the buffer reads.
pub const STORAGE_NO_SHRINK_MESSAGE: &str = "storage.size cannot shrink: Kubernetes cannot make a volume smaller; \
     keep the current size or set a larger one (to start over with smaller buffers, delete the collector and its \
     buffer-<name>-N claims, which loses events not yet delivered)";

/// Upper bound of `pipeline.outputs.targets`, so the API server can bound the cost of the uniqueness rule.
pub const MAX_OUTPUTS: u64 = 16;

/// A central Tally collector: a StatefulSet of tally-sidecar replicas, each with a persistent buffer.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "metering.tally.dev",
    version = "v1alpha1",
    kind = "MeteringCollector",
    plural = "meteringcollectors",
    shortname = "mc",
    namespaced,
    status = "MeteringCollectorStatus",
    derive = "PartialEq",
    printcolumn = r#"{"name":"Replicas","type":"integer","jsonPath":".spec.replicas"}"#,
    printcolumn = r#"{"name":"Ready","type":"integer","jsonPath":".status.readyReplicas"}"#,
    printcolumn = r#"{"name":"Status","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"Draining","type":"string","jsonPath":".status.conditions[?(@.type==\"Draining\")].status"}"#,
    printcolumn = r#"{"name":"Endpoint","type":"string","jsonPath":".status.endpoint"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct MeteringCollectorSpec {
    /// Number of collector replicas; each has its own buffer volume.
    #[serde(default = "default_replicas")]
    #[x_kube(validation = Rule::new("self >= 1").message("replicas must be at least 1"))]
    pub replicas: i32,
    /// The tally-sidecar image the collector runs.
    #[serde(default = "default_image")]
    pub image: String,
    /// CPU and memory of the collector container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// The persistent buffer of each replica.
    #[serde(default)]
    pub storage: StorageSpec,
    /// The Service in front of the replicas' ingest port.
    #[serde(default)]
    pub service: ServiceSpec,
    /// The collector configuration, exactly the tally-sidecar configuration file.
    #[serde(default)]
    #[schemars(schema_with = "pipeline_schema")]
    pub pipeline: Config,
    /// Sidecar injection into labelled workloads.
    #[serde(default)]
    pub injection: InjectionSpec,
    /// Namespaces never injected and whose events the collector drops (no metering loop).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude_namespaces: Vec<String>,
    /// A node agent on every node: where injected sidecars hand their events when the collector is unreachable, so
    /// they outlive the pod.
    #[serde(default)]
    pub node_agent: NodeAgentSpec,
}

/// The node agent: a DaemonSet of tally-sidecar buffering on a node directory and forwarding to the collector's
/// Service, reached by the injected sidecars through a node-local Service (`<name>-node`, `internalTrafficPolicy:
/// Local`). With it, a sidecar's outputs are the collector and then this agent (the `fallback` pattern): while the
/// collector is unreachable each batch goes to the agent on the same node, so a deleted pod's acknowledged events
/// are on the node, not in the pod's emptyDir. Its pods use a hostPath volume, which the `baseline` and `restricted`
/// Pod Security Standards forbid: the collector's namespace must allow `privileged` pods.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NodeAgentSpec {
    /// Whether to run the node agent and make injected sidecars fall back to it.
    #[serde(default)]
    pub enabled: bool,
    /// The node directory the agents buffer in; each collector uses `<hostPath>/<namespace>/<name>` below it.
    #[serde(default = "default_node_agent_path")]
    #[x_kube(validation = Rule::new("self.startsWith('/') && !self.contains('..')")
        .message("nodeAgent.hostPath must be an absolute path without `..`, such as /var/lib/tally"))]
    pub host_path: String,
    /// CPU and memory of the node agent container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
}

impl Default for NodeAgentSpec {
    fn default() -> Self {
        NodeAgentSpec {
            enabled: false,
            host_path: default_node_agent_path(),
            resources: None,
        }
    }
}

fn default_node_agent_path() -> String {
    "/var/lib/tally".into()
}

/// The buffer volume of each replica (`volumeClaimTemplates`).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StorageSpec {
    /// Requested size of each replica's buffer volume, a Kubernetes quantity such as `10Gi`. It can grow (the
    /// operator expands the claims when their StorageClass allows it) but never shrink.
    #[serde(default = "default_storage_size")]
    #[x_kube(
        validation = Rule::new("isQuantity(string(self))")
            .message("storage.size must be a Kubernetes quantity such as 10Gi"),
        validation = Rule::new(STORAGE_NO_SHRINK_RULE).message(STORAGE_NO_SHRINK_MESSAGE)
    )]
    pub size: Quantity,
    /// StorageClass of the buffer volumes; the cluster default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
}

impl Default for StorageSpec {
    fn default() -> Self {
        StorageSpec {
            size: default_storage_size(),
            storage_class_name: None,
        }
    }
}

/// The collector Service.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    /// Port of the Service; it forwards to the collector's ingest port (`pipeline.listen`).
    #[serde(default = "default_service_port")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 65535").message("service.port must be between 1 and 65535"))]
    pub port: i32,
    /// Service type.
    #[serde(default, rename = "type")]
    pub kind: ServiceType,
}

impl Default for ServiceSpec {
    fn default() -> Self {
        ServiceSpec {
            port: default_service_port(),
            kind: ServiceType::default(),
        }
    }
}

/// The Kubernetes Service types a collector can be exposed with.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum ServiceType {
    #[default]
    ClusterIP,
    NodePort,
    LoadBalancer,
}

impl ServiceType {
    /// The value of a Service's `spec.type`.
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceType::ClusterIP => "ClusterIP",
            ServiceType::NodePort => "NodePort",
            ServiceType::LoadBalancer => "LoadBalancer",
        }
    }
}

/// Sidecar injection (served by the operator's admission webhook, not part of this reconciler).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InjectionSpec {
    /// Whether pods in labelled namespaces get a tally-sidecar forwarding to this collector.
    #[serde(default)]
    pub enabled: bool,
    /// The injected sidecar's image; `image` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sidecar_image: Option<String>,
    /// CPU and memory of the injected sidecar.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
}

/// What the operator observed, written with server-side apply on the status subresource.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MeteringCollectorStatus {
    /// `Ready`, `Progressing`, `Degraded` and `Draining` (buffers of removed replicas being delivered), each with a
    /// reason and a message.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Replicas whose pods are Ready.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Where clients send events: `http://<name>.<namespace>.svc:<port>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
}

fn default_replicas() -> i32 {
    1
}

fn default_image() -> String {
    format!(
        "ghcr.io/tally-dev/tally-sidecar:{}",
        env!("CARGO_PKG_VERSION")
    )
}

fn default_storage_size() -> Quantity {
    Quantity("1Gi".to_string())
}

fn default_service_port() -> i32 {
    4196
}

/// The sidecar configuration's schema, with the admission rules only the CRD needs: at most [`MAX_OUTPUTS`]
/// outputs, and unique output names (the sidecar checks both again when it loads the file).
fn pipeline_schema(generator: &mut SchemaGenerator) -> Schema {
    let mut schema = generator.subschema_for::<Config>();
    if let Some(targets) = schema
        .get_mut("properties")
        .and_then(|p| p.get_mut("outputs"))
        .and_then(|o| o.get_mut("properties"))
        .and_then(|p| p.get_mut("targets"))
        .and_then(|t| t.as_object_mut())
    {
        targets.insert("maxItems".into(), json!(MAX_OUTPUTS));
        targets.insert(
            "x-kubernetes-validations".into(),
            json!([{
                "rule": "self.all(t, self.exists_one(u, u.name == t.name))",
                "message": "output names in pipeline.outputs.targets must be unique"
            }]),
        );
        if let Some(name) = targets
            .get_mut("items")
            .and_then(|i| i.get_mut("properties"))
            .and_then(|p| p.get_mut("name"))
            .and_then(|n| n.as_object_mut())
        {
            name.insert("maxLength".into(), json!(63));
            name.insert("pattern".into(), json!("^[a-z0-9-]+$"));
        }
    }
    schema
}

/// `namespace/name`, the key of a collector's backoff, of its log lines and of the webhook's choice; of
/// the object's metadata, so a collector that does not deserialize has one too.
pub fn key_of(meta: &kube::api::ObjectMeta) -> String {
    format!(
        "{}/{}",
        meta.namespace.as_deref().unwrap_or_default(),
        meta.name.as_deref().unwrap_or_default()
    )
}

impl MeteringCollector {
    /// See [`key_of`].
    pub fn key(&self) -> String {
        key_of(&self.metadata)
    }
}

/// The CRD as YAML, what `tally-operator crd` prints and `crds/meteringcollector.yaml` holds.
pub fn crd_yaml() -> Result<String, serde_yaml::Error> {
    serde_yaml::to_string(&MeteringCollector::crd())
}
