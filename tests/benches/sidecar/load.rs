//! The load generator: N tasks, each owning one keep-alive HTTP/1.1 connection, POSTing batches
//! of events. Closed loop (send as fast as answers come back) or open loop (each connection on a
//! fixed schedule; latency counts from the scheduled send time, so a slow answer that delays the
//! next send is charged to the server, not hidden).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request, StatusCode, header};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::events::{BATCH_CONTENT_TYPE, EventFactory};

/// The path every ingest POST goes to.
pub const INGEST_PATH: &str = "/api/v1/events";

/// How a load run is shaped. Every run is bounded by `duration`; `max_requests` bounds it further.
#[derive(Clone, Debug)]
pub struct LoadSpec {
    pub connections: usize,
    pub events_per_request: usize,
    pub duration: Duration,
    pub max_requests: Option<u64>,
    /// Open loop at this many requests per second in total; `None` is closed loop.
    pub requests_per_second: Option<f64>,
}

/// What a load run observed.
#[derive(Debug, Default)]
pub struct LoadReport {
    pub elapsed: Duration,
    /// Requests answered 204 (for the ingest API: events durably acknowledged).
    pub acked_requests: u64,
    /// Other answers, by status code.
    pub failed_statuses: BTreeMap<u16, u64>,
    /// Requests that got no answer (connection refused, reset, ...).
    pub transport_errors: u64,
    /// Latency of every acknowledged request.
    pub latencies: Latencies,
    /// When the first and the last acknowledgement arrived.
    pub first_ack_at: Option<Instant>,
    pub last_ack_at: Option<Instant>,
    /// For each connection that got an acknowledgement: the sequence number of the last event of
    /// its last acknowledged request. Every acknowledged event was sent before one of these.
    pub last_acked: Vec<u64>,
    /// The sequence number of the first event of every acknowledged request (each request's events
    /// are numbered on from it), for telling which events were acknowledged.
    pub acked_firsts: Vec<u64>,
}

impl LoadReport {
    pub fn acked_events(&self, events_per_request: usize) -> u64 {
        self.acked_requests * events_per_request as u64
    }

    pub fn requests_per_second(&self) -> f64 {
        self.acked_requests as f64 / self.elapsed.as_secs_f64()
    }

    pub fn failures(&self) -> u64 {
        self.failed_statuses.values().sum::<u64>() + self.transport_errors
    }
}

/// Latency samples, in microseconds.
#[derive(Debug, Default)]
pub struct Latencies(Vec<u64>);

impl Latencies {
    /// The q-quantile (nearest rank), in milliseconds.
    pub fn quantile_ms(&self, q: f64) -> Option<f64> {
        if self.0.is_empty() {
            return None;
        }
        let mut sorted = self.0.clone();
        sorted.sort_unstable();
        let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
        Some(sorted[rank - 1] as f64 / 1000.0)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }
}

/// Runs `spec` against `POST http://addr{INGEST_PATH}` with bodies from `factory`.
pub async fn run(addr: SocketAddr, spec: &LoadSpec, factory: Arc<EventFactory>) -> LoadReport {
    let started = Instant::now();
    let deadline = started + spec.duration;
    let issued = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::with_capacity(spec.connections);
    for index in 0..spec.connections {
        let connection = Connection {
            addr,
            index,
            spec: spec.clone(),
            factory: factory.clone(),
            issued: issued.clone(),
            started,
            deadline,
        };
        tasks.push(tokio::spawn(connection.drive()));
    }
    let mut report = LoadReport::default();
    for task in tasks {
        match task.await {
            Ok(part) => {
                report.acked_requests += part.acked_requests;
                report.transport_errors += part.transport_errors;
                for (status, n) in part.failed_statuses {
                    *report.failed_statuses.entry(status).or_default() += n;
                }
                report.latencies.0.extend(part.latencies.0);
                report.first_ack_at = earliest(report.first_ack_at, part.first_ack_at);
                report.last_ack_at = report.last_ack_at.max(part.last_ack_at);
                report.last_acked.extend(part.last_acked);
                report.acked_firsts.extend(part.acked_firsts);
            }
            Err(_) => report.transport_errors += 1,
        }
    }
    report.elapsed = started.elapsed();
    report
}

/// One load-generating task and its connection.
struct Connection {
    addr: SocketAddr,
    index: usize,
    spec: LoadSpec,
    factory: Arc<EventFactory>,
    issued: Arc<AtomicU64>,
    started: Instant,
    deadline: Instant,
}

/// A connection that failed this many times in a row gives up.
const MAX_CONSECUTIVE_TRANSPORT_ERRORS: u32 = 20;

impl Connection {
    async fn drive(self) -> LoadReport {
        let mut report = LoadReport::default();
        let interval = self.spec.requests_per_second.map(|rate| {
            Duration::from_secs_f64(self.spec.connections as f64 / rate.max(f64::MIN_POSITIVE))
        });
        // Staggers the connections' schedules evenly across one interval.
        let offset = interval
            .map(|i| i.mul_f64(self.index as f64 / self.spec.connections as f64))
            .unwrap_or_default();
        let mut sender: Option<SendRequest<Full<Bytes>>> = None;
        let mut consecutive_errors = 0;
        let mut sequence: u32 = 0;
        let mut last_acked = None;
        loop {
            if Instant::now() >= self.deadline {
                break;
            }
            if let Some(max) = self.spec.max_requests
                && self.issued.fetch_add(1, Ordering::Relaxed) >= max
            {
                break;
            }
            // The body is made before the clock starts: generating load is not the server's time.
            let (first, body) = self.factory.numbered_batch(self.spec.events_per_request);
            let sent_at = match interval {
                Some(interval) => {
                    let scheduled = self.started + offset + interval * sequence;
                    sequence = sequence.saturating_add(1);
                    if scheduled >= self.deadline {
                        break;
                    }
                    tokio::time::sleep_until(scheduled).await;
                    scheduled
                }
                None => Instant::now(),
            };
            let outcome = match sender.as_mut() {
                Some(s) => post(s, self.addr, body).await,
                None => match connect(self.addr).await {
                    Ok(mut s) => {
                        let outcome = post(&mut s, self.addr, body).await;
                        sender = Some(s);
                        outcome
                    }
                    Err(e) => Err(e),
                },
            };
            match outcome {
                Ok(StatusCode::NO_CONTENT) => {
                    let now = Instant::now();
                    consecutive_errors = 0;
                    report.acked_requests += 1;
                    report.latencies.0.push((now - sent_at).as_micros() as u64);
                    report.first_ack_at.get_or_insert(now);
                    report.last_ack_at = Some(now);
                    last_acked = Some(first + self.spec.events_per_request as u64 - 1);
                    report.acked_firsts.push(first);
                }
                Ok(status) => {
                    consecutive_errors = 0;
                    *report.failed_statuses.entry(status.as_u16()).or_default() += 1;
                }
                Err(_) => {
                    report.transport_errors += 1;
                    sender = None;
                    consecutive_errors += 1;
                    if consecutive_errors >= MAX_CONSECUTIVE_TRANSPORT_ERRORS {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
        report.last_acked.extend(last_acked);
        report
    }
}

fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

async fn connect<B>(addr: SocketAddr) -> anyhow::Result<SendRequest<B>>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("cannot connect to {addr}"))?;
    stream.set_nodelay(true)?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .with_context(|| format!("HTTP handshake with {addr} failed"))?;
    tokio::spawn(connection);
    Ok(sender)
}

async fn post(
    sender: &mut SendRequest<Full<Bytes>>,
    addr: SocketAddr,
    body: Bytes,
) -> anyhow::Result<StatusCode> {
    let request = Request::builder()
        .method(Method::POST)
        .uri(INGEST_PATH)
        .header(header::HOST, addr.to_string())
        .header(header::CONTENT_TYPE, BATCH_CONTENT_TYPE)
        .body(Full::new(body))?;
    sender.ready().await?;
    let response = sender.send_request(request).await?;
    let status = response.status();
    // Read the whole answer so the connection can carry the next request.
    response.into_body().collect().await?;
    Ok(status)
}

/// `GET http://addr{path}` on a fresh connection: the status and the body.
pub async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<(StatusCode, Bytes)> {
    let mut sender = connect::<Empty<Bytes>>(addr).await?;
    let request = Request::builder()
        .method(Method::GET)
        .uri(path)
        .header(header::HOST, addr.to_string())
        .body(Empty::new())?;
    let response = sender.send_request(request).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, body))
}
