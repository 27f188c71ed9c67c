//! Properties any correct decode attention has, checked on the reference with generated inputs,
//! and the verifier's ability to reject wrong outputs.

use crate::common::{attention_dense, max_rel_diff, small_case};
use decodebench_kernels::formats::e4m3_to_f32;
use decodebench_kernels::inputs::{generate_kv_pool, PoolFill, MAX_HOST_KV_POOL_BYTES};
use decodebench_kernels::reference::{decode_output, quantize_output};
use decodebench_kernels::workload::{
    BenchCase, Dtype, KvLayout, KvPool, QuantMode, FP8_TENSOR_SCALE,
};
use decodebench_kernels::{
    attention_f64, generate_host_inputs, verify_output, HostInputs, HostTensor, InputError, Scales,
};

/// Page `p` of `pages` moved to `perm[p]`.
fn move_pages<T: Copy>(pages: &[T], page_elems: usize, perm: &[usize]) -> Vec<T> {
    let mut moved = pages.to_vec();
    for (p, &to) in perm.iter().enumerate() {
        moved[to * page_elems..][..page_elems]
            .copy_from_slice(&pages[p * page_elems..][..page_elems]);
    }
    moved
}

/// The same logical cache with every page moved to `perm[page]` and the block tables following.
fn permute_pool(inputs: &HostInputs, page_elems: usize, perm: &[usize]) -> HostInputs {
    let mut out = inputs.clone();
    out.kv_cache = match &inputs.kv_cache {
        HostTensor::Bf16(v) => HostTensor::Bf16(move_pages(v, page_elems, perm)),
        HostTensor::Fp8(v) => HostTensor::Fp8(move_pages(v, page_elems, perm)),
    };
    for entry in out.block_tables.iter_mut() {
        *entry = perm[*entry as usize] as i32;
    }
    out
}

fn page_elems(case: &BenchCase) -> usize {
    2 * (case.num_kv_heads * case.block_size * case.head_size) as usize
}

#[test]
fn permuting_the_page_pool_with_its_block_table_changes_nothing() {
    for quant in [QuantMode::BF16, QuantMode::FP8_QKV] {
        let mut case = small_case(quant, 3, 90, 2, 32);
        case.pool = KvPool::Shared { tokens: 16 * 40 };
        let inputs = generate_host_inputs(&case).expect("inputs");
        let n = inputs.num_pages;
        // A fixed derangement: page p moves to (7p + 3) mod n (7 is coprime with 40).
        let perm: Vec<usize> = (0..n).map(|p| (7 * p + 3) % n).collect();
        let permuted = permute_pool(&inputs, page_elems(&case), &perm);
        assert_ne!(permuted.kv_cache, inputs.kv_cache);
        permuted.check_matches(&case).expect("still consistent");
        assert_eq!(
            attention_f64(&case, &inputs),
            attention_f64(&case, &permuted)
        );
    }
}

#[test]
fn a_one_token_sequence_returns_its_value_row() {
    for quant in [QuantMode::BF16, QuantMode::FP8_KV, QuantMode::FP8_QKV] {
        let case = small_case(quant, 3, 1, 2, 64);
        let inputs = generate_host_inputs(&case).expect("inputs");
        let out = attention_f64(&case, &inputs);
        let (qo, head, block) = (8usize, 64usize, 16usize);
        for b in 0..3 {
            let page = inputs.block_tables[b * inputs.block_table_width] as usize;
            for h in 0..qo {
                for d in 0..head {
                    let at = case.layout.offset(page, 1, h / 4, 0, d, 2, block, head);
                    let v = inputs.kv_cache.raw(at) as f64 * inputs.scales.v_scale as f64;
                    assert_eq!(out[(b * qo + h) * head + d], v, "{quant} b{b} h{h} d{d}");
                }
            }
        }
    }
}

#[test]
fn hnd_and_nhd_of_the_same_logical_cache_agree() {
    for quant in [QuantMode::BF16, QuantMode::FP8_KV] {
        let hnd = small_case(quant, 2, 70, 2, 32);
        let nhd = BenchCase {
            layout: KvLayout::Nhd,
            ..hnd.clone()
        }
        .with_id();
        let a = generate_host_inputs(&hnd).expect("hnd inputs");
        let b = generate_host_inputs(&nhd).expect("nhd inputs");
        assert_ne!(a.kv_cache, b.kv_cache, "the layouts store differently");
        // Same logical element at the two layouts' offsets.
        let at = |layout: KvLayout| layout.offset(5, 1, 1, 3, 7, 2, 16, 32);
        assert_eq!(
            a.kv_cache.raw(at(KvLayout::Hnd)),
            b.kv_cache.raw(at(KvLayout::Nhd))
        );
        assert_eq!(attention_f64(&hnd, &a), attention_f64(&nhd, &b));
    }
}

#[test]
fn paged_reference_agrees_with_the_dense_formulation() {
    let configs = [
        (QuantMode::BF16, KvLayout::Hnd, 16, 1),
        (QuantMode::FP8_KV, KvLayout::Nhd, 8, 2),
        (QuantMode::FP8_QKV, KvLayout::Hnd, 4, 8),
        (QuantMode::FP8_QKV_NVFP4_OUT, KvLayout::Nhd, 32, 4),
    ];
    for (quant, layout, block, kv_heads) in configs {
        let case = BenchCase {
            layout,
            block_size: block,
            ..small_case(quant, 3, 77, kv_heads, 32)
        }
        .with_id();
        let inputs = generate_host_inputs(&case).expect("inputs");
        let paged = attention_f64(&case, &inputs);
        let dense = attention_dense(&case, &inputs);
        // f64 rounding: a few ulps of the output's scale. (Relative to each element, one near
        // zero can read 1e-11 from an absolute 4e-16.)
        let scale = dense.iter().fold(0.0f64, |m, y| m.max(y.abs()));
        let worst = max_rel_diff(&paged, &dense, scale);
        assert!(
            worst < 1e-14,
            "{quant} {layout} blk{block}: {worst:e} of {scale}"
        );
    }
}

#[test]
fn inputs_are_deterministic_and_seed_sensitive() {
    let case = small_case(QuantMode::FP8_QKV, 2, 50, 2, 32);
    let a = generate_host_inputs(&case).expect("a");
    assert_eq!(a, generate_host_inputs(&case).expect("b"));
    let other = BenchCase {
        seed: 8,
        ..case.clone()
    }
    .with_id();
    assert_ne!(a.q, generate_host_inputs(&other).expect("c").q);
}

#[test]
fn fp8_inputs_store_values_over_the_case_scale() {
    let case = small_case(QuantMode::FP8_QKV_OUT, 2, 50, 2, 32);
    let inputs = generate_host_inputs(&case).expect("inputs");
    let s = inputs.scales;
    assert_eq!(s.q_scale, FP8_TENSOR_SCALE);
    assert_eq!(s.k_scale, FP8_TENSOR_SCALE);
    assert_eq!(s.o_scale, FP8_TENSOR_SCALE);
    let HostTensor::Fp8(q) = &inputs.q else {
        panic!("fp8 q expected");
    };
    // Standard-normal data over 0.5: the stored values spread to about +-8 and beyond 1.
    let stored: Vec<f32> = q.iter().map(|&b| e4m3_to_f32(b)).collect();
    let mean_sq = stored.iter().map(|x| x * x).sum::<f32>() / stored.len() as f32;
    assert!((2.5..6.0).contains(&mean_sq), "mean square {mean_sq}");
    // Only the pages the block tables use hold data; the whole pool matches where they overlap.
    let full = generate_kv_pool(&case, &s, PoolFill::All).expect("full pool");
    let pe = page_elems(&case);
    for p in inputs.referenced_pages(16) {
        assert_eq!(
            (p * pe..(p + 1) * pe)
                .map(|i| inputs.kv_cache.raw(i))
                .collect::<Vec<_>>(),
            (p * pe..(p + 1) * pe)
                .map(|i| full.raw(i))
                .collect::<Vec<_>>()
        );
    }
}

#[test]
fn oversized_and_malformed_cases_are_refused_with_reasons() {
    let mut huge = small_case(QuantMode::BF16, 256, 131072, 8, 128);
    huge.num_qo_heads = 64;
    huge.pool = KvPool::Unique;
    match generate_host_inputs(&huge) {
        Err(InputError::PoolTooLarge { bytes, cap, .. }) => {
            assert!(bytes > cap);
            assert_eq!(cap, MAX_HOST_KV_POOL_BYTES);
        }
        other => panic!("expected PoolTooLarge, got {other:?}"),
    }
    let mut bad = small_case(QuantMode::BF16, 2, 10, 3, 32);
    bad.num_qo_heads = 8;
    let err = generate_host_inputs(&bad).expect_err("8 heads over 3");
    assert!(err.to_string().contains("multiple"), "{err}");
    let odd = small_case(QuantMode::FP8_QKV_NVFP4_OUT, 2, 10, 1, 40);
    let err = generate_host_inputs(&odd).expect_err("head 40 with nvfp4");
    assert!(err.to_string().contains("multiple of 16"), "{err}");
}

/// Each output dtype: the reference itself, quantized, passes; moving one element by a few
/// tolerances, a NaN, or a kernel that reads the wrong page fails.
#[test]
fn verification_accepts_the_reference_and_rejects_wrong_outputs() {
    for quant in [
        QuantMode::BF16,
        QuantMode::FP8_QKV_OUT,
        QuantMode::FP8_QKV_NVFP4_OUT,
    ] {
        let case = small_case(quant, 4, 60, 2, 64);
        let inputs = generate_host_inputs(&case).expect("inputs");
        let s: Scales = inputs.scales;
        let reference = attention_f64(&case, &inputs);
        let quantize = |out: &[f64]| {
            let out: Vec<f32> = out.iter().map(|&x| x as f32).collect();
            decode_output(&quantize_output(&out, quant.out, 4, 8, 64, &s), &s)
        };
        let good = quantize(&reference);
        let v = verify_output(&good, &reference, quant.out, &s);
        assert!(v.passed, "{quant}: {}", v.detail);
        assert!(v.accuracy.max_abs_err > 0.0 && v.accuracy.tolerance > 0.0);

        let i = 77;
        let mut bumped = good.clone();
        bumped[i] += 4.0 * v.accuracy.tolerance.max(0.05) as f32;
        let v = verify_output(&bumped, &reference, quant.out, &s);
        assert!(!v.passed, "{quant}: a moved element passed: {}", v.detail);
        assert_eq!(v.worst_index, i, "{}", v.detail);

        let mut nan = good.clone();
        nan[3] = f32::NAN;
        let v = verify_output(&nan, &reference, quant.out, &s);
        assert!(!v.passed && v.detail.contains("not finite"), "{}", v.detail);

        // A kernel that reads the next page of the pool for every block.
        let mut wrong = inputs.clone();
        for entry in wrong.block_tables.iter_mut() {
            *entry = (*entry + 1) % inputs.num_pages as i32;
        }
        let v = verify_output(
            &quantize(&attention_f64(&case, &wrong)),
            &reference,
            quant.out,
            &s,
        );
        assert!(!v.passed, "{quant}: wrong pages passed: {}", v.detail);

        // A kernel that ignores the last token of every sequence.
        let mut short = inputs.clone();
        for len in short.seq_lens.iter_mut() {
            *len = (*len - 1).max(1);
        }
        let v = verify_output(
            &quantize(&attention_f64(&case, &short)),
            &reference,
            quant.out,
            &s,
        );
        assert!(!v.passed, "{quant}: a dropped token passed: {}", v.detail);

        let v = verify_output(&good[1..], &reference, quant.out, &s);
        assert!(!v.passed, "a short output passed");
    }
}

#[test]
fn verification_rejects_a_missing_value_scale() {
    let case = small_case(QuantMode::FP8_KV, 3, 40, 2, 32);
    let inputs = generate_host_inputs(&case).expect("inputs");
    let reference = attention_f64(&case, &inputs);
    let unscaled: Vec<f32> = reference
        .iter()
        .map(|&x| (x / inputs.scales.v_scale as f64) as f32)
        .collect();
    let v = verify_output(&unscaled, &reference, Dtype::Bf16, &inputs.scales);
    assert!(!v.passed, "{}", v.detail);
}
