//! The configuration's keys, their types and their defaults.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ByteSize, HumanDuration, SecretSource};

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
    /// Write buffers of at most 4 MiB and a 1 MiB block cache that also holds the files'
    /// index and filter blocks, in 4 KiB partitions, for a process next to every pod: more,
    /// smaller flushes in exchange for a footprint of tens of MiB.
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
