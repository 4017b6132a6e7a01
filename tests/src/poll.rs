//! Waiting for a condition with a deadline instead of sleeping a guessed amount of time.
//!
//! [`poll`] is the one polling loop of the workspace's tests, benchmarks and test harnesses (`tally-e2e` starts its
//! control plane with it too); the other functions here are the forms most waits take.

use std::collections::HashSet;
use std::fmt::Display;
use std::ops::ControlFlow;
use std::time::{Duration, Instant};

/// How often a condition is checked again.
pub const INTERVAL: Duration = Duration::from_millis(20);

/// How often a condition is checked again when every check costs a Kubernetes API call or more.
pub const API_INTERVAL: Duration = Duration::from_millis(200);

/// What one check of a condition found: done, with a value, or not yet, with the state it saw.
pub trait Check {
    type Done;
    type Pending;
    fn into_flow(self) -> ControlFlow<Self::Done, Self::Pending>;
}

/// `Some` is done; `None` is not yet.
impl<T> Check for Option<T> {
    type Done = T;
    type Pending = ();
    fn into_flow(self) -> ControlFlow<T> {
        self.map_or(ControlFlow::Continue(()), ControlFlow::Break)
    }
}

/// `Ok` is done; `Err` is not yet, and says why.
impl<T, E> Check for Result<T, E> {
    type Done = T;
    type Pending = E;
    fn into_flow(self) -> ControlFlow<T, E> {
        match self {
            Ok(value) => ControlFlow::Break(value),
            Err(last) => ControlFlow::Continue(last),
        }
    }
}

/// As it says; the form for a wait that can also end early, e.g. with `Break(Err(..))` when the process it waits
/// for has exited.
impl<B, C> Check for ControlFlow<B, C> {
    type Done = B;
    type Pending = C;
    fn into_flow(self) -> Self {
        self
    }
}

/// Calls `check` every `interval` until it is done, and returns what it was done with; `Err` with the state the last
/// check saw when `within` elapsed first.
///
/// In a task given to `tokio::spawn`, a check that borrows from the task makes its future not `Send` (the borrow
/// is generic over the call's lifetime): there, let each check own what it reads (`move || { let x = x.clone();
/// async move { .. } }`).
pub async fn poll<C: Check>(
    within: Duration,
    interval: Duration,
    mut check: impl AsyncFnMut() -> C,
) -> Result<C::Done, C::Pending> {
    let deadline = Instant::now() + within;
    loop {
        match check().await.into_flow() {
            ControlFlow::Break(done) => return Ok(done),
            ControlFlow::Continue(last) if Instant::now() >= deadline => return Err(last),
            ControlFlow::Continue(_) => tokio::time::sleep(interval).await,
        }
    }
}

/// Calls `check` until it returns `Some`, and returns that value. Panics, naming `what`, when
/// `within` has elapsed first; the last state is best put into `what` by the caller's assertion
/// after a `None`, so the panic message says what was still missing.
pub async fn poll_until<T>(
    within: Duration,
    what: &str,
    check: impl AsyncFnMut() -> Option<T>,
) -> T {
    poll_until_every(within, INTERVAL, what, check).await
}

/// [`poll_until`], checking every `interval`.
pub async fn poll_until_every<T>(
    within: Duration,
    interval: Duration,
    what: &str,
    check: impl AsyncFnMut() -> Option<T>,
) -> T {
    poll(within, interval, check)
        .await
        .unwrap_or_else(|()| panic!("timed out after {within:?} waiting: {what}"))
}

/// Calls `check` every `interval` until it returns `Ok`, and returns that value. Panics, naming `what` and the last
/// `Err`, when `within` has elapsed first.
pub async fn poll_until_ok<T, E: Display>(
    within: Duration,
    interval: Duration,
    what: &str,
    check: impl AsyncFnMut() -> Result<T, E>,
) -> T {
    poll(within, interval, check).await.unwrap_or_else(|last| {
        panic!("timed out after {within:?} waiting: {what}; last check: {last}")
    })
}

/// Like [`poll_until`], but gives up quietly: `None` when `within` elapsed first.
pub async fn poll_for<T>(within: Duration, check: impl AsyncFnMut() -> Option<T>) -> Option<T> {
    poll(within, INTERVAL, check).await.ok()
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
