//! How `buffer.maxBytes` is shared out over the data directory, and how RocksDB is sized to stay
//! inside it.
//!
//! `maxBytes` bounds everything the buffer keeps on disk. It is split into four parts:
//! - **dead letters**: `deadLetter.maxBytes` (default an eighth), enforced by the store's
//!   retention;
//! - **dedup index**: `dedup.maxBytes` (default an eighth); when the index grows past it, its
//!   oldest entries are evicted before their window ends (counted, and the effective window is
//!   a gauge);
//! - **overhead**: the write-ahead log, RocksDB's own files (MANIFEST, LOG, OPTIONS) and room
//!   for a compaction's output before its inputs are deleted: an eighth, at least
//!   [`MIN_OVERHEAD`];
//! - **events**: the rest, counted as the stored records' bytes before compression.
//!
//! On top of the parts, the data directory itself is measured (allocated blocks, what the
//! kubelet's emptyDir accounting sees): while it is over `maxBytes`, ingest is refused and
//! space is reclaimed by compaction, so a mis-estimate cannot grow the directory unbounded.

use crate::config::BufferProfile;

/// The smallest `buffer.maxBytes` a buffer runs with.
pub const MIN_MAX_BYTES: u64 = 16 << 20;
/// The least room kept for the WAL and RocksDB's own files.
const MIN_OVERHEAD: u64 = 4 << 20;
/// The most the WAL may hold before RocksDB flushes memtables to let it go.
const MAX_WAL: u64 = 64 << 20;
/// The largest memtable of the events.
const MAX_EVENTS_WRITE_BUFFER: u64 = 32 << 20;

/// The parts of `buffer.maxBytes`, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    pub total: u64,
    pub events: u64,
    pub dedup: u64,
    pub dead_letters: u64,
    pub overhead: u64,
}

impl Budget {
    /// Splits `total`; `dead_letters` and `dedup` default to an eighth each. Fails, naming the
    /// key to change, when `total` is below the minimum or a part is 0 or over a quarter.
    pub fn new(
        total: u64,
        dead_letters: Option<u64>,
        dedup: Option<u64>,
    ) -> Result<Budget, (&'static str, String)> {
        if total < MIN_MAX_BYTES {
            return Err((
                "buffer.maxBytes",
                format!(
                    "{total} bytes is too small: the data directory needs at least 16Mi for the write-ahead log and RocksDB's own files"
                ),
            ));
        }
        let dead_letters = dead_letters.unwrap_or(total / 8);
        let dedup = dedup.unwrap_or(total / 8);
        for (key, part) in [
            ("deadLetter.maxBytes", dead_letters),
            ("dedup.maxBytes", dedup),
        ] {
            if part == 0 {
                return Err((
                    key,
                    format!(
                        "must be more than 0: it is the part of buffer.maxBytes ({total} bytes) this store may use"
                    ),
                ));
            }
            if part > total / 4 {
                return Err((
                    key,
                    format!(
                        "{part} bytes is more than a quarter of buffer.maxBytes ({total} bytes), which bounds the whole data directory; lower it or raise buffer.maxBytes"
                    ),
                ));
            }
        }
        Ok(Budget::split(total, dead_letters, dedup))
    }

    /// The budget of options that bypassed the configuration's checks (tests, tools): `total`
    /// raised to the minimum, each part between 1 byte and a quarter.
    pub fn lenient(total: u64, dead_letters: u64, dedup: u64) -> Budget {
        let total = total.max(MIN_MAX_BYTES);
        Budget::split(
            total,
            dead_letters.clamp(1, total / 4),
            dedup.clamp(1, total / 4),
        )
    }

    /// Splits `total` given parts that leave the events at least a quarter of it.
    fn split(total: u64, dead_letters: u64, dedup: u64) -> Budget {
        let overhead = (total / 8).max(MIN_OVERHEAD);
        Budget {
            total,
            events: total - overhead - dead_letters - dedup,
            dedup,
            dead_letters,
            overhead,
        }
    }

    /// The most the write-ahead log may hold: a quarter of the overhead.
    pub fn max_wal(&self) -> u64 {
        (self.overhead / 4).clamp(1 << 20, MAX_WAL)
    }

    /// The events' memtable size: half the WAL bound, so a memtable never holds the WAL past it.
    pub fn events_write_buffer(&self) -> u64 {
        (self.max_wal() / 2).clamp(1 << 20, MAX_EVENTS_WRITE_BUFFER)
    }

    /// The dedup index's memtable size.
    pub fn dedup_write_buffer(&self) -> u64 {
        (self.dedup / 8).clamp(1 << 20, 8 << 20)
    }

    /// RocksDB's memory under `profile`. Each column family keeps at most two memtables (the
    /// one written and the one being flushed).
    pub fn memory(&self, profile: BufferProfile) -> Memory {
        match profile {
            BufferProfile::Collector => Memory {
                events_write_buffer: self.events_write_buffer(),
                dedup_write_buffer: self.dedup_write_buffer(),
                dedup_file_size: 16 << 20,
                small_write_buffer: 1 << 20,
                compaction_readahead: 2 << 20,
                block_cache: 8 << 20,
                index_and_filters_in_cache: false,
            },
            BufferProfile::Sidecar => Memory {
                events_write_buffer: self.events_write_buffer().min(SIDECAR_EVENTS_WRITE_BUFFER),
                dedup_write_buffer: self.dedup_write_buffer().min(SIDECAR_DEDUP_WRITE_BUFFER),
                dedup_file_size: 2 << 20,
                small_write_buffer: 256 << 10,
                compaction_readahead: 256 << 10,
                block_cache: 1 << 20,
                index_and_filters_in_cache: true,
            },
        }
    }
}

/// The events' largest memtable under the `sidecar` profile.
const SIDECAR_EVENTS_WRITE_BUFFER: u64 = 4 << 20;
/// The dedup index's largest memtable under the `sidecar` profile: every event adds an entry,
/// and each flush of the index is followed by compactions that merge it into the older files,
/// so a smaller one costs more CPU per event (at 1 MiB, a tenth more than at 4 MiB in `make
/// bench-peers`).
const SIDECAR_DEDUP_WRITE_BUFFER: u64 = 4 << 20;

/// RocksDB's memory sizes, in bytes; see [`Budget::memory`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Memory {
    pub events_write_buffer: u64,
    pub dedup_write_buffer: u64,
    /// The dedup index's largest file: a compaction holds 8 bytes per key of the file it
    /// writes (for its filter), so this bounds that.
    pub dedup_file_size: u64,
    /// The memtable of the cursors, dead letters and quarantine.
    pub small_write_buffer: u64,
    /// What a compaction reads ahead of each input file (RocksDB's default is 2 MiB).
    pub compaction_readahead: u64,
    /// Shared by every column family.
    pub block_cache: u64,
    /// Files' index and filter blocks live in the block cache, bounded by it, rather than in
    /// memory beside it for as long as the file is open.
    pub index_and_filters_in_cache: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    const MI: u64 = 1 << 20;

    #[test]
    fn the_parts_add_up_to_max_bytes() {
        for total in [16 * MI, 96 * MI, 1024 * MI, 64 * 1024 * MI] {
            let b = Budget::new(total, None, None).expect("valid");
            assert_eq!(b.events + b.dedup + b.dead_letters + b.overhead, total);
            assert!(b.events >= total / 4, "{b:?}");
            assert!(b.max_wal() * 2 <= b.overhead, "{b:?}");
            assert!(b.events_write_buffer() <= b.max_wal(), "{b:?}");
        }
    }

    #[test]
    fn parts_that_leave_too_little_name_their_key() {
        assert_eq!(
            Budget::new(8 * MI, None, None).map_err(|e| e.0),
            Err("buffer.maxBytes")
        );
        assert_eq!(
            Budget::new(64 * MI, Some(32 * MI), None).map_err(|e| e.0),
            Err("deadLetter.maxBytes")
        );
        assert_eq!(
            Budget::new(64 * MI, None, Some(0)).map_err(|e| e.0),
            Err("dedup.maxBytes")
        );
        let b = Budget::new(64 * MI, Some(16 * MI), Some(MI)).expect("valid");
        assert_eq!(b.events, 64 * MI - 8 * MI - 16 * MI - MI);
    }

    #[test]
    fn lenient_options_still_get_a_working_budget() {
        let b = Budget::lenient(64 << 10, 0, 0);
        assert_eq!(b.total, MIN_MAX_BYTES);
        assert!(b.events > 0 && b.dead_letters > 0 && b.dedup > 0);
    }
}
