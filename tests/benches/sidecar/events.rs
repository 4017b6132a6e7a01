//! The events the benchmark sends: realistic API-usage CloudEvents of about 250 bytes, each with a
//! unique id `<prefix>-<n>` so the sidecar's dedup never drops one and an upstream can count them.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// The Content-Type of every ingest request.
pub const BATCH_CONTENT_TYPE: &str = "application/cloudevents-batch+json";

/// Makes request bodies (JSON arrays of events) with ids that are unique within the factory.
pub struct EventFactory {
    prefix: String,
    next: AtomicU64,
}

impl EventFactory {
    /// Ids are `<prefix>-<n>` with n counting from 0; the prefix must not end in a digit run
    /// that could be confused with n (it is separated by the last `-`).
    pub fn new(prefix: impl Into<String>) -> Self {
        EventFactory {
            prefix: prefix.into(),
            next: AtomicU64::new(0),
        }
    }

    /// A `application/cloudevents-batch+json` body of `count` fresh events.
    pub fn batch(&self, count: usize) -> Bytes {
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
                    r#"{{"specversion":"1.0","id":"{prefix}-{n}","source":"//api.example.com/gateway","#,
                    r#""type":"com.example.api.request","subject":"customer-{customer:04}","time":"{now}","#,
                    r#""data":{{"method":"POST","route":"/v1/orders","status":200,"#,
                    r#""durationMs":{duration},"bytes":{bytes}}}}}"#
                ),
                prefix = self.prefix,
                n = n,
                customer = n % 997,
                now = now,
                duration = 3 + n % 250,
                bytes = 200 + (n * 37) % 9000,
            );
        }
        body.push(']');
        Bytes::from(body)
    }
}

/// The sequence number `n` of an id made by an [`EventFactory`].
pub fn sequence_of(id: &str) -> Option<u64> {
    id.rsplit('-').next()?.parse().ok()
}
