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

use crate::buffer::{BufferOptions, DurableBuffer, SHARED_CONSUMER};
use crate::config::{BrokerPattern, Config, OutputConfig};
use crate::forward::{BatchReader, Choice, Dispatcher, Forwarder, Sender};
use crate::metrics::Metrics;
use crate::output::Output;
use crate::server::{AppState, router};

/// How often the buffer gauges are refreshed (and delivered events deleted, at the latest).
const TRIM_INTERVAL: Duration = Duration::from_millis(250);
/// The shortest pause between two rounds of deleting delivered events.
const MAINTENANCE_GAP: Duration = Duration::from_millis(10);

/// The buffer options a configuration implies.
pub fn buffer_options(config: &Config) -> BufferOptions {
    BufferOptions {
        dir: config.data_dir.clone(),
        durability: config.durability,
        max_bytes: config.buffer.max_bytes.get(),
        when_full: config.buffer.when_full,
        dedup_window_ms: config.dedup.window.get().as_millis() as u64,
        outputs: config
            .outputs
            .targets
            .iter()
            .map(|t| t.name.clone())
            .collect(),
        shared: !config.outputs.pattern.fans_out(),
    }
}

/// Frees buffer space: moves the oldest events of outputs over their `maxLag` to their
/// dead-letter stores, then deletes what every output has. Shared by the background pass and
/// the ingest path (which reclaims before refusing for space); one at a time, so no event is
/// moved or counted twice.
pub struct Reclaimer {
    buffer: DurableBuffer,
    /// The outputs with a `maxLag`.
    targets: Vec<OutputConfig>,
    metrics: Arc<Metrics>,
    running: std::sync::Mutex<()>,
}

impl Reclaimer {
    pub fn new(
        buffer: DurableBuffer,
        targets: &[OutputConfig],
        metrics: Arc<Metrics>,
    ) -> Reclaimer {
        Reclaimer {
            buffer,
            targets: targets
                .iter()
                .filter(|t| t.max_lag.is_some())
                .cloned()
                .collect(),
            metrics,
            running: std::sync::Mutex::new(()),
        }
    }

    /// Whether some output has a `maxLag`, so a full buffer may be relieved at its expense.
    pub fn has_max_lag(&self) -> bool {
        !self.targets.is_empty()
    }

    pub fn run(&self) {
        let _one_at_a_time = self
            .running
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        enforce_max_lag(&self.buffer, &self.targets, &self.metrics);
        if let Err(e) = self.buffer.trim() {
            tracing::error!(error = %e, "cannot delete delivered events");
        }
    }
}

/// Events moved to an output's dead-letter store per pass at most, so one pass stays short.
const MAX_LAG_STEP: usize = 10_000;

/// Moves the oldest events of outputs more than `maxLag` behind to their dead-letter stores,
/// so a dead output cannot fill the buffer that the healthy ones share.
fn enforce_max_lag(buffer: &DurableBuffer, targets: &[OutputConfig], metrics: &Metrics) {
    for target in targets {
        let Some(max_lag) = target.max_lag else {
            continue;
        };
        let lag = buffer.lag(&target.name);
        if lag <= max_lag {
            continue;
        }
        let excess = (lag - max_lag).min(MAX_LAG_STEP as u64) as usize;
        let cursor = buffer.cursor(&target.name);
        let result = buffer
            .read(&target.name, cursor, u64::MAX, excess, usize::MAX)
            .and_then(|batch| {
                let reason = format!(
                    "output was {lag} events behind, more than its maxLag of {max_lag}; the oldest were moved here so the buffer keeps room for the other outputs"
                );
                buffer.dead_letter(
                    &target.name,
                    &batch.records,
                    Some((&target.name, batch.last_scanned)),
                    &reason,
                    None,
                )?;
                Ok(batch.records.len())
            });
        match result {
            Ok(moved) => {
                metrics
                    .output_dead_lettered
                    .get_or_create(&metrics.output(&target.name))
                    .inc_by(moved as u64);
                tracing::warn!(output = %target.name, lag, max_lag, moved, "output is over its maxLag; its oldest events moved to the dead-letter store");
            }
            Err(e) => tracing::error!(output = %target.name, error = %e, "cannot enforce maxLag"),
        }
    }
}

/// Updates the gauges that are read from the buffer rather than counted.
pub fn refresh_gauges(buffer: &DurableBuffer, metrics: &Metrics) {
    match buffer.stats() {
        Ok(stats) => {
            metrics.buffer_events.set(stats.events as i64);
            metrics.buffer_bytes.set(stats.bytes as i64);
            metrics.buffer_max_bytes.set(stats.max_bytes as i64);
            metrics
                .buffer_oldest_age
                .set(stats.oldest_age_seconds.unwrap_or_default());
            for output in stats.outputs {
                let labels = metrics.output(&output.name);
                metrics
                    .output_lag
                    .get_or_create(&labels)
                    .set(output.lag as i64);
                metrics
                    .dead_letter_events
                    .get_or_create(&labels)
                    .set(output.dead_letters as i64);
            }
        }
        Err(e) => tracing::error!(error = %e, "cannot read buffer statistics"),
    }
}

/// Runs the collector until SIGTERM or SIGINT.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let metrics = Arc::new(Metrics::new());
    let auth_token = config.ingest_token()?;
    let pod = config.pod_identity()?;
    let outputs = config
        .outputs
        .targets
        .iter()
        .enumerate()
        .map(|(i, target)| Output::build(target, i))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let (buffer, writer) = DurableBuffer::open(buffer_options(&config), metrics.clone())?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {} (config key `listen`)", config.listen))?;
    let local = listener.local_addr()?;

    let (draining_tx, draining_rx) = watch::channel(false);
    let pattern = config.outputs.pattern;
    let targets = &config.outputs.targets;
    let senders: Vec<Sender> = targets
        .iter()
        .zip(outputs)
        .map(|(target, output)| {
            metrics.register_output(&target.name);
            Sender {
                name: target.name.clone(),
                output,
                retry: target.retry.clone(),
                fail_fast: pattern.fail_fast(),
                buffer: buffer.reader(),
                metrics: metrics.clone(),
            }
        })
        .collect();
    let mut forwarders = JoinSet::new();
    if pattern.fans_out() {
        for (i, (target, sender)) in targets.iter().zip(senders).enumerate() {
            let gate = (pattern.sequential() && i > 0).then(|| targets[i - 1].name.clone());
            let reader =
                BatchReader::new(buffer.reader(), &target.name, target.batching.clone(), gate);
            forwarders.spawn(Forwarder { reader, sender }.run(draining_rx.clone()));
        }
    } else {
        // One batching policy for all: batches are formed before an output is chosen.
        let reader = BatchReader::new(
            buffer.reader(),
            SHARED_CONSUMER,
            targets[0].batching.clone(),
            None,
        );
        let choice = if pattern == BrokerPattern::Greedy {
            Choice::Greedy
        } else {
            Choice::RoundRobin
        };
        forwarders.spawn(
            Dispatcher {
                reader,
                senders,
                choice,
            }
            .run(draining_rx.clone()),
        );
    }
    let reclaimer = Arc::new(Reclaimer::new(
        buffer.reader(),
        &config.outputs.targets,
        metrics.clone(),
    ));
    let trimmer = {
        let buffer = buffer.reader();
        let metrics = metrics.clone();
        let reclaimer = reclaimer.clone();
        let mut new_events = buffer.subscribe();
        let mut cursor_moves = buffer.subscribe_cursors();
        tokio::spawn(async move {
            // Space is reclaimed (and maxLag enforced) as soon as events arrive or cursors
            // move, at most every MAINTENANCE_GAP; the gauges, which scan the dead-letter
            // store, are refreshed on the slower tick.
            let mut tick = tokio::time::interval(TRIM_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let refresh = tokio::select! {
                    _ = tick.tick() => true,
                    _ = new_events.changed() => false,
                    _ = cursor_moves.changed() => false,
                };
                reclaimer.run();
                if refresh {
                    refresh_gauges(&buffer, &metrics);
                }
                tokio::time::sleep(MAINTENANCE_GAP).await;
            }
        })
    };

    let state = Arc::new(AppState {
        buffer: buffer.clone(),
        metrics: metrics.clone(),
        auth_token,
        max_body_bytes: config.ingest.max_body_bytes.get() as usize,
        read_timeout: config.ingest.read_timeout.get(),
        reclaimer,
        exclude_namespaces: config
            .exclude_namespaces
            .iter()
            .cloned()
            .collect::<HashSet<_>>(),
        pod,
        stopping: AtomicBool::new(false),
        outputs: targets.iter().map(|t| t.name.clone()).collect(),
    });
    let stats = buffer.stats()?;
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
    let mut server = tokio::spawn(crate::listener::serve(
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
    trimmer.abort();
    let _ = trimmer.await;
    let closer = state.buffer.reader();
    if let Err(e) = closer.trim() {
        tracing::warn!(error = %e, "cannot delete delivered events");
    }
    // The writer thread ends when the last appending handle is gone.
    match Arc::into_inner(state) {
        Some(state) => {
            drop(state);
            writer.join();
        }
        None => tracing::warn!("an ingest request outlived the server; not waiting for the writer"),
    }
    if let Some(e) = closer.failure() {
        anyhow::bail!(
            "stopped after a buffer write failure ({e}); acknowledged events are safe on disk and are delivered after a restart"
        );
    }
    closer.flush()?;
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
