//! The `webhook` output: a JSON array POSTed to any URL, signed so the receiver can tell it came
//! from us and was not changed on the way, as GitHub and OpenFaaS sign theirs.
//!
//! Headers (names configurable):
//! - `X-Tally-Signature-256: sha256=<lowercase hex HMAC-SHA256(secret, body)>`, over the exact body
//!   bytes;
//! - `X-Tally-Delivery: <uuid v4>`, the same on every retry of a batch and new for the next one,
//!   so a receiver can drop a delivery it has already processed;
//! - `X-Tally-Event: <eventName, or the type of the batch's first event>`.

use std::borrow::Cow;

use bytes::Bytes;
use hmac::{Hmac, KeyInit, Mac};
use http::{HeaderMap, HeaderName, HeaderValue};
use sha2::{Digest, Sha256};

use crate::buffer::Record;
use crate::config::OutputConfig;

use super::http::{client, outcome};
use super::{SendError, json_array};

/// POSTs signed batches to a URL.
pub struct WebhookOutput {
    client: reqwest::Client,
    url: reqwest::Url,
    /// Keyed with the secret once; cloned for each body.
    mac: Hmac<Sha256>,
    /// Mixed into delivery ids so that two processes (or outputs) sending batches with the
    /// same sequence numbers never share one.
    delivery_salt: [u8; 16],
    /// `Content-Type` and the configured extra headers.
    static_headers: HeaderMap,
    signature_header: HeaderName,
    delivery_header: HeaderName,
    event_header: HeaderName,
    event_name: Option<HeaderValue>,
}

impl WebhookOutput {
    pub(super) fn new(config: &OutputConfig, index: usize) -> anyhow::Result<WebhookOutput> {
        let at = |key: &str| format!("outputs.targets[{index}].{key}");
        let url = config
            .url
            .as_deref()
            .ok_or_else(|| anyhow::anyhow!("{}: a webhook output needs a url", at("url")))?;
        let url =
            reqwest::Url::parse(url).map_err(|e| anyhow::anyhow!("{} {url:?}: {e}", at("url")))?;
        let secret = match (&config.secret, &config.secret_from) {
            (Some(secret), _) => secret.clone(),
            (None, Some(source)) => source
                .resolve()
                .map_err(|e| anyhow::anyhow!("{}: {e}", at("secretFrom")))?,
            (None, None) => anyhow::bail!(
                "{}: a webhook output needs a signing secret: secretFrom: {{env: NAME}} or {{file: PATH}}",
                at("secretFrom")
            ),
        };
        let mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes())
            .map_err(|e| anyhow::anyhow!("{}: unusable signing secret: {e}", at("secret")))?;
        let header_name = |key: &str, name: &str| {
            HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| anyhow::anyhow!("{}: {name:?} is not a valid header name", at(key)))
        };
        let mut static_headers = HeaderMap::new();
        static_headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        for (name, value) in &config.headers {
            let value = HeaderValue::from_str(value).map_err(|_| {
                anyhow::anyhow!(
                    "{}: the value of header {name:?} is not a valid header value",
                    at("headers")
                )
            })?;
            static_headers.insert(header_name("headers", name)?, value);
        }
        let event_name = config
            .event_name
            .as_deref()
            .map(|name| {
                HeaderValue::from_str(name).map_err(|_| {
                    anyhow::anyhow!("{}: {name:?} is not a valid header value", at("eventName"))
                })
            })
            .transpose()?;
        Ok(WebhookOutput {
            client: client(config, index)?,
            url,
            mac,
            delivery_salt: rand::random(),
            static_headers,
            signature_header: header_name("signatureHeader", &config.signature_header)?,
            delivery_header: header_name("deliveryHeader", &config.delivery_header)?,
            event_header: header_name("eventHeader", &config.event_header)?,
            event_name,
        })
    }

    pub(super) async fn send(&self, records: &[Record]) -> Result<(), SendError> {
        let body = json_array(records);
        let request = self
            .client
            .post(self.url.clone())
            .headers(self.headers(records, &body))
            .body(body);
        outcome(request.send().await, &self.url).await
    }

    /// Every header of the request that carries `body`, the batch `records`.
    fn headers(&self, records: &[Record], body: &Bytes) -> HeaderMap {
        let signature = self.sign(body);
        let mut headers = self.static_headers.clone();
        if let Ok(value) = HeaderValue::from_str(&format!("sha256={}", hex::encode(signature))) {
            headers.insert(self.signature_header.clone(), value);
        }
        let delivery = delivery_id(&self.delivery_salt, records, &signature);
        if let Ok(value) = HeaderValue::from_str(&delivery.hyphenated().to_string()) {
            headers.insert(self.delivery_header.clone(), value);
        }
        if let Some(value) = self
            .event_name
            .clone()
            .or_else(|| first_event_type(records))
        {
            headers.insert(self.event_header.clone(), value);
        }
        headers
    }

    /// HMAC-SHA256 of the exact body bytes.
    fn sign(&self, body: &[u8]) -> [u8; 32] {
        let mut mac = self.mac.clone();
        mac.update(body);
        mac.finalize().into_bytes().into()
    }
}

/// The delivery id of a batch: a version 4 UUID whose bits are a hash of the output's salt, the
/// batch's first and last buffer sequence numbers, its size, and the signature of its body.
///
/// Retries of a batch send the same events, so they carry the same id without any state kept
/// between sends; any other batch differs in its sequence numbers (which never repeat within a
/// buffer) or in its bytes, so it gets a new id. The salt is random per process, so a restart
/// with a wiped buffer, whose sequence numbers begin again at 1, cannot repeat an old id.
fn delivery_id(salt: &[u8; 16], records: &[Record], signature: &[u8; 32]) -> uuid::Uuid {
    let first = records.first().map(|r| r.seq).unwrap_or_default();
    let last = records.last().map(|r| r.seq).unwrap_or_default();
    let mut hash = Sha256::new();
    hash.update(salt);
    hash.update(first.to_be_bytes());
    hash.update(last.to_be_bytes());
    hash.update((records.len() as u64).to_be_bytes());
    hash.update(signature);
    let digest = hash.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_random_bytes(bytes).into_uuid()
}

/// The `type` of the batch's first event, if it can be a header value.
fn first_event_type(records: &[Record]) -> Option<HeaderValue> {
    #[derive(serde::Deserialize)]
    struct TypeOnly<'a> {
        #[serde(rename = "type", borrow)]
        kind: Option<Cow<'a, str>>,
    }
    let first = records.first()?;
    let event: TypeOnly<'_> = serde_json::from_slice(&first.json).ok()?;
    HeaderValue::from_bytes(event.kind?.as_bytes()).ok()
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use super::*;
    use crate::config::SecretSource;
    use crate::config::{HumanDuration, OutputKind};
    use crate::metrics::ErrorKind;

    fn record(seq: u64, json: &'static str) -> Record {
        Record {
            seq,
            json: Bytes::from_static(json.as_bytes()),
        }
    }

    fn webhook_config(url: &str, secret: &str) -> OutputConfig {
        OutputConfig {
            name: "hook".to_string(),
            kind: OutputKind::Webhook,
            url: Some(url.to_string()),
            secret: Some(secret.to_string()),
            timeout: HumanDuration(Duration::from_secs(5)),
            ..OutputConfig::default()
        }
    }

    const BATCH: [(u64, &str); 2] = [
        (
            7,
            r#"{"specversion":"1.0","id":"a","source":"s","type":"api-calls","subject":"c1"}"#,
        ),
        (
            9,
            r#"{"specversion":"1.0","id":"b","source":"s","type":"other","subject":"c2"}"#,
        ),
    ];

    fn batch() -> Vec<Record> {
        BATCH.iter().map(|(seq, json)| record(*seq, json)).collect()
    }

    #[test]
    fn signature_matches_known_hmac_sha256_vectors() {
        // RFC 4231 test case 2, and the example in GitHub's webhook documentation.
        let output = WebhookOutput::new(&webhook_config("http://127.0.0.1:1/", "Jefe"), 0)
            .expect("valid webhook");
        assert_eq!(
            hex::encode(output.sign(b"what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        let output = WebhookOutput::new(
            &webhook_config("http://127.0.0.1:1/", "It's a Secret to Everybody"),
            0,
        )
        .expect("valid webhook");
        assert_eq!(
            hex::encode(output.sign(b"Hello, World!")),
            "757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
        );
    }

    #[test]
    fn secret_from_a_file_is_used() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("secret");
        std::fs::write(&path, "Jefe\n").expect("write secret");
        let config = OutputConfig {
            secret: None,
            secret_from: Some(SecretSource::file(&path)),
            ..webhook_config("http://127.0.0.1:1/", "unused")
        };
        let output = WebhookOutput::new(&config, 0).expect("valid webhook");
        assert_eq!(
            hex::encode(output.sign(b"what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        let missing = OutputConfig {
            secret: None,
            secret_from: Some(SecretSource::file(&dir.path().join("absent"))),
            ..webhook_config("http://127.0.0.1:1/", "unused")
        };
        let error = WebhookOutput::new(&missing, 3)
            .err()
            .expect("missing secret file")
            .to_string();
        assert!(error.contains("outputs.targets[3].secretFrom"), "{error}");
        assert!(error.contains("absent"), "{error}");
    }

    #[test]
    fn headers_default_names_and_values() {
        let output = WebhookOutput::new(&webhook_config("http://127.0.0.1:1/", "k"), 0)
            .expect("valid webhook");
        let records = batch();
        let body = json_array(&records);
        let headers = output.headers(&records, &body);
        assert_eq!(headers["content-type"], "application/json");
        let expected = format!("sha256={}", hex::encode(output.sign(&body)));
        assert_eq!(headers["x-tally-signature-256"], expected.as_str());
        assert_eq!(headers["x-tally-event"], "api-calls");
        let delivery = headers["x-tally-delivery"].to_str().expect("ascii");
        let uuid = uuid::Uuid::parse_str(delivery).expect("a UUID");
        assert_eq!(uuid.get_version_num(), 4);
        assert_eq!(uuid.get_variant(), uuid::Variant::RFC4122);
    }

    #[test]
    fn headers_configured_names_event_name_and_extras() {
        let mut config = webhook_config("http://127.0.0.1:1/", "k");
        config.signature_header = "X-Openfaas-Signature-256".to_string();
        config.delivery_header = "X-Request-Id".to_string();
        config.event_header = "X-Kind".to_string();
        config.event_name = Some("usage".to_string());
        config.headers.insert("X-Tenant".into(), "t1".into());
        // Tally's own headers cannot be replaced by a static one.
        config
            .headers
            .insert("X-Openfaas-Signature-256".into(), "forged".into());
        let output = WebhookOutput::new(&config, 0).expect("valid webhook");
        let records = batch();
        let body = json_array(&records);
        let headers = output.headers(&records, &body);
        assert!(
            headers["x-openfaas-signature-256"]
                .to_str()
                .expect("ascii")
                .starts_with("sha256=")
        );
        assert!(headers.get("x-tally-signature-256").is_none());
        assert!(headers.get("x-request-id").is_some());
        assert_eq!(headers["x-kind"], "usage");
        assert_eq!(headers["x-tenant"], "t1");
    }

    #[test]
    fn delivery_id_is_stable_per_batch_and_new_otherwise() {
        let output = WebhookOutput::new(&webhook_config("http://127.0.0.1:1/", "k"), 0)
            .expect("valid webhook");
        let id = |records: &[Record]| {
            let body = json_array(records);
            output.headers(records, &body)["x-tally-delivery"].clone()
        };
        let records = batch();
        assert_eq!(id(&records), id(&batch()), "a retry keeps the id");
        assert_ne!(id(&records), id(&records[..1]), "a smaller batch is new");
        assert_ne!(
            id(&records),
            id(&[record(10, BATCH[0].1), record(12, BATCH[1].1)]),
            "the same events again at other positions are a new batch"
        );
        let other_process = WebhookOutput::new(&webhook_config("http://127.0.0.1:1/", "k"), 0)
            .expect("valid webhook");
        let body = json_array(&records);
        assert_ne!(
            id(&records),
            other_process.headers(&records, &body)["x-tally-delivery"],
            "another process never repeats an id"
        );
    }

    /// What the test receiver saw of one request.
    #[derive(Debug, Clone)]
    struct Seen {
        path: String,
        headers: http::HeaderMap,
        body: Bytes,
    }

    /// A receiver answering each request with the next of `statuses` (the last one repeats).
    async fn receiver(
        statuses: Vec<(u16, Option<&'static str>)>,
    ) -> (String, Arc<Mutex<Vec<Seen>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let log = seen.clone();
        let app = axum::Router::new().fallback(move |request: axum::extract::Request| {
            let log = log.clone();
            let statuses = statuses.clone();
            async move {
                let (parts, body) = request.into_parts();
                let body = axum::body::to_bytes(body, usize::MAX).await.expect("body");
                let n = {
                    let mut log = log.lock().expect("lock");
                    log.push(Seen {
                        path: parts.uri.path().to_string(),
                        headers: parts.headers,
                        body,
                    });
                    log.len()
                };
                let (status, retry_after) = statuses[(n - 1).min(statuses.len() - 1)];
                let mut response = http::Response::builder().status(status);
                if let Some(value) = retry_after {
                    response = response.header("retry-after", value);
                }
                response
                    .body(axum::body::Body::from("receiver says no"))
                    .expect("response")
            }
        });
        tokio::spawn(async move { axum::serve(listener, app).await });
        (format!("http://{addr}/hooks/usage?x=1"), seen)
    }

    #[tokio::test]
    async fn posts_the_signed_array_and_keeps_the_id_across_retries() {
        let (url, seen) = receiver(vec![(503, Some("7")), (204, None)]).await;
        let output = WebhookOutput::new(&webhook_config(&url, "s3cret"), 0).expect("webhook");
        let records = batch();
        match output.send(&records).await {
            Err(SendError::Retryable {
                kind,
                status,
                retry_after,
                detail,
            }) => {
                assert_eq!(kind, ErrorKind::retryable_status);
                assert_eq!(status, Some(503));
                assert_eq!(retry_after, Some(Duration::from_secs(7)));
                assert!(detail.contains("receiver says no"), "{detail}");
            }
            other => panic!("503 must be retryable, got {other:?}"),
        }
        output.send(&records).await.expect("delivered on retry");
        output.send(&records[1..]).await.expect("next batch");
        let seen = seen.lock().expect("lock").clone();
        assert_eq!(seen.len(), 3);
        let expected_body = format!("[{},{}]", BATCH[0].1, BATCH[1].1);
        for request in &seen[..2] {
            assert_eq!(request.path, "/hooks/usage");
            assert_eq!(request.body, expected_body.as_bytes());
            assert_eq!(request.headers["content-type"], "application/json");
            let mut mac = Hmac::<Sha256>::new_from_slice(b"s3cret").expect("key");
            mac.update(expected_body.as_bytes());
            let expected = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
            assert_eq!(request.headers["x-tally-signature-256"], expected.as_str());
            assert_eq!(request.headers["x-tally-event"], "api-calls");
        }
        assert_eq!(
            seen[0].headers["x-tally-delivery"],
            seen[1].headers["x-tally-delivery"]
        );
        assert_ne!(
            seen[1].headers["x-tally-delivery"],
            seen[2].headers["x-tally-delivery"]
        );
        assert_eq!(seen[2].headers["x-tally-event"], "other");
    }

    #[tokio::test]
    async fn client_errors_are_permanent_and_refused_connections_retryable() {
        let (url, _seen) = receiver(vec![(422, None)]).await;
        let output = WebhookOutput::new(&webhook_config(&url, "k"), 0).expect("webhook");
        match output.send(&batch()).await {
            Err(SendError::Permanent { status, detail }) => {
                assert_eq!(status, Some(422));
                assert!(detail.contains("422"), "{detail}");
            }
            other => panic!("422 must be permanent, got {other:?}"),
        }
        let closed = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            listener.local_addr().expect("addr")
        };
        let output = WebhookOutput::new(&webhook_config(&format!("http://{closed}/"), "k"), 0)
            .expect("webhook");
        match output.send(&batch()).await {
            Err(SendError::Retryable { kind, status, .. }) => {
                assert_eq!(kind, ErrorKind::network);
                assert_eq!(status, None);
            }
            other => panic!("a refused connection must be retryable, got {other:?}"),
        }
    }

    #[test]
    fn ca_file_must_hold_certificates() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, "not a certificate\n").expect("write");
        let config = OutputConfig {
            ca_file: Some(path),
            ..webhook_config("https://127.0.0.1:1/", "k")
        };
        let error = WebhookOutput::new(&config, 2)
            .err()
            .expect("no certificate in caFile")
            .to_string();
        assert!(error.contains("outputs.targets[2].caFile"), "{error}");
        assert!(error.contains("ca.pem"), "{error}");
        std::fs::write(
            config.ca_file.as_ref().expect("set"),
            crate::output::TEST_CA_PEM,
        )
        .expect("write");
        WebhookOutput::new(&config, 2).expect("a PEM CA certificate is accepted");
    }
}
