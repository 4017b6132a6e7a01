//! The `webhook` output against an independent receiver (tests/python/webhook_receiver.py, Python's
//! `hmac` module): every request is signed over its exact body, carries the event and delivery
//! headers, keeps its delivery id across retries, and works with OpenFaaS-style header names.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use serde_json::{Value, json};
use tally_tests::events::id_of;
use tally_tests::{Sidecar, WebhookReceiver, WebhookRequest, event};

const DELIVERY: Duration = Duration::from_secs(30);
const SECRET: &str = "whsec-tally-tests-0123456789";

/// A `webhook` output tuned for tests: small batching period, short retries.
fn webhook_output(name: &str, url: &str) -> Value {
    json!({
        "name": name,
        "type": "webhook",
        "url": url,
        "secret": SECRET,
        "timeout": "5s",
        "batching": { "count": 100, "period": "50ms" },
        "retry": { "initialInterval": "50ms", "maxInterval": "500ms" },
    })
}

/// Events `<prefix>-0..n` of type `api-calls`.
fn events(prefix: &str, n: usize) -> Vec<Value> {
    (0..n).map(|i| event(&format!("{prefix}-{i}"))).collect()
}

/// Asserts that `value` is a UUID version 4 (RFC 4122 variant).
fn assert_uuid_v4(value: Option<&str>, what: &str) -> String {
    let value = value.unwrap_or_else(|| panic!("{what}: header missing"));
    let uuid = uuid::Uuid::parse_str(value)
        .unwrap_or_else(|e| panic!("{what}: {value:?} is not a UUID: {e}"));
    assert_eq!(
        uuid.get_version_num(),
        4,
        "{what}: {value:?} is not a UUID v4"
    );
    assert_eq!(
        uuid.get_variant(),
        uuid::Variant::RFC4122,
        "{what}: {value:?}"
    );
    value.to_string()
}

/// The requests whose body holds the event with this id.
fn requests_with(requests: &[WebhookRequest], id: &str) -> Vec<WebhookRequest> {
    requests
        .iter()
        .filter(|r| r.ids().iter().any(|i| i == id))
        .cloned()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_batch_is_signed_and_carries_the_event_and_delivery_headers() {
    let receiver = WebhookReceiver::start(SECRET).await;
    let secret_dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let secret_file = secret_dir.path().join("webhook-secret");
    std::fs::write(&secret_file, SECRET).unwrap_or_else(|e| panic!("{e}"));
    let mut output = webhook_output("hook", &receiver.url("/hooks/usage?tenant=acme"));
    output.as_object_mut().map(|o| o.remove("secret"));
    output["secretFrom"] = json!({ "file": secret_file });
    output["batching"]["count"] = json!(5);
    let sidecar = Sidecar::builder().output(output).start().await;

    // One batch per request (waiting for each): the event header is the type of the batch's
    // first event.
    let first = events("wh-a", 5);
    sidecar.send_ok(&first).await;
    receiver
        .wait_delivered(first.iter().map(id_of), DELIVERY)
        .await;
    let mut second = events("wh-b", 5);
    second[0]["type"] = json!("gb-seconds");
    sidecar.send_ok(&second).await;
    receiver
        .wait_delivered(second.iter().map(id_of), DELIVERY)
        .await;
    // More than batching.count at once: several batches.
    let third = events("wh-c", 12);
    sidecar.send_ok(&third).await;
    receiver
        .wait_delivered(third.iter().map(id_of), DELIVERY)
        .await;

    let requests = receiver.requests();
    assert!(
        requests.len() >= 5,
        "5 + 5 + 12 events in batches of 5: {} requests",
        requests.len()
    );
    let mut deliveries = BTreeSet::new();
    for r in &requests {
        let what = format!("request {}", r.seq);
        assert!(
            r.signature_valid,
            "{what}: the signature must verify: {r:?}"
        );
        assert_eq!(r.status, 204, "{what}: {}", r.verdict);
        assert_eq!(r.method, "POST", "{what}");
        assert_eq!(
            r.path, "/hooks/usage?tenant=acme",
            "{what}: POSTed to the url exactly"
        );
        assert!(
            r.header("content-type")
                .is_some_and(|v| v.starts_with("application/json")),
            "{what}: content-type {:?}",
            r.header("content-type")
        );
        let delivery = assert_uuid_v4(r.header("x-tally-delivery"), &format!("{what} delivery"));
        assert!(
            deliveries.insert(delivery.clone()),
            "{what}: a new batch gets a new delivery id, {delivery} was used before"
        );
        assert!(r.events().len() <= 5, "{what}: batching.count is 5");
    }
    for (batch, event_name) in [(&first, "api-calls"), (&second, "gb-seconds")] {
        let carrying = requests_with(&requests, id_of(&batch[0]));
        assert_eq!(carrying.len(), 1, "one request per batch");
        assert_eq!(
            carrying[0].header("x-tally-event"),
            Some(event_name),
            "the event header is the type of the batch's first event"
        );
    }

    // The bodies are the events exactly as sent (attributes and key order), each once.
    let sent: HashMap<String, String> = first
        .iter()
        .chain(&second)
        .chain(&third)
        .map(|e| (id_of(e).to_string(), e.to_string()))
        .collect();
    let delivered: Vec<Value> = requests.iter().flat_map(|r| r.events()).collect();
    assert_eq!(delivered.len(), sent.len(), "each event delivered once");
    for e in &delivered {
        assert_eq!(
            Some(&e.to_string()),
            sent.get(id_of(e)),
            "an event delivered as it was sent"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_receiver_rejects_a_tampered_body_and_a_wrong_secret() {
    let receiver = WebhookReceiver::start(SECRET).await;
    let sidecar = Sidecar::builder()
        .output(webhook_output("hook", &receiver.url("/hook")))
        .start()
        .await;
    let batch = events("genuine", 2);
    sidecar.send_ok(&batch).await;
    receiver
        .wait_delivered(batch.iter().map(id_of), DELIVERY)
        .await;
    let genuine = receiver.requests()[0].clone();
    let signature = genuine
        .header("x-tally-signature-256")
        .unwrap_or_else(|| panic!("no signature header: {genuine:?}"))
        .to_string();
    assert!(
        signature.starts_with("sha256=") && signature.len() == "sha256=".len() + 64,
        "sha256=<64 hex digits>: {signature}"
    );

    let header = "X-Tally-Signature-256";
    let body = genuine.body.clone().into_bytes();
    // The signed request as it was: accepted, so what follows is rejected for its change only.
    assert_eq!(
        receiver
            .post_raw("/hook", &[(header, &signature)], body.clone())
            .await,
        204,
        "the genuine request, sent again"
    );
    let tampered = genuine.body.replace("customer-1", "customer-2");
    assert_ne!(tampered, genuine.body);
    assert_eq!(
        receiver
            .post_raw("/hook", &[(header, &signature)], tampered.into_bytes())
            .await,
        401,
        "a tampered body under the original signature"
    );
    let mut wrong = signature.clone();
    let last = if wrong.ends_with('0') { '1' } else { '0' };
    wrong.pop();
    wrong.push(last);
    assert_eq!(
        receiver
            .post_raw("/hook", &[(header, &wrong)], body.clone())
            .await,
        401,
        "a wrong signature"
    );
    assert_eq!(
        receiver.post_raw("/hook", &[], body).await,
        401,
        "no signature"
    );

    // A sidecar signing with another secret is rejected by the receiver; 401 is permanent, so
    // the batch goes to the dead-letter store.
    let mut output = webhook_output("hook", &receiver.url("/hook"));
    output["secret"] = json!("not-the-receivers-secret");
    let mistaken = Sidecar::builder().output(output).start().await;
    mistaken.send_ok(&[event("wrong-secret-1")]).await;
    mistaken
        .wait_metric(
            DELIVERY,
            "the batch signed with a wrong secret to be dead-lettered",
            "tally_output_dead_lettered_events_total{output=\"hook\"}",
            |dead| dead >= 1.0,
        )
        .await;
    let rejected = requests_with(&receiver.requests(), "wrong-secret-1");
    assert!(!rejected.is_empty());
    for r in &rejected {
        assert!(!r.signature_valid, "{r:?}");
        assert_eq!(r.status, 401);
    }
    let letters = mistaken
        .run_cli(&["dead-letter", "list", "--json"])
        .await
        .assert_success()
        .json_lines();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0]["status"], 401, "{letters:?}");
    assert_eq!(letters[0]["event"]["id"], "wrong-secret-1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_keep_the_delivery_id_and_the_next_batch_gets_a_new_one() {
    let receiver = WebhookReceiver::start(SECRET).await;
    receiver.fail_next(3, 503).await;
    let sidecar = Sidecar::builder()
        .output(webhook_output("hook", &receiver.url("/hook")))
        .start()
        .await;
    let first = events("retried", 4);
    sidecar.send_ok(&first).await;
    receiver
        .wait_delivered(first.iter().map(id_of), DELIVERY)
        .await;
    let attempts = requests_with(&receiver.requests(), "retried-0");
    let statuses: Vec<u16> = attempts.iter().map(|r| r.status).collect();
    assert_eq!(
        statuses,
        [503, 503, 503, 204],
        "three failures, then the retry that succeeds"
    );
    let delivery = assert_uuid_v4(attempts[0].header("x-tally-delivery"), "first attempt");
    for r in &attempts {
        assert!(r.signature_valid, "attempt {}: {r:?}", r.seq);
        assert_eq!(
            r.header("x-tally-delivery"),
            Some(delivery.as_str()),
            "attempt {}: every retry of a batch keeps its delivery id",
            r.seq
        );
        assert_eq!(r.body, attempts[0].body, "a retry re-sends the same batch");
    }
    assert!(
        sidecar
            .metric("tally_output_retries_total{output=\"hook\"}")
            .await
            >= 3.0
    );

    let second = events("next", 2);
    sidecar.send_ok(&second).await;
    receiver
        .wait_delivered(second.iter().map(id_of), DELIVERY)
        .await;
    let next = requests_with(&receiver.requests(), "next-0");
    assert_eq!(next.len(), 1);
    let next_delivery = assert_uuid_v4(next[0].header("x-tally-delivery"), "next batch");
    assert_ne!(
        next_delivery, delivery,
        "the next batch gets a new delivery id"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openfaas_style_header_names_and_static_headers_reach_the_receiver() {
    // The receiver checks the header an OpenFaaS function reads.
    let receiver = WebhookReceiver::start_with_header(SECRET, "X-Openfaas-Signature-256").await;
    let mut output = webhook_output("openfaas", &receiver.url("/function/usage-sink"));
    output.as_object_mut().map(|o| o.remove("secret"));
    output["secretFrom"] = json!({ "env": "TALLY_TEST_WEBHOOK_SECRET" });
    output["signatureHeader"] = json!("X-Openfaas-Signature-256");
    output["deliveryHeader"] = json!("X-Openfaas-Delivery");
    output["eventHeader"] = json!("X-Openfaas-Event");
    output["eventName"] = json!("usage-recorded");
    output["headers"] = json!({ "X-Team": "billing", "X-Api-Version": "2" });
    let sidecar = Sidecar::builder()
        .output(output)
        .env("TALLY_TEST_WEBHOOK_SECRET", SECRET)
        .start()
        .await;
    let batch = events("faas", 3);
    sidecar.send_ok(&batch).await;
    receiver
        .wait_delivered(batch.iter().map(id_of), DELIVERY)
        .await;

    let requests = receiver.requests();
    assert!(!requests.is_empty());
    for r in &requests {
        assert!(
            r.signature_valid,
            "verified under X-Openfaas-Signature-256: {r:?}"
        );
        assert_uuid_v4(r.header("x-openfaas-delivery"), "X-Openfaas-Delivery");
        assert_eq!(
            r.header("x-openfaas-event"),
            Some("usage-recorded"),
            "eventName"
        );
        assert_eq!(r.header("x-team"), Some("billing"), "a static header");
        assert_eq!(r.header("x-api-version"), Some("2"), "a static header");
        for default in ["x-tally-signature-256", "x-tally-delivery", "x-tally-event"] {
            assert_eq!(
                r.header(default),
                None,
                "configured names replace the default {default}"
            );
        }
    }
}
