//! The HTTP server's connections: accepted here and served with hyper, so that what
//! `axum::serve` leaves open is bounded. Request headers must arrive within
//! `ingest.readTimeout` (else the connection is closed), a keep-alive connection waits at most
//! `ingest.idleTimeout` for its next request, and at most `ingest.maxConnections` are open: at
//! the limit the connection idle the longest is closed to make room, so idle connections can
//! never starve ingest; only when every connection has a request in flight is a new one
//! refused, with a 503 it can read.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use parking_lot::Mutex;
use std::time::{Duration, Instant};

use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;

use crate::config::IngestConfig;
use crate::metrics::{CloseReason, Metrics};

/// After the server asked a connection without a request in flight to close, how long it may
/// take (a partly sent request head keeps hyper waiting) before it is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// How long a refused connection is given to read its 503 before it is dropped.
const REFUSAL_LINGER: Duration = Duration::from_secs(1);
/// The pause after a failed accept (out of file descriptors, say), so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The limits of the server's connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest time to receive a request's headers, the next request's on a keep-alive
    /// connection included.
    pub header_read_timeout: Duration,
    /// Longest time a connection may go without a request in flight.
    pub idle_timeout: Duration,
    /// Most connections open at once.
    pub max_connections: usize,
}

impl Limits {
    /// The limits the `ingest` configuration sets.
    pub fn from_config(ingest: &IngestConfig) -> Limits {
        Limits {
            header_read_timeout: ingest.read_timeout.get(),
            idle_timeout: ingest.effective_idle_timeout(),
            max_connections: ingest.max_connections as usize,
        }
    }
}

/// One open connection, as the accept loop and its own task see it.
struct Tracked {
    /// Requests being handled on it.
    in_flight: AtomicUsize,
    /// When it last became idle, in milliseconds since the server started.
    idle_since_ms: AtomicU64,
    /// Asks its task to close it.
    close: Notify,
    /// Tells its task that the last request in flight finished, so the idle clock starts.
    became_idle: Notify,
}

/// The connections counted against the limit. An evicted connection leaves this at once, even
/// while it is still closing, so the one that replaces it is admitted without waiting.
struct Registry {
    open: HashMap<u64, Arc<Tracked>>,
    next_id: u64,
}

/// Shared by the accept loop and the connection tasks.
struct Server {
    limits: Limits,
    metrics: Arc<Metrics>,
    started: Instant,
    registry: Mutex<Registry>,
}

impl Server {
    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Counts a new connection in, evicting the longest-idle one at the limit (the oldest of
    /// those idle since the same millisecond). `None` when
    /// every open connection has a request in flight.
    fn admit(&self) -> Option<(u64, Arc<Tracked>)> {
        let mut registry = self.registry.lock();
        if registry.open.len() >= self.limits.max_connections {
            let victim = registry
                .open
                .iter()
                .filter(|(_, t)| t.in_flight.load(Ordering::SeqCst) == 0)
                .min_by_key(|(id, t)| (t.idle_since_ms.load(Ordering::SeqCst), **id))
                .map(|(id, _)| *id)?;
            if let Some(victim) = registry.open.remove(&victim) {
                victim.close.notify_one();
                self.metrics.close_connection(CloseReason::evicted);
            }
        }
        let id = registry.next_id;
        registry.next_id += 1;
        let tracked = Arc::new(Tracked {
            in_flight: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(self.now_ms()),
            close: Notify::new(),
            became_idle: Notify::new(),
        });
        registry.open.insert(id, tracked.clone());
        Some((id, tracked))
    }
}

/// Marks a request in flight on its connection for as long as it lives.
struct InFlight {
    tracked: Arc<Tracked>,
    server: Arc<Server>,
}

impl InFlight {
    fn start(tracked: &Arc<Tracked>, server: &Arc<Server>) -> InFlight {
        tracked.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight {
            tracked: tracked.clone(),
            server: server.clone(),
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.tracked
            .idle_since_ms
            .store(self.server.now_ms(), Ordering::SeqCst);
        if self.tracked.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.tracked.became_idle.notify_one();
        }
    }
}

/// Serves `router` on `listener` until `shutdown` completes, then stops accepting, lets every
/// request in flight finish (each connection closes after its current request) and returns.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) {
    let server = Arc::new(Server {
        limits,
        metrics,
        started: Instant::now(),
        registry: Mutex::new(Registry {
            open: HashMap::new(),
            next_id: 0,
        }),
    });
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true);
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    let mut refusals = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            () = &mut shutdown => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            Some(_) = refusals.join_next(), if !refusals.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let Some((id, tracked)) = server.admit() else {
            server.metrics.connections_refused.inc();
            refusals.spawn(refuse(stream));
            continue;
        };
        server.metrics.connections.inc();
        connections.spawn(connection(
            stream,
            id,
            tracked,
            server.clone(),
            http.clone(),
            router.clone(),
            stop_rx.clone(),
        ));
    }
    drop(listener);
    let _ = stop_tx.send(true);
    while connections.join_next().await.is_some() {}
    refusals.abort_all();
}

/// Serves one connection until the client closes it or the server does: at the header read
/// timeout (in hyper), after `idleTimeout` without a request, when evicted, or on shutdown.
async fn connection(
    stream: TcpStream,
    id: u64,
    tracked: Arc<Tracked>,
    server: Arc<Server>,
    http: http1::Builder,
    router: Router,
    mut stop: watch::Receiver<bool>,
) {
    let service = {
        let tracked = tracked.clone();
        let server = server.clone();
        hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
            let in_flight = InFlight::start(&tracked, &server);
            let mut router = router.clone();
            async move {
                let response: Result<_, Infallible> =
                    tower_service::Service::call(&mut router, request).await;
                drop(in_flight);
                response
            }
        })
    };
    let conn = http.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let limits = server.limits;
    // Set once the server asked the connection to close, with the reason to count.
    let mut closing: Option<(Instant, Option<CloseReason>)> = None;
    let result = loop {
        let idle = tracked.in_flight.load(Ordering::SeqCst) == 0;
        let wake = match closing {
            Some((since, _)) => since + CLOSE_GRACE,
            None if idle => {
                let idle_since = tracked.idle_since_ms.load(Ordering::SeqCst);
                server.started + Duration::from_millis(idle_since) + limits.idle_timeout
            }
            None => Instant::now() + limits.idle_timeout,
        };
        tokio::select! {
            result = conn.as_mut() => break result,
            () = tokio::time::sleep_until(wake.into()) => {
                let idle = tracked.in_flight.load(Ordering::SeqCst) == 0;
                match closing {
                    // Still open after the grace with nothing in flight: a request head that
                    // never completes. Dropping it is what closing means here.
                    Some((_, reason)) if idle => {
                        if let Some(reason) = reason {
                            server.metrics.close_connection(reason);
                        }
                        forget(&server, id);
                        return;
                    }
                    // A request is still in flight: it may finish; look again after a grace.
                    Some((_, reason)) => closing = Some((Instant::now(), reason)),
                    None => {
                        let idle_since = tracked.idle_since_ms.load(Ordering::SeqCst);
                        let idle_for = server.now_ms().saturating_sub(idle_since);
                        if idle && Duration::from_millis(idle_for) >= limits.idle_timeout {
                            conn.as_mut().graceful_shutdown();
                            closing = Some((Instant::now(), Some(CloseReason::idle_timeout)));
                        }
                    }
                }
            }
            () = tracked.became_idle.notified(), if closing.is_none() => {}
            // Evicted: counted by the accept loop, which already let another connection in.
            () = tracked.close.notified(), if closing.is_none() => {
                conn.as_mut().graceful_shutdown();
                closing = Some((Instant::now(), None));
            }
            _ = stop.wait_for(|stop| *stop), if closing.is_none() => {
                conn.as_mut().graceful_shutdown();
                closing = Some((Instant::now(), None));
            }
        }
    };
    match (result, closing) {
        (Err(e), _) if e.is_timeout() => {
            server.metrics.close_connection(CloseReason::header_timeout)
        }
        (Err(e), _) => tracing::debug!(error = %e, "connection ended with an error"),
        (Ok(()), Some((_, Some(reason)))) => server.metrics.close_connection(reason),
        (Ok(()), _) => {}
    }
    forget(&server, id);
}

/// Takes a finished connection out of the count.
fn forget(server: &Server, id: u64) {
    server.registry.lock().open.remove(&id);
    server.metrics.connections.dec();
}

/// Answers a connection over the limit with a 503 it can read, then closes it. The request is
/// not read first: a client that is still sending gets the answer as soon as it looks, and the
/// connection is drained briefly so closing it does not reset the answer away.
async fn refuse(mut stream: TcpStream) {
    let body = serde_json::json!({
        "type": "https://tally.dev/problems/too-many-connections",
        "title": "Service Unavailable",
        "status": 503,
        "detail": "every connection this collector allows (ingest.maxConnections) has a request in flight; retry shortly, or raise ingest.maxConnections",
        "instance": format!("urn:tally:request:{}", uuid::Uuid::new_v4()),
    })
    .to_string();
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/problem+json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(REFUSAL_LINGER, async {
        stream.write_all(answer.as_bytes()).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 4096];
        while stream.read(&mut sink).await? > 0 {}
        Ok::<(), std::io::Error>(())
    })
    .await;
}
