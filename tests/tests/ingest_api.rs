//! The ingest HTTP API as a client sees it: what is accepted (204, empty body, then delivered
//! byte-for-byte), what is rejected (status, problem+json, nothing delivered, metrics counted).

use std::time::Duration;

use serde_json::{Value, json};
use tally_tests::events::id_of;
use tally_tests::{Sidecar, TestUpstream, assert_problem, event};

const DELIVERY: Duration = Duration::from_secs(30);

async fn sidecar_and_upstream() -> (Sidecar, TestUpstream) {
    let upstream = TestUpstream::start().await;
    let sidecar = Sidecar::builder()
        .openmeter_output("upstream", &upstream.url())
        .start()
        .await;
    (sidecar, upstream)
}

/// Asserts a 204 with an empty body.
async fn assert_accepted(response: reqwest::Response, what: &str) {
    let status = response.status();
    let body = response.bytes().await.unwrap_or_default();
    assert_eq!(
        status,
        204,
        "{what}: body {:?}",
        String::from_utf8_lossy(&body)
    );
    assert!(
        body.is_empty(),
        "{what}: a 204 must have an empty body (the OpenMeter SDKs expect it), got {:?}",
        String::from_utf8_lossy(&body)
    );
}

/// Asserts the upstream received exactly these events (same attributes, same key order), by id.
fn assert_delivered_verbatim(upstream: &TestUpstream, sent: &[Value]) {
    let delivered = upstream.delivered_events();
    for event in sent {
        let id = id_of(event);
        let got: Vec<&Value> = delivered.iter().filter(|e| e["id"] == id).collect();
        assert_eq!(got.len(), 1, "event {id} should be delivered once");
        assert_eq!(
            got[0].to_string(),
            event.to_string(),
            "event {id} must reach the upstream unchanged, attribute order included"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_events_get_an_empty_204_and_arrive_unchanged() {
    let (sidecar, upstream) = sidecar_and_upstream().await;
    let mut sent = Vec::new();

    // Every accepted content type, with and without parameters.
    for (n, content_type) in [
        "application/cloudevents+json",
        "application/cloudevents+json; charset=utf-8",
        "application/json",
        "application/json; charset=utf-8",
        "application/json;charset=UTF-8",
    ]
    .into_iter()
    .enumerate()
    {
        let e = event(&format!("single-{n}"));
        let response = sidecar.post(Some(content_type), e.to_string()).await;
        assert_accepted(response, content_type).await;
        sent.push(e);
    }
    for (n, content_type) in [
        "application/cloudevents-batch+json",
        "application/cloudevents-batch+json; charset=utf-8",
        "application/json",
        "application/json; charset=utf-8",
    ]
    .into_iter()
    .enumerate()
    {
        let batch = vec![
            event(&format!("batch-{n}-a")),
            event(&format!("batch-{n}-b")),
        ];
        let response = sidecar
            .post(Some(content_type), Value::Array(batch.clone()).to_string())
            .await;
        assert_accepted(response, &format!("{content_type} (array)")).await;
        sent.extend(batch);
    }

    // Optional attributes in every allowed form, and extension attributes of every JSON type.
    let mut variants = Vec::new();
    let mut variant = |name: &str, edit: &dyn Fn(&mut Value)| {
        let mut e = event(&format!("variant-{name}"));
        edit(&mut e);
        variants.push(e);
    };
    variant("time-null", &|e| e["time"] = Value::Null);
    variant("time-absent", &|e| {
        e.as_object_mut().map(|o| o.remove("time"));
    });
    variant("time-offset-nanos", &|e| {
        e["time"] = json!("2024-02-29T23:59:59.123456789+02:00")
    });
    variant("data-null", &|e| e["data"] = Value::Null);
    variant("data-absent", &|e| {
        e.as_object_mut().map(|o| o.remove("data"));
    });
    variant("data-empty", &|e| e["data"] = json!({}));
    variant(
        "data-nested",
        &|e| e["data"] = json!({"a": {"b": [1, 2.5, "x", null, true]}, "unicode": "żółw €"}),
    );
    variant("datacontenttype", &|e| {
        e["datacontenttype"] = json!("application/json")
    });
    variant("datacontenttype-null", &|e| {
        e["datacontenttype"] = Value::Null
    });
    variant("dataschema", &|e| {
        e["dataschema"] = json!("https://example.com/schemas/api-calls.json")
    });
    variant("dataschema-null", &|e| e["dataschema"] = Value::Null);
    variant("extensions", &|e| {
        e["k8snamespace"] = json!("shop");
        e["retries"] = json!(3);
        e["sampled"] = json!(true);
        e["ratio"] = json!(0.25);
    });
    let response = sidecar.post_events(&variants).await;
    assert_accepted(response, "optional attribute variants").await;
    sent.extend(variants);

    let ids: Vec<&str> = sent.iter().map(id_of).collect();
    upstream.wait_delivered(ids, DELIVERY).await;
    assert_delivered_verbatim(&upstream, &sent);

    let metrics = sidecar.metrics().await;
    assert_eq!(
        metrics.value("tally_events_accepted_total"),
        sent.len() as f64
    );
    assert!(metrics.value("tally_events_received_total") >= sent.len() as f64);
    assert_eq!(
        metrics.value("tally_events_rejected_total"),
        0.0,
        "nothing was rejected"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_requests_follow_the_openmeter_ingest_api() {
    let upstream = TestUpstream::start().await;
    let sidecar = Sidecar::builder()
        .openmeter_output("upstream", &upstream.url())
        .set("outputs.targets.0.token", json!("upstream-token"))
        .start()
        .await;
    sidecar.send_ok(&[event("fwd-1"), event("fwd-2")]).await;
    upstream.wait_delivered(["fwd-1", "fwd-2"], DELIVERY).await;
    for request in upstream.requests() {
        assert_eq!(request.method, "POST");
        assert_eq!(request.path, "/api/v1/events");
        assert_eq!(
            request.header("content-type"),
            Some("application/cloudevents-batch+json")
        );
        assert_eq!(
            request.header("authorization"),
            Some("Bearer upstream-token")
        );
    }
}

/// One invalid form of one attribute: `None` removes the attribute.
struct Case {
    field: &'static str,
    value: Option<Value>,
}

fn invalid_cases() -> Vec<Case> {
    let mut cases = Vec::new();
    let mut case = |field, value| cases.push(Case { field, value });
    for field in ["id", "source", "specversion", "type", "subject"] {
        case(field, None);
        case(field, Some(json!("")));
        case(field, Some(json!(1)));
        case(field, Some(Value::Null));
        case(field, Some(json!(["a"])));
    }
    case("specversion", Some(json!("0.3")));
    case("specversion", Some(json!("1")));
    case("specversion", Some(json!("2.0")));
    case("time", Some(json!("yesterday")));
    case("time", Some(json!("2024-01-01T00:00:00")));
    case("time", Some(json!("2024-13-01T00:00:00Z")));
    case("time", Some(json!("")));
    case("time", Some(json!(1_700_000_000)));
    case("data", Some(json!("tokens=1")));
    case("data", Some(json!([1, 2])));
    case("data", Some(json!(5)));
    case("data", Some(json!(true)));
    case("datacontenttype", Some(json!("text/plain")));
    case("datacontenttype", Some(json!("application/xml")));
    case("datacontenttype", Some(json!("")));
    case("datacontenttype", Some(json!(5)));
    case("dataschema", Some(json!("")));
    case("dataschema", Some(json!(5)));
    cases
}

fn broken(id: &str, case: &Case) -> Value {
    let mut e = event(id);
    match &case.value {
        None => {
            e.as_object_mut().map(|o| o.remove(case.field));
        }
        Some(value) => e[case.field] = value.clone(),
    }
    e
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_validation_rule_rejects_with_a_problem_naming_index_and_field() {
    let (sidecar, upstream) = sidecar_and_upstream().await;
    let cases = invalid_cases();
    let mut rejected_events = 0;
    for (n, case) in cases.iter().enumerate() {
        let label = format!("{} = {:?}", case.field, case.value);

        let single = broken(&format!("bad-single-{n}"), case);
        let response = sidecar.post_event(&single).await;
        let field = format!("event.{}", case.field);
        assert_problem(&label, response, 400, &[&field]).await;
        rejected_events += 1;

        // All-or-nothing: four valid events around one invalid at index 3.
        let mut batch: Vec<Value> = (0..5)
            .map(|i| event(&format!("bad-batch-{n}-{i}")))
            .collect();
        batch[3] = broken(&format!("bad-batch-{n}-3"), case);
        let response = sidecar.post_events(&batch).await;
        let field = format!("events[3].{}", case.field);
        let problem = assert_problem(&label, response, 400, &[&field]).await;
        assert!(
            !problem["detail"]
                .as_str()
                .unwrap_or_default()
                .contains("events[0]"),
            "{label}: only the invalid event is named: {problem}"
        );
        rejected_events += batch.len();
    }

    sidecar.flush_to(&upstream).await;
    let leaked: Vec<String> = upstream
        .delivered_ids()
        .into_iter()
        .filter(|id| id.starts_with("bad-"))
        .collect();
    assert!(
        leaked.is_empty(),
        "a rejected request stores nothing, yet these were delivered: {leaked:?}"
    );
    let metrics = sidecar.metrics().await;
    assert_eq!(
        metrics.value("tally_events_received_total"),
        metrics.value("tally_events_accepted_total") + metrics.value("tally_events_rejected_total"),
        "received = accepted + rejected"
    );
    assert_eq!(
        metrics.value("tally_events_rejected_total{reason=\"invalid\"}"),
        rejected_events as f64,
        "every event of a rejected request counts as rejected (a batch of 5 counts 5)"
    );
    assert_eq!(
        metrics.value("tally_events_accepted_total"),
        1.0,
        "only the sentinel was accepted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_bodies_are_rejected_with_400() {
    let (sidecar, upstream) = sidecar_and_upstream().await;
    let batch_type = Some("application/cloudevents-batch+json");
    let single_type = Some("application/cloudevents+json");
    let valid = event("malformed-valid").to_string();
    let cases: Vec<(&str, Option<&str>, String, &[&str])> = vec![
        ("truncated JSON", batch_type, format!("[{valid}"), &[]),
        ("not JSON", single_type, "hello".to_string(), &[]),
        ("empty body", single_type, String::new(), &[]),
        ("empty array", batch_type, "[]".to_string(), &[]),
        (
            "empty array as json",
            Some("application/json"),
            "[]".to_string(),
            &[],
        ),
        ("a number", Some("application/json"), "42".to_string(), &[]),
        (
            "array of a non-object",
            batch_type,
            format!("[{valid}, 1]"),
            &["events[1]"],
        ),
        ("an object sent as a batch", batch_type, valid.clone(), &[]),
        (
            "an array sent as one event",
            single_type,
            format!("[{valid}]"),
            &[],
        ),
    ];
    for (what, content_type, body, detail) in cases {
        let response = sidecar.post(content_type, body).await;
        let problem = assert_problem(what, response, 400, detail).await;
        assert!(
            problem["detail"].as_str().is_some(),
            "{what}: problem without detail"
        );
    }
    sidecar.flush_to(&upstream).await;
    assert!(
        !upstream.delivered_id_set().contains("malformed-valid"),
        "the valid event inside a rejected request must not be stored"
    );
    assert!(
        sidecar
            .metric("tally_events_rejected_total{reason=\"invalid\"}")
            .await
            >= 9.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_content_types_get_415() {
    let (sidecar, upstream) = sidecar_and_upstream().await;
    let body = event("wrong-type").to_string();
    for content_type in [
        Some("text/plain"),
        Some("application/xml"),
        Some("application/x-www-form-urlencoded"),
        Some("application/cloudevents-batch+protobuf"),
        None,
    ] {
        let response = sidecar.post(content_type, body.clone()).await;
        assert_problem(&format!("{content_type:?}"), response, 415, &[]).await;
    }
    sidecar.flush_to(&upstream).await;
    assert!(!upstream.delivered_id_set().contains("wrong-type"));
    assert_eq!(
        sidecar
            .metric("tally_events_rejected_total{reason=\"unsupported_media_type\"}")
            .await,
        5.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_max_body_bytes_get_413() {
    let upstream = TestUpstream::start().await;
    let sidecar = Sidecar::builder()
        .openmeter_output("upstream", &upstream.url())
        .set("ingest.maxBodyBytes", json!("64Ki"))
        .start()
        .await;
    let limit = 64 * 1024;

    // A batch just under the limit is fine.
    let mut under = Vec::new();
    let mut size = 2;
    while size < limit - 3000 {
        let e = tally_tests::events::padded_event(&format!("under-{}", under.len()), 2000);
        size += e.to_string().len() + 1;
        under.push(e);
    }
    let response = sidecar.post_events(&under).await;
    assert_accepted(response, "a batch under maxBodyBytes").await;

    // Over the limit, with a Content-Length.
    let over: Vec<Value> = (0..50)
        .map(|i| tally_tests::events::padded_event(&format!("over-{i}"), 2000))
        .collect();
    let body = serde_json::to_vec(&over).unwrap_or_default();
    assert!(body.len() > limit);
    let response = sidecar.post_events(&over).await;
    assert_problem("body over the limit", response, 413, &[]).await;

    // Over the limit, chunked (no Content-Length): the limit still holds.
    let response = post_chunked(&sidecar, body).await;
    assert_eq!(
        response.0, 413,
        "chunked body over the limit: {}",
        response.1
    );

    sidecar.flush_to(&upstream).await;
    let delivered = upstream.delivered_id_set();
    assert!(delivered.contains("under-0"));
    assert!(
        !delivered.iter().any(|id| id.starts_with("over-")),
        "nothing of a 413 request is stored"
    );
    assert!(
        sidecar
            .metric("tally_events_rejected_total{reason=\"too_large\"}")
            .await
            >= 2.0
    );
}

/// POSTs `body` with `Transfer-Encoding: chunked` (hyper's client sends a body of unknown length
/// that way); returns the status and the response body.
async fn post_chunked(sidecar: &Sidecar, body: Vec<u8>) -> (u16, String) {
    use futures::StreamExt;
    use http_body_util::{BodyExt, StreamBody};
    use hyper::body::Frame;
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;

    let chunks: Vec<Result<Frame<bytes::Bytes>, std::io::Error>> = body
        .chunks(8192)
        .map(|c| Ok(Frame::data(bytes::Bytes::copy_from_slice(c))))
        .collect();
    let stream = StreamBody::new(futures::stream::iter(chunks).boxed());
    let mut request = http::Request::post(sidecar.events_url())
        .header("content-type", "application/cloudevents-batch+json")
        .body(stream)
        .unwrap_or_else(|e| panic!("request: {e}"));
    if let Some(token) = sidecar.token() {
        let value = format!("Bearer {token}")
            .parse()
            .unwrap_or_else(|e| panic!("header: {e}"));
        request.headers_mut().insert("authorization", value);
    }
    let client = Client::builder(TokioExecutor::new()).build_http();
    match client.request(request).await {
        Ok(response) => {
            let status = response.status().as_u16();
            let body = response
                .into_body()
                .collect()
                .await
                .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
                .unwrap_or_default();
            (status, body)
        }
        // Answering 413 and closing before the whole body was read is legitimate, but the
        // client must see the 413: a reset without an answer is not.
        Err(e) => panic!("chunked request over the limit got no answer: {e:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_token_is_required_on_ingest_but_not_on_probes() {
    let upstream = TestUpstream::start().await;
    let sidecar = Sidecar::builder()
        .openmeter_output("upstream", &upstream.url())
        .set("ingest.authToken", json!("s3cret"))
        .start()
        .await;
    let body = Value::Array(vec![event("unauthorized")]).to_string();
    let attempts: [(&str, Option<&str>); 4] = [
        ("no Authorization header", None),
        ("wrong token", Some("Bearer nope")),
        ("token without the Bearer scheme", Some("s3cret")),
        ("Basic scheme", Some("Basic czNjcmV0")),
    ];
    for (what, authorization) in attempts {
        let mut request = sidecar
            .request(reqwest::Method::POST, "/api/v1/events")
            .header("content-type", "application/cloudevents-batch+json")
            .body(body.clone());
        if let Some(value) = authorization {
            request = request.header("authorization", value);
        }
        let response = request
            .send()
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        let challenge = response
            .headers()
            .get("www-authenticate")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        assert_problem(what, response, 401, &[]).await;
        assert!(
            challenge.starts_with("Bearer"),
            "{what}: a 401 carries WWW-Authenticate: Bearer, got {challenge:?}"
        );
    }
    // The right token (the harness sends it).
    let response = sidecar.post_events(&[event("authorized")]).await;
    assert_accepted(response, "right token").await;

    // Probes and metrics are for kubelet and Prometheus, which send no token.
    for path in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(
            sidecar.get(path).await.status(),
            200,
            "{path} without a token"
        );
    }
    sidecar.flush_to(&upstream).await;
    let delivered = upstream.delivered_id_set();
    assert!(delivered.contains("authorized"));
    assert!(!delivered.contains("unauthorized"));
    assert_eq!(
        sidecar
            .metric("tally_events_rejected_total{reason=\"unauthorized\"}")
            .await,
        4.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_mode_events_are_accepted_and_forwarded_as_structured_events() {
    let (sidecar, upstream) = sidecar_and_upstream().await;
    // A binary-mode request: these ce-* headers (and Content-Type) unless `overrides` replaces
    // or (with an empty value) removes one.
    let binary = async |id: &str, overrides: &[(&str, &str)], body: &'static str| {
        let mut headers = vec![
            ("content-type", "application/json"),
            ("ce-specversion", "1.0"),
            ("ce-id", id),
            ("ce-source", "tally-tests/binary"),
            ("ce-type", "api-calls"),
            ("ce-subject", "customer-7"),
        ];
        for (name, value) in overrides {
            headers.retain(|(n, _)| n != name);
            if !value.is_empty() {
                headers.push((name, value));
            }
        }
        let mut request = sidecar
            .request(reqwest::Method::POST, "/api/v1/events")
            .body(body);
        for (name, value) in headers {
            request = request.header(name, value);
        }
        request.send().await.unwrap_or_else(|e| panic!("{e}"))
    };
    let data = r#"{"tokens":42,"model":"large"}"#;
    let response = binary(
        "bin-1",
        &[
            ("ce-time", "2024-03-04T05:06:07Z"),
            ("ce-k8snamespace", "shop"),
        ],
        data,
    )
    .await;
    assert_accepted(response, "binary mode").await;
    let response = binary(
        "bin-2",
        &[("content-type", "application/json; charset=utf-8")],
        data,
    )
    .await;
    assert_accepted(response, "binary mode with charset, no time").await;

    // Binary mode is validated like structured mode.
    let response = binary("bin-no-subject", &[("ce-subject", "")], data).await;
    assert_problem(
        "binary mode without ce-subject",
        response,
        400,
        &["subject"],
    )
    .await;
    let response = binary("bin-old-spec", &[("ce-specversion", "0.3")], data).await;
    assert_problem(
        "binary mode, ce-specversion 0.3",
        response,
        400,
        &["specversion"],
    )
    .await;
    let response = binary("bin-bad-time", &[("ce-time", "yesterday")], data).await;
    assert_problem("binary mode, ce-time yesterday", response, 400, &["time"]).await;
    let response = binary("bin-bad-data", &[], "[1,2]").await;
    assert_problem("binary mode, array body", response, 400, &["data"]).await;

    upstream.wait_delivered(["bin-1", "bin-2"], DELIVERY).await;
    sidecar.flush_to(&upstream).await;
    let delivered = upstream.delivered_events();
    let first = delivered
        .iter()
        .find(|e| e["id"] == "bin-1")
        .unwrap_or_else(|| unreachable!());
    assert_eq!(first["specversion"], "1.0");
    assert_eq!(first["source"], "tally-tests/binary");
    assert_eq!(first["type"], "api-calls");
    assert_eq!(first["subject"], "customer-7");
    assert_eq!(first["time"], "2024-03-04T05:06:07Z");
    assert_eq!(
        first["k8snamespace"], "shop",
        "ce-* headers become extensions"
    );
    assert_eq!(first["data"], json!({"tokens": 42, "model": "large"}));
    let second = delivered
        .iter()
        .find(|e| e["id"] == "bin-2")
        .unwrap_or_else(|| unreachable!());
    assert!(second["time"].is_null(), "no ce-time, no time: {second}");
    let ids = upstream.delivered_id_set();
    for rejected in [
        "bin-no-subject",
        "bin-old-spec",
        "bin-bad-time",
        "bin-bad-data",
    ] {
        assert!(!ids.contains(rejected), "{rejected} was rejected");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_and_every_contract_metric_are_exposed() {
    let (sidecar, _upstream) = sidecar_and_upstream().await;
    assert_eq!(sidecar.get("/healthz").await.status(), 200);
    assert_eq!(sidecar.get("/readyz").await.status(), 200);
    let response = sidecar.get("/metrics").await;
    assert_eq!(response.status(), 200);
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert!(
        content_type.starts_with("text/plain")
            || content_type.starts_with("application/openmetrics-text"),
        "Prometheus text format, got {content_type:?}"
    );
    let metrics = sidecar.metrics().await;
    // Every metric of the contract is there from the start, labelled series included (at 0 for
    // every known reason and output): Prometheus' advice, so that rate() and alerts see the first
    // increment instead of a series appearing out of nowhere.
    let mut missing = Vec::new();
    for name in [
        "tally_events_received_total",
        "tally_events_accepted_total",
        "tally_events_rejected_total",
        "tally_events_deduplicated_total",
        "tally_events_dropped_total",
        "tally_buffer_events",
        "tally_buffer_bytes",
        "tally_buffer_max_bytes",
        "tally_buffer_oldest_event_age_seconds",
        "tally_buffer_commits_total",
        "tally_buffer_commit_events_count",
        "tally_output_events_sent_total",
        "tally_output_batches_sent_total",
        "tally_output_errors_total",
        "tally_output_retries_total",
        "tally_output_dead_lettered_events_total",
        "tally_output_send_duration_seconds_count",
        "tally_output_lag_events",
        "tally_dead_letter_events",
    ] {
        if !metrics.exposes(name) {
            missing.push(name.to_string());
        }
    }
    for reason in [
        "invalid",
        "unauthorized",
        "too_large",
        "unsupported_media_type",
        "buffer_full",
        "stopping",
        "storage_error",
    ] {
        let labels = ("reason".to_string(), reason.to_string());
        if !metrics
            .samples
            .iter()
            .any(|s| s.name == "tally_events_rejected_total" && s.labels.contains(&labels))
        {
            missing.push(format!(
                "tally_events_rejected_total{{reason=\"{reason}\"}}"
            ));
        }
    }
    assert_eq!(
        metrics.value("tally_buffer_max_bytes"),
        1024.0 * 1024.0 * 1024.0,
        "the default buffer.maxBytes is 1Gi"
    );
    assert_eq!(sidecar.get("/nope").await.status(), 404);
    assert!(
        missing.is_empty(),
        "/metrics does not expose these contract metrics at start-up: {missing:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_metrics_count_events() {
    let (sidecar, upstream) = sidecar_and_upstream().await;
    sidecar
        .send_ok(&[event("m-1"), event("m-2"), event("m-3")])
        .await;
    upstream
        .wait_delivered(["m-1", "m-2", "m-3"], DELIVERY)
        .await;
    let metrics = tally_tests::poll_until(DELIVERY, "sent metrics to catch up", async || {
        let m = sidecar.metrics().await;
        (m.value("tally_output_events_sent_total{output=\"upstream\"}") >= 3.0).then_some(m)
    })
    .await;
    assert_eq!(metrics.value("tally_events_received_total"), 3.0);
    assert_eq!(metrics.value("tally_events_accepted_total"), 3.0);
    assert_eq!(
        metrics.value("tally_output_events_sent_total{output=\"upstream\"}"),
        3.0
    );
    assert!(metrics.value("tally_output_batches_sent_total{output=\"upstream\"}") >= 1.0);
    assert!(metrics.value("tally_buffer_commits_total") >= 1.0);
    let lag = sidecar
        .wait_metric(
            DELIVERY,
            "lag back to 0",
            "tally_output_lag_events{output=\"upstream\"}",
            |lag| lag == 0.0,
        )
        .await;
    assert_eq!(lag, 0.0);
}

/// A client that sends its headers and then trickles (here: stops sending) the body gets a 408
/// problem after `ingest.readTimeout`, instead of holding the request open forever; it is counted.
/// Raw TCP, so the test controls exactly which bytes are on the wire.
#[tokio::test]
async fn a_body_that_does_not_arrive_in_time_gets_408() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let sidecar = Sidecar::builder()
        .set("ingest.readTimeout", json!("300ms"))
        .start()
        .await;
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", sidecar.port()))
        .await
        .unwrap_or_else(|e| panic!("connect: {e}"));
    let head = "POST /api/v1/events HTTP/1.1\r\nHost: tally\r\n\
                Content-Type: application/cloudevents+json\r\nContent-Length: 200\r\n\r\n";
    stream
        .write_all(format!("{head}{{\"specversion\":").as_bytes())
        .await
        .unwrap_or_else(|e| panic!("write: {e}"));
    // Nothing more is sent; the answer must come by itself, well before this deadline.
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        let mut chunk = [0u8; 4096];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    answer.extend_from_slice(&chunk[..n]);
                    if answer.windows(4).any(|w| w == b"\r\n\r\n")
                        && String::from_utf8_lossy(&answer).contains("\"instance\"")
                    {
                        break;
                    }
                }
            }
        }
    })
    .await;
    assert!(read.is_ok(), "no answer within 10 s to a stalled body");
    let text = String::from_utf8_lossy(&answer);
    assert!(
        text.starts_with("HTTP/1.1 408"),
        "a stalled body gets 408: {text}"
    );
    assert!(
        text.to_ascii_lowercase()
            .contains("content-type: application/problem+json"),
        "{text}"
    );
    assert!(text.contains("ingest.readTimeout"), "{text}");
    assert_eq!(
        sidecar
            .metric("tally_events_rejected_total{reason=\"read_timeout\"}")
            .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bearer_scheme_is_case_insensitive() {
    let upstream = TestUpstream::start().await;
    let sidecar = Sidecar::builder()
        .openmeter_output("upstream", &upstream.url())
        .set("ingest.authToken", json!("s3cret"))
        .start()
        .await;
    let mut accepted = Vec::new();
    // RFC 7235 2.1: the auth scheme is case-insensitive; the token is not.
    for (n, authorization) in [
        "Bearer s3cret",
        "bearer s3cret",
        "BEARER s3cret",
        "bEaReR s3cret",
    ]
    .into_iter()
    .enumerate()
    {
        let id = format!("scheme-{n}");
        let response = sidecar
            .request(reqwest::Method::POST, "/api/v1/events")
            .header("content-type", "application/cloudevents+json")
            .header("authorization", authorization)
            .body(event(&id).to_string())
            .send()
            .await
            .unwrap_or_else(|e| panic!("{authorization}: {e}"));
        assert_accepted(response, authorization).await;
        accepted.push(id);
    }
    let response = sidecar
        .request(reqwest::Method::POST, "/api/v1/events")
        .header("content-type", "application/cloudevents+json")
        .header("authorization", "bearer S3CRET")
        .body(event("wrong-case-token").to_string())
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_problem("a token in the wrong case", response, 401, &[]).await;
    upstream
        .wait_delivered(accepted.iter().map(String::as_str), DELIVERY)
        .await;
    sidecar.flush_to(&upstream).await;
    assert!(!upstream.delivered_id_set().contains("wrong-case-token"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_mode_header_values_are_percent_decoded() {
    let (sidecar, upstream) = sidecar_and_upstream().await;
    let post = async |headers: &[(&str, &str)]| {
        let mut request = sidecar
            .request(reqwest::Method::POST, "/api/v1/events")
            .header("content-type", "application/json")
            .header("ce-specversion", "1.0")
            .header("ce-type", "api-calls")
            .body(r#"{"calls":1}"#);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.send().await.unwrap_or_else(|e| panic!("{e}"))
    };
    // What the CloudEvents HTTP binding (3.1.3.2) has a sender encode: space, `"`, `%` and
    // non-ASCII (as UTF-8).
    let response = post(&[
        ("ce-id", "pct%2F1"),
        ("ce-source", "checkout%20%22eu%22"),
        ("ce-subject", "caf%C3%A9%20100%25"),
        ("ce-tenant", "%E2%82%AC"),
    ])
    .await;
    assert_accepted(response, "percent-encoded attributes").await;
    upstream.wait_delivered(["pct/1"], DELIVERY).await;
    let delivered = upstream.delivered_events();
    let got = delivered
        .iter()
        .find(|e| e["id"] == "pct/1")
        .unwrap_or_else(|| panic!("pct/1 not among {delivered:?}"));
    assert_eq!(got["source"], "checkout \"eu\"", "{got}");
    assert_eq!(got["subject"], "café 100%", "{got}");
    assert_eq!(got["tenant"], "€", "extension attributes too: {got}");

    for (value, what) in [
        ("100%", "a % that starts no escape"),
        ("%zz", "an escape that is not hex"),
        ("%C3%28", "bytes that are not UTF-8"),
    ] {
        let response = post(&[
            ("ce-id", "pct-bad"),
            ("ce-source", "s"),
            ("ce-subject", value),
        ])
        .await;
        assert_problem(what, response, 400, &["event.subject", "ce-subject"]).await;
    }
    sidecar.flush_to(&upstream).await;
    assert!(!upstream.delivered_id_set().contains("pct-bad"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_with_a_repeated_key_is_rejected_not_forwarded() {
    let (sidecar, upstream) = sidecar_and_upstream().await;
    let good = event("repeat-good").to_string();
    // Two `id`s: which one a receiver keeps is up to its JSON parser, so dedup and billing could
    // disagree; the event must not pass as is.
    let two_ids = event("repeat-first")
        .to_string()
        .replacen('{', r#"{"id":"repeat-second","#, 1);
    let response = sidecar
        .post(
            Some("application/cloudevents-batch+json"),
            format!("[{good},{two_ids}]"),
        )
        .await;
    assert_problem(
        "a batch whose second event has two ids",
        response,
        400,
        &["events[1]", "\"id\" twice"],
    )
    .await;
    let nested = event("repeat-nested").to_string().replacen(
        r#""data":{"#,
        r#""data":{"calls":1,"calls":2,"#,
        1,
    );
    assert!(nested.contains(r#""calls":1,"calls":2"#), "{nested}");
    let response = sidecar
        .post(Some("application/cloudevents+json"), nested)
        .await;
    assert_problem(
        "an event whose data has a key twice",
        response,
        400,
        &["event.data", "\"calls\" twice"],
    )
    .await;
    sidecar.flush_to(&upstream).await;
    let delivered = upstream.delivered_id_set();
    for id in [
        "repeat-good",
        "repeat-first",
        "repeat-second",
        "repeat-nested",
    ] {
        assert!(!delivered.contains(id), "{id} was forwarded");
    }
    assert_eq!(
        sidecar
            .metric("tally_events_rejected_total{reason=\"invalid\"}")
            .await,
        3.0,
        "the batch of 2 and the single event"
    );
}

/// Connects to the sidecar over raw TCP, so a test controls exactly which bytes are sent.
async fn connect(sidecar: &Sidecar) -> tokio::net::TcpStream {
    tokio::net::TcpStream::connect(("127.0.0.1", sidecar.port()))
        .await
        .unwrap_or_else(|e| panic!("connect: {e}"))
}

/// Reads until the server closes the connection (EOF or reset) or `within` has passed;
/// returns what was read and whether it was closed.
async fn read_until_closed(stream: &mut tokio::net::TcpStream, within: Duration) -> (String, bool) {
    use tokio::io::AsyncReadExt;
    let mut answer = Vec::new();
    let closed = tokio::time::timeout(within, async {
        let mut chunk = [0u8; 4096];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await
    .is_ok();
    (String::from_utf8_lossy(&answer).into_owned(), closed)
}

/// Reads until `marker` has arrived (panics after `within`); returns everything read.
async fn read_until(stream: &mut tokio::net::TcpStream, marker: &str, within: Duration) -> String {
    use tokio::io::AsyncReadExt;
    let mut answer = Vec::new();
    let found = tokio::time::timeout(within, async {
        let mut chunk = [0u8; 4096];
        while !String::from_utf8_lossy(&answer).contains(marker) {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => answer.extend_from_slice(&chunk[..n]),
            }
        }
        true
    })
    .await;
    let text = String::from_utf8_lossy(&answer).into_owned();
    assert_eq!(found, Ok(true), "{marker:?} did not arrive; got {text:?}");
    text
}

async fn write(stream: &mut tokio::net::TcpStream, bytes: &str) {
    use tokio::io::AsyncWriteExt;
    stream
        .write_all(bytes.as_bytes())
        .await
        .unwrap_or_else(|e| panic!("write: {e}"));
}

/// A slowloris client: request headers that never complete. The server closes the connection
/// after `ingest.readTimeout` instead of holding it (and its slot) forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_does_not_finish_its_headers_is_closed() {
    let sidecar = Sidecar::builder()
        .set("ingest.readTimeout", json!("300ms"))
        .start()
        .await;
    let mut stream = connect(&sidecar).await;
    write(
        &mut stream,
        "POST /api/v1/events HTTP/1.1\r\nHost: tally\r\nContent-Type: application/json\r\n",
    )
    .await;
    let (answer, closed) = read_until_closed(&mut stream, Duration::from_secs(10)).await;
    assert!(
        closed,
        "a connection with unfinished headers is still open 10 s later (readTimeout 300ms)"
    );
    assert!(
        !answer.contains("HTTP/1.1 2"),
        "no request was complete, so nothing succeeded: {answer:?}"
    );
    sidecar
        .wait_metric(
            DELIVERY,
            "the header timeout to be counted",
            "tally_ingest_connections_closed_total{reason=\"header_timeout\"}",
            |closed| closed >= 1.0,
        )
        .await;
}

/// A keep-alive connection that sends no further request is closed after `ingest.idleTimeout`
/// (here much shorter than readTimeout, so it is the idle timeout that closes it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_is_closed_after_idle_timeout() {
    let sidecar = Sidecar::builder()
        .set("ingest.readTimeout", json!("30s"))
        .set("ingest.idleTimeout", json!("300ms"))
        .start()
        .await;
    let mut stream = connect(&sidecar).await;
    write(&mut stream, "GET /healthz HTTP/1.1\r\nHost: tally\r\n\r\n").await;
    let answer = read_until(&mut stream, "ok\n", Duration::from_secs(10)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let (_, closed) = read_until_closed(&mut stream, Duration::from_secs(10)).await;
    assert!(
        closed,
        "an idle keep-alive connection is still open 10 s later (idleTimeout 300ms)"
    );
    // At least this one: the harness's own keep-alive connections (readiness polling, metric
    // scrapes) idle out too.
    let idle_closed = sidecar
        .metric("tally_ingest_connections_closed_total{reason=\"idle_timeout\"}")
        .await;
    assert!(idle_closed >= 1.0, "idle closes counted: {idle_closed}");
}

/// Idle connections up to `ingest.maxConnections` do not lock ingest out: the longest-idle one
/// is closed to make room, and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_cannot_starve_ingest() {
    let upstream = TestUpstream::start().await;
    let sidecar = Sidecar::builder()
        .openmeter_output("upstream", &upstream.url())
        .set("ingest.maxConnections", json!(3))
        .start()
        .await;
    // With the harness's keep-alive connection (from the readiness probe), these fill the limit.
    let mut idle = Vec::new();
    for _ in 0..3 {
        idle.push(connect(&sidecar).await);
    }
    // Raw TCP here as well: a pooled client connection could be the one evicted just as a
    // request is written on it, which is a client's race, not what is tested.
    let body = Value::Array(vec![event("despite-idle")]).to_string();
    let mut stream = connect(&sidecar).await;
    write(
        &mut stream,
        &format!(
            "POST /api/v1/events HTTP/1.1\r\nHost: tally\r\n\
             Content-Type: application/cloudevents-batch+json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    )
    .await;
    let answer = read_until(&mut stream, "\r\n\r\n", Duration::from_secs(10)).await;
    assert!(
        answer.starts_with("HTTP/1.1 204"),
        "an event while idle connections fill the limit: {answer:?}"
    );
    upstream.wait_delivered(["despite-idle"], DELIVERY).await;
    // The raw connections, all idle, were evicted oldest first: the first is closed.
    let (_, closed) = read_until_closed(&mut idle[0], Duration::from_secs(10)).await;
    assert!(closed, "the longest-idle raw connection was not closed");
    let metrics = sidecar.metrics().await;
    assert!(
        metrics.value("tally_ingest_connections_closed_total{reason=\"evicted\"}") >= 1.0,
        "idle connections were closed to make room, and counted"
    );
    assert_eq!(metrics.value("tally_ingest_connections_refused_total"), 0.0);
    // An evicted connection is out of the limit at once; the gauge drops when its task has
    // closed the socket, a moment later.
    sidecar
        .wait_metric(
            DELIVERY,
            "the open-connections gauge back within maxConnections",
            "tally_ingest_connections",
            |open| open <= 3.0,
        )
        .await;
}

/// When every allowed connection has a request in flight, a new one gets a 503 problem with
/// Retry-After (not a hang, not a reset), and it is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_over_the_limit_gets_503_when_all_are_busy() {
    let sidecar = Sidecar::builder()
        .set("ingest.maxConnections", json!(2))
        .set("ingest.readTimeout", json!("30s"))
        .start()
        .await;
    // The probe's keep-alive connection is idle, so the first busy one evicts it.
    let mut busy = Vec::new();
    for _ in 0..2 {
        let mut stream = connect(&sidecar).await;
        // `Expect: 100-continue`: the 100 arrives once the handler reads the body, which proves
        // the request is in flight; the body then never comes.
        write(
            &mut stream,
            "POST /api/v1/events HTTP/1.1\r\nHost: tally\r\n\
             Content-Type: application/cloudevents+json\r\nContent-Length: 100\r\n\
             Expect: 100-continue\r\n\r\n",
        )
        .await;
        read_until(&mut stream, "100 Continue", Duration::from_secs(10)).await;
        busy.push(stream);
    }
    let mut extra = connect(&sidecar).await;
    write(&mut extra, "GET /healthz HTTP/1.1\r\nHost: tally\r\n\r\n").await;
    let (answer, closed) = read_until_closed(&mut extra, Duration::from_secs(10)).await;
    assert!(
        closed,
        "the refused connection is closed after its answer: {answer:?}"
    );
    assert!(
        answer.starts_with("HTTP/1.1 503"),
        "over the limit: {answer:?}"
    );
    let lower = answer.to_ascii_lowercase();
    assert!(
        lower.contains("content-type: application/problem+json")
            && lower.contains("retry-after: 1")
            && answer.contains("ingest.maxConnections"),
        "{answer}"
    );
    // Once the busy requests end, the server takes connections again.
    drop(busy);
    let metrics = tally_tests::poll_until(DELIVERY, "/metrics to be served again", async || {
        let response = sidecar
            .request(reqwest::Method::GET, "/metrics")
            .send()
            .await
            .ok()?;
        if response.status() != 200 {
            return None;
        }
        let text = response.text().await.ok()?;
        Some(tally_tests::metrics::Exposition::parse(&text))
    })
    .await;
    // Refused /metrics attempts while the busy requests were ending count too.
    assert!(metrics.value("tally_ingest_connections_refused_total") >= 1.0);
}
