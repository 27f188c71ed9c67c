//! `TryFrom` conversions between wire messages and domain types, in one place.
//!
//! Wire -> domain conversions validate: enum values must be known, required sub-messages present
//! and numbers in range, since these messages come from the network. Domain -> wire never fails.
//!
//! A measurement is refused here, where it enters, when it holds a number no real run produces: an
//! ok kernel without samples or with a sample that is zero, negative, NaN or infinite, timing
//! statistics or a bandwidth that such samples cannot have, timings on a kernel that was not timed
//! as valid, a non-finite telemetry reading or wall time. Accepted, such a row would be journaled
//! and written, and only the analysis of the finished run (`compare`, `report`) would refuse the
//! file, long after the agent that sent it could be fixed. The error names the kernel and field.

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

fn status_from_wire(v: i32, field: &str) -> Result<k::Status, ConvertError> {
    match wire::CaseStatus::try_from(v) {
        Ok(wire::CaseStatus::Ok) => Ok(k::Status::Ok),
        Ok(wire::CaseStatus::Skipped) => Ok(k::Status::Skipped),
        Ok(wire::CaseStatus::Oom) => Ok(k::Status::Oom),
        Ok(wire::CaseStatus::WrongResult) => Ok(k::Status::WrongResult),
        Ok(wire::CaseStatus::Failed) => Ok(k::Status::Failed),
        _ => Err(ConvertError::unknown(field, "status", v)),
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

/// Why a timing no timer can produce is refused, and what to do about it.
const TIMING_BUG: &str = "a timed trial takes a positive, finite number of milliseconds, so this \
    is a bug in the agent's timing (its timer, clock or unit conversion), not a measurement; fix \
    the agent, then run the case again";

/// The first value of `values` that fails `valid`, with its index.
fn first_invalid(values: &[f64], valid: impl Fn(f64) -> bool) -> Option<(usize, f64)> {
    values.iter().copied().enumerate().find(|&(_, v)| !valid(v))
}

fn positive_finite(v: f64) -> bool {
    v.is_finite() && v > 0.0
}

fn non_negative_finite(v: f64) -> bool {
    v.is_finite() && v >= 0.0
}

/// Refuses timings that cannot come from a real timer. A kernel whose status is ok must carry at
/// least one sample, every sample a positive finite time, and statistics (when sent) that such
/// samples can have; a kernel with any other status was not timed as valid and carries neither
/// (its numbers would read as a measurement in the results). `at` turns a field name into its
/// path (`kernels[optimized].samples_ms[3]`).
fn check_timing(
    status: k::Status,
    samples_ms: &[f64],
    stats: Option<&wire::TimingStats>,
    at: &dyn Fn(&str) -> String,
) -> Result<(), ConvertError> {
    if status != k::Status::Ok {
        if !samples_ms.is_empty() || stats.is_some() {
            let what = if samples_ms.is_empty() {
                "timing statistics".to_string()
            } else {
                format!("{} timed samples", samples_ms.len())
            };
            return Err(ConvertError::new(
                at(if samples_ms.is_empty() {
                    "stats"
                } else {
                    "samples_ms"
                }),
                format!(
                    "the kernel's status is {} but it carries {what}: a kernel that was not \
                     timed as valid reports no timing (its numbers would read as a measurement \
                     in the results); this is a bug in the agent: send timings only with status \
                     ok",
                    status.as_str()
                ),
            ));
        }
        return Ok(());
    }
    if samples_ms.is_empty() {
        return Err(ConvertError::new(
            at("samples_ms"),
            "is empty on a kernel whose status is ok: a kernel timed as valid has at least one \
             timed trial; this is a bug in the agent: report a kernel it could not time with a \
             non-ok status and a message that says why",
        ));
    }
    if let Some((i, v)) = first_invalid(samples_ms, positive_finite) {
        return Err(ConvertError::new(
            at(&format!("samples_ms[{i}]")),
            format!("is {v} ms on a kernel whose status is ok: {TIMING_BUG}"),
        ));
    }
    if let Some(s) = stats {
        let times = [
            ("mean_ms", s.mean_ms),
            ("median_ms", s.median_ms),
            ("min_ms", s.min_ms),
            ("max_ms", s.max_ms),
            ("p5_ms", s.p5_ms),
            ("p95_ms", s.p95_ms),
        ];
        for (name, v) in times {
            if !positive_finite(v) {
                return Err(ConvertError::new(
                    at(&format!("stats.{name}")),
                    format!(
                        "is {v} ms on a kernel whose status is ok: statistics of positive finite \
                         samples are positive and finite; {TIMING_BUG}"
                    ),
                ));
            }
        }
        for (name, v) in [("std_ms", s.std_ms), ("rse", s.rse)] {
            if !non_negative_finite(v) {
                return Err(ConvertError::new(
                    at(&format!("stats.{name}")),
                    format!(
                        "is {v} on a kernel whose status is ok: a spread is finite and never \
                         negative; {TIMING_BUG}"
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Refuses a bandwidth that is negative or not finite. Absent is fine (no calibration, or no
/// bytes counted); 0 is what a kernel that moves no counted bytes reports.
fn check_bandwidth(
    m: &wire::KernelMeasurement,
    at: &dyn Fn(&str) -> String,
) -> Result<(), ConvertError> {
    for (name, v) in [
        ("bandwidth_gbps", m.bandwidth_gbps),
        ("bandwidth_fraction", m.bandwidth_fraction),
    ] {
        if let Some(v) = v.filter(|v| !non_negative_finite(*v)) {
            return Err(ConvertError::new(
                at(name),
                format!(
                    "is {v}: bytes over a positive time are finite and never negative; this is a \
                     bug in the agent (leave the field unset when it is unknown)"
                ),
            ));
        }
    }
    Ok(())
}

/// Refuses a telemetry reading that is not finite. decodebench's NVML sampler drops such readings
/// itself and leaves the field unset, so one on the wire is a bug in the agent. Signs are not
/// checked: a reading is the driver's word, and a glitch in it must not cost the measurement.
fn check_telemetry(t: &wire::Telemetry, at: &dyn Fn(&str) -> String) -> Result<(), ConvertError> {
    let readings = [
        ("power_avg_w", t.power_avg_w),
        ("power_max_w", t.power_max_w),
        ("energy_per_call_j", t.energy_per_call_j),
        ("temp_avg_c", t.temp_avg_c),
        ("temp_max_c", t.temp_max_c),
        ("mem_temp_max_c", t.mem_temp_max_c),
        ("sm_clock_min_mhz", t.sm_clock_min_mhz),
        ("sm_clock_avg_mhz", t.sm_clock_avg_mhz),
        ("mem_clock_min_mhz", t.mem_clock_min_mhz),
        ("mem_clock_avg_mhz", t.mem_clock_avg_mhz),
        ("gpu_util_avg_pct", t.gpu_util_avg_pct),
    ];
    for (name, v) in readings {
        if let Some(v) = v.filter(|v| !v.is_finite()) {
            return Err(ConvertError::new(
                at(&format!("telemetry.{name}")),
                format!(
                    "is {v}: a reading is a finite number, or unset when the driver gave none; \
                     this is a bug in the agent's telemetry (leave an unread field unset)"
                ),
            ));
        }
    }
    Ok(())
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
        let at = |field: &str| format!("kernels[{}].{field}", kernel.as_str());
        let status = status_from_wire(m.status, &at("status"))?;
        check_timing(status, &m.samples_ms, m.stats.as_ref(), &at)?;
        check_bandwidth(&m, &at)?;
        if let Some(t) = &m.telemetry {
            check_telemetry(t, &at)?;
        }
        let mut message = m.message;
        let accuracy = match m.accuracy {
            None => None,
            Some(a) => {
                // An error is a magnitude: negative is no output's error. NaN and infinity are
                // what a kernel that wrote NaN/inf has (a wrong result, not an agent bug).
                for (name, v) in [
                    ("max_abs_err", a.max_abs_err),
                    ("rel_l2_err", a.rel_l2_err),
                    ("tolerance", a.tolerance),
                ] {
                    if v < 0.0 {
                        return Err(ConvertError::new(
                            at(&format!("accuracy.{name}")),
                            format!(
                                "is {v}: an error or tolerance is a magnitude, never negative; \
                                 this is a bug in the agent's verification"
                            ),
                        ));
                    }
                }
                // JSON (the journal) and most readers cannot hold non-finite numbers, so they are
                // stored as f64::MAX and the message says so.
                let fix = |x: f64| if x.is_finite() { x } else { f64::MAX };
                if !(a.max_abs_err.is_finite() && a.rel_l2_err.is_finite()) {
                    message.push_str(" [non-finite output error, recorded as f64::MAX]");
                }
                Some(k::Accuracy {
                    max_abs_err: fix(a.max_abs_err),
                    rel_l2_err: fix(a.rel_l2_err),
                    tolerance: fix(a.tolerance),
                })
            }
        };
        Ok(k::KernelMeasurement {
            kernel: Some(kernel),
            status: Some(status),
            message,
            samples_ms: m.samples_ms,
            stats: m.stats.map(|s| k::TimingStats {
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
            bandwidth_gbps: m.bandwidth_gbps,
            bandwidth_fraction: m.bandwidth_fraction,
            telemetry: m.telemetry.map(Into::into).unwrap_or_default(),
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
        if !(c.wall_s.is_finite() && c.wall_s >= 0.0) {
            return Err(ConvertError::new(
                "measurement.wall_s",
                format!(
                    "is {}: the seconds a case took are finite and never negative; this is a bug \
                     in the agent's clock",
                    c.wall_s
                ),
            ));
        }
        let kernels = c
            .kernels
            .into_iter()
            .map(k::KernelMeasurement::try_from)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ConvertError {
                field: format!("measurement.{}", e.field),
                ..e
            })?;
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
            wall_s: c.wall_s,
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

    /// An ok optimized kernel with three samples, statistics, bandwidth and telemetry, as a CUDA
    /// agent sends it, and a baseline that was not timed.
    fn measurement() -> k::CaseMeasurement {
        let mut m = k::KernelMeasurement {
            kernel: Some(k::KernelKind::Optimized),
            status: Some(k::Status::Ok),
            samples_ms: vec![0.5, 0.6, 0.55],
            accuracy: Some(k::Accuracy {
                max_abs_err: 0.01,
                rel_l2_err: 0.002,
                tolerance: 0.05,
            }),
            bytes_per_call: 1000,
            ..Default::default()
        };
        m.finish_stats(Some(3100.0));
        m.telemetry.throttle_reasons = vec!["sw_power_cap".into()];
        m.telemetry.power_avg_w = Some(300.0);
        m.telemetry.samples = 4;
        k::CaseMeasurement {
            case_id: "abc".into(),
            kernels: vec![
                k::KernelMeasurement::not_timed(
                    k::KernelKind::Baseline,
                    k::Status::WrongResult,
                    "max abs err 0.5 > 0.05",
                ),
                m,
            ],
            wall_s: 1.5,
        }
    }

    /// `measurement()` on the wire, changed by `edit`, converted back.
    fn convert_edited(
        edit: impl FnOnce(&mut wire::CaseMeasurement),
    ) -> Result<k::CaseMeasurement, ConvertError> {
        let mut w: wire::CaseMeasurement = (&measurement()).into();
        edit(&mut w);
        k::CaseMeasurement::try_from(w)
    }

    /// The optimized (ok) kernel of a wire measurement.
    fn ok_kernel(w: &mut wire::CaseMeasurement) -> &mut wire::KernelMeasurement {
        &mut w.kernels[1]
    }

    #[test]
    fn measurement_round_trips() {
        let cm = measurement();
        let w: wire::CaseMeasurement = (&cm).into();
        assert_eq!(k::CaseMeasurement::try_from(w).unwrap(), cm);
    }

    #[test]
    fn a_kernel_found_wrong_after_its_timed_calls_crosses_the_wire() {
        // What a backend reports when the output its timed calls left fails verification: a
        // wrong result with its accuracy and no timings, which the coordinator takes in as is.
        let mut cm = k::CaseMeasurement::example_ok("abcd");
        let timed = cm.kernels.remove(1);
        let accuracy = k::Accuracy {
            max_abs_err: 2.0,
            rel_l2_err: 0.5,
            tolerance: 0.01,
        };
        cm.kernels
            .push(timed.wrong_after_timing(accuracy, "max |err| 2"));
        let w: wire::CaseMeasurement = (&cm).into();
        assert_eq!(k::CaseMeasurement::try_from(w).unwrap(), cm);
    }

    #[test]
    fn what_the_cpu_backend_measures_is_accepted() {
        use k::Backend;
        let mut backend = k::CpuBackend::new();
        let small = |quant| {
            k::BenchCase {
                num_qo_heads: 8,
                num_kv_heads: 1,
                head_size: 64,
                pool: k::KvPool::Unique,
                method: k::MeasureMethod {
                    warmup: 1,
                    trials: 3,
                    ..Default::default()
                },
                ..k::BenchCase::reference_shape(1, 16, quant)
            }
            .with_id()
        };
        let timed = small(k::QuantMode::BF16);
        let skipped = small(k::QuantMode::new(
            k::Dtype::Nvfp4,
            k::Dtype::Nvfp4,
            k::Dtype::Bf16,
        ));
        for case in [timed, skipped] {
            let m = backend.run_case(&case, &mut k::NoTelemetry);
            let expected = if case.quant.unsupported_reason().is_none() {
                k::Status::Ok
            } else {
                k::Status::Skipped
            };
            assert!(
                m.kernels.iter().all(|k| k.status == Some(expected)),
                "{}: {m:?}",
                case.label()
            );
            let back = k::CaseMeasurement::try_from(wire::CaseMeasurement::from(&m));
            assert_eq!(back.as_ref(), Ok(&m), "{}", case.label());
        }
    }

    #[test]
    fn an_ok_sample_that_is_not_a_time_is_refused_with_its_kernel_index_and_value() {
        for (bad, shown) in [
            (0.0, "0"),
            (-0.25, "-0.25"),
            (f64::NAN, "NaN"),
            (f64::INFINITY, "inf"),
            (f64::NEG_INFINITY, "-inf"),
        ] {
            let e = convert_edited(|w| ok_kernel(w).samples_ms[1] = bad).unwrap_err();
            assert_eq!(e.field, "measurement.kernels[optimized].samples_ms[1]");
            let text = e.to_string();
            assert!(
                text.contains(&format!("samples_ms[1]`: is {shown} ms")),
                "{text}"
            );
            assert!(text.contains("bug in the agent's timing"), "{text}");
        }
    }

    #[test]
    fn an_ok_kernel_without_samples_is_refused() {
        let e = convert_edited(|w| {
            let k = ok_kernel(w);
            k.samples_ms.clear();
            k.stats = None;
        })
        .unwrap_err();
        assert_eq!(e.field, "measurement.kernels[optimized].samples_ms");
        assert!(e.reason.contains("status is ok"), "{e}");
    }

    #[test]
    fn a_kernel_not_timed_as_valid_carries_no_timing() {
        let sample = convert_edited(|w| w.kernels[0].samples_ms = vec![1.0]).unwrap_err();
        assert_eq!(sample.field, "measurement.kernels[baseline].samples_ms");
        assert!(
            sample
                .reason
                .contains("status is wrong_result but it carries 1 timed samples"),
            "{sample}"
        );
        let stats = convert_edited(|w| {
            w.kernels[0].stats = ok_kernel(w).stats;
        })
        .unwrap_err();
        assert_eq!(stats.field, "measurement.kernels[baseline].stats");
        // Without timings, every status is accepted.
        for status in [
            k::Status::Skipped,
            k::Status::Oom,
            k::Status::WrongResult,
            k::Status::Failed,
        ] {
            let got = convert_edited(|w| w.kernels[0].status = status_to_wire(status)).unwrap();
            assert_eq!(got.kernels[0].status, Some(status));
        }
    }

    #[test]
    fn statistics_that_positive_samples_cannot_have_are_refused() {
        type Edit = fn(&mut wire::TimingStats);
        let cases: [(Edit, &str); 4] = [
            (|s| s.mean_ms = 0.0, "stats.mean_ms"),
            (|s| s.p95_ms = f64::NAN, "stats.p95_ms"),
            (|s| s.std_ms = -1.0, "stats.std_ms"),
            (|s| s.rse = f64::INFINITY, "stats.rse"),
        ];
        for (edit, field) in cases {
            let e = convert_edited(|w| edit(ok_kernel(w).stats.as_mut().unwrap())).unwrap_err();
            assert_eq!(e.field, format!("measurement.kernels[optimized].{field}"));
        }
        // A single sample has no spread: std and rse 0 are fine, and so are missing statistics.
        let one = convert_edited(|w| {
            let k = ok_kernel(w);
            k.samples_ms = vec![0.5];
            let s = k.stats.as_mut().unwrap();
            (s.std_ms, s.rse) = (0.0, 0.0);
        });
        assert!(one.is_ok(), "{one:?}");
        assert!(convert_edited(|w| ok_kernel(w).stats = None).is_ok());
    }

    #[test]
    fn a_bandwidth_that_is_negative_or_not_finite_is_refused() {
        for bad in [-1.0, f64::NAN, f64::INFINITY] {
            let e = convert_edited(|w| ok_kernel(w).bandwidth_gbps = Some(bad)).unwrap_err();
            assert_eq!(e.field, "measurement.kernels[optimized].bandwidth_gbps");
            let e = convert_edited(|w| ok_kernel(w).bandwidth_fraction = Some(bad)).unwrap_err();
            assert_eq!(e.field, "measurement.kernels[optimized].bandwidth_fraction");
        }
        // Zero bytes counted is zero bandwidth; no calibration is no fraction.
        let got = convert_edited(|w| {
            let k = ok_kernel(w);
            k.bandwidth_gbps = Some(0.0);
            k.bandwidth_fraction = None;
        })
        .unwrap();
        assert_eq!(got.kernels[1].bandwidth_gbps, Some(0.0));
    }

    #[test]
    fn a_telemetry_reading_that_is_not_finite_is_refused() {
        for bad in [f64::NAN, f64::INFINITY] {
            let e = convert_edited(|w| {
                ok_kernel(w).telemetry.as_mut().unwrap().sm_clock_avg_mhz = Some(bad)
            })
            .unwrap_err();
            assert_eq!(
                e.field,
                "measurement.kernels[optimized].telemetry.sm_clock_avg_mhz"
            );
            assert!(e.reason.contains("bug in the agent's telemetry"), "{e}");
        }
        // A reading's sign is the driver's word (a cold card can read below zero), and no
        // telemetry at all is no NVML.
        let cold =
            convert_edited(|w| ok_kernel(w).telemetry.as_mut().unwrap().temp_avg_c = Some(-5.0))
                .unwrap();
        assert_eq!(cold.kernels[1].telemetry.temp_avg_c, Some(-5.0));
        let none = convert_edited(|w| ok_kernel(w).telemetry = None).unwrap();
        assert_eq!(none.kernels[1].telemetry, k::Telemetry::default());
    }

    #[test]
    fn a_wall_time_that_is_negative_or_not_finite_is_refused() {
        for bad in [-1.0, f64::NAN, f64::INFINITY] {
            let e = convert_edited(|w| w.wall_s = bad).unwrap_err();
            assert_eq!(e.field, "measurement.wall_s");
        }
        assert!(convert_edited(|w| w.wall_s = 0.0).is_ok());
    }

    #[test]
    fn a_wrong_kernel_that_wrote_nan_keeps_its_error_as_f64_max() {
        let got = convert_edited(|w| {
            w.kernels[0].accuracy = Some(wire::Accuracy {
                max_abs_err: f64::NAN,
                rel_l2_err: f64::INFINITY,
                tolerance: 0.01,
            })
        })
        .unwrap();
        let a = got.kernels[0].accuracy.unwrap();
        assert_eq!((a.max_abs_err, a.rel_l2_err), (f64::MAX, f64::MAX));
        assert!(got.kernels[0].message.contains("non-finite"));
        // A negative error is no output's error.
        let e = convert_edited(|w| ok_kernel(w).accuracy.as_mut().unwrap().rel_l2_err = -0.1)
            .unwrap_err();
        assert_eq!(
            e.field,
            "measurement.kernels[optimized].accuracy.rel_l2_err"
        );
    }

    #[test]
    fn an_unknown_status_names_its_kernel() {
        let e = convert_edited(|w| ok_kernel(w).status = 42).unwrap_err();
        assert_eq!(e.field, "measurement.kernels[optimized].status");
    }
}
