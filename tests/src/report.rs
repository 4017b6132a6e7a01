//! How the benchmarks (`make bench`: the sidecar's and the operator's) print their figures: one aligned text
//! table with the same columns, and numbers written the same way.

use std::fmt::Write as _;

/// One row: figure, value, target or ceiling, ratio, verdict or note.
pub type Row = [String; 5];

/// `rows` under the header `figure | value | target / ceiling | ratio`, columns padded to their widest cell
/// (values and ratios right-aligned), one line each.
pub fn aligned_table(rows: &[Row]) -> String {
    let header: Row = ["figure", "value", "target / ceiling", "ratio", ""].map(String::from);
    let mut widths = [0usize; 4];
    for row in std::iter::once(&header).chain(rows) {
        for (w, cell) in widths.iter_mut().zip(row.iter()) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(&header).chain(rows) {
        let _ = writeln!(
            out,
            "{:<w0$}  {:>w1$}  {:<w2$}  {:>w3$}  {}",
            row[0],
            row[1],
            row[2],
            row[3],
            row[4],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2],
            w3 = widths[3],
        );
    }
    out
}

/// Readable numbers: thousands separated, fewer decimals the larger the value.
pub fn number(v: f64) -> String {
    if v.abs() >= 1000.0 {
        let digits = format!("{:.0}", v.abs());
        let mut grouped = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i) % 3 == 0 {
                grouped.push(',');
            }
            grouped.push(c);
        }
        if v < 0.0 {
            grouped.insert(0, '-');
        }
        grouped
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_grouped_and_rounded_by_size() {
        assert_eq!(number(1_234_567.4), "1,234,567");
        assert_eq!(number(-2_500.0), "-2,500");
        assert_eq!(number(252.4), "252");
        assert_eq!(number(33.54), "33.5");
        assert_eq!(number(0.128), "0.13");
    }

    #[test]
    fn columns_are_aligned() {
        let rows = [[
            "a".into(),
            "1 ms".into(),
            "target <= 5 ms".into(),
            "0.20".into(),
            "ok".into(),
        ]];
        assert_eq!(
            aligned_table(&rows),
            "figure  value  target / ceiling  ratio  \na        1 ms  target <= 5 ms     0.20  ok\n"
        );
    }
}
