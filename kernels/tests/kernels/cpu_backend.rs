//! The CPU backend end to end: identity, every quant mode verified and timed, skipped and failed
//! cases, noise-based stopping, and the telemetry probe around the timed trials.

use crate::common::small_case;
use decodebench_kernels::cpu::optimized_attention;
use decodebench_kernels::reference::decode_output;
use decodebench_kernels::workload::{KvPool, QuantMode};
use decodebench_kernels::{
    attention_f64, generate_host_inputs, verify_output, Backend, CpuBackend, KernelKind,
    NoTelemetry, Status, Telemetry, TelemetryProbe,
};

#[test]
fn identity_describes_the_host_cpu() {
    let backend = CpuBackend::new();
    let id = backend.identity();
    assert_eq!(id.backend, "cpu");
    assert!(!id.name.is_empty());
    assert_eq!(id.name, id.sku);
    assert!(
        id.uuid.starts_with("cpu-") && id.uuid.len() == 20,
        "{}",
        id.uuid
    );
    assert!(!id.host.is_empty());
    assert_eq!(
        id.uuid,
        CpuBackend::new().identity().uuid,
        "stable per host"
    );
    assert!(id.sm_count.is_none() && id.compute_capability.is_none());
    assert!(id.calibrated_read_gbps.is_none());
}

#[test]
fn every_reference_mode_runs_verified_and_timed() {
    let mut backend = CpuBackend::new();
    for quant in QuantMode::REFERENCE {
        let case = small_case(quant, 4, 256, 1, 64);
        let result = backend.run_case(&case, &mut NoTelemetry);
        assert_eq!(result.case_id, case.id);
        assert_eq!(result.kernels.len(), 2);
        assert!(result.wall_s > 0.0);
        let inputs = generate_host_inputs(&case).expect("inputs");
        for (m, kind) in result.kernels.iter().zip(KernelKind::ALL) {
            assert_eq!(m.kernel, Some(kind));
            assert_eq!(
                m.status,
                Some(Status::Ok),
                "{quant} {kind:?}: {}",
                m.message
            );
            assert_eq!(m.samples_ms.len(), 3);
            assert!(m.samples_ms.iter().all(|&t| t > 0.0));
            let stats = m.stats.expect("stats");
            assert!(stats.mean_ms > 0.0 && stats.min_ms <= stats.max_ms);
            assert_eq!(m.bytes_per_call, case.logical_bytes(&inputs.seq_lens));
            assert!(m.bandwidth_gbps.expect("bandwidth") > 0.0);
            assert!(m.bandwidth_fraction.is_none());
            let acc = m.accuracy.expect("accuracy");
            assert!(acc.max_abs_err <= acc.tolerance.max(1e-9) * 1e3);
            assert!(
                acc.rel_l2_err < 0.2,
                "{quant} {kind:?}: rel l2 {}",
                acc.rel_l2_err
            );
            assert_eq!(m.rse_target_met, None);
        }
    }
}

#[test]
fn unsupported_modes_are_skipped_with_the_reason() {
    let mut backend = CpuBackend::new();
    let case = small_case(
        QuantMode::new(
            decodebench_kernels::Dtype::Fp8,
            decodebench_kernels::Dtype::Bf16,
            decodebench_kernels::Dtype::Bf16,
        ),
        2,
        32,
        1,
        64,
    );
    let reason = case.quant.unsupported_reason().expect("unsupported");
    let result = backend.run_case(&case, &mut NoTelemetry);
    for m in &result.kernels {
        assert_eq!(m.status, Some(Status::Skipped));
        assert_eq!(m.message, reason);
        assert!(m.samples_ms.is_empty() && m.stats.is_none());
    }
}

#[test]
fn a_pool_past_the_host_limit_is_out_of_memory_with_the_message() {
    let mut backend = CpuBackend::new();
    let mut case = small_case(QuantMode::BF16, 256, 131072, 8, 128);
    case.pool = KvPool::Unique;
    let result = backend.run_case(&case, &mut NoTelemetry);
    for m in &result.kernels {
        // A memory limit, not a failure: not retried elsewhere, and a resumed run counts it once.
        assert_eq!(m.status, Some(Status::Oom));
        assert!(m.message.contains("host limit"), "{}", m.message);
        assert!(m.samples_ms.is_empty());
    }
}

/// Counts the probe's calls and checks they bracket the timed trials.
#[derive(Default)]
struct CountingProbe {
    begins: u32,
    calls: Vec<u64>,
}

impl TelemetryProbe for CountingProbe {
    fn begin(&mut self) {
        assert_eq!(self.begins as usize, self.calls.len(), "begin twice");
        self.begins += 1;
    }
    fn end(&mut self, calls: u64) -> Telemetry {
        self.calls.push(calls);
        Telemetry {
            samples: 1,
            throttle_reasons: vec!["sw_thermal_slowdown".into()],
            ..Telemetry::default()
        }
    }
}

#[test]
fn the_probe_brackets_each_kernels_timed_trials() {
    let mut backend = CpuBackend::new();
    let case = small_case(QuantMode::FP8_QKV_OUT, 2, 64, 1, 64);
    let mut probe = CountingProbe::default();
    let result = backend.run_case(&case, &mut probe);
    assert_eq!(probe.begins, 2);
    assert_eq!(probe.calls, vec![3, 3]);
    for m in &result.kernels {
        assert_eq!(m.telemetry.samples, 1);
        assert!(
            m.throttled,
            "thermal reasons mark the measurement throttled"
        );
    }
}

#[test]
fn noise_based_stopping_honours_target_and_limits() {
    let mut backend = CpuBackend::new();
    // An unreachable target stops at max_trials and says it was missed.
    let mut case = small_case(QuantMode::BF16, 2, 64, 1, 64);
    case.method.target_rse = Some(0.0);
    case.method.max_trials = 7;
    case.method.max_time_s = 60.0;
    let result = backend.run_case(&case.clone().with_id(), &mut NoTelemetry);
    for m in &result.kernels {
        assert_eq!(m.samples_ms.len(), 7);
        assert_eq!(m.rse_target_met, Some(false));
    }
    // A loose target is met as soon as the minimum trials are in.
    case.method.target_rse = Some(10.0);
    let result = backend.run_case(&case.clone().with_id(), &mut NoTelemetry);
    for m in &result.kernels {
        assert_eq!(m.samples_ms.len(), 3);
        assert_eq!(m.rse_target_met, Some(true));
    }
    // The time limit stops an unreachable target too.
    case.method.target_rse = Some(0.0);
    case.method.max_trials = 1_000_000;
    case.method.max_time_s = 0.05;
    let result = backend.run_case(&case.with_id(), &mut NoTelemetry);
    for m in &result.kernels {
        assert!(m.samples_ms.len() >= 3 && m.samples_ms.len() < 1_000_000);
        assert_eq!(m.rse_target_met, Some(false));
    }
}

#[test]
fn optimized_kernel_splits_long_sequences_and_stays_correct() {
    // One long sequence on many threads forces the split-and-merge path.
    for quant in [QuantMode::BF16, QuantMode::FP8_QKV_NVFP4_OUT] {
        let case = small_case(quant, 1, 1500, 2, 32);
        let inputs = generate_host_inputs(&case).expect("inputs");
        let reference = attention_f64(&case, &inputs);
        let s = &inputs.scales;
        for threads in [1, 2, 8] {
            let out = optimized_attention(&case, &inputs, threads);
            let v = verify_output(&decode_output(&out, s), &reference, quant.out, s);
            assert!(v.passed, "{quant} x{threads}: {}", v.detail);
        }
    }
}

#[test]
fn optimized_kernel_handles_layouts_blocks_and_groups() {
    use decodebench_kernels::workload::KvLayout;
    for (layout, block, kv_heads, head) in [
        (KvLayout::Nhd, 8, 8, 64),
        (KvLayout::Hnd, 32, 4, 128),
        (KvLayout::Nhd, 64, 1, 256),
    ] {
        for quant in QuantMode::REFERENCE {
            let case = decodebench_kernels::BenchCase {
                layout,
                block_size: block,
                ..small_case(quant, 3, 100, kv_heads, head)
            }
            .with_id();
            let inputs = generate_host_inputs(&case).expect("inputs");
            let reference = attention_f64(&case, &inputs);
            let s = &inputs.scales;
            let out = optimized_attention(&case, &inputs, 3);
            let v = verify_output(&decode_output(&out, s), &reference, quant.out, s);
            assert!(
                v.passed,
                "{quant} {layout} blk{block} kv{kv_heads}: {}",
                v.detail
            );
        }
    }
}
