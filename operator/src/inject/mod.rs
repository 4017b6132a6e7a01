//! Sidecar injection: the mutating admission webhook that adds tally-sidecar to opted-in pods.
//!
//! This file is the pure part: which pods are injected, which collector they forward to, and the JSONPatch that
//! injects them. Nothing here talks to the API server, so every decision is unit-tested from fixtures.
//! [`certs`] keeps the webhook's CA and serving certificate in a Secret, [`config`] keeps the
//! MutatingWebhookConfiguration current, [`server`] answers the API server over TLS and [`runtime`] ties them
//! together for `tally-operator run`.

pub mod certs;
pub mod config;
pub mod metrics;
pub mod runtime;
pub mod server;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, Patch, PatchOperation};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource,
    HTTPGetAction, ObjectFieldSelector, Pod, Probe, SeccompProfile, SecurityContext, Volume,
    VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use serde_json::{Value, json};
use tally_sidecar::config::{
    BrokerPattern, BufferConfig, BufferProfile, ByteSize, Config, Durability, LogConfig, LogFormat,
    OutputConfig, OutputKind, OutputsConfig, PodConfig, SecretSource,
};

use crate::crd::MeteringCollector;

pub use runtime::{WebhookArgs, run};

/// Namespace or pod label that opts in (`enabled`) or, on a pod, opts out (`disabled`).
pub const INJECT_LABEL: &str = "metering.tally.dev/inject";
/// Pod annotation choosing the collector: `<namespace>/<name>`, or `<name>` in the pod's namespace.
pub const COLLECTOR_ANNOTATION: &str = "metering.tally.dev/collector";
/// Pod annotation the injection adds: `<collector namespace>/<collector name>`.
pub const INJECTED_ANNOTATION: &str = "metering.tally.dev/injected";
/// Pod label the injection adds, with the value [`SIDECAR_LABEL_VALUE`]: what a Prometheus Operator
/// PodMonitor selects the sidecars' pods by (the chart's `podMonitor`).
pub const SIDECAR_LABEL: &str = "metering.tally.dev/sidecar";
/// Value of [`SIDECAR_LABEL`].
pub const SIDECAR_LABEL_VALUE: &str = "injected";
/// Label of Tally's own pods (the collector StatefulSets); they are never injected.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// Value of [`MANAGED_BY_LABEL`] on Tally's own objects.
pub const MANAGED_BY: &str = "tally-operator";
/// Name of the injected native sidecar (an init container with `restartPolicy: Always`).
pub const SIDECAR_NAME: &str = "tally-sidecar";
/// The emptyDir holding the sidecar's buffer.
pub const BUFFER_VOLUME: &str = "tally-buffer";
/// Size limit of [`BUFFER_VOLUME`]. Exceeding it gets the whole pod (the workload too) evicted, so the
/// sidecar's `buffer.maxBytes`, which bounds its whole data directory (events, dedup index, dead
/// letters, write-ahead log), stays well below it: the 96 MiB between them cover what can be
/// written between two measurements of the directory and a compaction's output.
pub const BUFFER_SIZE_LIMIT: &str = "256Mi";
const BUFFER_MAX_BYTES: u64 = 160 * 1024 * 1024;
/// The sidecar's ingest port inside the pod.
pub const SIDECAR_PORT: u16 = 4196;
/// Name of the sidecar's container port (at most 15 characters).
pub const SIDECAR_PORT_NAME: &str = "tally-http";
/// Where the sidecar keeps its buffer (the mount point of [`BUFFER_VOLUME`]).
pub const SIDECAR_DATA_DIR: &str = "/var/lib/tally";
/// The environment variable the sidecar reads its configuration YAML from.
pub const CONFIG_ENV: &str = "TALLY_CONFIG_YAML";
/// The environment variable app containers find the sidecar at (what the OpenMeter SDKs are pointed at).
pub const OPENMETER_URL_ENV: &str = "OPENMETER_URL";
/// Namespaces that are never injected, whatever the flags and collectors say.
pub const ALWAYS_EXCLUDED: &str = "kube-system";
/// Batches an injected sidecar has in flight to the collector: a pod's usage is light, and every sidecar of the
/// cluster shares the collector's `ingest.maxConnections` (one connection per batch in flight).
const SIDECAR_MAX_IN_FLIGHT: usize = 4;
/// The injected sidecar's output to the collector's node agent (`spec.nodeAgent`), after the collector itself.
pub const NODE_AGENT_OUTPUT: &str = "node-agent";
/// The unprivileged user and group the sidecar runs as (distroless `nonroot`).
const RUN_AS: i64 = 65532;

/// The value app containers get in [`OPENMETER_URL_ENV`].
pub fn openmeter_url() -> String {
    format!("http://127.0.0.1:{SIDECAR_PORT}")
}

/// Why an admission did not inject: the `reason` label of `tally_operator_admissions_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SkipReason {
    /// The pod is labelled `metering.tally.dev/inject=disabled`.
    OptedOut,
    /// One of Tally's own pods (`app.kubernetes.io/managed-by=tally-operator`).
    OwnPod,
    /// The pod's namespace is excluded.
    ExcludedNamespace,
    /// The pod already has the sidecar (a reinvocation, or a pod written with it).
    AlreadyInjected,
    /// No injection-enabled MeteringCollector matches.
    NoCollector,
    /// Several injection-enabled MeteringCollectors match and the pod does not choose one.
    AmbiguousCollector,
    /// Not a pod CREATE (the webhook's rules send only those; anything else is let through).
    NotPodCreate,
}

impl SkipReason {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            SkipReason::OptedOut => "opted_out",
            SkipReason::OwnPod => "own_pod",
            SkipReason::ExcludedNamespace => "excluded_namespace",
            SkipReason::AlreadyInjected => "already_injected",
            SkipReason::NoCollector => "no_collector",
            SkipReason::AmbiguousCollector => "ambiguous_collector",
            SkipReason::NotPodCreate => "not_pod_create",
        }
    }
}

/// What to do with one pod.
#[derive(Debug, PartialEq)]
pub enum Decision {
    /// Inject: apply `patch`, which adds the sidecar forwarding to `collector` (`namespace/name`).
    Inject { collector: String, patch: Patch },
    /// Admit unchanged; `warning` is returned to the client when the user should act.
    Skip {
        reason: SkipReason,
        warning: Option<String>,
    },
}

/// Why a pod that should be injected could not be.
#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    #[error("rendering the sidecar configuration for collector {collector}: {source}")]
    Render {
        collector: String,
        source: serde_yaml::Error,
    },
}

/// The namespaces never injected: `static_excluded` (the operator's `--exclude-namespaces`, its own namespace
/// and kube-system) and the `excludeNamespaces` of every injection-enabled collector.
pub fn excluded_namespaces(
    collectors: &[&MeteringCollector],
    static_excluded: &BTreeSet<String>,
) -> BTreeSet<String> {
    let mut excluded = static_excluded.clone();
    excluded.insert(ALWAYS_EXCLUDED.to_string());
    for collector in collectors.iter().filter(|c| c.spec.injection.enabled) {
        excluded.extend(collector.spec.exclude_namespaces.iter().cloned());
    }
    excluded
}

/// Decides what to do with a pod being created in `namespace` (from the AdmissionRequest: a pod made from a
/// template has no namespace of its own yet).
pub fn decide(
    pod: &Pod,
    namespace: &str,
    collectors: &[&MeteringCollector],
    static_excluded: &BTreeSet<String>,
) -> Result<Decision, InjectError> {
    let skip = |reason| {
        Ok(Decision::Skip {
            reason,
            warning: None,
        })
    };
    let labels = pod.labels();
    if labels.get(INJECT_LABEL).map(String::as_str) == Some("disabled") {
        return skip(SkipReason::OptedOut);
    }
    if labels.get(MANAGED_BY_LABEL).map(String::as_str) == Some(MANAGED_BY) {
        return skip(SkipReason::OwnPod);
    }
    if excluded_namespaces(collectors, static_excluded).contains(namespace) {
        return skip(SkipReason::ExcludedNamespace);
    }
    if is_injected(pod) {
        return skip(SkipReason::AlreadyInjected);
    }
    let collector = match select_collector(pod, namespace, collectors) {
        Ok(collector) => collector,
        Err((reason, warning)) => {
            return Ok(Decision::Skip {
                reason,
                warning: Some(warning),
            });
        }
    };
    Ok(Decision::Inject {
        collector: collector.key(),
        patch: injection_patch(pod, collector)?,
    })
}

/// Whether the pod already carries the sidecar or the injected annotation.
pub fn is_injected(pod: &Pod) -> bool {
    let Some(spec) = &pod.spec else {
        return pod.annotations().contains_key(INJECTED_ANNOTATION);
    };
    pod.annotations().contains_key(INJECTED_ANNOTATION)
        || spec
            .init_containers
            .iter()
            .flatten()
            .chain(&spec.containers)
            .any(|c| c.name == SIDECAR_NAME)
}

/// The injection-enabled collector a pod forwards to: the one its [`COLLECTOR_ANNOTATION`] names, else the only
/// one in the cluster. The error is the skip reason and a warning that says what to do.
pub fn select_collector<'a>(
    pod: &Pod,
    namespace: &str,
    collectors: &[&'a MeteringCollector],
) -> Result<&'a MeteringCollector, (SkipReason, String)> {
    let mut enabled: Vec<&MeteringCollector> = collectors
        .iter()
        .copied()
        .filter(|c| c.spec.injection.enabled)
        .collect();
    enabled.sort_by_key(|c| c.key());
    if let Some(chosen) = pod.annotations().get(COLLECTOR_ANNOTATION) {
        let chosen = chosen.trim();
        let (want_namespace, want_name) = chosen.split_once('/').unwrap_or((namespace, chosen));
        return enabled
            .into_iter()
            .find(|c| c.namespace().as_deref() == Some(want_namespace) && c.name_any() == want_name)
            .ok_or_else(|| {
                (
                    SkipReason::NoCollector,
                    format!(
                        "tally-sidecar not injected: annotation {COLLECTOR_ANNOTATION} names \
                         {want_namespace}/{want_name}, which is not a MeteringCollector with \
                         spec.injection.enabled: true"
                    ),
                )
            });
    }
    match enabled.as_slice() {
        [] => Err((
            SkipReason::NoCollector,
            "tally-sidecar not injected: no MeteringCollector has spec.injection.enabled: true"
                .into(),
        )),
        [only] => Ok(*only),
        several => Err((
            SkipReason::AmbiguousCollector,
            format!(
                "tally-sidecar not injected: {} MeteringCollectors have spec.injection.enabled: true ({}); \
                 choose one with the pod annotation {COLLECTOR_ANNOTATION}: <namespace>/<name>",
                several.len(),
                several
                    .iter()
                    .map(|c| c.key())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
    }
}

/// The configuration of an injected sidecar: it listens on the pod's port 4196, buffers on the emptyDir, stamps
/// events with its pod (downward API), and forwards everything to the collector's Service. With the collector's node
/// agent enabled, a batch the collector cannot take goes to the agent on the pod's node (the `fallback` pattern), so
/// the events outlive the pod even while the collector is unreachable.
pub fn sidecar_config(collector: &MeteringCollector) -> Config {
    let mut targets = vec![OutputConfig {
        name: "collector".into(),
        kind: OutputKind::Collector,
        url: Some(collector_url(collector)),
        max_in_flight: SIDECAR_MAX_IN_FLIGHT,
        ..OutputConfig::default()
    }];
    let pattern = if collector.spec.node_agent.enabled {
        targets.push(OutputConfig {
            name: NODE_AGENT_OUTPUT.into(),
            kind: OutputKind::Collector,
            url: Some(crate::node_agent::url(collector)),
            ..OutputConfig::default()
        });
        BrokerPattern::Fallback
    } else {
        BrokerPattern::FanOut
    };
    Config {
        listen: SocketAddr::from(([0, 0, 0, 0], SIDECAR_PORT)),
        data_dir: PathBuf::from(SIDECAR_DATA_DIR),
        durability: Durability::Sync,
        log: LogConfig {
            format: LogFormat::Json,
            ..LogConfig::default()
        },
        buffer: BufferConfig {
            max_bytes: ByteSize(BUFFER_MAX_BYTES),
            profile: BufferProfile::Sidecar,
            ..BufferConfig::default()
        },
        pod: PodConfig {
            namespace_from: Some(SecretSource::env("POD_NAMESPACE")),
            name_from: Some(SecretSource::env("POD_NAME")),
        },
        outputs: OutputsConfig { pattern, targets },
        ..Config::default()
    }
}

/// The collector Service's in-cluster URL.
pub fn collector_url(collector: &MeteringCollector) -> String {
    format!(
        "http://{}.{}.svc:{}",
        collector.name_any(),
        collector.namespace().unwrap_or_else(|| "default".into()),
        collector.spec.service.port
    )
}

/// The image of the injected sidecar (and of the node agent): `injection.sidecarImage`, else the collector's.
pub fn sidecar_image(collector: &MeteringCollector) -> String {
    collector
        .spec
        .injection
        .sidecar_image
        .clone()
        .unwrap_or_else(|| collector.spec.image.clone())
}

/// A container that runs as `user` (and group) and can do nothing more: no capabilities, no privilege escalation,
/// a read-only root filesystem, the runtime's default seccomp profile. Non-root unless `user` is 0.
pub fn locked_down(user: i64) -> SecurityContext {
    SecurityContext {
        run_as_non_root: Some(user != 0),
        run_as_user: Some(user),
        run_as_group: Some(user),
        read_only_root_filesystem: Some(true),
        allow_privilege_escalation: Some(false),
        privileged: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            add: None,
        }),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            localhost_profile: None,
        }),
        ..SecurityContext::default()
    }
}

/// The injected native sidecar container.
pub fn sidecar_container(collector: &MeteringCollector) -> Result<Container, InjectError> {
    let rendered = serde_yaml::to_string(&sidecar_config(collector)).map_err(|source| {
        InjectError::Render {
            collector: collector.key(),
            source,
        }
    })?;
    let field = |path: &str| EnvVarSource {
        field_ref: Some(ObjectFieldSelector {
            api_version: Some("v1".into()),
            field_path: path.into(),
        }),
        ..EnvVarSource::default()
    };
    let probe = |path: &str| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String(SIDECAR_PORT_NAME.into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(10),
        ..Probe::default()
    };
    Ok(Container {
        name: SIDECAR_NAME.into(),
        image: Some(sidecar_image(collector)),
        restart_policy: Some("Always".into()),
        env: Some(vec![
            EnvVar {
                name: CONFIG_ENV.into(),
                value: Some(rendered),
                value_from: None,
            },
            EnvVar {
                name: "POD_NAME".into(),
                value: None,
                value_from: Some(field("metadata.name")),
            },
            EnvVar {
                name: "POD_NAMESPACE".into(),
                value: None,
                value_from: Some(field("metadata.namespace")),
            },
        ]),
        ports: Some(vec![ContainerPort {
            name: Some(SIDECAR_PORT_NAME.into()),
            container_port: i32::from(SIDECAR_PORT),
            protocol: Some("TCP".into()),
            ..ContainerPort::default()
        }]),
        // Also holds the app back until the sidecar listens: the kubelet starts the next container once a native
        // sidecar's startup probe has passed.
        startup_probe: Some(crate::build::startup_probe(SIDECAR_PORT_NAME)),
        liveness_probe: Some(probe("/healthz")),
        readiness_probe: Some(probe("/readyz")),
        resources: collector.spec.injection.resources.clone(),
        security_context: Some(locked_down(RUN_AS)),
        volume_mounts: Some(vec![VolumeMount {
            name: BUFFER_VOLUME.into(),
            mount_path: SIDECAR_DATA_DIR.into(),
            ..VolumeMount::default()
        }]),
        ..Container::default()
    })
}

/// The sidecar's buffer volume.
pub fn buffer_volume() -> Volume {
    Volume {
        name: BUFFER_VOLUME.into(),
        empty_dir: Some(EmptyDirVolumeSource {
            medium: None,
            size_limit: Some(Quantity(BUFFER_SIZE_LIMIT.into())),
            ..EmptyDirVolumeSource::default()
        }),
        ..Volume::default()
    }
}

/// The JSONPatch that injects `collector`'s sidecar into `pod`: the sidecar first among the init containers (so
/// other init containers can meter too), the buffer volume, `OPENMETER_URL` in every app container that does not
/// set it, the injected annotation and the [`SIDECAR_LABEL`]. Only `add` operations: nothing else the pod already
/// has is replaced.
pub fn injection_patch(pod: &Pod, collector: &MeteringCollector) -> Result<Patch, InjectError> {
    let sidecar = sidecar_container(collector)?;
    let mut ops = Vec::new();
    let spec = pod.spec.clone().unwrap_or_default();

    match &spec.init_containers {
        Some(_) => ops.push(add(&["spec", "initContainers", "0"], to_value(&sidecar))),
        None => ops.push(add(
            &["spec", "initContainers"],
            json!([to_value(&sidecar)]),
        )),
    }
    match &spec.volumes {
        Some(_) => ops.push(add(&["spec", "volumes", "-"], to_value(&buffer_volume()))),
        None => ops.push(add(
            &["spec", "volumes"],
            json!([to_value(&buffer_volume())]),
        )),
    }
    let url_env = EnvVar {
        name: OPENMETER_URL_ENV.into(),
        value: Some(openmeter_url()),
        value_from: None,
    };
    for (i, container) in spec.containers.iter().enumerate() {
        let index = i.to_string();
        match &container.env {
            Some(env) if env.iter().any(|e| e.name == OPENMETER_URL_ENV) => {}
            Some(_) => ops.push(add(
                &["spec", "containers", &index, "env", "-"],
                to_value(&url_env),
            )),
            None => ops.push(add(
                &["spec", "containers", &index, "env"],
                json!([to_value(&url_env)]),
            )),
        }
    }
    let injected = collector.key();
    match &pod.metadata.annotations {
        Some(_) => ops.push(add(
            &["metadata", "annotations", INJECTED_ANNOTATION],
            Value::String(injected),
        )),
        None => ops.push(add(
            &["metadata", "annotations"],
            Value::Object(serde_json::Map::from_iter([(
                INJECTED_ANNOTATION.to_string(),
                Value::String(injected),
            )])),
        )),
    }
    match &pod.metadata.labels {
        Some(_) => ops.push(add(
            &["metadata", "labels", SIDECAR_LABEL],
            Value::String(SIDECAR_LABEL_VALUE.into()),
        )),
        None => ops.push(add(
            &["metadata", "labels"],
            json!({ SIDECAR_LABEL: SIDECAR_LABEL_VALUE }),
        )),
    }
    Ok(Patch(ops))
}

/// An `add` operation; the pointer escapes `/` and `~` in the tokens (annotation keys contain `/`).
fn add(tokens: &[&str], value: Value) -> PatchOperation {
    PatchOperation::Add(AddOperation {
        path: PointerBuf::from_tokens(tokens.iter().copied()),
        value,
    })
}

fn to_value<T: serde::Serialize>(object: &T) -> Value {
    // k8s-openapi types serialize to JSON infallibly (string keys, no non-finite floats).
    serde_json::to_value(object).unwrap_or(Value::Null)
}
