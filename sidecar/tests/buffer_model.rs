//! Model-based test of the durable buffer: random sequences of append (with duplicate ids),
//! read, acknowledge, dead-letter, replay, trim and restart, checked after every step against a
//! trivially correct in-memory model. Restart closes and reopens the RocksDB directory, so every
//! cursor, dedup entry, dead letter and event must come back from disk.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use proptest::prelude::*;
use tally_sidecar::buffer::{
    Budget, BufferOptions, DurableBuffer, Settlement, Ticket, WriterThread,
};
use tally_sidecar::config::{BufferProfile, Durability, WhenFull};
use tally_sidecar::event::Event;
use tally_sidecar::metrics::Metrics;

mod common;

const OUTPUTS: [&str; 2] = ["a", "b"];

#[derive(Debug, Clone)]
enum Op {
    /// Append events with these ids (small range, so duplicates happen).
    Append(Vec<u8>),
    /// Read up to n events for an output and acknowledge them.
    ReadAck(usize, usize),
    /// Read up to n events for an output and dead-letter them.
    ReadDeadLetter(usize, usize),
    /// Replay one output's dead letters.
    Replay(usize),
    Trim,
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => prop::collection::vec(0u8..40, 1..6).prop_map(Op::Append),
        3 => (0..2usize, 1..8usize).prop_map(|(o, n)| Op::ReadAck(o, n)),
        1 => (0..2usize, 1..4usize).prop_map(|(o, n)| Op::ReadDeadLetter(o, n)),
        1 => (0..2usize).prop_map(Op::Replay),
        1 => Just(Op::Trim),
        1 => Just(Op::Restart),
    ]
}

/// What the buffer must hold: the ids each output has yet to receive, in order, and its
/// dead letters.
#[derive(Default)]
struct Model {
    seen: HashSet<String>,
    pending: BTreeMap<&'static str, Vec<String>>,
    dead: BTreeMap<&'static str, Vec<String>>,
}

fn event(id: &str) -> Event {
    common::event("model", id)
}

fn id_of(json: &[u8]) -> String {
    let value: serde_json::Value = serde_json::from_slice(json).expect("stored JSON");
    value["id"].as_str().expect("id").to_string()
}

fn open(dir: &std::path::Path) -> (DurableBuffer, WriterThread) {
    DurableBuffer::open(
        BufferOptions {
            durability: Durability::None,
            outputs: OUTPUTS.iter().map(|s| s.to_string()).collect(),
            ..common::options(dir, 3_600_000)
        },
        Arc::new(Metrics::new()),
    )
    .expect("open buffer")
}

fn dead(output: &str, records: Vec<tally_sidecar::buffer::Record>) -> Settlement {
    Settlement::DeadLettered {
        output: output.to_string(),
        records,
        reason: "model".into(),
        status: Some(400),
    }
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (mut buffer, mut writer) = open(dir.path());
    let mut model = Model::default();
    for output in OUTPUTS {
        model.pending.insert(output, Vec::new());
        model.dead.insert(output, Vec::new());
    }
    for op in ops {
        match op {
            Op::Append(ids) => {
                let ids: Vec<String> = ids.iter().map(|i| format!("e{i}")).collect();
                let events = ids.iter().map(|id| event(id)).collect();
                let appended = rt.block_on(buffer.append(events)).expect("append");
                let mut fresh = 0;
                for id in ids {
                    if model.seen.insert(id.clone()) {
                        fresh += 1;
                        for output in OUTPUTS {
                            model.pending.entry(output).or_default().push(id.clone());
                        }
                    }
                }
                prop_assert_eq!(appended.stored, fresh);
            }
            Op::ReadAck(o, n) | Op::ReadDeadLetter(o, n) => {
                let output = OUTPUTS[o];
                let cursor = buffer.cursor(output);
                let batch = buffer
                    .read(output, cursor, u64::MAX, n, usize::MAX)
                    .expect("read");
                let got: Vec<String> = batch.records.iter().map(|r| id_of(&r.json)).collect();
                let pending = model.pending.entry(output).or_default();
                let expected: Vec<String> = pending.iter().take(n).cloned().collect();
                prop_assert_eq!(&got, &expected, "read of {}", output);
                pending.drain(..got.len());
                if batch.last_scanned > cursor {
                    let ticket = buffer.issue(output, batch.last_scanned);
                    if matches!(op, Op::ReadAck(..)) {
                        rt.block_on(buffer.settle(ticket, Settlement::Delivered))
                            .expect("settle");
                    } else {
                        rt.block_on(buffer.settle(ticket, dead(output, batch.records)))
                            .expect("dead letter");
                        model.dead.entry(output).or_default().extend(got);
                    }
                }
            }
            Op::Replay(o) => {
                let output = OUTPUTS[o];
                let replayed = rt
                    .block_on(buffer.replay_dead_letters(Some(output.to_string())))
                    .expect("replay");
                let dead = std::mem::take(model.dead.entry(output).or_default());
                prop_assert_eq!(replayed, dead.len());
                model.pending.entry(output).or_default().extend(dead);
            }
            Op::Trim => rt.block_on(buffer.maintain()),
            Op::Restart => {
                drop(buffer);
                writer.join();
                (buffer, writer) = open(dir.path());
            }
        }
        // Invariants after every step.
        let stats = buffer.stats();
        for output in OUTPUTS {
            let letters = buffer.dead_letters(Some(output), usize::MAX).expect("list");
            let ids: Vec<String> = letters
                .iter()
                .map(|l| id_of(l.event.get().as_bytes()))
                .collect();
            prop_assert_eq!(&ids, &model.dead[output], "dead letters of {}", output);
            let listed = stats
                .outputs
                .iter()
                .find(|s| s.name == output)
                .expect("output stats");
            prop_assert_eq!(listed.dead_letters as usize, model.dead[output].len());
            // Lag counts records addressed to the other output too, so it bounds from above.
            prop_assert!(listed.lag as usize >= model.pending[output].len());
        }
        let most_pending = OUTPUTS
            .iter()
            .map(|o| model.pending[o].len())
            .max()
            .unwrap_or(0);
        prop_assert!(stats.events as usize >= most_pending, "buffer lost events");
    }
    // Everything left is still readable, in order, after one last restart.
    drop(buffer);
    writer.join();
    let (buffer, writer) = open(dir.path());
    for output in OUTPUTS {
        let cursor = buffer.cursor(output);
        let batch = buffer
            .read(output, cursor, u64::MAX, usize::MAX, usize::MAX)
            .expect("read");
        let got: Vec<String> = batch.records.iter().map(|r| id_of(&r.json)).collect();
        prop_assert_eq!(&got, &model.pending[output], "final read of {}", output);
    }
    drop(buffer);
    writer.join();
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn buffer_matches_model(ops in prop::collection::vec(op(), 1..60)) {
        run(ops)?;
    }
}

/// With every output caught up and trimmed, the buffer is empty and stays so across a restart;
/// sequence numbers are not reused, so a new event is read after the old cursor.
#[test]
fn trimmed_buffer_restarts_empty_and_keeps_sequence() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let (buffer, writer) = open(dir.path());
    rt.block_on(buffer.append((0..10).map(|i| event(&format!("x{i}"))).collect()))
        .expect("append");
    for output in OUTPUTS {
        let batch = buffer
            .read(output, 0, u64::MAX, 100, usize::MAX)
            .expect("read");
        assert_eq!(batch.records.len(), 10);
        let ticket = buffer.issue(output, batch.last_scanned);
        rt.block_on(buffer.settle(ticket, Settlement::Delivered))
            .expect("settle");
    }
    // Small deletions wait for the maintenance pass (fewer range tombstones); it deletes what
    // every output has.
    rt.block_on(buffer.maintain());
    assert_eq!(buffer.stats().events, 0, "delivered events are deleted");
    drop(buffer);
    writer.join();
    let (buffer, writer) = open(dir.path());
    assert_eq!(buffer.stats().events, 0);
    let appended = rt
        .block_on(buffer.append(vec![event("x3"), event("y")]))
        .expect("append");
    assert_eq!(appended.duplicates, 1, "dedup survives the restart");
    let batch = buffer
        .read("a", buffer.cursor("a"), u64::MAX, 100, usize::MAX)
        .expect("read");
    assert_eq!(batch.records.len(), 1);
    assert_eq!(batch.records[0].seq, 11);
    drop(buffer);
    writer.join();
}

/// Batches settled out of order: the cursor waits for the oldest, then passes all of them; a
/// restart before that re-reads every batch not passed, so nothing in flight is lost. This is
/// what `roundRobin` and `greedy` do with several outputs holding batches at once.
#[test]
fn cursor_waits_for_the_oldest_batch_in_flight() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let (buffer, writer) = open(dir.path());
    rt.block_on(buffer.append((0..30).map(|i| event(&format!("o{i}"))).collect()))
        .expect("append");
    let mut tickets: Vec<(Ticket, Vec<tally_sidecar::buffer::Record>)> = Vec::new();
    let mut after = 0;
    for _ in 0..3 {
        let batch = buffer
            .read("a", after, u64::MAX, 10, usize::MAX)
            .expect("read");
        after = batch.last_scanned;
        tickets.push((buffer.issue("a", after), batch.records));
    }
    let (first, first_records) = tickets.remove(0);
    let (third, _) = tickets.remove(1);
    let (second, second_records) = tickets.remove(0);
    rt.block_on(buffer.settle(third, Settlement::Delivered))
        .expect("settle third");
    rt.block_on(buffer.settle(second, dead("a", second_records)))
        .expect("dead-letter second");
    assert_eq!(buffer.cursor("a"), 0, "the first batch is still in flight");
    // Crash before the first batch settles: it must come back, with the later ones.
    drop(first);
    drop(buffer);
    writer.join();
    let (buffer, writer) = open(dir.path());
    let again = buffer
        .read("a", buffer.cursor("a"), u64::MAX, 100, usize::MAX)
        .expect("read");
    let ids: Vec<String> = again.records.iter().map(|r| id_of(&r.json)).collect();
    let first_ids: Vec<String> = first_records.iter().map(|r| id_of(&r.json)).collect();
    assert_eq!(
        &ids[..10],
        &first_ids[..],
        "the unsettled batch is read again"
    );
    assert_eq!(
        buffer.dead_letters(Some("a"), 100).expect("list").len(),
        10,
        "the dead-lettered batch is kept"
    );
    let ticket = buffer.issue("a", again.last_scanned);
    rt.block_on(buffer.settle(ticket, Settlement::Delivered))
        .expect("settle");
    assert_eq!(buffer.cursor("a"), 30);
    drop(buffer);
    writer.join();
}

/// What the shared-consumer model may do: append, take a batch (a ticket), settle any batch in
/// flight (delivered or dead-lettered, in any order, as `roundRobin`/`greedy` outputs do), and
/// restart (every batch in flight is dropped unsettled).
#[derive(Debug, Clone)]
enum SharedOp {
    Append(Vec<u8>),
    Take(usize),
    Settle(usize, bool),
    Restart,
}

fn shared_op() -> impl Strategy<Value = SharedOp> {
    prop_oneof![
        4 => prop::collection::vec(0u8..60, 1..8).prop_map(SharedOp::Append),
        3 => (1..6usize).prop_map(SharedOp::Take),
        3 => (0..8usize, prop::bool::weighted(0.2)).prop_map(|(i, d)| SharedOp::Settle(i, d)),
        1 => Just(SharedOp::Restart),
    ]
}

/// A budget whose events' part is `events` bytes (as small as a few events, which no valid
/// configuration allows), so the model can fill the buffer in a few steps.
fn events_budget(events: u64) -> Budget {
    let default = Budget::new(1 << 30, None, None).expect("valid budget");
    Budget { events, ..default }
}

fn open_shared(
    dir: &std::path::Path,
    max_bytes: u64,
    when_full: WhenFull,
) -> (DurableBuffer, WriterThread) {
    DurableBuffer::open(
        BufferOptions {
            budget: events_budget(max_bytes),
            when_full,
            profile: BufferProfile::Sidecar,
            outputs: OUTPUTS.iter().map(|s| s.to_string()).collect(),
            shared: true,
            ..common::options(dir, 3_600_000)
        },
        Arc::new(Metrics::new()),
    )
    .expect("open buffer")
}

/// The acknowledgement tracker under the shared patterns, `durability: sync` and a small
/// `maxBytes`: whatever order batches settle in and whenever the process restarts, every stored
/// event that was not settled is read again after a restart, and every dead-lettered one is in
/// the dead-letter store. With `whenFull: reject` appends are refused when full; with
/// `dropOldest` they never are, and every unsettled event missing after a restart is one the
/// buffer counted as dropped.
fn run_shared(
    ops: Vec<SharedOp>,
    max_bytes: u64,
    when_full: WhenFull,
) -> Result<(), TestCaseError> {
    use tally_sidecar::buffer::{Record, SHARED_CONSUMER};
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (mut buffer, mut writer) = open_shared(dir.path(), max_bytes, when_full);
    let mut dropped: u64 = 0;
    let mut seen: HashSet<String> = HashSet::new();
    let mut unsettled: HashSet<String> = HashSet::new();
    let mut dead: HashSet<String> = HashSet::new();
    let mut in_flight: Vec<(Ticket, Vec<Record>)> = Vec::new();
    let mut position = buffer.cursor(SHARED_CONSUMER);
    for op in ops {
        match op {
            SharedOp::Append(ids) => {
                let ids: Vec<String> = ids.iter().map(|i| format!("s{i}")).collect();
                let events = ids.iter().map(|id| event(id)).collect();
                let appended = rt.block_on(buffer.append(events));
                if when_full == WhenFull::DropOldest {
                    prop_assert!(appended.is_ok(), "dropOldest never refuses: {:?}", appended);
                }
                if let Ok(appended) = appended {
                    dropped += appended.dropped;
                    for id in ids {
                        if seen.insert(id.clone()) {
                            unsettled.insert(id);
                        }
                    }
                }
            }
            SharedOp::Take(n) => {
                let batch = buffer
                    .read(SHARED_CONSUMER, position, u64::MAX, n, usize::MAX)
                    .expect("read");
                if batch.last_scanned > position {
                    position = batch.last_scanned;
                    in_flight.push((buffer.issue(SHARED_CONSUMER, position), batch.records));
                }
            }
            SharedOp::Settle(i, dead_letter) if !in_flight.is_empty() => {
                let (ticket, records) = in_flight.remove(i % in_flight.len());
                let ids: Vec<String> = records.iter().map(|r| id_of(&r.json)).collect();
                let settlement = if dead_letter {
                    dead.extend(ids.iter().cloned());
                    Settlement::DeadLettered {
                        output: OUTPUTS[0].to_string(),
                        records,
                        reason: "model".into(),
                        status: None,
                    }
                } else {
                    Settlement::Delivered
                };
                rt.block_on(buffer.settle(ticket, settlement))
                    .expect("settle");
                for id in ids {
                    unsettled.remove(&id);
                }
            }
            SharedOp::Settle(..) => {}
            SharedOp::Restart => {
                in_flight.clear();
                drop(buffer);
                writer.join();
                (buffer, writer) = open_shared(dir.path(), max_bytes, when_full);
                position = buffer.cursor(SHARED_CONSUMER);
                let again = buffer
                    .read(SHARED_CONSUMER, position, u64::MAX, usize::MAX, usize::MAX)
                    .expect("read");
                let readable: HashSet<String> =
                    again.records.iter().map(|r| id_of(&r.json)).collect();
                let lost: Vec<String> = unsettled.difference(&readable).cloned().collect();
                prop_assert!(
                    lost.len() as u64 <= dropped,
                    "unsettled events lost beyond the {} counted as dropped: {:?}",
                    dropped,
                    lost
                );
                dropped -= lost.len() as u64;
                for id in lost {
                    unsettled.remove(&id);
                }
            }
        }
        let letters: HashSet<String> = buffer
            .dead_letters(Some(OUTPUTS[0]), usize::MAX)
            .expect("list")
            .iter()
            .map(|l| id_of(l.event.get().as_bytes()))
            .collect();
        prop_assert_eq!(&letters, &dead, "dead letters");
    }
    drop(buffer);
    writer.join();
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn shared_cursor_never_passes_an_unsettled_batch(
        ops in prop::collection::vec(shared_op(), 1..80),
        small in prop::bool::ANY,
        drop_oldest in prop::bool::ANY,
    ) {
        // Smaller than the configuration allows, so that a few dozen events fill it.
        let max_bytes = if small { 4 << 10 } else { 1 << 30 };
        let when_full = if drop_oldest { WhenFull::DropOldest } else { WhenFull::Reject };
        run_shared(ops, max_bytes, when_full)?;
    }
}

/// `dropOldest` deleting a batch that an output holds but has not settled: if the process then
/// stops, those events must be counted as dropped, or they vanish without a count.
#[test]
fn drop_oldest_counts_a_deleted_batch_in_flight() {
    use tally_sidecar::buffer::SHARED_CONSUMER;
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (buffer, writer) = open_shared(dir.path(), 4 << 10, WhenFull::DropOldest);
    let first: Vec<Event> = (0..5).map(|i| event(&format!("f{i}"))).collect();
    rt.block_on(buffer.append(first)).expect("append");
    let batch = buffer
        .read(SHARED_CONSUMER, 0, u64::MAX, 5, usize::MAX)
        .expect("read");
    assert_eq!(batch.records.len(), 5);
    let _in_flight = buffer.issue(SHARED_CONSUMER, batch.last_scanned);
    let mut dropped = 0;
    for n in 0..100 {
        let events: Vec<Event> = (0..5).map(|i| event(&format!("n{n}-{i}"))).collect();
        dropped += rt.block_on(buffer.append(events)).expect("append").dropped;
    }
    drop(buffer);
    writer.join();
    let (buffer, writer) = open_shared(dir.path(), 4 << 10, WhenFull::DropOldest);
    let again = buffer
        .read(SHARED_CONSUMER, 0, u64::MAX, usize::MAX, usize::MAX)
        .expect("read");
    let readable: HashSet<String> = again.records.iter().map(|r| id_of(&r.json)).collect();
    let stored = 5 + 500;
    assert_eq!(
        readable.len() as u64 + dropped,
        stored,
        "every stored event is still there or counted as dropped"
    );
    drop(buffer);
    writer.join();
}
