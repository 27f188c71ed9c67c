//! What the compiler gave each kernel (registers, stack, spills, static shared memory), read from
//! ptxas's verbose report, and the budgets the kernels' timings were measured under.
//!
//! NVRTC runs ptxas with `--ptxas-options=-v` for every CUBIN target ([`super::compile`]), so a
//! build's log carries the report, and the compile cache keeps the log beside the module. Two
//! kinds of budget are checked:
//! - No kernel spills registers to local memory, and the attention kernels (decode, merge,
//!   baseline) use no stack at all. A spill inside a main loop costs far more than the registers
//!   it frees.
//! - On Hopper, for the reference workload (head 128, GQA group 8): one merge CTA of the most
//!   warps it is launched with fits beside a full SM of the decode kernels that long sequences
//!   run (a BF16 cache at 2 stages, an e4m3 cache at 4). The merge kernel is launched while the
//!   decode grid runs (PDL), so its CTAs are then placed at once and start the moment the grid
//!   ends. On an H200, keeping the merge off full SMs made BF16 b1 s65536 3.5 % slower and b1
//!   s16384 7 % (bench/gpu/NOTES.md, run 104); v29's first form had lost that room to 8 more
//!   registers in the merge.
//!
//! The budgets are about speed, not correctness: a build that misses one is a warning in a run's
//! log, and an error for `decodebench precompile --strict` (CI).

use super::launch::{
    decode_mma_kernel_name, merge_kernel_name, mma_geometry, mma_stage_counts, DECODE_INPUTS,
    MERGE_WARPS, OUTPUTS,
};
use crate::workload::Dtype;
use std::collections::HashMap;
use std::fmt::Write as _;

/// One kernel as ptxas reports it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KernelResources {
    pub name: String,
    /// Registers per thread.
    pub registers: u32,
    /// Local memory per thread for the kernel's own frame (spills and local arrays).
    pub stack_frame_bytes: u32,
    /// Stack per thread with the frames of the device functions it calls that were not inlined
    /// (ptxas prints it only where there is one).
    pub cumulative_stack_bytes: u32,
    pub spill_store_bytes: u32,
    pub spill_load_bytes: u32,
    /// Shared memory the kernel declares statically (the dynamic part is the launch's).
    pub static_smem_bytes: u32,
}

impl KernelResources {
    fn spills(&self) -> bool {
        self.spill_store_bytes > 0 || self.spill_load_bytes > 0
    }

    /// Local memory per thread, its callees' frames included.
    fn stack_bytes(&self) -> u32 {
        self.stack_frame_bytes.max(self.cumulative_stack_bytes)
    }
}

/// The kernels of ptxas's `-v` report in `log`, in the order ptxas compiled them; empty when the
/// log has none (a PTX target, or a module from a cache that predates the report).
pub fn parse_ptxas_report(log: &str) -> Vec<KernelResources> {
    let mut kernels: Vec<KernelResources> = Vec::new();
    let mut frames: HashMap<String, (u32, u32, u32)> = HashMap::new();
    let mut entry: Option<usize> = None;
    let mut properties_of: Option<String> = None;
    for line in log.lines() {
        if let Some(name) = quoted_after(line, "Compiling entry function '") {
            kernels.push(KernelResources {
                name: name.to_string(),
                ..KernelResources::default()
            });
            entry = Some(kernels.len() - 1);
        } else if let Some(i) = line.find("Function properties for ") {
            properties_of = Some(
                line[i + "Function properties for ".len()..]
                    .trim()
                    .to_string(),
            );
        } else if line.contains("bytes stack frame") {
            // Device functions that were not inlined get their own properties; only the
            // entries' are kept (a callee's frame, its spills included, is in its caller's
            // cumulative stack size).
            if let Some(name) = properties_of.take() {
                frames.insert(
                    name,
                    (
                        number_before(line, " bytes stack frame").unwrap_or(0),
                        number_before(line, " bytes spill stores").unwrap_or(0),
                        number_before(line, " bytes spill loads").unwrap_or(0),
                    ),
                );
            }
        } else if let Some(registers) = number_before(line, " registers") {
            if let Some(k) = entry.and_then(|i| kernels.get_mut(i)) {
                k.registers = registers;
                k.static_smem_bytes = number_before(line, " bytes smem").unwrap_or(0);
                k.cumulative_stack_bytes =
                    number_before(line, " bytes cumulative stack size").unwrap_or(0);
            }
        }
    }
    for k in &mut kernels {
        if let Some(&(frame, stores, loads)) = frames.get(&k.name) {
            k.stack_frame_bytes = frame;
            k.spill_store_bytes = stores;
            k.spill_load_bytes = loads;
        }
    }
    kernels
}

/// The text between `prefix` and the next `'` in `line`.
fn quoted_after<'a>(line: &'a str, prefix: &str) -> Option<&'a str> {
    let start = line.find(prefix)? + prefix.len();
    let len = line[start..].find('\'')?;
    Some(&line[start..start + len])
}

/// The unsigned number written just before `phrase` in `line` (`"used 1 barriers, 128 bytes
/// smem"`, `" bytes smem"` -> 128).
fn number_before(line: &str, phrase: &str) -> Option<u32> {
    let head = line[..line.find(phrase)?].trim_end();
    let start = head
        .rfind(|c: char| !c.is_ascii_digit())
        .map_or(0, |i| i + 1);
    head[start..].parse().ok()
}

/// What one SM offers the CTAs placed on it, as the CUDA occupancy calculator counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SmLimits {
    pub registers: u32,
    /// Registers are given to a warp in multiples of this.
    pub warp_register_unit: u32,
    pub max_warps: u32,
    pub max_ctas: u32,
    pub smem_bytes: u32,
    /// Shared memory the system keeps for each resident CTA.
    pub smem_reserved_per_cta: u32,
}

/// Compute capability 9.0 (H100, H200).
pub(crate) const HOPPER_SM: SmLimits = SmLimits {
    registers: 64 * 1024,
    warp_register_unit: 256,
    max_warps: 64,
    max_ctas: 32,
    smem_bytes: 228 * 1024,
    smem_reserved_per_cta: 1024,
};

/// What one CTA of a kernel takes from an SM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CtaCost {
    pub warps: u32,
    pub registers: u32,
    pub smem_bytes: u32,
}

impl SmLimits {
    pub(crate) fn cta_cost(&self, k: &KernelResources, threads: u32, dynamic_smem: u32) -> CtaCost {
        let warps = threads.div_ceil(32);
        let unit = self.warp_register_unit.max(1);
        let per_warp = (k.registers * 32).div_ceil(unit) * unit;
        CtaCost {
            warps,
            registers: warps * per_warp,
            smem_bytes: k.static_smem_bytes + dynamic_smem + self.smem_reserved_per_cta,
        }
    }

    /// CTAs of one kernel an SM holds at once.
    pub(crate) fn ctas_per_sm(&self, c: CtaCost) -> u32 {
        let by = |have: u32, need: u32| have.checked_div(need).unwrap_or(u32::MAX);
        by(self.registers, c.registers)
            .min(by(self.smem_bytes, c.smem_bytes))
            .min(by(self.max_warps, c.warps))
            .min(self.max_ctas)
    }

    /// Whether one CTA of `other` fits on an SM that holds `n` CTAs of `full`.
    pub(crate) fn fits_beside(&self, full: CtaCost, n: u32, other: CtaCost) -> bool {
        n * full.registers + other.registers <= self.registers
            && n * full.smem_bytes + other.smem_bytes <= self.smem_bytes
            && n * full.warps + other.warps <= self.max_warps
            && n < self.max_ctas
    }
}

/// One decode kernel of the reference workload on a full SM, and whether a merge CTA fits beside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoResidency {
    pub decode: String,
    pub merge: String,
    pub decode_registers: u32,
    pub decode_ctas_per_sm: u32,
    /// Registers of the SM left once `decode_ctas_per_sm` decode CTAs are placed.
    pub registers_left: u32,
    /// Registers one merge CTA of [`MERGE_WARPS`] warps takes.
    pub merge_cta_registers: u32,
    pub merge_fits: bool,
    /// Whether the timings were measured with the merge fitting (a budget).
    pub budgeted: bool,
}

/// Head size and GQA group of the reference workload (the vLLM script's 64 query and 8 kv heads
/// of 128), for which the co-residency budget is stated.
const REFERENCE_HEAD: u32 = 128;
const REFERENCE_GROUP: u32 = 8;

/// Whether the merge was measured fitting beside the decode kernel at `depth` for a `kv` cache:
/// the depths that long sequences are timed fastest with (BF16: 2 stages, three CTAs an SM;
/// e4m3: 4 stages, three CTAs). The shallower e4m3 depths fit four or five CTAs an SM and leave
/// no room by design: they win where CTAs are short and many.
fn coresidency_budgeted(kv: Dtype, depth: u32) -> bool {
    match kv {
        Dtype::Fp8 => depth == 4,
        _ => depth == 2,
    }
}

/// The resources of one build and the budgets they meet or miss.
#[derive(Debug, Clone, Default)]
pub struct ResourceReport {
    /// The compile target, e.g. `sm_90a`.
    pub arch: String,
    pub kernels: Vec<KernelResources>,
    /// For Hopper only: the reference workload's decode kernels and the merge beside them.
    pub coresidency: Vec<CoResidency>,
    /// Each missed budget, as a sentence that says what to do.
    pub violations: Vec<String>,
}

impl ResourceReport {
    /// Checks the kernels of ptxas's report for `arch` against the budgets; `expected` are the
    /// kernels the module must define (a report without one of them is a parse problem, said as
    /// such).
    pub fn check(arch: &str, kernels: Vec<KernelResources>, expected: &[String]) -> ResourceReport {
        let mut violations = Vec::new();
        let by_name: HashMap<&str, &KernelResources> =
            kernels.iter().map(|k| (k.name.as_str(), k)).collect();
        let missing: Vec<&str> = expected
            .iter()
            .map(String::as_str)
            .filter(|n| !by_name.contains_key(n))
            .collect();
        if !missing.is_empty() {
            violations.push(format!(
                "ptxas's report has no entry for {} of the module's kernels ({}{}): the report's \
                 format may have changed with this NVRTC; the budgets below were not checked for \
                 them",
                missing.len(),
                missing[..missing.len().min(3)].join(", "),
                if missing.len() > 3 { ", ..." } else { "" }
            ));
        }
        for k in &kernels {
            if k.spills() {
                violations.push(format!(
                    "{} spills registers ({} bytes stored, {} loaded per thread at {} registers): \
                     the kernels are tuned with none; reduce what the kernel keeps live or raise \
                     its __launch_bounds__ register limit",
                    k.name, k.spill_store_bytes, k.spill_load_bytes, k.registers
                ));
            } else if is_attention_kernel(&k.name) && k.stack_bytes() > 0 {
                violations.push(format!(
                    "{} has a {}-byte stack (local memory: an array indexed at run time, or a call \
                     that was not inlined); the attention kernels keep everything in registers \
                     and shared memory",
                    k.name,
                    k.stack_bytes()
                ));
            }
        }
        let coresidency = if arch.starts_with("sm_90") {
            hopper_coresidency(&by_name)
        } else {
            Vec::new()
        };
        for c in coresidency.iter().filter(|c| c.budgeted && !c.merge_fits) {
            violations.push(format!(
                "one {}-warp {} CTA ({} registers) no longer fits beside {} CTAs of {} ({} registers \
                 each thread, {} of the SM's registers left): the merge then waits for decode CTAs \
                 to leave, which made BF16 b1 s65536 3.5 % slower on an H200 (bench/gpu/NOTES.md \
                 run 104); bring the merge back under the budget or measure the cost before \
                 accepting it",
                MERGE_WARPS,
                c.merge,
                c.merge_cta_registers,
                c.decode_ctas_per_sm,
                c.decode,
                c.decode_registers,
                c.registers_left
            ));
        }
        ResourceReport {
            arch: arch.to_string(),
            kernels,
            coresidency,
            violations,
        }
    }

    /// A few lines for a person: the range of registers, what spills or has a stack, the
    /// co-residency table (Hopper) and every missed budget.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        if self.kernels.is_empty() {
            let why = if self.arch.starts_with("sm_") {
                "the module came from the cache without its compile log; precompile into an \
                 empty cache directory to see it"
            } else {
                "a PTX module is finished by the driver, which assigns registers at load"
            };
            let _ = writeln!(
                s,
                "kernel resources: no ptxas report for {} ({why})",
                self.arch
            );
            return s;
        }
        let regs = self.kernels.iter().map(|k| k.registers);
        let (lo, hi) = (regs.clone().min().unwrap_or(0), regs.max().unwrap_or(0));
        let spilling = self.kernels.iter().filter(|k| k.spills()).count();
        let framed: Vec<String> = self
            .kernels
            .iter()
            .filter(|k| k.stack_bytes() > 0)
            .map(|k| format!("{} ({} bytes)", k.name, k.stack_bytes()))
            .collect();
        let _ = writeln!(
            s,
            "kernel resources ({}, ptxas): {} kernels, {lo}-{hi} registers a thread, {} spilling, \
             stacks: {}",
            self.arch,
            self.kernels.len(),
            spilling,
            if framed.is_empty() {
                "none".to_string()
            } else {
                framed.join(", ")
            }
        );
        if !self.coresidency.is_empty() {
            let _ = writeln!(
                s,
                "merge beside a full SM of decode CTAs (head {REFERENCE_HEAD}, group \
                 {REFERENCE_GROUP}; * = budget):"
            );
            for c in &self.coresidency {
                let _ = writeln!(
                    s,
                    "  {}{:<40} {:>3} regs, {} CTAs/SM, {:>5} registers left: {} ({} needs {})",
                    if c.budgeted { "* " } else { "  " },
                    c.decode,
                    c.decode_registers,
                    c.decode_ctas_per_sm,
                    c.registers_left,
                    if c.merge_fits { "fits" } else { "no room" },
                    c.merge,
                    c.merge_cta_registers
                );
            }
        }
        if self.violations.is_empty() {
            let _ = writeln!(s, "budgets: all met");
        } else {
            for v in &self.violations {
                let _ = writeln!(s, "budget missed: {v}");
            }
        }
        s
    }

    /// Every kernel as CSV (`kernel,registers,stack_frame_bytes,cumulative_stack_bytes,
    /// spill_store_bytes,spill_load_bytes,static_smem_bytes`), for tracking a build's resources
    /// over time.
    pub fn csv(&self) -> String {
        let mut s = String::from(
            "kernel,registers,stack_frame_bytes,cumulative_stack_bytes,spill_store_bytes,\
             spill_load_bytes,static_smem_bytes\n",
        );
        for k in &self.kernels {
            let _ = writeln!(
                s,
                "{},{},{},{},{},{},{}",
                k.name,
                k.registers,
                k.stack_frame_bytes,
                k.cumulative_stack_bytes,
                k.spill_store_bytes,
                k.spill_load_bytes,
                k.static_smem_bytes
            );
        }
        s
    }
}

/// The kernels that attention cases time: the optimized decode (tensor-core and FMA), the merge
/// and the baseline.
fn is_attention_kernel(name: &str) -> bool {
    ["decode_", "merge_", "baseline_"]
        .iter()
        .any(|p| name.starts_with(p))
}

fn hopper_coresidency(by_name: &HashMap<&str, &KernelResources>) -> Vec<CoResidency> {
    let sm = HOPPER_SM;
    let mut rows = Vec::new();
    for (q, kv) in DECODE_INPUTS {
        for out in OUTPUTS {
            let merge_name = merge_kernel_name(REFERENCE_HEAD, out);
            let Some(merge) = by_name.get(merge_name.as_str()) else {
                continue;
            };
            let merge_cost = sm.cta_cost(merge, MERGE_WARPS * 32, 0);
            for &depth in mma_stage_counts(kv) {
                let name =
                    decode_mma_kernel_name(REFERENCE_HEAD, REFERENCE_GROUP, q, kv, out, depth);
                let (Some(decode), Some(geometry)) = (
                    by_name.get(name.as_str()),
                    mma_geometry(REFERENCE_HEAD, REFERENCE_GROUP, kv, depth),
                ) else {
                    continue;
                };
                let cost = sm.cta_cost(decode, geometry.threads(), geometry.smem_bytes);
                let n = sm.ctas_per_sm(cost);
                rows.push(CoResidency {
                    decode: name,
                    merge: merge_name.clone(),
                    decode_registers: decode.registers,
                    decode_ctas_per_sm: n,
                    registers_left: sm.registers.saturating_sub(n * cost.registers),
                    merge_cta_registers: merge_cost.registers,
                    merge_fits: sm.fits_beside(cost, n, merge_cost),
                    budgeted: coresidency_budgeted(kv, depth),
                });
            }
        }
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ptxas's `-v` lines as NVRTC 13.0 writes them for sm_90a (two kernels of this module, one
    /// with a stack frame, and a device function that was not inlined).
    const REPORT: &str = "\
ptxas info    : 61 bytes gmem
ptxas info    : Compiling entry function 'decode_mma_d128_g8_bf16_bf16_bf16_s2' for 'sm_90a'
ptxas info    : Function properties for decode_mma_d128_g8_bf16_bf16_bf16_s2
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 128 registers, used 1 barriers, 128 bytes smem
ptxas info    : Compile time = 7.094 ms
ptxas info    : Function properties for helper_not_inlined
ptxas         .     16 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
ptxas info    : Compiling entry function 'generate_kv_bf16' for 'sm_90a'
ptxas info    : Function properties for generate_kv_bf16
ptxas         .     32 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 30 registers, used 0 barriers, 32 bytes cumulative stack size
ptxas info    : Compiling entry function 'merge_d128_bf16' for 'sm_90a'
ptxas info    : Function properties for merge_d128_bf16
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 64 registers, used 1 barriers, 4096 bytes smem
";

    fn kernel(name: &str, registers: u32, smem: u32) -> KernelResources {
        KernelResources {
            name: name.into(),
            registers,
            static_smem_bytes: smem,
            ..KernelResources::default()
        }
    }

    /// The reference workload's decode kernels at every depth and output, and its merges, with
    /// the registers of v29b's build (BF16 128, e4m3 96 / 124 / 126 at 2 / 3 / 4 stages).
    fn reference_build(merge_registers: u32) -> Vec<KernelResources> {
        let mut ks = Vec::new();
        for (q, kv) in DECODE_INPUTS {
            for out in OUTPUTS {
                for &depth in mma_stage_counts(kv) {
                    let regs = match (kv, depth) {
                        (Dtype::Fp8, 2) => 96,
                        (Dtype::Fp8, 3) => 124,
                        (Dtype::Fp8, _) => 126,
                        _ => 128,
                    };
                    ks.push(kernel(
                        &decode_mma_kernel_name(128, 8, q, kv, out, depth),
                        regs,
                        128,
                    ));
                }
            }
        }
        for out in OUTPUTS {
            ks.push(kernel(&merge_kernel_name(128, out), merge_registers, 4096));
        }
        ks
    }

    #[test]
    fn the_report_gives_each_entry_its_registers_frame_and_shared_memory() {
        let ks = parse_ptxas_report(REPORT);
        let names: Vec<&str> = ks.iter().map(|k| k.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "decode_mma_d128_g8_bf16_bf16_bf16_s2",
                "generate_kv_bf16",
                "merge_d128_bf16"
            ]
        );
        assert_eq!(
            ks[0],
            kernel("decode_mma_d128_g8_bf16_bf16_bf16_s2", 128, 128)
        );
        assert_eq!(ks[1].registers, 30);
        assert_eq!(ks[1].stack_frame_bytes, 32);
        assert_eq!(ks[1].cumulative_stack_bytes, 32);
        assert_eq!(ks[1].static_smem_bytes, 0);
        assert_eq!(ks[2], kernel("merge_d128_bf16", 64, 4096));
        assert!(parse_ptxas_report("").is_empty());
        assert!(parse_ptxas_report("warning: something else entirely\n").is_empty());
    }

    #[test]
    fn a_stack_frame_is_allowed_outside_the_attention_kernels_and_a_spill_nowhere() {
        let ks = parse_ptxas_report(REPORT);
        let expected: Vec<String> = ks.iter().map(|k| k.name.clone()).collect();
        let r = ResourceReport::check("sm_80", ks.clone(), &expected);
        assert!(r.violations.is_empty(), "{:?}", r.violations);
        assert!(
            r.coresidency.is_empty(),
            "the co-residency budget is Hopper's"
        );

        let mut spilled = ks.clone();
        spilled[0].spill_store_bytes = 8;
        let r = ResourceReport::check("sm_80", spilled, &expected);
        assert_eq!(r.violations.len(), 1, "{:?}", r.violations);
        assert!(r.violations[0].contains("decode_mma_d128_g8_bf16_bf16_bf16_s2 spills"));

        let mut framed = ks.clone();
        framed[2].stack_frame_bytes = 16;
        let r = ResourceReport::check("sm_80", framed, &expected);
        assert_eq!(r.violations.len(), 1, "{:?}", r.violations);
        assert!(r.violations[0].contains("merge_d128_bf16 has a 16-byte stack"));

        // A call that was not inlined: the entry's own frame is empty, its cumulative stack is
        // the callee's (whose spills ptxas lists under the callee's name).
        let mut calling = ks;
        calling[0].cumulative_stack_bytes = 24;
        let r = ResourceReport::check("sm_80", calling, &expected);
        assert_eq!(r.violations.len(), 1, "{:?}", r.violations);
        assert!(
            r.violations[0].contains("decode_mma_d128_g8_bf16_bf16_bf16_s2 has a 24-byte stack")
        );
    }

    #[test]
    fn a_kernel_missing_from_the_report_is_named() {
        let ks = parse_ptxas_report(REPORT);
        let expected = vec!["merge_d128_bf16".to_string(), "merge_d128_fp8".to_string()];
        let r = ResourceReport::check("sm_80", ks, &expected);
        assert_eq!(r.violations.len(), 1, "{:?}", r.violations);
        assert!(r.violations[0].contains("no entry for 1 of"));
        assert!(r.violations[0].contains("merge_d128_fp8"));
    }

    #[test]
    fn hopper_occupancy_matches_the_measured_placement() {
        // The BF16 2-stage kernel: 128 registers x 128 threads, 67712 bytes of dynamic shared
        // memory: three CTAs an SM (by shared memory), leaving 16384 registers, exactly one
        // 8-warp merge CTA at 64 registers (docs/GPU.md).
        let sm = HOPPER_SM;
        let g = mma_geometry(128, 8, Dtype::Bf16, 2).unwrap();
        let decode = sm.cta_cost(&kernel("d", 128, 128), g.threads(), g.smem_bytes);
        assert_eq!(decode.registers, 16384);
        assert_eq!(sm.ctas_per_sm(decode), 3);
        let merge = sm.cta_cost(&kernel("m", 64, 4096), 256, 0);
        assert_eq!(merge.registers, 16384);
        assert!(sm.fits_beside(decode, 3, merge));
        // 65 registers round up to 72 a thread (2304 a warp): no longer fits.
        assert!(!sm.fits_beside(decode, 3, sm.cta_cost(&kernel("m", 65, 4096), 256, 0)));
        // The 2-stage e4m3 kernel at 96 registers: five CTAs an SM, by registers.
        let g = mma_geometry(128, 8, Dtype::Fp8, 2).unwrap();
        let fp8 = sm.cta_cost(&kernel("d", 96, 128), g.threads(), g.smem_bytes);
        assert_eq!(sm.ctas_per_sm(fp8), 5);
        assert!(!sm.fits_beside(fp8, 5, merge));
    }

    #[test]
    fn the_coresidency_budget_holds_at_64_merge_registers_and_fails_at_72() {
        let expected: Vec<String> = reference_build(64).iter().map(|k| k.name.clone()).collect();
        let r = ResourceReport::check("sm_90a", reference_build(64), &expected);
        assert!(r.violations.is_empty(), "{:?}", r.violations);
        assert_eq!(r.coresidency.len(), 24);
        let budgeted: Vec<&CoResidency> = r.coresidency.iter().filter(|c| c.budgeted).collect();
        assert_eq!(
            budgeted.len(),
            9,
            "BF16 at 2 stages and e4m3 at 4, three outputs each"
        );
        assert!(budgeted
            .iter()
            .all(|c| c.merge_fits && c.decode_ctas_per_sm == 3));
        // The shallower e4m3 depths have no room, by design, and that is no violation.
        assert!(r
            .coresidency
            .iter()
            .any(|c| !c.budgeted && !c.merge_fits && c.decode.ends_with("_s2")));

        // v29's first form: the merge at 72 registers.
        let r = ResourceReport::check("sm_90a", reference_build(72), &expected);
        assert_eq!(r.violations.len(), 9, "{:?}", r.violations);
        assert!(r.violations[0].contains("no longer fits beside 3 CTAs of"));
        assert!(r.summary().contains("budget missed"));
        assert!(r.summary().contains("no room"));
    }

    #[test]
    fn the_summary_and_csv_list_what_was_reported() {
        let ks = parse_ptxas_report(REPORT);
        let r = ResourceReport::check("sm_90a", ks, &[]);
        let s = r.summary();
        assert!(
            s.contains("3 kernels, 30-128 registers a thread, 0 spilling"),
            "{s}"
        );
        assert!(s.contains("generate_kv_bf16 (32 bytes)"), "{s}");
        assert!(s.contains("budgets: all met"), "{s}");
        let csv = r.csv();
        assert_eq!(csv.lines().count(), 4);
        assert!(csv.contains("\nmerge_d128_bf16,64,0,0,0,0,4096\n"), "{csv}");
        assert!(csv.contains("\ngenerate_kv_bf16,30,32,32,0,0,0\n"), "{csv}");
        let ptx = ResourceReport::check("compute_90", Vec::new(), &[]);
        assert!(ptx
            .summary()
            .contains("no ptxas report for compute_90 (a PTX module"));
        let logless = ResourceReport::check("sm_90a", Vec::new(), &[]);
        assert!(logless.summary().contains("without its compile log"));
    }
}
