//! The validate stage: rules the CRD schema cannot express, checked before anything is built.
//!
//! A failure names the field and says what to do; the reconciler reports it on the status (Degraded) and waits for
//! the next change of the resource instead of retrying.

use std::net::SocketAddr;
use std::path::Path;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::ResourceExt;
use tally_sidecar::config::{Config, SecretSource};

use crate::build::{self, SECRETS_DIR, SecretMount};
use crate::crd::MeteringCollector;
use crate::node_agent;

/// Longest collector name: pods are `<name>-<ordinal>` and carry a `controller-revision-hash` label
/// `<name>-<10 characters>`, which must fit in 63 characters.
pub const MAX_NAME_LEN: usize = 52;

/// A spec the operator cannot turn into a working collector.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct InvalidSpec {
    /// Path of the offending field, such as `spec.pipeline.listen`.
    pub field: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> InvalidSpec {
    InvalidSpec {
        field: field.into(),
        message: message.into(),
    }
}

/// A collector that passed validation, with what the build stage needs precomputed.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidatedCollector {
    pub collector: MeteringCollector,
    pub namespace: String,
    pub owner: OwnerReference,
    /// The pipeline as the ConfigMap holds it.
    pub rendered_pipeline: String,
    /// SHA-256 of `rendered_pipeline`, the pod-template annotation.
    pub config_hash: String,
    /// Secrets the pipeline reads files from.
    pub secrets: Vec<SecretMount>,
    /// The node agent's configuration, when `spec.nodeAgent.enabled`.
    pub rendered_node_agent: Option<String>,
}

/// Checks a collector and renders its pipeline.
pub fn validate(collector: &MeteringCollector) -> Result<ValidatedCollector, InvalidSpec> {
    let name = collector.name_any();
    if name.len() > MAX_NAME_LEN {
        return Err(invalid(
            "metadata.name",
            format!(
                "{name:?} is {} characters long; use at most {MAX_NAME_LEN} so the pod names and labels fit",
                name.len()
            ),
        ));
    }
    let namespace = collector
        .namespace()
        .ok_or_else(|| invalid("metadata.namespace", "a MeteringCollector is namespaced"))?;
    let owner = build::owner_reference(collector).ok_or_else(|| {
        invalid(
            "metadata.uid",
            "the resource has no uid yet; it must come from the API server",
        )
    })?;
    let spec = &collector.spec;
    if spec.replicas < 1 {
        return Err(invalid("spec.replicas", "must be at least 1"));
    }

    let rendered_pipeline = build::render_pipeline(&build::collector_pipeline(spec))
        .map_err(|e| invalid("spec.pipeline", format!("cannot be rendered: {e}")))?;
    // The sidecar's own loader is the authority on what it accepts.
    Config::parse(&rendered_pipeline, "spec.pipeline").map_err(|e| {
        let text = e.to_string();
        let detail = text.strip_prefix("spec.pipeline: ").unwrap_or(&text);
        match detail.split_once(": ") {
            Some((key, message)) => invalid(format!("spec.pipeline.{key}"), message),
            None => invalid("spec.pipeline", detail),
        }
    })?;
    check_listen(spec.pipeline.listen)?;
    check_data_dir(&spec.pipeline.data_dir)?;
    check_secret_sources(&spec.pipeline)?;
    let rendered_node_agent = if spec.node_agent.enabled {
        let host_path = &spec.node_agent.host_path;
        if !host_path.starts_with('/') || host_path.split('/').any(|part| part == "..") {
            return Err(invalid(
                "spec.nodeAgent.hostPath",
                format!(
                    "{host_path:?} must be an absolute path without `..`, such as /var/lib/tally"
                ),
            ));
        }
        let rendered = build::render_pipeline(&node_agent::config(collector))
            .map_err(|e| invalid("spec.nodeAgent", format!("cannot be rendered: {e}")))?;
        Some(rendered)
    } else {
        None
    };

    let config_hash = build::config_hash(&rendered_pipeline);
    Ok(ValidatedCollector {
        collector: collector.clone(),
        namespace,
        owner,
        rendered_pipeline,
        config_hash,
        secrets: build::secret_mounts(&spec.pipeline),
        rendered_node_agent,
    })
}

fn check_listen(listen: SocketAddr) -> Result<(), InvalidSpec> {
    if listen.ip().is_unspecified() {
        Ok(())
    } else {
        Err(invalid(
            "spec.pipeline.listen",
            format!(
                "{listen} is reachable only from inside the pod; listen on 0.0.0.0:{} so the Service and probes reach it",
                listen.port()
            ),
        ))
    }
}

fn check_data_dir(data_dir: &Path) -> Result<(), InvalidSpec> {
    let reserved = ["/etc/tally", "/tmp", SECRETS_DIR];
    if !data_dir.is_absolute() || data_dir == Path::new("/") {
        return Err(invalid(
            "spec.pipeline.dataDir",
            format!(
                "{} must be an absolute directory such as /var/lib/tally; the buffer volume is mounted there",
                data_dir.display()
            ),
        ));
    }
    if let Some(dir) = reserved.iter().find(|dir| data_dir.starts_with(dir)) {
        return Err(invalid(
            "spec.pipeline.dataDir",
            format!(
                "{} is inside {dir}, which the operator mounts for itself; use /var/lib/tally",
                data_dir.display()
            ),
        ));
    }
    Ok(())
}

/// Secrets reach the collector only as mounted files: an environment variable would have to be set on the pod,
/// which the spec has no field for, and a file outside the secrets directory would not exist.
fn check_secret_sources(pipeline: &Config) -> Result<(), InvalidSpec> {
    let mut sources: Vec<(String, &SecretSource)> = Vec::new();
    if let Some(source) = &pipeline.ingest.auth_token_from {
        sources.push(("spec.pipeline.ingest.authTokenFrom".into(), source));
    }
    for (i, target) in pipeline.outputs.targets.iter().enumerate() {
        for (key, source) in [
            ("tokenFrom", &target.token_from),
            ("secretFrom", &target.secret_from),
            ("urlFrom", &target.url_from),
        ] {
            if let Some(source) = source {
                sources.push((format!("spec.pipeline.outputs.targets[{i}].{key}"), source));
            }
        }
    }
    let hint = format!(
        "reference a Kubernetes Secret as a file: {{file: {SECRETS_DIR}/<secret name>/<key>}}; the operator mounts it"
    );
    for (field, source) in sources {
        if let Some(env) = &source.env {
            return Err(invalid(
                field,
                format!("environment variable {env} is not set on collector pods; {hint}"),
            ));
        }
    }
    for (field, path) in build::secret_files(pipeline) {
        if build::secret_of(&path).is_none() {
            return Err(invalid(
                format!("spec.{field}"),
                format!("{} is not a mounted Secret; {hint}", path.display()),
            ));
        }
    }
    Ok(())
}
