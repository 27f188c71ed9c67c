//! `TryFrom` conversions between wire messages and domain types, in one place.
//!
//! Wire -> domain conversions validate: enum values must be known, required sub-messages present
//! and numbers in range, since these messages come from the network. Domain -> wire never fails.

use crate::wire;
use decodebench_kernels as k;
use thiserror::Error;

/// A wire message that cannot become a domain value. The field path says where.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("invalid `{field}`: {reason}")]
pub struct ConvertError {
    pub field: String,
    pub reason: String,
}

impl ConvertError {
    fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        ConvertError {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// An enum field holding a number this build does not know (a newer peer, or garbage).
    fn unknown(field: impl Into<String>, what: &str, value: i32) -> Self {
        ConvertError::new(field, format!("unknown {what} {value}"))
    }
}

/// `From` both ways between a domain struct and its wire message whose fields all have the same
/// names and types: the field list is written once, and a field missing on either side does not
/// compile.
macro_rules! same_fields {
    ($domain:path, $wire:path, [$($field:ident),+ $(,)?]) => {
        impl From<&$domain> for $wire {
            #[allow(clippy::clone_on_copy)]
            fn from(d: &$domain) -> Self {
                Self { $($field: d.$field.clone()),+ }
            }
        }

        impl From<$wire> for $domain {
            fn from(w: $wire) -> Self {
                Self { $($field: w.$field),+ }
            }
        }
    };
}

fn dtype_from_wire(v: i32, field: &str) -> Result<k::Dtype, ConvertError> {
    match wire::Dtype::try_from(v) {
        Ok(wire::Dtype::Bf16) => Ok(k::Dtype::Bf16),
        Ok(wire::Dtype::Fp8E4m3) => Ok(k::Dtype::Fp8),
        Ok(wire::Dtype::Nvfp4) => Ok(k::Dtype::Nvfp4),
        _ => Err(ConvertError::unknown(field, "dtype", v)),
    }
}

fn dtype_to_wire(d: k::Dtype) -> i32 {
    match d {
        k::Dtype::Bf16 => wire::Dtype::Bf16 as i32,
        k::Dtype::Fp8 => wire::Dtype::Fp8E4m3 as i32,
        k::Dtype::Nvfp4 => wire::Dtype::Nvfp4 as i32,
    }
}

fn status_from_wire(v: i32) -> Result<k::Status, ConvertError> {
    match wire::CaseStatus::try_from(v) {
        Ok(wire::CaseStatus::Ok) => Ok(k::Status::Ok),
        Ok(wire::CaseStatus::Skipped) => Ok(k::Status::Skipped),
        Ok(wire::CaseStatus::Oom) => Ok(k::Status::Oom),
        Ok(wire::CaseStatus::WrongResult) => Ok(k::Status::WrongResult),
        Ok(wire::CaseStatus::Failed) => Ok(k::Status::Failed),
        _ => Err(ConvertError::unknown("kernels[].status", "status", v)),
    }
}

fn status_to_wire(s: k::Status) -> i32 {
    (match s {
        k::Status::Ok => wire::CaseStatus::Ok,
        k::Status::Skipped => wire::CaseStatus::Skipped,
        k::Status::Oom => wire::CaseStatus::Oom,
        k::Status::WrongResult => wire::CaseStatus::WrongResult,
        k::Status::Failed => wire::CaseStatus::Failed,
    }) as i32
}

same_fields!(
    k::DeviceIdentity,
    wire::DeviceIdentity,
    [
        backend,
        name,
        uuid,
        serial,
        pci_bus_id,
        sku,
        compute_capability,
        sm_count,
        memory_bytes,
        driver_version,
        cuda_driver_version,
        nvrtc_version,
        vbios_version,
        power_limit_w,
        ecc_enabled,
        mig_enabled,
        calibrated_read_gbps,
        kernel_source_hash,
        host,
    ]
);

impl From<&k::MeasureMethod> for wire::MeasureMethod {
    fn from(m: &k::MeasureMethod) -> Self {
        wire::MeasureMethod {
            warmup: m.warmup,
            trials: m.trials,
            l2: match m.l2 {
                k::L2Mode::Hot => wire::L2Mode::Hot,
                k::L2Mode::Cold => wire::L2Mode::Cold,
            } as i32,
            timing: match m.timing {
                k::TimingMode::Events => wire::TimingMode::Events,
                k::TimingMode::Graph => wire::TimingMode::Graph,
            } as i32,
            graph_launches: m.graph_launches,
            target_rse: m.target_rse,
            max_trials: m.max_trials,
            max_time_s: m.max_time_s,
            throttle_retries: m.throttle_retries,
            kernels: match m.kernels {
                k::KernelSelection::Both => wire::KernelSelection::Both,
                k::KernelSelection::Optimized => wire::KernelSelection::Optimized,
                k::KernelSelection::Baseline => wire::KernelSelection::Baseline,
            } as i32,
        }
    }
}

impl TryFrom<wire::MeasureMethod> for k::MeasureMethod {
    type Error = ConvertError;
    fn try_from(m: wire::MeasureMethod) -> Result<Self, ConvertError> {
        let l2 = match wire::L2Mode::try_from(m.l2) {
            Ok(wire::L2Mode::Hot) => k::L2Mode::Hot,
            Ok(wire::L2Mode::Cold) => k::L2Mode::Cold,
            _ => return Err(ConvertError::unknown("method.l2", "L2 mode", m.l2)),
        };
        let timing = match wire::TimingMode::try_from(m.timing) {
            Ok(wire::TimingMode::Events) => k::TimingMode::Events,
            Ok(wire::TimingMode::Graph) => k::TimingMode::Graph,
            _ => {
                return Err(ConvertError::unknown(
                    "method.timing",
                    "timing mode",
                    m.timing,
                ))
            }
        };
        let kernels = match wire::KernelSelection::try_from(m.kernels) {
            Ok(wire::KernelSelection::Unspecified | wire::KernelSelection::Both) => {
                k::KernelSelection::Both
            }
            Ok(wire::KernelSelection::Optimized) => k::KernelSelection::Optimized,
            Ok(wire::KernelSelection::Baseline) => k::KernelSelection::Baseline,
            Err(_) => {
                return Err(ConvertError::unknown(
                    "method.kernels",
                    "kernel selection",
                    m.kernels,
                ))
            }
        };
        if !m.max_time_s.is_finite() || m.max_time_s < 0.0 {
            return Err(ConvertError::new(
                "method.max_time_s",
                "must be a finite number >= 0",
            ));
        }
        Ok(k::MeasureMethod {
            warmup: m.warmup,
            trials: m.trials,
            l2,
            timing,
            graph_launches: m.graph_launches,
            target_rse: m.target_rse,
            max_trials: m.max_trials,
            max_time_s: m.max_time_s,
            throttle_retries: m.throttle_retries,
            kernels,
        })
    }
}

impl From<&k::BenchCase> for wire::BenchCase {
    fn from(c: &k::BenchCase) -> Self {
        wire::BenchCase {
            id: c.id.clone(),
            batch_size: c.batch_size,
            max_seq_len: c.max_seq_len,
            q_dtype: dtype_to_wire(c.quant.q),
            kv_dtype: dtype_to_wire(c.quant.kv),
            out_dtype: dtype_to_wire(c.quant.out),
            num_qo_heads: c.num_qo_heads,
            num_kv_heads: c.num_kv_heads,
            head_size: c.head_size,
            layout: match c.layout {
                k::KvLayout::Hnd => wire::KvLayout::Hnd,
                k::KvLayout::Nhd => wire::KvLayout::Nhd,
            } as i32,
            block_size: c.block_size,
            pool_tokens: match c.pool {
                k::KvPool::Shared { tokens } => tokens,
                k::KvPool::Unique => 0,
            },
            seed: c.seed,
            method: Some((&c.method).into()),
        }
    }
}

impl TryFrom<wire::BenchCase> for k::BenchCase {
    type Error = ConvertError;
    fn try_from(c: wire::BenchCase) -> Result<Self, ConvertError> {
        let layout = match wire::KvLayout::try_from(c.layout) {
            Ok(wire::KvLayout::Hnd) => k::KvLayout::Hnd,
            Ok(wire::KvLayout::Nhd) => k::KvLayout::Nhd,
            _ => return Err(ConvertError::unknown("case.layout", "layout", c.layout)),
        };
        let method = c
            .method
            .ok_or_else(|| ConvertError::new("case.method", "missing"))?
            .try_into()?;
        let case = k::BenchCase {
            id: c.id,
            batch_size: c.batch_size,
            max_seq_len: c.max_seq_len,
            quant: k::QuantMode::new(
                dtype_from_wire(c.q_dtype, "case.q_dtype")?,
                dtype_from_wire(c.kv_dtype, "case.kv_dtype")?,
                dtype_from_wire(c.out_dtype, "case.out_dtype")?,
            ),
            num_qo_heads: c.num_qo_heads,
            num_kv_heads: c.num_kv_heads,
            head_size: c.head_size,
            layout,
            block_size: c.block_size,
            pool: if c.pool_tokens == 0 {
                k::KvPool::Unique
            } else {
                k::KvPool::Shared {
                    tokens: c.pool_tokens,
                }
            },
            seed: c.seed,
            method,
        };
        if case.id != case.compute_id() {
            return Err(ConvertError::new(
                "case.id",
                format!(
                    "id {} does not match the case parameters (expected {}): agent and coordinator \
                     disagree on case identity; run the same decodebench version on both",
                    case.id,
                    case.compute_id()
                ),
            ));
        }
        Ok(case)
    }
}

same_fields!(
    k::Telemetry,
    wire::Telemetry,
    [
        power_avg_w,
        power_max_w,
        energy_per_call_j,
        temp_avg_c,
        temp_max_c,
        mem_temp_max_c,
        sm_clock_min_mhz,
        sm_clock_avg_mhz,
        mem_clock_min_mhz,
        mem_clock_avg_mhz,
        gpu_util_avg_pct,
        throttle_reasons,
        samples,
    ]
);

impl From<&k::KernelMeasurement> for wire::KernelMeasurement {
    fn from(m: &k::KernelMeasurement) -> Self {
        wire::KernelMeasurement {
            kernel: match m.kernel {
                Some(k::KernelKind::Baseline) => wire::KernelKind::Baseline,
                Some(k::KernelKind::Optimized) => wire::KernelKind::Optimized,
                None => wire::KernelKind::Unspecified,
            } as i32,
            status: m
                .status
                .map(status_to_wire)
                .unwrap_or(wire::CaseStatus::Unspecified as i32),
            message: m.message.clone(),
            samples_ms: m.samples_ms.clone(),
            stats: m.stats.map(|s| wire::TimingStats {
                mean_ms: s.mean_ms,
                std_ms: s.std_ms,
                median_ms: s.median_ms,
                min_ms: s.min_ms,
                max_ms: s.max_ms,
                p5_ms: s.p5_ms,
                p95_ms: s.p95_ms,
                rse: s.rse,
            }),
            accuracy: m.accuracy.map(|a| wire::Accuracy {
                max_abs_err: a.max_abs_err,
                rel_l2_err: a.rel_l2_err,
                tolerance: a.tolerance,
            }),
            bytes_per_call: m.bytes_per_call,
            bandwidth_gbps: m.bandwidth_gbps,
            bandwidth_fraction: m.bandwidth_fraction,
            telemetry: Some((&m.telemetry).into()),
            rse_target_met: m.rse_target_met,
            throttled: m.throttled,
            throttle_retries_used: m.throttle_retries_used,
        }
    }
}

impl TryFrom<wire::KernelMeasurement> for k::KernelMeasurement {
    type Error = ConvertError;
    fn try_from(m: wire::KernelMeasurement) -> Result<Self, ConvertError> {
        let kernel = match wire::KernelKind::try_from(m.kernel) {
            Ok(wire::KernelKind::Baseline) => k::KernelKind::Baseline,
            Ok(wire::KernelKind::Optimized) => k::KernelKind::Optimized,
            _ => {
                return Err(ConvertError::unknown(
                    "kernels[].kernel",
                    "kernel kind",
                    m.kernel,
                ))
            }
        };
        if m.samples_ms.iter().any(|x| !x.is_finite() || *x < 0.0) {
            return Err(ConvertError::new(
                "kernels[].samples_ms",
                "every sample must be a finite, non-negative time",
            ));
        }
        let mut message = m.message;
        let accuracy = m.accuracy.map(|a| {
            // A kernel that wrote NaN/inf has a non-finite error; JSON (the journal) and most
            // readers cannot hold those, so they are stored as f64::MAX and the message says so.
            let fix = |x: f64| if x.is_finite() { x } else { f64::MAX };
            if !(a.max_abs_err.is_finite() && a.rel_l2_err.is_finite()) {
                message.push_str(" [non-finite output error, recorded as f64::MAX]");
            }
            k::Accuracy {
                max_abs_err: fix(a.max_abs_err),
                rel_l2_err: fix(a.rel_l2_err),
                tolerance: fix(a.tolerance),
            }
        });
        let finite = |x: Option<f64>| x.filter(|v| v.is_finite());
        let stats = m.stats.filter(|s| {
            [
                s.mean_ms,
                s.std_ms,
                s.median_ms,
                s.min_ms,
                s.max_ms,
                s.p5_ms,
                s.p95_ms,
                s.rse,
            ]
            .iter()
            .all(|v| v.is_finite())
        });
        let mut telemetry: k::Telemetry = m.telemetry.map(Into::into).unwrap_or_default();
        for v in [
            &mut telemetry.power_avg_w,
            &mut telemetry.power_max_w,
            &mut telemetry.energy_per_call_j,
            &mut telemetry.temp_avg_c,
            &mut telemetry.temp_max_c,
            &mut telemetry.mem_temp_max_c,
            &mut telemetry.sm_clock_min_mhz,
            &mut telemetry.sm_clock_avg_mhz,
            &mut telemetry.mem_clock_min_mhz,
            &mut telemetry.mem_clock_avg_mhz,
            &mut telemetry.gpu_util_avg_pct,
        ] {
            *v = finite(*v);
        }
        Ok(k::KernelMeasurement {
            kernel: Some(kernel),
            status: Some(status_from_wire(m.status)?),
            message,
            samples_ms: m.samples_ms,
            stats: stats.map(|s| k::TimingStats {
                mean_ms: s.mean_ms,
                std_ms: s.std_ms,
                median_ms: s.median_ms,
                min_ms: s.min_ms,
                max_ms: s.max_ms,
                p5_ms: s.p5_ms,
                p95_ms: s.p95_ms,
                rse: s.rse,
            }),
            accuracy,
            bytes_per_call: m.bytes_per_call,
            bandwidth_gbps: finite(m.bandwidth_gbps),
            bandwidth_fraction: finite(m.bandwidth_fraction),
            telemetry,
            rse_target_met: m.rse_target_met,
            throttled: m.throttled,
            throttle_retries_used: m.throttle_retries_used,
        })
    }
}

impl From<&k::CaseMeasurement> for wire::CaseMeasurement {
    fn from(c: &k::CaseMeasurement) -> Self {
        wire::CaseMeasurement {
            case_id: c.case_id.clone(),
            kernels: c.kernels.iter().map(Into::into).collect(),
            wall_s: c.wall_s,
        }
    }
}

impl TryFrom<wire::CaseMeasurement> for k::CaseMeasurement {
    type Error = ConvertError;
    fn try_from(c: wire::CaseMeasurement) -> Result<Self, ConvertError> {
        if c.kernels.is_empty() {
            return Err(ConvertError::new(
                "measurement.kernels",
                "no kernel measurements",
            ));
        }
        let kernels = c
            .kernels
            .into_iter()
            .map(k::KernelMeasurement::try_from)
            .collect::<Result<Vec<_>, _>>()?;
        let mut seen = std::collections::HashSet::new();
        for m in &kernels {
            if !seen.insert(m.kernel) {
                return Err(ConvertError::new(
                    "measurement.kernels",
                    "the same kernel is reported twice in one measurement",
                ));
            }
        }
        Ok(k::CaseMeasurement {
            case_id: c.case_id,
            kernels,
            wall_s: if c.wall_s.is_finite() { c.wall_s } else { 0.0 },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn case() -> k::BenchCase {
        k::BenchCase {
            id: String::new(),
            batch_size: 4,
            max_seq_len: 1024,
            quant: k::QuantMode::FP8_QKV_NVFP4_OUT,
            num_qo_heads: 64,
            num_kv_heads: 8,
            head_size: 128,
            layout: k::KvLayout::Nhd,
            block_size: 16,
            pool: k::KvPool::Unique,
            seed: 9,
            method: k::MeasureMethod {
                target_rse: Some(0.005),
                ..Default::default()
            },
        }
        .with_id()
    }

    #[test]
    fn case_round_trips() {
        let c = case();
        let w: wire::BenchCase = (&c).into();
        let back = k::BenchCase::try_from(w).unwrap();
        assert_eq!(c, back);
    }

    #[test]
    fn kernel_selection_round_trips_and_unspecified_means_both() {
        for kernels in k::KernelSelection::ALL {
            let mut c = case();
            c.method.kernels = kernels;
            let c = c.with_id();
            let back = k::BenchCase::try_from(wire::BenchCase::from(&c)).unwrap();
            assert_eq!(back.method.kernels, kernels);
        }
        let mut w: wire::MeasureMethod = (&case().method).into();
        w.kernels = wire::KernelSelection::Unspecified as i32;
        let m = k::MeasureMethod::try_from(w).unwrap();
        assert_eq!(m.kernels, k::KernelSelection::Both);
        w.kernels = 42;
        assert_eq!(
            k::MeasureMethod::try_from(w).unwrap_err().field,
            "method.kernels"
        );
    }

    #[test]
    fn tampered_case_id_is_refused() {
        let mut w: wire::BenchCase = (&case()).into();
        w.batch_size = 8;
        let err = k::BenchCase::try_from(w).unwrap_err();
        assert_eq!(err.field, "case.id");
    }

    #[test]
    fn unknown_enum_values_are_refused() {
        let mut w: wire::BenchCase = (&case()).into();
        w.q_dtype = 99;
        assert_eq!(k::BenchCase::try_from(w).unwrap_err().field, "case.q_dtype");
    }

    #[test]
    fn measurement_round_trips_and_rejects_bad_samples() {
        let mut m = k::KernelMeasurement {
            kernel: Some(k::KernelKind::Optimized),
            status: Some(k::Status::Ok),
            samples_ms: vec![0.5, 0.6],
            bytes_per_call: 1000,
            ..Default::default()
        };
        m.finish_stats(Some(3100.0));
        m.telemetry.throttle_reasons = vec!["sw_power_cap".into()];
        m.telemetry.power_avg_w = Some(300.0);
        let cm = k::CaseMeasurement {
            case_id: "abc".into(),
            kernels: vec![m],
            wall_s: 1.5,
        };
        let w: wire::CaseMeasurement = (&cm).into();
        assert_eq!(k::CaseMeasurement::try_from(w.clone()).unwrap(), cm);
        let mut bad = w.clone();
        bad.kernels[0].samples_ms[0] = f64::NAN;
        assert!(k::CaseMeasurement::try_from(bad).is_err());
        // A wrong kernel that wrote NaN: its error is kept as f64::MAX, never as NaN.
        let mut nan = w;
        nan.kernels[0].accuracy = Some(wire::Accuracy {
            max_abs_err: f64::NAN,
            rel_l2_err: f64::INFINITY,
            tolerance: 0.01,
        });
        nan.kernels[0].telemetry.as_mut().unwrap().power_avg_w = Some(f64::NAN);
        let got = k::CaseMeasurement::try_from(nan).unwrap();
        let a = got.kernels[0].accuracy.unwrap();
        assert_eq!((a.max_abs_err, a.rel_l2_err), (f64::MAX, f64::MAX));
        assert!(got.kernels[0].message.contains("non-finite"));
        assert_eq!(got.kernels[0].telemetry.power_avg_w, None);
    }
}
