//! Printing analysis tables as aligned text or CSV from one definition of their columns, so the
//! two formats cannot drift apart.

use super::AnalysisError;
use std::io::Write;

/// Gap between text-table columns, in spaces.
const COLUMN_GAP_CHARS: usize = 2;

/// How numbers are written into cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CellStyle {
    /// Rounded for reading in a terminal.
    Text,
    /// Full precision (shortest round-trip form) for further processing.
    Csv,
}

impl CellStyle {
    /// `v` with `decimals` places in text, every digit in CSV; empty when unknown.
    pub fn number(self, v: Option<f64>, decimals: usize) -> String {
        match (v, self) {
            (None, CellStyle::Text) => "-".to_string(),
            (None, CellStyle::Csv) => String::new(),
            (Some(v), CellStyle::Text) => format!("{v:.decimals$}"),
            (Some(v), CellStyle::Csv) => format!("{v}"),
        }
    }

    /// `v` as a signed percentage in text ("+10.2%"), as a fraction in CSV.
    pub fn percent(self, v: Option<f64>) -> String {
        match (v, self) {
            (Some(v), CellStyle::Text) => format!("{:+.1}%", v * 100.0),
            (v, style) => style.number(v, 4),
        }
    }
}

/// A table: a header and rows of cells.
#[derive(Debug, Clone, PartialEq)]
pub struct Table {
    pub headers: Vec<&'static str>,
    pub rows: Vec<Vec<String>>,
}

impl Table {
    /// Aligned text: numeric-looking cells right-aligned, others left-aligned.
    pub fn write_text(&self, out: &mut dyn Write) -> Result<(), AnalysisError> {
        let widths: Vec<usize> = (0..self.headers.len())
            .map(|c| {
                self.rows
                    .iter()
                    .filter_map(|r| r.get(c))
                    .map(|s| s.chars().count())
                    .chain(std::iter::once(self.headers[c].len()))
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let numeric: Vec<bool> = (0..self.headers.len())
            .map(|c| {
                self.rows
                    .iter()
                    .filter_map(|r| r.get(c))
                    .filter(|s| s.as_str() != "-")
                    .all(|s| looks_numeric(s))
            })
            .collect();
        let line = |cells: &mut dyn Iterator<Item = &str>| -> String {
            let mut s = String::new();
            for (c, cell) in cells.enumerate() {
                if c > 0 {
                    s.push_str(&" ".repeat(COLUMN_GAP_CHARS));
                }
                let pad = widths[c].saturating_sub(cell.chars().count());
                if numeric[c] {
                    s.push_str(&" ".repeat(pad));
                    s.push_str(cell);
                } else {
                    s.push_str(cell);
                    s.push_str(&" ".repeat(pad));
                }
            }
            s.trim_end().to_string()
        };
        writeln!(out, "{}", line(&mut self.headers.iter().copied()))?;
        for row in &self.rows {
            writeln!(out, "{}", line(&mut row.iter().map(String::as_str)))?;
        }
        Ok(())
    }

    /// CSV with a header line.
    pub fn write_csv(&self, out: &mut dyn Write) -> Result<(), AnalysisError> {
        let mut w = csv::Writer::from_writer(out);
        w.write_record(&self.headers)?;
        for row in &self.rows {
            w.write_record(row)?;
        }
        w.flush()?;
        Ok(())
    }
}

/// Numbers, percentages and intervals like "[0.98, 1.02]" align to the right.
fn looks_numeric(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_digit() || "+-.,%[]e x/<".contains(c))
        && s.chars().any(|c| c.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> Table {
        Table {
            headers: vec!["name", "value"],
            rows: vec![
                vec!["a".into(), "1.5".into()],
                vec!["long name".into(), "-".into()],
                vec!["with, comma".into(), "10.25".into()],
            ],
        }
    }

    #[test]
    fn analysis_text_table_aligns_numbers_right() {
        let mut out = Vec::new();
        table().write_text(&mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "name         value");
        assert_eq!(lines[1], "a              1.5");
        assert_eq!(lines[2], "long name        -");
        assert_eq!(lines[3], "with, comma  10.25");
    }

    #[test]
    fn analysis_csv_quotes_what_needs_quoting() {
        let mut out = Vec::new();
        table().write_csv(&mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(
            text,
            "name,value\na,1.5\nlong name,-\n\"with, comma\",10.25\n"
        );
    }

    #[test]
    fn analysis_cell_styles() {
        assert_eq!(CellStyle::Text.number(Some(1.23456), 2), "1.23");
        assert_eq!(CellStyle::Csv.number(Some(1.23456), 2), "1.23456");
        assert_eq!(CellStyle::Text.number(None, 2), "-");
        assert_eq!(CellStyle::Csv.number(None, 2), "");
        assert_eq!(CellStyle::Text.percent(Some(0.1023)), "+10.2%");
        assert_eq!(CellStyle::Text.percent(Some(-0.05)), "-5.0%");
        assert_eq!(CellStyle::Csv.percent(Some(0.1023)), "0.1023");
    }
}
