//! `make demo`: Tally end to end on this machine, with real parts and no cluster.
//!
//! It starts the local control plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler, and kwok
//! playing two nodes, so pods are scheduled and reported Running and Ready), installs the Helm chart with
//! `helm install`, runs tally-operator against it out of cluster (the webhook registered at 127.0.0.1, with the
//! admin credentials), applies the README's `MeteringCollector`, labels a namespace and creates a workload there.
//! The real ReplicaSet controller creates its pod and the operator's webhook injects tally-sidecar. kwok only
//! pretends to run pods, so the demo then runs the processes those pods would run: the collector with the
//! configuration in the operator's ConfigMap, the injected sidecar with the configuration in the pod spec, and an
//! app that sends usage events to `OPENMETER_URL` for a minute. Only addresses and paths a kubelet would provide
//! are replaced (ports on 127.0.0.1, the data directories, the mounted Secret, the collector Service's address),
//! and the OpenMeter URL points at a local OpenMeter-compatible upstream that records what it receives.
//! Everything it started stops when it exits.
//!
//! That is the fallback. Where the machine can run containers (root, Debian's containerd; see
//! `tally_e2e::RealNode::check_host`), everything runs for real instead ([`real::demo`]): a real node next to the
//! control plane, the chart installed from the images of `make images`, the operator in-cluster, the collector's
//! and the workload's pods run by containerd, the app a container that sends through the injected sidecar.
//!
//! `TALLY_DEMO_SECONDS` sets how long the app sends (default 60).

mod real;

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, PersistentVolume, Pod, Secret};
use kube::api::{DynamicObject, ListParams, Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};
use tally_e2e::{Apply, ControlPlane, Helm, Manifests, RealNode, apply, chart_dir};
use tally_tests::metrics::Exposition;
use tally_tests::poll::{API_INTERVAL, poll};
use tally_tests::ports::unused_port;
use tally_tests::{SidecarBuilder, TestUpstream};

const RELEASE_NAMESPACE: &str = "tally-system";
const APP_NAMESPACE: &str = "shop";
const EXCLUDED_NAMESPACE: &str = "monitoring";
const WITHIN: Duration = Duration::from_secs(120);
const EVENTS_PER_SECOND: u64 = 20;
/// kwok's fake nodes; also the number of buffer volumes made for the example's 2 collector replicas.
const FAKE_NODES: usize = 2;
/// The README's example, applied as is.
const EXAMPLE: &str = include_str!("../../../../config/meteringcollector.yaml");

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    match demo().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("\ndemo failed: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn step(text: &str) {
    println!("\n==> {text}");
}

async fn demo() -> anyhow::Result<()> {
    let seconds: u64 = match std::env::var("TALLY_DEMO_SECONDS") {
        Ok(text) => text
            .parse()
            .with_context(|| format!("TALLY_DEMO_SECONDS={text:?} is not a number of seconds"))?,
        Err(_) => 60,
    };
    match RealNode::check_host() {
        Ok(()) => real::demo(seconds).await,
        Err(why) => {
            println!(
                "This machine cannot run containers, so the demo runs on fake nodes and runs the pods' processes \
                 itself.\n    Why: {why}"
            );
            demo_on_fake_nodes(seconds).await
        }
    }
}

/// The demo where kwok plays the nodes: the pods' processes run here, as the module docs describe.
async fn demo_on_fake_nodes(seconds: u64) -> anyhow::Result<()> {
    step(
        "Starting a local Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler, \
         kwok playing 2 nodes)",
    );
    let control_plane = ControlPlane::builder()
        .with_fake_nodes(FAKE_NODES)
        .start()
        .await?;
    let client = control_plane.client();
    // What a cloud's volume provisioner would do: one volume per collector replica for its buffer claim.
    for replica in 0..FAKE_NODES {
        create_volume(&client, &format!("tally-demo-buffer-{replica}")).await?;
    }
    println!("    API server {}", control_plane.server_url());
    println!(
        "    kubeconfig {}",
        control_plane.kubeconfig_path().display()
    );

    step(
        "Installing the Helm chart charts/tally into tally-system (helm install, Helm built from its Go module)",
    );
    create_namespace(&client, RELEASE_NAMESPACE, &[]).await?;
    install_chart(&control_plane)?;

    step(
        "Running tally-operator out of cluster, as the chart's Deployment would (kwok only pretends to run its pods)",
    );
    let operator = Operator::start(&control_plane).await?;
    println!(
        "    metrics on {}/metrics, webhook at {}",
        operator.http, operator.webhook_url
    );

    step(
        "Applying the README's MeteringCollector (config/meteringcollector.yaml) and its token Secret",
    );
    let secrets = Api::<Secret>::namespaced(client.clone(), RELEASE_NAMESPACE);
    secrets
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
    let collector: DynamicObject =
        serde_yaml::from_str(EXAMPLE).context("config/meteringcollector.yaml is not an object")?;
    apply(&client, &collector, Apply::Persist).await?;
    let status = wait_for("the collector's status", || collector_status(&client)).await?;
    println!("    status right after the first reconcile:");
    println!("{}", indent(&serde_yaml::to_string(&status)?));
    let stateful_sets = Api::<StatefulSet>::namespaced(client.clone(), RELEASE_NAMESPACE);
    let stateful_set = stateful_sets
        .get("meter")
        .await
        .context("the StatefulSet meter")?;
    println!(
        "    StatefulSet meter: {} replicas, claims {:?}",
        stateful_set.spec.replicas.unwrap_or(0),
        stateful_set
            .spec
            .volume_claim_templates
            .iter()
            .flatten()
            .map(|c| c.name_any())
            .collect::<Vec<_>>()
    );

    step("Waiting for the operator's MutatingWebhookConfiguration and its CA bundle");
    let configurations = Api::<MutatingWebhookConfiguration>::all(client.clone());
    wait_for("the webhook configuration with a caBundle", || async {
        let configuration = configurations.get_opt("tally-operator").await.ok()??;
        let webhooks = configuration.webhooks?;
        webhooks
            .iter()
            .all(|w| w.client_config.ca_bundle.is_some())
            .then_some(())
    })
    .await?;
    operator.wait_webhook_serving().await?;

    step("Labelling namespaces shop and monitoring (excluded) and deploying a workload in each");
    let inject = [("metering.tally.dev/inject", "enabled")];
    create_namespace(&client, APP_NAMESPACE, &inject).await?;
    create_namespace(&client, EXCLUDED_NAMESPACE, &inject).await?;
    deploy(&client, APP_NAMESPACE, "checkout").await?;
    deploy(&client, EXCLUDED_NAMESPACE, "prometheus").await?;
    let pod = wait_for("the checkout pod made by the ReplicaSet controller", || {
        first_pod(&client, APP_NAMESPACE)
    })
    .await?;
    let excluded_pod = wait_for("the prometheus pod", || {
        first_pod(&client, EXCLUDED_NAMESPACE)
    })
    .await?;
    println!(
        "    shop/{}: the injected pod spec (what the webhook added):",
        pod.name_any()
    );
    let spec = pod
        .spec
        .clone()
        .ok_or_else(|| anyhow!("the pod has no spec"))?;
    let shown = json!({
        "metadata": { "annotations": pod.annotations() },
        "spec": {
            "initContainers": spec.init_containers,
            "containers": spec.containers.iter().map(|c| json!({ "name": c.name, "env": c.env })).collect::<Vec<_>>(),
            "volumes": spec.volumes.iter().flatten().filter(|v| v.name.starts_with("tally")).collect::<Vec<_>>(),
        }
    });
    println!("{}", indent(&serde_yaml::to_string(&shown)?));
    let excluded_spec = excluded_pod.spec.clone().unwrap_or_default();
    println!(
        "    monitoring/{}: init containers {:?} (excluded namespace: not injected)",
        excluded_pod.name_any(),
        excluded_spec
            .init_containers
            .iter()
            .flatten()
            .map(|c| c.name.clone())
            .collect::<Vec<_>>()
    );
    let sidecar_yaml = injected_config(&pod)?;

    step(
        "Running the pods' processes: upstream <- collector meter-0 <- tally-sidecar of the checkout pod <- app",
    );
    let upstream = TestUpstream::start().await;
    println!(
        "    OpenMeter-compatible upstream recording events at {}",
        upstream.url()
    );
    let config_maps = Api::<ConfigMap>::namespaced(client.clone(), RELEASE_NAMESPACE);
    let rendered = config_maps
        .get("meter-config")
        .await
        .context("the ConfigMap meter-config")?
        .data
        .and_then(|d| d.get("config.yaml").cloned())
        .ok_or_else(|| anyhow!("the ConfigMap meter-config has no config.yaml"))?;
    let token_dir = tempfile::tempdir().context("a directory for the mounted Secret")?;
    let token_file = token_dir.path().join("token");
    std::fs::write(&token_file, "demo-token").context("writing the mounted Secret")?;
    let token_path = token_file.display().to_string();
    let upstream_url = upstream.url();
    let collector_yaml = localise(
        &rendered,
        &[("openmeter", &upstream_url)],
        &[("/var/run/secrets/tally/openmeter/token", &token_path)],
    )?;
    let collector = SidecarBuilder::yaml(&collector_yaml).start().await;
    println!(
        "    collector meter-0 listening on {} (config from ConfigMap meter-config)",
        collector.url()
    );
    let sidecar_yaml = localise(&sidecar_yaml, &[("collector", &collector.url())], &[])?;
    let sidecar = SidecarBuilder::yaml(&sidecar_yaml)
        .inline_config()
        .env("POD_NAME", &pod.name_any())
        .env("POD_NAMESPACE", APP_NAMESPACE)
        .start()
        .await;
    println!(
        "    tally-sidecar listening on {} (config from the pod's TALLY_CONFIG_YAML)",
        sidecar.url()
    );
    // A process in the excluded namespace sending straight to the collector: what a loop would look like.
    let excluded_sidecar = SidecarBuilder::yaml(&sidecar_yaml)
        .inline_config()
        .env("POD_NAME", &excluded_pod.name_any())
        .env("POD_NAMESPACE", EXCLUDED_NAMESPACE)
        .start()
        .await;

    step(&format!(
        "The app sends usage events to OPENMETER_URL for {seconds} s ({EVENTS_PER_SECOND}/s)"
    ));
    let http = reqwest::Client::new();
    let started = Instant::now();
    let mut sent = Vec::new();
    let mut excluded_sent = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(1000 / EVENTS_PER_SECOND));
    while started.elapsed() < Duration::from_secs(seconds) {
        tick.tick().await;
        let n = sent.len();
        let id = format!("checkout-{n}");
        post(&http, &sidecar.events_url(), &usage_event(&id, n)).await?;
        sent.push(id);
        if n.is_multiple_of(10) {
            let id = format!("prometheus-{n}");
            post(&http, &excluded_sidecar.events_url(), &usage_event(&id, n)).await?;
            excluded_sent += 1;
        }
        if n > 0 && (n as u64).is_multiple_of(EVENTS_PER_SECOND * 10) {
            println!(
                "    {} s: {n} events acknowledged",
                started.elapsed().as_secs()
            );
        }
    }
    println!(
        "    {} events acknowledged by the sidecar (each 204 after an fsync)",
        sent.len()
    );

    step("What happened");
    upstream
        .wait_delivered(sent.iter().map(String::as_str), WITHIN)
        .await;
    let delivered = upstream.delivered_events();
    let unique: std::collections::HashSet<&str> =
        delivered.iter().filter_map(|e| e["id"].as_str()).collect();
    let from_excluded = delivered
        .iter()
        .filter(|e| e["k8snamespace"] == EXCLUDED_NAMESPACE)
        .count();
    let dropped_series = "tally_events_dropped_total{reason=\"excluded_namespace\"}";
    let dropped = wait_for(
        "the collector to drop the excluded namespace's events",
        || async {
            let exposition = collector.get("/metrics").await.text().await.ok()?;
            let dropped = Exposition::parse(&exposition).value(dropped_series);
            (dropped >= excluded_sent as f64).then_some(dropped)
        },
    )
    .await?;
    println!(
        "    checkout: sent {}, acknowledged {} (every one answered 204 after its fsync), delivered upstream {} ({} requests)",
        sent.len(),
        sent.len(),
        unique.len(),
        upstream.request_count()
    );
    println!(
        "    monitoring (excluded): sent {excluded_sent}, dropped by the collector {dropped}, delivered upstream {from_excluded}"
    );
    if let Some(sample) = delivered.first() {
        println!("    a delivered event, stamped by the sidecar:\n      {sample}");
    }
    let status = wait_for("the collector to be Ready on the fake nodes", || async {
        let status = collector_status(&client).await?;
        let ready = status["conditions"]
            .as_array()?
            .iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True");
        ready.then_some(status)
    })
    .await?;
    println!(
        "    MeteringCollector tally-system/meter status (its pods run on kwok's fake nodes, their processes here):"
    );
    println!("{}", indent(&serde_yaml::to_string(&status)?));
    for (name, exposition) in [
        (
            "tally-sidecar (checkout pod)",
            sidecar.get("/metrics").await.text().await?,
        ),
        (
            "collector meter-0",
            collector.get("/metrics").await.text().await?,
        ),
        ("tally-operator", operator.metrics().await?),
    ] {
        println!("    {name} metrics:");
        for line in exposition.lines().filter(|l| interesting(l)) {
            println!("      {line}");
        }
    }
    if unique.len() != sent.len() || from_excluded != 0 {
        bail!(
            "the upstream received {} distinct events, {from_excluded} of them from the excluded namespace; \
             expected exactly the {} acknowledged checkout events",
            unique.len(),
            sent.len()
        );
    }
    step("Done: every acknowledged event was delivered; stopping everything the demo started");
    Ok(())
}

/// `helm install tally charts/tally` into [`RELEASE_NAMESPACE`], then prints what the release holds.
fn install_chart(control_plane: &ControlPlane) -> anyhow::Result<()> {
    let helm = Helm::locate()?;
    let kubeconfig = control_plane.kubeconfig_path().as_os_str();
    helm.install(
        &chart_dir(),
        "tally",
        RELEASE_NAMESPACE,
        control_plane.kubeconfig_path(),
    )?;
    let manifest = helm.run([
        "get".as_ref(),
        "manifest".as_ref(),
        "tally".as_ref(),
        "--namespace".as_ref(),
        RELEASE_NAMESPACE.as_ref(),
        "--kubeconfig".as_ref(),
        kubeconfig,
    ])?;
    let installed = Manifests::parse(&manifest).context("the release's manifest")?;
    for object in installed.objects() {
        let kind = object
            .types
            .as_ref()
            .map(|t| t.kind.as_str())
            .unwrap_or("?");
        println!("    {kind}/{}", object.name_any());
    }
    Ok(())
}

/// Metric lines worth printing: non-zero samples of the event path, not histogram buckets.
fn interesting(line: &str) -> bool {
    if line.starts_with('#') || line.contains("_bucket{") {
        return false;
    }
    let keep = [
        "tally_events_",
        "tally_output_events_sent_total",
        "tally_output_lag_events",
        "tally_buffer_events",
        "tally_operator_reconciliations_total",
        "tally_operator_admissions_total",
        "tally_operator_leader",
        "tally_operator_collectors",
        "tally_operator_webhook_certificate_expiry",
    ];
    keep.iter().any(|k| line.starts_with(k)) && !line.ends_with(" 0")
}

fn indent(text: &str) -> String {
    text.lines()
        .map(|l| format!("      {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn usage_event(id: &str, n: usize) -> Value {
    json!({
        "specversion": "1.0",
        "id": id,
        "source": "checkout",
        "type": "api-calls",
        "subject": format!("customer-{}", n % 5),
        "time": "2026-11-21T12:00:00Z",
        "data": { "calls": 1, "route": "/api/checkout", "durationMs": 12 + (n % 40) }
    })
}

async fn post(http: &reqwest::Client, url: &str, event: &Value) -> anyhow::Result<()> {
    let response = http
        .post(url)
        .header("content-type", "application/cloudevents+json")
        .body(event.to_string())
        .send()
        .await
        .with_context(|| format!("sending to {url}"))?;
    if response.status() != 204 {
        bail!(
            "{url} answered {}: {}",
            response.status(),
            response.text().await.unwrap_or_default()
        );
    }
    Ok(())
}

/// The configuration the injector put into the pod's `tally-sidecar` container.
fn injected_config(pod: &Pod) -> anyhow::Result<String> {
    let spec = pod
        .spec
        .as_ref()
        .ok_or_else(|| anyhow!("the pod has no spec"))?;
    let sidecar = spec
        .init_containers
        .iter()
        .flatten()
        .find(|c| c.name == "tally-sidecar")
        .ok_or_else(|| {
            anyhow!(
                "the pod {} was not injected: no tally-sidecar init container",
                pod.name_any()
            )
        })?;
    sidecar
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "TALLY_CONFIG_YAML")
        .and_then(|e| e.value.clone())
        .ok_or_else(|| anyhow!("the injected sidecar has no TALLY_CONFIG_YAML"))
}

/// [`tally_tests::pod::localise`], printing what it replaced.
fn localise(yaml: &str, urls: &[(&str, &str)], files: &[(&str, &str)]) -> anyhow::Result<String> {
    let (text, replaced) = tally_tests::pod::localise(yaml, urls, files).map_err(|e| anyhow!(e))?;
    for line in replaced {
        println!("      {line}");
    }
    Ok(text)
}

async fn collector_status(client: &Client) -> Option<Value> {
    let api = Api::<DynamicObject>::namespaced_with(
        client.clone(),
        RELEASE_NAMESPACE,
        &kube::discovery::ApiResource::from_gvk_with_plural(
            &kube::api::GroupVersionKind::gvk(
                "metering.tally.dev",
                "v1alpha1",
                "MeteringCollector",
            ),
            "meteringcollectors",
        ),
    );
    let object = api.get("meter").await.ok()?;
    let status = object.data.get("status")?.clone();
    status.get("observedGeneration")?;
    Some(status)
}

async fn create_volume(client: &Client, name: &str) -> anyhow::Result<()> {
    Api::<PersistentVolume>::all(client.clone())
        .patch(
            name,
            &PatchParams::apply("tally-demo").force(),
            &Patch::Apply(json!({
                "apiVersion": "v1", "kind": "PersistentVolume",
                "metadata": { "name": name },
                "spec": {
                    "capacity": { "storage": "10Gi" },
                    "accessModes": ["ReadWriteOnce"],
                    "persistentVolumeReclaimPolicy": "Retain",
                    "hostPath": { "path": format!("/tmp/{name}") }
                }
            })),
        )
        .await
        .with_context(|| format!("creating the PersistentVolume {name}"))?;
    Ok(())
}

async fn create_namespace(
    client: &Client,
    name: &str,
    labels: &[(&str, &str)],
) -> anyhow::Result<()> {
    let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
    Api::<Namespace>::all(client.clone())
        .patch(
            name,
            &PatchParams::apply("tally-demo").force(),
            &Patch::Apply(json!({
                "apiVersion": "v1", "kind": "Namespace",
                "metadata": { "name": name, "labels": labels }
            })),
        )
        .await
        .with_context(|| format!("creating the namespace {name}"))?;
    Ok(())
}

async fn deploy(client: &Client, namespace: &str, name: &str) -> anyhow::Result<()> {
    Api::<Deployment>::namespaced(client.clone(), namespace)
        .patch(
            name,
            &PatchParams::apply("tally-demo").force(),
            &Patch::Apply(json!({
                "apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": { "name": name },
                "spec": {
                    "replicas": 1,
                    "selector": { "matchLabels": { "app": name } },
                    "template": {
                        "metadata": { "labels": { "app": name } },
                        "spec": { "containers": [{ "name": "app", "image": format!("registry.example/{name}:1") }] }
                    }
                }
            })),
        )
        .await
        .with_context(|| format!("creating the Deployment {namespace}/{name}"))?;
    Ok(())
}

async fn first_pod(client: &Client, namespace: &str) -> Option<Pod> {
    Api::<Pod>::namespaced(client.clone(), namespace)
        .list(&ListParams::default())
        .await
        .ok()?
        .items
        .into_iter()
        .next()
}

/// Polls `check` until it returns `Some`, for at most [`WITHIN`].
async fn wait_for<T>(what: &str, check: impl AsyncFnMut() -> Option<T>) -> anyhow::Result<T> {
    poll(WITHIN, API_INTERVAL, check)
        .await
        .map_err(|()| anyhow!("timed out after {WITHIN:?} waiting for {what}"))
}

/// The tally-operator process, killed when dropped.
struct Operator {
    child: tokio::process::Child,
    http: String,
    webhook_url: String,
    webhook_port: u16,
    log: std::path::PathBuf,
}

impl Operator {
    async fn start(control_plane: &ControlPlane) -> anyhow::Result<Self> {
        let binary = std::env::var_os("TALLY_OPERATOR_BIN")
            .map(std::path::PathBuf::from)
            .ok_or_else(|| anyhow!("TALLY_OPERATOR_BIN is not set; run `make demo`"))?;
        let http_port = unused_port();
        let webhook_port = unused_port();
        let webhook_url = format!("https://127.0.0.1:{webhook_port}/mutate");
        let log = control_plane.dir().join("tally-operator.log");
        let file =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = tokio::process::Command::new(&binary)
            .arg("run")
            .args([
                "--namespace",
                RELEASE_NAMESPACE,
                "--identity",
                "tally-operator-demo",
            ])
            .args(["--http", &format!("127.0.0.1:{http_port}")])
            .args(["--webhook-listen", &format!("127.0.0.1:{webhook_port}")])
            .args(["--webhook-url", &webhook_url])
            .env("KUBECONFIG", control_plane.kubeconfig_path())
            .stdout(file.try_clone()?)
            .stderr(file)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        println!("    log {}", log.display());
        Ok(Operator {
            child,
            http: format!("http://127.0.0.1:{http_port}"),
            webhook_url,
            webhook_port,
            log,
        })
    }

    async fn wait_webhook_serving(&self) -> anyhow::Result<()> {
        let port = self.webhook_port;
        wait_for("the webhook port", || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .ok()
                .map(|_| ())
        })
        .await
        .with_context(|| format!("see {}", self.log.display()))
    }

    async fn metrics(&self) -> anyhow::Result<String> {
        Ok(reqwest::get(format!("{}/metrics", self.http))
            .await?
            .text()
            .await?)
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}
