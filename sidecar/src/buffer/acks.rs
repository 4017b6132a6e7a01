//! Cursors and acknowledgements: the only place a consumer's cursor moves.
//!
//! A reader takes a [`Ticket`] for every batch it hands out (and for every stretch it steps
//! over because the records are addressed to other outputs). Tickets of one consumer are
//! issued in sequence order and settle in any order; the cursor advances only over the
//! contiguous prefix of settled tickets, so a batch still in flight is never passed, whichever
//! broker pattern hands batches to however many outputs. `maxLag` is the one other mover, and it
//! goes through here too ([`AckTracker::skip_to`]).

use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};

/// A claim on one handed-out range of a consumer's log: `(previous ticket's upto, upto]`.
/// Settling it (delivered or dead-lettered) lets the cursor pass it once every earlier ticket
/// is settled too. A ticket dropped unsettled keeps the cursor before it: its events are
/// delivered again after a restart.
#[derive(Debug, Clone)]
#[must_use = "a batch's ticket must be settled for the cursor to move past it"]
pub struct Ticket {
    pub(super) consumer: String,
    pub(super) upto: u64,
}

impl Ticket {
    /// The highest sequence this ticket covers.
    pub fn upto(&self) -> u64 {
        self.upto
    }
}

#[derive(Debug, Default)]
struct ConsumerAcks {
    /// Everything up to here is settled.
    cursor: u64,
    /// The highest sequence handed out.
    issued: u64,
    /// Handed-out ranges not yet passed by the cursor, in sequence order: (upto, settled).
    outstanding: VecDeque<(u64, bool)>,
}

impl ConsumerAcks {
    /// Pops the settled prefix; returns the new cursor if it moved.
    fn advance(&mut self) -> Option<u64> {
        let mut moved = None;
        while let Some(&(upto, true)) = self.outstanding.front() {
            self.outstanding.pop_front();
            if upto > self.cursor {
                self.cursor = upto;
                moved = Some(upto);
            }
        }
        moved
    }
}

/// Every consumer's cursor and outstanding tickets.
#[derive(Debug, Default)]
pub(super) struct AckTracker {
    consumers: Mutex<HashMap<String, ConsumerAcks>>,
}

impl AckTracker {
    /// Starts from the durable cursors found at open.
    pub fn new(cursors: impl IntoIterator<Item = (String, u64)>) -> AckTracker {
        let consumers = cursors
            .into_iter()
            .map(|(name, cursor)| {
                let acks = ConsumerAcks {
                    cursor,
                    issued: cursor,
                    outstanding: VecDeque::new(),
                };
                (name, acks)
            })
            .collect();
        AckTracker {
            consumers: Mutex::new(consumers),
        }
    }

    pub fn cursor(&self, consumer: &str) -> u64 {
        self.consumers
            .lock()
            .get(consumer)
            .map_or(0, |acks| acks.cursor)
    }

    /// Hands out `(last issued, upto]`. A range at or below what was already issued or passed
    /// (a reader racing a `maxLag` skip) gets a ticket that settles nothing.
    pub fn issue(&self, consumer: &str, upto: u64) -> Ticket {
        let mut consumers = self.consumers.lock();
        let acks = consumers.entry(consumer.to_string()).or_default();
        if upto > acks.issued && upto > acks.cursor {
            acks.issued = upto;
            acks.outstanding.push_back((upto, false));
        }
        Ticket {
            consumer: consumer.to_string(),
            upto,
        }
    }

    /// Marks the ticket settled; returns the consumer's new cursor if it moved.
    pub fn settle(&self, ticket: &Ticket) -> Option<u64> {
        let mut consumers = self.consumers.lock();
        let acks = consumers.get_mut(&ticket.consumer)?;
        if let Ok(i) = acks
            .outstanding
            .binary_search_by_key(&ticket.upto, |(upto, _)| *upto)
        {
            acks.outstanding[i].1 = true;
        }
        acks.advance()
    }

    /// Moves the cursor to at least `upto` whatever is outstanding below it (`maxLag` moved
    /// those events to the dead-letter store); returns the new cursor if it moved.
    pub fn skip_to(&self, consumer: &str, upto: u64) -> Option<u64> {
        let mut consumers = self.consumers.lock();
        let acks = consumers.entry(consumer.to_string()).or_default();
        while acks.outstanding.front().is_some_and(|(u, _)| *u <= upto) {
            acks.outstanding.pop_front();
        }
        acks.issued = acks.issued.max(upto);
        let mut moved = None;
        if upto > acks.cursor {
            acks.cursor = upto;
            moved = Some(upto);
        }
        acks.advance().or(moved)
    }

    /// The lowest cursor of `consumers`: everything at or below it may be deleted.
    pub fn floor<'a>(&self, consumers: impl IntoIterator<Item = &'a str>) -> u64 {
        let all = self.consumers.lock();
        consumers
            .into_iter()
            .map(|name| all.get(name).map_or(0, |acks| acks.cursor))
            .min()
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_moves_only_over_a_settled_prefix() {
        let tracker = AckTracker::new([("c".to_string(), 10)]);
        let a = tracker.issue("c", 20);
        let b = tracker.issue("c", 30);
        let c = tracker.issue("c", 40);
        assert_eq!(tracker.settle(&b), None, "20 is still in flight");
        assert_eq!(tracker.settle(&c), None);
        assert_eq!(tracker.cursor("c"), 10);
        assert_eq!(tracker.settle(&a), Some(40), "all three settled");
        assert_eq!(tracker.cursor("c"), 40);
    }

    #[test]
    fn skip_passes_outstanding_tickets_and_late_settles_do_nothing() {
        let tracker = AckTracker::default();
        let a = tracker.issue("c", 5);
        let b = tracker.issue("c", 9);
        assert_eq!(tracker.skip_to("c", 6), Some(6));
        assert_eq!(tracker.settle(&a), None, "already passed");
        let stale = tracker.issue("c", 6);
        assert_eq!(tracker.settle(&stale), None);
        assert_eq!(tracker.settle(&b), Some(9));
        assert_eq!(tracker.floor(["c", "other"]), 0);
        assert_eq!(tracker.floor(["c"]), 9);
    }
}
