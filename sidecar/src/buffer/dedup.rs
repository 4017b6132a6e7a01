//! The dedup index: `(source, id)` → first-seen time. An entry older than the window is ignored
//! on lookup and removed by a compaction filter; periodic compaction makes that removal happen
//! within about one window even when nothing else triggers a compaction.

use rocksdb::{BlockBasedOptions, DB, DBCompressionType, Options, compaction_filter::Decision};

use super::codec::{dedup_key, u64_value};
use super::open::{CF_DEDUP, cf};
use super::{BufferError, now_ms};
use crate::event::Event;

/// Column family options of the index.
pub(super) fn options(window_ms: u64, table: &BlockBasedOptions, write_buffer: usize) -> Options {
    let mut dedup = Options::default();
    dedup.set_write_buffer_size(write_buffer);
    dedup.set_compression_type(DBCompressionType::Lz4);
    dedup.set_block_based_table_factory(table);
    if window_ms > 0 {
        dedup.set_compaction_filter("dedup-expiry", move |_level, _key, value| {
            if now_ms().saturating_sub(u64_value(value)) > window_ms {
                Decision::Remove
            } else {
                Decision::Keep
            }
        });
        // Every file is rewritten (and its expired entries dropped) at least once a window.
        dedup.set_periodic_compaction_seconds((window_ms / 1000).max(60));
    }
    dedup
}

/// The dedup keys of a list of events and whether each was stored within the window. Repeats
/// inside the list are the caller's to find: whether the first one counts depends on whether
/// its request is stored.
pub(super) struct Seen {
    pub keys: Vec<Vec<u8>>,
    pub stored: Vec<bool>,
}

/// Looks every event up in one multi-get; `window_ms` 0 means dedup is off.
pub(super) fn lookup<'a>(
    db: &DB,
    events: impl Iterator<Item = &'a Event>,
    window_ms: u64,
    now: u64,
) -> Result<Seen, BufferError> {
    if window_ms == 0 {
        return Ok(Seen {
            keys: Vec::new(),
            stored: Vec::new(),
        });
    }
    let dedup_cf = cf(db, CF_DEDUP)?;
    let keys: Vec<Vec<u8>> = events.map(|e| dedup_key(&e.source, &e.id)).collect();
    let stored: Vec<bool> = db
        .multi_get_cf(keys.iter().map(|k| (dedup_cf, k.as_slice())))
        .into_iter()
        .map(|r| r.map(|v| v.is_some_and(|v| now.saturating_sub(u64_value(&v)) <= window_ms)))
        .collect::<Result<_, _>>()?;
    Ok(Seen { keys, stored })
}
