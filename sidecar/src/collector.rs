//! The running collector: opens the buffer, starts one forwarder per output and the HTTP server,
//! and stops them in order on SIGTERM (stop accepting, finish in-flight writes, let outputs
//! flush for `shutdownTimeout`, close the buffer).

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::buffer::{Budget, BufferOptions, DurableBuffer, SHARED_CONSUMER};
use crate::config::{BrokerPattern, Config};
use crate::forward::{BatchReader, Choice, Dispatcher, FailureLog, Fallback, Forwarder, Sender};
use crate::metrics::Metrics;
use crate::output::Output;
use crate::server::{AppState, router};
use serde::{Deserialize, Serialize};

/// How often the buffer's upkeep runs and the buffer gauges are refreshed. Delivered events are
/// deleted as their batches settle; this only bounds recovery and retention delays.
const MAINTENANCE_INTERVAL: Duration = Duration::from_millis(250);

/// The buffer options a configuration implies.
pub fn buffer_options(config: &Config) -> BufferOptions {
    BufferOptions {
        dir: config.data_dir.clone(),
        durability: config.durability,
        budget: config.budget().unwrap_or_else(|_| {
            Budget::lenient(
                config.buffer.max_bytes.get(),
                config.dead_letter.max_bytes.map_or(0, |b| b.get()),
                config.dedup.max_bytes.map_or(0, |b| b.get()),
            )
        }),
        when_full: config.buffer.when_full,
        profile: config.buffer.profile,
        dedup_window_ms: config.dedup.window.get().as_millis() as u64,
        outputs: config
            .outputs
            .targets
            .iter()
            .map(|t| t.name.clone())
            .collect(),
        shared: !config.outputs.pattern.fans_out(),
        max_lag: config
            .outputs
            .targets
            .iter()
            .filter_map(|t| Some((t.name.clone(), t.max_lag?)))
            .collect(),
        dead_letter_max_age_ms: config.dead_letter.max_age.get().as_millis() as u64,
    }
}

/// Builds one sender per output and starts the forwarders of the configured broker pattern. They
/// run until `draining` turns true and everything buffered is settled.
fn spawn_forwarders(
    config: &Config,
    buffer: &DurableBuffer,
    metrics: &Arc<Metrics>,
    draining: &watch::Receiver<bool>,
) -> anyhow::Result<JoinSet<()>> {
    let pattern = config.outputs.pattern;
    let targets = &config.outputs.targets;
    let senders = targets
        .iter()
        .enumerate()
        .map(|(i, target)| {
            metrics.register_output(&target.name);
            Ok(Sender {
                name: target.name.clone(),
                output: Output::build(target, i)?,
                retry: target.retry.clone(),
                fail_fast: pattern.fail_fast(),
                buffer: buffer.clone(),
                metrics: metrics.clone(),
                failures: FailureLog::default(),
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut forwarders = JoinSet::new();
    if pattern.fans_out() {
        for (i, (target, sender)) in targets.iter().zip(senders).enumerate() {
            let gate = (pattern.sequential() && i > 0).then(|| targets[i - 1].name.clone());
            let reader =
                BatchReader::new(buffer.clone(), &target.name, target.batching.clone(), gate);
            forwarders.spawn(
                Forwarder {
                    reader,
                    sender,
                    max_in_flight: target.max_in_flight,
                }
                .run(draining.clone()),
            );
        }
    } else {
        // One batching policy for all: batches are formed before an output is chosen.
        let reader = BatchReader::new(
            buffer.clone(),
            SHARED_CONSUMER,
            targets[0].batching.clone(),
            None,
        );
        if pattern == BrokerPattern::Fallback {
            forwarders.spawn(Fallback { reader, senders }.run(draining.clone()));
            return Ok(forwarders);
        }
        let choice = if pattern == BrokerPattern::Greedy {
            Choice::Greedy
        } else {
            Choice::RoundRobin
        };
        let senders = senders
            .into_iter()
            .zip(targets)
            .map(|(sender, target)| (sender, target.max_in_flight))
            .collect();
        forwarders.spawn(
            Dispatcher {
                reader,
                senders,
                choice,
            }
            .run(draining.clone()),
        );
    }
    Ok(forwarders)
}

/// Upkeep on the writer thread (recovery after a failed write, maxLag, trimming, dead-letter
/// retention) and the gauges, on a steady tick; under `buffer.profile: sidecar`, also returning
/// freed heap memory to the system when ingest is quiet (see [`HeapRelease`]), and unmapping
/// the code pages start-up mapped (`cli::shed_code_pages`).
fn spawn_maintenance(
    buffer: DurableBuffer,
    mut release: Option<(HeapRelease, Arc<Metrics>)>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(MAINTENANCE_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ticks: u64 = 0;
        loop {
            tick.tick().await;
            ticks += 1;
            // Once, on the second tick (the first is at once), when start-up's code has run.
            if ticks == 2 && release.is_some() {
                let bytes = crate::cli::shed_code_pages();
                tracing::debug!(bytes, "unmapped the code pages start-up mapped");
            }
            buffer.maintain().await;
            buffer.refresh_gauges();
            if let Some((release, metrics)) = &mut release
                && release.due(metrics.events_accepted.get(), metrics.buffer_events.get())
            {
                crate::cli::release_free_heap();
            }
        }
    })
}

/// When to hand the heap's free pages back to the system, under `buffer.profile: sidecar`.
///
/// That profile lets glibc keep freed blocks of up to 1 MiB in its heap (`cli::limit_malloc`), so
/// a busy sidecar reuses its memtables' blocks instead of mapping and faulting them in again. The
/// price is that a burst leaves free pages inside the heap, which the system counts as the
/// sidecar's until they are released. They are released on a maintenance tick in which no event
/// was accepted: the first quiet tick after ingest, and every tick while the buffer drains (its
/// event count moves) with no ingest; not again while nothing at all happens. While events keep
/// arriving, only every [`RELEASE_EVERY_INGEST_TICKS`] ticks, so that the reuse saves its CPU
/// and a steady trickle of events still does not keep a burst's pages for good.
#[derive(Debug, Default)]
pub struct HeapRelease {
    accepted: u64,
    buffered: i64,
    /// Released since events last arrived.
    released: bool,
    /// Ticks with ingest since the last release.
    ingest_ticks: u32,
}

/// While events keep arriving, the heap is released once per this many maintenance ticks (5 s).
const RELEASE_EVERY_INGEST_TICKS: u32 = 20;

impl HeapRelease {
    /// Takes this tick's accepted-events counter and buffered-events gauge; says whether to
    /// release now.
    pub fn due(&mut self, accepted: u64, buffered: i64) -> bool {
        let ingesting = accepted != self.accepted;
        let draining = buffered != self.buffered;
        self.accepted = accepted;
        self.buffered = buffered;
        let due = if ingesting {
            self.released = false;
            self.ingest_ticks += 1;
            self.ingest_ticks >= RELEASE_EVERY_INGEST_TICKS
        } else {
            let due = draining || !self.released;
            self.released = true;
            due
        };
        if due {
            self.ingest_ticks = 0;
        }
        due
    }
}

/// What `tally-sidecar drain` did, as it prints it and writes it to `--report` (a Kubernetes
/// termination message, read by the operator).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DrainReport {
    /// Events the buffer held when the drain started.
    pub events_at_start: u64,
    /// Events settled during the drain (delivered, or moved to the dead-letter store).
    pub drained: u64,
    /// Events still buffered when the drain ended (0 unless it was stopped).
    pub remaining: u64,
    /// Events in the dead-letter store: undelivered, kept on the volume.
    pub dead_letters: u64,
    /// Damaged records set aside: kept on the volume for `tally-sidecar buffer check`.
    pub quarantined: u64,
}

impl DrainReport {
    /// Whether the volume holds nothing undelivered and may be deleted.
    pub fn is_empty(&self) -> bool {
        self.remaining == 0 && self.dead_letters == 0 && self.quarantined == 0
    }
}

/// Delivers everything buffered with the configured outputs and accepts nothing: the way a
/// buffer left behind (a collector replica scaled away) reaches its outputs. Retries each
/// output as configured until the buffer is empty, or stops at SIGTERM with the rest buffered.
pub async fn drain(config: Config) -> anyhow::Result<DrainReport> {
    let metrics = Arc::new(Metrics::new());
    let (buffer, writer) = DurableBuffer::open(buffer_options(&config), metrics.clone())?;
    let at_start = buffer.stats();
    tracing::info!(
        data_dir = %config.data_dir.display(),
        events = at_start.events,
        "draining: delivering every buffered event to the outputs, accepting none"
    );
    let (_draining_tx, draining_rx) = watch::channel(true);
    let mut forwarders = spawn_forwarders(&config, &buffer, &metrics, &draining_rx)?;
    let maintenance = spawn_maintenance(buffer.clone(), None);
    tokio::select! {
        _ = async { while forwarders.join_next().await.is_some() {} } => {}
        _ = wait_for_signal() => {
            tracing::warn!("stopped before the buffer was empty; the rest stays buffered");
            forwarders.shutdown().await;
        }
    }
    maintenance.abort();
    let _ = maintenance.await;
    buffer.maintain().await;
    buffer
        .flush()
        .context("cannot sync the buffer's log after the drain")?;
    let at_end = buffer.stats();
    drop(buffer);
    writer.join();
    Ok(DrainReport {
        events_at_start: at_start.events,
        drained: at_start.events.saturating_sub(at_end.events),
        remaining: at_end.events,
        dead_letters: at_end.outputs.iter().map(|o| o.dead_letters).sum(),
        quarantined: at_end.quarantined,
    })
}

/// Runs the collector until SIGTERM or SIGINT. The HTTP API runs on `ingest`, delivery on the
/// current runtime (see `cli::ingest_runtime`).
pub async fn run(config: Config, ingest: tokio::runtime::Handle) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let metrics = Arc::new(Metrics::new());
    let auth_token = config.ingest_token()?;
    let pod = config.pod_identity()?;
    let (buffer, writer) = DurableBuffer::open(buffer_options(&config), metrics.clone())?;
    // Bound on the ingest runtime, so its connections are driven there.
    let listener = ingest
        .spawn(tokio::net::TcpListener::bind(config.listen))
        .await?
        .with_context(|| format!("cannot listen on {} (config key `listen`)", config.listen))?;
    let local = listener.local_addr()?;

    let (draining_tx, draining_rx) = watch::channel(false);
    let mut forwarders = spawn_forwarders(&config, &buffer, &metrics, &draining_rx)?;
    let release =
        crate::cli::tunes_malloc(&config).then(|| (HeapRelease::default(), metrics.clone()));
    let maintenance = spawn_maintenance(buffer.clone(), release);
    let targets = &config.outputs.targets;

    let state = Arc::new(AppState {
        buffer: buffer.clone(),
        metrics: metrics.clone(),
        auth_token,
        max_body_bytes: config.ingest.max_body_bytes.get() as usize,
        read_timeout: config.ingest.read_timeout.get(),
        exclude_namespaces: config
            .exclude_namespaces
            .iter()
            .cloned()
            .collect::<HashSet<_>>(),
        pod,
        stopping: AtomicBool::new(false),
        outputs: targets.iter().map(|t| t.name.clone()).collect(),
    });
    let stats = buffer.stats();
    tracing::info!(
        %local,
        data_dir = %config.data_dir.display(),
        buffered_events = stats.events,
        outputs = config.outputs.targets.len(),
        startup_ms = started.elapsed().as_millis() as u64,
        "listening on {local}"
    );
    drop(buffer);

    // The server keeps answering (503 to ingest) while the outputs drain, so clients see a
    // clear refusal rather than a refused connection, and probes keep working.
    let (stop_server_tx, mut stop_server_rx) = watch::channel(false);
    let mut server = ingest.spawn(crate::listener::serve(
        listener,
        router(state.clone()),
        crate::listener::Limits::from_config(&config.ingest),
        metrics.clone(),
        async move {
            let _ = stop_server_rx.wait_for(|stop| *stop).await;
        },
    ));
    tokio::select! {
        _ = wait_for_signal() => {}
        result = &mut server => {
            result.context("HTTP server task failed")?;
            anyhow::bail!("the HTTP server stopped unexpectedly");
        }
    }
    tracing::info!(
        "stopping: answering 503 to new events while the outputs deliver what is buffered"
    );
    state.stopping.store(true, Ordering::SeqCst);

    // New ingest requests are refused from here on. Requests that passed the stopping check
    // just before may still append; whatever the outputs do not deliver in time stays
    // buffered for the next start.
    let _ = draining_tx.send(true);
    let timeout = config.shutdown_timeout.get();
    let flushed = tokio::time::timeout(timeout, async {
        while forwarders.join_next().await.is_some() {}
    })
    .await;
    if flushed.is_err() {
        tracing::warn!(
            timeout = %humantime::format_duration(timeout),
            "outputs did not deliver everything within shutdownTimeout; the rest stays buffered for the next start"
        );
        forwarders.shutdown().await;
    }
    let _ = stop_server_tx.send(true);
    if let Err(e) = server.await {
        tracing::warn!(error = %e, "HTTP server task failed");
    }
    maintenance.abort();
    let _ = maintenance.await;
    let buffer = state.buffer.clone();
    // Deletes what was delivered during the drain; a no-op when the storage is failing.
    buffer.maintain().await;
    if let Some(e) = buffer.failure() {
        // Not an error of this stop: what was acknowledged is on disk.
        tracing::warn!(error = %e, "stopping while the buffer storage refuses writes; acknowledged events are safe on disk and are delivered after a restart");
    } else if let Err(e) = buffer.flush() {
        tracing::warn!(error = %e, "cannot sync the buffer's log at stop; what was acknowledged was synced already");
    }
    // The writer thread ends when the last handle is gone.
    drop(buffer);
    match Arc::into_inner(state) {
        Some(state) => {
            drop(state);
            writer.join();
        }
        None => tracing::warn!("an ingest request outlived the server; not waiting for the writer"),
    }
    tracing::info!("stopped cleanly");
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let terminate = async {
        match signal(SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot watch SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = terminate => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::HeapRelease;

    /// Ticks of (accepted counter, buffered gauge) and whether each released the heap.
    fn run(ticks: &[(u64, i64)]) -> Vec<bool> {
        let mut release = HeapRelease::default();
        ticks.iter().map(|&(a, b)| release.due(a, b)).collect()
    }

    #[test]
    fn not_on_every_tick_while_events_arrive() {
        assert_eq!(
            run(&[(100, 100), (200, 150), (300, 120)]),
            [false, false, false]
        );
    }

    #[test]
    fn every_twentieth_tick_while_events_keep_arriving() {
        let ticks: Vec<(u64, i64)> = (1..=45).map(|n| (n * 10, 0)).collect();
        let released: Vec<usize> = run(&ticks)
            .iter()
            .enumerate()
            .filter(|(_, due)| **due)
            .map(|(i, _)| i + 1)
            .collect();
        assert_eq!(released, [20, 40]);
    }

    #[test]
    fn a_quiet_tick_restarts_the_count() {
        let mut ticks: Vec<(u64, i64)> = (1..=15).map(|n| (n * 10, 0)).collect();
        ticks.push((150, 0));
        ticks.extend((16..=30).map(|n| (n * 10, 0)));
        let due = run(&ticks);
        assert!(due[15], "the quiet tick releases");
        assert_eq!(due.iter().filter(|d| **d).count(), 1, "{due:?}");
    }

    #[test]
    fn once_when_ingest_stops_then_not_while_idle() {
        assert_eq!(
            run(&[(100, 0), (100, 0), (100, 0), (100, 0)]),
            [false, true, false, false]
        );
    }

    #[test]
    fn every_quiet_tick_while_the_buffer_drains() {
        assert_eq!(
            run(&[(500, 500), (500, 400), (500, 300), (500, 300), (500, 300)]),
            [false, true, true, false, false]
        );
    }

    #[test]
    fn ingest_again_rearms_the_release() {
        assert_eq!(
            run(&[(0, 0), (0, 0), (10, 10), (10, 0), (10, 0)]),
            [true, false, false, true, false]
        );
    }

    #[test]
    fn an_idle_start_releases_once() {
        assert_eq!(run(&[(0, 0), (0, 0)]), [true, false]);
    }
}
