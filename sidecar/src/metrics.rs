//! Prometheus metrics, all prefixed `tally_`. Nothing is dropped or rejected without a count here.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

/// Why ingest refused events.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum RejectReason {
    invalid,
    unauthorized,
    too_large,
    unsupported_media_type,
    buffer_full,
    stopping,
    storage_error,
    /// The body did not arrive within `ingest.readTimeout`.
    read_timeout,
}

/// Why accepted or buffered events were dropped on purpose.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum DropReason {
    /// `whenFull: dropOldest` made room for newer events.
    buffer_full,
    /// The event's `k8snamespace` is in `excludeNamespaces`.
    excluded_namespace,
}

/// How a delivery attempt failed.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum ErrorKind {
    network,
    timeout,
    retryable_status,
    permanent_status,
}

/// Why the server closed an ingest connection itself.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum CloseReason {
    /// The request headers did not arrive within `ingest.readTimeout`.
    header_timeout,
    /// No request for `ingest.idleTimeout`.
    idle_timeout,
    /// Closed while idle to make room for a new connection at `ingest.maxConnections`.
    evicted,
}

/// Why an entry left the dedup index.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum DedupRemoval {
    /// Older than `dedup.window`.
    expired,
    /// Forgotten early because the index outgrew `dedup.maxBytes`.
    evicted,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DedupRemovalLabels {
    pub reason: DedupRemoval,
}

/// A part of `buffer.maxBytes`.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum BudgetPart {
    events,
    dedup,
    dead_letters,
    overhead,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BudgetLabels {
    pub part: BudgetPart,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CloseLabels {
    pub reason: CloseReason,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectLabels {
    pub reason: RejectReason,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DropLabels {
    pub reason: DropReason,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QuarantineLabels {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutputLabels {
    pub output: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutputErrorLabels {
    pub output: String,
    pub kind: ErrorKind,
}

/// Every metric the sidecar exports.
pub struct Metrics {
    registry: Registry,
    pub events_received: Counter,
    pub events_accepted: Counter,
    pub events_rejected: Family<RejectLabels, Counter>,
    pub events_deduplicated: Counter,
    pub events_dropped: Family<DropLabels, Counter>,
    pub buffer_events: Gauge,
    pub buffer_bytes: Gauge,
    pub buffer_max_bytes: Gauge,
    pub buffer_budget_bytes: Family<BudgetLabels, Gauge>,
    pub buffer_disk_bytes: Gauge,
    pub dedup_bytes: Gauge,
    pub dedup_window_seconds: Gauge<f64, AtomicU64>,
    pub dedup_removed: Family<DedupRemovalLabels, Counter>,
    pub buffer_oldest_age: Gauge<f64, AtomicU64>,
    pub buffer_commits: Counter,
    pub buffer_commit_events: Histogram,
    pub output_events_sent: Family<OutputLabels, Counter>,
    pub output_batches_sent: Family<OutputLabels, Counter>,
    pub output_errors: Family<OutputErrorLabels, Counter>,
    pub output_retries: Family<OutputLabels, Counter>,
    pub output_dead_lettered: Family<OutputLabels, Counter>,
    pub output_fallback_events: Family<OutputLabels, Counter>,
    pub output_batches_in_flight: Family<OutputLabels, Gauge>,
    pub output_send_duration: Family<OutputLabels, Histogram>,
    pub output_lag: Family<OutputLabels, Gauge>,
    pub dead_letter_events: Family<OutputLabels, Gauge>,
    pub dead_letter_expired: Family<OutputLabels, Counter>,
    pub buffer_quarantined: Family<QuarantineLabels, Counter>,
    /// Open connections to the HTTP server.
    pub connections: Gauge,
    /// Connections refused because `ingest.maxConnections` were open and none was idle.
    pub connections_refused: Counter,
    pub connections_closed: Family<CloseLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("tally");
        let m = Metrics {
            registry: Registry::default(),
            events_received: Counter::default(),
            events_accepted: Counter::default(),
            events_rejected: Family::default(),
            events_deduplicated: Counter::default(),
            events_dropped: Family::default(),
            buffer_events: Gauge::default(),
            buffer_bytes: Gauge::default(),
            buffer_max_bytes: Gauge::default(),
            buffer_budget_bytes: Family::default(),
            buffer_disk_bytes: Gauge::default(),
            dedup_bytes: Gauge::default(),
            dedup_window_seconds: Gauge::default(),
            dedup_removed: Family::default(),
            buffer_oldest_age: Gauge::default(),
            buffer_commits: Counter::default(),
            buffer_commit_events: Histogram::new(exponential_buckets(1.0, 4.0, 9)),
            output_events_sent: Family::default(),
            output_batches_sent: Family::default(),
            output_errors: Family::default(),
            output_retries: Family::default(),
            output_dead_lettered: Family::default(),
            output_fallback_events: Family::default(),
            output_batches_in_flight: Family::default(),
            output_send_duration: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.0005, 2.0, 16))
            }),
            output_lag: Family::default(),
            dead_letter_events: Family::default(),
            dead_letter_expired: Family::default(),
            buffer_quarantined: Family::default(),
            connections: Gauge::default(),
            connections_refused: Counter::default(),
            connections_closed: Family::default(),
        };
        registry.register(
            "dead_letter_expired",
            "Dead letters deleted by the store's retention (deadLetter.maxBytes, deadLetter.maxAge), by output",
            m.dead_letter_expired.clone(),
        );
        registry.register(
            "buffer_quarantined",
            "Damaged buffer records moved to the quarantine instead of being forwarded, by reason",
            m.buffer_quarantined.clone(),
        );
        registry.register(
            "events_received",
            "Events received on the ingest API, valid or not",
            m.events_received.clone(),
        );
        registry.register(
            "events_accepted",
            "Events acknowledged with 204 (stored, or duplicates of stored events)",
            m.events_accepted.clone(),
        );
        registry.register(
            "events_rejected",
            "Events refused by ingest, by reason",
            m.events_rejected.clone(),
        );
        registry.register(
            "events_deduplicated",
            "Acknowledged events not stored again because their (source, id) was seen within the dedup window",
            m.events_deduplicated.clone(),
        );
        registry.register(
            "events_dropped",
            "Events dropped on purpose, by reason",
            m.events_dropped.clone(),
        );
        registry.register(
            "buffer_events",
            "Events in the buffer",
            m.buffer_events.clone(),
        );
        registry.register(
            "buffer_bytes",
            "Bytes of events in the buffer (keys and values before compression)",
            m.buffer_bytes.clone(),
        );
        registry.register(
            "buffer_max_bytes",
            "The data directory's size limit (buffer.maxBytes)",
            m.buffer_max_bytes.clone(),
        );
        registry.register(
            "buffer_budget_bytes",
            "The parts of buffer.maxBytes: events, dedup index, dead letters, overhead (WAL, RocksDB files)",
            m.buffer_budget_bytes.clone(),
        );
        registry.register(
            "buffer_disk_bytes",
            "Bytes the data directory occupies on disk (allocated blocks), measured every 250ms",
            m.buffer_disk_bytes.clone(),
        );
        registry.register(
            "dedup_bytes",
            "Bytes of the dedup index's files",
            m.dedup_bytes.clone(),
        );
        registry.register(
            "dedup_window_seconds",
            "How far back the dedup index remembers: dedup.window, or less while the index is at dedup.maxBytes",
            m.dedup_window_seconds.clone(),
        );
        registry.register(
            "dedup_entries_removed",
            "Entries removed from the dedup index: expired (older than the window) or evicted (the index was at dedup.maxBytes)",
            m.dedup_removed.clone(),
        );
        registry.register(
            "buffer_oldest_event_age_seconds",
            "Age of the oldest buffered event",
            m.buffer_oldest_age.clone(),
        );
        registry.register(
            "buffer_commits",
            "Group commits (write batches) to the buffer",
            m.buffer_commits.clone(),
        );
        registry.register(
            "buffer_commit_events",
            "Events stored per group commit",
            m.buffer_commit_events.clone(),
        );
        registry.register(
            "output_events_sent",
            "Events delivered to an output (2xx)",
            m.output_events_sent.clone(),
        );
        registry.register(
            "output_batches_sent",
            "Batches delivered to an output (2xx)",
            m.output_batches_sent.clone(),
        );
        registry.register(
            "output_errors",
            "Failed delivery attempts, by kind",
            m.output_errors.clone(),
        );
        registry.register(
            "output_retries",
            "Delivery attempts that were retries",
            m.output_retries.clone(),
        );
        registry.register(
            "output_dead_lettered_events",
            "Events moved to an output's dead-letter store",
            m.output_dead_lettered.clone(),
        );
        registry.register(
            "output_fallback_events",
            "Events this output could not take that a later output delivered (fallback pattern)",
            m.output_fallback_events.clone(),
        );
        registry.register(
            "output_batches_in_flight",
            "Batches sent to this output and not yet answered for good, retries included (at most maxInFlight)",
            m.output_batches_in_flight.clone(),
        );
        registry.register(
            "output_send_duration_seconds",
            "Duration of one delivery attempt",
            m.output_send_duration.clone(),
        );
        registry.register(
            "output_lag_events",
            "Buffered events an output does not have yet",
            m.output_lag.clone(),
        );
        registry.register(
            "dead_letter_events",
            "Events in an output's dead-letter store",
            m.dead_letter_events.clone(),
        );
        registry.register(
            "ingest_connections",
            "Open connections to the HTTP server",
            m.connections.clone(),
        );
        registry.register(
            "ingest_connections_refused",
            "Connections refused (503) because ingest.maxConnections were open, none of them idle",
            m.connections_refused.clone(),
        );
        registry.register(
            "ingest_connections_closed",
            "Connections the server closed itself, by reason",
            m.connections_closed.clone(),
        );
        for reason in [
            CloseReason::header_timeout,
            CloseReason::idle_timeout,
            CloseReason::evicted,
        ] {
            let _ = m.connections_closed.get_or_create(&CloseLabels { reason });
        }
        for reason in [
            RejectReason::invalid,
            RejectReason::unauthorized,
            RejectReason::too_large,
            RejectReason::unsupported_media_type,
            RejectReason::buffer_full,
            RejectReason::stopping,
            RejectReason::storage_error,
            RejectReason::read_timeout,
        ] {
            let _ = m.events_rejected.get_or_create(&RejectLabels { reason });
        }
        for reason in [DropReason::buffer_full, DropReason::excluded_namespace] {
            let _ = m.events_dropped.get_or_create(&DropLabels { reason });
        }
        for reason in ["bad_header", "bad_checksum", "bad_key"] {
            let _ = m.buffer_quarantined.get_or_create(&QuarantineLabels {
                reason: reason.to_string(),
            });
        }
        Metrics { registry, ..m }
    }

    /// Creates every series of an output at zero, so dashboards and alerts see it from start-up.
    pub fn register_output(&self, name: &str) {
        let labels = self.output(name);
        let _ = self.output_events_sent.get_or_create(&labels);
        let _ = self.output_batches_sent.get_or_create(&labels);
        let _ = self.output_retries.get_or_create(&labels);
        let _ = self.output_dead_lettered.get_or_create(&labels);
        let _ = self.output_fallback_events.get_or_create(&labels);
        let _ = self.output_batches_in_flight.get_or_create(&labels);
        let _ = self.output_send_duration.get_or_create(&labels);
        let _ = self.output_lag.get_or_create(&labels);
        let _ = self.dead_letter_events.get_or_create(&labels);
        let _ = self.dead_letter_expired.get_or_create(&labels);
        for kind in [
            ErrorKind::network,
            ErrorKind::timeout,
            ErrorKind::retryable_status,
            ErrorKind::permanent_status,
        ] {
            let _ = self.output_errors.get_or_create(&OutputErrorLabels {
                output: name.to_string(),
                kind,
            });
        }
    }

    pub fn reject(&self, reason: RejectReason, events: u64) {
        self.events_rejected
            .get_or_create(&RejectLabels { reason })
            .inc_by(events);
    }

    /// Counts a connection the server closed itself.
    pub fn close_connection(&self, reason: CloseReason) {
        self.connections_closed
            .get_or_create(&CloseLabels { reason })
            .inc();
    }

    pub fn drop_events(&self, reason: DropReason, events: u64) {
        self.events_dropped
            .get_or_create(&DropLabels { reason })
            .inc_by(events);
    }

    /// Counts a damaged record set aside.
    pub fn quarantine(&self, reason: &str) {
        self.buffer_quarantined
            .get_or_create(&QuarantineLabels {
                reason: reason.to_string(),
            })
            .inc();
    }

    pub fn removal(&self, reason: DedupRemoval) -> DedupRemovalLabels {
        DedupRemovalLabels { reason }
    }

    /// Publishes the parts of `buffer.maxBytes`.
    pub fn set_budget(&self, parts: [(BudgetPart, u64); 4]) {
        for (part, bytes) in parts {
            self.buffer_budget_bytes
                .get_or_create(&BudgetLabels { part })
                .set(bytes as i64);
        }
    }

    pub fn output(&self, name: &str) -> OutputLabels {
        OutputLabels {
            output: name.to_string(),
        }
    }

    pub fn output_error(&self, name: &str, kind: ErrorKind) {
        self.output_errors
            .get_or_create(&OutputErrorLabels {
                output: name.to_string(),
                kind,
            })
            .inc();
    }

    /// The registry in the OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        out
    }
}
