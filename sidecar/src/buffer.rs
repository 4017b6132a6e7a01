//! The durable buffer: an append-only log of events in RocksDB, one durable cursor per output,
//! a dedup index and a dead-letter store.
//!
//! Column families:
//! - `events`: key = sequence number (u64, big-endian), value = [`Record`] header + event JSON.
//! - `meta`: `cursor/<output>` = last sequence the output has, `next_seq` = the sequence high-water
//!   mark (so sequence numbers are never reused, even when every event is gone), `format`.
//! - `dedup`: key = `(source, id)`, value = first-seen time in ms; expired entries are removed by
//!   a compaction filter and ignored on lookup.
//! - `dead_letter`: key = output name + sequence, value = a JSON [`DeadLetter`].
//!
//! Appends go through one writer thread that coalesces concurrent requests into one write batch
//! and one WAL sync (group commit). Reads, acknowledgements and dead-lettering are done by the
//! output workers directly; RocksDB is safe to share between threads.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamily, ColumnFamilyDescriptor, DB, DBCompressionType,
    Direction, IteratorMode, Options, ReadOptions, WriteBatch, WriteOptions,
    compaction_filter::Decision,
};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::{Durability, WhenFull};
use crate::event::Event;
use crate::metrics::Metrics;

const CF_EVENTS: &str = "events";
const CF_META: &str = "meta";
const CF_DEDUP: &str = "dedup";
const CF_DEAD_LETTER: &str = "dead_letter";
const FORMAT_KEY: &[u8] = b"format";
const FORMAT_VALUE: &[u8] = b"tally-buffer-v1";
const NEXT_SEQ_KEY: &[u8] = b"next_seq";
/// Events per accounting chunk when the accounting is rebuilt from disk at open.
const REBUILD_CHUNK: u64 = 1024;
/// Most append requests coalesced into one commit.
const MAX_GROUP: usize = 512;

/// Why the buffer failed.
#[derive(Debug, thiserror::Error)]
pub enum BufferError {
    #[error(
        "data directory {dir} holds files but no Tally buffer ({found}); point dataDir at an empty or Tally-owned directory"
    )]
    NotABuffer { dir: PathBuf, found: String },
    #[error(
        "cannot open the buffer in {dir}: {source}. If another tally-sidecar uses this directory, stop it; if the files are damaged, move the directory aside (its events are then lost to this process) and start again"
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
    pub max_bytes: u64,
    pub when_full: WhenFull,
    /// Dedup window in milliseconds; 0 disables dedup.
    pub dedup_window_ms: u64,
    /// The configured outputs.
    pub outputs: Vec<String>,
    /// The outputs share one cursor ([`SHARED_CONSUMER`]) because each event goes to one of them
    /// (`roundRobin`, `greedy`); otherwise each output has its own.
    pub shared: bool,
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
        "the request needs {needed} bytes of buffer but buffer.maxBytes is {max}; send smaller batches"
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

/// A read from one output's position in the log.
#[derive(Debug, Default)]
pub struct ReadBatch {
    pub records: Vec<Record>,
    pub bytes: usize,
    /// Highest sequence looked at, including records meant for other outputs; 0 if none.
    pub last_scanned: u64,
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
    pub bytes: u64,
    pub max_bytes: u64,
    pub oldest_age_seconds: Option<f64>,
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

/// A run of consecutive sequence numbers appended together; the unit of trimming and dropping.
#[derive(Debug, Clone, Copy)]
struct Chunk {
    first: u64,
    last: u64,
    events: u64,
    bytes: u64,
    appended_ms: u64,
}

#[derive(Debug, Default)]
struct Accounting {
    chunks: VecDeque<Chunk>,
    events: u64,
    bytes: u64,
}

impl Accounting {
    fn push(&mut self, chunk: Chunk) {
        self.events += chunk.events;
        self.bytes += chunk.bytes;
        self.chunks.push_back(chunk);
    }

    /// Puts back a chunk taken by `pop_front` (a failed write did not delete it).
    fn push_front(&mut self, chunk: Chunk) {
        self.events += chunk.events;
        self.bytes += chunk.bytes;
        self.chunks.push_front(chunk);
    }

    fn pop_front(&mut self) -> Option<Chunk> {
        let chunk = self.chunks.pop_front()?;
        self.events -= chunk.events;
        self.bytes -= chunk.bytes;
        Some(chunk)
    }

    /// Buffered events with a sequence above `cursor`.
    fn lag(&self, cursor: u64) -> u64 {
        let mut lag = 0;
        for chunk in self.chunks.iter().rev() {
            if chunk.last <= cursor {
                break;
            }
            lag += unread_events(chunk, cursor);
        }
        lag
    }
}

/// Which outputs a stored record is for.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    All,
    Only(String),
}

/// Encodes a stored event: `[version=1][appended_ms u64][target len u8][target][json]`.
fn encode_record(target: &Target, appended_ms: u64, json: &[u8]) -> Vec<u8> {
    let name = match target {
        Target::All => &[][..],
        Target::Only(name) => name.as_bytes(),
    };
    let mut out = Vec::with_capacity(10 + name.len() + json.len());
    out.push(1);
    out.extend_from_slice(&appended_ms.to_be_bytes());
    out.push(name.len() as u8);
    out.extend_from_slice(name);
    out.extend_from_slice(json);
    out
}

struct DecodedRecord<'a> {
    appended_ms: u64,
    target: Option<&'a [u8]>,
    json: &'a [u8],
}

fn decode_record(seq: u64, value: &[u8]) -> Result<DecodedRecord<'_>, BufferError> {
    let corrupt = |reason: &str| BufferError::Corrupt {
        key: format!("events/{seq}"),
        reason: reason.to_string(),
    };
    if value.len() < 10 || value[0] != 1 {
        return Err(corrupt("unknown record header"));
    }
    let mut ms = [0u8; 8];
    ms.copy_from_slice(&value[1..9]);
    let name_len = value[9] as usize;
    if value.len() < 10 + name_len {
        return Err(corrupt("truncated record"));
    }
    Ok(DecodedRecord {
        appended_ms: u64::from_be_bytes(ms),
        target: (name_len > 0).then(|| &value[10..10 + name_len]),
        json: &value[10 + name_len..],
    })
}

/// Events of `chunk` after `floor`: those some output has not read yet.
fn unread_events(chunk: &Chunk, floor: u64) -> u64 {
    if chunk.last <= floor {
        0
    } else if chunk.first > floor {
        chunk.events
    } else {
        (chunk.last - floor).min(chunk.events)
    }
}

fn seq_key(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

fn key_seq(key: &[u8]) -> Result<u64, BufferError> {
    let bytes: [u8; 8] = key.try_into().map_err(|_| BufferError::Corrupt {
        key: format!("{key:?}"),
        reason: "event key is not 8 bytes".into(),
    })?;
    Ok(u64::from_be_bytes(bytes))
}

fn cursor_key(output: &str) -> Vec<u8> {
    format!("cursor/{output}").into_bytes()
}

fn dedup_key(source: &str, id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(4 + source.len() + id.len());
    key.extend_from_slice(&(source.len() as u32).to_be_bytes());
    key.extend_from_slice(source.as_bytes());
    key.extend_from_slice(id.as_bytes());
    key
}

fn dead_letter_prefix(output: &str) -> Vec<u8> {
    let mut key = output.as_bytes().to_vec();
    key.push(0);
    key
}

fn u64_value(bytes: &[u8]) -> u64 {
    bytes.try_into().map(u64::from_be_bytes).unwrap_or_default()
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

/// Where the writer answers an append.
type AppendReply = oneshot::Sender<Result<Appended, AppendError>>;

/// A request to the writer thread.
enum WriterCommand {
    Append {
        events: Vec<Event>,
        reply: AppendReply,
    },
    Replay {
        output: Option<String>,
        reply: oneshot::Sender<Result<usize, BufferError>>,
    },
}

struct Inner {
    db: DB,
    options: BufferOptions,
    accounting: Mutex<Accounting>,
    cursors: Mutex<HashMap<String, u64>>,
    /// The highest sequence each output has read (delivered or in flight). `dropOldest` counts
    /// as dropped only events some output has not read: the others are still delivered.
    read_positions: Mutex<HashMap<String, u64>>,
    /// Bumped whenever a cursor moves.
    cursor_moves: watch::Sender<u64>,
    /// Set when an append was refused for lack of space, cleared when space is freed.
    full: std::sync::atomic::AtomicBool,
    last_seq: watch::Sender<u64>,
    metrics: Arc<Metrics>,
    /// The first failed write. RocksDB refuses every write after a failed WAL append (a full
    /// disk, an I/O error) until the database is reopened, so this is reported by the health
    /// endpoints and the process must be restarted; synced data is intact.
    failure: Mutex<Option<String>>,
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

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave these plain counters half-updated in a way
    // that matters more than stopping would; keep serving.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn db_options(dedup_window_ms: u64) -> Result<(Options, Vec<ColumnFamilyDescriptor>), BufferError> {
    let mut db_opts = Options::default();
    // On a small node, compactions must not take CPU or disk time from acknowledging writes:
    // run them at lower priority, and write SST files back incrementally so a flush does not
    // leave a burst of dirty pages for the next WAL sync to wait behind.
    let mut env = rocksdb::Env::new()?;
    env.lower_thread_pool_cpu_priority();
    env.lower_thread_pool_io_priority();
    db_opts.set_env(&env);
    db_opts.set_bytes_per_sync(1 << 20);
    db_opts.create_if_missing(true);
    db_opts.create_missing_column_families(true);
    db_opts.set_max_background_jobs(2);
    db_opts.set_keep_log_file_num(3);
    db_opts.set_max_total_wal_size(64 << 20);
    db_opts.set_recycle_log_file_num(2);
    let cache = Cache::new_lru_cache(8 << 20);
    let mut table = BlockBasedOptions::default();
    table.set_block_cache(&cache);
    table.set_bloom_filter(10.0, false);

    let mut events = Options::default();
    events.set_write_buffer_size(32 << 20);
    events.set_compression_type(DBCompressionType::Lz4);
    events.set_block_based_table_factory(&table);

    let mut dedup = Options::default();
    dedup.set_write_buffer_size(8 << 20);
    dedup.set_compression_type(DBCompressionType::Lz4);
    dedup.set_block_based_table_factory(&table);
    if dedup_window_ms > 0 {
        dedup.set_compaction_filter("dedup-expiry", move |_level, _key, value| {
            if now_ms().saturating_sub(u64_value(value)) > dedup_window_ms {
                Decision::Remove
            } else {
                Decision::Keep
            }
        });
    }

    let mut small = Options::default();
    small.set_write_buffer_size(1 << 20);
    small.set_block_based_table_factory(&table);

    let cfs = vec![
        ColumnFamilyDescriptor::new(CF_EVENTS, events),
        ColumnFamilyDescriptor::new(CF_META, small.clone()),
        ColumnFamilyDescriptor::new(CF_DEDUP, dedup),
        ColumnFamilyDescriptor::new(CF_DEAD_LETTER, small),
    ];
    Ok((db_opts, cfs))
}

/// Refuses a directory that holds something other than a Tally buffer, so a wrong `dataDir`
/// never turns into a silent, empty buffer.
fn check_directory(dir: &Path) -> Result<bool, BufferError> {
    let not_a_buffer = |found: String| BufferError::NotABuffer {
        dir: dir.to_path_buf(),
        found,
    };
    match std::fs::metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(not_a_buffer(format!("cannot inspect it: {e}"))),
        Ok(meta) if !meta.is_dir() => return Err(not_a_buffer("it is not a directory".into())),
        Ok(_) => {}
    }
    let entries: Vec<String> = std::fs::read_dir(dir)
        .map_err(|e| not_a_buffer(format!("cannot list it: {e}")))?
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .collect();
    if entries.is_empty() {
        return Ok(false);
    }
    if !entries.iter().any(|name| name == "CURRENT") {
        let mut shown: Vec<&str> = entries.iter().map(String::as_str).take(5).collect();
        shown.sort_unstable();
        return Err(not_a_buffer(format!(
            "found {} but no RocksDB CURRENT file",
            shown.join(", ")
        )));
    }
    let cfs = DB::list_cf(&Options::default(), dir).map_err(|source| BufferError::Open {
        dir: dir.to_path_buf(),
        source,
    })?;
    for cf in [CF_EVENTS, CF_META, CF_DEDUP, CF_DEAD_LETTER] {
        if !cfs.iter().any(|c| c == cf) {
            return Err(not_a_buffer(format!(
                "a RocksDB database without the column family {cf:?}"
            )));
        }
    }
    Ok(true)
}

impl DurableBuffer {
    /// Opens (or creates) the buffer and starts its writer thread.
    pub fn open(
        options: BufferOptions,
        metrics: Arc<Metrics>,
    ) -> Result<(DurableBuffer, WriterThread), BufferError> {
        let dir = options.dir.clone();
        let existed = check_directory(&dir)?;
        std::fs::create_dir_all(&dir).map_err(|source| BufferError::CreateDir {
            dir: dir.clone(),
            source,
        })?;
        let (db_opts, cfs) = db_options(options.dedup_window_ms)?;
        let db =
            DB::open_cf_descriptors(&db_opts, &dir, cfs).map_err(|source| BufferError::Open {
                dir: dir.clone(),
                source,
            })?;
        let meta = cf(&db, CF_META)?;
        match db.get_cf(meta, FORMAT_KEY)? {
            Some(format) if format == FORMAT_VALUE => {}
            Some(other) => {
                return Err(BufferError::NotABuffer {
                    dir,
                    found: format!(
                        "buffer format {:?}, this build reads {:?}",
                        String::from_utf8_lossy(&other),
                        String::from_utf8_lossy(FORMAT_VALUE)
                    ),
                });
            }
            None if existed => {
                return Err(BufferError::NotABuffer {
                    dir,
                    found: "a RocksDB database without the Tally format marker".into(),
                });
            }
            None => {
                let mut write = WriteOptions::default();
                write.set_sync(true);
                db.put_cf_opt(meta, FORMAT_KEY, FORMAT_VALUE, &write)?;
            }
        }
        let inner = Inner::load(db, options, metrics)?;
        let (tx, rx) = mpsc::channel(1024);
        let inner = Arc::new(inner);
        let writer_inner = inner.clone();
        let handle = std::thread::Builder::new()
            .name("tally-buffer-writer".into())
            .spawn(move || writer_inner.run_writer(rx))
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
        let dir = options.dir.clone();
        if !check_directory(&dir)? {
            return Err(BufferError::NotABuffer {
                dir,
                found: "nothing: the directory is missing or empty".into(),
            });
        }
        let (db_opts, cfs) = db_options(options.dedup_window_ms)?;
        let db = DB::open_cf_descriptors_read_only(&db_opts, &dir, cfs, false)
            .map_err(|source| BufferError::Open { dir, source })?;
        let inner = Inner::load(db, options, Arc::new(Metrics::new()))?;
        Ok(DurableBuffer {
            inner: Arc::new(inner),
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

    /// The output's durable position: the last sequence it has.
    pub fn cursor(&self, output: &str) -> u64 {
        lock(&self.inner.cursors)
            .get(output)
            .copied()
            .unwrap_or_default()
    }

    /// Reads the events after `after` and up to `ceiling` that are meant for `consumer` (an
    /// output, or [`SHARED_CONSUMER`], which takes every event), up to the limits. At least one
    /// event is returned if any is there, whatever its size.
    pub fn read(
        &self,
        consumer: &str,
        after: u64,
        ceiling: u64,
        max_events: usize,
        max_bytes: usize,
    ) -> Result<ReadBatch, BufferError> {
        let any_target = consumer == SHARED_CONSUMER;
        let db = &self.inner.db;
        let events = cf(db, CF_EVENTS)?;
        let mut read_opts = ReadOptions::default();
        read_opts.fill_cache(true);
        let start = seq_key(after.saturating_add(1));
        let iter = db.iterator_cf_opt(
            events,
            read_opts,
            IteratorMode::From(&start, Direction::Forward),
        );
        let mut batch = ReadBatch::default();
        for item in iter {
            let (key, value) = item?;
            let seq = key_seq(&key)?;
            if seq > ceiling {
                break;
            }
            let record = decode_record(seq, &value)?;
            if let Some(target) = record.target
                && !any_target
                && target != consumer.as_bytes()
            {
                batch.last_scanned = seq;
                continue;
            }
            if !batch.records.is_empty()
                && (batch.records.len() >= max_events
                    || batch.bytes + record.json.len() > max_bytes)
            {
                break;
            }
            batch.bytes += record.json.len();
            batch.records.push(Record {
                seq,
                json: Bytes::copy_from_slice(record.json),
            });
            batch.last_scanned = seq;
            if batch.records.len() >= max_events {
                break;
            }
        }
        if batch.last_scanned > 0 {
            let mut positions = lock(&self.inner.read_positions);
            let position = positions.entry(consumer.to_string()).or_default();
            *position = (*position).max(batch.last_scanned);
        }
        Ok(batch)
    }

    /// Records that `output` has every event up to `seq`. Not synced: a crash may resend a few
    /// batches (at-least-once), which the upstream dedups by `(source, id)`.
    pub fn acknowledge(&self, consumer: &str, seq: u64) -> Result<(), BufferError> {
        let meta = cf(&self.inner.db, CF_META)?;
        self.inner
            .db
            .put_cf(meta, cursor_key(consumer), seq.to_be_bytes())?;
        self.inner.advance(consumer, seq);
        Ok(())
    }

    /// Buffered events `output` does not have yet.
    pub fn lag(&self, output: &str) -> u64 {
        let cursor = self.cursor(self.inner.options.consumer_of(output));
        lock(&self.inner.accounting).lag(cursor)
    }

    /// Watches cursor movements (any consumer), for outputs that wait on another's progress.
    pub fn subscribe_cursors(&self) -> watch::Receiver<u64> {
        self.inner.cursor_moves.subscribe()
    }

    /// Moves `records` into `output`'s dead-letter store and, when `advance` is given, moves
    /// that consumer's cursor to the given sequence, atomically and durably.
    pub fn dead_letter(
        &self,
        output: &str,
        records: &[Record],
        advance: Option<(&str, u64)>,
        reason: &str,
        status: Option<u16>,
    ) -> Result<(), BufferError> {
        let db = &self.inner.db;
        let dl = cf(db, CF_DEAD_LETTER)?;
        let meta = cf(db, CF_META)?;
        let failed_at = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        let mut batch = WriteBatch::default();
        for record in records {
            let event = RawValue::from_string(String::from_utf8_lossy(&record.json).into_owned())
                .map_err(|e| BufferError::Corrupt {
                key: format!("events/{}", record.seq),
                reason: format!("stored event is not JSON: {e}"),
            })?;
            let letter = DeadLetter {
                output: output.to_string(),
                key: record.seq,
                reason: reason.to_string(),
                status,
                failed_at: failed_at.clone(),
                event,
            };
            let mut key = dead_letter_prefix(output);
            key.extend_from_slice(&seq_key(record.seq));
            let value = serde_json::to_vec(&letter).map_err(|e| BufferError::Corrupt {
                key: format!("dead_letter/{output}/{}", record.seq),
                reason: e.to_string(),
            })?;
            batch.put_cf(dl, key, value);
        }
        if let Some((consumer, upto)) = advance {
            batch.put_cf(meta, cursor_key(consumer), upto.to_be_bytes());
        }
        let mut write = WriteOptions::default();
        write.set_sync(self.inner.options.durability == Durability::Sync);
        db.write_opt(batch, &write)?;
        if let Some((consumer, upto)) = advance {
            self.inner.advance(consumer, upto);
        }
        Ok(())
    }

    /// Lists dead-lettered events, oldest first per output.
    pub fn dead_letters(
        &self,
        output: Option<&str>,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, BufferError> {
        let db = &self.inner.db;
        let dl = cf(db, CF_DEAD_LETTER)?;
        let prefix = output.map(dead_letter_prefix).unwrap_or_default();
        let mut out = Vec::new();
        for item in db.iterator_cf(dl, IteratorMode::From(&prefix, Direction::Forward)) {
            let (key, value) = item?;
            if !key.starts_with(&prefix) || out.len() >= limit {
                break;
            }
            let letter: DeadLetter =
                serde_json::from_slice(&value).map_err(|e| BufferError::Corrupt {
                    key: format!("dead_letter/{}", String::from_utf8_lossy(&key)),
                    reason: e.to_string(),
                })?;
            out.push(letter);
        }
        Ok(out)
    }

    /// Deletes events every output has. Cheap when there is nothing to delete.
    pub fn trim(&self) -> Result<(), BufferError> {
        let floor = {
            let cursors = lock(&self.inner.cursors);
            self.inner
                .options
                .consumers()
                .into_iter()
                .map(|name| cursors.get(name).copied().unwrap_or_default())
                .min()
                .unwrap_or_default()
        };
        let mut accounting = lock(&self.inner.accounting);
        let mut range: Option<(u64, u64)> = None;
        while accounting.chunks.front().is_some_and(|c| c.last <= floor) {
            if let Some(chunk) = accounting.pop_front() {
                range = Some((range.map_or(chunk.first, |r| r.0), chunk.last));
            }
        }
        if let Some((first, last)) = range {
            let events = cf(&self.inner.db, CF_EVENTS)?;
            let mut batch = WriteBatch::default();
            batch.delete_range_cf(events, seq_key(first), seq_key(last + 1));
            self.inner.db.write(batch)?;
            self.inner
                .full
                .store(false, std::sync::atomic::Ordering::Relaxed);
        }
        drop(accounting);
        self.inner.publish_gauges();
        Ok(())
    }

    /// Events, bytes, oldest age and per-output lag.
    pub fn stats(&self) -> Result<BufferStats, BufferError> {
        let dl = cf(&self.inner.db, CF_DEAD_LETTER)?;
        let mut dead_letters: HashMap<&str, u64> = HashMap::new();
        for item in self.inner.db.iterator_cf(dl, IteratorMode::Start) {
            let (key, _) = item?;
            let name_len = key.iter().position(|b| *b == 0).unwrap_or(key.len());
            if let Some(name) = self
                .inner
                .options
                .outputs
                .iter()
                .find(|n| n.as_bytes() == &key[..name_len])
            {
                *dead_letters.entry(name.as_str()).or_default() += 1;
            }
        }
        let accounting = lock(&self.inner.accounting);
        let cursors = lock(&self.inner.cursors);
        let now = now_ms();
        Ok(BufferStats {
            events: accounting.events,
            bytes: accounting.bytes,
            max_bytes: self.inner.options.max_bytes,
            oldest_age_seconds: accounting
                .chunks
                .front()
                .map(|c| now.saturating_sub(c.appended_ms) as f64 / 1000.0),
            outputs: self
                .inner
                .options
                .outputs
                .iter()
                .map(|name| {
                    let consumer = self.inner.options.consumer_of(name);
                    let cursor = cursors.get(consumer).copied().unwrap_or_default();
                    OutputStats {
                        name: name.clone(),
                        cursor,
                        lag: accounting.lag(cursor),
                        dead_letters: dead_letters.get(name.as_str()).copied().unwrap_or_default(),
                    }
                })
                .collect(),
        })
    }

    /// The write error that stopped the buffer, if any; the collector must be restarted.
    pub fn failure(&self) -> Option<String> {
        lock(&self.inner.failure).clone()
    }

    /// Whether ingest would be refused for lack of space right now.
    pub fn is_full(&self) -> bool {
        self.inner.full.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A handle that reads, acknowledges and trims but cannot append, so it does not keep the
    /// writer thread alive.
    pub fn reader(&self) -> DurableBuffer {
        DurableBuffer {
            inner: self.inner.clone(),
            writer: None,
        }
    }

    /// Syncs the WAL so a clean stop leaves nothing in OS buffers.
    pub fn flush(&self) -> Result<(), BufferError> {
        self.inner.db.flush_wal(true)?;
        Ok(())
    }
}

fn cf<'a>(db: &'a DB, name: &str) -> Result<&'a ColumnFamily, BufferError> {
    db.cf_handle(name).ok_or_else(|| BufferError::Corrupt {
        key: name.to_string(),
        reason: "column family missing".into(),
    })
}

impl Inner {
    /// Rebuilds the in-memory accounting and cursors from disk.
    fn load(db: DB, options: BufferOptions, metrics: Arc<Metrics>) -> Result<Inner, BufferError> {
        let events = cf(&db, CF_EVENTS)?;
        let meta = cf(&db, CF_META)?;
        let mut accounting = Accounting::default();
        let mut current: Option<Chunk> = None;
        let mut last_seq = 0;
        for item in db.iterator_cf(events, IteratorMode::Start) {
            let (key, value) = item?;
            let seq = key_seq(&key)?;
            let record = decode_record(seq, &value)?;
            let size = (key.len() + value.len()) as u64;
            match current.as_mut() {
                Some(chunk) if chunk.events < REBUILD_CHUNK => {
                    chunk.last = seq;
                    chunk.events += 1;
                    chunk.bytes += size;
                }
                _ => {
                    if let Some(chunk) = current.take() {
                        accounting.push(chunk);
                    }
                    current = Some(Chunk {
                        first: seq,
                        last: seq,
                        events: 1,
                        bytes: size,
                        appended_ms: record.appended_ms,
                    });
                }
            }
            last_seq = seq;
        }
        if let Some(chunk) = current {
            accounting.push(chunk);
        }
        let mut cursors = HashMap::new();
        for name in options.consumers() {
            if let Some(value) = db.get_cf(meta, cursor_key(name))? {
                cursors.insert(name.to_string(), u64_value(&value));
            }
        }
        let high_water = db
            .get_cf(meta, NEXT_SEQ_KEY)?
            .map(|v| u64_value(&v).saturating_sub(1))
            .unwrap_or_default();
        let max_cursor = cursors.values().copied().max().unwrap_or_default();
        let last_seq = last_seq.max(high_water).max(max_cursor);
        let (last_seq_tx, _) = watch::channel(last_seq);
        let inner = Inner {
            db,
            options,
            accounting: Mutex::new(accounting),
            read_positions: Mutex::new(cursors.clone()),
            cursors: Mutex::new(cursors),
            full: std::sync::atomic::AtomicBool::new(false),
            cursor_moves: watch::channel(0).0,
            last_seq: last_seq_tx,
            metrics,
            failure: Mutex::new(None),
        };
        inner.publish_gauges();
        Ok(inner)
    }

    fn advance(&self, consumer: &str, seq: u64) {
        let mut cursors = lock(&self.cursors);
        let cursor = cursors.entry(consumer.to_string()).or_default();
        if seq > *cursor {
            *cursor = seq;
            self.cursor_moves.send_modify(|moves| *moves += 1);
        }
    }

    fn publish_gauges(&self) {
        let accounting = lock(&self.accounting);
        self.metrics.buffer_events.set(accounting.events as i64);
        self.metrics.buffer_bytes.set(accounting.bytes as i64);
    }

    fn run_writer(self: Arc<Self>, mut rx: mpsc::Receiver<WriterCommand>) {
        while let Some(first) = rx.blocking_recv() {
            let mut appends = Vec::new();
            let mut pending = Some(first);
            while let Some(command) = pending.take() {
                match command {
                    WriterCommand::Append { events, reply } => appends.push((events, reply)),
                    WriterCommand::Replay { output, reply } => {
                        // Keep order: commit what came before, then replay alone.
                        self.commit_appends(std::mem::take(&mut appends));
                        let _ = reply.send(self.replay(output.as_deref()));
                    }
                }
                if appends.len() < MAX_GROUP {
                    pending = rx.try_recv().ok();
                }
            }
            self.commit_appends(appends);
        }
    }

    /// One group commit: dedup, capacity, one write batch, one sync.
    fn commit_appends(&self, requests: Vec<(Vec<Event>, AppendReply)>) {
        if requests.is_empty() {
            return;
        }
        let result = self.try_commit(&requests);
        match result {
            Ok(outcomes) => {
                for ((_, reply), outcome) in requests.into_iter().zip(outcomes) {
                    let _ = reply.send(outcome);
                }
            }
            Err(e) => {
                let message = e.to_string();
                let mut failure = lock(&self.failure);
                if failure.is_none() {
                    tracing::error!(error = %e, "buffer write failed; acknowledged events are safe, but the buffer accepts no writes until the collector restarts");
                    *failure = Some(message.clone());
                }
                drop(failure);
                for (_, reply) in requests {
                    let _ = reply.send(Err(AppendError::Storage(message.clone())));
                }
            }
        }
    }

    fn try_commit(
        &self,
        requests: &[(Vec<Event>, AppendReply)],
    ) -> Result<Vec<Result<Appended, AppendError>>, BufferError> {
        let db = &self.db;
        let events_cf = cf(db, CF_EVENTS)?;
        let dedup_cf = cf(db, CF_DEDUP)?;
        let meta_cf = cf(db, CF_META)?;
        let now = now_ms();
        let window = self.options.dedup_window_ms;

        // Which events were seen before, in one multi-get for the whole group.
        let keys: Vec<Vec<u8>> = if window > 0 {
            requests
                .iter()
                .flat_map(|(events, _)| events.iter().map(|e| dedup_key(&e.source, &e.id)))
                .collect()
        } else {
            Vec::new()
        };
        let seen: Vec<bool> = db
            .multi_get_cf(keys.iter().map(|k| (dedup_cf, k.as_slice())))
            .into_iter()
            .map(|r| r.map(|v| v.is_some_and(|v| now.saturating_sub(u64_value(&v)) <= window)))
            .collect::<Result<_, _>>()?;

        let mut batch = WriteBatch::default();
        let mut accounting = lock(&self.accounting);
        let mut next = *self.last_seq.borrow() + 1;
        let mut in_group: HashSet<&[u8]> = HashSet::new();
        let mut outcomes = Vec::with_capacity(requests.len());
        let mut new_chunks = Vec::new();
        let mut group_bytes = 0u64;
        let mut key_index = 0;
        let mut dropped_chunks: Vec<Chunk> = Vec::new();
        let read_floor = {
            let positions = lock(&self.read_positions);
            self.options
                .consumers()
                .into_iter()
                .map(|name| positions.get(name).copied().unwrap_or_default())
                .min()
                .unwrap_or_default()
        };
        for (events, _) in requests {
            // Decide per request, so one request over the limit does not fail the others.
            let mut fresh = Vec::with_capacity(events.len());
            let mut duplicates = 0;
            for event in events {
                if window > 0 {
                    let key = keys[key_index].as_slice();
                    let is_dup = seen[key_index] || in_group.contains(key);
                    key_index += 1;
                    if is_dup {
                        duplicates += 1;
                        continue;
                    }
                    in_group.insert(key);
                    fresh.push((event, Some(key)));
                } else {
                    fresh.push((event, None));
                }
            }
            let records: Vec<Vec<u8>> = fresh
                .iter()
                .map(|(e, _)| encode_record(&Target::All, now, &e.json))
                .collect();
            let needed: u64 = records.iter().map(|r| r.len() as u64 + 8).sum();
            let max = self.options.max_bytes;
            if needed > max {
                // Undo the dedup claims of this request; its events were not stored.
                for (_, key) in &fresh {
                    if let Some(key) = key {
                        in_group.remove(key);
                    }
                }
                outcomes.push(Err(AppendError::TooLarge { needed, max }));
                continue;
            }
            let mut dropped = 0;
            if accounting.bytes + group_bytes + needed > max {
                match self.options.when_full {
                    WhenFull::Reject => {
                        for (_, key) in &fresh {
                            if let Some(key) = key {
                                in_group.remove(key);
                            }
                        }
                        self.full.store(true, std::sync::atomic::Ordering::Relaxed);
                        outcomes.push(Err(AppendError::Full {
                            used: accounting.bytes + group_bytes,
                            max,
                        }));
                        continue;
                    }
                    WhenFull::DropOldest => {
                        while accounting.bytes + group_bytes + needed > max {
                            let Some(chunk) = accounting.pop_front() else {
                                break;
                            };
                            batch.delete_range_cf(
                                events_cf,
                                seq_key(chunk.first),
                                seq_key(chunk.last + 1),
                            );
                            dropped += unread_events(&chunk, read_floor);
                            dropped_chunks.push(chunk);
                        }
                    }
                }
            }
            let first = next;
            for ((_, key), record) in fresh.iter().zip(records) {
                batch.put_cf(events_cf, seq_key(next), record);
                if let Some(key) = key {
                    batch.put_cf(dedup_cf, key, now.to_be_bytes());
                }
                next += 1;
            }
            if !fresh.is_empty() {
                new_chunks.push(Chunk {
                    first,
                    last: next - 1,
                    events: fresh.len() as u64,
                    bytes: needed,
                    appended_ms: now,
                });
                group_bytes += needed;
            }
            outcomes.push(Ok(Appended {
                stored: fresh.len(),
                duplicates,
                dropped,
            }));
        }
        batch.put_cf(meta_cf, NEXT_SEQ_KEY, next.to_be_bytes());
        let mut write = WriteOptions::default();
        write.set_sync(self.options.durability == Durability::Sync);
        let stored: u64 = new_chunks.iter().map(|c| c.events).sum();
        if let Err(e) = db.write_opt(batch, &write) {
            // Nothing was written, so nothing was dropped either: restore the accounting.
            for chunk in dropped_chunks.into_iter().rev() {
                accounting.push_front(chunk);
            }
            return Err(e.into());
        }
        let dropped_total: u64 = dropped_chunks
            .iter()
            .map(|c| unread_events(c, read_floor))
            .sum();
        for chunk in new_chunks {
            accounting.push(chunk);
        }
        drop(accounting);
        self.metrics.buffer_commits.inc();
        self.metrics.buffer_commit_events.observe(stored as f64);
        if dropped_total > 0 {
            tracing::warn!(
                dropped = dropped_total,
                "buffer full: dropped the oldest events (whenFull: dropOldest)"
            );
        }
        self.last_seq.send_replace(next - 1);
        self.publish_gauges();
        Ok(outcomes)
    }

    fn replay(&self, output: Option<&str>) -> Result<usize, BufferError> {
        let db = &self.db;
        let dl = cf(db, CF_DEAD_LETTER)?;
        let events_cf = cf(db, CF_EVENTS)?;
        let meta_cf = cf(db, CF_META)?;
        let prefix = output.map(dead_letter_prefix).unwrap_or_default();
        let now = now_ms();
        let mut batch = WriteBatch::default();
        let mut next = *self.last_seq.borrow() + 1;
        let first = next;
        let mut bytes = 0;
        for item in db.iterator_cf(dl, IteratorMode::From(&prefix, Direction::Forward)) {
            let (key, value) = item?;
            if !key.starts_with(&prefix) {
                break;
            }
            let letter: DeadLetter =
                serde_json::from_slice(&value).map_err(|e| BufferError::Corrupt {
                    key: format!("dead_letter/{}", String::from_utf8_lossy(&key)),
                    reason: e.to_string(),
                })?;
            if !self.options.outputs.contains(&letter.output) {
                // Its output is no longer configured; leave it for a later configuration.
                continue;
            }
            let record = encode_record(
                &Target::Only(letter.output.clone()),
                now,
                letter.event.get().as_bytes(),
            );
            bytes += record.len() as u64 + 8;
            batch.put_cf(events_cf, seq_key(next), record);
            batch.delete_cf(dl, key);
            next += 1;
        }
        let count = (next - first) as usize;
        if count == 0 {
            return Ok(0);
        }
        batch.put_cf(meta_cf, NEXT_SEQ_KEY, next.to_be_bytes());
        let mut write = WriteOptions::default();
        write.set_sync(true);
        db.write_opt(batch, &write)?;
        lock(&self.accounting).push(Chunk {
            first,
            last: next - 1,
            events: count as u64,
            bytes,
            appended_ms: now,
        });
        self.last_seq.send_replace(next - 1);
        self.publish_gauges();
        Ok(count)
    }
}
