//! The Kubernetes lifecycle loses nothing: a scale-down during an upstream outage, on a real node
//! (`tally_e2e::RealNode`: the collector pods and the drain Job run the tally-sidecar image of `make images` under
//! containerd, and their buffers live on hostPath volumes bound by the real PersistentVolume binder).
//!
//! Load runs against both replicas and the Service while the upstream (a [`TestUpstream`] on the host, a fake of
//! OpenMeter's ingest endpoint: the only fake here) is down; the collector is scaled from 2 to 1, so replica 1 stops
//! with its acknowledged events undeliverable; the operator drains its buffer claim with a Job on that claim; the
//! upstream comes back; every acknowledged event is delivered, and only then is the emptied claim deleted.

mod support;

use std::collections::HashSet;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::json;
use support::{
    RunningController, WITHIN, collector, create, eventually, expect_event, install_crd,
};
use tally_e2e::ControlPlane;
use tally_operator::crd::MeteringCollector;
use tally_tests::TestUpstream;
use tally_tests::senders::Senders;

/// `$TALLY_IMAGES_DIR/tally-sidecar-<version>.tar`, which `make unit` builds first.
fn sidecar_image() -> std::path::PathBuf {
    let dir = std::env::var_os("TALLY_IMAGES_DIR")
        .map(std::path::PathBuf::from)
        .expect("TALLY_IMAGES_DIR is set (run `make unit`, which builds the images)");
    dir.join(format!("tally-sidecar-{}.tar", env!("CARGO_PKG_VERSION")))
}

/// The status of condition `type_` of the collector `name`, with its reason.
async fn condition(
    collectors: &Api<MeteringCollector>,
    name: &str,
    type_: &str,
) -> Option<(String, String)> {
    let status = collectors.get_status(name).await.ok()?.status?;
    let condition = status.conditions.into_iter().find(|c| c.type_ == type_)?;
    Some((condition.status, condition.reason))
}

async fn pod_ip(pods: &Api<Pod>, name: &str) -> String {
    eventually(&format!("pod {name} has an IP"), || async {
        pods.get(name).await.ok()?.status?.pod_ip
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scale_down_during_an_outage_drains_the_removed_replicas_buffer_and_loses_nothing() {
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
    control_plane
        .create_host_path_volumes("lifecycle-pv", "", 2, "10Gi")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let ns = control_plane
        .new_namespace("lifecycle")
        .await
        .expect("namespace");
    let upstream = TestUpstream::start_on(node.host_ip().into()).await;
    // A short shutdownTimeout: replica 1 gives up delivering at its stop quickly, leaving its buffer to the drain.
    let meter = format!(
        r#"
apiVersion: metering.tally.dev/v1alpha1
kind: MeteringCollector
metadata:
  name: meter
spec:
  replicas: 2
  storage: {{ size: 1Gi }}
  pipeline:
    shutdownTimeout: 2s
    outputs:
      targets:
        - name: openmeter
          type: openmeter
          url: {}
          batching: {{ count: 100, period: 100ms }}
          retry: {{ initialInterval: 100ms, maxInterval: 1s }}
"#,
        upstream.url()
    );
    let collectors = Api::<MeteringCollector>::namespaced(client.clone(), &ns);
    create(&collectors, &collector(&meter)).await;
    let controller = RunningController::start(&client);
    eventually("meter is Ready with 2 replicas", || async {
        let status = collectors.get_status("meter").await.ok()?.status?;
        let ready = status
            .conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        (ready && status.ready_replicas == 2).then_some(())
    })
    .await;
    assert_eq!(
        condition(&collectors, "meter", "Draining").await,
        Some(("False".into(), "NothingToDrain".into()))
    );

    // The upstream goes down; load runs on each replica (pod IPs) and on the Service (its ClusterIP).
    upstream.down().await;
    let pods = Api::<Pod>::namespaced(client.clone(), &ns);
    let url = |host: &str| format!("http://{host}:4196/api/v1/events");
    let service_ip = Api::<k8s_openapi::api::core::v1::Service>::namespaced(client.clone(), &ns)
        .get("meter")
        .await
        .expect("Service meter")
        .spec
        .and_then(|s| s.cluster_ip)
        .expect("ClusterIP");
    let to_replica_0 = Senders::start(1, 10, "replica-0", url(&pod_ip(&pods, "meter-0").await));
    let to_replica_1 = Senders::start(2, 10, "replica-1", url(&pod_ip(&pods, "meter-1").await));
    let to_service = Senders::start(1, 10, "service", url(&service_ip));
    for (senders, what) in [
        (&to_replica_0, "replica 0"),
        (&to_replica_1, "replica 1"),
        (&to_service, "the Service"),
    ] {
        senders
            .wait_acked(100, WITHIN, &format!("100 events acknowledged by {what}"))
            .await;
    }

    // Scale down while loaded and while the upstream is down.
    collectors
        .patch(
            "meter",
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "replicas": 1 } })),
        )
        .await
        .expect("scaled to 1");
    let jobs = Api::<Job>::namespaced(client.clone(), &ns);
    eventually(
        "the drain Job meter-drain-1 runs, and the status says Draining",
        || async {
            jobs.get_opt("meter-drain-1").await.ok()??;
            (condition(&collectors, "meter", "Draining").await?
                == ("True".into(), "DrainingBuffers".into()))
                .then_some(())
        },
    )
    .await;
    let mut acked = Vec::new();
    let mut from_replica_1 = 0;
    for (senders, replica_1) in [
        (to_replica_0, false),
        (to_replica_1, true),
        (to_service, false),
    ] {
        let stopped = senders.stop().await;
        if replica_1 {
            from_replica_1 = stopped.acked.len();
        }
        acked.extend(stopped.acked);
    }
    // The outage lasts beyond the replica's stop: the claim is still there, and nothing was delivered.
    let claims = Api::<PersistentVolumeClaim>::namespaced(client.clone(), &ns);
    assert!(
        claims
            .get_opt("buffer-meter-1")
            .await
            .expect("claims")
            .is_some(),
        "the claim of replica 1 was deleted while its events were undelivered"
    );
    assert_eq!(upstream.delivered_ids().len(), 0);

    // The upstream comes back: every acknowledged event is delivered, then the drained claim goes.
    upstream.up().await;
    upstream
        .wait_delivered(acked.iter().map(String::as_str), WITHIN)
        .await;
    eventually(
        "the drained claim is deleted, its Job removed, and Draining is False",
        || async {
            let claim = claims.get_opt("buffer-meter-1").await.ok()?;
            let gone = claim.is_none_or(|c| c.metadata.deletion_timestamp.is_some());
            let job = jobs.get_opt("meter-drain-1").await.ok()?;
            let draining = condition(&collectors, "meter", "Draining").await?;
            (gone
                && job.is_none_or(|j| j.metadata.deletion_timestamp.is_some())
                && draining == ("False".into(), "NothingToDrain".into()))
                .then_some(())
        },
    )
    .await;
    let drained = expect_event(&client, &ns, "meter", "Normal", "BufferDrained").await;
    assert!(
        drained
            .note
            .as_deref()
            .is_some_and(|n| n.contains("buffer-meter-1")),
        "{drained:?}"
    );
    // Replica 1 delivered nothing itself (the upstream was down until after it stopped): its Job did.
    let drained_events = controller.ctx.metrics.drained_events.get();
    assert!(
        drained_events >= from_replica_1 as u64,
        "the drain reported {drained_events} events, fewer than the {from_replica_1} replica 1 acknowledged"
    );
    assert!(
        claims
            .get_opt("buffer-meter-0")
            .await
            .expect("claims")
            .is_some()
    );

    let delivered: HashSet<String> = upstream.delivered_id_set();
    let lost: Vec<&String> = acked.iter().filter(|id| !delivered.contains(*id)).collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged events were lost: {:?}",
        lost.len(),
        acked.len(),
        lost.iter().take(10).collect::<Vec<_>>()
    );
    eprintln!(
        "acknowledged {} ({from_replica_1} by replica 1), delivered {} distinct, drained by the Job {drained_events}",
        acked.len(),
        delivered.len()
    );

    controller.stop().await;
    control_plane.stop();
}
