//! `make bench`: tally-sidecar's throughput, latency, drain rate, memory and start-up time, measured
//! in one run beside this machine's ceilings (fsyncs per second of the data disk, requests per
//! second of a bare HTTP server on loopback); then fanOut to a blackhole and a private PostgreSQL
//! beside a plain COPY of the same rows. Spawns the release binary; see BENCHMARKS.md.
//!
//! Environment: `TALLY_SIDECAR_BIN` (the binary), `TALLY_BENCH_SECONDS` (length of each measured
//! load, default 10), `TALLY_BENCH_DIR` (where the data directories go; default the temp dir),
//! `TALLY_POSTGRES_BINDIR` (PostgreSQL's server binaries; default Debian's newest).
//!
//! Modes that run one part alone, each writing its own results file beside `bench-results.json`:
//! `--outage` (`make bench-outage`, [`outage`]), `--keep-up` (`make bench-keep-up`, [`keepup`]),
//! `--profiles` (`make bench-profiles`, [`profile`]) and `--peers` (`make bench-peers`, [`peers`]:
//! tally-sidecar beside the OpenMeter collector's http-server preset on core Benthos, alternating on
//! the same workload, as ratios to that peer).

mod events;
mod fanout;
mod keepup;
mod load;
mod machine;
mod outage;
mod peers;
mod process;
mod profile;
mod report;
mod sink;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Serialize;
use tally_tests::ports::unused_port;
use tokio::time::Instant;

use crate::events::EventFactory;
use crate::fanout::FanOut;
use crate::load::{LoadReport, LoadSpec};
use crate::machine::{DiskUse, Machine};
use crate::process::{SidecarProcess, sidecar_binary};
use crate::report::{Bound, Figure};
use crate::sink::{HttpSink, IdTally, SinkMode};

/// Concurrent keep-alive connections of every load run.
const CONNECTIONS: usize = 16;
/// Events per ingest request.
const EVENTS_PER_REQUEST: usize = 100;
/// Load before each measured run, not counted (connections, allocator, RocksDB memtables).
const WARM_UP: Duration = Duration::from_secs(1);
const FSYNC_PROBE: Duration = Duration::from_secs(2);
/// Events buffered while the upstream is down, then drained.
const DRAIN_EVENTS: u64 = 1_000_000;
/// Upper bounds of the drain's fill and delivery, so a broken sidecar cannot hang the run.
const DRAIN_FILL_LIMIT: Duration = Duration::from_secs(300);
const DRAIN_DELIVERY_LIMIT: Duration = Duration::from_secs(300);
/// Start-ups measured for the median (one more, first, warms the page cache and is dropped).
const STARTS: usize = 7;
/// How long a started sidecar idles before its RSS is read.
const IDLE_SETTLE: Duration = Duration::from_secs(1);
const READY_LIMIT: Duration = Duration::from_secs(10);
const STOP_LIMIT: Duration = Duration::from_secs(15);

const TARGET_INGEST_EVENTS_PER_SECOND: f64 = 100_000.0;
const TARGET_HALF_RATE_P99_MS: f64 = 25.0;
const TARGET_DRAIN_EVENTS_PER_SECOND: f64 = 100_000.0;
const TARGET_IDLE_RSS_MIB: f64 = 20.0;
const TARGET_STARTUP_MS: f64 = 200.0;

const MIB: f64 = 1024.0 * 1024.0;

fn main() -> ExitCode {
    // `cargo bench` passes `--bench`; `cargo test --all-targets` does not, and must not start a
    // minute-long benchmark.
    if !std::env::args().any(|a| a == "--bench") {
        println!(
            "tally-sidecar benchmark: run it with `make bench` (cargo bench -p tally-tests --bench sidecar)"
        );
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("benchmark failed: cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let phase = if std::env::args().any(|a| a == "--outage") {
        runtime.block_on(run_outage())
    } else if std::env::args().any(|a| a == "--keep-up") {
        runtime.block_on(run_keep_up())
    } else if std::env::args().any(|a| a == "--profiles") {
        runtime.block_on(run_profiles())
    } else if std::env::args().any(|a| a == "--peers") {
        runtime.block_on(peers::run())
    } else {
        runtime.block_on(run())
    };
    match phase {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("benchmark failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Everything the run measured, as written to bench-results.json.
#[derive(Serialize)]
struct Results {
    generated_at: String,
    sidecar_binary: Option<String>,
    machine: Machine,
    workload: Workload,
    figures: Vec<Figure>,
    ceilings: Ceilings,
    ingest: Option<Ingest>,
    half_rate: Option<HalfRate>,
    drain: Option<Drain>,
    idle: Option<Idle>,
    fan_out: Option<FanOut>,
    keep_up: Vec<keepup::KeepUp>,
    footprints: Vec<profile::Footprint>,
    errors: Vec<String>,
}

#[derive(Serialize)]
struct Workload {
    connections: usize,
    events_per_request: usize,
    event_bytes: usize,
    measured_seconds: f64,
    drain_events: u64,
    starts: usize,
}

/// Returns whether every phase ran (missed targets do not fail the run; failed phases do).
async fn run() -> anyhow::Result<bool> {
    let seconds = measured_seconds()?;
    let measured = Duration::from_secs_f64(seconds);
    let root = bench_root()?;
    let machine = Machine::describe(root.path());
    let sample = EventFactory::new("sample").batch(EVENTS_PER_REQUEST);
    let workload = Workload {
        connections: CONNECTIONS,
        events_per_request: EVENTS_PER_REQUEST,
        event_bytes: sample.len() / EVENTS_PER_REQUEST,
        measured_seconds: seconds,
        drain_events: DRAIN_EVENTS,
        starts: STARTS,
    };
    println!(
        "tally-sidecar benchmark: {} CPUs, data in {} ({}), {} connections x {} events of ~{} bytes, {}s per measured load",
        machine.cpus,
        machine.data_dir,
        machine.data_disk.as_deref().unwrap_or("df unavailable"),
        CONNECTIONS,
        EVENTS_PER_REQUEST,
        workload.event_bytes,
        seconds
    );

    let mut errors = Vec::new();
    let mut failed = |phase: &str, e: anyhow::Error| {
        let message = format!("{phase}: {e:#}");
        eprintln!("!! {message}");
        errors.push(message);
    };

    let ceilings = measure_ceilings(root.path(), measured).await;
    println!(
        "ceilings: {:.0} fsyncs/s, bare HTTP server {:.0} requests/s",
        ceilings.fsyncs_per_second.unwrap_or(f64::NAN),
        ceilings.bare_requests_per_second.unwrap_or(f64::NAN)
    );
    for e in &ceilings.errors {
        failed("ceilings", anyhow::anyhow!("{e}"));
    }

    let binary = sidecar_binary();
    let (mut ingest, mut half_rate, mut drain, mut idle) = (None, None, None, None);
    let mut fan_out = None;
    let mut keep_up = Vec::new();
    let mut footprints = Vec::new();
    match &binary {
        Err(e) => failed("sidecar", anyhow::anyhow!("{e:#}")),
        Ok(binary) => {
            println!("sidecar: {}", binary.display());
            let device = machine.data_device.clone();
            match measure_ingest(
                binary,
                &root.path().join("ingest"),
                measured,
                device.as_deref(),
            )
            .await
            {
                Ok(r) => {
                    println!(
                        "ingest: {:.0} events/s, p50 {:.2} ms, p99 {:.2} ms",
                        r.events_per_second, r.p50_ms, r.p99_ms
                    );
                    ingest = Some(r);
                }
                Err(e) => failed("ingest", e),
            }
            if let Some(max) = &ingest {
                let rate = max.events_per_second / 2.0;
                match measure_half_rate(binary, &root.path().join("half-rate"), measured, rate)
                    .await
                {
                    Ok(r) => {
                        println!(
                            "half rate ({:.0} events/s offered): p50 {:.2} ms, p99 {:.2} ms",
                            r.offered_events_per_second, r.p50_ms, r.p99_ms
                        );
                        half_rate = Some(r);
                    }
                    Err(e) => failed("half rate", e),
                }
            }
            match measure_drain(binary, &root.path().join("drain")).await {
                Ok(r) => {
                    println!(
                        "drain: {} events in {:.2} s = {:.0} events/s",
                        r.events, r.seconds, r.events_per_second
                    );
                    drain = Some(r);
                }
                Err(e) => failed("drain", e),
            }
            match measure_idle(binary, &root.path().join("idle")).await {
                Ok(r) => {
                    println!(
                        "idle: start-up {:.1} ms, RSS {:.1} MiB (medians of {})",
                        r.startup_ms, r.rss_mib, STARTS
                    );
                    idle = Some(r);
                }
                Err(e) => failed("idle", e),
            }
            for run in &keepup::RUNS {
                let dir = root.path().join(run.key);
                match keepup::measure(binary, &dir, measured, run).await {
                    Ok(r) => {
                        print_keep_up(run, &r);
                        keep_up.push(r);
                    }
                    Err(e) => failed("keep up", e),
                }
            }
            for p in &profile::PROFILES {
                match profile::measure(binary, &root.path().join(p.name), measured, p).await {
                    Ok(r) => {
                        print_footprint(&r);
                        footprints.push(r);
                    }
                    Err(e) => failed("profile", e),
                }
            }
            // Last, so PostgreSQL's writes cannot disturb the figures above.
            match fanout::measure_fan_out(
                binary,
                &root.path().join("fan-out"),
                measured,
                device.as_deref(),
            )
            .await
            {
                Ok(r) => {
                    println!(
                        "fanOut: ingest {:.0} events/s; blackhole {:.0} events/s; PostgreSQL {:.0} rows/s \
                         ({} rows, last one {:.2} s after the last ack); plain COPY {:.0} rows/s; \
                         Tally / COPY = {:.2}",
                        r.ingest_events_per_second,
                        r.blackhole.per_second,
                        r.postgres.per_second,
                        r.events,
                        r.postgres.after_last_ack_seconds,
                        r.copy.rows_per_second,
                        r.tally_vs_copy
                    );
                    fan_out = Some(r);
                }
                Err(e) => failed("fanOut", e),
            }
        }
    }

    let figures: Vec<Figure> = figures(
        machine.cpus,
        &ceilings,
        ingest.as_ref(),
        half_rate.as_ref(),
        drain.as_ref(),
        idle.as_ref(),
        fan_out.as_ref(),
    )
    .into_iter()
    .chain(keepup::figures(&keep_up))
    .chain(profile::figures(&footprints))
    .collect();
    println!();
    print!("{}", report::table(&figures));
    let results = Results {
        generated_at: generated_at(),
        sidecar_binary: binary.ok().map(|b| b.display().to_string()),
        machine,
        workload,
        figures,
        ceilings,
        ingest,
        half_rate,
        drain,
        idle,
        fan_out,
        keep_up,
        footprints,
        errors,
    };
    let path = results_path()?;
    let json = serde_json::to_string_pretty(&results).context("cannot serialize the results")?;
    std::fs::write(&path, json + "\n")
        .with_context(|| format!("cannot write {}", path.display()))?;
    println!("\nresults: {}", path.display());
    if !results.errors.is_empty() {
        eprintln!(
            "{} phase(s) failed; their figures are n/a",
            results.errors.len()
        );
    }
    Ok(results.errors.is_empty())
}

/// `make bench-outage`: only the long outage (see [`outage`]); results go to
/// `bench-outage-results.json` beside `bench-results.json`.
async fn run_outage() -> anyhow::Result<bool> {
    let root = bench_root()?;
    let binary = sidecar_binary()?;
    let result = outage::measure(&binary, &root.path().join("outage")).await;
    let figures = outage::figures(result.as_ref().ok());
    println!();
    print!("{}", report::table(&figures));
    let outage = result?;
    write_results("bench-outage-results.json", &outage)?;
    Ok(outage.delivered >= outage.acknowledged)
}

/// Now, in RFC 3339, for a results file.
fn generated_at() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// How long each measured load runs: `TALLY_BENCH_SECONDS`, 10 by default.
fn measured_seconds() -> anyhow::Result<f64> {
    match std::env::var("TALLY_BENCH_SECONDS") {
        Ok(s) => s
            .parse::<f64>()
            .ok()
            .filter(|s| *s > 0.0 && *s <= 600.0)
            .with_context(|| {
                format!("TALLY_BENCH_SECONDS={s} is not a number of seconds in (0, 600]")
            }),
        Err(_) => Ok(10.0),
    }
}

/// `make bench-keep-up`: only the keep-up runs (see [`keepup`]), for iterating on the delivery path;
/// results go to `bench-keep-up-results.json` beside `bench-results.json`.
async fn run_keep_up() -> anyhow::Result<bool> {
    let root = bench_root()?;
    let binary = sidecar_binary()?;
    let measured = Duration::from_secs_f64(measured_seconds()?);
    let mut runs = Vec::new();
    for run in &keepup::RUNS {
        let r = keepup::measure(&binary, &root.path().join(run.key), measured, run).await?;
        print_keep_up(run, &r);
        runs.push(r);
    }
    println!();
    print!("{}", report::table(&keepup::figures(&runs)));
    write_results("bench-keep-up-results.json", &runs)?;
    Ok(true)
}

fn print_keep_up(run: &keepup::Run, r: &keepup::KeepUp) {
    println!(
        "keep up, {}: acked {:.0} events/s, delivered {:.0}/s during the load, everything {:.2} s after it; {:.1} CPU-s per 1M events",
        run.label,
        r.acked_events_per_second,
        r.delivered_during_load_per_second,
        r.catch_up_seconds,
        r.cpu_seconds_per_million
    );
}

/// Writes `results` as JSON to `file_name` beside `bench-results.json`, and says where.
fn write_results(file_name: &str, results: &impl Serialize) -> anyhow::Result<()> {
    let path = results_path()?.with_file_name(file_name);
    let json = serde_json::to_string_pretty(results).context("cannot serialize the results")?;
    std::fs::write(&path, json + "\n")
        .with_context(|| format!("cannot write {}", path.display()))?;
    println!("\nresults: {}", path.display());
    Ok(())
}

/// `make bench-profiles`: only the footprints by `buffer.profile` (see [`profile`]); results go to
/// `bench-profiles-results.json` beside `bench-results.json`.
async fn run_profiles() -> anyhow::Result<bool> {
    let root = bench_root()?;
    let binary = sidecar_binary()?;
    let measured = Duration::from_secs_f64(measured_seconds()?);
    let mut runs = Vec::new();
    for p in &profile::PROFILES {
        let r = profile::measure(&binary, &root.path().join(p.name), measured, p).await?;
        print_footprint(&r);
        runs.push(r);
    }
    println!();
    print!("{}", report::table(&profile::figures(&runs)));
    write_results("bench-profiles-results.json", &runs)?;
    Ok(true)
}

fn print_footprint(r: &profile::Footprint) {
    println!(
        "profile {}: idle {:.1} MiB; at {:.0} events/s peak {:.1} MiB, {:.1} CPU-s per 1M events; 1 GiB backlog \
         ({} events) filled in {:.1} s (peak {:.1} MiB), {:.1} MiB when the upstream came back, drained in {:.1} s at \
         most {:.1} MiB",
        r.profile,
        r.idle_rss_mib,
        r.paced_acked_events_per_second,
        r.paced_peak_rss_mib,
        r.paced_cpu_seconds_per_million_events,
        r.backlog_events,
        r.backlog_fill_seconds,
        r.backlog_fill_peak_rss_mib,
        r.backlog_outage_rss_mib,
        r.backlog_drain_seconds,
        r.backlog_drain_peak_rss_mib
    );
}

/// A fresh directory for the run's data, under `TALLY_BENCH_DIR` or the temp dir.
fn bench_root() -> anyhow::Result<tempfile::TempDir> {
    match std::env::var_os("TALLY_BENCH_DIR") {
        Some(dir) => tempfile::Builder::new()
            .prefix("tally-bench-")
            .tempdir_in(dir),
        None => tempfile::Builder::new().prefix("tally-bench-").tempdir(),
    }
    .context("cannot create the benchmark's data directory")
}

/// `$CARGO_TARGET_DIR/bench-results.json`, else next to `<target>/release`.
fn results_path() -> anyhow::Result<PathBuf> {
    let target = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => process::release_dir()?
            .parent()
            .map(Path::to_path_buf)
            .context("the release directory has no parent")?,
    };
    Ok(target.join("bench-results.json"))
}

fn figures(
    machine_cpus: usize,
    ceilings: &Ceilings,
    ingest: Option<&Ingest>,
    half_rate: Option<&HalfRate>,
    drain: Option<&Drain>,
    idle: Option<&Idle>,
    fan_out: Option<&FanOut>,
) -> Vec<Figure> {
    let bare_events = ceilings
        .bare_requests_per_second
        .map(|r| r * EVENTS_PER_REQUEST as f64);
    vec![
        Figure::new(
            "fsyncs_per_second",
            "ceiling: fsyncs/s of the data disk",
            "/s",
        )
        .value(ceilings.fsyncs_per_second),
        Figure::new(
            "bare_http_requests_per_second",
            "ceiling: bare HTTP server, requests/s",
            "req/s",
        )
        .value(ceilings.bare_requests_per_second)
        .note(format!("{CONNECTIONS} connections, same bodies")),
        Figure::new(
            "ingest_events_per_second",
            "ingest, durable acks",
            "events/s",
        )
        .value(ingest.map(|i| i.events_per_second))
        .bound(Some(Bound::AtLeast(TARGET_INGEST_EVENTS_PER_SECOND))),
        Figure::new(
            "ingest_vs_bare_http",
            "ingest vs bare server x 100 events",
            "events/s",
        )
        .value(ingest.map(|i| i.events_per_second))
        .bound(bare_events.map(Bound::Ceiling)),
        Figure::new("ingest_commits_per_second", "ingest group commits/s", "/s")
            .value(ingest.and_then(|i| i.commits_per_second))
            .bound(ceilings.fsyncs_per_second.map(Bound::Ceiling))
            .note(match ingest.map(|i| i.events_per_commit) {
                Some(Some(n)) => format!("{n:.0} events per commit"),
                Some(None) => "tally_buffer_commits_total not exposed".to_owned(),
                None => String::new(),
            }),
        Figure::new("ingest_p50_ms", "ingest ack latency p50", "ms")
            .value(ingest.map(|i| i.p50_ms)),
        Figure::new("ingest_p99_ms", "ingest ack latency p99", "ms")
            .value(ingest.map(|i| i.p99_ms)),
        Figure::new("ingest_peak_rss_mib", "ingest peak RSS (VmHWM)", "MiB")
            .value(ingest.map(|i| i.peak_rss_mib)),
        Figure::new(
            "ingest_sidecar_cpu_cores",
            "ingest CPU of the sidecar",
            "cores",
        )
        .value(ingest.map(|i| i.sidecar_cpu_cores))
        .bound(Some(Bound::Ceiling(machine_cpus as f64)))
        .note(match ingest {
            Some(i) => format!(
                "{:.1} CPU-s per 1M events; load generator {:.2} cores",
                i.sidecar_cpu_seconds_per_million_events, i.bench_cpu_cores
            ),
            None => String::new(),
        }),
        Figure::new("half_rate_p50_ms", "half max rate: ack latency p50", "ms")
            .value(half_rate.map(|h| h.p50_ms))
            .note(match half_rate {
                Some(h) => format!("{:.0} events/s offered", h.offered_events_per_second),
                None => String::new(),
            }),
        Figure::new("half_rate_p99_ms", "half max rate: ack latency p99", "ms")
            .value(half_rate.map(|h| h.p99_ms))
            .bound(Some(Bound::AtMost(TARGET_HALF_RATE_P99_MS))),
        Figure::new(
            "drain_events_per_second",
            "drain of 1M buffered events",
            "events/s",
        )
        .value(drain.map(|d| d.events_per_second))
        .bound(Some(Bound::AtLeast(TARGET_DRAIN_EVENTS_PER_SECOND))),
        Figure::new("idle_rss_mib", "idle RSS (median)", "MiB")
            .value(idle.map(|i| i.rss_mib))
            .bound(Some(Bound::AtMost(TARGET_IDLE_RSS_MIB))),
        Figure::new("startup_ms", "start-up to /readyz 200 (median)", "ms")
            .value(idle.map(|i| i.startup_ms))
            .bound(Some(Bound::AtMost(TARGET_STARTUP_MS))),
        Figure::new(
            "fanout_ingest_events_per_second",
            "fanOut to blackhole + PostgreSQL: ingest",
            "events/s",
        )
        .value(fan_out.map(|f| f.ingest_events_per_second))
        .bound(ingest.map(|i| Bound::Ceiling(i.events_per_second)))
        .note(if fan_out.is_some() {
            "ceiling: the one-output ingest run"
        } else {
            ""
        }),
        Figure::new(
            "fanout_blackhole_events_per_second",
            "fanOut: blackhole output",
            "events/s",
        )
        .value(fan_out.map(|f| f.blackhole.per_second))
        .note(match fan_out {
            Some(f) => format!(
                "last event {:.2} s after the last ack",
                f.blackhole.after_last_ack_seconds
            ),
            None => String::new(),
        }),
        Figure::new(
            "fanout_postgres_rows_per_second",
            "fanOut: PostgreSQL rows/s through Tally",
            "rows/s",
        )
        .value(fan_out.map(|f| f.postgres.per_second))
        .bound(fan_out.map(|f| Bound::Ceiling(f.copy.rows_per_second)))
        .note(match fan_out {
            Some(f) => format!(
                "ceiling: plain COPY; {} rows, last {:.2} s after the last ack; {:.0} rows/s during the load, {:.0} after",
                f.events,
                f.postgres.after_last_ack_seconds,
                f.postgres.during_load_per_second.unwrap_or(f64::NAN),
                f.postgres.after_load_per_second.unwrap_or(f64::NAN)
            ),
            None => String::new(),
        }),
        Figure::new(
            "fanout_copy_rows_per_second",
            "fanOut: plain COPY of the same rows",
            "rows/s",
        )
        .value(fan_out.map(|f| f.copy.rows_per_second))
        .note(match fan_out {
            Some(f) => format!("{:.2} s", f.copy.seconds),
            None => String::new(),
        }),
    ]
}

#[derive(Serialize)]
struct Ceilings {
    fsyncs_per_second: Option<f64>,
    bare_requests_per_second: Option<f64>,
    bare_p50_ms: Option<f64>,
    bare_p99_ms: Option<f64>,
    #[serde(skip)]
    errors: Vec<String>,
}

/// The fsync rate of the disk under `dir`, and a bare hyper server driven by the same load.
async fn measure_ceilings(dir: &Path, measured: Duration) -> Ceilings {
    let mut ceilings = Ceilings {
        fsyncs_per_second: None,
        bare_requests_per_second: None,
        bare_p50_ms: None,
        bare_p99_ms: None,
        errors: Vec::new(),
    };
    let probe_dir = dir.to_path_buf();
    match tokio::task::spawn_blocking(move || machine::fsync_ceiling(&probe_dir, FSYNC_PROBE)).await
    {
        Ok(Ok(rate)) => ceilings.fsyncs_per_second = Some(rate),
        Ok(Err(e)) => ceilings.errors.push(format!("fsync probe: {e:#}")),
        Err(e) => ceilings.errors.push(format!("fsync probe: {e}")),
    }
    let bare = async {
        let server = HttpSink::bind(0, SinkMode::Discard).await?;
        let report = closed_loop(server.addr(), measured, "bare").await?;
        anyhow::Ok(report)
    };
    match bare.await {
        Ok(report) => {
            ceilings.bare_requests_per_second = Some(report.requests_per_second());
            ceilings.bare_p50_ms = report.latencies.quantile_ms(0.5);
            ceilings.bare_p99_ms = report.latencies.quantile_ms(0.99);
        }
        Err(e) => ceilings.errors.push(format!("bare HTTP server: {e:#}")),
    }
    ceilings
}

/// A warm-up, then `measured` of closed-loop load; fails if any request failed.
async fn closed_loop(
    addr: std::net::SocketAddr,
    measured: Duration,
    prefix: &str,
) -> anyhow::Result<LoadReport> {
    let factory = Arc::new(EventFactory::new(format!("{prefix}-{}", nonce())));
    let mut spec = LoadSpec {
        connections: CONNECTIONS,
        events_per_request: EVENTS_PER_REQUEST,
        duration: WARM_UP,
        max_requests: None,
        requests_per_second: None,
    };
    let warm_up = load::run(addr, &spec, factory.clone()).await;
    ensure_clean(&warm_up, "warm-up")?;
    spec.duration = measured;
    let report = load::run(addr, &spec, factory).await;
    ensure_clean(&report, "measured load")?;
    Ok(report)
}

/// `e`, followed by the last lines the sidecar logged.
fn with_stderr(e: anyhow::Error, sidecar: &SidecarProcess) -> anyhow::Error {
    anyhow::anyhow!(
        "{e:#}\nsidecar stderr (last lines):\n{}",
        sidecar.stderr_tail()
    )
}

fn ensure_clean(report: &LoadReport, what: &str) -> anyhow::Result<()> {
    if report.failures() > 0 || report.acked_requests == 0 {
        bail!(
            "{what}: {} requests acknowledged, {} failed (statuses {:?}, {} without answer)",
            report.acked_requests,
            report.failures(),
            report.failed_statuses,
            report.transport_errors
        );
    }
    Ok(())
}

#[derive(Serialize)]
struct Ingest {
    events_per_second: f64,
    requests: u64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: Option<f64>,
    peak_rss_mib: f64,
    commits_per_second: Option<f64>,
    events_per_commit: Option<f64>,
    /// Events not yet forwarded to the blackhole when the load stopped.
    output_lag_at_end: Option<f64>,
    /// CPU the sidecar used during the measured load (ingest and forwarding), in cores.
    sidecar_cpu_cores: f64,
    sidecar_cpu_seconds_per_million_events: f64,
    /// CPU of this process (load generator and blackhole) in the same time, in cores.
    bench_cpu_cores: f64,
    /// The data disk during the measured load (every process's I/O).
    disk: Option<DiskUse>,
}

/// The YAML of a sidecar with durable acks forwarding to `upstream_port` with `batching` (a YAML
/// flow mapping, as [`BATCH_1000`]) and `buffer.profile: profile` (left out when `None`, for a
/// binary older than the key).
fn upstream_config(
    dir: &Path,
    upstream_port: u16,
    batching: &str,
    retry: &str,
    profile: Option<&str>,
) -> String {
    let profile = profile
        .map(|p| format!(", profile: {p}"))
        .unwrap_or_default();
    format!(
        "listen: 127.0.0.1:0\n\
         dataDir: {data}\n\
         durability: sync\n\
         shutdownTimeout: 5s\n\
         buffer: {{ maxBytes: 4Gi, whenFull: reject{profile} }}\n\
         outputs:\n  \
           targets:\n    \
             - name: upstream\n      \
               type: openmeter\n      \
               url: http://127.0.0.1:{upstream_port}\n      \
               batching: {batching}\n      \
               retry: {retry}\n",
        data = dir.join("data").display(),
    )
}

const DEFAULT_RETRY: &str = "{ initialInterval: 500ms, maxInterval: 30s }";
/// The default `buffer.profile`, the collector StatefulSet's.
const COLLECTOR: Option<&str> = Some("collector");
/// The output batching of the ingest, half-rate and drain runs.
const BATCH_1000: &str = "{ count: 1000 }";

async fn start_ready(binary: &Path, dir: &Path, config: &str) -> anyhow::Result<SidecarProcess> {
    let mut sidecar = SidecarProcess::start(binary, dir, config).await?;
    sidecar.wait_ready(READY_LIMIT).await?;
    Ok(sidecar)
}

/// A ready sidecar of the collector's sizing whose one output (batches of 1,000) is a blackhole;
/// the blackhole must outlive the sidecar's load.
async fn start_with_blackhole(
    binary: &Path,
    dir: &Path,
) -> anyhow::Result<(HttpSink, SidecarProcess)> {
    let blackhole = HttpSink::bind(0, SinkMode::Discard).await?;
    let config = upstream_config(
        dir,
        blackhole.addr().port(),
        BATCH_1000,
        DEFAULT_RETRY,
        COLLECTOR,
    );
    let sidecar = start_ready(binary, dir, &config).await?;
    Ok((blackhole, sidecar))
}

async fn measure_ingest(
    binary: &Path,
    dir: &Path,
    measured: Duration,
    device: Option<&str>,
) -> anyhow::Result<Ingest> {
    let (blackhole, sidecar) = start_with_blackhole(binary, dir).await?;
    let factory = Arc::new(EventFactory::new(format!("ingest-{}", nonce())));
    let mut spec = LoadSpec {
        connections: CONNECTIONS,
        events_per_request: EVENTS_PER_REQUEST,
        duration: WARM_UP,
        max_requests: None,
        requests_per_second: None,
    };
    ensure_clean(
        &load::run(sidecar.addr(), &spec, factory.clone()).await,
        "warm-up",
    )
    .map_err(|e| with_stderr(e, &sidecar))?;
    let commits_before = sidecar.metrics().await?.sum("tally_buffer_commits_total");
    let sidecar_cpu_before = sidecar.cpu_time()?;
    let bench_cpu_before = process::cpu_time_of(std::process::id())?;
    let disk_before = device.and_then(machine::disk_counters);
    spec.duration = measured;
    let report = load::run(sidecar.addr(), &spec, factory).await;
    let disk = disk_before
        .zip(device.and_then(machine::disk_counters))
        .map(|(before, after)| after.since(&before));
    let sidecar_cpu = sidecar.cpu_time()?.saturating_sub(sidecar_cpu_before);
    let bench_cpu = process::cpu_time_of(std::process::id())?.saturating_sub(bench_cpu_before);
    let after = sidecar.metrics().await?;
    let memory = sidecar.memory()?;
    ensure_clean(&report, "measured load").map_err(|e| with_stderr(e, &sidecar))?;
    let elapsed = report.elapsed.as_secs_f64();
    let events = report.acked_events(EVENTS_PER_REQUEST) as f64;
    let commits = match (commits_before, after.sum("tally_buffer_commits_total")) {
        (Some(before), Some(after)) if after > before => Some(after - before),
        _ => None,
    };
    let result = Ingest {
        events_per_second: events / elapsed,
        requests: report.acked_requests,
        p50_ms: report.latencies.quantile_ms(0.5).unwrap_or_default(),
        p99_ms: report.latencies.quantile_ms(0.99).unwrap_or_default(),
        p999_ms: report.latencies.quantile_ms(0.999),
        peak_rss_mib: memory.peak_rss as f64 / MIB,
        commits_per_second: commits.map(|c| c / elapsed),
        events_per_commit: commits.map(|c| events / c),
        output_lag_at_end: after.sum("tally_output_lag_events"),
        sidecar_cpu_cores: sidecar_cpu.as_secs_f64() / elapsed,
        sidecar_cpu_seconds_per_million_events: sidecar_cpu.as_secs_f64() / events * 1e6,
        bench_cpu_cores: bench_cpu.as_secs_f64() / elapsed,
        disk,
    };
    sidecar.stop(STOP_LIMIT).await?;
    drop(blackhole);
    Ok(result)
}

#[derive(Serialize)]
struct HalfRate {
    offered_events_per_second: f64,
    acked_events_per_second: f64,
    samples: usize,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: Option<f64>,
}

/// The ingest workload paced at `events_per_second` (open loop), on a fresh sidecar.
async fn measure_half_rate(
    binary: &Path,
    dir: &Path,
    measured: Duration,
    events_per_second: f64,
) -> anyhow::Result<HalfRate> {
    let (blackhole, sidecar) = start_with_blackhole(binary, dir).await?;
    let factory = Arc::new(EventFactory::new(format!("paced-{}", nonce())));
    let mut spec = LoadSpec {
        connections: CONNECTIONS,
        events_per_request: EVENTS_PER_REQUEST,
        duration: WARM_UP,
        max_requests: None,
        requests_per_second: Some(events_per_second / EVENTS_PER_REQUEST as f64),
    };
    ensure_clean(
        &load::run(sidecar.addr(), &spec, factory.clone()).await,
        "warm-up",
    )
    .map_err(|e| with_stderr(e, &sidecar))?;
    spec.duration = measured;
    let report = load::run(sidecar.addr(), &spec, factory).await;
    ensure_clean(&report, "paced load").map_err(|e| with_stderr(e, &sidecar))?;
    let result = HalfRate {
        offered_events_per_second: events_per_second,
        acked_events_per_second: report.acked_events(EVENTS_PER_REQUEST) as f64
            / report.elapsed.as_secs_f64(),
        samples: report.latencies.len(),
        p50_ms: report.latencies.quantile_ms(0.5).unwrap_or_default(),
        p99_ms: report.latencies.quantile_ms(0.99).unwrap_or_default(),
        p999_ms: report.latencies.quantile_ms(0.999),
    };
    sidecar.stop(STOP_LIMIT).await?;
    drop(blackhole);
    Ok(result)
}

#[derive(Serialize)]
struct Drain {
    events: u64,
    seconds: f64,
    events_per_second: f64,
    fill_seconds: f64,
    duplicates: u64,
    /// Requests the upstream answered (batches, plus any resent).
    upstream_requests: u64,
    peak_rss_mib: f64,
}

/// Buffers DRAIN_EVENTS while the upstream refuses connections, then starts the upstream on the
/// same port and times the delivery of every one of them.
async fn measure_drain(binary: &Path, dir: &Path) -> anyhow::Result<Drain> {
    // A port nothing listens on, and that nothing else of this run gets: the sidecar's
    // connections are refused until the upstream binds it.
    let port = unused_port();
    // Short retry intervals, so the first delivery attempt after the upstream is back comes
    // within 100 ms and the figure measures delivery, not backoff.
    let config = upstream_config(
        dir,
        port,
        BATCH_1000,
        "{ initialInterval: 10ms, maxInterval: 100ms }",
        COLLECTOR,
    );
    let sidecar = start_ready(binary, dir, &config).await?;

    let fill_started = Instant::now();
    let spec = LoadSpec {
        connections: CONNECTIONS,
        events_per_request: EVENTS_PER_REQUEST,
        duration: DRAIN_FILL_LIMIT,
        max_requests: Some(DRAIN_EVENTS / EVENTS_PER_REQUEST as u64),
        requests_per_second: None,
    };
    let factory = Arc::new(EventFactory::new(format!("drain-{}", nonce())));
    let fill = load::run(sidecar.addr(), &spec, factory).await;
    ensure_clean(&fill, "filling the buffer").map_err(|e| with_stderr(e, &sidecar))?;
    let events = fill.acked_events(EVENTS_PER_REQUEST);
    if events != DRAIN_EVENTS {
        bail!("filling the buffer stopped at {events} of {DRAIN_EVENTS} events");
    }
    let fill_seconds = fill_started.elapsed().as_secs_f64();

    let tally = Arc::new(IdTally::new(DRAIN_EVENTS));
    if tally.unique() != 0 {
        bail!("the upstream received events while it was down");
    }
    let upstream = HttpSink::bind(port, SinkMode::CountIds(tally.clone()))
        .await
        .context("cannot start the upstream on the port the sidecar forwards to")?;
    let started = Instant::now();
    while tally.unique() < events {
        if started.elapsed() > DRAIN_DELIVERY_LIMIT {
            bail!(
                "the upstream got {} of {events} events in {DRAIN_DELIVERY_LIMIT:?}; sidecar stderr:\n{}",
                tally.unique(),
                sidecar.stderr_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    if tally.unreadable() > 0 {
        bail!(
            "the upstream got {} events or bodies it could not read",
            tally.unreadable()
        );
    }
    let memory = sidecar.memory()?;
    let result = Drain {
        events,
        seconds,
        events_per_second: events as f64 / seconds,
        fill_seconds,
        duplicates: tally.duplicates(),
        upstream_requests: upstream.requests(),
        peak_rss_mib: memory.peak_rss as f64 / MIB,
    };
    sidecar.stop(STOP_LIMIT).await?;
    drop(upstream);
    Ok(result)
}

#[derive(Serialize)]
struct Idle {
    startup_ms: f64,
    rss_mib: f64,
    startup_samples_ms: Vec<f64>,
    rss_samples_mib: Vec<f64>,
}

/// Start-up time and idle RSS of the default configuration (stdout output), over STARTS fresh
/// data directories.
async fn measure_idle(binary: &Path, dir: &Path) -> anyhow::Result<Idle> {
    let mut startups = Vec::with_capacity(STARTS);
    let mut rss = Vec::with_capacity(STARTS);
    for start in 0..=STARTS {
        let dir = dir.join(format!("start-{start}"));
        let config = format!(
            "listen: 127.0.0.1:0\ndataDir: {}\nshutdownTimeout: 2s\n",
            dir.join("data").display()
        );
        let mut sidecar = SidecarProcess::start(binary, &dir, &config).await?;
        let startup = sidecar.wait_ready(READY_LIMIT).await?;
        tokio::time::sleep(IDLE_SETTLE).await;
        let memory = sidecar.memory()?;
        sidecar.stop(STOP_LIMIT).await?;
        if start > 0 {
            startups.push(startup.as_secs_f64() * 1000.0);
            rss.push(memory.rss as f64 / MIB);
        }
    }
    Ok(Idle {
        startup_ms: median(&startups),
        rss_mib: median(&rss),
        startup_samples_ms: startups,
        rss_samples_mib: rss,
    })
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// A short value that differs between runs, for event ids.
fn nonce() -> String {
    format!("{:08x}", rand::random::<u32>())
}
