//! A damaged record never needs a human: `tally-sidecar buffer check` (the real binary) finds
//! and names it with exit code 3, the next open moves it to the quarantine and counts it, every
//! other event is still read, and `buffer check` is clean again.
//!
//! The damage is made the way a bad disk or a stray tool would: the stored bytes of two records
//! are changed directly in RocksDB, one in its content (checksum) and one in its header.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use tally_sidecar::buffer::{BufferOptions, DurableBuffer};
use tally_sidecar::event::Event;
use tally_sidecar::metrics::Metrics;

mod common;

fn options(dir: &Path) -> BufferOptions {
    common::options(dir, 0)
}

fn event(id: &str) -> Event {
    common::event("quarantine", id)
}

/// Rewrites the stored value of event `seq` with `damage` applied.
fn damage(dir: &Path, seq: u64, damage: impl FnOnce(&mut Vec<u8>)) {
    let cfs =
        rocksdb::DB::list_cf(&rocksdb::Options::default(), dir).expect("list column families");
    let db = rocksdb::DB::open_cf(&rocksdb::Options::default(), dir, &cfs).expect("open raw");
    let events = db.cf_handle("events").expect("events column family");
    let key = seq.to_be_bytes();
    let mut value = db
        .get_cf(events, key)
        .expect("get")
        .expect("the record exists");
    damage(&mut value);
    let mut write = rocksdb::WriteOptions::default();
    write.set_sync(true);
    db.put_cf_opt(events, key, value, &write).expect("put");
}

fn check(config: &Path) -> (i32, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_tally-sidecar"))
        .arg("--config")
        .arg(config)
        .args(["buffer", "check"])
        .output()
        .expect("run tally-sidecar buffer check");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

#[test]
fn damaged_records_are_found_quarantined_and_the_rest_flows() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("data");
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let (buffer, writer) =
        DurableBuffer::open(options(&dir), Arc::new(Metrics::new())).expect("open");
    rt.block_on(buffer.append((1..=20).map(|i| event(&format!("q{i}"))).collect()))
        .expect("append");
    drop(buffer);
    writer.join();

    // Sequence 5: one content byte flipped. Sequence 9: an unknown record version.
    damage(&dir, 5, |value| {
        let last = value.len() - 3;
        value[last] ^= 0x01;
    });
    damage(&dir, 9, |value| value[0] = 0x7f);

    let config = tmp.path().join("tally.yaml");
    std::fs::write(
        &config,
        format!(
            "dataDir: {}\ndedup: {{ window: 0s }}\noutputs:\n  targets:\n    - name: up\n      type: stdout\n",
            dir.display()
        ),
    )
    .expect("write config");
    let (code, report) = check(&config);
    assert_eq!(code, 3, "damaged records found: exit 3\n{report}");
    assert!(
        report.contains("damaged record events/5: bad_checksum"),
        "{report}"
    );
    assert!(
        report.contains("damaged record events/9: bad_header"),
        "{report}"
    );

    // The next open quarantines them, counts them, and reads everything else.
    let metrics = Arc::new(Metrics::new());
    let (buffer, writer) = DurableBuffer::open(options(&dir), metrics.clone())
        .expect("open never fails for bad records");
    assert_eq!(buffer.stats().quarantined, 2);
    let exposition = metrics.encode();
    assert!(
        exposition.contains("tally_buffer_quarantined_total{reason=\"bad_checksum\"} 1"),
        "{exposition}"
    );
    assert!(
        exposition.contains("tally_buffer_quarantined_total{reason=\"bad_header\"} 1"),
        "{exposition}"
    );
    let read = buffer
        .read("up", 0, u64::MAX, 100, usize::MAX)
        .expect("read");
    let ids: Vec<String> = read
        .records
        .iter()
        .map(|r| {
            let value: serde_json::Value = serde_json::from_slice(&r.json).expect("stored JSON");
            value["id"].as_str().expect("id").to_string()
        })
        .collect();
    let expected: Vec<String> = (1..=20)
        .filter(|i| *i != 5 && *i != 9)
        .map(|i| format!("q{i}"))
        .collect();
    assert_eq!(ids, expected, "every undamaged event flows, in order");
    drop(buffer);
    writer.join();

    let (code, report) = check(&config);
    assert_eq!(code, 0, "clean after the quarantine\n{report}");
    assert!(report.contains("quarantined:     2"), "{report}");
}
