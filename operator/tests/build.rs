//! The validate, build and status stages, without a cluster: small YAML fixtures in, Kubernetes objects out.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Container, PodSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tally_operator::build::{self, CONFIG_HASH_ANNOTATION, CollectorObjects};
use tally_operator::crd::MeteringCollector;
use tally_operator::drain;
use tally_operator::status::{self, Observation};
use tally_operator::validate::{self, ValidatedCollector};
use tally_sidecar::config::Config;

/// A collector as the API server hands it out: namespaced, with a uid and a generation.
const COLLECTOR: &str = r#"
apiVersion: metering.tally.dev/v1alpha1
kind: MeteringCollector
metadata:
  name: meter
  namespace: billing
  uid: 6c1f7c4e-0000-4000-8000-000000000001
  generation: 3
spec:
  replicas: 2
  image: registry.example/tally-sidecar:1.2.3
  storage: { size: 5Gi, storageClassName: fast }
  service: { port: 8080, type: NodePort }
  pipeline:
    listen: 0.0.0.0:4196
    dataDir: /data/buffer
    shutdownTimeout: 20s
    outputs:
      targets:
        - name: openmeter
          type: openmeter
          url: https://openmeter.cloud
          tokenFrom: { file: /var/run/secrets/tally/openmeter/token }
        - name: hooks
          type: webhook
          url: https://hooks.example/tally
          secretFrom: { file: /var/run/secrets/tally/webhook/signing-key }
          caFile: /var/run/secrets/tally/webhook/ca.crt
"#;

fn collector(yaml: &str) -> MeteringCollector {
    serde_yaml::from_str(yaml).expect("fixture is a MeteringCollector")
}

fn validated(yaml: &str) -> ValidatedCollector {
    validate::validate(&collector(yaml)).expect("fixture is valid")
}

fn objects() -> CollectorObjects {
    build::build(&validated(COLLECTOR))
}

fn labels() -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".into(), "tally-collector".into()),
        ("app.kubernetes.io/instance".into(), "meter".into()),
        (
            "app.kubernetes.io/managed-by".into(),
            "tally-operator".into(),
        ),
    ])
}

fn pod_spec(stateful_set: &StatefulSet) -> &PodSpec {
    stateful_set.spec.template.spec.as_ref().expect("pod spec")
}

fn collector_container(stateful_set: &StatefulSet) -> &Container {
    let containers = &pod_spec(stateful_set).containers;
    assert_eq!(containers.len(), 1, "one container: {containers:?}");
    &containers[0]
}

#[test]
fn every_child_is_labelled_and_owned_by_the_collector() {
    let CollectorObjects {
        config_map,
        service,
        headless_service,
        pod_disruption_budget,
        stateful_set,
        node_agent,
    } = objects();
    assert!(node_agent.is_none(), "no node agent unless enabled");
    let metas: [(&str, &ObjectMeta); 5] = [
        ("meter-config", &config_map.metadata),
        ("meter", &service.metadata),
        ("meter-headless", &headless_service.metadata),
        ("meter", &pod_disruption_budget.metadata),
        ("meter", &stateful_set.metadata),
    ];
    for (name, meta) in metas {
        assert_eq!(meta.name.as_deref(), Some(name));
        assert_eq!(meta.namespace.as_deref(), Some("billing"));
        assert_eq!(meta.labels.as_ref(), Some(&labels()), "{name}");
        let owners = meta.owner_references.as_ref().expect("owner references");
        assert_eq!(owners.len(), 1, "{name}");
        let owner = &owners[0];
        assert_eq!(owner.api_version, "metering.tally.dev/v1alpha1");
        assert_eq!(owner.kind, "MeteringCollector");
        assert_eq!(owner.name, "meter");
        assert_eq!(owner.uid, "6c1f7c4e-0000-4000-8000-000000000001");
        assert_eq!(owner.controller, Some(true));
    }
    assert_eq!(
        stateful_set
            .spec
            .template
            .metadata
            .as_ref()
            .and_then(|m| m.labels.as_ref()),
        Some(&labels())
    );
}

#[test]
fn config_map_holds_the_rendered_pipeline_and_its_hash_is_on_the_pod_template() {
    let objects = objects();
    let rendered = objects
        .config_map
        .data
        .as_ref()
        .and_then(|d| d.get("config.yaml"))
        .expect("config.yaml in the ConfigMap");
    // The collector's own loader reads it back to the spec's pipeline.
    let loaded = Config::parse(rendered, "config.yaml").expect("the collector accepts it");
    assert_eq!(loaded, collector(COLLECTOR).spec.pipeline);

    let annotations = objects
        .stateful_set
        .spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.annotations.clone())
        .expect("pod-template annotations");
    let hash = annotations
        .get(CONFIG_HASH_ANNOTATION)
        .expect("config hash");
    assert_eq!(hash, &build::config_hash(rendered));
    assert_eq!(hash.len(), 64);

    // A pipeline change changes the hash (rolls the pods); a change elsewhere does not.
    let changed = COLLECTOR.replace("shutdownTimeout: 20s", "shutdownTimeout: 25s");
    assert_ne!(validated(&changed).config_hash, *hash);
    let scaled = COLLECTOR.replace("replicas: 2", "replicas: 3");
    assert_eq!(validated(&scaled).config_hash, *hash);
}

#[test]
fn collector_pods_run_the_sidecar_non_root_on_a_read_only_root_with_probes() {
    let stateful_set = objects().stateful_set;
    let container = collector_container(&stateful_set);
    assert_eq!(
        container.image.as_deref(),
        Some("registry.example/tally-sidecar:1.2.3")
    );
    assert_eq!(
        container.args.as_deref(),
        Some(&["--config".to_string(), "/etc/tally/config.yaml".to_string()][..])
    );
    let port = &container.ports.as_ref().expect("ports")[0];
    assert_eq!(
        (port.name.as_deref(), port.container_port),
        (Some("http"), 4196)
    );
    for (probe, path) in [
        (&container.startup_probe, "/healthz"),
        (&container.liveness_probe, "/healthz"),
        (&container.readiness_probe, "/readyz"),
    ] {
        let get = probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .expect("HTTP probe");
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(get.port, IntOrString::String("http".into()));
    }
    // Opening a large backlog happens before the collector listens: the startup probe allows minutes for it, so
    // liveness (which never fails for a full or recovering buffer) cannot restart it mid-recovery.
    let startup = container.startup_probe.as_ref().expect("startup probe");
    let allowance = startup.period_seconds.unwrap_or(10) * startup.failure_threshold.unwrap_or(3);
    assert!(allowance >= 300, "startup allowance {allowance}s");
    let security = container
        .security_context
        .as_ref()
        .expect("container security context");
    assert_eq!(security.read_only_root_filesystem, Some(true));
    assert_eq!(security.allow_privilege_escalation, Some(false));
    assert_eq!(security.run_as_non_root, Some(true));
    assert_eq!(
        security.capabilities.as_ref().and_then(|c| c.drop.clone()),
        Some(vec!["ALL".to_string()])
    );
    let pod = pod_spec(&stateful_set);
    let pod_security = pod.security_context.as_ref().expect("pod security context");
    assert_eq!(pod_security.run_as_non_root, Some(true));
    assert!(pod_security.run_as_user.is_some_and(|uid| uid != 0));
    // The buffer volume must be writable by that user.
    assert_eq!(pod_security.fs_group, pod_security.run_as_user);
    // Long enough to drain for shutdownTimeout (20s).
    assert!(pod.termination_grace_period_seconds.is_some_and(|s| s > 20));

    let annotations = stateful_set
        .spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.annotations.clone())
        .expect("annotations");
    assert_eq!(
        annotations.get("prometheus.io/port").map(String::as_str),
        Some("4196")
    );
    assert_eq!(
        annotations.get("prometheus.io/path").map(String::as_str),
        Some("/metrics")
    );
}

#[test]
fn each_replica_gets_a_retained_buffer_claim_mounted_at_the_data_dir() {
    let stateful_set = objects().stateful_set;
    let spec = &stateful_set.spec;
    assert_eq!(spec.replicas, Some(2));
    assert_eq!(spec.service_name.as_deref(), Some("meter-headless"));
    assert_eq!(spec.pod_management_policy.as_deref(), Some("Parallel"));
    let templates = spec
        .volume_claim_templates
        .as_ref()
        .expect("volumeClaimTemplates");
    assert_eq!(templates.len(), 1);
    let claim = &templates[0];
    assert_eq!(claim.metadata.name.as_deref(), Some("buffer"));
    let claim_spec = claim.spec.as_ref().expect("claim spec");
    assert_eq!(claim_spec.storage_class_name.as_deref(), Some("fast"));
    assert_eq!(
        claim_spec.access_modes.as_deref(),
        Some(&["ReadWriteOnce".to_string()][..])
    );
    let storage = claim_spec
        .resources
        .as_ref()
        .and_then(|r| r.requests.as_ref())
        .and_then(|r| r.get("storage"))
        .expect("storage request");
    assert_eq!(storage.0, "5Gi");
    let retention = spec
        .persistent_volume_claim_retention_policy
        .as_ref()
        .expect("retention policy");
    assert_eq!(retention.when_deleted.as_deref(), Some("Retain"));
    assert_eq!(retention.when_scaled.as_deref(), Some("Retain"));

    let mounts = collector_container(&stateful_set)
        .volume_mounts
        .clone()
        .expect("mounts");
    let buffer = mounts
        .iter()
        .find(|m| m.name == "buffer")
        .expect("buffer mount");
    assert_eq!(buffer.mount_path, "/data/buffer");
    assert_ne!(buffer.read_only, Some(true));
    // The template's claim is the pod's volume; it must not also be declared as a pod volume.
    let volumes = pod_spec(&stateful_set).volumes.clone().unwrap_or_default();
    assert!(volumes.iter().all(|v| v.name != "buffer"), "{volumes:?}");
}

#[test]
fn secrets_referenced_by_outputs_are_mounted_never_copied() {
    let objects = objects();
    let stateful_set = &objects.stateful_set;
    let volumes = pod_spec(stateful_set).volumes.clone().expect("volumes");
    let secret_volumes: BTreeMap<String, String> = volumes
        .iter()
        .filter_map(|v| {
            let secret = v.secret.as_ref()?;
            Some((v.name.clone(), secret.secret_name.clone()?))
        })
        .collect();
    assert_eq!(
        secret_volumes,
        BTreeMap::from([
            ("secret-openmeter".to_string(), "openmeter".to_string()),
            ("secret-webhook".to_string(), "webhook".to_string()),
        ])
    );
    let mounts = collector_container(stateful_set)
        .volume_mounts
        .clone()
        .expect("mounts");
    for (volume, path) in [
        ("secret-openmeter", "/var/run/secrets/tally/openmeter"),
        ("secret-webhook", "/var/run/secrets/tally/webhook"),
    ] {
        let mount = mounts.iter().find(|m| m.name == volume).expect(volume);
        assert_eq!(mount.mount_path, path);
        assert_eq!(mount.read_only, Some(true));
    }
    // The ConfigMap names the files, not their contents; no env var carries a secret either.
    let rendered = &objects.config_map.data.as_ref().expect("data")["config.yaml"];
    assert!(rendered.contains("/var/run/secrets/tally/openmeter/token"));
    assert!(collector_container(stateful_set).env.is_none());
    assert!(collector_container(stateful_set).env_from.is_none());
}

#[test]
fn services_select_the_collector_pods_and_a_budget_keeps_all_but_one() {
    let CollectorObjects {
        service,
        headless_service,
        pod_disruption_budget,
        ..
    } = objects();
    let selector = BTreeMap::from([
        (
            "app.kubernetes.io/name".to_string(),
            "tally-collector".to_string(),
        ),
        (
            "app.kubernetes.io/instance".to_string(),
            "meter".to_string(),
        ),
    ]);
    let spec = service.spec.expect("service spec");
    assert_eq!(spec.type_.as_deref(), Some("NodePort"));
    assert_eq!(spec.selector.as_ref(), Some(&selector));
    let port = &spec.ports.expect("ports")[0];
    assert_eq!(port.port, 8080);
    assert_eq!(port.target_port, Some(IntOrString::String("http".into())));

    let headless = headless_service.spec.expect("headless spec");
    assert_eq!(headless.cluster_ip.as_deref(), Some("None"));
    assert_eq!(headless.selector.as_ref(), Some(&selector));

    let budget = pod_disruption_budget.spec.expect("budget spec");
    assert_eq!(budget.max_unavailable, Some(IntOrString::Int(1)));
    assert_eq!(budget.selector.and_then(|s| s.match_labels), Some(selector));
}

#[test]
fn a_minimal_collector_gets_the_defaults() {
    let minimal = validated(
        r#"
apiVersion: metering.tally.dev/v1alpha1
kind: MeteringCollector
metadata: { name: small, namespace: default, uid: u-1 }
spec: {}
"#,
    );
    assert_eq!(minimal.collector.spec.replicas, 1);
    assert_eq!(minimal.collector.spec.pipeline, Config::default());
    assert!(minimal.secrets.is_empty());
    let objects = build::build(&minimal);
    let mounts = collector_container(&objects.stateful_set)
        .volume_mounts
        .clone()
        .expect("mounts");
    let buffer = mounts
        .iter()
        .find(|m| m.name == "buffer")
        .expect("buffer mount");
    assert_eq!(buffer.mount_path, "/var/lib/tally");
    assert_eq!(
        objects.service.spec.and_then(|s| s.type_),
        Some("ClusterIP".to_string())
    );
}

#[test]
fn invalid_specs_name_the_field_and_the_fix() {
    let cases = [
        (
            COLLECTOR.replace("listen: 0.0.0.0:4196", "listen: 127.0.0.1:4196"),
            "spec.pipeline.listen",
            "0.0.0.0:4196",
        ),
        (
            COLLECTOR.replace(
                "tokenFrom: { file: /var/run/secrets/tally/openmeter/token }",
                "tokenFrom: { env: OPENMETER_TOKEN }",
            ),
            "spec.pipeline.outputs.targets[0].tokenFrom",
            "/var/run/secrets/tally/<secret name>/<key>",
        ),
        (
            COLLECTOR.replace(
                "/var/run/secrets/tally/webhook/signing-key",
                "/etc/signing-key",
            ),
            "spec.pipeline.outputs.targets[1].secretFrom",
            "is not a mounted Secret",
        ),
        (
            COLLECTOR.replace("url: https://openmeter.cloud", "url: ftp://openmeter.cloud"),
            "spec.pipeline.outputs.targets[0].url",
            "http or https",
        ),
        (
            COLLECTOR.replace("dataDir: /data/buffer", "dataDir: /tmp/buffer"),
            "spec.pipeline.dataDir",
            "/var/lib/tally",
        ),
        (
            COLLECTOR.replace("replicas: 2", "replicas: 0"),
            "spec.replicas",
            "at least 1",
        ),
        (
            COLLECTOR.replace("  uid: 6c1f7c4e-0000-4000-8000-000000000001\n", ""),
            "metadata.uid",
            "API server",
        ),
    ];
    for (yaml, field, fix) in cases {
        let error = validate::validate(&collector(&yaml)).expect_err(field);
        assert_eq!(error.field, field, "{error}");
        assert!(error.message.contains(fix), "{error} should say {fix}");
    }
}

fn time(seconds: i64) -> Time {
    Time(k8s_openapi::jiff::Timestamp::from_second(seconds).expect("valid time"))
}

fn stateful_set_status(ready: i32, updated: i32) -> StatefulSet {
    serde_json::from_value(serde_json::json!({
        "metadata": { "name": "meter", "generation": 4 },
        "spec": {
            "selector": {},
            "template": {},
            "serviceName": "meter-headless"
        },
        "status": {
            "observedGeneration": 4,
            "replicas": 2,
            "readyReplicas": ready,
            "updatedReplicas": updated,
            "currentRevision": "meter-1",
            "updateRevision": if updated == 2 { "meter-1" } else { "meter-2" }
        }
    }))
    .expect("StatefulSet")
}

fn condition<'a>(
    status: &'a tally_operator::crd::MeteringCollectorStatus,
    type_: &str,
) -> &'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
    status
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .unwrap_or_else(|| panic!("condition {type_} in {status:?}"))
}

#[test]
fn status_reports_readiness_rollout_and_invalid_specs() {
    let mut collector = collector(COLLECTOR);
    let rolling = stateful_set_status(1, 1);
    let status = status::desired_status(
        &collector,
        &Observation::Applied {
            stateful_set: &rolling,
            storage: None,
            drains: &[],
            node_agent: None,
        },
        &time(100),
    );
    assert_eq!(status.observed_generation, Some(3));
    assert_eq!(status.ready_replicas, 1);
    assert_eq!(
        status.endpoint.as_deref(),
        Some("http://meter.billing.svc:8080")
    );
    let ready = condition(&status, "Ready");
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "ReplicasNotReady")
    );
    assert!(ready.message.contains("1 of 2"), "{}", ready.message);
    assert_eq!(condition(&status, "Progressing").status, "True");
    assert_eq!(condition(&status, "Degraded").status, "False");

    // Later, all ready: Ready and Progressing flip (new transition time); Degraded keeps its old one.
    collector.status = Some(status);
    let done = stateful_set_status(2, 2);
    let status = status::desired_status(
        &collector,
        &Observation::Applied {
            stateful_set: &done,
            storage: None,
            drains: &[],
            node_agent: None,
        },
        &time(200),
    );
    let ready = condition(&status, "Ready");
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("True", "AllReplicasReady")
    );
    assert_eq!(ready.last_transition_time, time(200));
    assert_eq!(condition(&status, "Progressing").status, "False");
    assert_eq!(
        condition(&status, "Degraded").last_transition_time,
        time(100)
    );
    assert_eq!(
        status::transitions(collector.status.as_ref(), &status).len(),
        2
    );

    // The same observation again yields the same status: writing it is a no-op.
    collector.status = Some(status.clone());
    let again = status::desired_status(
        &collector,
        &Observation::Applied {
            stateful_set: &done,
            storage: None,
            drains: &[],
            node_agent: None,
        },
        &time(300),
    );
    assert_eq!(again, status);
    assert!(status::transitions(Some(&status), &again).is_empty());

    let invalid = validate::validate(&self::collector(
        &COLLECTOR.replace("listen: 0.0.0.0:4196", "listen: 127.0.0.1:4196"),
    ))
    .expect_err("invalid");
    let status =
        status::desired_status(&collector, &Observation::InvalidSpec(&invalid), &time(400));
    let degraded = condition(&status, "Degraded");
    assert_eq!(
        (degraded.status.as_str(), degraded.reason.as_str()),
        ("True", "InvalidSpec")
    );
    assert!(
        degraded.message.contains("spec.pipeline.listen"),
        "{}",
        degraded.message
    );
    assert_eq!(condition(&status, "Ready").status, "False");
}

fn claim(name: &str, kept: Option<&str>) -> k8s_openapi::api::core::v1::PersistentVolumeClaim {
    let mut claim = k8s_openapi::api::core::v1::PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("billing".into()),
            ..ObjectMeta::default()
        },
        ..Default::default()
    };
    if let Some(report) = kept {
        claim.metadata.annotations = Some(BTreeMap::from([(
            drain::KEPT_ANNOTATION.to_string(),
            report.to_string(),
        )]));
    }
    claim
}

fn drain_job(name: &str, state: Option<&str>) -> k8s_openapi::api::batch::v1::Job {
    serde_json::from_value(serde_json::json!({
        "metadata": { "name": name, "namespace": "billing" },
        "status": match state {
            Some("Complete") => serde_json::json!({ "succeeded": 1, "conditions": [{ "type": "Complete", "status": "True" }] }),
            Some("Failed") => serde_json::json!({ "failed": 11, "conditions": [{ "type": "Failed", "status": "True" }] }),
            _ => serde_json::json!({ "active": 1 }),
        },
    }))
    .expect("Job")
}

#[test]
fn buffers_of_removed_replicas_are_drained_by_a_job_and_only_empty_ones_deleted() {
    use drain::Step;
    let collector = collector(COLLECTOR); // replicas: 2
    let claims: Vec<_> = [
        ("buffer-meter-0", None),
        ("buffer-meter-1", None),
        ("buffer-meter-2", None),
        ("buffer-meter-3", None),
        ("buffer-meter-4", Some("3 dead letters, 0 damaged records")),
        ("buffer-meter-6", None),
        ("buffer-meter-7", None),
        ("buffer-meter-8", None),
        ("buffer-other-9", None),
        ("scratch", None),
    ]
    .into_iter()
    .map(|(name, kept)| claim(name, kept))
    .collect();
    let pods = ["meter-0", "meter-1", "meter-2"]
        .into_iter()
        .map(String::from)
        .collect();
    let jobs = vec![
        drain_job("meter-drain-5", None),
        drain_job("meter-drain-6", Some("Complete")),
        drain_job("meter-drain-7", Some("Failed")),
        drain_job("meter-drain-8", None),
        drain_job("meter-drain-1", None),
    ];
    let steps = drain::plan(&collector, &claims, &pods, &jobs);
    let claim = |n: i32| format!("buffer-meter-{n}");
    let job = |n: i32| format!("meter-drain-{n}");
    assert_eq!(
        steps,
        vec![
            // Its pod still stops (and delivers what it can meanwhile).
            Step::WaitForPod {
                claim: claim(2),
                pod: "meter-2".into()
            },
            Step::Start {
                claim: claim(3),
                ordinal: 3
            },
            Step::Kept {
                claim: claim(4),
                report: "3 dead letters, 0 damaged records".into()
            },
            Step::Finished {
                claim: claim(6),
                job: job(6)
            },
            Step::Failed {
                claim: claim(7),
                job: job(7)
            },
            Step::Running {
                claim: claim(8),
                job: job(8)
            },
            // Replica 1 is current again (a scale-up during the drain): it delivers its own buffer.
            Step::Cancel { job: job(1) },
            // No claim left for it.
            Step::Cancel { job: job(5) },
        ]
    );
    let (draining, reason, message) = drain::verdict(&steps);
    assert!(draining);
    assert_eq!(reason, "DrainingBuffers");
    for expected in [
        "buffer-meter-2 (waiting for pod meter-2 to stop)",
        "buffer-meter-8 (Job meter-drain-8 delivering)",
    ] {
        assert!(message.contains(expected), "{message}");
    }
    // Only a kept claim left: not draining, and the message says what to do.
    let kept = drain::verdict(&steps[2..3]);
    assert_eq!((kept.0, kept.1), (false, "UndeliveredKept"));
    assert!(
        kept.2.contains("buffer-meter-4 (3 dead letters") && kept.2.contains("dead-letter list"),
        "{}",
        kept.2
    );
    assert_eq!(drain::verdict(&[]).1, "NothingToDrain");

    // The status carries it as the Draining condition.
    let status = status::desired_status(
        &collector,
        &Observation::Applied {
            stateful_set: &stateful_set_status(2, 2),
            storage: None,
            drains: &steps,
            node_agent: None,
        },
        &time(100),
    );
    let condition = condition(&status, "Draining");
    assert_eq!(
        (condition.status.as_str(), condition.reason.as_str()),
        ("True", "DrainingBuffers")
    );
}

#[test]
fn a_drain_job_runs_the_collectors_pipeline_on_the_claim_and_serves_no_traffic() {
    let validated = validated(COLLECTOR);
    let objects = build::build(&validated);
    let job = drain::job(&validated, &objects.stateful_set, "buffer-meter-3", 3);
    assert_eq!(job.metadata.name.as_deref(), Some("meter-drain-3"));
    assert_eq!(
        job.metadata
            .owner_references
            .as_ref()
            .map(|o| o[0].uid.as_str()),
        Some("6c1f7c4e-0000-4000-8000-000000000001")
    );
    let template = &job.spec.as_ref().expect("spec").template;
    let pod_labels = template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .expect("labels");
    // No Service of the collector selects the drain pod, and the operator finds it again by its labels.
    let selector = objects
        .service
        .spec
        .as_ref()
        .and_then(|s| s.selector.clone())
        .expect("selector");
    assert!(
        selector.iter().any(|(k, v)| pod_labels.get(k) != Some(v)),
        "{pod_labels:?}"
    );
    for (k, v) in drain::job_selector_labels(&validated.collector) {
        assert_eq!(pod_labels.get(&k), Some(&v));
    }
    let pod = template.spec.as_ref().expect("pod spec");
    assert_eq!(pod.restart_policy.as_deref(), Some("OnFailure"));
    let container = &pod.containers[0];
    assert_eq!(
        container.args.clone().unwrap_or_default(),
        [
            "drain",
            "--config",
            "/etc/tally/config.yaml",
            "--report",
            "/dev/termination-log"
        ]
    );
    assert!(
        container.ports.is_none()
            && container.readiness_probe.is_none()
            && container.liveness_probe.is_none()
    );
    // Same image, security and mounts as the collector; the buffer volume is the claim.
    let collector = collector_container(&objects.stateful_set);
    assert_eq!(container.image, collector.image);
    assert_eq!(container.security_context, collector.security_context);
    assert_eq!(container.volume_mounts, collector.volume_mounts);
    let buffer = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == "buffer")
        .and_then(|v| v.persistent_volume_claim.as_ref())
        .expect("buffer volume");
    assert_eq!(buffer.claim_name, "buffer-meter-3");
    assert_eq!(
        pod.security_context,
        pod_spec(&objects.stateful_set).security_context
    );
}

#[test]
fn the_drain_report_is_read_from_the_pods_termination_message() {
    let pod = |exit_code: i32, message: &str| -> k8s_openapi::api::core::v1::Pod {
        serde_json::from_value(serde_json::json!({
            "status": { "containerStatuses": [{
                "name": "collector", "image": "x", "imageID": "", "ready": false, "restartCount": 0,
                "state": { "terminated": { "exitCode": exit_code, "message": message } },
            }]},
        }))
        .expect("Pod")
    };
    let empty =
        r#"{"eventsAtStart":120,"drained":120,"remaining":0,"deadLetters":0,"quarantined":0}"#;
    let report = drain::report(&[pod(1, "error"), pod(0, empty)]).expect("report");
    assert_eq!((report.drained, report.is_empty()), (120, true));
    let dead = r#"{"eventsAtStart":5,"drained":5,"remaining":0,"deadLetters":2,"quarantined":0}"#;
    assert!(!drain::report(&[pod(0, dead)]).expect("report").is_empty());
    // No readable report: the claim is kept.
    assert_eq!(drain::report(&[pod(0, "not json")]), None);
    assert_eq!(drain::report(&[]), None);
}

/// [`COLLECTOR`] with its node agent enabled.
fn with_node_agent(extra: &str) -> String {
    COLLECTOR.replace(
        "  replicas: 2\n",
        &format!("  replicas: 2\n  nodeAgent:\n    enabled: true\n{extra}"),
    )
}

#[test]
fn the_node_agent_buffers_on_the_node_and_forwards_to_the_collector() {
    let agent = build::build(&validated(&with_node_agent("")))
        .node_agent
        .expect("an enabled node agent is built");

    let daemon_set = &agent.daemon_set;
    assert_eq!(daemon_set.metadata.name.as_deref(), Some("meter-node"));
    assert_eq!(daemon_set.metadata.namespace.as_deref(), Some("billing"));
    let owners = daemon_set
        .metadata
        .owner_references
        .clone()
        .unwrap_or_default();
    assert_eq!(owners.len(), 1);
    assert_eq!(owners[0].kind, "MeteringCollector");
    let agent_labels = BTreeMap::from([
        (
            "app.kubernetes.io/name".to_string(),
            "tally-node-agent".to_string(),
        ),
        (
            "app.kubernetes.io/instance".to_string(),
            "meter".to_string(),
        ),
    ]);
    assert_eq!(
        daemon_set.spec.selector.match_labels.as_ref(),
        Some(&agent_labels)
    );
    let template_labels = daemon_set
        .spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    // Never selected by the collector's Service, never injected (one of Tally's own pods).
    assert_eq!(
        template_labels
            .get("app.kubernetes.io/name")
            .map(String::as_str),
        Some("tally-node-agent")
    );
    assert_eq!(
        template_labels
            .get("app.kubernetes.io/managed-by")
            .map(String::as_str),
        Some("tally-operator")
    );

    let pod = daemon_set.spec.template.spec.as_ref().expect("pod spec");
    let volumes = pod.volumes.clone().unwrap_or_default();
    let host_path = volumes[0].host_path.clone().expect("a hostPath volume");
    assert_eq!(host_path.path, "/var/lib/tally/billing/meter");
    assert_eq!(host_path.type_.as_deref(), Some("DirectoryOrCreate"));
    assert!(
        pod.tolerations
            .iter()
            .flatten()
            .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none()),
        "runs on tainted nodes too"
    );
    let container = &pod.containers[0];
    assert_eq!(
        container.image.as_deref(),
        Some("registry.example/tally-sidecar:1.2.3")
    );
    let security = container
        .security_context
        .clone()
        .expect("security context");
    assert_eq!(
        security.run_as_user,
        Some(0),
        "writes the root-owned node directory"
    );
    assert_eq!(security.allow_privilege_escalation, Some(false));
    assert_eq!(security.read_only_root_filesystem, Some(true));
    assert_eq!(security.privileged, Some(false));
    assert_eq!(
        security.capabilities.and_then(|c| c.drop),
        Some(vec!["ALL".to_string()]),
        "no capabilities, not even as root"
    );
    assert!(container.startup_probe.is_some() && container.readiness_probe.is_some());

    // Its configuration: buffered on the node directory, synced, forwarded to the collector's Service.
    let yaml = container
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "TALLY_CONFIG_YAML")
        .and_then(|e| e.value.clone())
        .expect("configuration in TALLY_CONFIG_YAML");
    let config = Config::parse(&yaml, "node agent").expect("the sidecar accepts it");
    assert_eq!(config.data_dir, std::path::PathBuf::from("/var/lib/tally"));
    assert_eq!(config.outputs.targets.len(), 1);
    assert_eq!(
        config.outputs.targets[0].url.as_deref(),
        Some("http://meter.billing.svc:8080")
    );
    assert!(
        config.pod.name_from.is_none(),
        "stamps nothing: the sidecars did"
    );

    // The Service reaches the agent on the sender's own node only.
    let service = agent.service.spec.clone().expect("service spec");
    assert_eq!(agent.service.metadata.name.as_deref(), Some("meter-node"));
    assert_eq!(service.internal_traffic_policy.as_deref(), Some("Local"));
    assert_eq!(service.selector.as_ref(), Some(&agent_labels));
    assert_eq!(service.ports.unwrap_or_default()[0].port, 8080);

    // A custom node directory; a relative or climbing one is refused.
    let custom = build::build(&validated(&with_node_agent(
        "    hostPath: /mnt/fast/tally/\n",
    )))
    .node_agent
    .expect("node agent");
    let volumes = custom
        .daemon_set
        .spec
        .template
        .spec
        .and_then(|p| p.volumes)
        .unwrap_or_default();
    assert_eq!(
        volumes[0].host_path.as_ref().map(|h| h.path.as_str()),
        Some("/mnt/fast/tally/billing/meter")
    );
    for bad in ["tally", "/var/lib/../etc"] {
        let error = validate::validate(&collector(&with_node_agent(&format!(
            "    hostPath: {bad}\n"
        ))))
        .expect_err(bad)
        .to_string();
        assert!(
            error.contains("spec.nodeAgent.hostPath") && error.contains("absolute"),
            "{error}"
        );
    }
}

#[test]
fn injected_sidecars_fall_back_to_the_node_agent_only_when_it_is_enabled() {
    use tally_sidecar::config::BrokerPattern;
    let plain = tally_operator::inject::sidecar_config(&collector(COLLECTOR));
    assert_eq!(plain.outputs.pattern, BrokerPattern::FanOut);
    assert_eq!(plain.outputs.targets.len(), 1);
    // Every sidecar shares the collector's connections: a few batches in flight each.
    assert_eq!(plain.outputs.targets[0].max_in_flight, 4);

    let config = tally_operator::inject::sidecar_config(&collector(&with_node_agent("")));
    assert_eq!(config.outputs.pattern, BrokerPattern::Fallback);
    let targets: Vec<(&str, Option<&str>)> = config
        .outputs
        .targets
        .iter()
        .map(|t| (t.name.as_str(), t.url.as_deref()))
        .collect();
    assert_eq!(
        targets,
        [
            ("collector", Some("http://meter.billing.svc:8080")),
            ("node-agent", Some("http://meter-node.billing.svc:8080")),
        ]
    );
    let rendered = serde_yaml::to_string(&config).expect("renders");
    Config::parse(&rendered, "sidecar").expect("the sidecar accepts it");
}

#[test]
fn status_says_whether_the_node_agents_are_ready() {
    let collector = collector(&with_node_agent(""));
    let agent = |desired: i32, ready: i32| k8s_openapi::api::apps::v1::DaemonSet {
        metadata: ObjectMeta {
            generation: Some(1),
            ..ObjectMeta::default()
        },
        status: Some(k8s_openapi::api::apps::v1::DaemonSetStatus {
            desired_number_scheduled: desired,
            number_ready: ready,
            observed_generation: Some(1),
            ..Default::default()
        }),
        ..Default::default()
    };
    let observe = |daemon_set: &k8s_openapi::api::apps::v1::DaemonSet| {
        status::desired_status(
            &collector,
            &Observation::Applied {
                stateful_set: &stateful_set_status(2, 2),
                storage: None,
                drains: &[],
                node_agent: Some(daemon_set),
            },
            &time(100),
        )
    };
    let status = observe(&agent(3, 1));
    let not_ready = condition(&status, "NodeAgentReady");
    assert_eq!(
        (not_ready.status.as_str(), not_ready.reason.as_str()),
        ("False", "AgentsNotReady")
    );
    assert!(
        not_ready.message.contains("1 of 3") && not_ready.message.contains("Pod Security"),
        "{}",
        not_ready.message
    );
    let status = observe(&agent(3, 3));
    let ready = condition(&status, "NodeAgentReady");
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("True", "AgentsReady")
    );
    // Without a node agent there is no such condition.
    let without = status::desired_status(
        &self::collector(COLLECTOR),
        &Observation::Applied {
            stateful_set: &stateful_set_status(2, 2),
            storage: None,
            drains: &[],
            node_agent: None,
        },
        &time(100),
    );
    assert!(
        without
            .conditions
            .iter()
            .all(|c| c.type_ != "NodeAgentReady")
    );
}
