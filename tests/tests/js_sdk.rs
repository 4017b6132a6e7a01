//! The real OpenMeter JavaScript SDK (`@openmeter/sdk`, pinned in tests/js/package.json) against
//! the sidecar: what it sends (arrays, as `application/cloudevents-batch+json`) is accepted, and
//! the upstream receives every event unchanged.
//!
//! The SDK's `node_modules` come from `TALLY_JS_MODULES` (the Makefile's `make js` installs them
//! with `npm ci` from the lock file into the cache and exports the path).

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Value, json};
use tally_tests::{Sidecar, TestUpstream};

fn node_modules() -> PathBuf {
    let path = std::env::var_os("TALLY_JS_MODULES").map(PathBuf::from).unwrap_or_else(|| {
        panic!("TALLY_JS_MODULES is unset: run `make js` (npm ci of tests/js) and export the path it prints")
    });
    assert!(
        path.join("@openmeter/sdk/package.json").is_file(),
        "{} holds no @openmeter/sdk; run `make js`",
        path.display()
    );
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_javascript_sdk_sends_through_the_sidecar() {
    let modules = node_modules();
    let upstream = TestUpstream::start().await;
    let sidecar = Sidecar::builder()
        .openmeter_output("upstream", &upstream.url())
        .set("ingest.authToken", json!("client-token"))
        .start()
        .await;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("js/send_with_sdk.mjs");
    let output = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new("node")
            .arg(&script)
            .arg(&modules)
            .args([sidecar.url().as_str(), "client-token", "js"])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap_or_else(|_| panic!("send_with_sdk.mjs still runs after a minute"))
    .unwrap_or_else(|e| panic!("cannot run node: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "send_with_sdk.mjs failed ({}):\nstdout:\n{stdout}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("no JSON report ({e}): {stdout}"));
    let requests = report["requests"].as_array().cloned().unwrap_or_default();
    assert_eq!(requests.len(), 2, "one request per ingest call: {report}");
    for request in &requests {
        assert_eq!(request["contentType"], "application/cloudevents-batch+json");
        assert_eq!(request["authorization"], "Bearer client-token");
    }
    let sent: Vec<Value> = requests
        .iter()
        .flat_map(|r| r["body"].as_array().cloned().unwrap_or_default())
        .collect();
    assert_eq!(sent.len(), 4, "1 + 3 events");
    let ids: Vec<&str> = sent.iter().filter_map(|e| e["id"].as_str()).collect();
    assert_eq!(
        ids.len(),
        4,
        "the SDK gives an id to the event without one: {sent:?}"
    );
    assert!(
        sent.iter().any(|e| e["source"] == "@openmeter/sdk"),
        "the SDK's default source is used"
    );
    upstream
        .wait_delivered(ids.clone(), Duration::from_secs(30))
        .await;
    sidecar.flush_to(&upstream).await;
    let delivered: Vec<Value> = upstream.delivered_events();
    for event in &sent {
        let found = delivered
            .iter()
            .find(|d| d["id"] == event["id"])
            .unwrap_or_else(|| panic!("{} not delivered", event["id"]));
        assert_eq!(found, event, "delivered exactly as the SDK sent it");
    }
    // Nothing else arrives but the harness's own flush sentinel.
    let distinct: HashSet<&str> = delivered
        .iter()
        .filter_map(|e| e["id"].as_str())
        .filter(|id| !id.starts_with("sentinel-"))
        .collect();
    assert_eq!(distinct, ids.into_iter().collect::<HashSet<_>>());
}
