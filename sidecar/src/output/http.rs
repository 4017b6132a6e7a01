//! The `openmeter` and `collector` outputs: batches POSTed to an OpenMeter-compatible ingest API,
//! and the HTTP plumbing the webhook output shares with them (client, status handling).

use std::time::Duration;

use crate::buffer::Record;
use crate::config::OutputConfig;
use crate::metrics::ErrorKind;

use super::{SendError, error_chain, is_retryable, json_array, parse_retry_after, read_ca_file};

/// How much of an error response's body is quoted in the dead-letter reason and the logs.
const QUOTED_BODY_CHARS: usize = 500;

/// POSTs batches to `{url}/api/v1/events` as `application/cloudevents-batch+json`.
pub struct HttpOutput {
    client: reqwest::Client,
    endpoint: reqwest::Url,
    token: Option<String>,
}

impl HttpOutput {
    pub(super) fn new(config: &OutputConfig, index: usize) -> anyhow::Result<HttpOutput> {
        let base = config
            .url
            .as_deref()
            .ok_or_else(|| anyhow::anyhow!("outputs.targets[{index}].url is required"))?;
        let endpoint =
            reqwest::Url::parse(&format!("{}/api/v1/events", base.trim_end_matches('/')))
                .map_err(|e| anyhow::anyhow!("outputs.targets[{index}].url {base:?}: {e}"))?;
        let token = config.resolved_token(index)?;
        Ok(HttpOutput {
            client: client(config, index)?,
            endpoint,
            token,
        })
    }

    pub(super) async fn send(&self, records: &[Record]) -> Result<(), SendError> {
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
        outcome(request.send().await, &self.endpoint).await
    }
}

/// The HTTP client of one output: its timeout, and the system roots plus `caFile`, if set.
pub(super) fn client(config: &OutputConfig, index: usize) -> anyhow::Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder()
        .timeout(config.timeout.get())
        .connect_timeout(config.timeout.get().min(Duration::from_secs(5)))
        .pool_idle_timeout(Duration::from_secs(60))
        .user_agent(concat!("tally-sidecar/", env!("CARGO_PKG_VERSION")));
    if let Some(path) = &config.ca_file {
        let pem = read_ca_file(path, index)?;
        let certificates = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
            anyhow::anyhow!(
                "outputs.targets[{index}].caFile: {} is not a PEM bundle of CA certificates: {e}",
                path.display()
            )
        })?;
        if certificates.is_empty() {
            anyhow::bail!(
                "outputs.targets[{index}].caFile: {} holds no certificate; \
                 give a PEM file with one or more `BEGIN CERTIFICATE` blocks",
                path.display()
            );
        }
        for certificate in certificates {
            builder = builder.add_root_certificate(certificate);
        }
    }
    builder.build().map_err(|e| {
        anyhow::anyhow!(
            "outputs.targets[{index}]: cannot set up the HTTP client: {}",
            error_chain(&e)
        )
    })
}

/// What a POST's result means for the batch: 2xx delivered; 408, 429, 5xx, network errors and
/// timeouts retryable (with the `Retry-After` the upstream asked for); other statuses permanent.
pub(super) async fn outcome(
    result: Result<reqwest::Response, reqwest::Error>,
    endpoint: &reqwest::Url,
) -> Result<(), SendError> {
    let response = result.map_err(|e| SendError::Retryable {
        kind: if e.is_timeout() {
            ErrorKind::timeout
        } else {
            ErrorKind::network
        },
        status: None,
        detail: format!("POST {endpoint}: {}", error_chain(&e)),
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
        "POST {endpoint} answered {status}: {}",
        body.chars().take(QUOTED_BODY_CHARS).collect::<String>()
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
            status: Some(status.as_u16()),
            detail,
        })
    }
}
