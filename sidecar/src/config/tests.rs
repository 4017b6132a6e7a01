use std::time::Duration;

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
