//! The result record: one case measured on one device, as the coordinator received it.
//!
//! This is the unit the journal stores and every sink reads. It joins the agent's measurement with
//! what the coordinator knows about where and when it came from (run, agent, attempt, device), so
//! that a record is self-describing on its own, without the grid or the agent registry at hand.

use decodebench_kernels::{
    BenchCase, CaseMeasurement, DeviceIdentity, KernelKind, KernelMeasurement, Status,
};
use serde::{Deserialize, Serialize};

/// One case's results from one device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultRecord {
    pub run_id: String,
    pub agent_id: String,
    /// Which reported attempt of this case on its placement target: 1, +1 per earlier attempt that
    /// reported a failure (a lease lost without a report does not count). For a failure the
    /// coordinator recorded itself after the case was lost with its agents
    /// ([`ResultRecord::unreported_measurement`]), every try: reported attempts plus losses.
    pub attempt: u32,
    /// When the coordinator received the result, milliseconds since the Unix epoch.
    pub received_unix_ms: i64,
    /// Git revision of the code that produced the result (the agent's build).
    pub git_revision: String,
    pub case: BenchCase,
    pub device: DeviceIdentity,
    pub measurement: CaseMeasurement,
}

impl ResultRecord {
    /// The measurement of one kernel, if the agent reported it.
    pub fn kernel(&self, kind: KernelKind) -> Option<&KernelMeasurement> {
        self.measurement
            .kernels
            .iter()
            .find(|k| k.kernel == Some(kind))
    }

    /// The unit failed: some kernel's status is `failed` (what the scheduler commits as a failed
    /// unit once every attempt is used up).
    pub fn failed(&self) -> bool {
        self.measurement
            .kernels
            .iter()
            .any(|k| k.status == Some(Status::Failed))
    }

    /// The kernels whose output disagreed with the reference (`wrong_result`): results, not
    /// failures, named at the end of a run so that a kernel computing wrong numbers does not pass
    /// for a clean run.
    pub fn wrong_kernels(&self) -> impl Iterator<Item = KernelKind> + '_ {
        self.measurement
            .kernels
            .iter()
            .filter(|k| k.status == Some(Status::WrongResult))
            .filter_map(|k| k.kernel)
    }

    /// The measurement of a case that no agent reported, recorded by the coordinator itself (it
    /// gave up on the case): every kernel the case runs is `failed` with `message`, so that the
    /// record has the rows, the status and the [`ResultRecord::failed`] of any other failure, and
    /// resume and `--retry-failed` treat it as one.
    pub fn unreported_measurement(case: &BenchCase, message: &str) -> CaseMeasurement {
        CaseMeasurement {
            case_id: case.id.clone(),
            kernels: case
                .method
                .kernels
                .kinds()
                .iter()
                .map(|&kind| KernelMeasurement {
                    kernel: Some(kind),
                    status: Some(Status::Failed),
                    message: message.to_string(),
                    ..Default::default()
                })
                .collect(),
            wall_s: 0.0,
        }
    }

    /// What makes a result unique: the case and the device it ran on. A case re-run on the same
    /// device (a retry after a lost lease) has the same key.
    pub fn key(&self) -> (&str, &str) {
        (&self.case.id, &self.device.uuid)
    }
}

/// How a loss was pinned on a case when its agent's lease expired (see
/// [`crate::scheduler`]'s give-up rule).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossCause {
    /// The agent's last heartbeat named this case as the one it was running, and it had no
    /// result: the agent died running it. Its shard-mates were not charged.
    Running,
    /// It was the only case of the lease without a result.
    Alone,
    /// No heartbeat named a case without a result (the agent died before its first heartbeat of
    /// the case, or it does not say): every case of the lease without a result was charged.
    Shard,
}

impl LossCause {
    /// The loss is evidence against this case in particular, not shared with shard-mates: only
    /// such a loss can be the one after which the case is given up.
    pub fn pins_the_case(self) -> bool {
        !matches!(self, LossCause::Shard)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            LossCause::Running => "running",
            LossCause::Alone => "alone",
            LossCause::Shard => "shard",
        }
    }
}

/// A case lost with its agent: the agent's lease expired (no heartbeat for a lease timeout) with
/// the case charged a loss. The journal keeps these beside the results, so that a coordinator
/// resumed from it remembers which cases already killed agents: they keep running alone, and the
/// count towards giving one up survives the restart.
///
/// Like a result, it names the case and the device, not the unit: the unit key follows from both
/// under the placement of the run that replays it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LossRecord {
    pub run_id: String,
    pub case_id: String,
    /// The agent whose lease expired, and its device (the unit's placement target).
    pub agent_id: String,
    pub device: DeviceIdentity,
    pub cause: LossCause,
    /// When the coordinator journaled the loss (within a tick of charging it, at the lease's
    /// expiry), milliseconds since the Unix epoch.
    pub lost_unix_ms: i64,
}

/// A reported attempt whose kernels failed and that the scheduler queued for another attempt
/// (its attempts were not used up). The journal keeps these beside the results, made durable
/// before the agent's report is answered, so that a coordinator resumed from it goes on counting
/// the unit's attempts where it stopped, and the unit's final failed record still lists every
/// attempt's error, those from before the restart included. The final failed attempt is not one
/// of these: it is the unit's failed [`ResultRecord`].
///
/// Like a loss, it names the case and the device, not the unit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FailedAttemptRecord {
    pub run_id: String,
    pub case_id: String,
    /// The agent that reported the failure, and its device (the unit's placement target).
    pub agent_id: String,
    pub device: DeviceIdentity,
    /// Which reported attempt of the unit it was: 1, +1 per earlier one (as
    /// [`ResultRecord::attempt`]).
    pub attempt: u32,
    /// One line per failed kernel, as the unit's final failed record lists them
    /// (`attempt N on AGENT (UUID): KERNEL: MESSAGE`).
    pub errors: Vec<String>,
    /// When the coordinator journaled it (as it received the report), milliseconds since the
    /// Unix epoch.
    pub failed_unix_ms: i64,
}

/// A `--retry-failed` round started: from here on the journal holds the round's new results.
///
/// The round's units are those whose latest result *before this event* is a failure (under the
/// placement of the run that replays it); a unit of the round that has a result after the event
/// has had its retry, whatever that result is. A coordinator restarted with the same round name
/// reruns only the round's units without such a result, and none once every one has one; a new
/// round needs a new name. See `run.rs` (`plan_retry`) for the whole rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RetryRoundRecord {
    /// The run whose coordinator started the round.
    pub run_id: String,
    /// The round's name: `--retry-failed=NAME` (`1` for a bare `--retry-failed`).
    pub round: String,
    /// How many units the round ran again when it started.
    pub units: u64,
    /// When the round started, milliseconds since the Unix epoch.
    pub started_unix_ms: i64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use decodebench_kernels::{KernelSelection, QuantMode};

    #[test]
    fn an_unreported_measurement_fails_every_kernel_the_case_runs() {
        let mut case = BenchCase::reference_shape(1, 64, QuantMode::BF16).with_id();
        let m = ResultRecord::unreported_measurement(&case, "lost 3 times");
        assert_eq!(m.case_id, case.id);
        let kinds: Vec<_> = m.kernels.iter().map(|k| k.kernel).collect();
        assert_eq!(kinds, KernelKind::ALL.map(Some));
        assert!(m
            .kernels
            .iter()
            .all(|k| k.status == Some(Status::Failed) && k.message == "lost 3 times"));
        case.method.kernels = KernelSelection::Optimized;
        let m = ResultRecord::unreported_measurement(&case, "x");
        assert_eq!(m.kernels.len(), 1);
        assert_eq!(m.kernels[0].kernel, Some(KernelKind::Optimized));
    }
}
