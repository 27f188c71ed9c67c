//! The gRPC service: the network edge of the coordinator.
//!
//! Every request is authenticated (when a token is configured), bounded and converted to domain
//! types here; the [`Scheduler`] decides; results, and failed attempts queued for another try,
//! are made durable by the journal writer before they are acknowledged. Errors map to gRPC codes
//! in one place ([`status_of`]).

use crate::metrics::Metrics;
use crate::record::{FailedAttemptRecord, ResultRecord};
use crate::scheduler::{
    failed_after, AbandonedUnit, LeaseDecision, ReportDecision, ScheduleError, Scheduler,
};
use decodebench_kernels::{CaseMeasurement, Status as KernelStatus};
use decodebench_proto::{wire, PROTOCOL_VERSION};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot, Notify};
use tonic::{Request, Response, Status};

/// Largest gRPC message accepted. A report carries at most a few thousand samples; 4 MiB leaves
/// room and keeps a hostile client from making the coordinator allocate much.
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;
/// Longest string accepted in an identifier or name field.
pub const MAX_NAME_LEN: usize = 256;
/// Longest free-text message accepted (kernel error text, compiler logs are cut to this).
pub const MAX_MESSAGE_LEN: usize = 16 * 1024;
/// Most samples accepted per kernel measurement.
pub const MAX_SAMPLES: usize = 100_000;

/// Why a result could not be made durable.
#[derive(Debug, Clone)]
pub struct DurabilityError {
    pub message: String,
    /// Sending the same result again cannot help (it cannot be encoded); otherwise it is an I/O
    /// problem the agent should retry.
    pub permanent: bool,
}

/// What waits to be made durable before a report is answered, and who to tell when it is.
pub enum JournalJob {
    /// A result. The record comes back with the answer, so the handler keeps it without a copy.
    Result {
        record: ResultRecord,
        done: oneshot::Sender<(ResultRecord, Result<(), DurabilityError>)>,
    },
    /// A failed attempt the scheduler queues for another try ([`ReportDecision::Retry`]).
    FailedAttempt {
        attempt: FailedAttemptRecord,
        done: oneshot::Sender<Result<(), DurabilityError>>,
    },
}

/// State shared by the gRPC handlers, the ticker and the run loop.
pub struct Shared {
    pub scheduler: Mutex<Scheduler>,
    pub records: Mutex<Vec<ResultRecord>>,
    pub journal: mpsc::Sender<JournalJob>,
    pub run_id: String,
    pub git_revision: String,
    pub started: Instant,
    pub metrics: Metrics,
    /// Woken whenever progress changes (a result lands, an agent registers).
    pub changed: Notify,
}

impl Shared {
    pub fn scheduler(&self) -> MutexGuard<'_, Scheduler> {
        // A panic while holding the lock is a bug; keep serving rather than cascade it.
        self.scheduler.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn records(&self) -> MutexGuard<'_, Vec<ResultRecord>> {
        self.records.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The one mapping from scheduler errors to gRPC status codes.
pub fn status_of(e: ScheduleError) -> Status {
    match e {
        ScheduleError::UnknownAgent(_) => Status::not_found(e.to_string()),
        ScheduleError::UnknownLease(_) => Status::not_found(e.to_string()),
        ScheduleError::UnknownCase { .. } => Status::invalid_argument(e.to_string()),
    }
}

fn check_name(field: &str, v: &str) -> Result<(), Status> {
    if v.len() > MAX_NAME_LEN {
        return Err(Status::invalid_argument(format!(
            "{field} is {} bytes long; at most {MAX_NAME_LEN} are accepted",
            v.len()
        )));
    }
    Ok(())
}

fn check_id(field: &str, v: &str) -> Result<(), Status> {
    check_name(field, v)?;
    if v.is_empty() {
        return Err(Status::invalid_argument(format!("{field} is empty")));
    }
    Ok(())
}

fn now_unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[derive(Clone)]
pub struct CoordinatorService {
    pub shared: Arc<Shared>,
}

/// Why a measurement is too large to take (more than [`MAX_SAMPLES`] samples or a message over
/// [`MAX_MESSAGE_LEN`] bytes in a kernel), naming the kernel; `None` when it is not.
fn oversized(m: &wire::CaseMeasurement) -> Option<String> {
    m.kernels.iter().find_map(|k| {
        let kernel = wire::KernelKind::try_from(k.kernel).map_or_else(
            |_| format!("kernel {}", k.kernel),
            |kind| format!("{kind:?}").to_lowercase(),
        );
        if k.samples_ms.len() > MAX_SAMPLES {
            Some(format!(
                "the {kernel} kernel's measurement carries {} samples; at most {MAX_SAMPLES} are \
                 accepted: cap the trials (--max-trials)",
                k.samples_ms.len()
            ))
        } else if k.message.len() > MAX_MESSAGE_LEN {
            Some(format!(
                "the {kernel} kernel's message is {} bytes; at most {MAX_MESSAGE_LEN} are \
                 accepted: cut it",
                k.message.len()
            ))
        } else {
            None
        }
    })
}

/// Hands `job` to the journal writer (its answer comes on the job's channel).
async fn send_job(shared: &Shared, job: JournalJob) -> Result<(), Status> {
    shared
        .journal
        .send(job)
        .await
        .map_err(|_| Status::unavailable("the coordinator is shutting down; retry later"))
}

/// The answer to an agent whose report (`what` it asked to record) was not made durable: `e`, the
/// journal's error, or `None` when the writer stopped; `outcome` says what became of it and what
/// the agent should do.
fn not_durable(what: &str, outcome: &str, e: Option<DurabilityError>) -> Status {
    match e {
        Some(e) if e.permanent => {
            Status::invalid_argument(format!("{what} cannot be recorded: {}", e.message))
        }
        Some(e) => Status::unavailable(format!(
            "could not write {what} to the journal ({}); it {outcome}",
            e.message
        )),
        None => Status::unavailable(format!("the journal writer stopped; {what} {outcome}")),
    }
}

/// Hands `record` to the journal writer and waits until it is on disk; returns it back.
async fn make_durable(shared: &Shared, record: ResultRecord) -> Result<ResultRecord, Status> {
    let (tx, rx) = oneshot::channel();
    send_job(shared, JournalJob::Result { record, done: tx }).await?;
    let outcome = "was not recorded, send it again";
    match rx.await {
        Ok((record, Ok(()))) => Ok(record),
        Ok((_, Err(e))) => Err(not_durable("the result", outcome, Some(e))),
        Err(_) => Err(not_durable("the result", outcome, None)),
    }
}

/// Hands a failed attempt to the journal writer and waits until it is on disk; the error says
/// what the agent should do (send the report again, as for a result that was not recorded).
async fn make_attempt_durable(shared: &Shared, attempt: FailedAttemptRecord) -> Result<(), Status> {
    let (tx, rx) = oneshot::channel();
    send_job(shared, JournalJob::FailedAttempt { attempt, done: tx }).await?;
    let outcome = "was not counted, send the result again";
    match rx.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(not_durable("the failed attempt", outcome, Some(e))),
        Err(_) => Err(not_durable("the failed attempt", outcome, None)),
    }
}

/// Records the failed result of every unit the scheduler gave up on since the last call (agents
/// kept dying with it, or, on resume, its journaled failed attempts already reach
/// `--max-attempts`; see [`AbandonedUnit`]): journaled like any result, so that a resumed run
/// keeps it and `--retry-failed` runs it again. A unit whose record cannot be written yet stays
/// with the scheduler for the next call.
pub async fn record_abandoned(shared: &Shared) {
    let abandoned = shared.scheduler().take_abandoned();
    for a in abandoned {
        let record = abandoned_record(shared, &a);
        match make_durable(shared, record).await {
            Ok(record) => {
                shared.scheduler().commit_abandoned(a.unit);
                shared.records().push(record);
                shared.metrics.failed.inc();
                shared.changed.notify_waiters();
            }
            Err(e) => {
                tracing::error!(
                    case = %a.case.id,
                    error = %e.message(),
                    "could not record the failure of {}; trying again at the next tick (the case \
                     stays out of play meanwhile)",
                    a.cause.describe()
                );
                shared.scheduler().return_abandoned(a);
            }
        }
    }
}

/// The failed result of an abandoned unit: the schema of any result, with the agent of its last
/// try (last lost with, or last failed on) as its agent and device, and the explanation as every
/// kernel's message.
fn abandoned_record(shared: &Shared, a: &AbandonedUnit) -> ResultRecord {
    ResultRecord {
        run_id: shared.run_id.clone(),
        agent_id: a.agent_id.clone(),
        attempt: a.attempt,
        received_unix_ms: now_unix_ms(),
        git_revision: shared.git_revision.clone(),
        case: a.case.clone(),
        device: a.device.clone(),
        measurement: ResultRecord::unreported_measurement(&a.case, &a.explanation()),
    }
}

#[tonic::async_trait]
impl wire::coordinator_server::Coordinator for CoordinatorService {
    async fn register(
        &self,
        request: Request<wire::RegisterRequest>,
    ) -> Result<Response<wire::RegisterResponse>, Status> {
        let t = Instant::now();
        let req = request.into_inner();
        if req.protocol_version != PROTOCOL_VERSION {
            return Err(Status::failed_precondition(format!(
                "protocol version mismatch: agent speaks decodebench.v{} ({}), coordinator speaks \
                 decodebench.v{PROTOCOL_VERSION}; run the same decodebench release on both",
                req.protocol_version, req.agent_version
            )));
        }
        check_name("agent_name", &req.agent_name)?;
        check_name("agent_version", &req.agent_version)?;
        let device = req.device.ok_or_else(|| {
            Status::invalid_argument("device is missing: say what the agent runs on")
        })?;
        for (f, v) in [
            ("device.uuid", &device.uuid),
            ("device.sku", &device.sku),
            ("device.backend", &device.backend),
        ] {
            check_id(f, v)?;
        }
        for (f, v) in [("device.name", &device.name), ("device.host", &device.host)] {
            check_name(f, v)?;
        }
        let device: decodebench_kernels::DeviceIdentity = device.into();
        // Registered and told whether the run is over under one lock: a drain that starts after
        // this finds the agent registered and waits for it to hear the order; one that started
        // before is in this answer.
        let (agent_id, cfg, drain) = {
            let mut s = self.shared.scheduler();
            let id = s.register(req.agent_name.clone(), device.clone(), Instant::now());
            (id, s.config().clone(), s.run_over())
        };
        let what = if drain {
            "agent registered as the run ends: told to drain"
        } else {
            "agent registered"
        };
        tracing::info!(
            agent = %agent_id,
            name = %req.agent_name,
            device = %device.name,
            uuid = %device.uuid,
            "{what}"
        );
        self.shared.changed.notify_waiters();
        self.shared.metrics.observe_rpc("register", t.elapsed());
        Ok(Response::new(wire::RegisterResponse {
            agent_id,
            protocol_version: PROTOCOL_VERSION,
            run_id: self.shared.run_id.clone(),
            heartbeat_interval_ms: cfg.heartbeat_interval.as_millis() as u32,
            lease_timeout_ms: cfg.lease_timeout.as_millis() as u32,
            drain,
        }))
    }

    async fn lease(
        &self,
        request: Request<wire::LeaseRequest>,
    ) -> Result<Response<wire::LeaseResponse>, Status> {
        let t = Instant::now();
        let req = request.into_inner();
        check_id("agent_id", &req.agent_id)?;
        let (decision, timeout) = {
            let mut s = self.shared.scheduler();
            let d = s.lease(&req.agent_id, Instant::now()).map_err(status_of)?;
            (d, s.config().lease_timeout)
        };
        let action = match decision {
            LeaseDecision::Shard(g) => {
                self.shared.metrics.leases_granted.inc();
                wire::lease_response::Action::Shard(wire::Shard {
                    lease_id: g.lease_id,
                    cases: g.cases.iter().map(Into::into).collect(),
                    lease_timeout_ms: timeout.as_millis() as u32,
                })
            }
            LeaseDecision::Wait(d) => wire::lease_response::Action::WaitMs(d.as_millis() as u32),
            LeaseDecision::Drain => wire::lease_response::Action::Drain(true),
        };
        self.shared.metrics.observe_rpc("lease", t.elapsed());
        Ok(Response::new(wire::LeaseResponse {
            action: Some(action),
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<wire::HeartbeatRequest>,
    ) -> Result<Response<wire::HeartbeatResponse>, Status> {
        let t = Instant::now();
        let req = request.into_inner();
        check_id("agent_id", &req.agent_id)?;
        check_name("lease_id", &req.lease_id)?;
        check_name("current_case_id", &req.current_case_id)?;
        // The case it names is the one charged if the agent dies holding this lease.
        let (lease_valid, drain) = self
            .shared
            .scheduler()
            .heartbeat(
                &req.agent_id,
                &req.lease_id,
                &req.current_case_id,
                Instant::now(),
            )
            .map_err(status_of)?;
        self.shared.metrics.observe_rpc("heartbeat", t.elapsed());
        Ok(Response::new(wire::HeartbeatResponse {
            lease_valid,
            drain,
        }))
    }

    async fn report(
        &self,
        request: Request<wire::ReportRequest>,
    ) -> Result<Response<wire::ReportResponse>, Status> {
        let t = Instant::now();
        let req = request.into_inner();
        check_id("agent_id", &req.agent_id)?;
        check_name("lease_id", &req.lease_id)?;
        let wire_m = req
            .measurement
            .ok_or_else(|| Status::invalid_argument("measurement is missing"))?;
        check_id("measurement.case_id", &wire_m.case_id)?;
        let case_id = wire_m.case_id.clone();
        let m = match oversized(&wire_m).map_or_else(
            || CaseMeasurement::try_from(wire_m).map_err(|e| e.to_string()),
            Err,
        ) {
            Ok(m) => m,
            Err(why) => {
                self.refused(&req.agent_id, &req.lease_id, &case_id, &why)
                    .await;
                return Err(Status::invalid_argument(why));
            }
        };
        let (accepted, lease_valid, drain) = self
            .commit_detached(req.agent_id.clone(), req.lease_id.clone(), m)
            .await?;
        self.shared.metrics.observe_rpc("report", t.elapsed());
        Ok(Response::new(wire::ReportResponse {
            accepted,
            lease_valid,
            drain,
        }))
    }

    async fn release(
        &self,
        request: Request<wire::ReleaseRequest>,
    ) -> Result<Response<wire::ReleaseResponse>, Status> {
        let req = request.into_inner();
        check_id("agent_id", &req.agent_id)?;
        check_name("reason", &req.reason)?;
        let now = Instant::now();
        let n = {
            let mut s = self.shared.scheduler();
            // A leaving agent with no lease sends none.
            let n = if req.leaving && req.lease_id.is_empty() {
                0
            } else {
                check_id("lease_id", &req.lease_id)?;
                s.release(&req.agent_id, &req.lease_id, now)
                    .map_err(status_of)?
            };
            if req.leaving {
                s.leave(&req.agent_id, now).map_err(status_of)?;
            }
            n
        };
        tracing::info!(agent = %req.agent_id, returned = n, reason = %req.reason, "lease released");
        self.shared.changed.notify_waiters();
        Ok(Response::new(wire::ReleaseResponse { cases_returned: n }))
    }

    async fn status(
        &self,
        _request: Request<wire::StatusRequest>,
    ) -> Result<Response<wire::StatusResponse>, Status> {
        Ok(Response::new(status_snapshot(&self.shared)))
    }
}

/// Progress as the Status RPC reports it.
pub fn status_snapshot(shared: &Shared) -> wire::StatusResponse {
    let s = shared.scheduler();
    let p = s.progress();
    let elapsed = shared.started.elapsed().as_secs_f64();
    let mut agents: Vec<wire::AgentStatus> = s
        .agents()
        .map(|a| wire::AgentStatus {
            agent_id: a.id.clone(),
            name: a.name.clone(),
            sku: a.device.sku.clone(),
            uuid: a.device.uuid.clone(),
            alive: !a.drained && a.last_seen.elapsed() <= s.config().lease_timeout,
            results: a.results,
            current_lease: a.lease.map(|l| l.to_string()).unwrap_or_default(),
            lease_case_ids: a
                .lease
                .map(|l| s.lease_cases(l).into_iter().map(str::to_string).collect())
                .unwrap_or_default(),
        })
        .collect();
    agents.sort_by(|a, b| a.agent_id.cmp(&b.agent_id));
    let (fleet_waiting, fleet_timeout_left_s) = match s.fleet_waiting(Instant::now()) {
        Some((short, left)) => (short, left.map(|d| d.as_secs_f64())),
        None => (String::new(), None),
    };
    wire::StatusResponse {
        run_id: shared.run_id.clone(),
        total: p.total,
        pending: p.pending,
        running: p.running,
        done: p.done,
        failed: p.failed,
        agents_alive: p.agents_alive,
        leases_expired: p.leases_expired,
        elapsed_s: elapsed,
        results_per_s: if elapsed > 0.0 {
            (p.done + p.failed) as f64 / elapsed
        } else {
            0.0
        },
        finished: p.finished,
        placement: s.config().placement.to_string(),
        agents,
        fleet_waiting,
        fleet_timeout_left_s,
    }
}

impl CoordinatorService {
    /// [`Self::commit_report`] in a task of its own. tonic drops a call's handler when its client
    /// goes away (an agent killed, a timeout), and a commit cut off between the scheduler's
    /// decision and the journal's answer would leave the case neither committed nor queued: the
    /// run would never end. A detached commit runs to its end whatever happens to the call.
    async fn commit_detached(
        &self,
        agent_id: String,
        lease_id: String,
        m: CaseMeasurement,
    ) -> Result<(bool, bool, bool), Status> {
        let svc = self.clone();
        tokio::spawn(async move { svc.commit_report(&agent_id, &lease_id, m).await })
            .await
            .map_err(|e| Status::internal(format!("committing the result failed: {e}")))?
    }

    /// Takes a well-formed result for a case of `lease_id`: commits it (journal first), or queues
    /// the case for another attempt. Returns (accepted, lease still valid, drain).
    async fn commit_report(
        &self,
        agent_id: &str,
        lease_id: &str,
        m: CaseMeasurement,
    ) -> Result<(bool, bool, bool), Status> {
        let (decision, lease_valid, case, device, drain) = {
            let mut s = self.shared.scheduler();
            let (d, valid) = s
                .report(agent_id, lease_id, &m, Instant::now())
                .map_err(status_of)?;
            let (case, device) = match &d {
                ReportDecision::Commit { unit, .. }
                | ReportDecision::CommitFailed { unit, .. }
                | ReportDecision::Retry { unit, .. } => (
                    s.unit_case(*unit).cloned(),
                    s.agent(agent_id).map(|a| a.device.clone()),
                ),
                ReportDecision::Duplicate => (None, None),
            };
            let drain = s.is_finished() || s.draining();
            (d, valid, case, device, drain)
        };

        let accepted = match decision {
            ReportDecision::Duplicate => {
                self.shared.metrics.duplicates.inc();
                false
            }
            ReportDecision::Retry {
                unit,
                attempt,
                error,
                errors,
            } => {
                let (Some(case), Some(device)) = (case, device) else {
                    return Err(Status::internal(
                        "scheduler lost the case or agent of a unit",
                    ));
                };
                // Durable before the answer, as a result is: a restarted coordinator goes on
                // counting the case's attempts, and its final failed record keeps this error.
                let event = FailedAttemptRecord {
                    run_id: self.shared.run_id.clone(),
                    case_id: case.id.clone(),
                    agent_id: agent_id.to_string(),
                    device,
                    attempt,
                    errors: errors.clone(),
                    failed_unix_ms: now_unix_ms(),
                };
                if let Err(e) = make_attempt_durable(&self.shared, event).await {
                    self.shared.scheduler().abort_commit(unit);
                    tracing::error!(
                        case = %case.id,
                        agent = %agent_id,
                        attempt,
                        error = %e.message(),
                        "could not journal a failed attempt of this case: the report is not \
                         acknowledged and the attempt not counted; the agent sends it again"
                    );
                    return Err(e);
                }
                self.shared
                    .scheduler()
                    .retry_recorded(unit, agent_id, errors);
                tracing::warn!(case = %m.case_id, attempt, %error, "case failed; journaled and queued for another attempt");
                self.shared.metrics.retries.inc();
                self.shared.changed.notify_waiters();
                true
            }
            ReportDecision::Commit { unit, attempt }
            | ReportDecision::CommitFailed { unit, attempt, .. } => {
                let failed_errors = match &decision {
                    ReportDecision::CommitFailed { errors, .. } => Some(errors.clone()),
                    _ => None,
                };
                let (Some(case), Some(device)) = (case, device) else {
                    return Err(Status::internal(
                        "scheduler lost the case or agent of a unit",
                    ));
                };
                let mut measurement = m;
                if let Some(errors) = &failed_errors {
                    for k in measurement.kernels.iter_mut() {
                        if k.status == Some(KernelStatus::Failed) {
                            k.message = failed_after(attempt, errors);
                        }
                    }
                }
                let record = ResultRecord {
                    run_id: self.shared.run_id.clone(),
                    agent_id: agent_id.to_string(),
                    attempt,
                    received_unix_ms: now_unix_ms(),
                    git_revision: self.shared.git_revision.clone(),
                    case,
                    device,
                    measurement,
                };
                let record = match make_durable(&self.shared, record).await {
                    Ok(r) => r,
                    Err(e) => {
                        self.shared.scheduler().abort_commit(unit);
                        return Err(e);
                    }
                };
                self.shared
                    .scheduler()
                    .commit(unit, agent_id, failed_errors.is_some());
                self.shared.records().push(record);
                if failed_errors.is_some() {
                    self.shared.metrics.failed.inc();
                } else {
                    self.shared.metrics.results.inc();
                }
                self.shared.changed.notify_waiters();
                true
            }
        };
        Ok((accepted, lease_valid, drain))
    }

    /// A result that could not be taken (a timing no timer produces, a malformed field) is still
    /// an outcome of the case: when the case is on this agent's lease without a result, it counts
    /// as a failed attempt with the refusal as its message. Without this, the lease's return
    /// would hand the case out again and again and the run would never end; with it, a
    /// repeatable agent bug ends as a failed case after `--max-attempts`, saying why. Anything
    /// else (an unknown lease, a case not on it, one already reported) changes nothing.
    async fn refused(&self, agent_id: &str, lease_id: &str, case_id: &str, why: &str) {
        let case = self.shared.scheduler().case(case_id).cloned();
        let Some(case) = case else {
            tracing::warn!(agent = %agent_id, case = %case_id, %why, "refused a result for a case not in the grid");
            return;
        };
        let failed = ResultRecord::unreported_measurement(
            &case,
            &format!("the coordinator refused this agent's result: {why}"),
        );
        match self
            .commit_detached(agent_id.to_string(), lease_id.to_string(), failed)
            .await
        {
            Ok(_) => tracing::warn!(
                agent = %agent_id,
                case = %case_id,
                %why,
                "refused a result; counted as a failed attempt of the case"
            ),
            Err(s) => tracing::warn!(
                agent = %agent_id,
                case = %case_id,
                %why,
                not_counted = %s.message(),
                "refused a result"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::SchedulerConfig;
    use decodebench_kernels::{BenchCase, DeviceIdentity, KvPool, QuantMode};
    use std::time::Duration;

    #[test]
    fn an_oversized_measurement_is_refused_naming_its_kernel() {
        let mut m = wire::CaseMeasurement {
            case_id: "c".into(),
            kernels: vec![wire::KernelMeasurement {
                kernel: wire::KernelKind::Optimized as i32,
                samples_ms: vec![1.0; MAX_SAMPLES],
                ..Default::default()
            }],
            ..Default::default()
        };
        assert_eq!(oversized(&m), None);
        m.kernels[0].samples_ms.push(1.0);
        let why = oversized(&m).unwrap();
        assert!(
            why.contains("optimized kernel") && why.contains("100001 samples"),
            "{why}"
        );
        m.kernels[0].samples_ms.clear();
        m.kernels[0].message = "x".repeat(MAX_MESSAGE_LEN + 1);
        let why = oversized(&m).unwrap();
        assert!(why.contains("optimized kernel's message"), "{why}");
    }

    /// A service over `sched`, and the journal writer's end of its channel.
    /// A scheduler of `case` alone, leased to the one CPU agent registered: the scheduler, that
    /// agent's device, its id and the lease id.
    fn leased_to_one_agent(case: &BenchCase) -> (Scheduler, DeviceIdentity, String, String) {
        let mut sched = Scheduler::new(SchedulerConfig::default(), vec![case.clone()], []);
        let device = DeviceIdentity {
            backend: "cpu".into(),
            uuid: "cpu-test".into(),
            sku: "cpu".into(),
            ..Default::default()
        };
        let agent_id = sched.register("a".into(), device.clone(), Instant::now());
        let lease_id = match sched.lease(&agent_id, Instant::now()).unwrap() {
            LeaseDecision::Shard(g) => g.lease_id,
            other => panic!("expected a shard, got {other:?}"),
        };
        (sched, device, agent_id, lease_id)
    }

    fn service(sched: Scheduler) -> (CoordinatorService, mpsc::Receiver<JournalJob>) {
        let (journal, writes) = mpsc::channel(4);
        let svc = CoordinatorService {
            shared: Arc::new(Shared {
                scheduler: Mutex::new(sched),
                records: Mutex::new(Vec::new()),
                journal,
                run_id: "run".into(),
                git_revision: "test".into(),
                started: Instant::now(),
                metrics: Metrics::new(),
                changed: Notify::new(),
            }),
        };
        (svc, writes)
    }

    fn register_request(name: &str) -> wire::RegisterRequest {
        wire::RegisterRequest {
            protocol_version: PROTOCOL_VERSION,
            agent_version: "test".into(),
            agent_name: name.into(),
            device: Some(wire::DeviceIdentity {
                backend: "cpu".into(),
                uuid: format!("cpu-{name}"),
                sku: "cpu".into(),
                ..Default::default()
            }),
        }
    }

    /// An agent that registers once the coordinator drains is told in the Register answer that
    /// the run is over (the coordinator may stop before its first Lease), and the coordinator
    /// waits for it only until it says it leaves.
    #[tokio::test]
    async fn a_registration_during_the_drain_is_answered_drain() {
        use wire::coordinator_server::Coordinator;
        let case = BenchCase::reference_shape(1, 64, QuantMode::BF16).with_id();
        let sched = Scheduler::new(SchedulerConfig::default(), vec![case], []);
        let (svc, _writes) = service(sched);
        let before = svc
            .register(Request::new(register_request("before")))
            .await
            .expect("registered")
            .into_inner();
        assert!(!before.drain, "work is left: {before:?}");

        svc.shared.scheduler().start_drain();
        let late = svc
            .register(Request::new(register_request("late")))
            .await
            .expect("registered")
            .into_inner();
        assert!(late.drain, "{late:?}");
        assert!(!late.agent_id.is_empty(), "an id to say it leaves with");
        let awaited = |svc: &CoordinatorService| -> Vec<String> {
            let s = svc.shared.scheduler();
            let mut names: Vec<String> = s.awaiting_drain().map(|a| a.name.clone()).collect();
            names.sort();
            names
        };
        assert_eq!(awaited(&svc), ["before", "late"]);
        svc.release(Request::new(wire::ReleaseRequest {
            agent_id: late.agent_id,
            reason: "told at registration".into(),
            leaving: true,
            ..Default::default()
        }))
        .await
        .expect("a leaving agent with no lease is answered");
        assert_eq!(awaited(&svc), ["before"]);
    }

    /// An agent killed while its result is being journaled: tonic drops the Report call's
    /// handler. The commit must still finish (here: the journal answers after the drop), or the
    /// case stays half-committed and the run never ends.
    #[tokio::test]
    async fn a_result_whose_caller_went_away_mid_journal_write_is_still_committed() {
        let case = BenchCase {
            num_qo_heads: 8,
            num_kv_heads: 1,
            head_size: 64,
            pool: KvPool::Shared { tokens: 4096 },
            ..BenchCase::reference_shape(1, 64, QuantMode::BF16)
        }
        .with_id();
        let (sched, _, agent_id, lease_id) = leased_to_one_agent(&case);
        let (svc, mut writes) = service(sched);
        let m = CaseMeasurement::example_ok(&case.id);
        let req = wire::ReportRequest {
            agent_id,
            lease_id: lease_id.to_string(),
            measurement: Some((&m).into()),
        };
        let caller = svc.clone();
        let call = tokio::spawn(async move {
            wire::coordinator_server::Coordinator::report(&caller, Request::new(req)).await
        });
        // The result reaches the journal writer; then the caller goes away, before the answer.
        let job = tokio::time::timeout(Duration::from_secs(10), writes.recv())
            .await
            .expect("the result reaches the journal")
            .expect("a journal job");
        call.abort();
        let _ = call.await;
        let JournalJob::Result { record, done } = job else {
            panic!("a result's journal job")
        };
        let _ = done.send((record, Ok(())));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let p = svc.shared.scheduler().progress();
            if p.done == 1 {
                assert_eq!(p.running, 0, "{p:?}");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the case was left half-committed: {p:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(svc.shared.records().len(), 1);
    }

    /// A failed attempt with attempts left is journaled before the agent hears back: a failed
    /// write answers `unavailable` and counts nothing (the agent sends the report again and it
    /// is the same attempt); a done write answers `accepted` and queues the case again.
    #[tokio::test]
    async fn a_retried_failure_is_journaled_before_it_is_acknowledged() {
        use decodebench_kernels::{KernelKind, KernelMeasurement, Status as KStatus};
        let case = BenchCase::reference_shape(1, 64, QuantMode::BF16).with_id();
        let (sched, device, agent_id, lease_id) = leased_to_one_agent(&case);
        let (svc, mut writes) = service(sched);
        let m = CaseMeasurement {
            case_id: case.id.clone(),
            kernels: vec![KernelMeasurement::not_timed(
                KernelKind::Optimized,
                KStatus::Failed,
                "wrong numbers",
            )],
            wall_s: 0.0,
        };
        let report = |svc: &CoordinatorService| {
            let (svc, m, agent_id, lease_id) =
                (svc.clone(), m.clone(), agent_id.clone(), lease_id.clone());
            tokio::spawn(async move { svc.commit_report(&agent_id, &lease_id, m).await })
        };
        let call = report(&svc);
        let (event, done) = next_attempt(&mut writes).await;
        assert_eq!(
            (event.attempt, event.case_id.as_str()),
            (1, case.id.as_str())
        );
        assert_eq!(event.device, device);
        assert!(
            event.errors.len() == 1 && event.errors[0].ends_with("optimized: wrong numbers"),
            "{event:?}"
        );
        assert_eq!(
            svc.shared.scheduler().progress().running,
            1,
            "not answered yet"
        );
        let _ = done.send(Err(DurabilityError {
            message: "disk full".into(),
            permanent: false,
        }));
        let answer = call.await.unwrap().unwrap_err();
        assert_eq!(answer.code(), tonic::Code::Unavailable);
        assert!(
            answer.message().contains("disk full") && answer.message().contains("send"),
            "{answer:?}"
        );
        assert_eq!(svc.shared.scheduler().progress().pending, 1);

        // Sent again: the same attempt, journaled this time.
        let call = report(&svc);
        let (event, done) = next_attempt(&mut writes).await;
        assert_eq!(
            event.attempt, 1,
            "the unacknowledged attempt was not counted"
        );
        let _ = done.send(Ok(()));
        let (accepted, _, _) = call.await.unwrap().unwrap();
        assert!(accepted);
        let p = svc.shared.scheduler().progress();
        assert_eq!((p.pending, p.running, p.failed), (1, 0, 0), "{p:?}");
        assert!(
            svc.shared.records().is_empty(),
            "a retried failure is no result"
        );
    }

    /// The next job the journal writer gets, which must be a failed attempt.
    async fn next_attempt(
        writes: &mut mpsc::Receiver<JournalJob>,
    ) -> (
        FailedAttemptRecord,
        oneshot::Sender<Result<(), DurabilityError>>,
    ) {
        let job = tokio::time::timeout(Duration::from_secs(10), writes.recv())
            .await
            .expect("the failed attempt reaches the journal")
            .expect("a journal job");
        match job {
            JournalJob::FailedAttempt { attempt, done } => (attempt, done),
            JournalJob::Result { record, .. } => panic!("a result was journaled: {record:?}"),
        }
    }
}
