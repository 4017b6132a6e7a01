//! The figures of a run: printed as a table beside their targets or ceilings, and written as JSON
//! so BENCHMARKS.md can be updated from them.

use serde::Serialize;
use tally_tests::report::{aligned_table, number};

/// What a figure is compared with.
#[derive(Clone, Copy, Debug, Serialize)]
#[serde(tag = "kind", content = "value", rename_all = "camelCase")]
pub enum Bound {
    /// A target the figure must reach.
    AtLeast(f64),
    /// A target the figure must stay under.
    AtMost(f64),
    /// What this machine allows at most; the ratio says how much of it is used.
    Ceiling(f64),
}

/// One measured number.
#[derive(Debug, Serialize)]
pub struct Figure {
    pub key: &'static str,
    pub label: &'static str,
    pub unit: &'static str,
    /// `None` when the phase that measures it failed.
    pub value: Option<f64>,
    pub bound: Option<Bound>,
    /// value / bound.
    pub ratio: Option<f64>,
    /// Whether a target is met; `None` for ceilings and plain figures.
    pub met: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl Figure {
    pub fn new(key: &'static str, label: &'static str, unit: &'static str) -> Self {
        Figure {
            key,
            label,
            unit,
            value: None,
            bound: None,
            ratio: None,
            met: None,
            note: None,
        }
    }

    pub fn value(mut self, value: Option<f64>) -> Self {
        self.value = value;
        self.evaluate();
        self
    }

    pub fn bound(mut self, bound: Option<Bound>) -> Self {
        self.bound = bound;
        self.evaluate();
        self
    }

    pub fn note(mut self, note: impl Into<String>) -> Self {
        let note = note.into();
        self.note = (!note.is_empty()).then_some(note);
        self
    }

    fn evaluate(&mut self) {
        let (Some(value), Some(bound)) = (self.value, self.bound) else {
            self.ratio = None;
            self.met = None;
            return;
        };
        let (reference, met) = match bound {
            Bound::AtLeast(t) => (t, Some(value >= t)),
            Bound::AtMost(t) => (t, Some(value <= t)),
            Bound::Ceiling(c) => (c, None),
        };
        self.ratio = (reference > 0.0).then(|| value / reference);
        self.met = met;
    }
}

/// The figures as an aligned text table.
pub fn table(figures: &[Figure]) -> String {
    let rows: Vec<[String; 5]> = figures
        .iter()
        .map(|f| {
            let value = f
                .value
                .map_or_else(|| "n/a".to_owned(), |v| format!("{} {}", number(v), f.unit));
            let bound = match f.bound {
                Some(Bound::AtLeast(t)) => format!("target >= {} {}", number(t), f.unit),
                Some(Bound::AtMost(t)) => format!("target <= {} {}", number(t), f.unit),
                Some(Bound::Ceiling(c)) => format!("ceiling {} {}", number(c), f.unit),
                None => String::new(),
            };
            let ratio = f.ratio.map_or_else(String::new, |r| format!("{r:.2}"));
            let verdict = match (f.met, f.value) {
                (Some(true), _) => "ok",
                (Some(false), _) => "MISSED",
                (None, None) => "FAILED",
                (None, Some(_)) => "",
            };
            [
                f.label.to_owned(),
                value,
                bound,
                ratio,
                match &f.note {
                    Some(note) if verdict.is_empty() => note.clone(),
                    Some(note) => format!("{verdict}; {note}"),
                    None => verdict.to_owned(),
                },
            ]
        })
        .collect();
    aligned_table(&rows)
}
