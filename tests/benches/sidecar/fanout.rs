//! The fanOut step: one sidecar with two outputs, the blackhole HTTP upstream (`openmeter`) and a
//! private PostgreSQL server (`postgres`, the integration tests' [`TestPostgres`]), under the
//! ingest workload for the measured time. Then: how long each output takes to hold every
//! acknowledged event, and, in the same run, a plain `COPY ... FROM STDIN` of the same rows into
//! an identical fresh table, PostgreSQL's ceiling for loading them.
//!
//! Where the time goes on PostgreSQL's side is sampled too: the server's CPU (the postmaster and
//! every child, including autovacuum workers that came and went), WAL bytes written, and what the
//! writing session was doing (`pg_stat_activity` state and wait event, every 20 ms).

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use futures::{FutureExt, SinkExt, StreamExt, TryStreamExt};
use serde::Serialize;
use tally_tests::TestPostgres;
use tally_tests::poll::poll;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_postgres::Client;

use crate::events::{EventFactory, SOURCE};
use crate::load::{self, LoadSpec};
use crate::machine::{self, DiskUse};
use crate::process::{self, Metrics};
use crate::sink::{HttpSink, IdTally, SinkMode};
use crate::{
    CONNECTIONS, EVENTS_PER_REQUEST, STOP_LIMIT, WARM_UP, ensure_clean, nonce, start_ready,
    with_stderr,
};

/// The table the sidecar's `postgres` output creates and fills.
const TABLE: &str = "tally_events";
/// The identical table the plain COPY loads.
const COPY_TABLE: &str = "tally_events_copy";
/// The columns the sidecar writes (`received_at` takes its default in both loads).
const COLUMNS: &str =
    "source, id, type, subject, time, specversion, datacontenttype, dataschema, data, extensions";
/// Output names in the sidecar's configuration (and in its metrics' `output` label).
const BLACKHOLE: &str = "blackhole";
const POSTGRES: &str = "postgres";
/// The sidecar's `application_name` on its PostgreSQL connection, and the COPY session's.
const SIDECAR_APPLICATION: &str = "tally-sidecar";
const COPY_APPLICATION: &str = "tally-bench-copy";
/// Batching count of both outputs.
const BATCH_COUNT: u64 = 1000;
/// How often the writing session's state is sampled from `pg_stat_activity`.
const SAMPLE_EVERY: Duration = Duration::from_millis(20);
/// How often the outputs are checked for completeness once the load stopped.
const POLL_EVERY: Duration = Duration::from_millis(5);
/// Bounds of the waits, so a broken sidecar or server cannot hang the run.
const CATCH_UP_LIMIT: Duration = Duration::from_secs(120);
const COPY_LIMIT: Duration = Duration::from_secs(120);
/// The measured load stops after this many events per measured second (2M for the default 10 s),
/// so a faster machine does not stretch PostgreSQL's catch-up and the COPY past the bench's budget.
const MAX_EVENTS_PER_MEASURED_SECOND: f64 = 200_000.0;
/// The blackhole ticks ids off in a bitmap sized for this rate over the whole load (8 times the
/// fastest ingest seen); a faster sidecar shows up as unreadable ids, a failed phase.
const MAX_EVENTS_PER_SECOND: f64 = 2_000_000.0;

/// What the fanOut step measured, as written to bench-results.json.
#[derive(Serialize)]
pub struct FanOut {
    pub postgres_version: String,
    /// `initdb` and start-up of the private server, not part of any figure.
    pub postgres_start_seconds: f64,
    /// WAL segments created before the measured load (see `prefill_wal`), and how long it took.
    pub wal_segments_prefilled: u64,
    pub wal_prefill_seconds: f64,
    pub warm_up_events: u64,
    /// Events acknowledged during the measured load (durable acks).
    pub events: u64,
    pub load_seconds: f64,
    pub ingest_events_per_second: f64,
    pub ingest_p50_ms: f64,
    pub ingest_p99_ms: f64,
    /// CPU of the sidecar during the measured load, in cores.
    pub sidecar_cpu_cores: f64,
    /// CPU of this process (load generator, blackhole) during the measured load, in cores.
    pub bench_cpu_cores: f64,
    /// The sidecar's group commits during the measured load.
    pub commits_per_second: Option<f64>,
    pub events_per_commit: Option<f64>,
    /// The data disk during the measured load (every process's I/O, PostgreSQL's included when
    /// its directory is on the same disk).
    pub disk: Option<DiskUse>,
    pub blackhole: Delivery,
    pub postgres: Delivery,
    /// PostgreSQL's side while the sidecar delivered (first ack to last row).
    pub postgres_server: ServerSide,
    pub copy: Copy,
    /// postgres.per_second / copy.rows_per_second.
    pub tally_vs_copy: f64,
}

/// How one output received the measured events.
#[derive(Serialize)]
pub struct Delivery {
    /// From the first acknowledgement of the measured load until the output held every
    /// acknowledged event.
    pub seconds: f64,
    /// Acknowledged events / seconds: events/s (blackhole) or rows/s (PostgreSQL).
    pub per_second: f64,
    /// From the last acknowledgement until the output held every event.
    pub after_last_ack_seconds: f64,
    /// Delivered per second while the load ran (`tally_output_events_sent_total`).
    pub during_load_per_second: Option<f64>,
    /// Events the output did not have yet when the load stopped (`tally_output_lag_events`).
    pub lag_at_load_end: Option<f64>,
    /// lag_at_load_end / after_last_ack_seconds: the rate once the sidecar only delivered; absent
    /// when the output was less than ten batches behind.
    pub after_load_per_second: Option<f64>,
    pub batches: Option<f64>,
    pub mean_batch_events: Option<f64>,
    /// Mean duration of one delivery attempt (one POST, one INSERT statement).
    pub mean_send_ms: Option<f64>,
    /// Time inside delivery attempts / `seconds`: near 1, the destination is the limit; well
    /// below 1, the sidecar could not hand out batches fast enough.
    pub busy_fraction: Option<f64>,
    pub errors: Option<f64>,
    /// Events received more than once (at-least-once; only the blackhole can see them).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duplicates: Option<u64>,
}

/// PostgreSQL's side of a load.
#[derive(Serialize)]
pub struct ServerSide {
    /// The window the CPU and WAL figures cover (from just before the load to the moment the
    /// last row was seen).
    pub seconds: f64,
    /// CPU of the whole server (postmaster and all its processes), in cores.
    pub server_cpu_cores: Option<f64>,
    /// CPU of the session that wrote the rows, in cores.
    pub session_cpu_cores: Option<f64>,
    pub wal_bytes: Option<f64>,
    pub wal_bytes_per_row: Option<f64>,
    /// Fraction of the samples of the writing session in each state (`active: on CPU`,
    /// `active: IO:WALSync`, `idle: Client:ClientRead`, ...).
    pub session_states: BTreeMap<String, f64>,
    pub samples: u64,
}

/// The plain COPY of the same rows.
#[derive(Serialize)]
pub struct Copy {
    pub rows: u64,
    /// Bytes of COPY text sent.
    pub bytes: u64,
    /// One `COPY ... FROM STDIN` statement (its own transaction), from sending it to its commit.
    pub seconds: f64,
    pub rows_per_second: f64,
    /// Reading the rows back out of the sidecar's table first (`COPY (SELECT ...) TO STDOUT`),
    /// not timed into any figure.
    pub export_seconds: f64,
    pub server: ServerSide,
}

/// Starts a private PostgreSQL, runs the step, stops the server.
pub async fn measure_fan_out(
    binary: &Path,
    dir: &Path,
    measured: Duration,
    device: Option<&str>,
) -> anyhow::Result<FanOut> {
    let started = Instant::now();
    // TestPostgres panics (saying what to install) when it cannot start; catching that makes it
    // this phase's error instead of the end of the benchmark.
    let pg = AssertUnwindSafe(TestPostgres::start())
        .catch_unwind()
        .await
        .map_err(|panic| {
            anyhow::anyhow!(
                "cannot start PostgreSQL: {}",
                panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("panicked")
            )
        })?;
    let start_seconds = started.elapsed().as_secs_f64();
    let result = run(binary, dir, measured, device, &pg, start_seconds)
        .await
        .map_err(|e| {
            let log = pg.log();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            anyhow::anyhow!(
                "{e:#}\nPostgreSQL log (last lines):\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            )
        });
    // Stopping runs pg_ctl and waits for it: off the runtime's workers.
    let _ = tokio::task::spawn_blocking(move || drop(pg)).await;
    result
}

async fn run(
    binary: &Path,
    dir: &Path,
    measured: Duration,
    device: Option<&str>,
    pg: &TestPostgres,
    postgres_start_seconds: f64,
) -> anyhow::Result<FanOut> {
    let client = connect(pg).await?;
    let postgres_version: String = client
        .query_one("SHOW server_version", &[])
        .await?
        .try_get(0)?;
    let postmaster = postmaster_pid(&client).await?;

    let capacity = ((measured + WARM_UP).as_secs_f64() * MAX_EVENTS_PER_SECOND) as u64;
    let tally = Arc::new(IdTally::new(capacity));
    let blackhole = HttpSink::bind(0, SinkMode::CountIds(tally.clone())).await?;
    let config = config(dir, blackhole.addr().port(), &pg.url());
    let sidecar = start_ready(binary, dir, &config).await?;

    // Warm-up: connections, memtables, and the output's PostgreSQL connection and table. Both
    // outputs get every warm-up event before the measured load starts.
    let mut spec = LoadSpec {
        connections: CONNECTIONS,
        events_per_request: EVENTS_PER_REQUEST,
        duration: WARM_UP,
        max_requests: None,
        requests_per_second: None,
    };
    let run_id = nonce();
    let warm_up = Arc::new(EventFactory::new(format!("fanout-warm-{run_id}")));
    let report = load::run(sidecar.addr(), &spec, warm_up).await;
    ensure_clean(&report, "warm-up").map_err(|e| with_stderr(e, &sidecar))?;
    let warm_up_events = report.acked_events(EVENTS_PER_REQUEST);
    let warmed_up = poll(CATCH_UP_LIMIT, Duration::from_millis(20), async || {
        let rows = count_rows(&client).await.unwrap_or(0);
        if tally.unique() >= warm_up_events && rows >= warm_up_events {
            Ok(())
        } else {
            Err(rows)
        }
    })
    .await;
    if let Err(rows) = warmed_up {
        return Err(with_stderr(
            anyhow::anyhow!(
                "after the warm-up, the blackhole got {} and PostgreSQL {rows} of {warm_up_events} events within {CATCH_UP_LIMIT:?}",
                tally.unique()
            ),
            &sidecar,
        ));
    }

    let prefill_started = Instant::now();
    let wal_segments_prefilled = prefill_wal(&client).await.context("preparing the WAL")?;
    let wal_prefill_seconds = prefill_started.elapsed().as_secs_f64();

    // The measured load; its ids continue the warm-up's sequence numbers so the blackhole's
    // bitmap counts both.
    let session = session_pid(&client, SIDECAR_APPLICATION).await?;
    let before = Snapshot::take(&client, postmaster, session).await?;
    let metrics_before = sidecar.metrics().await?;
    let sidecar_cpu_before = sidecar.cpu_time()?;
    let bench_cpu_before = process::cpu_time_of(std::process::id())?;
    let sampler = Sampler::start(pg, SIDECAR_APPLICATION).await?;
    let disk_before = device.and_then(machine::disk_counters);
    let factory = Arc::new(EventFactory::starting_at(
        format!("fanout-load-{run_id}"),
        warm_up_events,
    ));
    spec.duration = measured;
    spec.max_requests = Some(
        (measured.as_secs_f64() * MAX_EVENTS_PER_MEASURED_SECOND / EVENTS_PER_REQUEST as f64)
            as u64,
    );
    let report = load::run(sidecar.addr(), &spec, factory.clone()).await;
    let disk = disk_before
        .zip(device.and_then(machine::disk_counters))
        .map(|(before, after)| after.since(&before));
    let sidecar_cpu = sidecar.cpu_time()?.saturating_sub(sidecar_cpu_before);
    let bench_cpu = process::cpu_time_of(std::process::id())?.saturating_sub(bench_cpu_before);
    let metrics_at_load_end = sidecar.metrics().await?;
    ensure_clean(&report, "measured load").map_err(|e| with_stderr(e, &sidecar))?;
    let load_seconds = report.elapsed.as_secs_f64();
    let events = report.acked_events(EVENTS_PER_REQUEST);
    let (Some(first_ack), Some(last_ack)) = (report.first_ack_at, report.last_ack_at) else {
        bail!("the measured load got no acknowledgement");
    };
    let expected = warm_up_events + events;
    let commits = match (
        metrics_before.sum("tally_buffer_commits_total"),
        metrics_at_load_end.sum("tally_buffer_commits_total"),
    ) {
        (Some(before), Some(after)) if after > before => Some(after - before),
        _ => None,
    };

    // The blackhole's bitmap is watched by its own task, every 2 ms.
    let blackhole_done = {
        let tally = tally.clone();
        tokio::spawn(async move {
            // Each check owns what it reads: a future borrowing from the task would make it not Send.
            poll(CATCH_UP_LIMIT, Duration::from_millis(2), move || {
                let tally = tally.clone();
                async move { (tally.unique() >= expected).then(Instant::now) }
            })
            .await
            .ok()
        })
    };
    // Both outputs deliver in buffer order, one batch (one transaction) at a time, so
    // PostgreSQL holds every acknowledged row once it holds the last event of each connection's
    // last acknowledged request: a probe of 16 keys through the primary key, cheap enough to
    // run every few milliseconds. A full count(*) then confirms it (if it fell short, it is
    // repeated until it does not, and the time is taken from that).
    let probe: Vec<String> = report.last_acked.iter().map(|n| factory.id(*n)).collect();
    let deadline = Instant::now() + CATCH_UP_LIMIT;
    let mut probe_hit: Option<(Instant, Snapshot)> = None;
    let mut fell_short = false;
    let (postgres_done, after) = loop {
        if probe_hit.is_none() && count_keys(&client, &probe).await? == probe.len() as u64 {
            let at = Instant::now();
            probe_hit = Some((at, Snapshot::take(&client, postmaster, session).await?));
        }
        if let Some((at, snapshot)) = probe_hit.take() {
            if count_rows(&client).await? >= expected {
                break if fell_short {
                    let now = Instant::now();
                    (now, Snapshot::take(&client, postmaster, session).await?)
                } else {
                    (at, snapshot)
                };
            }
            fell_short = true;
            probe_hit = Some((at, snapshot));
        }
        if Instant::now() >= deadline {
            return Err(with_stderr(
                anyhow::anyhow!(
                    "{CATCH_UP_LIMIT:?} after the load, PostgreSQL had {} of {expected} rows",
                    count_rows(&client).await.unwrap_or(0)
                ),
                &sidecar,
            ));
        }
        tokio::time::sleep(POLL_EVERY).await;
    };
    let states = sampler.finish().await?;
    let Some(blackhole_done) = blackhole_done
        .await
        .context("the blackhole watcher panicked")?
    else {
        return Err(with_stderr(
            anyhow::anyhow!(
                "{CATCH_UP_LIMIT:?} after the load, the blackhole had {} of {expected} events",
                tally.unique()
            ),
            &sidecar,
        ));
    };
    let metrics_after = sidecar.metrics().await?;
    let rows = count_rows(&client).await?;
    if rows != expected {
        bail!("PostgreSQL holds {rows} rows, {expected} were acknowledged");
    }
    if tally.unreadable() > 0 {
        bail!(
            "the blackhole got {} bodies or ids it could not read",
            tally.unreadable()
        );
    }
    sidecar.stop(STOP_LIMIT).await?;
    drop(blackhole);

    let delivery = |output: &str, done: Instant| {
        let seconds = (done - first_ack).as_secs_f64();
        let delta = |name: &str, from: &Metrics, to: &Metrics| {
            Some(to.output(name, output)? - from.output(name, output)?)
        };
        let batches = delta(
            "tally_output_batches_sent_total",
            &metrics_before,
            &metrics_after,
        );
        let sent = delta(
            "tally_output_events_sent_total",
            &metrics_before,
            &metrics_after,
        );
        let send_seconds = delta(
            "tally_output_send_duration_seconds_sum",
            &metrics_before,
            &metrics_after,
        );
        let attempts = delta(
            "tally_output_send_duration_seconds_count",
            &metrics_before,
            &metrics_after,
        );
        Delivery {
            seconds,
            per_second: events as f64 / seconds,
            after_last_ack_seconds: done.saturating_duration_since(last_ack).as_secs_f64(),
            during_load_per_second: delta(
                "tally_output_events_sent_total",
                &metrics_before,
                &metrics_at_load_end,
            )
            .map(|n| n / load_seconds),
            lag_at_load_end: metrics_at_load_end.output("tally_output_lag_events", output),
            // Only meaningful when the output was well behind, not by its last batch or two.
            after_load_per_second: metrics_at_load_end
                .output("tally_output_lag_events", output)
                .filter(|lag| *lag >= 10.0 * BATCH_COUNT as f64)
                .map(|lag| lag / done.saturating_duration_since(last_ack).as_secs_f64()),
            batches,
            mean_batch_events: sent.zip(batches).map(|(s, b)| s / b.max(1.0)),
            mean_send_ms: send_seconds
                .zip(attempts)
                .map(|(s, n)| s / n.max(1.0) * 1000.0),
            busy_fraction: send_seconds.map(|s| s / seconds),
            errors: delta("tally_output_errors_total", &metrics_before, &metrics_after),
            duplicates: None,
        }
    };
    let mut blackhole = delivery(BLACKHOLE, blackhole_done);
    blackhole.duplicates = Some(tally.duplicates());
    let postgres = delivery(POSTGRES, postgres_done);
    let postgres_server = ServerSide::between(&before, &after, events, states);

    let copy = measure_copy(
        pg,
        &client,
        postmaster,
        &format!("fanout-load-{run_id}-"),
        events,
    )
    .await
    .context("plain COPY")?;
    Ok(FanOut {
        postgres_version,
        postgres_start_seconds,
        wal_segments_prefilled,
        wal_prefill_seconds,
        warm_up_events,
        events,
        load_seconds,
        ingest_events_per_second: events as f64 / load_seconds,
        ingest_p50_ms: report.latencies.quantile_ms(0.5).unwrap_or_default(),
        ingest_p99_ms: report.latencies.quantile_ms(0.99).unwrap_or_default(),
        sidecar_cpu_cores: sidecar_cpu.as_secs_f64() / load_seconds,
        bench_cpu_cores: bench_cpu.as_secs_f64() / load_seconds,
        commits_per_second: commits.map(|c| c / load_seconds),
        events_per_commit: commits.map(|c| events as f64 / c),
        disk,
        tally_vs_copy: postgres.per_second / copy.rows_per_second,
        blackhole,
        postgres,
        postgres_server,
        copy,
    })
}

/// The measured rows (ids starting with `id_prefix`) read back out of the sidecar's table, then
/// loaded with one plain `COPY ... FROM STDIN` into a fresh table made `LIKE` it (same columns,
/// defaults and primary key), timed.
async fn measure_copy(
    pg: &TestPostgres,
    client: &Client,
    postmaster: u32,
    id_prefix: &str,
    expected: u64,
) -> anyhow::Result<Copy> {
    let exported = Instant::now();
    // The prefix is `fanout-load-<hex>-`: nothing in it is special to LIKE.
    let out = client
        .copy_out(&format!(
            "COPY (SELECT {COLUMNS} FROM {TABLE} WHERE source = '{SOURCE}' AND id LIKE '{id_prefix}%') TO STDOUT"
        ))
        .await
        .context("exporting the rows")?;
    let rows: Vec<Bytes> = tokio::time::timeout(COPY_LIMIT, out.try_collect())
        .await
        .context("exporting the rows took too long")?
        .context("exporting the rows")?;
    let export_seconds = exported.elapsed().as_secs_f64();
    let bytes = rows.iter().map(|r| r.len() as u64).sum();
    let lines = rows
        .iter()
        .map(|r| r.iter().filter(|b| **b == b'\n').count() as u64)
        .sum::<u64>();
    if lines != expected {
        bail!("exported {lines} rows, expected {expected}");
    }
    client
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS {COPY_TABLE};
             CREATE TABLE {COPY_TABLE} (LIKE {TABLE} INCLUDING ALL);
             CHECKPOINT;"
        ))
        .await
        .context("creating the COPY table")?;

    let copier = connect(pg).await?;
    copier
        .batch_execute(&format!("SET application_name = '{COPY_APPLICATION}'"))
        .await?;
    let session = session_pid(client, COPY_APPLICATION).await?;
    let sampler = Sampler::start(pg, COPY_APPLICATION).await?;
    let before = Snapshot::take(client, postmaster, session).await?;
    let started = Instant::now();
    let load = async {
        let sink = copier
            .copy_in::<_, Bytes>(&format!("COPY {COPY_TABLE} ({COLUMNS}) FROM STDIN"))
            .await?;
        futures::pin_mut!(sink);
        sink.send_all(&mut futures::stream::iter(rows).map(Ok))
            .await?;
        sink.finish().await
    };
    let copied = tokio::time::timeout(COPY_LIMIT, load)
        .await
        .context("the COPY took too long")?
        .context("COPY ... FROM STDIN")?;
    let seconds = started.elapsed().as_secs_f64();
    let after = Snapshot::take(client, postmaster, session).await?;
    let states = sampler.finish().await?;
    if copied != expected {
        bail!("COPY loaded {copied} rows, expected {expected}");
    }
    Ok(Copy {
        rows: copied,
        bytes,
        seconds,
        rows_per_second: copied as f64 / seconds,
        export_seconds,
        server: ServerSide::between(&before, &after, copied, states),
    })
}

/// A fresh cluster has no WAL segment files to recycle: every 16 MiB of WAL first creates and
/// zero-fills a new file (`IO:WALInitWrite`, `IO:WALInitSync` in the session's waits), which a
/// server that has been running for a while does not do, and which the COPY (after the sidecar's
/// load and a checkpoint) would not do either. So before the measured load, `max_wal_size` worth
/// of segments is created (one tiny insert and `pg_switch_wal()` each) and a checkpoint recycles
/// them. Returns the number of segments.
async fn prefill_wal(client: &Client) -> anyhow::Result<u64> {
    let row = client
        .query_one(
            "SELECT (SELECT setting::bigint FROM pg_settings WHERE name = 'max_wal_size') * 1024 * 1024 \
                  / (SELECT setting::bigint FROM pg_settings WHERE name = 'wal_segment_size')",
            &[],
        )
        .await?;
    let segments = row.try_get::<_, i64>(0)?.clamp(1, 1024) as u64;
    client
        .batch_execute("CHECKPOINT; CREATE TABLE tally_bench_wal_prefill (n int)")
        .await?;
    for _ in 0..segments {
        client
            .batch_execute(
                "INSERT INTO tally_bench_wal_prefill VALUES (1); SELECT pg_switch_wal();",
            )
            .await?;
    }
    client
        .batch_execute("DROP TABLE tally_bench_wal_prefill; CHECKPOINT")
        .await?;
    Ok(segments)
}

/// The sidecar's YAML: durable acks, fanOut to the blackhole and PostgreSQL, batches of 1000.
/// Under load every batch is full long before its period; the short period only bounds how long
/// the last, partial batch waits (the default 1 s would add up to a second to both figures).
fn config(dir: &Path, blackhole_port: u16, postgres_url: &str) -> String {
    format!(
        "listen: 127.0.0.1:0\n\
         dataDir: {data}\n\
         durability: sync\n\
         shutdownTimeout: 5s\n\
         buffer: {{ maxBytes: 4Gi, whenFull: reject }}\n\
         outputs:\n  \
           pattern: fanOut\n  \
           targets:\n    \
             - name: {BLACKHOLE}\n      \
               type: openmeter\n      \
               url: http://127.0.0.1:{blackhole_port}\n      \
               batching: {{ count: {BATCH_COUNT}, period: 50ms }}\n      \
               retry: {{ initialInterval: 50ms, maxInterval: 1s }}\n    \
             - name: {POSTGRES}\n      \
               type: postgres\n      \
               url: \"{postgres_url}\"\n      \
               table: {TABLE}\n      \
               timeout: 30s\n      \
               batching: {{ count: {BATCH_COUNT}, period: 50ms }}\n      \
               retry: {{ initialInterval: 50ms, maxInterval: 1s }}\n",
        data = dir.join("data").display(),
    )
}

async fn connect(pg: &TestPostgres) -> anyhow::Result<Client> {
    pg.try_client().await.with_context(|| {
        format!(
            "cannot connect to the private PostgreSQL on 127.0.0.1:{}",
            pg.port()
        )
    })
}

async fn count_rows(client: &Client) -> anyhow::Result<u64> {
    let n: i64 = client
        .query_one(&format!("SELECT count(*) FROM {TABLE}"), &[])
        .await
        .context("SELECT count(*)")?
        .try_get(0)?;
    Ok(n as u64)
}

/// How many of `ids` (with the workload's source) the table holds, through the primary key.
async fn count_keys(client: &Client, ids: &[String]) -> anyhow::Result<u64> {
    let n: i64 = client
        .query_one(
            &format!("SELECT count(*) FROM {TABLE} WHERE source = $1 AND id = ANY($2)"),
            &[&SOURCE, &ids],
        )
        .await
        .context("probing for the last rows")?
        .try_get(0)?;
    Ok(n as u64)
}

/// The postmaster: the parent of this connection's backend.
async fn postmaster_pid(client: &Client) -> anyhow::Result<u32> {
    let backend: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await?
        .try_get(0)?;
    process::parent_of(backend as u32)
}

/// The backend of the session with `application_name`, if there is exactly one.
async fn session_pid(client: &Client, application: &str) -> anyhow::Result<Option<u32>> {
    let rows = client
        .query(
            "SELECT pid FROM pg_stat_activity WHERE application_name = $1",
            &[&application],
        )
        .await?;
    Ok(match rows.as_slice() {
        [row] => Some(row.try_get::<_, i32>(0)? as u32),
        _ => None,
    })
}

/// Server CPU, the writing session's CPU and the WAL position at one moment.
struct Snapshot {
    at: Instant,
    server_cpu: Option<Duration>,
    session_cpu: Option<Duration>,
    wal_lsn: String,
}

impl Snapshot {
    async fn take(client: &Client, postmaster: u32, session: Option<u32>) -> anyhow::Result<Self> {
        let wal_lsn: String = client
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await?
            .try_get(0)?;
        Ok(Snapshot {
            at: Instant::now(),
            server_cpu: process::process_tree_cpu(postmaster).ok(),
            session_cpu: session.and_then(|pid| process::cpu_time_of(pid).ok()),
            wal_lsn,
        })
    }
}

impl ServerSide {
    fn between(
        before: &Snapshot,
        after: &Snapshot,
        rows: u64,
        (states, samples): (BTreeMap<String, f64>, u64),
    ) -> ServerSide {
        let seconds = (after.at - before.at).as_secs_f64();
        let cores = |a: Option<Duration>, b: Option<Duration>| {
            Some(b?.saturating_sub(a?).as_secs_f64() / seconds)
        };
        // pg_wal_lsn_diff needs the server; the text form is `HI/LO` in hex.
        let lsn = |text: &str| {
            let (hi, lo) = text.split_once('/')?;
            Some(u64::from_str_radix(hi, 16).ok()? << 32 | u64::from_str_radix(lo, 16).ok()?)
        };
        let wal_bytes = lsn(&after.wal_lsn)
            .zip(lsn(&before.wal_lsn))
            .map(|(a, b)| a.saturating_sub(b) as f64);
        ServerSide {
            seconds,
            server_cpu_cores: cores(before.server_cpu, after.server_cpu),
            session_cpu_cores: cores(before.session_cpu, after.session_cpu),
            wal_bytes,
            wal_bytes_per_row: wal_bytes.map(|w| w / rows.max(1) as f64),
            session_states: states,
            samples,
        }
    }
}

/// Samples what the session with an `application_name` is doing, on its own connection.
struct Sampler {
    stop: Arc<AtomicBool>,
    task: JoinHandle<anyhow::Result<BTreeMap<String, u64>>>,
}

impl Sampler {
    async fn start(pg: &TestPostgres, application: &'static str) -> anyhow::Result<Sampler> {
        let client = connect(pg).await?;
        let statement = client
            .prepare(
                "SELECT state, wait_event_type, wait_event FROM pg_stat_activity \
                 WHERE application_name = $1",
            )
            .await?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            let mut counts = BTreeMap::<String, u64>::new();
            let mut ticks = tokio::time::interval(SAMPLE_EVERY);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            while !stopped.load(Ordering::Relaxed) {
                ticks.tick().await;
                for row in client.query(&statement, &[&application]).await? {
                    let state: Option<String> = row.try_get(0)?;
                    let kind: Option<String> = row.try_get(1)?;
                    let event: Option<String> = row.try_get(2)?;
                    let key = match (state.as_deref(), kind, event) {
                        (Some("active"), None, _) => "active: on CPU".to_owned(),
                        (Some(state), Some(kind), Some(event)) => {
                            format!("{state}: {kind}:{event}")
                        }
                        (state, _, _) => state.unwrap_or("unknown").to_owned(),
                    };
                    *counts.entry(key).or_default() += 1;
                }
            }
            Ok(counts)
        });
        Ok(Sampler { stop, task })
    }

    /// The fraction of samples in each state, and the number of samples.
    async fn finish(self) -> anyhow::Result<(BTreeMap<String, f64>, u64)> {
        self.stop.store(true, Ordering::Relaxed);
        let counts = self.task.await.context("the sampler panicked")??;
        let total = counts.values().sum::<u64>();
        let fractions = counts
            .into_iter()
            .map(|(state, n)| (state, n as f64 / total.max(1) as f64))
            .collect();
        Ok((fractions, total))
    }
}
