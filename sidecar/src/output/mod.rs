//! Where batches go: an OpenMeter-compatible ingest API (OpenMeter itself or another Tally
//! collector), a signed webhook, a PostgreSQL table, or standard output. An output only sends;
//! batching, retries, backoff and dead-lettering are the forwarder's.

mod http;
mod postgres;
mod webhook;

use std::io::Write;
use std::time::Duration;

use ::http::StatusCode;
use bytes::{BufMut, Bytes, BytesMut};

use crate::buffer::Record;
use crate::config::{OutputConfig, OutputKind};
use crate::metrics::ErrorKind;

pub use self::http::HttpOutput;
pub use self::postgres::PostgresOutput;
pub use self::webhook::WebhookOutput;

/// Why a send failed, and whether trying again can help.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendError {
    /// 408, 429, 5xx, network errors, timeouts, and database errors that may pass (a lost
    /// connection, a deadlock, a server that is starting or out of resources).
    Retryable {
        /// The `kind` label of `tally_output_errors_total`.
        kind: ErrorKind,
        /// The HTTP status, when the upstream answered.
        status: Option<u16>,
        /// What failed, for the logs and the dead-letter reason.
        detail: String,
        /// How long the upstream asked us to wait (`Retry-After`).
        retry_after: Option<Duration>,
    },
    /// Other 4xx, or a database error no retry can fix: the upstream will never take this batch.
    Permanent {
        /// The HTTP status; `None` when the output does not speak HTTP (PostgreSQL).
        status: Option<u16>,
        /// What failed and what to fix, for the logs and the dead-letter reason.
        detail: String,
    },
}

/// A configured output.
pub enum Output {
    /// `openmeter` and `collector`.
    Http(HttpOutput),
    /// `webhook`.
    Webhook(WebhookOutput),
    /// `postgres`.
    Postgres(PostgresOutput),
    /// `stdout`.
    Stdout,
}

impl Output {
    /// Builds the output; `index` locates it in the configuration for error messages.
    pub fn build(config: &OutputConfig, index: usize) -> anyhow::Result<Output> {
        Ok(match config.kind {
            OutputKind::Openmeter | OutputKind::Collector => {
                Output::Http(HttpOutput::new(config, index)?)
            }
            OutputKind::Webhook => Output::Webhook(WebhookOutput::new(config, index)?),
            OutputKind::Postgres => Output::Postgres(PostgresOutput::new(config, index)?),
            OutputKind::Stdout => Output::Stdout,
        })
    }

    /// Sends one batch.
    pub async fn send(&self, records: &[Record]) -> Result<(), SendError> {
        match self {
            Output::Http(http) => http.send(records).await,
            Output::Webhook(webhook) => webhook.send(records).await,
            Output::Postgres(postgres) => postgres.send(records).await,
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
    // An HTTP date in any of the three forms RFC 9110 (5.6.7) has recipients accept.
    let when = httpdate::parse_http_date(value).ok()?;
    Some(
        when.duration_since(std::time::SystemTime::now())
            .unwrap_or_default(),
    )
}

/// An error and its causes on one line, `outer: inner: innermost`.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        // Some errors repeat their cause in their own message; say it once.
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// Reads a PEM bundle of CA certificates (`caFile`), naming the key when it cannot.
fn read_ca_file(path: &std::path::Path, index: usize) -> anyhow::Result<Vec<u8>> {
    let pem = std::fs::read(path).map_err(|e| {
        anyhow::anyhow!(
            "outputs.targets[{index}].caFile: cannot read {}: {e}",
            path.display()
        )
    })?;
    Ok(pem)
}

/// A self-signed CA certificate for tests of `caFile`.
#[cfg(test)]
const TEST_CA_PEM: &str = "\
-----BEGIN CERTIFICATE-----
MIIBiDCCAS2gAwIBAgIUQp0ZVIYicYQdQQeURub6rZEH2n8wCgYIKoZIzj0EAwIw
GDEWMBQGA1UEAwwNdGFsbHkgdGVzdCBDQTAgFw0yNjExMjEwNTI5NTBaGA8yMTI2
MTAyODA1Mjk1MFowGDEWMBQGA1UEAwwNdGFsbHkgdGVzdCBDQTBZMBMGByqGSM49
AgEGCCqGSM49AwEHA0IABObMYCkCVjZBfuVPckTsatYtZ7FhJmKZvottU4Vn0vGZ
hbbPYetFd5NKd3m818Bl5FDl9hNtCo/tuAuRhQ5f2Y6jUzBRMB0GA1UdDgQWBBRu
Ogt61GXSDsy5VlkvPBRFuQRqOjAfBgNVHSMEGDAWgBRuOgt61GXSDsy5VlkvPBRF
uQRqOjAPBgNVHRMBAf8EBTADAQH/MAoGCCqGSM49BAMCA0kAMEYCIQCAhygonlG/
9ODLjnxPkofmq0j7DHXb/mQBObkWY3KUnwIhAO0F4Ntksqly2wD+VKdCaWnF4Zp/
VlqNxRi6sQXCSt7E
-----END CERTIFICATE-----
";

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
        // The obsolete forms recipients must still accept: RFC 850 and asctime.
        for past in ["Sunday, 06-Nov-94 08:49:37 GMT", "Sun Nov  6 08:49:37 1994"] {
            assert_eq!(parse_retry_after(past), Some(Duration::ZERO), "{past}");
        }
        let later =
            httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(120));
        let delay = parse_retry_after(&later).expect("a date two minutes ahead");
        assert!(
            (Duration::from_secs(115)..=Duration::from_secs(120)).contains(&delay),
            "{delay:?}"
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

    #[test]
    fn error_chain_says_each_cause_once() {
        #[derive(Debug)]
        struct Wrapped(std::io::Error, &'static str);
        impl std::fmt::Display for Wrapped {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.1)
            }
        }
        impl std::error::Error for Wrapped {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let inner = || std::io::Error::other("connection refused");
        assert_eq!(
            error_chain(&Wrapped(inner(), "connect")),
            "connect: connection refused"
        );
        assert_eq!(
            error_chain(&Wrapped(inner(), "connect: connection refused")),
            "connect: connection refused"
        );
    }
}
