//! `make bench-outage`: the data directory during a long upstream outage under steady load.
//! Events arrive at a fixed rate while the upstream refuses connections; the directory is
//! measured as the kubelet measures an emptyDir (allocated blocks) every few seconds, beside
//! `buffer.maxBytes`. Then the upstream comes back: every acknowledged event must arrive, and the
//! directory must shrink once they are delivered.
//!
//! Environment: `TALLY_OUTAGE_SECONDS` (default 600), `TALLY_OUTAGE_RATE` (events/s, default
//! 5000), `TALLY_OUTAGE_MAX_BYTES` (`buffer.maxBytes`, default `512Mi`).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Serialize;
use tokio::time::Instant;

use tally_tests::disk::directory_bytes;
use tally_tests::ports::unused_port;

use crate::events::EventFactory;
use crate::load::{self, LoadSpec};
use crate::process::SidecarProcess;
use crate::report::{Bound, Figure};
use crate::sink::{HttpSink, IdTally, SinkMode};

const EVENTS_PER_REQUEST: usize = 100;
const CONNECTIONS: usize = 4;
const SAMPLE_EVERY: Duration = Duration::from_secs(5);
const DELIVERY_LIMIT: Duration = Duration::from_secs(600);
const SHRINK_LIMIT: Duration = Duration::from_secs(120);
const MIB: f64 = 1024.0 * 1024.0;

/// One measurement during the outage.
#[derive(Serialize, Clone, Copy)]
pub struct Sample {
    pub seconds: f64,
    pub directory_bytes: u64,
    pub buffer_bytes: Option<f64>,
    pub dedup_bytes: Option<f64>,
    pub refused_events: Option<f64>,
}

#[derive(Serialize)]
pub struct Outage {
    pub seconds: f64,
    pub offered_events_per_second: f64,
    pub max_bytes: u64,
    pub acknowledged: u64,
    pub refused: u64,
    pub first_refusal_seconds: Option<f64>,
    pub peak_directory_bytes: u64,
    pub delivered: u64,
    pub duplicates: u64,
    pub delivery_seconds: f64,
    pub directory_after_delivery_bytes: u64,
    pub samples: Vec<Sample>,
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> anyhow::Result<T> {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .map_err(|_| anyhow::anyhow!("{name}={v} is not a valid value")),
        Err(_) => Ok(default),
    }
}

fn parse_mib(value: &str) -> anyhow::Result<u64> {
    value
        .strip_suffix("Mi")
        .and_then(|n| n.parse::<u64>().ok())
        .map(|n| n << 20)
        .with_context(|| format!("TALLY_OUTAGE_MAX_BYTES={value}: give it in Mi, e.g. 512Mi"))
}

pub async fn measure(binary: &Path, dir: &Path) -> anyhow::Result<Outage> {
    let seconds: f64 = env_or("TALLY_OUTAGE_SECONDS", 600.0)?;
    let rate: f64 = env_or("TALLY_OUTAGE_RATE", 5000.0)?;
    let max_bytes = parse_mib(&env_or("TALLY_OUTAGE_MAX_BYTES", "512Mi".to_string())?)?;
    let port = unused_port();
    let data = dir.join("data");
    let config = format!(
        "listen: 127.0.0.1:0\n\
         dataDir: {data}\n\
         durability: sync\n\
         shutdownTimeout: 5s\n\
         buffer: {{ maxBytes: {mib}Mi, whenFull: reject }}\n\
         outputs:\n  \
           targets:\n    \
             - name: upstream\n      \
               type: openmeter\n      \
               url: http://127.0.0.1:{port}\n      \
               batching: {{ count: 1000 }}\n      \
               retry: {{ initialInterval: 100ms, maxInterval: 1s }}\n",
        data = data.display(),
        mib = max_bytes >> 20,
    );
    let mut sidecar = SidecarProcess::start(binary, dir, &config).await?;
    sidecar.wait_ready(Duration::from_secs(10)).await?;
    println!(
        "outage: {seconds}s at {rate} events/s, buffer.maxBytes {} MiB, upstream down",
        max_bytes >> 20
    );

    let spec = LoadSpec {
        connections: CONNECTIONS,
        events_per_request: EVENTS_PER_REQUEST,
        duration: Duration::from_secs_f64(seconds),
        max_requests: None,
        requests_per_second: Some(rate / EVENTS_PER_REQUEST as f64),
    };
    let factory = Arc::new(EventFactory::new("outage"));
    let addr = sidecar.addr();
    let load = tokio::spawn({
        let factory = factory.clone();
        async move { load::run(addr, &spec, factory).await }
    });
    let started = Instant::now();
    let mut samples = Vec::new();
    let mut next_print = 60.0;
    while !load.is_finished() {
        tokio::time::sleep(SAMPLE_EVERY).await;
        let metrics = sidecar.metrics().await.ok();
        let sample = Sample {
            seconds: started.elapsed().as_secs_f64(),
            directory_bytes: directory_bytes(&data),
            buffer_bytes: metrics.as_ref().and_then(|m| m.sum("tally_buffer_bytes")),
            dedup_bytes: metrics.as_ref().and_then(|m| m.sum("tally_dedup_bytes")),
            refused_events: metrics
                .as_ref()
                .and_then(|m| m.sum("tally_events_rejected_total")),
        };
        if sample.seconds >= next_print {
            next_print += 60.0;
            println!(
                "  {:>4.0}s: directory {:.1} MiB, events {:.1} MiB, dedup {:.1} MiB, refused {:.0}",
                sample.seconds,
                sample.directory_bytes as f64 / MIB,
                sample.buffer_bytes.unwrap_or_default() / MIB,
                sample.dedup_bytes.unwrap_or_default() / MIB,
                sample.refused_events.unwrap_or_default()
            );
        }
        samples.push(sample);
    }
    let report = load.await.context("the load task failed")?;
    if report.transport_errors > 0 {
        bail!("{} requests failed in transport", report.transport_errors);
    }
    let acknowledged = report.acked_events(EVENTS_PER_REQUEST);
    let refused = report
        .failed_statuses
        .get(&503)
        .copied()
        .unwrap_or_default()
        * EVENTS_PER_REQUEST as u64;
    let other: u64 = report
        .failed_statuses
        .iter()
        .filter(|(status, _)| **status != 503)
        .map(|(_, n)| n)
        .sum();
    if other > 0 {
        bail!(
            "requests failed with statuses other than 503: {:?}",
            report.failed_statuses
        );
    }
    let first_refusal_seconds = samples
        .iter()
        .find(|s| s.refused_events.is_some_and(|r| r > 0.0))
        .map(|s| s.seconds);
    let peak = samples
        .iter()
        .map(|s| s.directory_bytes)
        .max()
        .unwrap_or_default()
        .max(directory_bytes(&data));

    let issued = (seconds * rate) as u64 + 100 * EVENTS_PER_REQUEST as u64;
    let tally = Arc::new(IdTally::new(issued));
    let upstream = HttpSink::bind(port, SinkMode::CountIds(tally.clone())).await?;
    let delivery_started = Instant::now();
    while tally.unique() < acknowledged {
        if delivery_started.elapsed() > DELIVERY_LIMIT {
            bail!(
                "the upstream got {} of {acknowledged} acknowledged events in {DELIVERY_LIMIT:?}",
                tally.unique()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let delivery_seconds = delivery_started.elapsed().as_secs_f64();
    let shrink_started = Instant::now();
    let mut after = directory_bytes(&data);
    while after > peak / 4 && shrink_started.elapsed() < SHRINK_LIMIT {
        tokio::time::sleep(Duration::from_millis(500)).await;
        after = directory_bytes(&data);
    }
    let delivered = tally.unique();
    let duplicates = tally.duplicates();
    sidecar.stop(Duration::from_secs(15)).await?;
    drop(upstream);
    Ok(Outage {
        seconds,
        offered_events_per_second: rate,
        max_bytes,
        acknowledged,
        refused,
        first_refusal_seconds,
        peak_directory_bytes: peak,
        delivered,
        duplicates,
        delivery_seconds,
        directory_after_delivery_bytes: after,
        samples,
    })
}

pub fn figures(outage: Option<&Outage>) -> Vec<Figure> {
    let max = outage.map(|o| o.max_bytes as f64 / MIB);
    vec![
        Figure::new(
            "outage_peak_directory",
            "data directory, peak during the outage",
            "MiB",
        )
        .value(outage.map(|o| o.peak_directory_bytes as f64 / MIB))
        .bound(max.map(Bound::AtMost))
        .note("buffer.maxBytes"),
        Figure::new(
            "outage_acknowledged",
            "events acknowledged during the outage",
            "events",
        )
        .value(outage.map(|o| o.acknowledged as f64)),
        Figure::new("outage_first_refusal", "first 503 (events' part full)", "s")
            .value(outage.and_then(|o| o.first_refusal_seconds)),
        Figure::new("outage_lost", "acknowledged, never delivered", "events")
            .value(outage.map(|o| o.acknowledged.saturating_sub(o.delivered) as f64))
            .bound(Some(Bound::AtMost(0.0))),
        Figure::new(
            "outage_delivery",
            "delivery of the backlog once the upstream is back",
            "s",
        )
        .value(outage.map(|o| o.delivery_seconds)),
        Figure::new(
            "outage_directory_after",
            "data directory after delivery",
            "MiB",
        )
        .value(outage.map(|o| o.directory_after_delivery_bytes as f64 / MIB)),
    ]
}
