//! The demo on a real node: nothing is run by hand. containerd runs every pod from the images of `make images`;
//! the kubelet's probes make them Ready; the app is a container that sends through its injected sidecar, which
//! forwards to the collector's Service by its DNS name.

use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use k8s_openapi::api::{
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
    Apply, ControlPlane, apply,
    workload::{
        USAGE_APP_IMAGE, create_metered_namespace, deploy_usage_app, pod_logs, running_pod,
    },
};
use tally_tests::{TestUpstream, metrics::Exposition};

use super::{
    APP_NAMESPACE, EVENTS_PER_SECOND, EXAMPLE, EXCLUDED_NAMESPACE, RELEASE_NAMESPACE, WITHIN,
    collector_status, indent, install_chart, interesting, step, wait_for,
};

/// The buffer volumes made for the example's two collector replicas (the node has no provisioner).
const COLLECTOR_REPLICAS: usize = 2;

pub async fn demo(seconds: u64) -> anyhow::Result<()> {
    step(
        "Starting a local Kubernetes control plane and a real node (containerd, kubelet, kube-proxy, CNI bridge, \
         CoreDNS) in a network namespace of its own",
    );
    let control_plane = ControlPlane::builder().with_real_node().start().await?;
    let node = control_plane
        .real_node()
        .ok_or_else(|| anyhow!("the control plane started without its node"))?;
    let client = control_plane.client();
    println!("    API server {}", control_plane.server_url());
    println!(
        "    kubeconfig {}",
        control_plane.kubeconfig_path().display()
    );
    println!("    node logs and configs in {}", node.dir().display());

    step("Importing the images of `make images` into containerd, and the demo app's");
    let images = std::env::var_os("TALLY_IMAGES_DIR")
        .map(std::path::PathBuf::from)
        .ok_or_else(|| anyhow!("TALLY_IMAGES_DIR is not set; run `make demo`"))?;
    for name in ["tally-sidecar", "tally-operator"] {
        let archive = images.join(format!("{name}-{}.tar", env!("CARGO_PKG_VERSION")));
        node.import_image(&archive)
            .with_context(|| format!("{} (run `make images`)", archive.display()))?;
        println!("    {}", archive.display());
    }
    let app = std::env::current_exe()
        .context("locating tally-demo")?
        .with_file_name("tally-usage-app");
    node.import_binary(&app, USAGE_APP_IMAGE)?;
    println!("    {USAGE_APP_IMAGE} (from {})", app.display());

    step("helm install tally charts/tally --namespace tally-system --create-namespace");
    install_chart(&control_plane)?;
    let deployments = Api::<Deployment>::namespaced(client.clone(), RELEASE_NAMESPACE);
    wait_for("both operator replicas Ready", || async {
        let d = deployments.get_opt("tally-operator").await.ok()??;
        (d.status?.ready_replicas? == 2).then_some(())
    })
    .await?;
    let leases = Api::<Lease>::namespaced(client.clone(), RELEASE_NAMESPACE);
    let holder = wait_for("an operator replica to hold the Lease", || async {
        leases
            .get_opt("tally-operator")
            .await
            .ok()??
            .spec?
            .holder_identity
    })
    .await?;
    println!("    tally-operator: 2 of 2 pods Ready; the leader is {holder}");

    step(
        "Applying the README's MeteringCollector (config/meteringcollector.yaml), its output pointed at a local \
         OpenMeter-compatible upstream and its node agent's directory inside the node's",
    );
    let upstream = TestUpstream::start_on(node.host_ip().into()).await;
    println!("    upstream recording events at {}", upstream.url());
    control_plane
        .create_host_path_volumes("tally-demo-buffer", "", COLLECTOR_REPLICAS, "5Gi")
        .await?;
    Api::<Secret>::namespaced(client.clone(), RELEASE_NAMESPACE)
        .patch(
            "openmeter",
            &PatchParams::apply("tally-demo").force(),
            &Patch::Apply(json!({
                "apiVersion": "v1", "kind": "Secret",
                "metadata": { "name": "openmeter" },
                "stringData": { "token": "demo-token" }
            })),
        )
        .await
        .context("creating the Secret openmeter")?;
    let mut collector: DynamicObject =
        serde_yaml::from_str(EXAMPLE).context("config/meteringcollector.yaml is not an object")?;
    let target = collector.data["spec"]["pipeline"]["outputs"]["targets"]
        .get_mut(0)
        .ok_or_else(|| anyhow!("the example has no output target"))?;
    target["url"] = json!(upstream.url());
    // The node agent buffers in the demo node's directory, not in the host's /var/lib/tally.
    collector.data["spec"]["nodeAgent"]["hostPath"] =
        json!(node.dir().join("node-agent").display().to_string());
    apply(&client, &collector, Apply::Persist).await?;
    let status = wait_for(
        "the collector Ready from the kubelet's readiness probes",
        || async {
            let status = collector_status(&client).await?;
            let ready = status["conditions"]
                .as_array()?
                .iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True");
            ready.then_some(status)
        },
    )
    .await?;
    println!("    MeteringCollector tally-system/meter status:");
    println!("{}", indent(&serde_yaml::to_string(&status)?));

    step(
        "Namespaces shop and monitoring (excluded), labelled for injection under the restricted Pod Security \
         Standard; the usage app deployed in each",
    );
    for namespace in [APP_NAMESPACE, EXCLUDED_NAMESPACE] {
        create_metered_namespace(&client, namespace).await?;
    }
    let events = seconds * EVENTS_PER_SECOND;
    let excluded_events = seconds;
    deploy_usage_app(
        &client,
        APP_NAMESPACE,
        "checkout",
        &[
            ("EVENTS", events.to_string()),
            ("RATE", EVENTS_PER_SECOND.to_string()),
        ],
    )
    .await?;
    // Not injected (excluded), so it sends straight to the collector's Service, stamping its namespace itself:
    // what a metering loop would look like. The collectors drop and count these.
    deploy_usage_app(
        &client,
        EXCLUDED_NAMESPACE,
        "prometheus",
        &[
            ("EVENTS", excluded_events.to_string()),
            ("RATE", "1".into()),
            (
                "OPENMETER_URL",
                format!(
                    "http://meter.{RELEASE_NAMESPACE}.svc.{}:4196",
                    tally_e2e::CLUSTER_DOMAIN
                ),
            ),
            ("STAMP_NAMESPACE", EXCLUDED_NAMESPACE.into()),
        ],
    )
    .await?;
    let pod = wait_for(
        "the checkout pod Running with both containers ready",
        || running_pod(&client, APP_NAMESPACE),
    )
    .await?;
    let excluded = wait_for("the prometheus pod Running", || {
        running_pod(&client, EXCLUDED_NAMESPACE)
    })
    .await?;
    let spec = pod.spec.clone().unwrap_or_default();
    let shown = json!({
        "initContainers": spec.init_containers.iter().flatten().map(|c| json!({
            "name": c.name, "image": c.image, "restartPolicy": c.restart_policy,
            "securityContext": c.security_context,
        })).collect::<Vec<_>>(),
        "containers": spec.containers.iter().map(|c| json!({ "name": c.name, "env": c.env })).collect::<Vec<_>>(),
    });
    println!(
        "    shop/{} runs, injected (restricted namespace):",
        pod.name_any()
    );
    println!("{}", indent(&serde_yaml::to_string(&shown)?));
    println!(
        "    monitoring/{} runs, not injected (excluded)",
        excluded.name_any()
    );

    step(&format!(
        "The app container sends {events} usage events to OPENMETER_URL ({EVENTS_PER_SECOND}/s, each retried \
         until acknowledged)"
    ));
    let started = Instant::now();
    let name = pod.name_any();
    let done = format!("done: acknowledged {events} events");
    let mut last_report = Instant::now();
    loop {
        let logs = pod_logs(&client, APP_NAMESPACE, &name, "app")
            .await
            .unwrap_or_default();
        if logs.contains(&done) {
            break;
        }
        if last_report.elapsed() >= Duration::from_secs(10) {
            let acknowledged = logs
                .lines()
                .filter_map(|l| l.strip_prefix("acknowledged "))
                .next_back()
                .unwrap_or("0");
            println!(
                "    {} s: {acknowledged} acknowledged",
                started.elapsed().as_secs()
            );
            last_report = Instant::now();
        }
        if started.elapsed() > Duration::from_secs(seconds) + WITHIN {
            bail!("the app did not get its {events} events acknowledged; its log:\n{logs}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    println!("    {events} events acknowledged by the injected sidecar (each 204 after an fsync)");

    step("What happened");
    let ids: Vec<String> = (0..events).map(|n| format!("{name}-{n}")).collect();
    upstream
        .wait_delivered(ids.iter().map(String::as_str), WITHIN)
        .await;
    let delivered = upstream.delivered_events();
    let from_excluded = delivered
        .iter()
        .filter(|e| e["k8snamespace"] == EXCLUDED_NAMESPACE)
        .count();
    let unique: std::collections::HashSet<&str> =
        delivered.iter().filter_map(|e| e["id"].as_str()).collect();
    let pods = Api::<Pod>::namespaced(client.clone(), RELEASE_NAMESPACE);
    let collector_metrics = async || {
        let mut texts = Vec::new();
        for replica in 0..COLLECTOR_REPLICAS {
            let name = format!("meter-{replica}");
            let ip = pods.get(&name).await.ok()?.status?.pod_ip?;
            texts.push((name, get(&format!("http://{ip}:4196/metrics")).await?));
        }
        Some(texts)
    };
    let dropped = wait_for(
        "the collectors to drop the excluded namespace's events",
        || async {
            let dropped: f64 = collector_metrics()
                .await?
                .iter()
                .map(|(_, text)| {
                    Exposition::parse(text)
                        .value("tally_events_dropped_total{reason=\"excluded_namespace\"}")
                })
                .sum();
            (dropped >= excluded_events as f64).then_some(dropped)
        },
    )
    .await?;
    println!(
        "    checkout: acknowledged {events}, delivered upstream {} distinct ({} requests)",
        unique.len(),
        upstream.request_count()
    );
    println!(
        "    monitoring (excluded): sent {excluded_events}, dropped by the collectors {dropped}, delivered upstream \
         {from_excluded}"
    );
    if let Some(sample) = delivered.first() {
        println!("    a delivered event, stamped by the sidecar:\n      {sample}");
    }
    let all_pods = Api::<Pod>::all(client.clone())
        .list(&ListParams::default())
        .await?;
    println!("    pods on node {}:", node.name());
    for p in &all_pods.items {
        let status = p.status.clone().unwrap_or_default();
        let restarts: i32 = status
            .container_statuses
            .iter()
            .flatten()
            .map(|c| c.restart_count)
            .sum();
        println!(
            "      {}/{}: {}, ip {}, restarts {restarts}",
            p.namespace().unwrap_or_default(),
            p.name_any(),
            status.phase.unwrap_or_default(),
            status.pod_ip.unwrap_or_default()
        );
    }
    let pod_ip = pods_ip(&client, APP_NAMESPACE, &name).await?;
    let sidecar_metrics = get(&format!("http://{pod_ip}:4196/metrics"))
        .await
        .unwrap_or_default();
    let mut shown = vec![("tally-sidecar (checkout pod)".to_string(), sidecar_metrics)];
    shown.extend(collector_metrics().await.unwrap_or_default());
    for (name, exposition) in shown {
        println!("    {name} metrics:");
        for line in exposition.lines().filter(|l| interesting(l)) {
            println!("      {line}");
        }
    }
    if unique.len() < ids.len() || from_excluded != 0 {
        bail!(
            "the upstream received {} distinct events, {from_excluded} of them from the excluded namespace; \
             expected the {} acknowledged checkout events",
            unique.len(),
            ids.len()
        );
    }
    step("Done: every acknowledged event was delivered; stopping the node and the control plane");
    Ok(())
}

async fn pods_ip(client: &Client, namespace: &str, name: &str) -> anyhow::Result<String> {
    Api::<Pod>::namespaced(client.clone(), namespace)
        .get(name)
        .await?
        .status
        .and_then(|s| s.pod_ip)
        .ok_or_else(|| anyhow!("{namespace}/{name} has no IP"))
}

async fn get(url: &str) -> Option<String> {
    reqwest::get(url).await.ok()?.text().await.ok()
}
