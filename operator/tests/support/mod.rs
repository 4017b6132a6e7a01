//! Helpers shared by the operator's control-plane tests (`control_plane`, `inject`, `leader`, `lifecycle`, `ready`,
//! `robustness`, `storage`): starting a control plane with the CRD installed (with a real node for `ready` and
//! `lifecycle`), creating collectors while the new type is not served yet, running the controller in the background,
//! polling with a deadline, reading the Events a collector has, creating PersistentVolumes for the binder, and the
//! assertions several of them make (a request refused as invalid, a container's environment, which `data_path`
//! reads too).

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{
    Container, HostPathVolumeSource, PersistentVolume, PersistentVolumeSpec,
};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, CustomResourceValidation, JSONSchemaProps,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::{ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, DynamicObject};
use kube::{Api, Client, CustomResourceExt};
use tally_e2e::ControlPlane;
use tally_operator::caches::{self, Triggers};
use tally_operator::crd::MeteringCollector;
use tally_operator::metrics::Metrics;
use tally_operator::reconcile::{self, Context};
use tally_tests::poll::{API_INTERVAL, poll_until_every};
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

/// Stores MeteringCollectors that do not fit the Rust type, as an earlier CRD version that accepted anything
/// would have: applies such a CRD, creates `objects` (name, spec) in `namespace`, then puts the operator's CRD back
/// in force (the API server then refuses such objects, but the stored ones stay as they are). Returns an untyped
/// Api of the collectors in `namespace`.
pub async fn store_malformed(
    client: &Client,
    namespace: &str,
    objects: &[(&str, serde_json::Value)],
) -> Api<DynamicObject> {
    let mut permissive = MeteringCollector::crd();
    permissive.spec.versions[0].schema = Some(CustomResourceValidation {
        open_api_v3_schema: Some(JSONSchemaProps {
            type_: Some("object".into()),
            x_kubernetes_preserve_unknown_fields: Some(true),
            ..JSONSchemaProps::default()
        }),
    });
    apply_crd(client, &permissive).await;
    let resource = ApiResource::erase::<MeteringCollector>(&());
    let raw = Api::<DynamicObject>::namespaced_with(client.clone(), namespace, &resource);
    let object = |name: &str, spec: &serde_json::Value| -> DynamicObject {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "metering.tally.dev/v1alpha1",
            "kind": "MeteringCollector",
            "metadata": { "name": name },
            "spec": spec,
        }))
        .expect("object")
    };
    for (name, spec) in objects {
        eventually(
            "the permissive CRD stores the malformed collector",
            || async {
                raw.create(&PostParams::default(), &object(name, spec))
                    .await
                    .ok()
            },
        )
        .await;
    }
    install_crd(client).await;
    // A number that is a string: refused once the real schema is in force.
    let probe = object("probe", &serde_json::json!({ "replicas": "three" }));
    eventually("the real schema is in force", || async {
        match raw.create(&PostParams::default(), &probe).await {
            Err(kube::Error::Api(status)) if status.code == 422 => Some(()),
            Ok(_) => {
                let _ = raw.delete("probe", &Default::default()).await;
                None
            }
            Err(_) => None,
        }
    })
    .await;
    let typed = Api::<MeteringCollector>::namespaced(client.clone(), namespace);
    assert!(
        typed.list(&Default::default()).await.is_err(),
        "a typed list of the namespace should fail on the malformed objects, or the test proves nothing"
    );
    raw
}

/// Starts a control plane (without fake nodes), installs the operator's CRD and creates a namespace whose name
/// starts with `namespace`; returns the control plane, a client of it and the namespace's name.
pub async fn control_plane_with_crd(namespace: &str) -> (ControlPlane, Client, String) {
    let control_plane = ControlPlane::start().await.expect("control plane starts");
    let client = control_plane.client();
    install_crd(&client).await;
    let namespace = control_plane
        .new_namespace(namespace)
        .await
        .expect("namespace");
    (control_plane, client, namespace)
}

/// Asserts that the API server refused a request as invalid (422) with a message that says `message`.
pub fn assert_invalid(error: kube::Error, message: &str) {
    let kube::Error::Api(status) = error else {
        panic!("expected an API error, got {error}");
    };
    assert_eq!(status.code, 422, "{status:?}");
    assert!(
        status.message.contains(message),
        "{} should say {message}",
        status.message
    );
}

/// The value of the environment variable `name` of `container`, when it is given as a value.
pub fn env<'a>(container: &'a Container, name: &str) -> Option<&'a str> {
    container
        .env
        .iter()
        .flatten()
        .find(|e| e.name == name)
        .and_then(|e| e.value.as_deref())
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

/// A controller context for `client` with fresh metrics and no leader election, on watch caches that run until
/// the test ends.
pub fn context(client: &Client) -> Arc<Context> {
    context_and_triggers(client).0
}

fn context_and_triggers(client: &Client) -> (Arc<Context>, Triggers) {
    let metrics = Arc::new(Metrics::default());
    let (triggers, children, watches) = caches::watch(client, &metrics, std::future::pending());
    tokio::spawn(watches);
    let ctx = Arc::new(Context::new(client.clone(), metrics, children, None));
    (ctx, triggers)
}

impl RunningController {
    /// Starts the watch caches and the controller on them, as a replica that leads from its start.
    pub fn start(client: &Client) -> Self {
        let (ctx, triggers) = context_and_triggers(client);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(reconcile::run(ctx.clone(), triggers, async move {
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

/// Polls `check` (an API call) until it returns `Some`, panicking with `what` after [`WITHIN`].
pub async fn eventually<T>(what: &str, check: impl AsyncFnMut() -> Option<T>) -> T {
    poll_until_every(WITHIN, API_INTERVAL, what, check).await
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

/// `$TALLY_IMAGES_DIR/tally-sidecar-<version>.tar`, which `make unit` builds first.
fn sidecar_image() -> std::path::PathBuf {
    let dir = std::env::var_os("TALLY_IMAGES_DIR")
        .map(std::path::PathBuf::from)
        .expect("TALLY_IMAGES_DIR is set (run `make unit`, which builds the images)");
    dir.join(format!("tally-sidecar-{}.tar", env!("CARGO_PKG_VERSION")))
}

/// A control plane with a real node (`tally_e2e::RealNode`) that has the tally-sidecar image of `make images`, and
/// the CRD installed.
pub async fn real_node_with_crd() -> (ControlPlane, Client) {
    let control_plane = ControlPlane::builder()
        .with_real_node()
        .start()
        .await
        .unwrap_or_else(|e| panic!("control plane with a real node: {e}"));
    let node = control_plane.real_node().expect("a real node");
    node.import_image(&sidecar_image())
        .unwrap_or_else(|e| panic!("importing the sidecar image: {e}"));
    let client = control_plane.client();
    install_crd(&client).await;
    (control_plane, client)
}

/// Creates a 10Gi ReadWriteOnce hostPath volume `name` the binder can give to a claim of `class` (`None`: a claim
/// without a StorageClass). It is retained when its claim is deleted.
pub async fn persistent_volume(client: &Client, name: &str, class: Option<&str>) {
    let volume = PersistentVolume {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..ObjectMeta::default()
        },
        spec: Some(PersistentVolumeSpec {
            capacity: Some(BTreeMap::from([(
                "storage".into(),
                Quantity("10Gi".into()),
            )])),
            access_modes: Some(vec!["ReadWriteOnce".into()]),
            storage_class_name: class.map(Into::into),
            persistent_volume_reclaim_policy: Some("Retain".into()),
            host_path: Some(HostPathVolumeSource {
                path: format!("/tmp/{name}"),
                ..HostPathVolumeSource::default()
            }),
            ..PersistentVolumeSpec::default()
        }),
        ..PersistentVolume::default()
    };
    Api::<PersistentVolume>::all(client.clone())
        .create(&PostParams::default(), &volume)
        .await
        .expect("PersistentVolume created");
}
