//! `decodebench report`: one run, seen per GPU or per SKU, plus the headline speedup table.
//!
//! The per-GPU view is the slow-card finder. Identical cards differ (memory clocks, cooling,
//! power limits, a bad HBM stack), and a fleet benchmark is only as good as its worst card. A
//! card's relative time says how much slower it is than its SKU's typical card (1.05 = 5 %
//! slower, 1.00 = typical). For each (case, kernel) every GPU's median time is divided by the
//! median of the per-GPU medians of its SKU, and the geometric mean of those ratios over a GPU's
//! cases is its raw score. Raw scores are then divided by the median raw score of the SKU's cards,
//! so the SKU's median card reads exactly 1: the per-case median alone is pulled towards a slow
//! card whenever the count of cards is even (with four cards it is the mean of the middle two),
//! which made every normal card read a little fast and the slow card a little less slow. The
//! headline table is the reference script's comparison: the optimized
//! kernel against the baseline per (quant mode, batch, max_seq_len), as a geometric mean over
//! the GPUs.

use super::load::{load_results, LoadedResults, ResultRow};
use super::render::{CellStyle, Table};
use super::stats;
use super::{AnalysisError, GroupBy, OutputFormat};
use decodebench_kernels::{KernelKind, QuantMode, Status};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::path::PathBuf;

/// Default relative time above which a GPU is flagged slow: 3 %, the same bar `compare` uses
/// for a regression, so a card flagged here is one that would fail a comparison on its own.
pub const DEFAULT_SLOW_THRESHOLD: f64 = 0.03;

/// What `report` reads and how it groups.
#[derive(Debug, Clone, PartialEq)]
pub struct ReportOptions {
    /// A run's output directory or its `results.parquet`.
    pub dir: PathBuf,
    pub group_by: GroupBy,
    pub format: OutputFormat,
    /// Flag a GPU whose relative time exceeds 1 + this.
    pub slow_threshold: f64,
}

impl ReportOptions {
    /// Options with every default.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        ReportOptions {
            dir: dir.into(),
            group_by: GroupBy::Gpu,
            format: OutputFormat::Table,
            slow_threshold: DEFAULT_SLOW_THRESHOLD,
        }
    }

    pub fn validate(&self) -> Result<(), AnalysisError> {
        if !(self.slow_threshold >= 0.0 && self.slow_threshold.is_finite()) {
            return Err(AnalysisError::InvalidOption {
                option: "--slow-threshold",
                value: self.slow_threshold.to_string(),
                reason: "must be a non-negative fraction, e.g. 0.03 for 3 %",
            });
        }
        Ok(())
    }
}

/// One GPU or one SKU.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GroupReport {
    /// The GPU's UUID, or the SKU name.
    pub group: String,
    pub sku: String,
    /// The GPU's host; empty for a SKU.
    pub host: String,
    pub gpus: usize,
    /// Distinct cases with at least one row.
    pub cases: usize,
    /// (case, kernel) rows, and how they ended.
    pub rows: usize,
    pub ok: usize,
    pub wrong_result: usize,
    pub failed: usize,
    pub oom: usize,
    pub skipped: usize,
    /// Geometric mean of `bandwidth_fraction` over ok rows.
    pub bandwidth_fraction_geomean: Option<f64>,
    /// Time relative to the SKU's typical card: the geometric mean of the per-case ratios (GPU
    /// median / SKU median of GPU medians), divided by the SKU's median card's geometric mean, so
    /// 1.0 is a typical card and 1.05 is 5 % slower. For a SKU: over all its GPUs' cases (near 1
    /// by construction).
    pub relative_time_geomean: Option<f64>,
    /// For a GPU: its fastest and slowest case relative to its peers. For a SKU: the fastest and
    /// slowest GPU's relative time (the card-to-card spread).
    pub relative_time_min: Option<f64>,
    pub relative_time_max: Option<f64>,
    /// (case, kernel) pairs behind the relative time (those run on at least two GPUs of the SKU).
    pub relative_cases: usize,
    /// GPUs whose relative time exceeds 1 + the slow threshold (0 or 1 for a GPU).
    pub slow_gpus: usize,
    /// Share of rows with telemetry that saw a thermal or power throttle.
    pub throttled_share: Option<f64>,
    /// Mean board power over ok rows, W.
    pub power_avg_w_mean: Option<f64>,
    /// Geometric mean of the energy per call over ok rows, J (geometric: cases span orders of
    /// magnitude, and an arithmetic mean would be the largest case's figure).
    pub energy_per_call_j_geomean: Option<f64>,
}

/// Optimized against baseline for one (quant mode, batch, max_seq_len).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HeadlineRow {
    #[serde(serialize_with = "serialize_quant")]
    pub quant: QuantMode,
    pub batch_size: u32,
    pub max_seq_len: u32,
    /// (case, GPU) pairs where both kernels were timed ok.
    pub pairs: usize,
    pub gpus: usize,
    /// Geometric means over the pairs of each kernel's median time, ms.
    pub optimized_ms: Option<f64>,
    pub baseline_ms: Option<f64>,
    /// Geometric mean of baseline / optimized medians (2.0 = twice as fast).
    pub speedup: Option<f64>,
    pub speedup_min: Option<f64>,
    pub speedup_max: Option<f64>,
    /// The reference script's `speedup_percent`: (baseline - optimized) / baseline, a fraction,
    /// from the geometric-mean speedup.
    pub speedup_fraction: Option<f64>,
}

fn serialize_quant<S: serde::Serializer>(q: &QuantMode, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(q)
}

/// Everything `report` found.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReportOutcome {
    pub source: PathBuf,
    pub group_by: GroupBy,
    pub slow_threshold: f64,
    pub groups: Vec<GroupReport>,
    pub headline: Vec<HeadlineRow>,
    /// UUIDs of the GPUs flagged slow, slowest first, with their relative time.
    pub slow_gpus: Vec<(String, f64)>,
    /// SKUs whose cards could not be scored: no case was timed ok on two or more of its GPUs
    /// (one GPU, or `--placement per-sku`), so the slow-card finder did not look at them.
    pub skus_without_peers: Vec<String>,
}

impl ReportOutcome {
    /// The per-GPU or per-SKU table.
    pub fn groups_table(&self, style: CellStyle) -> Table {
        let gpu_mode = self.group_by == GroupBy::Gpu;
        let mut headers = vec![if gpu_mode { "gpu" } else { "sku" }];
        if gpu_mode {
            headers.extend(["sku", "host"]);
        } else {
            headers.push("gpus");
        }
        headers.extend([
            "cases", "ok", "wrong", "failed", "oom", "skipped", "bw_frac", "rel_time", "rel_min",
            "rel_max", "rel_n",
        ]);
        headers.push(if gpu_mode { "slow" } else { "slow_gpus" });
        headers.extend(["throttled", "power_w", "energy_j"]);
        let rows = self
            .groups
            .iter()
            .map(|g| {
                let mut row = vec![g.group.clone()];
                if gpu_mode {
                    row.extend([g.sku.clone(), g.host.clone()]);
                } else {
                    row.push(g.gpus.to_string());
                }
                row.extend([
                    g.cases.to_string(),
                    g.ok.to_string(),
                    g.wrong_result.to_string(),
                    g.failed.to_string(),
                    g.oom.to_string(),
                    g.skipped.to_string(),
                    style.number(g.bandwidth_fraction_geomean, 3),
                    style.number(g.relative_time_geomean, 3),
                    style.number(g.relative_time_min, 3),
                    style.number(g.relative_time_max, 3),
                    g.relative_cases.to_string(),
                ]);
                row.push(match (gpu_mode, style) {
                    (true, CellStyle::Text) if g.slow_gpus > 0 => "SLOW".to_string(),
                    (true, CellStyle::Text) => String::new(),
                    (true, CellStyle::Csv) => (g.slow_gpus > 0).to_string(),
                    (false, _) => g.slow_gpus.to_string(),
                });
                row.extend([
                    match style {
                        CellStyle::Text => g
                            .throttled_share
                            .map_or("-".to_string(), |s| format!("{:.0}%", s * 100.0)),
                        CellStyle::Csv => style.number(g.throttled_share, 3),
                    },
                    style.number(g.power_avg_w_mean, 1),
                    match (g.energy_per_call_j_geomean, style) {
                        (Some(e), CellStyle::Text) => format!("{e:.3e}"),
                        (e, _) => style.number(e, 3),
                    },
                ]);
                row
            })
            .collect();
        Table { headers, rows }
    }

    /// The optimized-vs-baseline table.
    pub fn headline_table(&self, style: CellStyle) -> Table {
        let headers = vec![
            "quant",
            "batch_size",
            "max_seq_len",
            "pairs",
            "gpus",
            "optimized_ms",
            "baseline_ms",
            "speedup",
            "speedup_min",
            "speedup_max",
            "speedup_percent",
        ];
        let rows = self
            .headline
            .iter()
            .map(|h| {
                vec![
                    h.quant.to_string(),
                    h.batch_size.to_string(),
                    h.max_seq_len.to_string(),
                    h.pairs.to_string(),
                    h.gpus.to_string(),
                    style.number(h.optimized_ms, 4),
                    style.number(h.baseline_ms, 4),
                    style.number(h.speedup, 3),
                    style.number(h.speedup_min, 3),
                    style.number(h.speedup_max, 3),
                    style.percent(h.speedup_fraction),
                ]
            })
            .collect();
        Table { headers, rows }
    }

    /// Writes the report: in text and CSV the group table, a blank line, then the headline table;
    /// in JSON the whole outcome.
    pub fn write(&self, out: &mut dyn Write, format: OutputFormat) -> Result<(), AnalysisError> {
        match format {
            OutputFormat::Table => {
                let what = match self.group_by {
                    GroupBy::Gpu => "per GPU",
                    GroupBy::Sku => "per SKU",
                };
                writeln!(
                    out,
                    "{} ({what}; rel_time = time relative to the SKU's typical card, geomean over cases: 1.000 = typical)",
                    self.source.display()
                )?;
                self.groups_table(CellStyle::Text).write_text(out)?;
                writeln!(out)?;
                writeln!(
                    out,
                    "optimized vs baseline (speedup = baseline / optimized median, geomean over GPUs)"
                )?;
                self.headline_table(CellStyle::Text).write_text(out)?;
                writeln!(out)?;
                writeln!(out, "{}", self.slow_line())?;
            }
            OutputFormat::Csv => {
                self.groups_table(CellStyle::Csv).write_csv(out)?;
                writeln!(out)?;
                self.headline_table(CellStyle::Csv).write_csv(out)?;
            }
            OutputFormat::Json => {
                serde_json::to_writer_pretty(&mut *out, self)?;
                writeln!(out)?;
            }
        }
        Ok(())
    }

    /// "slow GPUs: none" or the flagged GPUs with how much slower they are, and the SKUs that
    /// could not be checked (so that "none" is never said of cards nobody looked at).
    pub fn slow_line(&self) -> String {
        let skus: BTreeSet<&str> = self.groups.iter().map(|g| g.sku.as_str()).collect();
        if !skus.is_empty() && self.skus_without_peers.len() == skus.len() {
            return "slow GPUs: not checked: no SKU has a case timed ok on two or more of its \
                    GPUs, so no card has peers to compare with (run the grid with --placement \
                    per-gpu to compare cards)"
                .to_string();
        }
        let mut line = if self.slow_gpus.is_empty() {
            format!(
                "slow GPUs: none above +{:.1} % of their SKU's typical card",
                self.slow_threshold * 100.0
            )
        } else {
            let list: Vec<String> = self
                .slow_gpus
                .iter()
                .map(|(uuid, rel)| format!("{uuid} ({:+.1} %)", (rel - 1.0) * 100.0))
                .collect();
            format!(
                "slow GPUs (above +{:.1} % of their SKU's typical card): {}",
                self.slow_threshold * 100.0,
                list.join(", ")
            )
        };
        if !self.skus_without_peers.is_empty() {
            line.push_str(&format!(
                "; not checked (no case on two or more GPUs): {}",
                self.skus_without_peers.join(", ")
            ));
        }
        line
    }
}

/// Loads a run and reports on it (prints nothing).
pub fn report(opts: &ReportOptions) -> Result<ReportOutcome, AnalysisError> {
    opts.validate()?;
    let loaded = load_results(&opts.dir)?;
    Ok(report_loaded(&loaded, opts))
}

/// `decodebench report`: reports, prints to stdout in `opts.format` (the slow-GPU line also to
/// stderr for CSV and JSON), and returns the outcome.
pub fn run_report(opts: &ReportOptions) -> Result<ReportOutcome, AnalysisError> {
    opts.validate()?;
    let loaded = load_results(&opts.dir)?;
    if loaded.duplicates_dropped > 0 {
        eprintln!(
            "note: {}: {} duplicate result rows (same case, kernel and GPU); kept the latest",
            loaded.path.display(),
            loaded.duplicates_dropped
        );
    }
    let outcome = report_loaded(&loaded, opts);
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    outcome.write(&mut out, opts.format)?;
    out.flush()?;
    if opts.format != OutputFormat::Table {
        eprintln!("{}", outcome.slow_line());
    }
    Ok(outcome)
}

/// Each GPU's relative times, centred on its SKU's typical card: for every (case, kernel) run on
/// two or more GPUs of a SKU, the GPU's median over the median of those GPUs' medians, divided by
/// the median over the SKU's GPUs of their geometric-mean ratio (so the median card's geometric
/// mean is 1; see the module documentation for why the per-case median alone is not enough).
fn relative_times(rows: &[ResultRow]) -> HashMap<String, Vec<f64>> {
    /// (case id, kernel, SKU).
    type CaseOnSku<'a> = (&'a str, KernelKind, &'a str);
    /// (GPU UUID, its median time).
    type GpuMedian<'a> = (&'a str, f64);
    let mut by_case: BTreeMap<CaseOnSku, Vec<GpuMedian>> = BTreeMap::new();
    for r in rows.iter().filter(|r| r.is_timed_ok()) {
        let (Some(kernel), Some(median)) = (r.kernel, r.median_time_ms()) else {
            continue;
        };
        by_case
            .entry((&r.case_id, kernel, &r.device_sku))
            .or_default()
            .push((&r.device_uuid, median));
    }
    let mut per_gpu: HashMap<String, Vec<f64>> = HashMap::new();
    for medians in by_case.values().filter(|m| m.len() >= 2) {
        let values: Vec<f64> = medians.iter().map(|m| m.1).collect();
        let Some(fleet) = stats::median(&values).filter(|m| *m > 0.0) else {
            continue;
        };
        for (uuid, m) in medians {
            per_gpu.entry(uuid.to_string()).or_default().push(m / fleet);
        }
    }
    let sku_of: HashMap<&str, &str> = rows
        .iter()
        .map(|r| (r.device_uuid.as_str(), r.device_sku.as_str()))
        .collect();
    let mut raw_scores: HashMap<&str, Vec<f64>> = HashMap::new();
    for (uuid, ratios) in &per_gpu {
        if let (Some(sku), Some(score)) = (sku_of.get(uuid.as_str()), stats::geometric_mean(ratios))
        {
            raw_scores.entry(sku).or_default().push(score);
        }
    }
    let typical: HashMap<&str, f64> = raw_scores
        .iter()
        .filter_map(|(sku, scores)| {
            let centre = stats::median(scores).filter(|c| c.is_finite() && *c > 0.0)?;
            Some((*sku, centre))
        })
        .collect();
    for (uuid, ratios) in per_gpu.iter_mut() {
        if let Some(centre) = sku_of.get(uuid.as_str()).and_then(|s| typical.get(s)) {
            ratios.iter_mut().for_each(|r| *r /= centre);
        }
    }
    per_gpu
}

fn min_max(values: &[f64]) -> (Option<f64>, Option<f64>) {
    let min = values.iter().copied().reduce(f64::min);
    let max = values.iter().copied().reduce(f64::max);
    (min, max)
}

/// The group statistics of `rows` (all of one GPU or one SKU).
fn group_report(
    group: String,
    rows: &[&ResultRow],
    rel_times: &HashMap<String, Vec<f64>>,
    slow_threshold: f64,
    gpu_mode: bool,
) -> GroupReport {
    let count = |s: Status| rows.iter().filter(|r| r.effective_status() == s).count();
    let ok_rows: Vec<&&ResultRow> = rows
        .iter()
        .filter(|r| r.effective_status() == Status::Ok)
        .collect();
    let positive = |v: Option<f64>| v.filter(|x| x.is_finite() && *x > 0.0);
    let bw: Vec<f64> = ok_rows
        .iter()
        .filter_map(|r| positive(r.bandwidth_fraction))
        .collect();
    let power: Vec<f64> = ok_rows.iter().filter_map(|r| r.power_avg_w).collect();
    let energy: Vec<f64> = ok_rows
        .iter()
        .filter_map(|r| positive(r.energy_per_call_j))
        .collect();
    let throttle_known: Vec<bool> = rows.iter().filter_map(|r| r.throttled).collect();
    let gpus: BTreeSet<&str> = rows.iter().map(|r| r.device_uuid.as_str()).collect();
    let cases: BTreeSet<&str> = rows.iter().map(|r| r.case_id.as_str()).collect();

    let gpu_rel: Vec<(&str, Vec<f64>)> = gpus
        .iter()
        .map(|g| (*g, rel_times.get(*g).cloned().unwrap_or_default()))
        .collect();
    let all_rel: Vec<f64> = gpu_rel.iter().flat_map(|g| g.1.iter().copied()).collect();
    let gpu_geomeans: Vec<f64> = gpu_rel
        .iter()
        .filter_map(|g| stats::geometric_mean(&g.1))
        .collect();
    let (rel_min, rel_max) = if gpu_mode {
        min_max(&all_rel)
    } else {
        min_max(&gpu_geomeans)
    };
    let first = rows.first();
    GroupReport {
        group,
        sku: first.map(|r| r.device_sku.clone()).unwrap_or_default(),
        host: if gpu_mode {
            first.map(|r| r.host.clone()).unwrap_or_default()
        } else {
            String::new()
        },
        gpus: gpus.len(),
        cases: cases.len(),
        rows: rows.len(),
        ok: ok_rows.len(),
        wrong_result: count(Status::WrongResult),
        failed: count(Status::Failed),
        oom: count(Status::Oom),
        skipped: count(Status::Skipped),
        bandwidth_fraction_geomean: stats::geometric_mean(&bw),
        relative_time_geomean: stats::geometric_mean(&all_rel),
        relative_time_min: rel_min,
        relative_time_max: rel_max,
        relative_cases: all_rel.len(),
        slow_gpus: gpu_geomeans
            .iter()
            .filter(|g| **g > 1.0 + slow_threshold)
            .count(),
        throttled_share: (!throttle_known.is_empty()).then(|| {
            throttle_known.iter().filter(|t| **t).count() as f64 / throttle_known.len() as f64
        }),
        power_avg_w_mean: stats::mean(&power),
        energy_per_call_j_geomean: stats::geometric_mean(&energy),
    }
}

/// The optimized-vs-baseline table: one row per (quant, batch, max_seq_len).
fn headline(rows: &[ResultRow]) -> Vec<HeadlineRow> {
    /// Both kernels' medians of one case on one GPU.
    struct KernelPair<'a> {
        optimized: Option<f64>,
        baseline: Option<f64>,
        row: &'a ResultRow,
    }
    /// The timed-ok pairs of one (quant, batch, max_seq_len).
    #[derive(Default)]
    struct PairGroup<'a> {
        optimized: Vec<f64>,
        baseline: Vec<f64>,
        gpus: BTreeSet<&'a str>,
    }
    let mut pairs: BTreeMap<(&str, &str), KernelPair> = BTreeMap::new();
    for r in rows {
        let entry = pairs
            .entry((&r.case_id, &r.device_uuid))
            .or_insert(KernelPair {
                optimized: None,
                baseline: None,
                row: r,
            });
        let median = r.is_timed_ok().then(|| r.median_time_ms()).flatten();
        match r.kernel {
            Some(KernelKind::Optimized) => entry.optimized = median,
            Some(KernelKind::Baseline) => entry.baseline = median,
            None => {}
        }
    }
    let mut groups: BTreeMap<(QuantMode, u32, u32), PairGroup> = BTreeMap::new();
    for ((_, uuid), pair) in &pairs {
        let case = &pair.row.case;
        let g = groups
            .entry((case.quant, case.batch_size, case.max_seq_len))
            .or_default();
        if let (Some(o), Some(b)) = (pair.optimized, pair.baseline) {
            g.optimized.push(o);
            g.baseline.push(b);
            g.gpus.insert(uuid);
        }
    }
    groups
        .into_iter()
        .map(|((quant, batch_size, max_seq_len), g)| {
            let PairGroup {
                optimized: opt,
                baseline: base,
                gpus,
            } = g;
            let speedups: Vec<f64> = base.iter().zip(&opt).map(|(b, o)| b / o).collect();
            let speedup = stats::geometric_mean(&speedups);
            let (speedup_min, speedup_max) = min_max(&speedups);
            HeadlineRow {
                quant,
                batch_size,
                max_seq_len,
                pairs: speedups.len(),
                gpus: gpus.len(),
                optimized_ms: stats::geometric_mean(&opt),
                baseline_ms: stats::geometric_mean(&base),
                speedup,
                speedup_min,
                speedup_max,
                speedup_fraction: speedup.map(|s| 1.0 - 1.0 / s),
            }
        })
        .collect()
}

/// Reports on a loaded run.
pub fn report_loaded(loaded: &LoadedResults, opts: &ReportOptions) -> ReportOutcome {
    let rel_times = relative_times(&loaded.rows);
    let gpu_mode = opts.group_by == GroupBy::Gpu;
    let mut grouped: BTreeMap<(&str, &str), Vec<&ResultRow>> = BTreeMap::new();
    for r in &loaded.rows {
        let key = if gpu_mode {
            (r.device_sku.as_str(), r.device_uuid.as_str())
        } else {
            (r.device_sku.as_str(), "")
        };
        grouped.entry(key).or_default().push(r);
    }
    let mut groups: Vec<GroupReport> = grouped
        .into_iter()
        .map(|((sku, uuid), rows)| {
            let name = if gpu_mode { uuid } else { sku };
            group_report(
                name.to_string(),
                &rows,
                &rel_times,
                opts.slow_threshold,
                gpu_mode,
            )
        })
        .collect();
    // Within a SKU, the slowest card first.
    groups.sort_by(|a, b| {
        a.sku
            .cmp(&b.sku)
            .then_with(|| {
                let r = |g: &GroupReport| g.relative_time_geomean.unwrap_or(0.0);
                r(b).total_cmp(&r(a))
            })
            .then_with(|| a.group.cmp(&b.group))
    });
    let mut slow_gpus: Vec<(String, f64)> = rel_times
        .iter()
        .filter_map(|(uuid, rel)| stats::geometric_mean(rel).map(|g| (uuid.clone(), g)))
        .filter(|(_, g)| *g > 1.0 + opts.slow_threshold)
        .collect();
    slow_gpus.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let scored_skus: BTreeSet<&str> = loaded
        .rows
        .iter()
        .filter(|r| rel_times.contains_key(&r.device_uuid))
        .map(|r| r.device_sku.as_str())
        .collect();
    let skus_without_peers: Vec<String> = loaded
        .rows
        .iter()
        .map(|r| r.device_sku.as_str())
        .filter(|sku| !scored_skus.contains(sku))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .map(str::to_string)
        .collect();
    ReportOutcome {
        source: loaded.path.clone(),
        group_by: opts.group_by,
        slow_threshold: opts.slow_threshold,
        groups,
        headline: headline(&loaded.rows),
        slow_gpus,
        skus_without_peers,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis::fixtures::{case, noisy_samples, record, record_case, write_run, Gpu};
    use decodebench_kernels::KernelMeasurement;

    /// Four identical H100s on a small grid, GPU 2 planted 8 % slower on every case.
    fn fleet_with_a_slow_card() -> tempfile::TempDir {
        let mut records = Vec::new();
        for g in 0..4 {
            let gpu = Gpu::h100(g);
            let slow = if g == 2 { 1.08 } else { 1.0 };
            for (i, batch) in [1u32, 8, 64].into_iter().enumerate() {
                for (j, seq) in [1024u32, 8192].into_iter().enumerate() {
                    for (k, quant) in [QuantMode::BF16, QuantMode::FP8_QKV]
                        .into_iter()
                        .enumerate()
                    {
                        let seed = (g * 1000 + i * 100 + j * 10 + k) as u64;
                        let t = 0.01 * f64::from(batch) * f64::from(seq) / 1024.0;
                        let mut r = record_case(
                            &gpu,
                            case(batch, seq, quant),
                            &noisy_samples(seed, 20, t * slow, 0.01 * t),
                            &noisy_samples(seed + 7, 20, 2.0 * t * slow, 0.02 * t),
                        );
                        if g == 3 && i == 0 && j == 0 && k == 0 {
                            r.measurement.kernels[1] = KernelMeasurement::not_timed(
                                KernelKind::Optimized,
                                Status::WrongResult,
                                "max abs err 1.0 > 0.05",
                            );
                        }
                        if g == 1 && i == 2 {
                            r.measurement.kernels[0].throttled = true;
                        }
                        records.push(r);
                    }
                }
            }
        }
        write_run(&records)
    }

    #[test]
    fn analysis_report_finds_the_planted_slow_gpu() {
        let dir = fleet_with_a_slow_card();
        let out = report(&ReportOptions::new(dir.path())).unwrap();
        assert_eq!(out.groups.len(), 4);
        assert_eq!(out.slow_gpus.len(), 1, "{:?}", out.slow_gpus);
        assert_eq!(out.slow_gpus[0].0, Gpu::h100(2).uuid);
        assert!(
            (out.slow_gpus[0].1 - 1.08).abs() < 0.01,
            "{:?}",
            out.slow_gpus
        );
        // Slowest first; the others sit at their SKU's median.
        assert_eq!(out.groups[0].group, Gpu::h100(2).uuid);
        assert_eq!(out.groups[0].slow_gpus, 1);
        for g in &out.groups[1..] {
            assert_eq!(g.slow_gpus, 0, "{g:?}");
            assert!(
                (g.relative_time_geomean.unwrap() - 1.0).abs() < 0.01,
                "{g:?}"
            );
        }
        // 12 cases x 2 kernels per GPU, all with peers.
        let gpu3 = out
            .groups
            .iter()
            .find(|g| g.group == Gpu::h100(3).uuid)
            .unwrap();
        assert_eq!(
            (gpu3.cases, gpu3.rows, gpu3.ok, gpu3.wrong_result),
            (12, 24, 23, 1)
        );
        assert_eq!(gpu3.relative_cases, 23);
        let gpu1 = out
            .groups
            .iter()
            .find(|g| g.group == Gpu::h100(1).uuid)
            .unwrap();
        assert!((gpu1.throttled_share.unwrap() - 4.0 / 24.0).abs() < 1e-12);
        assert_eq!(gpu1.power_avg_w_mean, Some(500.0));
        assert!(gpu1.bandwidth_fraction_geomean.unwrap() > 0.0);
        assert!(gpu1.energy_per_call_j_geomean.unwrap() > 0.0);
        assert_eq!(gpu1.host, "node-0");
        assert!(out.slow_line().contains(&Gpu::h100(2).uuid));
    }

    #[test]
    fn analysis_report_per_sku_shows_the_card_spread() {
        let dir = fleet_with_a_slow_card();
        let mut opts = ReportOptions::new(dir.path());
        opts.group_by = GroupBy::Sku;
        let out = report(&opts).unwrap();
        assert_eq!(out.groups.len(), 1);
        let sku = &out.groups[0];
        assert_eq!(
            (sku.gpus, sku.cases, sku.rows, sku.slow_gpus),
            (4, 12, 96, 1)
        );
        assert!(
            (sku.relative_time_min.unwrap() - 1.0).abs() < 0.01,
            "{sku:?}"
        );
        assert!(
            (sku.relative_time_max.unwrap() - 1.08).abs() < 0.01,
            "{sku:?}"
        );
    }

    #[test]
    fn analysis_report_headline_speedup() {
        let dir = fleet_with_a_slow_card();
        let out = report(&ReportOptions::new(dir.path())).unwrap();
        // 2 quant modes x 3 batches x 2 lengths, reference order (bf16 first).
        assert_eq!(out.headline.len(), 12);
        assert_eq!(out.headline[0].quant, QuantMode::BF16);
        assert_eq!(
            (out.headline[0].batch_size, out.headline[0].max_seq_len),
            (1, 1024)
        );
        for h in &out.headline {
            assert!((h.speedup.unwrap() - 2.0).abs() < 0.05, "{h:?}");
            assert!((h.speedup_fraction.unwrap() - 0.5).abs() < 0.02, "{h:?}");
        }
        // The wrong result on GPU 3 leaves that group one pair short.
        assert_eq!((out.headline[0].pairs, out.headline[0].gpus), (3, 3));
        assert_eq!((out.headline[1].pairs, out.headline[1].gpus), (4, 4));
    }

    #[test]
    fn analysis_report_renders_every_format() {
        let dir = fleet_with_a_slow_card();
        let out = report(&ReportOptions::new(dir.path())).unwrap();
        let render = |f: OutputFormat| {
            let mut buf = Vec::new();
            out.write(&mut buf, f).unwrap();
            String::from_utf8(buf).unwrap()
        };
        let text = render(OutputFormat::Table);
        assert!(text.contains("SLOW"), "{text}");
        assert!(text.contains("fp8/fp8/bf16"), "{text}");
        let csv = render(OutputFormat::Csv);
        let sections: Vec<&str> = csv.split("\n\n").collect();
        assert_eq!(sections.len(), 2, "{csv}");
        assert_eq!(sections[0].lines().count(), 5);
        assert_eq!(sections[1].trim_end().lines().count(), 13);
        let json: serde_json::Value = serde_json::from_str(&render(OutputFormat::Json)).unwrap();
        assert_eq!(json["groups"].as_array().unwrap().len(), 4);
        assert_eq!(json["headline"][0]["quant"], "bf16/bf16/bf16");
    }

    #[test]
    fn analysis_report_single_gpu_has_no_peers() {
        let gpu = Gpu::h100(0);
        let dir = write_run(&[record(&gpu, 4, 1024, &[1.0, 1.1], &[2.0, 2.1])]);
        let out = report(&ReportOptions::new(dir.path())).unwrap();
        assert_eq!(out.groups[0].relative_time_geomean, None);
        assert_eq!(out.groups[0].relative_cases, 0);
        assert!(out.slow_gpus.is_empty());
        assert_eq!(out.headline.len(), 1);
    }

    /// `n` cards of one SKU on 24 cases (both kernels); card `slow` is `factor` slower. Every
    /// (card, case) median also varies by a seeded 2 %, as per-case card-to-card noise does.
    fn noisy_fleet(n: usize, slow: usize, factor: f64) -> tempfile::TempDir {
        use crate::analysis::stats::{tests::normal, SplitMix64};
        let mut rng = SplitMix64::new(42);
        let mut records = Vec::new();
        for g in 0..n {
            let gpu = Gpu::h100(g);
            let scale = if g == slow { factor } else { 1.0 };
            for batch in [1u32, 2, 4, 8, 16, 32] {
                for seq in [1024u32, 2048, 4096, 8192] {
                    let t = 0.01 * f64::from(batch) * f64::from(seq) / 1024.0 * scale;
                    let (o, b) = (
                        t * normal(&mut rng, 1.0, 0.02),
                        2.0 * t * normal(&mut rng, 1.0, 0.02),
                    );
                    records.push(record(&gpu, batch, seq, &[o; 5], &[b; 5]));
                }
            }
        }
        write_run(&records)
    }

    fn scores(out: &ReportOutcome) -> Vec<f64> {
        let mut s: Vec<f64> = out
            .groups
            .iter()
            .map(|g| g.relative_time_geomean.unwrap())
            .collect();
        s.sort_by(f64::total_cmp);
        s
    }

    #[test]
    fn analysis_report_scores_are_centred_on_the_typical_card() {
        // Four cards, one 8 % slower: with an even count the per-case median is the mean of the
        // middle two, pulled towards the slow card by the noise, so uncentred the normal cards
        // read fast. Centred, the middle two straddle 1 exactly.
        let out = report(&ReportOptions::new(noisy_fleet(4, 2, 1.08).path())).unwrap();
        let s = scores(&out);
        assert!(((s[1] + s[2]) / 2.0 - 1.0).abs() < 1e-12, "{s:?}");
        assert!(
            (s[3] - 1.08).abs() < 0.01,
            "the slow card reads +8 %: {s:?}"
        );
        assert!(s[..3].iter().all(|x| (x - 1.0).abs() < 0.01), "{s:?}");
        assert_eq!(out.slow_gpus.len(), 1);
        assert_eq!(out.slow_gpus[0].0, Gpu::h100(2).uuid);
        assert_eq!(out.slow_gpus[0].1, s[3]);
        // Each card's per-case range holds its score.
        for g in &out.groups {
            let r = g.relative_time_geomean.unwrap();
            assert!(g.relative_time_min.unwrap() <= r && r <= g.relative_time_max.unwrap());
        }

        // Five cards: the median card reads exactly 1.
        let out = report(&ReportOptions::new(noisy_fleet(5, 0, 1.08).path())).unwrap();
        let s = scores(&out);
        assert!((s[2] - 1.0).abs() < 1e-12, "{s:?}");
        assert!((s[4] - 1.08).abs() < 0.01, "{s:?}");

        // Per SKU, the spread runs from the fastest card to the slow one.
        let five = noisy_fleet(5, 0, 1.08);
        let mut opts = ReportOptions::new(five.path());
        opts.group_by = GroupBy::Sku;
        let sku = &report(&opts).unwrap().groups[0];
        assert_eq!(sku.relative_time_max, Some(s[4]));
        assert_eq!(sku.relative_time_min, Some(s[0]));
    }

    #[test]
    fn analysis_report_says_which_skus_it_could_not_check() {
        let gpu = Gpu::h100(0);
        let dir = write_run(&[record(&gpu, 4, 1024, &[1.0, 1.1], &[2.0, 2.1])]);
        let out = report(&ReportOptions::new(dir.path())).unwrap();
        assert_eq!(out.skus_without_peers, vec![gpu.sku.clone()]);
        assert!(
            out.slow_line().starts_with("slow GPUs: not checked"),
            "{}",
            out.slow_line()
        );
        // Three H100s and one H200: the H100s are checked, the H200 is named as not.
        let mut records: Vec<_> = (0..3)
            .map(|g| record(&Gpu::h100(g), 4, 1024, &[1.0, 1.1], &[2.0, 2.1]))
            .collect();
        let h200 = Gpu {
            sku: "NVIDIA H200".to_string(),
            ..Gpu::h100(9)
        };
        records.push(record(&h200, 4, 1024, &[0.8], &[1.6]));
        let out = report(&ReportOptions::new(write_run(&records).path())).unwrap();
        assert_eq!(out.skus_without_peers, vec!["NVIDIA H200".to_string()]);
        let line = out.slow_line();
        assert!(
            line.starts_with(
                "slow GPUs: none above +3.0 % of their SKU's typical card; not checked"
            ) && line.ends_with("NVIDIA H200"),
            "{line}"
        );
        let json: serde_json::Value = serde_json::to_value(&out).unwrap();
        assert_eq!(json["skus_without_peers"][0], "NVIDIA H200");
    }
}
