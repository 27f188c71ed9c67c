//! The CPU reference of paged decode attention — the correctness oracle every backend (CPU and
//! CUDA) is checked against before it is timed — and that check itself.
//!
//! Semantics (DESIGN.md, shared testdata README):
//! `out[b,h] = softmax_t((q[b,h]*q_scale).(K[b,t,h/group]*k_scale) * sm_scale) @ (V[b,t,h/group]*v_scale)`,
//! token `t` of sequence `b` in page `block_tables[b, t/block]`, slot `t % block`. The reference
//! computes it in f64 from the stored (quantized) inputs, so the only rounding left is the
//! output's; [`verify_output`] then allows each output dtype one quantization step plus a small
//! arithmetic allowance.

use crate::formats::{
    bf16_ulp, dequantize_nvfp4, e2m1_step, e4m3_step, e4m3_to_f32, f32_to_e4m3, quantize_nvfp4,
    Nvfp4Tensor, E2M1_MAX, E4M3_MAX, NVFP4_BLOCK_ELEMS,
};
use crate::inputs::{available_cores, CaseDims, HostInputs};
use crate::measurement::Accuracy;
use crate::workload::{BenchCase, Dtype, Scales};
use half::bf16;

/// Arithmetic allowance, as a fraction of the largest |reference| value, added to every element's
/// tolerance. It covers f32 accumulation over long sequences and, mostly, the baseline's
/// bf16-rounded dequantized inputs (the reference script's baseline does the same): with a
/// per-tensor scale that is not a power of two, every K and V element is off by up to 2^-9
/// relative, and on the golden fp8 case that moves single outputs by up to 0.7 % of the largest
/// one. A kernel that reads a wrong page, head or token, or drops a scale, is off by a sizeable
/// fraction of that magnitude (the tests check such kernels are rejected).
pub const ARITH_ATOL_FRACTION: f64 = 1.0 / 128.0;

/// bf16 output: ulps of the element's own magnitude allowed, one for the output rounding and one
/// for a kernel's f32 result landing on the other side of a rounding boundary.
pub const BF16_TOLERANCE_ULPS: f64 = 2.0;

/// fp8 output: e4m3 steps at the element's magnitude (a kernel's f32 result may round to the
/// neighbour of the value the f64 reference rounds to).
pub const FP8_TOLERANCE_STEPS: f64 = 1.0;

/// nvfp4 output: e2m1 steps at the element's magnitude and its block's scale factor (a kernel's
/// block maximum may also round to a neighbouring scale factor, which moves the whole grid).
pub const NVFP4_TOLERANCE_STEPS: f64 = 1.0;

/// Exact paged decode attention in f64, `[batch, qo_heads, head]` row-major. Runs on all cores;
/// the result does not depend on how many there are. `inputs` must match `case`
/// ([`HostInputs::check_matches`]); inputs from `generate_host_inputs` always do.
pub fn attention_f64(case: &BenchCase, inputs: &HostInputs) -> Vec<f64> {
    let Ok(dims) = CaseDims::of(case) else {
        return Vec::new();
    };
    let group = dims.group();
    let unit_elems = group * dims.head;
    let mut out = vec![0.0f64; dims.batch * dims.qo_heads * dims.head];
    // One unit per (sequence, kv head): its group of query heads is contiguous in the output.
    let units: Vec<(usize, &mut [f64])> = out.chunks_mut(unit_elems).enumerate().collect();
    let threads = available_cores().min(units.len()).max(1);
    let mut per_thread: Vec<Vec<(usize, &mut [f64])>> = (0..threads).map(|_| Vec::new()).collect();
    for (n, unit) in units.into_iter().enumerate() {
        per_thread[n % threads].push(unit);
    }
    std::thread::scope(|scope| {
        for units in per_thread {
            scope.spawn(move || {
                for (unit, out) in units {
                    let (b, kv_head) = (unit / dims.kv_heads, unit % dims.kv_heads);
                    attend_group_f64(&dims, inputs, b, kv_head, out);
                }
            });
        }
    });
    out
}

/// Attention of the query heads of `kv_head`'s group for sequence `b`, two-pass softmax in f64.
fn attend_group_f64(
    dims: &CaseDims,
    inputs: &HostInputs,
    b: usize,
    kv_head: usize,
    out: &mut [f64],
) {
    let s = &inputs.scales;
    let (group, head) = (dims.group(), dims.head);
    let len = inputs.seq_lens[b] as usize;
    let q_base = (b * dims.qo_heads + kv_head * group) * head;
    let q: Vec<f64> = (0..group * head)
        .map(|i| inputs.q.raw(q_base + i) as f64 * s.q_scale as f64)
        .collect();
    let row = |kv: usize, t: usize, scale: f32, dst: &mut [f64]| {
        let page = inputs.page_of(b, t, dims.block);
        let base = dims.kv_offset(page, kv, kv_head, t % dims.block);
        for (d, x) in dst.iter_mut().enumerate() {
            *x = inputs.kv_cache.raw(base + d) as f64 * scale as f64;
        }
    };
    let mut kv_row = vec![0.0f64; head];
    let mut logits = vec![0.0f64; group * len];
    for t in 0..len {
        row(0, t, s.k_scale, &mut kv_row);
        for g in 0..group {
            let dot: f64 = q[g * head..(g + 1) * head]
                .iter()
                .zip(&kv_row)
                .map(|(a, b)| a * b)
                .sum();
            logits[g * len + t] = dot * s.sm_scale as f64;
        }
    }
    let mut sums = vec![0.0f64; group];
    for (g, sum) in sums.iter_mut().enumerate() {
        let l = &mut logits[g * len..(g + 1) * len];
        let max = l.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        for x in l.iter_mut() {
            *x = (*x - max).exp();
        }
        *sum = l.iter().sum();
    }
    out.fill(0.0);
    for t in 0..len {
        row(1, t, s.v_scale, &mut kv_row);
        for g in 0..group {
            let w = logits[g * len + t];
            for (o, v) in out[g * head..(g + 1) * head].iter_mut().zip(&kv_row) {
                *o += w * v;
            }
        }
    }
    for (g, sum) in sums.iter().enumerate() {
        for o in &mut out[g * head..(g + 1) * head] {
            *o /= sum;
        }
    }
}

/// An attention output in its storage format.
#[derive(Debug, Clone, PartialEq)]
pub enum QuantizedOutput {
    Bf16(Vec<bf16>),
    /// `e4m3_sat(out / o_scale)`.
    Fp8(Vec<u8>),
    /// Rows = batch, cols = qo_heads * head, global scale `o_sf_scale`.
    Nvfp4(Nvfp4Tensor),
}

impl QuantizedOutput {
    pub fn dtype(&self) -> Dtype {
        match self {
            QuantizedOutput::Bf16(_) => Dtype::Bf16,
            QuantizedOutput::Fp8(_) => Dtype::Fp8,
            QuantizedOutput::Nvfp4(_) => Dtype::Nvfp4,
        }
    }
}

/// Quantizes an f32 `[batch, qo_heads, head]` output to `out_dtype` the way the kernels must.
pub fn quantize_output(
    out: &[f32],
    out_dtype: Dtype,
    batch: usize,
    qo_heads: usize,
    head: usize,
    scales: &Scales,
) -> QuantizedOutput {
    match out_dtype {
        Dtype::Bf16 => QuantizedOutput::Bf16(out.iter().map(|&x| bf16::from_f32(x)).collect()),
        Dtype::Fp8 => QuantizedOutput::Fp8(
            out.iter()
                .map(|&x| f32_to_e4m3(x / scales.o_scale))
                .collect(),
        ),
        Dtype::Nvfp4 => QuantizedOutput::Nvfp4(quantize_nvfp4(
            out,
            batch,
            qo_heads * head,
            scales.o_sf_scale,
        )),
    }
}

/// The real values of a quantized output, `[batch, qo_heads, head]` row-major.
pub fn decode_output(o: &QuantizedOutput, scales: &Scales) -> Vec<f32> {
    match o {
        QuantizedOutput::Bf16(v) => v.iter().map(|x| x.to_f32()).collect(),
        QuantizedOutput::Fp8(v) => v.iter().map(|&b| e4m3_to_f32(b) * scales.o_scale).collect(),
        QuantizedOutput::Nvfp4(t) => dequantize_nvfp4(t, scales.o_sf_scale),
    }
}

/// The verdict on one kernel output.
#[derive(Debug, Clone, PartialEq)]
pub struct Verification {
    pub accuracy: Accuracy,
    pub passed: bool,
    /// Flat index of the element furthest outside (or closest to) its tolerance.
    pub worst_index: usize,
    /// One line for the result's message: what failed and where, or the margins when it passed.
    pub detail: String,
}

/// Checks a kernel's decoded output against the f64 reference, element by element. Element `i`
/// passes when `|decoded[i] - target[i]| <= step_tolerance(i) + ARITH_ATOL_FRACTION * max|ref|`,
/// where `target` is the reference saturated as the format saturates, and the step tolerance is
/// [`BF16_TOLERANCE_ULPS`] bf16 ulps (bf16), [`FP8_TOLERANCE_STEPS`] e4m3 steps of `target/o_scale`
/// (fp8), or [`NVFP4_TOLERANCE_STEPS`] e2m1 steps at the element's magnitude under the scale
/// factor of its 16-element block (nvfp4; blocks are 16 consecutive elements, so `qo_heads*head`
/// must be a multiple of 16). A non-finite output or reference never passes.
pub fn verify_output(
    decoded: &[f32],
    reference: &[f64],
    out_dtype: Dtype,
    scales: &Scales,
) -> Verification {
    let fail = |detail: String, worst_index: usize| Verification {
        accuracy: Accuracy::default(),
        passed: false,
        worst_index,
        detail,
    };
    if decoded.len() != reference.len() {
        return fail(
            format!(
                "output has {} elements, the reference {}",
                decoded.len(),
                reference.len()
            ),
            0,
        );
    }
    if let Some(i) = reference.iter().position(|r| !r.is_finite()) {
        return fail(
            format!("reference[{i}] = {} is not finite", reference[i]),
            i,
        );
    }
    let non_finite = decoded.iter().filter(|d| !d.is_finite()).count();
    if let Some(i) = decoded.iter().position(|d| !d.is_finite()) {
        return fail(
            format!(
                "{non_finite} of {} output values are not finite (first at index {i}: {})",
                decoded.len(),
                decoded[i]
            ),
            i,
        );
    }

    let ref_max = reference.iter().fold(0.0f64, |m, r| m.max(r.abs()));
    let atol = ARITH_ATOL_FRACTION * ref_max;
    let targets = saturated_targets(reference, out_dtype, scales);
    let step_tolerances = step_tolerances(&targets, out_dtype, scales);

    let mut max_abs_err = 0.0f64;
    let (mut err_sq, mut ref_sq) = (0.0f64, 0.0f64);
    let (mut worst_index, mut worst_ratio, mut outside) = (0usize, -1.0f64, 0usize);
    for (i, (&d, &r)) in decoded.iter().zip(reference).enumerate() {
        let d = d as f64;
        let err_to_ref = (d - r).abs();
        max_abs_err = max_abs_err.max(err_to_ref);
        err_sq += err_to_ref * err_to_ref;
        ref_sq += r * r;
        let err = (d - targets[i]).abs();
        let tol = step_tolerances[i] + atol;
        let ratio = if tol > 0.0 {
            err / tol
        } else if err > 0.0 {
            f64::INFINITY
        } else {
            0.0
        };
        if err > tol {
            outside += 1;
        }
        if ratio > worst_ratio {
            worst_ratio = ratio;
            worst_index = i;
        }
    }
    let rel_l2_err = if ref_sq > 0.0 {
        (err_sq / ref_sq).sqrt()
    } else {
        err_sq.sqrt()
    };
    let worst_tol = step_tolerances.get(worst_index).map_or(atol, |s| s + atol);
    let accuracy = Accuracy {
        max_abs_err,
        rel_l2_err,
        tolerance: worst_tol,
    };
    let (worst_out, worst_ref) = (
        decoded.get(worst_index).copied().unwrap_or(0.0),
        reference.get(worst_index).copied().unwrap_or(0.0),
    );
    let passed = outside == 0;
    let detail = if passed {
        format!(
            "{out_dtype} output within tolerance: max |err| {max_abs_err:.3e}, rel L2 \
             {rel_l2_err:.3e}, closest to its limit at index {worst_index} (out {worst_out}, ref \
             {worst_ref:.6e}, tol {worst_tol:.3e})"
        )
    } else {
        format!(
            "{outside} of {} {out_dtype} output values outside tolerance; worst at index \
             {worst_index}: out {worst_out}, ref {worst_ref:.6e}, tol {worst_tol:.3e} \
             ({worst_ratio:.1}x); max |err| {max_abs_err:.3e}, rel L2 {rel_l2_err:.3e}",
            decoded.len()
        )
    };
    Verification {
        accuracy,
        passed,
        worst_index,
        detail,
    }
}

/// The reference clamped to the range the output format can hold.
fn saturated_targets(reference: &[f64], out_dtype: Dtype, scales: &Scales) -> Vec<f64> {
    let limit = match out_dtype {
        Dtype::Bf16 => f64::INFINITY,
        Dtype::Fp8 => E4M3_MAX as f64 * scales.o_scale.abs() as f64,
        // The largest value a block can hold is 6 * max_scale_factor / g.
        Dtype::Nvfp4 => E2M1_MAX as f64 * E4M3_MAX as f64 / scales.o_sf_scale.abs() as f64,
    };
    reference.iter().map(|r| r.clamp(-limit, limit)).collect()
}

/// Each element's quantization-step tolerance for `out_dtype`.
fn step_tolerances(targets: &[f64], out_dtype: Dtype, scales: &Scales) -> Vec<f64> {
    match out_dtype {
        Dtype::Bf16 => targets
            .iter()
            .map(|&r| BF16_TOLERANCE_ULPS * bf16_ulp(r as f32) as f64)
            .collect(),
        Dtype::Fp8 => {
            let o_scale = scales.o_scale.abs() as f64;
            targets
                .iter()
                .map(|&r| FP8_TOLERANCE_STEPS * e4m3_step((r / o_scale) as f32) as f64 * o_scale)
                .collect()
        }
        Dtype::Nvfp4 => {
            let g = scales.o_sf_scale as f64;
            let mut tolerances = Vec::with_capacity(targets.len());
            for block in targets.chunks(NVFP4_BLOCK_ELEMS) {
                let amax = block.iter().fold(0.0f64, |m, r| m.max(r.abs()));
                let sf = e4m3_to_f32(f32_to_e4m3((g * amax / E2M1_MAX as f64) as f32)) as f64;
                for &r in block {
                    tolerances.push(if sf > 0.0 {
                        NVFP4_TOLERANCE_STEPS * e2m1_step((r * g / sf) as f32) as f64 * sf / g
                    } else {
                        0.0
                    });
                }
            }
            tolerances
        }
    }
}
