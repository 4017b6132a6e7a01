//! Delivery keeps up with ingest: the ingest workload at full speed against one OpenMeter-compatible output that
//! records every id, at output batch counts 10, 100 and 1000 (`batching.period: 200ms`, the default
//! `maxInFlight`), and at 100 with `maxInFlight: 1` for comparison. Measures the events delivered per second while the load runs and, once it stops, how long
//! until the output has every acknowledged event: a sidecar whose delivery falls behind its ingest builds a
//! backlog that this number shows.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tally_tests::poll::poll;
use tokio::time::Instant;

use crate::events::EventFactory;
use crate::load::{self, LoadSpec};
use crate::process::SidecarProcess;
use crate::report::{Bound, Figure};
use crate::sink::{HttpSink, IdTally, SinkMode};
use crate::{CONNECTIONS, EVENTS_PER_REQUEST, MIB, READY_LIMIT, STOP_LIMIT, ensure_clean, nonce};

/// One measured configuration: the output's batch count and `maxInFlight` (`None`: the default), its figure's key
/// and label, and whether [`TARGET_CATCH_UP_SECONDS`] applies.
pub struct Run {
    pub count: usize,
    pub max_in_flight: Option<usize>,
    pub key: &'static str,
    pub label: &'static str,
    pub bounded: bool,
}

/// The batch counts of the goal, then count 100 one batch at a time (`maxInFlight: 1`, how delivery worked before
/// it was pipelined) for comparison.
pub const RUNS: [Run; 4] = [
    Run {
        count: 10,
        max_in_flight: None,
        key: "keep_up_batch_10_catch_up_seconds",
        label: "batch count 10: all delivered after the load",
        bounded: true,
    },
    Run {
        count: 100,
        max_in_flight: None,
        key: "keep_up_batch_100_catch_up_seconds",
        label: "batch count 100: all delivered after the load",
        bounded: true,
    },
    Run {
        count: 1000,
        max_in_flight: None,
        key: "keep_up_batch_1000_catch_up_seconds",
        label: "batch count 1000: all delivered after the load",
        bounded: true,
    },
    Run {
        count: 100,
        max_in_flight: Some(1),
        key: "keep_up_batch_100_one_in_flight_catch_up_seconds",
        label: "batch count 100, maxInFlight 1: all delivered after",
        bounded: false,
    },
];
/// After the load stops, the output has everything within this.
pub const TARGET_CATCH_UP_SECONDS: f64 = 1.0;
/// How long the output may take to catch up before the run counts as failed.
const CATCH_UP_LIMIT: Duration = Duration::from_secs(300);
/// Ids the sink tracks: far more than a 600 s load acknowledges on this machine.
const ID_CAPACITY: u64 = 200_000_000;

#[derive(Serialize)]
pub struct KeepUp {
    pub key: &'static str,
    pub batch_count: usize,
    pub max_in_flight: Option<usize>,
    pub acked_events: u64,
    pub acked_events_per_second: f64,
    /// Distinct events the output had when the load stopped, per second of load.
    pub delivered_during_load_per_second: f64,
    /// From the last acknowledgement until the output had every acknowledged event.
    pub catch_up_seconds: f64,
    pub duplicates: u64,
    pub peak_rss_mib: f64,
    /// The sidecar's CPU time (user + system) from the start of the load until the output had
    /// everything, per million acknowledged events: ingest and forwarding together.
    pub cpu_seconds_per_million: f64,
}

fn config(dir: &Path, port: u16, run: &Run) -> String {
    let count = run.count;
    let max_in_flight = run
        .max_in_flight
        .map_or(String::new(), |n| format!("      maxInFlight: {n}\n"));
    format!(
        "listen: 127.0.0.1:0\n\
         dataDir: {data}\n\
         durability: sync\n\
         shutdownTimeout: 5s\n\
         buffer: {{ maxBytes: 4Gi, whenFull: reject }}\n\
         outputs:\n  \
           targets:\n    \
             - name: upstream\n      \
               type: openmeter\n      \
               url: http://127.0.0.1:{port}\n      \
               batching: {{ count: {count}, period: 200ms }}\n{max_in_flight}",
        data = dir.join("data").display(),
    )
}

pub async fn measure(
    binary: &Path,
    dir: &Path,
    measured: Duration,
    run: &Run,
) -> anyhow::Result<KeepUp> {
    let count = run.count;
    let ids = Arc::new(IdTally::new(ID_CAPACITY));
    let sink = HttpSink::bind(0, SinkMode::CountIds(ids.clone())).await?;
    let mut sidecar =
        SidecarProcess::start(binary, dir, &config(dir, sink.addr().port(), run)).await?;
    sidecar.wait_ready(READY_LIMIT).await?;
    let cpu_before = sidecar.cpu_time()?;
    let factory = Arc::new(EventFactory::new(format!("keepup-{count}-{}", nonce())));
    let spec = LoadSpec {
        connections: CONNECTIONS,
        events_per_request: EVENTS_PER_REQUEST,
        duration: measured,
        max_requests: None,
        requests_per_second: None,
    };
    let report = load::run(sidecar.addr(), &spec, factory).await;
    let delivered_at_stop = ids.unique();
    ensure_clean(&report, "keep-up load")?;
    let acked = report.acked_events(EVENTS_PER_REQUEST);
    let last_ack = report.last_ack_at.unwrap_or_else(Instant::now);
    let caught_up = poll(CATCH_UP_LIMIT, Duration::from_millis(5), async || {
        (ids.unique() >= acked).then_some(())
    })
    .await;
    anyhow::ensure!(
        caught_up.is_ok(),
        "batch count {count}: the output has {} of {acked} acknowledged events {CATCH_UP_LIMIT:?} after the load",
        ids.unique()
    );
    let catch_up = last_ack.elapsed();
    let cpu = sidecar.cpu_time()?.saturating_sub(cpu_before);
    let memory = sidecar.memory()?;
    let elapsed = report.elapsed.as_secs_f64();
    let result = KeepUp {
        key: run.key,
        batch_count: count,
        max_in_flight: run.max_in_flight,
        acked_events: acked,
        acked_events_per_second: acked as f64 / elapsed,
        delivered_during_load_per_second: delivered_at_stop as f64 / elapsed,
        catch_up_seconds: catch_up.as_secs_f64(),
        duplicates: ids.duplicates(),
        peak_rss_mib: memory.peak_rss as f64 / MIB,
        cpu_seconds_per_million: cpu.as_secs_f64() * 1e6 / acked.max(1) as f64,
    };
    sidecar.stop(STOP_LIMIT).await?;
    drop(sink);
    Ok(result)
}

/// One figure per batch count: seconds to catch up, against [`TARGET_CATCH_UP_SECONDS`].
pub fn figures(runs: &[KeepUp]) -> Vec<Figure> {
    RUNS.iter()
        .map(|spec| {
            let run = runs.iter().find(|r| r.key == spec.key);
            Figure::new(spec.key, spec.label, "s")
                .value(run.map(|r| r.catch_up_seconds))
                .bound(
                    spec.bounded
                        .then_some(Bound::AtMost(TARGET_CATCH_UP_SECONDS)),
                )
                .note(match run {
                    Some(r) => format!(
                        "acked {:.0} events/s, delivered {:.0}/s during the load; {} duplicates; {:.1} CPU-s per 1M events",
                        r.acked_events_per_second,
                        r.delivered_during_load_per_second,
                        r.duplicates,
                        r.cpu_seconds_per_million
                    ),
                    None => String::new(),
                })
        })
        .collect()
}
