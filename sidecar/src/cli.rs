//! The command line: run the collector, check a configuration, inspect the buffer and the
//! dead-letter store.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::buffer::{BufferError, DurableBuffer};
use crate::collector::{self, buffer_options};
use crate::config::{Config, LogFormat};

/// Exit code of configuration and usage errors.
const EXIT_CONFIG: u8 = 2;

#[derive(Parser)]
#[command(
    name = "tally-sidecar",
    version,
    about = "Durable usage-event collector"
)]
struct Cli {
    /// Configuration file (YAML). Without it, the YAML text in TALLY_CONFIG_YAML, else built-in
    /// defaults.
    #[arg(long, short, global = true, env = "TALLY_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the collector (the default).
    Run,
    /// Deliver everything in the buffer with the configured outputs, accept nothing, and exit:
    /// 0 when the buffer is empty, 1 otherwise. The operator runs it as a Job on the buffer
    /// volume of a collector replica that was scaled away.
    Drain {
        /// Also write the report (JSON) to this file, for example /dev/termination-log.
        #[arg(long)]
        report: Option<PathBuf>,
    },
    /// Validate a configuration file without starting.
    CheckConfig {
        /// The file to check.
        file: PathBuf,
    },
    /// Inspect the buffer.
    Buffer {
        #[command(subcommand)]
        command: BufferCommand,
    },
    /// Inspect and re-send dead-lettered events.
    DeadLetter {
        #[command(subcommand)]
        command: DeadLetterCommand,
    },
}

#[derive(Subcommand)]
enum BufferCommand {
    /// Events, bytes, oldest event age and per-output lag. Works while the collector runs.
    Stats {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Scan every record read-only (works while the collector runs) and report damaged ones.
    /// Exits 0 when none is found, 3 when some are (the collector quarantines them by itself;
    /// `buffer repair` does it offline), 1 when the buffer cannot be read.
    Check {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Repair a stopped collector's buffer: RocksDB's repairer for damaged files, then every
    /// damaged record to the quarantine. Every readable event is kept.
    Repair,
}

/// Exit code of `buffer check` when damaged records were found.
const EXIT_DAMAGED: u8 = 3;

#[derive(Subcommand)]
enum DeadLetterCommand {
    /// List dead-lettered events, oldest first.
    List {
        /// Only this output's events.
        #[arg(long)]
        output: Option<String>,
        /// At most this many events.
        #[arg(long, default_value_t = 1000)]
        limit: usize,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Send dead-lettered events again, to the output that rejected them.
    Replay {
        /// Only this output's events.
        #[arg(long)]
        output: Option<String>,
    },
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::CheckConfig { file }) = &cli.command {
        return match Config::load(file) {
            Ok(_) => {
                println!("{}: ok", file.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(EXIT_CONFIG)
            }
        };
    }
    let config = match load(cli.config.as_deref()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    // Naming an output the configuration does not have is a usage error, told apart from an
    // empty dead-letter store (which would otherwise look the same: nothing listed).
    if let Some(Command::DeadLetter {
        command:
            DeadLetterCommand::List {
                output: Some(name), ..
            }
            | DeadLetterCommand::Replay { output: Some(name) },
    }) = &cli.command
        && let Err(message) = known_output(&config, name)
    {
        eprintln!("error: {message}");
        return ExitCode::from(EXIT_CONFIG);
    }
    let result = match cli.command {
        None | Some(Command::Run) => run(config),
        Some(Command::Drain { report }) => drain(config, report.as_deref()),
        Some(Command::Buffer {
            command: BufferCommand::Stats { json },
        }) => buffer_stats(&config, json),
        Some(Command::Buffer {
            command: BufferCommand::Check { json },
        }) => match buffer_check(&config, json) {
            Ok(true) => Ok(()),
            Ok(false) => return ExitCode::from(EXIT_DAMAGED),
            Err(e) => Err(e),
        },
        Some(Command::Buffer {
            command: BufferCommand::Repair,
        }) => buffer_repair(&config),
        Some(Command::DeadLetter {
            command:
                DeadLetterCommand::List {
                    output,
                    limit,
                    json,
                },
        }) => dead_letter_list(&config, output.as_deref(), limit, json),
        Some(Command::DeadLetter {
            command: DeadLetterCommand::Replay { output },
        }) => dead_letter_replay(&config, output),
        Some(Command::CheckConfig { .. }) => Ok(()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The environment variable that may hold the whole configuration as YAML text, for containers
/// configured without a file (the injected sidecar).
pub const CONFIG_YAML_ENV: &str = "TALLY_CONFIG_YAML";

/// The configuration from `--config` / `TALLY_CONFIG`, else from `TALLY_CONFIG_YAML`, else the
/// built-in defaults.
fn load(path: Option<&Path>) -> Result<Config, crate::config::ConfigError> {
    let inline = std::env::var(CONFIG_YAML_ENV)
        .ok()
        .filter(|text| !text.trim().is_empty());
    match (path, inline) {
        (Some(path), None) => Config::load(path),
        (Some(path), Some(_)) => Err(crate::config::ConfigError::Invalid {
            origin: CONFIG_YAML_ENV.into(),
            key: "(top level)".into(),
            message: format!(
                "both a configuration file ({}) and {CONFIG_YAML_ENV} are set; use one of them",
                path.display()
            ),
        }),
        (None, Some(text)) => Config::parse(&text, CONFIG_YAML_ENV),
        (None, None) => Ok(Config::default()),
    }
}

fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&config.log.level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match config.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(16)
        .on_thread_start(crate::buffer::skip_perf_counters)
        .build()
        .context("cannot start the async runtime")
}

/// How much less CPU weight the ingest threads get than delivery when both want the CPU: nice 10
/// is about a tenth of the weight of nice 0. (At nice 5, a third, delivery in batches of 10 still
/// fell up to 0.95 s behind full-speed ingest in `make bench-keep-up`; at 10, at most 0.56 s.)
const INGEST_NICENESS: libc::c_int = 10;

/// The runtime that serves the HTTP API. Its threads run at a lower priority than delivery's, so
/// on a saturated CPU the sidecar spends its time getting events out before taking more in:
/// full-speed ingest would otherwise starve delivery and grow the buffer without end. Ingest
/// still gets every cycle delivery leaves (an outage, a slow upstream).
fn lower_priority() {
    // Linux applies a thread id's niceness to that thread only; raising it needs no privilege.
    // If it fails, ingest merely keeps an equal share.
    #[cfg(target_os = "linux")]
    {
        // SAFETY: setpriority and gettid only read their integer arguments.
        let done = unsafe {
            libc::setpriority(
                libc::PRIO_PROCESS,
                libc::gettid() as libc::id_t,
                INGEST_NICENESS,
            )
        };
        if done != 0 {
            tracing::debug!(error = %std::io::Error::last_os_error(), "cannot lower the ingest threads' priority");
        }
    }
}

fn ingest_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("tally-ingest")
        .max_blocking_threads(16)
        .on_thread_start(lower_priority)
        .build()
        .context("cannot start the ingest runtime")
}

/// Under `buffer.profile: sidecar`, glibc's malloc is held to a small footprint. Must run before
/// any other thread starts (logging starts none).
/// - At most two arenas instead of one per allocating thread (up to eight per core): memory
///   freed by one thread is reused by the others instead of sitting in its own arena.
/// - Blocks of 1 MiB and more are mapped on their own and go back to the system when freed,
///   instead of fragmenting the heap; glibc would otherwise raise this threshold up to 32 MiB as
///   such blocks are freed. Smaller ones, the memtables' arena blocks (512 KiB) among them, come
///   from the heap and are reused: at 256 KiB every memtable block was mapped, faulted in page
///   by page and unmapped again, which cost 14 % more CPU per event in `make bench-peers`. The
///   free pages this leaves in the heap go back to the system when ingest is quiet, and every
///   5 s while it is not ([`crate::collector::HeapRelease`], [`release_free_heap`]).
fn limit_malloc(config: &Config) {
    #[cfg(target_env = "gnu")]
    if tunes_malloc(config) {
        for (param, value, what) in [
            (libc::M_ARENA_MAX, 2, "arenas"),
            (libc::M_MMAP_THRESHOLD, 1 << 20, "mmap threshold"),
        ] {
            // SAFETY: mallopt only sets a tunable of the allocator; no thread is running yet.
            if unsafe { libc::mallopt(param, value) } != 1 {
                tracing::debug!("cannot set malloc's {what}");
            }
        }
    }
    #[cfg(not(target_env = "gnu"))]
    let _ = config;
}

/// Whether `config` holds malloc to the small footprint of `limit_malloc`; the collector then
/// also releases the heap when ingest is quiet ([`crate::collector::HeapRelease`]) and, once
/// start-up is done, unmaps the code pages it mapped ([`shed_code_pages`]).
pub fn tunes_malloc(config: &Config) -> bool {
    config.buffer.profile == crate::config::BufferProfile::Sidecar
}

/// Returns the heap's free pages to the system, wherever in the heap they are (not only at its
/// top, as glibc does by itself).
pub fn release_free_heap() {
    // SAFETY: malloc_trim only releases memory the allocator holds free; it is thread-safe.
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Unmaps the pages of the program's own machine code from this process, and has the kernel map
/// them back one at a time as they run. The kernel maps code in whole page-cache folios (up to
/// megabytes) around each page that runs, so after start-up most of the sidecar's 10 MiB of code
/// counted as resident, though an idle or busy sidecar runs a fraction of it. Code is never
/// written (the program has no text relocations), so a page dropped here is read back from the
/// page cache unchanged when it next runs. Returns the bytes of code unmapped.
pub fn shed_code_pages() -> usize {
    #[cfg(target_os = "linux")]
    {
        let (Ok(exe), Ok(maps)) = (
            std::fs::read_link("/proc/self/exe"),
            std::fs::read_to_string("/proc/self/maps"),
        ) else {
            return 0;
        };
        let mut shed = 0;
        for line in maps.lines() {
            // start-end perms offset device inode path; the path (absolute) may hold spaces.
            let mut fields = line.split_whitespace();
            let (Some(range), Some("r-xp"), Some(path)) = (
                fields.next(),
                fields.next(),
                line.find('/').map(|at| &line[at..]),
            ) else {
                continue;
            };
            let Some((start, end)) = range.split_once('-').and_then(|(a, b)| {
                Some((
                    usize::from_str_radix(a, 16).ok()?,
                    usize::from_str_radix(b, 16).ok()?,
                ))
            }) else {
                continue;
            };
            if Path::new(path) != exe || end <= start {
                continue;
            }
            for advice in [libc::MADV_RANDOM, libc::MADV_DONTNEED] {
                // SAFETY: the range is the program file's executable mapping, private and never
                // written: dropping its pages only makes their next use read them from the file.
                if unsafe { libc::madvise(start as *mut libc::c_void, end - start, advice) } != 0 {
                    tracing::debug!(error = %std::io::Error::last_os_error(), "cannot unmap code pages");
                    return shed;
                }
            }
            shed += end - start;
        }
        shed
    }
    #[cfg(not(target_os = "linux"))]
    0
}

fn run(config: Config) -> anyhow::Result<()> {
    init_logging(&config);
    limit_malloc(&config);
    let ingest = ingest_runtime()?;
    let result = runtime()?.block_on(collector::run(config, ingest.handle().clone()));
    // Connections still open hold nothing acknowledged: their requests were answered or failed.
    ingest.shutdown_timeout(std::time::Duration::from_secs(1));
    result
}

fn drain(config: Config, report_file: Option<&Path>) -> anyhow::Result<()> {
    init_logging(&config);
    let report = runtime()?.block_on(collector::drain(config))?;
    let json = serde_json::to_string(&report)?;
    println!("{json}");
    if let Some(path) = report_file {
        std::fs::write(path, &json)
            .with_context(|| format!("cannot write the drain report to {}", path.display()))?;
    }
    if report.remaining > 0 {
        anyhow::bail!(
            "{} events are still buffered; run the drain again to deliver them",
            report.remaining
        );
    }
    if !report.is_empty() {
        tracing::warn!(
            dead_letters = report.dead_letters,
            quarantined = report.quarantined,
            "the buffer holds undelivered dead letters or damaged records; keep the volume and inspect it with `tally-sidecar dead-letter list` and `buffer check`"
        );
    }
    Ok(())
}

fn open_read_only(config: &Config) -> anyhow::Result<DurableBuffer> {
    DurableBuffer::open_read_only(buffer_options(config))
        .with_context(|| format!("cannot read the buffer in {}", config.data_dir.display()))
}

fn buffer_stats(config: &Config, json: bool) -> anyhow::Result<()> {
    let stats = open_read_only(config)?.stats();
    if json {
        println!("{}", serde_json::to_string(&stats)?);
        return Ok(());
    }
    println!("data directory:  {}", config.data_dir.display());
    println!("events:          {}", stats.events);
    println!(
        "bytes:           {} of {} (events, before compression)",
        stats.bytes, stats.events_max_bytes
    );
    println!(
        "data directory:  {} of {} (buffer.maxBytes)",
        stats.disk_bytes, stats.max_bytes
    );
    println!("quarantined:     {}", stats.quarantined);
    match stats.oldest_age_seconds {
        Some(age) => println!("oldest event:    {age:.1}s old"),
        None => println!("oldest event:    (buffer empty)"),
    }
    println!(
        "{:<24} {:>12} {:>12} {:>14}",
        "OUTPUT", "CURSOR", "LAG", "DEAD-LETTERED"
    );
    for output in stats.outputs {
        println!(
            "{:<24} {:>12} {:>12} {:>14}",
            output.name, output.cursor, output.lag, output.dead_letters
        );
    }
    Ok(())
}

/// Returns whether the buffer is free of damaged records.
fn buffer_check(config: &Config, json: bool) -> anyhow::Result<bool> {
    let report = crate::buffer::check(buffer_options(config))
        .with_context(|| format!("cannot read the buffer in {}", config.data_dir.display()))?;
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("data directory:  {}", config.data_dir.display());
        println!("events:          {}", report.events);
        println!("dead letters:    {}", report.dead_letters);
        println!(
            "quarantined:     {} (set aside earlier)",
            report.quarantined
        );
        let mut cursors: Vec<_> = report.cursors.iter().collect();
        cursors.sort();
        for (consumer, cursor) in cursors {
            println!("cursor {consumer}: {cursor}");
        }
        for damaged in &report.damaged {
            println!("damaged record {}: {}", damaged.key, damaged.reason);
        }
        if report.is_clean() {
            println!("ok: no damaged records");
        } else {
            println!(
                "{} damaged records; the collector quarantines them at its next start or read, or run `tally-sidecar buffer repair` while it is stopped",
                report.damaged.len()
            );
        }
    }
    Ok(report.is_clean())
}

fn buffer_repair(config: &Config) -> anyhow::Result<()> {
    let moved = crate::buffer::repair(buffer_options(config)).with_context(|| {
        format!(
            "cannot repair the buffer in {} (stop the collector that uses it first)",
            config.data_dir.display()
        )
    })?;
    println!(
        "repaired {}: {moved} damaged records quarantined",
        config.data_dir.display()
    );
    Ok(())
}

fn dead_letter_list(
    config: &Config,
    output: Option<&str>,
    limit: usize,
    json: bool,
) -> anyhow::Result<()> {
    let letters = open_read_only(config)?.dead_letters(output, limit)?;
    for letter in &letters {
        if json {
            println!("{}", serde_json::to_string(letter)?);
        } else {
            println!(
                "{} key={} failedAt={} status={} reason={}\n  {}",
                letter.output,
                letter.key,
                letter.failed_at,
                letter.status.map_or("-".to_string(), |s| s.to_string()),
                letter.reason,
                letter.event.get()
            );
        }
    }
    if !json {
        println!("{} dead-lettered events", letters.len());
    }
    Ok(())
}

/// `Err` with what to write instead when the configuration has no output `name`.
fn known_output(config: &Config, name: &str) -> Result<(), String> {
    let names: Vec<&str> = config
        .outputs
        .targets
        .iter()
        .map(|t| t.name.as_str())
        .collect();
    if names.contains(&name) {
        Ok(())
    } else {
        Err(format!(
            "--output {name:?}: the configuration has no output of that name; its outputs are: {}",
            names.join(", ")
        ))
    }
}

/// Replays offline when no collector runs on the data directory, else through the running
/// collector's admin API (RocksDB allows one writer process).
fn dead_letter_replay(config: &Config, output: Option<String>) -> anyhow::Result<()> {
    let replayed = match DurableBuffer::open(
        buffer_options(config),
        std::sync::Arc::new(crate::metrics::Metrics::new()),
    ) {
        Ok((buffer, writer)) => {
            let count = runtime()?.block_on(buffer.replay_dead_letters(output))?;
            buffer.flush()?;
            drop(buffer);
            writer.join();
            count
        }
        Err(BufferError::Open { source, .. }) if source.to_string().contains("lock") => {
            replay_through_admin_api(config, output)?
        }
        Err(e) => return Err(e.into()),
    };
    println!("replayed {replayed} events");
    Ok(())
}

fn replay_through_admin_api(config: &Config, output: Option<String>) -> anyhow::Result<usize> {
    let mut addr = config.listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let mut url = reqwest::Url::parse(&format!("http://{addr}/admin/dead-letter/replay"))?;
    if let Some(name) = &output {
        url.query_pairs_mut().append_pair("output", name);
    }
    let token = config.ingest_token()?;
    runtime()?.block_on(async move {
        let mut request = reqwest::Client::new().post(url.clone());
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.with_context(|| {
            format!("the buffer is in use by a running collector, and its admin API at {url} cannot be reached")
        })?;
        let status = response.status();
        let body: serde_json::Value = response.json().await.unwrap_or_default();
        if !status.is_success() {
            anyhow::bail!("the running collector answered {status}: {body}");
        }
        Ok(body["replayed"].as_u64().unwrap_or_default() as usize)
    })
}

#[cfg(test)]
mod tests {
    /// The program's code mapping is found and unmapped, and code keeps running: the pages come
    /// back from the file, unchanged.
    #[test]
    fn code_runs_on_after_its_pages_are_unmapped() {
        let shed = super::shed_code_pages();
        assert!(
            shed > 0,
            "no executable mapping of the test binary was found"
        );
        let parsed: crate::config::Config =
            serde_yaml::from_str("listen: 127.0.0.1:9000\n").expect("parse after shedding");
        assert_eq!(parsed.listen.port(), 9000);
    }
}
