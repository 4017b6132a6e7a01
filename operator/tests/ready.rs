//! A collector becomes Ready: the control plane runs a real node (`tally_e2e::RealNode`), so the StatefulSet's pods
//! run the tally-sidecar image of `make images` under containerd and the kubelet's readiness probe decides when they
//! are Ready; the real PersistentVolume binder binds their buffer claims to hostPath volumes the test creates; and
//! the operator's status follows: Ready=True with `readyReplicas == replicas`, and on a scale-up Ready and
//! Progressing move through the rollout and back.

mod support;

use futures::TryStreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{ListParams, Patch, PatchParams, WatchEvent, WatchParams};
use kube::{Api, ResourceExt};
use serde_json::json;
use support::{RunningController, WITHIN, collector, create, eventually, real_node_with_crd};
use tally_operator::crd::{MeteringCollector, MeteringCollectorStatus};

/// The collector, with the image `make images` builds (the CRD's default).
const METER: &str = r#"
apiVersion: metering.tally.dev/v1alpha1
kind: MeteringCollector
metadata:
  name: meter
spec:
  replicas: 1
  storage: { size: 1Gi }
"#;

/// `(Ready, Progressing, readyReplicas)` of a status, as `("True", "False", 1)`.
fn summary(status: &MeteringCollectorStatus) -> (String, String, i32) {
    let condition = |type_: &str| {
        status
            .conditions
            .iter()
            .find(|c| c.type_ == type_)
            .map(|c| c.status.clone())
            .unwrap_or_default()
    };
    (
        condition("Ready"),
        condition("Progressing"),
        status.ready_replicas,
    )
}

fn owned(s: (&str, &str, i32)) -> (String, String, i32) {
    (s.0.to_string(), s.1.to_string(), s.2)
}

#[tokio::test]
async fn a_collector_on_a_real_node_becomes_ready_and_follows_a_scale_up() {
    let (control_plane, client) = real_node_with_crd().await;
    // Without a StorageClass, which the binder gives to a claim without one.
    control_plane
        .create_host_path_volumes("ready-pv", "", 2, "10Gi")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let ns = control_plane
        .new_namespace("ready")
        .await
        .expect("namespace");
    let collectors = Api::<MeteringCollector>::namespaced(client.clone(), &ns);
    create(&collectors, &collector(METER)).await;
    let controller = RunningController::start(&client);

    let ready = eventually("meter is Ready with 1 of 1 replicas", || async {
        let meter = collectors.get_status("meter").await.ok()?;
        let status = meter.status?;
        (summary(&status) == owned(("True", "False", 1))).then_some(status)
    })
    .await;
    let condition = |status: &MeteringCollectorStatus, type_: &str| {
        status
            .conditions
            .iter()
            .find(|c| c.type_ == type_)
            .map(|c| c.reason.clone())
    };
    assert_eq!(
        condition(&ready, "Ready").as_deref(),
        Some("AllReplicasReady")
    );
    assert_eq!(
        condition(&ready, "Progressing").as_deref(),
        Some("RolloutComplete")
    );
    let pods = Api::<Pod>::namespaced(client.clone(), &ns);
    let pod = pods.get("meter-0").await.expect("pod meter-0");
    let scheduled = pod.spec.as_ref().and_then(|s| s.node_name.clone());
    assert!(
        scheduled.as_deref() == Some(tally_e2e::NODE_NAME),
        "meter-0 runs on {scheduled:?}"
    );

    // Scale up, watching every status the operator writes from here on.
    let from = collectors
        .get("meter")
        .await
        .expect("meter")
        .resource_version()
        .expect("resourceVersion");
    let statuses = collectors
        .watch(
            &WatchParams::default()
                .fields("metadata.name=meter")
                .timeout(60),
            &from,
        )
        .await
        .expect("watching meter");
    collectors
        .patch(
            "meter",
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "replicas": 2 } })),
        )
        .await
        .expect("scaled to 2");
    let mut seen = Vec::new();
    let mut statuses = Box::pin(statuses);
    let converged = tokio::time::timeout(WITHIN, async {
        while let Some(event) = statuses.try_next().await.expect("watch stream") {
            if let WatchEvent::Modified(meter) = event {
                let Some(status) = meter.status else { continue };
                if status.observed_generation != meter.metadata.generation {
                    continue;
                }
                seen.push(summary(&status));
                if summary(&status) == owned(("True", "False", 2)) {
                    return true;
                }
            }
        }
        false
    })
    .await;
    assert_eq!(
        converged,
        Ok(true),
        "meter did not become Ready with 2 of 2 replicas; statuses seen: {seen:?}"
    );
    assert!(
        seen.iter()
            .any(|(ready, progressing, _)| ready == "False" && progressing == "True"),
        "the rollout of the second replica was never reported (Ready=False, Progressing=True): {seen:?}"
    );
    let running = pods
        .list(&ListParams::default())
        .await
        .expect("pods")
        .items
        .iter()
        .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
        .count();
    assert_eq!(running, 2);

    controller.stop().await;
    control_plane.stop();
}
