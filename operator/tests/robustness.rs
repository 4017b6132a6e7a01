//! The controller against a real control plane when things are not tidy: a stored MeteringCollector that does not
//! fit the Rust type (written under an earlier, permissive CRD) is reported and does not stop a valid collector next
//! to it from being reconciled; notable transitions publish events.k8s.io/v1 Events regarding the collector; and the
//! operator's own status writes do not make it reconcile in a loop.

mod support;

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::StatefulSet;
use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::json;
use support::{
    RunningController, collector, control_plane_with_crd, create, eventually, expect_event,
    store_malformed,
};
use tally_e2e::ControlPlane;
use tally_operator::crd::MeteringCollector;
use tally_operator::metrics::ErrorLabels;
use tally_operator::reconcile::MALFORMED_REASON;

const GOOD: &str = r#"
apiVersion: metering.tally.dev/v1alpha1
kind: MeteringCollector
metadata:
  name: good
spec:
  replicas: 1
  image: registry.invalid/tally-sidecar:1
"#;

#[tokio::test]
async fn a_malformed_collector_is_reported_and_does_not_stop_the_others() {
    let control_plane = ControlPlane::start().await.expect("control plane starts");
    let client = control_plane.client();

    let ns = control_plane
        .new_namespace("robust")
        .await
        .expect("namespace");
    let raw = store_malformed(
        &client,
        &ns,
        &[
            // A number that is a string: even its status cannot be written any more (the replicas CEL rule fails
            // on it).
            ("bad", json!({ "replicas": "three" })),
            // A Service type the Rust type does not know: the API server still accepts a status for it.
            ("bad-service", json!({ "service": { "type": "Headless" } })),
        ],
    )
    .await;
    let collectors = Api::<MeteringCollector>::namespaced(client.clone(), &ns);
    create(&collectors, &collector(GOOD)).await;

    let controller = RunningController::start(&client);

    // The valid collector is reconciled: its StatefulSet exists and its status describes its generation.
    let stateful_sets = Api::<StatefulSet>::namespaced(client.clone(), &ns);
    eventually("the operator creates the StatefulSet of good", || async {
        stateful_sets.get("good").await.ok()
    })
    .await;
    eventually("good has a status for its generation", || async {
        let good = collectors.get_status("good").await.ok()?;
        let status = good.status?;
        (status.observed_generation == good.metadata.generation && !status.conditions.is_empty())
            .then_some(())
    })
    .await;

    // Each malformed one is reported with a Warning Event naming the field, and counted.
    for (name, field) in [
        ("bad", "spec.replicas"),
        ("bad-service", "spec.service.type"),
    ] {
        let event = expect_event(&client, &ns, name, "Warning", MALFORMED_REASON).await;
        assert!(
            event.note.as_deref().is_some_and(|n| n.contains(field)),
            "the Event of {name} should name {field}: {event:?}"
        );
        assert!(
            stateful_sets.get_opt(name).await.expect("get").is_none(),
            "nothing is built from the malformed collector {name}"
        );
    }
    let malformed = controller
        .ctx
        .metrics
        .failures
        .get_or_create(&ErrorLabels { error: "malformed" })
        .get();
    assert!(
        malformed >= 2,
        "failures{{error=\"malformed\"}} is {malformed}"
    );
    // And on its status, where the API server accepts one.
    let degraded = eventually(
        "bad-service reports Degraded=True MalformedObject",
        || async {
            let bad = raw.get_status("bad-service").await.ok()?;
            let conditions = bad.data.pointer("/status/conditions")?.as_array()?.clone();
            conditions
                .into_iter()
                .find(|c| c["type"] == "Degraded" && c["reason"] == MALFORMED_REASON)
        },
    )
    .await;
    assert_eq!(degraded["status"], "True");
    let message = degraded["message"].as_str().expect("message");
    assert!(
        message.contains("spec.service.type") && message.contains("Headless"),
        "{message} should name spec.service.type and its value"
    );

    controller.stop().await;
    control_plane.stop();
}

const METER: &str = r#"
apiVersion: metering.tally.dev/v1alpha1
kind: MeteringCollector
metadata:
  name: meter
spec:
  replicas: 2
  image: registry.invalid/tally-sidecar:1
"#;

#[tokio::test]
async fn transitions_publish_events_and_status_writes_cause_no_reconcile_loop() {
    let (control_plane, client, ns) = control_plane_with_crd("events").await;
    let collectors = Api::<MeteringCollector>::namespaced(client.clone(), &ns);
    create(&collectors, &collector(METER)).await;
    // Valid for the API server, refused by the operator's validation (names longer than 52 characters).
    let long_name = "x".repeat(53);
    create(
        &collectors,
        &collector(&METER.replace("name: meter", &format!("name: {long_name}"))),
    )
    .await;
    let controller = RunningController::start(&client);

    // First reconcile of meter: pods not Ready (no kubelet), every child applied.
    let replicas_not_ready =
        expect_event(&client, &ns, "meter", "Warning", "ReplicasNotReady").await;
    expect_event(&client, &ns, "meter", "Normal", "AsExpected").await;
    let invalid = expect_event(&client, &ns, &long_name, "Warning", "InvalidSpec").await;
    for event in [&replicas_not_ready, &invalid] {
        assert_eq!(event.action.as_deref(), Some("Reconcile"), "{event:?}");
        assert_eq!(
            event.reporting_controller.as_deref(),
            Some("tally-operator"),
            "{event:?}"
        );
        let regarding = event.regarding.as_ref().expect("regarding");
        assert_eq!(regarding.kind.as_deref(), Some("MeteringCollector"));
        assert_eq!(regarding.namespace.as_deref(), Some(ns.as_str()));
    }
    assert!(
        invalid
            .note
            .as_deref()
            .is_some_and(|n| n.contains("metadata.name")),
        "{invalid:?}"
    );

    // Converged: the status describes the current generation and a finished rollout.
    eventually("meter's rollout is complete", || async {
        let meter = collectors.get_status("meter").await.ok()?;
        let status = meter.status?;
        let progressing = status
            .conditions
            .iter()
            .find(|c| c.type_ == "Progressing")?;
        (status.observed_generation == meter.metadata.generation
            && progressing.reason == "RolloutComplete")
            .then_some(())
    })
    .await;
    expect_event(&client, &ns, "meter", "Normal", "RolloutComplete").await;

    // Observation window: touch the StatefulSet (each touch makes the controller reconcile meter) and check the
    // collector's resourceVersion does not move, i.e. reconciles with nothing new write nothing.
    let version = |c: MeteringCollector| c.metadata.resource_version;
    let before = version(collectors.get("meter").await.expect("meter"));
    let reconciles_before = controller.ctx.metrics.reconciliations.get();
    let stateful_sets = Api::<StatefulSet>::namespaced(client.clone(), &ns);
    let window = Duration::from_secs(5);
    let started = Instant::now();
    let mut touches = 0;
    while started.elapsed() < window {
        touches += 1;
        stateful_sets
            .patch(
                "meter",
                &PatchParams::default(),
                &Patch::Merge(json!({ "metadata": { "annotations": { "tally.dev/touch": touches.to_string() } } })),
            )
            .await
            .expect("StatefulSet annotated");
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = version(collectors.get("meter").await.expect("meter"));
        assert_eq!(
            now, before,
            "meter was written again after {touches} touches"
        );
    }
    let reconciles = controller.ctx.metrics.reconciliations.get() - reconciles_before;
    assert!(
        reconciles >= 3,
        "only {reconciles} reconciles in the window: the check above saw too little to mean anything"
    );

    controller.stop().await;
    control_plane.stop();
}
