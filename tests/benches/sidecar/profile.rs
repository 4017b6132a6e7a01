//! Footprint by `buffer.profile`: the injected sidecar's (`sidecar`, with the 4 batches in flight the operator gives
//! it) against the collector's (`collector`, the default 64 in flight). For each: idle RSS after start-up, peak RSS
//! and CPU per million events under a paced 50k events/s, then, in a second process whose upstream refuses
//! connections, a backlog of 1 GiB of events and the RSS while it drains once the upstream is back, a second after
//! the last event of the backlog was acknowledged.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;
use tally_tests::ports::unused_port;
use tokio::time::Instant;

use crate::events::EventFactory;
use crate::load::{self, LoadSpec};
use crate::process::SidecarProcess;
use crate::report::{Bound, Figure};
use crate::sink::{HttpSink, IdTally, SinkMode};
use crate::{
    CONNECTIONS, EVENTS_PER_REQUEST, IDLE_SETTLE, MIB, READY_LIMIT, STOP_LIMIT, ensure_clean, nonce,
};

/// One profile as the operator configures it.
pub struct Profile {
    pub name: &'static str,
    pub max_in_flight: usize,
    /// Whether the injected sidecar's targets apply.
    pub injected: bool,
}

pub const PROFILES: [Profile; 2] = [
    Profile {
        name: "sidecar",
        max_in_flight: 4,
        injected: true,
    },
    Profile {
        name: "collector",
        max_in_flight: 64,
        injected: false,
    },
];

/// The paced load of the goal.
pub const PACED_EVENTS_PER_SECOND: f64 = 50_000.0;
/// The backlog drained.
const BACKLOG_BYTES: u64 = 1 << 30;
/// Injected sidecar: idle RSS at most this.
const TARGET_IDLE_MIB: f64 = 16.0;
/// Injected sidecar: peak RSS at 50k events/s, and while draining the backlog, at most this.
const TARGET_PEAK_MIB: f64 = 40.0;
const FILL_LIMIT: Duration = Duration::from_secs(600);
const DRAIN_LIMIT: Duration = Duration::from_secs(600);
/// How often RSS is sampled while the backlog drains.
const RSS_SAMPLE: Duration = Duration::from_millis(20);
/// How long the upstream stays down after the last backlog event is acknowledged: the outage
/// outlasts the burst that built the backlog, so the drain figure is the memory the drain
/// itself takes. Without it, the first samples read what the full-speed fill still held (the
/// sidecar gives its heap's free pages back on the first quarter-second tick without ingest),
/// which the fill's own figure already reports.
const OUTAGE_AFTER_FILL: Duration = Duration::from_secs(1);

#[derive(Serialize)]
pub struct Footprint {
    pub profile: &'static str,
    pub max_in_flight: usize,
    pub idle_rss_mib: f64,
    pub paced_acked_events_per_second: f64,
    pub paced_peak_rss_mib: f64,
    pub paced_cpu_seconds_per_million_events: f64,
    pub backlog_events: u64,
    pub backlog_fill_seconds: f64,
    pub backlog_fill_peak_rss_mib: f64,
    pub backlog_drain_seconds: f64,
    /// RSS when the upstream came back, [`OUTAGE_AFTER_FILL`] after the fill.
    pub backlog_outage_rss_mib: f64,
    /// The highest RSS sampled while the backlog drained.
    pub backlog_drain_peak_rss_mib: f64,
    pub backlog_duplicates: u64,
}

fn config(dir: &Path, port: u16, profile: &Profile) -> String {
    format!(
        "listen: 127.0.0.1:0\n\
         dataDir: {data}\n\
         durability: sync\n\
         shutdownTimeout: 5s\n\
         buffer: {{ maxBytes: 2Gi, whenFull: reject, profile: {name} }}\n\
         outputs:\n  \
           targets:\n    \
             - name: upstream\n      \
               type: openmeter\n      \
               url: http://127.0.0.1:{port}\n      \
               maxInFlight: {in_flight}\n      \
               retry: {{ initialInterval: 10ms, maxInterval: 100ms }}\n",
        data = dir.join("data").display(),
        name = profile.name,
        in_flight = profile.max_in_flight,
    )
}

pub async fn measure(
    binary: &Path,
    dir: &Path,
    measured: Duration,
    profile: &Profile,
) -> anyhow::Result<Footprint> {
    // Idle, then paced.
    let blackhole = HttpSink::bind(0, SinkMode::Discard).await?;
    let paced_dir = dir.join("paced");
    let mut sidecar = SidecarProcess::start(
        binary,
        &paced_dir,
        &config(&paced_dir, blackhole.addr().port(), profile),
    )
    .await?;
    sidecar.wait_ready(READY_LIMIT).await?;
    tokio::time::sleep(IDLE_SETTLE).await;
    let idle = sidecar.memory()?.rss;
    let cpu_before = sidecar.cpu_time()?;
    let spec = LoadSpec {
        connections: CONNECTIONS,
        events_per_request: EVENTS_PER_REQUEST,
        duration: measured,
        max_requests: None,
        requests_per_second: Some(PACED_EVENTS_PER_SECOND / EVENTS_PER_REQUEST as f64),
    };
    let factory = Arc::new(EventFactory::new(format!("profile-{}", nonce())));
    let paced = load::run(sidecar.addr(), &spec, factory).await;
    ensure_clean(&paced, "paced load")?;
    let paced_events = paced.acked_events(EVENTS_PER_REQUEST);
    let paced_cpu = sidecar.cpu_time()?.saturating_sub(cpu_before);
    let paced_peak = sidecar.memory()?.peak_rss;
    sidecar.stop(STOP_LIMIT).await?;
    drop(blackhole);

    // The backlog: the upstream's port refuses connections until the sink binds it.
    let port = unused_port();
    let backlog_dir = dir.join("backlog");
    let mut sidecar =
        SidecarProcess::start(binary, &backlog_dir, &config(&backlog_dir, port, profile)).await?;
    sidecar.wait_ready(READY_LIMIT).await?;
    let factory = Arc::new(EventFactory::new(format!("backlog-{}", nonce())));
    let request_bytes = factory.batch(EVENTS_PER_REQUEST).len() as u64;
    let requests = BACKLOG_BYTES.div_ceil(request_bytes);
    let fill_started = Instant::now();
    let spec = LoadSpec {
        connections: CONNECTIONS,
        events_per_request: EVENTS_PER_REQUEST,
        duration: FILL_LIMIT,
        max_requests: Some(requests),
        requests_per_second: None,
    };
    let fill = load::run(sidecar.addr(), &spec, factory).await;
    ensure_clean(&fill, "filling the backlog")?;
    let events = fill.acked_events(EVENTS_PER_REQUEST);
    anyhow::ensure!(
        events == requests * EVENTS_PER_REQUEST as u64,
        "filling the backlog stopped at {events} events"
    );
    let fill_seconds = fill_started.elapsed().as_secs_f64();
    let fill_peak = sidecar.memory()?.peak_rss;
    tokio::time::sleep(OUTAGE_AFTER_FILL).await;
    let outage_rss = sidecar.memory()?.rss;
    let tally = Arc::new(IdTally::new(events * 2));
    let upstream = HttpSink::bind(port, SinkMode::CountIds(tally.clone()))
        .await
        .context("cannot start the upstream on the port the sidecar forwards to")?;
    let started = Instant::now();
    let mut drain_peak = 0;
    while tally.unique() < events {
        anyhow::ensure!(
            started.elapsed() < DRAIN_LIMIT,
            "the upstream got {} of {events} backlog events in {DRAIN_LIMIT:?}",
            tally.unique()
        );
        drain_peak = drain_peak.max(sidecar.memory()?.rss);
        tokio::time::sleep(RSS_SAMPLE).await;
    }
    let drain_seconds = started.elapsed().as_secs_f64();
    let result = Footprint {
        profile: profile.name,
        max_in_flight: profile.max_in_flight,
        idle_rss_mib: idle as f64 / MIB,
        paced_acked_events_per_second: paced_events as f64 / paced.elapsed.as_secs_f64(),
        paced_peak_rss_mib: paced_peak as f64 / MIB,
        paced_cpu_seconds_per_million_events: paced_cpu.as_secs_f64() * 1e6
            / paced_events.max(1) as f64,
        backlog_events: events,
        backlog_fill_seconds: fill_seconds,
        backlog_fill_peak_rss_mib: fill_peak as f64 / MIB,
        backlog_drain_seconds: drain_seconds,
        backlog_outage_rss_mib: outage_rss as f64 / MIB,
        backlog_drain_peak_rss_mib: drain_peak as f64 / MIB,
        backlog_duplicates: tally.duplicates(),
    };
    sidecar.stop(STOP_LIMIT).await?;
    drop(upstream);
    Ok(result)
}

/// Idle, paced and draining RSS per profile; the injected sidecar's against its targets.
pub fn figures(runs: &[Footprint]) -> Vec<Figure> {
    let mut figures = Vec::new();
    for profile in &PROFILES {
        let run = runs.iter().find(|r| r.profile == profile.name);
        let (idle_key, paced_key, drain_key, idle_label, paced_label, drain_label) =
            if profile.injected {
                (
                    "sidecar_profile_idle_rss_mib",
                    "sidecar_profile_paced_peak_rss_mib",
                    "sidecar_profile_backlog_drain_rss_mib",
                    "profile sidecar: idle RSS",
                    "profile sidecar: peak RSS at 50k events/s",
                    "profile sidecar: RSS draining 1 GiB",
                )
            } else {
                (
                    "collector_profile_idle_rss_mib",
                    "collector_profile_paced_peak_rss_mib",
                    "collector_profile_backlog_drain_rss_mib",
                    "profile collector: idle RSS",
                    "profile collector: peak RSS at 50k events/s",
                    "profile collector: RSS draining 1 GiB",
                )
            };
        let target = |mib: f64| profile.injected.then_some(Bound::AtMost(mib));
        figures.push(
            Figure::new(idle_key, idle_label, "MiB")
                .value(run.map(|r| r.idle_rss_mib))
                .bound(target(TARGET_IDLE_MIB)),
        );
        figures.push(
            Figure::new(paced_key, paced_label, "MiB")
                .value(run.map(|r| r.paced_peak_rss_mib))
                .bound(target(TARGET_PEAK_MIB))
                .note(run.map_or(String::new(), |r| {
                    format!(
                        "acked {:.0} events/s, {:.1} CPU-s per 1M events, maxInFlight {}",
                        r.paced_acked_events_per_second,
                        r.paced_cpu_seconds_per_million_events,
                        r.max_in_flight
                    )
                })),
        );
        figures.push(
            Figure::new(drain_key, drain_label, "MiB")
                .value(run.map(|r| r.backlog_drain_peak_rss_mib))
                .bound(target(TARGET_PEAK_MIB))
                .note(run.map_or(String::new(), |r| {
                    format!(
                        "{} events filled in {:.1} s (peak {:.1} MiB; {:.1} MiB when the upstream came back), drained in {:.1} s; {} duplicates",
                        r.backlog_events,
                        r.backlog_fill_seconds,
                        r.backlog_fill_peak_rss_mib,
                        r.backlog_outage_rss_mib,
                        r.backlog_drain_seconds,
                        r.backlog_duplicates
                    )
                })),
        );
    }
    figures
}
