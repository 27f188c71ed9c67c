//! Every golden decode case, in every mode and layout: the f64 reference, the quantized outputs
//! (bf16 / fp8 bits, nvfp4 codes and swizzled scales) and the CPU kernels.

use crate::common::{load_golden_cases, max_rel_diff, GoldenCase};
use decodebench_kernels::cpu::{baseline_attention, optimized_attention};
use decodebench_kernels::formats::{
    bf16_ulp, e2m1_to_f32, e4m3_step, e4m3_to_f32, NVFP4_BLOCK_ELEMS,
};
use decodebench_kernels::reference::{decode_output, quantize_output};
use decodebench_kernels::workload::Dtype;
use decodebench_kernels::{attention_f64, verify_output, QuantizedOutput};

/// The golden outputs and ours are both rounded from an f64 result; they may differ in this
/// fraction of elements (a value within f32 rounding of a boundary), never by more than one step.
const MAX_MISMATCH_FRACTION: f64 = 0.01;

fn cases() -> Vec<GoldenCase> {
    let cases = load_golden_cases();
    assert_eq!(cases.len(), 6, "decode_cases.json lists six cases");
    cases
}

fn reference_f32(g: &GoldenCase) -> Vec<f32> {
    attention_f64(&g.case, &g.inputs)
        .iter()
        .map(|&x| x as f32)
        .collect()
}

/// Relative tolerance against the golden f64 output. The golden cases were computed with
/// `sm_scale = 1/sqrt(head)` in f64; `Scales` holds it as f32 (off by up to 3e-8 relative), which
/// moves outputs by a few 1e-9 of their magnitude. With the exact f64 scale the two agree to
/// about 1e-13.
const GOLDEN_F64_RTOL: f64 = 1e-6;

/// Elements smaller than this fraction of the largest output are compared against it instead
/// (near-zero outputs come from cancellation, where relative error means nothing).
const GOLDEN_F64_FLOOR_FRACTION: f64 = 1e-2;

#[test]
fn reference_reproduces_expected_f64_output() {
    for g in cases() {
        let ours = attention_f64(&g.case, &g.inputs);
        assert_eq!(ours.len(), g.expected_f64.len(), "{}", g.name);
        let scale = g.expected_f64.iter().fold(0.0f64, |m, x| m.max(x.abs()));
        let worst = max_rel_diff(&ours, &g.expected_f64, GOLDEN_F64_FLOOR_FRACTION * scale);
        assert!(
            worst <= GOLDEN_F64_RTOL,
            "{}: max relative difference {worst:e}",
            g.name
        );
    }
}

#[test]
fn golden_cases_cover_every_mode_and_layout() {
    let cases = cases();
    let modes: std::collections::HashSet<_> = cases.iter().map(|g| g.case.quant).collect();
    assert_eq!(
        modes.len(),
        4,
        "bf16, fp8 kv, fp8 qkv+fp8 out, fp8 qkv+nvfp4 out"
    );
    assert!(cases.iter().any(|g| g.case.layout.as_str() == "NHD"));
    assert!(cases.iter().any(|g| g.case.layout.as_str() == "HND"));
}

#[test]
fn hnd_and_nhd_golden_cases_give_the_same_output() {
    let cases = cases();
    let find = |name: &str| cases.iter().find(|g| g.name == name).expect(name);
    let (hnd, nhd) = (find("bf16_hnd_b4"), find("bf16_nhd_b4"));
    assert_eq!(hnd.expected_f64, nhd.expected_f64);
    assert_eq!(
        attention_f64(&hnd.case, &hnd.inputs),
        attention_f64(&nhd.case, &nhd.inputs)
    );
}

#[test]
fn bf16_outputs_match_bits_almost_everywhere() {
    for g in cases().iter().filter(|g| g.case.quant.out == Dtype::Bf16) {
        let expected = g.expected_bf16.as_ref().expect("expected_out_bf16");
        let c = &g.case;
        let QuantizedOutput::Bf16(ours) = quantize_output(
            &reference_f32(g),
            Dtype::Bf16,
            c.batch_size as usize,
            c.num_qo_heads as usize,
            c.head_size as usize,
            &g.inputs.scales,
        ) else {
            panic!("bf16 requested");
        };
        let mut mismatches = 0;
        for (i, (a, b)) in ours.iter().zip(expected).enumerate() {
            if a != b {
                mismatches += 1;
                let (a, b) = (a.to_f32(), b.to_f32());
                assert!(
                    (a - b).abs() <= bf16_ulp(b),
                    "{} [{i}]: {a} vs {b} is more than one bf16 step",
                    g.name
                );
            }
        }
        assert_eq!(ours.len(), expected.len());
        assert!(
            (mismatches as f64) <= MAX_MISMATCH_FRACTION * expected.len() as f64,
            "{}: {mismatches} of {} bf16 values differ",
            g.name,
            expected.len()
        );
    }
}

#[test]
fn fp8_output_matches_bits_almost_everywhere() {
    let cases = cases();
    let g = cases
        .iter()
        .find(|g| g.case.quant.out == Dtype::Fp8)
        .expect("an fp8-output case");
    let expected = g.expected_fp8.as_ref().expect("expected_out_fp8");
    let c = &g.case;
    let s = &g.inputs.scales;
    let QuantizedOutput::Fp8(ours) = quantize_output(
        &reference_f32(g),
        Dtype::Fp8,
        c.batch_size as usize,
        c.num_qo_heads as usize,
        c.head_size as usize,
        s,
    ) else {
        panic!("fp8 requested");
    };
    assert_eq!(ours.len(), expected.len());
    let mut mismatches = 0;
    for (i, (&a, &b)) in ours.iter().zip(expected).enumerate() {
        if a != b {
            mismatches += 1;
            let (a, b) = (e4m3_to_f32(a), e4m3_to_f32(b));
            assert!(
                (a - b).abs() <= e4m3_step(b),
                "{} [{i}]: {a} vs {b} is more than one e4m3 step",
                g.name
            );
        }
    }
    assert!(
        (mismatches as f64) <= MAX_MISMATCH_FRACTION * expected.len() as f64,
        "{mismatches} of {} fp8 values differ",
        expected.len()
    );
}

#[test]
fn nvfp4_output_matches_codes_and_swizzled_scales() {
    let cases = cases();
    let g = cases
        .iter()
        .find(|g| g.case.quant.out == Dtype::Nvfp4)
        .expect("an nvfp4-output case");
    let packed = g.expected_nvfp4_packed.as_ref().expect("packed");
    let scales = g.expected_nvfp4_scales.as_ref().expect("scales");
    let c = &g.case;
    let QuantizedOutput::Nvfp4(ours) = quantize_output(
        &reference_f32(g),
        Dtype::Nvfp4,
        c.batch_size as usize,
        c.num_qo_heads as usize,
        c.head_size as usize,
        &g.inputs.scales,
    ) else {
        panic!("nvfp4 requested");
    };
    assert_eq!(ours.packed.len(), packed.len());
    assert_eq!(ours.scales_swizzled.len(), scales.len());
    let scale_mismatches = ours
        .scales_swizzled
        .iter()
        .zip(scales)
        .filter(|(a, b)| a != b)
        .count();
    assert!(
        scale_mismatches as f64 <= MAX_MISMATCH_FRACTION * (ours.rows * ours.sf_cols()) as f64,
        "{scale_mismatches} scale factors differ"
    );
    let g_scale = g.inputs.scales.o_sf_scale;
    let mut code_mismatches = 0;
    for row in 0..ours.rows {
        for col in 0..ours.cols {
            let byte = packed[row * ours.packed_row_bytes() + col / 2];
            let expected_code = if col % 2 == 0 { byte & 15 } else { byte >> 4 };
            if ours.code(row, col) != expected_code {
                code_mismatches += 1;
                let sf = e4m3_to_f32(ours.scale_factor(row, col));
                let (a, b) = (
                    e2m1_to_f32(ours.code(row, col)) * sf / g_scale,
                    e2m1_to_f32(expected_code) * sf / g_scale,
                );
                assert!(
                    (a - b).abs() <= 2.0 * sf / g_scale,
                    "[{row}, {col}]: {a} vs {b} is more than one e2m1 step"
                );
            }
        }
    }
    assert!(
        code_mismatches as f64 <= MAX_MISMATCH_FRACTION * (ours.rows * ours.cols) as f64,
        "{code_mismatches} of {} codes differ",
        ours.rows * ours.cols
    );
    assert_eq!(ours.cols % NVFP4_BLOCK_ELEMS, 0);
}

#[test]
fn golden_quantized_outputs_pass_verification() {
    for g in cases() {
        let c = &g.case;
        let s = &g.inputs.scales;
        let out = match c.quant.out {
            Dtype::Bf16 => QuantizedOutput::Bf16(g.expected_bf16.clone().expect("bf16")),
            Dtype::Fp8 => QuantizedOutput::Fp8(g.expected_fp8.clone().expect("fp8")),
            Dtype::Nvfp4 => {
                // Rebuild the tensor around the golden bytes.
                let QuantizedOutput::Nvfp4(mut t) = quantize_output(
                    &reference_f32(&g),
                    Dtype::Nvfp4,
                    c.batch_size as usize,
                    c.num_qo_heads as usize,
                    c.head_size as usize,
                    s,
                ) else {
                    panic!("nvfp4 requested");
                };
                t.packed = g.expected_nvfp4_packed.clone().expect("packed");
                t.scales_swizzled = g.expected_nvfp4_scales.clone().expect("scales");
                QuantizedOutput::Nvfp4(t)
            }
        };
        let v = verify_output(&decode_output(&out, s), &g.expected_f64, c.quant.out, s);
        assert!(v.passed, "{}: {}", g.name, v.detail);
    }
}

#[test]
fn cpu_kernels_pass_verification_on_golden_inputs() {
    for g in cases() {
        let s = &g.inputs.scales;
        let baseline = QuantizedOutput::Bf16(baseline_attention(&g.case, &g.inputs));
        let v = verify_output(
            &decode_output(&baseline, s),
            &g.expected_f64,
            Dtype::Bf16,
            s,
        );
        assert!(v.passed, "{} baseline: {}", g.name, v.detail);
        for threads in [1, 3] {
            let out = optimized_attention(&g.case, &g.inputs, threads);
            assert_eq!(out.dtype(), g.case.quant.out);
            let v = verify_output(
                &decode_output(&out, s),
                &g.expected_f64,
                g.case.quant.out,
                s,
            );
            assert!(v.passed, "{} optimized x{threads}: {}", g.name, v.detail);
        }
    }
}
