//! Waiting for a condition with a deadline instead of sleeping a guessed amount of time.

use std::collections::HashSet;
use std::time::{Duration, Instant};

/// How often a condition is checked again.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Calls `check` until it returns `Some`, and returns that value. Panics, naming `what`, when
/// `within` has elapsed first; the last state is best put into `what` by the caller's assertion
/// after a `None`, so the panic message says what was still missing.
pub async fn poll_until<T>(
    within: Duration,
    what: &str,
    mut check: impl AsyncFnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {within:?} waiting for {what}");
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Like [`poll_until`], but gives up quietly: `None` when `within` elapsed first.
pub async fn poll_for<T>(within: Duration, mut check: impl AsyncFnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(value) = check().await {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Polls `delivered` until it holds every id of `wanted`. Returns the ids still missing after
/// `within` (empty when all arrived), so each receiver can panic with its own diagnostics.
pub async fn missing_after<'a>(
    wanted: &[&'a str],
    within: Duration,
    delivered: impl Fn() -> HashSet<String>,
) -> Vec<&'a str> {
    let all = poll_for(within, async || {
        let got = delivered();
        wanted.iter().all(|id| got.contains(*id)).then_some(())
    })
    .await;
    if all.is_some() {
        return Vec::new();
    }
    let got = delivered();
    wanted
        .iter()
        .copied()
        .filter(|id| !got.contains(*id))
        .collect()
}
