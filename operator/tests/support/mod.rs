//! Helpers shared by the operator's control-plane tests (`storage`, `robustness`): installing the CRD, creating
//! collectors while the new type is not served yet, running the controller in the background, polling with a
//! deadline, and reading the Events a collector has.

#![allow(dead_code)]

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, CustomResourceExt};
use tally_operator::crd::MeteringCollector;
use tally_operator::metrics::Metrics;
use tally_operator::reconcile::{self, Context};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Generous for two busy cores; a working controller acts within a second or two.
pub const WITHIN: Duration = Duration::from_secs(60);

/// Parses a YAML fixture.
pub fn collector(yaml: &str) -> MeteringCollector {
    serde_yaml::from_str(yaml).expect("fixture is a MeteringCollector")
}

/// Applies `crd` (server-side, so it also replaces an earlier version) and waits until it is Established.
pub async fn apply_crd(client: &Client, crd: &CustomResourceDefinition) {
    let crds = Api::<CustomResourceDefinition>::all(client.clone());
    let name = crd.metadata.name.clone().expect("CRD name");
    crds.patch(
        &name,
        &PatchParams::apply("tally-e2e").force(),
        &Patch::Apply(crd),
    )
    .await
    .expect("the API server accepts the CRD");
    eventually("the CRD is established", || async {
        let crd = crds.get(&name).await.ok()?;
        crd.status?
            .conditions?
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True")
            .then_some(())
    })
    .await;
}

/// Installs the operator's CRD.
pub async fn install_crd(client: &Client) {
    apply_crd(client, &MeteringCollector::crd()).await;
}

/// Creates a collector, retrying while the new resource type is not yet served.
pub async fn create(
    api: &Api<MeteringCollector>,
    collector: &MeteringCollector,
) -> MeteringCollector {
    eventually("the MeteringCollector is created", || async {
        api.create(&PostParams::default(), collector).await.ok()
    })
    .await
}

/// The operator's controller running in this process until [`RunningController::stop`].
pub struct RunningController {
    pub ctx: Arc<Context>,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl RunningController {
    pub fn start(client: &Client) -> Self {
        let ctx = Arc::new(Context::new(
            client.clone(),
            Arc::new(Metrics::default()),
            None,
        ));
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(reconcile::run(ctx.clone(), async move {
            let _ = stopped.await;
        }));
        RunningController { ctx, stop, task }
    }

    /// Stops the controller and waits for it to finish.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(WITHIN, self.task)
            .await
            .expect("the controller stops on shutdown")
            .expect("controller task");
    }
}

/// Polls `check` until it returns `Some`, panicking with `what` after [`WITHIN`].
pub async fn eventually<T, F, Fut>(what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    eventually_within(WITHIN, what, check).await
}

/// Polls `check` until it returns `Some`, panicking with `what` after `within`.
pub async fn eventually_within<T, F, Fut>(within: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The events.k8s.io/v1 Events in `namespace` regarding the object `kind`/`name`.
pub async fn events_regarding(
    client: &Client,
    namespace: &str,
    kind: &str,
    name: &str,
) -> Vec<Event> {
    Api::<Event>::namespaced(client.clone(), namespace)
        .list(&ListParams::default())
        .await
        .expect("listing Events")
        .items
        .into_iter()
        .filter(|e| {
            e.regarding
                .as_ref()
                .is_some_and(|r| r.kind.as_deref() == Some(kind) && r.name.as_deref() == Some(name))
        })
        .collect()
}

/// Waits for an Event of `type_` and `reason` regarding the collector `name`, and returns it.
pub async fn expect_event(
    client: &Client,
    namespace: &str,
    name: &str,
    type_: &str,
    reason: &str,
) -> Event {
    eventually(
        &format!("a {type_} Event {reason} regarding MeteringCollector {name}"),
        || async {
            events_regarding(client, namespace, "MeteringCollector", name)
                .await
                .into_iter()
                .find(|e| e.type_.as_deref() == Some(type_) && e.reason.as_deref() == Some(reason))
        },
    )
    .await
}
