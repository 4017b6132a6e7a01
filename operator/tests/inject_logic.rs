//! The injection webhook's pure parts, from YAML fixtures and without a cluster: which pods are injected, which
//! collector they forward to, the JSONPatch (applied here to the pod, as the API server would), the sidecar and
//! its configuration, the MutatingWebhookConfiguration, the certificate lifecycle, and a whole AdmissionReview
//! round trip through the handler, including a reinvocation.

mod support;

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::prelude::BASE64_STANDARD;
use k8s_openapi::api::core::v1::{Container, Pod};
use kube::core::DeserializeGuard;
use kube::runtime::{reflector, watcher};
use serde_json::{Value, json};
use support::env;
use tally_operator::caches::CollectorView;
use tally_operator::crd::MeteringCollector;
use tally_operator::inject::certs::{self, Assessment, CertificateSettings};
use tally_operator::inject::config::{
    FailurePolicy, NAMESPACE_WEBHOOK, POD_WEBHOOK, WebhookEndpoint, webhook_configuration,
};
use tally_operator::inject::metrics::{AdmissionLabels, WebhookMetrics};
use tally_operator::inject::server::Injector;
use tally_operator::inject::{
    self, Decision, INJECTED_ANNOTATION, SIDECAR_LABEL, SIDECAR_LABEL_VALUE, SIDECAR_NAME,
    SkipReason, decide, sidecar_config,
};
use tally_sidecar::config::{Config, OutputKind, SecretSource};
use time::OffsetDateTime;
use tokio::sync::Notify;

const COLLECTOR: &str = r#"
apiVersion: metering.tally.dev/v1alpha1
kind: MeteringCollector
metadata: { name: meter, namespace: tally }
spec:
  image: registry.invalid/tally-sidecar:1
  service: { port: 8080 }
  injection:
    enabled: true
    sidecarImage: registry.invalid/tally-sidecar:injected
    resources: { requests: { cpu: 10m, memory: 32Mi }, limits: { memory: 128Mi } }
  excludeNamespaces: [batch]
"#;

const POD: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  generateName: web-
  labels: { app: web }
spec:
  initContainers:
    - { name: setup, image: registry.invalid/setup:1 }
  containers:
    - { name: app, image: registry.invalid/app:1 }
    - name: custom
      image: registry.invalid/app:1
      env: [ { name: OPENMETER_URL, value: "http://elsewhere:1234" }, { name: OTHER, value: x } ]
    - name: other-env
      image: registry.invalid/app:1
      env: [ { name: OTHER, value: x } ]
"#;

fn collector(yaml: &str) -> MeteringCollector {
    serde_yaml::from_str(yaml).expect("fixture is a MeteringCollector")
}

fn pod(yaml: &str) -> Pod {
    serde_yaml::from_str(yaml).expect("fixture is a Pod")
}

fn static_excluded() -> BTreeSet<String> {
    BTreeSet::from(["tally-system".to_string(), "kube-system".to_string()])
}

/// Applies the decision's patch to the pod as the API server would, or fails the test.
fn injected(pod: &Pod, namespace: &str, collectors: &[&MeteringCollector]) -> Pod {
    let decision = decide(pod, namespace, collectors, &static_excluded()).expect("decide");
    let Decision::Inject { collector, patch } = decision else {
        panic!("expected an injection, got {decision:?}");
    };
    assert_eq!(collector, "tally/meter");
    let mut document = serde_json::to_value(pod).expect("pod JSON");
    json_patch::patch(&mut document, &patch).expect("the patch applies to the pod");
    serde_json::from_value(document).expect("the patched pod is a Pod")
}

fn skipped(
    pod: &Pod,
    namespace: &str,
    collectors: &[&MeteringCollector],
) -> (SkipReason, Option<String>) {
    match decide(pod, namespace, collectors, &static_excluded()).expect("decide") {
        Decision::Skip { reason, warning } => (reason, warning),
        other => panic!("expected no injection, got {other:?}"),
    }
}

#[test]
fn an_opted_in_pod_gets_the_native_sidecar_the_volume_the_url_and_the_annotation() {
    let pod = injected(&pod(POD), "apps", &[&collector(COLLECTOR)]);
    let spec = pod.spec.as_ref().expect("spec");
    let init: Vec<_> = spec
        .init_containers
        .iter()
        .flatten()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(init, [SIDECAR_NAME, "setup"], "the sidecar starts first");
    let sidecar = &spec.init_containers.as_ref().expect("init containers")[0];
    assert_eq!(sidecar.restart_policy.as_deref(), Some("Always"));
    assert_eq!(
        sidecar.image.as_deref(),
        Some("registry.invalid/tally-sidecar:injected")
    );
    assert_eq!(sidecar.args, None);

    // The configuration travels in the environment and is exactly sidecar_config().
    let yaml = env(sidecar, "TALLY_CONFIG_YAML").expect("TALLY_CONFIG_YAML");
    let config =
        Config::parse(yaml, "TALLY_CONFIG_YAML").expect("the sidecar accepts its configuration");
    assert_eq!(config, sidecar_config(&collector(COLLECTOR)));
    let field_paths: Vec<_> = sidecar
        .env
        .iter()
        .flatten()
        .filter_map(|e| {
            let path = &e.value_from.as_ref()?.field_ref.as_ref()?.field_path;
            Some((e.name.as_str(), path.as_str()))
        })
        .collect();
    assert_eq!(
        field_paths,
        [
            ("POD_NAME", "metadata.name"),
            ("POD_NAMESPACE", "metadata.namespace")
        ]
    );

    let ports = sidecar.ports.as_ref().expect("ports");
    assert_eq!(
        (ports[0].name.as_deref(), ports[0].container_port),
        (Some("tally-http"), 4196)
    );
    let probe_path = |probe: &Option<k8s_openapi::api::core::v1::Probe>| {
        probe.as_ref()?.http_get.as_ref()?.path.clone()
    };
    assert_eq!(
        probe_path(&sidecar.liveness_probe).as_deref(),
        Some("/healthz")
    );
    assert_eq!(
        probe_path(&sidecar.readiness_probe).as_deref(),
        Some("/readyz")
    );
    let resources = sidecar.resources.as_ref().expect("resources");
    assert_eq!(
        resources.requests.as_ref().expect("requests")["cpu"].0,
        "10m"
    );

    let security = sidecar.security_context.as_ref().expect("securityContext");
    assert_eq!(security.run_as_non_root, Some(true));
    assert_eq!(security.run_as_user, Some(65532));
    assert_eq!(security.read_only_root_filesystem, Some(true));
    assert_eq!(security.allow_privilege_escalation, Some(false));
    assert_eq!(
        security.capabilities.as_ref().and_then(|c| c.drop.clone()),
        Some(vec!["ALL".to_string()])
    );
    assert_eq!(
        security.seccomp_profile.as_ref().map(|p| p.type_.as_str()),
        Some("RuntimeDefault")
    );

    let volume = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == "tally-buffer")
        .expect("the buffer volume");
    let empty_dir = volume.empty_dir.as_ref().expect("an emptyDir");
    assert_eq!(
        empty_dir.size_limit.as_ref().map(|q| q.0.as_str()),
        Some("256Mi")
    );
    assert!(config.buffer.max_bytes.get() < 256 * 1024 * 1024);
    let mount = &sidecar.volume_mounts.as_ref().expect("mounts")[0];
    assert_eq!(
        (mount.name.as_str(), mount.mount_path.as_str()),
        ("tally-buffer", "/var/lib/tally")
    );
    assert_eq!(config.data_dir.to_str(), Some("/var/lib/tally"));

    // App containers: the URL is added where it is missing, kept where it is set, other variables untouched.
    let containers = &spec.containers;
    assert_eq!(
        env(&containers[0], "OPENMETER_URL"),
        Some("http://127.0.0.1:4196")
    );
    assert_eq!(
        env(&containers[1], "OPENMETER_URL"),
        Some("http://elsewhere:1234")
    );
    assert_eq!(env(&containers[1], "OTHER"), Some("x"));
    assert_eq!(
        env(&containers[2], "OPENMETER_URL"),
        Some("http://127.0.0.1:4196")
    );
    assert_eq!(env(&containers[2], "OTHER"), Some("x"));
    assert_eq!(
        env(
            &spec.init_containers.as_ref().expect("init")[1],
            "OPENMETER_URL"
        ),
        None
    );

    let annotations = pod.metadata.annotations.as_ref().expect("annotations");
    assert_eq!(annotations[INJECTED_ANNOTATION], "tally/meter");
    // The pod's own labels are kept, and the one a PodMonitor selects sidecars by is added.
    let labels = pod.metadata.labels.as_ref().expect("labels");
    assert_eq!(labels["app"], "web");
    assert_eq!(labels[SIDECAR_LABEL], SIDECAR_LABEL_VALUE);
}

#[test]
fn the_patch_escapes_annotation_keys_and_keeps_existing_arrays_and_maps() {
    let with_everything = r#"
apiVersion: v1
kind: Pod
metadata:
  name: busy
  annotations: { "a~b/c": kept }
spec:
  volumes: [ { name: data, emptyDir: {} } ]
  containers: [ { name: app, image: registry.invalid/app:1, env: [] } ]
"#;
    let original = pod(with_everything);
    let Decision::Inject { patch, .. } = decide(
        &original,
        "apps",
        &[&collector(COLLECTOR)],
        &static_excluded(),
    )
    .expect("decide") else {
        panic!("expected an injection");
    };
    let paths: Vec<String> = serde_json::to_value(&patch)
        .expect("patch JSON")
        .as_array()
        .expect("array")
        .iter()
        .map(|op| op["path"].as_str().expect("path").to_string())
        .collect();
    assert!(
        paths.contains(&"/metadata/annotations/metering.tally.dev~1injected".to_string()),
        "{paths:?}"
    );
    assert!(paths.contains(&"/spec/volumes/-".to_string()), "{paths:?}");
    assert!(
        paths.contains(&"/spec/initContainers".to_string()),
        "{paths:?}"
    );

    let pod = injected(&original, "apps", &[&collector(COLLECTOR)]);
    let annotations = pod.metadata.annotations.as_ref().expect("annotations");
    assert_eq!(annotations["a~b/c"], "kept");
    assert_eq!(annotations[INJECTED_ANNOTATION], "tally/meter");
    // A pod without labels gets a map with the sidecar label.
    assert_eq!(
        pod.metadata.labels,
        Some([(SIDECAR_LABEL.to_string(), SIDECAR_LABEL_VALUE.to_string())].into())
    );
    let volumes: Vec<_> = pod
        .spec
        .as_ref()
        .expect("spec")
        .volumes
        .iter()
        .flatten()
        .map(|v| v.name.as_str())
        .collect();
    assert_eq!(volumes, ["data", "tally-buffer"]);

    // A pod with none of the arrays and maps the patch adds to.
    let bare = pod_without_anything();
    let pod = injected(&bare, "apps", &[&collector(COLLECTOR)]);
    let spec = pod.spec.as_ref().expect("spec");
    assert_eq!(spec.init_containers.as_ref().map(Vec::len), Some(1));
    assert_eq!(spec.volumes.as_ref().map(Vec::len), Some(1));
    assert_eq!(
        env(&spec.containers[0], "OPENMETER_URL"),
        Some("http://127.0.0.1:4196")
    );
}

fn pod_without_anything() -> Pod {
    pod(
        "{ apiVersion: v1, kind: Pod, metadata: { name: bare }, spec: { containers: [ { name: app } ] } }",
    )
}

#[test]
fn a_second_admission_of_an_injected_pod_changes_nothing() {
    let once = injected(&pod(POD), "apps", &[&collector(COLLECTOR)]);
    assert_eq!(
        skipped(&once, "apps", &[&collector(COLLECTOR)]).0,
        SkipReason::AlreadyInjected
    );
    // A pod carrying the sidecar without the annotation is not injected twice either.
    let mut sidecar_only = pod(POD);
    if let Some(spec) = sidecar_only.spec.as_mut() {
        spec.containers.push(Container {
            name: SIDECAR_NAME.into(),
            ..Container::default()
        });
    }
    assert_eq!(
        skipped(&sidecar_only, "apps", &[&collector(COLLECTOR)]).0,
        SkipReason::AlreadyInjected
    );
}

#[test]
fn opted_out_own_and_excluded_pods_are_not_injected() {
    let meter = collector(COLLECTOR);
    let collectors = [&meter];
    let labelled = |key: &str, value: &str| {
        let mut pod = pod(POD);
        pod.metadata
            .labels
            .get_or_insert_default()
            .insert(key.into(), value.into());
        pod
    };
    assert_eq!(
        skipped(
            &labelled("metering.tally.dev/inject", "disabled"),
            "apps",
            &collectors
        )
        .0,
        SkipReason::OptedOut
    );
    assert_eq!(
        skipped(
            &labelled("app.kubernetes.io/managed-by", "tally-operator"),
            "apps",
            &collectors
        )
        .0,
        SkipReason::OwnPod
    );
    for namespace in ["batch", "kube-system", "tally-system"] {
        assert_eq!(
            skipped(&pod(POD), namespace, &collectors).0,
            SkipReason::ExcludedNamespace,
            "{namespace}"
        );
    }
    // The excludeNamespaces of a collector that does not inject exclude nothing.
    let passive = collector(
        &COLLECTOR
            .replace("name: meter", "name: passive")
            .replace("enabled: true", "enabled: false")
            .replace("[batch]", "[apps]"),
    );
    injected(&pod(POD), "apps", &[&meter, &passive]);
}

#[test]
fn the_collector_is_the_annotated_one_or_the_only_one() {
    let meter = collector(COLLECTOR);
    let other = collector(&COLLECTOR.replace("namespace: tally", "namespace: apps"));
    let disabled = collector(
        &COLLECTOR
            .replace("name: meter", "name: off")
            .replace("enabled: true", "enabled: false"),
    );

    let (reason, warning) = skipped(&pod(POD), "apps", &[&disabled]);
    assert_eq!(reason, SkipReason::NoCollector);
    assert_eq!(
        warning.as_deref(),
        Some("tally-sidecar not injected: no MeteringCollector has spec.injection.enabled: true")
    );

    let (reason, warning) = skipped(&pod(POD), "web", &[&meter, &other]);
    assert_eq!(reason, SkipReason::AmbiguousCollector);
    let warning = warning.expect("a warning");
    assert!(warning.contains("2 MeteringCollectors"), "{warning}");
    assert!(warning.contains("apps/meter, tally/meter"), "{warning}");
    assert!(
        warning.contains("metering.tally.dev/collector"),
        "{warning}"
    );

    let annotated = |value: &str| {
        let mut pod = pod(POD);
        pod.metadata
            .annotations
            .get_or_insert_default()
            .insert("metering.tally.dev/collector".into(), value.into());
        pod
    };
    // `<namespace>/<name>`, and `<name>` in the pod's own namespace.
    injected(&annotated("tally/meter"), "web", &[&meter, &other]);
    injected(&annotated("meter"), "tally", &[&meter, &other]);
    let (reason, warning) = skipped(&annotated("tally/off"), "web", &[&meter, &disabled]);
    assert_eq!(reason, SkipReason::NoCollector);
    assert!(warning.expect("a warning").contains("names tally/off"));
}

#[test]
fn the_sidecar_configuration_forwards_to_the_collector_service() {
    let config = sidecar_config(&collector(COLLECTOR));
    assert_eq!(config.listen.to_string(), "0.0.0.0:4196");
    assert_eq!(config.data_dir.to_str(), Some("/var/lib/tally"));
    assert_eq!(
        config.pod.namespace_from,
        Some(SecretSource::env("POD_NAMESPACE"))
    );
    assert_eq!(config.pod.name_from, Some(SecretSource::env("POD_NAME")));
    let [target] = config.outputs.targets.as_slice() else {
        panic!("one output: {:?}", config.outputs.targets);
    };
    assert_eq!(target.name, "collector");
    assert_eq!(target.kind, OutputKind::Collector);
    assert_eq!(target.url.as_deref(), Some("http://meter.tally.svc:8080"));
    let yaml = serde_yaml::to_string(&config).expect("YAML");
    assert!(yaml.contains("format: json"), "{yaml}");
    assert!(yaml.contains("durability: sync"), "{yaml}");
    assert!(
        yaml.contains("profile: sidecar"),
        "sized for a sidecar: {yaml}"
    );
    assert_eq!(Config::parse(&yaml, "rendered").expect("valid"), config);
}

#[test]
fn the_configuration_opts_in_by_namespace_or_pod_label_and_excludes_namespaces_and_own_pods() {
    let excluded = inject::excluded_namespaces(&[&collector(COLLECTOR)], &static_excluded());
    let configuration = webhook_configuration(
        "tally-operator",
        &WebhookEndpoint::Url("https://127.0.0.1:9443/mutate".into()),
        "CA PEM",
        &excluded,
        FailurePolicy::Ignore,
    );
    let value = serde_json::to_value(&configuration).expect("JSON");
    let webhooks = value["webhooks"].as_array().expect("webhooks");
    let names: Vec<_> = webhooks
        .iter()
        .map(|w| w["name"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(names, [NAMESPACE_WEBHOOK, POD_WEBHOOK]);
    let not_in = json!({
        "key": "kubernetes.io/metadata.name",
        "operator": "NotIn",
        "values": ["batch", "kube-system", "tally-system"]
    });
    let not_ours = json!({"key": "app.kubernetes.io/managed-by", "operator": "NotIn", "values": ["tally-operator"]});
    for webhook in webhooks {
        assert_eq!(webhook["failurePolicy"], "Ignore");
        assert_eq!(webhook["sideEffects"], "None");
        assert_eq!(webhook["timeoutSeconds"], 5);
        assert_eq!(webhook["reinvocationPolicy"], "IfNeeded");
        assert_eq!(webhook["admissionReviewVersions"], json!(["v1"]));
        assert_eq!(
            webhook["rules"],
            json!([{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["pods"], "scope": "Namespaced"}])
        );
        assert_eq!(
            webhook["clientConfig"]["url"],
            "https://127.0.0.1:9443/mutate"
        );
        // "CA PEM", base64.
        assert_eq!(webhook["clientConfig"]["caBundle"], "Q0EgUEVN");
        assert!(
            webhook["namespaceSelector"]["matchExpressions"]
                .as_array()
                .expect("expressions")
                .contains(&not_in)
        );
        assert!(
            webhook["objectSelector"]["matchExpressions"]
                .as_array()
                .expect("expressions")
                .contains(&not_ours)
        );
    }
    assert_eq!(
        webhooks[0]["namespaceSelector"]["matchLabels"],
        json!({"metering.tally.dev/inject": "enabled"})
    );
    assert!(webhooks[0]["objectSelector"]["matchExpressions"].as_array().expect("expressions").contains(
        &json!({"key": "metering.tally.dev/inject", "operator": "NotIn", "values": ["disabled"]})
    ));
    assert_eq!(webhooks[0]["objectSelector"]["matchLabels"], Value::Null);
    assert_eq!(
        webhooks[1]["objectSelector"]["matchLabels"],
        json!({"metering.tally.dev/inject": "enabled"})
    );
    assert_eq!(webhooks[1]["namespaceSelector"]["matchLabels"], Value::Null);

    let in_cluster = webhook_configuration(
        "tally-operator",
        &WebhookEndpoint::Service {
            namespace: "tally-system".into(),
            name: "tally-operator-webhook".into(),
        },
        "CA PEM",
        &excluded,
        FailurePolicy::Fail,
    );
    let value = serde_json::to_value(&in_cluster).expect("JSON");
    assert_eq!(
        value["webhooks"][0]["clientConfig"]["service"],
        json!({"name": "tally-operator-webhook", "namespace": "tally-system", "path": "/mutate", "port": 443})
    );
    assert_eq!(value["webhooks"][0]["failurePolicy"], "Fail");
}

fn settings(validity: Duration) -> CertificateSettings {
    CertificateSettings {
        namespace: "tally-system".into(),
        secret: "tally-operator-webhook-tls".into(),
        ca_secret: "tally-operator-webhook-ca".into(),
        dns_names: vec![
            "tally-operator-webhook.tally-system.svc".into(),
            "tally-operator-webhook.tally-system.svc.cluster.local".into(),
        ],
        ip_addresses: vec![IpAddr::V4(Ipv4Addr::LOCALHOST)],
        validity,
    }
}

#[test]
fn certificates_are_adopted_while_valid_and_renewed_with_a_third_left() {
    let settings = settings(Duration::from_secs(300));
    let start = OffsetDateTime::now_utc();
    let issued = certs::issue(None, true, &settings, start).expect("issue");
    assert_eq!(
        issued.not_after,
        (start + time::Duration::seconds(300)).unix_timestamp()
    );
    assert_eq!(
        certs::assess(
            &issued.material,
            &settings,
            start + time::Duration::seconds(150)
        ),
        Assessment::Adopt {
            not_after: issued.not_after
        }
    );
    let late = start + time::Duration::seconds(201);
    let Assessment::RenewServing(reason) = certs::assess(&issued.material, &settings, late) else {
        panic!("expected a renewal of the serving certificate");
    };
    assert!(reason.contains("a third"), "{reason}");

    // Renewal keeps the CA: the caBundle the API server has stays right.
    let renewed = certs::issue(Some(&issued.material), false, &settings, late).expect("renew");
    assert_eq!(renewed.material.ca_bundle, issued.material.ca_bundle);
    assert_ne!(renewed.material.cert, issued.material.cert);
    assert_eq!(
        certs::assess(&renewed.material, &settings, late),
        Assessment::Adopt {
            not_after: renewed.not_after
        }
    );

    // A certificate for other names, or with someone else's key, is replaced.
    let other_names = CertificateSettings {
        dns_names: vec!["elsewhere.svc".into()],
        ..settings.clone()
    };
    assert!(matches!(
        certs::assess(&issued.material, &other_names, start),
        Assessment::RenewServing(reason) if reason.contains("elsewhere.svc")
    ));
    let mut wrong_key = issued.material.clone();
    wrong_key.key = renewed.material.key.clone();
    assert!(matches!(
        certs::assess(&wrong_key, &settings, start),
        Assessment::RenewServing(_)
    ));
    let mut foreign_ca = issued.material.clone();
    foreign_ca.ca_key = certs::issue(None, true, &settings, start)
        .expect("issue")
        .material
        .ca_key;
    assert!(matches!(
        certs::assess(&foreign_ca, &settings, start),
        Assessment::RenewCa(_)
    ));
}

#[test]
fn a_new_ca_keeps_the_old_one_in_the_bundle_until_it_expires() {
    let settings = settings(Duration::from_secs(30));
    let start = OffsetDateTime::now_utc();
    let first = certs::issue(None, true, &settings, start).expect("issue");
    // The CA lives ten serving lifetimes; a serving certificate issued later than that minus one would outlive it.
    let near_ca_end = start + time::Duration::seconds(275);
    assert!(matches!(
        certs::assess(&first.material, &settings, near_ca_end),
        Assessment::RenewCa(_)
    ));
    let second = certs::issue(Some(&first.material), true, &settings, near_ca_end).expect("new CA");
    assert!(
        second
            .material
            .ca_bundle
            .ends_with(&first.material.ca_bundle)
    );
    assert_eq!(
        second
            .material
            .ca_bundle
            .matches("BEGIN CERTIFICATE")
            .count(),
        2
    );
    assert_eq!(
        certs::assess(&second.material, &settings, near_ca_end),
        Assessment::Adopt {
            not_after: second.not_after
        }
    );
    // Once the old CA has expired it leaves the bundle.
    let after_old_ca = start + time::Duration::seconds(305);
    let third =
        certs::issue(Some(&second.material), false, &settings, after_old_ca).expect("renew");
    assert_eq!(
        third
            .material
            .ca_bundle
            .matches("BEGIN CERTIFICATE")
            .count(),
        1
    );
    assert!(
        second
            .material
            .ca_bundle
            .starts_with(&third.material.ca_bundle)
    );
}

/// The controller's cache of collectors, as the webhook reads it, holding `collectors`.
fn store(collectors: &[&MeteringCollector]) -> CollectorView {
    let (store, mut writer) = reflector::store();
    for collector in collectors {
        writer.apply_watcher_event(&watcher::Event::Apply(DeserializeGuard(Ok(
            (*collector).clone()
        ))));
    }
    CollectorView {
        store,
        changed: Arc::new(Notify::new()),
    }
}

fn admission_review(pod: &Pod) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "apps",
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": pod,
            "dryRun": false
        }
    }))
    .expect("review JSON")
}

#[test]
fn the_handler_answers_with_a_base64_json_patch_and_nothing_on_reinvocation() {
    let metrics = Arc::new(WebhookMetrics::default());
    let injector = Injector {
        collectors: store(&[&collector(COLLECTOR)]),
        static_excluded: static_excluded(),
        metrics: metrics.clone(),
    };
    let review = injector.review(&admission_review(&pod(POD)));
    let response = &review["response"];
    assert_eq!(review["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(review["kind"], "AdmissionReview");
    assert_eq!(response["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
    assert_eq!(response["allowed"], true);
    assert_eq!(response["patchType"], "JSONPatch");
    let patch: json_patch::Patch = {
        let encoded = response["patch"]
            .as_str()
            .expect("the patch is a base64 string");
        let decoded = BASE64_STANDARD.decode(encoded).expect("base64");
        serde_json::from_slice(&decoded).expect("a JSONPatch")
    };
    let mut document = serde_json::to_value(pod(POD)).expect("pod JSON");
    json_patch::patch(&mut document, &patch).expect("the patch applies");
    let once: Pod = serde_json::from_value(document).expect("pod");
    assert!(inject::is_injected(&once));

    // The API server's reinvocation sends the injected pod again: allowed, no patch.
    let again = injector.review(&admission_review(&once));
    assert_eq!(again["response"]["allowed"], true);
    assert_eq!(again["response"]["patch"], Value::Null);
    assert_eq!(again["response"]["patchType"], Value::Null);

    let count = |result, reason| {
        metrics
            .admissions
            .get_or_create(&AdmissionLabels { result, reason })
            .get()
    };
    assert_eq!(count("injected", "opted_in"), 1);
    assert_eq!(count("skipped", "already_injected"), 1);

    // No collector: admitted unchanged, with a warning, counted.
    let lonely = Injector {
        collectors: store(&[]),
        static_excluded: static_excluded(),
        metrics: metrics.clone(),
    };
    let review = lonely.review(&admission_review(&pod(POD)));
    assert_eq!(review["response"]["allowed"], true);
    assert_eq!(review["response"]["patch"], Value::Null);
    assert_eq!(
        review["response"]["warnings"],
        json!([
            "tally-sidecar not injected: no MeteringCollector has spec.injection.enabled: true"
        ])
    );
    assert_eq!(count("skipped", "no_collector"), 1);

    // Not an AdmissionReview: an error response (the API server applies the failure policy), counted.
    let review = lonely.review(b"{\"kind\": 3}");
    assert_eq!(review["response"]["allowed"], false);
    assert_eq!(count("error", "invalid_review"), 1);
}
