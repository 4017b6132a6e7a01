//! [`WebhookReceiver`]: `tests/python/webhook_receiver.py`, a webhook endpoint written
//! independently of the sidecar with Python's `hmac` module, run as a child process. It verifies
//! every signature itself and logs each request (headers, body, verdict) as a JSON line, which this
//! module reads back.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::poll::missing_after;
use crate::python::{python_interpreter, script};

/// How long the receiver may take to start listening.
const START_WITHIN: Duration = Duration::from_secs(30);

/// One request the receiver logged.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WebhookRequest {
    /// 1, 2, ... in arrival order.
    pub seq: u64,
    pub method: String,
    /// Path and query as requested.
    pub path: String,
    /// Header names in lower case.
    pub headers: BTreeMap<String, String>,
    /// The body as text (the sidecar sends JSON).
    pub body: String,
    /// Whether the signature header held the HMAC-SHA256 of the body with the shared secret.
    pub signature_valid: bool,
    /// The status the receiver answered.
    pub status: u16,
    /// `accepted`, `bad-signature` or `injected-failure`.
    pub verdict: String,
}

impl WebhookRequest {
    /// A header by name, any case.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }

    /// Whether the receiver accepted it (2xx).
    pub fn delivered(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The body as a JSON array of events; panics when it is not one.
    pub fn events(&self) -> Vec<Value> {
        serde_json::from_str(&self.body).unwrap_or_else(|e| {
            panic!(
                "webhook request {} has a body that is not a JSON array of events ({e}): {}",
                self.seq, self.body
            )
        })
    }

    /// The ids of the events in the body.
    pub fn ids(&self) -> Vec<String> {
        self.events()
            .iter()
            .map(|e| e["id"].as_str().unwrap_or_default().to_string())
            .collect()
    }
}

/// The Python webhook receiver, killed on drop. See the module docs.
pub struct WebhookReceiver {
    child: Child,
    dir: Option<TempDir>,
    port: u16,
    http: reqwest::Client,
}

impl WebhookReceiver {
    /// Starts a receiver checking `X-Tally-Signature-256` with `secret`.
    pub async fn start(secret: &str) -> WebhookReceiver {
        WebhookReceiver::start_with_header(secret, "X-Tally-Signature-256").await
    }

    /// Starts a receiver checking the signature in `signature_header` with `secret`, and waits
    /// until it listens.
    pub async fn start_with_header(secret: &str, signature_header: &str) -> WebhookReceiver {
        let dir = tempfile::Builder::new()
            .prefix("tally-webhook-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a temporary directory: {e}"));
        let stderr = std::fs::File::create(dir.path().join("stderr.log"))
            .unwrap_or_else(|e| panic!("creating the receiver's stderr log: {e}"));
        let mut child = Command::new(python_interpreter())
            .arg(script("webhook_receiver.py"))
            .args(["--port", "0", "--secret", secret])
            .args(["--signature-header", signature_header])
            .arg("--log")
            .arg(dir.path().join("requests.jsonl"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start the webhook receiver: {e}"));
        let stdout = child
            .stdout
            .take()
            .unwrap_or_else(|| unreachable!("stdout is piped"));
        let mut lines = BufReader::new(stdout).lines();
        let first = tokio::time::timeout(START_WITHIN, lines.next_line()).await;
        let port = match first {
            Ok(Ok(Some(line))) => line
                .rsplit(':')
                .next()
                .and_then(|p| p.trim().parse::<u16>().ok())
                .unwrap_or_else(|| panic!("the webhook receiver printed {line:?}")),
            other => panic!(
                "the webhook receiver did not start ({other:?}); its stderr:\n{}",
                std::fs::read_to_string(dir.path().join("stderr.log")).unwrap_or_default()
            ),
        };
        WebhookReceiver {
            child,
            dir: Some(dir),
            port,
            http: reqwest::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap_or_else(|e| panic!("building the HTTP client: {e}")),
        }
    }

    /// `http://127.0.0.1:PORT{path}`: a URL for the webhook output (any path is accepted).
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// The next `count` requests with a good signature are answered `status` (e.g. 503).
    pub async fn fail_next(&self, count: usize, status: u16) {
        let response = self
            .http
            .post(self.url(&format!("/_control/fail?count={count}&status={status}")))
            .send()
            .await
            .unwrap_or_else(|e| panic!("webhook receiver control: {e}"));
        assert_eq!(response.status(), 200, "webhook receiver control");
    }

    /// POSTs `body` with these headers straight to the receiver (not through the sidecar);
    /// returns the status it answered.
    pub async fn post_raw(&self, path: &str, headers: &[(&str, &str)], body: Vec<u8>) -> u16 {
        let mut request = self.http.post(self.url(path)).body(body);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST to the webhook receiver: {e}"))
            .status()
            .as_u16()
    }

    /// Every request logged so far, in arrival order.
    pub fn requests(&self) -> Vec<WebhookRequest> {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        // The receiver writes whole lines; a line without its newline is still being written.
        let complete = match text.rfind('\n') {
            Some(end) => &text[..end],
            None => "",
        };
        complete
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("webhook receiver log line is not JSON ({e}): {l}"))
            })
            .collect()
    }

    /// The distinct ids of the events in requests the receiver accepted.
    pub fn delivered_id_set(&self) -> HashSet<String> {
        self.requests()
            .iter()
            .filter(|r| r.delivered())
            .flat_map(|r| r.ids())
            .collect()
    }

    /// Waits until every id of `ids` was delivered (accepted); on timeout panics naming how many
    /// are missing and what the receiver saw.
    pub async fn wait_delivered<'a>(
        &self,
        ids: impl IntoIterator<Item = &'a str>,
        within: Duration,
    ) {
        let wanted: Vec<&str> = ids.into_iter().collect();
        let missing = missing_after(&wanted, within, || self.delivered_id_set()).await;
        if !missing.is_empty() {
            let verdicts: Vec<(u16, String)> = self
                .requests()
                .iter()
                .map(|r| (r.status, r.verdict.clone()))
                .collect();
            panic!(
                "after {within:?}, {} of {} events are still not delivered to the webhook \
                 receiver; first missing: {:?}; answers so far: {verdicts:?}",
                missing.len(),
                wanted.len(),
                missing.iter().take(10).collect::<Vec<_>>()
            );
        }
    }

    fn log_path(&self) -> PathBuf {
        match &self.dir {
            Some(dir) => dir.path().join("requests.jsonl"),
            None => unreachable!("the directory is only released on drop"),
        }
    }
}

impl Drop for WebhookReceiver {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        if std::thread::panicking() {
            let kept = self.dir.take().map(TempDir::keep);
            if let Some(dir) = kept {
                eprintln!(
                    "----- webhook receiver files kept in {} (requests.jsonl, stderr.log) -----",
                    dir.display()
                );
            }
        }
    }
}
