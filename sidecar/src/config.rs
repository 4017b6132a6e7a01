//! The collector configuration: one YAML file for the sidecar, and the same type is the
//! `spec.pipeline` of the operator's `MeteringCollector`, so the two can never disagree.
//!
//! Keys are camelCase, every key has a default, unknown keys are rejected. Durations are
//! strings such as `500ms` or `24h`; sizes accept `1024`, `64Ki`, `1Mi`, `1Gi` and `1MB`.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a configuration could not be loaded. The message names the file, the key path and the fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{origin}: {key}: {message}")]
    Invalid {
        origin: String,
        key: String,
        message: String,
    },
    #[error("{origin}: {message}")]
    Secret { origin: String, message: String },
}

/// The whole collector configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Config {
    /// Address of the ingest HTTP server.
    pub listen: SocketAddr,
    /// Directory of the RocksDB buffer.
    pub data_dir: PathBuf,
    /// `sync`: a 204 means the event is fsynced. `none`: written to the OS, not fsynced.
    pub durability: Durability,
    /// How long outputs may keep delivering after SIGTERM before the process exits.
    pub shutdown_timeout: HumanDuration,
    pub log: LogConfig,
    pub ingest: IngestConfig,
    pub dedup: DedupConfig,
    pub buffer: BufferConfig,
    pub dead_letter: DeadLetterConfig,
    /// Events whose `k8snamespace` attribute is one of these are dropped and counted.
    pub exclude_namespaces: Vec<String>,
    /// The pod this sidecar runs in; events that lack `k8snamespace` / `k8spod` get them.
    pub pod: PodConfig,
    pub outputs: OutputsConfig,
}

/// Where the sidecar learns its pod's namespace and name (the injector sets both from the downward API).
/// Each one that is set is stamped as a CloudEvents extension attribute on every accepted event that
/// does not already carry it: `k8snamespace` and `k8spod`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct PodConfig {
    /// The pod's namespace, for example `{ env: POD_NAMESPACE }`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace_from: Option<SecretSource>,
    /// The pod's name, for example `{ env: POD_NAME }`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name_from: Option<SecretSource>,
}

/// The pod identity resolved at start-up.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PodIdentity {
    pub namespace: Option<String>,
    pub name: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([0, 0, 0, 0], 4196)),
            data_dir: PathBuf::from("/var/lib/tally"),
            durability: Durability::Sync,
            shutdown_timeout: HumanDuration(Duration::from_secs(10)),
            log: LogConfig::default(),
            ingest: IngestConfig::default(),
            dedup: DedupConfig::default(),
            buffer: BufferConfig::default(),
            dead_letter: DeadLetterConfig::default(),
            exclude_namespaces: Vec::new(),
            pod: PodConfig::default(),
            outputs: OutputsConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Durability {
    Sync,
    None,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A `tracing` filter such as `info` or `tally_sidecar=debug,info`.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: "info".to_string(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct IngestConfig {
    /// Largest accepted request body; larger bodies are answered 413.
    pub max_body_bytes: ByteSize,
    /// Bearer token required on ingest and admin requests, when set.
    pub auth_token: Option<String>,
    /// The same token, read from an environment variable or a file.
    pub auth_token_from: Option<SecretSource>,
    /// Longest time to receive a request's headers (the connection is closed) and its body
    /// (answered 408), so a trickling connection cannot hold a request open forever.
    pub read_timeout: HumanDuration,
    /// How long a keep-alive connection may wait for its next request before it is closed;
    /// absent means `readTimeout`, which bounds that wait too.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<HumanDuration>,
    /// Most connections open at once. At the limit, the connection idle the longest is closed
    /// to make room; when none is idle, the new connection is refused (and counted).
    pub max_connections: u32,
}

impl IngestConfig {
    /// How long a keep-alive connection may wait for its next request.
    pub fn effective_idle_timeout(&self) -> Duration {
        self.idle_timeout.unwrap_or(self.read_timeout).get()
    }
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            max_body_bytes: ByteSize(1024 * 1024),
            auth_token: None,
            auth_token_from: None,
            read_timeout: HumanDuration(Duration::from_secs(30)),
            idle_timeout: None,
            max_connections: 1024,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct DedupConfig {
    /// A repeated `(source, id)` within this window is acknowledged and stored once. `0s` disables dedup.
    pub window: HumanDuration,
    /// The part of `buffer.maxBytes` the dedup index may use (default an eighth of it). Past it,
    /// the oldest entries are forgotten before their window ends, and counted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_bytes: Option<ByteSize>,
}

impl Default for DedupConfig {
    fn default() -> Self {
        DedupConfig {
            window: HumanDuration(Duration::from_secs(24 * 3600)),
            max_bytes: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct BufferConfig {
    /// Upper bound of the whole data directory: events, dedup index, dead letters, write-ahead
    /// log and RocksDB's own files. At least 16Mi.
    pub max_bytes: ByteSize,
    pub when_full: WhenFull,
    /// How much memory the buffer's storage may use: `collector` (the default) or `sidecar`.
    /// Left out when rendered at its default, so a rendered collector configuration still
    /// reads in a sidecar older than the key.
    #[serde(skip_serializing_if = "BufferProfile::is_collector")]
    pub profile: BufferProfile,
}

impl Default for BufferConfig {
    fn default() -> Self {
        BufferConfig {
            max_bytes: ByteSize(1024 * 1024 * 1024),
            when_full: WhenFull::Reject,
            profile: BufferProfile::Collector,
        }
    }
}

/// How the buffer's storage (RocksDB's write buffers and block cache) is sized in memory. The
/// operator chooses: `sidecar` for injected sidecars, `collector` for the collector StatefulSet
/// and the node agents.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum BufferProfile {
    /// Write buffers grow with `maxBytes` up to 32 MiB for the events, and an 8 MiB block
    /// cache: the fewest flushes and compactions per event, for a process that serves many
    /// senders. (In both profiles the events are stored in 32 KiB blocks without a bloom
    /// filter, since they are only scanned, and dedup index files are kept small: 16 MiB here.)
    #[default]
    Collector,
    /// Write buffers of at most 4 MiB and a 1 MiB block cache, for a process next to every
    /// pod: more, smaller flushes in exchange for a footprint of tens of MiB.
    Sidecar,
}

impl BufferProfile {
    fn is_collector(&self) -> bool {
        *self == BufferProfile::Collector
    }
}

/// Retention of the dead-letter store: the oldest dead letters beyond either bound are deleted
/// and counted in `tally_dead_letter_expired_total`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct DeadLetterConfig {
    /// The part of `buffer.maxBytes` the dead-letter store keeps over all outputs (default an
    /// eighth of it); the oldest beyond it are deleted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_bytes: Option<ByteSize>,
    /// Dead letters older than this are deleted. `0s` keeps them until replayed.
    pub max_age: HumanDuration,
}

impl Default for DeadLetterConfig {
    fn default() -> Self {
        DeadLetterConfig {
            max_bytes: None,
            max_age: HumanDuration(Duration::from_secs(7 * 24 * 3600)),
        }
    }
}

/// What ingest does when the buffer is at `maxBytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum WhenFull {
    /// Answer 503 with Retry-After; nothing is accepted that is not stored.
    Reject,
    /// Delete the oldest buffered events to make room, counted in `tally_events_dropped_total`.
    DropOldest,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct OutputsConfig {
    pub pattern: BrokerPattern,
    pub targets: Vec<OutputConfig>,
}

impl Default for OutputsConfig {
    fn default() -> Self {
        OutputsConfig {
            pattern: BrokerPattern::FanOut,
            targets: vec![OutputConfig::default()],
        }
    }
}

/// How events are spread over the outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum BrokerPattern {
    /// Every output receives every event, each with its own durable cursor.
    FanOut,
    /// Every output receives every event; output i+1 gets a batch only after output i has it.
    FanOutSequential,
    /// Each event goes to exactly one output, taking turns.
    RoundRobin,
    /// Each event goes to exactly one output: whichever is free first.
    Greedy,
    /// `fanOut`, but a failed batch goes to that output's dead-letter store instead of being retried.
    FanOutFailFast,
    /// `fanOutSequential`, but a failed batch goes to the dead-letter store instead of being retried.
    FanOutSequentialFailFast,
    /// Each event goes to exactly one output: the first listed that takes it. A batch an output fails to take
    /// moves on to the next at once, and an output that failed is skipped for its retry backoff, then tried
    /// again. Dead-lettered only when every output rejects the batch outright.
    Fallback,
}

impl BrokerPattern {
    /// Whether a failed batch is dead-lettered at once instead of retried.
    pub fn fail_fast(self) -> bool {
        matches!(
            self,
            BrokerPattern::FanOutFailFast | BrokerPattern::FanOutSequentialFailFast
        )
    }

    /// Whether each output has its own cursor over every event (as opposed to sharing events).
    pub fn fans_out(self) -> bool {
        !matches!(
            self,
            BrokerPattern::RoundRobin | BrokerPattern::Greedy | BrokerPattern::Fallback
        )
    }

    /// Whether output i+1 waits for output i.
    pub fn sequential(self) -> bool {
        matches!(
            self,
            BrokerPattern::FanOutSequential | BrokerPattern::FanOutSequentialFailFast
        )
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutputConfig {
    /// Unique name; it keys the output's cursor and dead-letter store, so renaming restarts delivery.
    pub name: String,
    #[serde(rename = "type")]
    pub kind: OutputKind,
    /// `openmeter`/`collector`: base URL, events go to `{url}/api/v1/events`. `webhook`: the URL
    /// POSTed to. `postgres`: a `postgres://` connection string.
    #[serde(default)]
    pub url: Option<String>,
    /// `postgres`: the connection string from an environment variable or a file.
    #[serde(default)]
    pub url_from: Option<SecretSource>,
    /// Bearer token sent upstream (`openmeter`, `collector`).
    #[serde(default)]
    pub token: Option<String>,
    #[serde(default)]
    pub token_from: Option<SecretSource>,
    /// `webhook`: the HMAC-SHA256 signing secret.
    #[serde(default)]
    pub secret: Option<String>,
    #[serde(default)]
    pub secret_from: Option<SecretSource>,
    /// `webhook`: header carrying `sha256=<hex HMAC of the body>`.
    #[serde(default = "default_signature_header")]
    pub signature_header: String,
    /// `webhook`: header carrying the delivery id (stable across retries of one batch).
    #[serde(default = "default_delivery_header")]
    pub delivery_header: String,
    /// `webhook`: header carrying `eventName`, or the `type` of the batch's first event.
    #[serde(default = "default_event_header")]
    pub event_header: String,
    #[serde(default)]
    pub event_name: Option<String>,
    /// `webhook`: extra static headers.
    #[serde(default)]
    pub headers: std::collections::BTreeMap<String, String>,
    /// `postgres`: the table events are inserted into.
    #[serde(default = "default_table")]
    pub table: String,
    /// `postgres`: create the table (and its key) when it is missing.
    #[serde(default = "default_true")]
    pub create_table: bool,
    /// `postgres`/`webhook`/`openmeter`: a PEM CA bundle to trust in addition to the system roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Time limit of one request.
    #[serde(default = "default_output_timeout")]
    pub timeout: HumanDuration,
    #[serde(default)]
    pub batching: BatchPolicy,
    #[serde(default)]
    pub retry: RetryPolicy,
    /// When this output is more than this many events behind, its oldest events move to its
    /// dead-letter store (counted), so one dead output cannot fill the shared buffer.
    #[serde(default)]
    pub max_lag: Option<u64>,
    /// How many batches this output may have sent and not yet settled: batches are sent without waiting for the
    /// ones before (each settled in order through the buffer's acknowledgement tracker), and reading stops while
    /// this many are in flight. `1` sends one batch at a time. The `fallback` pattern always sends one at a time.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
}

impl Default for OutputConfig {
    fn default() -> Self {
        OutputConfig {
            name: "stdout".to_string(),
            kind: OutputKind::Stdout,
            url: None,
            url_from: None,
            token: None,
            token_from: None,
            secret: None,
            secret_from: None,
            signature_header: default_signature_header(),
            delivery_header: default_delivery_header(),
            event_header: default_event_header(),
            event_name: None,
            headers: Default::default(),
            table: default_table(),
            create_table: true,
            ca_file: None,
            timeout: default_output_timeout(),
            batching: BatchPolicy::default(),
            retry: RetryPolicy::default(),
            max_lag: None,
            max_in_flight: default_max_in_flight(),
        }
    }
}

fn default_signature_header() -> String {
    "X-Tally-Signature-256".to_string()
}

fn default_delivery_header() -> String {
    "X-Tally-Delivery".to_string()
}

fn default_event_header() -> String {
    "X-Tally-Event".to_string()
}

fn default_table() -> String {
    "tally_events".to_string()
}

fn default_true() -> bool {
    true
}

/// The upper bound of `maxInFlight`: each batch in flight holds its events in memory.
pub const MAX_IN_FLIGHT: usize = 256;

/// As Benthos's `http_client` output: enough batches in flight that the round trip, not the upstream, bounds a
/// distant output, and few enough (64 × `batching.byteSize` at most) to bound the memory they hold.
fn default_max_in_flight() -> usize {
    64
}

fn default_output_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum OutputKind {
    /// OpenMeter or any OpenMeter-compatible ingest API.
    Openmeter,
    /// Another Tally collector (same wire format as `openmeter`).
    Collector,
    /// A JSON array POSTed to any URL, signed with HMAC-SHA256.
    Webhook,
    /// Rows in a PostgreSQL table keyed by `(source, id)`: exactly-once.
    Postgres,
    /// One JSON event per line on standard output.
    Stdout,
}

/// When a batch is sent: at `count` events, at `byteSize` bytes, or `period` after its first event,
/// whichever comes first; `jitter` adds a random delay of up to that much to the period.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct BatchPolicy {
    pub count: usize,
    pub byte_size: ByteSize,
    pub period: HumanDuration,
    pub jitter: HumanDuration,
}

impl Default for BatchPolicy {
    fn default() -> Self {
        BatchPolicy {
            count: 100,
            byte_size: ByteSize(1024 * 1024),
            period: HumanDuration(Duration::from_secs(1)),
            jitter: HumanDuration(Duration::ZERO),
        }
    }
}

/// Exponential backoff with full jitter between `initialInterval` and `maxInterval`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct RetryPolicy {
    pub initial_interval: HumanDuration,
    pub max_interval: HumanDuration,
    /// After this long failing, the batch goes to the dead-letter store. `0s`: retry forever.
    pub max_elapsed: HumanDuration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            initial_interval: HumanDuration(Duration::from_millis(500)),
            max_interval: HumanDuration(Duration::from_secs(30)),
            max_elapsed: HumanDuration(Duration::ZERO),
        }
    }
}

/// Where a secret comes from: exactly one of an environment variable or a file
/// (`{ env: NAME }` or `{ file: /path }`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.env) != has(self.file)",
    "message": "set exactly one of `env` or `file`"
}]))]
pub struct SecretSource {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
}

impl SecretSource {
    pub fn env(name: &str) -> SecretSource {
        SecretSource {
            env: Some(name.to_string()),
            file: None,
        }
    }

    pub fn file(path: &Path) -> SecretSource {
        SecretSource {
            env: None,
            file: Some(path.to_path_buf()),
        }
    }

    /// Reads the secret; surrounding whitespace (a trailing newline in a file) is removed.
    pub fn resolve(&self) -> Result<String, String> {
        let (value, origin) = match (&self.env, &self.file) {
            (Some(name), None) => (
                std::env::var(name)
                    .map_err(|_| format!("environment variable {name} is not set"))?,
                format!("environment variable {name}"),
            ),
            (None, Some(path)) => (
                std::fs::read_to_string(path)
                    .map_err(|e| format!("cannot read secret file {}: {e}", path.display()))?,
                format!("secret file {}", path.display()),
            ),
            _ => return Err("set exactly one of `env` or `file`".to_string()),
        };
        let trimmed = value.trim();
        if trimmed.is_empty() {
            return Err(format!("{origin} is empty"));
        }
        Ok(trimmed.to_string())
    }

    fn check(&self) -> Result<(), String> {
        match (&self.env, &self.file) {
            (Some(_), None) | (None, Some(_)) => Ok(()),
            _ => Err("set exactly one of `env` or `file`".to_string()),
        }
    }
}

/// A duration written as a human string (`500ms`, `30s`, `24h`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    pub fn get(self) -> Duration {
        self.0
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(self.0).to_string())
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(text.trim())
            .map(HumanDuration)
            .map_err(|e| {
                serde::de::Error::custom(format!(
                    "invalid duration {text:?} ({e}); write a number with a unit, like 500ms, 30s, 5m or 24h"
                ))
            })
    }
}

/// In a schema (the operator's CRD), a duration is a string of numbers with units.
impl schemars::JsonSchema for HumanDuration {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "HumanDuration".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "pattern": r"^\s*([0-9]+\s*[a-zA-Zµ]+\s*)+$",
            "description": "A duration: a number with a unit, like 500ms, 30s, 5m or 24h."
        })
    }
}

/// A size in bytes, written as `1024`, `64Ki`, `1Mi`, `1Gi` (powers of 1024) or `1KB`, `1MB`, `1GB`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(&str, u64); 4] = [
            ("Ti", 1 << 40),
            ("Gi", 1 << 30),
            ("Mi", 1 << 20),
            ("Ki", 1 << 10),
        ];
        for (unit, factor) in UNITS {
            if self.0 >= factor && self.0.is_multiple_of(factor) {
                return write!(f, "{}{unit}", self.0 / factor);
            }
        }
        write!(f, "{}", self.0)
    }
}

impl FromStr for ByteSize {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let trimmed = text.trim();
        let split = trimmed
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(trimmed.len());
        let (digits, unit) = trimmed.split_at(split);
        let help = "write a whole number of bytes with an optional unit: 1024, 64Ki, 1Mi, 1Gi, 1MB";
        let number: u64 = digits
            .parse()
            .map_err(|_| format!("invalid size {text:?}; {help}"))?;
        let factor: u64 = match unit.trim() {
            "" | "B" => 1,
            "Ki" | "KiB" => 1 << 10,
            "Mi" | "MiB" => 1 << 20,
            "Gi" | "GiB" => 1 << 30,
            "Ti" | "TiB" => 1 << 40,
            "k" | "K" | "KB" => 1_000,
            "M" | "MB" => 1_000_000,
            "G" | "GB" => 1_000_000_000,
            "T" | "TB" => 1_000_000_000_000,
            other => {
                return Err(format!(
                    "invalid size {text:?}: unknown unit {other:?}; {help}"
                ));
            }
        };
        number
            .checked_mul(factor)
            .map(ByteSize)
            .ok_or_else(|| format!("size {text:?} is too large"))
    }
}

/// In a schema (the operator's CRD), a size is a string: digits and an optional unit.
impl schemars::JsonSchema for ByteSize {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "ByteSize".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "pattern": r"^\s*[0-9]+\s*(B|Ki|KiB|Mi|MiB|Gi|GiB|Ti|TiB|k|K|KB|M|MB|G|GB|T|TB)?\s*$",
            "description": "A size in bytes: 1024, 64Ki, 1Mi, 1Gi (powers of 1024) or 1KB, 1MB, 1GB."
        })
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Number(n) => Ok(ByteSize(n)),
            Raw::Text(t) => t.parse().map_err(serde::de::Error::custom),
        }
    }
}

impl Config {
    /// Loads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text, &path.display().to_string())
    }

    /// Parses and validates configuration text; `origin` names it in error messages.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let invalid = |key: String, message: String| ConfigError::Invalid {
            origin: origin.to_string(),
            key,
            message,
        };
        let config: Config = if text.trim().is_empty() {
            Config::default()
        } else {
            // serde's derived structs reject a repeated field only with the location of the
            // mapping, and maps (`headers`) keep the last value silently; a repeated key is
            // almost always an editing mistake, so it is refused with its own line first.
            if let Some((key, line, column)) = yaml::duplicate_key(text) {
                return Err(invalid(
                    key,
                    format!(
                        "is set twice in the same mapping; delete one of the two \
                         (a key may appear once) at line {line} column {column}"
                    ),
                ));
            }
            let de = serde_yaml::Deserializer::from_str(text);
            serde_path_to_error::deserialize(de).map_err(|e| {
                let key = e.path().to_string();
                let key = if key == "." {
                    "(top level)".to_string()
                } else {
                    key
                };
                // serde_yaml may start its message with (a parent of) the path; say it once.
                let message = e.into_inner().to_string();
                let message = match message.split_once(": ") {
                    Some((head, rest)) if key.starts_with(head) => rest.to_string(),
                    _ => message,
                };
                invalid(key, message)
            })?
        };
        config.validate().map_err(|(key, message)| {
            // Rules checked after parsing still point into the text: at the key's value, or
            // at the nearest enclosing mapping when the key is absent (a default applies).
            let message = match yaml::locate(text, &key) {
                Some((line, column)) => format!("{message} at line {line} column {column}"),
                None => message,
            };
            invalid(key, message)
        })?;
        Ok(config)
    }

    /// Rules serde cannot express. Returns the key path at fault and what is wrong.
    fn validate(&self) -> Result<(), (String, String)> {
        if self.ingest.max_body_bytes.get() < 1024 {
            return Err((
                "ingest.maxBodyBytes".into(),
                format!(
                    "{} is too small; use at least 1Ki",
                    self.ingest.max_body_bytes
                ),
            ));
        }
        if let Some(source) = &self.ingest.auth_token_from {
            source
                .check()
                .map_err(|m| ("ingest.authTokenFrom".to_string(), m))?;
        }
        for (key, source) in [
            ("pod.namespaceFrom", &self.pod.namespace_from),
            ("pod.nameFrom", &self.pod.name_from),
        ] {
            if let Some(source) = source {
                source.check().map_err(|m| (key.to_string(), m))?;
            }
        }
        if self.ingest.read_timeout.get().is_zero() {
            return Err((
                "ingest.readTimeout".into(),
                "must be greater than 0s".into(),
            ));
        }
        if let Some(idle) = self.ingest.idle_timeout {
            if idle.get().is_zero() {
                return Err((
                    "ingest.idleTimeout".into(),
                    "must be greater than 0s; leave it out to use ingest.readTimeout".into(),
                ));
            }
            // The wait for the next request's headers counts against readTimeout too, so a
            // longer idleTimeout could never be honoured.
            if idle > self.ingest.read_timeout {
                return Err((
                    "ingest.idleTimeout".into(),
                    format!(
                        "{} is longer than ingest.readTimeout ({}), which also bounds the wait for the next request; shorten idleTimeout or raise readTimeout",
                        humantime::format_duration(idle.get()),
                        humantime::format_duration(self.ingest.read_timeout.get())
                    ),
                ));
            }
        }
        if self.ingest.max_connections == 0 {
            return Err(("ingest.maxConnections".into(), "must be at least 1".into()));
        }
        if self
            .ingest
            .auth_token
            .as_deref()
            .is_some_and(|token| token.trim().is_empty())
        {
            return Err((
                "ingest.authToken".into(),
                "is empty; an empty token does not turn authentication off. Set a token, or remove the key to accept requests without one".into(),
            ));
        }
        if self.ingest.auth_token.is_some() && self.ingest.auth_token_from.is_some() {
            return Err((
                "ingest.authToken".into(),
                "set either authToken or authTokenFrom, not both".into(),
            ));
        }
        self.budget()
            .map_err(|(key, message)| (key.to_string(), message))?;
        if self.outputs.targets.is_empty() {
            return Err((
                "outputs.targets".into(),
                "at least one output is required (for example `- {name: stdout, type: stdout}`)"
                    .into(),
            ));
        }
        if !self.outputs.pattern.fans_out()
            && let Some(i) = self
                .outputs
                .targets
                .iter()
                .position(|t| t.max_lag.is_some())
        {
            return Err((
                format!("outputs.targets[{i}].maxLag"),
                "maxLag applies to the fanOut patterns; with roundRobin, greedy and fallback the outputs share one position".into(),
            ));
        }
        if self.outputs.pattern == BrokerPattern::Fallback {
            if self.outputs.targets.len() < 2 {
                return Err((
                    "outputs.targets".into(),
                    "the fallback pattern needs at least two outputs: the first, and where a batch goes when it \
                     fails"
                        .into(),
                ));
            }
            if let Some(i) = self
                .outputs
                .targets
                .iter()
                .position(|t| !t.retry.max_elapsed.get().is_zero())
            {
                return Err((
                    format!("outputs.targets[{i}].retry.maxElapsed"),
                    "maxElapsed does not apply to the fallback pattern: a batch an output cannot take moves on to \
                     the next output, and is dead-lettered only when every output rejects it; remove maxElapsed"
                        .into(),
                ));
            }
        }
        let mut seen = std::collections::HashSet::new();
        for (i, target) in self.outputs.targets.iter().enumerate() {
            let at = |key: &str| format!("outputs.targets[{i}].{key}");
            let name_ok = !target.name.is_empty()
                && target.name.len() <= 63
                && target
                    .name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
            if !name_ok {
                return Err((
                    at("name"),
                    format!(
                        "{:?} is not a valid output name; use 1-63 characters of a-z, 0-9 and -",
                        target.name
                    ),
                ));
            }
            if !seen.insert(target.name.as_str()) {
                return Err((
                    at("name"),
                    format!(
                        "output name {:?} is used twice; names must be unique",
                        target.name
                    ),
                ));
            }
            validate_target(target, &at)?;
            if target.batching.count == 0 {
                return Err((at("batching.count"), "must be at least 1".into()));
            }
            if target.batching.byte_size.get() == 0 {
                return Err((at("batching.byteSize"), "must be at least 1".into()));
            }
            if !(1..=MAX_IN_FLIGHT).contains(&target.max_in_flight) {
                return Err((
                    at("maxInFlight"),
                    format!(
                        "must be between 1 and {MAX_IN_FLIGHT} (each batch in flight holds its events in memory)"
                    ),
                ));
            }
            if target.retry.initial_interval.get().is_zero() {
                return Err((
                    at("retry.initialInterval"),
                    "must be greater than 0s".into(),
                ));
            }
            if target.retry.max_interval < target.retry.initial_interval {
                return Err((
                    at("retry.maxInterval"),
                    "must not be shorter than retry.initialInterval".into(),
                ));
            }
            if target.timeout.get().is_zero() {
                return Err((at("timeout"), "must be greater than 0s".into()));
            }
        }
        Ok(())
    }

    /// The pod's namespace and name, resolved from their sources (environment variables or files).
    pub fn pod_identity(&self) -> Result<PodIdentity, ConfigError> {
        Ok(PodIdentity {
            namespace: resolve_secret(None, self.pod.namespace_from.as_ref(), "pod.namespaceFrom")?,
            name: resolve_secret(None, self.pod.name_from.as_ref(), "pod.nameFrom")?,
        })
    }

    /// How `buffer.maxBytes` is shared out over the data directory; an error names the key.
    pub fn budget(&self) -> Result<crate::buffer::Budget, (&'static str, String)> {
        crate::buffer::Budget::new(
            self.buffer.max_bytes.get(),
            self.dead_letter.max_bytes.map(ByteSize::get),
            self.dedup.max_bytes.map(ByteSize::get),
        )
    }

    /// The ingest bearer token, resolved from its source.
    pub fn ingest_token(&self) -> Result<Option<String>, ConfigError> {
        resolve_secret(
            self.ingest.auth_token.as_deref(),
            self.ingest.auth_token_from.as_ref(),
            "ingest.authTokenFrom",
        )
    }
}

impl OutputConfig {
    /// The upstream bearer token, resolved from its source.
    pub fn resolved_token(&self, index: usize) -> Result<Option<String>, ConfigError> {
        resolve_secret(
            self.token.as_deref(),
            self.token_from.as_ref(),
            &format!("outputs.targets[{index}].tokenFrom"),
        )
    }
}

/// The rules of one output's type: which keys it needs and which it does not take.
fn validate_target(
    target: &OutputConfig,
    at: &dyn Fn(&str) -> String,
) -> Result<(), (String, String)> {
    let kind = match target.kind {
        OutputKind::Openmeter => "openmeter",
        OutputKind::Collector => "collector",
        OutputKind::Webhook => "webhook",
        OutputKind::Postgres => "postgres",
        OutputKind::Stdout => "stdout",
    };
    let http = matches!(
        target.kind,
        OutputKind::Openmeter | OutputKind::Collector | OutputKind::Webhook
    );
    let takes = |key: &str| -> bool {
        match key {
            "url" => target.kind != OutputKind::Stdout,
            "urlFrom" | "table" | "createTable" => target.kind == OutputKind::Postgres,
            "token" | "tokenFrom" => {
                matches!(target.kind, OutputKind::Openmeter | OutputKind::Collector)
            }
            "secret" | "secretFrom" | "eventName" | "headers" => target.kind == OutputKind::Webhook,
            "caFile" => http || target.kind == OutputKind::Postgres,
            _ => true,
        }
    };
    let set = [
        ("url", target.url.is_some()),
        ("urlFrom", target.url_from.is_some()),
        ("token", target.token.is_some()),
        ("tokenFrom", target.token_from.is_some()),
        ("secret", target.secret.is_some()),
        ("secretFrom", target.secret_from.is_some()),
        ("eventName", target.event_name.is_some()),
        ("headers", !target.headers.is_empty()),
        ("caFile", target.ca_file.is_some()),
    ];
    for (key, present) in set {
        if present && !takes(key) {
            return Err((at(key), format!("a {kind} output does not take `{key}`")));
        }
    }
    for (key, a, b) in [
        ("token", target.token.is_some(), target.token_from.is_some()),
        (
            "secret",
            target.secret.is_some(),
            target.secret_from.is_some(),
        ),
        ("url", target.url.is_some(), target.url_from.is_some()),
    ] {
        if a && b {
            return Err((at(key), format!("set either {key} or {key}From, not both")));
        }
    }
    for (key, source) in [
        ("tokenFrom", &target.token_from),
        ("secretFrom", &target.secret_from),
        ("urlFrom", &target.url_from),
    ] {
        if let Some(source) = source {
            source.check().map_err(|m| (at(key), m))?;
        }
    }
    if http {
        let Some(url) = &target.url else {
            return Err((at("url"), format!("a {kind} output needs a url")));
        };
        let parsed = reqwest::Url::parse(url)
            .map_err(|e| (at("url"), format!("invalid URL {url:?}: {e}")))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err((at("url"), format!("{url:?} must be an http or https URL")));
        }
    }
    match target.kind {
        OutputKind::Webhook => {
            if target.secret.is_none() && target.secret_from.is_none() {
                return Err((
                    at("secretFrom"),
                    "a webhook output needs a signing secret: secretFrom: {env: NAME} or {file: PATH}"
                        .into(),
                ));
            }
            for (key, name) in [
                ("signatureHeader", &target.signature_header),
                ("deliveryHeader", &target.delivery_header),
                ("eventHeader", &target.event_header),
            ] {
                http::HeaderName::from_bytes(name.as_bytes())
                    .map_err(|_| (at(key), format!("{name:?} is not a valid header name")))?;
            }
            for (name, value) in &target.headers {
                http::HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                    (
                        at("headers"),
                        format!("{name:?} is not a valid header name"),
                    )
                })?;
                http::HeaderValue::from_str(value).map_err(|_| {
                    (
                        at("headers"),
                        format!("the value of header {name:?} is not valid"),
                    )
                })?;
            }
        }
        OutputKind::Postgres => {
            match (&target.url, &target.url_from) {
                (None, None) => {
                    return Err((
                        at("url"),
                        "a postgres output needs url (postgres://user@host/db) or urlFrom".into(),
                    ));
                }
                (Some(url), _)
                    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) =>
                {
                    return Err((
                        at("url"),
                        "a postgres url starts with postgres:// or postgresql://".into(),
                    ));
                }
                _ => {}
            }
            let identifier = |part: &str| {
                part.chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                    && part.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                    && part.len() <= 63
            };
            let parts: Vec<&str> = target.table.split('.').collect();
            if parts.len() > 2 || !parts.iter().all(|p| identifier(p)) {
                return Err((
                    at("table"),
                    format!(
                        "{:?} is not a table name; use letters, digits and _ (optionally schema.table)",
                        target.table
                    ),
                ));
            }
        }
        OutputKind::Openmeter | OutputKind::Collector | OutputKind::Stdout => {}
    }
    if target.max_lag == Some(0) {
        return Err((at("maxLag"), "must be at least 1 (or absent)".into()));
    }
    Ok(())
}

fn resolve_secret(
    inline: Option<&str>,
    from: Option<&SecretSource>,
    key: &str,
) -> Result<Option<String>, ConfigError> {
    match (inline, from) {
        (Some(v), _) => Ok(Some(v.to_string())),
        (None, Some(source)) => source
            .resolve()
            .map(Some)
            .map_err(|message| ConfigError::Secret {
                origin: key.to_string(),
                message,
            }),
        (None, None) => Ok(None),
    }
}

/// Positions in the configuration's YAML text, for errors found after parsing. serde_yaml
/// exposes no node positions, but it stamps an error raised while it deserialises a node with
/// that node's line and column; these walkers raise one at the node they look for.
mod yaml {
    use std::cell::RefCell;
    use std::collections::HashSet;
    use std::fmt;

    use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};

    /// The message of the error a walker raises on purpose; only its position is used.
    const HERE: &str = "tally: position marker";

    enum Segment<'a> {
        Key(&'a str),
        Index(usize),
    }

    /// `outputs.targets[0].retry` → `outputs`, `targets`, `0`, `retry`.
    fn segments(path: &str) -> Vec<Segment<'_>> {
        let mut out = Vec::new();
        for part in path.split('.') {
            let (name, indexes) = part.split_once('[').unwrap_or((part, ""));
            if !name.is_empty() {
                out.push(Segment::Key(name));
            }
            for index in indexes.split('[') {
                if let Ok(i) = index.trim_end_matches(']').parse() {
                    out.push(Segment::Index(i));
                }
            }
        }
        out
    }

    /// Line and column (1-based) of the value at `path` (`outputs.targets[1].name`), or of the
    /// nearest enclosing node when the key is absent.
    pub(super) fn locate(text: &str, path: &str) -> Option<(usize, usize)> {
        let path = segments(path);
        let error = Find { path: &path }
            .deserialize(serde_yaml::Deserializer::from_str(text))
            .err()?;
        error.location().map(|l| (l.line(), l.column()))
    }

    struct Find<'a> {
        path: &'a [Segment<'a>],
    }

    impl<'de> DeserializeSeed<'de> for Find<'_> {
        type Value = ();

        fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_any(self)
        }
    }

    impl<'de> Visitor<'de> for Find<'_> {
        type Value = ();

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("any YAML node")
        }

        // A scalar is the node looked for, or the nearest one to it.
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
            Err(E::custom(HERE))
        }
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
            Err(E::custom(HERE))
        }
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
            Err(E::custom(HERE))
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
            Err(E::custom(HERE))
        }
        fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
            Err(E::custom(HERE))
        }
        fn visit_unit<E: de::Error>(self) -> Result<(), E> {
            Err(E::custom(HERE))
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            let Some((Segment::Key(wanted), rest)) = self.path.split_first() else {
                return Err(de::Error::custom(HERE));
            };
            while let Some(key) = map.next_key_seed(KeyText { seen: None })? {
                if key.as_deref() == Some(*wanted) {
                    return map.next_value_seed(Find { path: rest });
                }
                map.next_value::<IgnoredAny>()?;
            }
            // Absent: this mapping is the nearest node.
            Err(de::Error::custom(HERE))
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
            let Some((Segment::Index(wanted), rest)) = self.path.split_first() else {
                return Err(de::Error::custom(HERE));
            };
            for _ in 0..*wanted {
                if seq.next_element::<IgnoredAny>()?.is_none() {
                    return Err(de::Error::custom(HERE));
                }
            }
            match seq.next_element_seed(Find { path: rest })? {
                Some(()) => Ok(()),
                None => Err(de::Error::custom(HERE)),
            }
        }
    }

    /// A mapping key as text (`None` for a key that is itself a mapping or a list). With `seen`,
    /// a key already in it is refused from inside the key's own node, so the error carries the
    /// position of the repeated key.
    struct KeyText<'s> {
        /// The keys of this mapping so far, and where a repeated one is written.
        seen: Option<(&'s mut HashSet<String>, &'s RefCell<Option<String>>)>,
    }

    impl KeyText<'_> {
        fn key<E: de::Error>(self, key: String) -> Result<Option<String>, E> {
            match self.seen {
                Some((seen, repeated)) if seen.contains(&key) => {
                    *repeated.borrow_mut() = Some(key);
                    Err(E::custom(HERE))
                }
                Some((seen, _)) => {
                    seen.insert(key.clone());
                    Ok(Some(key))
                }
                None => Ok(Some(key)),
            }
        }
    }

    impl<'de> DeserializeSeed<'de> for KeyText<'_> {
        type Value = Option<String>;

        fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Option<String>, D::Error> {
            d.deserialize_any(self)
        }
    }

    impl<'de> Visitor<'de> for KeyText<'_> {
        type Value = Option<String>;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a mapping key")
        }

        fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
            self.key(v.to_string())
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
            self.key(v.to_string())
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
            self.key(v.to_string())
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
            self.key(v.to_string())
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            self.key(v.to_string())
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            self.key("null".to_string())
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            Ok(None)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            Ok(None)
        }
    }

    /// The first key that a mapping of the document repeats: its path, line and column.
    /// `None` when there is none, or when the text is not valid YAML (the parser then reports
    /// the syntax error itself).
    pub(super) fn duplicate_key(text: &str) -> Option<(String, usize, usize)> {
        let found = RefCell::new(None);
        let error = Unique {
            path: String::new(),
            found: &found,
        }
        .deserialize(serde_yaml::Deserializer::from_str(text))
        .err()?;
        let path = found.into_inner()?;
        let location = error.location()?;
        Some((path, location.line(), location.column()))
    }

    struct Unique<'a> {
        path: String,
        found: &'a RefCell<Option<String>>,
    }

    impl Unique<'_> {
        fn child(&self, key: &str) -> String {
            if self.path.is_empty() {
                key.to_string()
            } else {
                format!("{}.{key}", self.path)
            }
        }
    }

    impl<'de> DeserializeSeed<'de> for Unique<'_> {
        type Value = ();

        fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_any(self)
        }
    }

    impl<'de> Visitor<'de> for Unique<'_> {
        type Value = ();

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("any YAML node")
        }

        fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
            Ok(())
        }
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
            Ok(())
        }
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
            Ok(())
        }
        fn visit_i128<E: de::Error>(self, _: i128) -> Result<(), E> {
            Ok(())
        }
        fn visit_u128<E: de::Error>(self, _: u128) -> Result<(), E> {
            Ok(())
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
            Ok(())
        }
        fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
            Ok(())
        }
        fn visit_unit<E: de::Error>(self) -> Result<(), E> {
            Ok(())
        }
        fn visit_enum<A: de::EnumAccess<'de>>(self, data: A) -> Result<(), A::Error> {
            // A tagged node (`!tag value`): its content may hold mappings too.
            let (IgnoredAny, variant) = data.variant::<IgnoredAny>()?;
            de::VariantAccess::newtype_variant_seed(variant, self)
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            let mut seen = HashSet::new();
            let repeated = RefCell::new(None);
            loop {
                let key = match map.next_key_seed(KeyText {
                    seen: Some((&mut seen, &repeated)),
                }) {
                    Ok(Some(key)) => key,
                    Ok(None) => return Ok(()),
                    Err(e) => {
                        if let Some(key) = repeated.take() {
                            *self.found.borrow_mut() = Some(self.child(&key));
                        }
                        return Err(e);
                    }
                };
                let path = match &key {
                    Some(key) => self.child(key),
                    None => self.path.clone(),
                };
                map.next_value_seed(Unique {
                    path,
                    found: self.found,
                })?;
            }
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
            let mut index = 0;
            while seq
                .next_element_seed(Unique {
                    path: format!("{}[{index}]", self.path),
                    found: self.found,
                })?
                .is_some()
            {
                index += 1;
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        let config = Config::parse("", "test").expect("empty config is valid");
        assert_eq!(config, Config::default());
        assert_eq!(config.outputs.targets[0].kind, OutputKind::Stdout);
    }

    #[test]
    fn full_example_parses() {
        let text = r#"
listen: 127.0.0.1:4196
dataDir: ./data
durability: none
ingest: { maxBodyBytes: 2Mi, authToken: secret }
dedup: { window: 1h }
buffer: { maxBytes: 64Mi, whenFull: dropOldest, profile: sidecar }
outputs:
  pattern: fanOut
  targets:
    - name: openmeter
      type: openmeter
      url: https://openmeter.cloud
      tokenFrom: { env: OPENMETER_TOKEN }
      batching: { count: 50, byteSize: 512Ki, period: 250ms, jitter: 10ms }
      retry: { initialInterval: 100ms, maxInterval: 5s, maxElapsed: 1h }
"#;
        let config = Config::parse(text, "test").expect("valid");
        assert_eq!(config.durability, Durability::None);
        assert_eq!(config.ingest.max_body_bytes, ByteSize(2 << 20));
        assert_eq!(config.buffer.when_full, WhenFull::DropOldest);
        assert_eq!(config.buffer.profile, BufferProfile::Sidecar);
        let target = &config.outputs.targets[0];
        assert_eq!(target.batching.byte_size, ByteSize(512 << 10));
        assert_eq!(target.retry.max_elapsed.get(), Duration::from_secs(3600));
        assert_eq!(
            target.token_from,
            Some(SecretSource::env("OPENMETER_TOKEN"))
        );
    }

    #[test]
    fn errors_name_the_key_path() {
        let cases = [
            ("bogus: 1", "bogus", "unknown field `bogus`"),
            (
                "outputs: { targets: [ { name: a, type: openmeter, url: \"http://x\", tokenFrom: {} } ] }",
                "outputs.targets[0].tokenFrom",
                "exactly one",
            ),
            ("listen: [", "listen", "line 1"),
            ("dedup:\n  window: [1]\n  nope: 2", "dedup.window", "line 2"),
            (
                "dedup: { window: soon }",
                "dedup.window",
                "invalid duration",
            ),
            (
                "buffer: { maxBytes: 10Zi }",
                "buffer.maxBytes",
                "unknown unit",
            ),
            (
                "buffer: { whenFull: panic }",
                "buffer.whenFull",
                "unknown variant",
            ),
            (
                "outputs: { targets: [ { name: a, type: openmeter } ] }",
                "outputs.targets[0].url",
                "needs a url",
            ),
            (
                "outputs: { targets: [ { name: a, type: stdout }, { name: a, type: stdout } ] }",
                "outputs.targets[1].name",
                "used twice",
            ),
            (
                "outputs: { targets: [ { name: a, type: stdout, retry: { initialInterval: 2s, maxInterval: 1s } } ] }",
                "outputs.targets[0].retry.maxInterval",
                "initialInterval",
            ),
            (
                "outputs: { pattern: fallback, targets: [ { name: a, type: stdout } ] }",
                "outputs.targets",
                "at least two outputs",
            ),
            (
                "outputs: { pattern: fallback, targets: [ { name: a, type: stdout }, { name: b, type: stdout, retry: { maxElapsed: 1h } } ] }",
                "outputs.targets[1].retry.maxElapsed",
                "every output rejects it",
            ),
            (
                "outputs: { targets: [ { name: a, type: stdout, maxInFlight: 0 } ] }",
                "outputs.targets[0].maxInFlight",
                "between 1 and 256",
            ),
            (
                "outputs: { targets: [ { name: a, type: stdout, maxInFlight: 257 } ] }",
                "outputs.targets[0].maxInFlight",
                "between 1 and 256",
            ),
        ];
        for (text, key, message) in cases {
            let err = Config::parse(text, "f.yaml").expect_err(text).to_string();
            assert!(err.contains(key), "{text}: {err} should name {key}");
            assert!(err.contains(message), "{text}: {err} should say {message}");
            assert!(err.starts_with("f.yaml: "), "{err}");
            let rest = err
                .strip_prefix(&format!("f.yaml: {key}: "))
                .unwrap_or_default();
            let head = rest.split(": ").next().unwrap_or_default();
            assert!(!key.starts_with(head), "{err} repeats the path");
        }
    }

    #[test]
    fn errors_found_after_parsing_name_line_and_column() {
        let webhook = "outputs:\n  targets:\n    - name: hook\n      type: webhook\n      url: http://127.0.0.1:1\n";
        let cases = [
            (
                "ingest:\n  maxBodyBytes: 1Mi\n  maxBodyBytes: 2Mi\n",
                "ingest.maxBodyBytes",
                "line 3 column 3",
            ),
            (
                "outputs:\n  targets:\n    - name: a\n      type: webhook\n      url: http://x\n      secret: s\n      headers:\n        X-A: 1\n        X-A: 2\n",
                "outputs.targets[0].headers.X-A",
                "line 9 column 9",
            ),
            (
                "outputs:\n  targets:\n    - name: twin\n      type: stdout\n    - name: twin\n      type: stdout\n",
                "outputs.targets[1].name",
                "line 5 column 13",
            ),
            (
                "outputs:\n  targets:\n    - name: up\n      type: openmeter\n",
                "outputs.targets[0].url",
                "line 3 column 7",
            ),
            (webhook, "outputs.targets[0].secretFrom", "line 3 column 7"),
            (
                "outputs:\n  targets:\n    - name: a\n      type: stdout\n      batching:\n        count: 0\n",
                "outputs.targets[0].batching.count",
                "line 6 column 16",
            ),
            (
                "outputs:\n  targets:\n    - name: a\n      type: stdout\n      retry: { initialInterval: 2s, maxInterval: 1s }\n",
                "outputs.targets[0].retry.maxInterval",
                "line 5 column 50",
            ),
            (
                "ingest:\n  authToken: \"\"\n",
                "ingest.authToken",
                "line 2 column 14",
            ),
            (
                "ingest: { readTimeout: 1s, idleTimeout: 5s }\n",
                "ingest.idleTimeout",
                "line 1 column 41",
            ),
            (
                "ingest:\n  maxConnections: 0\n",
                "ingest.maxConnections",
                "line 2 column 19",
            ),
        ];
        for (text, key, at) in cases {
            let err = Config::parse(text, "f.yaml").expect_err(text).to_string();
            assert!(
                err.starts_with(&format!("f.yaml: {key}: ")),
                "{text}: {err} should name {key}"
            );
            assert!(err.ends_with(at), "{text}: {err} should end with {at}");
        }
    }

    #[test]
    fn an_empty_token_is_not_auth_off() {
        let err = Config::parse("ingest: { authToken: \"  \" }", "f.yaml").expect_err("empty");
        assert!(err.to_string().contains("remove the key"), "{err}");
        let config = Config::parse("ingest: { authToken: null }", "f.yaml").expect("null is off");
        assert_eq!(config.ingest.auth_token, None);
    }

    #[test]
    fn pod_identity_comes_from_its_sources() {
        let dir = tempfile::tempdir().expect("tempdir");
        let namespace = dir.path().join("namespace");
        std::fs::write(&namespace, "shop\n").expect("write");
        let text = format!(
            "pod: {{ namespaceFrom: {{ file: {} }}, nameFrom: {{ env: TALLY_TEST_POD_NAME_UNSET }} }}",
            namespace.display()
        );
        let config = Config::parse(&text, "test").expect("valid");
        let error = config
            .pod_identity()
            .expect_err("the name variable is not set");
        assert_eq!(
            error.to_string(),
            "pod.nameFrom: environment variable TALLY_TEST_POD_NAME_UNSET is not set"
        );
        let text = format!(
            "pod: {{ namespaceFrom: {{ file: {} }} }}",
            namespace.display()
        );
        let config = Config::parse(&text, "test").expect("valid");
        assert_eq!(
            config.pod_identity().expect("resolves"),
            PodIdentity {
                namespace: Some("shop".into()),
                name: None
            }
        );
        let error = Config::parse("pod: { nameFrom: {} }", "test").expect_err("empty source");
        assert_eq!(
            error.to_string(),
            "test: pod.nameFrom: set exactly one of `env` or `file` at line 1 column 18"
        );
    }

    #[test]
    fn sizes_parse_and_print() {
        for (text, bytes) in [
            ("1024", 1024),
            ("64Ki", 64 << 10),
            ("1Mi", 1 << 20),
            ("1Gi", 1 << 30),
            ("1MB", 1_000_000),
        ] {
            assert_eq!(text.parse::<ByteSize>(), Ok(ByteSize(bytes)), "{text}");
        }
        assert!("".parse::<ByteSize>().is_err());
        assert!("-1".parse::<ByteSize>().is_err());
        assert_eq!(ByteSize(1 << 30).to_string(), "1Gi");
        assert_eq!(ByteSize(1500).to_string(), "1500");
    }

    #[test]
    fn secrets_come_from_env_and_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("token");
        std::fs::write(&file, "s3cret\n").expect("write");
        assert_eq!(
            SecretSource::file(&file).resolve(),
            Ok("s3cret".to_string())
        );
        let missing = SecretSource::env("TALLY_TEST_SURELY_UNSET").resolve();
        assert!(
            missing
                .expect_err("unset")
                .contains("TALLY_TEST_SURELY_UNSET")
        );
    }
}
