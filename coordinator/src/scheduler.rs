//! The scheduler: which unit of work goes to which agent, under which lease, and when a result
//! counts.
//!
//! It is a plain synchronous state machine (the gRPC service wraps it in a mutex), so every rule
//! here is unit-tested without a network:
//! - a *unit* is one case to be measured on one placement target (any GPU, one SKU, one GPU);
//! - agents pull *shards*: units that share a KV-pool set-up, leased with a deadline;
//! - heartbeats extend a lease; an expired lease puts its unfinished units back in the queue;
//! - a unit is done once, whoever reports it and however often (late reports are duplicates);
//! - a unit whose kernels failed is retried on another device (GPU) where one that can run it is
//!   alive, up to `max_attempts`, and then recorded as failed with every attempt's error. Each
//!   failed attempt that is retried is journaled before its report is answered
//!   ([`ReportDecision::Retry`], [`Scheduler::retry_recorded`]), and a resumed scheduler gets them
//!   back ([`Scheduler::restore_failed_attempts`]), so that a restart of the coordinator neither
//!   grants a failing unit fresh attempts nor forgets the errors of the earlier ones, nor which
//!   devices failed it; a unit whose journaled attempts already reach `max_attempts` (the run
//!   was resumed with a lower `--max-attempts`) is recorded as failed at once, as the coordinator
//!   does for a unit given up on after its losses ([`Scheduler::take_abandoned`]);
//! - a unit *lost* with its agent (the lease expired with the unit unreported: the agent crashed,
//!   was OOM-killed, or was cut off) runs alone from then on, so that a case that kills its agent
//!   cannot take its shard-mates down with it again; once it has been lost `max_attempts` times,
//!   the last time pinned on it, the scheduler gives up on it ([`Scheduler::take_abandoned`]) and
//!   the coordinator records a failed result for it itself, so that the run ends.
//!
//! # Losses
//!
//! When a lease expires, its agent stopped without reporting the units it had not reported yet.
//! Which of them is charged a loss depends on what the agent said last:
//! - its last heartbeat named a case ([`Scheduler::heartbeat`]) that is still unreported on the
//!   lease: the agent died running that case. Only that unit is charged ([`LossCause::Running`]);
//!   the lease's other unreported units never started, so they go back to the queue uncharged and
//!   are batched again as before;
//! - otherwise (no heartbeat named a case, it named one already reported, or an older agent sent
//!   no case id), the scheduler cannot tell which unit the agent was running, and charges every
//!   unreported unit ([`LossCause::Alone`] when there was only one, else [`LossCause::Shard`]).
//!
//! A unit charged a loss runs alone from then on, so that its next loss is its own.
//!
//! **Give-up rule.** A unit is given up once it has been lost `max_attempts` times *and the last
//! of those losses pinned it*: the agent's heartbeat named it as the case it was running, or it
//! was the lease's only unreported unit. A loss shared with shard-mates ([`LossCause::Shard`])
//! counts towards the total but never ends a unit: it makes the unit run alone, so that the next
//! loss, if any, is pinned. So no unit is given up on evidence it shares with another, and an
//! innocent unit is given up only if agents died `max_attempts` times while it was the one running
//! (a node drained or killed under it each time). The agent names each case in a heartbeat and
//! waits for the answer (up to `FIRST_BEAT_WAIT`, 2 s) before it starts running it, so a case
//! that kills its agent at once is the named one. One case is still mis-pinned: when that
//! heartbeat did not get through in time (a coordinator slow to answer, a lossy link) and the
//! new case kills the agent, the previous named case is charged if its report had not arrived
//! yet; it takes that, `max_attempts` times over, to give an innocent unit up.
//!
//! Every charged loss is handed to the coordinator ([`Scheduler::take_losses`]), which journals
//! it; a resumed scheduler gets the journaled losses back ([`Scheduler::restore_losses`]), so that
//! a restart of the coordinator neither forgets which cases kill agents nor grants them fresh
//! attempts. A unit given up on is handed out for its failed record only once the loss that ended
//! it is journaled, so that the journal never holds a give-up before its cause.

use crate::record::LossCause;
use decodebench_kernels::{BenchCase, CaseMeasurement, DeviceIdentity, Status};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt;
use std::time::{Duration, Instant};
use thiserror::Error;

/// How long a lease lives without a heartbeat. Long enough to ride out a GC pause or a slow case
/// set-up on a busy host; short enough that a dead agent's work moves on within a minute.
pub const DEFAULT_LEASE_TIMEOUT: Duration = Duration::from_secs(30);
/// How often agents heartbeat: a third of the lease timeout, so two lost heartbeats are survivable.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(10);
/// Attempts per unit before it is recorded as failed: reported failures, or losses with its agent
/// (counted apart). Three rides out one bad agent and one transient fault without hiding a kernel
/// that always fails, or a case that always crashes its agent.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
/// Cases per shard: enough to amortize a KV-pool set-up, few enough that a lost agent costs little
/// and a heterogeneous fleet balances.
pub const DEFAULT_MAX_SHARD_CASES: usize = 8;
/// How long to tell an idle agent to wait before asking again.
pub const IDLE_WAIT: Duration = Duration::from_millis(200);

/// Where each case runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Placement {
    /// Each case once, on any GPU.
    Spread,
    /// Each case once on every distinct GPU model (fleet hardware comparison).
    PerSku,
    /// Each case once on every GPU (fleet health: finds the slow card).
    PerGpu,
}

impl Placement {
    pub fn parse(s: &str) -> Option<Placement> {
        match s {
            "spread" => Some(Placement::Spread),
            "per-sku" => Some(Placement::PerSku),
            "per-gpu" => Some(Placement::PerGpu),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Placement::Spread => "spread",
            Placement::PerSku => "per-sku",
            Placement::PerGpu => "per-gpu",
        }
    }

    /// Whether a device serves `target` under this placement (`target_of(device) == target`,
    /// without building the target).
    pub fn serves(self, device: &DeviceIdentity, target: &Target) -> bool {
        match (self, target) {
            (Placement::Spread, Target::Any) => true,
            (Placement::PerSku, Target::Sku(sku)) => device.sku == *sku,
            (Placement::PerGpu, Target::Gpu(uuid)) => device.uuid == *uuid,
            _ => false,
        }
    }

    /// The target a device serves under this placement.
    pub fn target_of(self, device: &DeviceIdentity) -> Target {
        match self {
            Placement::Spread => Target::Any,
            Placement::PerSku => Target::Sku(device.sku.clone()),
            Placement::PerGpu => Target::Gpu(device.uuid.clone()),
        }
    }
}

impl fmt::Display for Placement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The placement target of a unit.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    Any,
    Sku(String),
    Gpu(String),
}

impl Target {
    fn key(&self) -> String {
        match self {
            Target::Any => "*".to_string(),
            Target::Sku(s) => format!("sku:{s}"),
            Target::Gpu(u) => format!("gpu:{u}"),
        }
    }
}

/// Identity of a unit of work: a case on a target. Results are deduplicated on this key.
pub fn unit_key(case_id: &str, placement: Placement, device: &DeviceIdentity) -> String {
    format!("{case_id}|{}", placement.target_of(device).key())
}

/// What the fleet must look like before work is dispatched.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FleetRequirement {
    /// At least this many agents registered.
    pub expect_agents: usize,
    /// At least N agents of each named SKU.
    pub wait_for: Vec<(String, usize)>,
    /// How long to wait for the above from the scheduler's start; then work is dispatched to the
    /// agents registered so far (at least one), with a warning naming what is missing. `None`:
    /// wait however long it takes. Agents that register later still get work.
    pub timeout: Option<Duration>,
}

#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    pub placement: Placement,
    pub lease_timeout: Duration,
    pub heartbeat_interval: Duration,
    pub max_attempts: u32,
    pub max_shard_cases: usize,
    pub fleet: FleetRequirement,
    /// `--retry-failed`: the name of the retry round in which the units whose journaled result
    /// is a failure run again (their new result supersedes the failed one) instead of keeping
    /// their failures; a round runs once per journal (see `run.rs`, `plan_retry`). `None`: keep
    /// the failures.
    pub retry_failed: Option<String>,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            placement: Placement::Spread,
            lease_timeout: DEFAULT_LEASE_TIMEOUT,
            heartbeat_interval: DEFAULT_HEARTBEAT_INTERVAL,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            max_shard_cases: DEFAULT_MAX_SHARD_CASES,
            fleet: FleetRequirement::default(),
            retry_failed: None,
        }
    }
}

/// Errors a caller (the gRPC layer) maps to status codes.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ScheduleError {
    #[error("unknown agent id `{0}`: register first (the coordinator may have restarted)")]
    UnknownAgent(String),
    #[error("unknown lease id `{0}` for this agent")]
    UnknownLease(String),
    #[error("case `{case_id}` is not part of this run's grid for this agent's placement target")]
    UnknownCase { case_id: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UnitState {
    Pending,
    Leased,
    /// A result is being made durable; duplicates arriving meanwhile are refused as duplicates.
    Committing,
    Done,
    Failed,
}

#[derive(Debug)]
struct Unit {
    case_idx: usize,
    target: Target,
    state: UnitState,
    lease: Option<u64>,
    attempts: u32,
    errors: Vec<String>,
    /// Devices (uuids, [`DeviceIdentity::uuid`]) that failed this unit: its retry prefers
    /// another device that can run it. By device, not agent: a failure is the GPU's (or its
    /// driver's) as much as the agent's, another agent on the same GPU is no second opinion, and
    /// agent ids are minted per coordinator process, so those of journaled attempts never come
    /// back after a restart while the device does.
    failed_on: HashSet<String>,
    /// Losses charged to this unit (its agent's lease expired with it unreported), in order. Not
    /// empty: the unit runs alone (a singleton shard), so that further losses are its own and not a
    /// shard-mate's.
    lost_with: Vec<Loss>,
}

impl Unit {
    /// Lost once already: it may be what kills agents, so it goes alone.
    fn isolated(&self) -> bool {
        !self.lost_with.is_empty()
    }
}

#[derive(Debug)]
struct Lease {
    agent_id: String,
    units: Vec<usize>,
    deadline: Instant,
    /// The unit of this lease the agent's last heartbeat named as running (None: the last
    /// heartbeat named none of them, or there was none yet).
    running: Option<usize>,
}

/// One loss of a unit: the agent whose lease expired with it, that agent's device, and how the
/// loss was pinned on the unit.
#[derive(Debug, Clone, PartialEq)]
pub struct Loss {
    pub agent_id: String,
    pub device: DeviceIdentity,
    pub cause: LossCause,
}

/// A journaled failed attempt of a unit (reported failed, then queued for another attempt), as a
/// resumed scheduler takes it back ([`Scheduler::restore_failed_attempts`]).
#[derive(Debug, Clone, PartialEq)]
pub struct FailedAttempt {
    pub agent_id: String,
    pub device: DeviceIdentity,
    /// The attempt's errors, one per failed kernel, as the unit's failed record lists them.
    pub errors: Vec<String>,
}

/// A loss the scheduler charged, to be journaled ([`Scheduler::take_losses`]).
#[derive(Debug, Clone, PartialEq)]
pub struct LossEvent {
    pub unit: usize,
    pub case_id: String,
    pub loss: Loss,
    /// The unit was given up on after this loss: it is handed out by
    /// [`Scheduler::take_abandoned`] once the loss is journaled ([`Scheduler::losses_recorded`]).
    pub abandoned: Option<AbandonedUnit>,
}

#[derive(Debug, Clone)]
pub struct AgentInfo {
    pub id: String,
    pub name: String,
    pub device: DeviceIdentity,
    pub last_seen: Instant,
    /// When it registered (a restarted agent process registers again, under the same name).
    pub registered: Instant,
    pub results: u64,
    pub lease: Option<u64>,
    pub drained: bool,
}

/// A shard handed to an agent.
#[derive(Debug, Clone, PartialEq)]
pub struct ShardGrant {
    pub lease_id: String,
    pub cases: Vec<BenchCase>,
}

/// The answer to a lease request.
#[derive(Debug, Clone, PartialEq)]
pub enum LeaseDecision {
    Shard(ShardGrant),
    Wait(Duration),
    Drain,
}

/// What to do with a reported result.
#[derive(Debug, Clone, PartialEq)]
pub enum ReportDecision {
    /// New result: make it durable, then call [`Scheduler::commit`] (or [`Scheduler::abort_commit`]).
    Commit { unit: usize, attempt: u32 },
    /// The unit already has a result (or one is being committed): acknowledge, count nothing.
    Duplicate,
    /// The kernels failed and attempts are left: journal the failed attempt (`errors`, one per
    /// failed kernel; `error` joins them), then call [`Scheduler::retry_recorded`], which queues
    /// the unit for another attempt (or [`Scheduler::abort_commit`] if the journal write failed:
    /// the attempt is not counted, and the agent sends its report again). Until then the unit
    /// counts as running, and a second report of it is a duplicate.
    Retry {
        unit: usize,
        attempt: u32,
        error: String,
        errors: Vec<String>,
    },
    /// The kernels failed and attempts are exhausted: store this (with every attempt's error in
    /// the message), then [`Scheduler::commit`].
    CommitFailed {
        unit: usize,
        attempt: u32,
        errors: Vec<String>,
    },
}

/// Why the scheduler gave a unit up without a final report of it ([`AbandonedUnit`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GiveUpCause {
    /// Agents kept dying with it: it was lost `max_attempts` times, the last time pinned on it
    /// (see the module's give-up rule).
    Lost,
    /// A resumed scheduler got back journaled failed attempts that already reach `max_attempts`
    /// ([`Scheduler::restore_failed_attempts`]): the run was resumed with a lower
    /// `--max-attempts` than they were reported under (or with a placement that makes attempts
    /// reported for several targets one unit's). Leased again, it would run past the limit, so
    /// it is failed at once with their errors.
    AttemptsUsedUp,
}

impl GiveUpCause {
    /// What happened to the case, for a log line.
    pub fn describe(self) -> &'static str {
        match self {
            GiveUpCause::Lost => "a case that kept crashing its agents",
            GiveUpCause::AttemptsUsedUp => {
                "a case whose journaled failed attempts reach --max-attempts"
            }
        }
    }
}

/// A unit the scheduler gave up on without a final report of it ([`GiveUpCause`]): agents kept
/// dying with it (it was lost `max_attempts` times, the last time pinned on it: named by its
/// agent's heartbeat as the case running, or the only unfinished case of its lease; see the
/// module's give-up rule), or, on resume, its journaled failed attempts already reach
/// `max_attempts`. The caller makes a failed result for it durable (built from
/// [`AbandonedUnit::explanation`]), then calls [`Scheduler::commit_abandoned`]; until then the
/// unit counts as running.
#[derive(Debug, Clone, PartialEq)]
pub struct AbandonedUnit {
    pub unit: usize,
    pub case: BenchCase,
    pub cause: GiveUpCause,
    /// The agent of its last try (the one it was last lost with, or whose failed attempt was
    /// the last journaled) and that agent's device: the placement target the result belongs to
    /// (its unit key), and the machine to look at.
    pub agent_id: String,
    pub device: DeviceIdentity,
    /// Tries so far: reported attempts plus losses.
    pub attempt: u32,
    /// Every agent it was lost with, in order.
    pub lost_with: Vec<String>,
    /// Errors of the attempts that did report, in order (a failure and a crash may alternate).
    pub errors: Vec<String>,
    /// The `--max-attempts` it was given up under.
    pub max_attempts: u32,
}

/// The message of a unit recorded failed after its attempts: `failed after N attempts: ERRORS`
/// (`1 attempt` for one), each attempt's errors in order, joined by ` | `. The record of a unit
/// whose last attempt failed ([`ReportDecision::CommitFailed`]) and of one given up on its
/// journaled attempts ([`GiveUpCause::AttemptsUsedUp`]) begin with it.
pub fn failed_after(attempts: u32, errors: &[String]) -> String {
    let noun = if attempts == 1 { "attempt" } else { "attempts" };
    format!("failed after {attempts} {noun}: {}", errors.join(" | "))
}

impl AbandonedUnit {
    /// What the failed result says: what happened, which agents, and how to investigate.
    pub fn explanation(&self) -> String {
        match self.cause {
            GiveUpCause::Lost => self.lost_explanation(),
            GiveUpCause::AttemptsUsedUp => self.attempts_explanation(),
        }
    }

    /// Given up on journaled failed attempts: worded as the failed record of a unit whose last
    /// attempt failed ([`failed_after`]), then why it did not run again.
    fn attempts_explanation(&self) -> String {
        let reported = self.reported_attempts();
        let mut text = format!(
            "{}; these attempts were journaled before the coordinator restarted and already \
             reach --max-attempts {}, so the resumed run did not run the case again. To run it \
             again once the cause is fixed, resume with --retry-failed",
            failed_after(reported, &self.errors),
            self.max_attempts,
        );
        if !self.lost_with.is_empty() {
            text.push_str(&format!(
                "; it was also lost with its agents ({}), which stopped without reporting",
                self.lost_with.join(", ")
            ));
        }
        text
    }

    /// Reported attempts among its tries (the rest are losses).
    fn reported_attempts(&self) -> u32 {
        self.attempt.saturating_sub(self.lost_with.len() as u32)
    }

    fn lost_explanation(&self) -> String {
        let times = match self.lost_with.len() {
            1 => "once".to_string(),
            n => format!("{n} times"),
        };
        let mut text = format!(
            "lost {times}: the agents running it ({}) stopped without reporting (no heartbeat \
             for a lease timeout: crashed, killed or cut off), the last time while running this \
             case (named by the agent's heartbeat, or the only case left in its lease); the case \
             may crash the agent (segfault, OOM kill, GPU fault). To investigate, run it \
             alone: a grid holding only case {} ({}, seed {}, same [method]) with `decodebench run \
             --grid FILE`, and read those agents' logs and the hosts' kernel log (dmesg: OOM \
             killer, NVIDIA Xid)",
            self.lost_with.join(", "),
            self.case.id,
            self.case.label(),
            self.case.seed,
        );
        if !self.errors.is_empty() {
            text.push_str("; attempts that did report: ");
            text.push_str(&self.errors.join(" | "));
        }
        text
    }
}

/// Progress counters.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Progress {
    pub total: u64,
    pub pending: u64,
    pub running: u64,
    pub done: u64,
    pub failed: u64,
    pub agents_alive: u32,
    pub leases_expired: u64,
    pub finished: bool,
}

/// Units per state, kept up to date on every transition so that progress and completion are
/// O(1): they are asked on every report, and a scan of 100,000 units there caps ingestion at a
/// few hundred results per second (bench/scale).
#[derive(Debug, Default, Clone, Copy)]
struct StateCounts {
    pending: u64,
    running: u64,
    done: u64,
    failed: u64,
}

impl StateCounts {
    fn slot(&mut self, s: UnitState) -> &mut u64 {
        match s {
            UnitState::Pending => &mut self.pending,
            UnitState::Leased | UnitState::Committing => &mut self.running,
            UnitState::Done => &mut self.done,
            UnitState::Failed => &mut self.failed,
        }
    }
}

/// The one way a unit changes state (after creation), so the counts never drift.
fn transition(counts: &mut StateCounts, unit: &mut Unit, new: UnitState) {
    *counts.slot(unit.state) -= 1;
    *counts.slot(new) += 1;
    unit.state = new;
}

/// Files journaled entries (losses, failed attempts) of a resumed run under their unit keys in
/// `pending`, and takes back out, in key order, those of units that exist already (spread's,
/// created with the scheduler) for the caller to apply now; the rest wait in `pending` until
/// their unit is created (its target's first agent registers).
fn file_by_unit<T>(
    pending: &mut HashMap<String, Vec<T>>,
    unit_index: &HashMap<String, usize>,
    entries: impl IntoIterator<Item = (String, T)>,
) -> Vec<(usize, Vec<T>)> {
    for (key, entry) in entries {
        pending.entry(key).or_default().push(entry);
    }
    let mut existing: Vec<(String, usize)> = pending
        .keys()
        .filter_map(|k| unit_index.get(k).map(|&u| (k.clone(), u)))
        .collect();
    existing.sort();
    existing
        .into_iter()
        .filter_map(|(key, u)| pending.remove(&key).map(|entries| (u, entries)))
        .collect()
}

pub struct Scheduler {
    counts: StateCounts,
    /// Some unit has failed on some device: only then does `take_shard` need to know whether
    /// agents on other devices are alive (an O(agents) scan).
    failures_seen: bool,
    /// A lower bound on every lease's deadline (None: no lease to check), so that `expire` scans
    /// the leases only when one may have expired instead of on every request.
    earliest_deadline: Option<Instant>,
    cfg: SchedulerConfig,
    cases: Vec<BenchCase>,
    case_index: HashMap<String, usize>,
    units: Vec<Unit>,
    unit_index: HashMap<String, usize>,
    /// Pending units per target, grouped by pool key so a shard shares one KV-pool set-up.
    queues: HashMap<Target, BTreeMap<String, VecDeque<usize>>>,
    /// Unit keys already done before this process started (journal replay).
    done_keys: HashSet<String>,
    /// Those of `done_keys` whose replayed result is a failure: they count as failed, not done,
    /// so that a resumed run reports (and exits on) the failures its journal holds.
    failed_keys: HashSet<String>,
    agents: HashMap<String, AgentInfo>,
    leases: HashMap<u64, Lease>,
    next_lease: u64,
    next_agent: u64,
    /// Random per-process suffix of agent ids: an agent still holding an id issued by a previous
    /// coordinator process (before a restart) must get "unknown agent" and register again, not be
    /// taken for whichever agent the new process gave the same number.
    agent_id_nonce: u32,
    leases_expired: u64,
    /// Units given up on ([`GiveUpCause`]), waiting for their failed result to be recorded.
    abandoned: Vec<AbandonedUnit>,
    /// Losses charged and not yet handed out to be journaled ([`Scheduler::take_losses`]).
    losses: Vec<LossEvent>,
    /// Journaled losses of units whose target has no units yet (per-sku, per-gpu: they appear as
    /// agents register), by unit key ([`Scheduler::restore_losses`]).
    restored_losses: HashMap<String, Vec<Loss>>,
    /// Likewise for journaled failed attempts ([`Scheduler::restore_failed_attempts`]).
    restored_attempts: HashMap<String, Vec<FailedAttempt>>,
    draining: bool,
    /// The fleet requirement (`--expect-agents`, `--wait-for`) was met once: it gates the start
    /// only. An agent lost later must not stop the others (its cases go back to the queue).
    fleet_met: bool,
    /// When the scheduler was created: the fleet timeout counts from here.
    started: Instant,
}

impl Scheduler {
    /// A scheduler over `cases` (ids must be unique) that treats `already_done` unit keys as done.
    pub fn new(
        cfg: SchedulerConfig,
        cases: Vec<BenchCase>,
        already_done: impl IntoIterator<Item = String>,
    ) -> Scheduler {
        Scheduler::resume(cfg, cases, already_done, [])
    }

    /// A scheduler resumed from a journal: `already_done` unit keys have a result and are not run
    /// again; those also in `already_failed` have a failed one (every attempt used up) and count
    /// as failed, as they did when they were recorded.
    pub fn resume(
        cfg: SchedulerConfig,
        cases: Vec<BenchCase>,
        already_done: impl IntoIterator<Item = String>,
        already_failed: impl IntoIterator<Item = String>,
    ) -> Scheduler {
        let case_index = cases
            .iter()
            .enumerate()
            .map(|(i, c)| (c.id.clone(), i))
            .collect();
        let mut s = Scheduler {
            counts: StateCounts::default(),
            failures_seen: false,
            earliest_deadline: None,
            cfg,
            cases,
            case_index,
            units: Vec::new(),
            unit_index: HashMap::new(),
            queues: HashMap::new(),
            done_keys: already_done.into_iter().collect(),
            failed_keys: already_failed.into_iter().collect(),
            agents: HashMap::new(),
            leases: HashMap::new(),
            next_lease: 1,
            next_agent: 1,
            agent_id_nonce: rand::random(),
            leases_expired: 0,
            abandoned: Vec::new(),
            losses: Vec::new(),
            restored_losses: HashMap::new(),
            restored_attempts: HashMap::new(),
            draining: false,
            fleet_met: false,
            started: Instant::now(),
        };
        if s.cfg.placement == Placement::Spread {
            s.add_target(Target::Any);
        }
        s
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }

    pub fn cases(&self) -> &[BenchCase] {
        &self.cases
    }

    /// Creates the units of a placement target (once per target).
    fn add_target(&mut self, target: Target) {
        if self.queues.contains_key(&target) {
            return;
        }
        let mut queue: BTreeMap<String, VecDeque<usize>> = BTreeMap::new();
        let mut restored = Vec::new();
        let mut restored_attempts = Vec::new();
        for (case_idx, case) in self.cases.iter().enumerate() {
            let key = format!("{}|{}", case.id, target.key());
            if let Some(attempts) = self.restored_attempts.remove(&key) {
                restored_attempts.push((self.units.len(), attempts));
            }
            if let Some(losses) = self.restored_losses.remove(&key) {
                restored.push((self.units.len(), losses));
            }
            let done = self.done_keys.contains(&key);
            let state = match (done, self.failed_keys.contains(&key)) {
                (true, true) => UnitState::Failed,
                (true, false) => UnitState::Done,
                (false, _) => UnitState::Pending,
            };
            let idx = self.units.len();
            match state {
                UnitState::Failed => self.counts.failed += 1,
                UnitState::Done => self.counts.done += 1,
                _ => self.counts.pending += 1,
            }
            self.units.push(Unit {
                case_idx,
                target: target.clone(),
                state,
                lease: None,
                attempts: 0,
                errors: Vec::new(),
                failed_on: HashSet::new(),
                lost_with: Vec::new(),
            });
            self.unit_index.insert(key, idx);
            if !done {
                queue.entry(case.pool_key()).or_default().push_back(idx);
            }
        }
        self.queues.insert(target, queue);
        // Attempts before losses, as the coordinator restores them: a unit given up on at once
        // counts its reported attempts too.
        for (u, attempts) in restored_attempts {
            self.restore_unit_attempts(u, attempts);
        }
        for (u, losses) in restored {
            self.restore_unit_losses(u, losses);
        }
    }

    /// Gives a resumed scheduler the losses its journal holds, in the order they were charged
    /// (`(case id, loss)`; the unit follows from the case and the loss's device under this
    /// run's placement). A unit that has a result (done or failed) ignores them; any other unit
    /// runs alone, and one whose losses already reach `max_attempts`, the last one pinned on it,
    /// is given up at once (the coordinator stopped before it recorded the failure). Units of
    /// targets that do not exist yet get theirs when their first agent registers.
    ///
    /// The caller leaves out the losses it should not count: those journaled before a result of
    /// their unit, and, for a unit a `--retry-failed` round reruns, those charged before the
    /// round started (a new round reruns it with no losses against it; a resumed round keeps
    /// counting its own).
    pub fn restore_losses(&mut self, losses: impl IntoIterator<Item = (String, Loss)>) {
        let placement = self.cfg.placement;
        let keyed = losses
            .into_iter()
            .map(|(case_id, loss)| (unit_key(&case_id, placement, &loss.device), loss));
        for (u, losses) in file_by_unit(&mut self.restored_losses, &self.unit_index, keyed) {
            self.restore_unit_losses(u, losses);
        }
    }

    /// Gives a resumed scheduler the failed attempts its journal holds, in the order they were
    /// reported (`(case id, attempt)`; the unit follows from the case and the attempt's device
    /// under this run's placement), as [`Scheduler::restore_losses`] does for losses. A unit
    /// that has a result (done or failed) ignores them; any other unit counts each as an attempt
    /// used, keeps its errors for its final failed record and prefers other devices than those
    /// that failed it (by device uuid: the agents' ids were the previous coordinator process's),
    /// so that its next attempt number goes on from there. A unit whose attempts then reach
    /// `max_attempts` is given up at once ([`GiveUpCause::AttemptsUsedUp`]): the caller records
    /// its failed result, with the journaled errors, from [`Scheduler::take_abandoned`]. Call it
    /// before [`Scheduler::restore_losses`], so that a unit given up on at once for its losses
    /// counts them.
    ///
    /// The caller leaves out the failed attempts it should not count, by the rule of the losses:
    /// those journaled before a result of their unit, and, for a unit a `--retry-failed` round
    /// reruns, those reported before the round started.
    pub fn restore_failed_attempts(
        &mut self,
        attempts: impl IntoIterator<Item = (String, FailedAttempt)>,
    ) {
        let placement = self.cfg.placement;
        let keyed = attempts
            .into_iter()
            .map(|(case_id, a)| (unit_key(&case_id, placement, &a.device), a));
        for (u, attempts) in file_by_unit(&mut self.restored_attempts, &self.unit_index, keyed) {
            self.restore_unit_attempts(u, attempts);
        }
    }

    /// Counts a pending unit's journaled failed attempts. One whose attempts now reach
    /// `max_attempts` ([`GiveUpCause::AttemptsUsedUp`]) is given up at once, as a unit whose
    /// restored losses reach it is: leased again, it would get an attempt the run no longer
    /// allows. Its attempts are journaled already (the journal never holds a give-up before its
    /// cause), so its failed record may go out at once.
    fn restore_unit_attempts(&mut self, u: usize, attempts: Vec<FailedAttempt>) {
        let unit = &mut self.units[u];
        if unit.state != UnitState::Pending {
            return;
        }
        let Some(last) = attempts.last() else {
            return;
        };
        let (agent_id, device) = (last.agent_id.clone(), last.device.clone());
        for a in attempts {
            unit.attempts += 1;
            unit.errors.extend(a.errors);
            unit.failed_on.insert(a.device.uuid);
        }
        self.failures_seen = true;
        if unit.attempts >= self.cfg.max_attempts {
            let abandoned = self.give_up(u, GiveUpCause::AttemptsUsedUp, agent_id, device);
            self.abandoned.push(abandoned);
        }
    }

    fn restore_unit_losses(&mut self, u: usize, losses: Vec<Loss>) {
        let unit = &mut self.units[u];
        if unit.state != UnitState::Pending || losses.is_empty() {
            return;
        }
        unit.lost_with.extend(losses);
        let n = unit.lost_with.len() as u32;
        let Some(last) = unit.lost_with.last().cloned() else {
            return;
        };
        if n >= self.cfg.max_attempts && last.cause.pins_the_case() {
            // Its last loss is already journaled: the failed record may go out at once.
            let abandoned = self.give_up(u, GiveUpCause::Lost, last.agent_id, last.device);
            self.abandoned.push(abandoned);
        }
    }

    /// Takes unit `u` out of play for `cause`, `agent_id` on `device` having made its last try
    /// (the result's agent and device): it counts as running until its failed result is durable
    /// ([`Scheduler::commit_abandoned`]).
    fn give_up(
        &mut self,
        u: usize,
        cause: GiveUpCause,
        agent_id: String,
        device: DeviceIdentity,
    ) -> AbandonedUnit {
        let unit = &mut self.units[u];
        transition(&mut self.counts, unit, UnitState::Committing);
        unit.lease = None;
        let case = self.cases[unit.case_idx].clone();
        let lost_with: Vec<String> = unit.lost_with.iter().map(|l| l.agent_id.clone()).collect();
        let losses = lost_with.len() as u32;
        match cause {
            GiveUpCause::Lost => tracing::error!(
                case = %case.id,
                losses,
                agents = %lost_with.join(", "),
                "every agent that ran this case stopped without reporting; giving up on it and \
                 recording it as failed"
            ),
            GiveUpCause::AttemptsUsedUp => tracing::warn!(
                case = %case.id,
                attempts = unit.attempts,
                max_attempts = self.cfg.max_attempts,
                "the journal holds failed attempts of this case that already reach \
                 --max-attempts (lowered since they were reported, or the placement changed): \
                 recording it as failed with their errors, without running it again; resume \
                 with --retry-failed to run it again"
            ),
        }
        AbandonedUnit {
            unit: u,
            case,
            cause,
            agent_id,
            device,
            attempt: unit.attempts + losses,
            lost_with,
            errors: unit.errors.clone(),
            max_attempts: self.cfg.max_attempts,
        }
    }

    /// Registers an agent; returns its id.
    ///
    /// While the coordinator drains ([`Scheduler::start_drain`]) an agent is still registered (it
    /// gets an id, so that its first Lease or its leaving Release is answered, and it counts in
    /// [`Scheduler::awaiting_drain`] until then), but it adds no placement target: no work is
    /// handed out any more, and a GPU (per-gpu) or model (per-sku) that joins as the run ends must
    /// not turn a complete run into one with cases left.
    pub fn register(&mut self, name: String, device: DeviceIdentity, now: Instant) -> String {
        let id = format!("agent-{}-{:08x}", self.next_agent, self.agent_id_nonce);
        self.next_agent += 1;
        if !self.draining {
            let target = self.cfg.placement.target_of(&device);
            self.add_target(target);
        }
        self.agents.insert(
            id.clone(),
            AgentInfo {
                id: id.clone(),
                name,
                device,
                last_seen: now,
                registered: now,
                results: 0,
                lease: None,
                drained: false,
            },
        );
        id
    }

    fn touch(&mut self, agent_id: &str, now: Instant) -> Result<&mut AgentInfo, ScheduleError> {
        let a = self
            .agents
            .get_mut(agent_id)
            .ok_or_else(|| ScheduleError::UnknownAgent(agent_id.to_string()))?;
        a.last_seen = now;
        Ok(a)
    }

    fn fleet_ready(&self) -> bool {
        // No requirement: skip the O(agents) scan on every lease.
        if self.cfg.fleet.expect_agents == 0 && self.cfg.fleet.wait_for.is_empty() {
            return true;
        }
        self.fleet_shortfall().is_empty()
    }

    /// While no work has been handed out because the fleet requirement is not met: what it still
    /// lacks ([`Scheduler::fleet_shortfall`]) and, with a fleet timeout, how long until the run
    /// starts anyway. `None` once work is handed out, when the fleet is complete, or without a
    /// requirement.
    pub fn fleet_waiting(&self, now: Instant) -> Option<(String, Option<Duration>)> {
        if self.fleet_met {
            return None;
        }
        let short = self.fleet_shortfall();
        if short.is_empty() {
            return None;
        }
        let waited = now.saturating_duration_since(self.started);
        let left = self.cfg.fleet.timeout.map(|t| t.saturating_sub(waited));
        Some((short, left))
    }

    /// What the fleet requirement still lacks, e.g. `2 of 4 agents; NVIDIA H100 80GB HBM3: 1 of 2`;
    /// empty when it is met (or there is none).
    fn fleet_shortfall(&self) -> String {
        let alive: Vec<&AgentInfo> = self.alive_agents().collect();
        let mut parts = Vec::new();
        if alive.len() < self.cfg.fleet.expect_agents {
            parts.push(format!(
                "{} of {} agents",
                alive.len(),
                self.cfg.fleet.expect_agents
            ));
        }
        for (sku, n) in &self.cfg.fleet.wait_for {
            let have = alive.iter().filter(|a| &a.device.sku == sku).count();
            if have < *n {
                parts.push(format!("{sku}: {have} of {n}"));
            }
        }
        parts.join("; ")
    }

    fn alive_agents(&self) -> impl Iterator<Item = &AgentInfo> {
        let horizon = self.cfg.lease_timeout;
        self.agents
            .values()
            .filter(move |a| !a.drained && a.last_seen.elapsed() <= horizon)
    }

    /// Asks the coordinator to drain every agent (shutdown).
    pub fn start_drain(&mut self) {
        self.draining = true;
    }

    /// True once [`Scheduler::start_drain`] was called (the coordinator is shutting down).
    pub fn draining(&self) -> bool {
        self.draining
    }

    /// Whether an agent registering now is told at once that the run is over
    /// (`RegisterResponse.drain`): the coordinator drains, or, as for a Lease, every unit has a
    /// result. Asked after [`Scheduler::register`], under the same lock, so that no registration
    /// falls between it and [`Scheduler::start_drain`] unanswered.
    pub fn run_over(&self) -> bool {
        self.draining || self.is_finished()
    }

    /// While draining: the live agents the coordinator still serves for. One holding a lease is
    /// finishing its case (it reports it or hands the lease back). One not drained has not been
    /// answered "drain" yet: it registered before the drain and has not asked for work since (it
    /// hears the order at its next Lease, heartbeat or report), or it registered during the drain
    /// and has not yet said that it leaves (an agent of this release was told in its Register
    /// answer and says so at once; an older one ignores that answer and hears the order at its
    /// first Lease). Without this wait, such an agent's next call would find the coordinator
    /// gone, and it would retry it until its connect timeout and fail.
    pub fn awaiting_drain(&self) -> impl Iterator<Item = &AgentInfo> {
        let timeout = self.cfg.lease_timeout;
        self.agents.values().filter(move |a| {
            let alive = a.last_seen.elapsed() < timeout;
            alive && (a.lease.is_some() || !a.drained)
        })
    }

    /// The next shard for `agent_id`, or wait, or drain.
    pub fn lease(&mut self, agent_id: &str, now: Instant) -> Result<LeaseDecision, ScheduleError> {
        self.expire(now);
        let agent = self.touch(agent_id, now)?;
        if let Some(held) = agent.lease {
            // An agent asking for work no longer runs its old shard: hand those units back.
            agent.lease = None;
            self.return_lease(held);
        }
        if self.draining || self.is_finished() {
            if let Some(a) = self.agents.get_mut(agent_id) {
                a.drained = true;
            }
            return Ok(LeaseDecision::Drain);
        }
        if !self.fleet_met {
            if self.fleet_ready() {
                tracing::info!(
                    agents = self.agents.len(),
                    "the fleet requirement is met: dispatching"
                );
            } else {
                let waited = now.saturating_duration_since(self.started);
                match self.cfg.fleet.timeout {
                    Some(limit) if waited >= limit => tracing::warn!(
                        "--fleet-timeout-s: the fleet is still short after {:.0} s ({}): \
                         dispatching to the agents registered so far; agents that register later \
                         still get work",
                        waited.as_secs_f64(),
                        self.fleet_shortfall()
                    ),
                    _ => return Ok(LeaseDecision::Wait(IDLE_WAIT)),
                }
            }
            self.fleet_met = true;
        }
        let target = {
            let a = &self.agents[agent_id];
            self.cfg.placement.target_of(&a.device)
        };
        let units = self.take_shard(&target, agent_id);
        if units.is_empty() {
            return Ok(LeaseDecision::Wait(IDLE_WAIT));
        }
        let lease_id = self.next_lease;
        self.next_lease += 1;
        let mut cases = Vec::with_capacity(units.len());
        for &u in &units {
            let unit = &mut self.units[u];
            transition(&mut self.counts, unit, UnitState::Leased);
            unit.lease = Some(lease_id);
            cases.push(self.cases[unit.case_idx].clone());
        }
        let deadline = now + self.cfg.lease_timeout;
        self.earliest_deadline = Some(self.earliest_deadline.map_or(deadline, |d| d.min(deadline)));
        self.leases.insert(
            lease_id,
            Lease {
                agent_id: agent_id.to_string(),
                units,
                deadline,
                running: None,
            },
        );
        if let Some(a) = self.agents.get_mut(agent_id) {
            a.lease = Some(lease_id);
        }
        Ok(LeaseDecision::Shard(ShardGrant {
            lease_id: lease_id.to_string(),
            cases,
        }))
    }

    /// Pops up to `max_shard_cases` pending units that share a pool key, preferring units this
    /// agent's device has not failed before. A unit lost before goes alone.
    ///
    /// A unit is passed over for a device that failed it only while an agent on another device
    /// that serves `target` is alive, one that can take the retry: another agent on the same
    /// device (two CPU agents of one host share its uuid) would rerun it on the hardware that
    /// failed it, and an agent of another target (per-gpu, per-sku) can never take it, so waiting
    /// for either would hold the unit back for nothing, for ever.
    fn take_shard(&mut self, target: &Target, agent_id: &str) -> Vec<usize> {
        let device = self
            .agents
            .get(agent_id)
            .map(|a| a.device.uuid.clone())
            .unwrap_or_default();
        let placement = self.cfg.placement;
        let others_alive = self.failures_seen
            && self
                .alive_agents()
                .any(|a| a.device.uuid != device && placement.serves(&a.device, target));
        let Some(queue) = self.queues.get_mut(target) else {
            return Vec::new();
        };
        let max = self.cfg.max_shard_cases.max(1);
        let mut shard = Vec::new();
        let mut emptied = Vec::new();
        for (pool_key, q) in queue.iter_mut() {
            let mut skipped = VecDeque::new();
            while shard.len() < max {
                let Some(u) = q.pop_front() else { break };
                let unit = &self.units[u];
                if unit.state != UnitState::Pending {
                    continue; // stale entry (done meanwhile)
                }
                if others_alive && unit.failed_on.contains(&device) {
                    skipped.push_back(u);
                    continue;
                }
                if unit.isolated() {
                    if shard.is_empty() {
                        shard.push(u);
                        break;
                    }
                    // Not with others: it is the first unit of a later shard.
                    skipped.push_back(u);
                    continue;
                }
                shard.push(u);
            }
            while let Some(u) = skipped.pop_back() {
                q.push_front(u);
            }
            if q.is_empty() {
                emptied.push(pool_key.clone());
            }
            if !shard.is_empty() {
                break;
            }
        }
        for k in emptied {
            queue.remove(&k);
        }
        shard
    }

    fn requeue(&mut self, u: usize) {
        let unit = &mut self.units[u];
        transition(&mut self.counts, unit, UnitState::Pending);
        unit.lease = None;
        let pool_key = self.cases[unit.case_idx].pool_key();
        self.queues
            .entry(unit.target.clone())
            .or_default()
            .entry(pool_key)
            .or_default()
            .push_front(u);
    }

    fn return_lease(&mut self, lease_id: u64) -> u32 {
        let Some(lease) = self.take_lease(lease_id) else {
            return 0;
        };
        let mut returned = 0;
        for u in lease.units {
            if self.unreported_on(u, lease_id) {
                self.requeue(u);
                returned += 1;
            }
        }
        returned
    }

    /// Removes a lease, and from its agent; returns it.
    fn take_lease(&mut self, lease_id: u64) -> Option<Lease> {
        let lease = self.leases.remove(&lease_id)?;
        if let Some(a) = self.agents.get_mut(&lease.agent_id) {
            if a.lease == Some(lease_id) {
                a.lease = None;
            }
        }
        Some(lease)
    }

    /// Whether unit `u` is still out on lease `lease_id`, without a result.
    fn unreported_on(&self, u: usize, lease_id: u64) -> bool {
        self.units[u].state == UnitState::Leased && self.units[u].lease == Some(lease_id)
    }

    /// Expires leases past their deadline; their unfinished units go back in the queue.
    pub fn expire(&mut self, now: Instant) -> u32 {
        // Deadlines only move later (heartbeats extend them), so no lease can have expired
        // before the earliest deadline seen at the last scan (or granted since).
        if self.earliest_deadline.is_some_and(|d| now <= d) {
            return 0;
        }
        let expired: Vec<u64> = self
            .leases
            .iter()
            .filter(|(_, l)| l.deadline < now)
            .map(|(id, _)| *id)
            .collect();
        self.earliest_deadline = self
            .leases
            .values()
            .filter(|l| l.deadline >= now)
            .map(|l| l.deadline)
            .min();
        let n = expired.len() as u32;
        for id in expired {
            self.leases_expired += 1;
            self.lose_lease(id);
        }
        n
    }

    /// A lease expired: its agent stopped without reporting its unfinished units. If its last
    /// heartbeat named one of them, that one alone is charged a loss and the others go back to
    /// the queue as they were; otherwise each of them is charged. A charged unit runs alone from
    /// now on, and one whose loss was pinned on it and that has used up its losses is given up
    /// (see the module's give-up rule).
    fn lose_lease(&mut self, lease_id: u64) {
        let Some(lease) = self.take_lease(lease_id) else {
            return;
        };
        let unfinished: Vec<usize> = lease
            .units
            .iter()
            .copied()
            .filter(|&u| self.unreported_on(u, lease_id))
            .collect();
        let running = lease.running.filter(|u| unfinished.contains(u));
        let cause = match running {
            Some(_) => LossCause::Running,
            None if unfinished.len() == 1 => LossCause::Alone,
            None => LossCause::Shard,
        };
        let device = self
            .agents
            .get(&lease.agent_id)
            .map(|a| a.device.clone())
            .unwrap_or_default();
        let (mut charged, mut requeued) = (0, 0);
        // Backwards, so that the units requeued at the front of their queue keep their order.
        for &u in unfinished.iter().rev() {
            if running.is_some_and(|r| r != u) {
                self.requeue(u);
                requeued += 1;
                continue;
            }
            charged += 1;
            let loss = Loss {
                agent_id: lease.agent_id.clone(),
                device: device.clone(),
                cause,
            };
            let unit = &mut self.units[u];
            unit.lost_with.push(loss.clone());
            let losses = unit.lost_with.len() as u32;
            let case_id = self.cases[unit.case_idx].id.clone();
            let abandoned = if cause.pins_the_case() && losses >= self.cfg.max_attempts {
                Some(self.give_up(
                    u,
                    GiveUpCause::Lost,
                    loss.agent_id.clone(),
                    loss.device.clone(),
                ))
            } else {
                self.requeue(u);
                requeued += 1;
                None
            };
            self.losses.push(LossEvent {
                unit: u,
                case_id,
                loss,
                abandoned,
            });
        }
        match running {
            Some(u) => tracing::warn!(
                lease = lease_id,
                agent = %lease.agent_id,
                case = %self.cases[self.units[u].case_idx].id,
                requeued,
                "lease expired while its agent was running this case: the case is charged a loss \
                 and runs alone from now on; the lease's other unfinished cases are queued again"
            ),
            None => tracing::warn!(
                lease = lease_id,
                agent = %lease.agent_id,
                charged,
                requeued,
                "lease expired and its agent's last heartbeat named no unfinished case: each of \
                 its unfinished cases is charged a loss and queued again, to run alone"
            ),
        }
    }

    /// The agent process named `name` was seen to die at `at` (`decodebench run` supervises its
    /// local agents): its lease is lost now, exactly as an expiry would lose it (see the module's
    /// losses), instead of after the lease timeout, and the agent counts as gone. Only agents of
    /// that name registered by `at` are concerned: the process restarted in its place registers
    /// anew, under the same name. Returns how many leases were lost.
    pub fn agent_died(&mut self, name: &str, at: Instant) -> usize {
        let dead: HashSet<String> = self
            .agents
            .values()
            .filter(|a| a.name == name && a.registered <= at && !a.drained)
            .map(|a| a.id.clone())
            .collect();
        let leases: Vec<u64> = self
            .leases
            .iter()
            .filter(|(_, l)| dead.contains(&l.agent_id))
            .map(|(id, _)| *id)
            .collect();
        for &id in &leases {
            self.leases_expired += 1;
            self.lose_lease(id);
        }
        for id in &dead {
            if let Some(a) = self.agents.get_mut(id) {
                a.drained = true;
            }
        }
        leases.len()
    }

    /// Losses charged since the last call, in order: the caller journals them, then calls
    /// [`Scheduler::losses_recorded`] (or [`Scheduler::return_losses`] if that failed). A unit
    /// given up on after its loss is handed out by [`Scheduler::take_abandoned`] only then, so the
    /// caller must keep taking losses for the run to end.
    pub fn take_losses(&mut self) -> Vec<LossEvent> {
        std::mem::take(&mut self.losses)
    }

    /// These losses are journaled: the units given up on after them go out for their failed
    /// records.
    pub fn losses_recorded(&mut self, events: Vec<LossEvent>) {
        self.abandoned
            .extend(events.into_iter().filter_map(|e| e.abandoned));
    }

    /// These losses could not be journaled: keep them, first in line, for the next try.
    pub fn return_losses(&mut self, mut events: Vec<LossEvent>) {
        events.append(&mut self.losses);
        self.losses = events;
    }

    /// Units given up on since the last call ([`AbandonedUnit`]): record a failed result for each.
    pub fn take_abandoned(&mut self) -> Vec<AbandonedUnit> {
        std::mem::take(&mut self.abandoned)
    }

    /// An abandoned unit's failed result could not be made durable: keep it for the next try (it
    /// stays running; running it again would only kill another agent, or try it past
    /// `max_attempts`).
    pub fn return_abandoned(&mut self, a: AbandonedUnit) {
        self.abandoned.push(a);
    }

    /// An abandoned unit's failed result is durable: the unit counts as failed.
    pub fn commit_abandoned(&mut self, unit: usize) {
        if let Some(u) = self.units.get_mut(unit) {
            if u.state == UnitState::Committing {
                transition(&mut self.counts, u, UnitState::Failed);
            }
        }
    }

    /// The cases of a lease that have no result yet, in the order its agent runs them (the first
    /// is the one running, once the ones before it are reported).
    pub fn lease_cases(&self, lease_id: u64) -> Vec<&str> {
        self.leases.get(&lease_id).map_or_else(Vec::new, |l| {
            l.units
                .iter()
                .filter(|&&u| self.unreported_on(u, lease_id))
                .map(|&u| self.cases[self.units[u].case_idx].id.as_str())
                .collect()
        })
    }

    fn parse_lease(lease_id: &str) -> Result<u64, ScheduleError> {
        lease_id
            .parse::<u64>()
            .map_err(|_| ScheduleError::UnknownLease(lease_id.to_string()))
    }

    /// Extends a lease, and notes which of its cases the agent says it is running
    /// (`current_case_id`; empty, unknown or not part of the lease: none, see the module's
    /// losses). Returns whether the lease is still held and whether to drain.
    pub fn heartbeat(
        &mut self,
        agent_id: &str,
        lease_id: &str,
        current_case_id: &str,
        now: Instant,
    ) -> Result<(bool, bool), ScheduleError> {
        self.expire(now);
        self.touch(agent_id, now)?;
        let drain = self.draining;
        if lease_id.is_empty() {
            return Ok((false, drain));
        }
        let id = Self::parse_lease(lease_id)?;
        match self.leases.get_mut(&id) {
            Some(l) if l.agent_id == agent_id => {
                l.deadline = now + self.cfg.lease_timeout;
                let case_idx = self.case_index.get(current_case_id).copied();
                l.running = case_idx.and_then(|c| {
                    l.units
                        .iter()
                        .copied()
                        .find(|&u| self.units[u].case_idx == c)
                });
                Ok((true, drain))
            }
            Some(_) => Err(ScheduleError::UnknownLease(lease_id.to_string())),
            None => Ok((false, drain)),
        }
    }

    /// Hands back a lease's unfinished units (a draining agent).
    /// The agent says it is leaving: it counts as gone at once (status, fleet requirements), not
    /// a lease timeout later. Its lease, if any, is handed back by [`Scheduler::release`].
    pub fn leave(&mut self, agent_id: &str, now: Instant) -> Result<(), ScheduleError> {
        self.touch(agent_id, now)?.drained = true;
        Ok(())
    }

    pub fn release(
        &mut self,
        agent_id: &str,
        lease_id: &str,
        now: Instant,
    ) -> Result<u32, ScheduleError> {
        // Whether the agent is leaving is its own word (`ReleaseRequest.leaving`, [`Self::leave`]).
        self.touch(agent_id, now)?;
        let id = Self::parse_lease(lease_id)?;
        match self.leases.get(&id) {
            Some(l) if l.agent_id == agent_id => Ok(self.return_lease(id)),
            Some(_) => Err(ScheduleError::UnknownLease(lease_id.to_string())),
            None => Ok(0),
        }
    }

    /// Decides what a reported result means. Accepts results from expired leases too (the work was
    /// done); the unit key makes a second result for the same unit a duplicate.
    pub fn report(
        &mut self,
        agent_id: &str,
        lease_id: &str,
        m: &CaseMeasurement,
        now: Instant,
    ) -> Result<(ReportDecision, bool), ScheduleError> {
        let agent = self.touch(agent_id, now)?;
        let device = agent.device.clone();
        let key = unit_key(&m.case_id, self.cfg.placement, &device);
        let u = *self
            .unit_index
            .get(&key)
            .ok_or_else(|| ScheduleError::UnknownCase {
                case_id: m.case_id.clone(),
            })?;
        let lease_valid = Self::parse_lease(lease_id)
            .ok()
            .and_then(|id| self.leases.get_mut(&id).map(|l| (id, l)))
            .map(|(_, l)| {
                if l.agent_id == agent_id {
                    l.deadline = now + self.cfg.lease_timeout;
                    true
                } else {
                    false
                }
            })
            .unwrap_or(false);
        let unit = &mut self.units[u];
        match unit.state {
            UnitState::Done | UnitState::Failed | UnitState::Committing => {
                return Ok((ReportDecision::Duplicate, lease_valid))
            }
            UnitState::Pending | UnitState::Leased => {}
        }
        unit.attempts += 1;
        let attempt = unit.attempts;
        let failures: Vec<String> = m
            .kernels
            .iter()
            .filter(|k| k.status == Some(Status::Failed))
            .map(|k| {
                format!(
                    "attempt {attempt} on {agent_id} ({}): {}: {}",
                    device.uuid,
                    k.kernel.map(|k| k.as_str()).unwrap_or("?"),
                    k.message
                )
            })
            .collect();
        if failures.is_empty() {
            transition(&mut self.counts, unit, UnitState::Committing);
            return Ok((ReportDecision::Commit { unit: u, attempt }, lease_valid));
        }
        self.failures_seen = true;
        let unit = &mut self.units[u];
        transition(&mut self.counts, unit, UnitState::Committing);
        if attempt >= self.cfg.max_attempts {
            // The unit itself keeps nothing of this attempt: it ends failed once the record is
            // durable ([`Scheduler::commit`]), and if that fails ([`Scheduler::abort_commit`])
            // the attempt is not counted and the agent sends the same report again, which must
            // not list this error twice.
            let errors: Vec<String> = unit.errors.iter().cloned().chain(failures).collect();
            return Ok((
                ReportDecision::CommitFailed {
                    unit: u,
                    attempt,
                    errors,
                },
                lease_valid,
            ));
        }
        // The unit waits, running, until the failed attempt is journaled
        // ([`Scheduler::retry_recorded`]); its errors are kept only then.
        Ok((
            ReportDecision::Retry {
                unit: u,
                attempt,
                error: failures.join("; "),
                errors: failures,
            },
            lease_valid,
        ))
    }

    /// The failed attempt of a [`ReportDecision::Retry`] is journaled: the unit keeps its
    /// `errors`, prefers devices other than `agent_id`'s, leaves its lease and is queued for
    /// another attempt.
    pub fn retry_recorded(&mut self, unit: usize, agent_id: &str, errors: Vec<String>) {
        // Agents are never forgotten (a gone one is only marked drained), so the reporting
        // agent, known to `report`, is known here.
        let device = self.agents.get(agent_id).map(|a| a.device.uuid.clone());
        let Some(u) = self.units.get_mut(unit) else {
            return;
        };
        if u.state != UnitState::Committing {
            return;
        }
        u.errors.extend(errors);
        if let Some(device) = device {
            u.failed_on.insert(device);
        }
        if let Some(l) = u.lease.and_then(|id| self.leases.get_mut(&id)) {
            l.units.retain(|&x| x != unit);
        }
        self.requeue(unit);
    }

    /// Marks a unit done (or, after [`ReportDecision::CommitFailed`], failed) once its result is
    /// durable.
    pub fn commit(&mut self, unit: usize, agent_id: &str, failed: bool) {
        let Some(u) = self.units.get_mut(unit) else {
            return;
        };
        transition(
            &mut self.counts,
            u,
            if failed {
                UnitState::Failed
            } else {
                UnitState::Done
            },
        );
        if let Some(l) = u.lease.take().and_then(|id| self.leases.get_mut(&id)) {
            l.units.retain(|&x| x != unit);
        }
        if let Some(a) = self.agents.get_mut(agent_id) {
            a.results += 1;
        }
    }

    /// The result (or, after a [`ReportDecision::Retry`], the failed attempt) could not be made
    /// durable: the attempt is not counted and the unit goes back to the queue.
    pub fn abort_commit(&mut self, unit: usize) {
        if let Some(u) = self.units.get_mut(unit) {
            if u.state == UnitState::Committing {
                u.attempts = u.attempts.saturating_sub(1);
                self.requeue(unit);
            }
        }
    }

    /// True when every unit has a result (and the fleet requirement was met, so per-sku/per-gpu
    /// targets exist).
    pub fn is_finished(&self) -> bool {
        if self.cfg.placement != Placement::Spread && self.queues.is_empty() {
            return false;
        }
        if self.cfg.placement != Placement::Spread
            && !self.fleet_met
            && !self.fleet_ready()
            && !self.draining
        {
            // Targets appear as agents register; until the fleet is complete, more may come.
            let any_agents = !self.agents.is_empty();
            if !any_agents {
                return false;
            }
        }
        self.counts.done + self.counts.failed == self.units.len() as u64 && !self.units.is_empty()
    }

    pub fn progress(&self) -> Progress {
        let mut p = Progress {
            total: self.units.len() as u64,
            leases_expired: self.leases_expired,
            agents_alive: self.alive_agents().count() as u32,
            finished: self.is_finished(),
            ..Default::default()
        };
        p.pending = self.counts.pending;
        p.running = self.counts.running;
        p.done = self.counts.done;
        p.failed = self.counts.failed;
        p
    }

    pub fn agents(&self) -> impl Iterator<Item = &AgentInfo> {
        self.agents.values()
    }

    pub fn agent(&self, id: &str) -> Option<&AgentInfo> {
        self.agents.get(id)
    }

    /// The case behind a unit.
    pub fn unit_case(&self, unit: usize) -> Option<&BenchCase> {
        self.units.get(unit).map(|u| &self.cases[u.case_idx])
    }

    /// The case with this id, if it is in the grid.
    pub fn case(&self, case_id: &str) -> Option<&BenchCase> {
        self.case_index.get(case_id).map(|&i| &self.cases[i])
    }

    /// Unit keys with no result yet (for the exit summary).
    pub fn unfinished(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .unit_index
            .iter()
            .filter(|(_, &u)| !matches!(self.units[u].state, UnitState::Done | UnitState::Failed))
            .map(|(k, _)| k.clone())
            .collect();
        v.sort();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use decodebench_kernels::{KernelKind, KernelMeasurement, KvPool, QuantMode};
    use std::collections::BTreeSet;

    fn cases(n: u32) -> Vec<BenchCase> {
        (0..n)
            .map(|i| {
                BenchCase {
                    num_qo_heads: 8,
                    num_kv_heads: 1,
                    head_size: 64,
                    pool: KvPool::Shared { tokens: 4096 },
                    seed: 1,
                    ..BenchCase::reference_shape(1 + i, 64, QuantMode::BF16)
                }
                .with_id()
            })
            .collect()
    }

    fn dev(uuid: &str, sku: &str) -> DeviceIdentity {
        DeviceIdentity {
            backend: "cpu".into(),
            uuid: uuid.into(),
            sku: sku.into(),
            ..Default::default()
        }
    }

    fn ok_result(case_id: &str) -> CaseMeasurement {
        CaseMeasurement {
            case_id: case_id.into(),
            kernels: KernelKind::ALL
                .iter()
                .map(|&k| KernelMeasurement {
                    kernel: Some(k),
                    status: Some(Status::Ok),
                    ..Default::default()
                })
                .collect(),
            wall_s: 0.1,
        }
    }

    fn failed_result(case_id: &str) -> CaseMeasurement {
        let mut m = ok_result(case_id);
        m.kernels[1].status = Some(Status::Failed);
        m.kernels[1].message = "illegal address".into();
        m
    }

    fn cfg(max_shard: usize) -> SchedulerConfig {
        SchedulerConfig {
            max_shard_cases: max_shard,
            ..Default::default()
        }
    }

    /// [`cfg`] with `max_attempts` (the tests of losses and give-ups).
    fn cfg_attempts(max_shard: usize, max_attempts: u32) -> SchedulerConfig {
        SchedulerConfig {
            max_attempts,
            ..cfg(max_shard)
        }
    }

    /// One case a shard under `placement`, with `max_attempts` (the per-gpu / per-sku tests of
    /// failed attempts).
    fn cfg_placed(placement: Placement, max_attempts: u32) -> SchedulerConfig {
        SchedulerConfig {
            placement,
            ..cfg_attempts(1, max_attempts)
        }
    }

    fn grant(d: LeaseDecision) -> ShardGrant {
        match d {
            LeaseDecision::Shard(g) => g,
            other => panic!("expected a shard, got {other:?}"),
        }
    }

    fn run_to_done(s: &mut Scheduler, agent: &str, now: Instant) {
        loop {
            match s.lease(agent, now).unwrap() {
                LeaseDecision::Shard(g) => {
                    for c in g.cases {
                        let (d, _) = s
                            .report(agent, &g.lease_id, &ok_result(&c.id), now)
                            .unwrap();
                        if let ReportDecision::Commit { unit, .. } = d {
                            s.commit(unit, agent, false);
                        }
                    }
                }
                // Nothing left for this agent's target (other targets may still run).
                LeaseDecision::Drain | LeaseDecision::Wait(_) => return,
            }
        }
    }

    #[test]
    fn failed_after_counts_attempts_in_words_and_joins_their_errors_in_order() {
        let errors = ["attempt 1: a".to_string(), "attempt 2: b".to_string()];
        assert_eq!(
            failed_after(2, &errors),
            "failed after 2 attempts: attempt 1: a | attempt 2: b"
        );
        assert_eq!(
            failed_after(1, &errors[..1]),
            "failed after 1 attempt: attempt 1: a"
        );
    }

    #[test]
    fn spread_runs_each_case_once_then_drains() {
        let now = Instant::now();
        let mut s = Scheduler::new(cfg(3), cases(10), []);
        let a = s.register("a".into(), dev("u1", "H100"), now);
        run_to_done(&mut s, &a, now);
        let p = s.progress();
        assert_eq!((p.total, p.done, p.failed), (10, 10, 0));
        assert!(p.finished);
    }

    #[test]
    fn expired_lease_requeues_and_late_result_is_deduplicated() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(cfg(2), cases(2), []);
        let a = s.register("a".into(), dev("u1", "H100"), t0);
        let b = s.register("b".into(), dev("u2", "H100"), t0);
        let g = grant(s.lease(&a, t0).unwrap());
        assert_eq!(g.cases.len(), 2);
        // a goes silent past its lease; b picks the same cases up, one at a time now (lost once).
        let t1 = t0 + DEFAULT_LEASE_TIMEOUT + Duration::from_secs(1);
        let gb = grant(s.lease(&b, t1).unwrap());
        assert_eq!(gb.cases.len(), 1);
        assert_eq!(s.progress().leases_expired, 1);
        // a comes back late and reports first: its result counts.
        let (d, valid) = s
            .report(&a, &g.lease_id, &ok_result(&gb.cases[0].id), t1)
            .unwrap();
        assert!(!valid);
        let ReportDecision::Commit { unit, .. } = d else {
            panic!("{d:?}")
        };
        s.commit(unit, &a, false);
        // b's result for the same case is a duplicate.
        let (d, valid) = s
            .report(&b, &gb.lease_id, &ok_result(&gb.cases[0].id), t1)
            .unwrap();
        assert_eq!(d, ReportDecision::Duplicate);
        assert!(valid);
        let gb = grant(s.lease(&b, t1).unwrap());
        assert_eq!(gb.cases.len(), 1);
        let (d, _) = s
            .report(&b, &gb.lease_id, &ok_result(&gb.cases[0].id), t1)
            .unwrap();
        let ReportDecision::Commit { unit, .. } = d else {
            panic!("{d:?}")
        };
        s.commit(unit, &b, false);
        assert_eq!(s.progress().done, 2);
        assert!(s.is_finished());
    }

    /// Reports every case of `g` as ok from `agent`.
    fn report_all_ok(s: &mut Scheduler, agent: &str, g: &ShardGrant, now: Instant) {
        report_first_ok(s, agent, g, g.cases.len(), now);
    }

    /// Reports the first `n` cases of `g` ok, as an agent that then dies running the next one.
    fn report_first_ok(s: &mut Scheduler, agent: &str, g: &ShardGrant, n: usize, now: Instant) {
        for c in &g.cases[..n] {
            let (d, _) = s
                .report(agent, &g.lease_id, &ok_result(&c.id), now)
                .unwrap();
            let ReportDecision::Commit { unit, .. } = d else {
                panic!("{d:?}")
            };
            s.commit(unit, agent, false);
        }
    }

    /// Agents that lost the unit of `case_id` (spread placement).
    fn lost_with(s: &Scheduler, case_id: &str) -> Vec<String> {
        let u = s.unit_index[&format!("{case_id}|*")];
        s.units[u]
            .lost_with
            .iter()
            .map(|l| l.agent_id.clone())
            .collect()
    }

    /// How each loss of the unit of `case_id` was pinned on it (spread placement).
    fn loss_causes(s: &Scheduler, case_id: &str) -> Vec<LossCause> {
        let u = s.unit_index[&format!("{case_id}|*")];
        s.units[u].lost_with.iter().map(|l| l.cause).collect()
    }

    /// Journals the losses charged since the last call, as the coordinator does every tick, and
    /// returns them.
    fn journal_losses(s: &mut Scheduler) -> Vec<LossEvent> {
        let events = s.take_losses();
        s.losses_recorded(events.clone());
        events
    }

    /// The units given up on, once the losses that ended them are journaled.
    fn given_up(s: &mut Scheduler) -> Vec<AbandonedUnit> {
        journal_losses(s);
        s.take_abandoned()
    }

    /// A moment past every lease granted at or before `t`.
    fn past_lease(t: Instant) -> Instant {
        t + DEFAULT_LEASE_TIMEOUT + Duration::from_secs(1)
    }

    #[test]
    fn a_single_lost_lease_only_requeues() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(cfg(1), cases(1), []);
        let a = s.register("a".into(), dev("u1", "H100"), t0);
        let g = grant(s.lease(&a, t0).unwrap());
        let t1 = past_lease(t0);
        assert_eq!(s.expire(t1), 1);
        assert!(given_up(&mut s).is_empty(), "one loss gives nothing up");
        let p = s.progress();
        assert_eq!((p.pending, p.running, p.failed), (1, 0, 0), "{p:?}");
        assert_eq!(lost_with(&s, &g.cases[0].id), vec![a.clone()]);
        // Another agent runs it as usual; the loss is not a reported attempt.
        let b = s.register("b".into(), dev("u2", "H100"), t1);
        let gb = grant(s.lease(&b, t1).unwrap());
        assert_eq!(gb.cases, g.cases);
        let (d, _) = s
            .report(&b, &gb.lease_id, &ok_result(&gb.cases[0].id), t1)
            .unwrap();
        assert_eq!(
            d,
            ReportDecision::Commit {
                unit: 0,
                attempt: 1
            }
        );
        s.commit(0, &b, false);
        assert!(s.is_finished());
    }

    #[test]
    fn losses_are_charged_to_unreported_units_only_and_those_run_alone() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(cfg(4), cases(6), []);
        let a = s.register("a".into(), dev("u1", "H100"), t0);
        let g = grant(s.lease(&a, t0).unwrap());
        assert_eq!(g.cases.len(), 4);
        // a reports its first case, then dies running the second.
        report_first_ok(&mut s, &a, &g, 1, t0);
        let t1 = past_lease(t0);
        s.expire(t1);
        assert!(lost_with(&s, &g.cases[0].id).is_empty(), "it was reported");
        for c in &g.cases[1..] {
            assert_eq!(lost_with(&s, &c.id), vec![a.clone()]);
        }
        // The three lost units come back one per shard; the two never lost still share one.
        let b = s.register("b".into(), dev("u2", "H100"), t1);
        let mut sizes = Vec::new();
        let mut lost_again: BTreeSet<String> = BTreeSet::new();
        loop {
            match s.lease(&b, t1).unwrap() {
                LeaseDecision::Shard(gb) => {
                    sizes.push(gb.cases.len());
                    if gb.cases.len() == 1 {
                        lost_again.insert(gb.cases[0].id.clone());
                    }
                    report_all_ok(&mut s, &b, &gb, t1);
                }
                other => {
                    assert_eq!(other, LeaseDecision::Drain);
                    break;
                }
            }
        }
        sizes.sort_unstable();
        assert_eq!(sizes, vec![1, 1, 1, 2]);
        let expected: BTreeSet<String> = g.cases[1..].iter().map(|c| c.id.clone()).collect();
        assert_eq!(lost_again, expected);
        let p = s.progress();
        assert_eq!((p.done, p.failed), (6, 0));
    }

    #[test]
    fn a_case_lost_max_attempts_times_is_given_up_and_its_shard_mates_finish() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(cfg_attempts(3, 2), cases(3), []);
        // Every agent dies as soon as it runs the poisoned case: the first of the first shard.
        let a = s.register("a".into(), dev("u1", "H100"), t0);
        let g = grant(s.lease(&a, t0).unwrap());
        assert_eq!(g.cases.len(), 3);
        let poison = g.cases[0].id.clone();
        let mut t = past_lease(t0);
        s.expire(t);
        assert!(given_up(&mut s).is_empty(), "lost once, with shard-mates");
        let mut killed = vec![a];
        let mut n = 0;
        let abandoned = loop {
            n += 1;
            assert!(n < 10, "the poisoned case was never given up");
            let agent = s.register(format!("r{n}"), dev(&format!("u{n}"), "H100"), t);
            match s.lease(&agent, t).unwrap() {
                LeaseDecision::Shard(g) => {
                    assert_eq!(g.cases.len(), 1, "lost units run alone: {g:?}");
                    if g.cases[0].id == poison {
                        killed.push(agent);
                        t = past_lease(t);
                        s.expire(t);
                    } else {
                        report_all_ok(&mut s, &agent, &g, t);
                    }
                }
                other => panic!("{other:?}"),
            }
            let abandoned = given_up(&mut s);
            if !abandoned.is_empty() {
                break abandoned;
            }
        };
        assert_eq!(abandoned.len(), 1);
        let ab = &abandoned[0];
        assert_eq!(ab.case.id, poison);
        assert_eq!(ab.cause, GiveUpCause::Lost);
        assert_eq!(ab.lost_with, killed);
        assert_eq!(ab.agent_id, killed[1]);
        assert_eq!(ab.device.uuid, s.agent(&killed[1]).unwrap().device.uuid);
        assert_eq!(ab.attempt, 2);
        let why = ab.explanation();
        assert!(
            why.starts_with("lost 2 times")
                && why.contains(&killed[0])
                && why.contains(&killed[1])
                && why.contains(&poison),
            "{why}"
        );
        // Until its failed result is durable it counts as running, and the run is not over.
        let p = s.progress();
        assert_eq!((p.running, p.failed), (1, 0), "{p:?}");
        assert!(!s.is_finished());
        // Its shard-mates were never given up: another agent finishes them.
        let last = s.register("last".into(), dev("u9", "H100"), t);
        run_to_done(&mut s, &last, t);
        s.commit_abandoned(ab.unit);
        let p = s.progress();
        assert_eq!(
            (p.done, p.failed, p.running, p.pending),
            (2, 1, 0, 0),
            "{p:?}"
        );
        assert!(p.finished && s.unfinished().is_empty());
        // A late report from the dead is a duplicate of the recorded failure.
        let (d, _) = s.report(&last, "1", &ok_result(&poison), t).unwrap();
        assert_eq!(d, ReportDecision::Duplicate);
    }

    /// Shard-mates of a crashing case are never failed on shared evidence: only a loss of a unit
    /// alone in its lease can be its last, even with one attempt allowed.
    #[test]
    fn a_loss_with_shard_mates_never_gives_a_unit_up() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(cfg_attempts(2, 1), cases(2), []);
        let a = s.register("a".into(), dev("u1", "H100"), t0);
        grant(s.lease(&a, t0).unwrap());
        let t1 = past_lease(t0);
        s.expire(t1);
        assert!(given_up(&mut s).is_empty());
        assert_eq!(s.progress().pending, 2);
        // Alone, one loss is all one attempt allows.
        let b = s.register("b".into(), dev("u2", "H100"), t1);
        let g = grant(s.lease(&b, t1).unwrap());
        assert_eq!(g.cases.len(), 1);
        s.expire(past_lease(t1));
        let abandoned = given_up(&mut s);
        assert_eq!(abandoned.len(), 1);
        assert_eq!(abandoned[0].case.id, g.cases[0].id);
        assert_eq!(abandoned[0].lost_with, vec![a, b]);
    }

    /// Leases shards to `agent` until none is left, reports each, and returns the shards' case
    /// ids in the order they were leased.
    fn drain_shards(s: &mut Scheduler, agent: &str, now: Instant) -> Vec<Vec<String>> {
        let mut shards = Vec::new();
        while let LeaseDecision::Shard(g) = s.lease(agent, now).unwrap() {
            shards.push(g.cases.iter().map(|c| c.id.clone()).collect());
            report_all_ok(s, agent, &g, now);
        }
        shards
    }

    /// An agent leases shard [A, B, C, D], reports A, heartbeats naming B, and dies: B alone is
    /// charged (and runs alone from then on); C and D never started, so they go back uncharged
    /// and are batched again.
    #[test]
    fn an_agent_process_seen_dying_loses_its_lease_at_once() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(cfg(4), cases(4), []);
        let a = s.register("local-gpu0".into(), dev("u1", "H100"), t0);
        let g = grant(s.lease(&a, t0).unwrap());
        let ids: Vec<String> = g.cases.iter().map(|c| c.id.clone()).collect();
        s.heartbeat(&a, &g.lease_id, &ids[0], t0).unwrap();
        // Another agent's name, or a death before this agent registered, changes nothing.
        assert_eq!(s.agent_died("local-gpu1", t0), 0);
        assert_eq!(s.agent_died("local-gpu0", t0 - Duration::from_millis(1)), 0);
        assert_eq!(s.progress().running, 4);
        // Well within the lease timeout, the death loses the lease as its expiry would.
        assert_eq!(s.agent_died("local-gpu0", t0), 1);
        assert_eq!(loss_causes(&s, &ids[0]), vec![LossCause::Running]);
        for id in &ids[1..] {
            assert!(lost_with(&s, id).is_empty(), "{id} never started");
        }
        assert_eq!(s.progress().pending, 4);
        assert!(s.agent(&a).is_some_and(|info| info.drained));
        // The process restarted in its place registers under the same name and is not touched by
        // a later report of the old one's death.
        let t1 = t0 + Duration::from_millis(10);
        let b = s.register("local-gpu0".into(), dev("u1", "H100"), t1);
        let g2 = grant(s.lease(&b, t1).unwrap());
        assert_eq!(s.agent_died("local-gpu0", t0), 0);
        assert!(s.leases.contains_key(&g2.lease_id.parse::<u64>().unwrap()));
    }

    #[test]
    fn a_heartbeat_naming_the_running_case_charges_that_case_alone() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(cfg(4), cases(4), []);
        let a = s.register("a".into(), dev("u1", "H100"), t0);
        let g = grant(s.lease(&a, t0).unwrap());
        let ids: Vec<String> = g.cases.iter().map(|c| c.id.clone()).collect();
        assert_eq!(ids.len(), 4);
        report_first_ok(&mut s, &a, &g, 1, t0);
        assert_eq!(
            s.heartbeat(&a, &g.lease_id, &ids[1], t0).unwrap(),
            (true, false)
        );
        let t1 = past_lease(t0);
        assert_eq!(s.expire(t1), 1);
        assert_eq!(lost_with(&s, &ids[1]), vec![a.clone()]);
        assert_eq!(loss_causes(&s, &ids[1]), vec![LossCause::Running]);
        for id in &ids[2..] {
            assert!(lost_with(&s, id).is_empty(), "{id} never started");
        }
        assert_eq!(s.progress().pending, 3);
        // One loss to journal, B's, and nothing given up.
        let events = journal_losses(&mut s);
        assert_eq!(events.len(), 1);
        assert_eq!(
            (
                events[0].case_id.as_str(),
                events[0].loss.agent_id.as_str(),
                events[0].loss.cause,
                events[0].loss.device.uuid.as_str()
            ),
            (ids[1].as_str(), a.as_str(), LossCause::Running, "u1")
        );
        assert!(events[0].abandoned.is_none());
        // B runs alone; C and D share a shard again.
        let b = s.register("b".into(), dev("u2", "H100"), t1);
        let mut shards = drain_shards(&mut s, &b, t1);
        shards.sort();
        let mut expected = vec![vec![ids[1].clone()], vec![ids[2].clone(), ids[3].clone()]];
        expected.sort();
        assert_eq!(shards, expected);
        assert!(s.is_finished());
    }

    /// Without a heartbeat naming an unreported case of the lease (none at all, one naming a case
    /// already reported, or a later one naming none), the agent may have died running any of
    /// them: each is charged, as before heartbeats named cases, and each runs alone.
    #[test]
    fn without_a_heartbeat_naming_an_unreported_case_every_unreported_case_is_charged() {
        // What the agent's heartbeats said last: nothing; the case it had reported; a case, then
        // an empty id (an older agent) or a case of no lease of its.
        let outside = cases(5)[4].id.clone();
        for n in 0..4 {
            let t0 = Instant::now();
            let mut s = Scheduler::new(cfg(4), cases(5), []);
            let a = s.register("a".into(), dev("u1", "H100"), t0);
            let g = grant(s.lease(&a, t0).unwrap());
            let ids: Vec<String> = g.cases.iter().map(|c| c.id.clone()).collect();
            assert!(!ids.contains(&outside));
            report_first_ok(&mut s, &a, &g, 1, t0);
            let said: Vec<String> = match n {
                0 => vec![],
                1 => vec![ids[0].clone()],
                2 => vec![ids[1].clone(), String::new()],
                _ => vec![ids[2].clone(), outside.clone()],
            };
            for case in said {
                s.heartbeat(&a, &g.lease_id, &case, t0).unwrap();
            }
            let t1 = past_lease(t0);
            s.expire(t1);
            for id in &ids[1..] {
                assert_eq!(lost_with(&s, id), vec![a.clone()], "heartbeats {n}");
                assert_eq!(
                    loss_causes(&s, id),
                    vec![LossCause::Shard],
                    "heartbeats {n}"
                );
            }
            let events = journal_losses(&mut s);
            assert_eq!(events.len(), 3, "heartbeats {n}");
            assert!(given_up(&mut s).is_empty());
            let b = s.register("b".into(), dev("u2", "H100"), t1);
            let sizes: Vec<usize> = drain_shards(&mut s, &b, t1).iter().map(Vec::len).collect();
            // The three charged ones alone; the one never leased before on its own.
            assert_eq!(sizes.iter().filter(|&&n| n == 1).count(), 4, "{sizes:?}");
        }
    }

    /// The give-up rule with heartbeats: a loss pinned on a case by its heartbeat counts like a
    /// loss alone, and the case is given up after `max_attempts` of them while the shard-mates it
    /// was leased with run on, never charged. Its failed record goes out only once the loss that
    /// ended it is journaled.
    #[test]
    fn a_case_named_by_the_heartbeat_of_every_agent_it_kills_is_given_up() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(cfg_attempts(4, 2), cases(4), []);
        let a = s.register("a".into(), dev("u1", "H100"), t0);
        let g = grant(s.lease(&a, t0).unwrap());
        let ids: Vec<String> = g.cases.iter().map(|c| c.id.clone()).collect();
        let poison = ids[0].clone();
        s.heartbeat(&a, &g.lease_id, &poison, t0).unwrap();
        let t1 = past_lease(t0);
        s.expire(t1);
        assert!(given_up(&mut s).is_empty(), "one loss of two");
        // The next agent gets it alone, names it, and dies too.
        let b = s.register("b".into(), dev("u2", "H100"), t1);
        let gb = grant(s.lease(&b, t1).unwrap());
        assert_eq!(gb.cases.len(), 1);
        assert_eq!(gb.cases[0].id, poison);
        s.heartbeat(&b, &gb.lease_id, &poison, t1).unwrap();
        let t2 = past_lease(t1);
        s.expire(t2);
        assert!(
            s.take_abandoned().is_empty(),
            "not handed out before its loss is journaled"
        );
        let events = s.take_losses();
        assert_eq!(events.len(), 1);
        assert!(events[0].abandoned.is_some());
        // The journal write fails: the loss waits, and so does the give-up.
        s.return_losses(events);
        assert!(s.take_abandoned().is_empty());
        let abandoned = given_up(&mut s);
        assert_eq!(abandoned.len(), 1);
        let ab = &abandoned[0];
        assert_eq!(ab.case.id, poison);
        assert_eq!(ab.lost_with, vec![a.clone(), b.clone()]);
        assert_eq!(
            (ab.agent_id.as_str(), ab.device.uuid.as_str()),
            (b.as_str(), "u2")
        );
        assert_eq!(ab.attempt, 2);
        assert_eq!(
            loss_causes(&s, &poison),
            vec![LossCause::Running, LossCause::Running]
        );
        // Its shard-mates were never charged: they run together, and the run ends.
        let c = s.register("c".into(), dev("u3", "H100"), t2);
        let shards = drain_shards(&mut s, &c, t2);
        assert_eq!(shards, vec![ids[1..].to_vec()]);
        for id in &ids[1..] {
            assert!(lost_with(&s, id).is_empty());
        }
        s.commit_abandoned(ab.unit);
        let p = s.progress();
        assert_eq!((p.done, p.failed), (3, 1), "{p:?}");
        assert!(p.finished);
    }

    fn loss(agent_id: &str, uuid: &str, cause: LossCause) -> Loss {
        Loss {
            agent_id: agent_id.into(),
            device: dev(uuid, "H100"),
            cause,
        }
    }

    /// A resumed scheduler gets the journaled losses back: a case lost once still runs alone, and
    /// its next loss alone gives it up (two in all), as if the coordinator had never restarted.
    #[test]
    fn restored_losses_keep_a_case_alone_and_count_towards_giving_it_up() {
        let t0 = Instant::now();
        let cs = cases(4);
        let ids: Vec<String> = cs.iter().map(|c| c.id.clone()).collect();
        let mut s = Scheduler::resume(cfg_attempts(4, 2), cs, [], []);
        s.restore_losses([(ids[1].clone(), loss("agent-old", "u0", LossCause::Running))]);
        assert_eq!(lost_with(&s, &ids[1]), vec!["agent-old".to_string()]);
        assert!(given_up(&mut s).is_empty());
        assert!(
            s.take_losses().is_empty(),
            "restored losses are journaled already"
        );
        // The first shard skips it; then it comes alone.
        let a = s.register("a".into(), dev("u1", "H100"), t0);
        let g = grant(s.lease(&a, t0).unwrap());
        let first: Vec<&str> = g.cases.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(first, [&ids[0], &ids[2], &ids[3]]);
        report_all_ok(&mut s, &a, &g, t0);
        let g = grant(s.lease(&a, t0).unwrap());
        assert_eq!(g.cases.len(), 1);
        assert_eq!(g.cases[0].id, ids[1]);
        s.expire(past_lease(t0));
        let abandoned = given_up(&mut s);
        assert_eq!(abandoned.len(), 1);
        assert_eq!(abandoned[0].lost_with, vec!["agent-old".to_string(), a]);
        assert_eq!(abandoned[0].attempt, 2);
    }

    #[test]
    fn restored_losses_give_a_case_up_at_once_or_are_ignored_as_the_rule_says() {
        let t0 = Instant::now();
        let cs = cases(4);
        let ids: Vec<String> = cs.iter().map(|c| c.id.clone()).collect();
        let mut s = Scheduler::resume(cfg_attempts(4, 2), cs, [format!("{}|*", ids[3])], []);
        s.restore_losses([
            // Two losses, the last pinned: the coordinator stopped before recording the failure.
            (ids[0].clone(), loss("x", "u0", LossCause::Shard)),
            (ids[0].clone(), loss("y", "u9", LossCause::Alone)),
            // Two losses, the last shared with shard-mates: it runs alone once more.
            (ids[1].clone(), loss("x", "u0", LossCause::Running)),
            (ids[1].clone(), loss("z", "u0", LossCause::Shard)),
            // A case with a result ignores its losses.
            (ids[3].clone(), loss("x", "u0", LossCause::Alone)),
            (ids[3].clone(), loss("x", "u0", LossCause::Alone)),
        ]);
        let abandoned = s.take_abandoned();
        assert_eq!(abandoned.len(), 1, "its loss is already journaled");
        let ab = &abandoned[0];
        assert_eq!(ab.case.id, ids[0]);
        assert_eq!(ab.lost_with, vec!["x".to_string(), "y".to_string()]);
        assert_eq!((ab.agent_id.as_str(), ab.device.uuid.as_str()), ("y", "u9"));
        assert_eq!(lost_with(&s, &ids[1]).len(), 2);
        assert!(lost_with(&s, &ids[3]).is_empty());
        let p = s.progress();
        assert_eq!((p.pending, p.running, p.done), (2, 1, 1), "{p:?}");
        let a = s.register("a".into(), dev("u1", "H100"), t0);
        let mut shards = drain_shards(&mut s, &a, t0);
        shards.sort();
        let mut expected = vec![vec![ids[1].clone()], vec![ids[2].clone()]];
        expected.sort();
        assert_eq!(shards, expected, "the one lost twice runs alone");
        s.commit_abandoned(ab.unit);
        assert!(s.is_finished());
    }

    /// Per-GPU units appear when their GPU's agent registers: their restored losses wait until
    /// then, and land on the unit of the GPU they were lost on only.
    #[test]
    fn restored_losses_of_a_target_not_yet_seen_apply_when_it_appears() {
        let t0 = Instant::now();
        let cs = cases(2);
        let ids: Vec<String> = cs.iter().map(|c| c.id.clone()).collect();
        let mut s = Scheduler::resume(
            SchedulerConfig {
                placement: Placement::PerGpu,
                max_attempts: 1,
                max_shard_cases: 2,
                ..Default::default()
            },
            cs,
            [],
            [],
        );
        s.restore_losses([(ids[0].clone(), loss("x", "u1", LossCause::Alone))]);
        assert!(s.take_abandoned().is_empty(), "no unit of GPU u1 yet");
        let _other = s.register("b".into(), dev("u2", "H100"), t0);
        assert!(s.take_abandoned().is_empty(), "lost on u1, not u2");
        let _a = s.register("a".into(), dev("u1", "H100"), t0);
        let abandoned = s.take_abandoned();
        assert_eq!(abandoned.len(), 1);
        assert_eq!(abandoned[0].case.id, ids[0]);
        assert_eq!(abandoned[0].device.uuid, "u1");
    }

    #[test]
    fn the_status_view_of_a_lease_lists_its_unreported_cases_in_order() {
        let t = Instant::now();
        let mut s = Scheduler::new(cfg(3), cases(3), []);
        let a = s.register("a".into(), dev("u1", "H100"), t);
        let g = grant(s.lease(&a, t).unwrap());
        let id: u64 = g.lease_id.parse().unwrap();
        let ids: Vec<&str> = g.cases.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(s.lease_cases(id), ids);
        let (d, _) = s
            .report(&a, &g.lease_id, &ok_result(&g.cases[0].id), t)
            .unwrap();
        let ReportDecision::Commit { unit, .. } = d else {
            panic!("{d:?}")
        };
        assert_eq!(s.lease_cases(id), ids[1..], "committing: no longer held");
        s.commit(unit, &a, false);
        assert_eq!(s.lease_cases(id), ids[1..]);
        assert!(s.lease_cases(id + 1).is_empty());
    }

    /// A retried failure is not acted on until its journal write is done: meanwhile the unit is
    /// running and a second report of it a duplicate; a failed write counts nothing (the agent
    /// sends the report again and gets the same attempt number); a done write queues the unit.
    #[test]
    fn a_retried_failure_waits_for_its_journal_write() {
        let t = Instant::now();
        let mut s = Scheduler::new(cfg_attempts(1, 3), cases(1), []);
        let a = s.register("a".into(), dev("u1", "H100"), t);
        let b = s.register("b".into(), dev("u2", "H100"), t);
        let g = grant(s.lease(&a, t).unwrap());
        let id = g.cases[0].id.clone();
        let retry = |s: &mut Scheduler| {
            let (d, _) = s.report(&a, &g.lease_id, &failed_result(&id), t).unwrap();
            match d {
                ReportDecision::Retry {
                    unit,
                    attempt,
                    error,
                    errors,
                } => (unit, attempt, error, errors),
                other => panic!("{other:?}"),
            }
        };
        let (unit, attempt, error, errors) = retry(&mut s);
        assert_eq!(attempt, 1);
        assert_eq!(errors.len(), 1);
        assert!(errors[0].starts_with(&format!("attempt 1 on {a} (u1): optimized: ")));
        assert_eq!(error, errors.join("; "));
        assert_eq!(s.progress().running, 1, "running while it is journaled");
        let (d, _) = s.report(&a, &g.lease_id, &failed_result(&id), t).unwrap();
        assert_eq!(d, ReportDecision::Duplicate);
        assert!(matches!(s.lease(&b, t).unwrap(), LeaseDecision::Wait(_)));
        // The journal write failed: nothing counted, the agent sends the report again.
        s.abort_commit(unit);
        let (unit, attempt, _, errors) = retry(&mut s);
        assert_eq!(attempt, 1, "the aborted attempt was not counted");
        s.retry_recorded(unit, &a, errors);
        assert_eq!(s.progress().pending, 1);
        assert!(s.lease_cases(g.lease_id.parse().unwrap()).is_empty());
        // Queued for another agent, which reports attempt 2 and keeps attempt 1's error.
        let g = grant(s.lease(&b, t).unwrap());
        let (d, _) = s.report(&b, &g.lease_id, &failed_result(&id), t).unwrap();
        let ReportDecision::Retry { attempt: 2, .. } = d else {
            panic!("{d:?}")
        };
    }

    /// `agent` leases a shard of one case and reports it failed with attempts left; the retry is
    /// recorded. Returns the case's id and the attempt number the report got.
    fn fail_attempt(s: &mut Scheduler, agent: &str, t: Instant) -> (String, u32) {
        let g = grant(s.lease(agent, t).unwrap());
        let id = g.cases[0].id.clone();
        let (d, _) = s
            .report(agent, &g.lease_id, &failed_result(&id), t)
            .unwrap();
        let ReportDecision::Retry {
            unit,
            attempt,
            errors,
            ..
        } = d
        else {
            panic!("{d:?}")
        };
        s.retry_recorded(unit, agent, errors);
        (id, attempt)
    }

    /// [`fail_attempt`], for the case's id alone.
    fn fail_once(s: &mut Scheduler, agent: &str, t: Instant) -> String {
        fail_attempt(s, agent, t).0
    }

    /// A scheduler resumed under `cfg` with one case and nothing journaled yet, and that case's id
    /// (the failed-attempt tests restore their attempts on it).
    fn resumed_one_case(cfg: SchedulerConfig) -> (Scheduler, String) {
        let cs = cases(1);
        let id = cs[0].id.clone();
        (Scheduler::resume(cfg, cs, [], []), id)
    }

    fn failed_attempt(agent_id: &str, uuid: &str, n: u32) -> FailedAttempt {
        FailedAttempt {
            agent_id: agent_id.into(),
            device: dev(uuid, "H100"),
            errors: vec![format!(
                "attempt {n} on {agent_id} ({uuid}): optimized: before"
            )],
        }
    }

    /// A resumed scheduler counts the journaled failed attempts of a unit: its next attempt
    /// number goes on from them, its final failed record lists their errors first, and it
    /// prefers agents other than those that failed it; a unit with a result ignores them.
    #[test]
    fn restored_failed_attempts_continue_the_count_and_keep_their_errors() {
        let t = Instant::now();
        let cs = cases(2);
        let ids: Vec<String> = cs.iter().map(|c| c.id.clone()).collect();
        let mut s = Scheduler::resume(cfg_attempts(1, 3), cs, [format!("{}|*", ids[1])], []);
        let a = s.register("a".into(), dev("u1", "H100"), t);
        let b = s.register("b".into(), dev("u2", "H100"), t);
        s.restore_failed_attempts([
            (ids[0].clone(), failed_attempt(&a, "u1", 1)),
            (ids[1].clone(), failed_attempt(&a, "u1", 1)),
            (ids[0].clone(), failed_attempt("agent-old", "u0", 2)),
        ]);
        let p = s.progress();
        assert_eq!((p.pending, p.done, p.failed), (1, 1, 0), "{p:?}");
        // a failed it before the restart: b runs it while alive.
        assert!(matches!(s.lease(&a, t).unwrap(), LeaseDecision::Wait(_)));
        let g = grant(s.lease(&b, t).unwrap());
        assert_eq!(g.cases[0].id, ids[0]);
        let (d, _) = s
            .report(&b, &g.lease_id, &failed_result(&ids[0]), t)
            .unwrap();
        let ReportDecision::CommitFailed {
            unit,
            attempt,
            errors,
        } = d
        else {
            panic!("the third attempt in all is the last: {d:?}")
        };
        assert_eq!(attempt, 3);
        assert_eq!(errors.len(), 3);
        assert!(
            errors[0].contains(&format!("attempt 1 on {a}")),
            "{errors:?}"
        );
        assert!(errors[1].contains("attempt 2 on agent-old"), "{errors:?}");
        assert!(
            errors[2].starts_with(&format!("attempt 3 on {b}")),
            "{errors:?}"
        );
        s.commit(unit, &b, true);
        assert!(s.is_finished());
    }

    /// Per-sku: a failed attempt of a target no agent has registered for yet counts once its
    /// first agent registers; one of another target does not count here.
    #[test]
    fn restored_failed_attempts_of_a_target_not_yet_seen_apply_when_it_appears() {
        let t = Instant::now();
        let (mut s, id) = resumed_one_case(cfg_placed(Placement::PerSku, 2));
        s.restore_failed_attempts([
            (id.clone(), failed_attempt("agent-old", "u9", 1)),
            (
                id.clone(),
                FailedAttempt {
                    device: dev("u8", "A100"),
                    ..failed_attempt("agent-older", "u8", 1)
                },
            ),
        ]);
        let a = s.register("a".into(), dev("u1", "H100"), t);
        let g = grant(s.lease(&a, t).unwrap());
        let (d, _) = s.report(&a, &g.lease_id, &failed_result(&id), t).unwrap();
        let ReportDecision::CommitFailed {
            attempt, errors, ..
        } = d
        else {
            panic!("{d:?}")
        };
        assert_eq!(attempt, 2);
        assert!(errors[0].contains("agent-old") && !errors.iter().any(|e| e.contains("older")));
    }

    /// A run resumed with a lower `--max-attempts`: a unit whose journaled failed attempts
    /// already reach it is not run again. It is given up at once, like a unit whose restored
    /// losses reach it, and its failed record says the journaled attempts' errors (not that
    /// agents stopped without reporting); until that record is durable it counts as running.
    #[test]
    fn restored_failed_attempts_reaching_a_lowered_max_attempts_fail_the_case_at_once() {
        let t = Instant::now();
        let cs = cases(2);
        let ids: Vec<String> = cs.iter().map(|c| c.id.clone()).collect();
        let mut s = Scheduler::resume(cfg_attempts(1, 2), cs, [], []);
        s.restore_failed_attempts([
            (ids[0].clone(), failed_attempt("agent-old", "u0", 1)),
            (ids[1].clone(), failed_attempt("agent-old", "u0", 1)),
            (ids[0].clone(), failed_attempt("agent-older", "u9", 2)),
        ]);
        let abandoned = s.take_abandoned();
        assert_eq!(abandoned.len(), 1, "{abandoned:?}");
        let ab = &abandoned[0];
        assert_eq!(ab.case.id, ids[0]);
        assert_eq!(ab.cause, GiveUpCause::AttemptsUsedUp);
        assert_eq!(ab.attempt, 2);
        assert_eq!(
            (ab.agent_id.as_str(), ab.device.uuid.as_str()),
            ("agent-older", "u9"),
            "the record belongs to the unit of its last attempt's device"
        );
        assert!(ab.lost_with.is_empty());
        let why = ab.explanation();
        assert!(
            why.starts_with(
                "failed after 2 attempts: attempt 1 on agent-old (u0): optimized: before | \
                 attempt 2 on agent-older (u9): optimized: before"
            ) && why.contains("--max-attempts 2")
                && !why.contains("stopped without reporting"),
            "{why}"
        );
        let p = s.progress();
        assert_eq!((p.pending, p.running), (1, 1), "{p:?}");
        // No agent ever leases it: only the other case runs.
        let a = s.register("a".into(), dev("u1", "H100"), t);
        assert_eq!(drain_shards(&mut s, &a, t), vec![vec![ids[1].clone()]]);
        assert!(
            !s.is_finished(),
            "not over until the failed record is durable"
        );
        s.commit_abandoned(ab.unit);
        let p = s.progress();
        assert_eq!((p.done, p.failed, p.running), (1, 1, 0), "{p:?}");
        assert!(s.is_finished());
    }

    /// Per-GPU: a unit whose restored failed attempts reach `max_attempts` is given up when its
    /// GPU's agent registers (its unit appears then), and that agent is not handed it.
    #[test]
    fn restored_failed_attempts_of_a_target_not_yet_seen_fail_it_at_once_when_it_appears() {
        let t = Instant::now();
        let (mut s, id) = resumed_one_case(cfg_placed(Placement::PerGpu, 1));
        s.restore_failed_attempts([(id.clone(), failed_attempt("agent-old", "u1", 1))]);
        assert!(s.take_abandoned().is_empty(), "no unit of GPU u1 yet");
        let b = s.register("b".into(), dev("u2", "H100"), t);
        assert!(s.take_abandoned().is_empty(), "failed on u1, not u2");
        let a = s.register("a".into(), dev("u1", "H100"), t);
        let abandoned = s.take_abandoned();
        assert_eq!(abandoned.len(), 1, "{abandoned:?}");
        assert_eq!(abandoned[0].device.uuid, "u1");
        assert!(
            matches!(s.lease(&a, t).unwrap(), LeaseDecision::Wait(_)),
            "given up: not leased again"
        );
        run_to_done(&mut s, &b, t);
        s.commit_abandoned(abandoned[0].unit);
        let p = s.progress();
        assert_eq!((p.done, p.failed), (1, 1), "{p:?}");
        assert!(s.is_finished());
    }

    /// After a restart, the agent ids of the journaled failed attempts are those of the previous
    /// coordinator process and never come back; the device does. A case that failed on GPU u1
    /// before the restart is not retried on u1 (whatever the agent's new id) while an agent of
    /// another GPU is alive.
    #[test]
    fn a_case_failed_before_a_restart_avoids_its_device_not_an_old_agent_id() {
        let t = Instant::now();
        let (mut s, id) = resumed_one_case(cfg_attempts(1, 3));
        s.restore_failed_attempts([(id.clone(), failed_attempt("agent-1-0badc0de", "u1", 1))]);
        let a = s.register("a".into(), dev("u1", "H100"), t);
        let b = s.register("b".into(), dev("u2", "H100"), t);
        assert!(
            matches!(s.lease(&a, t).unwrap(), LeaseDecision::Wait(_)),
            "u1 failed it: not u1 again while u2 is alive"
        );
        let g = grant(s.lease(&b, t).unwrap());
        assert_eq!(g.cases[0].id, id);
    }

    /// The retry preference is per device: a second agent on the GPU that failed a case (or on
    /// the same host's CPU: CPU agents of one host share its uuid) is no other GPU, so it is
    /// passed over while another device is alive; with no other device alive, the device's own
    /// agents retry the case, the one that failed it included, rather than leaving it waiting.
    #[test]
    fn a_failed_case_is_retried_on_another_device_not_another_agent_of_the_same_one() {
        let t = Instant::now();
        let mut s = Scheduler::new(cfg_attempts(1, 3), cases(1), []);
        let a = s.register("a".into(), dev("cpu-1", "cpu"), t);
        let a2 = s.register("a2".into(), dev("cpu-1", "cpu"), t);
        let id = fail_once(&mut s, &a, t);
        // Only agents of cpu-1 are alive: the one that failed it may retry it.
        assert_eq!(fail_attempt(&mut s, &a, t), (id.clone(), 2));
        // Another device is alive: neither agent of cpu-1 gets it, the other device does.
        let c = s.register("c".into(), dev("u2", "H100"), t);
        assert!(matches!(s.lease(&a2, t).unwrap(), LeaseDecision::Wait(_)));
        assert!(matches!(s.lease(&a, t).unwrap(), LeaseDecision::Wait(_)));
        let g = grant(s.lease(&c, t).unwrap());
        assert_eq!(g.cases[0].id, id);
    }

    /// Per-GPU and per-SKU units can only run on their GPU or model: an alive agent of another
    /// target cannot take the retry, so it must not hold it back from the device that failed it
    /// (the run would wait for ever). Another agent of the same model is preferred, per-sku.
    #[test]
    fn a_failed_case_is_retried_on_its_own_target_when_no_other_device_can_run_it() {
        let t = Instant::now();
        let fail_once = |s: &mut Scheduler, agent: &str| fail_once(s, agent, t);
        let mut s = Scheduler::new(cfg_placed(Placement::PerGpu, 3), cases(1), []);
        let a = s.register("a".into(), dev("u1", "H100"), t);
        let _b = s.register("b".into(), dev("u2", "H100"), t);
        let id = fail_once(&mut s, &a);
        let g = grant(s.lease(&a, t).unwrap());
        assert_eq!(g.cases[0].id, id, "only u1 can run u1's unit");

        let mut s = Scheduler::new(cfg_placed(Placement::PerSku, 3), cases(1), []);
        let a = s.register("a".into(), dev("u1", "H100"), t);
        let _b = s.register("b".into(), dev("u2", "A100"), t);
        let id = fail_once(&mut s, &a);
        let g = grant(s.lease(&a, t).unwrap());
        assert_eq!(g.cases[0].id, id, "no other H100 is alive");
        let id = fail_once(&mut s, &a);
        let c = s.register("c".into(), dev("u3", "H100"), t);
        assert!(matches!(s.lease(&a, t).unwrap(), LeaseDecision::Wait(_)));
        let g = grant(s.lease(&c, t).unwrap());
        assert_eq!(g.cases[0].id, id, "another H100 is alive: it retries it");
    }

    /// A final failure whose record could not be made durable is not counted
    /// ([`Scheduler::abort_commit`]): the agent sends the same report again, and the failed
    /// record lists its error once, under the same attempt number.
    #[test]
    fn an_aborted_final_failure_is_not_counted_twice() {
        let t = Instant::now();
        let mut s = Scheduler::new(cfg_attempts(1, 1), cases(1), []);
        let a = s.register("a".into(), dev("u1", "H100"), t);
        let _b = s.register("b".into(), dev("u2", "H100"), t);
        let g = grant(s.lease(&a, t).unwrap());
        let id = g.cases[0].id.clone();
        let (d, _) = s.report(&a, &g.lease_id, &failed_result(&id), t).unwrap();
        let ReportDecision::CommitFailed { unit, errors, .. } = d else {
            panic!("{d:?}")
        };
        assert_eq!(errors.len(), 1);
        s.abort_commit(unit);
        let (d, _) = s.report(&a, &g.lease_id, &failed_result(&id), t).unwrap();
        let ReportDecision::CommitFailed {
            unit,
            attempt,
            errors,
        } = d
        else {
            panic!("{d:?}")
        };
        assert_eq!((attempt, errors.len()), (1, 1), "{errors:?}");
        s.commit(unit, &a, true);
        assert!(s.is_finished());
    }

    #[test]
    fn failed_case_retries_elsewhere_then_records_every_error() {
        let t = Instant::now();
        let mut s = Scheduler::new(cfg_attempts(1, 2), cases(1), []);
        let a = s.register("a".into(), dev("u1", "H100"), t);
        let b = s.register("b".into(), dev("u2", "H100"), t);
        assert_eq!(fail_attempt(&mut s, &a, t).1, 1);
        // a failed it, so a is not offered it again while b is alive.
        assert!(matches!(s.lease(&a, t).unwrap(), LeaseDecision::Wait(_)));
        let g = grant(s.lease(&b, t).unwrap());
        let (d, _) = s
            .report(&b, &g.lease_id, &failed_result(&g.cases[0].id), t)
            .unwrap();
        let ReportDecision::CommitFailed { unit, errors, .. } = d else {
            panic!("{d:?}")
        };
        assert_eq!(errors.len(), 2);
        assert!(errors[0].contains("agent-1") && errors[1].contains("agent-2"));
        s.commit(unit, &b, true);
        let p = s.progress();
        assert_eq!((p.done, p.failed), (0, 1));
        assert!(s.is_finished());
    }

    #[test]
    fn per_sku_runs_each_case_on_each_model_and_waits_for_fleet() {
        let t = Instant::now();
        let mut s = Scheduler::new(
            SchedulerConfig {
                placement: Placement::PerSku,
                fleet: FleetRequirement {
                    expect_agents: 3,
                    ..Default::default()
                },
                ..Default::default()
            },
            cases(4),
            [],
        );
        let a = s.register("a".into(), dev("u1", "H100"), t);
        assert!(matches!(s.lease(&a, t).unwrap(), LeaseDecision::Wait(_)));
        let b = s.register("b".into(), dev("u2", "H100"), t);
        let c = s.register("c".into(), dev("u3", "A100"), t);
        run_to_done(&mut s, &a, t);
        // b has the same SKU as a: nothing left for it.
        assert!(matches!(s.lease(&b, t).unwrap(), LeaseDecision::Wait(_)));
        run_to_done(&mut s, &c, t);
        let p = s.progress();
        assert_eq!((p.total, p.done), (8, 8));
        assert!(p.finished);
    }

    #[test]
    fn per_gpu_runs_each_case_on_each_gpu() {
        let t = Instant::now();
        let mut s = Scheduler::new(
            SchedulerConfig {
                placement: Placement::PerGpu,
                fleet: FleetRequirement {
                    expect_agents: 2,
                    ..Default::default()
                },
                ..Default::default()
            },
            cases(3),
            [],
        );
        let a = s.register("a".into(), dev("u1", "H100"), t);
        let b = s.register("b".into(), dev("u2", "H100"), t);
        run_to_done(&mut s, &a, t);
        run_to_done(&mut s, &b, t);
        assert_eq!(s.progress().done, 6);
    }

    /// The fleet requirement gates the start only: once met, losing an agent (gone silent, or
    /// leaving on a signal) must not stall the others (QA: a run stuck forever at 18 of 20).
    #[test]
    fn an_agent_lost_after_the_start_does_not_stall_the_fleet() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(
            SchedulerConfig {
                max_shard_cases: 1,
                fleet: FleetRequirement {
                    expect_agents: 3,
                    ..Default::default()
                },
                ..Default::default()
            },
            cases(6),
            [],
        );
        let a = s.register("a".into(), dev("u1", "H100"), t0);
        let b = s.register("b".into(), dev("u2", "H100"), t0);
        assert!(matches!(s.lease(&a, t0).unwrap(), LeaseDecision::Wait(_)));
        let c = s.register("c".into(), dev("u3", "H100"), t0);
        grant(s.lease(&a, t0).unwrap());
        s.leave(&b, t0).unwrap();
        // c goes silent past the lease timeout; a alone finishes the grid.
        let t1 = t0 + DEFAULT_LEASE_TIMEOUT + Duration::from_secs(1);
        let _ = c;
        s.expire(t1);
        run_to_done(&mut s, &a, t1);
        let p = s.progress();
        assert_eq!((p.done, p.agents_alive), (6, 1), "{p:?}");
        assert!(p.finished);
    }

    /// With a fleet timeout, a fleet that stays short (an agent that can never start) does not
    /// hold the run forever: once the timeout has passed, the agents present get work; before it,
    /// they wait. An agent that registers later still gets work.
    #[test]
    fn a_fleet_timeout_dispatches_to_the_agents_present() {
        let mut s = Scheduler::new(
            SchedulerConfig {
                max_shard_cases: 1,
                fleet: FleetRequirement {
                    expect_agents: 3,
                    wait_for: vec![("H100".into(), 3)],
                    timeout: Some(Duration::from_secs(60)),
                },
                ..Default::default()
            },
            cases(4),
            [],
        );
        let t0 = Instant::now();
        let a = s.register("a".into(), dev("u1", "H100"), t0);
        assert_eq!(
            s.fleet_shortfall(),
            "1 of 3 agents; H100: 1 of 3",
            "the warning names what is missing"
        );
        let before = t0 + Duration::from_secs(30);
        assert!(matches!(
            s.lease(&a, before).unwrap(),
            LeaseDecision::Wait(_)
        ));
        let (short, left) = s.fleet_waiting(before).expect("still waiting");
        assert_eq!(short, "1 of 3 agents; H100: 1 of 3");
        let left = left.expect("a timeout is set");
        assert!(
            left <= Duration::from_secs(30) && left >= Duration::from_secs(29),
            "{left:?}"
        );
        let after = t0 + Duration::from_secs(61);
        grant(s.lease(&a, after).unwrap());
        assert_eq!(s.fleet_waiting(after), None, "work is handed out");
        let b = s.register("b".into(), dev("u2", "H100"), after);
        grant(s.lease(&b, after).unwrap());
        // Without a timeout the same fleet waits however long it takes.
        let mut patient = Scheduler::new(
            SchedulerConfig {
                fleet: FleetRequirement {
                    expect_agents: 3,
                    ..Default::default()
                },
                ..Default::default()
            },
            cases(4),
            [],
        );
        let lone = patient.register("a".into(), dev("u1", "H100"), t0);
        let much_later = t0 + Duration::from_secs(86_400);
        assert!(matches!(
            patient.lease(&lone, much_later).unwrap(),
            LeaseDecision::Wait(_)
        ));
        assert_eq!(
            patient.fleet_waiting(much_later),
            Some(("1 of 3 agents".to_string(), None))
        );
    }

    #[test]
    fn resume_skips_units_already_done() {
        let t = Instant::now();
        let cs = cases(5);
        let done = vec![format!("{}|*", cs[0].id), format!("{}|*", cs[3].id)];
        let mut s = Scheduler::new(cfg(8), cs, done);
        let a = s.register("a".into(), dev("u1", "H100"), t);
        let g = grant(s.lease(&a, t).unwrap());
        assert_eq!(g.cases.len(), 3);
    }

    #[test]
    fn resume_counts_replayed_failures_as_failed() {
        let t = Instant::now();
        let cs = cases(4);
        let done = vec![format!("{}|*", cs[0].id), format!("{}|*", cs[1].id)];
        let failed = vec![format!("{}|*", cs[1].id)];
        let mut s = Scheduler::resume(cfg(8), cs, done, failed);
        let p = s.progress();
        assert_eq!((p.total, p.pending, p.done, p.failed), (4, 2, 1, 1));
        let a = s.register("a".into(), dev("u1", "H100"), t);
        run_to_done(&mut s, &a, t);
        let p = s.progress();
        assert_eq!((p.done, p.failed), (3, 1));
        assert!(p.finished && s.unfinished().is_empty());
    }

    fn awaiting(s: &Scheduler) -> BTreeSet<String> {
        s.awaiting_drain().map(|a| a.name.clone()).collect()
    }

    /// The drain's rule: every agent that registered is waited for until it has heard "drain".
    /// One registered before the drain hears it at its next Lease; one that registers during the
    /// drain is told in the Register answer (`run_over`) and is waited for until it says it
    /// leaves (this release) or asks for work (an older agent, which ignores that answer).
    #[test]
    fn every_agent_registered_is_awaited_until_it_has_heard_the_drain() {
        let t = Instant::now();
        let mut s = Scheduler::new(cfg(4), cases(4), []);
        let a = s.register("a".into(), dev("u1", "H100"), t);
        assert!(!s.run_over(), "work is left: a registration gets work");
        let g = grant(s.lease(&a, t).unwrap());
        report_all_ok(&mut s, &a, &g, t);
        // The grid is complete: a registration now is told so, even before the drain starts.
        let early = s.register("early".into(), dev("u2", "H100"), t);
        assert!(s.run_over());
        s.start_drain();
        assert_eq!(awaiting(&s), BTreeSet::from(["a".into(), "early".into()]));
        assert_eq!(s.lease(&a, t).unwrap(), LeaseDecision::Drain);
        s.leave(&early, t).unwrap();
        assert!(awaiting(&s).is_empty());

        // Registrations during the drain are told, and awaited until they have taken it in.
        let new = s.register("new".into(), dev("u3", "H100"), t);
        assert!(s.run_over());
        let old = s.register("old".into(), dev("u4", "H100"), t);
        assert_eq!(awaiting(&s), BTreeSet::from(["new".into(), "old".into()]));
        s.leave(&new, t).unwrap();
        assert_eq!(s.lease(&old, t).unwrap(), LeaseDecision::Drain);
        assert!(awaiting(&s).is_empty());
        let p = s.progress();
        assert_eq!((p.total, p.done, p.agents_alive), (4, 4, 0));
        assert!(p.finished);
    }

    /// A GPU that joins a per-gpu run as it drains gets no units: the complete run stays complete
    /// (it used to end with that GPU's whole grid unfinished, exit code 2). Before the drain, a
    /// new GPU still gets its own units and is not told that the run is over.
    #[test]
    fn a_gpu_registering_during_the_drain_adds_no_units() {
        let t = Instant::now();
        let per_gpu = SchedulerConfig {
            placement: Placement::PerGpu,
            ..Default::default()
        };
        let mut s = Scheduler::new(per_gpu.clone(), cases(3), []);
        let a = s.register("a".into(), dev("u1", "H100"), t);
        run_to_done(&mut s, &a, t);
        assert!(s.progress().finished);
        let mut serving = Scheduler::new(per_gpu, cases(3), []);
        let a2 = serving.register("a".into(), dev("u1", "H100"), t);
        run_to_done(&mut serving, &a2, t);
        serving.register("b".into(), dev("u2", "H100"), t);
        assert!(
            !serving.run_over(),
            "a new GPU before the drain has its own cases to run"
        );
        assert_eq!(serving.progress().total, 6);

        s.start_drain();
        let b = s.register("b".into(), dev("u2", "H100"), t);
        assert!(s.run_over());
        let p = s.progress();
        assert_eq!((p.total, p.done), (3, 3), "{p:?}");
        assert!(p.finished && s.unfinished().is_empty());
        assert_eq!(s.lease(&b, t).unwrap(), LeaseDecision::Drain);
    }

    #[test]
    fn release_hands_back_unfinished_cases() {
        let t = Instant::now();
        let mut s = Scheduler::new(cfg(4), cases(4), []);
        let a = s.register("a".into(), dev("u1", "H100"), t);
        let g = grant(s.lease(&a, t).unwrap());
        let (d, _) = s
            .report(&a, &g.lease_id, &ok_result(&g.cases[0].id), t)
            .unwrap();
        let ReportDecision::Commit { unit, .. } = d else {
            panic!()
        };
        s.commit(unit, &a, false);
        assert_eq!(s.release(&a, &g.lease_id, t).unwrap(), 3);
        assert_eq!(s.progress().pending, 3);
    }

    #[test]
    fn unknown_ids_are_errors() {
        let t = Instant::now();
        let mut s = Scheduler::new(cfg(4), cases(1), []);
        assert!(matches!(
            s.lease("nobody", t),
            Err(ScheduleError::UnknownAgent(_))
        ));
        let a = s.register("a".into(), dev("u1", "H100"), t);
        assert!(matches!(
            s.heartbeat(&a, "not-a-number", "", t),
            Err(ScheduleError::UnknownLease(_))
        ));
        assert!(matches!(
            s.report(&a, "1", &ok_result("feedfeedfeedfeed"), t),
            Err(ScheduleError::UnknownCase { .. })
        ));
    }
}
