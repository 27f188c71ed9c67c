//! Fault injection for tests and fault drills. `DECODEBENCH_FAILPOINT=ACTION:CASE` makes an agent
//! misbehave when it reaches a case whose id starts with `CASE`, the way a broken case would on a
//! real fleet:
//!
//! - `abort:CASE`: the agent process aborts (SIGABRT) before running the case, as a segfault or an
//!   OOM kill would end it: no result, no lease handed back.
//! - `device-fault:CASE`: the GPU faults (an illegal-address write) right before the case runs, so
//!   the case fails with a device error and the CUDA context stays poisoned: the agent reports the
//!   failure and exits, as after a real Xid. Only the CUDA backend has a device to fault.
//! - `fail:CASE`: the agent does not run the case and reports its optimized kernel as `failed`
//!   (the baseline, when the case runs only that), with a message that says the failure was
//!   injected by this failpoint, as a kernel that kept producing wrong numbers or a CUDA error
//!   would be reported; a baseline the case also runs is reported `skipped`, not run. The agent
//!   carries on with its next case, and fails this one every time it gets it: it drills the
//!   coordinator's retry of failed cases (`--max-attempts`), its journaling of the failed
//!   attempts, and the failed record at the end. Any backend, the CPU one included.
//! - `disturb:CASE`: the case runs, but its optimized kernel's output is corrupted from its second
//!   call on, as a kernel whose calls race with each other would give: it passes the one verified
//!   call, and the check of the output its timed calls left reports it `wrong_result`, with no
//!   timings. The CPU backend only (a GPU kernel cannot be made to race on purpose here).
//!
//! Unset (the normal case), it costs one environment lookup per agent.

use decodebench_kernels::{BenchCase, CaseMeasurement, KernelKind, KernelMeasurement, Status};
use std::fmt;

/// The environment variable read by [`Failpoint::from_env`].
pub const FAILPOINT_ENV: &str = "DECODEBENCH_FAILPOINT";

/// What happens at the chosen case.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailAction {
    Abort,
    DeviceFault,
    /// Report the case failed without running it ([`Failpoint::injected_failure`]).
    Fail,
    /// Run the case with its optimized kernel's later calls disturbed.
    Disturb,
}

/// An armed failpoint: an action and the case-id prefix that triggers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failpoint {
    pub action: FailAction,
    pub case_prefix: String,
}

impl fmt::Display for Failpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let action = match self.action {
            FailAction::Abort => "abort",
            FailAction::DeviceFault => "device-fault",
            FailAction::Fail => "fail",
            FailAction::Disturb => "disturb",
        };
        write!(f, "{action}:{}", self.case_prefix)
    }
}

impl Failpoint {
    /// The failpoint in [`FAILPOINT_ENV`], if set; a malformed value is an error (a drill that
    /// silently injects nothing would pass for a healthy run).
    pub fn from_env() -> Result<Option<Failpoint>, String> {
        match std::env::var(FAILPOINT_ENV) {
            Ok(v) if v.trim().is_empty() => Ok(None),
            Ok(v) => Failpoint::parse(&v).map(Some),
            Err(std::env::VarError::NotPresent) => Ok(None),
            Err(std::env::VarError::NotUnicode(_)) => {
                Err(format!("{FAILPOINT_ENV} is not valid UTF-8; unset it"))
            }
        }
    }

    /// Parses `ACTION:CASE`.
    pub fn parse(text: &str) -> Result<Failpoint, String> {
        let usage = "expected `abort:CASE`, `device-fault:CASE`, `fail:CASE` or `disturb:CASE`, \
                     where CASE is the start (at least 4 hex digits) of a case id from \
                     `decodebench grid --cases`; unset it for a normal run";
        let (action, prefix) = text
            .trim()
            .split_once(':')
            .ok_or_else(|| format!("{FAILPOINT_ENV}=`{text}`: {usage}"))?;
        let action = match action {
            "abort" => FailAction::Abort,
            "device-fault" => FailAction::DeviceFault,
            "fail" => FailAction::Fail,
            "disturb" => FailAction::Disturb,
            other => {
                return Err(format!(
                    "{FAILPOINT_ENV}=`{text}`: unknown action `{other}`; {usage}"
                ))
            }
        };
        if prefix.len() < 4 || !prefix.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(format!(
                "{FAILPOINT_ENV}=`{text}`: `{prefix}` is not a case-id prefix; {usage}"
            ));
        }
        Ok(Failpoint {
            action,
            case_prefix: prefix.to_ascii_lowercase(),
        })
    }

    /// Whether the case `case_id` triggers it.
    pub fn matches(&self, case_id: &str) -> bool {
        case_id.to_ascii_lowercase().starts_with(&self.case_prefix)
    }

    /// What a `fail:CASE` failpoint reports for `case` instead of running it: the optimized
    /// kernel (or the baseline, when the case runs only that) `failed`, with a message naming
    /// this failpoint, and any other kernel of the case `skipped`, not run.
    pub fn injected_failure(&self, case: &BenchCase) -> CaseMeasurement {
        let kinds = case.method.kernels.kinds();
        let failed = if kinds.contains(&KernelKind::Optimized) {
            KernelKind::Optimized
        } else {
            KernelKind::Baseline
        };
        let kernels = kinds
            .iter()
            .map(|&kind| {
                if kind == failed {
                    KernelMeasurement::not_timed(
                        kind,
                        Status::Failed,
                        format!(
                            "injected failure: {FAILPOINT_ENV}={self} failed this kernel without \
                             running it (a fault drill); unset {FAILPOINT_ENV} for a real run"
                        ),
                    )
                } else {
                    KernelMeasurement::not_timed(
                        kind,
                        Status::Skipped,
                        format!("not run: {FAILPOINT_ENV}={self} failed this case (a fault drill)"),
                    )
                }
            })
            .collect();
        CaseMeasurement {
            case_id: case.id.clone(),
            kernels,
            wall_s: 0.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_actions_and_matches_by_prefix() {
        let f = Failpoint::parse("abort:86A688c9").unwrap();
        assert_eq!(f.action, FailAction::Abort);
        assert!(f.matches("86a688c9ffee"));
        assert!(!f.matches("86a688c8ffee"));
        let f = Failpoint::parse(" device-fault:abcd ").unwrap();
        assert_eq!(f.action, FailAction::DeviceFault);
        assert_eq!(f.to_string(), "device-fault:abcd");
        let f = Failpoint::parse("fail:ABCD12").unwrap();
        assert_eq!(f.action, FailAction::Fail);
        assert_eq!(f.to_string(), "fail:abcd12");
        assert!(f.matches("abcd1234"));
        let f = Failpoint::parse("disturb:abcd").unwrap();
        assert_eq!(f.action, FailAction::Disturb);
        assert_eq!(f.to_string(), "disturb:abcd");
    }

    /// The injected failure fails the optimized kernel, naming the failpoint, and runs nothing
    /// else; a case that runs only the baseline gets its baseline failed.
    #[test]
    fn an_injected_failure_fails_the_optimized_kernel_and_says_so() {
        use decodebench_kernels::{KernelSelection, QuantMode};
        let f = Failpoint::parse("fail:abcd").unwrap();
        let mut case = BenchCase::reference_shape(1, 64, QuantMode::BF16).with_id();
        let m = f.injected_failure(&case);
        assert_eq!(m.case_id, case.id);
        let by_kind = |m: &CaseMeasurement, kind| {
            m.kernels
                .iter()
                .find(|k| k.kernel == Some(kind))
                .cloned()
                .unwrap_or_else(|| panic!("no {kind:?} kernel in {m:?}"))
        };
        let opt = by_kind(&m, KernelKind::Optimized);
        assert_eq!(opt.status, Some(Status::Failed));
        assert!(
            opt.message.contains("injected failure")
                && opt.message.contains("DECODEBENCH_FAILPOINT=fail:abcd"),
            "{}",
            opt.message
        );
        assert!(opt.samples_ms.is_empty());
        assert_eq!(
            by_kind(&m, KernelKind::Baseline).status,
            Some(Status::Skipped)
        );
        case.method.kernels = KernelSelection::Baseline;
        let m = f.injected_failure(&case);
        assert_eq!(m.kernels.len(), 1);
        assert_eq!(m.kernels[0].kernel, Some(KernelKind::Baseline));
        assert_eq!(m.kernels[0].status, Some(Status::Failed));
    }

    #[test]
    fn refuses_what_would_inject_nothing() {
        for bad in ["abort", "crash:abcd", "abort:ab", "abort:xyz1", "abort:"] {
            let e = Failpoint::parse(bad).unwrap_err();
            assert!(
                e.contains(FAILPOINT_ENV) && e.contains("abort:CASE"),
                "{bad}: {e}"
            );
        }
    }
}
