//! The status stage: what the operator tells the user, computed purely from what it observed.
//!
//! Conditions keep their `lastTransitionTime` while their status does not change, so the same observation always
//! yields the same status and writing it is a no-op (no reconcile loop from status writes).

use k8s_openapi::api::apps::v1::{DaemonSet, StatefulSet};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::ResourceExt;

use crate::crd::{MeteringCollector, MeteringCollectorStatus};
use crate::drain::{self, DRAINING, Step};
use crate::storage::StorageProblem;
use crate::validate::InvalidSpec;

pub const READY: &str = "Ready";
pub const PROGRESSING: &str = "Progressing";
pub const DEGRADED: &str = "Degraded";
/// Present only with `spec.nodeAgent.enabled`: whether an agent runs, ready, on every node it should.
pub const NODE_AGENT_READY: &str = "NodeAgentReady";

/// What one reconcile found.
#[derive(Debug)]
pub enum Observation<'a> {
    /// The spec cannot work; nothing was applied.
    InvalidSpec(&'a InvalidSpec),
    /// The API server refused a child built from this spec.
    Rejected { kind: &'static str, message: String },
    /// Every child was applied.
    Applied {
        /// The StatefulSet the API server returned.
        stateful_set: &'a StatefulSet,
        /// A buffer size change that cannot be carried out.
        storage: Option<&'a StorageProblem>,
        /// What the drain stage did about the buffers of removed replicas.
        drains: &'a [Step],
        /// The node agent's DaemonSet the API server returned, when enabled.
        node_agent: Option<&'a DaemonSet>,
    },
}

/// One condition before its transition time is decided.
struct Verdict {
    type_: &'static str,
    status: bool,
    reason: &'static str,
    message: String,
}

/// The status the collector should have after `observation`.
pub fn desired_status(
    collector: &MeteringCollector,
    observation: &Observation<'_>,
    now: &Time,
) -> MeteringCollectorStatus {
    let previous = collector.status.clone().unwrap_or_default();
    let replicas = collector.spec.replicas;
    let (verdicts, ready_replicas) = match observation {
        Observation::InvalidSpec(error) => (
            vec![
                verdict(
                    READY,
                    false,
                    "InvalidSpec",
                    format!("the spec cannot run: {error}"),
                ),
                verdict(
                    PROGRESSING,
                    false,
                    "InvalidSpec",
                    "nothing is rolled out until the spec is fixed".into(),
                ),
                verdict(
                    DEGRADED,
                    true,
                    "InvalidSpec",
                    format!("{error}; fix the MeteringCollector and apply it again"),
                ),
            ],
            previous.ready_replicas,
        ),
        Observation::Rejected { kind, message } => (
            vec![
                verdict(
                    READY,
                    false,
                    "ApplyRejected",
                    format!("the {kind} could not be applied"),
                ),
                verdict(
                    PROGRESSING,
                    false,
                    "ApplyRejected",
                    "the rollout is blocked".into(),
                ),
                verdict(
                    DEGRADED,
                    true,
                    "ApplyRejected",
                    format!(
                        "the API server rejected the {kind}: {message}; fix the MeteringCollector's spec"
                    ),
                ),
            ],
            previous.ready_replicas,
        ),
        Observation::Applied {
            stateful_set,
            storage,
            drains,
            node_agent,
        } => {
            let status = stateful_set.status.clone().unwrap_or_default();
            let ready = status.ready_replicas.unwrap_or(0);
            let updated = status.updated_replicas.unwrap_or(0);
            let observed = status.observed_generation == stateful_set.metadata.generation;
            let rolled_out = observed
                && updated >= replicas
                && status.current_revision.is_some()
                && status.current_revision == status.update_revision
                && status.replicas <= replicas;
            let all_ready = ready >= replicas;
            let ready_verdict = if all_ready {
                verdict(
                    READY,
                    true,
                    "AllReplicasReady",
                    format!("{ready} of {replicas} replicas are ready"),
                )
            } else {
                verdict(
                    READY,
                    false,
                    "ReplicasNotReady",
                    format!(
                        "{ready} of {replicas} replicas are ready; see the events of the pods {}-N if this lasts",
                        collector.name_any()
                    ),
                )
            };
            let progressing = if rolled_out {
                verdict(
                    PROGRESSING,
                    false,
                    "RolloutComplete",
                    format!("{updated} replicas run the current spec"),
                )
            } else {
                verdict(
                    PROGRESSING,
                    true,
                    "RollingOut",
                    format!("{updated} of {replicas} replicas run the current spec"),
                )
            };
            let degraded = match storage {
                Some(problem) => verdict(DEGRADED, true, problem.reason(), problem.message()),
                None => verdict(
                    DEGRADED,
                    false,
                    "AsExpected",
                    "every child was applied".into(),
                ),
            };
            let (draining, reason, message) = drain::verdict(drains);
            let draining = verdict(DRAINING, draining, reason, message);
            let mut verdicts = vec![ready_verdict, progressing, degraded, draining];
            verdicts.extend(node_agent.map(|agent| node_agent_verdict(collector, agent)));
            (verdicts, ready)
        }
    };

    let generation = collector.metadata.generation;
    let conditions = verdicts
        .into_iter()
        .map(|v| {
            let status = if v.status { "True" } else { "False" }.to_string();
            let last_transition_time = previous
                .conditions
                .iter()
                .find(|c| c.type_ == v.type_ && c.status == status)
                .map(|c| c.last_transition_time.clone())
                .unwrap_or_else(|| now.clone());
            Condition {
                type_: v.type_.to_string(),
                status,
                reason: v.reason.to_string(),
                message: v.message,
                observed_generation: generation,
                last_transition_time,
            }
        })
        .collect();

    MeteringCollectorStatus {
        conditions,
        observed_generation: generation,
        ready_replicas,
        endpoint: endpoint(collector),
    }
}

/// Whether the node agent's pods are ready on every node the DaemonSet should run on.
fn node_agent_verdict(collector: &MeteringCollector, agent: &DaemonSet) -> Verdict {
    let status = agent.status.clone().unwrap_or_default();
    let desired = status.desired_number_scheduled;
    let ready = status.number_ready;
    let observed = status.observed_generation == agent.metadata.generation;
    if observed && desired > 0 && ready >= desired {
        verdict(
            NODE_AGENT_READY,
            true,
            "AgentsReady",
            format!("{ready} of {desired} node agents are ready"),
        )
    } else {
        verdict(
            NODE_AGENT_READY,
            false,
            "AgentsNotReady",
            format!(
                "{ready} of {desired} node agents are ready; injected sidecars on the other nodes lose their \
                 fallback. If this lasts, see the events of DaemonSet {}: a namespace enforcing the baseline or \
                 restricted Pod Security Standard refuses the agent's hostPath volume",
                crate::node_agent::name(collector)
            ),
        )
    }
}

fn verdict(type_: &'static str, status: bool, reason: &'static str, message: String) -> Verdict {
    Verdict {
        type_,
        status,
        reason,
        message,
    }
}

/// Where clients send events: the collector Service's in-cluster URL.
pub fn endpoint(collector: &MeteringCollector) -> Option<String> {
    let namespace = collector.namespace()?;
    Some(format!(
        "http://{}.{namespace}.svc:{}",
        collector.name_any(),
        collector.spec.service.port
    ))
}

/// The conditions whose status differs between two statuses, as `(type, new condition)`: the transitions worth an
/// Event.
pub fn transitions<'a>(
    before: Option<&MeteringCollectorStatus>,
    after: &'a MeteringCollectorStatus,
) -> Vec<&'a Condition> {
    after
        .conditions
        .iter()
        .filter(|c| {
            before
                .and_then(|b| b.conditions.iter().find(|p| p.type_ == c.type_))
                .is_none_or(|p| p.status != c.status || p.reason != c.reason)
        })
        .collect()
}
