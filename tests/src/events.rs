//! CloudEvents the tests send: valid by default, unique ids, a known shape.

use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::{Value, json};

/// The `source` of events built by [`event`].
pub const SOURCE: &str = "tally-tests";

/// A valid usage event with this id, from [`SOURCE`].
pub fn event(id: &str) -> Value {
    event_from(SOURCE, id)
}

/// A valid usage event with this source and id. Attribute order is fixed so tests can check it is
/// preserved on the way to the upstream.
pub fn event_from(source: &str, id: &str) -> Value {
    json!({
        "specversion": "1.0",
        "id": id,
        "source": source,
        "type": "api-calls",
        "subject": "customer-1",
        "time": "2024-01-01T00:00:00Z",
        "data": { "tokens": 1, "model": "small" },
    })
}

/// A valid event whose `data` pads it to roughly `size` bytes of JSON.
pub fn padded_event(id: &str, size: usize) -> Value {
    let mut event = event(id);
    event["data"]["padding"] = Value::String("x".repeat(size.saturating_sub(200)));
    event
}

/// The `id` attribute of an event, panicking when it has none.
pub fn id_of(event: &Value) -> &str {
    event["id"]
        .as_str()
        .unwrap_or_else(|| panic!("event without a string id: {event}"))
}

/// Unique event ids `<prefix>-<n>`, safe to share between concurrent senders.
#[derive(Debug)]
pub struct EventIds {
    prefix: String,
    next: AtomicU64,
}

impl EventIds {
    /// Ids `<prefix>-0`, `<prefix>-1`, ...
    pub fn new(prefix: &str) -> Self {
        EventIds {
            prefix: prefix.to_string(),
            next: AtomicU64::new(0),
        }
    }

    /// The next unused id.
    pub fn next_id(&self) -> String {
        format!(
            "{}-{}",
            self.prefix,
            self.next.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// `count` valid events with fresh ids.
    pub fn batch(&self, count: usize) -> Vec<Value> {
        (0..count).map(|_| event(&self.next_id())).collect()
    }
}
