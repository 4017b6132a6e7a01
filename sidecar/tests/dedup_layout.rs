//! The dedup index moved from leveled to universal compaction. A data directory whose index an
//! earlier build compacted (its files in the last level, as leveled compaction leaves them)
//! opens as it is: every entry is still found, and new entries are added beside it.
//!
//! The earlier build's layout is made by compacting the index with RocksDB's default (leveled)
//! options directly, as that build did.

use std::path::Path;
use std::sync::Arc;

use tally_sidecar::buffer::{BufferOptions, DurableBuffer};
use tally_sidecar::event::Event;
use tally_sidecar::metrics::Metrics;

mod common;

fn options(dir: &Path) -> BufferOptions {
    common::options(dir, 24 * 3600 * 1000)
}

fn events(range: std::ops::Range<u32>) -> Vec<Event> {
    range
        .map(|i| common::event("layout", &format!("e{i}")))
        .collect()
}

#[test]
fn an_index_compacted_by_leveled_compaction_still_deduplicates() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("data");
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");

    let (buffer, writer) =
        DurableBuffer::open(options(&dir), Arc::new(Metrics::new())).expect("open");
    let first = rt.block_on(buffer.append(events(0..5000))).expect("append");
    assert_eq!(first.stored, 5000);
    drop(buffer);
    writer.join();

    {
        let cfs = rocksdb::DB::list_cf(&rocksdb::Options::default(), &dir).expect("list");
        let db = rocksdb::DB::open_cf(&rocksdb::Options::default(), &dir, &cfs).expect("open raw");
        let dedup = db.cf_handle("dedup").expect("dedup column family");
        let mut compact = rocksdb::CompactOptions::default();
        compact.set_bottommost_level_compaction(rocksdb::BottommostLevelCompaction::Force);
        db.compact_range_cf_opt(dedup, None::<&[u8]>, None::<&[u8]>, &compact);
        let at = |level: u32| {
            db.property_int_value_cf(dedup, &format!("rocksdb.num-files-at-level{level}"))
                .expect("property")
                .expect("a level's file count")
        };
        assert_eq!(at(0), 0, "the index left level 0");
        assert!(at(6) > 0, "the index is in the last level");
    }

    let (buffer, writer) =
        DurableBuffer::open(options(&dir), Arc::new(Metrics::new())).expect("reopen");
    let again = rt
        .block_on(buffer.append(events(4000..6000)))
        .expect("append");
    assert_eq!(
        (again.duplicates, again.stored),
        (1000, 1000),
        "e4000..e4999 are found in the compacted index; e5000..e5999 are new"
    );
    let third = rt
        .block_on(buffer.append(events(5500..6500)))
        .expect("append");
    assert_eq!((third.duplicates, third.stored), (500, 500));
    drop(buffer);
    writer.join();
}
