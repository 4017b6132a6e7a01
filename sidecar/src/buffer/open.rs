//! Opening the buffer, rebuilding its in-memory state, reading the log, and the checks behind
//! `tally-sidecar buffer check` and `buffer repair`.
//!
//! A damaged record never stops the buffer: at open and on read it is moved to the `quarantine`
//! column family (kept, logged with its key, counted by reason) and everything else flows. A
//! database RocksDB itself refuses to open as corrupt is repaired with RocksDB's repairer once,
//! automatically, and the start goes on.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64};

use parking_lot::{Mutex, RwLock};

use bytes::Bytes;
use rocksdb::{
    BlockBasedIndexType, BlockBasedOptions, Cache, ColumnFamily, ColumnFamilyDescriptor, DB,
    DBCompressionType, IteratorMode, Options, ReadOptions, WriteBatch, WriteOptions,
};
use serde::Serialize;
use tokio::sync::watch;

use super::accounting::Accounting;
use super::acks::AckTracker;
use super::budget::Budget;
use super::codec::{
    DEDUP_KEYS_KEY, Damage, DedupKeys, cursor_key, decode_record, key_seq, seq_key, u64_value,
};
use super::space::{DedupFilter, Space};
use super::{BufferError, BufferOptions, Inner, ReadBatch, Record, SHARED_CONSUMER, dead_letter};
use crate::config::{BufferProfile, Durability};
use crate::metrics::Metrics;

pub(super) const CF_EVENTS: &str = "events";
pub(super) const CF_META: &str = "meta";
pub(super) const CF_DEDUP: &str = "dedup";
pub(super) const CF_DEAD_LETTER: &str = "dead_letter";
pub(super) const CF_QUARANTINE: &str = "quarantine";
/// The column families a buffer must have; `quarantine` is created when missing.
const REQUIRED: [&str; 4] = [CF_EVENTS, CF_META, CF_DEDUP, CF_DEAD_LETTER];
const FORMAT_KEY: &[u8] = b"format";
const FORMAT_VALUE: &[u8] = b"tally-buffer-v1";
/// How a buffer created by this build spells its dedup keys.
const NEW_DEDUP_KEYS: DedupKeys = DedupKeys::SourceHash;
pub(super) const NEXT_SEQ_KEY: &[u8] = b"next_seq";

pub(super) fn cf<'a>(db: &'a DB, name: &str) -> Result<&'a ColumnFamily, BufferError> {
    db.cf_handle(name).ok_or_else(|| BufferError::Corrupt {
        key: name.to_string(),
        reason: "column family missing".into(),
    })
}

/// The events' data block size.
const EVENTS_BLOCK_SIZE: usize = 32 << 10;
/// The dedup index's data block and index and filter partition size. Its entries are small
/// (about 60 bytes): at RocksDB's default 4 KiB, every compaction of the index (a fifth of the
/// CPU under load) paid a compression call, a checksum and an index entry for every 70 or so
/// entries. At 16 KiB, in `make bench-peers` (sidecar profile), the index's compactions took 6 %
/// less CPU per entry and wrote 10 % fewer bytes; the rare lookup that finds its key reads one
/// larger block.
const DEDUP_BLOCK_SIZE: usize = 16 << 10;

/// RocksDB's options, sized by the budget (see [`super::budget`]).
pub(super) fn db_options(
    budget: &Budget,
    profile: BufferProfile,
    dedup_filter: Option<&DedupFilter>,
) -> Result<(Options, Vec<ColumnFamilyDescriptor>), BufferError> {
    let memory = budget.memory(profile);
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
    db_opts.set_compaction_readahead_size(memory.compaction_readahead as usize);
    // RocksDB's info log counts against maxBytes too: two files of at most 1 MiB.
    db_opts.set_keep_log_file_num(2);
    db_opts.set_max_log_file_size(1 << 20);
    db_opts.set_max_total_wal_size(budget.max_wal());
    db_opts.set_recycle_log_file_num(2);
    // RocksDB preallocates each WAL file by the default column family's write buffer size;
    // that family is unused, and a small size lets the buffer open on a nearly full disk.
    db_opts.set_write_buffer_size(1 << 20);
    let cache = Cache::new_lru_cache(memory.block_cache as usize);
    let table_options = || {
        let mut table = BlockBasedOptions::default();
        table.set_block_cache(&cache);
        if memory.index_and_filters_in_cache {
            // Held in the cache instead of beside it for as long as a file is open, so they
            // do not grow with the files; the newest (level-0) files' blocks are pinned there,
            // so reads of recent events and dedup lookups do not go to disk.
            table.set_cache_index_and_filter_blocks(true);
            table.set_pin_l0_filter_and_index_blocks_in_cache(true);
            // In partitions (4 KiB; 16 KiB for the dedup index) under a small top level that
            // stays pinned: a lookup that misses the cache reads one partition, not a file's
            // whole filter (tens to hundreds of KiB, read, checksummed and freed again for
            // every dedup lookup once the index outgrows the cache).
            table.set_index_type(BlockBasedIndexType::TwoLevelIndexSearch);
            table.set_partition_filters(true);
            table.set_pin_top_level_index_and_filter(true);
        }
        table
    };
    // Cursors, dead letters and the quarantine.
    let mut table = table_options();
    table.set_bloom_filter(10.0, false);

    // Events are only ever scanned in order: no filter, and large blocks, so the index (one
    // entry per block) stays small and compression sees more at once.
    let mut events_table = table_options();
    events_table.set_block_size(EVENTS_BLOCK_SIZE);
    let mut events = Options::default();
    events.set_write_buffer_size(memory.events_write_buffer as usize);
    events.set_compression_type(DBCompressionType::Lz4);
    events.set_block_based_table_factory(&events_table);

    // Dedup lookups are point reads: a bloom filter saves reading a file's blocks.
    let mut dedup_table = table_options();
    dedup_table.set_bloom_filter(10.0, false);
    dedup_table.set_block_size(DEDUP_BLOCK_SIZE);
    dedup_table.set_metadata_block_size(DEDUP_BLOCK_SIZE);
    let dedup = super::dedup::options(dedup_filter, &dedup_table, &memory);

    let mut small = Options::default();
    small.set_write_buffer_size(memory.small_write_buffer as usize);
    small.set_block_based_table_factory(&table);

    let cfs = vec![
        ColumnFamilyDescriptor::new(CF_EVENTS, events),
        ColumnFamilyDescriptor::new(CF_META, small.clone()),
        ColumnFamilyDescriptor::new(CF_DEDUP, dedup),
        ColumnFamilyDescriptor::new(CF_DEAD_LETTER, small.clone()),
        ColumnFamilyDescriptor::new(CF_QUARANTINE, small),
    ];
    Ok((db_opts, cfs))
}

/// Refuses a directory that holds something other than a Tally buffer, so a wrong `dataDir`
/// never turns into a silent, empty buffer. Returns whether a buffer exists there.
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
        // A filesystem's own directory is not a sign of foreign data.
        .filter(|name| name != "lost+found")
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
    // A damaged MANIFEST makes listing fail; opening (with repair) will tell.
    if let Ok(cfs) = DB::list_cf(&Options::default(), dir) {
        for cf in REQUIRED {
            if !cfs.iter().any(|c| c == cf) {
                return Err(not_a_buffer(format!(
                    "a RocksDB database without the column family {cf:?}"
                )));
            }
        }
    }
    Ok(true)
}

/// Syncs `dir` and its parent, so a directory just created survives a power cut; ancestors
/// further up (which `create_dir_all` may have created too) are synced where they can be opened.
fn sync_parents(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()?;
    let mut ancestors = dir
        .ancestors()
        .skip(1)
        .filter(|p| !p.as_os_str().is_empty());
    if let Some(parent) = ancestors.next() {
        std::fs::File::open(parent)?.sync_all()?;
    }
    for ancestor in ancestors {
        if let Ok(file) = std::fs::File::open(ancestor) {
            let _ = file.sync_all();
        }
    }
    Ok(())
}

fn is_corruption(e: &rocksdb::Error) -> bool {
    e.kind() == rocksdb::ErrorKind::Corruption
}

/// Opens the database read-write, repairing it once if RocksDB reports it corrupt.
pub(super) fn open_db(
    options: &BufferOptions,
    dedup_filter: Option<&DedupFilter>,
) -> Result<DB, BufferError> {
    let dir = &options.dir;
    let (db_opts, cfs) = db_options(&options.budget, options.profile, dedup_filter)?;
    match DB::open_cf_descriptors(&db_opts, dir, cfs) {
        Ok(db) => Ok(db),
        Err(e) if is_corruption(&e) => {
            tracing::error!(dir = %dir.display(), error = %e,
                "the buffer's files are damaged; repairing them (RocksDB's repairer keeps every readable record) and starting");
            DB::repair(&db_opts, dir).map_err(|source| BufferError::Open {
                dir: dir.clone(),
                source,
            })?;
            let (db_opts, cfs) = db_options(&options.budget, options.profile, dedup_filter)?;
            DB::open_cf_descriptors(&db_opts, dir, cfs).map_err(|source| BufferError::Open {
                dir: dir.clone(),
                source,
            })
        }
        Err(source) => Err(BufferError::Open {
            dir: dir.clone(),
            source,
        }),
    }
}

pub(super) fn open_writable(
    options: BufferOptions,
    metrics: Arc<Metrics>,
) -> Result<Inner, BufferError> {
    let dir = options.dir.clone();
    let existed = check_directory(&dir)?;
    std::fs::create_dir_all(&dir).map_err(|source| BufferError::CreateDir {
        dir: dir.clone(),
        source,
    })?;
    if !existed {
        // RocksDB syncs the entries of its own directory, not the directory's entry in its
        // parent: without this, a power cut can take a buffer that was just created, and every
        // event acknowledged into it, with that entry.
        sync_parents(&dir).map_err(|source| BufferError::CreateDir {
            dir: dir.clone(),
            source,
        })?;
    }
    let space = Space::new(
        &dir,
        options.budget,
        options.dedup_window_ms,
        metrics.clone(),
    );
    let db = open_db(&options, Some(&space.filter))?;
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
            let mut batch = WriteBatch::default();
            batch.put_cf(meta, FORMAT_KEY, FORMAT_VALUE);
            if let Some(keys) = NEW_DEDUP_KEYS.meta_value() {
                batch.put_cf(meta, DEDUP_KEYS_KEY, keys);
            }
            db.write_opt(batch, &write)?;
        }
    }
    space.rebuild_inserted(&db)?;
    load(db, options, metrics, Some(space))
}

pub(super) fn open_read_only(options: BufferOptions) -> Result<Inner, BufferError> {
    let dir = options.dir.clone();
    if !check_directory(&dir)? {
        return Err(BufferError::NotABuffer {
            dir,
            found: "nothing: the directory is missing or empty".into(),
        });
    }
    // A running sidecar may finish a compaction between the moment this reads the MANIFEST and
    // the moment it opens a table file the compaction deleted: that open fails as "corrupt".
    // Read again from the newer MANIFEST a few times before believing it.
    let mut attempt = 0;
    let db = loop {
        let (db_opts, mut cfs) = db_options(&options.budget, options.profile, None)?;
        let existing = DB::list_cf(&Options::default(), &dir).unwrap_or_default();
        cfs.retain(|c| existing.iter().any(|name| name == c.name()));
        match DB::open_cf_descriptors_read_only(&db_opts, &dir, cfs, false) {
            Ok(db) => break db,
            Err(source) if attempt < READ_ONLY_ATTEMPTS && is_missing_file(&source) => {
                attempt += 1;
                std::thread::sleep(std::time::Duration::from_millis(20 * attempt));
            }
            Err(source) => return Err(BufferError::Open { dir, source }),
        }
    };
    load(db, options, Arc::new(Metrics::new()), None)
}

/// Read-only opens tried while a running sidecar's compactions delete files under them.
const READ_ONLY_ATTEMPTS: u64 = 10;

/// Whether RocksDB failed because a file it was told about is gone (see [`open_read_only`]).
fn is_missing_file(e: &rocksdb::Error) -> bool {
    e.to_string().contains("No such file or directory")
}

/// Damaged records found by one scan: (key, damage).
type Damaged = Vec<(Vec<u8>, Damage)>;

/// Scans the log: (accounting, last sequence, damaged records).
fn scan_log(db: &DB) -> Result<(Accounting, u64, Damaged), BufferError> {
    let events = cf(db, CF_EVENTS)?;
    let mut damaged = Vec::new();
    let mut last_seq = 0;
    let mut sizes = Vec::new();
    for item in db.iterator_cf(events, IteratorMode::Start) {
        let (key, value) = item?;
        let Some(seq) = key_seq(&key) else {
            damaged.push((key.to_vec(), Damage::Key));
            continue;
        };
        match decode_record(&value) {
            Ok(record) => {
                sizes.push((seq, (key.len() + value.len()) as u64, record.appended_ms));
                last_seq = seq;
            }
            Err(damage) => damaged.push((key.to_vec(), damage)),
        }
    }
    Ok((Accounting::rebuild(sizes.into_iter()), last_seq, damaged))
}

/// Moves damaged records into the quarantine, durably, and counts them.
pub(super) fn quarantine(
    db: &DB,
    damaged: &[(Vec<u8>, Damage)],
    metrics: &Metrics,
) -> Result<u64, BufferError> {
    let events = cf(db, CF_EVENTS)?;
    let quarantine = cf(db, CF_QUARANTINE)?;
    let mut batch = WriteBatch::default();
    let mut moved = 0;
    for (key, damage) in damaged {
        let Some(value) = db.get_cf(events, key)? else {
            continue;
        };
        let mut kept = damage.as_str().as_bytes().to_vec();
        kept.push(0);
        kept.extend_from_slice(&value);
        batch.put_cf(quarantine, key, kept);
        batch.delete_cf(events, key);
        tracing::error!(key = %display_key(key), reason = damage.as_str(),
            "damaged buffer record quarantined; the other events flow on. Inspect with `tally-sidecar buffer check`");
        metrics.quarantine(damage.as_str());
        moved += 1;
    }
    if moved > 0 {
        let mut write = WriteOptions::default();
        write.set_sync(true);
        db.write_opt(batch, &write)?;
    }
    Ok(moved)
}

fn display_key(key: &[u8]) -> String {
    match key_seq(key) {
        Some(seq) => format!("events/{seq}"),
        None => format!("events/0x{}", hex::encode(key)),
    }
}

fn count_quarantined(db: &DB) -> u64 {
    cf(db, CF_QUARANTINE)
        .map(|q| db.iterator_cf(q, IteratorMode::Start).count() as u64)
        .unwrap_or_default()
}

/// Rebuilds the in-memory state from disk; a writable buffer has a space keeper.
fn load(
    db: DB,
    options: BufferOptions,
    metrics: Arc<Metrics>,
    space: Option<Space>,
) -> Result<Inner, BufferError> {
    let writable = space.is_some();
    let space = space.unwrap_or_else(|| {
        Space::new(
            &options.dir,
            options.budget,
            options.dedup_window_ms,
            metrics.clone(),
        )
    });
    let (accounting, last_seq, damaged) = scan_log(&db)?;
    if writable && !damaged.is_empty() {
        quarantine(&db, &damaged, &metrics)?;
    }
    let meta = cf(&db, CF_META)?;
    let spelling = db.get_cf(meta, DEDUP_KEYS_KEY)?;
    let Some(dedup_keys) = DedupKeys::from_meta(spelling.as_deref()) else {
        return Err(BufferError::NotABuffer {
            dir: options.dir.clone(),
            found: format!(
                "dedup keys spelled {:?}, which this build does not read; run the release that created the buffer",
                String::from_utf8_lossy(spelling.as_deref().unwrap_or_default())
            ),
        });
    };
    let mut cursors = Vec::new();
    for name in options.consumers() {
        if let Some(value) = db.get_cf(meta, cursor_key(name))? {
            cursors.push((name.to_string(), u64_value(&value)));
        }
    }
    let high_water = db
        .get_cf(meta, NEXT_SEQ_KEY)?
        .map(|v| u64_value(&v).saturating_sub(1))
        .unwrap_or_default();
    let max_cursor = cursors.iter().map(|(_, c)| *c).max().unwrap_or_default();
    let last_seq = last_seq.max(high_water).max(max_cursor);
    let dead_letters = dead_letter::count(&db)?;
    let quarantined = count_quarantined(&db) + if writable { 0 } else { damaged.len() as u64 };
    let inner = Inner {
        db: RwLock::new(Some(Arc::new(db))),
        options,
        accounting: Mutex::new(accounting),
        acks: AckTracker::new(cursors),
        dead_letters: Mutex::new(dead_letters),
        quarantined: AtomicU64::new(quarantined),
        full: AtomicBool::new(false),
        cursor_moves: watch::channel(0).0,
        last_seq: watch::channel(last_seq).0,
        metrics,
        failure: Mutex::new(None),
        writer_alive: AtomicBool::new(false),
        found_damaged: Mutex::new(Vec::new()),
        space,
        dedup_keys,
    };
    inner.publish_gauges();
    Ok(inner)
}

/// Reads for `consumer` (see [`super::DurableBuffer::read`]).
pub(super) fn read(
    inner: &Inner,
    consumer: &str,
    after: u64,
    ceiling: u64,
    max_events: usize,
    max_bytes: usize,
) -> Result<ReadBatch, BufferError> {
    let any_target = consumer == SHARED_CONSUMER;
    let db = inner.db()?;
    let events = cf(&db, CF_EVENTS)?;
    let mut read_opts = ReadOptions::default();
    read_opts.fill_cache(true);
    // Nothing past the ceiling is read, nor are the deletions beyond it stepped over.
    read_opts.set_iterate_upper_bound(seq_key(ceiling.saturating_add(1)));
    let mut iter = db.raw_iterator_cf_opt(events, read_opts);
    iter.seek(seq_key(after.saturating_add(1)));
    let mut batch = ReadBatch::default();
    // The batch's events go into one buffer that the records are slices of: one allocation
    // and one copy per batch instead of per event.
    let mut text: Vec<u8> = Vec::new();
    let mut spans: Vec<(u64, usize)> = Vec::new();
    while let (Some(key), Some(value)) = (iter.key(), iter.value()) {
        let Some(seq) = key_seq(key) else {
            // Not a sequence key: the batch ends before it, and the writer moves it to the
            // quarantine.
            inner.found_damaged.lock().push((key.to_vec(), Damage::Key));
            break;
        };
        let record = match decode_record(value) {
            Ok(record) => record,
            Err(damage) => {
                // Step over it; the writer moves it to the quarantine before the cursor can
                // pass it (see writer::run).
                inner.found_damaged.lock().push((key.to_vec(), damage));
                batch.last_scanned = seq;
                iter.next();
                continue;
            }
        };
        let wanted = match record.target {
            Some(target) => any_target || target == consumer.as_bytes(),
            None => true,
        };
        if wanted {
            if !spans.is_empty()
                && (spans.len() >= max_events || batch.bytes + record.json.len() > max_bytes)
            {
                break;
            }
            batch.bytes += record.json.len();
            if text.is_empty() {
                // Sized by the first event; at most 4 MiB up front, whatever the limits.
                let guess = record.json.len().saturating_mul(max_events);
                text.reserve(guess.min(max_bytes).min(4 << 20));
            }
            text.extend_from_slice(record.json);
            spans.push((seq, text.len()));
        }
        batch.last_scanned = seq;
        if spans.len() >= max_events {
            break;
        }
        iter.next();
    }
    iter.status()?;
    let text = Bytes::from(text);
    let mut start = 0;
    batch.records = spans
        .into_iter()
        .map(|(seq, end)| {
            let json = text.slice(start..end);
            start = end;
            Record { seq, json }
        })
        .collect();
    Ok(batch)
}

/// What `tally-sidecar buffer check` reports.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CheckReport {
    pub events: u64,
    pub damaged: Vec<DamagedRecord>,
    pub quarantined: u64,
    pub dead_letters: u64,
    pub cursors: HashMap<String, u64>,
}

#[derive(Debug, Serialize)]
pub struct DamagedRecord {
    pub key: String,
    pub reason: &'static str,
}

impl CheckReport {
    /// Whether the log holds damaged records not yet quarantined.
    pub fn is_clean(&self) -> bool {
        self.damaged.is_empty()
    }
}

/// Scans the buffer read-only (it may be in use by a running collector) and reports.
pub fn check(options: BufferOptions) -> Result<CheckReport, BufferError> {
    let inner = open_read_only(options)?;
    let db = inner.db()?;
    let (accounting, _, damaged) = scan_log(&db)?;
    let consumers = inner.options.consumers();
    Ok(CheckReport {
        events: accounting.events,
        damaged: damaged
            .iter()
            .map(|(key, damage)| DamagedRecord {
                key: display_key(key),
                reason: damage.as_str(),
            })
            .collect(),
        quarantined: count_quarantined(&db),
        dead_letters: inner
            .dead_letters
            .lock()
            .values()
            .map(|(events, _)| events)
            .sum(),
        cursors: consumers
            .into_iter()
            .map(|c| (c.to_string(), inner.acks.cursor(c)))
            .collect(),
    })
}

/// Repairs a stopped buffer: RocksDB's repairer for damaged files, then every damaged record
/// to the quarantine. Returns how many records were quarantined.
pub fn repair(options: BufferOptions) -> Result<u64, BufferError> {
    if !check_directory(&options.dir)? {
        return Err(BufferError::NotABuffer {
            dir: options.dir.clone(),
            found: "nothing: the directory is missing or empty".into(),
        });
    }
    let (db_opts, _) = db_options(&options.budget, options.profile, None)?;
    DB::repair(&db_opts, &options.dir).map_err(|source| BufferError::Open {
        dir: options.dir.clone(),
        source,
    })?;
    let db = open_db(&options, None)?;
    let (_, _, damaged) = scan_log(&db)?;
    let moved = quarantine(&db, &damaged, &Metrics::new())?;
    if options.durability == Durability::Sync {
        db.flush_wal(true)?;
    }
    Ok(moved)
}
