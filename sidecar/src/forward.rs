//! One forwarder per output: reads from the output's durable cursor, forms batches by count,
//! bytes and period, sends them with retries and backoff, and moves permanently rejected batches
//! to the dead-letter store. Each output has its own cursor, so a dead output never stalls the
//! others; it only holds their shared buffer space.

use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::buffer::{DurableBuffer, ReadBatch, Record};
use crate::config::{BatchPolicy, RetryPolicy};
use crate::metrics::{ErrorKind, Metrics, OutputLabels};
use crate::output::{Output, SendError};

/// The longest `Retry-After` honoured; a longer one is treated as this.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// What happened to a batch.
enum Outcome {
    Delivered,
    DeadLettered { reason: String, status: Option<u16> },
}

/// The delay before retry number `attempt` (0-based): exponential, capped at `maxInterval`, with
/// full jitter above `initialInterval` (uniform between `initialInterval` and the cap), so a fleet
/// of sidecars does not retry in lockstep and no retry comes sooner than `initialInterval`.
pub fn backoff_delay(policy: &RetryPolicy, attempt: u32) -> Duration {
    let initial = policy.initial_interval.get();
    let max = policy.max_interval.get();
    let cap = initial
        .checked_mul(2u32.saturating_pow(attempt.min(31)))
        .unwrap_or(max)
        .min(max);
    if cap <= initial {
        return initial;
    }
    let spread = (cap - initial).as_nanos() as u64;
    initial + Duration::from_nanos(rand::rng().random_range(0..=spread))
}

/// Delivers one output's events.
pub struct Forwarder {
    pub name: String,
    pub output: Output,
    pub batching: BatchPolicy,
    pub retry: RetryPolicy,
    pub buffer: DurableBuffer,
    pub metrics: Arc<Metrics>,
}

impl Forwarder {
    /// Runs until `draining` turns true and everything buffered for this output is delivered.
    /// Dropping the future at any point loses nothing: the cursor only moves after delivery.
    pub async fn run(self, mut draining: watch::Receiver<bool>) {
        let labels = self.metrics.output(&self.name);
        let mut new_events = self.buffer.subscribe();
        let count = self.batching.count;
        let max_bytes = self.batching.byte_size.get() as usize;
        let mut cursor = self.buffer.cursor(&self.name);
        let mut read_pos = cursor;
        let mut pending: Vec<Record> = Vec::new();
        let mut pending_bytes = 0usize;
        let mut deadline: Option<Instant> = None;
        loop {
            new_events.borrow_and_update();
            if pending.len() < count && pending_bytes < max_bytes {
                match self
                    .read(read_pos, count - pending.len(), max_bytes - pending_bytes)
                    .await
                {
                    Ok(batch) => {
                        read_pos = read_pos.max(batch.last_scanned);
                        pending_bytes += batch.bytes;
                        pending.extend(batch.records);
                    }
                    Err(e) => {
                        tracing::error!(output = %self.name, error = %e, "cannot read the buffer; retrying in 1s");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                }
            }
            let stopping = *draining.borrow();
            if pending.is_empty() {
                if read_pos > cursor {
                    // Only events for other outputs were there; step over them.
                    self.acknowledge(read_pos);
                    cursor = read_pos;
                }
                if stopping {
                    return;
                }
                tokio::select! {
                    _ = new_events.changed() => {}
                    _ = draining.changed() => {}
                }
                continue;
            }
            let now = Instant::now();
            let due = *deadline.get_or_insert_with(|| now + self.period());
            let full = pending.len() >= count || pending_bytes >= max_bytes;
            if !full && !stopping && now < due {
                tokio::select! {
                    _ = new_events.changed() => {}
                    _ = tokio::time::sleep_until(due) => {}
                    _ = draining.changed() => {}
                }
                continue;
            }
            let upto = read_pos;
            match self.deliver(&pending, &labels).await {
                Outcome::Delivered => self.acknowledge(upto),
                Outcome::DeadLettered { reason, status } => {
                    if let Err(e) = self
                        .buffer
                        .dead_letter(&self.name, &pending, upto, &reason, status)
                    {
                        // Keep the batch and try it again rather than lose it.
                        tracing::error!(output = %self.name, error = %e, "cannot write to the dead-letter store; retrying the batch");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                    self.metrics
                        .output_dead_lettered
                        .get_or_create(&labels)
                        .inc_by(pending.len() as u64);
                    tracing::warn!(output = %self.name, events = pending.len(), status, %reason,
                        "batch moved to the dead-letter store; inspect with `tally-sidecar dead-letter list`, re-send with `dead-letter replay`");
                }
            }
            cursor = upto;
            pending.clear();
            pending_bytes = 0;
            deadline = None;
        }
    }

    fn period(&self) -> Duration {
        let jitter = self.batching.jitter.get();
        let extra = if jitter.is_zero() {
            Duration::ZERO
        } else {
            Duration::from_nanos(rand::rng().random_range(0..=jitter.as_nanos() as u64))
        };
        self.batching.period.get() + extra
    }

    async fn read(
        &self,
        after: u64,
        max_events: usize,
        max_bytes: usize,
    ) -> Result<ReadBatch, String> {
        let buffer = self.buffer.clone();
        let name = self.name.clone();
        tokio::task::spawn_blocking(move || buffer.read(&name, after, max_events, max_bytes))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())
    }

    fn acknowledge(&self, upto: u64) {
        if let Err(e) = self.buffer.acknowledge(&self.name, upto) {
            // The events were delivered; a lost cursor write only means they may be sent again.
            tracing::error!(output = %self.name, error = %e, "cannot record the output's position");
        }
    }

    /// Sends until delivered or permanently failed. Retries forever unless `maxElapsed` is set.
    async fn deliver(&self, records: &[Record], labels: &OutputLabels) -> Outcome {
        let started = Instant::now();
        let max_elapsed = self.retry.max_elapsed.get();
        let mut attempt: u32 = 0;
        loop {
            let sent_at = Instant::now();
            let result = self.output.send(records).await;
            self.metrics
                .output_send_duration
                .get_or_create(labels)
                .observe(sent_at.elapsed().as_secs_f64());
            let (kind, status, detail, retry_after) = match result {
                Ok(()) => {
                    self.metrics
                        .output_events_sent
                        .get_or_create(labels)
                        .inc_by(records.len() as u64);
                    self.metrics.output_batches_sent.get_or_create(labels).inc();
                    if attempt > 0 {
                        tracing::info!(output = %self.name, attempts = attempt + 1, "delivered after retries");
                    }
                    return Outcome::Delivered;
                }
                Err(SendError::Permanent { status, detail }) => {
                    self.metrics
                        .output_error(&self.name, ErrorKind::permanent_status);
                    return Outcome::DeadLettered {
                        reason: detail,
                        status: Some(status),
                    };
                }
                Err(SendError::Retryable {
                    kind,
                    status,
                    detail,
                    retry_after,
                }) => (kind, status, detail, retry_after),
            };
            self.metrics.output_error(&self.name, kind);
            if !max_elapsed.is_zero() && started.elapsed() >= max_elapsed {
                return Outcome::DeadLettered {
                    reason: format!(
                        "gave up after {} (retry.maxElapsed): {detail}",
                        humantime::format_duration(Duration::from_secs(
                            started.elapsed().as_secs()
                        ))
                    ),
                    status,
                };
            }
            let mut delay = backoff_delay(&self.retry, attempt);
            if let Some(after) = retry_after {
                delay = delay.max(after.min(MAX_RETRY_AFTER));
            }
            if attempt == 0 || attempt.is_power_of_two() {
                tracing::warn!(output = %self.name, attempt = attempt + 1, retry_in = ?delay, error = %detail, "delivery failed; will retry");
            }
            tokio::time::sleep(delay).await;
            attempt = attempt.saturating_add(1);
            self.metrics.output_retries.get_or_create(labels).inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HumanDuration;

    #[test]
    fn backoff_grows_within_bounds() {
        let policy = RetryPolicy {
            initial_interval: HumanDuration(Duration::from_millis(100)),
            max_interval: HumanDuration(Duration::from_secs(2)),
            max_elapsed: HumanDuration(Duration::ZERO),
        };
        assert_eq!(backoff_delay(&policy, 0), Duration::from_millis(100));
        for attempt in 1..40 {
            let cap = Duration::from_millis(100)
                .saturating_mul(2u32.saturating_pow(attempt))
                .min(Duration::from_secs(2));
            for _ in 0..50 {
                let delay = backoff_delay(&policy, attempt);
                assert!(delay >= Duration::from_millis(100), "{attempt}: {delay:?}");
                assert!(delay <= cap, "{attempt}: {delay:?} above {cap:?}");
            }
        }
        // Jitter: later attempts do not all wait the same time.
        let delays: std::collections::HashSet<Duration> =
            (0..20).map(|_| backoff_delay(&policy, 5)).collect();
        assert!(delays.len() > 1);
    }
}
