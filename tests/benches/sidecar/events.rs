//! The events the benchmark sends: realistic API-usage CloudEvents of about 250 bytes, each with a
//! unique id `<prefix>-<n>` so the sidecar's dedup never drops one and an upstream can count them.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// The Content-Type of every ingest request.
pub const BATCH_CONTENT_TYPE: &str = "application/cloudevents-batch+json";
/// The `source` of every event.
pub const SOURCE: &str = "//api.example.com/gateway";

/// Makes request bodies (JSON arrays of events) with ids that are unique within the factory.
pub struct EventFactory {
    prefix: String,
    next: AtomicU64,
}

impl EventFactory {
    /// Ids are `<prefix>-<n>` with n counting from 0; the prefix must not end in a digit run
    /// that could be confused with n (it is separated by the last `-`).
    pub fn new(prefix: impl Into<String>) -> Self {
        Self::starting_at(prefix, 0)
    }

    /// Like [`EventFactory::new`], with n counting from `first` (so an upstream that ticks off
    /// sequence numbers can tell this factory's events from an earlier one's).
    pub fn starting_at(prefix: impl Into<String>, first: u64) -> Self {
        EventFactory {
            prefix: prefix.into(),
            next: AtomicU64::new(first),
        }
    }

    /// The id of event number `n`.
    pub fn id(&self, n: u64) -> String {
        format!("{}-{n}", self.prefix)
    }

    /// A `application/cloudevents-batch+json` body of `count` fresh events.
    pub fn batch(&self, count: usize) -> Bytes {
        self.numbered_batch(count).1
    }

    /// A body of `count` fresh events, and the sequence number of its first event.
    pub fn numbered_batch(&self, count: usize) -> (u64, Bytes) {
        let first = self.next.fetch_add(count as u64, Ordering::Relaxed);
        let now = OffsetDateTime::now_utc();
        // Millisecond precision, as SDKs send it.
        let now = now
            .replace_millisecond(now.millisecond())
            .unwrap_or(now)
            .format(&Rfc3339)
            .unwrap_or_else(|_| "2026-01-01T00:00:00Z".to_owned());
        let mut body = String::with_capacity(count * 272 + 2);
        body.push('[');
        for n in first..first + count as u64 {
            if n != first {
                body.push(',');
            }
            // Writing into a String cannot fail.
            let _ = write!(
                body,
                concat!(
                    r#"{{"specversion":"1.0","id":"{prefix}-{n}","source":"{source}","#,
                    r#""type":"com.example.api.request","subject":"customer-{customer:04}","time":"{now}","#,
                    r#""data":{{"method":"POST","route":"/v1/orders","status":200,"#,
                    r#""durationMs":{duration},"bytes":{bytes}}}}}"#
                ),
                prefix = self.prefix,
                n = n,
                source = SOURCE,
                customer = n % 997,
                now = now,
                duration = 3 + n % 250,
                bytes = 200 + (n * 37) % 9000,
            );
        }
        body.push(']');
        (first, Bytes::from(body))
    }
}

/// The sequence number `n` of an id made by an [`EventFactory`].
pub fn sequence_of(id: &str) -> Option<u64> {
    id.rsplit('-').next()?.parse().ok()
}
