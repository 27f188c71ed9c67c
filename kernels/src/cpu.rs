//! The CPU backend: runs every case on the host with two real implementations, so the whole
//! pipeline (grid, scheduling, verification, timing, results) works and is tested on machines
//! without a GPU, and so a CPU can be compared with the fleet.
//!
//! - **Baseline**: Q and KV dequantized to bf16 values up front (as the reference script's
//!   baseline gets them), then a plain two-pass softmax per (sequence, query head) in f32 on one
//!   thread, bf16 output.
//! - **Optimized**: reads the stored bf16/fp8 values directly, one pass with an online softmax per
//!   (sequence, KV head) so each K/V row is decoded once for its whole GQA group, long sequences
//!   split into chunks that are merged afterwards, all cores busy, and the case's output dtype
//!   (bf16, fp8 or nvfp4) written by the kernel itself.
//!
//! Both are verified against the f64 reference before they are timed; a wrong one is reported as
//! such and not timed.

use crate::backend::{Backend, TelemetryProbe};
use crate::formats::{
    f32_to_e4m3, nvfp4_sf_offset, nvfp4_sf_shape, quantize_nvfp4_block, Nvfp4Tensor, E4M3_TABLE,
    NVFP4_BLOCK_ELEMS,
};
use crate::inputs::{
    available_cores, generate_host_inputs, CaseDims, HostInputs, HostTensor, InputError,
};
use crate::measurement::{CaseMeasurement, DeviceIdentity, KernelKind, KernelMeasurement, Status};
use crate::reference::{attention_f64, decode_output, verify_output, QuantizedOutput};
use crate::workload::{BenchCase, Dtype, MeasureMethod, Scales};
use half::bf16;
use half::vec::HalfBitsVecExt;
use sha2::{Digest, Sha256};
use std::borrow::Cow;
use std::hint::black_box;
use std::time::Instant;

/// Where Linux describes the CPU model.
const CPUINFO_PATH: &str = "/proc/cpuinfo";

/// Work units per thread the optimized kernel aims for: enough that uneven sequence lengths even
/// out across threads.
const SPLIT_TARGET_UNITS_PER_THREAD: usize = 4;

/// Shortest chunk of tokens a sequence is split into: below this, merging partial results costs
/// more than the parallelism gains.
const MIN_SPLIT_CHUNK_TOKENS: usize = 256;

/// Lanes of the f32 dot product: independent accumulators the compiler can keep in one vector
/// register, so the reduction vectorizes without reassociating a single sum.
const DOT_LANES: usize = 8;

/// Runs cases on the host CPU.
#[derive(Debug, Clone)]
pub struct CpuBackend {
    identity: DeviceIdentity,
    threads: usize,
    /// A fault drill armed for the next case ([`Backend::disturb_next_case`]).
    disturb_next: bool,
}

impl Default for CpuBackend {
    fn default() -> Self {
        CpuBackend::new()
    }
}

impl CpuBackend {
    /// A backend on this host, using every core it may run on.
    pub fn new() -> CpuBackend {
        let host = crate::host::host_name();
        let model = read_cpu_model().unwrap_or_else(|| "cpu".to_string());
        let uuid = format!("cpu-{}", hex::encode(&Sha256::digest(host.as_bytes())[..8]));
        CpuBackend {
            identity: DeviceIdentity {
                backend: "cpu".to_string(),
                name: model.clone(),
                uuid,
                sku: model,
                host,
                ..Default::default()
            },
            threads: available_cores(),
            disturb_next: false,
        }
    }

    /// Threads the optimized kernel splits its work over.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Both kernels of `case`; with `disturb`, the optimized kernel's output is corrupted from
    /// its second call on (a fault drill).
    fn measure_kernels(
        &self,
        case: &BenchCase,
        probe: &mut dyn TelemetryProbe,
        disturb: bool,
    ) -> Vec<KernelMeasurement> {
        let for_each_kernel = |status: Status, message: &str| {
            case.method
                .kernels
                .kinds()
                .iter()
                .map(|&k| KernelMeasurement::not_timed(k, status, message))
                .collect()
        };
        if let Some(reason) = case.quant.unsupported_reason() {
            return for_each_kernel(Status::Skipped, &reason);
        }
        let inputs = match generate_host_inputs(case) {
            Ok(inputs) => inputs,
            // A pool past the host limit is a memory limit, like a GPU's out-of-memory: recorded
            // as `oom`, not retried on other agents as a failure.
            Err(e @ InputError::PoolTooLarge { .. }) => {
                return for_each_kernel(Status::Oom, &e.to_string())
            }
            Err(e) => return for_each_kernel(Status::Failed, &e.to_string()),
        };
        let Ok(dims) = CaseDims::of(case) else {
            return for_each_kernel(Status::Failed, "case dimensions are invalid");
        };
        let reference = attention_f64(case, &inputs);
        let bytes = case.logical_bytes(&inputs.seq_lens);
        let scales = inputs.scales;
        let timing = KernelTiming {
            method: &case.method,
            reference: &reference,
            scales: &scales,
            bytes_per_call: bytes,
        };

        let threads = self.threads;
        let mut out = Vec::with_capacity(2);
        for &kind in case.method.kernels.kinds() {
            out.push(match kind {
                KernelKind::Baseline => {
                    let prepared = BaselineInputs::prepare(case, &inputs);
                    timing.measure(kind, Dtype::Bf16, probe, || {
                        QuantizedOutput::Bf16(run_baseline(&dims, &inputs, &prepared))
                    })
                }
                KernelKind::Optimized => {
                    let mut calls = 0u64;
                    timing.measure(kind, case.quant.out, probe, || {
                        calls += 1;
                        let out = run_optimized(&dims, case.quant.out, &inputs, threads);
                        if disturb && calls > 1 {
                            disturbed(out)
                        } else {
                            out
                        }
                    })
                }
            });
        }
        out
    }
}

impl Backend for CpuBackend {
    fn identity(&self) -> &DeviceIdentity {
        &self.identity
    }

    fn run_case(&mut self, case: &BenchCase, probe: &mut dyn TelemetryProbe) -> CaseMeasurement {
        let started = Instant::now();
        let disturb = std::mem::take(&mut self.disturb_next);
        let kernels = self.measure_kernels(case, probe, disturb);
        CaseMeasurement {
            case_id: case.id.clone(),
            kernels,
            wall_s: started.elapsed().as_secs_f64(),
        }
    }

    fn disturb_next_case(&mut self) -> Result<String, String> {
        self.disturb_next = true;
        Ok(
            "the next case's optimized kernel gives a corrupted output from its second call on"
                .into(),
        )
    }
}

/// `out` with its first element pushed far outside any tolerance (the `disturb:CASE` fault
/// drill): bf16 +64, e4m3 to its largest magnitude (or to 0 from it), the NVFP4 code to the
/// largest magnitude of the other sign.
fn disturbed(out: QuantizedOutput) -> QuantizedOutput {
    match out {
        QuantizedOutput::Bf16(mut v) => {
            if let Some(x) = v.first_mut() {
                *x = bf16::from_f32(x.to_f32() + 64.0);
            }
            QuantizedOutput::Bf16(v)
        }
        QuantizedOutput::Fp8(mut v) => {
            if let Some(x) = v.first_mut() {
                *x = if *x & 0x7f == 0x7e { 0x00 } else { 0x7e };
            }
            QuantizedOutput::Fp8(v)
        }
        QuantizedOutput::Nvfp4(mut t) => {
            if let Some(x) = t.packed.first_mut() {
                let code = if *x & 0x08 == 0 { 0x0f } else { 0x07 };
                *x = (*x & 0xf0) | code;
            }
            QuantizedOutput::Nvfp4(t)
        }
    }
}

/// What every kernel of one case is verified against and timed with.
struct KernelTiming<'a> {
    method: &'a MeasureMethod,
    reference: &'a [f64],
    scales: &'a Scales,
    bytes_per_call: u64,
}

impl KernelTiming<'_> {
    /// Verifies one output of `run`, then times it: warm-up calls, then at least `trials` timed
    /// calls (more under noise-based stopping), with the probe around the timed ones; then
    /// verifies the last timed call's output too (calls that disturb each other pass the first
    /// check alone).
    fn measure(
        &self,
        kind: KernelKind,
        out_dtype: Dtype,
        probe: &mut dyn TelemetryProbe,
        mut run: impl FnMut() -> QuantizedOutput,
    ) -> KernelMeasurement {
        let verify = |output: &QuantizedOutput| {
            verify_output(
                &decode_output(output, self.scales),
                self.reference,
                out_dtype,
                self.scales,
            )
        };
        let output = run();
        let verification = verify(&output);
        if !verification.passed {
            let mut m = KernelMeasurement::not_timed(
                kind,
                Status::WrongResult,
                format!(
                    "cpu {} kernel disagrees with the f64 reference: {}",
                    kind.as_str(),
                    verification.detail
                ),
            );
            m.accuracy = Some(verification.accuracy);
            m.bytes_per_call = self.bytes_per_call;
            return m;
        }
        drop(output);

        let method = self.method;
        for _ in 0..method.warmup {
            black_box(run());
        }
        let min_trials = method.trials.max(1) as usize;
        let mut samples_ms = Vec::with_capacity(min_trials);
        let mut running = RunningMean::default();
        probe.begin();
        let started = Instant::now();
        // The last timed call's output (every iteration sets it before it can stop).
        let mut last;
        loop {
            let t0 = Instant::now();
            let out = run();
            let ms = t0.elapsed().as_secs_f64() * 1e3;
            last = black_box(out);
            samples_ms.push(ms);
            running.push(ms);
            if samples_ms.len() < min_trials {
                continue;
            }
            let Some(target) = method.target_rse else {
                break;
            };
            if running.rse() <= target
                || samples_ms.len() >= method.max_trials.max(1) as usize
                || started.elapsed().as_secs_f64() >= method.max_time_s
            {
                break;
            }
        }
        let telemetry = probe.end(samples_ms.len() as u64);
        let mut m = KernelMeasurement {
            kernel: Some(kind),
            status: Some(Status::Ok),
            samples_ms,
            accuracy: Some(verification.accuracy),
            bytes_per_call: self.bytes_per_call,
            rse_target_met: method.target_rse.map(|t| running.rse() <= t),
            throttled: telemetry.throttled(),
            telemetry,
            ..Default::default()
        };
        m.finish_stats(None);
        let after = verify(&last);
        if !after.passed {
            return m.wrong_after_timing(after.accuracy, &after.detail);
        }
        m
    }
}

/// Mean and relative standard error of the mean, updated per sample (Welford), so noise-based
/// stopping does not re-sort the samples after every trial.
#[derive(Debug, Default)]
struct RunningMean {
    n: f64,
    mean: f64,
    m2: f64,
}

impl RunningMean {
    fn push(&mut self, x: f64) {
        self.n += 1.0;
        let delta = x - self.mean;
        self.mean += delta / self.n;
        self.m2 += delta * (x - self.mean);
    }

    /// std / sqrt(n) / mean, with the sample (n-1) standard deviation; infinite until n >= 2.
    fn rse(&self) -> f64 {
        if self.n < 2.0 || self.mean <= 0.0 {
            return f64::INFINITY;
        }
        (self.m2 / (self.n - 1.0)).sqrt() / self.n.sqrt() / self.mean
    }
}

/// The model name of the first CPU in /proc/cpuinfo, if there is one.
fn read_cpu_model() -> Option<String> {
    let info = std::fs::read_to_string(CPUINFO_PATH).ok()?;
    info.lines()
        .filter_map(|line| line.split_once(':'))
        .find(|(key, _)| {
            let key = key.trim();
            key.eq_ignore_ascii_case("model name") || key == "Hardware"
        })
        .map(|(_, value)| value.trim().to_string())
        .filter(|v| !v.is_empty())
}

/// The baseline's inputs: Q and the KV pool as bf16 values with the per-tensor scales applied, as
/// the reference script hands its baseline `kv_cache.to(bf16) * scale`. Pages no sequence reads
/// are left zero. A bf16 pool with unit scales is used as it is.
#[derive(Debug, Clone)]
struct BaselineInputs<'a> {
    q: Vec<bf16>,
    kv_cache: Cow<'a, [bf16]>,
}

impl<'a> BaselineInputs<'a> {
    /// Dequantizes `inputs` (which must match `case`) for the baseline.
    fn prepare(case: &BenchCase, inputs: &'a HostInputs) -> BaselineInputs<'a> {
        let s = &inputs.scales;
        let q_len = inputs.q.len();
        let q = (0..q_len)
            .map(|i| bf16::from_f32(inputs.q.raw(i) * s.q_scale))
            .collect();
        let kv_cache = match &inputs.kv_cache {
            HostTensor::Bf16(v) if s.k_scale == 1.0 && s.v_scale == 1.0 => Cow::Borrowed(&v[..]),
            stored => {
                let Ok(dims) = CaseDims::of(case) else {
                    return BaselineInputs {
                        q,
                        kv_cache: Cow::Owned(Vec::new()),
                    };
                };
                let page_elems = dims.page_elems();
                let half = page_elems / 2;
                // Zeroed allocation: unread pages cost no physical memory.
                let mut pool = vec![0u16; stored.len()].reinterpret_into::<bf16>();
                for page in inputs.referenced_pages(dims.block) {
                    let base = page * page_elems;
                    // Both layouts put the K half of a page before its V half.
                    for (i, x) in pool[base..base + page_elems].iter_mut().enumerate() {
                        let scale = if i < half { s.k_scale } else { s.v_scale };
                        *x = bf16::from_f32(stored.raw(base + i) * scale);
                    }
                }
                Cow::Owned(pool)
            }
        };
        BaselineInputs { q, kv_cache }
    }
}

/// The baseline kernel: for each (sequence, query head), logits for every token, then their max,
/// then exp and sum, then the weighted sum of V rows — f32 on one thread — written as bf16.
fn run_baseline(dims: &CaseDims, inputs: &HostInputs, prepared: &BaselineInputs) -> Vec<bf16> {
    let (head, group) = (dims.head, dims.group());
    let sm_scale = inputs.scales.sm_scale;
    let kv = &prepared.kv_cache[..];
    let mut out = Vec::with_capacity(dims.batch * dims.qo_heads * head);
    let mut logits = Vec::new();
    let mut acc = vec![0.0f32; head];
    for (b, &len) in inputs.seq_lens.iter().enumerate() {
        let len = len as usize;
        for h in 0..dims.qo_heads {
            let kv_head = h / group;
            let q = &prepared.q[(b * dims.qo_heads + h) * head..][..head];
            logits.clear();
            for t in 0..len {
                let page = inputs.page_of(b, t, dims.block);
                let k = &kv[dims.kv_offset(page, 0, kv_head, t % dims.block)..][..head];
                let dot: f32 = q.iter().zip(k).map(|(a, b)| a.to_f32() * b.to_f32()).sum();
                logits.push(dot * sm_scale);
            }
            let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0f32;
            for l in logits.iter_mut() {
                *l = (*l - max).exp();
                sum += *l;
            }
            acc.fill(0.0);
            for (t, &p) in logits.iter().enumerate() {
                let page = inputs.page_of(b, t, dims.block);
                let v = &kv[dims.kv_offset(page, 1, kv_head, t % dims.block)..][..head];
                for (a, x) in acc.iter_mut().zip(v) {
                    *a += p * x.to_f32();
                }
            }
            out.extend(acc.iter().map(|&a| bf16::from_f32(a / sum)));
        }
    }
    out
}

/// Runs the baseline kernel on `inputs` (which must match `case`), preparing its bf16 inputs
/// first. Exposed so tests and other backends can compare against it.
pub fn baseline_attention(case: &BenchCase, inputs: &HostInputs) -> Vec<bf16> {
    let Ok(dims) = CaseDims::of(case) else {
        return Vec::new();
    };
    let prepared = BaselineInputs::prepare(case, inputs);
    run_baseline(&dims, inputs, &prepared)
}

/// Runs the optimized kernel on `inputs` (which must match `case`) over `threads` threads and
/// returns the output in the case's output dtype.
pub fn optimized_attention(
    case: &BenchCase,
    inputs: &HostInputs,
    threads: usize,
) -> QuantizedOutput {
    match CaseDims::of(case) {
        Ok(dims) => run_optimized(&dims, case.quant.out, inputs, threads),
        Err(_) => QuantizedOutput::Bf16(Vec::new()),
    }
}

/// One work unit of the optimized kernel: a chunk of one sequence's tokens for one KV head.
#[derive(Debug, Clone, Copy)]
struct WorkUnit {
    b: usize,
    kv_head: usize,
    tokens: (usize, usize),
}

/// The online-softmax state of one query head over some tokens: running max, sum of
/// `exp(logit - max)` and the V rows weighted the same way (raw stored units, V scale not yet
/// applied).
struct PartialSoftmax<'a> {
    max: &'a mut [f32],
    sum: &'a mut [f32],
    acc: &'a mut [f32],
}

fn run_optimized(
    dims: &CaseDims,
    out_dtype: Dtype,
    inputs: &HostInputs,
    threads: usize,
) -> QuantizedOutput {
    let (group, head) = (dims.group(), dims.head);
    let threads = threads.max(1);
    let units = split_work(dims, &inputs.seq_lens, threads);
    let per_unit = group * head;
    // Each thread takes every `threads`-th unit and keeps its partial results in its own buffers.
    let partials: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads.min(units.len()))
            .map(|worker| {
                let units = &units;
                scope.spawn(move || {
                    let mine = units.len().saturating_sub(worker).div_ceil(threads);
                    let mut max = vec![f32::NEG_INFINITY; mine * group];
                    let mut sum = vec![0.0f32; mine * group];
                    let mut acc = vec![0.0f32; mine * per_unit];
                    let mut scratch = UnitScratch::new(group, head);
                    for (slot, unit) in units.iter().skip(worker).step_by(threads).enumerate() {
                        let state = PartialSoftmax {
                            max: &mut max[slot * group..][..group],
                            sum: &mut sum[slot * group..][..group],
                            acc: &mut acc[slot * per_unit..][..per_unit],
                        };
                        attend_unit(dims, inputs, unit, state, &mut scratch);
                    }
                    (max, sum, acc)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect()
    });

    // Merge the chunks of each (sequence, kv head) in token order and write the output.
    let mut writer = OutputWriter::new(out_dtype, dims, &inputs.scales);
    let mut merged_acc = vec![0.0f32; per_unit];
    let mut merged_max = vec![f32::NEG_INFINITY; group];
    let mut merged_sum = vec![0.0f32; group];
    let mut unit_index = 0;
    while unit_index < units.len() {
        let WorkUnit { b, kv_head, .. } = units[unit_index];
        merged_acc.fill(0.0);
        merged_max.fill(f32::NEG_INFINITY);
        merged_sum.fill(0.0);
        while unit_index < units.len()
            && units[unit_index].b == b
            && units[unit_index].kv_head == kv_head
        {
            let (worker, slot) = (unit_index % threads, unit_index / threads);
            // One worker per unit index modulo `threads` was spawned, so `worker` exists.
            let (max, sum, acc) = &partials[worker];
            for g in 0..group {
                let (m, s) = (max[slot * group + g], sum[slot * group + g]);
                let chunk_acc = &acc[slot * per_unit + g * head..][..head];
                let merged = &mut merged_acc[g * head..(g + 1) * head];
                let new_max = merged_max[g].max(m);
                let (keep, take) = ((merged_max[g] - new_max).exp(), (m - new_max).exp());
                merged_sum[g] = merged_sum[g] * keep + s * take;
                for (o, &a) in merged.iter_mut().zip(chunk_acc) {
                    *o = *o * keep + a * take;
                }
                merged_max[g] = new_max;
            }
            unit_index += 1;
        }
        for g in 0..group {
            let norm = inputs.scales.v_scale / merged_sum[g];
            let row = &mut merged_acc[g * head..(g + 1) * head];
            for o in row.iter_mut() {
                *o *= norm;
            }
            writer.write_head(b, kv_head * group + g, row);
        }
    }
    writer.finish()
}

/// Per-thread buffers of the optimized kernel, allocated once per call.
struct UnitScratch {
    q: Vec<f32>,
    row: Vec<f32>,
    weights: Vec<f32>,
}

impl UnitScratch {
    fn new(group: usize, head: usize) -> UnitScratch {
        UnitScratch {
            q: vec![0.0; group * head],
            row: vec![0.0; head],
            weights: vec![0.0; group],
        }
    }
}

/// Splits the case into work units: one per (sequence, kv head), and when that leaves threads
/// idle, long sequences cut into chunks of at least [`MIN_SPLIT_CHUNK_TOKENS`]. Units of one
/// (sequence, kv head) are consecutive and in token order.
fn split_work(dims: &CaseDims, seq_lens: &[u32], threads: usize) -> Vec<WorkUnit> {
    let base_units = seq_lens.len() * dims.kv_heads;
    let target = SPLIT_TARGET_UNITS_PER_THREAD * threads;
    let longest = seq_lens.iter().copied().max().unwrap_or(1) as usize;
    let chunk = if base_units >= target {
        longest.max(1)
    } else {
        longest
            .div_ceil(target.div_ceil(base_units.max(1)))
            .max(MIN_SPLIT_CHUNK_TOKENS)
    };
    let mut units = Vec::new();
    for (b, &len) in seq_lens.iter().enumerate() {
        let len = len as usize;
        for kv_head in 0..dims.kv_heads {
            let mut start = 0;
            while start < len {
                let end = (start + chunk).min(len);
                units.push(WorkUnit {
                    b,
                    kv_head,
                    tokens: (start, end),
                });
                start = end;
            }
        }
    }
    units
}

/// Online softmax over one unit's tokens for the whole GQA group: each K and V row is decoded
/// from its stored format once and used by every query head of the group.
fn attend_unit(
    dims: &CaseDims,
    inputs: &HostInputs,
    unit: &WorkUnit,
    state: PartialSoftmax<'_>,
    scratch: &mut UnitScratch,
) {
    let (group, head) = (dims.group(), dims.head);
    let s = &inputs.scales;
    // Fold every scale that multiplies a logit into Q once.
    let logit_scale = s.q_scale * s.k_scale * s.sm_scale;
    let q_base = (unit.b * dims.qo_heads + unit.kv_head * group) * head;
    for (i, q) in scratch.q.iter_mut().enumerate() {
        *q = inputs.q.raw(q_base + i) * logit_scale;
    }
    state.max.fill(f32::NEG_INFINITY);
    state.sum.fill(0.0);
    state.acc.fill(0.0);
    for t in unit.tokens.0..unit.tokens.1 {
        let page = inputs.page_of(unit.b, t, dims.block);
        let slot = t % dims.block;
        decode_row(
            &inputs.kv_cache,
            dims.kv_offset(page, 0, unit.kv_head, slot),
            &mut scratch.row,
        );
        for g in 0..group {
            let logit = dot(&scratch.q[g * head..(g + 1) * head], &scratch.row);
            if logit > state.max[g] {
                let rescale = (state.max[g] - logit).exp();
                state.sum[g] *= rescale;
                for a in &mut state.acc[g * head..(g + 1) * head] {
                    *a *= rescale;
                }
                state.max[g] = logit;
            }
            let w = (logit - state.max[g]).exp();
            state.sum[g] += w;
            scratch.weights[g] = w;
        }
        decode_row(
            &inputs.kv_cache,
            dims.kv_offset(page, 1, unit.kv_head, slot),
            &mut scratch.row,
        );
        for g in 0..group {
            let w = scratch.weights[g];
            for (a, &v) in state.acc[g * head..(g + 1) * head]
                .iter_mut()
                .zip(&scratch.row)
            {
                *a += w * v;
            }
        }
    }
}

/// Decodes one K or V row (`dst.len()` elements from `offset`) from its stored format.
#[inline]
fn decode_row(kv: &HostTensor, offset: usize, dst: &mut [f32]) {
    let end = offset + dst.len();
    match kv {
        HostTensor::Bf16(v) => {
            for (d, x) in dst.iter_mut().zip(&v[offset..end]) {
                *d = x.to_f32();
            }
        }
        HostTensor::Fp8(v) => {
            for (d, &x) in dst.iter_mut().zip(&v[offset..end]) {
                *d = E4M3_TABLE[x as usize];
            }
        }
    }
}

/// f32 dot product in [`DOT_LANES`] independent partial sums.
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0.0f32; DOT_LANES];
    let (a_chunks, b_chunks) = (a.chunks_exact(DOT_LANES), b.chunks_exact(DOT_LANES));
    let tail: f32 = a_chunks
        .remainder()
        .iter()
        .zip(b_chunks.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in a_chunks.zip(b_chunks) {
        for l in 0..DOT_LANES {
            lanes[l] += x[l] * y[l];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// Writes finished heads of the optimized kernel straight into the output's storage format.
enum OutputWriter {
    Bf16 {
        out: Vec<bf16>,
        qo_heads: usize,
        head: usize,
    },
    Fp8 {
        out: Vec<u8>,
        qo_heads: usize,
        head: usize,
        inv_o_scale: f32,
    },
    Nvfp4 {
        tensor: Nvfp4Tensor,
        head: usize,
        global_scale: f32,
    },
}

impl OutputWriter {
    fn new(out_dtype: Dtype, dims: &CaseDims, scales: &Scales) -> OutputWriter {
        let (qo_heads, head) = (dims.qo_heads, dims.head);
        let elems = dims.batch * qo_heads * head;
        match out_dtype {
            Dtype::Bf16 => OutputWriter::Bf16 {
                out: vec![bf16::ZERO; elems],
                qo_heads,
                head,
            },
            Dtype::Fp8 => OutputWriter::Fp8 {
                out: vec![0; elems],
                qo_heads,
                head,
                inv_o_scale: 1.0 / scales.o_scale,
            },
            Dtype::Nvfp4 => {
                let cols = qo_heads * head;
                let (sf_rows, sf_cols) =
                    nvfp4_sf_shape(dims.batch, cols.div_ceil(NVFP4_BLOCK_ELEMS));
                OutputWriter::Nvfp4 {
                    tensor: Nvfp4Tensor {
                        packed: vec![0; dims.batch * cols.div_ceil(2)],
                        scales_swizzled: vec![0; sf_rows * sf_cols],
                        rows: dims.batch,
                        cols,
                    },
                    head,
                    global_scale: scales.o_sf_scale,
                }
            }
        }
    }

    /// Stores head `h` of sequence `b` (`values.len()` = head size).
    fn write_head(&mut self, b: usize, h: usize, values: &[f32]) {
        match self {
            OutputWriter::Bf16 {
                out,
                qo_heads,
                head,
            } => {
                let dst = &mut out[(b * *qo_heads + h) * *head..][..*head];
                for (d, &x) in dst.iter_mut().zip(values) {
                    *d = bf16::from_f32(x);
                }
            }
            OutputWriter::Fp8 {
                out,
                qo_heads,
                head,
                inv_o_scale,
            } => {
                let dst = &mut out[(b * *qo_heads + h) * *head..][..*head];
                for (d, &x) in dst.iter_mut().zip(values) {
                    // Multiplying by the reciprocal, as a GPU kernel would; verification allows
                    // the rare one-step difference from dividing.
                    *d = f32_to_e4m3(x * *inv_o_scale);
                }
            }
            OutputWriter::Nvfp4 {
                tensor,
                head,
                global_scale,
                ..
            } => {
                // head % 16 == 0 (checked with the case), so blocks never straddle two heads.
                let first_col = h * *head;
                let sf_cols = tensor.sf_cols();
                let row_bytes = tensor.packed_row_bytes();
                for (i, block_values) in values.chunks(NVFP4_BLOCK_ELEMS).enumerate() {
                    let col = first_col + i * NVFP4_BLOCK_ELEMS;
                    let block = quantize_nvfp4_block(block_values, *global_scale);
                    tensor.scales_swizzled[nvfp4_sf_offset(b, col / NVFP4_BLOCK_ELEMS, sf_cols)] =
                        block.scale_factor;
                    let packed = &mut tensor.packed[b * row_bytes + col / 2..];
                    for (byte, pair) in packed.iter_mut().zip(block.codes.chunks(2)) {
                        *byte = pair[0] | (pair[1] << 4);
                    }
                }
            }
        }
    }

    fn finish(self) -> QuantizedOutput {
        match self {
            OutputWriter::Bf16 { out, .. } => QuantizedOutput::Bf16(out),
            OutputWriter::Fp8 { out, .. } => QuantizedOutput::Fp8(out),
            OutputWriter::Nvfp4 { tensor, .. } => QuantizedOutput::Nvfp4(tensor),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::NoTelemetry;
    use std::cell::Cell;

    /// A kernel whose first `good_calls` calls return the reference exactly and whose later ones
    /// return one element off by 8, run through the CPU backend's measurement.
    fn measure_kernel_going_wrong_after(good_calls: u32) -> KernelMeasurement {
        let reference = [0.5, -0.25, 1.0, 0.125];
        let method = MeasureMethod {
            warmup: 1,
            trials: 3,
            target_rse: None,
            ..MeasureMethod::default()
        };
        let scales = Scales::default();
        let timing = KernelTiming {
            method: &method,
            reference: &reference,
            scales: &scales,
            bytes_per_call: 64,
        };
        let calls = Cell::new(0u32);
        timing.measure(KernelKind::Optimized, Dtype::Bf16, &mut NoTelemetry, || {
            calls.set(calls.get() + 1);
            let mut values = reference.map(bf16::from_f64);
            if calls.get() > good_calls {
                values[3] = bf16::from_f64(8.125);
            }
            QuantizedOutput::Bf16(values.to_vec())
        })
    }

    /// The `disturb:CASE` drill's corruption moves the first element of every output dtype far
    /// past its tolerance, and nothing else.
    #[test]
    fn a_disturbed_output_fails_verification_in_every_output_dtype() {
        use crate::formats::{f32_to_e4m3, quantize_nvfp4};
        let values: Vec<f32> = (0..32).map(|i| (i as f32 - 12.5) / 16.0).collect();
        let reference: Vec<f64> = values.iter().map(|&x| x as f64).collect();
        let scales = Scales {
            o_scale: 1.0,
            o_sf_scale: 1.0,
            ..Scales::default()
        };
        let outputs = [
            QuantizedOutput::Bf16(values.iter().map(|&x| bf16::from_f32(x)).collect()),
            QuantizedOutput::Fp8(values.iter().map(|&x| f32_to_e4m3(x)).collect()),
            QuantizedOutput::Nvfp4(quantize_nvfp4(&values, 1, values.len(), 1.0)),
        ];
        for out in outputs {
            let dtype = out.dtype();
            let before = decode_output(&out, &scales);
            assert!(
                verify_output(&before, &reference, dtype, &scales).passed,
                "{dtype:?}"
            );
            let after = decode_output(&disturbed(out), &scales);
            assert!(
                !verify_output(&after, &reference, dtype, &scales).passed,
                "{dtype:?}"
            );
            assert_ne!(after[0], before[0], "{dtype:?}");
            assert_eq!(after[2..], before[2..], "{dtype:?}");
        }
    }

    #[test]
    fn a_kernel_right_at_every_call_is_timed() {
        let m = measure_kernel_going_wrong_after(u32::MAX);
        assert_eq!(m.status, Some(Status::Ok), "{}", m.message);
        assert_eq!(m.samples_ms.len(), 3);
    }

    #[test]
    fn a_kernel_right_once_and_wrong_in_its_timed_calls_is_a_wrong_result_without_timings() {
        // Verified on its first call, wrong from the warm-up on: only the check after the timed
        // calls can see it.
        let m = measure_kernel_going_wrong_after(1);
        assert_eq!(m.status, Some(Status::WrongResult), "{}", m.message);
        assert!(m.samples_ms.is_empty() && m.stats.is_none());
        assert!(
            m.message.contains("passed verification after one call")
                && m.message.contains("3 timed calls"),
            "{}",
            m.message
        );
        assert!(m.accuracy.is_some_and(|a| a.max_abs_err >= 8.0));
    }
}
