//! Tally on a real node ([`tally_e2e::RealNode`]): containerd runs the images of `make images`, the kubelet's
//! probes decide readiness, kube-proxy routes Services and CoreDNS resolves them.
//!
//! The chart is installed with `helm install`; the operator runs in-cluster (two replicas, leader election, the
//! webhook reached by the API server through its Service); a MeteringCollector's pods become Ready from the
//! kubelet's real readiness; a Deployment in a labelled namespace under the `restricted` Pod Security Standard gets
//! the injected native sidecar; its app sends usage events through `OPENMETER_URL`; and every acknowledged event
//! reaches an OpenMeter-compatible upstream (a [`TestUpstream`] on the host, a fake of OpenMeter's ingest endpoint:
//! the only fake here) through the collector's Service, stamped with its namespace and pod. An app in an excluded
//! namespace, sending straight to the collector's Service name, has its events dropped and counted.

use std::{path::PathBuf, time::Duration};

use k8s_openapi::api::{
    admissionregistration::v1::MutatingWebhookConfiguration,
    apps::v1::Deployment,
    coordination::v1::Lease,
    core::v1::{Pod, Secret},
};
use kube::{
    Api, Client, ResourceExt,
    api::{DynamicObject, ListParams, Patch, PatchParams},
};
use serde_json::json;
use tally_e2e::{
    Apply, ControlPlane, Helm, RealNode, apply, chart_dir,
    workload::{
        USAGE_APP_IMAGE, create_metered_namespace, deploy_usage_app, pod_logs, running_pod,
    },
};
use tally_tests::poll::{API_INTERVAL, poll};
use tally_tests::{TestUpstream, metrics::Exposition};

const RELEASE_NAMESPACE: &str = "tally-system";
const APP_NAMESPACE: &str = "shop";
const EXCLUDED_NAMESPACE: &str = "monitoring";
const STORAGE_CLASS: &str = "tally-e2e-local";
const APP_EVENTS: u64 = 200;
const EXCLUDED_EVENTS: u64 = 20;
/// Containers start in seconds; the margin is for two cores shared with the rest of the test run.
const WITHIN: Duration = Duration::from_secs(180);
const FIELD_MANAGER: &str = "tally-e2e-real-node";

/// The archives `make images` wrote: `$TALLY_IMAGES_DIR/<name>-<version>.tar`.
fn image_archive(name: &str) -> PathBuf {
    let dir = std::env::var_os("TALLY_IMAGES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            panic!("TALLY_IMAGES_DIR is not set: run `make e2e` (it builds the images)")
        });
    let archive = dir.join(format!("{name}-{}.tar", env!("CARGO_PKG_VERSION")));
    assert!(
        archive.is_file(),
        "{} is missing: run `make images`",
        archive.display()
    );
    archive
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chart_meters_an_injected_workload_end_to_end_on_a_real_node() {
    let control_plane = ControlPlane::builder()
        .with_real_node()
        .start()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let node = control_plane.real_node().expect("started with a real node");
    let client = control_plane.client();
    for name in ["tally-sidecar", "tally-operator"] {
        node.import_image(&image_archive(name))
            .unwrap_or_else(|e| panic!("importing {name}: {e}"));
    }
    node.import_binary(
        std::path::Path::new(env!("CARGO_BIN_EXE_tally-usage-app")),
        USAGE_APP_IMAGE,
    )
    .unwrap_or_else(|e| panic!("importing the app: {e}"));
    let upstream = TestUpstream::start_on(node.host_ip().into()).await;

    let report = Report {
        client: client.clone(),
        node,
    };

    // helm install, with the chart's defaults: two operator replicas, leader election, the webhook.
    let helm = Helm::locate().unwrap_or_else(|e| panic!("{e}"));
    helm.install(
        &chart_dir(),
        "tally",
        RELEASE_NAMESPACE,
        control_plane.kubeconfig_path(),
    )
    .unwrap_or_else(|e| panic!("helm install: {e}"));
    let deployments = Api::<Deployment>::namespaced(client.clone(), RELEASE_NAMESPACE);
    report
        .until("both operator replicas Ready", async || {
            let d = deployments.get_opt("tally-operator").await.ok()??;
            (d.status?.ready_replicas? == 2).then_some(())
        })
        .await;

    // Leader election between the two in-cluster replicas: one of them holds the Lease.
    let operator_pods: Vec<String> = Api::<Pod>::namespaced(client.clone(), RELEASE_NAMESPACE)
        .list(&ListParams::default())
        .await
        .unwrap_or_else(|e| panic!("listing the operator pods: {e}"))
        .items
        .iter()
        .map(ResourceExt::name_any)
        .collect();
    let leases = Api::<Lease>::namespaced(client.clone(), RELEASE_NAMESPACE);
    let holder = report
        .until("an operator replica to hold the Lease", async || {
            let lease = leases.get_opt("tally-operator").await.ok()??;
            lease.spec?.holder_identity
        })
        .await;
    assert!(
        operator_pods
            .iter()
            .any(|pod| holder.contains(pod.as_str())),
        "the Lease holder {holder:?} is none of the operator pods {operator_pods:?}"
    );
    // The API server reaches the webhook through its Service (kube-proxy's rules in the node's namespace).
    let webhook = report
        .until(
            "the operator's MutatingWebhookConfiguration with a CA bundle",
            async || {
                // The chart names it after the release (webhook.configurationName is empty).
                let configuration = Api::<MutatingWebhookConfiguration>::all(client.clone())
                    .get_opt("tally")
                    .await
                    .ok()??;
                let webhook = configuration.webhooks?.into_iter().next()?;
                webhook.client_config.ca_bundle.is_some().then_some(webhook)
            },
        )
        .await;
    let service = webhook
        .client_config
        .service
        .unwrap_or_else(|| panic!("the webhook is not reached through a Service"));
    assert_eq!(service.namespace, RELEASE_NAMESPACE);

    // The collector: two replicas, each on a hostPath volume, forwarding to the upstream on the host.
    control_plane
        .create_host_path_volumes("tally-buffer", STORAGE_CLASS, 2, "1Gi")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    Api::<Secret>::namespaced(client.clone(), RELEASE_NAMESPACE)
        .patch(
            "openmeter",
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(json!({
                "apiVersion": "v1", "kind": "Secret",
                "metadata": { "name": "openmeter" },
                "stringData": { "token": "real-node-token" }
            })),
        )
        .await
        .unwrap_or_else(|e| panic!("creating the token Secret: {e}"));
    let collector: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "metering.tally.dev/v1alpha1",
        "kind": "MeteringCollector",
        "metadata": { "name": "meter", "namespace": RELEASE_NAMESPACE },
        "spec": {
            "replicas": 2,
            "resources": { "requests": { "cpu": "50m", "memory": "64Mi" }, "limits": { "memory": "256Mi" } },
            "storage": { "size": "1Gi", "storageClassName": STORAGE_CLASS },
            "service": { "port": 4196 },
            "pipeline": {
                "durability": "sync",
                "buffer": { "maxBytes": "256Mi", "whenFull": "reject" },
                "outputs": { "targets": [{
                    "name": "openmeter",
                    "type": "openmeter",
                    "url": upstream.url(),
                    "tokenFrom": { "file": "/var/run/secrets/tally/openmeter/token" },
                    "batching": { "count": 100, "period": "200ms" },
                    "retry": { "initialInterval": "200ms", "maxInterval": "2s" }
                }]}
            },
            "injection": { "enabled": true },
            "excludeNamespaces": [EXCLUDED_NAMESPACE]
        }
    }))
    .expect("a MeteringCollector object");
    apply(&client, &collector, Apply::Persist)
        .await
        .unwrap_or_else(|e| panic!("applying the MeteringCollector: {e}"));
    let collectors = collectors_api(&client);
    let status = report
        .until(
            "the MeteringCollector Ready (2 of 2 pods Ready)",
            async || {
                let status = collectors.get("meter").await.ok()?.data["status"].clone();
                let ready = status["conditions"]
                    .as_array()?
                    .iter()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True");
                (ready && status["readyReplicas"] == 2).then_some(status)
            },
        )
        .await;
    eprintln!("MeteringCollector status: {status}");

    // A labelled namespace under `restricted`, and an excluded one.
    for namespace in [APP_NAMESPACE, EXCLUDED_NAMESPACE] {
        create_metered_namespace(&client, namespace)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    deploy_usage_app(
        &client,
        APP_NAMESPACE,
        "checkout",
        &[("EVENTS", APP_EVENTS.to_string())],
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let collector_url = format!(
        "http://meter.{RELEASE_NAMESPACE}.svc.{}:4196",
        tally_e2e::CLUSTER_DOMAIN
    );
    deploy_usage_app(
        &client,
        EXCLUDED_NAMESPACE,
        "prometheus",
        &[
            ("EVENTS", EXCLUDED_EVENTS.to_string()),
            ("OPENMETER_URL", collector_url),
            ("STAMP_NAMESPACE", EXCLUDED_NAMESPACE.to_string()),
        ],
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));

    let app = report
        .until(
            "the checkout pod Running with both containers ready",
            async || running_pod(&client, APP_NAMESPACE).await,
        )
        .await;
    let spec = app.spec.clone().unwrap_or_default();
    let sidecar = spec
        .init_containers
        .iter()
        .flatten()
        .find(|c| c.restart_policy.as_deref() == Some("Always"))
        .unwrap_or_else(|| panic!("the checkout pod has no native sidecar: {spec:?}"));
    assert!(
        sidecar
            .image
            .as_deref()
            .is_some_and(|i| i.contains("tally-sidecar")),
        "the injected sidecar runs {:?}",
        sidecar.image
    );
    let excluded = report
        .until("the prometheus pod Running", async || {
            running_pod(&client, EXCLUDED_NAMESPACE).await
        })
        .await;
    assert!(
        excluded
            .spec
            .as_ref()
            .and_then(|s| s.init_containers.as_ref())
            .is_none_or(Vec::is_empty),
        "a pod of the excluded namespace was injected"
    );

    let app_name = app.name_any();
    report
        .until("the app to have all its events acknowledged", async || {
            let logs = pod_logs(&client, APP_NAMESPACE, &app_name, "app").await?;
            logs.contains(&format!("done: acknowledged {APP_EVENTS} events"))
                .then_some(())
        })
        .await;
    let ids: Vec<String> = (0..APP_EVENTS).map(|n| format!("{app_name}-{n}")).collect();
    upstream
        .wait_delivered(ids.iter().map(String::as_str), WITHIN)
        .await;
    let delivered = upstream.delivered_events();
    for event in delivered
        .iter()
        .filter(|e| ids.iter().any(|id| e["id"] == *id.as_str()))
    {
        assert_eq!(event["k8snamespace"], APP_NAMESPACE, "not stamped: {event}");
        assert_eq!(event["k8spod"], app_name.as_str(), "not stamped: {event}");
    }
    let excluded_name = excluded.name_any();
    report
        .until(
            "the excluded app to have its events acknowledged",
            async || {
                let logs = pod_logs(&client, EXCLUDED_NAMESPACE, &excluded_name, "app").await?;
                logs.contains(&format!("done: acknowledged {EXCLUDED_EVENTS} events"))
                    .then_some(())
            },
        )
        .await;
    // Both replicas behind the Service may have taken some: the drops add up over the two.
    let pods = Api::<Pod>::namespaced(client.clone(), RELEASE_NAMESPACE);
    let dropped = report
        .until(
            "the collectors to count the excluded namespace's events as dropped",
            async || {
                let mut dropped = 0.0;
                for name in ["meter-0", "meter-1"] {
                    let ip = pods.get(name).await.ok()?.status?.pod_ip?;
                    let text = reqwest::get(format!("http://{ip}:4196/metrics"))
                        .await
                        .ok()?
                        .text()
                        .await
                        .ok()?;
                    dropped += Exposition::parse(&text)
                        .value("tally_events_dropped_total{reason=\"excluded_namespace\"}");
                }
                (dropped >= EXCLUDED_EVENTS as f64).then_some(dropped)
            },
        )
        .await;
    let from_excluded = upstream
        .delivered_events()
        .iter()
        .filter(|e| e["k8snamespace"] == EXCLUDED_NAMESPACE)
        .count();
    assert_eq!(
        from_excluded, 0,
        "events of the excluded namespace reached the upstream"
    );

    // The chart's PodMonitors, as the Prometheus Operator would use them: each selects pods in any namespace by its
    // labels and scrapes the container port its endpoint names. They find both collector pods and the injected app
    // (not the excluded one), and every target serves Tally's metrics.
    let monitors = helm
        .template(
            &chart_dir(),
            "tally",
            RELEASE_NAMESPACE,
            &[&chart_dir().join("ci").join("servicemonitor-values.yaml")],
        )
        .unwrap_or_else(|e| panic!("helm template: {e}"));
    let all_pods = Api::<Pod>::all(client.clone());
    // The pods each PodMonitor must select, and the events each of them has received at least: a
    // collector may have taken none of them (the sidecar keeps its connection to one replica).
    for (monitor, expected, received) in [
        (
            "tally-operator-collectors",
            vec![
                format!("{RELEASE_NAMESPACE}/meter-0"),
                format!("{RELEASE_NAMESPACE}/meter-1"),
            ],
            0,
        ),
        (
            "tally-operator-sidecars",
            vec![format!("{APP_NAMESPACE}/{app_name}")],
            APP_EVENTS,
        ),
    ] {
        let spec = &monitors
            .get("PodMonitor", monitor)
            .unwrap_or_else(|| panic!("podMonitor.enabled renders no PodMonitor {monitor}"))
            .data["spec"];
        assert_eq!(spec["namespaceSelector"]["any"], true, "{monitor}");
        let selector = spec["selector"]["matchLabels"]
            .as_object()
            .unwrap_or_else(|| panic!("{monitor} has no matchLabels"))
            .iter()
            .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
            .collect::<Vec<_>>()
            .join(",");
        let endpoint = &spec["podMetricsEndpoints"][0];
        let port_name = endpoint["port"].as_str().unwrap_or_default();
        let selected = all_pods
            .list(&ListParams::default().labels(&selector))
            .await
            .unwrap_or_else(|e| panic!("listing the pods {monitor} selects ({selector}): {e}"));
        let mut found: Vec<String> = selected
            .items
            .iter()
            .map(|p| format!("{}/{}", p.namespace().unwrap_or_default(), p.name_any()))
            .collect();
        found.sort();
        assert_eq!(found, expected, "the pods {monitor} selects by {selector}");
        for pod in &selected.items {
            let spec = pod.spec.clone().unwrap_or_default();
            let port = spec
                .containers
                .iter()
                .chain(spec.init_containers.iter().flatten())
                .flat_map(|c| c.ports.iter().flatten())
                .find(|p| p.name.as_deref() == Some(port_name))
                .unwrap_or_else(|| {
                    panic!(
                        "{monitor}: pod {} has no port named {port_name}",
                        pod.name_any()
                    )
                })
                .container_port;
            let ip = pod
                .status
                .as_ref()
                .and_then(|s| s.pod_ip.clone())
                .unwrap_or_default();
            let path = endpoint["path"].as_str().unwrap_or_default();
            let text = reqwest::get(format!("http://{ip}:{port}{path}"))
                .await
                .and_then(reqwest::Response::error_for_status)
                .unwrap_or_else(|e| panic!("{monitor}: scraping {}: {e}", pod.name_any()))
                .text()
                .await
                .unwrap_or_else(|e| panic!("{monitor}: scraping {}: {e}", pod.name_any()));
            let exposition = Exposition::parse(&text);
            assert!(
                exposition.exposes("tally_events_received_total"),
                "{monitor}: pod {} serves no Tally metrics at {path}:\n{text}",
                pod.name_any()
            );
            assert!(
                exposition.value("tally_events_received_total") >= received as f64,
                "{monitor}: pod {} counts fewer than {received} received events",
                pod.name_any()
            );
        }
    }

    let phases = Api::<Pod>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map(|list| {
            list.items
                .iter()
                .map(|p| {
                    format!(
                        "{}/{}={}",
                        p.namespace().unwrap_or_default(),
                        p.name_any(),
                        p.status
                            .as_ref()
                            .and_then(|s| s.phase.clone())
                            .unwrap_or_default()
                    )
                })
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    eprintln!(
        "real node: pods {phases:?}; checkout acknowledged {APP_EVENTS}, delivered {} distinct ({} requests); \
         excluded sent {EXCLUDED_EVENTS}, dropped {dropped}, delivered 0",
        upstream.delivered_id_set().len(),
        upstream.request_count()
    );
}

fn collectors_api(client: &Client) -> Api<DynamicObject> {
    let resource = kube::api::ApiResource {
        group: "metering.tally.dev".into(),
        version: "v1alpha1".into(),
        api_version: "metering.tally.dev/v1alpha1".into(),
        kind: "MeteringCollector".into(),
        plural: "meteringcollectors".into(),
    };
    Api::namespaced_with(client.clone(), RELEASE_NAMESPACE, &resource)
}

/// Waits like `tally_tests::poll_until` (every [`API_INTERVAL`]: every check is an API call), and on a timeout prints what the cluster looked like first: every pod's phase and
/// container states, and the node's logs.
struct Report<'a> {
    client: Client,
    node: &'a RealNode,
}

impl Report<'_> {
    async fn until<T>(&self, what: &str, check: impl AsyncFnMut() -> Option<T>) -> T {
        match poll(WITHIN, API_INTERVAL, check).await {
            Ok(value) => value,
            Err(()) => {
                self.print().await;
                panic!("timed out after {WITHIN:?} waiting for {what}");
            }
        }
    }

    async fn print(&self) {
        if let Ok(pods) = Api::<Pod>::all(self.client.clone())
            .list(&ListParams::default())
            .await
        {
            for pod in pods.items {
                eprintln!(
                    "pod {}/{}: {}",
                    pod.namespace().unwrap_or_default(),
                    pod.name_any(),
                    serde_json::to_string(&pod.status).unwrap_or_default()
                );
            }
        }
        eprintln!("{}", self.node.log_summary(30));
    }
}
