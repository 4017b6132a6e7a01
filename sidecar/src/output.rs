//! Where batches go: an OpenMeter-compatible ingest API (OpenMeter itself or another Tally
//! collector) or standard output. An output only sends; retries, backoff and dead-lettering are
//! the forwarder's.

use std::io::Write;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http::StatusCode;

use crate::buffer::Record;
use crate::config::{OutputConfig, OutputKind};
use crate::metrics::ErrorKind;

/// Why a send failed, and whether trying again can help.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendError {
    /// 408, 429, 5xx, network errors and timeouts.
    Retryable {
        kind: ErrorKind,
        /// The HTTP status, when the upstream answered.
        status: Option<u16>,
        detail: String,
        retry_after: Option<Duration>,
    },
    /// Other 4xx: the upstream will never take this batch.
    Permanent { status: u16, detail: String },
}

/// A configured output.
pub enum Output {
    Http(HttpOutput),
    Stdout,
}

impl Output {
    /// Builds the output; `index` locates it in the configuration for error messages.
    pub fn build(config: &OutputConfig, index: usize) -> anyhow::Result<Output> {
        Ok(match config.kind {
            OutputKind::Openmeter | OutputKind::Collector => {
                Output::Http(HttpOutput::new(config, index)?)
            }
            OutputKind::Stdout => Output::Stdout,
        })
    }

    /// Sends one batch.
    pub async fn send(&self, records: &[Record]) -> Result<(), SendError> {
        match self {
            Output::Http(http) => http.send(records).await,
            Output::Stdout => write_stdout(records),
        }
    }
}

/// A JSON array of the events, byte for byte as they were accepted.
pub fn json_array(records: &[Record]) -> Bytes {
    let len = records.iter().map(|r| r.json.len() + 1).sum::<usize>() + 2;
    let mut body = BytesMut::with_capacity(len);
    body.put_u8(b'[');
    for (i, record) in records.iter().enumerate() {
        if i > 0 {
            body.put_u8(b',');
        }
        body.put_slice(&record.json);
    }
    body.put_u8(b']');
    body.freeze()
}

fn write_stdout(records: &[Record]) -> Result<(), SendError> {
    let mut out = std::io::stdout().lock();
    let result = records
        .iter()
        .try_for_each(|r| out.write_all(&r.json).and_then(|()| out.write_all(b"\n")))
        .and_then(|()| out.flush());
    result.map_err(|e| SendError::Retryable {
        kind: ErrorKind::network,
        status: None,
        detail: format!("cannot write to stdout: {e}"),
        retry_after: None,
    })
}

/// POSTs batches to `{url}/api/v1/events` as `application/cloudevents-batch+json`.
pub struct HttpOutput {
    client: reqwest::Client,
    endpoint: reqwest::Url,
    token: Option<String>,
}

impl HttpOutput {
    fn new(config: &OutputConfig, index: usize) -> anyhow::Result<HttpOutput> {
        let base = config
            .url
            .as_deref()
            .ok_or_else(|| anyhow::anyhow!("outputs.targets[{index}].url is required"))?;
        let endpoint =
            reqwest::Url::parse(&format!("{}/api/v1/events", base.trim_end_matches('/')))
                .map_err(|e| anyhow::anyhow!("outputs.targets[{index}].url {base:?}: {e}"))?;
        let token = config.resolved_token(index)?;
        let client = reqwest::Client::builder()
            .timeout(config.timeout.get())
            .connect_timeout(config.timeout.get().min(Duration::from_secs(5)))
            .pool_idle_timeout(Duration::from_secs(60))
            .user_agent(concat!("tally-sidecar/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(HttpOutput {
            client,
            endpoint,
            token,
        })
    }

    async fn send(&self, records: &[Record]) -> Result<(), SendError> {
        let mut request = self
            .client
            .post(self.endpoint.clone())
            .header(
                http::header::CONTENT_TYPE,
                "application/cloudevents-batch+json",
            )
            .body(json_array(records));
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.map_err(|e| SendError::Retryable {
            kind: if e.is_timeout() {
                ErrorKind::timeout
            } else {
                ErrorKind::network
            },
            status: None,
            detail: format!("POST {}: {}", self.endpoint, error_chain(&e)),
            retry_after: None,
        })?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let retry_after = response
            .headers()
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        let body = response.text().await.unwrap_or_default();
        let detail = format!(
            "POST {} answered {status}: {}",
            self.endpoint,
            body.chars().take(500).collect::<String>()
        );
        if is_retryable(status) {
            Err(SendError::Retryable {
                kind: ErrorKind::retryable_status,
                status: Some(status.as_u16()),
                detail,
                retry_after,
            })
        } else {
            Err(SendError::Permanent {
                status: status.as_u16(),
                detail,
            })
        }
    }
}

/// 408, 429 and 5xx may succeed later; other statuses will not.
pub fn is_retryable(status: StatusCode) -> bool {
    status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
        || status.is_server_error()
}

/// `Retry-After` as delay-seconds or an HTTP date.
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let when = httpdate_parse(value)?;
    Some(
        when.duration_since(std::time::SystemTime::now())
            .unwrap_or_default(),
    )
}

fn httpdate_parse(value: &str) -> Option<std::time::SystemTime> {
    // IMF-fixdate, the form RFC 9110 requires senders to use: "Sun, 06 Nov 1994 08:49:37 GMT".
    let format = time::macros::format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    );
    let parsed = time::PrimitiveDateTime::parse(value, &format).ok()?;
    Some(parsed.assume_utc().into())
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_forms() {
        assert_eq!(parse_retry_after("3"), Some(Duration::from_secs(3)));
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon"), None);
    }

    #[test]
    fn retryable_statuses() {
        for code in [408, 429, 500, 502, 503, 504] {
            assert!(is_retryable(StatusCode::from_u16(code).expect("status")));
        }
        for code in [400, 401, 403, 404, 413, 422] {
            assert!(!is_retryable(StatusCode::from_u16(code).expect("status")));
        }
    }

    #[test]
    fn array_is_the_events_verbatim() {
        let records = [
            Record {
                seq: 1,
                json: Bytes::from_static(br#"{"id":"a"}"#),
            },
            Record {
                seq: 2,
                json: Bytes::from_static(br#"{"id":"b","x":1}"#),
            },
        ];
        assert_eq!(
            &json_array(&records)[..],
            br#"[{"id":"a"},{"id":"b","x":1}]"#
        );
    }
}
