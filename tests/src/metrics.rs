//! Reading the Prometheus text exposition of `/metrics`.
//!
//! Not the `prometheus-parse` crate: it looks a sample's type up by its exact name, so every
//! OpenMetrics counter (`# TYPE x counter`, sample `x_total`) comes back untyped; it splits label
//! values on `,` and `=` without regard to quotes, and drops a line whose value holds `}`; and it
//! would add chrono and a second itertools to the build. The tests need exact label matching
//! more than types, which is what this small reader does.

use std::collections::HashSet;

/// One sample line: `name{label="value",...} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

/// A parsed `/metrics` answer.
#[derive(Debug, Clone, Default)]
pub struct Exposition {
    pub samples: Vec<Sample>,
    /// Family names declared by `# TYPE` lines.
    families: HashSet<String>,
}

impl Exposition {
    /// Parses the text format (Prometheus 0.0.4 and OpenMetrics). Panics on a malformed line:
    /// the sidecar's output is under test too.
    pub fn parse(text: &str) -> Exposition {
        let mut exposition = Exposition::default();
        for line in text.lines().map(str::trim) {
            if line.is_empty() {
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                if let Some(name) = rest.split_whitespace().next() {
                    exposition.families.insert(name.to_string());
                }
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            exposition.samples.push(
                parse_sample(line)
                    .unwrap_or_else(|| panic!("malformed metrics line in /metrics: {line:?}")),
            );
        }
        exposition
    }

    /// The value of `query` (`name` or `name{label="value",...}`): the sum of every sample of that
    /// name whose labels include the query's labels, 0 when none does. A counter that never
    /// counted may legitimately be absent, so absence reads as 0; use [`Exposition::exposes`] to
    /// require a metric to be there.
    pub fn value(&self, query: &str) -> f64 {
        let wanted = parse_query(query);
        self.samples
            .iter()
            .filter(|s| s.name == wanted.name && wanted.labels.iter().all(|l| s.labels.contains(l)))
            .map(|s| s.value)
            .sum()
    }

    /// Whether a sample named `sample_name` (e.g. `tally_events_rejected_total`,
    /// `tally_output_send_duration_seconds_count`) is exposed, or at least its family declared by a
    /// `# TYPE` line.
    pub fn exposes(&self, sample_name: &str) -> bool {
        if self.samples.iter().any(|s| s.name == sample_name) {
            return true;
        }
        let family = ["_total", "_bucket", "_count", "_sum", "_created"]
            .iter()
            .find_map(|suffix| sample_name.strip_suffix(suffix))
            .unwrap_or(sample_name);
        self.families.contains(sample_name) || self.families.contains(family)
    }
}

fn parse_query(query: &str) -> Sample {
    let query = query.trim();
    let line = format!("{query} 0");
    parse_sample(&line).unwrap_or_else(|| panic!("malformed metric query {query:?}"))
}

fn parse_sample(line: &str) -> Option<Sample> {
    let name_end = line.find(['{', ' ', '\t'])?;
    let name = line[..name_end].to_string();
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(inner) = rest.strip_prefix('{') {
        let (parsed, after) = parse_labels(inner)?;
        labels = parsed;
        rest = after;
    }
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" | "Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        other => other.parse().ok()?,
    };
    Some(Sample {
        name,
        labels,
        value,
    })
}

/// Parses `a="x",b="y"}` and returns the labels and what follows the closing brace.
fn parse_labels(mut s: &str) -> Option<(Vec<(String, String)>, &str)> {
    let mut labels = Vec::new();
    loop {
        s = s.trim_start_matches([',', ' ']);
        if let Some(after) = s.strip_prefix('}') {
            return Some((labels, after));
        }
        let eq = s.find('=')?;
        let key = s[..eq].trim().to_string();
        s = s[eq + 1..].trim_start().strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = s.char_indices();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                '"' => break i,
                other => value.push(other),
            }
        };
        labels.push((key, value));
        s = &s[end + 1..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# HELP tally_events_rejected Events rejected.\n\
        # TYPE tally_events_rejected counter\n\
        tally_events_rejected_total{reason=\"invalid\"} 3\n\
        tally_events_rejected_total{reason=\"too_large\"} 1\n\
        # TYPE tally_output_errors counter\n\
        tally_output_errors_total{output=\"up\",kind=\"network\"} 2\n\
        tally_output_errors_total{output=\"up\",kind=\"retryable_status\"} 5.0\n\
        # TYPE tally_events_deduplicated counter\n\
        # TYPE tally_buffer_events gauge\n\
        tally_buffer_events 7\n\
        # EOF\n";

    #[test]
    fn reads_values_by_name_and_label_subset() {
        let m = Exposition::parse(TEXT);
        assert_eq!(
            m.value("tally_events_rejected_total{reason=\"invalid\"}"),
            3.0
        );
        assert_eq!(m.value("tally_events_rejected_total"), 4.0);
        assert_eq!(m.value("tally_output_errors_total{output=\"up\"}"), 7.0);
        assert_eq!(
            m.value("tally_output_errors_total{kind=\"network\",output=\"up\"}"),
            2.0
        );
        assert_eq!(
            m.value("tally_events_rejected_total{reason=\"buffer_full\"}"),
            0.0
        );
        assert_eq!(m.value("tally_events_deduplicated_total"), 0.0);
        assert_eq!(m.value("tally_buffer_events"), 7.0);
        assert_eq!(m.value("tally_nope_total"), 0.0);
    }

    #[test]
    fn knows_which_metrics_are_exposed() {
        let m = Exposition::parse(TEXT);
        assert!(m.exposes("tally_events_deduplicated_total"));
        assert!(m.exposes("tally_output_errors_total"));
        assert!(m.exposes("tally_buffer_events"));
        assert!(!m.exposes("tally_nope_total"));
    }
}
