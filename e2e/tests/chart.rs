//! The Helm chart `charts/tally`, checked with the real Helm CLI (built from its Go module by `make helm`) and the
//! real control plane of [`tally_e2e::ControlPlane`].
//!
//! Helm runs as a process for `lint` and `template`; the manifests it renders are applied with server-side apply
//! through a [`kube::Client`], which is what `helm install` does through its own client, so no test needs a
//! kubeconfig for Helm. The last test runs the real operator with nothing but the chart's ServiceAccount and RBAC.

use std::{
    fs,
    ops::ControlFlow,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use k8s_openapi::{
    api::{
        admissionregistration::v1::MutatingWebhookConfiguration,
        apps::v1::{ReplicaSet, StatefulSet},
        authentication::v1::{TokenRequest, TokenRequestSpec},
        coordination::v1::Lease,
        core::v1::{Namespace, Pod, Secret, ServiceAccount},
        events::v1::Event,
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api, Client, ResourceExt,
    api::{DynamicObject, ListParams, Patch, PatchParams, PostParams},
    config::Kubeconfig,
};
use serde_json::{Value, json};
use tally_e2e::{
    Apply, ControlPlane, Helm, Manifests, apply, chart_dir, get, is_served, missing_metrics,
};
use tally_tests::poll::{API_INTERVAL, poll, poll_until_ok};
use tally_tests::ports::unused_ports;

/// The release name every rendering uses; the chart then names its objects `tally-*`.
const RELEASE: &str = "tally";
/// Generous for two cores shared with builds; the controllers and the operator act within a few seconds.
const ACT_WITHIN: Duration = Duration::from_secs(90);
/// How often `operator_accepts_the_rendered_command_line` checks whether the operator has exited.
const POLL_INTERVAL: Duration = Duration::from_millis(250);
/// `--cert-validity` of the operator in the RBAC test: short, so the certificate is renewed during the test.
const CERT_VALIDITY: &str = "15s";

/// The values files in `charts/tally/ci/`, each a way users install the chart.
const CI_VALUES: [&str; 5] = [
    "certmanager-values.yaml",
    "default-values.yaml",
    "no-crds-values.yaml",
    "servicemonitor-values.yaml",
    "strict-values.yaml",
];

fn helm() -> Helm {
    Helm::locate().unwrap_or_else(|e| panic!("{e}"))
}

fn ci_values(file: &str) -> PathBuf {
    chart_dir().join("ci").join(file)
}

fn render(namespace: &str, values: &[&Path]) -> Manifests {
    helm()
        .template(&chart_dir(), RELEASE, namespace, values)
        .unwrap_or_else(|e| panic!("{e}"))
}

/// The operator container's `args` in the rendered Deployment.
fn operator_args(manifests: &Manifests) -> Vec<String> {
    let deployment = manifests
        .get("Deployment", "tally-operator")
        .expect("the chart renders Deployment tally-operator");
    let args = &deployment.data["spec"]["template"]["spec"]["containers"][0]["args"];
    serde_json::from_value(args.clone()).expect("the operator container has a list of string args")
}

/// `helm lint --strict` passes for the defaults and for every values file in `ci/`.
#[test]
fn lint_strict_passes_with_every_ci_values_file() {
    let helm = helm();
    let chart = chart_dir();
    helm.run(["lint".as_ref(), "--strict".as_ref(), chart.as_os_str()])
        .unwrap_or_else(|e| panic!("{e}"));
    for file in CI_VALUES {
        let values = ci_values(file);
        helm.run([
            "lint".as_ref(),
            "--strict".as_ref(),
            chart.as_os_str(),
            "--values".as_ref(),
            values.as_os_str(),
        ])
        .unwrap_or_else(|e| panic!("ci/{file}: {e}"));
    }
}

/// Every values file in `ci/` renders, and renders what it asks for.
#[test]
fn ci_values_files_render_what_they_ask_for() {
    let kinds = |manifests: &Manifests| -> Vec<String> {
        manifests
            .objects()
            .iter()
            .filter_map(|o| o.types.as_ref().map(|t| t.kind.clone()))
            .collect()
    };

    let defaults = render("tally-system", &[&ci_values("default-values.yaml")]);
    let mut default_kinds = kinds(&defaults);
    default_kinds.sort();
    assert_eq!(
        default_kinds,
        [
            "ClusterRole",
            "ClusterRoleBinding",
            "CustomResourceDefinition",
            "Deployment",
            "PodDisruptionBudget",
            "Role",
            "RoleBinding",
            "Service",
            "Service",
            "ServiceAccount",
        ],
        "the default install; the MutatingWebhookConfiguration is the operator's, never the chart's"
    );
    let deployment = defaults
        .get("Deployment", "tally-operator")
        .expect("Deployment");
    assert_eq!(deployment.data["spec"]["replicas"], 2);
    let args = operator_args(&defaults);
    for expected in [
        "run",
        "--leader-elect=true",
        "--lease-name=tally-operator",
        "--webhook-service=tally-webhook",
        "--webhook-secret=tally-webhook-tls",
        "--webhook-ca-secret=tally-webhook-ca",
        "--webhook-configuration=tally",
        "--failure-policy=Ignore",
        "--cert-validity=8760h",
        "--log-format=text",
        "--log-level=info",
    ] {
        assert_has_arg(&args, expected, "default");
    }
    assert!(
        !args.iter().any(|a| a.starts_with("--exclude-namespaces")),
        "no --exclude-namespaces without excludeNamespaces: {args:?}"
    );
    let webhook = defaults
        .get("Service", "tally-webhook")
        .expect("webhook Service");
    assert_eq!(
        webhook.data["spec"]["ports"],
        json!([{ "name": "webhook", "port": 443, "targetPort": "webhook", "protocol": "TCP" }])
    );
    let pdb = defaults
        .get("PodDisruptionBudget", "tally-operator")
        .expect("PDB");
    assert_eq!(pdb.data["spec"]["minAvailable"], 1);

    let no_crds = render("tally-system", &[&ci_values("no-crds-values.yaml")]);
    assert!(
        !kinds(&no_crds)
            .iter()
            .any(|k| k == "CustomResourceDefinition"),
        "crds.install=false still renders the CRD"
    );

    let monitored = render("tally-system", &[&ci_values("servicemonitor-values.yaml")]);
    let monitor = monitored
        .get("ServiceMonitor", "tally-operator")
        .expect("serviceMonitor.enabled renders a ServiceMonitor");
    assert_eq!(
        monitor.types.as_ref().map(|t| t.api_version.as_str()),
        Some("monitoring.coreos.com/v1")
    );
    assert_eq!(
        monitor.labels().get("release").map(String::as_str),
        Some("prometheus")
    );
    assert_eq!(monitor.data["spec"]["endpoints"][0]["port"], "http");
    assert_eq!(monitor.data["spec"]["endpoints"][0]["interval"], "15s");
    let metrics = monitored
        .get("Service", "tally-metrics")
        .expect("metrics Service");
    for (key, value) in monitor.data["spec"]["selector"]["matchLabels"]
        .as_object()
        .expect("a label selector")
    {
        assert_eq!(
            metrics.labels().get(key).map(String::as_str),
            value.as_str(),
            "the ServiceMonitor selects the metrics Service by {key}"
        );
    }

    assert!(
        !kinds(&defaults).iter().any(|k| k == "PodMonitor"),
        "PodMonitors without podMonitor.enabled"
    );
    for (name, port) in [
        ("tally-operator-collectors", "http"),
        ("tally-operator-sidecars", "tally-http"),
    ] {
        let monitor = monitored
            .get("PodMonitor", name)
            .unwrap_or_else(|| panic!("podMonitor.enabled renders the PodMonitor {name}"));
        assert_eq!(
            monitor.labels().get("release").map(String::as_str),
            Some("prometheus"),
            "{name}"
        );
        let endpoint = &monitor.data["spec"]["podMetricsEndpoints"][0];
        assert_eq!(endpoint["port"], port, "{name}");
        assert_eq!(endpoint["path"], "/metrics", "{name}");
        assert_eq!(endpoint["interval"], "15s", "{name}");
        assert_eq!(endpoint["scrapeTimeout"], "5s", "{name}");
    }

    assert!(
        !kinds(&defaults)
            .iter()
            .any(|k| k == "Certificate" || k == "Issuer"),
        "cert-manager objects without webhook.certManager.enabled"
    );
    let cert_manager = render("tally-system", &[&ci_values("certmanager-values.yaml")]);
    let certificate = cert_manager
        .get("Certificate", "tally-webhook")
        .expect("webhook.certManager.enabled renders the webhook's Certificate");
    assert_eq!(certificate.data["spec"]["secretName"], "tally-webhook-tls");
    assert_eq!(
        certificate.data["spec"]["dnsNames"],
        json!([
            "tally-webhook.tally-system.svc",
            "tally-webhook.tally-system.svc.cluster.local"
        ])
    );
    assert_eq!(
        certificate.data["spec"]["issuerRef"],
        json!({ "name": "platform-ca", "kind": "ClusterIssuer", "group": "cert-manager.io" })
    );
    assert!(
        !kinds(&cert_manager).iter().any(|k| k == "Issuer"),
        "an issuerRef is given: no Issuer of the chart's own"
    );
    let args = operator_args(&cert_manager);
    for expected in [
        "--webhook-certificates=cert-manager",
        "--webhook-certificate=tally-webhook",
        "--webhook-secret=tally-webhook-tls",
    ] {
        assert_has_arg(&args, expected, "cert-manager");
    }
    let role = cert_manager
        .get("Role", "tally-operator")
        .expect("the operator's Role");
    let secret_rules: Vec<&serde_json::Value> = role.data["rules"]
        .as_array()
        .expect("rules")
        .iter()
        .filter(|rule| rule["resources"] == json!(["secrets"]))
        .collect();
    assert_eq!(
        secret_rules,
        [
            &json!({ "apiGroups": [""], "resources": ["secrets"], "resourceNames": ["tally-webhook-tls"], "verbs": ["get"] })
        ],
        "with cert-manager the operator may only read the Secret it serves"
    );
    // Without an issuerRef the chart makes its own CA chain, the CA's key in its own Secret.
    let dir = tempfile::tempdir().expect("temporary directory");
    let own_ca = dir.path().join("own-ca.yaml");
    fs::write(&own_ca, "webhook:\n  certManager:\n    enabled: true\n").expect("values file");
    let own = render("tally-system", &[&own_ca]);
    for (kind, name) in [
        ("Issuer", "tally-selfsigned"),
        ("Certificate", "tally-webhook-ca"),
        ("Issuer", "tally-webhook-ca"),
    ] {
        assert!(own.get(kind, name).is_some(), "no {kind} {name}");
    }
    assert_eq!(
        own.get("Certificate", "tally-webhook-ca").expect("CA").data["spec"]["secretName"],
        "tally-webhook-ca"
    );
    assert_eq!(
        own.get("Certificate", "tally-webhook")
            .expect("Certificate")
            .data["spec"]["issuerRef"]["name"],
        "tally-webhook-ca"
    );

    let strict = render("tally-system", &[&ci_values("strict-values.yaml")]);
    let args = operator_args(&strict);
    for expected in [
        "--failure-policy=Fail",
        "--cert-validity=2160h",
        "--exclude-namespaces=monitoring,cert-manager,istio-system",
        "--log-format=json",
        "--log-level=tally_operator=debug,info",
    ] {
        assert_has_arg(&args, expected, "strict");
    }
}

/// Values the schema forbids fail `helm template` with a message that names the offending key.
#[test]
fn invalid_values_are_rejected_naming_the_key() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let cases = [
        ("unknownTopLevel: true\n", "unknownTopLevel"),
        (
            "webhook:\n  failurePolicy: Sometimes\n",
            "/webhook/failurePolicy",
        ),
        ("webhook:\n  unknownNested: 1\n", "unknownNested"),
        ("logging:\n  format: xml\n", "/logging/format"),
        ("excludeNamespaces: [Not_A_Label]\n", "/excludeNamespaces/0"),
        (
            "webhook:\n  certificateValidity: 1year\n",
            "/webhook/certificateValidity",
        ),
        ("crds:\n  install: \"yes\"\n", "/crds/install"),
        ("serviceMonitor:\n  enabled: 1\n", "/serviceMonitor/enabled"),
        ("image:\n  pullPolicy: Sometimes\n", "/image/pullPolicy"),
        ("resources:\n  limits:\n    gpus: 1\n", "gpus"),
    ];
    for (index, (values, key)) in cases.into_iter().enumerate() {
        let file = dir.path().join(format!("invalid-{index}.yaml"));
        fs::write(&file, values).expect("values file written");
        let output = helm()
            .output([
                "template".as_ref(),
                RELEASE.as_ref(),
                chart_dir().as_os_str(),
                "--values".as_ref(),
                file.as_os_str(),
            ])
            .expect("helm runs");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            !output.status.success(),
            "helm template accepted invalid values:\n{values}"
        );
        assert!(
            stderr.contains("values don't meet the specifications of the schema")
                && stderr.contains(key),
            "the rejection of\n{values}names no {key}:\n{stderr}"
        );
    }
}

/// The chart's CRD is `crds/meteringcollector.yaml` (what `tally-operator crd` prints) plus only the annotation that
/// keeps it on `helm uninstall`. Fails when `make crds` was not run after a change to the Rust types.
#[test]
fn chart_crd_is_the_generated_crd_kept_on_uninstall() {
    let rendered = render("tally-system", &[]);
    let crd = rendered
        .get(
            "CustomResourceDefinition",
            "meteringcollectors.metering.tally.dev",
        )
        .expect("the chart renders the MeteringCollector CRD");
    let mut rendered_crd = serde_json::to_value(crd).expect("JSON");
    let annotations = rendered_crd["metadata"]
        .as_object_mut()
        .and_then(|m| m.remove("annotations"))
        .expect("the CRD has annotations");
    assert_eq!(annotations, json!({ "helm.sh/resource-policy": "keep" }));

    let generated_path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds/meteringcollector.yaml");
    let generated: Value = serde_yaml::from_str(
        &fs::read_to_string(&generated_path).expect("crds/meteringcollector.yaml exists"),
    )
    .expect("crds/meteringcollector.yaml is YAML");
    assert!(
        rendered_crd == generated,
        "the chart's CRD differs from crds/meteringcollector.yaml: run `make crds`, which writes both"
    );
}

/// The chart's appVersion is the workspace version, and the default image is tagged with it.
#[test]
fn image_defaults_to_the_workspace_version() {
    let chart: Value = serde_yaml::from_str(
        &fs::read_to_string(chart_dir().join("Chart.yaml")).expect("Chart.yaml exists"),
    )
    .expect("Chart.yaml is YAML");
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(
        chart["appVersion"], version,
        "charts/tally/Chart.yaml appVersion must be the workspace version in Cargo.toml"
    );
    let rendered = render("tally-system", &[]);
    let deployment = rendered
        .get("Deployment", "tally-operator")
        .expect("Deployment");
    assert_eq!(
        deployment.data["spec"]["template"]["spec"]["containers"][0]["image"],
        format!("ghcr.io/tally-dev/tally-operator:{version}")
    );
}

/// The real `tally-operator` binary accepts the command line the chart renders, for every values file in `ci/`: it
/// gets past argument parsing (a usage error exits 2 at once) and fails only later, when it finds no cluster.
#[test]
fn operator_accepts_the_rendered_command_line() {
    let dir = tempfile::tempdir().expect("temporary directory");
    for file in CI_VALUES {
        let mut args = operator_args(&render("tally-system", &[&ci_values(file)]));
        for arg in &mut args {
            if arg.starts_with("--http=") {
                *arg = "--http=127.0.0.1:0".into();
            } else if arg.starts_with("--webhook-listen=") {
                *arg = "--webhook-listen=127.0.0.1:0".into();
            }
        }
        let log = dir.path().join(format!("{file}.log"));
        let mut child = Command::new(Operator::binary())
            .args(&args)
            .env("KUBECONFIG", dir.path().join("no-such-kubeconfig"))
            .env_remove("KUBERNETES_SERVICE_HOST")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).expect("log file"))
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", Operator::binary().display()));
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let status = loop {
            match child.try_wait().expect("waiting for tally-operator") {
                Some(status) => break Some(status),
                None if std::time::Instant::now() >= deadline => break None,
                None => std::thread::sleep(POLL_INTERVAL),
            }
        };
        let _ = child.kill();
        let _ = child.wait();
        let stderr = fs::read_to_string(&log).unwrap_or_default();
        assert_ne!(
            status.and_then(|s| s.code()),
            Some(2),
            "ci/{file}: tally-operator rejected the chart's arguments {args:?}:\n{stderr}"
        );
    }
}

/// Every values file in `ci/` passes a server-side dry run (`dryRun=All`: schema validation, admission) on a real
/// API server; then the chart with a ServiceMonitor is applied for real and every object exists. The release
/// namespace enforces the `restricted` Pod Security Standard, so the ReplicaSet controller creating both operator
/// pods proves the pod template is admitted under it.
///
/// The control plane has no Prometheus Operator: the ServiceMonitor, PodMonitor and PrometheusRule documents are
/// skipped (with a message) when their CRDs (`monitoring.coreos.com`) are absent, and only then. What the
/// PodMonitors select is checked on real pods in `real_node.rs`.
#[tokio::test]
async fn rendered_chart_applies_to_a_real_api_server() {
    let control_plane = ControlPlane::start().await.expect("control plane starts");
    let client = control_plane.client();
    let namespace = control_plane
        .new_namespace("tally-system")
        .await
        .expect("namespace");
    Api::<Namespace>::all(client.clone())
        .patch(
            &namespace,
            &PatchParams::default(),
            &Patch::Merge(json!({ "metadata": { "labels": {
                "pod-security.kubernetes.io/enforce": "restricted",
                "pod-security.kubernetes.io/enforce-version": "latest",
            } } })),
        )
        .await
        .expect("namespace labelled restricted");

    for file in CI_VALUES {
        let manifests = render(&namespace, &[&ci_values(file)]);
        for object in manifests.objects() {
            if skip_unserved(&client, object).await {
                continue;
            }
            apply(&client, object, Apply::DryRun)
                .await
                .unwrap_or_else(|e| panic!("ci/{file}: {e}"));
        }
    }

    let manifests = render(&namespace, &[&ci_values("servicemonitor-values.yaml")]);
    // Helm's install order: the CRD, then RBAC, Services and the Deployment.
    let mut stored = Vec::new();
    for object in manifests.objects() {
        if skip_unserved(&client, object).await {
            continue;
        }
        stored.push(object);
        let applied = apply(&client, object, Apply::Persist)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            applied.uid().is_some(),
            "{} {} was not stored",
            kind_of(object),
            object.name_any()
        );
        if kind_of(object) == "CustomResourceDefinition" {
            eventually("the MeteringCollector CRD is established", || async {
                let crd = Api::<CustomResourceDefinition>::all(client.clone())
                    .get(&object.name_any())
                    .await
                    .map_err(|e| e.to_string())?;
                let established = crd.status.and_then(|s| s.conditions).is_some_and(|c| {
                    c.iter()
                        .any(|c| c.type_ == "Established" && c.status == "True")
                });
                established
                    .then_some(())
                    .ok_or("not established yet".into())
            })
            .await;
        }
    }
    // Every object applied above, read back (the kinds without a CRD here were skipped).
    for object in stored {
        assert_exists(&client, object).await;
    }

    let selector = "app.kubernetes.io/name=tally,app.kubernetes.io/instance=tally,app.kubernetes.io/component=operator";
    let pods = Api::<Pod>::namespaced(client.clone(), &namespace);
    let replica_sets = Api::<ReplicaSet>::namespaced(client.clone(), &namespace);
    eventually(
        "the operator Deployment's 2 pods are created under the restricted Pod Security Standard",
        || async {
            let listed = pods
                .list(&ListParams::default().labels(selector))
                .await
                .map_err(|e| e.to_string())?;
            if listed.items.len() == 2 {
                return Ok(());
            }
            // A pod refused by admission shows up as the ReplicaSet's ReplicaFailure condition.
            let conditions: Vec<String> = replica_sets
                .list(&ListParams::default().labels(selector))
                .await
                .map_err(|e| e.to_string())?
                .items
                .into_iter()
                .flat_map(|rs| rs.status.and_then(|s| s.conditions).unwrap_or_default())
                .map(|c| format!("{:?}: {:?}", c.type_, c.message))
                .collect();
            Err(format!(
                "{} pods; ReplicaSet conditions {conditions:?}",
                listed.items.len()
            ))
        },
    )
    .await;
}

/// The operator, run as a process with nothing but a token of the chart's ServiceAccount (so with exactly the
/// chart's ClusterRole and Role), and with the command line of the chart's Deployment, does everything it is for:
/// takes the Lease, reconciles a MeteringCollector into its StatefulSet and status, creates its webhook Secret and
/// MutatingWebhookConfiguration, and injects the sidecar into a pod of a labelled namespace. A verb missing from the
/// chart's RBAC makes one of these steps time out, with the operator's log in the failure message.
///
/// It also renews the Lease and, with a short `--cert-validity`, its certificate, so the verbs of renewal are
/// exercised too. Verbs used only in situations this test does not create (growing buffer claims, repeating an
/// Event) are not proven here.
///
/// Out of cluster, four arguments change: `--http` and `--webhook-listen` bind free ports on 127.0.0.1,
/// `--webhook-url` registers the webhook by URL instead of through the chart's webhook Service (no kubelet runs the
/// pods behind it), and `--cert-validity` is [`CERT_VALIDITY`].
#[tokio::test]
async fn operator_works_with_exactly_the_charts_rbac() {
    let control_plane = ControlPlane::start().await.expect("control plane starts");
    let admin = control_plane.client();
    let namespace = control_plane
        .new_namespace("tally-system")
        .await
        .expect("release namespace");
    let manifests = render(&namespace, &[]);

    // Everything but the Deployment: no kubelet runs its pods, the operator runs as a process below instead.
    for object in manifests.objects() {
        if kind_of(object) != "Deployment" {
            apply(&admin, object, Apply::Persist)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        }
    }
    let probe: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "metering.tally.dev/v1alpha1", "kind": "MeteringCollector", "metadata": { "name": "probe" }
    }))
    .expect("a MeteringCollector");
    eventually("the chart's MeteringCollector CRD is served", || async {
        is_served(&admin, &probe)
            .await
            .map_err(|e| e.to_string())?
            .then_some(())
            .ok_or("not served yet".into())
    })
    .await;

    let token = Api::<ServiceAccount>::namespaced(admin.clone(), &namespace)
        .create_token_request(
            "tally-operator",
            &PostParams::default(),
            &TokenRequest {
                spec: Some(TokenRequestSpec {
                    expiration_seconds: Some(3600),
                    ..TokenRequestSpec::default()
                }),
                ..TokenRequest::default()
            },
        )
        .await
        .expect("a token for the chart's ServiceAccount tally-operator")
        .status
        .and_then(|s| s.token)
        .expect("the TokenRequest's status has a token");
    // Next to the control plane's logs, so TALLY_E2E_KEEP_DIR=1 keeps the operator's log too.
    let dir = control_plane.dir().to_path_buf();
    let kubeconfig = write_token_kubeconfig(&control_plane, &dir, &token);

    let [http_port, webhook_port] = unused_ports();
    let webhook_url = format!("https://127.0.0.1:{webhook_port}/mutate");
    let mut args = operator_args(&manifests);
    for arg in &mut args {
        if arg.starts_with("--http=") {
            *arg = format!("--http=127.0.0.1:{http_port}");
        } else if arg.starts_with("--webhook-listen=") {
            *arg = format!("--webhook-listen=127.0.0.1:{webhook_port}");
        } else if arg.starts_with("--cert-validity=") {
            *arg = format!("--cert-validity={CERT_VALIDITY}");
        }
    }
    args.push(format!("--webhook-url={webhook_url}"));
    let identity = "tally-operator-0";
    let mut operator = Operator::start(&args, &kubeconfig, &namespace, identity, &dir);

    // Leader election: the Lease named by the chart, in the release namespace.
    let lease_name = arg_value(&args, "--lease-name");
    let leases = Api::<Lease>::namespaced(admin.clone(), &namespace);
    let acquired = operator
        .eventually("the operator holds the chart's Lease", || async {
            let spec = leases
                .get(&lease_name)
                .await
                .map_err(|e| e.to_string())?
                .spec
                .unwrap_or_default();
            (spec.holder_identity.as_deref() == Some(identity))
                .then_some(spec.renew_time)
                .ok_or(format!("holder {:?}", spec.holder_identity))
        })
        .await;
    operator
        .eventually("the operator renews the Lease", || async {
            let spec = leases
                .get(&lease_name)
                .await
                .map_err(|e| e.to_string())?
                .spec
                .unwrap_or_default();
            (spec.holder_identity.as_deref() == Some(identity) && spec.renew_time != acquired)
                .then_some(())
                .ok_or(format!(
                    "holder {:?}, renewTime {:?}",
                    spec.holder_identity, spec.renew_time
                ))
        })
        .await;
    let metrics_url = format!("http://127.0.0.1:{http_port}/metrics");
    operator
        .eventually("/metrics reports tally_operator_leader 1", || async {
            let body = scrape(&metrics_url).await?;
            body.lines()
                .any(|l| l.trim() == "tally_operator_leader 1")
                .then_some(())
                .ok_or_else(|| "no `tally_operator_leader 1` line".into())
        })
        .await;

    // The webhook's certificate and configuration.
    let secret_name = arg_value(&args, "--webhook-secret");
    let secrets = Api::<Secret>::namespaced(admin.clone(), &namespace);
    let first_certificate = operator
        .eventually("the webhook certificate Secret exists", || async {
            let secret = secrets.get(&secret_name).await.map_err(|e| e.to_string())?;
            secret
                .data
                .is_some_and(|d| !d.is_empty())
                .then_some(secret.metadata.resource_version)
                .ok_or("the Secret has no data".into())
        })
        .await;
    let configuration_name = arg_value(&args, "--webhook-configuration");
    let configurations = Api::<MutatingWebhookConfiguration>::all(admin.clone());
    operator
        .eventually(
            "the MutatingWebhookConfiguration points at the webhook URL with a caBundle",
            || async {
                let configuration = configurations
                    .get(&configuration_name)
                    .await
                    .map_err(|e| e.to_string())?;
                let webhooks = configuration.webhooks.unwrap_or_default();
                let ok = !webhooks.is_empty()
                    && webhooks.iter().all(|w| {
                        w.client_config.url.as_deref() == Some(webhook_url.as_str())
                            && w.client_config
                                .ca_bundle
                                .as_ref()
                                .is_some_and(|b| !b.0.is_empty())
                    });
                ok.then_some(()).ok_or(format!("webhooks {webhooks:?}"))
            },
        )
        .await;

    // Every operator metric the chart's alerts and dashboard query is exported (the webhook's certificate exists by
    // now).
    let wanted: Vec<String> = render(&namespace, &[&ci_values("servicemonitor-values.yaml")])
        .queried_metrics()
        .into_iter()
        .filter(|name| name.starts_with("tally_operator_"))
        .collect();
    assert!(
        wanted.len() >= 4,
        "the alerts and the dashboard query the operator: {wanted:?}"
    );
    operator
        .eventually(
            "/metrics exports every operator metric the alerts and the dashboard query",
            || async {
                let body = scrape(&metrics_url).await?;
                let missing = missing_metrics(&wanted, &body);
                missing
                    .is_empty()
                    .then_some(())
                    .ok_or_else(|| format!("missing {missing:?}"))
            },
        )
        .await;

    // The reconciler: a MeteringCollector becomes a StatefulSet and a status.
    let collectors_namespace = control_plane
        .new_namespace("collectors")
        .await
        .expect("collectors namespace");
    let collector: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "metering.tally.dev/v1alpha1",
        "kind": "MeteringCollector",
        "metadata": { "name": "central", "namespace": collectors_namespace },
        "spec": { "replicas": 1, "injection": { "enabled": true } }
    }))
    .expect("a MeteringCollector");
    apply(&admin, &collector, Apply::Persist)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let stateful_sets = Api::<StatefulSet>::namespaced(admin.clone(), &collectors_namespace);
    operator
        .eventually("the collector's StatefulSet exists", || async {
            stateful_sets
                .get("central")
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        })
        .await;
    operator
        .eventually("the collector's status is written", || async {
            let current = get(&admin, &collector).await.map_err(|e| e.to_string())?;
            let status = &current.data["status"];
            let generation = current.metadata.generation;
            let observed = status["observedGeneration"].as_i64();
            let has_conditions = status["conditions"]
                .as_array()
                .is_some_and(|c| !c.is_empty());
            (observed == generation && has_conditions)
                .then_some(())
                .ok_or(format!("status {status}"))
        })
        .await;

    let events = Api::<Event>::namespaced(admin.clone(), &collectors_namespace);
    operator
        .eventually("an Event about the collector is published", || async {
            let listed = events
                .list(&ListParams::default())
                .await
                .map_err(|e| e.to_string())?;
            listed
                .items
                .iter()
                .any(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("central"))
                .then_some(())
                .ok_or(format!("{} Events, none about central", listed.items.len()))
        })
        .await;

    // Admission: a pod in a labelled namespace gets the sidecar.
    let app_namespace = control_plane
        .new_namespace("app")
        .await
        .expect("app namespace");
    Api::<Namespace>::all(admin.clone())
        .patch(
            &app_namespace,
            &PatchParams::default(),
            &Patch::Merge(
                json!({ "metadata": { "labels": { "metering.tally.dev/inject": "enabled" } } }),
            ),
        )
        .await
        .expect("namespace labelled for injection");
    let pods = Api::<Pod>::namespaced(admin.clone(), &app_namespace);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": { "name": "web" },
        "spec": { "containers": [{ "name": "web", "image": "registry.invalid/web:1" }] }
    }))
    .expect("a Pod");
    // The API server picks up a new webhook configuration within a moment; until then (and until the webhook has
    // seen the collector) pods are admitted unchanged (failurePolicy Ignore), so probe with dry runs first.
    operator
        .eventually(
            "a dry-run pod in the labelled namespace is injected",
            || injected_in_dry_run(&pods, &pod),
        )
        .await;
    let created = pods
        .create(&PostParams::default(), &pod)
        .await
        .expect("pod created");
    assert!(
        has_sidecar(&created),
        "the pod was admitted without tally-sidecar: {:?}",
        created.spec
    );

    // The certificate is renewed (a third of CERT_VALIDITY before it expires) in the same Secret, and pods are
    // still injected afterwards.
    operator
        .eventually(
            "the webhook certificate is renewed in its Secret",
            || async {
                let secret = secrets.get(&secret_name).await.map_err(|e| e.to_string())?;
                (secret.metadata.resource_version != first_certificate)
                    .then_some(())
                    .ok_or(format!("resourceVersion still {first_certificate:?}"))
            },
        )
        .await;
    let other: Pod = serde_json::from_value(json!({
        "metadata": { "name": "web-after-renewal" },
        "spec": { "containers": [{ "name": "web", "image": "registry.invalid/web:1" }] }
    }))
    .expect("a Pod");
    operator
        .eventually("a pod is injected after the certificate renewal", || {
            injected_in_dry_run(&pods, &other)
        })
        .await;

    // Some calls fail without stopping the operator (an Event, a retried watch): none may have been refused.
    let log = operator.log();
    assert!(
        !log.to_lowercase().contains("forbidden"),
        "the chart's RBAC refused a request of the operator:\n{log}"
    );
}

/// Whether the pod has the native sidecar `tally-sidecar` (an init container with `restartPolicy: Always`).
fn has_sidecar(pod: &Pod) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.init_containers.as_ref())
        .is_some_and(|c| {
            c.iter()
                .any(|c| c.name == "tally-sidecar" && c.restart_policy.as_deref() == Some("Always"))
        })
}

fn kind_of(object: &DynamicObject) -> &str {
    object.types.as_ref().map(|t| t.kind.as_str()).unwrap_or("")
}

/// The body of a `/metrics` page, or why it could not be read.
async fn scrape(url: &str) -> Result<String, String> {
    reqwest::get(url)
        .await
        .map_err(|e| e.to_string())?
        .text()
        .await
        .map_err(|e| e.to_string())
}

/// Whether `object` is a Prometheus Operator or cert-manager object (ServiceMonitor, PrometheusRule, Certificate,
/// Issuer) on a control plane without its CRD, which the caller then skips.
async fn skip_unserved(client: &Client, object: &DynamicObject) -> bool {
    let kind = kind_of(object);
    if !matches!(
        kind,
        "ServiceMonitor" | "PodMonitor" | "PrometheusRule" | "Certificate" | "Issuer"
    ) {
        return false;
    }
    let served = is_served(client, object)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    if !served {
        let api_version = object.types.as_ref().map_or("", |t| t.api_version.as_str());
        eprintln!(
            "skipping {kind} {}: the control plane has no {api_version} {kind} CRD",
            object.name_any()
        );
    }
    !served
}

/// The object can be read back from the API server.
async fn assert_exists(client: &Client, object: &DynamicObject) {
    let stored = get(client, object).await.unwrap_or_else(|e| panic!("{e}"));
    assert!(
        stored.metadata.creation_timestamp.is_some() && stored.uid().is_some(),
        "{} {} does not exist after the apply",
        kind_of(object),
        object.name_any()
    );
}

/// Whether the admission webhooks inject `pod`, found with a dry run (nothing is created).
async fn injected_in_dry_run(pods: &Api<Pod>, pod: &Pod) -> Result<(), String> {
    let dry_run = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    let created = pods
        .create(&dry_run, pod)
        .await
        .map_err(|e| e.to_string())?;
    has_sidecar(&created)
        .then_some(())
        .ok_or_else(|| "not injected yet".to_string())
}

/// Asserts that the operator args of the `values` rendering have `expected`.
fn assert_has_arg(args: &[String], expected: &str, values: &str) {
    assert!(
        args.iter().any(|a| a == expected),
        "{values} args {args:?} lack {expected}"
    );
}

/// The value of `--name=value` in `args`.
fn arg_value(args: &[String], name: &str) -> String {
    let prefix = format!("{name}=");
    args.iter()
        .find_map(|a| a.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("the chart's operator args {args:?} have no {name}"))
        .to_string()
}

/// A kubeconfig for the control plane that authenticates with a bearer `token` and nothing else.
fn write_token_kubeconfig(control_plane: &ControlPlane, dir: &Path, token: &str) -> PathBuf {
    let admin = Kubeconfig::read_from(control_plane.kubeconfig_path()).expect("admin kubeconfig");
    let ca = admin
        .clusters
        .first()
        .and_then(|c| c.cluster.as_ref())
        .and_then(|c| c.certificate_authority.clone())
        .expect("the admin kubeconfig names the CA file");
    let kubeconfig = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{ "name": "e2e", "cluster": {
            "server": control_plane.server_url(), "certificate-authority": ca } }],
        "users": [{ "name": "tally-operator", "user": { "token": token } }],
        "contexts": [{ "name": "e2e", "context": { "cluster": "e2e", "user": "tally-operator" } }],
        "current-context": "e2e",
    });
    let path = dir.join("operator.kubeconfig");
    fs::write(&path, serde_yaml::to_string(&kubeconfig).expect("YAML"))
        .expect("kubeconfig written");
    path
}

/// The real `tally-operator run`, its output in a log file, killed when dropped.
struct Operator {
    child: Child,
    log: PathBuf,
}

impl Operator {
    fn binary() -> PathBuf {
        match std::env::var_os("TALLY_OPERATOR_BIN").filter(|v| !v.is_empty()) {
            Some(path) => PathBuf::from(path),
            None => {
                let target = std::env::var_os("CARGO_TARGET_DIR")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
                target.join("release").join("tally-operator")
            }
        }
    }

    fn start(
        args: &[String],
        kubeconfig: &Path,
        namespace: &str,
        identity: &str,
        dir: &Path,
    ) -> Self {
        let binary = Self::binary();
        assert!(
            binary.is_file(),
            "{} is missing: run `make build` (or set TALLY_OPERATOR_BIN)",
            binary.display()
        );
        let log = dir.join("tally-operator.log");
        let file = fs::File::create(&log).expect("log file");
        let child = Command::new(&binary)
            .args(args)
            .env("KUBECONFIG", kubeconfig)
            .env("POD_NAMESPACE", namespace)
            .env("POD_NAME", identity)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log file handle"))
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", binary.display()));
        Operator { child, log }
    }

    /// [`eventually`], failing at once when the operator has exited, with its log in the message.
    async fn eventually<T>(
        &mut self,
        what: &str,
        mut check: impl AsyncFnMut() -> Result<T, String>,
    ) -> T {
        let child = &mut self.child;
        let outcome = poll(ACT_WITHIN, API_INTERVAL, async || match check().await {
            Ok(value) => ControlFlow::Break(Ok(value)),
            Err(last) => match child.try_wait() {
                Ok(Some(status)) => ControlFlow::Break(Err((status, last))),
                _ => ControlFlow::Continue(last),
            },
        })
        .await;
        match outcome {
            Ok(Ok(value)) => value,
            Ok(Err((status, last))) => panic!(
                "{what}: tally-operator exited ({status}); last check: {last}\nits log:\n{}",
                self.log_tail()
            ),
            Err(last) => panic!(
                "{what}: not within {ACT_WITHIN:?}; last check: {last}\ntally-operator's log:\n{}",
                self.log_tail()
            ),
        }
    }
}

impl Operator {
    /// The operator's log so far.
    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last 40 lines of the operator's log.
    fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `check` (API calls) until it succeeds or [`ACT_WITHIN`] has passed, then fails with its last answer.
async fn eventually<T>(what: &str, check: impl AsyncFnMut() -> Result<T, String>) -> T {
    poll_until_ok(ACT_WITHIN, API_INTERVAL, what, check).await
}
