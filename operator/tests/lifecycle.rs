//! The Kubernetes lifecycle loses nothing: a scale-down during an upstream outage, on a real node
//! (`tally_e2e::RealNode`: the collector pods and the drain Job run the tally-sidecar image of `make images` under
//! containerd, and their buffers live on hostPath volumes bound by the real PersistentVolume binder).
//!
//! Load runs against both replicas and the Service while the upstream (a [`TestUpstream`] on the host, a fake of
//! OpenMeter's ingest endpoint: the only fake here) is down; the collector is scaled from 2 to 1, so replica 1 stops
//! with its acknowledged events undeliverable; the operator drains its buffer claim with a Job on that claim; the
//! upstream comes back; every acknowledged event is delivered, and only then is the emptied claim deleted.
//!
//! Then a rolling update of the collector's spec and a `kubectl drain` of the node (cordon, evictions through the
//! Eviction API under the collector's PodDisruptionBudget, uncordon), both under load during an outage: every
//! acknowledged event is delivered once the upstream is back.
//!
//! And a pod deletion during a collector outage: an injected pod's sidecar acknowledges events while the collector is
//! down (it hands them to the collector's node agent), the pod is deleted and gone, with its emptyDir, before the
//! collector is back; then every event it acknowledged is delivered.

mod support;

use std::collections::HashSet;
use std::time::Instant;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use kube::Api;
use kube::api::{DeleteParams, EvictParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use support::{
    RunningController, WITHIN, collector, create, eventually, expect_event, real_node_with_crd,
};
use tally_e2e::{ControlPlane, NODE_NAME, PAUSE_IMAGE};
use tally_operator::crd::MeteringCollector;
use tally_operator::inject::injection_patch;
use tally_tests::TestUpstream;
use tally_tests::senders::Senders;

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

/// A control plane with a real node, the CRD, two hostPath volumes, a namespace, an upstream on the host, the
/// operator's controller in this process, and the collector `meter` Ready with 2 replicas.
struct Cluster {
    control_plane: ControlPlane,
    client: kube::Client,
    ns: String,
    upstream: TestUpstream,
    collectors: Api<MeteringCollector>,
    controller: RunningController,
    /// When the test started: progress lines say how long each stage took.
    started: Instant,
}

impl Cluster {
    /// With 2 replicas and no node agent.
    async fn start(prefix: &str) -> Cluster {
        Cluster::start_with(prefix, 2, false).await
    }

    /// With `replicas` replicas, and the node agent (buffering in the node's directory) when `node_agent`.
    async fn start_with(prefix: &str, replicas: i32, node_agent: bool) -> Cluster {
        let started = Instant::now();
        let (control_plane, client) = real_node_with_crd().await;
        let node = control_plane.real_node().expect("a real node");
        control_plane
            .create_host_path_volumes(&format!("{prefix}-pv"), "", replicas as usize, "10Gi")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let node_agent = if node_agent {
            format!(
                "  nodeAgent: {{ enabled: true, hostPath: {} }}\n",
                node.dir().join("node-agent").display()
            )
        } else {
            String::new()
        };
        let ns = control_plane
            .new_namespace(prefix)
            .await
            .expect("namespace");
        let upstream = TestUpstream::start_on(node.host_ip().into()).await;
        // A short shutdownTimeout: a stopping replica gives up delivering quickly, leaving its buffer behind.
        let meter = format!(
            r#"
apiVersion: metering.tally.dev/v1alpha1
kind: MeteringCollector
metadata:
  name: meter
spec:
  replicas: {replicas}
  storage: {{ size: 1Gi }}
{node_agent}  pipeline:
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
        let cluster = Cluster {
            control_plane,
            client,
            ns,
            upstream,
            collectors,
            controller,
            started,
        };
        cluster.wait_rolled_out(replicas).await;
        cluster
    }

    /// Waits until the current spec is rolled out and `replicas` replicas are Ready.
    async fn wait_rolled_out(&self, replicas: i32) {
        eventually(
            &format!("meter is rolled out and Ready with {replicas} replicas"),
            || async {
                let meter = self.collectors.get_status("meter").await.ok()?;
                let status = meter.status?;
                let is = |type_: &str, value: &str| {
                    status
                        .conditions
                        .iter()
                        .any(|c| c.type_ == type_ && c.status == value)
                };
                (status.observed_generation == meter.metadata.generation
                    && is("Ready", "True")
                    && is("Progressing", "False")
                    && status.ready_replicas == replicas)
                    .then_some(())
            },
        )
        .await;
    }

    /// A progress line with the seconds since the start, so a slow or failed run shows where the time went.
    fn progress(&self, what: &str) {
        eprintln!("[{:6.1}s] {what}", self.started.elapsed().as_secs_f64());
    }

    /// Marks the node unschedulable (`kubectl cordon`) or schedulable again.
    async fn cordon(&self, unschedulable: bool) {
        Api::<k8s_openapi::api::core::v1::Node>::all(self.client.clone())
            .patch(
                NODE_NAME,
                &PatchParams::default(),
                &Patch::Merge(json!({ "spec": { "unschedulable": unschedulable } })),
            )
            .await
            .expect("cordoning the node");
    }

    fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    /// The ingest URL of the collector's Service, by its ClusterIP (the host routes the Service range to the node).
    async fn service_url(&self) -> String {
        let ip =
            Api::<k8s_openapi::api::core::v1::Service>::namespaced(self.client.clone(), &self.ns)
                .get("meter")
                .await
                .expect("Service meter")
                .spec
                .and_then(|s| s.cluster_ip)
                .expect("ClusterIP");
        ingest_url(&ip)
    }

    /// Asserts that every acknowledged id reached the upstream.
    async fn assert_all_delivered(&self, acked: &[String]) {
        self.upstream
            .wait_delivered(acked.iter().map(String::as_str), WITHIN)
            .await;
        let delivered: HashSet<String> = self.upstream.delivered_id_set();
        let lost: Vec<&String> = acked.iter().filter(|id| !delivered.contains(*id)).collect();
        assert!(
            lost.is_empty(),
            "{} of {} acknowledged events were lost: {:?}",
            lost.len(),
            acked.len(),
            lost.iter().take(10).collect::<Vec<_>>()
        );
    }

    async fn stop(self) {
        self.controller.stop().await;
        self.control_plane.stop();
    }
}

/// Each sender's pause after a batch: about 500 events/s per sender, a steady load that a collector's buffer holds
/// for the whole outage (unpaced senders fill it within minutes, and a full buffer rightly refuses).
const PACE: std::time::Duration = std::time::Duration::from_millis(20);

fn ingest_url(host: &str) -> String {
    format!("http://{host}:4196/api/v1/events")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scale_down_during_an_outage_drains_the_removed_replicas_buffer_and_loses_nothing() {
    let cluster = Cluster::start("scale-down").await;
    cluster.progress("2 replicas ready");
    let Cluster {
        client,
        ns,
        upstream,
        collectors,
        controller,
        ..
    } = &cluster;
    assert_eq!(
        condition(collectors, "meter", "Draining").await,
        Some(("False".into(), "NothingToDrain".into()))
    );

    // The upstream goes down; load runs on each replica (pod IPs) and on the Service (its ClusterIP).
    upstream.down().await;
    let pods = cluster.pods();
    let to_replica_0 = Senders::start_paced(
        1,
        10,
        "replica-0",
        ingest_url(&pod_ip(&pods, "meter-0").await),
        PACE,
    );
    let to_replica_1 = Senders::start_paced(
        2,
        10,
        "replica-1",
        ingest_url(&pod_ip(&pods, "meter-1").await),
        PACE,
    );
    let to_service = Senders::start_paced(1, 10, "service", cluster.service_url().await, PACE);
    for (senders, what) in [
        (&to_replica_0, "replica 0"),
        (&to_replica_1, "replica 1"),
        (&to_service, "the Service"),
    ] {
        senders
            .wait_acked(100, WITHIN, &format!("100 events acknowledged by {what}"))
            .await;
    }

    cluster.progress("load on, upstream down; scaling to 1");
    // Scale down while loaded and while the upstream is down.
    collectors
        .patch(
            "meter",
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "replicas": 1 } })),
        )
        .await
        .expect("scaled to 1");
    let jobs = Api::<Job>::namespaced(client.clone(), ns);
    eventually(
        "the drain Job meter-drain-1 runs, and the status says Draining",
        || async {
            jobs.get_opt("meter-drain-1").await.ok()??;
            (condition(collectors, "meter", "Draining").await?
                == ("True".into(), "DrainingBuffers".into()))
                .then_some(())
        },
    )
    .await;
    cluster.progress("the drain Job runs");
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
    let claims = Api::<PersistentVolumeClaim>::namespaced(client.clone(), ns);
    assert!(
        claims
            .get_opt("buffer-meter-1")
            .await
            .expect("claims")
            .is_some(),
        "the claim of replica 1 was deleted while its events were undelivered"
    );
    assert_eq!(upstream.delivered_ids().len(), 0);

    cluster.progress("load off, upstream up");
    // The upstream comes back: every acknowledged event is delivered, then the drained claim goes.
    upstream.up().await;
    cluster.assert_all_delivered(&acked).await;
    eventually(
        "the drained claim is deleted, its Job removed, and Draining is False",
        || async {
            let claim = claims.get_opt("buffer-meter-1").await.ok()?;
            let gone = claim.is_none_or(|c| c.metadata.deletion_timestamp.is_some());
            let job = jobs.get_opt("meter-drain-1").await.ok()?;
            let draining = condition(collectors, "meter", "Draining").await?;
            (gone
                && job.is_none_or(|j| j.metadata.deletion_timestamp.is_some())
                && draining == ("False".into(), "NothingToDrain".into()))
                .then_some(())
        },
    )
    .await;
    cluster.progress("claim deleted, Draining False");
    let drained = expect_event(client, ns, "meter", "Normal", "BufferDrained").await;
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

    eprintln!(
        "acknowledged {} ({from_replica_1} by replica 1), delivered {} distinct, drained by the Job {drained_events}",
        acked.len(),
        upstream.delivered_id_set().len()
    );

    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_update_and_a_node_drain_under_load_during_an_outage_lose_nothing() {
    let cluster = Cluster::start("rollout").await;
    cluster.progress("2 replicas ready; upstream down, load on");
    let Cluster {
        upstream,
        collectors,
        ..
    } = &cluster;
    upstream.down().await;
    let load = Senders::start_paced(2, 10, "load", cluster.service_url().await, PACE);
    load.wait_acked(200, WITHIN, "200 events acknowledged before the rollout")
        .await;

    // A rolling update of the collector's spec (a pipeline change rolls the pods), under load, upstream down.
    collectors
        .patch(
            "meter",
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "pipeline": { "outputs": { "targets": [{
                "name": "openmeter", "type": "openmeter", "url": upstream.url(),
                "batching": { "count": 50, "period": "100ms" },
                "retry": { "initialInterval": "100ms", "maxInterval": "1s" },
            }]}}}})),
        )
        .await
        .expect("pipeline changed");
    cluster.wait_rolled_out(2).await;
    cluster.progress("rolled out");
    let after_rollout = load.acked_count();
    load.wait_acked(
        after_rollout + 100,
        WITHIN,
        "100 more events acknowledged after the rollout",
    )
    .await;

    // `kubectl drain`: cordon, then evict through the Eviction API, which honours the PodDisruptionBudget
    // (maxUnavailable 1).
    cluster.progress("cordoning and evicting meter-0");
    let meter_1_uid = cluster
        .pods()
        .get("meter-1")
        .await
        .expect("meter-1")
        .metadata
        .uid;
    tokio::time::timeout(WITHIN, cluster.cordon(true))
        .await
        .expect("cordon hangs");
    cluster.progress("cordoned");
    let pods = cluster.pods();
    tokio::time::timeout(WITHIN, pods.evict("meter-0", &EvictParams::default()))
        .await
        .expect("evicting meter-0 hangs")
        .expect("meter-0 evicted");
    cluster.progress("meter-0 evicted");
    eventually(
        "meter-0 stopped and is recreated but not scheduled (the node is cordoned)",
        || async {
            let pod = pods.get_opt("meter-0").await.ok()??;
            let status = pod.status?;
            (status.phase.as_deref() == Some("Pending")).then_some(())
        },
    )
    .await;
    cluster.progress("meter-0 pending on the cordoned node");
    // With meter-0 down (it cannot come back on the cordoned node), the budget allows no second disruption: `kubectl
    // drain` would wait here. (Asked through the status: the client retries an eviction refused with 429.)
    let budgets = Api::<k8s_openapi::api::policy::v1::PodDisruptionBudget>::namespaced(
        cluster.client.clone(),
        &cluster.ns,
    );
    eventually(
        "the budget allows no disruption while meter-0 is down",
        || async {
            let status = budgets.get("meter").await.ok()?.status?;
            (status.disruptions_allowed == Some(0) && status.current_healthy == Some(1))
                .then_some(())
        },
    )
    .await;
    let during_drain = load.acked_count();
    load.wait_acked(
        during_drain + 100,
        WITHIN,
        "the remaining replica keeps accepting during the drain",
    )
    .await;
    // Uncordoning lets meter-0 back onto its buffer; then the budget allows meter-1's eviction.
    cluster.progress("uncordoning");
    cluster.cordon(false).await;
    cluster.wait_rolled_out(2).await;
    tokio::time::timeout(WITHIN, pods.evict("meter-1", &EvictParams::default()))
        .await
        .expect("evicting meter-1 hangs")
        .expect("meter-1 evicted once meter-0 is back");
    eventually("meter-1 stopped and was recreated", || async {
        let pod = pods.get_opt("meter-1").await.ok()??;
        (pod.metadata.uid != meter_1_uid).then_some(())
    })
    .await;
    cluster.wait_rolled_out(2).await;

    cluster.progress("meter-1 evicted and back; load off, upstream up");
    let stopped = load.stop().await;
    assert!(upstream.delivered_ids().is_empty(), "the upstream was down");
    upstream.up().await;
    cluster.assert_all_delivered(&stopped.acked).await;
    cluster.progress("everything delivered");
    // Nothing was scaled away: no drain Job was needed.
    assert_eq!(
        condition(collectors, "meter", "Draining").await,
        Some(("False".into(), "NothingToDrain".into()))
    );
    eprintln!(
        "acknowledged {} ({} refused connections, {} answers 503), delivered {} distinct",
        stopped.acked.len(),
        stopped.refused,
        stopped.unavailable,
        upstream.delivered_id_set().len()
    );
    cluster.stop().await;
}

/// A sample of a Prometheus exposition fetched from `http://<ip>:4196/metrics`, by its full series text
/// (`name{labels}`); 0 when absent.
async fn metric_at(ip: &str, series: &str) -> f64 {
    let Ok(response) = reqwest::get(format!("http://{ip}:4196/metrics")).await else {
        return 0.0;
    };
    let text = response.text().await.unwrap_or_default();
    tally_tests::metrics::Exposition::parse(&text).value(series)
}

/// The pod an injected workload runs: `app` (the pause image, doing nothing, as locked down as `restricted`
/// demands) with tally-sidecar injected for `collector` by the webhook's own patch ([`injection_patch`], applied
/// here rather than through the admission webhook, which `inject.rs` and the e2e tests cover). A short grace period,
/// so the pod is gone well before the collector is back.
fn injected_pod(collector: &MeteringCollector) -> Pod {
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": "app" },
        "spec": {
            "terminationGracePeriodSeconds": GRACE_SECONDS,
            "securityContext": { "runAsNonRoot": true, "seccompProfile": { "type": "RuntimeDefault" } },
            "containers": [{
                "name": "app",
                "image": PAUSE_IMAGE,
                "imagePullPolicy": "Never",
                "securityContext": {
                    "allowPrivilegeEscalation": false,
                    "readOnlyRootFilesystem": true,
                    "capabilities": { "drop": ["ALL"] }
                }
            }]
        }
    }))
    .expect("a pod");
    let patch = injection_patch(&pod, collector).expect("the injection patch");
    let mut value = serde_json::to_value(&pod).expect("pod as JSON");
    json_patch::patch(&mut value, &patch).expect("the patch applies");
    serde_json::from_value(value).expect("the injected pod")
}

/// The app pod's grace period: its sidecar has this long after SIGTERM, far less than the collector's outage.
const GRACE_SECONDS: i64 = 5;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_pods_acknowledged_events_outlive_a_collector_outage_through_the_node_agent() {
    let cluster = Cluster::start_with("pod-deletion", 1, true).await;
    let Cluster {
        client,
        ns,
        upstream,
        collectors,
        ..
    } = &cluster;
    eventually("the node agent is ready", || async {
        (condition(collectors, "meter", "NodeAgentReady").await?
            == ("True".into(), "AgentsReady".into()))
            .then_some(())
    })
    .await;
    cluster.progress("collector and node agent ready");

    // An injected pod in a namespace enforcing the `restricted` Pod Security Standard.
    let apps = format!("{ns}-apps");
    tally_e2e::workload::create_metered_namespace(client, &apps)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let meter = collectors.get("meter").await.expect("meter");
    let pods = Api::<Pod>::namespaced(client.clone(), &apps);
    pods.create(&PostParams::default(), &injected_pod(&meter))
        .await
        .expect("the injected pod is admitted under the restricted standard");
    eventually("the app pod runs with its sidecar ready", || async {
        tally_e2e::workload::running_pod(client, &apps).await
    })
    .await;
    let app_ip = pod_ip(&pods, "app").await;
    cluster.progress("app pod running; load on");
    let load = Senders::start_paced(1, 10, "app", ingest_url(&app_ip), PACE);
    load.wait_acked(200, WITHIN, "200 events acknowledged by the sidecar")
        .await;
    eventually(
        "events reach the upstream through the collector",
        || async { (!upstream.delivered_ids().is_empty()).then_some(()) },
    )
    .await;

    // The collector goes down and stays down: the node is cordoned and its only pod deleted, so it is recreated
    // Pending.
    cluster.cordon(true).await;
    let collector_pods = cluster.pods();
    let meter_0 = collector_pods
        .get("meter-0")
        .await
        .expect("meter-0")
        .metadata
        .uid;
    collector_pods
        .delete("meter-0", &DeleteParams::default())
        .await
        .expect("meter-0 deleted");
    let collector_pending = || async {
        let pod = collector_pods.get_opt("meter-0").await.ok()??;
        (pod.metadata.uid != meter_0 && pod.status?.phase.as_deref() == Some("Pending"))
            .then_some(())
    };
    eventually(
        "the collector is down: meter-0 recreated, Pending",
        collector_pending,
    )
    .await;
    let down_at = Instant::now();
    cluster.progress("collector down");

    // The sidecar keeps acknowledging; its batches go to the node agent.
    let before = load.acked_count();
    load.wait_acked(
        before + 300,
        WITHIN,
        "300 more events acknowledged while the collector is down",
    )
    .await;
    let agent_ip = eventually("the node agent's pod IP", || async {
        let agents = Api::<Pod>::namespaced(client.clone(), ns)
            .list(&ListParams::default().labels("app.kubernetes.io/name=tally-node-agent"))
            .await
            .ok()?;
        agents.items.into_iter().next()?.status?.pod_ip
    })
    .await;
    eventually("the sidecar hands batches to the node agent", || async {
        let handed = metric_at(
            &app_ip,
            r#"tally_output_events_sent_total{output="node-agent"}"#,
        )
        .await;
        (handed > 0.0).then_some(())
    })
    .await;

    // The pod is deleted while the collector is still down, and is gone (with its emptyDir) long before it is back.
    let stopped = load.stop().await;
    cluster.progress("load off; deleting the app pod");
    pods.delete("app", &DeleteParams::default())
        .await
        .expect("app deleted");
    let deleted_at = Instant::now();
    eventually("the app pod is gone", || async {
        pods.get_opt("app").await.ok()?.is_none().then_some(())
    })
    .await;
    assert!(
        collector_pending().await.is_some(),
        "the collector stayed down until the pod was gone"
    );
    // The outage lasts longer than the pod's grace period: the collector stays down for a second beyond it,
    // counted from the deletion (a scenario's length, not a wait for some state).
    let grace = std::time::Duration::from_secs(GRACE_SECONDS as u64);
    tokio::time::sleep_until((deleted_at + grace + std::time::Duration::from_secs(1)).into()).await;
    assert!(
        collector_pending().await.is_some(),
        "the collector stayed down beyond the grace period"
    );
    let outage = down_at.elapsed();
    let delivered_before = upstream.delivered_id_set();
    let waiting = stopped
        .acked
        .iter()
        .filter(|id| !delivered_before.contains(*id))
        .count();
    assert!(
        waiting > 0,
        "events acknowledged during the outage are not delivered yet"
    );
    let held = metric_at(&agent_ip, "tally_buffer_events").await;
    cluster.progress(&format!(
        "app pod gone; {waiting} acknowledged events undelivered, the node agent holds {held}"
    ));

    // The collector comes back: the node agent delivers what the deleted pod acknowledged.
    cluster.cordon(false).await;
    cluster.wait_rolled_out(1).await;
    cluster.progress("collector back");
    cluster.assert_all_delivered(&stopped.acked).await;
    let forwarded = metric_at(
        &agent_ip,
        r#"tally_output_events_sent_total{output="collector"}"#,
    )
    .await;
    assert!(
        forwarded >= waiting as f64,
        "the node agent delivered {forwarded} events, fewer than the {waiting} that waited"
    );
    eprintln!(
        "acknowledged {} by the deleted pod's sidecar, {waiting} undelivered when it was deleted after a {:.1}s \
         outage; the node agent held {held} and delivered {forwarded}; delivered {} distinct",
        stopped.acked.len(),
        outage.as_secs_f64(),
        upstream.delivered_id_set().len()
    );
    cluster.stop().await;
}
