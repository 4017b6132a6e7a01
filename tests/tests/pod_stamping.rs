//! The injected sidecar's view of the data path, through the real binary: its configuration comes from the
//! `TALLY_CONFIG_YAML` environment variable, it learns its pod from `POD_NAMESPACE` / `POD_NAME` (what the downward
//! API sets), stamps `k8snamespace` and `k8spod` on events lacking them, and never overrides what a sender set; a
//! collector with `excludeNamespaces` drops (and counts) events stamped with an excluded namespace.

use std::time::Duration;

use serde_json::{Value, json};
use tally_tests::events::id_of;
use tally_tests::{Sidecar, SidecarBuilder, TestUpstream, event};

const DELIVERY: Duration = Duration::from_secs(30);

fn pod_env(builder: SidecarBuilder, namespace: &str, pod: &str) -> SidecarBuilder {
    builder
        .set(
            "pod",
            json!({ "namespaceFrom": { "env": "POD_NAMESPACE" }, "nameFrom": { "env": "POD_NAME" } }),
        )
        .env("POD_NAMESPACE", namespace)
        .env("POD_NAME", pod)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inline_configured_sidecar_stamps_its_pod_on_events_lacking_it() {
    let upstream = TestUpstream::start().await;
    let sidecar = pod_env(
        Sidecar::builder().openmeter_output("upstream", &upstream.url()),
        "shop",
        "api-7f9c-x2",
    )
    .inline_config()
    .start()
    .await;

    let plain = event("plain-1");
    let mut own = event("own-1");
    own["k8snamespace"] = json!("billing");
    own["k8spod"] = json!("batch-0");
    sidecar.send_ok(&[plain.clone(), own.clone()]).await;
    upstream
        .wait_delivered(["plain-1", "own-1"], DELIVERY)
        .await;
    let delivered = upstream.delivered_events();

    let by_id = |id: &str| -> Value {
        delivered
            .iter()
            .find(|e| id_of(e) == id)
            .cloned()
            .unwrap_or_else(|| panic!("event {id} not delivered: {delivered:?}"))
    };
    let mut expected = plain.clone();
    expected["k8snamespace"] = json!("shop");
    expected["k8spod"] = json!("api-7f9c-x2");
    assert_eq!(
        by_id("plain-1").to_string(),
        expected.to_string(),
        "the pod attributes are appended after the sender's attributes, which are unchanged"
    );
    assert_eq!(
        by_id("own-1").to_string(),
        own.to_string(),
        "attributes the sender set are never overridden"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_without_its_pod_variables_refuses_to_start() {
    let mut sidecar = Sidecar::builder()
        .set(
            "pod",
            json!({ "nameFrom": { "env": "TALLY_TEST_POD_NAME_NOT_SET" } }),
        )
        .inline_config()
        .build();
    sidecar.spawn();
    let status = sidecar.wait_exit(Duration::from_secs(20)).await;
    assert!(!status.success(), "started without knowing its pod");
    assert!(
        sidecar
            .stderr()
            .contains("pod.nameFrom: environment variable TALLY_TEST_POD_NAME_NOT_SET is not set"),
        "the error names the key and the variable: {}",
        sidecar.stderr()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_and_inline_configuration_together_are_refused() {
    let mut sidecar = Sidecar::builder()
        .env("TALLY_CONFIG_YAML", "log: { level: info }")
        .build();
    sidecar.spawn();
    let status = sidecar.wait_exit(Duration::from_secs(20)).await;
    assert_eq!(status.code(), Some(2), "a configuration error exits 2");
    assert!(
        sidecar.stderr().contains("TALLY_CONFIG_YAML")
            && sidecar.stderr().contains("use one of them"),
        "{}",
        sidecar.stderr()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_drops_events_its_sidecars_stamped_with_an_excluded_namespace() {
    let upstream = TestUpstream::start().await;
    let collector = Sidecar::builder()
        .openmeter_output("upstream", &upstream.url())
        .set("excludeNamespaces", json!(["tally-system"]))
        .start()
        .await;
    let metered = pod_env(
        Sidecar::builder()
            .output(json!({ "name": "collector", "type": "collector", "url": collector.url() })),
        "shop",
        "api-0",
    )
    .start()
    .await;
    let excluded = pod_env(
        Sidecar::builder()
            .output(json!({ "name": "collector", "type": "collector", "url": collector.url() })),
        "tally-system",
        "collector-0",
    )
    .start()
    .await;

    metered.send_ok(&[event("shop-1"), event("shop-2")]).await;
    excluded
        .send_ok(&[event("loop-1"), event("loop-2"), event("loop-3")])
        .await;
    // The excluded sidecar delivered its three events to the collector, which dropped them.
    collector
        .wait_metric(
            DELIVERY,
            "the collector to count 3 events of an excluded namespace",
            "tally_events_dropped_total{reason=\"excluded_namespace\"}",
            |dropped| dropped == 3.0,
        )
        .await;
    upstream
        .wait_delivered(["shop-1", "shop-2"], DELIVERY)
        .await;
    let delivered = upstream.delivered_events();
    let ids: Vec<&str> = delivered.iter().map(id_of).collect();
    assert_eq!(
        ids.len(),
        2,
        "only the metered namespace's events arrive: {ids:?}"
    );
    for event in &delivered {
        assert_eq!(
            (&event["k8snamespace"], &event["k8spod"]),
            (&json!("shop"), &json!("api-0")),
            "{event}"
        );
    }
}
