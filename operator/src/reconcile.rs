//! The reconciler: read → validate → build → apply → status, and the controller that drives it.
//!
//! Only the apply and status stages talk to the API server. Every write is a server-side apply with the one field
//! manager [`FIELD_MANAGER`], forced, so a reconcile that changes nothing writes nothing.

use std::collections::HashMap;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::core::error_boundary::InvalidObject;
use kube::core::{ApiResource, DeserializeGuard, DynamicObject};
use kube::runtime::Controller;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;

use crate::apply::{self, Applied, apply, deleted};
use crate::build;
use crate::caches::{ChildStores, Triggers};
use crate::crd::{FIELD_MANAGER, MeteringCollector, MeteringCollectorStatus, key_of};
use crate::drain::{self, Step};
use crate::metrics::Metrics;
use crate::status::{self, Observation};
use crate::storage::{self, ClaimAction, StorageProblem};
use crate::validate;

/// How often a healthy collector is looked at again even if nothing changed.
const RESYNC: Duration = Duration::from_secs(300);
/// Backoff of failed reconciles: doubles from the first to the last.
const BACKOFF_FIRST: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(300);
/// How soon a collector whose buffer claims wait to be bound (before they can grow) is looked at again.
const CLAIM_BINDING_RECHECK: Duration = Duration::from_secs(30);
/// How soon a collector with a drain under way is looked at again (its Jobs and pods also wake it).
const DRAIN_RECHECK: Duration = Duration::from_secs(5);

/// Why a reconcile failed; these are retried with backoff. Problems of the spec are not errors: they are reported
/// on the status and wait for the next change.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("applying {kind} {name}: {source}")]
    Apply {
        kind: &'static str,
        name: String,
        source: kube::Error,
    },
    #[error("writing the status of {name}: {source}")]
    Status { name: String, source: kube::Error },
    #[error("{action}: {source}")]
    Storage { action: String, source: kube::Error },
    #[error("{action}: {source}")]
    Drain { action: String, source: kube::Error },
}

impl Error {
    /// The `error` label of the failure metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Apply { .. } => "apply",
            Error::Status { .. } => "status",
            Error::Storage { .. } => "storage",
            Error::Drain { .. } => "drain",
        }
    }
}

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub metrics: Arc<Metrics>,
    /// The children's watch caches, where the apply stage finds orphans.
    pub children: ChildStores,
    recorder: Recorder,
    /// Consecutive failures per collector (`namespace/name`), for the backoff.
    failures: parking_lot::Mutex<HashMap<String, u32>>,
}

impl Context {
    /// `instance` names this replica in the Events it publishes (the leader-election identity).
    pub fn new(
        client: Client,
        metrics: Arc<Metrics>,
        children: ChildStores,
        instance: Option<String>,
    ) -> Self {
        let reporter = Reporter {
            controller: FIELD_MANAGER.into(),
            instance,
        };
        Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            children,
            failures: parking_lot::Mutex::new(HashMap::new()),
        }
    }

    fn record_failure(&self, key: &str) -> u32 {
        let mut failures = self.failures.lock();
        let count = failures.entry(key.to_string()).or_insert(0);
        *count = count.saturating_add(1);
        *count
    }

    fn reset_failures(&self, key: &str) {
        self.failures.lock().remove(key);
    }

    /// Forgets the backoff of collectors that no longer exist, so the map holds only watched collectors.
    fn prune_failures(&self, existing: impl FnOnce() -> std::collections::HashSet<String>) {
        let mut failures = self.failures.lock();
        if !failures.is_empty() {
            let existing = existing();
            failures.retain(|key, _| existing.contains(key));
        }
    }
}

/// Reconciles one collector.
pub async fn reconcile(
    collector: Arc<MeteringCollector>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let started = Instant::now();
    let result = reconcile_stages(&collector, &ctx).await;
    ctx.metrics.observe(started.elapsed());
    if result.is_ok() {
        ctx.reset_failures(&collector.key());
    }
    result
}

async fn reconcile_stages(collector: &MeteringCollector, ctx: &Context) -> Result<Action, Error> {
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let validated = match validate::validate(collector) {
        Ok(validated) => validated,
        Err(invalid) => {
            tracing::info!(collector = %collector.key(), %invalid, "invalid spec");
            let status =
                status::desired_status(collector, &Observation::InvalidSpec(&invalid), &now);
            write_status(ctx, collector, status).await?;
            return Ok(Action::await_change());
        }
    };
    let namespace = validated.namespace.as_str();

    let mut objects = build::build(&validated);

    // volumeClaimTemplates are immutable: keep the ones the StatefulSet was created with; size changes go to the
    // claims themselves (the storage stage below).
    let existing = Api::<StatefulSet>::namespaced(ctx.client.clone(), namespace)
        .get_opt(&collector.name_any())
        .await
        .map_err(|source| Error::Storage {
            action: format!("reading StatefulSet {namespace}/{}", collector.name_any()),
            source,
        })?;
    storage::keep_claim_templates(&mut objects.stateful_set, existing.as_ref());

    let applied =
        apply::apply_children(&ctx.client, &ctx.children, collector, namespace, &objects).await;
    let Applied {
        stateful_set,
        node_agent,
    } = match applied {
        Ok(applied) => applied,
        Err(Error::Apply {
            kind,
            source: kube::Error::Api(response),
            ..
        }) if matches!(response.code, 400 | 422) => {
            // The spec produced an object the API server refuses: retrying cannot help.
            let observation = Observation::Rejected {
                kind,
                message: response.message.clone(),
            };
            let status = status::desired_status(collector, &observation, &now);
            write_status(ctx, collector, status).await?;
            return Ok(Action::await_change());
        }
        Err(error) => return Err(error),
    };

    let claims = list_claims(ctx, collector, namespace).await?;
    let storage = reconcile_storage(ctx, collector, namespace, &claims).await?;
    let drains = reconcile_drains(ctx, &validated, &stateful_set, &claims).await?;
    let observation = Observation::Applied {
        stateful_set: &stateful_set,
        storage: storage.problem.as_ref(),
        drains: &drains,
        node_agent: node_agent.as_ref(),
    };
    let status = status::desired_status(collector, &observation, &now);
    write_status(ctx, collector, status).await?;
    Ok(Action::requeue(if drains.iter().any(Step::is_active) {
        DRAIN_RECHECK
    } else if storage.waiting_for_binding {
        CLAIM_BINDING_RECHECK
    } else {
        RESYNC
    }))
}

/// The collector's buffer claims (current replicas and removed ones).
async fn list_claims(
    ctx: &Context,
    collector: &MeteringCollector,
    namespace: &str,
) -> Result<Vec<PersistentVolumeClaim>, Error> {
    let selector = build::label_selector(&build::selector_labels(collector));
    Ok(
        Api::<PersistentVolumeClaim>::namespaced(ctx.client.clone(), namespace)
            .list(&ListParams::default().labels(&selector))
            .await
            .map_err(|source| Error::Storage {
                action: format!("listing the buffer claims in {namespace} ({selector})"),
                source,
            })?
            .items
            .into_iter()
            .filter(|claim| storage::is_buffer_claim(collector, &claim.name_any()))
            .collect(),
    )
}

/// Drains the buffer claims of removed replicas (see [`drain`]): starts, finishes and cancels drain Jobs, deletes
/// the claims they emptied, and returns the steps for the status.
async fn reconcile_drains(
    ctx: &Context,
    validated: &validate::ValidatedCollector,
    stateful_set: &StatefulSet,
    claims: &[PersistentVolumeClaim],
) -> Result<Vec<Step>, Error> {
    let collector = &validated.collector;
    let namespace = validated.namespace.as_str();
    let failed = |action: String| move |source| Error::Drain { action, source };
    let pods_api = Api::<Pod>::namespaced(ctx.client.clone(), namespace);
    let jobs_api = Api::<Job>::namespaced(ctx.client.clone(), namespace);
    let claims_api = Api::<PersistentVolumeClaim>::namespaced(ctx.client.clone(), namespace);
    let removed = claims.iter().any(|claim| {
        storage::claim_ordinal(collector, &claim.name_any())
            .is_some_and(|ordinal| ordinal >= collector.spec.replicas)
    });
    let job_selector = build::label_selector(&drain::job_selector_labels(collector));
    let jobs = jobs_api
        .list(&ListParams::default().labels(&job_selector))
        .await
        .map_err(failed(format!("listing the drain Jobs in {namespace}")))?
        .items;
    if !removed && jobs.is_empty() {
        return Ok(Vec::new());
    }
    let pods = pods_api
        .list(
            &ListParams::default()
                .labels(&build::label_selector(&build::selector_labels(collector))),
        )
        .await
        .map_err(failed(format!(
            "listing the collector's pods in {namespace}"
        )))?
        .items
        .iter()
        .map(|pod| pod.name_any())
        .collect();
    let steps = drain::plan(collector, claims, &pods, &jobs);
    let reference = collector.object_ref(&());
    let delete_job = |job: String| {
        let jobs_api = jobs_api.clone();
        async move {
            deleted(jobs_api.delete(&job, &DeleteParams::background()).await)
                .map_err(failed(format!("deleting the drain Job {namespace}/{job}")))
        }
    };
    for step in &steps {
        let event = match step {
            Step::Start { claim, ordinal } => {
                let job = drain::job(validated, stateful_set, claim, *ordinal);
                apply(&ctx.client, namespace, &job).await?;
                tracing::info!(collector = %collector.key(), %claim, "draining the buffer of a removed replica");
                Some((
                    EventType::Normal,
                    "DrainStarted",
                    format!(
                        "claim {claim} belongs to a removed replica and may hold events: Job {} delivers them",
                        drain::job_name(collector, *ordinal)
                    ),
                ))
            }
            Step::Finished { claim, job } => {
                let pods = pods_api
                    .list(&ListParams::default().labels(&format!("job-name={job}")))
                    .await
                    .map_err(failed(format!(
                        "reading the pods of the drain Job {namespace}/{job}"
                    )))?
                    .items;
                let report = drain::report(&pods);
                let event = match &report {
                    Some(report) if report.is_empty() => {
                        deleted(claims_api.delete(claim, &DeleteParams::background()).await)
                            .map_err(failed(format!(
                                "deleting the drained claim {namespace}/{claim}"
                            )))?;
                        ctx.metrics.drained(report.drained, "deleted");
                        (
                            EventType::Normal,
                            "BufferDrained",
                            format!(
                                "Job {job} delivered the {} events of claim {claim}; the empty claim was deleted",
                                report.drained
                            ),
                        )
                    }
                    _ => {
                        let kept = match &report {
                            Some(report) => format!(
                                "{} dead letters, {} damaged records",
                                report.dead_letters, report.quarantined
                            ),
                            None => "the drain's report is unavailable".into(),
                        };
                        let patch = json!({ "metadata": { "annotations": { drain::KEPT_ANNOTATION: kept } } });
                        claims_api
                            .patch(claim, &PatchParams::default(), &Patch::Merge(&patch))
                            .await
                            .map_err(failed(format!(
                                "annotating the drained claim {namespace}/{claim}"
                            )))?;
                        ctx.metrics
                            .drained(report.as_ref().map_or(0, |r| r.drained), "kept");
                        (
                            EventType::Warning,
                            "UndeliveredKept",
                            format!(
                                "Job {job} drained claim {claim}, which still holds undelivered events ({kept}); the \
                             claim is kept: inspect it with `tally-sidecar dead-letter list`"
                            ),
                        )
                    }
                };
                delete_job(job.clone()).await?;
                Some(event)
            }
            Step::Failed { claim, job } => {
                delete_job(job.clone()).await?;
                Some((
                    EventType::Warning,
                    "DrainFailed",
                    format!(
                        "Job {job} failed to drain claim {claim} (see its pods' logs); starting another"
                    ),
                ))
            }
            Step::Cancel { job } => {
                delete_job(job.clone()).await?;
                Some((
                    EventType::Normal,
                    "DrainCancelled",
                    format!(
                        "Job {job} is no longer needed: its claim is gone or its replica is back"
                    ),
                ))
            }
            Step::WaitForPod { .. } | Step::Running { .. } | Step::Kept { .. } => None,
        };
        if let Some((type_, reason, note)) = event {
            let event = Event {
                type_,
                reason: reason.into(),
                note: Some(note),
                action: "Drain".into(),
                secondary: None,
            };
            if let Err(error) = ctx.recorder.publish(&event, &reference).await {
                tracing::warn!(collector = %collector.key(), %error, "publishing an event failed");
            }
        }
    }
    Ok(steps)
}

/// What the storage stage found.
struct StorageOutcome {
    /// A size change that cannot be carried out; reported on the status, not retried until something changes.
    problem: Option<StorageProblem>,
    /// Some claims must grow but are not bound yet.
    waiting_for_binding: bool,
}

/// Grows the collector's buffer claims to `spec.storage.size` where their StorageClass allows it.
async fn reconcile_storage(
    ctx: &Context,
    collector: &MeteringCollector,
    namespace: &str,
    claims: &[PersistentVolumeClaim],
) -> Result<StorageOutcome, Error> {
    let desired = &collector.spec.storage.size;
    let claims_api = Api::<PersistentVolumeClaim>::namespaced(ctx.client.clone(), namespace);
    let must_grow = claims.iter().any(|claim| {
        storage::requested(claim).and_then(|current| storage::compare(desired, current))
            == Some(std::cmp::Ordering::Greater)
    });
    // StorageClasses are only needed (and only read) when a claim must grow.
    let classes = if must_grow {
        Api::<StorageClass>::all(ctx.client.clone())
            .list(&ListParams::default())
            .await
            .map_err(|source| Error::Storage {
                action: "listing StorageClasses".into(),
                source,
            })?
            .items
    } else {
        Vec::new()
    };
    let actions = storage::plan(desired, claims, &classes);
    let reference = collector.object_ref(&());
    for action in &actions {
        let ClaimAction::Expand { claim, from } = action else {
            continue;
        };
        // Server-side apply, like every other write: the operator owns only the storage request of the claim.
        let patch = json!({
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": { "name": claim, "namespace": namespace },
            "spec": { "resources": { "requests": { "storage": desired } } },
        });
        claims_api
            .patch(
                claim,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await
            .map_err(|source| Error::Storage {
                action: format!(
                    "expanding PersistentVolumeClaim {namespace}/{claim} to {}",
                    desired.0
                ),
                source,
            })?;
        tracing::info!(collector = %collector.key(), %claim, from = %from.0, to = %desired.0, "expanded a buffer claim");
        let event = Event {
            type_: EventType::Normal,
            reason: "StorageExpanded".into(),
            note: Some(format!(
                "buffer claim {claim} expanded from {} to {}",
                from.0, desired.0
            )),
            action: "ExpandVolume".into(),
            secondary: None,
        };
        if let Err(error) = ctx.recorder.publish(&event, &reference).await {
            tracing::warn!(collector = %collector.key(), %error, "publishing an event failed");
        }
    }
    Ok(StorageOutcome {
        problem: storage::problem(desired, &actions),
        waiting_for_binding: actions
            .iter()
            .any(|a| matches!(a, ClaimAction::WaitForBinding { .. })),
    })
}

/// Writes the status with server-side apply on the status subresource, only when it differs, and publishes an
/// Event for each condition that changed.
async fn write_status(
    ctx: &Context,
    collector: &MeteringCollector,
    status: MeteringCollectorStatus,
) -> Result<(), Error> {
    if collector.status.as_ref() == Some(&status) {
        return Ok(());
    }
    let name = collector.name_any();
    let namespace = collector.namespace().unwrap_or_default();
    let patch = json!({
        "apiVersion": MeteringCollector::api_version(&()),
        "kind": MeteringCollector::kind(&()),
        "status": status,
    });
    Api::<MeteringCollector>::namespaced(ctx.client.clone(), &namespace)
        .patch_status(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
        .map_err(|source| Error::Status {
            name: name.clone(),
            source,
        })?;

    let reference = collector.object_ref(&());
    for condition in status::transitions(collector.status.as_ref(), &status) {
        let warning = (condition.type_ == status::DEGRADED && condition.status == "True")
            || (condition.type_ == status::READY && condition.status == "False");
        let event = Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: condition.reason.clone(),
            note: Some(format!(
                "{}={}: {}",
                condition.type_, condition.status, condition.message
            )),
            action: "Reconcile".into(),
            secondary: None,
        };
        // Events are a courtesy: failing to publish one must not fail the reconcile.
        if let Err(error) = ctx.recorder.publish(&event, &reference).await {
            tracing::warn!(collector = %collector.key(), %error, "publishing an event failed");
        }
    }
    Ok(())
}

/// Retries a failed reconcile with exponential backoff per collector.
pub fn error_policy(
    collector: Arc<DeserializeGuard<MeteringCollector>>,
    error: &Error,
    ctx: Arc<Context>,
) -> Action {
    ctx.metrics.failed(error.metric_label());
    let key = key_of(collector.meta());
    let failures = ctx.record_failure(&key);
    let delay = BACKOFF_FIRST
        .saturating_mul(1u32 << failures.saturating_sub(1).min(16))
        .min(BACKOFF_MAX);
    tracing::warn!(collector = %key, %error, ?delay, "reconcile failed; retrying");
    Action::requeue(delay)
}

/// Runs the controller until `shutdown` resolves, on the watch caches of [`caches::watch`]: opens their triggers,
/// reconciles every collector once (whatever changed while nobody led is in the caches but woke nobody), then each
/// collector whose object or children change.
///
/// Collectors are watched through [`DeserializeGuard`]: a plain typed watch fails its whole list when one stored
/// object does not fit the Rust type (one written under an earlier CRD version, say), which would stop every
/// collector from being reconciled. A malformed one reaches [`reconcile_object`] as such and is reported instead.
/// Children are watched by label and for their metadata only: a change only needs to wake their owner, which then
/// reads what it needs.
pub async fn run(
    ctx: Arc<Context>,
    triggers: Triggers,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let metrics = ctx.metrics.clone();
    let prune = ctx.clone();
    let store = triggers.collectors.clone();
    let ready = store.clone();
    triggers.open();
    Controller::for_shared_stream(triggers.collector_changes, store.clone())
        .owns_shared_stream(triggers.stateful_sets)
        .owns_shared_stream(triggers.config_maps)
        .owns_shared_stream(triggers.services)
        .owns_shared_stream(triggers.pod_disruption_budgets)
        .owns_shared_stream(triggers.daemon_sets)
        .owns_shared_stream(triggers.jobs)
        .reconcile_all_on(futures::stream::once(async move {
            // An error means the watch is gone, which only happens on shutdown.
            let _ = ready.wait_until_ready().await;
        }))
        .graceful_shutdown_on(shutdown)
        .run(reconcile_object, error_policy, ctx)
        .for_each(|result| {
            match result {
                Ok((object, _)) => tracing::debug!(collector = %object, "reconciled"),
                Err(error) => tracing::warn!(%error, "controller"),
            }
            let collectors = store.state();
            prune.prune_failures(|| collectors.iter().map(|c| key_of(c.meta())).collect());
            let not_ready = collectors.iter().filter(|c| !is_ready(c)).count();
            metrics
                .collectors
                .set(i64::try_from(collectors.len()).unwrap_or(i64::MAX));
            metrics
                .collectors_not_ready
                .set(i64::try_from(not_ready).unwrap_or(i64::MAX));
            futures::future::ready(())
        })
        .await;
}

/// Whether a watched collector's `Ready` condition is `True`; a malformed one counts as not ready.
fn is_ready(collector: &DeserializeGuard<MeteringCollector>) -> bool {
    collector
        .0
        .as_ref()
        .ok()
        .and_then(|c| c.status.as_ref())
        .is_some_and(|status| {
            status
                .conditions
                .iter()
                .any(|c| c.type_ == status::READY && c.status == "True")
        })
}

/// Reason of the conditions and the Event of a collector the operator cannot read.
pub const MALFORMED_REASON: &str = "MalformedObject";

/// Reconciles one watched object: [`reconcile`]s it, or reports it as malformed and waits for it to change.
pub async fn reconcile_object(
    object: Arc<DeserializeGuard<MeteringCollector>>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    match &object.0 {
        Ok(collector) => reconcile(Arc::new(collector.clone()), ctx).await,
        Err(invalid) => {
            report_malformed(&ctx, invalid).await?;
            Ok(Action::await_change())
        }
    }
}

/// Reports a malformed collector: a log line, the failure metric (`error="malformed"`), a Warning Event, and
/// Degraded=True on its status naming the field when the API server accepts that status (once per problem).
///
/// The guard's error names no field (it comes from an untyped value), so the object is read once more, raw, and
/// deserialised with its path tracked: the report says which field to fix. This only happens for a malformed one.
async fn report_malformed(ctx: &Context, invalid: &InvalidObject) -> Result<(), Error> {
    let name = invalid.metadata.name.clone().unwrap_or_default();
    let namespace = invalid.metadata.namespace.clone().unwrap_or_default();
    let resource = ApiResource::erase::<MeteringCollector>(&());
    let raw = Api::<DynamicObject>::namespaced_with(ctx.client.clone(), &namespace, &resource);
    let Some(object) = raw.get_opt(&name).await.map_err(|source| Error::Status {
        name: name.clone(),
        source,
    })?
    else {
        // Deleted since the watch saw it: nothing to report.
        return Ok(());
    };
    let value = serde_json::to_value(&object).unwrap_or_default();
    let error = match serde_path_to_error::deserialize::<_, MeteringCollector>(value) {
        Err(error) => error.to_string(),
        // Fixed since the watch saw it: the next event reconciles it.
        Ok(_) => return Ok(()),
    };
    let message = format!(
        "the operator cannot read this MeteringCollector: {error}; fix that field (for example with kubectl edit \
         meteringcollector {name} -n {namespace}) so that it matches the CRD schema"
    );
    // The status write below comes back through the watch: report each problem once.
    let already = object
        .data
        .pointer("/status/conditions")
        .and_then(|c| c.as_array())
        .is_some_and(|conditions| {
            conditions.iter().any(|c| {
                c["type"] == status::DEGRADED
                    && c["reason"] == MALFORMED_REASON
                    && c["message"] == message.as_str()
            })
        });
    if already {
        return Ok(());
    }
    tracing::warn!(collector = %format!("{namespace}/{name}"), %error, "malformed MeteringCollector");
    ctx.metrics.failed("malformed");

    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let generation = object.metadata.generation;
    let condition = |type_: &str, status: &str| {
        json!({
            "type": type_,
            "status": status,
            "reason": MALFORMED_REASON,
            "message": message,
            "lastTransitionTime": now,
            "observedGeneration": generation,
        })
    };
    let patch = json!({
        "status": {
            "conditions": [
                condition(status::READY, "False"),
                condition(status::PROGRESSING, "False"),
                condition(status::DEGRADED, "True"),
            ],
            "observedGeneration": generation,
        },
    });
    // A merge patch, not an apply: server-side apply needs the live object to fit the schema, which this one does
    // not. The API server may still refuse the write (a CEL rule on the malformed field fails to evaluate); then
    // the log, the metric and the Event are the report.
    let written = raw
        .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await;
    match written {
        Ok(_) => {}
        Err(kube::Error::Api(response)) if matches!(response.code, 400 | 422 | 500) => {
            tracing::warn!(
                collector = %format!("{namespace}/{name}"),
                refusal = %response.message,
                "the API server refuses the status of the malformed collector; reporting with an Event only"
            );
        }
        Err(source) => return Err(Error::Status { name, source }),
    }
    let event = Event {
        type_: EventType::Warning,
        reason: MALFORMED_REASON.into(),
        note: Some(message.clone()),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(error) = ctx
        .recorder
        .publish(&event, &object.object_ref(&resource))
        .await
    {
        tracing::warn!(collector = %format!("{namespace}/{name}"), %error, "publishing an event failed");
    }
    Ok(())
}
