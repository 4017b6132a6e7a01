//! The dead-letter store: events an output refused for good, kept per output until replayed or
//! until the store's retention (bytes and age) deletes the oldest, which is counted.

use std::collections::HashMap;

use rocksdb::{DB, Direction, IteratorMode, WriteBatch};
use serde_json::value::RawValue;

use super::codec::{
    Target, corrupt, dead_letter_key, dead_letter_output, dead_letter_prefix, encode_record,
    seq_key,
};
use super::open::{CF_DEAD_LETTER, CF_EVENTS, cf};
use super::{BufferError, DeadLetter, Record};

/// Adds `records` to `output`'s dead letters in `batch`; returns the bytes added.
pub(super) fn put(
    db: &DB,
    batch: &mut WriteBatch,
    output: &str,
    records: &[Record],
    reason: &str,
    status: Option<u16>,
) -> Result<u64, BufferError> {
    let dl = cf(db, CF_DEAD_LETTER)?;
    let failed_at = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let mut bytes = 0;
    for record in records {
        let event = RawValue::from_string(String::from_utf8_lossy(&record.json).into_owned())
            .map_err(|e| {
                corrupt(
                    format!("events/{}", record.seq),
                    format!("stored event is not JSON: {e}"),
                )
            })?;
        let letter = DeadLetter {
            output: output.to_string(),
            key: record.seq,
            reason: reason.to_string(),
            status,
            failed_at: failed_at.clone(),
            event,
        };
        let key = dead_letter_key(output, record.seq);
        let value = serde_json::to_vec(&letter).map_err(|e| {
            corrupt(
                format!("dead_letter/{output}/{}", record.seq),
                e.to_string(),
            )
        })?;
        bytes += (key.len() + value.len()) as u64;
        batch.put_cf(dl, key, value);
    }
    Ok(bytes)
}

fn parse(key: &[u8], value: &[u8]) -> Result<DeadLetter, BufferError> {
    serde_json::from_slice(value).map_err(|e| {
        corrupt(
            format!("dead_letter/{}", String::from_utf8_lossy(key)),
            e.to_string(),
        )
    })
}

/// Lists dead letters, oldest first per output.
pub(super) fn list(
    db: &DB,
    output: Option<&str>,
    limit: usize,
) -> Result<Vec<DeadLetter>, BufferError> {
    let dl = cf(db, CF_DEAD_LETTER)?;
    let prefix = output.map(dead_letter_prefix).unwrap_or_default();
    let mut out = Vec::new();
    for item in db.iterator_cf(dl, IteratorMode::From(&prefix, Direction::Forward)) {
        let (key, value) = item?;
        if !key.starts_with(&prefix) || out.len() >= limit {
            break;
        }
        out.push(parse(&key, &value)?);
    }
    Ok(out)
}

/// Events and bytes held per output, counted once at open.
pub(super) fn count(db: &DB) -> Result<HashMap<String, (u64, u64)>, BufferError> {
    let dl = cf(db, CF_DEAD_LETTER)?;
    let mut counts: HashMap<String, (u64, u64)> = HashMap::new();
    for item in db.iterator_cf(dl, IteratorMode::Start) {
        let (key, value) = item?;
        let name = String::from_utf8_lossy(dead_letter_output(&key)).into_owned();
        let entry = counts.entry(name).or_default();
        entry.0 += 1;
        entry.1 += (key.len() + value.len()) as u64;
    }
    Ok(counts)
}

/// What a replay puts back into the log.
pub(super) struct Replayed {
    pub events: u64,
    pub bytes: u64,
    /// Per output: (events, bytes) taken out of the dead-letter store.
    pub taken: HashMap<String, (u64, u64)>,
}

/// Moves the dead letters of `output` (all if `None`) of configured outputs back into the log
/// from sequence `next`, addressed to their output only.
pub(super) fn replay(
    db: &DB,
    batch: &mut WriteBatch,
    output: Option<&str>,
    outputs: &[String],
    now: u64,
    mut next: u64,
) -> Result<Replayed, BufferError> {
    let dl = cf(db, CF_DEAD_LETTER)?;
    let events_cf = cf(db, CF_EVENTS)?;
    let prefix = output.map(dead_letter_prefix).unwrap_or_default();
    let mut replayed = Replayed {
        events: 0,
        bytes: 0,
        taken: HashMap::new(),
    };
    for item in db.iterator_cf(dl, IteratorMode::From(&prefix, Direction::Forward)) {
        let (key, value) = item?;
        if !key.starts_with(&prefix) {
            break;
        }
        let letter = parse(&key, &value)?;
        if !outputs.contains(&letter.output) {
            // Its output is no longer configured; leave it for a later configuration.
            continue;
        }
        let record = encode_record(
            &Target::Only(letter.output.clone()),
            now,
            letter.event.get().as_bytes(),
        );
        replayed.bytes += record.len() as u64 + 8;
        replayed.events += 1;
        let taken = replayed.taken.entry(letter.output).or_default();
        taken.0 += 1;
        taken.1 += (key.len() + value.len()) as u64;
        batch.put_cf(events_cf, seq_key(next), record);
        batch.delete_cf(dl, key);
        next += 1;
    }
    Ok(replayed)
}

/// Deletes the oldest dead letters of `output` while `over(events_deleted, bytes_deleted,
/// failed_at)` says the store is over its retention. Returns (events, bytes) deleted.
pub(super) fn expire(
    db: &DB,
    batch: &mut WriteBatch,
    output: &str,
    mut over: impl FnMut(u64, u64, &str) -> bool,
) -> Result<(u64, u64), BufferError> {
    let dl = cf(db, CF_DEAD_LETTER)?;
    let prefix = dead_letter_prefix(output);
    let (mut events, mut bytes) = (0, 0);
    for item in db.iterator_cf(dl, IteratorMode::From(&prefix, Direction::Forward)) {
        let (key, value) = item?;
        if !key.starts_with(&prefix) {
            break;
        }
        let failed_at = parse(&key, &value).map(|l| l.failed_at).unwrap_or_default();
        if !over(events, bytes, &failed_at) {
            break;
        }
        events += 1;
        bytes += (key.len() + value.len()) as u64;
        batch.delete_cf(dl, key);
    }
    Ok((events, bytes))
}
