//! `make bench-peers`: tally-sidecar beside its peer, the OpenMeter collector's http-server preset
//! run on core Benthos ([`PEER_DIR`]: the build script of the peer and the translated preset, which
//! says what it substitutes and why).
//!
//! For [`rounds`] rounds the two systems alternate (Tally first in odd rounds, the peer first in
//! even ones, so a drift of the machine falls on both) on the same workload: [`CONNECTIONS`]
//! keep-alive connections posting batches of [`EVENTS_PER_REQUEST`] events as fast as they are
//! answered, to a fresh process forwarding to a fresh upstream that records every event id, with
//! output batches of 100 (period 1 s) on both. Each run: a warm-up whose events the upstream must
//! have before the measured load starts, then the measured load. Figures: acknowledged events/s
//! (204 answers x events), CPU-seconds (user + system) per million acknowledged events from the
//! start of the load until the upstream has all of them (so work deferred past the load counts),
//! peak RSS (VmHWM), and the time from the last acknowledgement until the upstream has every
//! acknowledged event.
//!
//! Then, once per system, the loss test: the upstream refuses connections while the load runs for
//! [`LOSS_LOAD`], the process is killed with SIGKILL while requests are still in flight, the
//! upstream comes up on the port the process forwarded to, and the process is started again on
//! the same data directory (for the peer, the same configuration: its buffer is in memory).
//! Once delivery settles, every acknowledged event the upstream never received is lost.
//!
//! Results go to `bench-peers-results.json` beside `bench-results.json`. Environment:
//! `TALLY_BENTHOS_BIN` (the peer; by default the one [`PEER_DIR`]`/build.sh` builds, which is run
//! and skips the build when the binary exists), `TALLY_PEERS_ROUNDS` (default 3),
//! `TALLY_BENCH_SECONDS` (each measured load, default 10), `TALLY_PEERS_PROFILE` (Tally's
//! `buffer.profile`, `collector` or `sidecar`, or `none` to leave it out; default `collector`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use hyper::StatusCode;
use serde::Serialize;
use tokio::time::Instant;

use tally_tests::ports::unused_port;
use tally_tests::report::number;

use crate::events::EventFactory;
use crate::load::{self, LoadSpec};
use crate::machine::{self, Machine};
use crate::process::{Memory, SidecarProcess, Watched, cpu_time_of, sidecar_binary};
use crate::report::{self, Bound, Figure};
use crate::sink::{HttpSink, IdTally, SinkMode};
use crate::{
    CONNECTIONS, DEFAULT_RETRY, EVENTS_PER_REQUEST, MIB, READY_LIMIT, STOP_LIMIT, WARM_UP,
    bench_root, ensure_clean, generated_at, measured_seconds, median, nonce, start_ready,
    upstream_config, with_stderr, write_results,
};

/// The peer's build script, its VERSION and its configuration (`http-server.yaml`).
const PEER_DIR: &str = "tests/benches/peers/benthos";

/// [`PEER_DIR`] in the checkout the benchmark runs from (found at run time: a compile-time path
/// could name another checkout that shares the build cache).
fn peer_dir() -> PathBuf {
    tally_tests::checkout::workspace_root().join(PEER_DIR)
}
/// Tally's output batching: the peer's (`batching: { count: 100, period: 1s }`).
const BATCHING: &str = "{ count: 100, period: 1s }";
const DEFAULT_ROUNDS: usize = 3;
/// Ids the upstream tracks: far more than a 600 s load acknowledges on this machine.
const ID_CAPACITY: u64 = 200_000_000;
/// How long the upstream may take to receive every acknowledged event before the run fails.
const DELIVERY_LIMIT: Duration = Duration::from_secs(120);
/// How often delivery is checked (the resolution of the catch-up time).
const DELIVERY_POLL: Duration = Duration::from_millis(5);
/// Load with the upstream down before the SIGKILL; the load would run [`LOSS_LOAD_TAIL`] longer,
/// so requests are in flight when the process dies.
const LOSS_LOAD: Duration = Duration::from_secs(3);
const LOSS_LOAD_TAIL: Duration = Duration::from_secs(2);
/// After the restart, delivery has settled when the upstream has every acknowledged event, or
/// has received nothing new for this long...
const SETTLE_QUIET: Duration = Duration::from_secs(5);
/// ... and at the latest after this.
const SETTLE_LIMIT: Duration = Duration::from_secs(120);
const SETTLE_POLL: Duration = Duration::from_millis(20);

/// The goals, as ratios Tally / peer in one run.
const GOAL_EVENTS_PER_SECOND_RATIO: f64 = 8.0;
const GOAL_CPU_PER_EVENT_RATIO: f64 = 0.1;
const GOAL_PEAK_RSS_RATIO: f64 = 1.0;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum System {
    Tally,
    Peer,
}

impl System {
    fn key(self) -> &'static str {
        match self {
            System::Tally => "tally",
            System::Peer => "peer",
        }
    }

    fn name(self) -> &'static str {
        match self {
            System::Tally => "tally-sidecar",
            System::Peer => "peer (Benthos, http-server preset)",
        }
    }
}

/// One measured run of one system.
#[derive(Serialize)]
pub struct Run {
    pub round: usize,
    pub system: System,
    pub acked_events: u64,
    pub seconds: f64,
    pub acked_events_per_second: f64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// From the start of the measured load until the upstream had every acknowledged event.
    pub cpu_seconds_per_million_events: f64,
    /// During the measured load only.
    pub cpu_seconds_per_million_events_during_load: f64,
    pub peak_rss_mib: f64,
    /// From the last acknowledgement until the upstream had every acknowledged event.
    pub catch_up_seconds: f64,
    pub duplicates: u64,
    /// CPU of the system under test and of this process (load generator and upstream) during the
    /// measured load, in cores: the two share the machine's.
    pub cpu_cores: f64,
    pub bench_cpu_cores: f64,
}

/// The loss test of one system.
#[derive(Serialize)]
pub struct Loss {
    pub system: System,
    pub acked_events: u64,
    /// Requests answered with an error, or not at all, before and after the kill.
    pub failed_statuses: std::collections::BTreeMap<u16, u64>,
    pub unanswered_requests: u64,
    /// Acknowledged events the upstream never received.
    pub lost: u64,
    /// Distinct events the upstream received after the restart.
    pub delivered: u64,
    pub duplicates: u64,
    pub settle_seconds: f64,
    pub settled_by: &'static str,
}

#[derive(Serialize)]
struct Workload {
    connections: usize,
    events_per_request: usize,
    event_bytes: usize,
    warm_up_seconds: f64,
    measured_seconds: f64,
    rounds: usize,
    output_batching: &'static str,
    loss_load_seconds: f64,
}

#[derive(Serialize)]
struct Results {
    generated_at: String,
    sidecar_binary: String,
    benthos_binary: String,
    benthos_version: Option<String>,
    peer_config: String,
    machine: Machine,
    load_average_before: Option<[f64; 3]>,
    load_average_after: Option<[f64; 3]>,
    workload: Workload,
    figures: Vec<Figure>,
    runs: Vec<Run>,
    losses: Vec<Loss>,
    errors: Vec<String>,
}

/// The mode: returns whether every run worked and Tally lost no acknowledged event (missed goals
/// print MISSED but do not fail it).
pub async fn run() -> anyhow::Result<bool> {
    let rounds = rounds()?;
    let seconds = measured_seconds()?;
    let measured = Duration::from_secs_f64(seconds);
    let root = bench_root()?;
    let machine = Machine::describe(root.path());
    let load_average_before = machine::load_average();
    let sidecar = sidecar_binary()?;
    let benthos = tokio::task::spawn_blocking(benthos_binary)
        .await
        .context("the peer's build did not finish")??;
    let benthos_version = std::fs::read_to_string(peer_dir().join("VERSION"))
        .ok()
        .map(|v| v.trim().to_owned());
    let binaries = Binaries { sidecar, benthos };
    let event_bytes =
        EventFactory::new("sample").batch(EVENTS_PER_REQUEST).len() / EVENTS_PER_REQUEST;
    println!(
        "peers: tally-sidecar ({}, buffer.profile {}) and Benthos {} with the http-server preset ({}); \
         {} rounds of {}s, {} connections x {} events of ~{} bytes; load average {}",
        binaries.sidecar.display(),
        tally_profile()?.as_deref().unwrap_or("left out"),
        benthos_version.as_deref().unwrap_or("?"),
        binaries.benthos.display(),
        rounds,
        seconds,
        CONNECTIONS,
        EVENTS_PER_REQUEST,
        event_bytes,
        load_average_text(load_average_before)
    );

    let mut errors = Vec::new();
    let mut runs = Vec::new();
    for round in 1..=rounds {
        let order = if round % 2 == 1 {
            [System::Tally, System::Peer]
        } else {
            [System::Peer, System::Tally]
        };
        for system in order {
            let dir = root.path().join(format!("round-{round}-{}", system.key()));
            match measure(&binaries, system, &dir, measured, round).await {
                Ok(r) => {
                    println!(
                        "round {round}/{rounds}, {}: acked {} events/s (p99 {} ms), {} CPU-s per 1M events \
                         ({} during the load; {:.2} cores, load generator and upstream {:.2}), peak RSS {} MiB, \
                         everything upstream {:.2} s after the last ack",
                        system.name(),
                        number(r.acked_events_per_second),
                        r.p99_ms.map_or_else(|| "n/a".to_owned(), number),
                        number(r.cpu_seconds_per_million_events),
                        number(r.cpu_seconds_per_million_events_during_load),
                        r.cpu_cores,
                        r.bench_cpu_cores,
                        number(r.peak_rss_mib),
                        r.catch_up_seconds
                    );
                    runs.push(r);
                }
                Err(e) => {
                    let message = format!("round {round}, {}: {e:#}", system.name());
                    eprintln!("!! {message}");
                    errors.push(message);
                }
            }
            // Tally's data directory holds a few GiB after a run; the next run starts afresh.
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                eprintln!("cannot remove {}: {e}", dir.display());
            }
        }
    }

    let mut losses = Vec::new();
    for system in [System::Tally, System::Peer] {
        let dir = root.path().join(format!("loss-{}", system.key()));
        match measure_loss(&binaries, system, &dir).await {
            Ok(l) => {
                println!(
                    "kill -9 with the upstream down, {}: {} events acknowledged, {} of them never reached \
                     the upstream after the restart ({} delivered; settled: {}, {:.1} s)",
                    system.name(),
                    l.acked_events,
                    l.lost,
                    l.delivered,
                    l.settled_by,
                    l.settle_seconds
                );
                losses.push(l);
            }
            Err(e) => {
                let message = format!("loss test, {}: {e:#}", system.name());
                eprintln!("!! {message}");
                errors.push(message);
            }
        }
    }

    let load_average_after = machine::load_average();
    let figures = figures(&runs, &losses);
    println!();
    print!("{}", report::table(&figures));
    println!(
        "load average (1, 5, 15 min): {} before, {} after",
        load_average_text(load_average_before),
        load_average_text(load_average_after)
    );
    let tally_lost_nothing = losses
        .iter()
        .filter(|l| l.system == System::Tally)
        .all(|l| l.lost == 0);
    let results = Results {
        generated_at: generated_at(),
        sidecar_binary: binaries.sidecar.display().to_string(),
        benthos_binary: binaries.benthos.display().to_string(),
        benthos_version,
        peer_config: peer_config().display().to_string(),
        machine,
        load_average_before,
        load_average_after,
        workload: Workload {
            connections: CONNECTIONS,
            events_per_request: EVENTS_PER_REQUEST,
            event_bytes,
            warm_up_seconds: WARM_UP.as_secs_f64(),
            measured_seconds: seconds,
            rounds,
            output_batching: BATCHING,
            loss_load_seconds: LOSS_LOAD.as_secs_f64(),
        },
        figures,
        runs,
        losses,
        errors,
    };
    write_results("bench-peers-results.json", &results)?;
    if !results.errors.is_empty() {
        eprintln!(
            "{} run(s) failed; their figures are n/a",
            results.errors.len()
        );
    }
    if !tally_lost_nothing {
        eprintln!("tally-sidecar lost acknowledged events");
    }
    Ok(results.errors.is_empty() && tally_lost_nothing)
}

/// `TALLY_PEERS_ROUNDS`, [`DEFAULT_ROUNDS`] by default.
fn rounds() -> anyhow::Result<usize> {
    match std::env::var("TALLY_PEERS_ROUNDS") {
        Ok(s) => s
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=20).contains(n))
            .with_context(|| format!("TALLY_PEERS_ROUNDS={s} is not a number of rounds in 1..=20")),
        Err(_) => Ok(DEFAULT_ROUNDS),
    }
}

fn load_average_text(load: Option<[f64; 3]>) -> String {
    load.map_or_else(
        || "n/a".to_owned(),
        |[one, five, fifteen]| format!("{one:.2} {five:.2} {fifteen:.2}"),
    )
}

fn peer_config() -> PathBuf {
    peer_dir().join("http-server.yaml")
}

/// Tally's `buffer.profile`: `TALLY_PEERS_PROFILE`, by default `collector` (the collector
/// StatefulSet's, like the peer, which is a collector too); `sidecar` is what the injector gives
/// the sidecar next to each workload, with a third of the memory for four fifths of the
/// throughput; `none` leaves the key out, to measure a binary older than it.
fn tally_profile() -> anyhow::Result<Option<String>> {
    match std::env::var("TALLY_PEERS_PROFILE") {
        Err(_) => Ok(Some("collector".into())),
        Ok(p) if p == "sidecar" || p == "collector" => Ok(Some(p)),
        Ok(p) if p == "none" => Ok(None),
        Ok(p) => bail!("TALLY_PEERS_PROFILE={p:?}: use sidecar, collector or none"),
    }
}

/// The peer: `TALLY_BENTHOS_BIN`, else what the build script prints (it builds only when the
/// binary is not in its cache yet; its progress goes to this stderr).
fn benthos_binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("TALLY_BENTHOS_BIN") {
        let path = PathBuf::from(path);
        if path.is_file() {
            return Ok(path);
        }
        bail!(
            "TALLY_BENTHOS_BIN={} does not exist; build it with {}/build.sh",
            path.display(),
            peer_dir().display()
        );
    }
    let script = peer_dir().join("build.sh");
    let output = Command::new("bash")
        .arg(&script)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("cannot run {}", script.display()))?;
    if !output.status.success() {
        bail!("{} failed ({})", script.display(), output.status);
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let path = stdout
        .lines()
        .last()
        .map(|l| PathBuf::from(l.trim()))
        .with_context(|| format!("{} printed no path", script.display()))?;
    if !path.is_file() {
        bail!(
            "{} printed {}, which does not exist",
            script.display(),
            path.display()
        );
    }
    Ok(path)
}

struct Binaries {
    sidecar: PathBuf,
    benthos: PathBuf,
}

/// A running Benthos with the translated preset.
struct Benthos {
    process: Watched,
    ingest: SocketAddr,
}

impl Benthos {
    /// Starts the peer in `dir` forwarding to `upstream_port`, and waits until its `/ready`
    /// answers 200 and its ingest address accepts connections.
    async fn start(binary: &Path, dir: &Path, upstream_port: u16) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let ingest = SocketAddr::from(([127, 0, 0, 1], unused_port()));
        let http = SocketAddr::from(([127, 0, 0, 1], unused_port()));
        let mut process = Watched::spawn(
            Command::new(binary)
                .arg("-c")
                .arg(peer_config())
                .current_dir(dir)
                .env("INGEST_ADDRESS", ingest.to_string())
                .env("BENTHOS_HTTP_ADDRESS", http.to_string())
                .env("OPENMETER_URL", format!("http://127.0.0.1:{upstream_port}"))
                .env("LOG_LEVEL", "INFO")
                .stdin(Stdio::null())
                // Benthos logs to stdout: kept in the same tail as stderr.
                .stdout(Stdio::piped()),
            |_| {},
        )?;
        process
            .wait_until("benthos", READY_LIMIT, async || {
                matches!(load::get(http, "/ready").await, Ok((StatusCode::OK, _)))
                    && tokio::net::TcpStream::connect(ingest).await.is_ok()
            })
            .await?;
        Ok(Benthos { process, ingest })
    }
}

/// Either system, running.
enum Running {
    Tally(SidecarProcess),
    Peer(Benthos),
}

impl Running {
    /// Starts `system` on `dir` forwarding to `upstream_port`, ready for load.
    async fn start(
        binaries: &Binaries,
        system: System,
        dir: &Path,
        upstream_port: u16,
    ) -> anyhow::Result<Self> {
        Ok(match system {
            System::Tally => {
                let config = upstream_config(
                    dir,
                    upstream_port,
                    BATCHING,
                    DEFAULT_RETRY,
                    tally_profile()?.as_deref(),
                );
                Running::Tally(start_ready(&binaries.sidecar, dir, &config).await?)
            }
            System::Peer => {
                Running::Peer(Benthos::start(&binaries.benthos, dir, upstream_port).await?)
            }
        })
    }

    fn addr(&self) -> SocketAddr {
        match self {
            Running::Tally(sidecar) => sidecar.addr(),
            Running::Peer(peer) => peer.ingest,
        }
    }

    fn cpu_time(&self) -> anyhow::Result<Duration> {
        match self {
            Running::Tally(sidecar) => sidecar.cpu_time(),
            Running::Peer(peer) => peer.process.cpu_time(),
        }
    }

    fn memory(&self) -> anyhow::Result<Memory> {
        match self {
            Running::Tally(sidecar) => sidecar.memory(),
            Running::Peer(peer) => peer.process.memory(),
        }
    }

    /// `e`, followed by the last lines the process logged.
    fn explain(&self, e: anyhow::Error) -> anyhow::Error {
        match self {
            Running::Tally(sidecar) => with_stderr(e, sidecar),
            Running::Peer(peer) => anyhow::anyhow!(
                "{e:#}\nbenthos output (last lines):\n{}",
                peer.process.stderr_tail()
            ),
        }
    }

    /// SIGTERM and a clean exit.
    async fn stop(self) -> anyhow::Result<()> {
        match self {
            Running::Tally(sidecar) => sidecar.stop(STOP_LIMIT).await,
            Running::Peer(peer) => peer.process.terminate("benthos", STOP_LIMIT).await,
        }
    }

    /// SIGKILL.
    fn kill(self) -> anyhow::Result<()> {
        match self {
            Running::Tally(sidecar) => sidecar.kill(),
            Running::Peer(peer) => peer.process.kill(),
        }
    }
}

/// One run of `system` on a fresh directory and a fresh upstream.
async fn measure(
    binaries: &Binaries,
    system: System,
    dir: &Path,
    measured: Duration,
    round: usize,
) -> anyhow::Result<Run> {
    let ids = Arc::new(IdTally::new(ID_CAPACITY));
    let upstream = HttpSink::bind(0, SinkMode::CountIds(ids.clone())).await?;
    let running = Running::start(binaries, system, dir, upstream.addr().port()).await?;
    let run = measure_running(&running, &ids, system, measured, round)
        .await
        .map_err(|e| running.explain(e))?;
    running.stop().await?;
    drop(upstream);
    Ok(run)
}

async fn measure_running(
    running: &Running,
    ids: &IdTally,
    system: System,
    measured: Duration,
    round: usize,
) -> anyhow::Result<Run> {
    let factory = Arc::new(EventFactory::new(format!("{}-{}", system.key(), nonce())));
    let mut spec = LoadSpec {
        connections: CONNECTIONS,
        events_per_request: EVENTS_PER_REQUEST,
        duration: WARM_UP,
        max_requests: None,
        requests_per_second: None,
    };
    let warm_up = load::run(running.addr(), &spec, factory.clone()).await;
    ensure_clean(&warm_up, "warm-up")?;
    let warm_up_events = warm_up.acked_events(EVENTS_PER_REQUEST);
    wait_for_delivery(ids, warm_up_events, "the warm-up's events").await?;

    let cpu_before = running.cpu_time()?;
    let bench_cpu_before = cpu_time_of(std::process::id())?;
    spec.duration = measured;
    let report = load::run(running.addr(), &spec, factory).await;
    let cpu_during_load = running.cpu_time()?.saturating_sub(cpu_before);
    let bench_cpu = cpu_time_of(std::process::id())?.saturating_sub(bench_cpu_before);
    ensure_clean(&report, "measured load")?;
    let acked = report.acked_events(EVENTS_PER_REQUEST);
    wait_for_delivery(ids, warm_up_events + acked, "every acknowledged event").await?;
    let catch_up = report
        .last_ack_at
        .map_or(Duration::ZERO, |last| last.elapsed());
    let cpu = running.cpu_time()?.saturating_sub(cpu_before);
    let memory = running.memory()?;
    let seconds = report.elapsed.as_secs_f64();
    Ok(Run {
        round,
        system,
        acked_events: acked,
        seconds,
        acked_events_per_second: acked as f64 / seconds,
        p50_ms: report.latencies.quantile_ms(0.5),
        p99_ms: report.latencies.quantile_ms(0.99),
        cpu_seconds_per_million_events: cpu.as_secs_f64() / acked as f64 * 1e6,
        cpu_seconds_per_million_events_during_load: cpu_during_load.as_secs_f64() / acked as f64
            * 1e6,
        peak_rss_mib: memory.peak_rss as f64 / MIB,
        catch_up_seconds: catch_up.as_secs_f64(),
        duplicates: ids.duplicates(),
        cpu_cores: cpu_during_load.as_secs_f64() / seconds,
        bench_cpu_cores: bench_cpu.as_secs_f64() / seconds,
    })
}

/// Returns once the upstream has `events` distinct events; fails after [`DELIVERY_LIMIT`].
async fn wait_for_delivery(ids: &IdTally, events: u64, what: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + DELIVERY_LIMIT;
    while ids.unique() < events {
        if Instant::now() >= deadline {
            bail!(
                "the upstream has {} of {events} events ({what}) {DELIVERY_LIMIT:?} later",
                ids.unique()
            );
        }
        tokio::time::sleep(DELIVERY_POLL).await;
    }
    Ok(())
}

/// The loss test of `system` (see the module's documentation).
async fn measure_loss(binaries: &Binaries, system: System, dir: &Path) -> anyhow::Result<Loss> {
    // Nothing listens on this port until the restart: the process's deliveries are refused.
    let upstream_port = unused_port();
    let running = Running::start(binaries, system, dir, upstream_port).await?;
    let factory = Arc::new(EventFactory::new(format!(
        "loss-{}-{}",
        system.key(),
        nonce()
    )));
    let spec = LoadSpec {
        connections: CONNECTIONS,
        events_per_request: EVENTS_PER_REQUEST,
        duration: LOSS_LOAD + LOSS_LOAD_TAIL,
        max_requests: None,
        requests_per_second: None,
    };
    let addr = running.addr();
    let load = tokio::spawn(async move { load::run(addr, &spec, factory).await });
    tokio::time::sleep(LOSS_LOAD).await;
    if load.is_finished() {
        // The load ends early only when every connection failed: the process is in trouble.
        let report = load.await.context("the load task failed")?;
        return Err(running.explain(anyhow::anyhow!(
            "the load stopped before the kill: {} requests acknowledged, statuses {:?}, {} without answer",
            report.acked_requests,
            report.failed_statuses,
            report.transport_errors
        )));
    }
    running.kill()?;
    // Its connections fail now, so the load ends within a fraction of a second.
    let report = load.await.context("the load task failed")?;
    let acked = report.acked_events(EVENTS_PER_REQUEST);
    if acked == 0 {
        bail!(
            "no event was acknowledged before the kill (statuses {:?}, {} without answer)",
            report.failed_statuses,
            report.transport_errors
        );
    }

    let ids = Arc::new(IdTally::new(ID_CAPACITY));
    let upstream = HttpSink::bind(upstream_port, SinkMode::CountIds(ids.clone()))
        .await
        .context("cannot start the upstream on the port the process forwarded to")?;
    let restarted = Running::start(binaries, system, dir, upstream_port)
        .await
        .context("the restart after SIGKILL failed")?;
    let started = Instant::now();
    let mut seen = ids.unique();
    let mut last_change = Instant::now();
    let settled_by = loop {
        let unique = ids.unique();
        if unique >= acked && ids.missing(&report.acked_firsts, EVENTS_PER_REQUEST) == 0 {
            break "every acknowledged event delivered";
        }
        if unique != seen {
            seen = unique;
            last_change = Instant::now();
        } else if last_change.elapsed() >= SETTLE_QUIET {
            break "no new event for 5 s";
        }
        if started.elapsed() >= SETTLE_LIMIT {
            break "deadline (120 s)";
        }
        tokio::time::sleep(SETTLE_POLL).await;
    };
    let settle_seconds = started.elapsed().as_secs_f64();
    let lost = ids.missing(&report.acked_firsts, EVENTS_PER_REQUEST);
    restarted.stop().await?;
    drop(upstream);
    Ok(Loss {
        system,
        acked_events: acked,
        failed_statuses: report.failed_statuses,
        unanswered_requests: report.transport_errors,
        lost,
        delivered: ids.unique(),
        duplicates: ids.duplicates(),
        settle_seconds,
        settled_by,
    })
}

/// One figure measured in every run, and its goal as a ratio Tally / peer.
struct Measure {
    tally: (&'static str, &'static str),
    peer: (&'static str, &'static str),
    ratio: (&'static str, &'static str),
    unit: &'static str,
    goal: Option<Bound>,
    value: fn(&Run) -> f64,
}

const MEASURES: [Measure; 4] = [
    Measure {
        tally: (
            "tally_acked_events_per_second",
            "acknowledged events/s: Tally",
        ),
        peer: (
            "peer_acked_events_per_second",
            "acknowledged events/s: peer",
        ),
        ratio: (
            "ratio_acked_events_per_second",
            "acknowledged events/s: Tally / peer",
        ),
        unit: "events/s",
        goal: Some(Bound::AtLeast(GOAL_EVENTS_PER_SECOND_RATIO)),
        value: acked_events_per_second,
    },
    Measure {
        tally: (
            "tally_cpu_seconds_per_million_events",
            "CPU-s per 1M acked events: Tally",
        ),
        peer: (
            "peer_cpu_seconds_per_million_events",
            "CPU-s per 1M acked events: peer",
        ),
        ratio: (
            "ratio_cpu_seconds_per_million_events",
            "CPU per acked event: Tally / peer",
        ),
        unit: "s",
        goal: Some(Bound::AtMost(GOAL_CPU_PER_EVENT_RATIO)),
        value: cpu_seconds_per_million_events,
    },
    Measure {
        tally: ("tally_peak_rss_mib", "peak RSS (VmHWM): Tally"),
        peer: ("peer_peak_rss_mib", "peak RSS (VmHWM): peer"),
        ratio: ("ratio_peak_rss", "peak RSS: Tally / peer"),
        unit: "MiB",
        goal: Some(Bound::AtMost(GOAL_PEAK_RSS_RATIO)),
        value: peak_rss_mib,
    },
    Measure {
        tally: (
            "tally_catch_up_seconds",
            "upstream has everything, after the last ack: Tally",
        ),
        peer: (
            "peer_catch_up_seconds",
            "upstream has everything, after the last ack: peer",
        ),
        ratio: (
            "ratio_catch_up_seconds",
            "upstream has everything: Tally / peer",
        ),
        unit: "s",
        goal: None,
        value: catch_up_seconds,
    },
];

fn acked_events_per_second(r: &Run) -> f64 {
    r.acked_events_per_second
}

fn cpu_seconds_per_million_events(r: &Run) -> f64 {
    r.cpu_seconds_per_million_events
}

fn peak_rss_mib(r: &Run) -> f64 {
    r.peak_rss_mib
}

fn catch_up_seconds(r: &Run) -> f64 {
    r.catch_up_seconds
}

/// Per measure: each system's median over the rounds (its range in the note), and the ratio of
/// the medians against the goal (the ratios of the single rounds in the note). Then the losses.
fn figures(runs: &[Run], losses: &[Loss]) -> Vec<Figure> {
    let mut figures = Vec::new();
    for m in &MEASURES {
        let of = |system: System| -> Vec<(usize, f64)> {
            runs.iter()
                .filter(|r| r.system == system)
                .map(|r| (r.round, (m.value)(r)))
                .collect()
        };
        let (tally, peer) = (of(System::Tally), of(System::Peer));
        let summary = |values: &[(usize, f64)]| -> (Option<f64>, String) {
            let values: Vec<f64> = values.iter().map(|(_, v)| *v).collect();
            if values.is_empty() {
                return (None, String::new());
            }
            let min = values.iter().copied().fold(f64::INFINITY, f64::min);
            let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            (
                Some(median(&values)),
                format!(
                    "median of {}; range {} – {} {}",
                    values.len(),
                    number(min),
                    number(max),
                    m.unit
                ),
            )
        };
        let (tally_median, tally_note) = summary(&tally);
        let (peer_median, peer_note) = summary(&peer);
        let ratio = tally_median
            .zip(peer_median)
            .filter(|(_, p)| *p > 0.0)
            .map(|(t, p)| t / p);
        let per_round: Vec<String> = tally
            .iter()
            .filter_map(|(round, t)| {
                let (_, p) = peer.iter().find(|(r, _)| r == round)?;
                (*p > 0.0).then(|| format!("{:.3}", t / p))
            })
            .collect();
        figures.push(
            Figure::new(m.tally.0, m.tally.1, m.unit)
                .value(tally_median)
                .note(tally_note),
        );
        figures.push(
            Figure::new(m.peer.0, m.peer.1, m.unit)
                .value(peer_median)
                .note(peer_note),
        );
        figures.push(
            Figure::new(m.ratio.0, m.ratio.1, "x")
                .value(ratio)
                .bound(m.goal)
                .note(if per_round.is_empty() {
                    String::new()
                } else {
                    format!("rounds: {}", per_round.join(", "))
                }),
        );
    }
    let loss = |system: System| losses.iter().find(|l| l.system == system);
    let loss_note = |l: Option<&Loss>| match l {
        Some(l) => format!(
            "of {} acknowledged; {} delivered after the restart, settled: {}",
            l.acked_events, l.delivered, l.settled_by
        ),
        None => String::new(),
    };
    figures.push(
        Figure::new(
            "tally_acked_then_lost",
            "acknowledged, lost after kill -9: Tally",
            "events",
        )
        .value(loss(System::Tally).map(|l| l.lost as f64))
        .bound(Some(Bound::AtMost(0.0)))
        .note(loss_note(loss(System::Tally))),
    );
    figures.push(
        Figure::new(
            "peer_acked_then_lost",
            "acknowledged, lost after kill -9: peer",
            "events",
        )
        .value(loss(System::Peer).map(|l| l.lost as f64))
        .note(loss_note(loss(System::Peer))),
    );
    figures
}
