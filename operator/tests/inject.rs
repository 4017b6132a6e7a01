//! The sidecar-injection webhook against a real control plane (tally-e2e): the API server calls the operator's
//! webhook over TLS at `https://127.0.0.1:<port>/mutate`, with the CA the operator generated and published in the
//! MutatingWebhookConfiguration. Pods the real ReplicaSet controller creates come out injected exactly once; pods
//! that are opted out, excluded, Tally's own or not opted in are left alone; a stored collector that does not fit
//! the type does not hide the valid ones; a stopped webhook blocks nothing; certificates rotate without an admission
//! failing; replicas converge on one Secret.
//!
//! Most tests run the webhook in-process (`tally_operator::inject::run`, what `tally-operator run` spawns), so it can
//! be stopped and its certificate lifetime shortened; one runs the real binary and reads its /metrics. Nothing
//! outlives a test: the in-process webhook is aborted and the binary killed on drop.

mod support;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret};
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::json;
use support::{
    RunningController, WITHIN, control_plane_with_crd, create, env, eventually, store_malformed,
};
use tally_e2e::ControlPlane;
use tally_operator::caches;
use tally_operator::crd::MeteringCollector;
use tally_operator::inject::certs;
use tally_operator::inject::config::{CertificateSource, FailurePolicy, INJECT_CA_FROM};
use tally_operator::inject::metrics::{AdmissionLabels, WebhookMetrics};
use tally_operator::inject::{
    self, INJECTED_ANNOTATION, SIDECAR_LABEL, SIDECAR_LABEL_VALUE, SIDECAR_NAME, WebhookArgs,
};
use tally_operator::metrics::Metrics;
use tally_tests::ports::unused_port;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const CONFIGURATION: &str = "tally-operator";
const SECRET: &str = "tally-operator-webhook-tls";
const CA_SECRET: &str = "tally-operator-webhook-ca";
const CERTIFICATE: &str = "tally-operator-webhook";

/// The webhook running in this process, stopped (its server closed) when dropped.
struct Webhook {
    port: u16,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<()>>,
    /// The watch caches the webhook reads the collectors from, as `tally-operator run` starts them.
    caches: JoinHandle<()>,
    metrics: Arc<WebhookMetrics>,
}

impl Webhook {
    /// A replica that holds the leader-election Lease (or runs without election).
    fn start(client: &Client, namespace: &str, cert_validity: Duration) -> Webhook {
        Webhook::start_with(
            client,
            namespace,
            cert_validity,
            tokio::sync::watch::channel(true).1,
        )
    }

    /// A replica whose leadership is `leading`.
    fn start_with(
        client: &Client,
        namespace: &str,
        cert_validity: Duration,
        leading: tokio::sync::watch::Receiver<bool>,
    ) -> Webhook {
        let port = unused_port();
        Webhook::spawn(
            client,
            namespace,
            port,
            webhook_args(port, cert_validity),
            leading,
        )
    }

    /// Runs the webhook in-process with `args`, listening on `port`.
    fn spawn(
        client: &Client,
        namespace: &str,
        port: u16,
        args: WebhookArgs,
        leading: tokio::sync::watch::Receiver<bool>,
    ) -> Webhook {
        let metrics = Arc::new(WebhookMetrics::default());
        let (triggers, _, watches) =
            caches::watch(client, &Metrics::default(), std::future::pending());
        let caches = tokio::spawn(watches);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(inject::run(
            client.clone(),
            triggers.collector_view(),
            namespace.to_string(),
            args,
            metrics.clone(),
            leading,
            async move {
                let _ = stopped.await;
            },
        ));
        Webhook {
            port,
            stop: Some(stop),
            task,
            caches,
            metrics,
        }
    }

    /// Stops the server and waits until it no longer accepts connections.
    async fn stop(mut self) {
        let _ = self.stop.take().map(|stop| stop.send(()));
        let task = std::mem::replace(&mut self.task, tokio::spawn(async { Ok(()) }));
        tokio::time::timeout(WITHIN, task)
            .await
            .expect("the webhook stops on shutdown")
            .expect("webhook task")
            .expect("the webhook ran without error");
    }

    fn admissions(&self, result: &'static str, reason: &'static str) -> u64 {
        self.metrics
            .admissions
            .get_or_create(&AdmissionLabels { result, reason })
            .get()
    }
}

impl Drop for Webhook {
    fn drop(&mut self) {
        self.task.abort();
        self.caches.abort();
    }
}

/// The flags of a webhook the API server reaches at `https://127.0.0.1:<port>/mutate`.
fn webhook_args(port: u16, cert_validity: Duration) -> WebhookArgs {
    WebhookArgs {
        webhook: true,
        webhook_listen: format!("127.0.0.1:{port}").parse().expect("address"),
        webhook_url: Some(format!("https://127.0.0.1:{port}/mutate")),
        webhook_service: "tally-operator-webhook".into(),
        webhook_secret: SECRET.into(),
        webhook_ca_secret: CA_SECRET.into(),
        webhook_configuration: CONFIGURATION.into(),
        failure_policy: FailurePolicy::Ignore,
        webhook_certificates: CertificateSource::Operator,
        webhook_certificate: CERTIFICATE.into(),
        cert_validity,
        exclude_namespaces: vec![],
    }
}

/// A control plane with the CRD, a namespace for the operator (`tally-system…`) and one opted in to injection
/// (`apps…`).
struct Cluster {
    control_plane: ControlPlane,
    client: Client,
    operator_ns: String,
    apps: String,
}

impl Cluster {
    async fn start() -> Cluster {
        let (control_plane, client, operator_ns) = control_plane_with_crd("tally-system").await;
        let apps = control_plane
            .new_namespace("apps")
            .await
            .expect("namespace");
        label_namespace(&client, &apps, "enabled").await;
        Cluster {
            control_plane,
            client,
            operator_ns,
            apps,
        }
    }
}

/// Creates an injection-enabled collector `meter` in `namespace` excluding `exclude`.
async fn create_collector(client: &Client, namespace: &str, exclude: &[&str]) {
    let collector: MeteringCollector = serde_json::from_value(json!({
        "apiVersion": "metering.tally.dev/v1alpha1",
        "kind": "MeteringCollector",
        "metadata": { "name": "meter" },
        "spec": {
            "replicas": 1,
            "image": "registry.invalid/tally-sidecar:1",
            "injection": { "enabled": true, "sidecarImage": "registry.invalid/tally-sidecar:injected" },
            "excludeNamespaces": exclude,
        }
    }))
    .expect("a MeteringCollector");
    let api = Api::<MeteringCollector>::namespaced(client.clone(), namespace);
    create(&api, &collector).await;
}

async fn label_namespace(client: &Client, namespace: &str, value: &str) {
    Api::<Namespace>::all(client.clone())
        .patch(
            namespace,
            &PatchParams::default(),
            &Patch::Merge(
                json!({ "metadata": { "labels": { "metering.tally.dev/inject": value } } }),
            ),
        )
        .await
        .expect("namespace labelled");
}

/// Waits until the configuration exists, trusts the Secret's CA and excludes every namespace of `excluded`.
async fn configuration_ready(
    client: &Client,
    namespace: &str,
    excluded: &[&str],
) -> MutatingWebhookConfiguration {
    let configurations = Api::<MutatingWebhookConfiguration>::all(client.clone());
    let secrets = Api::<Secret>::namespaced(client.clone(), namespace);
    eventually("the webhook configuration is applied", || async {
        let configuration = configurations.get(CONFIGURATION).await.ok()?;
        let secret = secrets.get(SECRET).await.ok()?;
        let ca = secret.data?.get("ca.crt")?.clone();
        let webhooks = configuration.webhooks.clone()?;
        let ready = webhooks.len() == 2
            && webhooks.iter().all(|w| {
                w.client_config.ca_bundle.as_ref() == Some(&ca)
                    && excluded.iter().all(|ns| {
                        w.namespace_selector
                            .iter()
                            .flat_map(|s| s.match_expressions.iter().flatten())
                            .any(|e| e.values.iter().flatten().any(|v| v == ns))
                    })
            });
        ready.then_some(configuration)
    })
    .await
}

fn pod(name: &str, labels: &[(&str, &str)]) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "labels": labels.iter().copied().collect::<BTreeMap<_, _>>(),
        },
        "spec": { "containers": [ { "name": "app", "image": "registry.invalid/app:1" } ] }
    }))
    .expect("a Pod")
}

async fn create_pod(client: &Client, namespace: &str, pod: &Pod) -> Pod {
    Api::<Pod>::namespaced(client.clone(), namespace)
        .create(&PostParams::default(), pod)
        .await
        .unwrap_or_else(|e| panic!("creating pod {} in {namespace}: {e}", pod.name_any()))
}

/// Asserts the pod carries exactly one sidecar, one buffer volume, the URL and the annotation.
fn assert_injected_once(pod: &Pod, collector: &str) {
    let name = pod.name_any();
    let spec = pod.spec.as_ref().expect("spec");
    let sidecars: Vec<_> = spec
        .init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
        .filter(|c| c.name == SIDECAR_NAME)
        .collect();
    assert_eq!(
        sidecars.len(),
        1,
        "{name}: one tally-sidecar, got {:?}",
        spec.init_containers
    );
    assert_eq!(
        spec.init_containers.as_ref().map(|c| c[0].name.as_str()),
        Some(SIDECAR_NAME),
        "{name}: the sidecar is an init container"
    );
    assert_eq!(
        sidecars[0].restart_policy.as_deref(),
        Some("Always"),
        "{name}"
    );
    assert_eq!(
        sidecars[0].image.as_deref(),
        Some("registry.invalid/tally-sidecar:injected"),
        "{name}"
    );
    let volumes = spec
        .volumes
        .iter()
        .flatten()
        .filter(|v| v.name == "tally-buffer")
        .count();
    assert_eq!(volumes, 1, "{name}: one buffer volume");
    assert_eq!(
        env(&spec.containers[0], "OPENMETER_URL"),
        Some("http://127.0.0.1:4196"),
        "{name}"
    );
    assert_eq!(
        pod.annotations()
            .get(INJECTED_ANNOTATION)
            .map(String::as_str),
        Some(collector),
        "{name}"
    );
    assert_eq!(
        pod.labels().get(SIDECAR_LABEL).map(String::as_str),
        Some(SIDECAR_LABEL_VALUE),
        "{name}: the label a PodMonitor selects sidecars by"
    );
}

fn assert_not_injected(pod: &Pod, why: &str) {
    assert!(
        !inject::is_injected(pod),
        "{why}: pod {} was injected",
        pod.name_any()
    );
    assert!(
        pod.annotations().get(INJECTED_ANNOTATION).is_none(),
        "{why}"
    );
}

#[tokio::test]
async fn opted_in_pods_are_injected_once_and_no_other_pod_is() {
    let Cluster {
        control_plane,
        client,
        operator_ns,
        apps,
    } = Cluster::start().await;
    let batch = control_plane
        .new_namespace("batch")
        .await
        .expect("namespace");
    let plain = control_plane
        .new_namespace("plain")
        .await
        .expect("namespace");
    // Labelled, but the collector excludes it.
    label_namespace(&client, &batch, "enabled").await;
    // The collector lives in an opted-in namespace: its own pods must still be left alone.
    create_collector(&client, &apps, &[&batch]).await;

    let webhook = Webhook::start(&client, &operator_ns, Duration::from_secs(8760 * 3600));
    let reconciler = RunningController::start(&client);
    configuration_ready(
        &client,
        &operator_ns,
        &[&batch, &operator_ns, "kube-system"],
    )
    .await;
    let collector = format!("{apps}/meter");

    // 1. A Deployment in the opted-in namespace: the ReplicaSet controller's pods come out injected.
    let deployment: Deployment = serde_json::from_value(json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": { "name": "web" },
        "spec": {
            "replicas": 2,
            "selector": { "matchLabels": { "app": "web" } },
            "template": {
                "metadata": { "labels": { "app": "web" } },
                "spec": { "containers": [
                    { "name": "app", "image": "registry.invalid/app:1" },
                    { "name": "custom", "image": "registry.invalid/app:1",
                      "env": [ { "name": "OPENMETER_URL", "value": "http://elsewhere:1234" } ] }
                ] }
            }
        }
    }))
    .expect("a Deployment");
    Api::<Deployment>::namespaced(client.clone(), &apps)
        .create(&PostParams::default(), &deployment)
        .await
        .expect("Deployment created");
    let pods = Api::<Pod>::namespaced(client.clone(), &apps);
    let web = eventually("the ReplicaSet controller creates both pods", || async {
        let web = pods
            .list(&ListParams::default().labels("app=web"))
            .await
            .ok()?
            .items;
        (web.len() == 2).then_some(web)
    })
    .await;
    for pod in &web {
        assert_injected_once(pod, &collector);
        let custom = &pod.spec.as_ref().expect("spec").containers[1];
        assert_eq!(
            env(custom, "OPENMETER_URL"),
            Some("http://elsewhere:1234"),
            "kept"
        );
    }

    // Opted in twice (namespace and pod label): both webhooks are called, the sidecar is added once.
    let twice = create_pod(
        &client,
        &apps,
        &pod("twice", &[("metering.tally.dev/inject", "enabled")]),
    )
    .await;
    assert_injected_once(&twice, &collector);
    assert!(webhook.admissions("skipped", "already_injected") >= 1);
    // Opted in by its own label in a namespace that is not.
    let solo = create_pod(
        &client,
        &plain,
        &pod("solo", &[("metering.tally.dev/inject", "enabled")]),
    )
    .await;
    assert_injected_once(&solo, &collector);

    // 2. Not injected.
    let excluded = create_pod(&client, &batch, &pod("excluded", &[])).await;
    assert_not_injected(
        &excluded,
        "a namespace the collector excludes, labelled or not",
    );
    let excluded_opted_in = create_pod(
        &client,
        &batch,
        &pod(
            "excluded-pod-label",
            &[("metering.tally.dev/inject", "enabled")],
        ),
    )
    .await;
    assert_not_injected(
        &excluded_opted_in,
        "an excluded namespace wins over the pod label",
    );
    let opted_out = create_pod(
        &client,
        &apps,
        &pod("opted-out", &[("metering.tally.dev/inject", "disabled")]),
    )
    .await;
    assert_not_injected(&opted_out, "the opt-out label");
    let own = create_pod(
        &client,
        &apps,
        &pod("own", &[("app.kubernetes.io/managed-by", "tally-operator")]),
    )
    .await;
    assert_not_injected(&own, "the managed-by label");
    let unlabelled = create_pod(&client, &plain, &pod("unlabelled", &[])).await;
    assert_not_injected(&unlabelled, "an unlabelled pod in an unlabelled namespace");
    let collector_pod = eventually("the StatefulSet controller creates meter-0", || async {
        pods.get("meter-0").await.ok()
    })
    .await;
    assert_not_injected(&collector_pod, "the collector's own StatefulSet pod");

    assert!(webhook.admissions("injected", "opted_in") >= 4);
    reconciler.stop().await;
    webhook.stop().await;
    control_plane.stop();
}

#[tokio::test]
async fn replicas_share_one_secret_and_a_stopped_webhook_blocks_no_pod() {
    let Cluster {
        control_plane,
        client,
        operator_ns,
        apps,
    } = Cluster::start().await;
    create_collector(&client, &apps, &[]).await;

    // Four replicas starting at once agree on one CA and certificate.
    let validity = Duration::from_secs(3600);
    let settings = webhook_args(unused_port(), validity)
        .certificate_settings(&operator_ns)
        .expect("valid flags");
    assert_eq!(settings.ip_addresses, [IpAddr::V4(Ipv4Addr::LOCALHOST)]);
    let issued = futures::future::join_all((0..4).map(|_| certs::ensure(&client, &settings))).await;
    let first = issued[0].as_ref().expect("a certificate").clone();
    for other in &issued {
        assert_eq!(
            other.as_ref().expect("a certificate"),
            &first,
            "replicas disagree"
        );
    }

    let webhook = Webhook::start(&client, &operator_ns, validity);
    configuration_ready(&client, &operator_ns, &[&operator_ns]).await;
    let secret = Api::<Secret>::namespaced(client.clone(), &operator_ns)
        .get(SECRET)
        .await
        .expect("Secret");
    assert_eq!(
        secret
            .data
            .as_ref()
            .and_then(|d| d.get("tls.crt"))
            .map(|c| c.0.clone()),
        Some(first.material.cert.clone().into_bytes()),
        "the webhook adopted the valid Secret instead of replacing it"
    );
    let before = create_pod(&client, &apps, &pod("before", &[])).await;
    assert_injected_once(&before, &format!("{apps}/meter"));

    // 3. Unreachable with failurePolicy Ignore: the pod is created, without a sidecar.
    webhook.stop().await;
    let after = create_pod(&client, &apps, &pod("after", &[])).await;
    assert_not_injected(&after, "the webhook is down");
    control_plane.stop();
}

/// The CA's key lives in its own Secret, never next to the serving key; a Secret of the earlier one-Secret layout
/// is split without issuing anything new.
#[tokio::test]
async fn the_ca_key_is_kept_apart_and_an_old_single_secret_is_split() {
    let (control_plane, client, operator_ns) = control_plane_with_crd("tally-system").await;
    let settings = webhook_args(unused_port(), Duration::from_secs(3600))
        .certificate_settings(&operator_ns)
        .expect("valid flags");
    let secrets = Api::<Secret>::namespaced(client.clone(), &operator_ns);
    let keys = |secret: &Secret| -> Vec<String> {
        secret
            .data
            .iter()
            .flatten()
            .map(|(k, _)| k.clone())
            .collect()
    };

    // The earlier layout: all four keys in the serving Secret.
    let old = certs::issue(None, true, &settings, time::OffsetDateTime::now_utc())
        .expect("a certificate");
    let mut data = old.material.serving_data();
    data.extend(old.material.ca_data());
    let single = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(SECRET.into()),
            ..Default::default()
        },
        type_: Some("kubernetes.io/tls".into()),
        data: Some(data),
        ..Default::default()
    };
    secrets
        .create(&PostParams::default(), &single)
        .await
        .expect("the one-Secret layout");

    let adopted = certs::ensure(&client, &settings).await.expect("ensure");
    assert_eq!(
        adopted.material, old.material,
        "the valid certificate is adopted, not reissued"
    );
    let serving = secrets.get(SECRET).await.expect("serving Secret");
    assert_eq!(keys(&serving), ["ca.crt", "tls.crt", "tls.key"]);
    let ca = secrets.get(CA_SECRET).await.expect("CA Secret");
    assert_eq!(keys(&ca), ["ca.crt", "ca.key"]);
    assert_eq!(
        ca.data
            .as_ref()
            .and_then(|d| d.get("ca.key"))
            .map(|k| k.0.clone()),
        Some(old.material.ca_key.clone().into_bytes())
    );

    // Split, the Secrets are adopted as they are: nothing is written again.
    let versions = |a: &Secret, b: &Secret| (a.resource_version(), b.resource_version());
    let before = versions(&serving, &ca);
    certs::ensure(&client, &settings).await.expect("ensure");
    let after = versions(
        &secrets.get(SECRET).await.expect("serving Secret"),
        &secrets.get(CA_SECRET).await.expect("CA Secret"),
    );
    assert_eq!(before, after, "a split, valid pair is left alone");
    control_plane.stop();
}

/// With `--webhook-certificates cert-manager` the operator serves the Secret a cert-manager Certificate writes,
/// writes no Secret, and leaves the caBundle to cert-manager's CA injector, named in the configuration's
/// annotation. cert-manager cannot run here (no images), so this test plays it: it writes the Secret as a
/// Certificate would and the caBundle as the injector would, each with its own field manager.
#[tokio::test]
async fn with_cert_manager_the_operator_serves_its_secret_and_leaves_the_ca_bundle_to_the_injector()
{
    let Cluster {
        control_plane,
        client,
        operator_ns,
        apps,
    } = Cluster::start().await;
    create_collector(&client, &apps, &[]).await;
    let port = unused_port();
    let mut args = webhook_args(port, Duration::from_secs(3600));
    args.webhook_certificates = CertificateSource::CertManager;
    let settings = args
        .certificate_settings(&operator_ns)
        .expect("valid flags");
    let secrets = Api::<Secret>::namespaced(client.clone(), &operator_ns);
    let write_secret = |material: certs::TlsMaterial| {
        let secrets = secrets.clone();
        async move {
            let secret = json!({
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": { "name": SECRET },
                "type": "kubernetes.io/tls",
                "data": material.serving_data(),
            });
            secrets
                .patch(
                    SECRET,
                    &PatchParams::apply("cert-manager-certificates"),
                    &Patch::Apply(&secret),
                )
                .await
                .expect("the Certificate's Secret");
        }
    };
    let first = certs::issue(None, true, &settings, time::OffsetDateTime::now_utc())
        .expect("a certificate");
    write_secret(first.material.clone()).await;

    let webhook = Webhook::spawn(
        &client,
        &operator_ns,
        port,
        args,
        tokio::sync::watch::channel(true).1,
    );
    let ca = first.material.ca_bundle.clone().into_bytes();
    eventually("the webhook serves the Certificate's Secret", || async {
        (served_certificate(port, &ca).await.ok()? == der(first.material.cert.as_bytes()))
            .then_some(())
    })
    .await;

    let configurations = Api::<MutatingWebhookConfiguration>::all(client.clone());
    let configuration = eventually("the configuration names the Certificate", || async {
        let configuration = configurations.get(CONFIGURATION).await.ok()?;
        let annotation = configuration
            .metadata
            .annotations
            .as_ref()?
            .get(INJECT_CA_FROM)?;
        (annotation == &format!("{operator_ns}/{CERTIFICATE}")).then_some(configuration)
    })
    .await;
    for webhook in configuration.webhooks.iter().flatten() {
        assert_eq!(
            webhook.client_config.ca_bundle, None,
            "the caBundle is the injector's to write"
        );
    }
    assert!(
        secrets.get_opt(CA_SECRET).await.expect("get").is_none(),
        "the operator made a CA of its own"
    );

    // The injector fills the caBundle; a later apply by the operator (a collector excluding a namespace changes
    // the configuration) keeps it.
    let injected = json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": { "name": CONFIGURATION },
        "webhooks": configuration.webhooks.iter().flatten().map(|w| json!({
            "name": w.name,
            "clientConfig": { "caBundle": k8s_openapi::ByteString(ca.clone()) },
        })).collect::<Vec<_>>(),
    });
    configurations
        .patch(
            CONFIGURATION,
            &PatchParams::apply("cert-manager-cainjector").force(),
            &Patch::Apply(&injected),
        )
        .await
        .expect("the injector's caBundle");
    let excluded = control_plane
        .new_namespace("quiet")
        .await
        .expect("namespace");
    Api::<MeteringCollector>::namespaced(client.clone(), &apps)
        .patch(
            "meter",
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "excludeNamespaces": [excluded] } })),
        )
        .await
        .expect("the collector excludes a namespace");
    configuration_ready(&client, &operator_ns, &[&operator_ns, &excluded]).await;
    assert_injected_once(
        &create_pod(&client, &apps, &pod("with-cert-manager", &[])).await,
        &format!("{apps}/meter"),
    );

    // cert-manager renews: the new certificate is served without a restart.
    let renewed = certs::issue(
        Some(&first.material),
        false,
        &settings,
        time::OffsetDateTime::now_utc(),
    )
    .expect("a renewed certificate");
    write_secret(renewed.material.clone()).await;
    eventually("the webhook serves the renewed certificate", || async {
        (served_certificate(port, &ca).await.ok()? == der(renewed.material.cert.as_bytes()))
            .then_some(())
    })
    .await;
    webhook.stop().await;
    control_plane.stop();
}

/// A stored MeteringCollector that does not fit the Rust type (written under an earlier, permissive CRD) is left
/// out of what the webhook knows; it does not leave the webhook without the valid collector next to it.
#[tokio::test]
async fn a_malformed_collector_does_not_stop_injection() {
    let Cluster {
        control_plane,
        client,
        operator_ns,
        apps,
    } = Cluster::start().await;
    store_malformed(
        &client,
        &apps,
        &[("broken", json!({ "replicas": "three" }))],
    )
    .await;
    let batch = control_plane
        .new_namespace("batch")
        .await
        .expect("namespace");
    create_collector(&client, &apps, &[&batch]).await;
    let webhook = Webhook::start(&client, &operator_ns, Duration::from_secs(3600));
    // The valid collector's excludeNamespaces reach the configuration: the webhook has read it.
    configuration_ready(&client, &operator_ns, &[&operator_ns, &batch]).await;
    assert_injected_once(
        &create_pod(&client, &apps, &pod("next-to-a-broken-one", &[])).await,
        &format!("{apps}/meter"),
    );
    webhook.stop().await;
    control_plane.stop();
}

/// Every replica serves, but only the leader writes the MutatingWebhookConfiguration: a follower serves the shared
/// certificate and leaves the configuration alone until it is elected.
#[tokio::test]
async fn only_the_leader_writes_the_configuration() {
    let Cluster {
        control_plane,
        client,
        operator_ns,
        apps,
    } = Cluster::start().await;
    create_collector(&client, &apps, &[]).await;
    let (elected, leading) = tokio::sync::watch::channel(false);
    let webhook = Webhook::start_with(&client, &operator_ns, Duration::from_secs(3600), leading);
    let secrets = Api::<Secret>::namespaced(client.clone(), &operator_ns);
    let (ca, cert) = eventually("the follower has a certificate in the Secret", || async {
        let data = secrets.get(SECRET).await.ok()?.data?;
        Some((
            data.get("ca.crt")?.0.clone(),
            data.get("tls.crt")?.0.clone(),
        ))
    })
    .await;
    eventually("the follower serves the Secret's certificate", || async {
        (served_certificate(webhook.port, &ca).await.ok()? == der(&cert)).then_some(())
    })
    .await;
    let configurations = Api::<MutatingWebhookConfiguration>::all(client.clone());
    assert!(
        configurations
            .get_opt(CONFIGURATION)
            .await
            .expect("get")
            .is_none(),
        "a follower wrote the webhook configuration"
    );

    elected.send_replace(true);
    configuration_ready(&client, &operator_ns, &[&operator_ns]).await;
    assert_injected_once(
        &create_pod(&client, &apps, &pod("after-election", &[])).await,
        &format!("{apps}/meter"),
    );
    webhook.stop().await;
    control_plane.stop();
}

#[tokio::test]
async fn admissions_keep_working_across_certificate_rotations() {
    let Cluster {
        control_plane,
        client,
        operator_ns,
        apps,
    } = Cluster::start().await;
    create_collector(&client, &apps, &[]).await;
    let collector = format!("{apps}/meter");

    // Renewed when less than a third (10s) remains: 20s after issue.
    let webhook = Webhook::start(&client, &operator_ns, Duration::from_secs(30));
    configuration_ready(&client, &operator_ns, &[&operator_ns]).await;
    let secrets = Api::<Secret>::namespaced(client.clone(), &operator_ns);
    let key = |secret: &Secret, key: &str| {
        secret
            .data
            .as_ref()
            .and_then(|d| d.get(key))
            .map(|v| v.0.clone())
            .unwrap_or_default()
    };
    let original = secrets.get(SECRET).await.expect("Secret");
    let old_expiry = webhook.metrics.certificate_expiry.get();
    assert!(
        old_expiry > unix_now(),
        "the gauge holds the expiry: {old_expiry}"
    );
    assert_injected_once(
        &create_pod(&client, &apps, &pod("first", &[])).await,
        &collector,
    );

    let renewed = eventually("the serving certificate is renewed", || async {
        let secret = secrets.get(SECRET).await.ok()?;
        (key(&secret, "tls.crt") != key(&original, "tls.crt")).then_some(secret)
    })
    .await;
    assert_eq!(
        key(&renewed, "ca.crt"),
        key(&original, "ca.crt"),
        "the CA is kept"
    );
    configuration_ready(&client, &operator_ns, &[&operator_ns]).await;
    // A new connection, verified against the caBundle, gets the renewed certificate: reloaded without restart.
    let ca = key(&renewed, "ca.crt");
    let renewed_der = der(&key(&renewed, "tls.crt"));
    eventually("the webhook serves the renewed certificate", || async {
        (served_certificate(webhook.port, &ca).await.ok()? == renewed_der).then_some(())
    })
    .await;

    // Once the first certificate has expired, only the renewed one can make an admission succeed.
    eventually("the first certificate expires", || async {
        (unix_now() > old_expiry + 1).then_some(())
    })
    .await;
    assert!(
        webhook.metrics.certificate_expiry.get() > old_expiry,
        "the gauge follows the renewal"
    );
    let served = served_certificate(webhook.port, &ca).await;
    assert_eq!(
        served.as_ref(),
        Ok(&renewed_der),
        "a fresh TLS client verifies the webhook"
    );
    assert_injected_once(
        &create_pod(&client, &apps, &pod("after-rotation", &[])).await,
        &collector,
    );
    assert_eq!(webhook.admissions("injected", "opted_in"), 2);
    webhook.stop().await;
    control_plane.stop();
}

/// The `tally-operator` binary, killed when dropped; its log is printed if the test failed.
struct OperatorProcess {
    child: std::process::Child,
    log: std::path::PathBuf,
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            eprintln!("--- tally-operator log ({}) ---\n{log}", self.log.display());
        }
    }
}

/// `GET /metrics` from the operator's HTTP server.
async fn scrape(port: u16) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port))
        .await
        .ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    Some(response)
}

#[tokio::test]
async fn the_operator_binary_serves_the_webhook_and_counts_admissions() {
    let Cluster {
        control_plane,
        client,
        operator_ns,
        apps,
    } = Cluster::start().await;
    create_collector(&client, &apps, &[]).await;

    let (port, http) = (unused_port(), unused_port());
    let log = control_plane.dir().join("tally-operator.log");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_tally-operator"))
        .args([
            "run",
            "--leader-elect=false",
            "--namespace",
            &operator_ns,
            "--http",
            &format!("127.0.0.1:{http}"),
            "--webhook-listen",
            &format!("127.0.0.1:{port}"),
            "--webhook-url",
            &format!("https://127.0.0.1:{port}/mutate"),
        ])
        .env("KUBECONFIG", control_plane.kubeconfig_path())
        .env_remove("POD_NAMESPACE")
        .env_remove("POD_NAME")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("tally-operator starts");
    let mut operator = OperatorProcess { child, log };

    configuration_ready(&client, &operator_ns, &[&operator_ns]).await;
    let pod = create_pod(&client, &apps, &pod("from-the-binary", &[])).await;
    assert_injected_once(&pod, &format!("{apps}/meter"));
    let metrics = eventually("the operator serves /metrics", || scrape(http)).await;
    assert!(
        metrics
            .contains(r#"tally_operator_admissions_total{result="injected",reason="opted_in"} 1"#),
        "{metrics}"
    );
    let expiry = metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix("tally_operator_webhook_certificate_expiry_timestamp_seconds ")
        })
        .and_then(|v| v.trim().parse::<i64>().ok())
        .unwrap_or_else(|| panic!("no certificate expiry gauge in {metrics}"));
    // The default validity is a year.
    assert!(expiry > unix_now() + 364 * 24 * 3600, "{expiry}");

    // SIGTERM: a graceful stop, exit code 0.
    let pid = i32::try_from(operator.child.id()).expect("pid");
    // SAFETY: sending a signal to our own child process.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let status = eventually("tally-operator exits after SIGTERM", || {
        let status = operator.child.try_wait().ok().flatten();
        async move { status }
    })
    .await;
    assert!(status.success(), "exit status {status}");
    drop(operator);
    control_plane.stop();
}

/// The DER of the first certificate of a PEM text.
fn der(pem: &[u8]) -> Vec<u8> {
    CertificateDer::pem_slice_iter(pem)
        .next()
        .expect("a certificate")
        .expect("PEM")
        .to_vec()
}

/// The certificate the webhook presents to a new TLS client that trusts `ca_bundle` (PEM) and checks expiry.
async fn served_certificate(port: u16, ca_bundle: &[u8]) -> Result<Vec<u8>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_bundle) {
        roots
            .add(cert.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port))
        .await
        .map_err(|e| e.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::IpAddress(Ipv4Addr::LOCALHOST.into()), tcp)
        .await
        .map_err(|e| format!("TLS handshake with the webhook: {e}"))?;
    let (_, session) = tls.get_ref();
    session
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(|cert| cert.to_vec())
        .ok_or_else(|| "the webhook presented no certificate".to_string())
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
