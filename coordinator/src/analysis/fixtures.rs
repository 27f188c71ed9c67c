//! Synthetic runs for the analysis tests: records built in memory and written to a temporary
//! directory by the real sinks, so the tests read exactly what a run leaves behind.

use super::stats::{tests::normal, SplitMix64};
use crate::record::ResultRecord;
use crate::sink::write_outputs;
use decodebench_kernels::workload::draw_seq_lens;
use decodebench_kernels::{
    Accuracy, BenchCase, CaseMeasurement, DeviceIdentity, KernelKind, KernelMeasurement, QuantMode,
    Status,
};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Streaming-read bandwidth of the synthetic H100s, GB/s (the design's calibrated figure).
const SYNTHETIC_READ_GBPS: f64 = 3100.0;
/// Board power every synthetic kernel draws, W.
const SYNTHETIC_POWER_W: f64 = 500.0;

/// A synthetic GPU.
#[derive(Debug, Clone)]
pub struct Gpu {
    pub uuid: String,
    pub sku: String,
    pub host: String,
}

impl Gpu {
    /// H100 number `i` (4 per host).
    pub fn h100(i: usize) -> Gpu {
        Gpu {
            uuid: format!("GPU-h100-{i:04}"),
            sku: "NVIDIA H100 80GB HBM3".to_string(),
            host: format!("node-{}", i / 4),
        }
    }
}

/// `n` draws of a normal(mean, sd), clipped to stay positive, from `seed`.
pub fn noisy_samples(seed: u64, n: usize, mean: f64, sd: f64) -> Vec<f64> {
    let mut rng = SplitMix64::new(seed);
    (0..n)
        .map(|_| normal(&mut rng, mean, sd).max(mean * 0.01))
        .collect()
}

/// The reference workload's case with this batch, length and quantization.
pub fn case(batch: u32, max_seq_len: u32, quant: QuantMode) -> BenchCase {
    BenchCase::reference_shape(batch, max_seq_len, quant).with_id()
}

/// A timed, ok kernel measurement with telemetry; an empty sample list makes it `failed`.
pub fn kernel(kind: KernelKind, case: &BenchCase, samples: &[f64]) -> KernelMeasurement {
    if samples.is_empty() {
        return KernelMeasurement::not_timed(kind, Status::Failed, "launch failed");
    }
    let seq_lens = draw_seq_lens(case);
    let mut k = KernelMeasurement {
        kernel: Some(kind),
        status: Some(Status::Ok),
        samples_ms: samples.to_vec(),
        accuracy: Some(Accuracy {
            max_abs_err: 0.01,
            rel_l2_err: 0.002,
            tolerance: 0.05,
        }),
        bytes_per_call: case.logical_bytes(&seq_lens),
        ..Default::default()
    };
    k.telemetry.samples = 5;
    k.telemetry.power_avg_w = Some(SYNTHETIC_POWER_W);
    k.finish_stats(Some(SYNTHETIC_READ_GBPS));
    k.telemetry.energy_per_call_j = k.stats.map(|s| SYNTHETIC_POWER_W * s.mean_ms * 1e-3);
    k
}

/// A record of `case` on `gpu` with both kernels.
pub fn record_case(gpu: &Gpu, case: BenchCase, opt_ms: &[f64], base_ms: &[f64]) -> ResultRecord {
    ResultRecord {
        run_id: "run-test".into(),
        agent_id: format!("agent-{}", gpu.uuid),
        attempt: 1,
        received_unix_ms: 1_700_000_000_000,
        git_revision: "abc123".into(),
        device: DeviceIdentity {
            backend: "cuda".into(),
            name: gpu.sku.clone(),
            uuid: gpu.uuid.clone(),
            sku: gpu.sku.clone(),
            sm_count: Some(132),
            calibrated_read_gbps: Some(SYNTHETIC_READ_GBPS),
            host: gpu.host.clone(),
            ..Default::default()
        },
        measurement: CaseMeasurement {
            case_id: case.id.clone(),
            kernels: vec![
                kernel(KernelKind::Baseline, &case, base_ms),
                kernel(KernelKind::Optimized, &case, opt_ms),
            ],
            wall_s: 1.0,
        },
        case,
    }
}

/// A record of the fp8/fp8/bf16 case (`batch`, `max_seq_len`) on `gpu`.
pub fn record(
    gpu: &Gpu,
    batch: u32,
    max_seq_len: u32,
    opt_ms: &[f64],
    base_ms: &[f64],
) -> ResultRecord {
    record_case(
        gpu,
        case(batch, max_seq_len, QuantMode::FP8_QKV),
        opt_ms,
        base_ms,
    )
}

/// Writes `records` as a run's outputs into a fresh temporary directory, under a run id of its
/// own (`run-test-N`), as two real runs would have.
pub fn write_run(records: &[ResultRecord]) -> tempfile::TempDir {
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    let run_id = format!("run-test-{}", RUNS.fetch_add(1, Ordering::Relaxed));
    let records: Vec<ResultRecord> = records
        .iter()
        .map(|r| ResultRecord {
            run_id: run_id.clone(),
            ..r.clone()
        })
        .collect();
    let dir = tempfile::tempdir().expect("temporary directory");
    write_outputs(dir.path(), &records, chrono::Local::now()).expect("writing the outputs");
    dir
}
