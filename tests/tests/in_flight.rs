//! Pipelined delivery (`maxInFlight`): an output has up to that many batches sent and not yet answered, each
//! settled through the buffer's acknowledgement tracker, so a slow upstream does not make delivery one round trip
//! per batch; `maxInFlight: 1` sends one batch at a time. Each event is delivered once either way.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::json;
use tally_tests::events::id_of;
use tally_tests::{Sidecar, TempMount, TestUpstream, event, poll_until};

const DELIVERY: Duration = Duration::from_secs(30);
/// How long the upstream holds every answer back.
const DELAY: Duration = Duration::from_millis(400);

/// The most requests that arrived within less than one answer delay of each other: how many were in flight at
/// once (a request can only follow one whose answer came back, at least `DELAY` after it arrived).
fn most_at_once(arrivals: &[Instant]) -> usize {
    let window = DELAY - Duration::from_millis(100);
    arrivals
        .iter()
        .map(|start| {
            arrivals
                .iter()
                .filter(|at| **at >= *start && at.duration_since(*start) < window)
                .count()
        })
        .max()
        .unwrap_or(0)
}

/// Sends `batches` batches' worth of events at once to a sidecar whose only output (batches of 10) answers after
/// [`DELAY`]; returns the most requests the upstream had at once, once every event arrived exactly once.
async fn deliver_through_slow_upstream(max_in_flight: usize, batches: usize) -> usize {
    let upstream = TestUpstream::start().await;
    upstream.set_delay(DELAY);
    let sidecar = Sidecar::builder()
        .openmeter_output("slow", &upstream.url())
        .set(
            "outputs.targets.0.batching",
            json!({ "count": 10, "period": "50ms" }),
        )
        .set("outputs.targets.0.maxInFlight", json!(max_in_flight))
        .start()
        .await;
    let events: Vec<_> = (0..batches * 10)
        .map(|i| event(&format!("in-flight-{max_in_flight}-{i}")))
        .collect();
    sidecar.send_ok(&events).await;
    if max_in_flight > 1 {
        sidecar
            .wait_metric(
                DELIVERY,
                "the in-flight gauge to reach maxInFlight",
                r#"tally_output_batches_in_flight{output="slow"}"#,
                |held| held == max_in_flight as f64,
            )
            .await;
    }
    upstream
        .wait_delivered(events.iter().map(id_of), DELIVERY)
        .await;
    let mut counts: HashMap<String, usize> = HashMap::new();
    for id in upstream.delivered_ids() {
        *counts.entry(id).or_default() += 1;
    }
    for e in &events {
        assert_eq!(
            counts.get(id_of(e)),
            Some(&1),
            "{} delivered once",
            id_of(e)
        );
    }
    most_at_once(&upstream.attempt_times())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_output_keeps_up_to_max_in_flight_batches_outstanding() {
    let at_once = deliver_through_slow_upstream(4, 12).await;
    assert_eq!(at_once, 4, "4 batches in flight at once, never more");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_in_flight_1_sends_one_batch_at_a_time() {
    let at_once = deliver_through_slow_upstream(1, 4).await;
    assert_eq!(at_once, 1, "one batch at a time");
}

/// Batches the upstream has accepted.
fn accepted_batches(upstream: &TestUpstream) -> usize {
    upstream.requests().iter().filter(|r| r.delivered()).count()
}

/// A batch holds its place until its settlement is recorded, and recording waits for the disk: a stalled disk
/// stops a fast output after 4 × `maxInFlight` batches, instead of letting it read and hold the whole backlog in
/// memory. The data directory is on the power-cut filesystem, whose `fsync`s the test holds back: the stalled disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_disk_stops_delivery_at_four_times_max_in_flight_unsettled_batches() {
    let mount = TempMount::mount();
    let fs = &mount.fs;
    let upstream = TestUpstream::start().await;
    upstream.fail(503, None);
    let sidecar = Sidecar::builder()
        .openmeter_output("upstream", &upstream.url())
        .set("dataDir", json!(fs.path()))
        .set(
            "outputs.targets.0.batching",
            json!({ "count": 5, "period": "20ms" }),
        )
        .set("outputs.targets.0.maxInFlight", json!(2))
        .set(
            "outputs.targets.0.retry",
            json!({ "initialInterval": "10ms", "maxInterval": "20ms" }),
        )
        .start()
        .await;
    // A backlog of 80 batches, stored and acknowledged before the disk stalls.
    let events: Vec<_> = (0..400).map(|i| event(&format!("stall-{i}"))).collect();
    sidecar.send_ok(&events).await;
    poll_until(DELIVERY, "the output to be retrying", async || {
        (upstream.request_count() >= 4).then_some(())
    })
    .await;

    let stalled = fs.stall();
    // One more request: its durable write waits for the disk, and every settlement queues behind it.
    let late = json!([event("stall-late")]).to_string();
    let pending = tokio::spawn(
        sidecar
            .post_request(Some("application/cloudevents-batch+json"), late)
            .send(),
    );
    poll_until(
        DELIVERY,
        "a write to wait for the stalled disk",
        async || (fs.stalled_fsyncs() > 0).then_some(()),
    )
    .await;
    upstream.accept();
    const BOUND: usize = 4 * 2;
    // More than maxInFlight accepted shows answered batches held waiting for their settlement.
    poll_until(
        DELIVERY,
        "batches beyond maxInFlight to be accepted",
        async || (accepted_batches(&upstream) > 2).then_some(()),
    )
    .await;
    // Nothing else can show that reading stopped: give the output a second in which, unbounded, it would send
    // the other 70-odd batches of the backlog to an upstream that answers at once.
    let watch_until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < watch_until {
        let accepted = accepted_batches(&upstream);
        assert!(
            accepted <= BOUND,
            "{accepted} batches accepted while the disk was stalled; at most 4 x maxInFlight = {BOUND}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !pending.is_finished(),
        "the request acknowledged while the disk was stalled"
    );

    drop(stalled);
    let answer = pending
        .await
        .unwrap_or_else(|e| panic!("the late request's task: {e}"))
        .unwrap_or_else(|e| panic!("the late request: {e}"));
    assert_eq!(
        answer.status(),
        204,
        "the late request once the disk is back"
    );
    upstream
        .wait_delivered(events.iter().map(id_of).chain(["stall-late"]), DELIVERY)
        .await;
    drop(sidecar);
    drop(mount);
}
