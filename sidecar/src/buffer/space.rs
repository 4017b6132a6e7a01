//! Keeping the data directory inside `buffer.maxBytes` (see [`super::budget`]).
//!
//! - The directory is measured (allocated blocks of its files) at every maintenance; while it is
//!   over `maxBytes`, ingest is refused and reclaiming is asked for.
//! - The dedup index forgets entries older than the window by a compaction that runs at least
//!   every eighth of the window, not when RocksDB happens to compact. When the index outgrows
//!   its part, the oldest entries are evicted early: a cutoff time is raised until the entries
//!   newer than it fit in half the part (estimated from a per-minute count of insertions), and
//!   the index is compacted. Lookups ignore entries older than the cutoff at once.
//! - What trimming deleted from the log stays on disk until a compaction; once enough has been
//!   deleted, the deleted range is compacted away; so is what the dead-letter retention deleted.
//!
//! Compactions run on their own thread ([`run_compactor`]), so neither ingest nor delivery
//! waits for them.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, mpsc};

use parking_lot::Mutex;
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use rocksdb::{BottommostLevelCompaction, CompactOptions, DB, IteratorMode};

use super::budget::Budget;
use super::codec::{seq_key, u64_value};
use super::open::{CF_DEAD_LETTER, CF_DEDUP, CF_EVENTS, cf};
use super::{BufferError, Inner, now_ms};
use crate::metrics::{BudgetPart, DedupRemoval, Metrics};

/// The resolution of the newest dedup insertion counts, and how many counts are kept at most
/// (past it, the older half's neighbours are merged: old entries are counted more coarsely).
const SLOT_MS: u64 = 10;
const MAX_SLOTS: usize = 4096;
/// The shortest time between two expiry compactions of the dedup index.
const MIN_EXPIRY_GAP: Duration = Duration::from_secs(60);

/// What the dedup index's compaction filter needs: the window, the eviction cutoff, and the
/// counters of what it removes.
#[derive(Clone)]
pub(super) struct DedupFilter {
    pub window_ms: u64,
    /// Entries first seen before this time (ms) are evicted; 0 until the index outgrows its part.
    pub cutoff_ms: Arc<AtomicU64>,
    pub expired: Counter,
    pub evicted: Counter,
}

impl DedupFilter {
    /// Whether an entry first seen at `seen_ms` still counts, and if not, why.
    pub fn keeps(&self, seen_ms: u64, now: u64) -> Result<(), Removal> {
        if now.saturating_sub(seen_ms) > self.window_ms {
            Err(Removal::Expired)
        } else if seen_ms < self.cutoff_ms.load(Ordering::Relaxed) {
            Err(Removal::Evicted)
        } else {
            Ok(())
        }
    }
}

/// Why a dedup entry is removed.
pub(super) enum Removal {
    Expired,
    Evicted,
}

/// A compaction for the compactor thread.
pub(super) enum Compaction {
    /// The log up to and including this sequence number: all of it deleted.
    Events { through: u64 },
    /// The whole dedup index, to apply expiry and eviction.
    Dedup,
    /// The whole dead-letter store, to reclaim what its retention deleted.
    DeadLetters,
}

/// The space keeper's state, shared by the writer and the compactor.
pub(super) struct Space {
    dir: PathBuf,
    budget: Budget,
    pub filter: DedupFilter,
    /// The data directory's size at the last measurement.
    disk_bytes: AtomicU64,
    /// Whether the directory was over `maxBytes` at the last measurement.
    over: AtomicBool,
    /// Dedup entries inserted: (start of the slot in ms, count), oldest first.
    inserted: Mutex<Slots>,
    /// Bytes deleted from the log since the last compaction of the deleted range, and the
    /// highest sequence number deleted.
    trimmed_bytes: AtomicU64,
    trimmed_through: AtomicU64,
    /// Bytes of dead letters the retention deleted since the store was last compacted.
    dead_letters_deleted: AtomicU64,
    last_expiry: Mutex<Instant>,
    /// Set while a compaction of the dedup index is asked for and not finished: its size only
    /// drops once it is done.
    dedup_compacting: AtomicBool,
    metrics: Arc<Metrics>,
}

impl Space {
    pub fn new(dir: &Path, budget: Budget, window_ms: u64, metrics: Arc<Metrics>) -> Space {
        // One statement each: a family's guard must be dropped before it is asked again.
        let expired = metrics
            .dedup_removed
            .get_or_create(&metrics.removal(DedupRemoval::expired))
            .clone();
        let evicted = metrics
            .dedup_removed
            .get_or_create(&metrics.removal(DedupRemoval::evicted))
            .clone();
        let filter = DedupFilter {
            window_ms,
            cutoff_ms: Arc::new(AtomicU64::new(0)),
            expired,
            evicted,
        };
        metrics.buffer_max_bytes.set(budget.total as i64);
        let used = directory_bytes(dir);
        metrics.buffer_disk_bytes.set(used as i64);
        metrics.set_budget([
            (BudgetPart::events, budget.events),
            (BudgetPart::dedup, budget.dedup),
            (BudgetPart::dead_letters, budget.dead_letters),
            (BudgetPart::overhead, budget.overhead),
        ]);
        Space {
            dir: dir.to_path_buf(),
            budget,
            filter,
            disk_bytes: AtomicU64::new(used),
            over: AtomicBool::new(false),
            inserted: Mutex::new(Slots::default()),
            trimmed_bytes: AtomicU64::new(0),
            trimmed_through: AtomicU64::new(0),
            dead_letters_deleted: AtomicU64::new(0),
            last_expiry: Mutex::new(Instant::now()),
            dedup_compacting: AtomicBool::new(false),
            metrics,
        }
    }

    /// Whether the data directory was over `maxBytes` at the last measurement.
    pub fn over(&self) -> bool {
        self.over.load(Ordering::Relaxed)
    }

    /// The data directory's size at the last measurement (at open, then every maintenance).
    pub fn disk_bytes(&self) -> u64 {
        self.disk_bytes.load(Ordering::Relaxed)
    }

    /// Counts `count` dedup entries first seen at `now`.
    pub fn note_inserted(&self, now: u64, count: u64) {
        self.inserted.lock().add(now, count);
    }

    /// Rebuilds the insertion counts from the index, at open.
    pub fn rebuild_inserted(&self, db: &DB) -> Result<(), BufferError> {
        if self.filter.window_ms == 0 {
            return Ok(());
        }
        let mut seconds = std::collections::BTreeMap::<u64, u64>::new();
        for item in db.iterator_cf(cf(db, CF_DEDUP)?, IteratorMode::Start) {
            let (_, value) = item?;
            // Counted by second: entries from before a restart need no finer resolution.
            *seconds.entry(u64_value(&value) / 1000 * 1000).or_default() += 1;
        }
        let mut slots = Slots::default();
        for (at, count) in seconds {
            slots.add(at, count);
        }
        *self.inserted.lock() = slots;
        Ok(())
    }

    /// Notes that the log was deleted up to `through`, `bytes` of it.
    pub fn note_trimmed(&self, through: u64, bytes: u64) {
        self.trimmed_bytes.fetch_add(bytes, Ordering::Relaxed);
        self.trimmed_through.fetch_max(through, Ordering::Relaxed);
    }

    /// Notes that the dead-letter retention deleted `bytes`.
    pub fn note_dead_letters_deleted(&self, bytes: u64) {
        self.dead_letters_deleted
            .fetch_add(bytes, Ordering::Relaxed);
    }

    /// Measures the directory and decides what to reclaim; `live` is the bytes of the events
    /// still buffered.
    pub fn maintain(&self, db: &DB, live: u64) -> Vec<Compaction> {
        let mut wanted = Vec::new();
        let used = directory_bytes(&self.dir);
        self.disk_bytes.store(used, Ordering::Relaxed);
        self.metrics.buffer_disk_bytes.set(used as i64);
        let over = used > self.budget.total;
        if over && !self.over.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                used,
                max = self.budget.total,
                "the data directory is over buffer.maxBytes; refusing events and reclaiming space"
            );
        } else if !over && self.over.swap(false, Ordering::Relaxed) {
            tracing::info!(
                used,
                max = self.budget.total,
                "the data directory is back under buffer.maxBytes"
            );
        }
        // Deleted events that never left the memtable take no disk: compact only when the log's
        // files hold about an eighth of the events' part more than what is still buffered.
        let trimmed = self.trimmed_bytes.load(Ordering::Relaxed);
        let slack = self.budget.events / 8;
        if trimmed > 0 && (over || (trimmed >= slack && sst_bytes(db, CF_EVENTS) > live + slack)) {
            self.trimmed_bytes.store(0, Ordering::Relaxed);
            wanted.push(Compaction::Events {
                through: self.trimmed_through.load(Ordering::Relaxed),
            });
        }
        let deleted = self.dead_letters_deleted.load(Ordering::Relaxed);
        if deleted > 0 && (over || deleted >= self.budget.dead_letters / 4) {
            self.dead_letters_deleted.store(0, Ordering::Relaxed);
            wanted.push(Compaction::DeadLetters);
        }
        if self.filter.window_ms > 0
            && !self.dedup_compacting.load(Ordering::Relaxed)
            && self.dedup_wants_compaction(db, over)
        {
            self.dedup_compacting.store(true, Ordering::Relaxed);
            wanted.push(Compaction::Dedup);
        }
        let now = now_ms();
        let cutoff = self.filter.cutoff_ms.load(Ordering::Relaxed);
        let effective = self.filter.window_ms.min(now.saturating_sub(cutoff));
        self.metrics
            .dedup_window_seconds
            .set(effective as f64 / 1000.0);
        wanted
    }

    /// Raises the eviction cutoff when the index is over its part; asks for a compaction when it
    /// was raised, or when entries have outlived the window for an eighth of it.
    fn dedup_wants_compaction(&self, db: &DB, over: bool) -> bool {
        let size = sst_bytes(db, CF_DEDUP);
        self.metrics.dedup_bytes.set(size as i64);
        let now = now_ms();
        let floor = now
            .saturating_sub(self.filter.window_ms)
            .max(self.filter.cutoff_ms.load(Ordering::Relaxed));
        let mut inserted = self.inserted.lock();
        let stale = inserted.oldest().is_some_and(|at| at < floor);
        if size > self.budget.dedup * 3 / 4
            && let Some(new_cutoff) = inserted.evict_until(size, self.budget.dedup / 2)
        {
            self.filter
                .cutoff_ms
                .fetch_max(new_cutoff, Ordering::Relaxed);
            tracing::warn!(
                bytes = size,
                max = self.budget.dedup,
                remembered_seconds = now.saturating_sub(new_cutoff) as f64 / 1000.0,
                window_seconds = self.filter.window_ms / 1000,
                "the dedup index outgrew dedup.maxBytes; forgetting its oldest entries before their window ends"
            );
            *self.last_expiry.lock() = Instant::now();
            return true;
        }
        let gap = Duration::from_millis(self.filter.window_ms / 8).max(MIN_EXPIRY_GAP);
        let mut last = self.last_expiry.lock();
        if (stale || over) && last.elapsed() >= gap {
            inserted.forget_before(floor);
            *last = Instant::now();
            return true;
        }
        false
    }
}

/// Counts of dedup insertions by time, oldest first: (start of the slot in ms, count).
#[derive(Debug, Default)]
struct Slots {
    slots: VecDeque<(u64, u64)>,
}

impl Slots {
    fn add(&mut self, at: u64, count: u64) {
        if count == 0 {
            return;
        }
        let start = at - at % SLOT_MS;
        match self.slots.back_mut() {
            Some((s, n)) if *s >= start => *n += count,
            _ => {
                if self.slots.len() >= MAX_SLOTS {
                    self.halve();
                }
                self.slots.push_back((start, count));
            }
        }
    }

    /// Merges the neighbours of the older half: a quarter fewer slots, the newest unchanged.
    fn halve(&mut self) {
        let newer = self.slots.split_off(self.slots.len() / 2);
        let older = std::mem::take(&mut self.slots);
        let mut iter = older.into_iter();
        while let Some((start, count)) = iter.next() {
            let next = iter.next().map_or(0, |(_, n)| n);
            self.slots.push_back((start, count + next));
        }
        self.slots.extend(newer);
    }

    fn oldest(&self) -> Option<u64> {
        self.slots.front().map(|(start, _)| *start)
    }

    fn forget_before(&mut self, at: u64) {
        while self.slots.get(1).is_some_and(|(next, _)| *next <= at) {
            self.slots.pop_front();
        }
    }

    /// Drops the oldest slots (never the newest) until the entries left, at the average size
    /// per entry of an index of `size` bytes, fit in `target`; returns the new cutoff time.
    fn evict_until(&mut self, size: u64, target: u64) -> Option<u64> {
        let entries: u64 = self.slots.iter().map(|(_, n)| n).sum();
        let per_entry = size / entries.max(1);
        let mut remaining = entries;
        let mut cutoff = None;
        while self.slots.len() > 1 && remaining.saturating_mul(per_entry) > target {
            let Some((_, n)) = self.slots.pop_front() else {
                break;
            };
            remaining -= n;
            cutoff = self.slots.front().map(|(start, _)| *start);
        }
        cutoff
    }
}

/// The bytes of a column family's table files.
fn sst_bytes(db: &DB, name: &str) -> u64 {
    cf(db, name)
        .ok()
        .and_then(|c| {
            db.property_int_value_cf(c, "rocksdb.total-sst-files-size")
                .ok()
                .flatten()
        })
        .unwrap_or_default()
}

/// The bytes the files of `dir` occupy on disk (allocated blocks, as `du` and the kubelet's
/// emptyDir accounting count them; preallocated WAL space included).
fn directory_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.blocks() * 512)
        .sum()
}

/// Runs compactions until the writer drops its sender.
pub(super) fn run_compactor(inner: Arc<Inner>, rx: mpsc::Receiver<Compaction>) {
    while let Ok(first) = rx.recv() {
        let mut events_through = None;
        let (mut dedup, mut dead_letters) = (false, false);
        for job in std::iter::once(first).chain(rx.try_iter()) {
            match job {
                Compaction::Events { through } => {
                    events_through = events_through.max(Some(through));
                }
                Compaction::Dedup => dedup = true,
                Compaction::DeadLetters => dead_letters = true,
            }
        }
        let Ok(db) = inner.db() else {
            inner.space.dedup_compacting.store(false, Ordering::Relaxed);
            continue;
        };
        let mut options = CompactOptions::default();
        options.set_bottommost_level_compaction(BottommostLevelCompaction::Force);
        let started = Instant::now();
        if let (Some(through), Ok(events)) = (events_through, cf(&db, CF_EVENTS)) {
            db.compact_range_cf_opt(events, None::<&[u8]>, Some(seq_key(through + 1)), &options);
        }
        if let (true, Ok(index)) = (dedup, cf(&db, CF_DEDUP)) {
            db.compact_range_cf_opt(index, None::<&[u8]>, None::<&[u8]>, &options);
        }
        if dedup {
            inner.space.dedup_compacting.store(false, Ordering::Relaxed);
        }
        if let (true, Ok(store)) = (dead_letters, cf(&db, CF_DEAD_LETTER)) {
            db.compact_range_cf_opt(store, None::<&[u8]>, None::<&[u8]>, &options);
        }
        tracing::debug!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            events_through,
            dedup,
            dead_letters,
            "compacted what the buffer deleted"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eviction_keeps_the_newest_entries_that_fit() {
        let mut slots = Slots::default();
        for second in 0..10 {
            slots.add(1_000_000 + second * 1000 + 5, 100);
        }
        // 1000 entries of 10 bytes; keep at most 3000 bytes: the newest 3 seconds.
        assert_eq!(slots.evict_until(10_000, 3_000), Some(1_007_000));
        assert_eq!(slots.slots.len(), 3);
        // Never the newest slot, however small the target.
        assert_eq!(slots.evict_until(10_000, 0), Some(1_009_000));
        assert_eq!(slots.evict_until(10_000, 0), None);
    }

    #[test]
    fn slots_merge_instead_of_growing() {
        let mut slots = Slots::default();
        for second in 0..(MAX_SLOTS as u64 * 3) {
            slots.add(second * 1000, 1);
        }
        assert!(slots.slots.len() <= MAX_SLOTS);
        assert_eq!(
            slots.slots.iter().map(|(_, n)| n).sum::<u64>(),
            MAX_SLOTS as u64 * 3
        );
        slots.forget_before(MAX_SLOTS as u64 * 2 * 1000);
        assert!(
            slots
                .oldest()
                .is_some_and(|at| at <= MAX_SLOTS as u64 * 2 * 1000)
        );
    }
}
