//! Configuration errors as a user meets them: `check-config` and a start with a broken file
//! both exit 2 naming the key (or the YAML line), and a data directory that is not a RocksDB
//! buffer stops the start with a clear error instead of a crash or a hang.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;
use tally_tests::sidecar::run_tally;
use tally_tests::{Sidecar, SidecarBuilder, TestUpstream, event};
use tempfile::TempDir;

fn write(dir: &TempDir, name: &str, text: &str) -> PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    path
}

async fn check_config(path: &Path) -> tally_tests::CliOutput {
    run_tally(
        &[OsString::from("check-config"), path.as_os_str().to_owned()],
        &[],
    )
    .await
}

fn tempdir() -> TempDir {
    tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"))
}

/// The configuration of the contract, every key set.
const FULL: &str = r#"
listen: 127.0.0.1:4196
dataDir: /tmp/tally-config-test-unused
durability: sync
shutdownTimeout: 10s
log: { format: json, level: info }
ingest:
  maxBodyBytes: 1Mi
  authToken: secret
dedup: { window: 24h }
buffer: { maxBytes: 1Gi, whenFull: dropOldest }
excludeNamespaces: [kube-system, tally]
outputs:
  pattern: fanOut
  targets:
    - name: upstream
      type: openmeter
      url: http://127.0.0.1:8888
      token: abc
      timeout: 10s
      batching: { count: 100, byteSize: 1Mi, period: 1s, jitter: 0s }
      retry: { initialInterval: 500ms, maxInterval: 30s, maxElapsed: 0s }
    - name: central-2
      type: collector
      url: http://127.0.0.1:8889
      tokenFrom: { env: CENTRAL_TOKEN }
    - name: stdout
      type: stdout
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_files_pass_check_config() {
    let dir = tempdir();
    let token_file = write(&dir, "token", "from-a-file\n");
    let with_files = format!(
        "ingest:\n  authTokenFrom: {{ file: {} }}\noutputs:\n  targets:\n    - name: a\n      type: openmeter\n      url: http://127.0.0.1:1\n      tokenFrom: {{ file: {} }}\n",
        token_file.display(),
        token_file.display()
    );
    let cases = [
        ("empty.yaml", String::new()),
        ("comment.yaml", "# only a comment\n".to_string()),
        ("full.yaml", FULL.to_string()),
        (
            "sizes.yaml",
            "ingest: { maxBodyBytes: 65536 }\nbuffer: { maxBytes: 16Mi }\n".to_string(),
        ),
        (
            "sizes-si.yaml",
            "ingest: { maxBodyBytes: 64KB }\nbuffer: { maxBytes: 1GB }\n".to_string(),
        ),
        ("files.yaml", with_files),
        (
            "no-dedup.yaml",
            "dedup: { window: 0s }\ndurability: none\n".to_string(),
        ),
    ];
    for (name, text) in cases {
        let path = write(&dir, name, &text);
        let output = check_config(&path).await;
        output.assert_success();
        assert_eq!(
            output.stdout.trim(),
            format!("{}: ok", path.display()),
            "{name}"
        );
    }
}

/// Broken files and what the error must name.
fn broken_cases() -> Vec<(&'static str, String, Vec<&'static str>)> {
    let target = |extra: &str| {
        format!(
            "outputs:\n  targets:\n    - name: upstream\n      type: openmeter\n      url: http://127.0.0.1:1\n{extra}"
        )
    };
    vec![
        (
            "unknown top-level key",
            "listne: 127.0.0.1:1\n".to_string(),
            vec!["listne"],
        ),
        (
            "unknown nested key",
            target("      retyr: { initialInterval: 1s }\n"),
            vec!["outputs.targets[0]", "retyr"],
        ),
        (
            "bad duration",
            target("      retry: { initialInterval: 5 parsecs }\n"),
            vec!["outputs.targets[0].retry.initialInterval"],
        ),
        (
            "bad top-level duration",
            "shutdownTimeout: soon\n".to_string(),
            vec!["shutdownTimeout"],
        ),
        (
            "bad size",
            "buffer: { maxBytes: 12XB }\n".to_string(),
            vec!["buffer.maxBytes"],
        ),
        (
            "a data directory too small for RocksDB's own files",
            "buffer: { maxBytes: 8Mi }\n".to_string(),
            vec!["buffer.maxBytes", "16Mi"],
        ),
        (
            "a dead-letter store larger than a quarter of the data directory",
            "buffer: { maxBytes: 64Mi }\ndeadLetter: { maxBytes: 32Mi }\n".to_string(),
            vec!["deadLetter.maxBytes", "quarter"],
        ),
        (
            "a dedup index without room",
            "dedup: { maxBytes: 0 }\n".to_string(),
            vec!["dedup.maxBytes", "more than 0"],
        ),
        (
            "negative size",
            "ingest: { maxBodyBytes: -1 }\n".to_string(),
            vec!["ingest.maxBodyBytes"],
        ),
        (
            "bad enum",
            "buffer: { whenFull: dropNewest }\n".to_string(),
            vec!["buffer.whenFull", "dropNewest"],
        ),
        (
            "bad durability",
            "durability: maybe\n".to_string(),
            vec!["durability", "maybe"],
        ),
        (
            "bad log format",
            "log: { format: xml }\n".to_string(),
            vec!["log.format"],
        ),
        (
            "bad output type",
            "outputs:\n  targets:\n    - name: k\n      type: kafka\n".to_string(),
            vec!["outputs.targets[0]", "kafka"],
        ),
        ("bad listen address", "listen: nowhere\n".to_string(), vec!["listen"]),
        (
            "wrong type",
            "dedup: { window: [1] }\n".to_string(),
            vec!["dedup.window"],
        ),
        (
            "bad output name",
            "outputs:\n  targets:\n    - name: Up_Stream\n      type: stdout\n".to_string(),
            vec!["outputs.targets[0].name"],
        ),
        (
            "duplicate output names",
            "outputs:\n  targets:\n    - name: twin\n      type: stdout\n    - name: twin\n      type: stdout\n".to_string(),
            vec!["outputs.targets[1].name", "twin", "line 5 column 13"],
        ),
        (
            "openmeter output without url",
            "outputs:\n  targets:\n    - name: up\n      type: openmeter\n".to_string(),
            vec!["outputs.targets[0].url", "needs a url", "line 3 column 7"],
        ),
        (
            "webhook output without a secret",
            "outputs:\n  targets:\n    - name: hook\n      type: webhook\n      url: http://127.0.0.1:1\n".to_string(),
            vec!["outputs.targets[0].secretFrom", "signing secret", "line 3 column 7"],
        ),
        (
            "duplicate top-level key",
            "listen: 127.0.0.1:1\ndedup: { window: 1h }\nlisten: 127.0.0.1:2\n".to_string(),
            vec!["listen", "set twice", "line 3 column 1"],
        ),
        (
            "duplicate nested key",
            target("      batching:\n        count: 10\n        period: 1s\n        count: 20\n"),
            vec!["outputs.targets[0].batching.count", "set twice", "line 9 column 9"],
        ),
        (
            "batching count 0",
            target("      batching: { count: 0 }\n"),
            vec!["outputs.targets[0].batching.count", "at least 1", "line 6 column 26"],
        ),
        (
            "maxInterval shorter than initialInterval",
            target("      retry:\n        initialInterval: 10s\n        maxInterval: 1s\n"),
            vec!["outputs.targets[0].retry.maxInterval", "initialInterval", "line 8 column 22"],
        ),
        (
            "maxInterval left at its default, shorter than initialInterval",
            target("      retry:\n        initialInterval: 1m\n"),
            vec!["outputs.targets[0].retry.maxInterval", "initialInterval", "line 7 column 9"],
        ),
        (
            "empty ingest token",
            "ingest:\n  authToken: \"\"\n".to_string(),
            vec!["ingest.authToken", "remove the key", "line 2 column 14"],
        ),
        (
            "idleTimeout longer than readTimeout",
            "ingest:\n  readTimeout: 5s\n  idleTimeout: 1m\n".to_string(),
            vec!["ingest.idleTimeout", "readTimeout", "line 3 column 16"],
        ),
        (
            "no connections allowed",
            "ingest:\n  maxConnections: 0\n".to_string(),
            vec!["ingest.maxConnections", "at least 1", "line 2 column 19"],
        ),
        (
            "YAML syntax error",
            "listen: 127.0.0.1:1\ndedup:\n  window: 1h\n buffer: [unclosed\n".to_string(),
            vec!["line 4"],
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_files_fail_check_config_with_exit_2_naming_the_key() {
    let dir = tempdir();
    let mut failures = Vec::new();
    for (n, (what, text, needles)) in broken_cases().into_iter().enumerate() {
        let path = write(&dir, &format!("broken-{n}.yaml"), &text);
        let output = check_config(&path).await;
        let named = needles.iter().all(|needle| output.stderr.contains(needle));
        if output.code() != Some(2) || !named || output.stdout.contains(": ok") {
            failures.push(format!(
                "{what}: exit {:?}, stderr {:?} should name {needles:?}",
                output.code(),
                output.stderr.trim()
            ));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starting_with_a_broken_config_exits_2_with_the_same_message() {
    let mut failures = Vec::new();
    for (what, text, needles) in broken_cases() {
        let mut sidecar = SidecarBuilder::yaml(&text).build();
        sidecar.spawn();
        let status = sidecar.wait_exit(Duration::from_secs(20)).await;
        let stderr = sidecar.stderr();
        if status.code() != Some(2) || !needles.iter().all(|n| stderr.contains(n)) {
            failures.push(format!(
                "{what}: exit {status}, stderr {:?} should name {needles:?}",
                stderr.trim()
            ));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));

    // TALLY_CONFIG names the file just like --config.
    let dir = tempdir();
    let path = write(&dir, "broken.yaml", "buffer: { maxBytes: 12XB }\n");
    let output = run_tally(&[], &[("TALLY_CONFIG".into(), path.display().to_string())]).await;
    assert_eq!(output.code(), Some(2), "{}", output.stderr);
    assert!(
        output.stderr.contains("buffer.maxBytes"),
        "{}",
        output.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_token_source_stops_the_start() {
    let mut sidecar = Sidecar::builder()
        .set(
            "ingest.authTokenFrom",
            json!({ "env": "TALLY_TEST_TOKEN_THAT_IS_NOT_SET" }),
        )
        .build();
    sidecar.spawn();
    let status = sidecar.wait_exit(Duration::from_secs(20)).await;
    assert!(!status.success(), "started without its token");
    assert!(
        sidecar
            .stderr()
            .contains("TALLY_TEST_TOKEN_THAT_IS_NOT_SET"),
        "the error names the variable: {}",
        sidecar.stderr()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_can_come_from_env_and_files() {
    let upstream = TestUpstream::start().await;
    let dir = tempdir();
    let token_file = write(&dir, "upstream-token", "token-from-file\n");
    let sidecar = Sidecar::builder()
        .openmeter_output("upstream", &upstream.url())
        .set("outputs.targets.0.tokenFrom", json!({ "file": token_file }))
        .set(
            "ingest.authTokenFrom",
            json!({ "env": "TALLY_TEST_INGEST_TOKEN" }),
        )
        .env("TALLY_TEST_INGEST_TOKEN", "token-from-env")
        .start()
        .await;
    let body = serde_json::to_string(&[event("token-1")]).unwrap_or_default();
    let post = |token: Option<&'static str>| {
        let mut request = sidecar
            .request(reqwest::Method::POST, "/api/v1/events")
            .header("content-type", "application/cloudevents-batch+json")
            .body(body.clone());
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send()
    };
    let status = |r: reqwest::Result<reqwest::Response>| {
        r.map(|r| r.status().as_u16())
            .unwrap_or_else(|e| panic!("{e}"))
    };
    assert_eq!(status(post(None).await), 401);
    assert_eq!(status(post(Some("token-from-env")).await), 204);
    upstream
        .wait_delivered(["token-1"], Duration::from_secs(30))
        .await;
    let request = &upstream.requests()[0];
    assert_eq!(
        request.header("authorization"),
        Some("Bearer token-from-file"),
        "the file's content, without the trailing newline"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_dir_that_is_a_file_is_a_clear_error() {
    let dir = tempdir();
    let file = write(&dir, "not-a-directory", "I am a file\n");
    let mut sidecar = Sidecar::builder().set("dataDir", json!(file)).build();
    sidecar.spawn();
    let status = sidecar.wait_exit(Duration::from_secs(20)).await;
    let stderr = sidecar.stderr();
    assert!(
        status.code().is_some_and(|c| c != 0),
        "exits with an error code, not 0 or a signal: {status}; stderr: {stderr}"
    );
    assert!(
        stderr.contains(&file.display().to_string()),
        "the error names the data directory: {stderr}"
    );
    assert!(
        !stderr.contains("panicked"),
        "an error, not a panic: {stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_dir_holding_garbage_is_a_clear_error() {
    let mut sidecar = Sidecar::builder().build();
    let data = sidecar.data_dir().to_path_buf();
    std::fs::create_dir_all(&data).unwrap_or_else(|e| panic!("{e}"));
    // Looks like RocksDB's files, holds nonsense.
    std::fs::write(data.join("CURRENT"), "MANIFEST-000042\n").unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(
        data.join("MANIFEST-000042"),
        b"\x00\x01garbage\xff".repeat(100),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(data.join("IDENTITY"), "not an identity").unwrap_or_else(|e| panic!("{e}"));
    sidecar.spawn();
    let status = sidecar.wait_exit(Duration::from_secs(20)).await;
    let stderr = sidecar.stderr();
    assert!(
        status.code().is_some_and(|c| c != 0),
        "exits with an error code, not 0 or a signal: {status}; stderr: {stderr}"
    );
    assert!(
        stderr.contains(&data.display().to_string()),
        "the error names the data directory: {stderr}"
    );
    assert!(
        !stderr.contains("panicked"),
        "an error, not a panic: {stderr}"
    );

    // The CLI reports the same instead of crashing.
    let stats = sidecar.run_cli(&["buffer", "stats", "--json"]).await;
    assert!(
        stats.code().is_some_and(|c| c != 0),
        "buffer stats on a corrupt buffer: exit {:?}",
        stats.code()
    );
    assert!(
        stats.stderr.contains(&data.display().to_string()),
        "{}",
        stats.stderr
    );
}
