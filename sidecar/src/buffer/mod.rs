//! The durable buffer: an append-only log of events in RocksDB, one durable cursor per consumer,
//! a dedup index, a dead-letter store and a quarantine for damaged records.
//!
//! The API is small: [`DurableBuffer::append`] stores events and returns once they are durable;
//! a reader [`read`](DurableBuffer::read)s from its consumer's position, takes a [`Ticket`] for
//! every batch it hands out ([`issue`](DurableBuffer::issue)), and [`settle`](DurableBuffer::settle)s
//! it once the batch is delivered or dead-lettered. Cursors move and delivered events are
//! deleted only inside the buffer, over a contiguous prefix of settled tickets ([`acks`]).
//!
//! Every RocksDB write runs on one writer thread ([`writer`]), which coalesces concurrent
//! requests into one write batch and one WAL sync (group commit). Readers read on blocking
//! threads; no lock a request handler takes is held across a write.
//!
//! Modules, by concern: [`codec`] (record and key encoding), [`accounting`] (what the log holds,
//! in memory), [`acks`] (cursors and tickets), [`writer`] (group commit, trimming, `maxLag`,
//! recovery from a failed write), [`dedup`], [`dead_letter`], [`open`] (opening, the checks of
//! `buffer check` and the quarantine).
//!
//! Column families:
//! - `events`: key = sequence number (u64, big-endian), value = record header + event JSON.
//! - `meta`: `cursor/<consumer>` = last settled sequence, `next_seq` = the sequence high-water
//!   mark (so sequence numbers are never reused), `format`.
//! - `dedup`: key = `(source, id)`, value = first-seen time in ms.
//! - `dead_letter`: key = output name + NUL + sequence, value = a JSON [`DeadLetter`].
//! - `quarantine`: key = the damaged record's key, value = why + the stored bytes.

mod accounting;
mod acks;
mod budget;
mod codec;
mod dead_letter;
mod dedup;
mod open;
mod space;
mod writer;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use rocksdb::DB;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::{BufferProfile, Durability, WhenFull};
use crate::event::Event;
use crate::metrics::Metrics;

pub use acks::Ticket;
pub use budget::Budget;
pub use codec::Damage;
pub use open::{CheckReport, DamagedRecord, check, repair};

use accounting::Accounting;
use acks::AckTracker;
use writer::WriterCommand;

/// Why the buffer failed.
#[derive(Debug, thiserror::Error)]
pub enum BufferError {
    #[error(
        "data directory {dir} holds files but no Tally buffer ({found}); point dataDir at an empty or Tally-owned directory"
    )]
    NotABuffer { dir: PathBuf, found: String },
    #[error(
        "cannot open the buffer in {dir}: {source}. If another tally-sidecar uses this directory, stop it; if the files are damaged, run `tally-sidecar buffer repair`"
    )]
    Open {
        dir: PathBuf,
        source: rocksdb::Error,
    },
    #[error("cannot create data directory {dir}: {source}")]
    CreateDir {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("buffer storage error: {0}")]
    Storage(#[from] rocksdb::Error),
    #[error("corrupt buffer record at {key}: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("the buffer storage is recovering from a failed write ({0}); it retries every second")]
    Unavailable(String),
    #[error("the buffer is closed")]
    Closed,
    #[error("the buffer was opened read-only")]
    ReadOnly,
}

/// How the buffer behaves; taken from the configuration.
#[derive(Debug, Clone)]
pub struct BufferOptions {
    pub dir: PathBuf,
    pub durability: Durability,
    /// How `buffer.maxBytes` is shared out; see [`budget`].
    pub budget: Budget,
    pub when_full: WhenFull,
    /// How RocksDB is sized in memory.
    pub profile: BufferProfile,
    /// Dedup window in milliseconds; 0 disables dedup.
    pub dedup_window_ms: u64,
    /// The configured outputs.
    pub outputs: Vec<String>,
    /// The outputs share one cursor ([`SHARED_CONSUMER`]) because each event goes to one of them
    /// (`roundRobin`, `greedy`); otherwise each output has its own.
    pub shared: bool,
    /// Outputs with a `maxLag`: past it, their oldest events move to their dead-letter store.
    pub max_lag: Vec<(String, u64)>,
    /// The dead-letter store's age limit in milliseconds (0: none); its size limit is in the
    /// budget. The oldest beyond either are deleted and counted.
    pub dead_letter_max_age_ms: u64,
}

/// The cursor of outputs that share events (`roundRobin`, `greedy`). Not a valid output name.
pub const SHARED_CONSUMER: &str = "*shared";

impl BufferOptions {
    /// Whose cursors decide what may be deleted: every output's, or the shared one.
    pub fn consumers(&self) -> Vec<&str> {
        if self.shared {
            vec![SHARED_CONSUMER]
        } else {
            self.outputs.iter().map(String::as_str).collect()
        }
    }

    /// The cursor that tracks `output`'s progress.
    pub fn consumer_of<'a>(&self, output: &'a str) -> &'a str {
        if self.shared { SHARED_CONSUMER } else { output }
    }
}

/// Outcome of a successful append.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Appended {
    pub stored: usize,
    pub duplicates: usize,
    /// Older events deleted to make room (`whenFull: dropOldest`).
    pub dropped: u64,
}

/// Why an append was refused. Nothing of the request was stored.
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    #[error(
        "the buffer is full ({used} of {max} bytes); an output is behind. Retry later, or raise buffer.maxBytes"
    )]
    Full { used: u64, max: u64 },
    #[error(
        "the data directory holds {used} bytes, over buffer.maxBytes ({max}); space is being reclaimed. Retry later"
    )]
    DiskFull { used: u64, max: u64 },
    #[error(
        "the request needs {needed} bytes of buffer but the events' part of buffer.maxBytes is {max}; send smaller batches"
    )]
    TooLarge { needed: u64, max: u64 },
    #[error("{0}")]
    Storage(String),
    #[error("the buffer is closed")]
    Closed,
}

/// One buffered event as an output reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub seq: u64,
    pub json: Bytes,
}

/// A read from one consumer's position in the log.
#[derive(Debug, Default)]
pub struct ReadBatch {
    pub records: Vec<Record>,
    pub bytes: usize,
    /// Highest sequence looked at, including records meant for other outputs and damaged
    /// records set aside; 0 if none.
    pub last_scanned: u64,
}

/// How a batch was settled.
#[derive(Debug, Clone)]
pub enum Settlement {
    /// The output has it (or there was nothing for this output in the range).
    Delivered,
    /// The output refused it for good: keep it in the output's dead-letter store.
    DeadLettered {
        output: String,
        records: Vec<Record>,
        reason: String,
        status: Option<u16>,
    },
}

/// A dead-lettered event, as stored and as `dead-letter list --json` prints it.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetter {
    pub output: String,
    pub key: u64,
    pub reason: String,
    pub status: Option<u16>,
    pub failed_at: String,
    pub event: Box<RawValue>,
}

/// What `buffer stats` shows.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BufferStats {
    pub events: u64,
    /// Bytes of the buffered events, before compression.
    pub bytes: u64,
    /// The events' part of `buffer.maxBytes`.
    pub events_max_bytes: u64,
    /// What the data directory occupies on disk, and its bound (`buffer.maxBytes`).
    pub disk_bytes: u64,
    pub max_bytes: u64,
    pub oldest_age_seconds: Option<f64>,
    pub quarantined: u64,
    pub outputs: Vec<OutputStats>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct OutputStats {
    pub name: String,
    pub cursor: u64,
    pub lag: u64,
    pub dead_letters: u64,
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

/// State shared by the writer thread and every handle.
struct Inner {
    /// `None` while the writer reopens the database after a failed write.
    db: RwLock<Option<Arc<DB>>>,
    options: BufferOptions,
    accounting: Mutex<Accounting>,
    acks: AckTracker,
    /// Dead letters held per output: (events, bytes).
    dead_letters: Mutex<HashMap<String, (u64, u64)>>,
    /// Damaged records set aside since the buffer was created.
    quarantined: std::sync::atomic::AtomicU64,
    /// Bumped whenever a cursor moves.
    cursor_moves: watch::Sender<u64>,
    /// Set when an append was refused for lack of space, cleared when space is freed.
    full: std::sync::atomic::AtomicBool,
    last_seq: watch::Sender<u64>,
    metrics: Arc<Metrics>,
    /// The write error the buffer is recovering from, if any (see [`writer`]).
    failure: Mutex<Option<String>>,
    /// Whether the writer thread is running; false once it has stopped or died.
    writer_alive: std::sync::atomic::AtomicBool,
    /// Damaged records readers found and stepped over, for the writer to quarantine.
    found_damaged: Mutex<Vec<(Vec<u8>, Damage)>>,
    /// Keeps the data directory inside `buffer.maxBytes`.
    space: space::Space,
    /// How this buffer's dedup keys are spelled.
    dedup_keys: codec::DedupKeys,
}

impl Inner {
    fn db(&self) -> Result<Arc<DB>, BufferError> {
        let guard = self.db.read();
        guard.clone().ok_or_else(|| {
            BufferError::Unavailable(self.failure.lock().clone().unwrap_or_default())
        })
    }

    fn notify_cursor_moved(&self) {
        self.cursor_moves.send_modify(|moves| *moves += 1);
    }

    fn publish_gauges(&self) {
        let accounting = self.accounting.lock();
        self.metrics.buffer_events.set(accounting.events as i64);
        self.metrics.buffer_bytes.set(accounting.bytes as i64);
    }
}

/// The buffer handle shared by ingest, outputs and admin.
#[derive(Clone)]
pub struct DurableBuffer {
    inner: Arc<Inner>,
    writer: Option<mpsc::Sender<WriterCommand>>,
}

/// The writer thread; join it after the last [`DurableBuffer`] clone is dropped.
pub struct WriterThread(JoinHandle<()>);

impl WriterThread {
    pub fn join(self) {
        if self.0.join().is_err() {
            tracing::error!("the buffer writer thread panicked");
        }
    }
}

/// Turns off RocksDB's per-thread performance counters on the calling thread. They are on by
/// default, nothing reads them, and counting cost the writer and readers about 0.2 % of the CPU
/// under load in `make bench-peers`. Call it on each thread that reads or writes the buffer.
pub fn skip_perf_counters() {
    rocksdb::perf::set_perf_stats(rocksdb::perf::PerfStatsLevel::Disable);
}

impl DurableBuffer {
    /// Opens (or creates) the buffer and starts its writer thread. Damaged records are
    /// quarantined, never a reason to refuse to start.
    pub fn open(
        options: BufferOptions,
        metrics: Arc<Metrics>,
    ) -> Result<(DurableBuffer, WriterThread), BufferError> {
        let inner = Arc::new(open::open_writable(options, metrics)?);
        let (tx, rx) = mpsc::channel(1024);
        let writer_inner = inner.clone();
        inner
            .writer_alive
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let handle = std::thread::Builder::new()
            .name("tally-buffer-writer".into())
            .spawn(move || {
                skip_perf_counters();
                writer::run(writer_inner, rx)
            })
            .map_err(|e| BufferError::Corrupt {
                key: "writer".into(),
                reason: format!("cannot start the writer thread: {e}"),
            })?;
        Ok((
            DurableBuffer {
                inner,
                writer: Some(tx),
            },
            WriterThread(handle),
        ))
    }

    /// Opens an existing buffer read-only, for the operations CLI; works while a sidecar runs.
    pub fn open_read_only(options: BufferOptions) -> Result<DurableBuffer, BufferError> {
        Ok(DurableBuffer {
            inner: Arc::new(open::open_read_only(options)?),
            writer: None,
        })
    }

    /// Stores events durably (per `durability`) and returns once they are safe.
    pub async fn append(&self, events: Vec<Event>) -> Result<Appended, AppendError> {
        self.ask(
            |reply| WriterCommand::Append { events, reply },
            AppendError::Closed,
        )
        .await
    }

    /// Moves the dead-lettered events of `output` (all outputs if `None`) back into the log,
    /// addressed to their output only. Returns how many were re-queued.
    pub async fn replay_dead_letters(&self, output: Option<String>) -> Result<usize, BufferError> {
        if self.writer.is_none() {
            return Err(BufferError::ReadOnly);
        }
        self.ask(
            |reply| WriterCommand::Replay { output, reply },
            BufferError::Closed,
        )
        .await
    }

    /// Hands out `consumer`'s log up to `upto` (everything after the previous ticket).
    pub fn issue(&self, consumer: &str, upto: u64) -> Ticket {
        self.inner.acks.issue(consumer, upto)
    }

    /// Settles a ticket: records dead letters durably if there are any, then moves the
    /// consumer's cursor over every settled ticket at the front and deletes what every consumer
    /// has. Returns once the dead letters are stored; an error means nothing was recorded and
    /// the caller should try again.
    pub async fn settle(&self, ticket: Ticket, settlement: Settlement) -> Result<(), BufferError> {
        if self.writer.is_none() {
            return Err(BufferError::ReadOnly);
        }
        self.ask(
            |reply| WriterCommand::Settle {
                ticket,
                settlement,
                reply,
            },
            BufferError::Closed,
        )
        .await
    }

    /// Periodic upkeep on the writer thread: recover from a failed write once the disk allows,
    /// enforce `maxLag`, delete what every consumer has, expire dead letters.
    pub async fn maintain(&self) {
        let _ = self
            .ask(
                |reply| WriterCommand::Maintain { reply },
                BufferError::Closed,
            )
            .await;
    }

    /// Sends a command to the writer thread and waits for its answer.
    async fn ask<T, E>(
        &self,
        command: impl FnOnce(oneshot::Sender<Result<T, E>>) -> WriterCommand,
        closed: E,
    ) -> Result<T, E> {
        let Some(writer) = &self.writer else {
            return Err(closed);
        };
        let (reply, rx) = oneshot::channel();
        if writer.send(command(reply)).await.is_err() {
            return Err(closed);
        }
        rx.await.unwrap_or(Err(closed))
    }

    /// Watches the highest stored sequence number.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.last_seq.subscribe()
    }

    /// Watches cursor movements (any consumer), for readers that wait on another's progress.
    pub fn subscribe_cursors(&self) -> watch::Receiver<u64> {
        self.inner.cursor_moves.subscribe()
    }

    /// The consumer's position: everything up to here is settled.
    pub fn cursor(&self, consumer: &str) -> u64 {
        self.inner.acks.cursor(consumer)
    }

    /// Reads the events after `after` and up to `ceiling` that are meant for `consumer` (an
    /// output, or [`SHARED_CONSUMER`], which takes every event), up to the limits. At least one
    /// event is returned if any is there, whatever its size. It may read from disk: call it off
    /// the async workers, unless the events were stored moments ago. A damaged record is stepped
    /// over and handed to the writer for quarantine.
    pub fn read(
        &self,
        consumer: &str,
        after: u64,
        ceiling: u64,
        max_events: usize,
        max_bytes: usize,
    ) -> Result<ReadBatch, BufferError> {
        open::read(&self.inner, consumer, after, ceiling, max_events, max_bytes)
    }

    /// Buffered events `output` does not have yet.
    pub fn lag(&self, output: &str) -> u64 {
        let cursor = self.cursor(self.inner.options.consumer_of(output));
        self.inner.accounting.lock().lag(cursor)
    }

    /// Lists dead-lettered events, oldest first per output.
    pub fn dead_letters(
        &self,
        output: Option<&str>,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, BufferError> {
        dead_letter::list(&*self.inner.db()?, output, limit)
    }

    /// Events, bytes, oldest age and per-output lag; from memory, without scanning the disk.
    pub fn stats(&self) -> BufferStats {
        let accounting = self.inner.accounting.lock();
        let dead_letters = self.inner.dead_letters.lock();
        let now = now_ms();
        let options = &self.inner.options;
        BufferStats {
            events: accounting.events,
            bytes: accounting.bytes,
            events_max_bytes: options.budget.events,
            disk_bytes: self.inner.space.disk_bytes(),
            max_bytes: options.budget.total,
            oldest_age_seconds: accounting
                .oldest_appended_ms()
                .map(|ms| now.saturating_sub(ms) as f64 / 1000.0),
            quarantined: self
                .inner
                .quarantined
                .load(std::sync::atomic::Ordering::Relaxed),
            outputs: options
                .outputs
                .iter()
                .map(|name| {
                    let cursor = self.inner.acks.cursor(options.consumer_of(name));
                    OutputStats {
                        name: name.clone(),
                        cursor,
                        lag: accounting.lag(cursor),
                        dead_letters: dead_letters.get(name).map_or(0, |(events, _)| *events),
                    }
                })
                .collect(),
        }
    }

    /// Sets the gauges that are read from the buffer rather than counted: its size and age,
    /// and each output's lag and dead letters. The maintenance tick and every scrape call it;
    /// it reads counters kept in memory and never scans the database.
    pub fn refresh_gauges(&self) {
        let stats = self.stats();
        let metrics = &self.inner.metrics;
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

    /// The write error the buffer is recovering from, if any.
    pub fn failure(&self) -> Option<String> {
        self.inner.failure.lock().clone()
    }

    /// Whether the writer thread has stopped (it only does when every handle is gone, or if it
    /// panicked); a live process without it can no longer store anything.
    pub fn writer_stopped(&self) -> bool {
        self.writer.is_some()
            && !self
                .inner
                .writer_alive
                .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Whether ingest would be refused for lack of space right now: the events' part of the
    /// budget is full, or the data directory is over `maxBytes`.
    pub fn is_full(&self) -> bool {
        self.inner.full.load(std::sync::atomic::Ordering::Relaxed) || self.inner.space.over()
    }

    /// Syncs the WAL so a clean stop leaves nothing in OS buffers.
    pub fn flush(&self) -> Result<(), BufferError> {
        self.inner.db()?.flush_wal(true)?;
        Ok(())
    }
}
