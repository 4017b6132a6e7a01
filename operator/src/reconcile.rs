//! The reconciler: read → validate → build → apply → status, and the controller that drives it.
//!
//! Only the apply and status stages talk to the API server. Every write is a server-side apply with the one field
//! manager [`FIELD_MANAGER`], forced, so a reconcile that changes nothing writes nothing.

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::{Controller, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::build::{self, CollectorObjects};
use crate::crd::{FIELD_MANAGER, MeteringCollector, MeteringCollectorStatus};
use crate::metrics::Metrics;
use crate::status::{self, Observation};
use crate::validate;

/// How often a healthy collector is looked at again even if nothing changed.
const RESYNC: Duration = Duration::from_secs(300);
/// Backoff of failed reconciles: doubles from the first to the last.
const BACKOFF_FIRST: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(300);

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
}

impl Error {
    /// The `error` label of the failure metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Apply { .. } => "apply",
            Error::Status { .. } => "status",
        }
    }
}

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub metrics: Arc<Metrics>,
    recorder: Recorder,
    /// Consecutive failures per collector (`namespace/name`), for the backoff.
    failures: Mutex<HashMap<String, u32>>,
}

impl Context {
    pub fn new(client: Client, metrics: Arc<Metrics>) -> Self {
        let reporter = Reporter {
            controller: FIELD_MANAGER.into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            failures: Mutex::new(HashMap::new()),
        }
    }

    fn record_failure(&self, key: &str) -> u32 {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let count = failures.entry(key.to_string()).or_insert(0);
        *count = count.saturating_add(1);
        *count
    }

    fn reset_failures(&self, key: &str) {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        failures.remove(key);
    }
}

fn key(collector: &MeteringCollector) -> String {
    format!(
        "{}/{}",
        collector.namespace().unwrap_or_default(),
        collector.name_any()
    )
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
        ctx.reset_failures(&key(&collector));
    }
    result
}

async fn reconcile_stages(collector: &MeteringCollector, ctx: &Context) -> Result<Action, Error> {
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let validated = match validate::validate(collector) {
        Ok(validated) => validated,
        Err(invalid) => {
            tracing::info!(collector = %key(collector), %invalid, "invalid spec");
            let status =
                status::desired_status(collector, &Observation::InvalidSpec(&invalid), &now);
            write_status(ctx, collector, status).await?;
            return Ok(Action::await_change());
        }
    };
    let namespace = validated.namespace.as_str();

    let CollectorObjects {
        config_map,
        service,
        headless_service,
        pod_disruption_budget,
        stateful_set,
    } = build::build(&validated);

    let applied = async {
        apply(&ctx.client, namespace, &config_map).await?;
        apply(&ctx.client, namespace, &service).await?;
        apply(&ctx.client, namespace, &headless_service).await?;
        apply(&ctx.client, namespace, &pod_disruption_budget).await?;
        // Last: its pods need the ConfigMap.
        apply(&ctx.client, namespace, &stateful_set).await
    }
    .await;

    let stateful_set = match applied {
        Ok(stateful_set) => stateful_set,
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

    let status = status::desired_status(collector, &Observation::Applied(&stateful_set), &now);
    write_status(ctx, collector, status).await?;
    Ok(Action::requeue(RESYNC))
}

/// Server-side apply of one child, forced, with the operator's field manager.
async fn apply<K>(client: &Client, namespace: &str, object: &K) -> Result<K, Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + k8s_openapi::Resource
        + Clone
        + Serialize
        + DeserializeOwned
        + Debug,
{
    let name = object.meta().name.clone().unwrap_or_default();
    Api::<K>::namespaced(client.clone(), namespace)
        .patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(object),
        )
        .await
        .map_err(|source| Error::Apply {
            kind: <K as k8s_openapi::Resource>::KIND,
            name,
            source,
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
            tracing::warn!(collector = %key(collector), %error, "publishing an event failed");
        }
    }
    Ok(())
}

/// Retries a failed reconcile with exponential backoff per collector.
pub fn error_policy(collector: Arc<MeteringCollector>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.failed(error.metric_label());
    let failures = ctx.record_failure(&key(&collector));
    let delay = BACKOFF_FIRST
        .saturating_mul(1u32 << failures.saturating_sub(1).min(16))
        .min(BACKOFF_MAX);
    tracing::warn!(collector = %key(&collector), %error, ?delay, "reconcile failed; retrying");
    Action::requeue(delay)
}

/// Runs the controller until `shutdown` resolves: watches MeteringCollectors in every namespace and the children
/// they own.
pub async fn run(
    ctx: Arc<Context>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let client = ctx.client.clone();
    let collectors = Api::<MeteringCollector>::all(client.clone());
    let config = watcher::Config::default().any_semantic();
    let metrics = ctx.metrics.clone();
    let controller = Controller::new(collectors, config.clone());
    let store = controller.store();
    controller
        .owns(Api::<StatefulSet>::all(client.clone()), config.clone())
        .owns(Api::<ConfigMap>::all(client.clone()), config.clone())
        .owns(Api::<Service>::all(client.clone()), config.clone())
        .owns(Api::<PodDisruptionBudget>::all(client), config)
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| {
            match result {
                Ok((object, _)) => tracing::debug!(collector = %object, "reconciled"),
                Err(error) => tracing::warn!(%error, "controller"),
            }
            metrics
                .collectors
                .set(i64::try_from(store.state().len()).unwrap_or(i64::MAX));
            futures::future::ready(())
        })
        .await;
}
