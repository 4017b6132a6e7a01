//! Broker patterns over several outputs (`outputs.pattern`): `fanOut` keeps a dead output from
//! stalling the others, `fanOutSequential` never lets output i+1 get ahead of output i,
//! `roundRobin` and `greedy` deliver each event to exactly one output, the fail-fast variants
//! dead-letter a failed batch at once (and `dead-letter replay` re-sends it to that output),
//! `fallback` sends each batch to the first output that takes it, and `maxLag` lets a healthy
//! output keep flowing while another is down.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tally_tests::events::{id_of, padded_event};
use tally_tests::{Sidecar, TestUpstream, event, poll_until};

const DELIVERY: Duration = Duration::from_secs(30);

/// Events `<prefix>-0..n`.
fn events(prefix: &str, n: usize) -> Vec<Value> {
    (0..n).map(|i| event(&format!("{prefix}-{i}"))).collect()
}

fn ids(events: &[Value]) -> Vec<String> {
    events.iter().map(|e| id_of(e).to_string()).collect()
}

async fn metric(sidecar: &Sidecar, name: &str, output: &str) -> f64 {
    sidecar
        .metric(&format!("{name}{{output=\"{output}\"}}"))
        .await
}

/// Waits until the output's `tally_output_lag_events` satisfies `ok`; returns the value.
async fn wait_lag(sidecar: &Sidecar, output: &str, what: &str, ok: impl Fn(f64) -> bool) -> f64 {
    let query = format!("tally_output_lag_events{{output=\"{output}\"}}");
    sidecar.wait_metric(DELIVERY, what, &query, ok).await
}

/// Sends `batches` batches of 10 fresh events (`<prefix>-<n>-<i>`) and waits until each event has reached one of
/// `upstreams`; returns the ids sent.
async fn send_to_any(
    sidecar: &Sidecar,
    upstreams: &[&TestUpstream],
    prefix: &str,
    batches: usize,
) -> Vec<String> {
    let mut all: Vec<String> = Vec::new();
    for n in 0..batches {
        let batch = events(&format!("{prefix}-{n}"), 10);
        sidecar.send_ok(&batch).await;
        all.extend(ids(&batch));
    }
    poll_until(
        DELIVERY,
        "every event to reach one of the outputs",
        async || {
            let delivered: HashSet<String> = upstreams
                .iter()
                .flat_map(|upstream| upstream.delivered_ids())
                .collect();
            all.iter().all(|id| delivered.contains(id)).then_some(())
        },
    )
    .await;
    all
}

/// How many times each id was delivered (accepted) to `upstream`.
fn delivery_counts(upstream: &TestUpstream) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for id in upstream.delivered_ids() {
        *counts.entry(id).or_insert(0) += 1;
    }
    counts
}

async fn dead_letters(sidecar: &Sidecar, output: &str) -> Vec<Value> {
    sidecar
        .run_cli(&["dead-letter", "list", "--output", output, "--json"])
        .await
        .assert_success()
        .json_lines()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_out_a_down_output_does_not_stall_the_other_and_catches_up() {
    let healthy = TestUpstream::start().await;
    let down = TestUpstream::start().await;
    down.down().await;
    let sidecar = Sidecar::builder()
        .pattern("fanOut")
        .openmeter_output("down", &down.url())
        .openmeter_output("healthy", &healthy.url())
        // The down output waits up to 5s between attempts: an output that stalled behind it
        // would wait that long too.
        .set("outputs.targets.0.retry.initialInterval", json!("200ms"))
        .set("outputs.targets.0.retry.maxInterval", json!("5s"))
        .start()
        .await;

    let mut all: Vec<String> = Vec::new();
    for round in 0..5 {
        let batch = events(&format!("iso-{round}"), 20);
        sidecar.send_ok(&batch).await;
        all.extend(ids(&batch));
        let sent_at = Instant::now();
        healthy
            .wait_delivered(batch.iter().map(id_of), Duration::from_secs(2))
            .await;
        println!(
            "round {round}: healthy output got the batch after {:?}",
            sent_at.elapsed()
        );
        let expected = all.len() as f64;
        wait_lag(&sidecar, "down", "the down output's lag to grow", |lag| {
            lag == expected
        })
        .await;
    }
    assert!(
        metric(&sidecar, "tally_output_errors_total", "down").await >= 1.0,
        "the down output counts its connection errors"
    );
    wait_lag(
        &sidecar,
        "healthy",
        "the healthy output's lag to be 0",
        |lag| lag == 0.0,
    )
    .await;
    // The buffer keeps every event until the down output has it too.
    let stats = poll_until(DELIVERY, "buffer stats to show both lags", async || {
        let stats = sidecar
            .run_cli(&["buffer", "stats", "--json"])
            .await
            .assert_success()
            .json();
        let lags: HashMap<String, u64> = stats["outputs"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|o| {
                (
                    o["name"].as_str().unwrap_or_default().to_string(),
                    o["lag"].as_u64().unwrap_or(u64::MAX),
                )
            })
            .collect();
        (lags.get("down") == Some(&100) && lags.get("healthy") == Some(&0)).then_some(stats)
    })
    .await;
    assert_eq!(stats["events"], 100, "{stats}");

    down.up().await;
    down.wait_delivered(all.iter().map(String::as_str), DELIVERY)
        .await;
    wait_lag(&sidecar, "down", "the down output to catch up", |lag| {
        lag == 0.0
    })
    .await;
    for (name, upstream) in [("healthy", &healthy), ("down", &down)] {
        let counts = delivery_counts(upstream);
        let missing: Vec<&String> = all.iter().filter(|id| !counts.contains_key(*id)).collect();
        assert!(missing.is_empty(), "{name} lost {missing:?}");
        assert_eq!(counts.len(), all.len(), "{name} got only the events sent");
    }
    assert_eq!(
        delivery_counts(&healthy).values().max(),
        Some(&1),
        "a healthy output gets each event once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_out_sequential_output_2_never_gets_ahead_of_output_1() {
    let first = TestUpstream::start().await;
    let second = TestUpstream::start().await;
    let sidecar = Sidecar::builder()
        .pattern("fanOutSequential")
        .openmeter_output("first", &first.url())
        .openmeter_output("second", &second.url())
        .start()
        .await;

    let before = events("seq-before", 10);
    sidecar.send_ok(&before).await;
    first
        .wait_delivered(before.iter().map(id_of), DELIVERY)
        .await;
    second
        .wait_delivered(before.iter().map(id_of), DELIVERY)
        .await;

    // Output 1 goes down: output 2 gets nothing new, however long output 1 keeps failing.
    first.down().await;
    let during = events("seq-during", 30);
    sidecar.send_ok(&during).await;
    let errors_before = metric(&sidecar, "tally_output_errors_total", "first").await;
    poll_until(DELIVERY, "output 1 to fail several attempts", async || {
        let errors = metric(&sidecar, "tally_output_errors_total", "first").await;
        (errors >= errors_before + 3.0).then_some(())
    })
    .await;
    let early: Vec<String> = second
        .delivered_id_set()
        .into_iter()
        .filter(|id| id.starts_with("seq-during"))
        .collect();
    assert!(
        early.is_empty(),
        "output 2 got events output 1 does not have: {early:?}"
    );
    wait_lag(&sidecar, "second", "output 2's lag to be 30", |lag| {
        lag == 30.0
    })
    .await;

    first.up().await;
    first
        .wait_delivered(during.iter().map(id_of), DELIVERY)
        .await;
    second
        .wait_delivered(during.iter().map(id_of), DELIVERY)
        .await;

    // Over the whole run: every event output 2 accepted, output 1 had accepted before.
    let mut first_accepted: HashMap<String, Instant> = HashMap::new();
    for request in first.requests().iter().filter(|r| r.delivered()) {
        for e in request.events.iter().flatten() {
            first_accepted
                .entry(id_of(e).to_string())
                .or_insert(request.received_at);
        }
    }
    for request in second.requests() {
        for e in request.events.iter().flatten() {
            let id = id_of(e);
            assert!(
                first_accepted
                    .get(id)
                    .is_some_and(|at| *at <= request.received_at),
                "output 2 received {id} before output 1 had accepted it"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_delivers_each_event_once_taking_turns() {
    let upstreams = [
        TestUpstream::start().await,
        TestUpstream::start().await,
        TestUpstream::start().await,
    ];
    let mut builder = Sidecar::builder().pattern("roundRobin");
    for (i, upstream) in upstreams.iter().enumerate() {
        builder = builder
            .openmeter_output(&format!("rr-{i}"), &upstream.url())
            .set(&format!("outputs.targets.{i}.batching.count"), json!(10));
    }
    let sidecar = builder.start().await;

    let all = send_to_any(&sidecar, &upstreams.iter().collect::<Vec<_>>(), "rr", 20).await;

    let mut seen: HashMap<String, usize> = HashMap::new();
    for (i, upstream) in upstreams.iter().enumerate() {
        assert!(
            upstream.requests().iter().all(|r| r.delivered()),
            "all outputs are healthy: no retries"
        );
        for id in upstream.delivered_ids() {
            if let Some(other) = seen.insert(id.clone(), i) {
                panic!("{id} was delivered to output {other} and to output {i}");
            }
        }
    }
    assert_eq!(seen.len(), all.len(), "only the events sent, each once");
    let mut sent_total = 0.0;
    for i in 0..upstreams.len() {
        sent_total += metric(
            &sidecar,
            "tally_output_events_sent_total",
            &format!("rr-{i}"),
        )
        .await;
    }
    assert_eq!(
        sent_total,
        all.len() as f64,
        "events sent, over all outputs"
    );
    let batches: Vec<usize> = upstreams.iter().map(TestUpstream::request_count).collect();
    let events_per_output: Vec<usize> = upstreams.iter().map(|u| u.delivered_ids().len()).collect();
    println!("roundRobin: batches per output {batches:?}, events {events_per_output:?}");
    let (min, max) = (
        batches.iter().min().copied().unwrap_or_default(),
        batches.iter().max().copied().unwrap_or_default(),
    );
    assert!(
        max - min <= 1,
        "taking turns batch by batch: batches per output {batches:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_delivers_each_event_once_mostly_to_the_free_output() {
    let slow = TestUpstream::start().await;
    let fast = TestUpstream::start().await;
    slow.set_delay(Duration::from_millis(300));
    // The slow output is listed first, so "first output" is not what greedy means. One batch in
    // flight each: "free" means an output with a free slot, and the slow one would otherwise have
    // 64 of them, more than this test's 40 batches.
    let sidecar = Sidecar::builder()
        .pattern("greedy")
        .openmeter_output("slow", &slow.url())
        .openmeter_output("fast", &fast.url())
        .set("outputs.targets.0.batching.count", json!(10))
        .set("outputs.targets.1.batching.count", json!(10))
        .set("outputs.targets.0.maxInFlight", json!(1))
        .set("outputs.targets.1.maxInFlight", json!(1))
        .start()
        .await;

    let all = send_to_any(&sidecar, &[&slow, &fast], "greedy", 40).await;

    let slow_ids = slow.delivered_ids();
    let fast_ids = fast.delivered_ids();
    let slow_set: HashSet<&String> = slow_ids.iter().collect();
    let both: Vec<&String> = fast_ids.iter().filter(|id| slow_set.contains(id)).collect();
    assert!(both.is_empty(), "delivered to both outputs: {both:?}");
    assert_eq!(
        slow_ids.len() + fast_ids.len(),
        all.len(),
        "each event exactly once (slow {}, fast {})",
        slow_ids.len(),
        fast_ids.len()
    );
    println!(
        "greedy: slow output {} events in {} batches, fast output {} events in {} batches",
        slow_ids.len(),
        slow.request_count(),
        fast_ids.len(),
        fast.request_count()
    );
    assert!(
        fast_ids.len() * 3 >= all.len() * 2,
        "most events go to the output that is free: fast {} of {}",
        fast_ids.len(),
        all.len()
    );
}

/// `fallback`: everything goes to the first output while it takes batches; while it is down each batch goes to
/// the next one; once it is back (after its retry backoff) it gets the batches again; with every output down the
/// events wait in the buffer; a batch every output rejects outright is dead-lettered. Each event is delivered once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallback_sends_to_the_first_output_that_takes_the_batch() {
    let primary = TestUpstream::start().await;
    let secondary = TestUpstream::start().await;
    let retry = json!({ "initialInterval": "100ms", "maxInterval": "500ms" });
    let sidecar = Sidecar::builder()
        .pattern("fallback")
        .openmeter_output("primary", &primary.url())
        .openmeter_output("secondary", &secondary.url())
        .set("outputs.targets.0.batching.count", json!(10))
        .set("outputs.targets.0.retry", retry.clone())
        .set("outputs.targets.1.retry", retry)
        .start()
        .await;
    let mut all: Vec<String> = Vec::new();

    // Both up: the first output takes everything.
    let healthy = events("fb-healthy", 30);
    sidecar.send_ok(&healthy).await;
    all.extend(ids(&healthy));
    primary
        .wait_delivered(healthy.iter().map(id_of), DELIVERY)
        .await;
    assert!(
        secondary.delivered_ids().is_empty(),
        "the second output is only a fallback"
    );

    // The first output down: every batch goes to the second.
    primary.down().await;
    let outage = events("fb-outage", 50);
    sidecar.send_ok(&outage).await;
    all.extend(ids(&outage));
    secondary
        .wait_delivered(outage.iter().map(id_of), DELIVERY)
        .await;
    assert!(
        metric(&sidecar, "tally_output_fallback_events_total", "primary").await >= 50.0,
        "the events the first output could not take are counted"
    );

    // Back up: once its backoff has passed, the first output gets the batches again.
    primary.up().await;
    let mut n = 0;
    poll_until(
        DELIVERY,
        "the first output to take batches again",
        async || {
            let batch = events(&format!("fb-back-{n}"), 10);
            n += 1;
            sidecar.send_ok(&batch).await;
            all.extend(ids(&batch));
            let primary_ids = primary.delivered_id_set();
            batch
                .iter()
                .map(id_of)
                .all(|id| primary_ids.contains(id))
                .then_some(())
        },
    )
    .await;

    // Both down: the events wait in the buffer, and go to whichever output comes back.
    primary.down().await;
    secondary.down().await;
    let both_down = events("fb-both-down", 20);
    sidecar.send_ok(&both_down).await;
    all.extend(ids(&both_down));
    secondary.up().await;
    secondary
        .wait_delivered(both_down.iter().map(id_of), DELIVERY)
        .await;
    primary.up().await;

    // Each event delivered exactly once, to one of the outputs.
    let primary_counts = delivery_counts(&primary);
    let secondary_counts = delivery_counts(&secondary);
    for id in &all {
        let times = primary_counts.get(id).copied().unwrap_or(0)
            + secondary_counts.get(id).copied().unwrap_or(0);
        assert_eq!(times, 1, "{id} delivered {times} times");
    }
    println!(
        "fallback: {} events, {} to the first output, {} to the second",
        all.len(),
        primary_counts.len(),
        secondary_counts.len()
    );

    // Rejected outright by both: dead-lettered, with both reasons, under the last output.
    primary.reject();
    secondary.reject();
    let refused = events("fb-refused", 3);
    sidecar.send_ok(&refused).await;
    poll_until(
        DELIVERY,
        "the batch every output rejects to be dead-lettered",
        async || {
            let dead = metric(
                &sidecar,
                "tally_output_dead_lettered_events_total",
                "secondary",
            )
            .await;
            (dead >= 3.0).then_some(())
        },
    )
    .await;
    let letters = dead_letters(&sidecar, "secondary").await;
    assert_eq!(letters.len(), 3, "{letters:#?}");
    let reason = letters[0]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("rejected by every output")
            && reason.contains("primary:")
            && reason.contains("secondary:"),
        "{letters:#?}"
    );
    assert_eq!(letters[0]["status"], 400);
}

/// A fail-fast pattern: an output answering 503 (then refusing connections) gets the batch
/// dead-lettered at its first failure; a replay re-sends it to that output only. `flaky_first`
/// puts the failing output first in the list.
async fn fail_fast(pattern: &str, flaky_first: bool) {
    let good = TestUpstream::start().await;
    let flaky = TestUpstream::start().await;
    flaky.fail(503, None);
    let builder = Sidecar::builder().pattern(pattern);
    let builder = if flaky_first {
        builder
            .openmeter_output("flaky", &flaky.url())
            .openmeter_output("good", &good.url())
    } else {
        builder
            .openmeter_output("good", &good.url())
            .openmeter_output("flaky", &flaky.url())
    };
    let sidecar = builder.start().await;

    let batch = events("ff", 5);
    sidecar.send_ok(&batch).await;
    poll_until(
        DELIVERY,
        "the failed batch to be dead-lettered",
        async || {
            let dead = metric(&sidecar, "tally_output_dead_lettered_events_total", "flaky").await;
            (dead >= 5.0).then_some(())
        },
    )
    .await;
    good.wait_delivered(batch.iter().map(id_of), DELIVERY).await;
    // The output moves on: once a later event arrives, the failed batch is behind it for good.
    flaky.accept();
    sidecar.send_ok(&[event("ff-after")]).await;
    flaky.wait_delivered(["ff-after"], DELIVERY).await;
    good.wait_delivered(["ff-after"], DELIVERY).await;
    let attempts: Vec<u16> = flaky
        .requests()
        .iter()
        .filter(|r| r.events.iter().flatten().any(|e| e["id"] == "ff-0"))
        .map(|r| r.status)
        .collect();
    assert_eq!(attempts, [503], "exactly one attempt, no retry");
    assert_eq!(
        metric(&sidecar, "tally_output_retries_total", "flaky").await,
        0.0
    );

    let letters = dead_letters(&sidecar, "flaky").await;
    assert_eq!(letters.len(), 5, "{letters:#?}");
    for (letter, original) in letters.iter().zip(&batch) {
        assert_eq!(letter["output"], "flaky");
        assert_eq!(letter["status"], 503, "{letter}");
        assert_eq!(letter["event"].to_string(), original.to_string());
    }
    assert!(dead_letters(&sidecar, "good").await.is_empty());

    let replay = sidecar
        .run_cli(&["dead-letter", "replay", "--output", "flaky"])
        .await;
    replay.assert_success();
    assert!(
        replay.stdout.contains("replayed 5 events"),
        "stdout: {}",
        replay.stdout
    );
    flaky
        .wait_delivered(batch.iter().map(id_of), DELIVERY)
        .await;
    assert!(dead_letters(&sidecar, "flaky").await.is_empty());

    // A connection error is a failure too.
    flaky.down().await;
    let unreachable = events("ff-net", 3);
    sidecar.send_ok(&unreachable).await;
    poll_until(
        DELIVERY,
        "the batch the output could not connect for to be dead-lettered",
        async || {
            let dead = metric(&sidecar, "tally_output_dead_lettered_events_total", "flaky").await;
            (dead >= 8.0).then_some(())
        },
    )
    .await;
    let letters = dead_letters(&sidecar, "flaky").await;
    assert_eq!(letters.len(), 3, "{letters:#?}");
    for letter in &letters {
        assert!(
            letter["status"].is_null(),
            "no HTTP status without an answer: {letter}"
        );
    }
    flaky.up().await;
    let replay = sidecar.run_cli(&["dead-letter", "replay"]).await;
    replay.assert_success();
    assert!(
        replay.stdout.contains("replayed 3 events"),
        "stdout: {}",
        replay.stdout
    );
    flaky
        .wait_delivered(unreachable.iter().map(id_of), DELIVERY)
        .await;

    // Replays went to the output that failed, only: after one more event that both outputs
    // receive, the good output has each event once.
    sidecar.send_ok(&[event("ff-final")]).await;
    good.wait_delivered(["ff-final"], DELIVERY).await;
    flaky.wait_delivered(["ff-final"], DELIVERY).await;
    let counts = delivery_counts(&good);
    for id in batch.iter().chain(&unreachable).map(id_of) {
        assert_eq!(counts.get(id), Some(&1), "{id} at the good output");
    }
    let counts = delivery_counts(&flaky);
    for id in batch.iter().chain(&unreachable).map(id_of) {
        assert_eq!(
            counts.get(id),
            Some(&1),
            "{id} at the flaky output, by the replay"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_out_fail_fast_dead_letters_at_the_first_failure_and_replays() {
    fail_fast("fanOutFailFast", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_out_sequential_fail_fast_dead_letters_at_the_first_failure_and_replays() {
    fail_fast("fanOutSequentialFailFast", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_lag_moves_a_down_outputs_oldest_events_to_its_dead_letter_store() {
    const MAX_LAG: u64 = 50;
    let healthy = TestUpstream::start().await;
    let down = TestUpstream::start().await;
    down.down().await;
    let sidecar = Sidecar::builder()
        .openmeter_output("healthy", &healthy.url())
        .openmeter_output("down", &down.url())
        .set("outputs.targets.1.maxLag", json!(MAX_LAG))
        // Room for ~350 of these events (8Mi, the events' part of 16Mi), less than half of
        // what is sent: without maxLag the down output's backlog would fill it and ingest
        // would answer 503. The dead-letter store keeps its own part (2Mi, ~85 of them): its
        // retention deletes the oldest beyond that, and counts them.
        .set(
            "buffer",
            json!({ "maxBytes": "16Mi", "whenFull": "reject" }),
        )
        .start()
        .await;

    let mut all: Vec<String> = Vec::new();
    for n in 0..40 {
        let batch: Vec<Value> = (0..20)
            .map(|i| padded_event(&format!("lag-{n}-{i}"), 24_000))
            .collect();
        let response = sidecar.post_events(&batch).await;
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        assert_eq!(
            status, 204,
            "request {n}: a healthy output keeps flowing, ingest keeps accepting: {body}"
        );
        all.extend(ids(&batch));
    }
    healthy
        .wait_delivered(all.iter().map(String::as_str), DELIVERY)
        .await;
    let lag = wait_lag(
        &sidecar,
        "down",
        &format!("the down output's lag to be at most maxLag ({MAX_LAG})"),
        |lag| lag <= MAX_LAG as f64,
    )
    .await;

    let dead = metric(&sidecar, "tally_output_dead_lettered_events_total", "down").await;
    let expired = metric(&sidecar, "tally_dead_letter_expired_total", "down").await;
    let letters = dead_letters(&sidecar, "down").await;
    assert_eq!(
        letters.len() as f64,
        metric(&sidecar, "tally_dead_letter_events", "down").await,
        "the dead letters held are counted"
    );
    assert_eq!(
        letters.len() as f64 + expired,
        dead,
        "every dead-lettered event is held or counted as deleted by the retention"
    );
    assert!(
        expired > 0.0,
        "the store's part (2Mi) cannot hold ~18MB of dead letters: the oldest were deleted"
    );
    assert!(
        dead + lag >= all.len() as f64,
        "every event is either in the lag or dead-lettered: {dead} + {lag} < {}",
        all.len()
    );
    let dead_ids: HashSet<String> = letters
        .iter()
        .map(|l| id_of(&l["event"]).to_string())
        .collect();
    assert!(
        !dead_ids.contains(&all[0]),
        "the oldest dead letter went first"
    );
    let newest = &all[all.len() - MAX_LAG as usize..];
    let wrongly: Vec<&String> = newest.iter().filter(|id| dead_ids.contains(*id)).collect();
    assert!(
        wrongly.is_empty(),
        "the newest {MAX_LAG} events stay buffered for the output: {wrongly:?}"
    );
    assert!(dead_letters(&sidecar, "healthy").await.is_empty());
    assert_eq!(
        sidecar
            .metric("tally_events_rejected_total{reason=\"buffer_full\"}")
            .await,
        0.0
    );

    // Back up: the output gets what it still had in the log.
    down.up().await;
    let kept: Vec<&str> = all[all.len() - MAX_LAG as usize..]
        .iter()
        .map(String::as_str)
        .collect();
    down.wait_delivered(kept, DELIVERY).await;
    let healthy_ids = healthy.delivered_id_set();
    assert!(all.iter().all(|id| healthy_ids.contains(id)));
}
