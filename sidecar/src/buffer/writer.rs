//! The writer thread: every RocksDB write of a writable buffer happens here, so no async worker
//! ever waits on a write or an fsync, and no lock a request handler takes is held across one.
//!
//! Commands are taken in groups (up to [`MAX_GROUP`]); one group becomes two writes:
//! 1. the durable one: damaged records to the quarantine, dead letters, new events with their
//!    dedup entries (and `dropOldest` deletions), synced once for the whole group;
//! 2. after it succeeded, the tickets of the group are settled, and the moved cursors and the
//!    deletion of every event all consumers have go in a second, unsynced write. Losing that
//!    one in a crash only means some events are delivered again.
//!
//! A failed write (a full disk, an I/O error) leaves RocksDB refusing every further write. The
//! writer then reopens the database, at most once a second, until a write works again: ingest
//! answers 503 meanwhile and accepts again as soon as space is back, without a restart.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rocksdb::{DB, WriteBatch, WriteOptions};
use tokio::sync::{mpsc, oneshot};

use super::accounting::Chunk;
use super::codec::{DedupKeys, Target, cursor_key, encode_record_into, record_len, seq_key};
use super::open::{CF_DEDUP, CF_EVENTS, CF_META, NEXT_SEQ_KEY, cf, open_db, quarantine};
use super::space::{self, Compaction};
use super::{
    AppendError, Appended, BufferError, Inner, Settlement, Ticket, dead_letter, dedup, now_ms,
};
use crate::config::{Durability, WhenFull};
use crate::event::Event;

mod retention;

/// Most commands coalesced into one group.
const MAX_GROUP: usize = 512;
/// The shortest pause between two attempts to reopen the database after a failed write.
const REOPEN_GAP: Duration = Duration::from_secs(1);
/// Outside maintenance, delivered events are deleted once they fill this part of the events'
/// memtable (see `write_cursors_and_trim`).
const TRIM_PARTS: u64 = 8;

type AppendReply = oneshot::Sender<Result<Appended, AppendError>>;
type SettleReply = oneshot::Sender<Result<(), BufferError>>;

/// A request to the writer thread.
pub(super) enum WriterCommand {
    Append {
        events: Vec<Event>,
        reply: AppendReply,
    },
    Settle {
        ticket: Ticket,
        settlement: Settlement,
        reply: SettleReply,
    },
    Replay {
        output: Option<String>,
        reply: oneshot::Sender<Result<usize, BufferError>>,
    },
    Maintain {
        reply: oneshot::Sender<Result<(), BufferError>>,
    },
}

#[derive(Default)]
struct Group {
    appends: Vec<(Vec<Event>, AppendReply)>,
    settles: Vec<(Ticket, Settlement, SettleReply)>,
}

impl Group {
    fn len(&self) -> usize {
        self.appends.len() + self.settles.len()
    }
}

/// RocksDB's framing of one entry in a write batch: its type, column family and two lengths.
const BATCH_ENTRY_OVERHEAD: usize = 16;

/// The bytes the group's appends take in a write batch: each event's record under its sequence
/// key, and its dedup entry. Reserved at once, so that the batch (megabytes for a large group)
/// is not copied each time it outgrows its buffer; duplicates, and dedup when it is off, make it
/// an overestimate.
fn batch_capacity(appends: &[(Vec<Event>, AppendReply)], keys: DedupKeys) -> usize {
    let entries: usize = appends
        .iter()
        .flat_map(|(events, _)| events)
        .map(|e| {
            let record = record_len(&Target::All, e.json().len()) + 8;
            let dedup = keys.len(e.source(), e.id()) + 8;
            record + dedup + 2 * BATCH_ENTRY_OVERHEAD
        })
        .sum();
    // The batch's header, and the next sequence number under its meta key.
    entries + 64
}

/// The writer's own state.
struct Writer {
    inner: Arc<Inner>,
    /// Delivered bytes that are deleted at once outside maintenance.
    trim_bytes: u64,
    last_reopen: Option<Instant>,
    last_retention: Option<Instant>,
    /// Where compactions go (see [`space`]); `None` if the compactor thread could not start.
    compactor: Option<std::sync::mpsc::Sender<Compaction>>,
}

/// Marks the writer stopped however the thread ends, a panic included, so `/healthz` fails.
struct AliveFlag(Arc<Inner>);

impl Drop for AliveFlag {
    fn drop(&mut self) {
        self.0.writer_alive.store(false, Ordering::SeqCst);
    }
}

pub(super) fn run(inner: Arc<Inner>, mut rx: mpsc::Receiver<WriterCommand>) {
    let _alive = AliveFlag(inner.clone());
    let (compactions, compactor_rx) = std::sync::mpsc::channel();
    let compactor_inner = inner.clone();
    let compactor = std::thread::Builder::new()
        .name("tally-buffer-compactor".into())
        .spawn(move || space::run_compactor(compactor_inner, compactor_rx))
        .inspect_err(|e| {
            tracing::error!(error = %e, "cannot start the compactor thread; deleted events are reclaimed by RocksDB's own compactions only");
        })
        .ok();
    let events_memtable = inner
        .options
        .budget
        .memory(inner.options.profile)
        .events_write_buffer;
    let mut writer = Writer {
        inner,
        trim_bytes: events_memtable / TRIM_PARTS,
        last_reopen: None,
        last_retention: None,
        compactor: compactor.is_some().then_some(compactions),
    };
    while let Some(first) = rx.blocking_recv() {
        let mut group = Group::default();
        let mut pending = Some(first);
        while let Some(command) = pending.take() {
            match command {
                WriterCommand::Append { events, reply } => group.appends.push((events, reply)),
                WriterCommand::Settle {
                    ticket,
                    settlement,
                    reply,
                } => group.settles.push((ticket, settlement, reply)),
                WriterCommand::Replay { output, reply } => {
                    // Keep order: commit what came before, then replay alone.
                    writer.commit(std::mem::take(&mut group));
                    let _ = reply.send(writer.replay(output.as_deref()));
                }
                WriterCommand::Maintain { reply } => {
                    writer.commit(std::mem::take(&mut group));
                    let _ = reply.send(writer.maintain());
                }
            }
            if group.len() < MAX_GROUP {
                pending = rx.try_recv().ok();
            }
        }
        writer.commit(group);
    }
    // Let a running compaction finish before the database is closed.
    writer.compactor = None;
    if let Some(compactor) = compactor
        && compactor.join().is_err()
    {
        tracing::error!("the buffer compactor thread panicked");
    }
}

/// What the durable write of a group changes in memory once it succeeded.
#[derive(Default)]
struct Effects {
    new_chunks: Vec<Chunk>,
    dropped_chunks: Vec<Chunk>,
    dropped_events: u64,
    /// (output, events, bytes) added to dead-letter stores.
    dead_lettered: Vec<(String, u64, u64)>,
    /// New dedup entries.
    dedup_inserted: u64,
    next_seq: Option<u64>,
    needs_sync: bool,
}

impl Writer {
    fn durability_sync(&self) -> bool {
        self.inner.options.durability == Durability::Sync
    }

    /// The database, reopening it first if a write failed before.
    fn db(&mut self) -> Result<Arc<DB>, BufferError> {
        if self.inner.failure.lock().is_some() {
            self.reopen()?;
        }
        self.inner.db()
    }

    /// Reopens the database after a failed write, at most once per [`REOPEN_GAP`].
    fn reopen(&mut self) -> Result<(), BufferError> {
        let failure = self.inner.failure.lock().clone().unwrap_or_default();
        if self.last_reopen.is_some_and(|at| at.elapsed() < REOPEN_GAP) {
            return Err(BufferError::Unavailable(failure));
        }
        self.last_reopen = Some(Instant::now());
        let mut slot = self.inner.db.write();
        // Readers hold the database only for one read; RocksDB allows one open instance, so
        // wait for them to let go.
        if let Some(old) = slot.take() {
            let mut old = Some(old);
            let deadline = Instant::now() + Duration::from_secs(5);
            while let Some(db) = old.take() {
                match Arc::try_unwrap(db) {
                    Ok(db) => drop(db),
                    Err(db) if Instant::now() < deadline => {
                        old = Some(db);
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(db) => {
                        *slot = Some(db);
                        return Err(BufferError::Unavailable(failure));
                    }
                }
            }
        }
        match open_db(&self.inner.options, Some(&self.inner.space.filter)) {
            Ok(db) => {
                *slot = Some(Arc::new(db));
                drop(slot);
                // Prove it takes writes before saying so.
                if let Err(e) = self.probe() {
                    tracing::warn!(error = %e, "the buffer storage still refuses writes; retrying in 1s");
                    return Err(BufferError::Unavailable(e.to_string()));
                }
                *self.inner.failure.lock() = None;
                self.inner.full.store(false, Ordering::Relaxed);
                tracing::info!("the buffer storage takes writes again; accepting events");
                Ok(())
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot reopen the buffer storage yet; retrying in 1s");
                Err(BufferError::Unavailable(failure))
            }
        }
    }

    /// One synced write of the sequence high-water mark.
    fn probe(&self) -> Result<(), BufferError> {
        let db = self.inner.db()?;
        let mut write = WriteOptions::default();
        write.set_sync(true);
        let next = *self.inner.last_seq.borrow() + 1;
        db.put_cf_opt(cf(&db, CF_META)?, NEXT_SEQ_KEY, next.to_be_bytes(), &write)?;
        Ok(())
    }

    fn record_failure(&self, e: &BufferError) {
        let mut failure = self.inner.failure.lock();
        if failure.is_none() {
            tracing::error!(error = %e, "buffer write failed; acknowledged events are safe. Ingest answers 503 until the storage takes writes again (free disk space if it is full)");
            *failure = Some(e.to_string());
        }
    }

    fn commit(&mut self, group: Group) {
        if group.len() == 0 {
            return;
        }
        let db = match self.db() {
            Ok(db) => db,
            Err(e) => return fail_group(group, &e),
        };
        self.quarantine_found(&db);
        if !group.appends.is_empty()
            && let Err(e) = self.enforce_max_lag(&db)
        {
            tracing::error!(error = %e, "cannot enforce maxLag");
        }
        let Group { appends, settles } = group;
        let mut batch =
            WriteBatch::with_capacity_bytes(batch_capacity(&appends, self.inner.dedup_keys));
        let mut effects = Effects::default();
        let mut accounting_guard = self.inner.accounting.lock();
        // Dead letters first: a batch refused for good is recorded before its cursor moves.
        let mut settle_results = Vec::with_capacity(settles.len());
        for (_, settlement, _) in &settles {
            settle_results.push(match settlement {
                Settlement::Delivered => Ok(()),
                Settlement::DeadLettered {
                    output,
                    records,
                    reason,
                    status,
                } => dead_letter::put(&db, &mut batch, output, records, reason, *status).map(
                    |bytes| {
                        effects
                            .dead_lettered
                            .push((output.clone(), records.len() as u64, bytes));
                        effects.needs_sync = true;
                    },
                ),
            });
        }
        let outcomes = match self.stage_appends(
            &db,
            &appends,
            &mut batch,
            &mut effects,
            &mut accounting_guard,
        ) {
            Ok(outcomes) => outcomes,
            Err(e) => {
                restore(&mut accounting_guard, &effects);
                drop(accounting_guard);
                let group = Group { appends, settles };
                return fail_group(group, &e);
            }
        };
        let mut write = WriteOptions::default();
        write.set_sync(effects.needs_sync && self.durability_sync());
        let written = if batch.is_empty() {
            Ok(())
        } else {
            db.write_opt(batch, &write)
        };
        if let Err(e) = written {
            restore(&mut accounting_guard, &effects);
            drop(accounting_guard);
            let e = BufferError::from(e);
            self.record_failure(&e);
            return fail_group(Group { appends, settles }, &e);
        }
        // Durable: apply the effects in memory.
        for chunk in &effects.new_chunks {
            accounting_guard.push(*chunk);
        }
        drop(accounting_guard);
        let space = &self.inner.space;
        space.note_inserted(now_ms(), effects.dedup_inserted);
        if let Some(last) = effects.dropped_chunks.last() {
            space.note_trimmed(
                last.last,
                effects.dropped_chunks.iter().map(|c| c.bytes).sum(),
            );
        }
        {
            let mut counts = self.inner.dead_letters.lock();
            for (output, events, bytes) in &effects.dead_lettered {
                let entry = counts.entry(output.clone()).or_default();
                entry.0 += events;
                entry.1 += bytes;
            }
        }
        let metrics = &self.inner.metrics;
        if !effects.new_chunks.is_empty() {
            metrics.buffer_commits.inc();
            let stored: u64 = effects.new_chunks.iter().map(|c| c.events).sum();
            metrics.buffer_commit_events.observe(stored as f64);
        }
        if effects.dropped_events > 0 {
            tracing::warn!(
                dropped = effects.dropped_events,
                "buffer full: dropped the oldest events (whenFull: dropOldest)"
            );
        }
        if let Some(next) = effects.next_seq {
            self.inner.last_seq.send_replace(next - 1);
        }
        for ((_, reply), outcome) in appends.into_iter().zip(outcomes) {
            let _ = reply.send(outcome);
        }
        // Settle the tickets, then move cursors and trim in the second write.
        let mut moved = false;
        let mut replies = Vec::with_capacity(settles.len());
        for ((ticket, _, reply), result) in settles.into_iter().zip(settle_results) {
            if result.is_ok() {
                moved |= self.inner.acks.settle(&ticket).is_some();
            }
            replies.push((reply, result));
        }
        if moved {
            self.inner.notify_cursor_moved();
            self.write_cursors_and_trim(&db, false);
        }
        self.inner.publish_gauges();
        // Answered after the cursors moved, so a settled caller sees its effect.
        for (reply, result) in replies {
            let _ = reply.send(result);
        }
    }

    /// Stages the group's appends into `batch`: dedup, capacity, `dropOldest`.
    fn stage_appends(
        &self,
        db: &DB,
        requests: &[(Vec<Event>, AppendReply)],
        batch: &mut WriteBatch,
        effects: &mut Effects,
        accounting: &mut super::accounting::Accounting,
    ) -> Result<Vec<Result<Appended, AppendError>>, BufferError> {
        if requests.is_empty() {
            return Ok(Vec::new());
        }
        let events_cf = cf(db, CF_EVENTS)?;
        let dedup_cf = cf(db, CF_DEDUP)?;
        let meta_cf = cf(db, CF_META)?;
        let options = &self.inner.options;
        let now = now_ms();
        let window = options.dedup_window_ms;
        let seen = dedup::lookup(
            db,
            requests.iter().flat_map(|(events, _)| events.iter()),
            self.inner.dedup_keys,
            &self.inner.space.filter,
            now,
        )?;
        let budget = &options.budget;
        let disk_over = self.inner.space.over();
        // Drops count what no output has settled, batches in flight included: if the process
        // stops before they are delivered, they are gone, and must not go uncounted.
        let settled_floor = self.inner.acks.floor(options.consumers());
        let mut next = *self.inner.last_seq.borrow() + 1;
        // Keys stored by an earlier request of this group (see `Seen::earlier`).
        let mut claimed = vec![false; seen.stored.len()];
        let mut outcomes = Vec::with_capacity(requests.len());
        let mut group_bytes = 0u64;
        let mut key_index = 0;
        // Each record is encoded here, then copied into the write batch.
        let mut record = Vec::new();
        for (events, _) in requests {
            // Decide per request, so one request over the limit does not fail the others.
            let mut fresh = Vec::with_capacity(events.len());
            let mut duplicates = 0;
            for event in events {
                if window > 0 {
                    let index = key_index;
                    key_index += 1;
                    // Claimed for this request unless stored or claimed before.
                    let mut repeat = seen.earlier[index];
                    let mut is_dup = seen.stored[index];
                    while let Some(earlier) = repeat.filter(|_| !is_dup) {
                        is_dup = claimed[earlier];
                        repeat = seen.earlier[earlier];
                    }
                    if is_dup {
                        duplicates += 1;
                        continue;
                    }
                    claimed[index] = true;
                    fresh.push((event, Some(index)));
                } else {
                    fresh.push((event, None));
                }
            }
            let needed: u64 = fresh
                .iter()
                .map(|(e, _)| record_len(&Target::All, e.json().len()) as u64 + 8)
                .sum();
            let max = budget.events;
            if needed > max {
                release_claims(&mut claimed, &fresh);
                outcomes.push(Err(AppendError::TooLarge { needed, max }));
                continue;
            }
            if disk_over && !fresh.is_empty() {
                // The estimate of the parts was off: refuse in both modes until compaction
                // brings the directory back under maxBytes (see `space`).
                release_claims(&mut claimed, &fresh);
                outcomes.push(Err(AppendError::DiskFull {
                    used: self.inner.space.disk_bytes(),
                    max: budget.total,
                }));
                continue;
            }
            let mut dropped = 0;
            if accounting.bytes + group_bytes + needed > max {
                match options.when_full {
                    WhenFull::Reject => {
                        release_claims(&mut claimed, &fresh);
                        self.inner.full.store(true, Ordering::Relaxed);
                        outcomes.push(Err(AppendError::Full {
                            used: accounting.bytes + group_bytes,
                            max,
                        }));
                        continue;
                    }
                    WhenFull::DropOldest => {
                        while accounting.bytes + group_bytes + needed > max {
                            let Some(chunk) = accounting.pop_front() else {
                                break;
                            };
                            batch.delete_range_cf(
                                events_cf,
                                seq_key(chunk.first),
                                seq_key(chunk.last + 1),
                            );
                            dropped += chunk.unread(settled_floor);
                            effects.dropped_chunks.push(chunk);
                        }
                    }
                }
            }
            let first = next;
            for (event, key) in &fresh {
                encode_record_into(&mut record, &Target::All, now, event.json());
                batch.put_cf(events_cf, seq_key(next), &record);
                if let Some(index) = key {
                    batch.put_cf(dedup_cf, seen.key(*index), now.to_be_bytes());
                    effects.dedup_inserted += 1;
                }
                next += 1;
            }
            if !fresh.is_empty() {
                effects.new_chunks.push(Chunk {
                    first,
                    last: next - 1,
                    events: fresh.len() as u64,
                    bytes: needed,
                    appended_ms: now,
                });
                group_bytes += needed;
                effects.needs_sync = true;
            }
            effects.dropped_events += dropped;
            outcomes.push(Ok(Appended {
                stored: fresh.len(),
                duplicates,
                dropped,
            }));
        }
        batch.put_cf(meta_cf, NEXT_SEQ_KEY, next.to_be_bytes());
        effects.next_seq = Some(next);
        Ok(outcomes)
    }

    /// Writes every consumer's cursor and deletes what all of them have (unsynced). Unless
    /// `now` (maintenance, `maxLag`) or the buffer is full, deletion waits until what can go
    /// fills a [`TRIM_PARTS`]th of the events' memtable: every range deletion leaves a
    /// tombstone that reads must step over until a compaction, so one per settled batch would
    /// slow delivery; but events deleted in the memtable they were written to are dropped by
    /// its flush, while those deleted later were written to disk first and cost a compaction.
    fn write_cursors_and_trim(&self, db: &DB, now: bool) {
        let options = &self.inner.options;
        let result = (|| -> Result<(), BufferError> {
            let meta = cf(db, CF_META)?;
            let events = cf(db, CF_EVENTS)?;
            let mut batch = WriteBatch::default();
            for consumer in options.consumers() {
                let cursor = self.inner.acks.cursor(consumer);
                batch.put_cf(meta, cursor_key(consumer), cursor.to_be_bytes());
            }
            let floor = self.inner.acks.floor(options.consumers());
            let trimmed = {
                let mut accounting = self.inner.accounting.lock();
                let due = now
                    || self.inner.full.load(Ordering::Relaxed)
                    || self.inner.space.over()
                    || accounting.deletable_bytes(floor) >= self.trim_bytes;
                if due {
                    accounting.take_through(floor)
                } else {
                    Vec::new()
                }
            };
            if let (Some(first), Some(last)) = (trimmed.first(), trimmed.last()) {
                batch.delete_range_cf(events, seq_key(first.first), seq_key(last.last + 1));
            }
            let trimmed_through = trimmed
                .last()
                .map(|c| (c.last, trimmed.iter().map(|c| c.bytes).sum()));
            if let Err(e) = db.write(batch) {
                // Not deleted after all: account for those events again.
                let mut accounting = self.inner.accounting.lock();
                for chunk in trimmed.into_iter().rev() {
                    accounting.push_front(chunk);
                }
                return Err(e.into());
            }
            if let Some((through, bytes)) = trimmed_through {
                self.inner.full.store(false, Ordering::Relaxed);
                self.inner.space.note_trimmed(through, bytes);
            }
            Ok(())
        })();
        if let Err(e) = result {
            self.record_failure(&e);
        }
    }

    /// Moves damaged records readers stepped over into the quarantine.
    fn quarantine_found(&self, db: &DB) {
        let found = std::mem::take(&mut *self.inner.found_damaged.lock());
        if found.is_empty() {
            return;
        }
        match quarantine(db, &found, &self.inner.metrics) {
            Ok(moved) => {
                self.inner.quarantined.fetch_add(moved, Ordering::Relaxed);
            }
            Err(e) => {
                // Keep them for the next group; the cursor cannot pass them before.
                tracing::error!(error = %e, "cannot quarantine damaged records");
                self.inner.found_damaged.lock().extend(found);
            }
        }
    }

    fn replay(&mut self, output: Option<&str>) -> Result<usize, BufferError> {
        let db = self.db()?;
        let now = now_ms();
        let first = *self.inner.last_seq.borrow() + 1;
        let mut batch = WriteBatch::default();
        let replayed = dead_letter::replay(
            &db,
            &mut batch,
            output,
            &self.inner.options.outputs,
            now,
            first,
        )?;
        if replayed.events == 0 {
            return Ok(0);
        }
        let next = first + replayed.events;
        batch.put_cf(cf(&db, CF_META)?, NEXT_SEQ_KEY, next.to_be_bytes());
        let mut write = WriteOptions::default();
        write.set_sync(true);
        if let Err(e) = db.write_opt(batch, &write) {
            let e = BufferError::from(e);
            self.record_failure(&e);
            return Err(e);
        }
        self.inner.accounting.lock().push(Chunk {
            first,
            last: next - 1,
            events: replayed.events,
            bytes: replayed.bytes,
            appended_ms: now,
        });
        {
            let mut counts = self.inner.dead_letters.lock();
            for (name, (events, bytes)) in replayed.taken {
                let entry = counts.entry(name).or_default();
                entry.0 = entry.0.saturating_sub(events);
                entry.1 = entry.1.saturating_sub(bytes);
            }
        }
        self.inner.last_seq.send_replace(next - 1);
        self.inner.publish_gauges();
        Ok(replayed.events as usize)
    }
}

/// Undoes the dedup claims of a refused request: its events were not stored, so a later
/// request of the same group may store them.
fn release_claims(claimed: &mut [bool], fresh: &[(&Event, Option<usize>)]) {
    for (_, key) in fresh {
        if let Some(index) = key {
            claimed[*index] = false;
        }
    }
}

/// Puts back what a failed write would have removed from the accounting.
fn restore(accounting: &mut super::accounting::Accounting, effects: &Effects) {
    for chunk in effects.dropped_chunks.iter().rev() {
        accounting.push_front(*chunk);
    }
}

/// Answers every request of a group that was not written.
fn fail_group(group: Group, e: &BufferError) {
    let message = e.to_string();
    for (_, reply) in group.appends {
        let _ = reply.send(Err(AppendError::Storage(message.clone())));
    }
    for (_, _, reply) in group.settles {
        let _ = reply.send(Err(BufferError::Unavailable(message.clone())));
    }
}
