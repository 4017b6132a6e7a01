//! Deduplication of `(source, id)`, the dead-letter store and its CLI, and `buffer stats`.

use std::time::Duration;

use serde_json::{Value, json};
use tally_tests::events::id_of;
use tally_tests::{
    Behaviour, Sidecar, TestUpstream, assert_problem, event, event_from, poll_until,
};

const DELIVERY: Duration = Duration::from_secs(30);

fn count(upstream: &TestUpstream, source: &str, id: &str) -> usize {
    upstream
        .delivered_keys()
        .iter()
        .filter(|(s, i)| s == source && i == id)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_source_and_id_is_acknowledged_and_delivered_once() {
    let upstream = TestUpstream::start().await;
    let sidecar = Sidecar::builder()
        .openmeter_output("upstream", &upstream.url())
        .start()
        .await;
    sidecar.send_ok(&[event_from("s1", "x")]).await;
    sidecar.send_ok(&[event_from("s1", "x")]).await; // duplicate
    sidecar.send_ok(&[event_from("s2", "x")]).await; // same id, other source: not a duplicate
    sidecar
        .send_ok(&[event_from("s1", "x"), event_from("s1", "y")])
        .await; // one duplicate, one new
    sidecar
        .send_ok(&[event_from("s1", "z"), event_from("s1", "z")])
        .await; // a duplicate inside one batch
    let response = sidecar.post_event(&event_from("s1", "x")).await;
    assert_eq!(response.status(), 204, "a duplicate single event");

    sidecar.flush_to(&upstream).await;
    assert_eq!(count(&upstream, "s1", "x"), 1);
    assert_eq!(count(&upstream, "s2", "x"), 1);
    assert_eq!(count(&upstream, "s1", "y"), 1);
    assert_eq!(count(&upstream, "s1", "z"), 1);
    let metrics = sidecar.metrics().await;
    assert_eq!(metrics.value("tally_events_deduplicated_total"), 4.0);
    assert_eq!(
        metrics.value("tally_events_accepted_total"),
        9.0,
        "duplicates are acknowledged, so accepted (8 sent + the sentinel)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedup_survives_a_sigkill() {
    let upstream = TestUpstream::start().await;
    // The upstream is down, so the first copy is still buffered (not delivered) when the
    // process is killed: a second copy after the restart must be recognised from disk.
    upstream.down().await;
    let mut sidecar = Sidecar::builder()
        .openmeter_output("upstream", &upstream.url())
        .start()
        .await;
    sidecar.send_ok(&[event("kept-once")]).await;
    sidecar.kill9();
    sidecar.restart().await;
    sidecar.send_ok(&[event("kept-once")]).await;
    upstream.up().await;
    sidecar.flush_to(&upstream).await;
    assert_eq!(
        count(&upstream, tally_tests::events::SOURCE, "kept-once"),
        1
    );
    assert_eq!(sidecar.metric("tally_events_deduplicated_total").await, 1.0);

    // And once delivered, a resend is still a duplicate within the window.
    sidecar.send_ok(&[event("kept-once")]).await;
    sidecar.flush_to(&upstream).await;
    assert_eq!(
        count(&upstream, tally_tests::events::SOURCE, "kept-once"),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zero_dedup_window_disables_dedup() {
    let upstream = TestUpstream::start().await;
    let sidecar = Sidecar::builder()
        .openmeter_output("upstream", &upstream.url())
        .set("dedup.window", json!("0s"))
        .start()
        .await;
    sidecar.send_ok(&[event("twice")]).await;
    sidecar.send_ok(&[event("twice")]).await;
    sidecar.flush_to(&upstream).await;
    assert_eq!(count(&upstream, tally_tests::events::SOURCE, "twice"), 2);
    assert_eq!(sidecar.metric("tally_events_deduplicated_total").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_batch_is_dead_lettered_without_blocking_and_replayed_to_its_output_only() {
    let rejecting = TestUpstream::start().await;
    let other = TestUpstream::start().await;
    rejecting.set(Behaviour::RejectIdsStartingWith("poison-".into()));
    let sidecar = Sidecar::builder()
        .openmeter_output("rejecting", &rejecting.url())
        .openmeter_output("other", &other.url())
        .start()
        .await;

    let poison: Vec<Value> = ["poison-1", "poison-2"]
        .iter()
        .map(|id| {
            let mut e = event(id);
            e["k8snamespace"] = json!("shop");
            e
        })
        .collect();
    sidecar.send_ok(&poison).await;
    sidecar
        .wait_metric(
            DELIVERY,
            "the poison batch to be dead-lettered",
            "tally_output_dead_lettered_events_total{output=\"rejecting\"}",
            |dead| dead >= 2.0,
        )
        .await;
    assert!(rejecting.requests().iter().any(|r| r.status == 400));

    // Nothing is blocked behind it, on either output.
    let good: Vec<Value> = (0..5).map(|i| event(&format!("good-{i}"))).collect();
    sidecar.send_ok(&good).await;
    rejecting
        .wait_delivered(good.iter().map(id_of), DELIVERY)
        .await;
    other
        .wait_delivered(good.iter().chain(&poison).map(id_of), DELIVERY)
        .await;

    // The dead-letter store shows the batch, with the upstream's status and the original events.
    let listed = sidecar
        .run_cli(&["dead-letter", "list", "--json"])
        .await
        .assert_success()
        .json_lines();
    assert_eq!(listed.len(), 2, "{listed:?}");
    for (letter, original) in listed.iter().zip(&poison) {
        assert_eq!(letter["output"], "rejecting");
        assert_eq!(letter["status"], 400);
        assert!(letter["key"].is_u64(), "key is a number: {letter}");
        assert!(letter["reason"].as_str().is_some_and(|r| !r.is_empty()));
        assert!(
            letter["failedAt"]
                .as_str()
                .is_some_and(|t| t.contains('T') && (t.ends_with('Z') || t.contains('+'))),
            "failedAt is RFC 3339: {letter}"
        );
        assert_eq!(
            letter["event"].to_string(),
            original.to_string(),
            "the original event, unchanged"
        );
    }
    let only_other = sidecar
        .run_cli(&["dead-letter", "list", "--output", "other", "--json"])
        .await
        .assert_success()
        .json_lines();
    assert!(only_other.is_empty(), "{only_other:?}");
    assert_eq!(
        sidecar
            .metric("tally_dead_letter_events{output=\"rejecting\"}")
            .await,
        2.0
    );

    // The upstream is fixed; a replay (through the running sidecar) re-sends the batch to the
    // output that rejected it, and only to that one.
    rejecting.accept();
    let replay = sidecar.run_cli(&["dead-letter", "replay"]).await;
    replay.assert_success();
    assert!(
        replay.stdout.contains("replayed 2 events"),
        "stdout: {}",
        replay.stdout
    );
    rejecting
        .wait_delivered(poison.iter().map(id_of), DELIVERY)
        .await;
    let delivered = rejecting.delivered_events();
    for original in &poison {
        let copies: Vec<&Value> = delivered
            .iter()
            .filter(|e| e["id"] == original["id"])
            .collect();
        assert_eq!(copies.len(), 1);
        assert_eq!(copies[0].to_string(), original.to_string());
    }
    sidecar.flush_to(&other).await;
    for original in &poison {
        assert_eq!(
            count(&other, tally_tests::events::SOURCE, id_of(original)),
            1,
            "a replay goes to the output that rejected the batch only"
        );
    }
    let listed = sidecar
        .run_cli(&["dead-letter", "list", "--json"])
        .await
        .assert_success()
        .json_lines();
    assert!(
        listed.is_empty(),
        "replayed events leave the store: {listed:?}"
    );
    sidecar
        .wait_metric(
            DELIVERY,
            "the dead-letter gauge to drop to 0",
            "tally_dead_letter_events{output=\"rejecting\"}",
            |dead| dead == 0.0,
        )
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_can_be_replayed_while_the_sidecar_is_stopped() {
    let upstream = TestUpstream::start().await;
    upstream.reject();
    let mut sidecar = Sidecar::builder()
        .openmeter_output("upstream", &upstream.url())
        .start()
        .await;
    sidecar
        .send_ok(&[event("offline-1"), event("offline-2")])
        .await;
    sidecar
        .wait_metric(
            DELIVERY,
            "the batch to be dead-lettered",
            "tally_output_dead_lettered_events_total{output=\"upstream\"}",
            |dead| dead >= 2.0,
        )
        .await;
    let status = sidecar.terminate().await;
    assert_eq!(status.code(), Some(0));

    let listed = sidecar
        .run_cli(&["dead-letter", "list", "--output", "upstream", "--json"])
        .await
        .assert_success()
        .json_lines();
    assert_eq!(listed.len(), 2, "listing works while stopped: {listed:?}");
    let replay = sidecar
        .run_cli(&["dead-letter", "replay", "--output", "upstream"])
        .await;
    replay.assert_success();
    assert!(
        replay.stdout.contains("replayed 2 events"),
        "stdout: {}",
        replay.stdout
    );
    let listed = sidecar
        .run_cli(&["dead-letter", "list", "--json"])
        .await
        .assert_success()
        .json_lines();
    assert!(listed.is_empty(), "{listed:?}");

    upstream.accept();
    sidecar.restart().await;
    upstream
        .wait_delivered(["offline-1", "offline-2"], DELIVERY)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffer_stats_show_events_bytes_age_and_lag() {
    let upstream = TestUpstream::start().await;
    upstream.down().await;
    let mut sidecar = Sidecar::builder()
        .openmeter_output("upstream", &upstream.url())
        .start()
        .await;
    let batch: Vec<Value> = (0..5).map(|i| event(&format!("stats-{i}"))).collect();
    sidecar.send_ok(&batch).await;

    // While the sidecar runs (read-only open).
    let stats = sidecar
        .run_cli(&["buffer", "stats", "--json"])
        .await
        .assert_success()
        .json();
    assert_eq!(stats["events"], 5, "{stats}");
    assert!(stats["bytes"].as_u64().is_some_and(|b| b > 0), "{stats}");
    assert!(
        stats["oldestAgeSeconds"].as_f64().is_some_and(|a| a >= 0.0),
        "{stats}"
    );
    assert_eq!(stats["outputs"][0]["name"], "upstream", "{stats}");
    assert_eq!(stats["outputs"][0]["lag"], 5, "{stats}");
    assert_eq!(
        stats["outputs"].as_array().map(Vec::len),
        Some(1),
        "{stats}"
    );
    // The same through the admin API.
    let admin: Value = sidecar
        .get("/admin/buffer/stats")
        .await
        .json()
        .await
        .unwrap_or_else(|e| panic!("/admin/buffer/stats is not JSON: {e}"));
    assert_eq!(admin["events"], 5, "{admin}");
    assert_eq!(admin["outputs"][0]["lag"], 5, "{admin}");
    // Text output for people.
    let text = sidecar.run_cli(&["buffer", "stats"]).await;
    text.assert_success();
    assert!(text.stdout.contains("upstream"), "{}", text.stdout);

    upstream.up().await;
    upstream
        .wait_delivered(batch.iter().map(id_of), DELIVERY)
        .await;
    let stats = poll_until(
        DELIVERY,
        "buffer stats to show an empty buffer",
        async || {
            let stats = sidecar
                .run_cli(&["buffer", "stats", "--json"])
                .await
                .assert_success()
                .json();
            (stats["events"] == 0 && stats["outputs"][0]["lag"] == 0).then_some(stats)
        },
    )
    .await;
    assert!(stats["oldestAgeSeconds"].is_null(), "{stats}");

    // And while stopped.
    sidecar.terminate().await;
    let stats = sidecar
        .run_cli(&["buffer", "stats", "--json"])
        .await
        .assert_success()
        .json();
    assert_eq!(stats["events"], 0, "{stats}");
    assert_eq!(stats["outputs"][0]["lag"], 0, "{stats}");
}

/// Naming an output the configuration does not have is an error, which a script can tell from
/// an empty dead-letter store: the admin API answers 404 problem+json, the CLI exits 2, both
/// naming the outputs there are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_output_is_a_404_and_exit_2_not_an_empty_store() {
    let upstream = TestUpstream::start().await;
    let sidecar = Sidecar::builder()
        .openmeter_output("upstream", &upstream.url())
        .set("ingest.authToken", json!("adm1n"))
        .start()
        .await;
    let replay = async |output: &str| {
        sidecar
            .request(
                reqwest::Method::POST,
                &format!("/admin/dead-letter/replay?output={output}"),
            )
            .bearer_auth("adm1n")
            .send()
            .await
            .unwrap_or_else(|e| panic!("replay {output}: {e}"))
    };
    let response = replay("nope").await;
    assert_problem(
        "replay of an output that does not exist",
        response,
        404,
        &["\"nope\"", "upstream"],
    )
    .await;
    let response = replay("upstream").await;
    assert_eq!(response.status(), 200, "a configured output");
    let body: Value = response.json().await.unwrap_or_default();
    assert_eq!(body["replayed"], 0, "{body}");

    for args in [
        ["dead-letter", "list", "--output", "nope"],
        ["dead-letter", "replay", "--output", "nope"],
    ] {
        let output = sidecar.run_cli(&args).await;
        assert_eq!(
            output.code(),
            Some(2),
            "{args:?}: stdout {:?} stderr {:?}",
            output.stdout,
            output.stderr
        );
        assert!(
            output.stderr.contains("\"nope\"") && output.stderr.contains("upstream"),
            "{args:?}: the error names the output and the configured ones: {}",
            output.stderr
        );
        assert!(output.stdout.is_empty(), "{args:?}: {}", output.stdout);
    }
    let known = sidecar
        .run_cli(&["dead-letter", "list", "--output", "upstream"])
        .await;
    known.assert_success();
    assert!(
        known.stdout.contains("0 dead-lettered events"),
        "{}",
        known.stdout
    );
}
