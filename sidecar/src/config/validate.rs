//! The rules serde cannot express: bounds, keys that exclude each other, and what each output
//! type needs. Each failure names the key path at fault and what to do.

use super::{BrokerPattern, ByteSize, Config, MAX_IN_FLIGHT, OutputConfig, OutputKind};

impl Config {
    /// Rules serde cannot express. Returns the key path at fault and what is wrong.
    pub(super) fn validate(&self) -> Result<(), (String, String)> {
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

    /// How `buffer.maxBytes` is shared out over the data directory; an error names the key.
    pub fn budget(&self) -> Result<crate::buffer::Budget, (&'static str, String)> {
        crate::buffer::Budget::new(
            self.buffer.max_bytes.get(),
            self.dead_letter.max_bytes.map(ByteSize::get),
            self.dedup.max_bytes.map(ByteSize::get),
        )
    }
}

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
