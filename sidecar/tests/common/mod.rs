//! What the buffer's integration tests share: the options they open a buffer with, and the
//! events they append.

use std::path::Path;

use tally_sidecar::buffer::{Budget, BufferOptions};
use tally_sidecar::config::{BufferProfile, Durability, WhenFull};
use tally_sidecar::event::Event;

/// A 1 GiB buffer under the `collector` profile with one output, `up`, synced on every commit;
/// tests change what they need with struct update syntax.
pub fn options(dir: &Path, dedup_window_ms: u64) -> BufferOptions {
    BufferOptions {
        dir: dir.to_path_buf(),
        durability: Durability::Sync,
        budget: Budget::new(1 << 30, None, None).expect("valid budget"),
        when_full: WhenFull::Reject,
        profile: BufferProfile::Collector,
        dedup_window_ms,
        outputs: vec!["up".into()],
        shared: false,
        max_lag: Vec::new(),
        dead_letter_max_age_ms: 0,
    }
}

/// The event `(source, id)`, stored as `{"id":…,"source":…}`.
pub fn event(source: &str, id: &str) -> Event {
    Event::new(
        format!(r#"{{"id":"{id}","source":"{source}"}}"#),
        source,
        id,
    )
}
