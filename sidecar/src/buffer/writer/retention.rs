//! Retention: what keeps the buffer inside its bounds when outputs fall behind or fail.
//! `maxLag` moves the oldest events of an output that is too far behind to its dead-letter
//! store, so a dead output cannot fill the buffer the healthy ones share; the dead-letter
//! store's own size and age limits then delete its oldest entries, counted. Both run on the
//! writer thread, from the periodic upkeep and after a group that moved a cursor.

use std::time::{Duration, Instant};

use rocksdb::{DB, WriteBatch, WriteOptions};

use super::Writer;
use crate::buffer::{BufferError, dead_letter};

/// Events moved to an output's dead-letter store per `maxLag` step, so one step stays short.
const MAX_LAG_STEP: usize = 10_000;
/// How often the dead-letter retention is applied at most.
const RETENTION_GAP: Duration = Duration::from_secs(10);

impl Writer {
    /// Moves the oldest events of outputs more than `maxLag` behind to their dead-letter
    /// stores, so a dead output cannot fill the buffer that the healthy ones share.
    pub(super) fn enforce_max_lag(&self, db: &DB) -> Result<(), BufferError> {
        for (output, max_lag) in &self.inner.options.max_lag {
            let cursor = self.inner.acks.cursor(output);
            let lag = self.inner.accounting.lock().lag(cursor);
            if lag <= *max_lag {
                continue;
            }
            let excess = (lag - max_lag).min(MAX_LAG_STEP as u64) as usize;
            let read = crate::buffer::open::read(
                &self.inner,
                output,
                cursor,
                u64::MAX,
                excess,
                usize::MAX,
            )?;
            if read.last_scanned <= cursor {
                continue;
            }
            let reason = format!(
                "output was {lag} events behind, more than its maxLag of {max_lag}; the oldest were moved here so the buffer keeps room for the other outputs"
            );
            let mut batch = WriteBatch::default();
            let bytes = dead_letter::put(db, &mut batch, output, &read.records, &reason, None)?;
            let mut write = WriteOptions::default();
            write.set_sync(self.durability_sync());
            db.write_opt(batch, &write)?;
            let moved = read.records.len() as u64;
            {
                let mut counts = self.inner.dead_letters.lock();
                let entry = counts.entry(output.clone()).or_default();
                entry.0 += moved;
                entry.1 += bytes;
            }
            let metrics = &self.inner.metrics;
            metrics
                .output_dead_lettered
                .get_or_create(&metrics.output(output))
                .inc_by(moved);
            tracing::warn!(%output, lag, max_lag, moved, "output is over its maxLag; its oldest events moved to the dead-letter store");
            self.inner.acks.skip_to(output, read.last_scanned);
            self.inner.notify_cursor_moved();
            self.write_cursors_and_trim(db, true);
            // A dead output can move events faster than maintenance runs: keep the store in
            // its part of maxBytes at once.
            if self.dead_letters_over_part() {
                self.apply_retention(db)?;
            }
        }
        Ok(())
    }

    /// Whether the dead-letter store holds more than its part of `maxBytes`.
    fn dead_letters_over_part(&self) -> bool {
        let held: u64 = self
            .inner
            .dead_letters
            .lock()
            .values()
            .map(|(_, b)| b)
            .sum();
        held > self.inner.options.budget.dead_letters
    }

    /// Upkeep: reopen after a failure, `maxLag`, trimming, dead-letter retention.
    pub(super) fn maintain(&mut self) -> Result<(), BufferError> {
        let db = self.db()?;
        self.quarantine_found(&db);
        self.enforce_max_lag(&db)?;
        self.write_cursors_and_trim(&db, true);
        // Age is checked now and then; size whenever the store is over its part.
        if self.dead_letters_over_part()
            || self
                .last_retention
                .is_none_or(|at| at.elapsed() >= RETENTION_GAP)
        {
            self.last_retention = Some(Instant::now());
            self.apply_retention(&db)?;
        }
        let live = self.inner.accounting.lock().bytes;
        for compaction in self.inner.space.maintain(&db, live) {
            if let Some(compactor) = &self.compactor {
                let _ = compactor.send(compaction);
            }
        }
        self.inner.publish_gauges();
        Ok(())
    }

    /// Deletes the oldest dead letters beyond the store's size or age, and counts them.
    fn apply_retention(&self, db: &DB) -> Result<(), BufferError> {
        let options = &self.inner.options;
        let max_bytes = options.budget.dead_letters;
        let max_age_ms = options.dead_letter_max_age_ms;
        let counts: Vec<(String, (u64, u64))> = self
            .inner
            .dead_letters
            .lock()
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        let mut total: u64 = counts.iter().map(|(_, (_, bytes))| bytes).sum();
        let now = time::OffsetDateTime::now_utc();
        for (output, (events, _)) in counts {
            if events == 0 {
                continue;
            }
            let mut batch = WriteBatch::default();
            let start_total = total;
            let (deleted, freed) =
                dead_letter::expire(db, &mut batch, &output, |_, freed, failed_at| {
                    let too_big = max_bytes > 0 && start_total - freed > max_bytes;
                    let too_old = max_age_ms > 0
                        && time::OffsetDateTime::parse(
                            failed_at,
                            &time::format_description::well_known::Rfc3339,
                        )
                        .is_ok_and(|at| (now - at).whole_milliseconds() > i128::from(max_age_ms));
                    too_big || too_old
                })?;
            if deleted == 0 {
                continue;
            }
            db.write(batch)?;
            self.inner.space.note_dead_letters_deleted(freed);
            total -= freed;
            let mut counts = self.inner.dead_letters.lock();
            let entry = counts.entry(output.clone()).or_default();
            entry.0 = entry.0.saturating_sub(deleted);
            entry.1 = entry.1.saturating_sub(freed);
            drop(counts);
            let metrics = &self.inner.metrics;
            metrics
                .dead_letter_expired
                .get_or_create(&metrics.output(&output))
                .inc_by(deleted);
            tracing::warn!(%output, deleted, "dead letters deleted by the store's retention (deadLetter.maxBytes / maxAge)");
        }
        Ok(())
    }
}
