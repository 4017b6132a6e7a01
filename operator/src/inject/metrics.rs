//! Metrics of the admission webhook, registered next to the reconciler's in the operator's registry.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Labels of one admission: `result` is `injected`, `skipped` or `error`; `reason` says why.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AdmissionLabels {
    pub result: &'static str,
    pub reason: &'static str,
}

/// The webhook's counters and gauges.
#[derive(Debug, Default)]
pub struct WebhookMetrics {
    /// Pod admissions answered, by result and reason.
    pub admissions: Family<AdmissionLabels, Counter>,
    /// When the serving certificate this process serves expires (Unix seconds).
    pub certificate_expiry: Gauge,
}

impl WebhookMetrics {
    /// Registers every metric under the `tally_operator_` prefix.
    pub fn register(&self, registry: &mut Registry) {
        let registry = registry.sub_registry_with_prefix("tally_operator");
        registry.register(
            "admissions",
            "Pod admissions answered by the sidecar-injection webhook, by result and reason",
            self.admissions.clone(),
        );
        registry.register(
            "webhook_certificate_expiry_timestamp_seconds",
            "When the webhook's serving certificate expires, in Unix seconds",
            self.certificate_expiry.clone(),
        );
    }

    /// Counts one admission.
    pub fn admitted(&self, result: &'static str, reason: &'static str) {
        self.admissions
            .get_or_create(&AdmissionLabels { result, reason })
            .inc();
    }
}
