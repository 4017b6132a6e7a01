//! The HTTP side: the OpenMeter-compatible ingest API, health, metrics and the admin API.
//! An ingest request is answered 204 only after its events are in the durable buffer.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::body::Body;
use axum::extract::{Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use subtle::ConstantTimeEq;

use crate::buffer::{AppendError, DurableBuffer};
use crate::config::PodIdentity;
use crate::event::{self, BodyShape, Event, InvalidEvent};
use crate::metrics::{DropReason, Metrics, RejectReason};

/// Shared state of the HTTP handlers.
pub struct AppState {
    pub buffer: DurableBuffer,
    pub metrics: Arc<Metrics>,
    pub auth_token: Option<String>,
    pub max_body_bytes: usize,
    /// Longest time to receive a request body.
    pub read_timeout: std::time::Duration,
    pub exclude_namespaces: HashSet<String>,
    /// This pod's namespace and name, stamped on events that lack them.
    pub pod: PodIdentity,
    /// Makes room when the buffer is full and some output has a `maxLag`.
    /// Set on SIGTERM: ingest answers 503 from then on.
    pub stopping: AtomicBool,
    /// The configured outputs' names, so the admin API can tell an unknown one.
    pub outputs: Vec<String>,
}

/// The router of the sidecar's HTTP server.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/api/v1/events", post(ingest))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/admin/buffer/stats", get(admin_stats))
        .route("/admin/dead-letter/replay", post(admin_replay))
        .with_state(state)
}

/// An RFC 9457 problem, as OpenMeter answers them.
struct Problem {
    status: StatusCode,
    kind: &'static str,
    title: &'static str,
    detail: String,
    retry_after: Option<u64>,
}

impl Problem {
    fn new(status: StatusCode, kind: &'static str, title: &'static str, detail: String) -> Self {
        Problem {
            status,
            kind,
            title,
            detail,
            retry_after: None,
        }
    }

    fn retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "type": format!("https://tally.dev/problems/{}", self.kind),
            "title": self.title,
            "status": self.status.as_u16(),
            "detail": self.detail,
            "instance": format!("urn:tally:request:{}", uuid::Uuid::new_v4()),
        });
        let mut response = (self.status, body.to_string()).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(seconds) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"tally\""),
            );
        }
        response
    }
}

fn authorized(state: &AppState, headers: &HeaderMap) -> bool {
    let Some(expected) = &state.auth_token else {
        return true;
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_token)
        .unwrap_or_default();
    // The comparison takes the same time wherever the first difference is, so the token cannot
    // be guessed a byte at a time from response times.
    bool::from(presented.as_bytes().ct_eq(expected.as_bytes()))
}

/// The token of an `Authorization: Bearer <token>` value. Auth schemes are case-insensitive
/// (RFC 7235 2.1), so `bearer` and `BEARER` are the same scheme.
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim_start().split_once([' ', '\t'])?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|token| !token.is_empty())
}

fn unauthorized(headers: &HeaderMap) -> Problem {
    let detail = if headers.contains_key(header::AUTHORIZATION) {
        "the bearer token is not the one configured in ingest.authToken"
    } else {
        "this collector requires `Authorization: Bearer <token>` (ingest.authToken is set)"
    };
    Problem::new(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "Unauthorized",
        detail.into(),
    )
}

/// How the request body is to be read, from its Content-Type and `ce-*` headers.
fn body_mode(headers: &HeaderMap) -> Result<Option<BodyShape>, Problem> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let media_type = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    let binary = headers.contains_key("ce-specversion");
    let unsupported = |detail: String| {
        Problem::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported-media-type",
            "Unsupported Media Type",
            detail,
        )
    };
    match media_type.as_str() {
        "application/json" if binary => Ok(None),
        "application/json" => Ok(Some(BodyShape::Either)),
        "application/cloudevents+json" => Ok(Some(BodyShape::Single)),
        "application/cloudevents-batch+json" => Ok(Some(BodyShape::Batch)),
        _ if binary => Err(unsupported(format!(
            "a binary-mode CloudEvent (ce-* headers) must have Content-Type application/json, got {content_type:?}"
        ))),
        "" => Err(unsupported(
            "Content-Type is missing; use application/cloudevents+json, application/cloudevents-batch+json or application/json".into(),
        )),
        _ => Err(unsupported(format!(
            "Content-Type {content_type:?} is not supported; use application/cloudevents+json, application/cloudevents-batch+json or application/json"
        ))),
    }
}

fn too_large(limit: usize) -> Problem {
    Problem::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "body-too-large",
        "Payload Too Large",
        format!(
            "the request body is larger than ingest.maxBodyBytes ({limit} bytes); split the batch"
        ),
    )
}

fn invalid(e: InvalidEvent) -> Problem {
    Problem::new(
        StatusCode::BAD_REQUEST,
        "invalid-event",
        "Bad Request",
        e.to_string(),
    )
}

async fn ingest(State(state): State<Arc<AppState>>, request: Request) -> Response {
    match ingest_inner(&state, request).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(Rejection {
            problem,
            reason,
            events,
        }) => {
            // Every event of a refused request is counted as received and rejected, so
            // received = accepted + rejected + dropped{excluded_namespace} always holds.
            state.metrics.events_received.inc_by(events);
            state.metrics.reject(reason, events);
            problem.into_response()
        }
    }
}

/// A refused request: the answer, the metric reason, and how many events it held
/// (1 where the body was not read or could not be counted).
struct Rejection {
    problem: Problem,
    reason: RejectReason,
    events: u64,
}

impl Problem {
    fn because(self, reason: RejectReason, events: u64) -> Rejection {
        Rejection {
            problem: self,
            reason,
            events,
        }
    }
}

async fn ingest_inner(state: &AppState, request: Request) -> Result<(), Rejection> {
    let metrics = &state.metrics;
    if state.stopping.load(Ordering::SeqCst) {
        return Err(Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "stopping",
            "Service Unavailable",
            "the collector is shutting down; retry against a running instance".into(),
        )
        .retry_after(5)
        .because(RejectReason::stopping, 1));
    }
    let (parts, body) = request.into_parts();
    if !authorized(state, &parts.headers) {
        return Err(unauthorized(&parts.headers).because(RejectReason::unauthorized, 1));
    }
    let mode = body_mode(&parts.headers)
        .map_err(|p| p.because(RejectReason::unsupported_media_type, 1))?;
    let limit = state.max_body_bytes;
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > drain_cap(limit) as u64) {
        // Too large even to drain: answer at once.
        return Err(too_large(limit).because(RejectReason::too_large, 1));
    }
    let bytes = tokio::time::timeout(state.read_timeout, read_body(body, limit, declared))
        .await
        .map_err(|_| {
            Problem::new(
                StatusCode::REQUEST_TIMEOUT,
                "read-timeout",
                "Request Timeout",
                format!(
                    "the request body did not arrive within ingest.readTimeout ({}); send it at once, or raise the timeout",
                    humantime::format_duration(state.read_timeout)
                ),
            )
            .because(RejectReason::read_timeout, 1)
        })?
        .map_err(|p| {
            let reason = if p.status == StatusCode::PAYLOAD_TOO_LARGE {
                RejectReason::too_large
            } else {
                RejectReason::invalid
            };
            p.because(reason, 1)
        })?;
    let parsed = match mode {
        Some(shape) => event::parse_structured(&bytes, shape),
        None => event::parse_binary(&parts.headers, &bytes),
    };
    let mut events = parsed.map_err(|e| {
        let count = e.events as u64;
        invalid(e).because(RejectReason::invalid, count)
    })?;
    for event in &mut events {
        event.stamp(&state.pod);
    }
    let total = events.len() as u64;
    let events: Vec<Event> = if state.exclude_namespaces.is_empty() {
        events
    } else {
        events
            .into_iter()
            .filter(|e| {
                e.namespace
                    .as_ref()
                    .is_none_or(|ns| !state.exclude_namespaces.contains(ns))
            })
            .collect()
    };
    let excluded = total - events.len() as u64;
    let stored = total - excluded;
    if events.is_empty() {
        metrics.events_received.inc_by(total);
        metrics.drop_events(DropReason::excluded_namespace, excluded);
        return Ok(());
    }
    // With a maxLag output, the writer moves that output's oldest events aside before it
    // decides whether these fit, so even a burst faster than the maintenance pass is stored.
    match state.buffer.append(events).await {
        Ok(appended) => {
            metrics.events_received.inc_by(total);
            if excluded > 0 {
                metrics.drop_events(DropReason::excluded_namespace, excluded);
            }
            metrics
                .events_accepted
                .inc_by((appended.stored + appended.duplicates) as u64);
            metrics
                .events_deduplicated
                .inc_by(appended.duplicates as u64);
            if appended.dropped > 0 {
                metrics.drop_events(DropReason::buffer_full, appended.dropped);
            }
            Ok(())
        }
        // Excluded events were dropped on purpose whatever happens to the rest; count them so.
        Err(e) => {
            if excluded > 0 {
                metrics.events_received.inc_by(excluded);
                metrics.drop_events(DropReason::excluded_namespace, excluded);
            }
            Err(append_problem(e, stored))
        }
    }
}

fn append_problem(e: AppendError, events: u64) -> Rejection {
    match e {
        AppendError::Full { .. } | AppendError::DiskFull { .. } => Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "buffer-full",
            "Service Unavailable",
            e.to_string(),
        )
        .retry_after(1)
        .because(RejectReason::buffer_full, events),
        AppendError::TooLarge { .. } => Problem::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body-too-large",
            "Payload Too Large",
            e.to_string(),
        )
        .because(RejectReason::too_large, events),
        AppendError::Closed => Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "stopping",
            "Service Unavailable",
            "the collector is shutting down; the events were not stored. Retry against a running instance".into(),
        )
        .retry_after(5)
        .because(RejectReason::stopping, events),
        AppendError::Storage(_) => Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "storage-error",
            "Service Unavailable",
            format!(
                "the events were not stored: {e}. Check the data directory's disk (space, permissions) and the collector's log"
            ),
        )
        .retry_after(5)
        .because(RejectReason::storage_error, events),
    }
}

/// How much of an over-limit body is read and discarded before answering 413, so the client
/// finishes sending and reads the answer instead of seeing its connection reset.
fn drain_cap(limit: usize) -> usize {
    limit.saturating_mul(4).max(8 << 20)
}

/// Reads the body up to `limit` bytes; past it, discards up to [`drain_cap`] and answers 413.
/// Reads the body, up to `limit` bytes. A body that arrives in one frame (the usual case on
/// loopback and for small requests) is returned as it is, without a copy; `declared` (the
/// Content-Length, when sent) sizes the buffer of one that arrives in several.
async fn read_body(
    mut body: Body,
    limit: usize,
    declared: Option<u64>,
) -> Result<bytes::Bytes, Problem> {
    use http_body_util::BodyExt;
    let mut first: Option<bytes::Bytes> = None;
    let mut buffer = bytes::BytesMut::new();
    let mut seen = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            Problem::new(
                StatusCode::BAD_REQUEST,
                "unreadable-body",
                "Bad Request",
                format!("the request body could not be read: {e}"),
            )
        })?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        seen = seen.saturating_add(data.len());
        if seen <= limit {
            if first.is_none() && buffer.is_empty() {
                first = Some(data);
                continue;
            }
            if let Some(first) = first.take() {
                let expected = declared.map_or(0, |n| n.min(limit as u64) as usize);
                buffer.reserve(expected.max(seen));
                buffer.extend_from_slice(&first);
            }
            buffer.extend_from_slice(&data);
        } else if seen > drain_cap(limit) {
            break;
        }
    }
    if seen > limit {
        Err(too_large(limit))
    } else if let Some(first) = first {
        Ok(first)
    } else {
        Ok(buffer.freeze())
    }
}

/// Alive while the process can make progress: only a dead buffer writer thread fails it. A full
/// disk or a failing write does not (the buffer recovers by itself once the disk allows), so a
/// liveness probe never restarts a pod into the same full disk.
async fn healthz(State(state): State<Arc<AppState>>) -> Response {
    if state.buffer.writer_stopped() && !state.stopping.load(Ordering::SeqCst) {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "the buffer writer thread stopped; nothing can be stored. Restart the collector (acknowledged events are safe on disk)\n",
        )
            .into_response()
    } else {
        (StatusCode::OK, "ok\n").into_response()
    }
}

/// Ready means accepting events; the body says why not.
async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    let not_ready = |why: String| (StatusCode::SERVICE_UNAVAILABLE, why).into_response();
    if state.stopping.load(Ordering::SeqCst) {
        not_ready("stopping\n".into())
    } else if state.buffer.writer_stopped() {
        not_ready("the buffer writer thread stopped\n".into())
    } else if let Some(e) = state.buffer.failure() {
        not_ready(format!(
            "buffer storage refuses writes ({e}); retrying every second. Free disk space if it is full; acknowledged events are safe\n"
        ))
    } else if state.buffer.is_full() {
        not_ready("buffer full (buffer.maxBytes); waiting for outputs to deliver\n".into())
    } else {
        (StatusCode::OK, "ready\n").into_response()
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    state.buffer.refresh_gauges();
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
        .into_response()
}

async fn admin_stats(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if !authorized(&state, &headers) {
        return unauthorized(&headers).into_response();
    }
    axum::Json(state.buffer.stats()).into_response()
}

#[derive(Deserialize)]
struct ReplayQuery {
    output: Option<String>,
}

async fn admin_replay(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(query): Query<ReplayQuery>,
) -> Response {
    if !authorized(&state, &headers) {
        return unauthorized(&headers).into_response();
    }
    if let Some(name) = &query.output
        && !state.outputs.contains(name)
    {
        return Problem::new(
            StatusCode::NOT_FOUND,
            "unknown-output",
            "Not Found",
            format!(
                "no output named {name:?}; the configured outputs are: {}",
                state.outputs.join(", ")
            ),
        )
        .into_response();
    }
    match state.buffer.replay_dead_letters(query.output).await {
        Ok(replayed) => axum::Json(serde_json::json!({ "replayed": replayed })).into_response(),
        Err(e) => storage_problem(e).into_response(),
    }
}

fn storage_problem(e: crate::buffer::BufferError) -> Problem {
    Problem::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "storage-error",
        "Internal Server Error",
        e.to_string(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.insert(*k, HeaderValue::from_static(v));
        }
        map
    }

    #[test]
    fn content_types() {
        let mode = |ct| body_mode(&headers(&[("content-type", ct)])).ok().flatten();
        assert_eq!(mode("application/json"), Some(BodyShape::Either));
        assert_eq!(
            mode("application/cloudevents+json; charset=utf-8"),
            Some(BodyShape::Single)
        );
        assert_eq!(
            mode("Application/CloudEvents-Batch+JSON"),
            Some(BodyShape::Batch)
        );
        assert!(body_mode(&headers(&[("content-type", "text/plain")])).is_err());
        assert!(body_mode(&headers(&[])).is_err());
        let binary = headers(&[
            ("content-type", "application/json"),
            ("ce-specversion", "1.0"),
        ]);
        assert!(matches!(body_mode(&binary), Ok(None)));
    }

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        for value in [
            "Bearer t0k",
            "bearer t0k",
            "BEARER t0k",
            "bEaReR  t0k ",
            "Bearer\tt0k",
        ] {
            assert_eq!(bearer_token(value), Some("t0k"), "{value:?}");
        }
        for value in ["Basic t0k", "Bearer", "Bearer ", "Bearert0k", "t0k"] {
            assert_eq!(bearer_token(value), None, "{value:?}");
        }
    }
}
