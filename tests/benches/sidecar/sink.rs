//! In-process HTTP/1.1 servers that answer every request 204 after reading its body: the bare
//! server of the loopback ceiling, the blackhole upstream of the ingest run, and the counting
//! upstream of the drain run (which parses each forwarded array and ticks off the event ids).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

use crate::events::sequence_of;

/// What a sink does with a request body before answering 204.
#[derive(Clone)]
pub enum SinkMode {
    /// Read it and throw it away.
    Discard,
    /// Parse it as an array of events and record each id.
    CountIds(Arc<IdTally>),
}

/// A running sink; dropping it closes the listener and every connection.
pub struct HttpSink {
    addr: SocketAddr,
    requests: Arc<AtomicU64>,
    accept: JoinHandle<()>,
}

impl HttpSink {
    /// Serves on `listener` until dropped.
    pub fn serve(listener: TcpListener, mode: SinkMode) -> anyhow::Result<Self> {
        let addr = listener
            .local_addr()
            .context("sink listener has no address")?;
        let requests = Arc::new(AtomicU64::new(0));
        let counter = requests.clone();
        let accept = tokio::spawn(async move {
            // Owned by the accept task, so aborting it aborts every connection too.
            let mut connections = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else { continue };
                        let _ = stream.set_nodelay(true);
                        let mode = mode.clone();
                        let counter = counter.clone();
                        connections.spawn(async move {
                            let service = service_fn(move |request| {
                                answer(request, mode.clone(), counter.clone())
                            });
                            let _ = http1::Builder::new()
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        });
                    }
                    Some(_) = connections.join_next(), if !connections.is_empty() => {}
                }
            }
        });
        Ok(HttpSink {
            addr,
            requests,
            accept,
        })
    }

    /// Binds 127.0.0.1 on `port` (0: any free port) and serves there.
    pub async fn bind(port: u16, mode: SinkMode) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", port))
            .await
            .with_context(|| format!("cannot listen on 127.0.0.1:{port}"))?;
        Self::serve(listener, mode)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Requests answered so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
}

impl Drop for HttpSink {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn answer(
    request: Request<Incoming>,
    mode: SinkMode,
    counter: Arc<AtomicU64>,
) -> Result<Response<Empty<Bytes>>, Infallible> {
    let status = match request.into_body().collect().await {
        Ok(body) => {
            if let SinkMode::CountIds(tally) = &mode {
                tally.record(&body.to_bytes());
            }
            StatusCode::NO_CONTENT
        }
        Err(_) => StatusCode::BAD_REQUEST,
    };
    counter.fetch_add(1, Ordering::Relaxed);
    let mut response = Response::new(Empty::new());
    *response.status_mut() = status;
    Ok(response)
}

/// Which event sequence numbers an upstream has received: unique ids, duplicates, and bodies or
/// ids it could not read.
pub struct IdTally {
    seen: Mutex<Vec<u64>>,
    unique: AtomicU64,
    duplicates: AtomicU64,
    unreadable: AtomicU64,
}

#[derive(Deserialize)]
struct IdOnly<'a> {
    #[serde(borrow)]
    id: std::borrow::Cow<'a, str>,
}

impl IdTally {
    /// Tracks sequence numbers below `capacity`; larger ones count as unreadable.
    pub fn new(capacity: u64) -> Self {
        IdTally {
            seen: Mutex::new(vec![0; capacity.div_ceil(64) as usize]),
            unique: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            unreadable: AtomicU64::new(0),
        }
    }

    fn record(&self, body: &[u8]) {
        let Ok(events) = serde_json::from_slice::<Vec<IdOnly>>(body) else {
            self.unreadable.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let Ok(mut seen) = self.seen.lock() else {
            return;
        };
        let (mut fresh, mut again, mut bad) = (0, 0, 0);
        for event in events {
            let Some(n) = sequence_of(&event.id) else {
                bad += 1;
                continue;
            };
            let Some(word) = seen.get_mut((n / 64) as usize) else {
                bad += 1;
                continue;
            };
            let bit = 1u64 << (n % 64);
            if *word & bit == 0 {
                *word |= bit;
                fresh += 1;
            } else {
                again += 1;
            }
        }
        drop(seen);
        self.unique.fetch_add(fresh, Ordering::Relaxed);
        self.duplicates.fetch_add(again, Ordering::Relaxed);
        self.unreadable.fetch_add(bad, Ordering::Relaxed);
    }

    /// How many of the events numbered `first .. first + count`, for each `first` of `firsts`,
    /// were never received.
    pub fn missing(&self, firsts: &[u64], count: usize) -> u64 {
        let Ok(seen) = self.seen.lock() else {
            return firsts.len() as u64 * count as u64;
        };
        let mut missing = 0;
        for first in firsts {
            for n in *first..first + count as u64 {
                let received = seen
                    .get((n / 64) as usize)
                    .is_some_and(|word| word & (1u64 << (n % 64)) != 0);
                if !received {
                    missing += 1;
                }
            }
        }
        missing
    }

    /// Distinct events received.
    pub fn unique(&self) -> u64 {
        self.unique.load(Ordering::Relaxed)
    }

    /// Events received more than once (at-least-once delivery allows a few).
    pub fn duplicates(&self) -> u64 {
        self.duplicates.load(Ordering::Relaxed)
    }

    /// Bodies that were not a JSON array of events, plus ids not made by this run.
    pub fn unreadable(&self) -> u64 {
        self.unreadable.load(Ordering::Relaxed)
    }
}
