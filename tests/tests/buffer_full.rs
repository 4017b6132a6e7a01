//! A full buffer (`buffer.maxBytes`) while the upstream is unreachable: `whenFull: reject` answers
//! 503 and recovers; `whenFull: dropOldest` keeps accepting and accounts for every drop.

use std::time::Duration;

use serde_json::{Value, json};
use tally_tests::events::{id_of, padded_event};
use tally_tests::{Sidecar, TestUpstream, assert_problem, poll_until};

/// The smallest `buffer.maxBytes`; the events get half of it (see the README's budget).
const MAX_BYTES: f64 = 16.0 * 1024.0 * 1024.0;
/// Requests a test may send before the buffer must be full (8Mi of events in batches of ~500KB).
const MAX_REQUESTS: usize = 100;

fn batch(prefix: &str, n: usize) -> Vec<Value> {
    (0..10)
        .map(|i| padded_event(&format!("{prefix}-{n}-{i}"), 50_000))
        .collect()
}

/// The buffer's size figures: events' bytes within their part, the data directory within
/// `maxBytes`.
fn assert_within_budget(metrics: &tally_tests::metrics::Exposition) {
    assert_eq!(metrics.value("tally_buffer_max_bytes"), MAX_BYTES);
    let events_part = metrics.value("tally_buffer_budget_bytes{part=\"events\"}");
    assert_eq!(events_part, MAX_BYTES / 2.0, "the events' part of 16Mi");
    assert!(
        metrics.value("tally_buffer_bytes") <= events_part,
        "the events never take more than their part: {} bytes",
        metrics.value("tally_buffer_bytes")
    );
    assert!(
        metrics.value("tally_buffer_disk_bytes") <= MAX_BYTES,
        "the data directory stays within maxBytes: {} bytes",
        metrics.value("tally_buffer_disk_bytes")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_buffer_answers_503_then_accepts_again_once_drained() {
    let upstream = TestUpstream::start().await;
    upstream.down().await;
    let sidecar = Sidecar::builder()
        .openmeter_output("upstream", &upstream.url())
        .set(
            "buffer",
            json!({ "maxBytes": "16Mi", "whenFull": "reject" }),
        )
        .start()
        .await;

    let mut acked: Vec<String> = Vec::new();
    let mut full = None;
    for n in 0..MAX_REQUESTS {
        let events = batch("full", n);
        let response = sidecar.post_events(&events).await;
        if response.status() == 204 {
            acked.extend(events.iter().map(|e| id_of(e).to_string()));
        } else {
            full = Some((response, events));
            break;
        }
    }
    let Some((response, refused)) = full else {
        panic!("{MAX_REQUESTS} batches of ~500KB never filled a 16Mi buffer");
    };
    assert!(
        !acked.is_empty(),
        "the buffer took something before it was full"
    );
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    assert_problem("ingest into a full buffer", response, 503, &[]).await;
    assert!(
        retry_after
            .as_deref()
            .is_some_and(|v| v.parse::<u64>().is_ok_and(|s| s >= 1)),
        "a full buffer answers Retry-After: <seconds>, got {retry_after:?}"
    );

    let metrics = sidecar.metrics().await;
    assert!(metrics.value("tally_events_rejected_total{reason=\"buffer_full\"}") >= 1.0);
    assert_within_budget(&metrics);
    assert_eq!(
        metrics.value("tally_buffer_events"),
        acked.len() as f64,
        "every acknowledged event is buffered"
    );
    // Asserted at the end, so that a failure here does not hide the recovery's outcome.
    let ready_while_full = sidecar.get("/readyz").await.status();
    assert_eq!(sidecar.get("/healthz").await.status(), 200, "still alive");

    // The upstream comes back: the buffer drains and ingest accepts again.
    upstream.up().await;
    let mut n = MAX_REQUESTS;
    poll_until(
        Duration::from_secs(30),
        "ingest to accept again after the upstream came back",
        async || {
            n += 1;
            let events = batch("after", n);
            let response = sidecar.post_events(&events).await;
            if response.status() == 204 {
                acked.extend(events.iter().map(|e| id_of(e).to_string()));
                return Some(());
            }
            assert_eq!(response.status(), 503);
            None
        },
    )
    .await;
    upstream
        .wait_delivered(acked.iter().map(String::as_str), Duration::from_secs(30))
        .await;
    sidecar.flush_to(&upstream).await;
    let delivered = upstream.delivered_id_set();
    for e in &refused {
        assert!(
            !delivered.contains(id_of(e)),
            "an event answered 503 must not be stored"
        );
    }
    assert_eq!(sidecar.get("/readyz").await.status(), 200);
    assert_eq!(
        ready_while_full, 503,
        "/readyz answers 503 while the buffer is full (not accepting events)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_oldest_keeps_accepting_and_accounts_for_every_event() {
    let upstream = TestUpstream::start().await;
    upstream.down().await;
    let sidecar = Sidecar::builder()
        .openmeter_output("upstream", &upstream.url())
        .set(
            "buffer",
            json!({ "maxBytes": "16Mi", "whenFull": "dropOldest" }),
        )
        .set("outputs.targets.0.maxInFlight", json!(IN_FLIGHT))
        .start()
        .await;

    // ~30MB into a 16Mi buffer: most of it must be dropped, and every request accepted.
    let mut accepted: Vec<String> = Vec::new();
    for n in 0..60 {
        let events = batch("drop", n);
        sidecar.send_ok(&events).await;
        accepted.extend(events.iter().map(|e| id_of(e).to_string()));
    }
    let metrics = sidecar.metrics().await;
    let dropped = metrics.value("tally_events_dropped_total{reason=\"buffer_full\"}");
    assert!(dropped > 0.0, "events were dropped to make room");
    assert_within_budget(&metrics);
    assert_eq!(
        metrics.value("tally_events_rejected_total{reason=\"buffer_full\"}"),
        0.0
    );
    assert_eq!(metrics.value("tally_events_accepted_total"), 600.0);

    upstream.up().await;
    let newest: Vec<&str> = accepted[accepted.len() - 10..]
        .iter()
        .map(String::as_str)
        .collect();
    upstream
        .wait_delivered(newest, Duration::from_secs(30))
        .await;
    sidecar
        .wait_metric(
            Duration::from_secs(30),
            "the buffer to drain",
            "tally_output_lag_events{output=\"upstream\"}",
            |lag| lag == 0.0,
        )
        .await;

    let delivered = upstream.delivered_id_set();
    let dropped = sidecar
        .metric("tally_events_dropped_total{reason=\"buffer_full\"}")
        .await;
    assert!(
        delivered.iter().all(|id| accepted.contains(id)),
        "only accepted events are delivered"
    );
    // A drop counts every event deleted before its output settled it, the batches in flight
    // included (had the process stopped, they would be gone); those may still arrive, so
    // they can be both delivered and counted, never neither.
    let counted = delivered.len() as f64 + dropped;
    let in_flight_events = (IN_FLIGHT * 100) as f64;
    assert!(
        counted >= accepted.len() as f64 && counted <= accepted.len() as f64 + in_flight_events,
        "every accepted event is delivered or counted as dropped, and at most the batches in \
         flight ({IN_FLIGHT} x batching.count 100) are both ({} delivered, {dropped} dropped, {} accepted)",
        delivered.len(),
        accepted.len()
    );
    // Drops are the oldest events no output had settled: the undelivered events form one
    // contiguous run in acceptance order. Only a batch already in flight to the output when
    // the drops began (the oldest events) may be delivered before that run.
    let undelivered: Vec<usize> = accepted
        .iter()
        .enumerate()
        .filter(|(_, id)| !delivered.contains(*id))
        .map(|(i, _)| i)
        .collect();
    assert!(!undelivered.is_empty(), "something was dropped");
    let (first, last) = (undelivered[0], undelivered[undelivered.len() - 1]);
    assert_eq!(
        last - first + 1,
        undelivered.len(),
        "dropped events are one run of the oldest unread events, not scattered: {:?}",
        &accepted[first..=last]
            .iter()
            .filter(|id| delivered.contains(*id))
            .take(10)
            .collect::<Vec<_>>()
    );
    assert!(
        first <= IN_FLIGHT * 100,
        "only the batches in flight (at most {IN_FLIGHT} x batching.count 100 events) precede the drops; drops started \
         at {first}"
    );
}

/// `maxInFlight` of the drop test's output: the batches that may be both delivered and counted as dropped.
const IN_FLIGHT: usize = 2;
