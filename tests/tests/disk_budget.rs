//! `buffer.maxBytes` bounds the whole data directory, not only the events: measured the way the
//! kubelet measures an emptyDir (allocated blocks of every file), with incompressible events so
//! compression cannot hide an overrun. And the dedup index keeps to its part: past it, the
//! oldest entries are forgotten early and counted, the newest still deduplicate.

use std::time::Duration;

use rand::Rng;
use serde_json::{Value, json};
use tally_tests::disk::directory_bytes;
use tally_tests::events::{event, id_of};
use tally_tests::{Sidecar, TestUpstream, poll_until};

const MIB: u64 = 1024 * 1024;
/// The smallest `buffer.maxBytes`.
const MAX_BYTES: u64 = 16 * MIB;
/// Requests sent at most before the buffer must refuse (8Mi of events in ~400KB requests).
const MAX_REQUESTS: usize = 200;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// An event whose `data` carries `size` bytes of random hex, which LZ4 cannot shrink much.
fn incompressible_event(id: &str, size: usize) -> Value {
    let mut bytes = vec![0u8; size / 2];
    rand::rng().fill(&mut bytes[..]);
    let mut event = event(id);
    event["data"]["noise"] = Value::String(hex(&bytes));
    event
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_directory_stays_within_max_bytes_while_the_upstream_is_down() {
    let upstream = TestUpstream::start().await;
    upstream.down().await;
    let sidecar = Sidecar::builder()
        .openmeter_output("upstream", &upstream.url())
        .set(
            "buffer",
            json!({ "maxBytes": "16Mi", "whenFull": "reject" }),
        )
        .start()
        .await;

    let mut acked: Vec<String> = Vec::new();
    let mut peak = 0;
    let mut refused = false;
    for n in 0..MAX_REQUESTS {
        let events: Vec<Value> = (0..20)
            .map(|i| incompressible_event(&format!("du-{n}-{i}"), 20_000))
            .collect();
        let response = sidecar.post_events(&events).await;
        peak = peak.max(directory_bytes(sidecar.data_dir()));
        match response.status().as_u16() {
            204 => acked.extend(events.iter().map(|e| id_of(e).to_string())),
            503 => {
                refused = true;
                break;
            }
            other => panic!("request {n}: unexpected status {other}"),
        }
    }
    assert!(
        refused,
        "{MAX_REQUESTS} requests of ~400KB never filled a 16Mi buffer"
    );
    // The directory after the last acknowledged write, and once RocksDB has flushed.
    let metrics = sidecar.metrics().await;
    peak = peak.max(directory_bytes(sidecar.data_dir()));
    assert!(
        peak <= MAX_BYTES,
        "the data directory stays within buffer.maxBytes: peak {peak} bytes of {MAX_BYTES}"
    );
    assert!(
        metrics.value("tally_buffer_disk_bytes") <= MAX_BYTES as f64,
        "the sidecar measures its directory within maxBytes too: {}",
        metrics.value("tally_buffer_disk_bytes")
    );
    assert!(
        acked.len() >= 300,
        "most of the events' part (8Mi) was used before refusing: {} events of ~20KB",
        acked.len()
    );

    upstream.up().await;
    upstream
        .wait_delivered(acked.iter().map(String::as_str), Duration::from_secs(60))
        .await;
    // What delivery deleted is compacted away, not left on disk until RocksDB compacts by
    // chance.
    let filled = peak;
    poll_until(
        Duration::from_secs(60),
        "the data directory to shrink once its events were delivered",
        async || (directory_bytes(sidecar.data_dir()) < filled / 2).then_some(()),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dedup_index_at_its_part_forgets_its_oldest_entries_and_says_so() {
    let upstream = TestUpstream::start().await;
    let sidecar = Sidecar::builder()
        .openmeter_output("upstream", &upstream.url())
        .set("dedup", json!({ "window": "1h", "maxBytes": "1Mi" }))
        // Room for every event even if the upstream falls behind: this test is about the index.
        .set("buffer", json!({ "maxBytes": "64Mi" }))
        .start()
        .await;

    // Long random ids, so the index grows well past 1Mi: ~60k entries of ~100 bytes.
    let mut first: Vec<Value> = Vec::new();
    let mut last: Vec<Value> = Vec::new();
    let requests = 120;
    for n in 0..requests {
        let events: Vec<Value> = (0..500)
            .map(|i| {
                let mut noise = [0u8; 40];
                rand::rng().fill(&mut noise[..]);
                event(&format!("dd-{n}-{i}-{}", hex(&noise)))
            })
            .collect();
        sidecar.send_ok(&events).await;
        if n == 0 {
            first = events.clone();
        }
        if n == requests - 1 {
            last = events;
        }
    }
    poll_until(
        Duration::from_secs(60),
        "entries evicted from the dedup index, and its files back within dedup.maxBytes",
        async || {
            let m = sidecar.metrics().await;
            (m.value("tally_dedup_entries_removed_total{reason=\"evicted\"}") > 0.0
                && m.value("tally_dedup_bytes") <= MIB as f64)
                .then_some(())
        },
    )
    .await;
    let metrics = sidecar.metrics().await;
    let window = metrics.value("tally_dedup_window_seconds");
    assert!(
        window < 3600.0,
        "the effective window is shorter than dedup.window while the index is at its part: {window}"
    );
    assert_eq!(
        metrics.value("tally_dedup_entries_removed_total{reason=\"expired\"}"),
        0.0,
        "nothing is older than the window"
    );

    // The newest entries still deduplicate; the oldest were forgotten, so they are stored again.
    let deduplicated_before = metrics.value("tally_events_deduplicated_total");
    sidecar.send_ok(&last).await;
    sidecar.send_ok(&first).await;
    let deduplicated =
        sidecar.metric("tally_events_deduplicated_total").await - deduplicated_before;
    assert_eq!(
        deduplicated,
        last.len() as f64,
        "the newest request was deduplicated, the oldest (forgotten) was stored again"
    );
}
