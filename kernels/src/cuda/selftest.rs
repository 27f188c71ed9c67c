//! The GPU self-test: every kernel in every quant mode, both layouts, every block size, and a
//! spread of head sizes and GQA groups, on small shapes checked against the CPU reference. The
//! GPU reference is checked against the CPU reference on the same (device-generated) inputs, and
//! the optimized kernel runs at least twice per case, once as the timing picks it and once forced
//! through split-KV and the merge (once per compiled pipeline depth of the tensor-core kernel,
//! where it has several). `decodebench selftest` prints the table and exits non-zero when
//! anything fails.

use super::backend::{ConversionCheck, CudaBackend, SelftestCaseResult};
use super::compile::CompileCache;
use super::CudaError;
use crate::measurement::Status;
use crate::workload::{BenchCase, KvLayout, KvPool, MeasureMethod, QuantMode};
use std::fmt;

/// Smallest split-KV chunk used to force the split path on short sequences (a multiple of every
/// pipeline stage size, so items cover whole stages except at sequence ends).
const FORCED_SPLIT_CHUNK_TOKENS: u32 = 64;

/// Block sizes and head sizes the self-test covers.
const BLOCK_SIZES: [u32; 4] = [8, 16, 32, 64];
const HEAD_SIZES: [u32; 3] = [64, 128, 256];
/// GQA groups covered (odd ones included: the kernel's thread shape must round to whole warps).
const GROUPS: [u32; 7] = [1, 2, 3, 4, 5, 8, 16];

/// What to run.
#[derive(Debug, Clone, Default)]
pub struct SelftestOptions {
    pub ordinal: usize,
    /// Only the layout x block x mode grid (skips the head-size x group sweep and long cases).
    pub quick: bool,
    /// Compiled-module cache (default: [`CompileCache::from_env`]).
    pub cache: Option<CompileCache>,
}

/// One check of one case.
#[derive(Debug, Clone, PartialEq)]
pub struct SelftestRow {
    pub case: String,
    /// "gpu_reference", "baseline" or "optimized(...)".
    pub check: String,
    pub passed: bool,
    pub max_abs_err: f64,
    pub rel_l2_err: f64,
    pub detail: String,
}

/// All checks, with the device they ran on.
#[derive(Debug, Clone, Default)]
pub struct SelftestReport {
    pub device: String,
    pub module: String,
    pub rows: Vec<SelftestRow>,
}

impl SelftestReport {
    pub fn failures(&self) -> usize {
        self.rows.iter().filter(|r| !r.passed).count()
    }

    pub fn passed(&self) -> bool {
        !self.rows.is_empty() && self.failures() == 0
    }

    /// A printable table: one line per check, then a summary line.
    pub fn table(&self) -> String {
        let mut s = format!("device: {}\nkernels: {}\n", self.device, self.module);
        s.push_str(&format!(
            "{:<58} {:<26} {:<6} {:>10} {:>10}\n",
            "case", "check", "result", "max_abs", "rel_l2"
        ));
        // An error figure a check does not have (the format check's) prints as "-".
        let figure = |x: f64| {
            if x.is_nan() {
                "-".to_string()
            } else {
                format!("{x:.3e}")
            }
        };
        for r in &self.rows {
            s.push_str(&format!(
                "{:<58} {:<26} {:<6} {:>10} {:>10}\n",
                r.case,
                r.check,
                if r.passed { "ok" } else { "FAIL" },
                figure(r.max_abs_err),
                figure(r.rel_l2_err)
            ));
            // Failures say why; a check without error figures says what it covered.
            if !r.passed || r.max_abs_err.is_nan() {
                s.push_str(&format!("    {}\n", r.detail));
            }
        }
        s.push_str(&format!(
            "{} checks, {} failed: {}\n",
            self.rows.len(),
            self.failures(),
            if self.passed() { "PASS" } else { "FAIL" }
        ));
        s
    }
}

impl fmt::Display for SelftestReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.table())
    }
}

/// The short measurement the self-test uses (timing is exercised, not reported).
fn selftest_method() -> MeasureMethod {
    MeasureMethod {
        warmup: 1,
        trials: 2,
        ..Default::default()
    }
}

#[allow(clippy::too_many_arguments)]
fn small_case(
    quant: QuantMode,
    layout: KvLayout,
    block: u32,
    head: u32,
    group: u32,
    batch: u32,
    max_seq: u32,
    pool: KvPool,
) -> BenchCase {
    let kv_heads = if group >= 8 { 1 } else { 2 };
    BenchCase {
        id: String::new(),
        batch_size: batch,
        max_seq_len: max_seq,
        quant,
        num_qo_heads: kv_heads * group,
        num_kv_heads: kv_heads,
        head_size: head,
        layout,
        block_size: block,
        pool,
        seed: 0x5e1f_7e57 ^ ((block as u64) << 8) ^ ((head as u64) << 16) ^ ((group as u64) << 24),
        method: selftest_method(),
    }
    .with_id()
}

/// The self-test's cases.
pub fn selftest_cases(quick: bool) -> Vec<BenchCase> {
    let mut cases = Vec::new();
    for quant in QuantMode::REFERENCE {
        for layout in [KvLayout::Hnd, KvLayout::Nhd] {
            for block in BLOCK_SIZES {
                cases.push(small_case(
                    quant,
                    layout,
                    block,
                    128,
                    8,
                    3,
                    300,
                    KvPool::Shared { tokens: 4096 },
                ));
            }
        }
    }
    if quick {
        return cases;
    }
    for quant in QuantMode::REFERENCE {
        for head in HEAD_SIZES {
            for group in GROUPS {
                cases.push(small_case(
                    quant,
                    KvLayout::Hnd,
                    16,
                    head,
                    group,
                    2,
                    150,
                    KvPool::Unique,
                ));
            }
        }
        // Long sequences: many pipeline stages per CTA and many splits.
        cases.push(small_case(
            quant,
            KvLayout::Nhd,
            32,
            128,
            8,
            2,
            3000,
            KvPool::Unique,
        ));
    }
    cases
}

/// The exhaustive conversion check as a report row: the output stores' e4m3 conversion (the
/// hardware instruction on sm_89+) must give the software rounding's code for every f32 input,
/// and the e2m1 rounding the nearest magnitude's.
fn conversion_row(result: Result<ConversionCheck, CudaError>) -> SelftestRow {
    let (passed, detail) = match result {
        Ok(c) => {
            let passed = c.e4m3_mismatches == 0
                && c.e4m3_nan_mismatches == 0
                && c.e2m1_mismatches == 0
                && c.nvfp4_mismatches == 0
                && c.sf_mismatches == 0
                && c.rcp_mismatches == 0
                && c.normal_rcp_mismatches == 0;
            let mut detail = format!(
                "every f32 bit pattern: {} e4m3 codes differ from the software rounding, {} NaN \
                 inputs without a NaN code, {} e2m1 codes differ from the nearest magnitude, {} \
                 nvfp4 scale-factor codes differ from e4m3(t / 6); every scale factor: {} nvfp4 \
                 element codes differ from e2m1(x / SF), {} reciprocals from the correctly \
                 rounded one; every f32 from 2^-126 to 2^125: {} branch-free reciprocals differ \
                 from the correctly rounded one",
                c.e4m3_mismatches,
                c.e4m3_nan_mismatches,
                c.e2m1_mismatches,
                c.sf_mismatches,
                c.nvfp4_mismatches,
                c.rcp_mismatches,
                c.normal_rcp_mismatches
            );
            for (what, first) in [
                ("e4m3", c.first_e4m3),
                ("e2m1", c.first_e2m1),
                ("nvfp4 scale-factor", c.first_sf),
            ] {
                if let Some(bits) = first {
                    detail.push_str(&format!(
                        "; first {what} mismatch at 0x{bits:08x} ({:e})",
                        f32::from_bits(bits)
                    ));
                }
            }
            if let Some((bits, sf)) = c.first_nvfp4 {
                detail.push_str(&format!(
                    "; first nvfp4 mismatch at x = 0x{bits:08x} ({:e}), SF code 0x{sf:02x}",
                    f32::from_bits(bits)
                ));
            }
            (passed, detail)
        }
        Err(e) => (false, format!("could not run: {e}")),
    };
    SelftestRow {
        case: "number formats".into(),
        check: "conversions".into(),
        passed,
        max_abs_err: f64::NAN,
        rel_l2_err: f64::NAN,
        detail,
    }
}

fn rows_of(case: &BenchCase, result: SelftestCaseResult) -> Vec<SelftestRow> {
    let label = case.label();
    let mut rows = Vec::new();
    match result.reference {
        Ok(r) => rows.push(SelftestRow {
            case: label.clone(),
            check: "gpu_reference".into(),
            passed: r.passed,
            max_abs_err: r.max_abs_err,
            rel_l2_err: r.rel_l2_err,
            detail: r.detail,
        }),
        Err(e) => rows.push(SelftestRow {
            case: label.clone(),
            check: "setup".into(),
            passed: false,
            max_abs_err: f64::NAN,
            rel_l2_err: f64::NAN,
            detail: e,
        }),
    }
    for (check, m) in result.kernels {
        let acc = m.accuracy.unwrap_or_default();
        rows.push(SelftestRow {
            case: label.clone(),
            check,
            passed: m.status == Some(Status::Ok),
            max_abs_err: acc.max_abs_err,
            rel_l2_err: acc.rel_l2_err,
            detail: format!("{}: {}", m.status.map_or("none", |s| s.as_str()), m.message),
        });
    }
    rows
}

/// Runs the self-test on device `options.ordinal`. Errors only when the device cannot be opened;
/// every failing check is a row of the report.
pub fn selftest(options: &SelftestOptions) -> Result<SelftestReport, CudaError> {
    let cache = options.cache.clone().unwrap_or_else(CompileCache::from_env);
    let mut backend = CudaBackend::with_cache(options.ordinal, cache, false)?;
    let identity = crate::backend::Backend::identity(&backend).clone();
    let mut report = SelftestReport {
        device: format!(
            "{} (cc {}, {} SMs, {})",
            identity.name,
            identity.compute_capability.unwrap_or_default(),
            identity.sm_count.unwrap_or_default(),
            identity.uuid
        ),
        module: backend.module_origin(),
        rows: Vec::new(),
    };
    report
        .rows
        .push(conversion_row(backend.check_conversions()));
    for case in selftest_cases(options.quick) {
        let result = backend.selftest_case(
            &case,
            &[super::plan::MIN_CHUNK_TOKENS, FORCED_SPLIT_CHUNK_TOKENS],
        );
        report.rows.extend(rows_of(&case, result));
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cases_cover_every_mode_layout_block_head_and_group() {
        let cases = selftest_cases(false);
        for quant in QuantMode::REFERENCE {
            for layout in [KvLayout::Hnd, KvLayout::Nhd] {
                for block in BLOCK_SIZES {
                    assert!(cases
                        .iter()
                        .any(|c| c.quant == quant && c.layout == layout && c.block_size == block));
                }
            }
            for head in HEAD_SIZES {
                for group in GROUPS {
                    assert!(cases.iter().any(|c| c.quant == quant
                        && c.head_size == head
                        && c.group_size() == group));
                }
            }
        }
        assert!(selftest_cases(true).len() < cases.len());
    }

    #[test]
    fn conversion_row_passes_only_when_nothing_differs() {
        let clean = ConversionCheck::default();
        let row = conversion_row(Ok(clean));
        assert!(row.passed, "{}", row.detail);
        let bad = ConversionCheck {
            e2m1_mismatches: 3,
            first_e2m1: Some(0x3e80_0000),
            ..clean
        };
        let row = conversion_row(Ok(bad));
        assert!(!row.passed);
        assert!(row.detail.contains("3 e2m1 codes differ"), "{}", row.detail);
        assert!(row.detail.contains("0x3e800000 (2.5e-1)"), "{}", row.detail);
        let nan = ConversionCheck {
            e4m3_nan_mismatches: 1,
            ..clean
        };
        assert!(!conversion_row(Ok(nan)).passed);
        let nvfp4 = ConversionCheck {
            nvfp4_mismatches: 2,
            first_nvfp4: Some((0x3f80_0000, 0x38)),
            ..clean
        };
        let row = conversion_row(Ok(nvfp4));
        assert!(!row.passed);
        assert!(row.detail.contains("SF code 0x38"), "{}", row.detail);
        let sf = ConversionCheck {
            sf_mismatches: 1,
            first_sf: Some(0x4040_0000),
            ..clean
        };
        let row = conversion_row(Ok(sf));
        assert!(!row.passed);
        assert!(
            row.detail
                .contains("first nvfp4 scale-factor mismatch at 0x40400000 (3e0)"),
            "{}",
            row.detail
        );
        let rcp = ConversionCheck {
            rcp_mismatches: 4,
            ..clean
        };
        let row = conversion_row(Ok(rcp));
        assert!(!row.passed);
        assert!(row.detail.contains("4 reciprocals"), "{}", row.detail);
        let normal = ConversionCheck {
            normal_rcp_mismatches: 3,
            ..clean
        };
        let row = conversion_row(Ok(normal));
        assert!(!row.passed);
        assert!(
            row.detail.contains("3 branch-free reciprocals differ"),
            "{}",
            row.detail
        );
        let err = conversion_row(Err(CudaError::Unrecoverable {
            detail: "gone".into(),
        }));
        assert!(
            !err.passed && err.detail.contains("could not run"),
            "{}",
            err.detail
        );
    }

    #[test]
    fn table_prints_a_dash_for_missing_figures_and_the_format_check_detail() {
        let row = conversion_row(Ok(ConversionCheck::default()));
        let report = SelftestReport {
            device: "d".into(),
            module: "m".into(),
            rows: vec![row],
        };
        let table = report.table();
        let line = table
            .lines()
            .find(|l| l.starts_with("number formats"))
            .expect("the format row");
        let figures: Vec<&str> = line.split_whitespace().rev().take(2).collect();
        assert_eq!(figures, ["-", "-"], "{table}");
        assert!(table.contains("0 e4m3 codes differ"), "{table}");
        assert!(report.passed());
    }

    #[test]
    fn report_fails_on_any_failed_row_and_when_empty() {
        let row = |passed| SelftestRow {
            case: "c".into(),
            check: "k".into(),
            passed,
            max_abs_err: 0.0,
            rel_l2_err: 0.0,
            detail: "d".into(),
        };
        let mut r = SelftestReport::default();
        assert!(!r.passed(), "an empty self-test proves nothing");
        r.rows.push(row(true));
        assert!(r.passed());
        r.rows.push(row(false));
        assert!(!r.passed());
        assert_eq!(r.failures(), 1);
        assert!(r.table().contains("FAIL"));
    }

    #[test]
    fn selftest_without_a_driver_is_an_error_not_a_panic() {
        if super::super::library::driver_available() {
            return;
        }
        let err = selftest(&SelftestOptions::default()).unwrap_err();
        assert!(matches!(err, CudaError::DriverLibraryMissing), "{err}");
    }
}
