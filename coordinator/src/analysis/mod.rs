//! Analysis of finished runs: `decodebench compare` (did a change make a kernel slower, or is the
//! difference noise?) and `decodebench report` (how do the cards of a fleet differ, and what is
//! the optimized kernel's speedup?).
//!
//! Both read `results.parquet` files through the one result schema ([`crate::schema`]) and decide
//! from the raw per-trial samples, not from summary columns: timing distributions are skewed and
//! a mean hides whether two runs overlap. The statistics live in [`stats`] and are tested against
//! hand-computed values; the method and every output column are described in `docs/ANALYSIS.md`.
//!
//! The command-line wiring stays in the binary: it maps its flags onto [`CompareOptions`] and
//! [`ReportOptions`] and calls [`run_compare`] or [`run_report`].

pub mod compare;
pub mod coverage;
pub mod load;
pub mod render;
pub mod report;
pub mod stats;

#[cfg(test)]
pub(crate) mod fixtures;

pub use compare::{
    compare, run_compare, CompareOptions, CompareOutcome, CompareSummary, Comparison, SideSummary,
    Verdict,
};
pub use load::{load_results, CaseParams, LoadedResults, ResultRow};
pub use report::{report, run_report, GroupReport, HeadlineRow, ReportOptions, ReportOutcome};

use crate::sink::SinkError;
use std::path::PathBuf;
use std::str::FromStr;

/// Exit code of `compare --fail-on-regression` when a regression was found (distinct from the
/// run's incomplete (2) and self-test (3) codes, so CI can tell them apart).
pub const EXIT_REGRESSION: u8 = 4;
/// Exit code of `compare --fail-on-regression` when no regression was found but the gate did not
/// check what it guards: baseline cases are missing from the candidate (without
/// `--allow-missing`), or no comparison could be decided at all. A gate must fail closed: a
/// candidate that lost half its cases, or ran too few trials to test anything, would pass.
pub const EXIT_UNCHECKED: u8 = 5;

/// Why an analysis could not be done.
#[derive(Debug, thiserror::Error)]
pub enum AnalysisError {
    #[error("{}: no results.parquet in this directory; pass a run's --out directory or a results.parquet file", path.display())]
    NoResults { path: PathBuf },
    /// The sink's error names the path and the fix.
    #[error("{source}")]
    Read { path: PathBuf, source: SinkError },
    #[error("{} is a CSV file, but compare and report read the run's results.parquet (the CSV has no schema version and flattens the samples); pass {}", path.display(), parquet.as_ref().map_or("the run's --out directory or its results.parquet".to_string(), |p| p.display().to_string()))]
    CsvGiven {
        path: PathBuf,
        /// The `results.parquet` next to it, when there is one.
        parquet: Option<PathBuf>,
    },
    #[error("{} is an empty file (0 bytes): the run did not write it, or a copy failed; pass the results.parquet of a finished run", path.display())]
    ZeroBytes { path: PathBuf },
    #[error("{} starts like a Parquet file but cannot be read ({source}): it is damaged or truncated (a copy still in progress?); copy it again from the run's --out directory", path.display())]
    Damaged { path: PathBuf, source: SinkError },
    #[error("{}: {reason}", path.display())]
    Schema { path: PathBuf, reason: String },
    #[error("{} holds no result rows: the run ended before any case finished (see its log); rerun it, or pass a run that finished cases", path.display())]
    Empty { path: PathBuf },
    #[error("{}: row {row}: {what} is `ok` but {problem}; an ok timing must be a positive, finite number of ms. The file is damaged or the timer misbehaved: rerun that case, or drop the row", path.display())]
    BadTiming {
        path: PathBuf,
        row: usize,
        what: String,
        problem: String,
    },
    #[error("{}: column `{column}` {reason}; the file does not match this build's result schema although it carries its version; analyse it with the decodebench build that wrote it (its git_revision column)", path.display())]
    Column {
        path: PathBuf,
        column: &'static str,
        reason: String,
    },
    #[error("{}: row {row}: column `{column}` holds {value:?}, which this build does not know; upgrade decodebench to read this file", path.display())]
    UnknownValue {
        path: PathBuf,
        row: usize,
        column: &'static str,
        value: String,
    },
    #[error("{} is both the baseline and the candidate: a run compared with itself can only come out unchanged; pass the new run as CANDIDATE", path.display())]
    SameFile { path: PathBuf },
    /// The two runs share no (case, kernel, GPU SKU): nothing was compared.
    #[error("{0}")]
    NothingCompared(Box<coverage::Mismatch>),
    #[error("{option} = {value}: {reason}")]
    InvalidOption {
        option: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("writing the output failed: {0}; check that stdout (or the output file) is writable")]
    Write(#[from] std::io::Error),
    #[error("writing CSV failed: {0}")]
    Csv(#[from] csv::Error),
    #[error("writing JSON failed: {0}")]
    Json(#[from] serde_json::Error),
}

/// How an analysis prints its result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputFormat {
    /// Aligned columns for a terminal.
    #[default]
    Table,
    /// Comma-separated values with full-precision numbers.
    Csv,
    /// One JSON document with every field.
    Json,
}

impl FromStr for OutputFormat {
    type Err = AnalysisError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "table" => Ok(OutputFormat::Table),
            "csv" => Ok(OutputFormat::Csv),
            "json" => Ok(OutputFormat::Json),
            _ => Err(AnalysisError::InvalidOption {
                option: "--format",
                value: s.to_string(),
                reason: "use table, csv or json",
            }),
        }
    }
}

/// Which kernels `compare` looks at (the same selection a grid's `[method] kernels` makes). With
/// both, a baseline kernel that moves too points at the machine (driver, clocks), not the code.
pub use decodebench_kernels::KernelSelection;

/// How `report` groups rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum GroupBy {
    /// One line per GPU (UUID): the slow-card finder.
    #[default]
    Gpu,
    /// One line per GPU model.
    Sku,
}

impl FromStr for GroupBy {
    type Err = AnalysisError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "gpu" => Ok(GroupBy::Gpu),
            "sku" => Ok(GroupBy::Sku),
            _ => Err(AnalysisError::InvalidOption {
                option: "--group-by",
                value: s.to_string(),
                reason: "use gpu or sku",
            }),
        }
    }
}
