//! The `postgres` output: each batch is one `INSERT ... SELECT FROM unnest(...) ON CONFLICT
//! (source, id) DO NOTHING`, a single statement and so a single transaction, with one array
//! parameter per column (no limit on the batch size from PostgreSQL's 65535 parameters). A batch
//! sent again after a crash or a lost acknowledgement inserts nothing twice: delivery to the table
//! is exactly-once.
//!
//! One connection per output, opened on the first batch and again after any error.

mod tls;

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::value::RawValue;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio_postgres::config::Host;
use tokio_postgres::{Client, Statement};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::buffer::Record;
use crate::config::OutputConfig;
use crate::metrics::ErrorKind;

use self::tls::{Verify, take_verify_mode, tls_connector, tls_fix};
use super::{SendError, error_chain};

/// The CloudEvents attributes that have a column; every other attribute goes to `extensions`.
const CORE_ATTRIBUTES: [&str; 9] = [
    "specversion",
    "id",
    "source",
    "type",
    "subject",
    "time",
    "datacontenttype",
    "dataschema",
    "data",
];

/// Inserts batches into a PostgreSQL table keyed by `(source, id)`.
pub struct PostgresOutput {
    config: tokio_postgres::Config,
    tls: MakeRustlsConnect,
    table: TableName,
    create_table: bool,
    timeout: Duration,
    /// `postgres://user@host:port/db`, without the password, for messages.
    target: String,
    /// The open connection, if any. Held for the whole send, so batches go one at a time.
    connection: tokio::sync::Mutex<Option<Connection>>,
}

struct Connection {
    client: Client,
    insert: Statement,
}

impl PostgresOutput {
    pub(super) fn new(config: &OutputConfig, index: usize) -> anyhow::Result<PostgresOutput> {
        let at = |key: &str| format!("outputs.targets[{index}].{key}");
        let url = match (&config.url, &config.url_from) {
            (Some(url), _) => url.clone(),
            (None, Some(source)) => source
                .resolve()
                .map_err(|e| anyhow::anyhow!("{}: {e}", at("urlFrom")))?,
            (None, None) => anyhow::bail!(
                "{}: a postgres output needs url (postgres://user@host/db) or urlFrom",
                at("url")
            ),
        };
        let (url, verify) = take_verify_mode(&url);
        let mut pg: tokio_postgres::Config = url.parse().map_err(|e| {
            anyhow::anyhow!(
                "{}: not a PostgreSQL connection URL ({}); write it like \
                 postgres://user:password@host:5432/database?sslmode=require",
                at("url"),
                error_chain(&e)
            )
        })?;
        if pg.get_hosts().is_empty() && pg.get_hostaddrs().is_empty() {
            anyhow::bail!(
                "{}: the URL names no host; write it like postgres://user@host:5432/database",
                at("url")
            );
        }
        if pg.get_connect_timeout().is_none() {
            pg.connect_timeout(config.timeout.get());
        }
        if pg.get_application_name().is_none() {
            pg.application_name("tally-sidecar");
        }
        let verify = match (verify, &config.ca_file) {
            (Verify::Default, Some(_)) => Verify::Chain,
            (verify, _) => verify,
        };
        let tls = tls_connector(verify, config.ca_file.as_deref(), index)?;
        let table = TableName::parse(&config.table).ok_or_else(|| {
            anyhow::anyhow!("{}: {:?} is not a table name", at("table"), config.table)
        })?;
        Ok(PostgresOutput {
            target: describe(&pg),
            config: pg,
            tls,
            table,
            create_table: config.create_table,
            timeout: config.timeout.get(),
            connection: tokio::sync::Mutex::new(None),
        })
    }

    pub(super) async fn send(&self, records: &[Record]) -> Result<(), SendError> {
        let columns = Columns::from_records(records).map_err(|detail| SendError::Permanent {
            status: None,
            detail,
        })?;
        let mut connection = self.connection.lock().await;
        let result = match tokio::time::timeout(
            self.timeout,
            self.insert(&mut connection, &columns),
        )
        .await
        {
            Ok(result) => result,
            Err(_elapsed) => {
                // The statement may be waiting on a lock; cancel it, or every retry would leave
                // one more blocked server process behind.
                if let Some(stuck) = connection.take() {
                    let cancel = stuck.client.cancel_token();
                    let tls = self.tls.clone();
                    tokio::spawn(async move { cancel.cancel_query(tls).await });
                }
                Err(SendError::Retryable {
                    kind: ErrorKind::timeout,
                    status: None,
                    detail: format!(
                        "{}: no answer within {} (timeout)",
                        self.target,
                        humantime::format_duration(self.timeout)
                    ),
                    retry_after: None,
                })
            }
        };
        // After any error the connection's state is unknown (a statement may still run, a
        // transaction may be open): start afresh. ON CONFLICT makes the retry harmless.
        if result.is_err() {
            *connection = None;
        }
        result
    }

    async fn insert(
        &self,
        connection: &mut Option<Connection>,
        columns: &Columns,
    ) -> Result<(), SendError> {
        let open = match connection.take() {
            Some(open) if !open.client.is_closed() => open,
            _ => self.connect().await?,
        };
        let Connection { client, insert } = connection.insert(open);
        client
            .execute(
                insert,
                &[
                    &columns.source,
                    &columns.id,
                    &columns.kind,
                    &columns.subject,
                    &columns.time,
                    &columns.specversion,
                    &columns.datacontenttype,
                    &columns.dataschema,
                    &columns.data,
                    &columns.extensions,
                ],
            )
            .await
            .map_err(|e| self.failure(&e, "inserting the batch"))?;
        Ok(())
    }

    async fn connect(&self) -> Result<Connection, SendError> {
        let (client, connection) = self
            .config
            .connect(self.tls.clone())
            .await
            .map_err(|e| self.failure(&e, "connecting"))?;
        let target = self.target.clone();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(postgres = %target, error = %error_chain(&e), "connection closed");
            }
        });
        if self.create_table {
            self.create_table(&client).await?;
        }
        let insert = client
            .prepare(&insert_statement(&self.table))
            .await
            .map_err(|e| self.failure(&e, "preparing the INSERT"))?;
        Ok(Connection { client, insert })
    }

    /// Creates the table unless it exists. It looks first, so a user who may only insert into
    /// an existing table needs no CREATE privilege.
    async fn create_table(&self, client: &Client) -> Result<(), SendError> {
        let exists = client
            .query_one(
                "SELECT to_regclass($1::text) IS NOT NULL",
                &[&self.table.quoted()],
            )
            .await
            .and_then(|row| row.try_get::<_, bool>(0))
            .map_err(|e| self.failure(&e, "looking for the table"))?;
        if exists {
            return Ok(());
        }
        match client
            .batch_execute(&create_table_statement(&self.table))
            .await
        {
            Ok(()) => {
                tracing::info!(postgres = %self.target, table = %self.table.quoted(), "created the events table");
                Ok(())
            }
            // Another sidecar created it at the same moment.
            Err(e)
                if e.code()
                    .is_some_and(|c| matches!(c.code(), "42P07" | "23505")) =>
            {
                Ok(())
            }
            Err(e) => Err(self.failure(&e, "creating the table")),
        }
    }

    /// Classifies an error of `doing` into retryable or permanent, with what to fix.
    fn failure(&self, error: &tokio_postgres::Error, doing: &str) -> SendError {
        let Some(db) = error.as_db_error() else {
            let mut detail = format!("{}: {doing}: {}", self.target, error_chain(error));
            if let Some(fix) = tls_fix(&detail) {
                detail.push_str("; ");
                detail.push_str(fix);
            }
            return SendError::Retryable {
                kind: ErrorKind::network,
                status: None,
                detail,
                retry_after: None,
            };
        };
        let code = db.code().code();
        let mut detail = format!(
            "{}: {doing}: PostgreSQL error {code}: {}",
            self.target,
            db.message()
        );
        if let Some(extra) = db.detail() {
            detail.push_str(&format!(" ({extra})"));
        }
        if let Some(hint) = db.hint() {
            detail.push_str(&format!(" (hint: {hint})"));
        }
        let disposition = classify(code, self.create_table);
        if let Some(fix) = what_to_fix(code, &self.table, self.create_table) {
            detail.push_str("; ");
            detail.push_str(&fix);
        }
        match disposition {
            Disposition::Retry => SendError::Retryable {
                kind: ErrorKind::retryable_status,
                status: None,
                detail,
                retry_after: None,
            },
            // A data error stays with the event; anything else can be fixed and the batch re-sent.
            Disposition::DeadLetter if code.starts_with("22") => SendError::Permanent {
                status: None,
                detail,
            },
            Disposition::DeadLetter => SendError::Permanent {
                status: None,
                detail: format!("{detail}; then re-send with `tally-sidecar dead-letter replay`"),
            },
        }
    }
}

/// What to do with a batch that failed with a SQLSTATE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Disposition {
    /// It may pass later: the connection broke, the transaction lost a race, the server is
    /// short of resources, starting, stopping or read-only (a failover).
    Retry,
    /// It will fail the same way every time until someone fixes the table, the grants or the
    /// configuration: move it to the dead-letter store.
    DeadLetter,
}

fn classify(code: &str, create_table: bool) -> Disposition {
    let class = code.get(..2).unwrap_or_default();
    match (class, code) {
        // connection exception, transaction rollback (serialization failure, deadlock),
        // insufficient resources, operator intervention (shutdown, starting up), system error.
        ("08" | "40" | "53" | "57" | "58", _) => Disposition::Retry,
        // lock not available, object in use.
        (_, "55P03" | "55006") => Disposition::Retry,
        // read-only transaction: connected to a standby, typically during a failover.
        (_, "25006") => Disposition::Retry,
        // The table was dropped under us; the next connection creates it again.
        (_, "42P01") if create_table => Disposition::Retry,
        _ => Disposition::DeadLetter,
    }
}

/// The fix for the errors a user can fix, in their words.
fn what_to_fix(code: &str, table: &TableName, create_table: bool) -> Option<String> {
    let table = table.quoted();
    let class = code.get(..2).unwrap_or_default();
    Some(match code {
        "42501" => format!(
            "grant the output's user INSERT on {table} (and CREATE on its schema, or create the table \
             yourself, when createTable is true)"
        ),
        "42P01" if create_table => {
            format!("{table} was dropped; it is created again on the next attempt")
        }
        "42P01" => format!("create the table {table} or set createTable: true"),
        "3F000" => format!("create the schema of {table}"),
        "3D000" => "create the database named in url, or fix url".to_string(),
        "42P10" => format!(
            "{table} needs a primary key on (source, id): ALTER TABLE {table} ADD PRIMARY KEY (source, id)"
        ),
        "42703" | "42804" | "23502" => format!(
            "{table} does not have the columns Tally writes; see the CREATE TABLE statement in the \
             README, or let Tally create a new table (createTable: true with a new table name)"
        ),
        _ if class == "28" => {
            "check the user and password in url (or urlFrom) and the server's pg_hba.conf"
                .to_string()
        }
        _ if class == "22" => "an event in the batch holds a value PostgreSQL cannot store \
             (such as \\u0000 in a string); inspect it with `tally-sidecar dead-letter list`"
            .to_string(),
        _ => return None,
    })
}

/// A table name as configured (`table` or `schema.table`), each part quoted as written.
#[derive(Debug, Clone, PartialEq, Eq)]
struct TableName {
    schema: Option<String>,
    name: String,
}

impl TableName {
    /// Splits `schema.table`; each part must be a plain identifier (configuration validated it).
    fn parse(text: &str) -> Option<TableName> {
        let plain = |part: &str| {
            !part.is_empty()
                && part.len() <= 63
                && part.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        };
        match text.split_once('.') {
            Some((schema, name)) if plain(schema) && plain(name) => Some(TableName {
                schema: Some(schema.to_string()),
                name: name.to_string(),
            }),
            None if plain(text) => Some(TableName {
                schema: None,
                name: text.to_string(),
            }),
            _ => None,
        }
    }

    /// `"schema"."table"`: quoted, so a name that is a keyword (`user`, `order`) works; the
    /// case is kept as written.
    fn quoted(&self) -> String {
        match &self.schema {
            Some(schema) => format!("{}.{}", quote(schema), quote(&self.name)),
            None => quote(&self.name),
        }
    }
}

fn quote(identifier: &str) -> String {
    format!("\"{}\"", identifier.replace('"', "\"\""))
}

fn create_table_statement(table: &TableName) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {} (\n  \
           source text NOT NULL, id text NOT NULL, type text NOT NULL, subject text NOT NULL,\n  \
           time timestamptz, specversion text NOT NULL, datacontenttype text, dataschema text,\n  \
           data jsonb, extensions jsonb NOT NULL DEFAULT '{{}}', received_at timestamptz NOT NULL DEFAULT now(),\n  \
           PRIMARY KEY (source, id))",
        table.quoted()
    )
}

/// One statement for the whole batch: one array parameter per column, unnested into rows.
fn insert_statement(table: &TableName) -> String {
    format!(
        "INSERT INTO {} \
         (\"source\", \"id\", \"type\", \"subject\", \"time\", \"specversion\", \"datacontenttype\", \
         \"dataschema\", \"data\", \"extensions\") \
         SELECT source, id, type, subject, time, specversion, datacontenttype, dataschema, \
         data::jsonb, extensions::jsonb \
         FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[], \
         $6::text[], $7::text[], $8::text[], $9::text[], $10::text[]) \
         AS batch(source, id, type, subject, time, specversion, datacontenttype, dataschema, \
         data, extensions) \
         ON CONFLICT (\"source\", \"id\") DO NOTHING",
        table.quoted()
    )
}

/// A batch as column arrays, one entry per event.
#[derive(Debug, Default, PartialEq)]
struct Columns {
    source: Vec<String>,
    id: Vec<String>,
    kind: Vec<String>,
    subject: Vec<String>,
    time: Vec<Option<OffsetDateTime>>,
    specversion: Vec<String>,
    datacontenttype: Vec<Option<String>>,
    dataschema: Vec<Option<String>>,
    /// JSON text, cast to jsonb by the statement; `None` when absent or null.
    data: Vec<Option<String>>,
    /// A JSON object of the extension attributes, cast to jsonb by the statement.
    extensions: Vec<String>,
}

impl Columns {
    fn from_records(records: &[Record]) -> Result<Columns, String> {
        let mut columns = Columns::default();
        for record in records {
            columns.push(&record.json).map_err(|e| {
                format!(
                    "buffered event {} cannot be stored in PostgreSQL: {e}",
                    record.seq
                )
            })?;
        }
        Ok(columns)
    }

    /// Adds one event. The ingest validated it; this only fails on a corrupt buffer entry.
    fn push(&mut self, json: &[u8]) -> Result<(), String> {
        let attributes: BTreeMap<String, &RawValue> =
            serde_json::from_slice(json).map_err(|e| format!("not a JSON object: {e}"))?;
        let text = |name: &str| -> Result<Option<String>, String> {
            match attributes.get(name) {
                None => Ok(None),
                Some(raw) => serde_json::from_str::<Option<String>>(raw.get())
                    .map_err(|_| format!("`{name}` is not a string")),
            }
        };
        let required = |name: &str| -> Result<String, String> {
            text(name)?.ok_or_else(|| format!("`{name}` is missing"))
        };
        let id = required("id")?;
        let time = text("time")?
            .map(|t| {
                OffsetDateTime::parse(&t, &Rfc3339)
                    .map_err(|e| format!("event {id:?}: `time` {t:?} is not RFC 3339: {e}"))
            })
            .transpose()?;
        let data = attributes
            .get("data")
            .map(|raw| raw.get())
            .filter(|raw| *raw != "null")
            .map(str::to_string);
        let mut extensions = String::from("{");
        for (name, value) in &attributes {
            if CORE_ATTRIBUTES.contains(&name.as_str()) {
                continue;
            }
            if extensions.len() > 1 {
                extensions.push(',');
            }
            extensions.push_str(&serde_json::Value::String(name.clone()).to_string());
            extensions.push(':');
            extensions.push_str(value.get());
        }
        extensions.push('}');
        self.source.push(required("source")?);
        self.kind.push(required("type")?);
        self.subject.push(required("subject")?);
        self.specversion.push(required("specversion")?);
        self.datacontenttype.push(text("datacontenttype")?);
        self.dataschema.push(text("dataschema")?);
        self.id.push(id);
        self.time.push(time);
        self.data.push(data);
        self.extensions.push(extensions);
        Ok(())
    }
}

/// `postgres://user@host:port/db`, never the password.
fn describe(config: &tokio_postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(host)) => host.clone(),
        #[cfg(unix)]
        Some(Host::Unix(path)) => path.display().to_string(),
        None => String::new(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let user = config
        .get_user()
        .map(|u| format!("{u}@"))
        .unwrap_or_default();
    let db = config.get_dbname().unwrap_or_default();
    format!("postgres://{user}{host}:{port}/{db}")
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::config::{OutputKind, SecretSource};

    fn postgres_config(url: &str) -> OutputConfig {
        OutputConfig {
            name: "pg".to_string(),
            kind: OutputKind::Postgres,
            url: Some(url.to_string()),
            ..OutputConfig::default()
        }
    }

    fn columns(events: &[&'static str]) -> Result<Columns, String> {
        let records: Vec<Record> = events
            .iter()
            .enumerate()
            .map(|(i, json)| Record {
                seq: i as u64 + 1,
                json: Bytes::from_static(json.as_bytes()),
            })
            .collect();
        Columns::from_records(&records)
    }

    #[test]
    fn table_names_are_quoted_as_written() {
        let table = TableName::parse("tally_events").expect("plain name");
        assert_eq!(table.quoted(), r#""tally_events""#);
        let table = TableName::parse("billing.Usage_2024").expect("schema.table");
        assert_eq!(table.quoted(), r#""billing"."Usage_2024""#);
        assert_eq!(
            TableName::parse("user").expect("keyword").quoted(),
            r#""user""#
        );
        for bad in ["", "a.b.c", "a;drop", "x\"y", ".t", "s.", "a b"] {
            assert_eq!(TableName::parse(bad), None, "{bad:?}");
        }
        assert_eq!(quote(r#"we"ird"#), r#""we""ird""#);
    }

    #[test]
    fn create_table_is_the_documented_schema() {
        let sql = create_table_statement(&TableName::parse("tally_events").expect("name"));
        let words = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
        assert_eq!(
            words(&sql),
            words(
                r#"CREATE TABLE IF NOT EXISTS "tally_events" (
                  source text NOT NULL, id text NOT NULL, type text NOT NULL, subject text NOT NULL,
                  time timestamptz, specversion text NOT NULL, datacontenttype text, dataschema text,
                  data jsonb, extensions jsonb NOT NULL DEFAULT '{}', received_at timestamptz NOT NULL DEFAULT now(),
                  PRIMARY KEY (source, id))"#
            )
        );
    }

    #[test]
    fn insert_is_one_statement_with_one_array_per_column() {
        let sql = insert_statement(&TableName::parse("metering.events").expect("name"));
        assert!(
            sql.starts_with(r#"INSERT INTO "metering"."events" ("source", "id", "type""#),
            "{sql}"
        );
        assert!(
            sql.ends_with(r#"ON CONFLICT ("source", "id") DO NOTHING"#),
            "{sql}"
        );
        for n in 1..=10 {
            assert_eq!(sql.matches(&format!("${n}::")).count(), 1, "${n} in {sql}");
        }
        assert!(!sql.contains("$11"));
        assert!(sql.contains("$5::timestamptz[]"));
        assert!(sql.contains("data::jsonb, extensions::jsonb"));
    }

    #[test]
    fn columns_split_core_attributes_from_extensions() {
        let batch = columns(&[
            r#"{"specversion":"1.0","id":"e1","source":"svc","type":"api-calls","subject":"cust-1","time":"2024-01-31T12:00:00.5+02:00","datacontenttype":"application/json","data":{"n":1.50,"route":"/x"},"k8snamespace":"shop","k8spod":"web-0","tenant\"q":{"tier":[1,2]}}"#,
            r#"{"id":"e2","source":"svc","specversion":"1.0","type":"t","subject":"s","time":null,"dataschema":null,"data":null}"#,
            r#"{"specversion":"1.0","id":"e3","source":"svc","type":"t","subject":"s"}"#,
        ])
        .expect("valid events");
        assert_eq!(batch.id, ["e1", "e2", "e3"]);
        assert_eq!(batch.source, ["svc"; 3]);
        assert_eq!(batch.kind, ["api-calls", "t", "t"]);
        assert_eq!(batch.subject, ["cust-1", "s", "s"]);
        assert_eq!(batch.specversion, ["1.0"; 3]);
        assert_eq!(
            batch.time,
            [
                Some(time::macros::datetime!(2024-01-31 10:00:00.5 UTC)),
                None,
                None
            ]
        );
        assert_eq!(
            batch.datacontenttype,
            [Some("application/json".to_string()), None, None]
        );
        assert_eq!(batch.dataschema, [None, None, None]);
        // Data is passed on byte for byte (1.50 stays 1.50 for jsonb's numeric).
        assert_eq!(
            batch.data,
            [Some(r#"{"n":1.50,"route":"/x"}"#.to_string()), None, None]
        );
        let first: serde_json::Value =
            serde_json::from_str(&batch.extensions[0]).expect("extensions are JSON");
        assert_eq!(
            first,
            serde_json::json!({"k8snamespace": "shop", "k8spod": "web-0", "tenant\"q": {"tier": [1, 2]}})
        );
        assert_eq!(batch.extensions[1], "{}");
        assert_eq!(batch.extensions[2], "{}");
    }

    #[test]
    fn unstorable_events_name_the_buffer_entry() {
        let error = columns(&[
            r#"{"specversion":"1.0","id":"ok","source":"s","type":"t","subject":"s"}"#,
            r#"{"specversion":"1.0","id":"bad","source":"s","type":"t"}"#,
        ])
        .expect_err("subject missing");
        assert!(error.contains("buffered event 2"), "{error}");
        assert!(error.contains("`subject` is missing"), "{error}");
        let error = columns(&[
            r#"{"specversion":"1.0","id":"x","source":"s","type":"t","subject":"s","time":"noon"}"#,
        ])
        .expect_err("bad time");
        assert!(error.contains("not RFC 3339"), "{error}");
        let error = columns(&[r#"[1]"#]).expect_err("not an object");
        assert!(error.contains("not a JSON object"), "{error}");
    }

    #[test]
    fn sqlstates_that_can_pass_are_retried() {
        for code in [
            "08000", "08006", "08P01", "40001", "40P01", "53100", "53300", "57P01", "57P03",
            "58030", "55P03", "55006", "25006",
        ] {
            assert_eq!(classify(code, false), Disposition::Retry, "{code}");
        }
        for code in [
            "42501", "42P01", "42703", "42P10", "42601", "22P05", "22021", "23502", "28P01",
            "28000", "3D000", "3F000", "XX000",
        ] {
            assert_eq!(classify(code, false), Disposition::DeadLetter, "{code}");
        }
        // A dropped table comes back on the next connection when Tally creates it.
        assert_eq!(classify("42P01", true), Disposition::Retry);
    }

    #[test]
    fn permanent_errors_say_what_to_fix() {
        let table = TableName::parse("tally_events").expect("name");
        let fix = |code: &str| what_to_fix(code, &table, false).unwrap_or_default();
        assert!(fix("42501").contains(r#"INSERT on "tally_events""#));
        assert!(fix("42P01").contains("createTable: true"));
        assert!(fix("42P10").contains("ADD PRIMARY KEY (source, id)"));
        assert!(fix("28P01").contains("password"));
        assert!(fix("22P05").contains("dead-letter list"));
        assert_eq!(what_to_fix("40001", &table, false), None);
        let dropped = what_to_fix("42P01", &table, true).unwrap_or_default();
        assert!(dropped.contains("created again"), "{dropped}");
    }

    #[test]
    fn build_parses_the_url_and_never_shows_the_password() {
        let output = PostgresOutput::new(
            &postgres_config(
                "postgres://tally:hunter2@db.example:6432/metering?sslmode=verify-full",
            ),
            0,
        )
        .expect("valid");
        assert_eq!(output.target, "postgres://tally@db.example:6432/metering");
        assert_eq!(
            output.config.get_ssl_mode(),
            tokio_postgres::config::SslMode::Require
        );
        assert_eq!(output.config.get_application_name(), Some("tally-sidecar"));

        let error = PostgresOutput::new(&postgres_config("postgres://u@h/db?sslmode=sometimes"), 4)
            .err()
            .expect("bad sslmode")
            .to_string();
        assert!(error.starts_with("outputs.targets[4].url: "), "{error}");

        let from_env = OutputConfig {
            url: None,
            url_from: Some(SecretSource::env("TALLY_TEST_SURELY_UNSET_PG_URL")),
            ..postgres_config("unused")
        };
        let error = PostgresOutput::new(&from_env, 1)
            .err()
            .expect("unset env")
            .to_string();
        assert!(error.contains("outputs.targets[1].urlFrom"), "{error}");
        assert!(error.contains("TALLY_TEST_SURELY_UNSET_PG_URL"), "{error}");
    }

    #[test]
    fn ca_file_is_read_at_start() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("root.pem");
        std::fs::write(&path, crate::output::TEST_CA_PEM).expect("write");
        let config = OutputConfig {
            ca_file: Some(path.clone()),
            ..postgres_config("postgres://u@h/db?sslmode=require")
        };
        PostgresOutput::new(&config, 0).expect("a PEM CA certificate is accepted");
        std::fs::write(&path, "garbage").expect("write");
        let error = PostgresOutput::new(&config, 0)
            .err()
            .expect("no certificate")
            .to_string();
        assert!(error.contains("outputs.targets[0].caFile"), "{error}");
        assert!(error.contains("root.pem"), "{error}");
    }

    #[tokio::test]
    async fn an_unreachable_server_is_retried() {
        let closed = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            listener.local_addr().expect("addr")
        };
        let output = PostgresOutput::new(
            &postgres_config(&format!(
                "postgres://tally:pw@127.0.0.1:{}/db?sslmode=disable",
                closed.port()
            )),
            0,
        )
        .expect("valid");
        let records = [Record {
            seq: 1,
            json: Bytes::from_static(
                br#"{"specversion":"1.0","id":"a","source":"s","type":"t","subject":"s"}"#,
            ),
        }];
        match output.send(&records).await {
            Err(SendError::Retryable {
                kind,
                status,
                detail,
                ..
            }) => {
                assert_eq!(kind, ErrorKind::network);
                assert_eq!(status, None);
                assert!(
                    detail.contains(&format!("127.0.0.1:{}", closed.port())),
                    "{detail}"
                );
                assert!(!detail.contains("pw"), "{detail}");
            }
            other => panic!("a refused connection must be retryable, got {other:?}"),
        }
    }
}
