//! Delivery from the buffer to the outputs, in the broker patterns Bento users know.
//!
//! - Fan-out patterns (`fanOut`, `fanOutSequential` and their `FailFast` variants): one
//!   [`Forwarder`] per output, each reading from its own durable cursor, so a dead output never
//!   stalls the others; it only holds their shared buffer space (see `maxLag`). In the sequential
//!   patterns output i+1 reads no further than output i's cursor.
//! - Shared patterns (`roundRobin`, `greedy`): one [`Dispatcher`] reads from a shared cursor and
//!   hands each batch to one output, taking turns or to whichever is free first.
//! - `fallback`: one [`Fallback`] reads from a shared cursor and offers each batch to the outputs
//!   in order, one batch at a time.
//!
//! Batches are formed by count, bytes and period ([`BatchReader`]); a [`Sender`] retries with
//! backoff and moves permanently failed batches to the output's dead-letter store. Each output
//! has up to `maxInFlight` batches sent and not yet settled. Every batch carries the buffer's
//! [`Ticket`] for its range; the buffer moves the cursor once the batch and every batch before it
//! are settled, so batches may settle in any order and nothing here moves a cursor.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;
use rand::Rng;
use tokio::sync::{Semaphore, oneshot, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::buffer::{DurableBuffer, ReadBatch, Record, Settlement, Ticket};
use crate::config::{BatchPolicy, RetryPolicy};
use crate::metrics::{ErrorKind, Metrics, OutputLabels};
use crate::output::{Output, SendError};

/// The longest `Retry-After` honoured; a longer one is treated as this.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// The delay before retry number `attempt` (0-based): exponential, capped at `maxInterval`, with
/// full jitter above `initialInterval` (uniform between `initialInterval` and the cap), so a fleet
/// of sidecars does not retry in lockstep and no retry comes sooner than `initialInterval`.
///
/// Not `backon` (already in the build through kube-runtime): its jitter adds up to a whole delay
/// on top of the capped one, so `maxInterval` would no longer bound a wait; it computes in `f32`
/// seconds, so a 100ms step doubles to 200.000003ms; and its backoff is an iterator without an
/// index, while the fallback pattern's health keeps only a failure count.
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

/// A reader holds up to a batch or this many events, whichever is more (and up to a batch's
/// `byteSize` or [`READ_AHEAD_BYTES`], whichever is more), reading them at once when they are
/// there, and cuts batches from what it holds: one RocksDB iterator per read was the dominant
/// cost of a small batch, and reading a block once instead of once per batch keeps small batch
/// counts on pace with ingest.
const READ_AHEAD_EVENTS: usize = 1024;
/// See [`READ_AHEAD_EVENTS`].
const READ_AHEAD_BYTES: usize = 256 << 10;

/// Forms batches from one consumer's position in the log.
pub struct BatchReader {
    buffer: DurableBuffer,
    /// Whose cursor this reads from: an output's name, or [`crate::buffer::SHARED_CONSUMER`].
    consumer: String,
    policy: BatchPolicy,
    /// Sequential patterns: read no further than this output's cursor.
    gate: Option<String>,
    new_events: watch::Receiver<u64>,
    cursor_moves: watch::Receiver<u64>,
    /// Everything up to here has been read into `pending` or handed out.
    read_pos: u64,
    /// Everything up to here has been handed out with a ticket.
    issued: u64,
    /// Read and not handed out yet, in sequence order: the next batch and what was read ahead.
    pending: VecDeque<Record>,
    pending_bytes: usize,
    deadline: Option<Instant>,
    /// Whether the last read reached the last event stored when it began. If at most a
    /// read-ahead of events was stored since, the next read is of those, which are in memory
    /// (the memtable, or a file flushed moments ago and still in the page cache), and runs on
    /// the async worker: a read on the blocking pool cost two thread wake-ups, and under full
    /// load readers at the tail read several hundred times a second (`make bench-peers`: 7 % of
    /// the CPU per event). A reader behind, draining a backlog that may be on disk (after an
    /// outage, say), reads on the blocking pool.
    at_tail: bool,
}

/// A batch handed out by a [`BatchReader`], with the ticket that settles it.
pub struct Batch {
    pub records: Vec<Record>,
    pub ticket: Ticket,
}

impl BatchReader {
    pub fn new(
        buffer: DurableBuffer,
        consumer: &str,
        policy: BatchPolicy,
        gate: Option<String>,
    ) -> BatchReader {
        let read_pos = buffer.cursor(consumer);
        BatchReader {
            new_events: buffer.subscribe(),
            cursor_moves: buffer.subscribe_cursors(),
            buffer,
            consumer: consumer.to_string(),
            policy,
            gate,
            read_pos,
            issued: read_pos,
            pending: VecDeque::new(),
            pending_bytes: 0,
            deadline: None,
            at_tail: false,
        }
    }

    /// The next batch: when it is full, or its period since the first event has passed, or at
    /// once when draining. `None` when draining and nothing is left to read.
    pub async fn next(&mut self, draining: &mut watch::Receiver<bool>) -> Option<Batch> {
        let count = self.policy.count;
        let max_bytes = self.policy.byte_size.get() as usize;
        loop {
            self.new_events.borrow_and_update();
            self.cursor_moves.borrow_and_update();
            self.drop_skipped();
            if !self.next_batch_len(count, max_bytes).1 {
                let ceiling = self
                    .gate
                    .as_ref()
                    .map_or(u64::MAX, |gate| self.buffer.cursor(gate));
                // Not a full batch held, so both are below what is read ahead.
                let events = count
                    .max(READ_AHEAD_EVENTS)
                    .saturating_sub(self.pending.len());
                let bytes = max_bytes
                    .max(READ_AHEAD_BYTES)
                    .saturating_sub(self.pending_bytes);
                match self.read(ceiling, events, bytes).await {
                    Ok(batch) => {
                        self.read_pos = self.read_pos.max(batch.last_scanned);
                        self.pending_bytes += batch.bytes;
                        self.pending.extend(batch.records);
                        // The writer may have skipped while the read ran.
                        self.drop_skipped();
                    }
                    Err(e) => {
                        tracing::error!(consumer = %self.consumer, error = %e, "cannot read the buffer; retrying in 1s");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                }
            }
            let stopping = *draining.borrow();
            if self.pending.is_empty() {
                if self.read_pos > self.issued {
                    // Only events for other outputs were there: nothing to send, settled at once.
                    self.issued = self.read_pos;
                    let ticket = self.buffer.issue(&self.consumer, self.read_pos);
                    if let Err(e) = self.buffer.settle(ticket, Settlement::Delivered).await {
                        tracing::error!(consumer = %self.consumer, error = %e, "cannot record the position");
                    }
                }
                if stopping {
                    return None;
                }
                tokio::select! {
                    _ = self.new_events.changed() => {}
                    _ = self.cursor_moves.changed() => {}
                    _ = draining.changed() => {}
                }
                continue;
            }
            let now = Instant::now();
            let due = match self.deadline {
                Some(due) => due,
                None => *self.deadline.insert(now + self.period()),
            };
            let (len, full) = self.next_batch_len(count, max_bytes);
            if !full && !stopping && now < due {
                tokio::select! {
                    _ = self.new_events.changed() => {}
                    _ = self.cursor_moves.changed() => {}
                    _ = tokio::time::sleep_until(due) => {}
                    _ = draining.changed() => {}
                }
                continue;
            }
            self.deadline = None;
            let records: Vec<Record> = self.pending.drain(..len).collect();
            self.pending_bytes -= records.iter().map(|r| r.json.len()).sum::<usize>();
            // The ticket covers what lies before the next record held, skipped records included.
            self.issued = self
                .pending
                .front()
                .map_or(self.read_pos, |next| next.seq - 1);
            return Some(Batch {
                records,
                ticket: self.buffer.issue(&self.consumer, self.issued),
            });
        }
    }

    /// Another task (`maxLag`) may have moved the cursor past what this reader handed out, into
    /// or past what it read ahead: those events went to the dead-letter store, so they are
    /// dropped here rather than sent too. Settles alone never move the cursor past `issued`. A
    /// batch handed out before the skip is still sent, as are batches in flight.
    fn drop_skipped(&mut self) {
        let cursor = self.buffer.cursor(&self.consumer);
        if cursor > self.issued {
            self.read_pos = self.read_pos.max(cursor);
            self.issued = cursor;
            self.pending.retain(|r| r.seq > cursor);
            self.pending_bytes = self.pending.iter().map(|r| r.json.len()).sum();
            if self.pending.is_empty() {
                // The period runs from the first event of a batch, not of one that is gone.
                self.deadline = None;
            }
        }
    }

    /// How many held records the next batch takes (at most `count`, and no more than
    /// `max_bytes` unless one record alone is larger), and whether a limit ends it rather than
    /// the end of what is held.
    fn next_batch_len(&self, count: usize, max_bytes: usize) -> (usize, bool) {
        let mut bytes = 0;
        for (i, record) in self.pending.iter().enumerate() {
            if i == count || (i > 0 && bytes + record.json.len() > max_bytes) {
                return (i, true);
            }
            bytes += record.json.len();
        }
        let len = self.pending.len();
        (len, len >= count || bytes >= max_bytes)
    }

    fn period(&self) -> Duration {
        let jitter = self.policy.jitter.get();
        let extra = if jitter.is_zero() {
            Duration::ZERO
        } else {
            Duration::from_nanos(rand::rng().random_range(0..=jitter.as_nanos() as u64))
        };
        self.policy.period.get() + extra
    }

    /// Whether the next read runs on the async worker (see `at_tail`), with `stored` the last
    /// event stored.
    fn reads_in_place(&self, stored: u64) -> bool {
        self.at_tail && stored.saturating_sub(self.read_pos) <= READ_AHEAD_EVENTS as u64
    }

    async fn read(
        &mut self,
        ceiling: u64,
        max_events: usize,
        max_bytes: usize,
    ) -> Result<ReadBatch, String> {
        let after = self.read_pos;
        let stored = *self.new_events.borrow();
        let read = if self.reads_in_place(stored) {
            self.buffer
                .read(&self.consumer, after, ceiling, max_events, max_bytes)
                .map_err(|e| e.to_string())
        } else {
            let buffer = self.buffer.clone();
            let consumer = self.consumer.clone();
            tokio::task::spawn_blocking(move || {
                buffer.read(&consumer, after, ceiling, max_events, max_bytes)
            })
            .await
            .map_err(|e| e.to_string())
            .and_then(|read| read.map_err(|e| e.to_string()))
        };
        self.at_tail = read
            .as_ref()
            .is_ok_and(|batch| batch.last_scanned.max(after) >= stored);
        read
    }
}

/// Sends batches to one output: retries with backoff, or dead-letters.
pub struct Sender {
    pub name: String,
    pub output: Output,
    pub retry: RetryPolicy,
    /// Dead-letter a failed batch at once instead of retrying.
    pub fail_fast: bool,
    pub buffer: DurableBuffer,
    pub metrics: Arc<Metrics>,
    pub failures: FailureLog,
}

/// The shortest time between two log lines at WARN about one streak of an output's failures.
const FAILING_REMINDER: Duration = Duration::from_secs(60);

/// Logs an output's failed attempts as one streak instead of a line per batch and attempt, which with
/// `maxInFlight` batches retrying at once would repeat the same error dozens of times per backoff step: a WARN
/// when the output starts failing, another at most once per [`FAILING_REMINDER`] while it still does (each
/// attempt at DEBUG), and an INFO once it delivers again. `tally_output_errors_total` and
/// `tally_output_retries_total` count every attempt either way.
#[derive(Default)]
pub struct FailureLog {
    /// Whether a streak is open: read without the lock on every delivered batch.
    failing: AtomicBool,
    streak: parking_lot::Mutex<Option<Streak>>,
}

struct Streak {
    since: Instant,
    failed_attempts: u64,
    warned: Instant,
}

impl FailureLog {
    /// A failed attempt that will be retried in `retry_in`.
    fn failed(&self, output: &str, retry_in: Duration, error: &str) {
        let now = Instant::now();
        let mut streak = self.streak.lock();
        let Some(open) = streak.as_mut() else {
            *streak = Some(Streak {
                since: now,
                failed_attempts: 1,
                warned: now,
            });
            self.failing.store(true, Ordering::Relaxed);
            tracing::warn!(
                output = %output,
                ?retry_in,
                error = %error,
                "delivery is failing; every batch is kept and retried with backoff until the output takes it"
            );
            return;
        };
        open.failed_attempts += 1;
        if now.duration_since(open.warned) >= FAILING_REMINDER {
            open.warned = now;
            let failing_for = to_millis(now.duration_since(open.since));
            tracing::warn!(
                output = %output,
                ?failing_for,
                failed_attempts = open.failed_attempts,
                error = %error,
                "delivery still failing; retrying"
            );
        } else {
            tracing::debug!(output = %output, ?retry_in, error = %error, "delivery failed; will retry");
        }
    }

    /// A delivered batch: closes the streak, if one is open.
    fn delivered(&self, output: &str) {
        if !self.failing.load(Ordering::Relaxed) {
            return;
        }
        let mut streak = self.streak.lock();
        if let Some(closed) = streak.take() {
            self.failing.store(false, Ordering::Relaxed);
            let failed_for = to_millis(closed.since.elapsed());
            tracing::info!(
                output = %output,
                ?failed_for,
                failed_attempts = closed.failed_attempts,
                "delivering again"
            );
        }
    }
}

/// `d` to the millisecond, as it is logged.
fn to_millis(d: Duration) -> Duration {
    Duration::from_millis(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Sender {
    /// Delivers the batch, or moves it to the dead-letter store, then settles its ticket. Only returns once the
    /// batch is settled one way or the other; retries forever unless `maxElapsed` is set or the pattern fails
    /// fast. Calls `answered` as soon as the output has answered for good (delivered, or refused so the batch goes
    /// to the dead letters), before the settlement is recorded with the buffer: recording waits for the buffer's
    /// next group commit, which waits for the disk, and the output need not.
    pub async fn settle(&self, records: Vec<Record>, ticket: Ticket, answered: impl FnOnce()) {
        let labels = self.metrics.output(&self.name);
        let in_flight = InFlight::enter(
            self.metrics
                .output_batches_in_flight
                .get_or_create(&labels)
                .clone(),
        );
        let refused = self.deliver(&records, &labels).await;
        drop(in_flight);
        answered();
        match refused {
            None => {
                drop(records);
                self.record(ticket, Settlement::Delivered).await;
            }
            Some((reason, status)) => self.dead_letter(records, ticket, reason, status).await,
        }
    }

    /// Moves the batch to this output's dead-letter store, which settles its ticket.
    async fn dead_letter(
        &self,
        records: Vec<Record>,
        ticket: Ticket,
        reason: String,
        status: Option<u16>,
    ) {
        let events = records.len();
        let settlement = Settlement::DeadLettered {
            output: self.name.clone(),
            records,
            reason: reason.clone(),
            status,
        };
        self.record(ticket, settlement).await;
        self.metrics
            .output_dead_lettered
            .get_or_create(&self.metrics.output(&self.name))
            .inc_by(events as u64);
        tracing::warn!(output = %self.name, events, status, %reason,
            "batch moved to the dead-letter store; inspect with `tally-sidecar dead-letter list`, re-send with `dead-letter replay`");
    }

    /// Settles the ticket with the buffer, retrying while the storage refuses: a dead letter
    /// must not be lost, and a delivered batch's cursor should move.
    async fn record(&self, ticket: Ticket, settlement: Settlement) {
        loop {
            match self.buffer.settle(ticket.clone(), settlement.clone()).await {
                Ok(()) => return,
                Err(crate::buffer::BufferError::Closed) => return,
                Err(e) => {
                    // The store is on the same disk as the events, so this clears when the
                    // disk does; until then the batch stays buffered and unsettled.
                    tracing::error!(output = %self.name, error = %e, "cannot settle a batch with the buffer; retrying in 1s");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    /// One delivery attempt, timed and counted (events sent, or the error's kind).
    async fn attempt(&self, records: &[Record], labels: &OutputLabels) -> Result<(), SendError> {
        let sent_at = Instant::now();
        let result = self.output.send(records).await;
        self.metrics
            .output_send_duration
            .get_or_create(labels)
            .observe(sent_at.elapsed().as_secs_f64());
        match &result {
            Ok(()) => {
                self.metrics
                    .output_events_sent
                    .get_or_create(labels)
                    .inc_by(records.len() as u64);
                self.metrics.output_batches_sent.get_or_create(labels).inc();
            }
            Err(SendError::Permanent { .. }) => self
                .metrics
                .output_error(&self.name, ErrorKind::permanent_status),
            Err(SendError::Retryable { kind, .. }) => self.metrics.output_error(&self.name, *kind),
        }
        result
    }

    /// Sends until delivered (`None`) or given up (`Some(reason, status)`).
    async fn deliver(
        &self,
        records: &[Record],
        labels: &OutputLabels,
    ) -> Option<(String, Option<u16>)> {
        let started = Instant::now();
        let max_elapsed = self.retry.max_elapsed.get();
        let mut attempt: u32 = 0;
        loop {
            let (status, detail, retry_after) = match self.attempt(records, labels).await {
                Ok(()) => {
                    self.failures.delivered(&self.name);
                    return None;
                }
                Err(SendError::Permanent { status, detail }) => return Some((detail, status)),
                Err(SendError::Retryable {
                    status,
                    detail,
                    retry_after,
                    ..
                }) => (status, detail, retry_after),
            };
            if self.fail_fast {
                return Some((
                    format!("failed, and the pattern fails fast: {detail}"),
                    status,
                ));
            }
            if !max_elapsed.is_zero() && started.elapsed() >= max_elapsed {
                let elapsed = Duration::from_secs(started.elapsed().as_secs());
                return Some((
                    format!(
                        "gave up after {} (retry.maxElapsed): {detail}",
                        humantime::format_duration(elapsed)
                    ),
                    status,
                ));
            }
            let mut delay = backoff_delay(&self.retry, attempt);
            if let Some(after) = retry_after {
                delay = delay.max(after.min(MAX_RETRY_AFTER));
            }
            self.failures.failed(&self.name, delay, &detail);
            tokio::time::sleep(delay).await;
            attempt = attempt.saturating_add(1);
            self.metrics.output_retries.get_or_create(labels).inc();
        }
    }
}

/// One batch counted in `tally_output_batches_in_flight` until dropped, also when its task is (on shutdown).
struct InFlight(Gauge);

impl InFlight {
    fn enter(gauge: Gauge) -> InFlight {
        gauge.inc();
        InFlight(gauge)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// How many batches per `maxInFlight` place a forwarder holds at most, sent or answered and waiting for their
/// settlement to be recorded: bounds the memory a slow disk can make a fast output hold.
const UNSETTLED_PER_SLOT: usize = 4;

/// The places of one output's batches, sent or waiting for their settlement: [`UNSETTLED_PER_SLOT`] per
/// `maxInFlight` place.
fn unsettled_places(max_in_flight: usize) -> Arc<Semaphore> {
    Arc::new(Semaphore::new(
        max_in_flight.saturating_mul(UNSETTLED_PER_SLOT),
    ))
}

/// One output of a fan-out pattern, with its own cursor.
pub struct Forwarder {
    pub reader: BatchReader,
    pub sender: Sender,
    /// Batches sent and not yet settled, at most (`maxInFlight`).
    pub max_in_flight: usize,
}

impl Forwarder {
    /// Runs until `draining` turns true and everything buffered for this output is settled. Up to
    /// `max_in_flight` batches are sent at once; each settles its own ticket, and the buffer moves the cursor over
    /// the settled ones in order. A batch frees its place as soon as the output has answered, while its
    /// settlement waits for the buffer's next group commit; at most [`UNSETTLED_PER_SLOT`] times `max_in_flight`
    /// batches are sent or waiting so. Reading waits while either limit is reached (backpressure). Dropping the
    /// future at any point loses nothing: the cursor only moves after delivery, and the batches in flight are
    /// dropped with it.
    pub async fn run(self, mut draining: watch::Receiver<bool>) {
        let Forwarder {
            mut reader,
            sender,
            max_in_flight,
        } = self;
        let sender = Arc::new(sender);
        let max_in_flight = max_in_flight.max(1);
        let slots = Arc::new(Semaphore::new(max_in_flight));
        let unsettled = unsettled_places(max_in_flight);
        let mut in_flight = JoinSet::new();
        loop {
            // Never closed, so acquiring only waits for batches in flight to be answered or settled.
            let Ok(place) = unsettled.clone().acquire_owned().await else {
                break;
            };
            let Ok(slot) = slots.clone().acquire_owned().await else {
                break;
            };
            let Some(batch) = reader.next(&mut draining).await else {
                break;
            };
            let sender = sender.clone();
            in_flight.spawn(async move {
                sender
                    .settle(batch.records, batch.ticket, || drop(slot))
                    .await;
                drop(place);
            });
            while in_flight.try_join_next().is_some() {}
        }
        while in_flight.join_next().await.is_some() {}
    }
}

/// Which output of a shared pattern gets the next batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    /// Each output in turn.
    RoundRobin,
    /// Whichever output is free first.
    Greedy,
}

/// Reads the shared cursor and hands each batch to exactly one output. Each batch's ticket
/// goes with it, so the shared cursor passes only batches that are settled, in order, and a
/// crash resends only unsettled batches.
pub struct Dispatcher {
    pub reader: BatchReader,
    /// Each output with its `maxInFlight`: that many batches it may hold at once.
    pub senders: Vec<(Sender, usize)>,
    pub choice: Choice,
}

impl Dispatcher {
    pub async fn run(self, mut draining: watch::Receiver<bool>) {
        let Dispatcher {
            mut reader,
            senders,
            choice,
        } = self;
        // Greedy: every output takes from one queue when it is free. Round robin: each output
        // has its own queue, fed in turn.
        let mut queues = Vec::new();
        let mut workers = JoinSet::new();
        let (greedy_tx, greedy_rx) = async_channel::bounded::<Batch>(1);
        // One worker per batch an output may hold at once, each settling one batch at a time.
        for (sender, max_in_flight) in senders {
            let sender = Arc::new(sender);
            let queue = match choice {
                Choice::RoundRobin => {
                    let (tx, rx) = async_channel::bounded::<Batch>(1);
                    queues.push(tx);
                    rx
                }
                Choice::Greedy => greedy_rx.clone(),
            };
            let max_in_flight = max_in_flight.max(1);
            let unsettled = unsettled_places(max_in_flight);
            for _ in 0..max_in_flight {
                workers.spawn(work(sender.clone(), queue.clone(), unsettled.clone()));
            }
        }
        drop(greedy_rx);
        let mut turn = 0usize;
        while let Some(batch) = reader.next(&mut draining).await {
            let queue = match choice {
                Choice::RoundRobin => {
                    let queue = &queues[turn % queues.len()];
                    turn += 1;
                    queue
                }
                Choice::Greedy => &greedy_tx,
            };
            // Waits while the chosen output (or, greedy, every output) is busy.
            if queue.send(batch).await.is_err() {
                tracing::error!("an output worker stopped; the batch stays buffered");
            }
        }
        // Draining: no new batches; let the outputs settle what they hold.
        drop(queues);
        drop(greedy_tx);
        while workers.join_next().await.is_some() {}
    }
}

/// One `maxInFlight` place of an output of a shared pattern, until the dispatcher closes the queue: takes the next
/// batch once the output has answered the last one, whose settlement is recorded behind it. The output's workers
/// share `unsettled`, which bounds the batches they hold, answered or not, as [`Forwarder::run`] does.
async fn work(
    sender: Arc<Sender>,
    queue: async_channel::Receiver<Batch>,
    unsettled: Arc<Semaphore>,
) {
    let mut settling = JoinSet::new();
    loop {
        // Never closed, so acquiring only waits for settlements to be recorded.
        let Ok(place) = unsettled.clone().acquire_owned().await else {
            break;
        };
        let Ok(batch) = queue.recv().await else {
            break;
        };
        let (answered, on_answer) = oneshot::channel();
        let sender = sender.clone();
        settling.spawn(async move {
            sender
                .settle(batch.records, batch.ticket, || {
                    let _ = answered.send(());
                })
                .await;
            drop(place);
        });
        // An error means the task is gone, which frees the place as well.
        let _ = on_answer.await;
        while settling.try_join_next().is_some() {}
    }
    while settling.join_next().await.is_some() {}
}

/// When an output of the fallback pattern may be tried again.
#[derive(Debug, Clone, Copy)]
struct Health {
    /// Failed attempts in a row.
    failures: u32,
    /// Skipped until then.
    until: Instant,
}

impl Health {
    fn new() -> Health {
        Health {
            failures: 0,
            until: Instant::now(),
        }
    }

    /// A failed attempt: skipped for the next backoff delay of its retry policy (or as long as the output asked).
    fn failed(&mut self, retry: &RetryPolicy, retry_after: Option<Duration>) {
        let mut delay = backoff_delay(retry, self.failures);
        if let Some(after) = retry_after {
            delay = delay.max(after.min(MAX_RETRY_AFTER));
        }
        self.failures = self.failures.saturating_add(1);
        self.until = Instant::now() + delay;
    }
}

/// The fallback pattern: reads the shared cursor and offers each batch to the outputs in order; the first that
/// takes it settles it. An output that fails is skipped for its retry backoff, so while it is down batches go
/// straight to the next one, and it is tried again (and preferred again) once the backoff has passed. A batch is
/// retried until some output takes it, and dead-lettered only when every output rejected it outright.
pub struct Fallback {
    pub reader: BatchReader,
    pub senders: Vec<Sender>,
}

impl Fallback {
    pub async fn run(self, mut draining: watch::Receiver<bool>) {
        let Fallback {
            mut reader,
            senders,
        } = self;
        let mut health = vec![Health::new(); senders.len()];
        while let Some(batch) = reader.next(&mut draining).await {
            settle_first(&senders, &mut health, batch).await;
        }
    }
}

/// Offers `batch` to the outputs in order until one takes it (or every one rejects it), then settles it.
async fn settle_first(senders: &[Sender], health: &mut [Health], batch: Batch) {
    let Batch { records, ticket } = batch;
    // Outputs that rejected this batch outright (4xx): never offered it again.
    let mut rejected: Vec<Option<(String, Option<u16>)>> = vec![None; senders.len()];
    let mut rounds: u32 = 0;
    loop {
        for (i, sender) in senders.iter().enumerate() {
            if rejected[i].is_some() || health[i].until > Instant::now() {
                continue;
            }
            let labels = sender.metrics.output(&sender.name);
            if rounds > 0 {
                sender.metrics.output_retries.get_or_create(&labels).inc();
            }
            match sender.attempt(&records, &labels).await {
                Ok(()) => {
                    if health[i].failures > 0 {
                        tracing::info!(output = %sender.name, "output takes batches again");
                    }
                    health[i] = Health::new();
                    // The outputs before this one could not take these events.
                    for earlier in &senders[..i] {
                        earlier
                            .metrics
                            .output_fallback_events
                            .get_or_create(&earlier.metrics.output(&earlier.name))
                            .inc_by(records.len() as u64);
                    }
                    sender.record(ticket, Settlement::Delivered).await;
                    return;
                }
                Err(SendError::Permanent { status, detail }) => {
                    tracing::warn!(output = %sender.name, status, error = %detail, "output rejected the batch; offering it to the next");
                    rejected[i] = Some((detail, status));
                }
                Err(SendError::Retryable {
                    detail,
                    retry_after,
                    ..
                }) => {
                    health[i].failed(&sender.retry, retry_after);
                    let failures = health[i].failures;
                    if failures == 1 || failures.is_power_of_two() {
                        tracing::warn!(output = %sender.name, failures, error = %detail,
                            "delivery failed; the output is skipped until its retry is due, batches go to the outputs after it");
                    }
                }
            }
        }
        if rejected.iter().all(Option::is_some) {
            let reason = senders
                .iter()
                .zip(&rejected)
                .filter_map(|(sender, r)| {
                    r.as_ref()
                        .map(|(detail, _)| format!("{}: {detail}", sender.name))
                })
                .collect::<Vec<_>>()
                .join("; ");
            let status = rejected.iter().rev().find_map(|r| r.as_ref()?.1);
            if let Some(last) = senders.last() {
                last.dead_letter(
                    records,
                    ticket,
                    format!("rejected by every output: {reason}"),
                    status,
                )
                .await;
            }
            return;
        }
        // Every output that may still take the batch is backing off: wait for the first to be due.
        let due = health
            .iter()
            .zip(&rejected)
            .filter(|(_, r)| r.is_none())
            .map(|(h, _)| h.until)
            .min();
        if let Some(due) = due {
            tokio::time::sleep_until(due).await;
        }
        rounds = rounds.saturating_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buffer::{Budget, BufferOptions, WriterThread};
    use crate::config::{BufferProfile, ByteSize, Durability, HumanDuration, WhenFull};
    use crate::event::Event;

    fn event(i: usize) -> Event {
        Event::new(
            format!(r#"{{"id":"{i:04}"}}"#),
            "reader",
            &format!("{i:04}"),
        )
    }

    fn open_buffer(
        dir: &std::path::Path,
        max_lag: Vec<(String, u64)>,
    ) -> (DurableBuffer, WriterThread) {
        DurableBuffer::open(
            BufferOptions {
                dir: dir.to_path_buf(),
                durability: Durability::None,
                budget: Budget::new(1 << 30, None, None).expect("valid budget"),
                when_full: WhenFull::Reject,
                profile: BufferProfile::Collector,
                dedup_window_ms: 0,
                outputs: vec!["out".into()],
                shared: false,
                max_lag,
                dead_letter_max_age_ms: 0,
            },
            Arc::new(Metrics::new()),
        )
        .expect("buffer opens")
    }

    fn policy(count: usize, byte_size: u64) -> BatchPolicy {
        BatchPolicy {
            count,
            byte_size: ByteSize(byte_size),
            period: HumanDuration(Duration::from_millis(10)),
            jitter: HumanDuration(Duration::ZERO),
        }
    }

    /// `maxLag` moves events the reader already read ahead to the dead-letter store: the reader
    /// drops them instead of sending them too.
    #[tokio::test]
    async fn events_max_lag_moved_out_of_a_read_ahead_are_not_sent() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (buffer, writer) = open_buffer(dir.path(), vec![("out".into(), 30)]);
        buffer
            .append((1..=25).map(event).collect())
            .await
            .expect("appended");
        let (_stop, mut draining) = watch::channel(false);
        let mut reader = BatchReader::new(buffer.clone(), "out", policy(10, 1 << 20), None);
        let first = reader.next(&mut draining).await.expect("a batch");
        assert_eq!(first.ticket.upto(), 10, "11..=25 are held, read ahead");
        // 45 buffered, then one more append finds the output 45 behind, over its maxLag of 30.
        buffer
            .append((26..=45).map(event).collect())
            .await
            .expect("appended");
        buffer.append(vec![event(46)]).await.expect("appended");
        let cursor = buffer.cursor("out");
        assert!(
            cursor > 10,
            "maxLag moved the cursor into the read-ahead: {cursor}"
        );
        let next = reader.next(&mut draining).await.expect("a batch");
        let seqs: Vec<u64> = next.records.iter().map(|r| r.seq).collect();
        assert_eq!(seqs.first(), Some(&(cursor + 1)), "{seqs:?}");
        drop((reader, first, next));
        drop(buffer);
        writer.join();
    }

    /// A reader behind by more than it reads ahead reads on the blocking pool; once a read
    /// reaches the last event stored, the next one runs on the worker, unless more than a
    /// read-ahead was stored since; every event comes out once, in order, either way.
    #[tokio::test]
    async fn a_reader_reads_on_its_worker_only_at_the_tail() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (buffer, writer) = open_buffer(dir.path(), Vec::new());
        let backlog = READ_AHEAD_EVENTS + 200;
        buffer
            .append((1..=backlog).map(event).collect())
            .await
            .expect("appended");
        let (_stop, mut draining) = watch::channel(false);
        let mut reader = BatchReader::new(buffer.clone(), "out", policy(100, 1 << 20), None);
        let mut seqs = Vec::new();
        let first = reader.next(&mut draining).await.expect("a batch");
        assert!(!reader.at_tail, "{READ_AHEAD_EVENTS} of {backlog} read");
        seqs.extend(first.records.iter().map(|r| r.seq));
        while seqs.len() < backlog {
            let batch = reader.next(&mut draining).await.expect("a batch");
            seqs.extend(batch.records.iter().map(|r| r.seq));
        }
        assert!(reader.at_tail, "the last read reached the end");
        buffer
            .append((backlog + 1..=backlog + 100).map(event).collect())
            .await
            .expect("appended");
        assert!(
            reader.reads_in_place(*reader.new_events.borrow()),
            "100 stored since"
        );
        let batch = reader.next(&mut draining).await.expect("a batch");
        seqs.extend(batch.records.iter().map(|r| r.seq));
        assert!(reader.at_tail);
        // More than a read-ahead stored since (an output that was down, say): maybe on disk.
        let total = backlog + 100 + READ_AHEAD_EVENTS + 100;
        buffer
            .append((backlog + 101..=total).map(event).collect())
            .await
            .expect("appended");
        assert!(!reader.reads_in_place(*reader.new_events.borrow()));
        while seqs.len() < total {
            let batch = reader.next(&mut draining).await.expect("a batch");
            seqs.extend(batch.records.iter().map(|r| r.seq));
        }
        assert!(reader.at_tail);
        assert_eq!(seqs, (1..=total as u64).collect::<Vec<_>>());
        drop((reader, first, batch));
        drop(buffer);
        writer.join();
    }

    /// Batches cut from what was read ahead: `count` and `byteSize` hold, and each ticket
    /// covers its own records only, so settling one batch moves the cursor past it and no
    /// further.
    #[tokio::test]
    async fn batches_cut_from_a_read_ahead_keep_their_limits_and_tickets() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (buffer, writer) = open_buffer(dir.path(), Vec::new());
        buffer
            .append((1..=25).map(event).collect())
            .await
            .expect("appended");
        let (_stop, mut draining) = watch::channel(false);
        let mut reader = BatchReader::new(buffer.clone(), "out", policy(10, 1 << 20), None);
        let mut batches = Vec::new();
        for _ in 0..3 {
            batches.push(reader.next(&mut draining).await.expect("a batch"));
        }
        let seqs: Vec<Vec<u64>> = batches
            .iter()
            .map(|b| b.records.iter().map(|r| r.seq).collect())
            .collect();
        assert_eq!(seqs[0], (1..=10).collect::<Vec<_>>());
        assert_eq!(seqs[1], (11..=20).collect::<Vec<_>>());
        assert_eq!(
            seqs[2],
            (21..=25).collect::<Vec<_>>(),
            "the rest after the period"
        );
        let uptos: Vec<u64> = batches.iter().map(|b| b.ticket.upto()).collect();
        assert_eq!(uptos, [10, 20, 25]);
        let mut tickets = batches.into_iter().map(|b| b.ticket);
        let first = tickets.next().expect("first ticket");
        buffer
            .settle(first, Settlement::Delivered)
            .await
            .expect("settled");
        assert_eq!(buffer.cursor("out"), 10, "the first batch only");
        for ticket in tickets {
            buffer
                .settle(ticket, Settlement::Delivered)
                .await
                .expect("settled");
        }
        assert_eq!(buffer.cursor("out"), 25);
        drop(reader);
        buffer
            .append((26..=35).map(event).collect())
            .await
            .expect("appended");

        // byteSize: each record is 13 bytes, so 40 bytes take three.
        let mut reader = BatchReader::new(buffer.clone(), "out", policy(10, 40), None);
        let batch = reader.next(&mut draining).await.expect("a batch");
        let seqs: Vec<u64> = batch.records.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, [26, 27, 28]);
        buffer
            .settle(batch.ticket, Settlement::Delivered)
            .await
            .expect("settled");
        assert_eq!(buffer.cursor("out"), 28, "the three records only");
        drop(reader);
        drop(buffer);
        writer.join();
    }

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
