//! The watch caches: every replica keeps them from its start, leader or not, so the one that is elected reconciles
//! at once instead of first listing every collector and child (what controller-runtime does with its informers).
//!
//! One watch per kind feeds a store: the MeteringCollectors (read through [`DeserializeGuard`], see
//! [`crate::reconcile::run`]) and, by the label [`MANAGED_BY_SELECTOR`] and for their metadata only, the children
//! whose changes wake their owner; the apply stage finds the orphans to delete in the children's stores
//! ([`ChildStores`]) instead of listing them on every reconcile.
//!
//! The sidecar-injection webhook reads the same collectors' store ([`CollectorView`]), on every replica.
//!
//! While the replica follows, the watches only keep the stores current. When it leads, [`Triggers::open`] lets
//! every change through to the controller, which also reconciles every collector in the store once: changes made
//! while nobody led reached the store but woke nobody.

use std::fmt::Debug;
use std::future::Future;
use std::hash::Hash;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::{DaemonSet, StatefulSet};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::core::{DeserializeGuard, PartialObjectMeta};
use kube::runtime::WatchStreamExt;
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, Resource, ResourceExt};
use prometheus_client::metrics::gauge::Gauge;
use serde::de::DeserializeOwned;
use tokio::sync::Notify;

use crate::crd::MeteringCollector;
use crate::metrics::Metrics;

/// A MeteringCollector as watched: the object, or why it does not fit the type.
pub type Collector = DeserializeGuard<MeteringCollector>;
/// What is kept of a child: its metadata.
pub type Child<K> = PartialObjectMeta<K>;

/// The label every child carries (see [`crate::build::labels`]); the children's watches select on it, so the
/// operator watches its own objects, not every ConfigMap, Service and StatefulSet of the cluster.
pub const MANAGED_BY_SELECTOR: &str = "app.kubernetes.io/managed-by=tally-operator";

/// The changes of one kind a watch passes to the controller.
pub type Changes<K> = async_channel::Receiver<Arc<K>>;

/// How many changes may wait for the controller before a watch waits for it.
const PENDING_CHANGES: usize = 1024;

/// The controller's side of the caches: the collectors' store, and the changes it is woken by once opened.
pub struct Triggers {
    /// Every MeteringCollector in the cluster.
    pub collectors: Store<Collector>,
    collectors_changed: Arc<Notify>,
    open: Arc<AtomicBool>,
    pub collector_changes: Changes<Collector>,
    pub stateful_sets: Changes<Child<StatefulSet>>,
    pub config_maps: Changes<Child<ConfigMap>>,
    pub services: Changes<Child<Service>>,
    pub pod_disruption_budgets: Changes<Child<PodDisruptionBudget>>,
    pub daemon_sets: Changes<Child<DaemonSet>>,
    pub jobs: Changes<Child<Job>>,
}

impl Triggers {
    /// From now on every change reaches the controller. Whatever changed before is in the stores: the controller
    /// reconciles every collector once when it starts.
    pub fn open(&self) {
        self.open.store(true, Ordering::Release);
    }

    /// The collectors as the webhook reads them, whether or not this replica leads.
    pub fn collector_view(&self) -> CollectorView {
        CollectorView {
            store: self.collectors.clone(),
            changed: self.collectors_changed.clone(),
        }
    }
}

/// The MeteringCollectors' store and a signal on each of its changes (one permit is kept while nobody waits, so a
/// change is never missed): what the sidecar-injection webhook picks collectors from and shapes its configuration by.
#[derive(Clone)]
pub struct CollectorView {
    pub store: Store<Collector>,
    pub changed: Arc<Notify>,
}

impl CollectorView {
    /// Calls `f` with the collectors that fit the type, borrowed from the store without a copy. One that does not
    /// fit (stored under an earlier, permissive CRD) is left out instead of hiding the others, and so is one updated
    /// to a version that does not fit, until it is fixed; the controller reports either.
    pub fn with_well_formed<R>(&self, f: impl FnOnce(&[&MeteringCollector]) -> R) -> R {
        let state = self.store.state();
        let fitting: Vec<&MeteringCollector> = state
            .iter()
            .filter_map(|collector| collector.0.as_ref().ok())
            .collect();
        f(&fitting)
    }
}

/// The children's caches, by kind: their metadata, without managed fields.
#[derive(Clone)]
pub struct ChildStores {
    pub stateful_sets: Store<Child<StatefulSet>>,
    pub config_maps: Store<Child<ConfigMap>>,
    pub services: Store<Child<Service>>,
    pub pod_disruption_budgets: Store<Child<PodDisruptionBudget>>,
    pub daemon_sets: Store<Child<DaemonSet>>,
}

/// Starts nothing by itself: returns the [`Triggers`], the children's stores, and the future that runs every watch
/// until `shutdown` resolves, to be spawned when the process starts.
pub fn watch<S: Future<Output = ()> + Send + 'static>(
    client: &Client,
    metrics: &Metrics,
    shutdown: S,
) -> (
    Triggers,
    ChildStores,
    impl Future<Output = ()> + Send + 'static + use<S>,
) {
    let open = Arc::new(AtomicBool::new(false));
    let config = watcher::Config::default().any_semantic();
    let children = config.clone().labels(MANAGED_BY_SELECTOR);

    let (collectors, writer) = reflector::store();
    let collectors_changed = Arc::new(Notify::new());
    let (collector_feed, collector_changes) = Feed::new(&open, Wake::OnApply);
    let collectors_watch = keep(
        "MeteringCollector",
        watcher::watcher(Api::<Collector>::all(client.clone()), config),
        writer,
        collector_feed,
        metrics.cached("MeteringCollector"),
        Some(collectors_changed.clone()),
    );
    let (stateful_sets_store, stateful_sets, stateful_sets_watch) =
        child::<StatefulSet>(client, &children, &open, metrics);
    let (config_maps_store, config_maps, config_maps_watch) =
        child::<ConfigMap>(client, &children, &open, metrics);
    let (services_store, services, services_watch) =
        child::<Service>(client, &children, &open, metrics);
    let (pod_disruption_budgets_store, pod_disruption_budgets, pod_disruption_budgets_watch) =
        child::<PodDisruptionBudget>(client, &children, &open, metrics);
    let (daemon_sets_store, daemon_sets, daemon_sets_watch) =
        child::<DaemonSet>(client, &children, &open, metrics);
    let (_, jobs, jobs_watch) = child::<Job>(client, &children, &open, metrics);

    let watches = async move {
        tokio::join!(
            collectors_watch,
            stateful_sets_watch,
            config_maps_watch,
            services_watch,
            pod_disruption_budgets_watch,
            daemon_sets_watch,
            jobs_watch,
        );
    };
    let run = async move {
        tokio::select! {
            () = watches => {}
            () = shutdown => {}
        }
    };
    let triggers = Triggers {
        collectors,
        collectors_changed,
        open,
        collector_changes,
        stateful_sets,
        config_maps,
        services,
        pod_disruption_budgets,
        daemon_sets,
        jobs,
    };
    let stores = ChildStores {
        stateful_sets: stateful_sets_store,
        config_maps: config_maps_store,
        services: services_store,
        pod_disruption_budgets: pod_disruption_budgets_store,
        daemon_sets: daemon_sets_store,
    };
    (triggers, stores, run)
}

/// The watch of one kind of child: label-selected, metadata only, without the managed fields nobody reads here.
fn child<K>(
    client: &Client,
    config: &watcher::Config,
    open: &Arc<AtomicBool>,
    metrics: &Metrics,
) -> (
    Store<Child<K>>,
    Changes<Child<K>>,
    impl Future<Output = ()> + Send + 'static + use<K>,
)
where
    K: Resource<DynamicType = ()>
        + k8s_openapi::Resource
        + Clone
        + DeserializeOwned
        + Debug
        + Send
        + Sync
        + 'static,
{
    let kind = <K as k8s_openapi::Resource>::KIND;
    let (store, writer) = reflector::store::<Child<K>>();
    // A deleted child wakes its owner too, which puts it back.
    let (feed, changes) = Feed::new(open, Wake::OnApplyAndDelete);
    // An Api of PartialObjectMeta asks the API server for metadata only.
    let stream =
        watcher::watcher(Api::<Child<K>>::all(client.clone()), config.clone()).modify(|child| {
            child.managed_fields_mut().clear();
        });
    let watch = keep(kind, stream, writer, feed, metrics.cached(kind), None);
    (store, changes, watch)
}

/// Which changes wake the controller.
#[derive(Clone, Copy)]
enum Wake {
    OnApply,
    OnApplyAndDelete,
}

/// Where one watch sends the changes, once the controller has opened the triggers.
struct Feed<K> {
    open: Arc<AtomicBool>,
    wake: Wake,
    changes: async_channel::Sender<Arc<K>>,
}

impl<K> Feed<K> {
    fn new(open: &Arc<AtomicBool>, wake: Wake) -> (Self, Changes<K>) {
        let (changes, receiver) = async_channel::bounded(PENDING_CHANGES);
        let feed = Feed {
            open: open.clone(),
            wake,
            changes,
        };
        (feed, receiver)
    }
}

/// Keeps one store current with its watch, retrying a failed watch with kube-runtime's default backoff (as client-go
/// does), publishes the store's size, signals `changed` (if any) whatever the triggers, and passes changes on once
/// the triggers are open.
async fn keep<K>(
    kind: &'static str,
    stream: impl futures::Stream<Item = watcher::Result<Event<K>>> + Send,
    writer: reflector::store::Writer<K>,
    feed: Feed<K>,
    size: Gauge,
    changed: Option<Arc<Notify>>,
) where
    K: Resource + Clone + Send + Sync + 'static,
    K::DynamicType: Eq + Hash + Clone + Default,
{
    let reader = writer.as_reader();
    let stream = stream.default_backoff().reflect(writer);
    futures::pin_mut!(stream);
    while let Some(event) = stream.next().await {
        let event = match event {
            Ok(event) => event,
            Err(error) => {
                tracing::warn!(kind, %error, "watch failed; retrying with backoff");
                continue;
            }
        };
        size.set(i64::try_from(reader.len()).unwrap_or(i64::MAX));
        if let Some(changed) = &changed {
            changed.notify_one();
        }
        if !feed.open.load(Ordering::Acquire) {
            continue;
        }
        let changed = match (event, feed.wake) {
            (Event::Apply(object) | Event::InitApply(object), _)
            | (Event::Delete(object), Wake::OnApplyAndDelete) => object,
            _ => continue,
        };
        // The receiver is gone when the controller stopped, which only happens on shutdown.
        let _ = feed.changes.send(Arc::new(changed)).await;
    }
}
