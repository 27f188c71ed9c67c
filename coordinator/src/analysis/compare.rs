//! `decodebench compare`: tells a real regression from noise between two runs.
//!
//! Rows are matched by (case, kernel, GPU SKU). For each match the raw samples of both sides give
//! the ratio of medians (candidate / baseline) with a seeded, hierarchical bootstrap interval
//! (GPUs resampled, then samples within each GPU; see [`stats::median_ratio_interval`]) and a
//! two-sided Mann-Whitney U test on the pooled samples. A change counts only when it is both
//! larger than the threshold (the whole interval beyond it) and unlikely to be chance (p below
//! alpha); a status change (ok -> wrong_result, ...) is reported as a regression of its own kind.
//! A comparison with too few samples for the test to reach alpha at all is `underpowered`, not
//! `noisy`, and the output warns about it: no data could have made it a regression.
//!
//! As a CI gate (`--fail-on-regression`) it fails closed: two runs that share no case are an
//! error ([`coverage::Mismatch`] says what differs), and baseline cases missing from the candidate
//! or a comparison in which nothing could be decided fail with [`EXIT_UNCHECKED`], because a gate
//! that checked nothing must not pass. `docs/ANALYSIS.md` gives the method and its reasons.

use super::coverage::{self, MatchKey};
use super::load::{load_results, results_file, CaseParams, LoadedResults, ResultRow};
use super::render::{CellStyle, Table};
use super::stats::{self, BootstrapSettings};
use super::{AnalysisError, KernelSelection, OutputFormat, EXIT_REGRESSION, EXIT_UNCHECKED};
use decodebench_kernels::{KernelKind, Status};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::Write;
use std::path::PathBuf;

/// Default smallest change that matters: 3 %, above the run-to-run and card-to-card drift of
/// identical data-centre GPUs on this memory-bound kernel (about 1-2 %; `report` measures it for
/// a fleet), so a nightly job does not page anyone over a clock wobble.
pub const DEFAULT_THRESHOLD: f64 = 0.03;
/// Default significance level: 1 %, so a grid of ~800 comparisons raises about 8 false alarms by
/// chance at most, and far fewer once the threshold must be cleared as well.
pub const DEFAULT_ALPHA: f64 = 0.01;
/// Default bootstrap resamples: 2000 puts the 0.5 % and 99.5 % percentiles 10 resamples from the
/// ends, enough for a stable 99 % interval.
pub const DEFAULT_BOOTSTRAP_RESAMPLES: usize = 2000;
/// Fewest resamples accepted: below this the interval's tails are a handful of draws.
pub const MIN_BOOTSTRAP_RESAMPLES: usize = 200;
/// Default bootstrap seed ("decode" in ASCII); any fixed value makes reruns identical.
pub const DEFAULT_BOOTSTRAP_SEED: u64 = 0x6465_636f_6465;
/// Fewest timed samples a side needs for any interval at all (the hard floor): the bootstrap
/// median of one or two samples takes a handful of values, and its percentiles say nothing.
/// Below it a comparison is `underpowered` whatever alpha is.
///
/// This is not enough for significance. The U test has a floor of its own that depends on alpha
/// ([`stats::mann_whitney_samples_needed`]): with n samples per side its p-value can never fall
/// below [`stats::mann_whitney_min_p_value`]`(n, n)` (3 -> 0.081, 4 -> 0.030, 5 -> 0.0122,
/// 6 -> 0.0051), so alpha 0.01 needs 6 per side and alpha 0.05 needs 4. A comparison between the
/// two floors is `underpowered` unless its interval already lies within the threshold.
pub const MIN_SAMPLES_PER_SIDE: usize = 3;
/// Longest agent message quoted in a text table; the full message is in CSV and JSON.
const MESSAGE_PREVIEW_CHARS: usize = 60;
/// Missing cases named by example in the warning; the rest are counted.
const MISSING_EXAMPLES_SHOWN: usize = 3;
/// Fewest comparisons worth a thread of their own: below this, starting the thread costs more
/// than the bootstrap it runs.
const COMPARISONS_PER_WORKER_MIN: usize = 16;

/// What `compare` compares and how it decides.
#[derive(Debug, Clone, PartialEq)]
pub struct CompareOptions {
    /// The reference run: a run's output directory or its `results.parquet`.
    pub baseline: PathBuf,
    /// The run under test.
    pub candidate: PathBuf,
    /// Smallest relative change of the median that counts (0.03 = 3 %).
    pub threshold: f64,
    /// Significance level of the U test; the bootstrap interval has coverage 1 - alpha.
    pub alpha: f64,
    pub kernels: KernelSelection,
    pub format: OutputFormat,
    /// Make [`CompareOutcome::exit_code`] non-zero when any regression was found, or when the
    /// comparison did not check what the baseline holds (see [`EXIT_UNCHECKED`]).
    pub fail_on_regression: bool,
    /// With `fail_on_regression`: accept baseline cases missing from the candidate (a grid that
    /// shrank on purpose) instead of failing with [`EXIT_UNCHECKED`].
    pub allow_missing: bool,
    pub resamples: usize,
    pub seed: u64,
}

impl CompareOptions {
    /// Options with every default.
    pub fn new(baseline: impl Into<PathBuf>, candidate: impl Into<PathBuf>) -> Self {
        CompareOptions {
            baseline: baseline.into(),
            candidate: candidate.into(),
            threshold: DEFAULT_THRESHOLD,
            alpha: DEFAULT_ALPHA,
            kernels: KernelSelection::Both,
            format: OutputFormat::Table,
            fail_on_regression: false,
            allow_missing: false,
            resamples: DEFAULT_BOOTSTRAP_RESAMPLES,
            seed: DEFAULT_BOOTSTRAP_SEED,
        }
    }

    /// Checks the numbers a user typed.
    pub fn validate(&self) -> Result<(), AnalysisError> {
        if !(self.threshold >= 0.0 && self.threshold < 1.0) {
            return Err(AnalysisError::InvalidOption {
                option: "--threshold",
                value: self.threshold.to_string(),
                reason: "must be a fraction in [0, 1), e.g. 0.03 for 3 %",
            });
        }
        if !(self.alpha > 0.0 && self.alpha < 1.0) {
            return Err(AnalysisError::InvalidOption {
                option: "--alpha",
                value: self.alpha.to_string(),
                reason: "must be a probability in (0, 1), e.g. 0.01",
            });
        }
        if self.resamples < MIN_BOOTSTRAP_RESAMPLES {
            return Err(AnalysisError::InvalidOption {
                option: "--resamples",
                value: self.resamples.to_string(),
                reason: "must be at least 200 for a stable interval (2000 is the default)",
            });
        }
        Ok(())
    }
}

/// The decision for one (case, kernel, SKU).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// The candidate's status is worse (ok -> wrong_result, ok -> failed, ...).
    StatusRegression,
    /// Slower beyond the threshold, and significant.
    Regression,
    /// Too few samples to decide: fewer than [`MIN_SAMPLES_PER_SIDE`] on a side, or so few that
    /// the U test's smallest possible p-value is not below alpha (5 and 5 at alpha 0.01), so no
    /// data could have made it a regression or an improvement; and the interval does not show it
    /// unchanged either. Rerun with more trials or raise alpha.
    Underpowered,
    /// Neither clearly changed nor clearly unchanged: the interval crosses the threshold or the
    /// test is not significant, although it could have been with these sample counts.
    Noisy,
    /// In the baseline, absent from the candidate.
    Missing,
    /// In the candidate only.
    New,
    /// Not timed as valid on either side (both skipped, both failed, ...).
    NotTimed,
    /// The whole interval lies within the threshold.
    Unchanged,
    /// The candidate's status is better (wrong_result -> ok, ...).
    StatusFixed,
    /// Faster beyond the threshold, and significant.
    Improvement,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::StatusRegression => "status_regression",
            Verdict::Regression => "regression",
            Verdict::Underpowered => "underpowered",
            Verdict::Noisy => "noisy",
            Verdict::Missing => "missing",
            Verdict::New => "new",
            Verdict::NotTimed => "not_timed",
            Verdict::Unchanged => "unchanged",
            Verdict::StatusFixed => "status_fixed",
            Verdict::Improvement => "improvement",
        }
    }

    /// Whether this verdict fails `--fail-on-regression`.
    pub fn is_regression(self) -> bool {
        matches!(self, Verdict::Regression | Verdict::StatusRegression)
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One side of a comparison: the SKU's GPUs that ran the case in that run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SideSummary {
    /// `ok` when every GPU timed it validly, else the worst status among them.
    pub status: Status,
    /// The message of the GPU that gave the worst status (empty when ok).
    pub message: String,
    /// UUIDs of the GPUs, sorted.
    pub gpus: Vec<String>,
    /// Timed samples pooled over the GPUs that were ok.
    pub n_samples: usize,
    /// Median of those samples, ms.
    pub median_ms: Option<f64>,
    /// A thermal or power throttle was seen on any of the GPUs.
    pub throttled: bool,
}

/// One matched (case, kernel, SKU) and its verdict.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Comparison {
    pub case_id: String,
    pub case: CaseParams,
    pub kernel: KernelKind,
    pub sku: String,
    pub verdict: Verdict,
    pub baseline: Option<SideSummary>,
    pub candidate: Option<SideSummary>,
    /// median(candidate) / median(baseline): above 1 is slower.
    pub ratio: Option<f64>,
    pub ci_low: Option<f64>,
    pub ci_high: Option<f64>,
    /// Two-sided Mann-Whitney U p-value.
    pub p_value: Option<f64>,
    /// The two sides ran on different GPUs of the SKU, so card-to-card spread is part of the
    /// difference.
    pub gpus_differ: bool,
    /// Either side saw throttling: its times may say more about cooling than about the code.
    pub throttled: bool,
    /// Why, in words, when the numbers alone do not say it.
    pub note: String,
}

impl Comparison {
    /// The change of the median as a fraction (+0.10 = 10 % slower).
    pub fn change(&self) -> Option<f64> {
        self.ratio.map(|r| r - 1.0)
    }
}

/// Counts of each verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct CompareSummary {
    /// Timing regressions plus status regressions.
    pub regressions: usize,
    /// The status regressions among `regressions`.
    pub status_regressions: usize,
    /// Timing improvements plus status fixes.
    pub improvements: usize,
    pub status_fixed: usize,
    pub unchanged: usize,
    pub noisy: usize,
    /// Too few samples for the test to reach alpha (see [`Verdict::Underpowered`]).
    pub underpowered: usize,
    pub not_timed: usize,
    /// In the baseline, absent from the candidate.
    pub missing: usize,
    /// In the candidate only.
    pub new: usize,
    /// Comparisons with throttling on either side.
    pub throttled: usize,
}

impl CompareSummary {
    /// Comparisons with both sides present (not `missing`, not `new`).
    pub fn matched(&self) -> usize {
        self.regressions
            + self.improvements
            + self.unchanged
            + self.noisy
            + self.underpowered
            + self.not_timed
    }

    /// Matched comparisons that reached a verdict the gate can act on: all but `underpowered`
    /// (too few samples for the test) and `not_timed` (no valid time on either side).
    pub fn decided(&self) -> usize {
        self.matched() - self.underpowered - self.not_timed
    }

    fn of(rows: &[Comparison]) -> Self {
        let mut s = CompareSummary::default();
        for c in rows {
            match c.verdict {
                Verdict::StatusRegression => {
                    s.regressions += 1;
                    s.status_regressions += 1;
                }
                Verdict::Regression => s.regressions += 1,
                Verdict::Improvement => s.improvements += 1,
                Verdict::StatusFixed => {
                    s.improvements += 1;
                    s.status_fixed += 1;
                }
                Verdict::Unchanged => s.unchanged += 1,
                Verdict::Noisy => s.noisy += 1,
                Verdict::Underpowered => s.underpowered += 1,
                Verdict::NotTimed => s.not_timed += 1,
                Verdict::Missing => s.missing += 1,
                Verdict::New => s.new += 1,
            }
            if c.throttled {
                s.throttled += 1;
            }
        }
        s
    }
}

impl fmt::Display for CompareSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} regressions ({} status), {} improvements ({} status), {} unchanged, {} noisy, \
             {} underpowered, {} not timed on either side; {} missing in candidate, {} new in \
             candidate; {} throttled",
            self.regressions,
            self.status_regressions,
            self.improvements,
            self.status_fixed,
            self.unchanged,
            self.noisy,
            self.underpowered,
            self.not_timed,
            self.missing,
            self.new,
            self.throttled
        )
    }
}

/// Everything `compare` found, worst first.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CompareOutcome {
    pub baseline: PathBuf,
    pub candidate: PathBuf,
    pub threshold: f64,
    pub alpha: f64,
    /// Coverage of the bootstrap intervals (1 - alpha).
    pub confidence: f64,
    pub resamples: usize,
    pub seed: u64,
    pub kernels: KernelSelection,
    pub fail_on_regression: bool,
    pub allow_missing: bool,
    /// Fewest samples per side (equal on both) with which the U test can reach p < alpha at all,
    /// and at least [`MIN_SAMPLES_PER_SIDE`]: fewer make a comparison `underpowered`.
    pub samples_needed_per_side: usize,
    pub summary: CompareSummary,
    pub comparisons: Vec<Comparison>,
}

impl CompareOutcome {
    /// The regressions (timing and status), worst first.
    pub fn regressions(&self) -> Vec<&Comparison> {
        self.comparisons
            .iter()
            .filter(|c| c.verdict.is_regression())
            .collect()
    }

    /// The process exit code. Without `fail_on_regression`, 0. With it: [`EXIT_REGRESSION`] when
    /// any regression was found, else [`EXIT_UNCHECKED`] when [`Self::unchecked`] says the gate
    /// did not check what it guards, else 0.
    pub fn exit_code(&self) -> u8 {
        if !self.fail_on_regression {
            0
        } else if self.summary.regressions > 0 {
            EXIT_REGRESSION
        } else if self.unchecked().is_some() {
            EXIT_UNCHECKED
        } else {
            0
        }
    }

    /// Why a gate that found no regression still did not check the baseline: cases missing from
    /// the candidate (unless `allow_missing`), or no matched comparison that could be decided.
    /// `None` when neither holds; the message says what to do.
    pub fn unchecked(&self) -> Option<String> {
        let s = &self.summary;
        let mut reasons = Vec::new();
        if s.missing > 0 && !self.allow_missing {
            reasons.push(format!(
                "{} of {} baseline comparisons are missing from the candidate, so nothing tested \
                 them (rerun the candidate on the baseline's grid, or pass --allow-missing when \
                 the grid shrank on purpose)",
                s.missing,
                s.matched() + s.missing
            ));
        }
        if s.matched() > 0 && s.decided() == 0 {
            let mut why = Vec::new();
            if s.underpowered > 0 {
                why.push(format!(
                    "{} underpowered (rerun with --trials {} or more, or raise --alpha)",
                    s.underpowered, self.samples_needed_per_side
                ));
            }
            if s.not_timed > 0 {
                why.push(format!(
                    "{} not timed ok on either side (see the notes for the agents' messages)",
                    s.not_timed
                ));
            }
            reasons.push(format!(
                "none of the {} comparisons could be decided: {}",
                s.matched(),
                why.join(", ")
            ));
        }
        if reasons.is_empty() {
            return None;
        }
        Some(format!(
            "--fail-on-regression: no regression found, but the gate did not check the baseline: \
             {}",
            reasons.join("; ")
        ))
    }

    /// The warning printed after the summary when baseline comparisons are missing from the
    /// candidate: how many, on which SKUs and kernels, a few examples. `None` when there are none.
    pub fn missing_warning(&self) -> Option<String> {
        let missing: Vec<&Comparison> = self
            .comparisons
            .iter()
            .filter(|c| c.verdict == Verdict::Missing)
            .collect();
        if missing.is_empty() {
            return None;
        }
        let mut by_sku: BTreeMap<&str, usize> = BTreeMap::new();
        let mut by_kernel: BTreeMap<&str, usize> = BTreeMap::new();
        for c in &missing {
            *by_sku.entry(c.sku.as_str()).or_default() += 1;
            *by_kernel.entry(c.kernel.as_str()).or_default() += 1;
        }
        let counts = |m: &BTreeMap<&str, usize>| -> String {
            m.iter()
                .map(|(k, n)| format!("{n} {k}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut examples: Vec<String> = missing
            .iter()
            .map(|c| c.case.label())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let more = examples.len().saturating_sub(MISSING_EXAMPLES_SHOWN);
        examples.truncate(MISSING_EXAMPLES_SHOWN);
        let mut cases = examples.join("; ");
        if more > 0 {
            cases.push_str(&format!("; and {more} more"));
        }
        let gate = if !self.fail_on_regression {
            "With --fail-on-regression they fail the gate (exit 5) unless --allow-missing is given"
        } else if self.allow_missing {
            "--allow-missing: they do not fail the gate"
        } else {
            "They fail the gate (exit 5); pass --allow-missing when the grid shrank on purpose"
        };
        Some(format!(
            "warning: {} of {} baseline comparisons are not in the candidate (by SKU: {}; by \
             kernel: {}): {cases}. {gate}.",
            missing.len(),
            self.summary.matched() + missing.len(),
            counts(&by_sku),
            counts(&by_kernel),
        ))
    }

    /// The comparisons as a table. Text leaves out the columns only a program needs.
    pub fn table(&self, style: CellStyle) -> Table {
        let text = style == CellStyle::Text;
        let mut headers = vec!["verdict", "kernel", "sku", "case"];
        if !text {
            headers.push("case_id");
        }
        headers.extend(["base_ms", "cand_ms", "change", "ci_low", "ci_high", "p"]);
        if text {
            headers.push("n");
        } else {
            headers.extend([
                "n_base",
                "n_cand",
                "base_status",
                "cand_status",
                "gpus_differ",
                "throttled",
            ]);
        }
        headers.push("note");
        let rows = self
            .comparisons
            .iter()
            .map(|c| {
                let side_n = |s: &Option<SideSummary>| s.as_ref().map(|s| s.n_samples);
                let side_status = |s: &Option<SideSummary>| {
                    s.as_ref()
                        .map(|s| s.status.as_str().to_string())
                        .unwrap_or_default()
                };
                let mut row = vec![
                    c.verdict.to_string(),
                    c.kernel.as_str().to_string(),
                    c.sku.clone(),
                    c.case.label(),
                ];
                if !text {
                    row.push(c.case_id.clone());
                }
                row.push(style.number(c.baseline.as_ref().and_then(|s| s.median_ms), 4));
                row.push(style.number(c.candidate.as_ref().and_then(|s| s.median_ms), 4));
                row.push(style.percent(c.change()));
                row.push(style.percent(c.ci_low.map(|r| r - 1.0)));
                row.push(style.percent(c.ci_high.map(|r| r - 1.0)));
                row.push(match (c.p_value, style) {
                    (Some(p), CellStyle::Text) => format!("{p:.1e}"),
                    (p, _) => style.number(p, 4),
                });
                if text {
                    row.push(format!(
                        "{}/{}",
                        side_n(&c.baseline).unwrap_or(0),
                        side_n(&c.candidate).unwrap_or(0)
                    ));
                    let mut note = c.note.clone();
                    if note.chars().count() > MESSAGE_PREVIEW_CHARS {
                        note = note.chars().take(MESSAGE_PREVIEW_CHARS).collect::<String>() + "...";
                    }
                    row.push(note);
                } else {
                    let n = |v: Option<usize>| v.map(|n| n.to_string()).unwrap_or_default();
                    row.push(n(side_n(&c.baseline)));
                    row.push(n(side_n(&c.candidate)));
                    row.push(side_status(&c.baseline));
                    row.push(side_status(&c.candidate));
                    row.push(c.gpus_differ.to_string());
                    row.push(c.throttled.to_string());
                    row.push(c.note.clone());
                }
                row
            })
            .collect();
        Table { headers, rows }
    }

    /// Writes the outcome in `format` (the table, or the whole outcome as JSON).
    pub fn write(&self, out: &mut dyn Write, format: OutputFormat) -> Result<(), AnalysisError> {
        match format {
            OutputFormat::Table => {
                self.table(CellStyle::Text).write_text(out)?;
                writeln!(out)?;
                writeln!(out, "{}", self.summary_line())?;
                for warning in self.warnings() {
                    writeln!(out, "{warning}")?;
                }
            }
            OutputFormat::Csv => self.table(CellStyle::Csv).write_csv(out)?,
            OutputFormat::Json => {
                serde_json::to_writer_pretty(&mut *out, self)?;
                writeln!(out)?;
            }
        }
        Ok(())
    }

    /// "compare: 2 regressions (0 status), ..." with the decision rule.
    pub fn summary_line(&self) -> String {
        format!(
            "compare: {} (threshold {:.1} %, alpha {}, {} % intervals)",
            self.summary,
            self.threshold * 100.0,
            self.alpha,
            self.confidence * 100.0
        )
    }

    /// The warnings that follow the summary line: missing cases, then underpowered comparisons.
    pub fn warnings(&self) -> Vec<String> {
        self.missing_warning()
            .into_iter()
            .chain(self.power_warning())
            .collect()
    }

    /// The warning printed after the summary when any comparison is `underpowered`: how many,
    /// and the samples per side the chosen alpha needs. `None` when there are none.
    pub fn power_warning(&self) -> Option<String> {
        let count = self.summary.underpowered;
        if count == 0 {
            return None;
        }
        let needed = self.samples_needed_per_side;
        Some(format!(
            "warning: {count} of {} comparisons are underpowered: with alpha {} the U test needs \
             at least {needed} samples on each side (pooled over the side's GPUs) before any \
             p-value can fall below alpha, and these have fewer on at least one side, so they can \
             never be reported as a regression or an improvement (nor fail \
             --fail-on-regression). Rerun with --trials {needed} or more, or raise --alpha.",
            self.comparisons.len(),
            self.alpha,
        ))
    }
}

/// Loads both runs and compares them (prints nothing). Two runs that share no (case, kernel,
/// SKU) are an error ([`AnalysisError::NothingCompared`]), as is one file given for both.
pub fn compare(opts: &CompareOptions) -> Result<CompareOutcome, AnalysisError> {
    load_and_compare(opts).map(|(outcome, _)| outcome)
}

/// Loads, checks and compares; also returns the notes to print on stderr (duplicates dropped,
/// one run on both sides).
fn load_and_compare(opts: &CompareOptions) -> Result<(CompareOutcome, Vec<String>), AnalysisError> {
    opts.validate()?;
    let (base_file, cand_file) = (
        results_file(&opts.baseline)?,
        results_file(&opts.candidate)?,
    );
    if let (Ok(b), Ok(c)) = (base_file.canonicalize(), cand_file.canonicalize()) {
        if b == c {
            return Err(AnalysisError::SameFile { path: base_file });
        }
    }
    let baseline = load_results(&base_file)?;
    let candidate = load_results(&cand_file)?;
    let mut notes = Vec::new();
    for side in [&baseline, &candidate] {
        if side.duplicates_dropped > 0 {
            notes.push(format!(
                "note: {}: {} duplicate result rows (a later report of the same case on the \
                 same GPU); kept the latest",
                side.path.display(),
                side.duplicates_dropped
            ));
        }
    }
    let run_ids = |l: &LoadedResults| -> BTreeSet<String> {
        l.rows.iter().map(|r| r.run_id.clone()).collect()
    };
    let base_runs = run_ids(&baseline);
    if base_runs == run_ids(&candidate) && base_runs.iter().all(|id| !id.is_empty()) {
        notes.push(format!(
            "warning: the baseline and the candidate hold the same run ({}): a copy of one run \
             can only come out unchanged; pass the new run as CANDIDATE",
            base_runs.into_iter().collect::<Vec<_>>().join(", ")
        ));
    }
    let outcome = compare_loaded(&baseline, &candidate, opts);
    if outcome.summary.matched() == 0 {
        return Err(AnalysisError::NothingCompared(Box::new(
            coverage::Mismatch::between(&baseline, &candidate, opts.kernels),
        )));
    }
    Ok((outcome, notes))
}

/// `decodebench compare`: compares, prints the result to stdout in `opts.format` (the summary line
/// and any warnings also to stderr, and why the gate failed when it did), and returns it; exit
/// with [`CompareOutcome::exit_code`].
pub fn run_compare(opts: &CompareOptions) -> Result<CompareOutcome, AnalysisError> {
    let (outcome, notes) = load_and_compare(opts)?;
    for note in notes {
        eprintln!("{note}");
    }
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    outcome.write(&mut out, opts.format)?;
    out.flush()?;
    if opts.format != OutputFormat::Table {
        eprintln!("{}", outcome.summary_line());
        for warning in outcome.warnings() {
            eprintln!("{warning}");
        }
    }
    if outcome.exit_code() == EXIT_UNCHECKED {
        if let Some(why) = outcome.unchecked() {
            eprintln!("error: {why}");
        }
    }
    Ok(outcome)
}

/// Groups rows by (case, kernel, SKU); a row without a kernel stands for every selected kernel.
fn by_key(rows: &[ResultRow], kernels: KernelSelection) -> BTreeMap<MatchKey, Vec<&ResultRow>> {
    let mut map: BTreeMap<MatchKey, Vec<&ResultRow>> = BTreeMap::new();
    for row in rows {
        for key in coverage::row_keys(row, kernels) {
            map.entry(key).or_default().push(row);
        }
    }
    map
}

/// Compares two loaded runs.
pub fn compare_loaded(
    baseline: &LoadedResults,
    candidate: &LoadedResults,
    opts: &CompareOptions,
) -> CompareOutcome {
    let base = by_key(&baseline.rows, opts.kernels);
    let cand = by_key(&candidate.rows, opts.kernels);
    let keys: Vec<&MatchKey> = base
        .keys()
        .chain(cand.keys())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let confidence = 1.0 - opts.alpha;
    let compare_key = |key: &MatchKey| {
        compare_one(
            key,
            base.get(key).map(Vec::as_slice),
            cand.get(key).map(Vec::as_slice),
            opts,
            confidence,
        )
    };
    // Each comparison has its own seed, so spreading them over threads changes nothing but the
    // wall time (noise-based stopping can leave 1000 samples per GPU to resample 2000 times).
    let workers = std::thread::available_parallelism()
        .map_or(1, usize::from)
        .min(keys.len().div_ceil(COMPARISONS_PER_WORKER_MIN))
        .max(1);
    // Workers take comparisons one at a time from a shared counter: they differ in cost (status
    // only, or thousands of samples per side), and fixed blocks would leave cores idle.
    let next = std::sync::atomic::AtomicUsize::new(0);
    let mut comparisons: Vec<Comparison> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                let (compare_key, next, keys) = (&compare_key, &next, &keys);
                scope.spawn(move || {
                    let mut part = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(k) = keys.get(i) else { break };
                        part.extend(compare_key(k));
                    }
                    part
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| match h.join() {
                Ok(part) => part,
                // A panic here is a bug in this module; re-raise it with its own message.
                Err(payload) => std::panic::resume_unwind(payload),
            })
            .collect()
    });
    comparisons.sort_by(|a, b| {
        a.verdict
            .cmp(&b.verdict)
            .then_with(|| {
                // Worst (largest ratio) first; unknown ratios last.
                let r = |c: &Comparison| c.ratio.unwrap_or(f64::NEG_INFINITY);
                r(b).total_cmp(&r(a))
            })
            .then_with(|| a.case.cmp(&b.case))
            .then_with(|| a.kernel.cmp(&b.kernel))
            .then_with(|| a.sku.cmp(&b.sku))
    });
    CompareOutcome {
        baseline: baseline.path.clone(),
        candidate: candidate.path.clone(),
        threshold: opts.threshold,
        alpha: opts.alpha,
        confidence,
        resamples: opts.resamples,
        seed: opts.seed,
        kernels: opts.kernels,
        fail_on_regression: opts.fail_on_regression,
        allow_missing: opts.allow_missing,
        samples_needed_per_side: samples_needed_per_side(opts.alpha),
        summary: CompareSummary::of(&comparisons),
        comparisons,
    }
}

/// How bad a status is, for deciding whether a status change is a regression: a kernel that is
/// wrong is worse than one that crashed, which is worse than one that ran out of memory, which is
/// worse than a combination it does not support.
fn status_severity(s: Status) -> u8 {
    match s {
        Status::Ok => 0,
        Status::Skipped => 1,
        Status::Oom => 2,
        Status::Failed => 3,
        Status::WrongResult => 4,
    }
}

/// A side's summary and its per-GPU sample groups (ok GPUs only).
fn summarize_side<'a>(rows: &[&'a ResultRow]) -> (SideSummary, Vec<&'a [f64]>) {
    let worst = rows
        .iter()
        .max_by_key(|r| status_severity(r.effective_status()));
    let status = worst.map_or(Status::Failed, |r| r.effective_status());
    let message = match worst {
        Some(r) if status != Status::Ok => r.message.clone(),
        _ => String::new(),
    };
    let mut gpus: Vec<String> = rows.iter().map(|r| r.device_uuid.clone()).collect();
    gpus.sort();
    gpus.dedup();
    let groups: Vec<&[f64]> = rows
        .iter()
        .filter(|r| r.effective_status() == Status::Ok && !r.samples_ms.is_empty())
        .map(|r| r.samples_ms.as_slice())
        .collect();
    let pooled: Vec<f64> = groups.concat();
    let median_ms = stats::median(&pooled).or_else(|| {
        // No raw samples (an old or hand-made file): fall back to the summary column.
        let medians: Vec<f64> = rows
            .iter()
            .filter(|r| r.effective_status() == Status::Ok)
            .filter_map(|r| r.median_ms)
            .collect();
        stats::median(&medians)
    });
    let summary = SideSummary {
        status,
        message,
        gpus,
        n_samples: pooled.len(),
        median_ms,
        throttled: rows.iter().any(|r| r.throttled == Some(true)),
    };
    (summary, groups)
}

fn compare_one(
    key: &MatchKey,
    base_rows: Option<&[&ResultRow]>,
    cand_rows: Option<&[&ResultRow]>,
    opts: &CompareOptions,
    confidence: f64,
) -> Option<Comparison> {
    let (case_id, kernel, sku) = key;
    // Every key comes from at least one row.
    let case = base_rows
        .and_then(|r| r.first())
        .or_else(|| cand_rows.and_then(|r| r.first()))?
        .case
        .clone();
    let base = base_rows.map(summarize_side);
    let cand = cand_rows.map(summarize_side);
    let mut c = Comparison {
        case_id: case_id.clone(),
        case,
        kernel: *kernel,
        sku: sku.clone(),
        verdict: Verdict::Noisy,
        baseline: base.as_ref().map(|b| b.0.clone()),
        candidate: cand.as_ref().map(|c| c.0.clone()),
        ratio: None,
        ci_low: None,
        ci_high: None,
        p_value: None,
        gpus_differ: false,
        throttled: false,
        note: String::new(),
    };
    let ((base, base_groups), (cand, cand_groups)) = match (base, cand) {
        (Some(b), Some(c)) => (b, c),
        (Some(_), None) => {
            c.verdict = Verdict::Missing;
            c.note = "not in the candidate run".to_string();
            return Some(c);
        }
        (None, _) => {
            c.verdict = Verdict::New;
            c.note = "not in the baseline run".to_string();
            return Some(c);
        }
    };
    c.gpus_differ = base.gpus != cand.gpus;
    c.throttled = base.throttled || cand.throttled;
    if let (Some(b), Some(m)) = (base.median_ms, cand.median_ms) {
        if b > 0.0 {
            c.ratio = Some(m / b);
        }
    }

    let (bs, cs) = (status_severity(base.status), status_severity(cand.status));
    if base.status != Status::Ok || cand.status != Status::Ok {
        let change = format!("{} -> {}", base.status.as_str(), cand.status.as_str());
        let (verdict, message) = if cs > bs {
            (Verdict::StatusRegression, &cand.message)
        } else if cand.status == Status::Ok {
            (Verdict::StatusFixed, &base.message)
        } else {
            (Verdict::NotTimed, &cand.message)
        };
        c.verdict = verdict;
        c.note = if message.is_empty() {
            change
        } else {
            format!("{change}: {message}")
        };
        return Some(c);
    }

    let mut notes = Vec::new();
    if c.throttled {
        let sides: Vec<&str> = [(base.throttled, "baseline"), (cand.throttled, "candidate")]
            .iter()
            .filter(|s| s.0)
            .map(|s| s.1)
            .collect();
        notes.push(format!("throttled ({})", sides.join(", ")));
    }
    if c.gpus_differ {
        notes.push("different GPUs: card spread included".to_string());
    }
    let counts = format!("{}/{}", base.n_samples, cand.n_samples);
    let needed = samples_needed_per_side(opts.alpha);
    if base.n_samples < MIN_SAMPLES_PER_SIDE || cand.n_samples < MIN_SAMPLES_PER_SIDE {
        c.verdict = Verdict::Underpowered;
        // The verdict's reason first: the text table shows only the start of a note.
        notes.insert(
            0,
            format!(
                "too few samples ({counts}, need {needed} per side): no interval below \
                 {MIN_SAMPLES_PER_SIDE}"
            ),
        );
        c.note = notes.join("; ");
        return Some(c);
    }

    let seed_key = format!("{case_id}|{}|{sku}", kernel.as_str());
    let settings = BootstrapSettings {
        resamples: opts.resamples,
        confidence,
        seed: opts.seed ^ stats::fnv1a(seed_key.as_bytes()),
    };
    let interval = stats::median_ratio_interval(&base_groups, &cand_groups, settings);
    let base_pooled = base_groups.concat();
    let cand_pooled = cand_groups.concat();
    let test = stats::mann_whitney_u(&base_pooled, &cand_pooled);
    c.p_value = test.map(|t| t.p_value);
    if let Some(iv) = interval {
        c.ratio = Some(iv.ratio);
        c.ci_low = Some(iv.low);
        c.ci_high = Some(iv.high);
    }
    c.verdict = match (interval, c.p_value) {
        (Some(iv), Some(p)) => decide(iv.low, iv.high, p, opts.threshold, opts.alpha),
        _ => {
            notes.push("no positive median to compare".to_string());
            Verdict::Noisy
        }
    };
    // Not significant, and could not have been: samples that do not overlap at all give this p.
    // (Ties can push p a little lower; a result that is significant is decided as usual.)
    let min_p = stats::mann_whitney_min_p_value(base.n_samples, cand.n_samples);
    let significant = c.p_value.is_some_and(|p| p < opts.alpha);
    // (Only a verdict the test decided: "no positive median" is noisy whatever the sample count.)
    if c.verdict == Verdict::Noisy
        && interval.is_some()
        && c.p_value.is_some()
        && !significant
        && min_p >= opts.alpha
    {
        c.verdict = Verdict::Underpowered;
        notes.insert(
            0,
            format!(
                "too few samples for alpha {} ({counts}, need {needed} per side): smallest \
                 possible p {min_p:.1e}",
                opts.alpha
            ),
        );
    }
    c.note = notes.join("; ");
    Some(c)
}

/// Fewest samples per side (equal on both sides) that can give a verdict other than
/// `underpowered` at `alpha`: the U test's power floor, and never below the hard floor
/// [`MIN_SAMPLES_PER_SIDE`].
pub fn samples_needed_per_side(alpha: f64) -> usize {
    stats::mann_whitney_samples_needed(alpha).max(MIN_SAMPLES_PER_SIDE)
}

/// The decision rule on an interval of the ratio candidate/baseline and a p-value.
pub fn decide(ci_low: f64, ci_high: f64, p_value: f64, threshold: f64, alpha: f64) -> Verdict {
    let significant = p_value < alpha;
    if significant && ci_low > 1.0 + threshold {
        Verdict::Regression
    } else if significant && ci_high < 1.0 - threshold {
        Verdict::Improvement
    } else if ci_low >= 1.0 - threshold && ci_high <= 1.0 + threshold {
        Verdict::Unchanged
    } else {
        Verdict::Noisy
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis::fixtures::{case, noisy_samples, record, record_case, write_run, Gpu};
    use decodebench_kernels::KernelMeasurement;

    fn opts(base: &tempfile::TempDir, cand: &tempfile::TempDir) -> CompareOptions {
        CompareOptions::new(base.path(), cand.path())
    }

    fn find(out: &CompareOutcome, batch: u32, kernel: KernelKind) -> &Comparison {
        out.comparisons
            .iter()
            .find(|c| c.case.batch_size == batch && c.kernel == kernel)
            .unwrap_or_else(|| panic!("no comparison for batch {batch} {kernel:?}"))
    }

    #[test]
    fn analysis_decision_rule() {
        assert_eq!(decide(1.05, 1.15, 1e-6, 0.03, 0.01), Verdict::Regression);
        assert_eq!(decide(1.05, 1.15, 0.02, 0.03, 0.01), Verdict::Noisy);
        assert_eq!(decide(1.02, 1.15, 1e-6, 0.03, 0.01), Verdict::Noisy);
        assert_eq!(decide(0.85, 0.95, 1e-6, 0.03, 0.01), Verdict::Improvement);
        assert_eq!(decide(0.98, 1.02, 0.5, 0.03, 0.01), Verdict::Unchanged);
        // Significant but small: still unchanged.
        assert_eq!(decide(1.01, 1.02, 1e-9, 0.03, 0.01), Verdict::Unchanged);
        assert_eq!(decide(0.90, 1.10, 0.5, 0.03, 0.01), Verdict::Noisy);
    }

    #[test]
    fn analysis_ten_percent_slowdown_with_tight_samples_is_a_regression() {
        let gpu = Gpu::h100(0);
        let base_opt = noisy_samples(1, 20, 1.00, 0.005);
        let cand_opt = noisy_samples(2, 20, 1.10, 0.005);
        let base_ref = noisy_samples(3, 20, 2.00, 0.01);
        let cand_ref = noisy_samples(4, 20, 2.00, 0.01);
        let base = write_run(&[record(&gpu, 4, 1024, &base_opt, &base_ref)]);
        let cand = write_run(&[record(&gpu, 4, 1024, &cand_opt, &cand_ref)]);
        let mut o = opts(&base, &cand);
        o.fail_on_regression = true;
        let out = compare(&o).unwrap();
        let opt = find(&out, 4, KernelKind::Optimized);
        assert_eq!(opt.verdict, Verdict::Regression, "{opt:?}");
        assert!(
            opt.ci_low.unwrap() > 1.03 && opt.ci_high.unwrap() < 1.2,
            "{opt:?}"
        );
        assert!(opt.p_value.unwrap() < 1e-6);
        let baseline = find(&out, 4, KernelKind::Baseline);
        assert_ne!(baseline.verdict, Verdict::Regression, "{baseline:?}");
        assert_eq!(out.summary.regressions, 1);
        assert_eq!(out.regressions().len(), 1);
        assert_eq!(
            out.comparisons[0].verdict,
            Verdict::Regression,
            "worst first"
        );
        assert_eq!(out.exit_code(), EXIT_REGRESSION);
        o.fail_on_regression = false;
        assert_eq!(compare(&o).unwrap().exit_code(), 0);

        // The mirror image is an improvement.
        let swapped = compare(&CompareOptions::new(cand.path(), base.path())).unwrap();
        assert_eq!(
            find(&swapped, 4, KernelKind::Optimized).verdict,
            Verdict::Improvement
        );
    }

    #[test]
    fn analysis_same_noisy_distribution_is_never_a_regression() {
        // Two runs drawn from one noisy distribution (5 % relative spread), on many cases and four
        // GPUs: no comparison may come out as a regression or an improvement.
        let gpus: Vec<Gpu> = (0..4).map(Gpu::h100).collect();
        let mut base = Vec::new();
        let mut cand = Vec::new();
        for (g, gpu) in gpus.iter().enumerate() {
            for (i, batch) in [1u32, 4, 8, 16, 32, 64, 128, 256].into_iter().enumerate() {
                let seed = (g * 100 + i) as u64;
                let mean = 0.05 * f64::from(batch);
                base.push(record(
                    gpu,
                    batch,
                    1024,
                    &noisy_samples(seed, 20, mean, 0.05 * mean),
                    &noisy_samples(seed + 1000, 20, 2.0 * mean, 0.1 * mean),
                ));
                cand.push(record(
                    gpu,
                    batch,
                    1024,
                    &noisy_samples(seed + 5000, 20, mean, 0.05 * mean),
                    &noisy_samples(seed + 6000, 20, 2.0 * mean, 0.1 * mean),
                ));
            }
        }
        let (b, c) = (write_run(&base), write_run(&cand));
        let out = compare(&opts(&b, &c)).unwrap();
        assert_eq!(out.comparisons.len(), 16, "8 cases x 2 kernels, one SKU");
        for cmp in &out.comparisons {
            assert!(
                matches!(cmp.verdict, Verdict::Unchanged | Verdict::Noisy),
                "{cmp:?}"
            );
            assert_eq!(cmp.candidate.as_ref().unwrap().gpus.len(), 4);
            assert_eq!(cmp.candidate.as_ref().unwrap().n_samples, 80);
        }
        assert_eq!(out.summary.regressions, 0);
        assert_eq!(out.summary.unchanged + out.summary.noisy, 16);
        assert!(
            out.summary.unchanged > 0,
            "80 samples a side pin most medians"
        );
    }

    /// One GPU per side, optimized kernel only: `n_base` and `n_cand` samples around 1 ms and
    /// `shift` ms more in the candidate, 2 % spread.
    fn shifted_runs(
        n_base: usize,
        n_cand: usize,
        shift: f64,
    ) -> (tempfile::TempDir, tempfile::TempDir, CompareOptions) {
        let gpu = Gpu::h100(0);
        let base_opt = noisy_samples(11, n_base, 1.0, 0.02);
        let cand_opt = noisy_samples(12, n_cand, 1.0 + shift, 0.02 * (1.0 + shift));
        let reference = noisy_samples(13, 20, 2.0, 0.01);
        let base = write_run(&[record(&gpu, 4, 1024, &base_opt, &reference)]);
        let cand = write_run(&[record(&gpu, 4, 1024, &cand_opt, &reference)]);
        let mut o = opts(&base, &cand);
        o.kernels = KernelSelection::Optimized;
        o.fail_on_regression = true;
        (base, cand, o)
    }

    fn render(out: &CompareOutcome, format: OutputFormat) -> String {
        let mut buf = Vec::new();
        out.write(&mut buf, format).unwrap();
        String::from_utf8(buf).unwrap()
    }

    #[test]
    fn analysis_power_five_against_five_is_underpowered_not_noisy() {
        // A 90 % slowdown, plain as day, but 5 against 5 samples cannot reach p < 0.01: the
        // separated samples' p is the test's floor, 0.0122.
        let (_b, _c, o) = shifted_runs(5, 5, 0.9);
        let out = compare(&o).unwrap();
        let c = find(&out, 4, KernelKind::Optimized);
        assert_eq!(c.verdict, Verdict::Underpowered, "{c:?}");
        assert!(
            c.ci_low.unwrap() > 1.03,
            "the interval is beyond the threshold: {c:?}"
        );
        assert!((c.p_value.unwrap() - 0.012_185_780).abs() < 1e-7, "{c:?}");
        assert_eq!(
            c.note,
            "too few samples for alpha 0.01 (5/5, need 6 per side): smallest possible p 1.2e-2"
        );
        assert_eq!(out.samples_needed_per_side, 6);
        let s = out.summary;
        assert_eq!(
            (s.underpowered, s.noisy, s.unchanged, s.regressions),
            (1, 0, 0, 0)
        );
        assert_eq!(
            out.exit_code(),
            EXIT_UNCHECKED,
            "not a regression, but nothing could be decided: the gate fails closed"
        );
        let unchecked = out.unchecked().expect("why the gate failed");
        assert!(
            unchecked.contains("none of the 1 comparisons could be decided: 1 underpowered")
                && unchecked.contains("--trials 6"),
            "{unchecked}"
        );
        let warning = out.power_warning().expect("a warning");
        assert!(
            warning.starts_with(
                "warning: 1 of 1 comparisons are underpowered: with alpha 0.01 the U test needs \
                 at least 6 samples on each side"
            ),
            "{warning}"
        );
        assert!(
            warning.contains("Rerun with --trials 6 or more, or raise --alpha."),
            "{warning}"
        );

        // The table starts with the row and ends with the summary and the warning.
        let text = render(&out, OutputFormat::Table);
        assert!(text.starts_with("verdict"), "{text}");
        assert!(
            text.lines().nth(1).unwrap().starts_with("underpowered"),
            "{text}"
        );
        let mut tail = text.lines().rev();
        assert_eq!(tail.next(), Some(warning.as_str()));
        let summary = tail.next().unwrap();
        assert!(
            summary.contains("0 noisy, 1 underpowered, 0 not timed"),
            "{summary}"
        );
        let json: serde_json::Value =
            serde_json::from_str(&render(&out, OutputFormat::Json)).unwrap();
        assert_eq!(json["comparisons"][0]["verdict"], "underpowered");
        assert_eq!(json["summary"]["underpowered"], 1);
        assert_eq!(json["samples_needed_per_side"], 6);
        let csv = render(&out, OutputFormat::Csv);
        assert!(
            csv.lines().nth(1).unwrap().starts_with("underpowered,"),
            "{csv}"
        );

        // The mirror image (a 47 % speed-up) is underpowered too.
        let swapped = compare(&CompareOptions::new(
            o.candidate.clone(),
            o.baseline.clone(),
        ))
        .unwrap();
        assert_eq!(
            find(&swapped, 4, KernelKind::Optimized).verdict,
            Verdict::Underpowered
        );

        // At alpha 0.05 five a side are enough (the floor is 4): the same data is a regression.
        let mut loose = o.clone();
        loose.alpha = 0.05;
        let out = compare(&loose).unwrap();
        assert_eq!(
            find(&out, 4, KernelKind::Optimized).verdict,
            Verdict::Regression
        );
        assert_eq!(out.samples_needed_per_side, 4);
        assert_eq!(out.power_warning(), None);
        assert_eq!(out.exit_code(), EXIT_REGRESSION);
    }

    #[test]
    fn analysis_power_ten_against_ten_is_a_regression() {
        let (_b, _c, o) = shifted_runs(10, 10, 0.9);
        let out = compare(&o).unwrap();
        let c = find(&out, 4, KernelKind::Optimized);
        assert_eq!(c.verdict, Verdict::Regression, "{c:?}");
        assert!(c.p_value.unwrap() < 1e-3, "{c:?}");
        assert_eq!(c.note, "");
        assert_eq!(out.summary.underpowered, 0);
        assert_eq!(out.power_warning(), None);
        assert_eq!(out.exit_code(), EXIT_REGRESSION);
        let text = render(&out, OutputFormat::Table);
        assert!(text.trim_end().ends_with("% intervals)"), "{text}");
        // Uneven sides are judged by their own floor: 5 against 20 can reach 0.00077.
        let (_b, _c, o) = shifted_runs(5, 20, 0.9);
        assert_eq!(
            find(&compare(&o).unwrap(), 4, KernelKind::Optimized).verdict,
            Verdict::Regression
        );
    }

    #[test]
    fn analysis_power_few_samples_can_still_be_unchanged() {
        // The interval alone shows "unchanged"; no test is needed for that, so it is not
        // underpowered (and no warning is printed).
        let (_b, _c, o) = shifted_runs(5, 5, 0.0);
        let mut o = o;
        o.threshold = 0.2;
        let out = compare(&o).unwrap();
        let c = find(&out, 4, KernelKind::Optimized);
        assert_eq!(c.verdict, Verdict::Unchanged, "{c:?}");
        assert_eq!(out.power_warning(), None);
    }

    #[test]
    fn analysis_power_below_the_hard_floor_is_underpowered() {
        let (_b, _c, o) = shifted_runs(2, 2, 0.9);
        let out = compare(&o).unwrap();
        let c = find(&out, 4, KernelKind::Optimized);
        assert_eq!(c.verdict, Verdict::Underpowered, "{c:?}");
        assert_eq!(
            c.note,
            "too few samples (2/2, need 6 per side): no interval below 3"
        );
        assert_eq!((c.ci_low, c.p_value), (None, None));
        assert!(out.power_warning().unwrap().contains("1 of 1 comparisons"));
        // The hard floor holds even where alpha would allow fewer.
        let mut loose = o.clone();
        loose.alpha = 0.5;
        let out = compare(&loose).unwrap();
        assert_eq!(out.samples_needed_per_side, MIN_SAMPLES_PER_SIDE);
        assert_eq!(
            find(&out, 4, KernelKind::Optimized).note,
            "too few samples (2/2, need 3 per side): no interval below 3"
        );
    }

    #[test]
    fn analysis_power_tied_samples_are_decided_as_usual() {
        // Ties shrink the U test's variance: 5 equal values against 5 others give p = 0.004,
        // below 0.01, so the floor for untied samples does not apply and it is a regression.
        let gpu = Gpu::h100(0);
        let reference = noisy_samples(13, 20, 2.0, 0.01);
        let b = write_run(&[record(&gpu, 4, 1024, &[1.0; 5], &reference)]);
        let c = write_run(&[record(&gpu, 4, 1024, &[1.9; 5], &reference)]);
        let mut o = opts(&b, &c);
        o.kernels = KernelSelection::Optimized;
        let out = compare(&o).unwrap();
        let c = find(&out, 4, KernelKind::Optimized);
        assert!(c.p_value.unwrap() < 0.01, "{c:?}");
        assert_eq!(c.verdict, Verdict::Regression, "{c:?}");
    }

    #[test]
    fn analysis_status_changes_missing_and_new_cases() {
        let gpu = Gpu::h100(0);
        let tight = |seed: u64| noisy_samples(seed, 20, 1.0, 0.005);
        let base = vec![
            record(&gpu, 1, 1024, &tight(1), &tight(2)),
            record(&gpu, 4, 1024, &tight(3), &tight(4)),
            record(&gpu, 8, 1024, &tight(5), &tight(6)),
        ];
        let mut broken = record(&gpu, 1, 1024, &[], &tight(8));
        broken.measurement.kernels[1] = KernelMeasurement::not_timed(
            KernelKind::Optimized,
            Status::WrongResult,
            "max abs err 0.5 > tolerance 0.05",
        );
        let mut hot = record(&gpu, 4, 1024, &tight(9), &tight(10));
        hot.measurement.kernels[1].throttled = true;
        let cand = vec![broken, hot, record(&gpu, 16, 1024, &tight(11), &tight(12))];
        let (b, c) = (write_run(&base), write_run(&cand));
        let mut o = opts(&b, &c);
        o.kernels = KernelSelection::Optimized;
        let out = compare(&o).unwrap();
        assert!(out
            .comparisons
            .iter()
            .all(|c| c.kernel == KernelKind::Optimized));
        let broken = find(&out, 1, KernelKind::Optimized);
        assert_eq!(broken.verdict, Verdict::StatusRegression);
        assert!(
            broken.note.starts_with("ok -> wrong_result: max abs err"),
            "{}",
            broken.note
        );
        assert_eq!(
            out.comparisons[0].verdict,
            Verdict::StatusRegression,
            "worst first"
        );
        let hot = find(&out, 4, KernelKind::Optimized);
        assert!(
            hot.throttled && hot.note.contains("throttled (candidate)"),
            "{hot:?}"
        );
        assert_eq!(
            find(&out, 8, KernelKind::Optimized).verdict,
            Verdict::Missing
        );
        assert_eq!(find(&out, 16, KernelKind::Optimized).verdict, Verdict::New);
        let s = out.summary;
        assert_eq!(
            (s.regressions, s.status_regressions, s.missing, s.new),
            (1, 1, 1, 1)
        );
        assert_eq!(s.throttled, 1);

        // And back: wrong_result -> ok is a fix, not a regression.
        let back = compare(&CompareOptions::new(c.path(), b.path())).unwrap();
        assert_eq!(
            find(&back, 1, KernelKind::Optimized).verdict,
            Verdict::StatusFixed
        );
        assert_eq!(back.summary.regressions, 0);
    }

    #[test]
    fn analysis_compare_is_deterministic_and_renders_every_format() {
        let gpu = Gpu::h100(0);
        let b = write_run(&[record(
            &gpu,
            4,
            1024,
            &noisy_samples(1, 20, 1.0, 0.05),
            &noisy_samples(2, 20, 2.0, 0.05),
        )]);
        let c = write_run(&[record(
            &gpu,
            4,
            1024,
            &noisy_samples(3, 20, 1.04, 0.05),
            &noisy_samples(4, 20, 2.0, 0.05),
        )]);
        let first = compare(&opts(&b, &c)).unwrap();
        let again = compare(&opts(&b, &c)).unwrap();
        assert_eq!(first, again);

        let render = |f: OutputFormat| {
            let mut out = Vec::new();
            first.write(&mut out, f).unwrap();
            String::from_utf8(out).unwrap()
        };
        let text = render(OutputFormat::Table);
        assert!(text.starts_with("verdict"), "{text}");
        assert!(
            text.contains("b4 s1024 fp8/fp8/bf16 HND blk16 shared"),
            "{text}"
        );
        assert!(text.trim_end().ends_with("% intervals)"), "{text}");
        let csv = render(OutputFormat::Csv);
        let mut reader = csv::Reader::from_reader(csv.as_bytes());
        let headers = reader.headers().unwrap().clone();
        assert!(headers.iter().any(|h| h == "case_id"));
        assert_eq!(reader.records().count(), 2);
        let json: serde_json::Value = serde_json::from_str(&render(OutputFormat::Json)).unwrap();
        assert_eq!(json["comparisons"].as_array().unwrap().len(), 2);
        assert_eq!(json["summary"]["regressions"], 0);
        assert_eq!(json["comparisons"][0]["case"]["quant"], "fp8/fp8/bf16");
    }

    #[test]
    fn analysis_compare_rejects_bad_options() {
        let mut o = CompareOptions::new("a", "b");
        o.threshold = 1.5;
        assert!(o
            .validate()
            .unwrap_err()
            .to_string()
            .contains("--threshold"));
        let mut o = CompareOptions::new("a", "b");
        o.alpha = 0.0;
        assert!(o.validate().unwrap_err().to_string().contains("--alpha"));
        let mut o = CompareOptions::new("a", "b");
        o.resamples = 10;
        assert!(o
            .validate()
            .unwrap_err()
            .to_string()
            .contains("--resamples"));
    }

    /// A run of fp8 cases at these batch sizes on `gpu`, optimized around 1 ms and baseline around
    /// 2 ms, 20 tight samples each.
    fn run_of(gpu: &Gpu, batches: &[u32], seed: u64) -> tempfile::TempDir {
        let records: Vec<_> = batches
            .iter()
            .enumerate()
            .map(|(i, &b)| {
                let s = seed + 10 * i as u64;
                record(
                    gpu,
                    b,
                    1024,
                    &noisy_samples(s, 20, 1.0, 0.005),
                    &noisy_samples(s + 1, 20, 2.0, 0.01),
                )
            })
            .collect();
        write_run(&records)
    }

    fn nothing_compared(o: &CompareOptions) -> String {
        match compare(o) {
            Err(e @ AnalysisError::NothingCompared(_)) => e.to_string(),
            other => panic!("expected NothingCompared, got {other:?}"),
        }
    }

    #[test]
    fn analysis_gate_runs_that_share_no_case_are_an_error_naming_what_differs() {
        let gpu = Gpu::h100(0);
        // Other batch sizes: the grid differs.
        let (b, c) = (run_of(&gpu, &[1, 4], 1), run_of(&gpu, &[8, 16], 2));
        let mut o = opts(&b, &c);
        o.fail_on_regression = true;
        let e = nothing_compared(&o);
        assert!(e.starts_with("nothing was compared"), "{e}");
        assert!(e.contains("2 cases"), "{e}");
        assert!(
            e.contains("batch_size differs: baseline 1, 4; candidate 16, 8"),
            "{e}"
        );
        assert!(
            e.contains("run the candidate with the baseline's grid file"),
            "{e}"
        );
        assert!(!e.contains("device_sku differs"), "{e}");

        // Another GPU model.
        let h200 = Gpu {
            sku: "NVIDIA H200".to_string(),
            ..Gpu::h100(1)
        };
        let c = run_of(&h200, &[1, 4], 3);
        let e = nothing_compared(&opts(&b, &c));
        assert!(
            e.contains("device_sku differs: baseline NVIDIA H100 80GB HBM3; candidate NVIDIA H200"),
            "{e}"
        );
        assert!(e.contains("same GPU model"), "{e}");
        assert!(!e.contains("batch_size differs"), "{e}");

        // The same shapes timed with another method: the case ids differ through `trials`.
        let mut seven = case(1, 1024, decodebench_kernels::QuantMode::FP8_QKV);
        seven.method.trials = 7;
        let seven = seven.with_id();
        let c = write_run(&[record_case(&gpu, seven, &[1.0; 20], &[2.0; 20])]);
        let b1 = run_of(&gpu, &[1], 4);
        let e = nothing_compared(&opts(&b1, &c));
        assert!(
            e.contains("trials differs: baseline 20; candidate 7"),
            "{e}"
        );
        assert!(e.contains("measurement method differs"), "{e}");

        // A kernel selection that leaves one side empty says so.
        let mut only_baseline = record(&gpu, 1, 1024, &[1.0; 20], &[2.0; 20]);
        only_baseline.measurement.kernels.truncate(1);
        assert_eq!(
            only_baseline.measurement.kernels[0].kernel,
            Some(KernelKind::Baseline)
        );
        let c = write_run(&[only_baseline]);
        let mut o = opts(&b1, &c);
        o.kernels = KernelSelection::Optimized;
        let e = nothing_compared(&o);
        assert!(
            e.contains("--kernel optimized leaves nothing of the candidate, which timed baseline"),
            "{e}"
        );
    }

    #[test]
    fn analysis_gate_fails_on_missing_cases_unless_allowed() {
        let gpu = Gpu::h100(0);
        let b = run_of(&gpu, &[1, 4, 8], 1);
        let c = run_of(&gpu, &[1], 1);
        let mut o = opts(&b, &c);
        o.fail_on_regression = true;
        let out = compare(&o).unwrap();
        assert_eq!(out.summary.missing, 4, "2 cases x 2 kernels");
        assert_eq!(out.summary.regressions, 0);
        assert_eq!(out.exit_code(), EXIT_UNCHECKED);
        let why = out.unchecked().unwrap();
        assert!(
            why.contains("4 of 6 baseline comparisons are missing from the candidate"),
            "{why}"
        );
        let warning = out.missing_warning().unwrap();
        assert!(
            warning.starts_with("warning: 4 of 6 baseline comparisons are not in the candidate"),
            "{warning}"
        );
        assert!(warning.contains("NVIDIA H100 80GB HBM3"), "{warning}");
        assert!(warning.contains("b4 s1024"), "{warning}");
        assert!(warning.contains("fail the gate (exit 5)"), "{warning}");
        let text = render(&out, OutputFormat::Table);
        assert!(text.contains(&warning), "{text}");

        o.allow_missing = true;
        let out = compare(&o).unwrap();
        assert_eq!(out.exit_code(), 0);
        assert_eq!(out.unchecked(), None);
        assert!(out.missing_warning().unwrap().contains("--allow-missing"));

        // Without the gate nothing fails, but the warning is still there.
        o.fail_on_regression = false;
        o.allow_missing = false;
        let out = compare(&o).unwrap();
        assert_eq!(out.exit_code(), 0);
        assert!(out.missing_warning().is_some());

        // A regression outranks missing cases: exit 4, not 5.
        let slow = write_run(&[record(
            &gpu,
            1,
            1024,
            &noisy_samples(50, 20, 1.5, 0.005),
            &noisy_samples(51, 20, 2.0, 0.01),
        )]);
        let mut o = opts(&b, &slow);
        o.fail_on_regression = true;
        assert_eq!(compare(&o).unwrap().exit_code(), EXIT_REGRESSION);
    }

    #[test]
    fn analysis_gate_fails_when_nothing_was_timed_on_either_side() {
        let gpu = Gpu::h100(0);
        let failed = || write_run(&[record(&gpu, 1, 1024, &[], &[])]);
        let (b, c) = (failed(), failed());
        let mut o = opts(&b, &c);
        o.fail_on_regression = true;
        let out = compare(&o).unwrap();
        assert_eq!(out.summary.not_timed, 2);
        assert_eq!(out.exit_code(), EXIT_UNCHECKED);
        assert!(
            out.unchecked()
                .unwrap()
                .contains("2 not timed ok on either side"),
            "{:?}",
            out.unchecked()
        );
        // One decided comparison is enough for the gate to pass.
        let (good, again) = (run_of(&gpu, &[1], 7), run_of(&gpu, &[1], 7));
        let mut o = opts(&good, &again);
        o.fail_on_regression = true;
        let out = compare(&o).unwrap();
        assert_eq!(out.summary.decided(), 2, "{:?}", out.summary);
        assert_eq!(out.exit_code(), 0);
    }

    #[test]
    fn analysis_compare_refuses_one_file_for_both_sides_and_notes_a_copy() {
        let gpu = Gpu::h100(0);
        let b = run_of(&gpu, &[1], 1);
        let e = compare(&opts(&b, &b)).unwrap_err();
        assert!(matches!(e, AnalysisError::SameFile { .. }), "{e}");
        assert!(
            e.to_string()
                .contains("both the baseline and the candidate"),
            "{e}"
        );
        // The directory and its file are one file too.
        let o = CompareOptions::new(b.path(), b.path().join(crate::sink::PARQUET_FILE_NAME));
        assert!(matches!(compare(&o), Err(AnalysisError::SameFile { .. })));

        // A copy compares (unchanged), with a warning that it is the same run.
        let copy = tempfile::tempdir().unwrap();
        std::fs::copy(
            b.path().join(crate::sink::PARQUET_FILE_NAME),
            copy.path().join(crate::sink::PARQUET_FILE_NAME),
        )
        .unwrap();
        let (out, notes) = load_and_compare(&opts(&b, &copy)).unwrap();
        assert_eq!(out.summary.unchanged, 2);
        assert!(
            notes.iter().any(|n| n.starts_with(
                "warning: the baseline and the candidate hold the same run (run-test-"
            )),
            "{notes:?}"
        );
        let other = run_of(&gpu, &[1], 2);
        let (_, notes) = load_and_compare(&opts(&b, &other)).unwrap();
        assert!(notes.is_empty(), "{notes:?}");
    }

    /// Fleet-scale timing, a benchmark rather than a check (bench/RESULTS.md): `cargo test
    /// --release -p decodebench-coordinator --lib fleet_scale -- --ignored --nocapture`, with
    /// GPUS, CASES and SAMPLES (per GPU and kernel) from the environment.
    #[test]
    #[ignore]
    fn fleet_scale_compare_time() {
        let env = |k: &str, d: usize| {
            std::env::var(k)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(d)
        };
        let (gpus, cases, samples) = (env("GPUS", 64), env("CASES", 400), env("SAMPLES", 50));
        let mk = |shift: f64| {
            let mut recs = Vec::new();
            for g in 0..gpus {
                let gpu = Gpu::h100(g);
                for i in 0..cases {
                    let c = case(
                        1 + (i / 20) as u32,
                        1024 * (1 + (i % 20) as u32),
                        decodebench_kernels::QuantMode::FP8_QKV,
                    );
                    let seed = (g * 100_000 + i) as u64 + (shift * 1000.0) as u64;
                    recs.push(record_case(
                        &gpu,
                        c,
                        &noisy_samples(seed, samples, 1.0 + shift, 0.02),
                        &noisy_samples(seed + 7, samples, 2.0, 0.04),
                    ));
                }
            }
            write_run(&recs)
        };
        let t = std::time::Instant::now();
        let (a, b) = (mk(0.0), mk(0.01));
        eprintln!("write: {:.1} s", t.elapsed().as_secs_f64());
        let t = std::time::Instant::now();
        let out = compare(&opts(&a, &b)).unwrap();
        let total = t.elapsed().as_secs_f64();
        eprintln!(
            "compare {gpus} gpus x {cases} cases x {samples} samples: {total:.1} s, {} comparisons",
            out.comparisons.len()
        );
        // Where the time goes: reading both files (timed again here), the rest is comparing.
        let t = std::time::Instant::now();
        let o = opts(&a, &b);
        for side in [&o.baseline, &o.candidate] {
            load_results(&results_file(side).unwrap()).unwrap();
        }
        let load = t.elapsed().as_secs_f64();
        eprintln!(
            "  of which loading both files {load:.1} s, comparing {:.1} s",
            total - load
        );
        // A digest of every verdict, interval and p-value (exact: `{:?}` prints f64s round-trip),
        // so a change to the bootstrap can show it left the output bit-identical; DUMP=FILE
        // writes the lines themselves.
        let lines: Vec<String> = out
            .comparisons
            .iter()
            .map(|c| {
                format!(
                    "{} {} {} {} {:?} {:?} {:?} {:?}",
                    c.case_id,
                    c.kernel.as_str(),
                    c.sku,
                    c.verdict.as_str(),
                    c.ratio,
                    c.ci_low,
                    c.ci_high,
                    c.p_value
                )
            })
            .collect();
        let text = lines.join("\n");
        eprintln!("  output digest {:016x}", stats::fnv1a(text.as_bytes()));
        if let Ok(path) = std::env::var("DUMP") {
            std::fs::write(path, text + "\n").unwrap();
        }
        // One comparison per (case, kernel, SKU): every GPU's samples pooled into it.
        assert_eq!(out.comparisons.len(), cases * 2);
    }
}
