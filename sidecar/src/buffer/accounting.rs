//! In-memory accounting of what the log holds: runs of sequence numbers ("chunks") with their
//! event counts, bytes and append time. It decides what `maxBytes` allows, what `dropOldest`
//! removes and what trimming deletes, without scanning RocksDB.

use std::collections::VecDeque;

/// Events per chunk when the accounting is rebuilt from disk at open.
pub(super) const REBUILD_CHUNK: u64 = 1024;

/// A run of consecutive sequence numbers appended together; the unit of trimming and dropping.
#[derive(Debug, Clone, Copy)]
pub(super) struct Chunk {
    pub first: u64,
    pub last: u64,
    pub events: u64,
    pub bytes: u64,
    pub appended_ms: u64,
}

impl Chunk {
    /// Events of this chunk after `floor`: those a consumer at `floor` has not read yet.
    pub fn unread(&self, floor: u64) -> u64 {
        if self.last <= floor {
            0
        } else if self.first > floor {
            self.events
        } else {
            (self.last - floor).min(self.events)
        }
    }
}

#[derive(Debug, Default)]
pub(super) struct Accounting {
    pub chunks: VecDeque<Chunk>,
    pub events: u64,
    pub bytes: u64,
}

impl Accounting {
    pub fn push(&mut self, chunk: Chunk) {
        self.events += chunk.events;
        self.bytes += chunk.bytes;
        self.chunks.push_back(chunk);
    }

    /// Puts back a chunk taken by `pop_front` (a failed write did not delete it).
    pub fn push_front(&mut self, chunk: Chunk) {
        self.events += chunk.events;
        self.bytes += chunk.bytes;
        self.chunks.push_front(chunk);
    }

    pub fn pop_front(&mut self) -> Option<Chunk> {
        let chunk = self.chunks.pop_front()?;
        self.events -= chunk.events;
        self.bytes -= chunk.bytes;
        Some(chunk)
    }

    /// Takes every chunk wholly at or below `floor`, oldest first.
    pub fn take_through(&mut self, floor: u64) -> Vec<Chunk> {
        let mut taken = Vec::new();
        while self.chunks.front().is_some_and(|c| c.last <= floor) {
            taken.extend(self.pop_front());
        }
        taken
    }

    /// Bytes of the chunks wholly at or below `floor`: what `take_through(floor)` would take.
    pub fn deletable_bytes(&self, floor: u64) -> u64 {
        self.chunks
            .iter()
            .take_while(|c| c.last <= floor)
            .map(|c| c.bytes)
            .sum()
    }

    /// Buffered events with a sequence above `cursor`.
    pub fn lag(&self, cursor: u64) -> u64 {
        let mut lag = 0;
        for chunk in self.chunks.iter().rev() {
            if chunk.last <= cursor {
                break;
            }
            lag += chunk.unread(cursor);
        }
        lag
    }

    /// Milliseconds since the oldest buffered event was appended.
    pub fn oldest_appended_ms(&self) -> Option<u64> {
        self.chunks.front().map(|c| c.appended_ms)
    }

    /// Builds the accounting of a log read in sequence order, `REBUILD_CHUNK` events a chunk.
    pub fn rebuild(records: impl Iterator<Item = (u64, u64, u64)>) -> Accounting {
        let mut accounting = Accounting::default();
        let mut current: Option<Chunk> = None;
        for (seq, size, appended_ms) in records {
            match current.as_mut() {
                Some(chunk) if chunk.events < REBUILD_CHUNK => {
                    chunk.last = seq;
                    chunk.events += 1;
                    chunk.bytes += size;
                }
                _ => {
                    if let Some(chunk) = current.take() {
                        accounting.push(chunk);
                    }
                    current = Some(Chunk {
                        first: seq,
                        last: seq,
                        events: 1,
                        bytes: size,
                        appended_ms,
                    });
                }
            }
        }
        if let Some(chunk) = current {
            accounting.push(chunk);
        }
        accounting
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_and_trim_follow_the_floor() {
        let mut accounting = Accounting::rebuild((1..=3000).map(|seq| (seq, 10, 0)));
        assert_eq!(accounting.chunks.len(), 3);
        assert_eq!(accounting.lag(0), 3000);
        assert_eq!(accounting.lag(1500), 1500);
        let range = |chunks: Vec<Chunk>| {
            chunks
                .first()
                .map(|f| f.first)
                .zip(chunks.last().map(|l| l.last))
        };
        assert_eq!(range(accounting.take_through(1500)), Some((1, 1024)));
        assert_eq!(accounting.events, 3000 - 1024);
        assert_eq!(range(accounting.take_through(1500)), None);
        assert_eq!(range(accounting.take_through(u64::MAX)), Some((1025, 3000)));
        assert_eq!((accounting.events, accounting.bytes), (0, 0));
    }
}
