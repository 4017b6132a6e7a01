//! The `postgres` output against a real PostgreSQL server (Debian's packages, a private data
//! directory per test): events become rows with a column per CloudEvents attribute, the table is
//! created when asked to (and only then), delivery is exactly-once under SIGKILLs of the sidecar,
//! and a table that can never take the rows sends the batch to the dead-letter store with the
//! SQLSTATE in the reason.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use parking_lot::Mutex;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tally_tests::events::id_of;
use tally_tests::{Sidecar, TestPostgres, event, event_from, poll_for, poll_until};
use time::macros::datetime;

const DELIVERY: Duration = Duration::from_secs(30);

/// A `postgres` output tuned for tests: small batching period, short retries.
fn postgres_output(name: &str, url: &str, table: &str) -> Value {
    json!({
        "name": name,
        "type": "postgres",
        "url": url,
        "table": table,
        "timeout": "5s",
        "batching": { "count": 100, "period": "50ms" },
        "retry": { "initialInterval": "50ms", "maxInterval": "500ms" },
    })
}

/// The contract's table, for tests that create it themselves.
fn contract_table(name: &str) -> String {
    format!(
        "CREATE TABLE {name} (
           source text NOT NULL, id text NOT NULL, type text NOT NULL, subject text NOT NULL,
           time timestamptz, specversion text NOT NULL, datacontenttype text, dataschema text,
           data jsonb, extensions jsonb NOT NULL DEFAULT '{{}}',
           received_at timestamptz NOT NULL DEFAULT now(),
           PRIMARY KEY (source, id))"
    )
}

/// The `(source, id)` keys in `table`.
async fn keys(pg: &TestPostgres, table: &str) -> BTreeSet<(String, String)> {
    let client = pg.client().await;
    client
        .query(&format!("SELECT source, id FROM {table}"), &[])
        .await
        .unwrap_or_else(|e| panic!("SELECT from {table}: {e}"))
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
}

/// Waits until `table` exists and holds every one of `wanted`; returns all its keys.
async fn wait_rows(
    pg: &TestPostgres,
    table: &str,
    wanted: &[(String, String)],
) -> BTreeSet<(String, String)> {
    let client = pg.client().await;
    let sql = format!("SELECT source, id FROM {table}");
    let found = poll_for(DELIVERY, async || {
        // The table may not exist yet: the output creates it on its first batch.
        let rows = client.query(&sql, &[]).await.ok()?;
        let present: BTreeSet<(String, String)> =
            rows.iter().map(|row| (row.get(0), row.get(1))).collect();
        wanted
            .iter()
            .all(|key| present.contains(key))
            .then_some(present)
    })
    .await;
    match found {
        Some(present) => present,
        None => {
            let present = client
                .query(&sql, &[])
                .await
                .map(|rows| rows.len().to_string())
                .unwrap_or_else(|e| format!("no table ({e})"));
            panic!(
                "after {DELIVERY:?}, {table} does not hold the {} expected rows (it holds {present})",
                wanted.len()
            )
        }
    }
}

fn key(event: &Value) -> (String, String) {
    (
        event["source"].as_str().unwrap_or_default().to_string(),
        id_of(event).to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_become_rows_with_a_column_per_attribute() {
    let pg = TestPostgres::start().await;
    let sidecar = Sidecar::builder()
        .output(postgres_output("pg", &pg.url(), "tally_events"))
        .start()
        .await;

    let mut full = event_from("svc-a", "full");
    full["time"] = json!("2024-03-05T10:20:30.123+02:00");
    full["datacontenttype"] = json!("application/json");
    full["dataschema"] = json!("https://example.com/schemas/api-calls.json");
    full["data"] = json!({ "tokens": 7, "model": "large", "nested": { "a": [1, 2.5, null] } });
    full["k8snamespace"] = json!("shop");
    full["retries"] = json!(3);
    full["sampled"] = json!(true);
    full["ratio"] = json!(0.25);
    let minimal = json!({
        "specversion": "1.0", "id": "minimal", "source": "svc-a",
        "type": "gb-seconds", "subject": "customer-2",
    });
    let mut nulls = event_from("svc-a", "nulls");
    for attribute in ["time", "data", "datacontenttype", "dataschema"] {
        nulls[attribute] = Value::Null;
    }
    // The same id from another source is another event.
    let other_source = event_from("svc-b", "full");
    let sent = [full.clone(), minimal, nulls, other_source];
    sidecar.send_ok(&sent).await;
    let wanted: Vec<(String, String)> = sent.iter().map(key).collect();
    let present = wait_rows(&pg, "tally_events", &wanted).await;
    assert_eq!(present.len(), 4, "one row per event: {present:?}");

    let client = pg.client().await;
    // The table a user queries: the contract's columns and types, keyed by (source, id).
    let columns: BTreeMap<String, String> = client
        .query(
            "SELECT column_name::text, data_type::text FROM information_schema.columns \
             WHERE table_schema = 'public' AND table_name = 'tally_events'",
            &[],
        )
        .await
        .unwrap_or_else(|e| panic!("information_schema: {e}"))
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    let tz = "timestamp with time zone";
    for (column, data_type) in [
        ("source", "text"),
        ("id", "text"),
        ("type", "text"),
        ("subject", "text"),
        ("time", tz),
        ("specversion", "text"),
        ("datacontenttype", "text"),
        ("dataschema", "text"),
        ("data", "jsonb"),
        ("extensions", "jsonb"),
        ("received_at", tz),
    ] {
        assert_eq!(
            columns.get(column).map(String::as_str),
            Some(data_type),
            "column {column}; the table has {columns:?}"
        );
    }
    let primary_key: BTreeSet<String> = client
        .query(
            "SELECT a.attname::text FROM pg_index i JOIN pg_attribute a \
               ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
             WHERE i.indrelid = 'tally_events'::regclass AND i.indisprimary",
            &[],
        )
        .await
        .unwrap_or_else(|e| panic!("pg_index: {e}"))
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(
        primary_key,
        BTreeSet::from(["source".to_string(), "id".to_string()]),
        "the primary key is (source, id)"
    );

    let rows = client
        .query(
            "SELECT source, id, type, subject, time, specversion, datacontenttype, dataschema, \
                    data, extensions, \
                    received_at > now() - interval '5 minutes' AND received_at <= now() \
             FROM tally_events ORDER BY source, id",
            &[],
        )
        .await
        .unwrap_or_else(|e| panic!("SELECT rows: {e}"));
    type Row = (
        String,
        String,
        String,
        String,
        Option<time::OffsetDateTime>,
        String,
        Option<String>,
        Option<String>,
        Option<Value>,
        Value,
        bool,
    );
    let rows: BTreeMap<(String, String), Row> = rows
        .iter()
        .map(|r| {
            let row: Row = (
                r.get(0),
                r.get(1),
                r.get(2),
                r.get(3),
                r.get(4),
                r.get(5),
                r.get(6),
                r.get(7),
                r.get(8),
                r.get(9),
                r.get(10),
            );
            ((row.0.clone(), row.1.clone()), row)
        })
        .collect();
    let row = |source: &str, id: &str| -> &Row {
        rows.get(&(source.to_string(), id.to_string()))
            .unwrap_or_else(|| panic!("no row for ({source}, {id}): {rows:?}"))
    };

    let r = row("svc-a", "full");
    assert_eq!(r.2, "api-calls", "type");
    assert_eq!(r.3, "customer-1", "subject");
    assert_eq!(
        r.4,
        Some(datetime!(2024-03-05 08:20:30.123 UTC)),
        "time is the instant of the event's RFC 3339 time"
    );
    assert_eq!(r.5, "1.0", "specversion");
    assert_eq!(r.6.as_deref(), Some("application/json"), "datacontenttype");
    assert_eq!(
        r.7.as_deref(),
        Some("https://example.com/schemas/api-calls.json"),
        "dataschema"
    );
    assert_eq!(r.8.as_ref(), Some(&full["data"]), "data");
    assert_eq!(
        r.9,
        json!({ "k8snamespace": "shop", "retries": 3, "sampled": true, "ratio": 0.25 }),
        "extensions hold every non-core attribute, with its JSON type"
    );
    assert!(r.10, "received_at is the time of the insert");

    let r = row("svc-a", "minimal");
    assert_eq!((r.2.as_str(), r.3.as_str()), ("gb-seconds", "customer-2"));
    assert_eq!(r.4, None, "no time: NULL");
    assert_eq!(r.6, None, "no datacontenttype: NULL");
    assert_eq!(r.7, None, "no dataschema: NULL");
    assert_eq!(r.8, None, "no data: NULL");
    assert_eq!(r.9, json!({}), "no extensions: an empty object");
    assert!(r.10, "received_at is the time of the insert");

    let r = row("svc-a", "nulls");
    assert_eq!(r.4, None, "time null: NULL");
    assert_eq!(r.6, None, "datacontenttype null: NULL");
    assert_eq!(r.7, None, "dataschema null: NULL");
    assert!(
        r.8.is_none() || r.8 == Some(Value::Null),
        "data null: NULL (or JSON null), got {:?}",
        r.8
    );
    assert_eq!(r.9, json!({}), "no extensions: an empty object");

    let r = row("svc-b", "full");
    assert_eq!(
        r.4,
        Some(datetime!(2024-01-01 00:00 UTC)),
        "time of the plain event"
    );
    assert_eq!(r.8, Some(json!({ "tokens": 1, "model": "small" })));

    // The billing query a user runs: data is jsonb, usable as such.
    let tokens: i64 = client
        .query_one(
            "SELECT sum((data->>'tokens')::bigint)::bigint FROM tally_events \
             WHERE type = 'api-calls' AND data IS NOT NULL AND data <> 'null'::jsonb",
            &[],
        )
        .await
        .unwrap_or_else(|e| panic!("billing query: {e}"))
        .get(0);
    assert_eq!(tokens, 7 + 1, "tokens per the rows' data");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_table_makes_a_table_in_a_schema_or_uses_an_existing_one() {
    let pg = TestPostgres::start().await;
    pg.execute("CREATE SCHEMA billing").await;
    // A user's own table with the contract's columns and one more column of theirs.
    pg.execute(&contract_table("existing_events")).await;
    pg.execute("ALTER TABLE existing_events ADD COLUMN note text DEFAULT 'mine'")
        .await;
    let mut from_env = postgres_output("pg-existing", "", "existing_events");
    from_env["createTable"] = json!(false);
    from_env.as_object_mut().map(|o| o.remove("url"));
    from_env["urlFrom"] = json!({ "env": "TALLY_TEST_PG_URL" });
    let sidecar = Sidecar::builder()
        .output(postgres_output("pg-schema", &pg.url(), "billing.usage"))
        .output(from_env)
        .env("TALLY_TEST_PG_URL", &pg.url())
        .start()
        .await;

    let sent: Vec<Value> = (0..25).map(|i| event(&format!("tbl-{i}"))).collect();
    sidecar.send_ok(&sent).await;
    let wanted: Vec<(String, String)> = sent.iter().map(key).collect();
    assert_eq!(wait_rows(&pg, "billing.usage", &wanted).await.len(), 25);
    assert_eq!(wait_rows(&pg, "existing_events", &wanted).await.len(), 25);

    let client = pg.client().await;
    let created_in_schema: bool = client
        .query_one(
            "SELECT to_regclass('billing.usage') IS NOT NULL \
                AND to_regclass('public.usage') IS NULL",
            &[],
        )
        .await
        .unwrap_or_else(|e| panic!("to_regclass: {e}"))
        .get(0);
    assert!(
        created_in_schema,
        "table `billing.usage` is created in schema billing"
    );
    let notes: i64 = client
        .query_one(
            "SELECT count(*) FROM existing_events WHERE note = 'mine'",
            &[],
        )
        .await
        .unwrap_or_else(|e| panic!("count: {e}"))
        .get(0);
    assert_eq!(
        notes, 25,
        "rows go into the user's table as it is, its own columns defaulted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_with_rows_already_in_the_table_is_inserted_without_error() {
    let pg = TestPostgres::start().await;
    // As after a crash between the insert and the cursor write: one event of the batch is
    // already there (here with another subject, to tell the rows apart).
    pg.execute(&contract_table("tally_events")).await;
    pg.execute(
        "INSERT INTO tally_events (source, id, type, subject, specversion) \
         VALUES ('tally-tests', 'again-1', 'api-calls', 'inserted-before', '1.0')",
    )
    .await;
    let sidecar = Sidecar::builder()
        .output(postgres_output("pg", &pg.url(), "tally_events"))
        .start()
        .await;
    let batch: Vec<Value> = (0..3).map(|i| event(&format!("again-{i}"))).collect();
    sidecar.send_ok(&batch).await;
    let wanted: Vec<(String, String)> = batch.iter().map(key).collect();
    assert_eq!(wait_rows(&pg, "tally_events", &wanted).await.len(), 3);
    let subject: String = pg
        .client()
        .await
        .query_one("SELECT subject FROM tally_events WHERE id = 'again-1'", &[])
        .await
        .unwrap_or_else(|e| panic!("SELECT: {e}"))
        .get(0);
    assert_eq!(
        subject, "inserted-before",
        "a row already there is left as it is (ON CONFLICT DO NOTHING)"
    );
    let metrics = sidecar.metrics().await;
    assert_eq!(
        metrics.value("tally_output_dead_lettered_events_total{output=\"pg\"}"),
        0.0
    );
    assert_eq!(
        metrics.value("tally_output_errors_total{output=\"pg\"}"),
        0.0,
        "a conflict is not an error"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_table_false_never_creates_the_table() {
    let pg = TestPostgres::start().await;
    let mut output = postgres_output("pg", &pg.url(), "not_there");
    output["createTable"] = json!(false);
    let sidecar = Sidecar::builder().output(output).start().await;
    sidecar.send_ok(&[event("nowhere-1")]).await;
    // Whether the output retries (someone may create the table) or dead-letters the batch, it
    // has tried once it counted an error or a dead letter.
    poll_until(
        DELIVERY,
        "the output to fail on the missing table",
        async || {
            let metrics = sidecar.metrics().await;
            let failed = metrics.value("tally_output_errors_total{output=\"pg\"}")
                + metrics.value("tally_output_dead_lettered_events_total{output=\"pg\"}");
            (failed >= 1.0).then_some(())
        },
    )
    .await;
    let exists: bool = pg
        .client()
        .await
        .query_one("SELECT to_regclass('not_there') IS NOT NULL", &[])
        .await
        .unwrap_or_else(|e| panic!("to_regclass: {e}"))
        .get(0);
    assert!(!exists, "createTable: false must not create the table");
    assert_eq!(
        sidecar
            .metric("tally_output_events_sent_total{output=\"pg\"}")
            .await,
        0.0,
        "nothing counts as sent into a missing table"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_that_cannot_take_the_rows_dead_letters_the_batch_naming_the_sqlstate() {
    let pg = TestPostgres::start().await;
    // Pre-created tables that `CREATE TABLE IF NOT EXISTS` leaves as they are: one lacks the
    // extensions column (undefined_column, 42703), one has an integer `data` column.
    pg.execute(&contract_table("lacks_extensions")).await;
    pg.execute("ALTER TABLE lacks_extensions DROP COLUMN extensions")
        .await;
    pg.execute(&contract_table("wrong_type")).await;
    pg.execute("ALTER TABLE wrong_type ALTER COLUMN data TYPE integer USING NULL")
        .await;
    let sidecar = Sidecar::builder()
        .output(postgres_output(
            "pg-missing-column",
            &pg.url(),
            "lacks_extensions",
        ))
        .output(postgres_output("pg-wrong-type", &pg.url(), "wrong_type"))
        .start()
        .await;

    let first: Vec<Value> = (0..3).map(|i| event(&format!("bad-table-{i}"))).collect();
    sidecar.send_ok(&first).await;
    // retry.maxElapsed is 0s (retry forever): only a permanent SQL error dead-letters.
    poll_until(
        DELIVERY,
        "both outputs to dead-letter the batch",
        async || {
            let metrics = sidecar.metrics().await;
            let missing = metrics
                .value("tally_output_dead_lettered_events_total{output=\"pg-missing-column\"}");
            let wrong =
                metrics.value("tally_output_dead_lettered_events_total{output=\"pg-wrong-type\"}");
            (missing >= 3.0 && wrong >= 3.0).then_some(())
        },
    )
    .await;

    let list = |output: &'static str| {
        let sidecar = &sidecar;
        async move {
            sidecar
                .run_cli(&["dead-letter", "list", "--output", output, "--json"])
                .await
                .assert_success()
                .json_lines()
        }
    };
    let letters = list("pg-missing-column").await;
    assert_eq!(letters.len(), 3, "{letters:#?}");
    for (letter, original) in letters.iter().zip(&first) {
        assert_eq!(letter["output"], "pg-missing-column");
        let reason = letter["reason"].as_str().unwrap_or_default();
        assert!(
            reason.contains("42703"),
            "the reason names the SQLSTATE (42703 undefined_column): {reason:?}"
        );
        assert!(
            letter["status"].is_null(),
            "no HTTP status for a SQL error: {letter}"
        );
        assert_eq!(letter["event"].to_string(), original.to_string());
    }
    let letters = list("pg-wrong-type").await;
    assert_eq!(letters.len(), 3, "{letters:#?}");
    for letter in &letters {
        let reason = letter["reason"].as_str().unwrap_or_default();
        // jsonb into an integer column: datatype_mismatch when the value is typed jsonb,
        // invalid_text_representation when it is sent as text or COPY'd.
        assert!(
            reason.contains("42804") || reason.contains("22P02"),
            "the reason names the SQLSTATE (42804 or 22P02): {reason:?}"
        );
    }

    // The user fixes one table: the output was not stuck, later events land, and a replay
    // re-sends the dead-lettered batch to that output only.
    pg.execute("ALTER TABLE lacks_extensions ADD COLUMN extensions jsonb NOT NULL DEFAULT '{}'")
        .await;
    let later: Vec<Value> = (0..2).map(|i| event(&format!("after-fix-{i}"))).collect();
    sidecar.send_ok(&later).await;
    let later_keys: Vec<(String, String)> = later.iter().map(key).collect();
    wait_rows(&pg, "lacks_extensions", &later_keys).await;
    let replay = sidecar
        .run_cli(&["dead-letter", "replay", "--output", "pg-missing-column"])
        .await;
    replay.assert_success();
    assert!(
        replay.stdout.contains("replayed 3 events"),
        "stdout: {}",
        replay.stdout
    );
    let all: Vec<(String, String)> = first.iter().chain(&later).map(key).collect();
    assert_eq!(wait_rows(&pg, "lacks_extensions", &all).await.len(), 5);
    assert!(list("pg-missing-column").await.is_empty());
    poll_until(
        DELIVERY,
        "the later batch to be dead-lettered by the other output",
        async || (list("pg-wrong-type").await.len() == 5).then_some(()),
    )
    .await;
    assert!(keys(&pg, "wrong_type").await.is_empty());
}

/// What the concurrent senders of the SIGKILL test observed.
#[derive(Default)]
struct Observed {
    sent: Mutex<Vec<String>>,
    acked: Mutex<Vec<String>>,
    acked_count: AtomicUsize,
}

const SENDERS: usize = 4;
const BATCH: usize = 20;
const KILLS: usize = 4;
/// Acknowledged events between two kills.
const EVENTS_PER_ROUND: usize = 1500;

/// Sends batches of fresh events until `stop`, each batch again and again (as a client does)
/// until it is acknowledged, and records what was sent and what was acknowledged.
async fn sender(task: usize, url: String, stop: Arc<AtomicBool>, observed: Arc<Observed>) {
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    let mut seq = 0;
    while !stop.load(Ordering::Relaxed) {
        let batch: Vec<Value> = (0..BATCH)
            .map(|i| event(&format!("pgkill-{task}-{seq}-{i}")))
            .collect();
        seq += 1;
        let ids: Vec<String> = batch.iter().map(|e| id_of(e).to_string()).collect();
        observed.sent.lock().extend(ids.iter().cloned());
        let body = Value::Array(batch).to_string();
        // The sidecar is up at the end of the test, so every batch is acknowledged eventually.
        let deadline = Instant::now() + DELIVERY;
        loop {
            let result = http
                .post(&url)
                .header("content-type", "application/cloudevents-batch+json")
                .body(body.clone())
                .send()
                .await;
            match result {
                Ok(response) if response.status() == 204 => break,
                Ok(response) => {
                    // 503 while stopping or starting is fine; any other answer is a bug.
                    assert_eq!(
                        response.status(),
                        503,
                        "unexpected answer to a valid batch: {}",
                        response.text().await.unwrap_or_default()
                    );
                }
                Err(_) => {} // killed or restarting
            }
            assert!(
                Instant::now() < deadline,
                "a batch was not acknowledged within {DELIVERY:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        observed.acked.lock().extend(ids);
        observed.acked_count.fetch_add(BATCH, Ordering::Relaxed);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_are_exactly_the_acknowledged_events_across_sigkills() {
    let pg = TestPostgres::start().await;
    let mut output = postgres_output("pg", &pg.url(), "tally_events");
    output["batching"]["period"] = json!("20ms");
    let mut sidecar = Sidecar::builder().output(output).start().await;
    let stop = Arc::new(AtomicBool::new(false));
    let observed = Arc::new(Observed::default());
    let senders: Vec<_> = (0..SENDERS)
        .map(|task| {
            tokio::spawn(sender(
                task,
                sidecar.events_url(),
                stop.clone(),
                observed.clone(),
            ))
        })
        .collect();

    let mut target = 0;
    for _ in 0..KILLS {
        target += EVENTS_PER_ROUND;
        poll_until(
            Duration::from_secs(60),
            "senders to get more events acknowledged",
            async || (observed.acked_count.load(Ordering::Relaxed) >= target).then_some(()),
        )
        .await;
        // Killed while the output inserts: some batches are in the table without the cursor
        // having moved past them, and are inserted again after the restart.
        sidecar
            .wait_metric(
                DELIVERY,
                "the output to have inserted something in this round",
                "tally_output_batches_sent_total{output=\"pg\"}",
                |sent| sent >= 1.0,
            )
            .await;
        sidecar.kill9();
        sidecar.restart().await;
        target = observed.acked_count.load(Ordering::Relaxed);
    }
    target += EVENTS_PER_ROUND;
    poll_until(
        Duration::from_secs(60),
        "senders to get events acknowledged after the last restart",
        async || (observed.acked_count.load(Ordering::Relaxed) >= target).then_some(()),
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    for sender in senders {
        sender.await.unwrap_or_else(|e| panic!("sender task: {e}"));
    }

    let acked: BTreeSet<String> = observed.acked.lock().iter().cloned().collect();
    let sent: BTreeSet<String> = observed.sent.lock().iter().cloned().collect();
    let wanted: Vec<(String, String)> = acked
        .iter()
        .map(|id| (tally_tests::events::SOURCE.to_string(), id.clone()))
        .collect();
    wait_rows(&pg, "tally_events", &wanted).await;
    // Everything buffered is in the table once the output has no lag; only then is the table
    // final.
    sidecar
        .wait_metric(
            DELIVERY,
            "the output's lag to reach 0",
            "tally_output_lag_events{output=\"pg\"}",
            |lag| lag == 0.0,
        )
        .await;

    let client = pg.client().await;
    let (rows, distinct, unexpected_content): (i64, i64, i64) = {
        let row = client
            .query_one(
                "SELECT count(*), count(DISTINCT (source, id)), \
                        count(*) FILTER (WHERE \
                          data IS DISTINCT FROM '{\"tokens\": 1, \"model\": \"small\"}'::jsonb \
                          OR type <> 'api-calls' OR subject <> 'customer-1' \
                          OR time IS DISTINCT FROM '2024-01-01T00:00:00Z'::timestamptz \
                          OR extensions <> '{}'::jsonb) \
                 FROM tally_events",
                &[],
            )
            .await
            .unwrap_or_else(|e| panic!("counting rows: {e}"));
        (row.get(0), row.get(1), row.get(2))
    };
    let ids: BTreeSet<String> = keys(&pg, "tally_events")
        .await
        .into_iter()
        .map(|(source, id)| {
            assert_eq!(source, tally_tests::events::SOURCE);
            id
        })
        .collect();
    println!(
        "sent {} events, acknowledged {}, {} rows ({distinct} distinct); {} output batches \
         after the last restart",
        sent.len(),
        acked.len(),
        rows,
        sidecar
            .metric("tally_output_batches_sent_total{output=\"pg\"}")
            .await
    );
    assert_eq!(rows, distinct, "no (source, id) twice");
    let unknown: Vec<&String> = ids.difference(&sent).take(10).collect();
    assert!(unknown.is_empty(), "rows of events never sent: {unknown:?}");
    let missing: Vec<&String> = acked.difference(&ids).take(10).collect();
    assert!(
        missing.is_empty(),
        "acknowledged events without a row: {missing:?}"
    );
    // Every batch was re-sent until acknowledged, so nothing was sent without an ack.
    assert_eq!(
        ids, acked,
        "the table holds exactly the acknowledged events"
    );
    assert_eq!(
        unexpected_content, 0,
        "every row holds the attributes of the event sent"
    );
}
