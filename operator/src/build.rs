//! The build stage: pure functions from a validated `MeteringCollector` to every object it should own.
//!
//! Nothing here talks to the API server, so each child is unit-tested from a small YAML fixture.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource,
    HTTPGetAction, PersistentVolumeClaim, PersistentVolumeClaimSpec, PodSecurityContext, PodSpec,
    PodTemplateSpec, Probe, SeccompProfile, SecretVolumeSource, SecurityContext, Service,
    ServicePort, ServiceSpec, Volume, VolumeMount, VolumeResourceRequirements,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use sha2::{Digest, Sha256};
use tally_sidecar::config::{Config, SecretSource};

use crate::crd::{MeteringCollector, MeteringCollectorSpec};
use crate::node_agent::NodeAgentObjects;
use crate::validate::ValidatedCollector;

/// Pod-template annotation holding the SHA-256 of the rendered pipeline, so a pipeline change rolls the pods.
pub const CONFIG_HASH_ANNOTATION: &str = "metering.tally.dev/config-hash";
/// Kubernetes Secrets are mounted under `<SECRETS_DIR>/<secret name>/`; a `file:` source below it names the Secret.
pub const SECRETS_DIR: &str = "/var/run/secrets/tally";
/// The key of the rendered pipeline in the ConfigMap, and the file name the collector reads.
pub const CONFIG_KEY: &str = "config.yaml";
const CONFIG_DIR: &str = "/etc/tally";

/// The pipeline file as the collector's containers (and its drain Jobs) read it.
pub fn config_file() -> String {
    format!("{CONFIG_DIR}/{CONFIG_KEY}")
}
/// Name of the buffer's `volumeClaimTemplates` entry; the PVCs are `buffer-<name>-<ordinal>`.
pub const BUFFER_VOLUME: &str = "buffer";
/// Name of the container port (ingest, `/metrics`, `/healthz`, `/readyz` share it).
pub const HTTP_PORT_NAME: &str = "http";
const CONTAINER_NAME: &str = "collector";
/// The unprivileged user and group the collector runs as (distroless `nonroot`).
const RUN_AS: i64 = 65532;

/// Every object one `MeteringCollector` owns. The apply stage destructures it without `..`, so a new kind of
/// child does not compile until it is applied.
#[derive(Clone, Debug, PartialEq)]
pub struct CollectorObjects {
    pub config_map: ConfigMap,
    pub service: Service,
    pub headless_service: Service,
    pub pod_disruption_budget: PodDisruptionBudget,
    pub stateful_set: StatefulSet,
    /// `spec.nodeAgent`: its DaemonSet and Service, or `None` when disabled.
    pub node_agent: Option<NodeAgentObjects>,
}

/// Labels on every child and on the collector pods.
pub fn labels(collector: &MeteringCollector) -> BTreeMap<String, String> {
    let mut labels = selector_labels(collector);
    labels.insert(
        "app.kubernetes.io/managed-by".into(),
        "tally-operator".into(),
    );
    labels
}

/// `labels` as a label selector: `key=value` pairs joined by commas.
pub fn label_selector(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The subset of [`labels`] that selects a collector's pods (immutable in a StatefulSet).
pub fn selector_labels(collector: &MeteringCollector) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".into(), "tally-collector".into()),
        ("app.kubernetes.io/instance".into(), collector.name_any()),
    ])
}

/// Name of the ConfigMap holding the rendered pipeline.
pub fn config_map_name(collector: &MeteringCollector) -> String {
    format!("{}-config", collector.name_any())
}

/// Name of the headless Service that gives each replica a stable DNS name.
pub fn headless_service_name(collector: &MeteringCollector) -> String {
    format!("{}-headless", collector.name_any())
}

/// The configuration a collector runs: `spec.pipeline` with the collector's `spec.excludeNamespaces` added to
/// `excludeNamespaces`, so events its sidecars stamped with an excluded namespace are dropped (and counted) even if
/// they come from a pod injected before the namespace was excluded.
pub fn collector_pipeline(spec: &MeteringCollectorSpec) -> Config {
    let mut pipeline = spec.pipeline.clone();
    for namespace in &spec.exclude_namespaces {
        if !pipeline.exclude_namespaces.contains(namespace) {
            pipeline.exclude_namespaces.push(namespace.clone());
        }
    }
    pipeline
}

/// The pipeline exactly as the collector will read it.
pub fn render_pipeline(pipeline: &Config) -> Result<String, serde_yaml::Error> {
    serde_yaml::to_string(pipeline)
}

/// Hex SHA-256 of the rendered pipeline.
pub fn config_hash(rendered: &str) -> String {
    hex::encode(Sha256::digest(rendered.as_bytes()))
}

/// A Kubernetes Secret a pipeline reads a file from, mounted read-only at `<SECRETS_DIR>/<name>`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct SecretMount {
    pub secret: String,
}

impl SecretMount {
    /// The directory the Secret's keys appear in.
    pub fn path(&self) -> PathBuf {
        Path::new(SECRETS_DIR).join(&self.secret)
    }
}

/// Every `file` a pipeline reads secrets or CA bundles from, with the key path that names it.
pub fn secret_files(pipeline: &Config) -> Vec<(String, PathBuf)> {
    let mut sources: Vec<(String, &Option<SecretSource>)> = vec![(
        "pipeline.ingest.authTokenFrom".into(),
        &pipeline.ingest.auth_token_from,
    )];
    let mut files = Vec::new();
    for (i, target) in pipeline.outputs.targets.iter().enumerate() {
        let at = |key: &str| format!("pipeline.outputs.targets[{i}].{key}");
        sources.push((at("tokenFrom"), &target.token_from));
        sources.push((at("secretFrom"), &target.secret_from));
        sources.push((at("urlFrom"), &target.url_from));
        if let Some(ca) = &target.ca_file {
            files.push((at("caFile"), ca.clone()));
        }
    }
    for (key, source) in sources {
        if let Some(path) = source.as_ref().and_then(|s| s.file.clone()) {
            files.push((key, path));
        }
    }
    files.sort();
    files
}

/// The Secret a file under [`SECRETS_DIR`] belongs to: `<SECRETS_DIR>/<secret>/<key>`. `None` for other paths.
pub fn secret_of(path: &Path) -> Option<String> {
    let rest = path.strip_prefix(SECRETS_DIR).ok()?;
    let parts: Vec<&str> = rest
        .components()
        .map(|c| match c {
            Component::Normal(part) => part.to_str(),
            _ => None,
        })
        .collect::<Option<_>>()?;
    match parts.as_slice() {
        [secret, _key] => Some((*secret).to_string()),
        _ => None,
    }
}

/// The Secrets to mount, one volume each, sorted and without duplicates.
pub fn secret_mounts(pipeline: &Config) -> Vec<SecretMount> {
    let mut mounts: Vec<SecretMount> = secret_files(pipeline)
        .iter()
        .filter_map(|(_, path)| secret_of(path))
        .map(|secret| SecretMount { secret })
        .collect();
    mounts.sort();
    mounts.dedup();
    mounts
}

/// Builds every child of a validated collector.
pub fn build(validated: &ValidatedCollector) -> CollectorObjects {
    let collector = &validated.collector;
    let owner = validated.owner.clone();
    let labels = labels(collector);
    let meta = |name: String| ObjectMeta {
        name: Some(name),
        namespace: Some(validated.namespace.clone()),
        labels: Some(labels.clone()),
        owner_references: Some(vec![owner.clone()]),
        ..ObjectMeta::default()
    };
    let name = collector.name_any();

    let config_map = ConfigMap {
        metadata: meta(config_map_name(collector)),
        data: Some(BTreeMap::from([(
            CONFIG_KEY.to_string(),
            validated.rendered_pipeline.clone(),
        )])),
        ..ConfigMap::default()
    };

    let service_port = ServicePort {
        name: Some(HTTP_PORT_NAME.into()),
        port: collector.spec.service.port,
        target_port: Some(IntOrString::String(HTTP_PORT_NAME.into())),
        protocol: Some("TCP".into()),
        ..ServicePort::default()
    };
    let service = Service {
        metadata: meta(name.clone()),
        spec: Some(ServiceSpec {
            type_: Some(collector.spec.service.kind.as_str().into()),
            selector: Some(selector_labels(collector)),
            ports: Some(vec![service_port.clone()]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    };
    let headless_service = Service {
        metadata: meta(headless_service_name(collector)),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            // Each replica is addressable while it starts, so a peer can reach its buffer.
            publish_not_ready_addresses: Some(true),
            selector: Some(selector_labels(collector)),
            ports: Some(vec![service_port]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    };

    let pod_disruption_budget = PodDisruptionBudget {
        metadata: meta(name.clone()),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(selector_labels(collector)),
                ..LabelSelector::default()
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    };

    let stateful_set = StatefulSet {
        metadata: meta(name),
        spec: stateful_set_spec(validated, &labels),
        ..StatefulSet::default()
    };

    CollectorObjects {
        config_map,
        service,
        headless_service,
        pod_disruption_budget,
        stateful_set,
        node_agent: crate::node_agent::build(validated),
    }
}

fn stateful_set_spec(
    validated: &ValidatedCollector,
    labels: &BTreeMap<String, String>,
) -> StatefulSetSpec {
    let collector = &validated.collector;
    let spec = &collector.spec;
    let pipeline = &spec.pipeline;
    let port = i32::from(pipeline.listen.port());

    let mut volumes = vec![
        Volume {
            name: "config".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: config_map_name(collector),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        },
        // The root filesystem is read-only; RocksDB and the runtime may still want a scratch directory.
        Volume {
            name: "tmp".into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Volume::default()
        },
    ];
    let mut mounts = vec![
        VolumeMount {
            name: "config".into(),
            mount_path: CONFIG_DIR.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        },
        VolumeMount {
            name: "tmp".into(),
            mount_path: "/tmp".into(),
            ..VolumeMount::default()
        },
        VolumeMount {
            name: BUFFER_VOLUME.into(),
            mount_path: pipeline.data_dir.display().to_string(),
            ..VolumeMount::default()
        },
    ];
    for secret in &validated.secrets {
        let volume = format!("secret-{}", secret.secret);
        volumes.push(Volume {
            name: volume.clone(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(secret.secret.clone()),
                default_mode: Some(0o440),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        });
        mounts.push(VolumeMount {
            name: volume,
            mount_path: secret.path().display().to_string(),
            read_only: Some(true),
            ..VolumeMount::default()
        });
    }

    let container = Container {
        name: CONTAINER_NAME.into(),
        image: Some(spec.image.clone()),
        args: Some(vec!["--config".into(), config_file()]),
        ports: Some(vec![ContainerPort {
            name: Some(HTTP_PORT_NAME.into()),
            container_port: port,
            protocol: Some("TCP".into()),
            ..ContainerPort::default()
        }]),
        startup_probe: Some(startup_probe(HTTP_PORT_NAME)),
        liveness_probe: Some(http_probe("/healthz", 10)),
        readiness_probe: Some(http_probe("/readyz", 5)),
        resources: spec.resources.clone(),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Capabilities::default()
            }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(mounts),
        ..Container::default()
    };

    let annotations = BTreeMap::from([
        (
            CONFIG_HASH_ANNOTATION.to_string(),
            validated.config_hash.clone(),
        ),
        ("prometheus.io/scrape".to_string(), "true".to_string()),
        ("prometheus.io/port".to_string(), port.to_string()),
        ("prometheus.io/path".to_string(), "/metrics".to_string()),
    ]);

    // The collector drains its outputs for up to `shutdownTimeout` after SIGTERM; leave it that long plus a margin.
    let grace = i64::try_from(pipeline.shutdown_timeout.get().as_secs())
        .unwrap_or(i64::MAX / 2)
        .saturating_add(5);

    let mut claim_requests = BTreeMap::new();
    claim_requests.insert("storage".to_string(), spec.storage.size.clone());

    StatefulSetSpec {
        replicas: Some(spec.replicas),
        service_name: Some(headless_service_name(collector)),
        // Replicas are independent collectors with their own buffers; none waits for another.
        pod_management_policy: Some("Parallel".into()),
        selector: LabelSelector {
            match_labels: Some(selector_labels(collector)),
            ..LabelSelector::default()
        },
        // A buffer may hold acknowledged events not yet delivered: deleting or scaling down never deletes it.
        persistent_volume_claim_retention_policy: Some(
            k8s_openapi::api::apps::v1::StatefulSetPersistentVolumeClaimRetentionPolicy {
                when_deleted: Some("Retain".into()),
                when_scaled: Some("Retain".into()),
            },
        ),
        template: PodTemplateSpec {
            metadata: Some(ObjectMeta {
                labels: Some(labels.clone()),
                annotations: Some(annotations),
                ..ObjectMeta::default()
            }),
            spec: Some(PodSpec {
                containers: vec![container],
                volumes: Some(volumes),
                automount_service_account_token: Some(false),
                termination_grace_period_seconds: Some(grace),
                security_context: Some(PodSecurityContext {
                    run_as_non_root: Some(true),
                    run_as_user: Some(RUN_AS),
                    run_as_group: Some(RUN_AS),
                    fs_group: Some(RUN_AS),
                    seccomp_profile: Some(SeccompProfile {
                        type_: "RuntimeDefault".into(),
                        ..SeccompProfile::default()
                    }),
                    ..PodSecurityContext::default()
                }),
                ..PodSpec::default()
            }),
        },
        volume_claim_templates: Some(vec![PersistentVolumeClaim {
            metadata: ObjectMeta {
                name: Some(BUFFER_VOLUME.into()),
                labels: Some(labels.clone()),
                ..ObjectMeta::default()
            },
            spec: Some(PersistentVolumeClaimSpec {
                access_modes: Some(vec!["ReadWriteOnce".into()]),
                storage_class_name: spec.storage.storage_class_name.clone(),
                resources: Some(VolumeResourceRequirements {
                    requests: Some(claim_requests),
                    ..VolumeResourceRequirements::default()
                }),
                ..PersistentVolumeClaimSpec::default()
            }),
            ..PersistentVolumeClaim::default()
        }]),
        ..StatefulSetSpec::default()
    }
}

/// How long a collector or sidecar may take to open its buffer before its liveness probe counts: opening a large
/// backlog (RocksDB recovery, the dedup index) happens before it listens.
const STARTUP_ALLOWANCE_SECONDS: i32 = 300;
const STARTUP_PERIOD_SECONDS: i32 = 2;

/// The startup probe of a tally-sidecar container: `/healthz` every 2 s for up to [`STARTUP_ALLOWANCE_SECONDS`]. The
/// liveness probe (`/healthz`, which fails only when the buffer's writer thread stopped, never because the buffer is
/// full or recovering) starts after it; readiness (`/readyz`) means accepting events.
pub fn startup_probe(port_name: &str) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some("/healthz".into()),
            port: IntOrString::String(port_name.into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(STARTUP_PERIOD_SECONDS),
        failure_threshold: Some(STARTUP_ALLOWANCE_SECONDS / STARTUP_PERIOD_SECONDS),
        ..Probe::default()
    }
}

/// A probe of a tally-sidecar container's `path` on its [`HTTP_PORT_NAME`] port, every `period` seconds, failing
/// after 3 misses.
pub fn http_probe(path: &str, period: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String(HTTP_PORT_NAME.into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(3),
        ..Probe::default()
    }
}

/// The owner reference every child carries: the collector is its controller, so deleting it collects them.
pub fn owner_reference(collector: &MeteringCollector) -> Option<OwnerReference> {
    use kube::Resource;
    collector.controller_owner_ref(&())
}
