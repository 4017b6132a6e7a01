//! Buffer size changes against the real control plane: the real StatefulSet controller creates the claims, the real
//! PersistentVolume binder binds them to volumes the test creates, and the API server (with its
//! PersistentVolumeClaimResize admission plugin) decides whether a claim may grow. A larger `spec.storage.size`
//! grows the claims of a class with `allowVolumeExpansion: true` while the StatefulSet keeps its immutable claim
//! template; a class without it, and a collector re-created smaller than its retained claims, are reported on the
//! status and with Warning Events; the CRD refuses a shrink at admission.

mod support;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;
use support::{
    RunningController, assert_invalid, collector, control_plane_with_crd, create, eventually,
    expect_event, persistent_volume,
};
use tally_operator::crd::{MeteringCollector, STORAGE_NO_SHRINK_MESSAGE};

fn fixture(name: &str, replicas: i32, size: &str, class: &str) -> MeteringCollector {
    collector(&format!(
        r#"
apiVersion: metering.tally.dev/v1alpha1
kind: MeteringCollector
metadata:
  name: {name}
spec:
  replicas: {replicas}
  image: registry.invalid/tally-sidecar:1
  storage: {{ size: {size}, storageClassName: {class} }}
"#
    ))
}

async fn storage_class(client: &Client, name: &str, expandable: Option<bool>) {
    let class = StorageClass {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..ObjectMeta::default()
        },
        // Nothing provisions for it: claims bind to the volumes the test creates.
        provisioner: "tally.dev/no-provisioner".into(),
        allow_volume_expansion: expandable,
        volume_binding_mode: Some("Immediate".into()),
        ..StorageClass::default()
    };
    Api::<StorageClass>::all(client.clone())
        .create(&PostParams::default(), &class)
        .await
        .expect("StorageClass created");
}

fn requested(claim: &PersistentVolumeClaim) -> Option<String> {
    tally_operator::storage::requested(claim).map(|q| q.0.clone())
}

/// Waits until the claims exist and are bound, so the API server would accept a resize.
async fn bound_claims(claims: &Api<PersistentVolumeClaim>, names: &[&str]) {
    for name in names {
        eventually(&format!("claim {name} is bound"), || async {
            let claim = claims.get(name).await.ok()?;
            (claim.status?.phase.as_deref() == Some("Bound")).then_some(())
        })
        .await;
    }
}

async fn condition(
    collectors: &Api<MeteringCollector>,
    name: &str,
    type_: &str,
) -> Option<(Condition, Option<i64>)> {
    let collector = collectors.get_status(name).await.ok()?;
    let status = collector.status?;
    let condition = status.conditions.into_iter().find(|c| c.type_ == type_)?;
    // Only a status that describes the current generation counts.
    (status.observed_generation == collector.metadata.generation)
        .then_some((condition, collector.metadata.generation))
}

/// Waits until `name` reports Degraded for `reason`, and asserts that it is True and its message mentions each of
/// `mentions`.
async fn expect_degraded(
    collectors: &Api<MeteringCollector>,
    name: &str,
    reason: &str,
    mentions: &[&str],
) {
    let (degraded, _) = eventually(&format!("{name} reports {reason}"), || async {
        condition(collectors, name, "Degraded")
            .await
            .filter(|(c, _)| c.reason == reason)
    })
    .await;
    assert_eq!(degraded.status, "True");
    for expected in mentions {
        assert!(
            degraded.message.contains(expected),
            "{} should mention {expected}",
            degraded.message
        );
    }
}

fn claim_template_size(stateful_set: &StatefulSet) -> Option<String> {
    let template = stateful_set.spec.volume_claim_templates.as_ref()?.first()?;
    tally_operator::storage::requested(template).map(|q| q.0.clone())
}

#[tokio::test]
async fn a_larger_size_grows_expandable_claims_and_is_reported_where_it_cannot() {
    let (control_plane, client, ns) = control_plane_with_crd("storage").await;
    storage_class(&client, "expandable", Some(true)).await;
    storage_class(&client, "fixed", None).await;
    // 10Gi volumes the binder can give to any claim of their class.
    for name in ["pv-expandable-0", "pv-expandable-1"] {
        persistent_volume(&client, name, Some("expandable")).await;
    }
    persistent_volume(&client, "pv-fixed-0", Some("fixed")).await;

    let collectors = Api::<MeteringCollector>::namespaced(client.clone(), &ns);
    let claims = Api::<PersistentVolumeClaim>::namespaced(client.clone(), &ns);
    let stateful_sets = Api::<StatefulSet>::namespaced(client.clone(), &ns);
    create(&collectors, &fixture("grow", 2, "1Gi", "expandable")).await;
    create(&collectors, &fixture("stuck", 1, "1Gi", "fixed")).await;
    let controller = RunningController::start(&client);

    bound_claims(
        &claims,
        &["buffer-grow-0", "buffer-grow-1", "buffer-stuck-0"],
    )
    .await;
    for name in ["grow", "stuck"] {
        collectors
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({ "spec": { "storage": { "size": "3Gi" } } })),
            )
            .await
            .expect("a larger size is accepted at admission");
    }

    // Expandable: both claims request the new size; the StatefulSet keeps its template and stays applied.
    for name in ["buffer-grow-0", "buffer-grow-1"] {
        eventually(&format!("claim {name} requests 3Gi"), || async {
            let claim = claims.get(name).await.ok()?;
            (requested(&claim).as_deref() == Some("3Gi")).then_some(())
        })
        .await;
    }
    let (degraded, _) = eventually(
        "grow reports Degraded=False for its new generation",
        || async {
            condition(&collectors, "grow", "Degraded")
                .await
                .filter(|(c, _)| c.status == "False")
        },
    )
    .await;
    assert_eq!(degraded.reason, "AsExpected", "{degraded:?}");
    let stateful_set = stateful_sets.get("grow").await.expect("StatefulSet grow");
    assert_eq!(claim_template_size(&stateful_set).as_deref(), Some("1Gi"));
    let expanded = expect_event(&client, &ns, "grow", "Normal", "StorageExpanded").await;
    assert!(
        expanded
            .note
            .as_deref()
            .is_some_and(|n| n.contains("to 3Gi")),
        "{expanded:?}"
    );

    // Not expandable: reported, claim untouched.
    expect_degraded(
        &collectors,
        "stuck",
        "StorageResizeUnsupported",
        &[
            "buffer-stuck-0",
            "fixed",
            "allowVolumeExpansion: true",
            "3Gi",
        ],
    )
    .await;
    let warning = expect_event(&client, &ns, "stuck", "Warning", "StorageResizeUnsupported").await;
    assert!(
        warning
            .note
            .as_deref()
            .is_some_and(|n| n.contains("buffer-stuck-0")),
        "{warning:?}"
    );
    let claim = claims.get("buffer-stuck-0").await.expect("claim");
    assert_eq!(requested(&claim).as_deref(), Some("1Gi"));

    // Admission refuses a shrink with the CRD's message.
    let error = collectors
        .patch(
            "grow",
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "storage": { "size": "2Gi" } } })),
        )
        .await
        .expect_err("a shrink is refused at admission");
    assert_invalid(error, STORAGE_NO_SHRINK_MESSAGE);

    // A collector re-created smaller than its retained claims: the claims keep their size and the status says why.
    collectors
        .delete("grow", &DeleteParams::foreground())
        .await
        .expect("collector deleted");
    eventually("grow and its StatefulSet are gone", || async {
        let gone = collectors.get_opt("grow").await.ok()?.is_none()
            && stateful_sets.get_opt("grow").await.ok()?.is_none();
        gone.then_some(())
    })
    .await;
    create(&collectors, &fixture("grow", 2, "1Gi", "expandable")).await;
    expect_degraded(
        &collectors,
        "grow",
        "StorageShrinkRefused",
        &[
            "buffer-grow-0 requests 3Gi",
            "buffer-grow-1 requests 3Gi",
            "spec.storage.size is 1Gi",
        ],
    )
    .await;
    expect_event(&client, &ns, "grow", "Warning", "StorageShrinkRefused").await;
    for name in ["buffer-grow-0", "buffer-grow-1"] {
        let claim = claims.get(name).await.expect("claim");
        assert_eq!(requested(&claim).as_deref(), Some("3Gi"), "{name}");
    }

    controller.stop().await;
    control_plane.stop();
}
