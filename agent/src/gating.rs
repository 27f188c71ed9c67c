//! Throttle gating: a result whose timed trials ran under thermal or power throttling is flagged,
//! and, when the case's method allows retries, measured again after a cool-down. Done here, around
//! any backend, so CPU and CUDA results follow the same rule.

use decodebench_kernels::{Backend, BenchCase, CaseMeasurement, TelemetryProbe};
use std::time::Duration;

/// Pause before re-measuring a throttled case: long enough for a GPU that hit its power or thermal
/// limit to shed heat and for clocks to recover (NVML's power average settles within ~1 s), short
/// enough not to stall a shard.
pub const THROTTLE_COOLDOWN: Duration = Duration::from_secs(5);

fn mark_throttled(m: &mut CaseMeasurement) -> bool {
    let mut any = false;
    for k in &mut m.kernels {
        k.throttled = k.throttled || k.telemetry.throttled();
        any |= k.throttled;
    }
    any
}

/// Runs `case`, re-measuring after `cooldown` while any kernel was throttled and retries remain
/// (`case.method.throttle_retries`). The result records whether the kept measurement was
/// throttled and how many retries were used.
pub fn run_gated(
    backend: &mut dyn Backend,
    probe: &mut dyn TelemetryProbe,
    case: &BenchCase,
    cooldown: Duration,
) -> CaseMeasurement {
    let mut m = backend.run_case(case, probe);
    let mut throttled = mark_throttled(&mut m);
    if m.kernels.iter().any(|k| k.throttle_retries_used > 0) {
        // The backend already re-measured the throttled kernels itself (the CUDA backend does,
        // around the timed trials only): its count is the one that stands.
        return m;
    }
    let mut used = 0;
    while throttled && used < case.method.throttle_retries {
        used += 1;
        tracing::warn!(case = %case.id, retry = used, cooldown = ?cooldown, "throttled during timing; cooling down and measuring again");
        std::thread::sleep(cooldown);
        let wall = m.wall_s;
        m = backend.run_case(case, probe);
        m.wall_s += wall + cooldown.as_secs_f64();
        throttled = mark_throttled(&mut m);
    }
    for k in &mut m.kernels {
        k.throttle_retries_used = used;
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use decodebench_kernels::{
        DeviceIdentity, KernelKind, KernelMeasurement, KvPool, MeasureMethod, NoTelemetry,
        QuantMode, Status,
    };

    /// A backend whose first `throttled_runs` runs report a power-cap throttle reason.
    struct ThrottlingBackend {
        identity: DeviceIdentity,
        throttled_runs: u32,
        runs: u32,
    }

    impl Backend for ThrottlingBackend {
        fn identity(&self) -> &DeviceIdentity {
            &self.identity
        }
        fn run_case(&mut self, case: &BenchCase, _p: &mut dyn TelemetryProbe) -> CaseMeasurement {
            self.runs += 1;
            let mut k = KernelMeasurement {
                kernel: Some(KernelKind::Optimized),
                status: Some(Status::Ok),
                samples_ms: vec![1.0],
                ..Default::default()
            };
            if self.runs <= self.throttled_runs {
                k.telemetry.throttle_reasons = vec!["sw_power_cap".into()];
            }
            CaseMeasurement {
                case_id: case.id.clone(),
                kernels: vec![k],
                wall_s: 0.0,
            }
        }
    }

    fn case(retries: u32) -> BenchCase {
        BenchCase {
            num_qo_heads: 8,
            num_kv_heads: 1,
            head_size: 64,
            pool: KvPool::Unique,
            method: MeasureMethod {
                throttle_retries: retries,
                ..Default::default()
            },
            ..BenchCase::reference_shape(1, 16, QuantMode::BF16)
        }
        .with_id()
    }

    fn backend(throttled_runs: u32) -> ThrottlingBackend {
        ThrottlingBackend {
            identity: DeviceIdentity::default(),
            throttled_runs,
            runs: 0,
        }
    }

    #[test]
    fn retries_until_clean_and_records_it() {
        let mut b = backend(2);
        let m = run_gated(&mut b, &mut NoTelemetry, &case(3), Duration::ZERO);
        assert_eq!(b.runs, 3);
        assert!(!m.kernels[0].throttled);
        assert_eq!(m.kernels[0].throttle_retries_used, 2);
    }

    #[test]
    fn flags_throttling_when_retries_run_out() {
        let mut b = backend(5);
        let m = run_gated(&mut b, &mut NoTelemetry, &case(1), Duration::ZERO);
        assert_eq!(b.runs, 2);
        assert!(m.kernels[0].throttled);
        assert_eq!(m.kernels[0].throttle_retries_used, 1);
    }

    #[test]
    fn defers_to_retries_the_backend_made_itself() {
        struct SelfRetrying(DeviceIdentity, u32);
        impl Backend for SelfRetrying {
            fn identity(&self) -> &DeviceIdentity {
                &self.0
            }
            fn run_case(&mut self, c: &BenchCase, _p: &mut dyn TelemetryProbe) -> CaseMeasurement {
                self.1 += 1;
                let mut k = KernelMeasurement {
                    kernel: Some(KernelKind::Optimized),
                    status: Some(Status::Ok),
                    throttle_retries_used: 2,
                    ..Default::default()
                };
                k.telemetry.throttle_reasons = vec!["hw_thermal_slowdown".into()];
                CaseMeasurement {
                    case_id: c.id.clone(),
                    kernels: vec![k],
                    wall_s: 0.0,
                }
            }
        }
        let mut b = SelfRetrying(DeviceIdentity::default(), 0);
        let m = run_gated(&mut b, &mut NoTelemetry, &case(2), Duration::ZERO);
        assert_eq!(b.1, 1);
        assert!(m.kernels[0].throttled);
        assert_eq!(m.kernels[0].throttle_retries_used, 2);
    }

    #[test]
    fn no_retry_without_throttling() {
        let mut b = backend(0);
        let m = run_gated(&mut b, &mut NoTelemetry, &case(3), Duration::ZERO);
        assert_eq!(b.runs, 1);
        assert!(!m.kernels[0].throttled);
    }
}
