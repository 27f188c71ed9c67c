//! What two runs have in common, and, when they share nothing, why in words.
//!
//! `compare` matches rows by (case id, kernel, GPU SKU), and the case id hashes every case
//! parameter and the measurement method. Two runs of different grids, of one grid timed with other
//! `[method]` settings, or on different GPU models therefore share no key at all; a nightly gate
//! that compared nothing would pass. [`Mismatch`] is the error that replaces that silent pass: it
//! counts each side and names the parameters whose values differ, with what to do about each.

use super::load::{LoadedResults, ResultRow, CASE_SETTING_COLUMNS};
use super::KernelSelection;
use decodebench_kernels::KernelKind;
use std::collections::BTreeSet;
use std::fmt;
use std::path::PathBuf;

/// Values of one parameter listed in a message before the rest are only counted.
const VALUES_SHOWN: usize = 6;

/// The match key of `compare`: (case id, kernel, GPU SKU).
pub type MatchKey = (String, KernelKind, String);

/// The kernels a row stands for under `kernels`: its own, or every selected kernel for a row
/// without one (the agent reported nothing for the case, so every kernel failed).
pub fn row_kernels(row: &ResultRow, kernels: KernelSelection) -> Vec<KernelKind> {
    match row.kernel {
        Some(k) => vec![k],
        None => KernelKind::ALL.to_vec(),
    }
    .into_iter()
    .filter(|&k| kernels.includes(k))
    .collect()
}

/// The match keys of one row under `kernels` (one per kernel it stands for).
pub fn row_keys(row: &ResultRow, kernels: KernelSelection) -> impl Iterator<Item = MatchKey> + '_ {
    row_kernels(row, kernels)
        .into_iter()
        .map(|k| (row.case_id.clone(), k, row.device_sku.clone()))
}

/// Every match key of `rows` under `kernels`.
pub fn match_keys(rows: &[ResultRow], kernels: KernelSelection) -> BTreeSet<MatchKey> {
    rows.iter().flat_map(|r| row_keys(r, kernels)).collect()
}

/// What a parameter that differs says about the two runs, and so what to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ParameterKind {
    /// The GPU model.
    Sku,
    /// The kernels timed.
    Kernel,
    /// The workload: the grid's axes, heads, pool, seed.
    Grid,
    /// How it was timed: the grid's `[method]`.
    Method,
}

/// One parameter whose values differ between the runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    /// The result column (or `quant` for the three dtype columns).
    pub parameter: &'static str,
    pub kind: ParameterKind,
    /// Distinct values on each side, sorted.
    pub baseline: Vec<String>,
    pub candidate: Vec<String>,
}

/// One side of a comparison that matched nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SideCoverage {
    pub path: PathBuf,
    /// Result rows in the file.
    pub rows: usize,
    /// (case, kernel, SKU) keys after the kernel selection.
    pub comparisons: usize,
    pub cases: usize,
    /// Kernels in the file, whatever the selection (a row without a kernel adds none).
    pub kernels: Vec<String>,
    pub skus: Vec<String>,
}

/// Why two runs share no (case, kernel, GPU SKU): the error `compare` gives instead of comparing
/// nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    pub baseline: SideCoverage,
    pub candidate: SideCoverage,
    pub kernels: KernelSelection,
    /// The parameters whose sets of values differ, SKU first, then kernel, grid and method.
    pub differences: Vec<Difference>,
    /// Some case has the same parameters on both sides (SKU and kernel included), yet the ids
    /// differ: what differs is not in any column.
    pub same_parameters_other_ids: bool,
}

/// Where a parameter's value comes from.
enum Source {
    /// A field of the row.
    Row(fn(&ResultRow) -> String),
    /// The case's column of this name in [`CASE_SETTING_COLUMNS`].
    Setting,
}

/// A parameter `compare` can name: its column and how to read it.
struct Parameter {
    name: &'static str,
    kind: ParameterKind,
    source: Source,
}

impl Parameter {
    fn value(&self, row: &ResultRow, loaded: &LoadedResults) -> String {
        match self.source {
            Source::Row(read) => read(row),
            Source::Setting => CASE_SETTING_COLUMNS
                .iter()
                .position(|c| *c == self.name)
                .and_then(|i| loaded.case_settings.get(&row.case_id)?.get(i).cloned())
                .unwrap_or_default(),
        }
    }
}

/// Every case parameter, in the order a message lists them.
const PARAMETERS: &[Parameter] = &[
    Parameter {
        name: "device_sku",
        kind: ParameterKind::Sku,
        source: Source::Row(|r| r.device_sku.clone()),
    },
    Parameter {
        name: "quant",
        kind: ParameterKind::Grid,
        source: Source::Row(|r| r.case.quant.to_string()),
    },
    Parameter {
        name: "batch_size",
        kind: ParameterKind::Grid,
        source: Source::Row(|r| r.case.batch_size.to_string()),
    },
    Parameter {
        name: "max_seq_len",
        kind: ParameterKind::Grid,
        source: Source::Row(|r| r.case.max_seq_len.to_string()),
    },
    Parameter {
        name: "num_qo_heads",
        kind: ParameterKind::Grid,
        source: Source::Setting,
    },
    Parameter {
        name: "num_kv_heads",
        kind: ParameterKind::Grid,
        source: Source::Setting,
    },
    Parameter {
        name: "head_size",
        kind: ParameterKind::Grid,
        source: Source::Setting,
    },
    Parameter {
        name: "kv_layout",
        kind: ParameterKind::Grid,
        source: Source::Row(|r| r.case.kv_layout.clone()),
    },
    Parameter {
        name: "block_size",
        kind: ParameterKind::Grid,
        source: Source::Row(|r| r.case.block_size.to_string()),
    },
    Parameter {
        name: "pool",
        kind: ParameterKind::Grid,
        source: Source::Row(|r| r.case.pool.clone()),
    },
    Parameter {
        name: "pool_tokens",
        kind: ParameterKind::Grid,
        source: Source::Setting,
    },
    Parameter {
        name: "seed",
        kind: ParameterKind::Grid,
        source: Source::Setting,
    },
    Parameter {
        name: "warmup",
        kind: ParameterKind::Method,
        source: Source::Setting,
    },
    Parameter {
        name: "trials",
        kind: ParameterKind::Method,
        source: Source::Setting,
    },
    Parameter {
        name: "l2",
        kind: ParameterKind::Method,
        source: Source::Setting,
    },
    Parameter {
        name: "timing_mode",
        kind: ParameterKind::Method,
        source: Source::Setting,
    },
    Parameter {
        name: "graph_launches",
        kind: ParameterKind::Method,
        source: Source::Setting,
    },
    Parameter {
        name: "target_rse",
        kind: ParameterKind::Method,
        source: Source::Setting,
    },
    Parameter {
        name: "max_trials",
        kind: ParameterKind::Method,
        source: Source::Setting,
    },
    Parameter {
        name: "max_time_s",
        kind: ParameterKind::Method,
        source: Source::Setting,
    },
    Parameter {
        name: "throttle_retries",
        kind: ParameterKind::Method,
        source: Source::Setting,
    },
];

/// The rows that stand for at least one selected kernel.
fn selected_rows(loaded: &LoadedResults, kernels: KernelSelection) -> Vec<&ResultRow> {
    loaded
        .rows
        .iter()
        .filter(|r| !row_kernels(r, kernels).is_empty())
        .collect()
}

fn side_coverage(loaded: &LoadedResults, kernels: KernelSelection) -> SideCoverage {
    let keys = match_keys(&loaded.rows, kernels);
    let cases: BTreeSet<&str> = keys.iter().map(|k| k.0.as_str()).collect();
    let file_kernels: BTreeSet<&str> = loaded
        .rows
        .iter()
        .filter_map(|r| r.kernel.map(KernelKind::as_str))
        .collect();
    let skus: BTreeSet<&str> = loaded.rows.iter().map(|r| r.device_sku.as_str()).collect();
    SideCoverage {
        path: loaded.path.clone(),
        rows: loaded.rows.len(),
        comparisons: keys.len(),
        cases: cases.len(),
        kernels: file_kernels.into_iter().map(str::to_string).collect(),
        skus: skus.into_iter().map(str::to_string).collect(),
    }
}

/// A row's every parameter (and kernel), joined: equal signatures with different case ids mean
/// the ids differ in something no column records.
fn signatures(loaded: &LoadedResults, kernels: KernelSelection) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for row in &loaded.rows {
        let params: Vec<String> = PARAMETERS.iter().map(|p| p.value(row, loaded)).collect();
        for k in row_kernels(row, kernels) {
            out.insert(format!("{}|{}", k.as_str(), params.join("|")));
        }
    }
    out
}

impl Mismatch {
    /// Describes two runs that share no (case, kernel, SKU) under `kernels`.
    pub fn between(
        baseline: &LoadedResults,
        candidate: &LoadedResults,
        kernels: KernelSelection,
    ) -> Mismatch {
        let (base_rows, cand_rows) = (
            selected_rows(baseline, kernels),
            selected_rows(candidate, kernels),
        );
        let values = |rows: &[&ResultRow], l: &LoadedResults, p: &Parameter| -> Vec<String> {
            rows.iter()
                .map(|r| p.value(r, l))
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect()
        };
        let mut differences = Vec::new();
        // Kernels are told apart only when both sides kept rows: when the selection emptied one
        // side, the message says that instead.
        let kernel_values = |l: &LoadedResults| -> Vec<String> {
            l.rows
                .iter()
                .flat_map(|r| row_kernels(r, kernels))
                .map(|k| k.as_str().to_string())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect()
        };
        for p in PARAMETERS {
            let (b, c) = (
                values(&base_rows, baseline, p),
                values(&cand_rows, candidate, p),
            );
            if !b.is_empty() && !c.is_empty() && b != c {
                differences.push(Difference {
                    parameter: p.name,
                    kind: p.kind,
                    baseline: b,
                    candidate: c,
                });
            }
            if p.kind == ParameterKind::Sku {
                let (b, c) = (kernel_values(baseline), kernel_values(candidate));
                if !b.is_empty() && !c.is_empty() && b != c {
                    differences.push(Difference {
                        parameter: "kernel",
                        kind: ParameterKind::Kernel,
                        baseline: b,
                        candidate: c,
                    });
                }
            }
        }
        let same_parameters_other_ids =
            !signatures(baseline, kernels).is_disjoint(&signatures(candidate, kernels));
        Mismatch {
            baseline: side_coverage(baseline, kernels),
            candidate: side_coverage(candidate, kernels),
            kernels,
            differences,
            same_parameters_other_ids,
        }
    }

    /// What to do, one sentence per kind of difference (or for what no column shows).
    fn advice(&self) -> Vec<String> {
        let mut advice = Vec::new();
        for (side, cov) in [("baseline", &self.baseline), ("candidate", &self.candidate)] {
            if cov.comparisons == 0 {
                advice.push(format!(
                    "--kernel {} leaves nothing of the {side}, which timed {}: pass --kernel \
                     both, or a kernel both runs timed",
                    self.kernels.as_str(),
                    list_or_none(&cov.kernels)
                ));
            }
        }
        let kinds: BTreeSet<ParameterKind> = self.differences.iter().map(|d| d.kind).collect();
        for kind in kinds {
            advice.push(
                match kind {
                    ParameterKind::Sku => {
                        "cases are matched on the same GPU model only: run the candidate on the \
                         baseline's SKU (to compare GPU models, run `decodebench report` on one \
                         run that holds both)"
                    }
                    ParameterKind::Kernel => {
                        "the runs timed different kernels ([method] kernels, run --kernels): \
                         time the same kernels in both, or pick one with --kernel"
                    }
                    ParameterKind::Grid => {
                        "the grids differ, and the case id hashes every case parameter: run the \
                         candidate with the baseline's grid file"
                    }
                    ParameterKind::Method => {
                        "the measurement method differs, and the case id includes it (a case \
                         timed differently is another experiment): run both with the same \
                         [method] settings (grid file or preset)"
                    }
                }
                .to_string(),
            );
        }
        if advice.is_empty() {
            advice.push(if self.same_parameters_other_ids {
                "every recorded parameter matches, yet the case ids differ: the runs used \
                 different [method] kernels selections (part of the id, but no column), or \
                 decodebench versions that compute the id differently (the ids changed when the \
                 lengths and pages became the reference script's own draws: a run from before \
                 that timed other work); run both with one grid file and one decodebench version"
                    .to_string()
            } else {
                "each parameter takes the same values on both sides, but not in the same \
                 combinations: run the candidate with the baseline's grid file"
                    .to_string()
            });
        }
        advice
    }
}

/// "a, b, c and 4 more", or "none".
fn list_or_none(values: &[String]) -> String {
    if values.is_empty() {
        return "none".to_string();
    }
    let shown: Vec<String> = values
        .iter()
        .take(VALUES_SHOWN)
        .map(|v| {
            if v.is_empty() {
                "(empty)".to_string()
            } else {
                v.clone()
            }
        })
        .collect();
    let mut text = shown.join(", ");
    if values.len() > VALUES_SHOWN {
        text.push_str(&format!(" and {} more", values.len() - VALUES_SHOWN));
    }
    text
}

impl fmt::Display for SideCoverage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} rows, {} comparisons ({} cases; kernels {}; SKUs {})",
            self.path.display(),
            self.rows,
            self.comparisons,
            self.cases,
            list_or_none(&self.kernels),
            list_or_none(&self.skus)
        )
    }
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "nothing was compared: the baseline and the candidate share no (case, kernel, GPU \
             SKU) under --kernel {}",
            self.kernels.as_str()
        )?;
        writeln!(f, "  baseline  {}", self.baseline)?;
        writeln!(f, "  candidate {}", self.candidate)?;
        for d in &self.differences {
            writeln!(
                f,
                "  {} differs: baseline {}; candidate {}",
                d.parameter,
                list_or_none(&d.baseline),
                list_or_none(&d.candidate)
            )?;
        }
        let advice = self.advice();
        for (i, line) in advice.iter().enumerate() {
            write!(f, "  {line}")?;
            if i + 1 < advice.len() {
                writeln!(f)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn analysis_coverage_names_every_case_setting() {
        // Every setting the loader keeps is a parameter a mismatch can name, and no parameter
        // reads a setting the loader does not keep (it would always read empty).
        let settings: Vec<&str> = PARAMETERS
            .iter()
            .filter(|p| matches!(p.source, Source::Setting))
            .map(|p| p.name)
            .collect();
        assert_eq!(settings, CASE_SETTING_COLUMNS);
    }

    #[test]
    fn analysis_coverage_lists_values_with_a_cap() {
        let v: Vec<String> = (0..9).map(|i| i.to_string()).collect();
        assert_eq!(list_or_none(&v), "0, 1, 2, 3, 4, 5 and 3 more");
        assert_eq!(list_or_none(&[]), "none");
        assert_eq!(list_or_none(&[String::new()]), "(empty)");
    }
}
