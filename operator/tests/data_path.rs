//! The data path of an injected pod, as real processes (there is no kubelet here): an app sending with the OpenMeter
//! Python SDK to `OPENMETER_URL`, a tally-sidecar configured exactly as the injector renders it (the
//! `TALLY_CONFIG_YAML` of the container [`inject::sidecar_container`] builds, its pod from `POD_NAME` /
//! `POD_NAMESPACE`), forwarding to a collector configured exactly as the operator renders it (the `config.yaml` of
//! the ConfigMap [`build::build`] makes from the README's `MeteringCollector`), forwarding to an OpenMeter-compatible
//! upstream. Only what a kubelet and the cluster provide is replaced (see `tally_tests::pod::localise`): ports on
//! 127.0.0.1, data directories, the mounted token file, and the cluster DNS name of the collector Service.
//!
//! Every acknowledged event arrives upstream with `k8snamespace` and `k8spod`; events from a pod in one of the
//! collector's `excludeNamespaces` are dropped by the collector and counted.

mod support;

use std::time::Duration;

use k8s_openapi::api::core::v1::Container;
use serde_json::Value;
use tally_operator::build::{self, CONFIG_KEY};
use tally_operator::crd::MeteringCollector;
use tally_operator::{inject, validate};
use tally_tests::pod::localise;
use tally_tests::python::{python_interpreter, script};
use tally_tests::{Sidecar, SidecarBuilder, TestUpstream, poll_until};

const DELIVERY: Duration = Duration::from_secs(60);
const EXAMPLE: &str = include_str!("../../config/meteringcollector.yaml");
const TOKEN_PATH: &str = "/var/run/secrets/tally/openmeter/token";

/// The README's collector as the API server would hand it to the operator (the API server assigns the uid).
fn example_collector() -> MeteringCollector {
    let mut collector: MeteringCollector = serde_yaml::from_str(EXAMPLE)
        .expect("config/meteringcollector.yaml is a MeteringCollector");
    collector.metadata.uid = Some("0b7a2f2e-6c1d-4d35-9b4e-2f1a7c9d1e01".into());
    collector
}

/// The value of an environment variable the container sets literally.
fn env_value(container: &Container, name: &str) -> String {
    support::env(container, name)
        .unwrap_or_else(|| panic!("the container {} sets no {name}", container.name))
        .to_string()
}

/// Runs tests/python/metered_app.py with `OPENMETER_URL` pointing at `sidecar`; returns the ids it sent (each one
/// acknowledged with 204, or the script fails).
async fn run_app(sidecar: &Sidecar, prefix: &str, count: usize) -> Vec<String> {
    let python = python_interpreter();
    let output = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new(&python)
            .arg(script("metered_app.py"))
            .args(["--prefix", prefix, "--count", &count.to_string()])
            .env("OPENMETER_URL", sidecar.url())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap_or_else(|_| panic!("metered_app.py still runs after 2 minutes"))
    .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "metered_app.py failed ({}):\nstdout:\n{stdout}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("metered_app.py printed no ids ({e}): {stdout}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_injected_pods_events_reach_the_upstream_stamped_and_excluded_namespaces_do_not() {
    let collector_resource = example_collector();
    let validated =
        validate::validate(&collector_resource).expect("the README's collector is valid");
    let objects = build::build(&validated);
    let rendered_collector = objects
        .config_map
        .data
        .as_ref()
        .and_then(|d| d.get(CONFIG_KEY))
        .cloned()
        .expect("the ConfigMap holds the collector's configuration");
    let sidecar_container =
        inject::sidecar_container(&collector_resource).expect("the injector renders the sidecar");
    let rendered_sidecar = env_value(&sidecar_container, "TALLY_CONFIG_YAML");

    let upstream = TestUpstream::start().await;
    let secret_dir = tempfile::tempdir().expect("tempdir");
    let token_file = secret_dir.path().join("token");
    std::fs::write(&token_file, "upstream-token\n").expect("write the mounted token");
    let token_file = token_file.display().to_string();
    let (collector_yaml, _) = localise(
        &rendered_collector,
        &[("openmeter", &upstream.url())],
        &[(TOKEN_PATH, &token_file)],
    )
    .expect("the collector's configuration");
    let collector = SidecarBuilder::yaml(&collector_yaml).start().await;

    let (sidecar_yaml, _) = localise(&rendered_sidecar, &[("collector", &collector.url())], &[])
        .expect("the sidecar's configuration");
    let injected = |namespace: &str, pod: &str| {
        SidecarBuilder::yaml(&sidecar_yaml)
            .inline_config()
            .env("POD_NAMESPACE", namespace)
            .env("POD_NAME", pod)
    };
    let shop = injected("shop", "checkout-7d9f-abcde").start().await;
    // A pod of an excluded namespace that was injected anyway (say, before the namespace was excluded).
    let monitoring = injected("monitoring", "prometheus-0").start().await;

    let sent = run_app(&shop, "checkout", 41).await;
    let excluded = run_app(&monitoring, "prometheus", 11).await;
    assert_eq!((sent.len(), excluded.len()), (41, 11));

    upstream
        .wait_delivered(sent.iter().map(String::as_str), DELIVERY)
        .await;
    poll_until(
        DELIVERY,
        "the collector to drop the 11 events of the excluded namespace",
        async || {
            let dropped = collector
                .metric("tally_events_dropped_total{reason=\"excluded_namespace\"}")
                .await;
            (dropped == 11.0).then_some(())
        },
    )
    .await;

    let delivered = upstream.delivered_events();
    let ids: Vec<&str> = delivered.iter().filter_map(|e| e["id"].as_str()).collect();
    let mut unique = ids.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(
        unique.len(),
        sent.len(),
        "exactly the acknowledged events of the metered pod arrive: {unique:?}"
    );
    for event in &delivered {
        assert_eq!(
            (&event["k8snamespace"], &event["k8spod"]),
            (&Value::from("shop"), &Value::from("checkout-7d9f-abcde")),
            "every event carries its pod: {event}"
        );
    }
    // The collector forwards with the token from the mounted Secret.
    let requests = upstream.requests();
    assert!(!requests.is_empty());
    for request in requests {
        assert_eq!(
            request.header("authorization"),
            Some("Bearer upstream-token")
        );
    }
    assert_eq!(shop.metric("tally_events_accepted_total").await, 41.0);
    assert_eq!(collector.metric("tally_events_accepted_total").await, 41.0);
}
