//! Buffers of removed replicas: drained by a Job, deleted only when they hold nothing undelivered.
//!
//! Each collector replica buffers on its own claim (`buffer-<name>-<ordinal>`), which the StatefulSet keeps when the
//! replica goes away (scale-down, whatever asked for it). A claim whose ordinal is at or beyond `spec.replicas` and
//! whose pod is gone is drained by a Job running `tally-sidecar drain` on it with the collector's own pipeline:
//! every buffered event goes to the collector's outputs, retried as they are configured, however long the outage.
//! When the Job reports the buffer empty, the claim is deleted; when it holds dead letters or damaged records, it is
//! kept and annotated, and the status says so. A scale-up that brings the ordinal back cancels the Job: the replica
//! delivers its own backlog.
//!
//! [`plan`] is pure; the reconcile stage carries its steps out.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    PersistentVolumeClaim, PersistentVolumeClaimVolumeSource, Pod, Volume,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;
use tally_sidecar::collector::DrainReport;

use crate::build::{self, BUFFER_VOLUME};
use crate::crd::MeteringCollector;
use crate::storage::claim_ordinal;
use crate::validate::ValidatedCollector;

/// The condition that says whether buffers of removed replicas are being drained.
pub const DRAINING: &str = "Draining";
/// Annotation on a claim that was drained but still holds undelivered events (dead letters, damaged records): what
/// the drain reported. Such a claim is neither drained again nor deleted.
pub const KEPT_ANNOTATION: &str = "metering.tally.dev/drain-kept";
/// Label on a drain Job and its pod: the claim it drains.
pub const CLAIM_LABEL: &str = "metering.tally.dev/drain-claim";
/// How many times a drain pod may fail before the Job is failed (and the operator starts a new one).
const BACKOFF_LIMIT: i32 = 10;

/// Name of the Job that drains the buffer of replica `ordinal`.
pub fn job_name(collector: &MeteringCollector, ordinal: i32) -> String {
    format!("{}-drain-{ordinal}", collector.name_any())
}

/// Labels that select a collector's drain Jobs and their pods (and no collector pod).
pub fn job_selector_labels(collector: &MeteringCollector) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".into(), "tally-drain".into()),
        ("app.kubernetes.io/instance".into(), collector.name_any()),
    ])
}

/// One thing to do (or to report) about a buffer claim of a removed replica, or about a drain Job.
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    /// The replica's pod still exists (it delivers what it can while it stops): wait for it.
    WaitForPod { claim: String, pod: String },
    /// Start the drain Job.
    Start { claim: String, ordinal: i32 },
    /// The drain Job runs.
    Running { claim: String, job: String },
    /// The drain Job succeeded: read its report, then delete the claim or keep it.
    Finished { claim: String, job: String },
    /// The drain Job failed: delete it, so the next reconcile starts another.
    Failed { claim: String, job: String },
    /// Drained earlier, and holds undelivered events: kept, as the annotation says.
    Kept { claim: String, report: String },
    /// A drain Job whose claim is gone or belongs to a current replica again: delete it.
    Cancel { job: String },
}

impl Step {
    /// Whether the step means a drain is under way (the `Draining` condition is `True`).
    pub fn is_active(&self) -> bool {
        matches!(
            self,
            Step::WaitForPod { .. }
                | Step::Start { .. }
                | Step::Running { .. }
                | Step::Finished { .. }
                | Step::Failed { .. }
        )
    }
}

/// Whether a Job has succeeded, failed, or neither yet.
fn job_state(job: &Job) -> (bool, bool) {
    let status = job.status.clone().unwrap_or_default();
    let condition = |type_: &str| {
        status
            .conditions
            .iter()
            .flatten()
            .any(|c| c.type_ == type_ && c.status == "True")
    };
    let succeeded = status.succeeded.unwrap_or(0) > 0 || condition("Complete");
    (succeeded, !succeeded && condition("Failed"))
}

/// What to do about the collector's claims and drain Jobs, given `spec.replicas`, the names of the collector's
/// pods that exist, and the drain Jobs that exist.
pub fn plan(
    collector: &MeteringCollector,
    claims: &[PersistentVolumeClaim],
    pods: &BTreeSet<String>,
    jobs: &[Job],
) -> Vec<Step> {
    let replicas = collector.spec.replicas;
    let jobs_by_name: BTreeMap<String, &Job> = jobs.iter().map(|j| (j.name_any(), j)).collect();
    let mut wanted_jobs = BTreeSet::new();
    let mut steps = Vec::new();
    let mut claims: Vec<(i32, &PersistentVolumeClaim)> = claims
        .iter()
        .filter_map(|c| Some((claim_ordinal(collector, &c.name_any())?, c)))
        .filter(|(ordinal, claim)| {
            *ordinal >= replicas && claim.metadata.deletion_timestamp.is_none()
        })
        .collect();
    claims.sort_by_key(|(ordinal, _)| *ordinal);
    for (ordinal, claim) in claims {
        let claim_name = claim.name_any();
        if let Some(report) = claim.annotations().get(KEPT_ANNOTATION) {
            steps.push(Step::Kept {
                claim: claim_name,
                report: report.clone(),
            });
            continue;
        }
        let pod = format!("{}-{ordinal}", collector.name_any());
        let job = job_name(collector, ordinal);
        wanted_jobs.insert(job.clone());
        let step = match jobs_by_name.get(&job) {
            _ if pods.contains(&pod) => Step::WaitForPod {
                claim: claim_name,
                pod,
            },
            None => Step::Start {
                claim: claim_name,
                ordinal,
            },
            Some(existing) => match job_state(existing) {
                (true, _) => Step::Finished {
                    claim: claim_name,
                    job,
                },
                (_, true) => Step::Failed {
                    claim: claim_name,
                    job,
                },
                _ => Step::Running {
                    claim: claim_name,
                    job,
                },
            },
        };
        steps.push(step);
    }
    for job in jobs_by_name.keys() {
        if !wanted_jobs.contains(job) {
            steps.push(Step::Cancel { job: job.clone() });
        }
    }
    steps
}

/// The drain Job of one claim: the collector's pod template (image, pipeline, Secrets, security context, resources)
/// running `tally-sidecar drain` on the claim, with no port and no probes. Its pods carry labels that no Service of
/// the collector selects.
pub fn job(
    validated: &ValidatedCollector,
    stateful_set: &StatefulSet,
    claim: &str,
    ordinal: i32,
) -> Job {
    let collector = &validated.collector;
    let mut labels = build::labels(collector);
    labels.extend(job_selector_labels(collector));
    labels.insert(CLAIM_LABEL.into(), claim.to_string());
    let mut template = stateful_set.spec.template.clone();
    let mut meta = template.metadata.take().unwrap_or_default();
    meta.labels = Some(labels.clone());
    // Not scraped: the drain serves no HTTP. What it did is in its report and the operator's metrics.
    meta.annotations = meta.annotations.map(|annotations| {
        annotations
            .into_iter()
            .filter(|(key, _)| !key.starts_with("prometheus.io/"))
            .collect()
    });
    template.metadata = Some(meta);
    if let Some(pod) = template.spec.as_mut() {
        pod.restart_policy = Some("OnFailure".into());
        for container in &mut pod.containers {
            container.args = Some(vec![
                "drain".into(),
                "--config".into(),
                build::config_file(),
                "--report".into(),
                "/dev/termination-log".into(),
            ]);
            container.ports = None;
            container.liveness_probe = None;
            container.readiness_probe = None;
            container.startup_probe = None;
            container.termination_message_policy = Some("File".into());
        }
        pod.volumes.get_or_insert_with(Vec::new).push(Volume {
            name: BUFFER_VOLUME.into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: claim.to_string(),
                read_only: Some(false),
            }),
            ..Volume::default()
        });
    }
    Job {
        metadata: ObjectMeta {
            name: Some(job_name(collector, ordinal)),
            namespace: Some(validated.namespace.clone()),
            labels: Some(labels),
            owner_references: Some(vec![validated.owner.clone()]),
            ..ObjectMeta::default()
        },
        spec: Some(JobSpec {
            backoff_limit: Some(BACKOFF_LIMIT),
            template,
            ..JobSpec::default()
        }),
        ..Job::default()
    }
}

/// The report a finished drain pod left as its termination message; `None` when no pod has one (the pod was
/// garbage-collected, say), in which case the claim is kept.
pub fn report(pods: &[Pod]) -> Option<DrainReport> {
    pods.iter()
        .flat_map(|pod| pod.status.iter())
        .flat_map(|status| status.container_statuses.iter().flatten())
        .filter_map(|container| container.state.as_ref()?.terminated.as_ref())
        .filter(|terminated| terminated.exit_code == 0)
        .find_map(|terminated| serde_json::from_str(terminated.message.as_deref()?).ok())
}

/// The `Draining` condition's status, reason and message for the planned steps.
pub fn verdict(steps: &[Step]) -> (bool, &'static str, String) {
    let active: Vec<String> = steps
        .iter()
        .filter_map(|step| match step {
            Step::WaitForPod { claim, pod } => {
                Some(format!("{claim} (waiting for pod {pod} to stop)"))
            }
            Step::Start { claim, .. } => Some(format!("{claim} (starting a drain Job)")),
            Step::Running { claim, job } => Some(format!("{claim} (Job {job} delivering)")),
            Step::Finished { claim, job } => Some(format!("{claim} (Job {job} finished)")),
            Step::Failed { claim, job } => {
                Some(format!("{claim} (Job {job} failed; starting another)"))
            }
            Step::Kept { .. } | Step::Cancel { .. } => None,
        })
        .collect();
    let kept: Vec<String> = steps
        .iter()
        .filter_map(|step| match step {
            Step::Kept { claim, report } => Some(format!("{claim} ({report})")),
            _ => None,
        })
        .collect();
    if !active.is_empty() {
        return (
            true,
            "DrainingBuffers",
            format!(
                "delivering the buffers of removed replicas: {}",
                active.join(", ")
            ),
        );
    }
    if !kept.is_empty() {
        return (
            false,
            "UndeliveredKept",
            format!(
                "drained, but kept because they hold undelivered events: {}; inspect them with `tally-sidecar \
                 dead-letter list` and `buffer check` on the claim, then delete the claim",
                kept.join(", ")
            ),
        );
    }
    (
        false,
        "NothingToDrain",
        "no buffer of a removed replica holds events".into(),
    )
}
