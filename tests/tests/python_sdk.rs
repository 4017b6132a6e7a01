//! The real OpenMeter Python SDK and CloudEvents Python SDK against the sidecar: what they send is
//! accepted, and the upstream receives it unchanged with the output's own credentials.
//!
//! The interpreter comes from `TALLY_PYTHON` (exported by the Makefile), else the virtualenv at
//! `${XDG_CACHE_HOME:-$HOME/.cache}/tally/venv`; see tests/python/requirements.txt.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::{Value, json};
use tally_tests::python::{python_interpreter, script};
use tally_tests::{Sidecar, TestUpstream};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openmeter_and_cloudevents_sdks_send_through_the_sidecar() {
    let python = python_interpreter();
    let upstream = TestUpstream::start().await;
    let sidecar = Sidecar::builder()
        .openmeter_output("upstream", &upstream.url())
        .set("outputs.targets.0.token", json!("upstream-token"))
        .set("ingest.authToken", json!("client-token"))
        .start()
        .await;

    let output = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new(&python)
            .arg(script("send_with_sdk.py"))
            .args(["--url", &sidecar.url()])
            .args(["--token", "client-token"])
            .args(["--prefix", "py"])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap_or_else(|_| panic!("send_with_sdk.py still runs after 2 minutes"))
    .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "send_with_sdk.py failed ({}):\nstdout:\n{stdout}\nstderr:\n{stderr}",
        output.status
    );
    let report: Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("send_with_sdk.py printed no JSON report ({e}): {stdout}"));
    let requests: HashMap<&str, &Value> = report["requests"]
        .as_array()
        .unwrap_or_else(|| panic!("no requests in {report}"))
        .iter()
        .map(|r| (r["mode"].as_str().unwrap_or_default(), r))
        .collect();

    // What the SDKs put on the wire.
    let single = requests["sdk-single"];
    assert_eq!(single["contentType"], "application/cloudevents+json");
    assert_eq!(single["authorization"], "Bearer client-token");
    let batch = requests["sdk-batch"];
    assert_eq!(batch["contentType"], "application/cloudevents-batch+json");
    let structured = requests["ce-structured"];
    let binary = requests["ce-binary"];
    assert!(
        binary["headers"]["ce-id"].is_string(),
        "binary mode: {binary}"
    );

    // Every event sent as a JSON document arrives byte-for-byte (attributes, extensions, order).
    let mut expected: Vec<Value> = vec![single["body"].clone(), structured["body"].clone()];
    expected.extend(batch["body"].as_array().cloned().unwrap_or_default());
    assert_eq!(expected.len(), 7);
    let binary_id = binary["headers"]["ce-id"].as_str().unwrap_or_default();
    let ids: Vec<&str> = expected
        .iter()
        .map(|e| e["id"].as_str().unwrap_or_default())
        .chain([binary_id])
        .collect();
    upstream.wait_delivered(ids, Duration::from_secs(30)).await;
    sidecar.flush_to(&upstream).await;
    let delivered = upstream.delivered_events();
    let find = |id: &str| -> &Value {
        let copies: Vec<&Value> = delivered.iter().filter(|e| e["id"] == id).collect();
        assert_eq!(copies.len(), 1, "{id} delivered once");
        copies[0]
    };
    for event in &expected {
        let id = event["id"].as_str().unwrap_or_default();
        assert_eq!(
            find(id).to_string(),
            event.to_string(),
            "{id} must reach the upstream as the SDK sent it"
        );
    }
    assert_eq!(find("py-sdk-0")["k8snamespace"], "shop");
    assert_eq!(find("py-sdk-0")["k8spod"], "cart-0");
    assert_eq!(find("py-sdk-3")["region"], "eu-west-1");

    // A binary-mode event arrives as a structured event with the same attributes.
    let headers = &binary["headers"];
    let arrived = find(binary_id);
    for (attribute, header) in [
        ("specversion", "ce-specversion"),
        ("source", "ce-source"),
        ("type", "ce-type"),
        ("subject", "ce-subject"),
        ("time", "ce-time"),
        ("k8spod", "ce-k8spod"),
    ] {
        assert_eq!(
            arrived[attribute], headers[header],
            "binary mode {header} becomes {attribute}: {arrived}"
        );
    }
    assert_eq!(
        arrived["data"], binary["body"],
        "the body is data: {arrived}"
    );

    // The upstream sees the output's token, never the client's.
    for request in upstream.requests() {
        assert_eq!(
            request.header("content-type"),
            Some("application/cloudevents-batch+json")
        );
        assert_eq!(
            request.header("authorization"),
            Some("Bearer upstream-token")
        );
    }
}
