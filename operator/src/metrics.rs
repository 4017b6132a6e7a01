//! Prometheus metrics of the reconciler and of leader election, served on `/metrics`.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// The label of a failed reconcile: which kind of error it was.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub error: &'static str,
}

/// What became of a drained buffer claim: `deleted` (empty) or `kept` (undelivered events remain).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DrainLabels {
    pub result: &'static str,
}

/// The kind of object a watch cache holds.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

/// The reconciler's counters, histogram and gauge.
#[derive(Debug)]
pub struct Metrics {
    pub reconciliations: Counter,
    pub failures: Family<ErrorLabels, Counter>,
    pub duration: Histogram,
    /// MeteringCollectors the last reconciles saw, valid or not.
    pub collectors: Gauge,
    /// Of those, the ones whose `Ready` condition is not `True`.
    pub collectors_not_ready: Gauge,
    /// 1 while this process holds the leader-election lease (and so runs the reconciler), else 0.
    pub leader: Gauge,
    /// Events the drain Jobs delivered from the buffers of removed replicas.
    pub drained_events: Counter,
    /// Buffer claims of removed replicas whose drain finished, by what became of the claim.
    pub drained_claims: Family<DrainLabels, Counter>,
    /// Objects in this replica's watch caches, by kind; followers keep them too.
    pub cached_objects: Family<KindLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            reconciliations: Counter::default(),
            failures: Family::default(),
            duration: Histogram::new(exponential_buckets(0.005, 2.0, 12)),
            collectors: Gauge::default(),
            collectors_not_ready: Gauge::default(),
            leader: Gauge::default(),
            drained_events: Counter::default(),
            drained_claims: Family::default(),
            cached_objects: Family::default(),
        }
    }
}

impl Metrics {
    /// Registers every metric under the `tally_operator_` prefix.
    pub fn register(&self, registry: &mut Registry) {
        for error in Self::FAILURE_KINDS {
            let _ = self.failures.get_or_create(&ErrorLabels { error });
        }
        for result in ["deleted", "kept"] {
            let _ = self.drained_claims.get_or_create(&DrainLabels { result });
        }
        let registry = registry.sub_registry_with_prefix("tally_operator");
        registry.register(
            "reconciliations",
            "Reconciles of MeteringCollectors",
            self.reconciliations.clone(),
        );
        registry.register(
            "reconcile_failures",
            "Reconciles that failed, by kind of error",
            self.failures.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Duration of one reconcile",
            self.duration.clone(),
        );
        registry.register(
            "collectors",
            "MeteringCollectors managed by this operator",
            self.collectors.clone(),
        );
        registry.register(
            "collectors_not_ready",
            "MeteringCollectors whose Ready condition is not True (missing, False or Unknown)",
            self.collectors_not_ready.clone(),
        );
        registry.register(
            "leader",
            "1 while this process holds the leader-election lease and runs the reconciler, else 0",
            self.leader.clone(),
        );
        registry.register(
            "drained_events",
            "Events the drain Jobs delivered from the buffers of removed collector replicas",
            self.drained_events.clone(),
        );
        registry.register(
            "drained_claims",
            "Buffer claims of removed replicas whose drain finished: deleted when empty, kept when undelivered events remain",
            self.drained_claims.clone(),
        );
        registry.register(
            "cached_objects",
            "Objects in this replica's watch caches, by kind: MeteringCollectors, and the children labelled app.kubernetes.io/managed-by=tally-operator; followers keep them warm so a new leader reconciles at once",
            self.cached_objects.clone(),
        );
    }

    /// The gauge of the watch cache of `kind` (it shares its value with the one registered).
    pub fn cached(&self, kind: &'static str) -> Gauge {
        self.cached_objects
            .get_or_create(&KindLabels { kind })
            .clone()
    }

    /// Every `error` label [`Metrics::failed`] is called with, so each series exists (at 0) before the first failure
    /// and alerts and dashboards see a rate of zero rather than nothing.
    pub const FAILURE_KINDS: [&'static str; 5] =
        ["apply", "status", "storage", "drain", "malformed"];

    pub fn observe(&self, took: Duration) {
        self.reconciliations.inc();
        self.duration.observe(took.as_secs_f64());
    }

    /// A drain finished: `events` delivered, the claim `deleted` or `kept`.
    pub fn drained(&self, events: u64, result: &'static str) {
        self.drained_events.inc_by(events);
        self.drained_claims
            .get_or_create(&DrainLabels { result })
            .inc();
    }

    pub fn failed(&self, error: &'static str) {
        self.failures.get_or_create(&ErrorLabels { error }).inc();
    }
}
