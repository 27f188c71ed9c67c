//! Fault injection for tests and fault drills. `DECODEBENCH_FAILPOINT=ACTION:CASE` makes an agent
//! misbehave when it reaches a case whose id starts with `CASE`, the way a broken case would on a
//! real fleet:
//!
//! - `abort:CASE`: the agent process aborts (SIGABRT) before running the case, as a segfault or an
//!   OOM kill would end it: no result, no lease handed back.
//! - `device-fault:CASE`: the GPU faults (an illegal-address write) right before the case runs, so
//!   the case fails with a device error and the CUDA context stays poisoned: the agent reports the
//!   failure and exits, as after a real Xid. Only the CUDA backend has a device to fault.
//!
//! Unset (the normal case), it costs one environment lookup per agent.

use std::fmt;

/// The environment variable read by [`Failpoint::from_env`].
pub const FAILPOINT_ENV: &str = "DECODEBENCH_FAILPOINT";

/// What happens at the chosen case.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailAction {
    Abort,
    DeviceFault,
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
        let usage = "expected `abort:CASE` or `device-fault:CASE`, where CASE is the start (at \
                     least 4 hex digits) of a case id from `decodebench grid --cases`; unset it \
                     for a normal run";
        let (action, prefix) = text
            .trim()
            .split_once(':')
            .ok_or_else(|| format!("{FAILPOINT_ENV}=`{text}`: {usage}"))?;
        let action = match action {
            "abort" => FailAction::Abort,
            "device-fault" => FailAction::DeviceFault,
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
