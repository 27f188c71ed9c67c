//! What running a case produces: per-kernel measurements, telemetry and device identity.
//!
//! A backend fills these; the agent ships them to the coordinator, which flattens them into the
//! result schema (one row per case x kernel x GPU).

use serde::{Deserialize, Serialize};

/// The two implementations timed for every case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KernelKind {
    /// Plain paged decode in BF16 on dequantized inputs (the reference script's baseline).
    Baseline,
    /// The quantization-aware kernel (the reference script's `trtllm` columns).
    Optimized,
}

impl KernelKind {
    pub const ALL: [KernelKind; 2] = [KernelKind::Baseline, KernelKind::Optimized];

    pub fn as_str(self) -> &'static str {
        match self {
            KernelKind::Baseline => "baseline",
            KernelKind::Optimized => "optimized",
        }
    }

    pub fn parse(s: &str) -> Option<KernelKind> {
        match s {
            "baseline" => Some(KernelKind::Baseline),
            "optimized" => Some(KernelKind::Optimized),
            _ => None,
        }
    }
}

/// Outcome of one kernel on one case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Ok,
    /// The combination is unsupported by this kernel/backend; the message says why.
    Skipped,
    /// The case did not fit in device memory; the message gives the sizes.
    Oom,
    /// The output did not match the reference within tolerance; never timed as valid.
    WrongResult,
    /// Anything else went wrong (a CUDA error, a panic caught in the backend, retries exhausted).
    Failed,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Skipped => "skipped",
            Status::Oom => "oom",
            Status::WrongResult => "wrong_result",
            Status::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Status> {
        match s {
            "ok" => Some(Status::Ok),
            "skipped" => Some(Status::Skipped),
            "oom" => Some(Status::Oom),
            "wrong_result" => Some(Status::WrongResult),
            "failed" => Some(Status::Failed),
            _ => None,
        }
    }
}

/// Summary statistics of per-trial times, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct TimingStats {
    pub mean_ms: f64,
    /// Sample standard deviation (n-1), like `torch.std` in the reference script.
    pub std_ms: f64,
    pub median_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
    pub p5_ms: f64,
    pub p95_ms: f64,
    /// Relative standard error of the mean: std / sqrt(n) / mean.
    pub rse: f64,
}

impl TimingStats {
    /// Statistics of `samples`; `None` when there are none.
    pub fn from_samples(samples: &[f64]) -> Option<TimingStats> {
        if samples.is_empty() {
            return None;
        }
        let n = samples.len() as f64;
        let mean = samples.iter().sum::<f64>() / n;
        let var = if samples.len() > 1 {
            samples.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n - 1.0)
        } else {
            0.0
        };
        let std = var.sqrt();
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        Some(TimingStats {
            mean_ms: mean,
            std_ms: std,
            median_ms: percentile(&sorted, 50.0),
            min_ms: sorted[0],
            max_ms: sorted[sorted.len() - 1],
            p5_ms: percentile(&sorted, 5.0),
            p95_ms: percentile(&sorted, 95.0),
            rse: if mean > 0.0 {
                std / n.sqrt() / mean
            } else {
                0.0
            },
        })
    }
}

/// Linear-interpolated percentile of sorted data (numpy's default method).
pub fn percentile(sorted: &[f64], pct: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = pct / 100.0 * (sorted.len() - 1) as f64;
    let lo = rank.floor() as usize;
    let hi = rank.ceil() as usize;
    let frac = rank - lo as f64;
    sorted[lo] + (sorted[hi] - sorted[lo]) * frac
}

/// Error of a kernel's output against the reference, on decoded values.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Accuracy {
    pub max_abs_err: f64,
    /// ||out - ref||_2 / ||ref||_2
    pub rel_l2_err: f64,
    /// The tolerance the kernel was held to (max abs error allowed), for the record.
    pub tolerance: f64,
}

/// What the GPU was doing while a kernel was timed. Every field is optional: a reading the driver
/// does not support, or no NVML at all, leaves it `None` rather than made up.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Telemetry {
    pub power_avg_w: Option<f64>,
    pub power_max_w: Option<f64>,
    pub energy_per_call_j: Option<f64>,
    pub temp_avg_c: Option<f64>,
    pub temp_max_c: Option<f64>,
    pub mem_temp_max_c: Option<f64>,
    pub sm_clock_min_mhz: Option<f64>,
    pub sm_clock_avg_mhz: Option<f64>,
    pub mem_clock_min_mhz: Option<f64>,
    pub mem_clock_avg_mhz: Option<f64>,
    pub gpu_util_avg_pct: Option<f64>,
    /// Union of the clock-event (throttle) reasons seen, as readable names.
    pub throttle_reasons: Vec<String>,
    /// Number of NVML samples taken.
    pub samples: u32,
}

impl Telemetry {
    /// True when a thermal or power throttle reason was seen (NVML's `hw_slowdown` covers both
    /// thermal and power-brake slowdowns, so it counts too).
    pub fn throttled(&self) -> bool {
        self.throttle_reasons.iter().any(|r| {
            let r = r.to_ascii_lowercase();
            r.contains("thermal") || r.contains("power") || r == "hw_slowdown"
        })
    }
}

/// One kernel's measurement on one case.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct KernelMeasurement {
    pub kernel: Option<KernelKind>,
    pub status: Option<Status>,
    pub message: String,
    /// Raw per-trial times in milliseconds (per call; in graph mode replay time / launches).
    pub samples_ms: Vec<f64>,
    pub stats: Option<TimingStats>,
    pub accuracy: Option<Accuracy>,
    pub bytes_per_call: u64,
    /// bytes_per_call / mean time, in GB/s (1e9 bytes per second).
    pub bandwidth_gbps: Option<f64>,
    /// bandwidth as a fraction of the device's calibrated streaming-read bandwidth.
    pub bandwidth_fraction: Option<f64>,
    pub telemetry: Telemetry,
    /// Noise-based stopping: whether the target RSE was reached (None when not used).
    pub rse_target_met: Option<bool>,
    /// Trials that ran under thermal/power throttling were seen.
    pub throttled: bool,
    /// Throttle-gated re-measurements that were made.
    pub throttle_retries_used: u32,
}

impl KernelMeasurement {
    /// A measurement with a non-ok status and an explanation; no timings.
    pub fn not_timed(kernel: KernelKind, status: Status, message: impl Into<String>) -> Self {
        KernelMeasurement {
            kernel: Some(kernel),
            status: Some(status),
            message: message.into(),
            ..Default::default()
        }
    }

    /// This timed measurement, turned into a wrong result because the output its timed calls left
    /// disagrees with the reference (`detail`, `accuracy`), although the one call verified before
    /// them agreed: the calls disturb each other (a race between calls, or state one call leaves
    /// for the next), so their times are not a measurement of correct work. A non-ok kernel
    /// carries no timings, so the message keeps how many calls were timed and their median.
    pub fn wrong_after_timing(self, accuracy: Accuracy, detail: &str) -> KernelMeasurement {
        let kernel = self.kernel.map_or("the kernel".to_string(), |k| {
            format!("the {} kernel", k.as_str())
        });
        let timed = match self.stats {
            Some(s) => format!(
                "{} timed calls (median {:.4} ms, not reported)",
                self.samples_ms.len(),
                s.median_ms
            ),
            None => "timed calls".to_string(),
        };
        KernelMeasurement {
            kernel: self.kernel,
            status: Some(Status::WrongResult),
            message: format!(
                "{kernel}'s output passed verification after one call, but the output \
                 its {timed} left disagrees with the reference: {detail}; its calls disturb each \
                 other (a race between calls, or state one call leaves for the next), so this is \
                 a kernel bug: check it with `decodebench selftest` and report the case"
            ),
            accuracy: Some(accuracy),
            bytes_per_call: self.bytes_per_call,
            ..Default::default()
        }
    }

    /// Fills `stats`, `bandwidth_gbps` and `bandwidth_fraction` from `samples_ms`.
    pub fn finish_stats(&mut self, calibrated_read_gbps: Option<f64>) {
        self.stats = TimingStats::from_samples(&self.samples_ms);
        self.bandwidth_gbps = self
            .stats
            .filter(|s| s.mean_ms > 0.0)
            .map(|s| self.bytes_per_call as f64 / (s.mean_ms * 1e-3) / 1e9);
        self.bandwidth_fraction = match (self.bandwidth_gbps, calibrated_read_gbps) {
            (Some(bw), Some(cal)) if cal > 0.0 => Some(bw / cal),
            _ => None,
        };
    }
}

/// Identity of the device (or CPU) an agent runs on; recorded once per agent and joined to every
/// row. Unknown fields are `None`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct DeviceIdentity {
    /// "cuda" or "cpu".
    pub backend: String,
    pub name: String,
    pub uuid: String,
    pub serial: Option<String>,
    pub pci_bus_id: Option<String>,
    /// Model name used for per-SKU placement (e.g. "NVIDIA H100 80GB HBM3"; the CPU model for CPU).
    pub sku: String,
    pub compute_capability: Option<String>,
    pub sm_count: Option<u32>,
    pub memory_bytes: Option<u64>,
    pub driver_version: Option<String>,
    pub cuda_driver_version: Option<String>,
    pub nvrtc_version: Option<String>,
    pub vbios_version: Option<String>,
    pub power_limit_w: Option<f64>,
    pub ecc_enabled: Option<bool>,
    pub mig_enabled: Option<bool>,
    /// Streaming-read bandwidth measured by the calibration kernel at agent start, GB/s.
    pub calibrated_read_gbps: Option<f64>,
    /// Hash of the kernel sources compiled on this agent.
    pub kernel_source_hash: Option<String>,
    pub host: String,
}

/// Everything an agent reports for one case.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct CaseMeasurement {
    pub case_id: String,
    /// Actual per-sequence lengths used (drawn from the case seed).
    pub kernels: Vec<KernelMeasurement>,
    /// Seconds the whole case took on the agent, set-up and verification included.
    pub wall_s: f64,
}

impl CaseMeasurement {
    /// A well-formed result for `case_id`: both kernels `ok`, three timed samples each. A fixture
    /// for the tests of what takes measurements in (the coordinator, the wire conversion).
    #[doc(hidden)]
    pub fn example_ok(case_id: &str) -> CaseMeasurement {
        let kernels = KernelKind::ALL
            .iter()
            .map(|&kind| {
                let mut k = KernelMeasurement {
                    kernel: Some(kind),
                    status: Some(Status::Ok),
                    samples_ms: vec![0.5, 0.6, 0.55],
                    bytes_per_call: 1 << 20,
                    ..Default::default()
                };
                k.finish_stats(None);
                k
            })
            .collect();
        CaseMeasurement {
            case_id: case_id.to_string(),
            kernels,
            wall_s: 0.1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_match_hand_computed_values() {
        let s = TimingStats::from_samples(&[1.0, 2.0, 3.0, 4.0, 5.0]).unwrap();
        assert_eq!(s.mean_ms, 3.0);
        assert!((s.std_ms - 2.5f64.sqrt()).abs() < 1e-12);
        assert_eq!(s.median_ms, 3.0);
        assert_eq!(s.min_ms, 1.0);
        assert_eq!(s.max_ms, 5.0);
        assert!((s.p5_ms - 1.2).abs() < 1e-12);
        assert!((s.p95_ms - 4.8).abs() < 1e-12);
        assert!(TimingStats::from_samples(&[]).is_none());
    }

    #[test]
    fn a_kernel_wrong_after_its_timed_calls_keeps_no_timing_and_says_what_was_timed() {
        let mut timed = KernelMeasurement {
            kernel: Some(KernelKind::Optimized),
            status: Some(Status::Ok),
            samples_ms: vec![2.0, 1.0, 3.0],
            bytes_per_call: 4096,
            ..Default::default()
        };
        timed.finish_stats(None);
        let accuracy = Accuracy {
            max_abs_err: 0.5,
            rel_l2_err: 0.25,
            tolerance: 0.01,
        };
        let m = timed.wrong_after_timing(accuracy, "max |err| 5e-1");
        assert_eq!(m.status, Some(Status::WrongResult));
        assert_eq!(m.kernel, Some(KernelKind::Optimized));
        assert!(m.samples_ms.is_empty() && m.stats.is_none() && m.bandwidth_gbps.is_none());
        assert_eq!(m.accuracy, Some(accuracy));
        assert_eq!(m.bytes_per_call, 4096);
        for part in [
            "optimized kernel",
            "3 timed calls (median 2.0000 ms, not reported)",
            "max |err| 5e-1",
            "decodebench selftest",
        ] {
            assert!(m.message.contains(part), "{part:?} in {}", m.message);
        }
    }

    #[test]
    fn bandwidth_follows_bytes_over_mean_time() {
        let mut m = KernelMeasurement {
            samples_ms: vec![1.0, 1.0],
            bytes_per_call: 3_000_000_000,
            ..Default::default()
        };
        m.finish_stats(Some(3000.0));
        assert!((m.bandwidth_gbps.unwrap() - 3000.0).abs() < 1e-9);
        assert!((m.bandwidth_fraction.unwrap() - 1.0).abs() < 1e-12);
    }
}
