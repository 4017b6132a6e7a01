//! Concurrent senders that keep a sidecar under load while a test kills it, cuts its power or
//! restarts it, and record exactly which events were acknowledged.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use parking_lot::Mutex;
use std::time::Duration;

use serde_json::Value;
use tokio::task::JoinHandle;

use crate::events::{event, id_of};
use crate::poll_until;

/// What the senders observed.
#[derive(Default)]
struct Observed {
    acked: Mutex<Vec<String>>,
    acked_count: AtomicUsize,
    refused: AtomicUsize,
    unavailable: AtomicUsize,
}

/// `count` tasks, each posting batches of `batch` fresh events (`<prefix>-<task>-<n>-<i>`) to
/// the same URL until stopped. A 204 records the batch as acknowledged; a 503 (starting,
/// stopping) and a refused connection (the sidecar is down) are counted and retried with new
/// events, as a real client would; any other answer fails the test.
pub struct Senders {
    stop: Arc<AtomicBool>,
    observed: Arc<Observed>,
    tasks: Vec<JoinHandle<()>>,
}

impl Senders {
    pub fn start(count: usize, batch: usize, prefix: &str, url: String) -> Senders {
        Self::start_paced(count, batch, prefix, url, Duration::ZERO)
    }

    /// [`Senders::start`], each task pausing `pause` after every batch: a steady load instead of
    /// as much as the sidecar takes.
    pub fn start_paced(
        count: usize,
        batch: usize,
        prefix: &str,
        url: String,
        pause: Duration,
    ) -> Senders {
        let stop = Arc::new(AtomicBool::new(false));
        let observed = Arc::new(Observed::default());
        let tasks = (0..count)
            .map(|task| {
                tokio::spawn(send(
                    format!("{prefix}-{task}"),
                    batch,
                    url.clone(),
                    pause,
                    stop.clone(),
                    observed.clone(),
                ))
            })
            .collect();
        Senders {
            stop,
            observed,
            tasks,
        }
    }

    /// Events acknowledged so far.
    pub fn acked_count(&self) -> usize {
        self.observed.acked_count.load(Ordering::Relaxed)
    }

    /// Waits until at least `target` events are acknowledged.
    pub async fn wait_acked(&self, target: usize, within: Duration, what: &str) {
        poll_until(within, what, async || {
            (self.acked_count() >= target).then_some(())
        })
        .await;
    }

    /// Stops sending; returns the ids of every acknowledged event, with the counts of refused
    /// connections and 503 answers.
    pub async fn stop(self) -> Stopped {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.unwrap_or_else(|e| panic!("sender task: {e}"));
        }
        let acked = self.observed.acked.lock().clone();
        Stopped {
            acked,
            refused: self.observed.refused.load(Ordering::Relaxed),
            unavailable: self.observed.unavailable.load(Ordering::Relaxed),
        }
    }
}

/// What the senders saw, once stopped.
pub struct Stopped {
    pub acked: Vec<String>,
    /// Requests whose connection failed (the sidecar was down).
    pub refused: usize,
    /// Requests answered 503.
    pub unavailable: usize,
}

async fn send(
    prefix: String,
    batch: usize,
    url: String,
    pause: Duration,
    stop: Arc<AtomicBool>,
    observed: Arc<Observed>,
) {
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    let mut seq = 0;
    while !stop.load(Ordering::Relaxed) {
        let events: Vec<Value> = (0..batch)
            .map(|i| event(&format!("{prefix}-{seq}-{i}")))
            .collect();
        seq += 1;
        let result = http
            .post(&url)
            .header("content-type", "application/cloudevents-batch+json")
            .body(Value::Array(events.clone()).to_string())
            .send()
            .await;
        match result {
            Ok(response) if response.status() == 204 => {
                observed
                    .acked
                    .lock()
                    .extend(events.iter().map(|e| id_of(e).to_string()));
                observed.acked_count.fetch_add(batch, Ordering::Relaxed);
                if !pause.is_zero() {
                    tokio::time::sleep(pause).await;
                }
            }
            Ok(response) => {
                assert_eq!(
                    response.status(),
                    503,
                    "unexpected answer to a valid batch: {}",
                    response.text().await.unwrap_or_default()
                );
                observed.unavailable.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                // The pause only keeps the loop from spinning on refused connections.
                observed.refused.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}
