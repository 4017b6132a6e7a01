//! Buffer volume size changes.
//!
//! A StatefulSet's `volumeClaimTemplates` are immutable, so a new `spec.storage.size` cannot go through the
//! template: the operator keeps applying the template the StatefulSet was created with ([`keep_claim_templates`])
//! and grows the existing claims `buffer-<name>-<ordinal>` instead, when their StorageClass allows volume
//! expansion. What it cannot do (shrink a volume, grow one whose class does not allow it) is reported on the
//! collector's status by the caller; [`plan`] decides, purely, from the claims and classes it is given.

use std::cmp::Ordering;
use std::fmt;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::ResourceExt;

use crate::build::BUFFER_VOLUME;
use crate::crd::MeteringCollector;

/// The annotation that marks the cluster's default StorageClass.
pub const DEFAULT_CLASS_ANNOTATION: &str = "storageclass.kubernetes.io/is-default-class";

/// Makes the desired StatefulSet keep the `volumeClaimTemplates` of the one in the cluster, which the API server
/// would refuse to change. Without an existing StatefulSet (or template) the desired one is left as built.
pub fn keep_claim_templates(desired: &mut StatefulSet, existing: Option<&StatefulSet>) {
    let Some(templates) = existing.and_then(|e| e.spec.volume_claim_templates.clone()) else {
        return;
    };
    let templates = templates
        .into_iter()
        .map(|mut claim| {
            // Status is not part of the template's content, and an apply should not claim it.
            claim.status = None;
            claim
        })
        .collect();
    desired.spec.volume_claim_templates = Some(templates);
}

/// Whether `claim` is one of the collector's buffer claims, `buffer-<name>-<ordinal>`.
pub fn is_buffer_claim(collector: &MeteringCollector, claim: &str) -> bool {
    claim_ordinal(collector, claim).is_some()
}

/// The ordinal of a buffer claim of this collector (`buffer-<name>-<ordinal>`), `None` for any other claim.
pub fn claim_ordinal(collector: &MeteringCollector, claim: &str) -> Option<i32> {
    claim
        .strip_prefix(&format!("{BUFFER_VOLUME}-{}-", collector.name_any()))
        .filter(|ordinal| !ordinal.is_empty() && ordinal.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|ordinal| ordinal.parse().ok())
}

/// A quantity in thousandths of its unit (bytes for storage), exact for every size a volume can have; `None` for
/// what is not a non-negative Kubernetes quantity.
///
/// Not `kube_quantity` (k8s-openapi's `Quantity` is only the string): it computes in `f64`, its integer conversion
/// truncates `1.5Gi` to `1Gi`, its multiplication can wrap, and it cannot read `1E` or `1Ei`. Claim sizes decide
/// whether a volume is expanded or a shrink refused, so they are compared exactly here.
pub fn quantity_millis(quantity: &Quantity) -> Option<u128> {
    let text = quantity.0.trim();
    let text = text.strip_prefix('+').unwrap_or(text);
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && fraction.is_empty() {
        return None;
    }
    let digits: u128 = format!("{whole}{fraction}").parse().ok()?;
    // value = digits / 10^fraction_len * multiplier / divisor, times 1000 for thousandths.
    let (multiplier, divisor): (u128, u128) = match suffix {
        "" => (1, 1),
        "m" => (1, 1000),
        "k" => (1000, 1),
        "M" => (1000u128.pow(2), 1),
        "G" => (1000u128.pow(3), 1),
        "T" => (1000u128.pow(4), 1),
        "P" => (1000u128.pow(5), 1),
        "E" => (1000u128.pow(6), 1),
        "Ki" => (1 << 10, 1),
        "Mi" => (1 << 20, 1),
        "Gi" => (1 << 30, 1),
        "Ti" => (1 << 40, 1),
        "Pi" => (1 << 50, 1),
        "Ei" => (1 << 60, 1),
        exponent => {
            let power: u32 = exponent
                .strip_prefix(['e', 'E'])?
                .strip_prefix('+')
                .unwrap_or_else(|| exponent.get(1..).unwrap_or_default())
                .parse()
                .ok()?;
            (10u128.checked_pow(power)?, 1)
        }
    };
    let scale = 10u128.checked_pow(u32::try_from(fraction.len()).ok()?)?;
    let numerator = digits.checked_mul(multiplier)?.checked_mul(1000)?;
    let denominator = scale.checked_mul(divisor)?;
    // Round up, as Kubernetes does for fractions of the smallest unit.
    Some(numerator.div_ceil(denominator))
}

/// Compares two quantities; `None` when either is not a quantity.
pub fn compare(a: &Quantity, b: &Quantity) -> Option<Ordering> {
    Some(quantity_millis(a)?.cmp(&quantity_millis(b)?))
}

/// What to do with one buffer claim.
#[derive(Clone, Debug, PartialEq)]
pub enum ClaimAction {
    /// It already requests the desired size.
    UpToDate,
    /// Patch its `spec.resources.requests.storage` to the desired size.
    Expand { claim: String, from: Quantity },
    /// It is not bound to a volume yet; the API server only resizes bound claims. Looked at again later.
    WaitForBinding { claim: String },
    /// It requests more than desired; volumes cannot shrink.
    RefuseShrink { claim: String, current: Quantity },
    /// It must grow but its StorageClass does not allow it.
    Unsupported {
        claim: String,
        current: Quantity,
        reason: Unexpandable,
    },
}

/// Why a claim cannot grow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Unexpandable {
    /// It names no StorageClass and the cluster has no default one.
    NoClass,
    /// It names a StorageClass that does not exist.
    MissingClass(String),
    /// Its StorageClass does not set `allowVolumeExpansion: true`.
    ClassForbids(String),
}

impl fmt::Display for Unexpandable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unexpandable::NoClass => write!(
                f,
                "it has no StorageClass and the cluster has no default class"
            ),
            Unexpandable::MissingClass(class) => {
                write!(f, "its StorageClass {class} does not exist")
            }
            Unexpandable::ClassForbids(class) => {
                write!(
                    f,
                    "its StorageClass {class} does not set allowVolumeExpansion: true"
                )
            }
        }
    }
}

/// The requested storage of a claim, if it has one.
pub fn requested(claim: &PersistentVolumeClaim) -> Option<&Quantity> {
    claim
        .spec
        .as_ref()?
        .resources
        .as_ref()?
        .requests
        .as_ref()?
        .get("storage")
}

/// The StorageClass a claim uses: its own, else the cluster's default (what the DefaultStorageClass admission
/// plugin would have set).
fn class_of<'a>(claim: &'a PersistentVolumeClaim, classes: &'a [StorageClass]) -> Option<&'a str> {
    let named = claim
        .spec
        .as_ref()
        .and_then(|s| s.storage_class_name.as_deref())
        .filter(|name| !name.is_empty());
    named.or_else(|| {
        classes
            .iter()
            .find(|c| {
                c.annotations()
                    .get(DEFAULT_CLASS_ANNOTATION)
                    .is_some_and(|v| v == "true")
            })
            .map(|c| c.metadata.name.as_deref().unwrap_or_default())
    })
}

/// Decides what to do with each claim so that it requests `desired`.
pub fn plan(
    desired: &Quantity,
    claims: &[PersistentVolumeClaim],
    classes: &[StorageClass],
) -> Vec<ClaimAction> {
    claims
        .iter()
        .map(|claim| {
            let name = claim.name_any();
            let Some(current) = requested(claim) else {
                return ClaimAction::UpToDate;
            };
            match compare(desired, current) {
                None | Some(Ordering::Equal) => ClaimAction::UpToDate,
                Some(Ordering::Less) => ClaimAction::RefuseShrink {
                    claim: name,
                    current: current.clone(),
                },
                Some(Ordering::Greater) => {
                    let unsupported = |reason| ClaimAction::Unsupported {
                        claim: name.clone(),
                        current: current.clone(),
                        reason,
                    };
                    let Some(class) = class_of(claim, classes) else {
                        return unsupported(Unexpandable::NoClass);
                    };
                    let Some(storage_class) = classes
                        .iter()
                        .find(|c| c.metadata.name.as_deref() == Some(class))
                    else {
                        return unsupported(Unexpandable::MissingClass(class.to_string()));
                    };
                    if storage_class.allow_volume_expansion != Some(true) {
                        return unsupported(Unexpandable::ClassForbids(class.to_string()));
                    }
                    let bound =
                        claim.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound");
                    if bound {
                        ClaimAction::Expand {
                            claim: name,
                            from: current.clone(),
                        }
                    } else {
                        ClaimAction::WaitForBinding { claim: name }
                    }
                }
            }
        })
        .collect()
}

/// A size change the operator cannot carry out, reported on the status until the spec or the cluster changes.
#[derive(Clone, Debug, PartialEq)]
pub enum StorageProblem {
    /// `spec.storage.size` is smaller than what the claims request.
    ShrinkRefused {
        desired: Quantity,
        claims: Vec<(String, Quantity)>,
    },
    /// The claims must grow but their StorageClass does not allow it.
    ResizeUnsupported {
        desired: Quantity,
        claims: Vec<(String, Quantity, Unexpandable)>,
    },
}

impl StorageProblem {
    /// The reason of the Degraded condition.
    pub fn reason(&self) -> &'static str {
        match self {
            StorageProblem::ShrinkRefused { .. } => "StorageShrinkRefused",
            StorageProblem::ResizeUnsupported { .. } => "StorageResizeUnsupported",
        }
    }

    /// What is wrong and what to do, for the Degraded condition.
    pub fn message(&self) -> String {
        match self {
            StorageProblem::ShrinkRefused { desired, claims } => {
                let list = claims
                    .iter()
                    .map(|(claim, current)| format!("{claim} requests {}", current.0))
                    .collect::<Vec<_>>()
                    .join(", ");
                format!(
                    "spec.storage.size is {} but {list}; a volume cannot shrink, so the claims keep their size. \
                     Set spec.storage.size to at least the claims' size, or delete the claims to start with \
                     empty buffers (events not yet delivered are lost)",
                    desired.0
                )
            }
            StorageProblem::ResizeUnsupported { desired, claims } => {
                let list = claims
                    .iter()
                    .map(|(claim, current, why)| format!("{claim} ({}): {why}", current.0))
                    .collect::<Vec<_>>()
                    .join("; ");
                format!(
                    "spec.storage.size is {} but the buffer claims cannot grow: {list}. Set allowVolumeExpansion: \
                     true on the StorageClass if its provisioner supports expansion, or set spec.storage.size back \
                     to the claims' size",
                    desired.0
                )
            }
        }
    }
}

/// Collects the claims a plan cannot carry out into one problem (shrinks first: they need the user's decision).
pub fn problem(desired: &Quantity, actions: &[ClaimAction]) -> Option<StorageProblem> {
    let shrinks: Vec<(String, Quantity)> = actions
        .iter()
        .filter_map(|a| match a {
            ClaimAction::RefuseShrink { claim, current } => Some((claim.clone(), current.clone())),
            _ => None,
        })
        .collect();
    if !shrinks.is_empty() {
        return Some(StorageProblem::ShrinkRefused {
            desired: desired.clone(),
            claims: shrinks,
        });
    }
    let unsupported: Vec<(String, Quantity, Unexpandable)> = actions
        .iter()
        .filter_map(|a| match a {
            ClaimAction::Unsupported {
                claim,
                current,
                reason,
            } => Some((claim.clone(), current.clone(), reason.clone())),
            _ => None,
        })
        .collect();
    (!unsupported.is_empty()).then(|| StorageProblem::ResizeUnsupported {
        desired: desired.clone(),
        claims: unsupported,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(s: &str) -> Quantity {
        Quantity(s.to_string())
    }

    fn claim(name: &str, size: &str, class: Option<&str>, phase: &str) -> PersistentVolumeClaim {
        serde_json::from_value(serde_json::json!({
            "metadata": { "name": name },
            "spec": {
                "storageClassName": class,
                "resources": { "requests": { "storage": size } },
            },
            "status": { "phase": phase },
        }))
        .expect("claim")
    }

    fn class(name: &str, expandable: Option<bool>, default: bool) -> StorageClass {
        serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": name,
                "annotations": { DEFAULT_CLASS_ANNOTATION: if default { "true" } else { "false" } },
            },
            "provisioner": "example.com/csi",
            "allowVolumeExpansion": expandable,
        }))
        .expect("class")
    }

    #[test]
    fn plan_grows_only_bound_claims_of_expandable_classes_and_never_shrinks() {
        let classes = [
            class("fast", Some(true), false),
            class("slow", Some(false), false),
            class("standard", Some(true), true),
        ];
        let claims = [
            claim("buffer-m-0", "1Gi", Some("fast"), "Bound"),
            claim("buffer-m-1", "1Gi", Some("fast"), "Pending"),
            claim("buffer-m-2", "1Gi", Some("slow"), "Bound"),
            claim("buffer-m-3", "1Gi", Some("gone"), "Bound"),
            claim("buffer-m-4", "1Gi", None, "Bound"),
            claim("buffer-m-5", "2Gi", Some("fast"), "Bound"),
            claim("buffer-m-6", "4Gi", Some("fast"), "Bound"),
        ];
        let actions = plan(&q("2Gi"), &claims, &classes);
        assert_eq!(
            actions,
            [
                ClaimAction::Expand {
                    claim: "buffer-m-0".into(),
                    from: q("1Gi")
                },
                ClaimAction::WaitForBinding {
                    claim: "buffer-m-1".into()
                },
                ClaimAction::Unsupported {
                    claim: "buffer-m-2".into(),
                    current: q("1Gi"),
                    reason: Unexpandable::ClassForbids("slow".into()),
                },
                ClaimAction::Unsupported {
                    claim: "buffer-m-3".into(),
                    current: q("1Gi"),
                    reason: Unexpandable::MissingClass("gone".into()),
                },
                // No class of its own: the default class decides.
                ClaimAction::Expand {
                    claim: "buffer-m-4".into(),
                    from: q("1Gi")
                },
                ClaimAction::UpToDate,
                ClaimAction::RefuseShrink {
                    claim: "buffer-m-6".into(),
                    current: q("4Gi")
                },
            ]
        );
        // A shrink needs the user's decision first, so it is the problem reported.
        let problem = problem(&q("2Gi"), &actions).expect("a problem");
        assert_eq!(problem.reason(), "StorageShrinkRefused");
        assert!(
            problem.message().contains("buffer-m-6 requests 4Gi"),
            "{}",
            problem.message()
        );

        let without_default = [class("fast", Some(true), false)];
        assert_eq!(
            plan(
                &q("2Gi"),
                &[claim("buffer-m-0", "1Gi", None, "Bound")],
                &without_default
            ),
            [ClaimAction::Unsupported {
                claim: "buffer-m-0".into(),
                current: q("1Gi"),
                reason: Unexpandable::NoClass,
            }]
        );
    }

    #[test]
    fn buffer_claims_are_recognised_by_name() {
        let collector: MeteringCollector = serde_json::from_value(serde_json::json!({
            "apiVersion": "metering.tally.dev/v1alpha1",
            "kind": "MeteringCollector",
            "metadata": { "name": "meter" },
            "spec": {},
        }))
        .expect("collector");
        assert!(is_buffer_claim(&collector, "buffer-meter-0"));
        assert!(is_buffer_claim(&collector, "buffer-meter-12"));
        assert!(!is_buffer_claim(&collector, "buffer-meter-"));
        assert!(!is_buffer_claim(&collector, "buffer-meter-x-0"));
        assert!(!is_buffer_claim(&collector, "buffer-metering-0"));
    }

    #[test]
    fn quantities_compare_across_suffixes() {
        assert_eq!(quantity_millis(&q("1Gi")), Some(1_073_741_824_000));
        assert_eq!(
            quantity_millis(&q("1073741824")),
            quantity_millis(&q("1Gi"))
        );
        assert_eq!(quantity_millis(&q("1.5Gi")), Some(1_610_612_736_000));
        assert_eq!(quantity_millis(&q("2G")), Some(2_000_000_000_000));
        assert_eq!(quantity_millis(&q("1e3")), Some(1_000_000));
        assert_eq!(quantity_millis(&q("500m")), Some(500));
        assert_eq!(compare(&q("2Gi"), &q("2048Mi")), Some(Ordering::Equal));
        assert_eq!(compare(&q("1Gi"), &q("1G")), Some(Ordering::Greater));
        assert_eq!(quantity_millis(&q("lots")), None);
        assert_eq!(quantity_millis(&q("-1Gi")), None);
        assert_eq!(quantity_millis(&q("")), None);
    }
}
