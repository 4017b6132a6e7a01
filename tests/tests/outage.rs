//! An upstream outage: retries with backoff, `Retry-After` honoured, everything delivered once the
//! upstream is back, and `maxElapsed` sending a hopeless batch to the dead-letter store.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tally_tests::events::id_of;
use tally_tests::{RetryAfter, Sidecar, SidecarBuilder, TestUpstream, event, poll_until};

const DELIVERY: Duration = Duration::from_secs(30);

fn builder(upstream: &TestUpstream, initial: &str, max: &str) -> SidecarBuilder {
    Sidecar::builder()
        .openmeter_output("upstream", &upstream.url())
        .set("outputs.targets.0.retry.initialInterval", json!(initial))
        .set("outputs.targets.0.retry.maxInterval", json!(max))
}

/// Gaps between consecutive delivery attempts, in order.
fn gaps(upstream: &TestUpstream) -> Vec<Duration> {
    let times: Vec<Instant> = upstream.attempt_times();
    times.windows(2).map(|w| w[1] - w[0]).collect()
}

/// Waits for `count` delivery attempts within `within`, then lets the upstream accept and waits until every
/// event of `batch` is delivered.
async fn recover_after_attempts(
    upstream: &TestUpstream,
    count: usize,
    within: Duration,
    batch: &[Value],
) {
    poll_until(within, &format!("{count} delivery attempts"), async || {
        (upstream.request_count() >= count).then_some(())
    })
    .await;
    upstream.accept();
    upstream
        .wait_delivered(batch.iter().map(id_of), DELIVERY)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_seconds_is_honoured_then_everything_is_delivered() {
    let upstream = TestUpstream::start().await;
    upstream.fail(503, Some(RetryAfter::Seconds(1)));
    // The backoff alone would retry within 200ms: only Retry-After explains longer gaps.
    let sidecar = builder(&upstream, "50ms", "200ms").start().await;
    let batch: Vec<Value> = (0..10).map(|i| event(&format!("ra-{i}"))).collect();
    sidecar.send_ok(&batch).await;

    recover_after_attempts(&upstream, 3, Duration::from_secs(10), &batch).await;

    let requests = upstream.requests();
    let failed = requests.iter().take_while(|r| r.status == 503).count();
    assert!(failed >= 3, "three answers 503 before the recovery");
    for (i, gap) in gaps(&upstream).iter().enumerate().take(failed) {
        // Request i answered 503 with Retry-After: 1, so request i+1 comes at least 1s later,
        // and not much later than Retry-After plus one backoff step.
        assert!(
            *gap >= Duration::from_millis(995),
            "attempt {} came {gap:?} after a `Retry-After: 1` answer",
            i + 2
        );
        assert!(
            *gap <= Duration::from_millis(2500),
            "attempt {} came {gap:?} after a `Retry-After: 1` answer; expected about 1s",
            i + 2
        );
    }
    let retries = sidecar
        .metric("tally_output_retries_total{output=\"upstream\"}")
        .await;
    assert!(retries >= 3.0, "retries counted: {retries}");
    let errors = sidecar
        .metric("tally_output_errors_total{output=\"upstream\",kind=\"retryable_status\"}")
        .await;
    assert!(errors >= 3.0, "retryable_status errors counted: {errors}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_http_date_is_honoured_on_429() {
    let upstream = TestUpstream::start().await;
    // An HTTP-date has a one-second resolution: "now + 2s" means at least one more second.
    upstream.fail(429, Some(RetryAfter::DateIn(Duration::from_secs(2))));
    let sidecar = builder(&upstream, "50ms", "200ms").start().await;
    let batch = [event("date-1")];
    sidecar.send_ok(&batch).await;
    recover_after_attempts(&upstream, 2, Duration::from_secs(10), &batch).await;
    let gap = gaps(&upstream)[0];
    assert!(
        gap >= Duration::from_millis(995),
        "the retry came {gap:?} after a Retry-After HTTP-date 2s ahead"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_retry_after_the_backoff_grows_up_to_max_interval() {
    let upstream = TestUpstream::start().await;
    upstream.fail(503, None);
    let sidecar = builder(&upstream, "100ms", "400ms").start().await;
    let batch: Vec<Value> = (0..5).map(|i| event(&format!("bo-{i}"))).collect();
    sidecar.send_ok(&batch).await;

    recover_after_attempts(&upstream, 14, Duration::from_secs(20), &batch).await;

    let requests = upstream.requests();
    let failed = requests.iter().take_while(|r| r.status == 503).count();
    let gaps: Vec<Duration> = gaps(&upstream).into_iter().take(failed).collect();
    let longest = gaps.iter().max().copied().unwrap_or_default();
    let mean = gaps.iter().sum::<Duration>() / gaps.len().max(1) as u32;
    println!("{failed} failed attempts; gaps {gaps:?}");
    // Scheduling and the request itself add a little; 250ms of slack on a 400ms cap.
    assert!(
        longest <= Duration::from_millis(650),
        "no wait may exceed maxInterval (400ms): longest gap {longest:?} in {gaps:?}"
    );
    assert!(
        mean >= Duration::from_millis(50),
        "the output must back off, not retry in a loop: mean gap {mean:?} in {gaps:?}"
    );
    assert!(
        longest >= Duration::from_millis(150),
        "the wait must grow beyond initialInterval (100ms): longest gap {longest:?} in {gaps:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_upstream_is_retried_until_it_is_back() {
    let upstream = TestUpstream::start().await;
    upstream.down().await;
    let sidecar = builder(&upstream, "50ms", "300ms").start().await;
    let batch: Vec<Value> = (0..10).map(|i| event(&format!("down-{i}"))).collect();
    sidecar.send_ok(&batch).await;
    wait_errors(&sidecar, "network", 2.0, Duration::from_secs(10)).await;
    assert_eq!(
        sidecar
            .metric("tally_output_lag_events{output=\"upstream\"}")
            .await,
        10.0,
        "the undelivered events are the output's lag"
    );
    upstream.up().await;
    upstream
        .wait_delivered(batch.iter().map(id_of), DELIVERY)
        .await;
    sidecar
        .wait_metric(
            DELIVERY,
            "the lag to return to 0",
            "tally_output_lag_events{output=\"upstream\"}",
            |lag| lag == 0.0,
        )
        .await;
}

/// Waits until the output `upstream` counted at least `at_least` failed attempts of `kind`.
async fn wait_errors(sidecar: &Sidecar, kind: &str, at_least: f64, within: Duration) {
    sidecar
        .wait_metric(
            within,
            &format!("{at_least} failed attempts of kind {kind}"),
            &format!("tally_output_errors_total{{output=\"upstream\",kind=\"{kind}\"}}"),
            |errors| errors >= at_least,
        )
        .await;
}

/// Lines of `log` that contain `text`.
fn lines_with(log: &str, text: &str) -> usize {
    log.lines().filter(|line| line.contains(text)).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_is_logged_once_when_it_starts_and_once_when_it_ends() {
    let upstream = TestUpstream::start().await;
    upstream.fail(503, None);
    // Eight batches of 5 retrying at once, every 20 – 50ms: one line per attempt would be hundreds.
    let sidecar = builder(&upstream, "20ms", "50ms")
        .set("outputs.targets.0.batching.count", json!(5))
        .set("outputs.targets.0.maxInFlight", json!(8))
        .start()
        .await;
    let batch: Vec<Value> = (0..40).map(|i| event(&format!("streak-{i}"))).collect();
    for request in batch.chunks(5) {
        sidecar.send_ok(request).await;
    }
    wait_errors(&sidecar, "retryable_status", 100.0, Duration::from_secs(20)).await;
    upstream.accept();
    upstream
        .wait_delivered(batch.iter().map(id_of), DELIVERY)
        .await;
    poll_until(DELIVERY, "the end of the outage to be logged", async || {
        (lines_with(&sidecar.stderr(), "delivering again") > 0).then_some(())
    })
    .await;

    let log = sidecar.stderr();
    let started = lines_with(&log, "delivery is failing");
    let ended = lines_with(&log, "delivering again");
    let warnings = log
        .lines()
        .filter(|line| line.contains("WARN") && line.contains("upstream"))
        .count();
    assert_eq!(started, 1, "one line when the outage starts:\n{log}");
    assert_eq!(ended, 1, "one line when it ends:\n{log}");
    assert_eq!(
        warnings, 1,
        "no WARN per batch or attempt in a 100-attempt outage shorter than a minute:\n{log}"
    );
    let ending = log
        .lines()
        .find(|line| line.contains("delivering again"))
        .unwrap_or_default();
    assert!(
        ending.contains("output=upstream") && ending.contains("failed_attempts="),
        "the line names the output and counts the failed attempts: {ending}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_failing_longer_than_max_elapsed_is_dead_lettered() {
    let upstream = TestUpstream::start().await;
    upstream.fail(503, None);
    let sidecar = builder(&upstream, "50ms", "200ms")
        .set("outputs.targets.0.retry.maxElapsed", json!("1s"))
        .start()
        .await;
    let started = Instant::now();
    let batch: Vec<Value> = (0..3).map(|i| event(&format!("hopeless-{i}"))).collect();
    sidecar.send_ok(&batch).await;
    sidecar
        .wait_metric(
            Duration::from_secs(15),
            "the batch to be dead-lettered",
            "tally_output_dead_lettered_events_total{output=\"upstream\"}",
            |dead| dead >= 3.0,
        )
        .await;
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "dead-lettered after {:?}, before maxElapsed (1s)",
        started.elapsed()
    );
    let listed = sidecar
        .run_cli(&["dead-letter", "list", "--json"])
        .await
        .assert_success()
        .json_lines();
    let ids: Vec<&str> = listed.iter().map(|l| id_of(&l["event"])).collect();
    assert_eq!(ids, ["hopeless-0", "hopeless-1", "hopeless-2"]);
    for letter in &listed {
        assert_eq!(letter["output"], "upstream");
    }
    // The output moves on: later events are delivered once the upstream is back.
    upstream.accept();
    sidecar.send_ok(&[event("after-hopeless")]).await;
    upstream.wait_delivered(["after-hopeless"], DELIVERY).await;
    assert!(
        !upstream.delivered_id_set().contains("hopeless-0"),
        "a dead-lettered batch is only re-sent by a replay"
    );
    // The upstream did answer: the letter keeps that answer's status (null is for failures
    // without an HTTP answer, such as connection errors).
    for letter in &listed {
        assert_eq!(letter["status"], 503, "the last answer's status: {letter}");
    }
}
