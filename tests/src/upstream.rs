//! [`TestUpstream`]: a fake of OpenMeter's ingest API (`POST /api/v1/events`) on 127.0.0.1.
//!
//! It is the one fake in these tests: the machine has no internet access, and only a fake can be
//! told to fail on command. It is a real HTTP/1.1 server on a real socket, it records every request
//! byte for byte, and it answers the way OpenMeter does: 204 with an empty body on success,
//! `application/problem+json` errors otherwise.

use std::collections::HashSet;
use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, Method, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::oneshot;
use tokio::task::{JoinHandle, JoinSet};

use crate::poll::missing_after;
use crate::ports::unused_port;

/// How the upstream answers `POST /api/v1/events`; switchable while a test runs.
#[derive(Debug, Clone, PartialEq)]
pub enum Behaviour {
    /// 204, empty body: the batch is ingested.
    Accept,
    /// This status (e.g. 503, 429, 400) with a problem+json body and an optional `Retry-After`.
    Fail {
        status: u16,
        retry_after: Option<RetryAfter>,
    },
    /// 400 for a batch holding an event whose id starts with this prefix (a "poison" event that
    /// OpenMeter would reject), 204 for any other batch.
    RejectIdsStartingWith(String),
}

/// The `Retry-After` header of a failing answer.
#[derive(Debug, Clone, PartialEq)]
pub enum RetryAfter {
    /// `Retry-After: <seconds>`.
    Seconds(u64),
    /// `Retry-After: <HTTP-date>`, this far after the moment of the answer.
    DateIn(Duration),
}

/// One request the upstream received, and what it answered.
#[derive(Debug, Clone)]
pub struct ReceivedRequest {
    pub method: Method,
    /// Path and query, e.g. `/api/v1/events`.
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// When the request arrived.
    pub received_at: Instant,
    /// The status the upstream answered.
    pub status: u16,
    /// The body parsed as a JSON array of events, `None` when it is not one.
    pub events: Option<Vec<Value>>,
}

impl ReceivedRequest {
    /// A header as a string, `None` when absent or not UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Whether the upstream accepted this request (2xx).
    pub fn delivered(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

#[derive(Debug)]
struct State {
    behaviour: Mutex<Behaviour>,
    /// How long each answer is held back (a slow upstream).
    delay: Mutex<Duration>,
    requests: Mutex<Vec<ReceivedRequest>>,
}

/// A running server task and the way to stop it.
struct Server {
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

/// A fake OpenMeter ingest endpoint on 127.0.0.1 that records every request and can be told to
/// accept, fail, reject or go down (connections refused) while a test runs. See the module docs.
pub struct TestUpstream {
    state: Arc<State>,
    addr: SocketAddr,
    server: Mutex<Option<Server>>,
}

impl TestUpstream {
    /// Starts accepting (204) on a free port of 127.0.0.1 ([`unused_port`]: no other test of this run gets it, even
    /// while this upstream is down).
    pub async fn start() -> TestUpstream {
        Self::start_on(Ipv4Addr::LOCALHOST.into()).await
    }

    /// [`TestUpstream::start`] on another local address, such as the one pods of a real node reach the host at.
    pub async fn start_on(ip: IpAddr) -> TestUpstream {
        // `unused_port` checks a port and hands it out; something may bind it in between (seen once in CI), so a
        // port found taken is skipped for the next one.
        let mut attempts = 0;
        let listener = loop {
            let port = unused_port();
            match TcpListener::bind((ip, port)).await {
                Ok(listener) => break listener,
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && attempts < 5 => {
                    attempts += 1
                }
                Err(e) => panic!("test upstream: cannot bind {ip}:{port}: {e}"),
            }
        };
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("test upstream: local_addr: {e}"));
        let state = Arc::new(State {
            behaviour: Mutex::new(Behaviour::Accept),
            delay: Mutex::new(Duration::ZERO),
            requests: Mutex::new(Vec::new()),
        });
        let upstream = TestUpstream {
            state,
            addr,
            server: Mutex::new(None),
        };
        upstream.serve(listener);
        upstream
    }

    /// Base URL for an output's `url` (the sidecar appends `/api/v1/events`).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Changes how the following requests are answered.
    pub fn set(&self, behaviour: Behaviour) {
        *self.state.behaviour.lock() = behaviour;
    }

    /// Holds every following answer back this long (a slow upstream); the request is recorded
    /// when it arrives. `Duration::ZERO` answers at once again.
    pub fn set_delay(&self, delay: Duration) {
        *self.state.delay.lock() = delay;
    }

    /// Answer 204 from now on.
    pub fn accept(&self) {
        self.set(Behaviour::Accept);
    }

    /// Answer `status` (with `Retry-After` when given) from now on.
    pub fn fail(&self, status: u16, retry_after: Option<RetryAfter>) {
        self.set(Behaviour::Fail {
            status,
            retry_after,
        });
    }

    /// Permanently reject every batch with 400 from now on.
    pub fn reject(&self) {
        self.fail(400, None);
    }

    /// Closes the listener and every open connection: new connections are refused until [`up`].
    /// Returns once the port is closed.
    ///
    /// [`up`]: TestUpstream::up
    pub async fn down(&self) {
        let server = self.server.lock().take();
        if let Some(server) = server {
            let _ = server.stop.send(());
            let _ = server.task.await;
        }
    }

    /// Listens again on the same port after [`down`](TestUpstream::down).
    pub async fn up(&self) {
        if self.server.lock().is_some() {
            return;
        }
        let socket = TcpSocket::new_v4().unwrap_or_else(|e| panic!("test upstream: socket: {e}"));
        socket
            .set_reuseaddr(true)
            .unwrap_or_else(|e| panic!("test upstream: SO_REUSEADDR: {e}"));
        socket
            .bind(self.addr)
            .unwrap_or_else(|e| panic!("test upstream: cannot bind {} again: {e}", self.addr));
        let listener = socket
            .listen(1024)
            .unwrap_or_else(|e| panic!("test upstream: listen on {}: {e}", self.addr));
        self.serve(listener);
    }

    /// Every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<ReceivedRequest> {
        self.state.requests.lock().clone()
    }

    /// How many requests arrived (delivery attempts, whatever the answer).
    pub fn request_count(&self) -> usize {
        self.state.requests.lock().len()
    }

    /// Arrival times of every request: the delivery attempts.
    pub fn attempt_times(&self) -> Vec<Instant> {
        self.state
            .requests
            .lock()
            .iter()
            .map(|r| r.received_at)
            .collect()
    }

    /// Every event of every request received, whatever the answer (attempts included), in
    /// arrival order; bodies that are not JSON arrays are skipped.
    pub fn received_events(&self) -> Vec<Value> {
        self.state
            .requests
            .lock()
            .iter()
            .filter_map(|r| r.events.clone())
            .flatten()
            .collect()
    }

    /// Every event of every request the upstream accepted (2xx), in arrival order, duplicates
    /// included. Panics when an accepted body was not a JSON array: the contract says it is.
    pub fn delivered_events(&self) -> Vec<Value> {
        let requests = self.state.requests.lock();
        let mut events = Vec::new();
        for request in requests.iter().filter(|r| r.delivered()) {
            match &request.events {
                Some(batch) => events.extend(batch.iter().cloned()),
                None => panic!(
                    "the upstream received a body that is not a JSON array of events: {}",
                    String::from_utf8_lossy(&request.body)
                ),
            }
        }
        events
    }

    /// Ids of the delivered events, in arrival order, duplicates included.
    pub fn delivered_ids(&self) -> Vec<String> {
        self.delivered_events()
            .iter()
            .map(|e| e["id"].as_str().unwrap_or_default().to_string())
            .collect()
    }

    /// The distinct ids delivered.
    pub fn delivered_id_set(&self) -> HashSet<String> {
        self.delivered_ids().into_iter().collect()
    }

    /// `(source, id)` of the delivered events, in arrival order, duplicates included.
    pub fn delivered_keys(&self) -> Vec<(String, String)> {
        self.delivered_events()
            .iter()
            .map(|e| {
                (
                    e["source"].as_str().unwrap_or_default().to_string(),
                    e["id"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect()
    }

    /// Waits until every id of `ids` was delivered; on timeout panics naming how many (and which)
    /// are still missing.
    pub async fn wait_delivered<'a>(
        &self,
        ids: impl IntoIterator<Item = &'a str>,
        within: Duration,
    ) {
        let wanted: Vec<&str> = ids.into_iter().collect();
        let missing = missing_after(&wanted, within, || self.delivered_id_set()).await;
        if !missing.is_empty() {
            panic!(
                "after {within:?}, {} of {} events are still not delivered to the upstream \
                 ({} requests received); first missing: {:?}",
                missing.len(),
                wanted.len(),
                self.request_count(),
                missing.iter().take(10).collect::<Vec<_>>()
            );
        }
    }

    fn serve(&self, listener: TcpListener) {
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(serve(listener, self.state.clone(), stopped));
        *self.server.lock() = Some(Server { stop, task });
    }
}

impl Drop for TestUpstream {
    fn drop(&mut self) {
        if let Some(server) = self.server.lock().take() {
            server.task.abort();
        }
    }
}

/// Accepts connections until `stopped`; then closes the listener and every connection, and
/// returns once they are all gone.
async fn serve(listener: TcpListener, state: Arc<State>, mut stopped: oneshot::Receiver<()>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut stopped => break,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let state = state.clone();
                connections.spawn(async move {
                    let service = service_fn(move |request| answer(state.clone(), request));
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    connections.shutdown().await;
}

async fn answer(
    state: Arc<State>,
    request: hyper::Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let received_at = Instant::now();
    let (parts, body) = request.into_parts();
    let body = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => Bytes::new(),
    };
    let events: Option<Vec<Value>> = serde_json::from_slice(&body).ok();
    let behaviour = state.behaviour.lock().clone();
    let ingest = parts.method == Method::POST && parts.uri.path() == "/api/v1/events";
    let (status, retry_after) = if !ingest {
        (StatusCode::NOT_FOUND, None)
    } else {
        match behaviour {
            Behaviour::Accept => (StatusCode::NO_CONTENT, None),
            Behaviour::Fail {
                status,
                retry_after,
            } => (
                StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                retry_after,
            ),
            Behaviour::RejectIdsStartingWith(prefix) => {
                let poisoned = events.iter().flatten().any(|e| {
                    e["id"]
                        .as_str()
                        .is_some_and(|id| id.starts_with(prefix.as_str()))
                });
                if poisoned {
                    (StatusCode::BAD_REQUEST, None)
                } else {
                    (StatusCode::NO_CONTENT, None)
                }
            }
        }
    };
    state.requests.lock().push(ReceivedRequest {
        method: parts.method,
        path: parts
            .uri
            .path_and_query()
            .map(|p| p.to_string())
            .unwrap_or_default(),
        headers: parts.headers,
        body,
        received_at,
        status: status.as_u16(),
        events,
    });
    let delay = *state.delay.lock();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let mut response = Response::builder().status(status);
    if let Some(retry_after) = retry_after {
        let value = match retry_after {
            RetryAfter::Seconds(seconds) => seconds.to_string(),
            RetryAfter::DateIn(after) => httpdate::fmt_http_date(SystemTime::now() + after),
        };
        response = response.header(http::header::RETRY_AFTER, value);
    }
    let body = if status.is_success() {
        Bytes::new()
    } else {
        response = response.header(http::header::CONTENT_TYPE, "application/problem+json");
        Bytes::from(
            json!({
                "type": "about:blank",
                "title": status.canonical_reason().unwrap_or("Error"),
                "status": status.as_u16(),
                "detail": "answered by the tally test upstream",
            })
            .to_string(),
        )
    };
    Ok(response
        .body(Full::new(body))
        .unwrap_or_else(|e| panic!("test upstream: building a response: {e}")))
}
