//! [`Sidecar`]: the real `tally-sidecar` binary, run as a child process on a temporary data
//! directory, with its configuration written to a file and its logs captured for diagnostics.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use tempfile::TempDir;

use crate::binary::sidecar_binary;
use crate::events::event;
use crate::metrics::Exposition;
use crate::poll::{INTERVAL, poll_for, poll_until_ok};
use crate::ports::unused_port;
use crate::upstream::TestUpstream;

/// How long a start may take before `/readyz` answers 200.
const READY_WITHIN: Duration = Duration::from_secs(30);
/// How long a CLI command may run.
const CLI_WITHIN: Duration = Duration::from_secs(60);
/// Numbers the sentinel events of [`Sidecar::flush_to`].
static SENTINELS: AtomicU64 = AtomicU64::new(0);

/// Builds the configuration of a [`Sidecar`]. The harness always provides `listen` (a free
/// loopback port, kept across restarts) and `dataDir` (in the test's temporary directory); any
/// other key is the contract's default unless the test sets it.
#[derive(Debug, Clone)]
pub struct SidecarBuilder {
    config: ConfigSource,
    env: Vec<(String, String)>,
    inline: bool,
}

#[derive(Debug, Clone)]
enum ConfigSource {
    Json(Value),
    /// Written as is, after replacing `${LISTEN}` and `${DATA_DIR}`.
    Yaml(String),
}

impl Default for SidecarBuilder {
    fn default() -> Self {
        SidecarBuilder::new()
    }
}

impl SidecarBuilder {
    /// The contract's defaults plus the harness's `listen` and `dataDir` (so the default output
    /// is `stdout`).
    pub fn new() -> Self {
        SidecarBuilder {
            config: ConfigSource::Json(json!({})),
            env: Vec::new(),
            inline: false,
        }
    }

    /// A configuration given as a JSON value in the configuration's shape (camelCase keys), over
    /// the harness's `listen` and `dataDir` (which it may override).
    pub fn json(config: Value) -> Self {
        SidecarBuilder::new().merge(config)
    }

    /// A configuration given as YAML text, written as is except that `${LISTEN}` and `${DATA_DIR}`
    /// are replaced by the harness's listen address and data directory.
    pub fn yaml(text: &str) -> Self {
        SidecarBuilder {
            config: ConfigSource::Yaml(text.to_string()),
            ..SidecarBuilder::new()
        }
    }

    /// Adds an `openmeter` output named `name` to `url`, tuned for tests: small batching period
    /// (50ms) and short retries (50ms..500ms), so a test does not wait for production timings.
    pub fn openmeter_output(self, name: &str, url: &str) -> Self {
        self.output(json!({
            "name": name,
            "type": "openmeter",
            "url": url,
            "timeout": "5s",
            "batching": { "count": 100, "period": "50ms" },
            "retry": { "initialInterval": "50ms", "maxInterval": "500ms" },
        }))
    }

    /// Appends an output (`outputs.targets[i]`, in the configuration's shape) as given.
    pub fn output(mut self, target: Value) -> Self {
        let config = self.json_mut();
        let targets = config
            .as_object_mut()
            .map(|c| c.entry("outputs").or_insert_with(|| json!({})))
            .and_then(Value::as_object_mut)
            .map(|o| o.entry("targets").or_insert_with(|| json!([])))
            .and_then(Value::as_array_mut);
        match targets {
            Some(targets) => targets.push(target),
            None => panic!("outputs.targets is not a list in {config}"),
        }
        self
    }

    /// Sets `outputs.pattern` (`fanOut`, `roundRobin`, ...).
    pub fn pattern(self, pattern: &str) -> Self {
        self.set("outputs.pattern", json!(pattern))
    }

    /// Sets one key, by dotted path; numeric segments index lists, e.g.
    /// `set("outputs.targets.0.retry.initialInterval", json!("1s"))`.
    pub fn set(mut self, path: &str, value: Value) -> Self {
        let mut node = self.json_mut();
        let segments: Vec<&str> = path.split('.').collect();
        for (i, segment) in segments.iter().enumerate() {
            let last = i + 1 == segments.len();
            node = match segment.parse::<usize>() {
                Ok(index) => match node.get_mut(index) {
                    Some(item) => item,
                    None => panic!("config path {path}: no item {index}"),
                },
                Err(_) => {
                    if !node.is_object() {
                        *node = json!({});
                    }
                    let object = node.as_object_mut().unwrap_or_else(|| unreachable!());
                    object
                        .entry(segment.to_string())
                        .or_insert_with(|| if last { Value::Null } else { json!({}) })
                }
            };
        }
        *node = value;
        self
    }

    /// Deep-merges `value` (a JSON object in the configuration's shape) over the configuration;
    /// lists are replaced, not merged.
    pub fn merge(mut self, value: Value) -> Self {
        merge(self.json_mut(), value);
        self
    }

    /// An environment variable of the sidecar process.
    pub fn env(mut self, name: &str, value: &str) -> Self {
        self.env.push((name.to_string(), value.to_string()));
        self
    }

    /// Hands the configuration to the process as the `TALLY_CONFIG_YAML` environment variable
    /// instead of a `--config` file, as the injected sidecar receives it. The file is still
    /// written, for the CLI commands of [`Sidecar::run_cli`].
    pub fn inline_config(mut self) -> Self {
        self.inline = true;
        self
    }

    /// Writes the configuration into a fresh temporary directory; the process is not started.
    pub fn build(self) -> Sidecar {
        let dir = tempfile::Builder::new()
            .prefix("tally-test-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a temporary directory: {e}"));
        let port = unused_port();
        let listen = format!("127.0.0.1:{port}");
        let data_dir = dir.path().join("data");
        let config_path = dir.path().join("tally.yaml");
        let (text, data_dir, token) = match self.config {
            ConfigSource::Json(config) => {
                let mut merged =
                    json!({ "listen": listen, "dataDir": data_dir, "log": { "level": "info" } });
                merge(&mut merged, config);
                let data_dir = merged["dataDir"]
                    .as_str()
                    .map(PathBuf::from)
                    .unwrap_or(data_dir);
                let token = merged["ingest"]["authToken"].as_str().map(str::to_string);
                // JSON is YAML: the file is exactly the configuration the test built.
                let text = serde_json::to_string_pretty(&merged)
                    .unwrap_or_else(|e| panic!("serialising the config: {e}"));
                (text, data_dir, token)
            }
            ConfigSource::Yaml(text) => {
                let text = text
                    .replace("${LISTEN}", &listen)
                    .replace("${DATA_DIR}", &data_dir.display().to_string());
                (text, data_dir, None)
            }
        };
        std::fs::write(&config_path, &text)
            .unwrap_or_else(|e| panic!("writing {}: {e}", config_path.display()));
        let mut env = self.env;
        if self.inline {
            env.push(("TALLY_CONFIG_YAML".into(), text));
        }
        Sidecar {
            dir: Some(dir),
            config_path,
            data_dir,
            port,
            token,
            env,
            inline: self.inline,
            child: None,
            starts: 0,
            http: http_client(),
        }
    }

    /// Writes the configuration, starts the sidecar and waits until `/readyz` answers 200.
    pub async fn start(self) -> Sidecar {
        let mut sidecar = self.build();
        sidecar.start().await;
        sidecar
    }

    fn json_mut(&mut self) -> &mut Value {
        match &mut self.config {
            ConfigSource::Json(value) => value,
            ConfigSource::Yaml(_) => panic!("a YAML-text configuration cannot be edited by key"),
        }
    }
}

/// A `tally-sidecar` process (or one to be started) with its own temporary directory holding the
/// configuration file, the RocksDB data directory and the captured `stdout.log` / `stderr.log`.
/// The process is SIGKILLed when this is dropped; when a test panics, the directory is kept and
/// the end of the sidecar's log is printed.
pub struct Sidecar {
    dir: Option<TempDir>,
    config_path: PathBuf,
    data_dir: PathBuf,
    port: u16,
    /// `ingest.authToken`, sent with every request the harness makes.
    token: Option<String>,
    env: Vec<(String, String)>,
    /// The configuration is in `TALLY_CONFIG_YAML`, not passed with `--config`.
    inline: bool,
    child: Option<Child>,
    starts: u32,
    http: reqwest::Client,
}

impl Sidecar {
    /// A builder with the harness defaults.
    pub fn builder() -> SidecarBuilder {
        SidecarBuilder::new()
    }

    /// The temporary directory of this sidecar.
    pub fn dir(&self) -> &Path {
        match &self.dir {
            Some(dir) => dir.path(),
            None => unreachable!("the directory is only released on drop"),
        }
    }

    /// The configuration file the process is started with.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The buffer's data directory (`dataDir`).
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The loopback port it listens on, the same across restarts.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `http://127.0.0.1:PORT/api/v1/events`.
    pub fn events_url(&self) -> String {
        format!("{}/api/v1/events", self.url())
    }

    /// The ingest token the harness sends, if the configuration sets one.
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// Starts the process and waits until `/readyz` answers 200. Panics with the sidecar's log
    /// when it exits or is not ready in time.
    pub async fn start(&mut self) {
        self.spawn();
        self.wait_ready().await;
    }

    /// Starts the process without waiting for it to be ready (for starts expected to fail).
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "the sidecar is already running");
        self.starts += 1;
        let stdout = self.log_file("stdout.log");
        let mut stderr = self.log_file("stderr.log");
        let _ = writeln!(stderr, "----- tally-sidecar start #{} -----", self.starts);
        let mut command = Command::new(sidecar_binary());
        if !self.inline {
            command.arg("--config").arg(&self.config_path);
        }
        let child = command
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", sidecar_binary().display()));
        self.child = Some(child);
    }

    /// Waits until `/readyz` answers 200.
    pub async fn wait_ready(&mut self) {
        let url = format!("{}/readyz", self.url());
        let http = self.http.clone();
        let mut exited = None;
        let ready = poll_for(READY_WITHIN, async || {
            if let Some(status) = self.try_wait() {
                exited = Some(status);
                return Some(false);
            }
            let response = http.get(&url).send().await.ok()?;
            (response.status() == 200).then_some(true)
        })
        .await;
        match (ready, exited) {
            (Some(true), _) => {}
            (_, Some(status)) => panic!(
                "tally-sidecar exited with {status} instead of becoming ready; stderr:\n{}",
                self.stderr()
            ),
            _ => panic!(
                "tally-sidecar was not ready within {READY_WITHIN:?} ({url}); stderr:\n{}",
                self.stderr()
            ),
        }
    }

    /// Whether the process is running.
    pub fn is_running(&mut self) -> bool {
        self.child.is_some() && self.try_wait().is_none()
    }

    /// SIGKILL, then reap the process.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends SIGTERM without waiting for the process to exit.
    pub fn send_sigterm(&self) {
        let child = self
            .child
            .as_ref()
            .unwrap_or_else(|| panic!("SIGTERM: the sidecar is not running"));
        let pid = libc::pid_t::try_from(child.id()).unwrap_or_else(|e| panic!("pid: {e}"));
        // SAFETY: kill(2) with a pid of our own child process; no memory is involved.
        let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
        assert_eq!(rc, 0, "kill(SIGTERM) failed");
    }

    /// SIGTERM, then wait (up to a minute) for the process to exit; returns its exit status.
    pub async fn terminate(&mut self) -> ExitStatus {
        self.send_sigterm();
        self.wait_exit(Duration::from_secs(60)).await
    }

    /// Waits for the process to exit by itself; panics with its log when it is still running
    /// after `within`.
    pub async fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let status = poll_for(within, async || self.try_wait()).await;
        match status {
            Some(status) => {
                self.child = None;
                status
            }
            None => panic!(
                "tally-sidecar still runs {within:?} after it was expected to exit; stderr:\n{}",
                self.stderr()
            ),
        }
    }

    /// Starts the sidecar again, on the same port, configuration and data directory. A process
    /// still running is first stopped with SIGTERM.
    pub async fn restart(&mut self) {
        if self.is_running() {
            self.terminate().await;
        }
        self.child = None;
        self.start().await;
    }

    /// Runs the binary as a CLI command against this sidecar's configuration: `args` followed by
    /// `--config FILE`, or, for a bare `["check-config"]`, `check-config FILE`.
    pub async fn run_cli(&self, args: &[&str]) -> CliOutput {
        let mut argv: Vec<OsString> = args.iter().map(OsString::from).collect();
        if args == ["check-config"] {
            argv.push(self.config_path.clone().into_os_string());
        } else {
            argv.push("--config".into());
            argv.push(self.config_path.clone().into_os_string());
        }
        // The CLI reads the same configuration from the file.
        let env: Vec<(String, String)> = self
            .env
            .iter()
            .filter(|(name, _)| name != "TALLY_CONFIG_YAML")
            .cloned()
            .collect();
        run_tally(&argv, &env).await
    }

    /// `POST /api/v1/events` with this content type (none when `None`) and body, with the bearer
    /// token when the configuration has one. Panics when no answer comes back.
    pub async fn post(
        &self,
        content_type: Option<&str>,
        body: impl Into<reqwest::Body>,
    ) -> reqwest::Response {
        self.try_post(content_type, body)
            .await
            .unwrap_or_else(|e| panic!("POST {}: {e}", self.events_url()))
    }

    /// Like [`Sidecar::post`], returning a connection error instead of panicking.
    pub async fn try_post(
        &self,
        content_type: Option<&str>,
        body: impl Into<reqwest::Body>,
    ) -> reqwest::Result<reqwest::Response> {
        self.post_request(content_type, body).send().await
    }

    /// The request [`Sidecar::post`] sends, unsent: a test can send it from a task of its own.
    pub fn post_request(
        &self,
        content_type: Option<&str>,
        body: impl Into<reqwest::Body>,
    ) -> reqwest::RequestBuilder {
        let mut request = self.http.post(self.events_url()).body(body);
        if let Some(content_type) = content_type {
            request = request.header(http::header::CONTENT_TYPE, content_type);
        }
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        request
    }

    /// Sends a batch (`application/cloudevents-batch+json`).
    pub async fn post_events(&self, events: &[Value]) -> reqwest::Response {
        let body = serde_json::to_vec(events).unwrap_or_else(|e| panic!("serialising: {e}"));
        self.post(Some("application/cloudevents-batch+json"), body)
            .await
    }

    /// Sends one event (`application/cloudevents+json`).
    pub async fn post_event(&self, event: &Value) -> reqwest::Response {
        let body = serde_json::to_vec(event).unwrap_or_else(|e| panic!("serialising: {e}"));
        self.post(Some("application/cloudevents+json"), body).await
    }

    /// Sends a batch and panics unless the answer is 204.
    pub async fn send_ok(&self, events: &[Value]) {
        let response = self.post_events(events).await;
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        assert_eq!(status, 204, "POST of {} events: {body}", events.len());
    }

    /// A request builder for any method and path of this sidecar, without credentials.
    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http.request(method, format!("{}{path}", self.url()))
    }

    /// `GET path`, without credentials. Sent once more on a connection error, as HTTP clients
    /// do for idempotent requests: the server may close a pooled keep-alive connection (its
    /// idle and header timeouts) just as the request is written on it.
    pub async fn get(&self, path: &str) -> reqwest::Response {
        match self.request(reqwest::Method::GET, path).send().await {
            Ok(response) => response,
            Err(first) if first.is_request() || first.is_connect() => self
                .request(reqwest::Method::GET, path)
                .send()
                .await
                .unwrap_or_else(|e| panic!("GET {path}: {e} (after {first})")),
            Err(e) => panic!("GET {path}: {e}"),
        }
    }

    /// The parsed `/metrics`.
    pub async fn metrics(&self) -> Exposition {
        let response = self.get("/metrics").await;
        assert_eq!(response.status(), 200, "GET /metrics");
        let text = response
            .text()
            .await
            .unwrap_or_else(|e| panic!("reading /metrics: {e}"));
        Exposition::parse(&text)
    }

    /// One value of `/metrics`, e.g. `metric("tally_events_rejected_total{reason=\"invalid\"}")`;
    /// see [`Exposition::value`].
    pub async fn metric(&self, query: &str) -> f64 {
        self.metrics().await.value(query)
    }

    /// Polls the value of `query` (as [`Sidecar::metric`]) until `done` holds for it, and returns it;
    /// panics after `within`, naming `what` and the last value seen.
    pub async fn wait_metric(
        &self,
        within: Duration,
        what: &str,
        query: &str,
        done: impl Fn(f64) -> bool,
    ) -> f64 {
        poll_until_ok(within, INTERVAL, what, async || {
            let value = self.metric(query).await;
            if done(value) {
                Ok(value)
            } else {
                Err(format!("{query} is {value}"))
            }
        })
        .await
    }

    /// Everything the sidecar wrote on stderr (its log), over all its starts.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir().join("stderr.log")).unwrap_or_default()
    }

    /// Everything the sidecar wrote on stdout (the `stdout` output's events).
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(self.dir().join("stdout.log")).unwrap_or_default()
    }

    /// Sends one fresh event and waits until `upstream` received it. An output delivers its
    /// buffer in order, so once this returns, every event acknowledged before it was delivered
    /// too (or dead-lettered): a test can then assert what did *not* arrive without sleeping.
    pub async fn flush_to(&self, upstream: &TestUpstream) {
        let id = format!(
            "sentinel-{}-{}",
            std::process::id(),
            SENTINELS.fetch_add(1, Ordering::Relaxed)
        );
        self.send_ok(&[event(&id)]).await;
        upstream
            .wait_delivered([id.as_str()], Duration::from_secs(30))
            .await;
    }

    fn try_wait(&mut self) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        child.try_wait().ok().flatten()
    }

    fn log_file(&self, name: &str) -> File {
        let path = self.dir().join(name);
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()))
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            let log = self.stderr();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            let kept = self.dir.take().map(TempDir::keep);
            eprintln!(
                "----- tally-sidecar stderr (last {} lines; files kept in {}) -----\n{}",
                tail.len(),
                kept.map(|p| p.display().to_string()).unwrap_or_default(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
    }
}

/// What a CLI command printed and how it exited.
#[derive(Debug)]
pub struct CliOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl CliOutput {
    /// The exit code (`None` when killed by a signal).
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// Panics, showing both streams, unless the command exited 0.
    pub fn assert_success(&self) -> &Self {
        assert!(
            self.status.success(),
            "tally-sidecar exited with {}\nstdout:\n{}\nstderr:\n{}",
            self.status,
            self.stdout,
            self.stderr
        );
        self
    }

    /// stdout parsed as one JSON value.
    pub fn json(&self) -> Value {
        serde_json::from_str(self.stdout.trim())
            .unwrap_or_else(|e| panic!("stdout is not one JSON value ({e}):\n{}", self.stdout))
    }

    /// stdout parsed as one JSON value per non-empty line.
    pub fn json_lines(&self) -> Vec<Value> {
        self.stdout
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("stdout line is not JSON ({e}): {l}"))
            })
            .collect()
    }
}

/// Runs `tally-sidecar ARGS` to completion (within a minute) and captures its output.
pub async fn run_tally(args: &[OsString], env: &[(String, String)]) -> CliOutput {
    let mut command = tokio::process::Command::new(sidecar_binary());
    command
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let output = tokio::time::timeout(CLI_WITHIN, command.output())
        .await
        .unwrap_or_else(|_| panic!("`tally-sidecar {args:?}` still runs after {CLI_WITHIN:?}"))
        .unwrap_or_else(|e| panic!("cannot run tally-sidecar {args:?}: {e}"));
    CliOutput {
        status: output.status,
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap_or_else(|e| panic!("building the HTTP client: {e}"))
}

fn merge(base: &mut Value, over: Value) {
    match (base, over) {
        (Value::Object(base), Value::Object(over)) => {
            for (key, value) in over {
                match base.get_mut(&key) {
                    Some(slot) => merge(slot, value),
                    None => {
                        base.insert(key, value);
                    }
                }
            }
        }
        (slot, value) => *slot = value,
    }
}
