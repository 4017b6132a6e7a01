//! The node agent (`spec.nodeAgent`): a DaemonSet of tally-sidecar that buffers on a node directory and forwards to
//! the collector's Service, and a node-local Service in front of it. Injected sidecars list it after the collector
//! (the `fallback` broker pattern), so while the collector is unreachable their batches go to the agent on their
//! own node, and a deleted pod's acknowledged events are on the node instead of in the pod's emptyDir.
//!
//! Pure functions, like the rest of the build stage.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{DaemonSet, DaemonSetSpec};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EnvVar, HostPathVolumeSource, PodSpec, PodTemplateSpec, Service,
    ServicePort, ServiceSpec, Toleration, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use tally_sidecar::config::{
    BrokerPattern, Config, Durability, HumanDuration, LogConfig, LogFormat, OutputConfig,
    OutputKind, OutputsConfig, RetryPolicy,
};

use crate::build::{HTTP_PORT_NAME, http_probe, startup_probe};
use crate::crd::MeteringCollector;
use crate::inject::CONFIG_ENV;
use crate::validate::ValidatedCollector;

/// Where the agent's node directory is mounted in its container.
const DATA_DIR: &str = "/var/lib/tally";
/// The agent's port in its pod.
const PORT: u16 = 4196;
const CONTAINER_NAME: &str = "node-agent";
/// The agent runs as root so it can write the node directory the kubelet creates (owned by root); it has no
/// capabilities, no privilege escalation and a read-only root filesystem.
const RUN_AS_ROOT: i64 = 0;
/// The longest pause between the agent's attempts to reach the collector: it is back within seconds of the
/// collector, and one agent per node retrying costs little.
const RETRY_MAX_SECONDS: u64 = 5;
/// Batches the agent has in flight to the collector: enough to deliver a node's backlog quickly, few enough that
/// the agents of many nodes stay well inside the collector's `ingest.maxConnections`.
const MAX_IN_FLIGHT: usize = 16;
/// How long the agent delivers after SIGTERM before it stops; what it still holds stays on the node directory for
/// the next agent on that node.
const SHUTDOWN_SECONDS: u64 = 10;

/// The objects of an enabled node agent.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeAgentObjects {
    pub daemon_set: DaemonSet,
    pub service: Service,
}

/// Name of the agent's DaemonSet and Service.
pub fn name(collector: &MeteringCollector) -> String {
    format!("{}-node", collector.name_any())
}

/// Labels selecting the agent's pods (not the collector's: the collector Service must never reach an agent).
pub fn selector_labels(collector: &MeteringCollector) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".into(), "tally-node-agent".into()),
        ("app.kubernetes.io/instance".into(), collector.name_any()),
    ])
}

/// The node-local Service's in-cluster URL, which the injected sidecars fall back to.
pub fn url(collector: &MeteringCollector) -> String {
    format!(
        "http://{}.{}.svc:{}",
        name(collector),
        collector.namespace().unwrap_or_else(|| "default".into()),
        collector.spec.service.port
    )
}

/// The node directory of this collector's agents: `<hostPath>/<namespace>/<name>`.
pub fn host_dir(collector: &MeteringCollector) -> String {
    format!(
        "{}/{}/{}",
        collector.spec.node_agent.host_path.trim_end_matches('/'),
        collector.namespace().unwrap_or_else(|| "default".into()),
        collector.name_any()
    )
}

/// The agent's configuration: listen on its port, buffer on the node directory (synced before it answers),
/// forward everything to the collector's Service. It stamps nothing (the sidecars stamped their pod) and drops
/// nothing (the collector applies `excludeNamespaces`).
pub fn config(collector: &MeteringCollector) -> Config {
    Config {
        listen: SocketAddr::from(([0, 0, 0, 0], PORT)),
        data_dir: PathBuf::from(DATA_DIR),
        durability: Durability::Sync,
        shutdown_timeout: HumanDuration(Duration::from_secs(SHUTDOWN_SECONDS)),
        log: LogConfig {
            format: LogFormat::Json,
            ..LogConfig::default()
        },
        outputs: OutputsConfig {
            pattern: BrokerPattern::FanOut,
            targets: vec![OutputConfig {
                name: "collector".into(),
                kind: OutputKind::Collector,
                url: Some(crate::inject::collector_url(collector)),
                retry: RetryPolicy {
                    max_interval: HumanDuration(Duration::from_secs(RETRY_MAX_SECONDS)),
                    ..RetryPolicy::default()
                },
                max_in_flight: MAX_IN_FLIGHT,
                ..OutputConfig::default()
            }],
        },
        ..Config::default()
    }
}

/// The agent's objects, or `None` when `spec.nodeAgent.enabled` is false (the apply stage then deletes them).
pub fn build(validated: &ValidatedCollector) -> Option<NodeAgentObjects> {
    let collector = &validated.collector;
    let rendered = validated.rendered_node_agent.clone()?;
    let mut labels = crate::build::labels(collector);
    labels.extend(selector_labels(collector));
    let meta = ObjectMeta {
        name: Some(name(collector)),
        namespace: Some(validated.namespace.clone()),
        labels: Some(labels.clone()),
        owner_references: Some(vec![validated.owner.clone()]),
        ..ObjectMeta::default()
    };
    let service = Service {
        metadata: meta.clone(),
        spec: Some(ServiceSpec {
            selector: Some(selector_labels(collector)),
            ports: Some(vec![ServicePort {
                name: Some(HTTP_PORT_NAME.into()),
                port: collector.spec.service.port,
                target_port: Some(IntOrString::String(HTTP_PORT_NAME.into())),
                protocol: Some("TCP".into()),
                ..ServicePort::default()
            }]),
            // A sidecar reaches the agent on its own node, whose directory outlives the pod.
            internal_traffic_policy: Some("Local".into()),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    };

    let container = Container {
        name: CONTAINER_NAME.into(),
        image: Some(crate::inject::sidecar_image(collector)),
        env: Some(vec![EnvVar {
            name: CONFIG_ENV.into(),
            value: Some(rendered),
            value_from: None,
        }]),
        ports: Some(vec![ContainerPort {
            name: Some(HTTP_PORT_NAME.into()),
            container_port: i32::from(PORT),
            protocol: Some("TCP".into()),
            ..ContainerPort::default()
        }]),
        startup_probe: Some(startup_probe(HTTP_PORT_NAME)),
        liveness_probe: Some(http_probe("/healthz", 10)),
        readiness_probe: Some(http_probe("/readyz", 5)),
        resources: collector.spec.node_agent.resources.clone(),
        security_context: Some(crate::inject::locked_down(RUN_AS_ROOT)),
        volume_mounts: Some(vec![VolumeMount {
            name: "buffer".into(),
            mount_path: DATA_DIR.into(),
            ..VolumeMount::default()
        }]),
        ..Container::default()
    };
    let annotations = BTreeMap::from([
        ("prometheus.io/scrape".to_string(), "true".to_string()),
        ("prometheus.io/port".to_string(), PORT.to_string()),
        ("prometheus.io/path".to_string(), "/metrics".to_string()),
    ]);
    let daemon_set = DaemonSet {
        metadata: meta,
        spec: DaemonSetSpec {
            selector: LabelSelector {
                match_labels: Some(selector_labels(collector)),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    annotations: Some(annotations),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![container],
                    volumes: Some(vec![Volume {
                        name: "buffer".into(),
                        host_path: Some(HostPathVolumeSource {
                            path: host_dir(collector),
                            type_: Some("DirectoryOrCreate".into()),
                        }),
                        ..Volume::default()
                    }]),
                    automount_service_account_token: Some(false),
                    termination_grace_period_seconds: Some(
                        i64::try_from(SHUTDOWN_SECONDS).unwrap_or(10) + 5,
                    ),
                    // Wherever an injected pod may run, including tainted nodes.
                    tolerations: Some(vec![Toleration {
                        operator: Some("Exists".into()),
                        ..Toleration::default()
                    }]),
                    ..PodSpec::default()
                }),
            },
            ..DaemonSetSpec::default()
        },
        ..DaemonSet::default()
    };
    Some(NodeAgentObjects {
        daemon_set,
        service,
    })
}
