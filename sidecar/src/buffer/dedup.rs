//! The dedup index: `(source, id)` → first-seen time. An entry older than the window, or than
//! the eviction cutoff (see [`super::space`]), is ignored on lookup and removed by a compaction
//! filter; the space keeper runs those compactions, so removal does not wait for RocksDB to
//! compact by chance.

use std::ffi::CStr;

use rocksdb::compaction_filter::{CompactionFilter, Decision};
use rocksdb::compaction_filter_factory::{CompactionFilterContext, CompactionFilterFactory};
use rocksdb::{BlockBasedOptions, DB, DBCompactionStyle, DBCompressionType, Options};

use super::budget::Memory;
use super::codec::{DedupKeys, u64_value};
use super::open::{CF_DEDUP, cf};
use super::space::{DedupFilter, Removal};
use super::{BufferError, now_ms};
use crate::event::Event;

/// The memtable filter's share of the memtable: a key with its timestamp and RocksDB's entry
/// overhead takes about 60 bytes, so 2 % of them is about 10 bits a key.
const MEMTABLE_BLOOM_RATIO: f64 = 0.02;

/// Column family options of the index; without a filter (read-only opens, checks) nothing is
/// removed.
pub(super) fn options(
    filter: Option<&DedupFilter>,
    table: &BlockBasedOptions,
    memory: &Memory,
) -> Options {
    let mut dedup = Options::default();
    dedup.set_write_buffer_size(memory.dedup_write_buffer as usize);
    // Nearly every lookup is of a new event and misses: a bloom filter over each memtable's keys
    // (about 10 bits a key) answers most of those without searching the memtable's skiplist.
    dedup.set_memtable_whole_key_filtering(true);
    dedup.set_memtable_prefix_bloom_ratio(MEMTABLE_BLOOM_RATIO);
    // A compaction holds every key's hash of the file it writes until the file's filter is
    // built: the file size bounds that memory.
    dedup.set_target_file_size_base(memory.dedup_file_size);
    dedup.set_compression_type(DBCompressionType::Lz4);
    // Keys arrive in no order and are never rewritten, so under leveled compaction every flush's
    // keys overlap the whole last level, and each merge into it rewrote the entire index (a
    // fifth of the CPU under load in `make bench-peers`). Universal compaction merges sorted runs
    // of similar size instead: an entry is rewritten about log(index / memtable) times. Lookups
    // check a few more runs, each behind its bloom filter. An index a leveled build wrote opens
    // as it is: each of its levels is one of the sorted runs.
    dedup.set_compaction_style(DBCompactionStyle::Universal);
    dedup.set_block_based_table_factory(table);
    if let Some(filter) = filter.filter(|f| f.window_ms > 0).cloned() {
        let window_s = filter.window_ms / 1000;
        dedup.set_compaction_filter_factory(ExpiryFactory(filter));
        // A backstop for the space keeper's compactions: every file is rewritten at least once
        // a window.
        dedup.set_periodic_compaction_seconds(window_s.max(60));
    }
    dedup
}

/// Makes the filter of each compaction of the index.
struct ExpiryFactory(DedupFilter);

impl CompactionFilterFactory for ExpiryFactory {
    type Filter = Expiry;

    fn create(&mut self, _context: CompactionFilterContext) -> Expiry {
        Expiry {
            filter: self.0.clone(),
            now: now_ms(),
            expired: 0,
            evicted: 0,
        }
    }

    fn name(&self) -> &CStr {
        c"dedup-expiry"
    }
}

/// Removes the entries one compaction finds expired or evicted. It reads the clock once, when
/// the compaction starts (per entry, that was a tenth of the compactions' time): an entry that
/// expires while it runs goes in the next one, and lookups judge entries by their own time.
/// Its counts reach the metrics when the compaction is done.
struct Expiry {
    filter: DedupFilter,
    now: u64,
    expired: u64,
    evicted: u64,
}

impl CompactionFilter for Expiry {
    fn filter(&mut self, _level: u32, _key: &[u8], value: &[u8]) -> Decision {
        match self.filter.keeps(u64_value(value), self.now) {
            Ok(()) => Decision::Keep,
            Err(Removal::Expired) => {
                self.expired += 1;
                Decision::Remove
            }
            Err(Removal::Evicted) => {
                self.evicted += 1;
                Decision::Remove
            }
        }
    }

    fn name(&self) -> &CStr {
        c"dedup-expiry"
    }
}

impl Drop for Expiry {
    fn drop(&mut self) {
        self.filter.expired.inc_by(self.expired);
        self.filter.evicted.inc_by(self.evicted);
    }
}

/// The dedup keys of a list of events, whether each was stored within the window, and where
/// each repeats an earlier one of the list. Whether a repeat is a duplicate is the caller's to
/// decide: it depends on whether the request of the earlier one is stored.
pub(super) struct Seen {
    /// Every key, one after the other; key `i` ends at `ends[i]`.
    keys: Vec<u8>,
    ends: Vec<usize>,
    pub stored: Vec<bool>,
    /// For key `i`, the nearest earlier key of the list that is the same, if any.
    pub earlier: Vec<Option<usize>>,
}

impl Seen {
    /// The key of event `i`.
    pub fn key(&self, i: usize) -> &[u8] {
        let start = i.checked_sub(1).map_or(0, |before| self.ends[before]);
        &self.keys[start..self.ends[i]]
    }
}

/// Looks every event up in one multi-get; a window of 0 means dedup is off.
pub(super) fn lookup<'a>(
    db: &DB,
    events: impl Iterator<Item = &'a Event>,
    keys: DedupKeys,
    filter: &DedupFilter,
    now: u64,
) -> Result<Seen, BufferError> {
    let mut seen = Seen {
        keys: Vec::new(),
        ends: Vec::new(),
        stored: Vec::new(),
        earlier: Vec::new(),
    };
    if filter.window_ms == 0 {
        return Ok(seen);
    }
    let dedup_cf = cf(db, CF_DEDUP)?;
    for event in events {
        keys.push(&mut seen.keys, event.source(), event.id());
        seen.ends.push(seen.keys.len());
    }
    let count = seen.ends.len();
    // Sorted here, where the keys are plain byte strings, rather than by RocksDB through its
    // comparator (a group's keys mostly come in sorted runs, which this sort takes in one
    // pass); sorting also puts repeats next to each other, earliest first.
    let mut order: Vec<usize> = (0..count).collect();
    order.sort_unstable_by(|&a, &b| seen.key(a).cmp(seen.key(b)).then(a.cmp(&b)));
    seen.earlier = vec![None; count];
    for pair in order.windows(2) {
        if seen.key(pair[0]) == seen.key(pair[1]) {
            seen.earlier[pair[1]] = Some(pair[0]);
        }
    }
    // One column family: RocksDB's batched form, which looks the keys up level by level
    // together and pins the (rare) values found instead of copying them.
    let found = db.batched_multi_get_cf(dedup_cf, order.iter().map(|&i| seen.key(i)), true);
    seen.stored = vec![false; count];
    for (&i, result) in order.iter().zip(found) {
        seen.stored[i] = result?.is_some_and(|v| filter.keeps(u64_value(&v), now).is_ok());
    }
    Ok(seen)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::super::codec::DEDUP_KEYS_KEY;
    use super::super::open::CF_META;
    use super::super::space::{Compaction, run_compactor};
    use super::super::{Budget, BufferOptions, DurableBuffer, now_ms};
    use super::*;
    use crate::config::{BufferProfile, Durability, WhenFull};
    use crate::metrics::Metrics;

    const WINDOW_MS: u64 = 1000;

    fn event(i: usize) -> Event {
        Event::new(
            format!(r#"{{"id":"e{i}","source":"expiry"}}"#),
            "expiry",
            &format!("e{i}"),
        )
    }

    fn options(dir: &std::path::Path, window_ms: u64) -> BufferOptions {
        BufferOptions {
            dir: dir.join("data"),
            durability: Durability::Sync,
            budget: Budget::new(1 << 30, None, None).expect("valid budget"),
            when_full: WhenFull::Reject,
            profile: BufferProfile::Sidecar,
            dedup_window_ms: window_ms,
            outputs: vec!["up".into()],
            shared: false,
            max_lag: Vec::new(),
            dead_letter_max_age_ms: 0,
        }
    }

    /// A buffer created before dedup keys were hashed has no `dedup_keys` meta key. It goes on
    /// spelling them out, so the entries its index holds still catch repeats after an upgrade;
    /// a spelling this build does not know refuses to open, naming it.
    #[test]
    fn a_buffer_keeps_the_dedup_keys_it_was_created_with() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let hour = 3_600_000;
        let metrics = Arc::new(Metrics::new());
        let (buffer, writer) =
            DurableBuffer::open(options(tmp.path(), hour), metrics.clone()).expect("open");
        assert_eq!(
            buffer.inner.dedup_keys,
            DedupKeys::SourceHash,
            "a new buffer"
        );
        {
            // What an earlier release left: no meta key, and an entry spelled out for e1.
            let db = buffer.inner.db().expect("db");
            db.delete_cf(cf(&db, CF_META).expect("meta"), DEDUP_KEYS_KEY)
                .expect("delete");
            let mut e1 = Vec::new();
            DedupKeys::Spelled.push(&mut e1, "expiry", "e1");
            db.put_cf(
                cf(&db, CF_DEDUP).expect("index"),
                e1,
                now_ms().to_be_bytes(),
            )
            .expect("put");
        }
        drop(buffer);
        writer.join();

        let (buffer, writer) =
            DurableBuffer::open(options(tmp.path(), hour), metrics.clone()).expect("reopen");
        assert_eq!(buffer.inner.dedup_keys, DedupKeys::Spelled);
        let appended = rt
            .block_on(buffer.append(vec![event(1), event(2)]))
            .expect("append");
        assert_eq!(
            (appended.stored, appended.duplicates),
            (1, 1),
            "e1 is a repeat"
        );
        {
            let db = buffer.inner.db().expect("db");
            db.put_cf(
                cf(&db, CF_META).expect("meta"),
                DEDUP_KEYS_KEY,
                b"source-md5",
            )
            .expect("put");
        }
        drop(buffer);
        writer.join();

        let refused = DurableBuffer::open(options(tmp.path(), hour), metrics)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            refused.contains("dedup keys spelled \"source-md5\""),
            "{refused}"
        );
    }

    /// An entry older than the window stops counting at once, and the space keeper's compaction
    /// of the index (the one it runs every eighth of the window) removes it and counts it as
    /// expired, while an entry still inside the window stays.
    #[test]
    fn expired_entries_are_compacted_away_and_counted() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let options = options(tmp.path(), WINDOW_MS);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let metrics = Arc::new(Metrics::new());
        let (buffer, writer) = DurableBuffer::open(options, metrics.clone()).expect("open");
        let first = rt
            .block_on(buffer.append((0..100).map(event).collect()))
            .expect("append");
        assert_eq!((first.stored, first.duplicates), (100, 0));
        // The entries were stamped before the append returned.
        let stamped_by = now_ms();

        // Polling the clock itself: the entries must be older than the window.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while now_ms() <= stamped_by + WINDOW_MS {
            assert!(
                std::time::Instant::now() < deadline,
                "the clock did not move"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        // e99 again: no longer a duplicate, and its new entry is inside the window.
        let again = rt.block_on(buffer.append(vec![event(99)])).expect("append");
        assert_eq!((again.stored, again.duplicates), (1, 0));

        let (jobs, compactor_rx) = std::sync::mpsc::channel();
        let inner = buffer.inner.clone();
        let compactor = std::thread::spawn(move || run_compactor(inner, compactor_rx));
        jobs.send(Compaction::Dedup).expect("compactor running");
        drop(jobs);
        compactor.join().expect("compactor");

        let db = buffer.inner.db().expect("db");
        let index = cf(&db, CF_DEDUP).expect("dedup column family");
        let left: Vec<Box<[u8]>> = db
            .iterator_cf(index, rocksdb::IteratorMode::Start)
            .map(|entry| entry.expect("read the index").0)
            .collect();
        let mut e99 = Vec::new();
        buffer.inner.dedup_keys.push(&mut e99, "expiry", "e99");
        assert_eq!(
            left,
            vec![e99.into_boxed_slice()],
            "only e99's new entry is left"
        );
        // e0 to e98 expired; e99's first entry was replaced by its second, not expired.
        let exposition = metrics.encode();
        assert!(
            exposition.contains("tally_dedup_entries_removed_total{reason=\"expired\"} 99"),
            "{exposition}"
        );
        drop(db);
        drop(buffer);
        writer.join();
    }
}
