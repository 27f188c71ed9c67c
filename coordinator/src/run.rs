//! A coordinator's whole life: resume from the journal, serve agents until every unit has a result
//! (or a shutdown signal), drain the agents, and write the outputs atomically.

use crate::journal::{
    Journal, JournalError, JournalMeta, ReplayedFailedAttempt, ReplayedLoss, ReplayedRetryRound,
    JOURNAL_FILE_NAME,
};
use crate::metrics::Metrics;
use crate::record::{FailedAttemptRecord, LossRecord, ResultRecord, RetryRoundRecord};
use crate::scheduler::{unit_key, FailedAttempt, Loss, Placement, Scheduler, SchedulerConfig};
use crate::service::{
    record_abandoned, status_snapshot, CoordinatorService, JournalJob, Shared, MAX_MESSAGE_BYTES,
};
use crate::sink::{write_outputs, OutputPaths, SinkError, CSV_FILE_NAME, PARQUET_FILE_NAME};
use decodebench_kernels::{BenchCase, DeviceIdentity};
use decodebench_proto::wire::coordinator_server::CoordinatorServer;
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use thiserror::Error;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

/// How often leases are checked for expiry and progress is refreshed.
pub const TICK_PERIOD: Duration = Duration::from_millis(250);
/// After the last result, how long agents get to pick up their drain order before the coordinator
/// exits anyway (they poll at least this often while idle).
pub const DRAIN_GRACE: Duration = Duration::from_secs(3);
/// On a shutdown signal, how long agents get to finish the case they are running, report it and
/// hand their leases back (they hear "drain" at their next heartbeat or report). Kubernetes
/// allows 30 s between SIGTERM and SIGKILL by default; this leaves room to write the outputs.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(15);
/// Most results made durable with one fsync (group commit).
pub const JOURNAL_BATCH_MAX: usize = 4096;
/// Plain-log progress period when stderr is not a terminal.
pub const PROGRESS_LOG_PERIOD: Duration = Duration::from_secs(10);

#[derive(Debug, Error)]
pub enum CoordinatorError {
    #[error("journal: {0}")]
    Journal(#[from] JournalError),
    #[error("writing outputs: {0}")]
    Sink(#[from] SinkError),
    #[error("TLS set-up: {0}")]
    Tls(String),
    #[error("gRPC server: {0}")]
    Serve(String),
    #[error("metrics endpoint: {0}")]
    Metrics(String),
    #[error("cannot create the output directory {path}: {source}")]
    OutDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--out {}: it is a file, not a directory; give a directory path (it is created if missing)", path.display())]
    OutNotDir { path: PathBuf },
    #[error(
        "{} holds an earlier run's {file} but no journal to resume it from; a new run would \
         overwrite it. Use a fresh --out directory, or move the earlier results away",
        dir.display()
    )]
    EarlierResults { dir: PathBuf, file: &'static str },
}

/// Server-side TLS, from PEM files.
#[derive(Debug, Clone)]
pub struct ServerTls {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    /// When set, clients must present a certificate signed by this CA (mutual TLS).
    pub client_ca_pem: Option<Vec<u8>>,
}

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressDisplay {
    /// A progress bar (interactive terminal).
    Bar,
    /// A log line every [`PROGRESS_LOG_PERIOD`].
    Log,
    Quiet,
}

pub struct CoordinatorConfig {
    pub out_dir: PathBuf,
    pub cases: Vec<BenchCase>,
    /// Identifies the grid ([`cases_hash`]): a journal from another grid is refused.
    pub grid_hash: String,
    pub scheduler: SchedulerConfig,
    pub token: Option<String>,
    pub tls: Option<ServerTls>,
    pub metrics_listen: Option<SocketAddr>,
    pub progress: ProgressDisplay,
    /// Git revision of the code, recorded with every result.
    pub git_revision: String,
    /// Write outputs and exit as soon as every unit has a result (false: keep serving until the
    /// shutdown future resolves, e.g. for a long-lived fleet coordinator).
    pub exit_when_done: bool,
    /// Deaths of agent processes the caller supervises (`decodebench run`'s local agents): each
    /// loses its agent's lease at once ([`Scheduler::agent_died`]) rather than at its timeout.
    pub agent_exits: Option<mpsc::UnboundedReceiver<AgentExit>>,
}

/// An agent process that died, by the name it registered with, and when it was seen to die.
#[derive(Debug, Clone)]
pub struct AgentExit {
    pub name: String,
    pub at: Instant,
}

/// The next death on `exits`; pending forever without a channel (or once it is closed).
async fn next_exit(exits: &mut Option<mpsc::UnboundedReceiver<AgentExit>>) -> AgentExit {
    match exits {
        Some(rx) => match rx.recv().await {
            Some(e) => e,
            None => {
                *exits = None;
                std::future::pending().await
            }
        },
        None => std::future::pending().await,
    }
}

/// How the run ended.
#[derive(Debug, Clone)]
pub struct RunSummary {
    pub run_id: String,
    pub total: u64,
    pub done: u64,
    pub failed: u64,
    /// Unit keys without a result (interrupted runs).
    pub unfinished: Vec<String>,
    pub outputs: Option<OutputPaths>,
    pub resumed: usize,
    pub elapsed: Duration,
    /// The names of the `--retry-failed` rounds the journal holds (one started by this run
    /// included), in the order they started.
    pub retry_rounds: Vec<String>,
    /// The kernels whose output disagreed with the reference, as `CASE_ID kernel`: results, so
    /// they leave the run complete, but named at its end.
    pub wrong: Vec<String>,
}

impl RunSummary {
    /// Every unit has a result that is not `failed`.
    pub fn complete(&self) -> bool {
        self.unfinished.is_empty() && self.failed == 0 && self.done == self.total
    }

    /// The `--retry-failed` flag that starts a new retry round on this journal: the bare flag
    /// (round `1`) if no round ran yet, else one naming the next unused number.
    pub fn next_retry_flag(&self) -> String {
        next_retry_flag(&self.retry_rounds)
    }
}

/// The name of a bare `--retry-failed`'s round.
pub const DEFAULT_RETRY_ROUND: &str = "1";

/// See [`RunSummary::next_retry_flag`].
pub fn next_retry_flag(rounds: &[String]) -> String {
    if !rounds.iter().any(|r| r == DEFAULT_RETRY_ROUND) {
        return "--retry-failed".to_string();
    }
    let next = (2u64..)
        .find(|n| !rounds.iter().any(|r| *r == n.to_string()))
        .unwrap_or(u64::MAX);
    format!("--retry-failed={next}")
}

/// Serves the coordinator on `listener` until all work is done or `shutdown` resolves, then
/// writes the outputs.
pub async fn serve(
    mut cfg: CoordinatorConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<RunSummary, CoordinatorError> {
    // The TLS set-up and the metrics port are checked before --out is touched: a bad key or a
    // taken port leaves nothing behind.
    let mut builder = Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .timeout(Duration::from_secs(60));
    if let Some(tls) = &cfg.tls {
        let mut tls_cfg =
            ServerTlsConfig::new().identity(Identity::from_pem(&tls.cert_pem, &tls.key_pem));
        if let Some(ca) = &tls.client_ca_pem {
            tls_cfg = tls_cfg.client_ca_root(Certificate::from_pem(ca));
        }
        builder = builder.tls_config(tls_cfg).map_err(|e| {
            // tonic's error says only "transport error"; the cause is in its sources.
            let text = decodebench_proto::error_chain(e.to_string(), std::error::Error::source(&e));
            CoordinatorError::Tls(format!(
                "{text}; check that --tls-cert and --tls-key are a matching certificate and key"
            ))
        })?;
    }
    let metrics_listener = match cfg.metrics_listen {
        Some(addr) => Some(crate::http::bind_metrics(addr).await?),
        None => None,
    };
    if cfg.out_dir.exists() && !cfg.out_dir.is_dir() {
        return Err(CoordinatorError::OutNotDir {
            path: cfg.out_dir.clone(),
        });
    }
    std::fs::create_dir_all(&cfg.out_dir).map_err(|source| CoordinatorError::OutDir {
        path: cfg.out_dir.clone(),
        source,
    })?;
    // Results without a journal are an earlier run's (or another tool's): never write over them.
    if !cfg.out_dir.join(JOURNAL_FILE_NAME).exists() {
        for file in [PARQUET_FILE_NAME, CSV_FILE_NAME] {
            if cfg.out_dir.join(file).exists() {
                return Err(CoordinatorError::EarlierResults {
                    dir: cfg.out_dir.clone(),
                    file,
                });
            }
        }
    }
    let meta = JournalMeta {
        run_id: new_run_id(),
        grid_hash: cfg.grid_hash.clone(),
    };
    let (mut journal, replay) = Journal::replay(&cfg.out_dir, &meta)?;
    let run_id = journal.meta().run_id.clone();
    let stamp = run_timestamp(&run_id);
    let placement = cfg.scheduler.placement;
    let retry = plan_retry(
        &replay.records,
        &replay.retry_rounds,
        replay.losses.len(),
        replay.failed_attempts.len(),
        placement,
        cfg.scheduler.retry_failed.as_deref(),
    );
    let mut retry_rounds: Vec<String> = replay
        .retry_rounds
        .iter()
        .map(|r| r.round.round.clone())
        .collect();
    if let Some(name) = &cfg.scheduler.retry_failed {
        log_retry_plan(name, &retry, &retry_rounds);
    }
    if let RetryOutcome::Start = retry.outcome {
        // Durable before any of the round's units is handed out: a restart resumes this round.
        let round = RetryRoundRecord {
            run_id: run_id.clone(),
            round: retry.round.clone(),
            units: retry.rerun.len() as u64,
            started_unix_ms: chrono::Utc::now().timestamp_millis(),
        };
        journal.append_retry_round(&round)?;
        retry_rounds.push(round.round);
    }
    let losses = losses_to_restore(&replay.records, replay.losses, placement, &retry);
    let failed_attempts =
        failed_attempts_to_restore(&replay.records, replay.failed_attempts, placement, &retry);
    let replayed = replay.records;
    // A failure superseded by a later result of its unit (a --retry-failed resume ran it again)
    // is dropped; every other record is kept, whatever the placement now.
    let replayed = drop_superseded_failures(replayed, placement);
    let resumed = replayed.len();
    let key = |r: &ResultRecord| unit_key(&r.case.id, placement, &r.device);
    // A unit the retry round runs again is neither done nor failed. Its failed record stays in
    // the results until a new result supersedes it (its device may never come back).
    let done_keys: Vec<String> = replayed
        .iter()
        .map(key)
        .filter(|k| !retry.rerun.contains(k))
        .collect();
    let failed_keys: Vec<String> = replayed
        .iter()
        .filter(|r| r.failed())
        .map(key)
        .filter(|k| !retry.rerun.contains(k))
        .collect();
    if resumed > 0 {
        tracing::info!(
            results = resumed,
            "resuming from the journal; only cases without a result run again"
        );
    }
    let mut scheduler = Scheduler::resume(
        cfg.scheduler.clone(),
        cfg.cases.clone(),
        done_keys,
        failed_keys,
    );
    if !losses.is_empty() {
        let cases: std::collections::HashSet<&str> =
            losses.iter().map(|(case, _)| case.as_str()).collect();
        tracing::info!(
            losses = losses.len(),
            cases = cases.len(),
            "resuming the losses the journal holds: cases lost with their agents keep running \
             alone, and their losses count towards giving them up"
        );
    }
    if !failed_attempts.is_empty() {
        let cases: std::collections::HashSet<&str> = failed_attempts
            .iter()
            .map(|(case, _)| case.as_str())
            .collect();
        tracing::info!(
            attempts = failed_attempts.len(),
            cases = cases.len(),
            "resuming the failed attempts the journal holds: those cases go on counting their \
             attempts where they stopped, and their final failed record keeps every attempt's \
             error"
        );
    }
    // Attempts first: a unit given up on at once by its restored losses counts them too.
    scheduler.restore_failed_attempts(failed_attempts);
    scheduler.restore_losses(losses);
    let (journal_tx, journal_rx) = mpsc::channel::<JournalJob>(JOURNAL_BATCH_MAX * 2);
    let shared = Arc::new(Shared {
        scheduler: Mutex::new(scheduler),
        records: Mutex::new(replayed),
        journal: journal_tx,
        run_id: run_id.clone(),
        git_revision: cfg.git_revision.clone(),
        started: Instant::now(),
        metrics: Metrics::new(),
        changed: tokio::sync::Notify::new(),
    });
    let journal = Arc::new(Mutex::new(journal));
    let journal_thread = spawn_journal_writer(journal.clone(), journal_rx);

    let svc = CoordinatorServer::new(CoordinatorService {
        shared: shared.clone(),
    })
    .max_decoding_message_size(MAX_MESSAGE_BYTES)
    .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let auth = crate::auth::BearerAuth::new(cfg.token.clone());
    let svc = tonic::service::interceptor::InterceptedService::new(svc, auth);

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<CoordinatorServer<CoordinatorService>>()
        .await;

    let addr = listener.local_addr().ok();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let server = tokio::spawn(
        builder
            .add_service(health_service)
            .add_service(svc)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stop_rx.await;
            }),
    );
    tracing::info!(addr = ?addr, run_id = %run_id, units = shared.scheduler().progress().total, "coordinator serving");

    let metrics_server =
        metrics_listener.map(|l| crate::http::spawn_metrics_server(l, shared.clone()));

    // Wait for completion or shutdown, ticking lease expiry and progress.
    let progress = crate::progress::ProgressReporter::new(cfg.progress, shared.clone());
    let mut shutdown = Box::pin(shutdown);
    let mut ticker = tokio::time::interval(TICK_PERIOD);
    let mut interrupted = false;
    let mut wrote_on_finish = false;
    let mut agent_exits = cfg.agent_exits.take();
    loop {
        tokio::select! {
            _ = &mut shutdown => {
                interrupted = true;
                tracing::warn!("shutdown requested: draining agents and writing what has been gathered");
                break;
            }
            _ = ticker.tick() => {}
            exit = next_exit(&mut agent_exits) => {
                let lost = shared.scheduler().agent_died(&exit.name, exit.at);
                if lost > 0 {
                    tracing::warn!(agent = %exit.name, "the agent's process died: its lease is lost now, not at the lease timeout");
                }
            }
            // A result landed: only completion matters now (O(1)); the full progress (which
            // counts live agents) waits for the tick instead of running once per result.
            _ = shared.changed.notified() => {
                if !shared.scheduler().is_finished() {
                    continue;
                }
            }
        }
        shared.scheduler().expire(Instant::now());
        // Losses charged (during an expiry here or in a handler) are journaled, so that a resumed
        // coordinator remembers them; then a case that kept killing its agents, given up on after
        // its last loss, has its failed result recorded here, so that the run can finish.
        record_losses(&shared, &journal).await;
        record_abandoned(&shared).await;
        let p = shared.scheduler().progress();
        shared.metrics.set_progress(&p);
        progress.update(&p);
        if p.finished && cfg.exit_when_done {
            break;
        }
        if p.finished && !wrote_on_finish {
            // A long-lived coordinator (--keep-serving) publishes the outputs as soon as the grid
            // is complete, not only when it is stopped.
            wrote_on_finish = true;
            let records = drop_superseded_failures(shared.records().clone(), placement);
            let dir = cfg.out_dir.clone();
            match tokio::task::spawn_blocking(move || write_outputs(&dir, &records, stamp)).await {
                Ok(Ok(paths)) => {
                    tracing::info!(parquet = %paths.parquet.display(), "grid complete; outputs written (still serving)")
                }
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "grid complete but writing the outputs failed")
                }
                Err(e) => tracing::error!(error = %e, "output writer task failed"),
            }
        }
    }
    progress.finish();

    // Drain: agents asking for work are told to exit; give them a moment to hear it. From here
    // on a Register answer says that the run is over too (decided under the scheduler lock that
    // start_drain takes), so an agent that registers after the loop's last check, even one
    // answered while the server stops (it finishes the calls in flight), has heard it: only an
    // older agent, which ignores that answer and waits for its first Lease, can miss it then.
    shared.scheduler().start_drain();
    let grace_end = Instant::now()
        + if interrupted {
            SHUTDOWN_GRACE
        } else {
            DRAIN_GRACE
        };
    loop {
        let waiting: Vec<String> = shared
            .scheduler()
            .awaiting_drain()
            .map(|a| a.name.clone())
            .collect();
        if waiting.is_empty() {
            break;
        }
        if Instant::now() >= grace_end {
            tracing::warn!(
                agents = %waiting.join(", "),
                "the drain grace is over: stopping while these agents still hold a lease or have \
                 not heard that the run is over (a lease not handed back expires; an agent that \
                 calls again finds no coordinator and retries until its connect timeout)"
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = stop_tx.send(());
    match tokio::time::timeout(Duration::from_secs(5), server).await {
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "gRPC server ended with an error"),
        Ok(Err(e)) => tracing::warn!(error = %e, "gRPC server task failed"),
        _ => {}
    }
    if let Some(h) = metrics_server {
        h.abort();
    }

    // Only results already made durable are in `records` (handlers push after the journal's
    // fsync), so the journal writer needs no join: it ends when the last sender is dropped.
    drop(progress);
    // A case given up on since the last tick (a shutdown cut the loop short) still gets its failed
    // result: the journal writer lives until `shared` is dropped.
    record_losses(&shared, &journal).await;
    record_abandoned(&shared).await;
    let final_status = status_snapshot(&shared);
    let unfinished = shared.scheduler().unfinished();
    let records = drop_superseded_failures(std::mem::take(&mut *shared.records()), placement);
    // Failures are counted from the results, not the scheduler: a replayed failure whose device
    // (per-gpu or per-sku placement) did not come back is in no scheduler count, and it is still
    // a failure of this run. (Every unit the scheduler counts as failed has a failed record here.)
    let failed = records.iter().filter(|r| r.failed()).count() as u64;
    let wrong = records
        .iter()
        .flat_map(|r| {
            r.wrong_kernels()
                .map(|k| format!("{} {}", r.measurement.case_id, k.as_str()))
        })
        .collect();
    drop(shared);
    drop(journal_thread);

    let outputs = if records.is_empty() {
        tracing::warn!("no results were gathered; no output files written");
        None
    } else {
        let dir = cfg.out_dir.clone();
        let recs = records;
        let paths = tokio::task::spawn_blocking(move || write_outputs(&dir, &recs, stamp))
            .await
            .map_err(|e| CoordinatorError::Serve(format!("output writer task failed: {e}")))??;
        Some(paths)
    };
    Ok(RunSummary {
        run_id,
        total: final_status.total,
        done: final_status.done,
        failed,
        unfinished,
        outputs,
        resumed,
        elapsed: Duration::from_secs_f64(final_status.elapsed_s),
        retry_rounds,
        wrong,
    })
}

/// Why a result could not be made durable, and whether sending it again can help.
fn durability_error(e: JournalError) -> crate::service::DurabilityError {
    let permanent = matches!(e, JournalError::Unencodable { .. });
    crate::service::DurabilityError {
        message: e.to_string(),
        permanent,
    }
}

/// The records less every failure that a later record of the same unit supersedes (a
/// `--retry-failed` resume ran the unit again), in journal order. Nothing else is dropped: records
/// of one case from several devices all stay, whatever the placement of this run.
fn drop_superseded_failures(records: Vec<ResultRecord>, placement: Placement) -> Vec<ResultRecord> {
    let key = |r: &ResultRecord| unit_key(&r.case.id, placement, &r.device);
    let last: std::collections::HashMap<String, usize> = records
        .iter()
        .enumerate()
        .map(|(i, r)| (key(r), i))
        .collect();
    records
        .into_iter()
        .enumerate()
        .filter(|(i, r)| !r.failed() || last.get(&key(r)) == Some(i))
        .map(|(_, r)| r)
        .collect()
}

/// What `--retry-failed` does on this start ([`plan_retry`]).
#[derive(Debug, Clone, PartialEq)]
struct RetryPlan {
    /// The round's name (empty without `--retry-failed`).
    round: String,
    outcome: RetryOutcome,
    /// Unit keys that run again: neither done nor failed in this run.
    rerun: HashSet<String>,
    /// How many units the round has, with a result since it started or not.
    round_units: usize,
    /// A unit of `rerun` counts only the losses from this index of the journal's losses on (those
    /// charged during the round; none before a round that starts now).
    losses_from: usize,
    /// Likewise for the journal's failed attempts: a unit of `rerun` counts only those reported
    /// during the round.
    failed_attempts_from: usize,
    /// When a round found in the journal started.
    started_unix_ms: Option<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RetryOutcome {
    /// No `--retry-failed`.
    Off,
    /// No unit's latest result is a failure: no round starts, and its name stays free.
    NothingToRetry,
    /// A new round: its event is journaled before any of its units is handed out.
    Start,
    /// The round was started before (this is a restart): its units without a result since it
    /// started run; the others keep the result they got in the round.
    Resume,
    /// Every unit of the round has a result since it started: nothing runs again.
    AlreadyRan,
}

/// The retry rule. A retry round is named (`--retry-failed=NAME`, `1` for the bare flag) and
/// runs at most once per journal:
/// - a name the journal has no round of starts a round, if some unit's latest result is a
///   failure: those units run again (the round's event, journaled before they are handed out,
///   records where the round starts among the results);
/// - a name the journal has a round of resumes that round: its units are those whose latest
///   result before the round started was a failure, and only those without a result since run
///   again. A result a unit got during the round is its retry's outcome, a failure included, and
///   a failure of any other unit recorded during the round is final for it. Once every unit of
///   the round has a result since, the same name runs nothing again.
///
/// So a coordinator restarted with the same flags (a supervisor, a Kubernetes Deployment, a
/// Job's restart after a failing exit) finishes the round it was in and never loops on a case
/// that always fails, while a person who fixed the cause names a new round.
fn plan_retry(
    records: &[ResultRecord],
    rounds: &[ReplayedRetryRound],
    loss_count: usize,
    failed_attempt_count: usize,
    placement: Placement,
    requested: Option<&str>,
) -> RetryPlan {
    let key = |r: &ResultRecord| unit_key(&r.case.id, placement, &r.device);
    let Some(name) = requested else {
        return RetryPlan {
            round: String::new(),
            outcome: RetryOutcome::Off,
            rerun: HashSet::new(),
            round_units: 0,
            losses_from: loss_count,
            failed_attempts_from: failed_attempt_count,
            started_unix_ms: None,
        };
    };
    // The units whose latest result among `records` is a failure.
    let failed_latest = |records: &[ResultRecord]| -> HashSet<String> {
        let mut latest: HashMap<String, bool> = HashMap::new();
        for r in records {
            latest.insert(key(r), r.failed());
        }
        latest
            .into_iter()
            .filter_map(|(k, failed)| failed.then_some(k))
            .collect()
    };
    match rounds.iter().find(|r| r.round.round == name) {
        Some(round) => {
            let (before, since) = records.split_at(round.after_records.min(records.len()));
            let units = failed_latest(before);
            let since: HashSet<String> = since.iter().map(key).collect();
            let rerun: HashSet<String> = units.difference(&since).cloned().collect();
            RetryPlan {
                round: name.to_string(),
                outcome: if rerun.is_empty() {
                    RetryOutcome::AlreadyRan
                } else {
                    RetryOutcome::Resume
                },
                rerun,
                round_units: units.len(),
                losses_from: round.after_losses,
                failed_attempts_from: round.after_failed_attempts,
                started_unix_ms: Some(round.round.started_unix_ms),
            }
        }
        None => {
            let rerun = failed_latest(records);
            RetryPlan {
                round: name.to_string(),
                outcome: if rerun.is_empty() {
                    RetryOutcome::NothingToRetry
                } else {
                    RetryOutcome::Start
                },
                round_units: rerun.len(),
                rerun,
                losses_from: loss_count,
                failed_attempts_from: failed_attempt_count,
                started_unix_ms: None,
            }
        }
    }
}

/// Says what `--retry-failed=NAME` does on this start; `rounds` are the journal's rounds.
fn log_retry_plan(name: &str, plan: &RetryPlan, rounds: &[String]) {
    let started = plan
        .started_unix_ms
        .and_then(chrono::DateTime::from_timestamp_millis)
        .map_or_else(|| "at an unknown time".to_string(), |t| t.to_rfc3339());
    match plan.outcome {
        RetryOutcome::Off => {}
        RetryOutcome::NothingToRetry => tracing::info!(
            round = name,
            "--retry-failed: no unit's recorded result is a failure, so retry round `{name}` does \
             not start (the name stays free for a later run)"
        ),
        RetryOutcome::Start => tracing::info!(
            round = name,
            units = plan.rerun.len(),
            "--retry-failed: retry round `{name}` starts: the units whose recorded result is a \
             failure run again. A coordinator restarted with the same flag resumes this round \
             instead of starting another, and a failure recorded from now on is final for it"
        ),
        RetryOutcome::Resume => tracing::info!(
            round = name,
            started = %started,
            units = plan.round_units,
            to_run = plan.rerun.len(),
            "--retry-failed: resuming retry round `{name}`: its units without a result since it \
             started run again; those with one keep it"
        ),
        RetryOutcome::AlreadyRan => tracing::warn!(
            round = name,
            started = %started,
            units = plan.round_units,
            "--retry-failed: retry round `{name}` already ran: each of its units has a result \
             since it started, which stands (failures too), so nothing runs again. Once the \
             cause of the failures is fixed, start a new round with {}",
            next_retry_flag(rounds)
        ),
    }
}

/// Which journaled events (losses, failed attempts) a resumed scheduler counts: those with no
/// result of their unit after them, and, for a unit the `--retry-failed` round runs again, only
/// those from the round's start on (see [`losses_to_restore`]).
struct ResumeRule<'a> {
    /// Each unit's last result, as an index into the journal's results.
    last_result: HashMap<String, usize>,
    placement: Placement,
    rerun: &'a HashSet<String>,
}

impl<'a> ResumeRule<'a> {
    fn new(records: &[ResultRecord], placement: Placement, retry: &'a RetryPlan) -> Self {
        let last_result = records
            .iter()
            .enumerate()
            .map(|(i, r)| (unit_key(&r.case.id, placement, &r.device), i))
            .collect();
        ResumeRule {
            last_result,
            placement,
            rerun: &retry.rerun,
        }
    }

    /// Whether the `index`-th event of its kind, charged to (`case_id`, `device`) after
    /// `after_records` results, counts; `round_from` is where the round's events of that kind
    /// begin.
    fn counts(
        &self,
        index: usize,
        case_id: &str,
        device: &DeviceIdentity,
        after_records: usize,
        round_from: usize,
    ) -> bool {
        let key = unit_key(case_id, self.placement, device);
        let after_its_result = self
            .last_result
            .get(&key)
            .is_none_or(|&last| last < after_records);
        after_its_result && (index >= round_from || !self.rerun.contains(&key))
    }
}

/// The journaled losses a resumed scheduler should count, as `(case id, loss)` in journal order:
/// those with no result of their unit after them. A loss followed by a result of its unit belongs
/// to an attempt that ended: a success makes it moot, and a failure (given up on, or failed after
/// every attempt) is what `--retry-failed` reruns afresh, with no losses against it; a plain
/// resume keeps that failure anyway. A unit the retry round runs again counts only the losses
/// charged during the round (`retry.losses_from` on): a round resumed after a restart keeps
/// counting them towards giving the unit up, and a new round starts from none.
fn losses_to_restore(
    records: &[ResultRecord],
    losses: Vec<ReplayedLoss>,
    placement: Placement,
    retry: &RetryPlan,
) -> Vec<(String, Loss)> {
    if losses.is_empty() {
        return Vec::new();
    }
    let rule = ResumeRule::new(records, placement, retry);
    losses
        .into_iter()
        .enumerate()
        .filter(|(i, l)| {
            let (loss, from) = (&l.loss, retry.losses_from);
            rule.counts(*i, &loss.case_id, &loss.device, l.after_records, from)
        })
        .map(|(_, l)| {
            let LossRecord {
                case_id,
                agent_id,
                device,
                cause,
                ..
            } = l.loss;
            (
                case_id,
                Loss {
                    agent_id,
                    device,
                    cause,
                },
            )
        })
        .collect()
}

/// The journaled failed attempts a resumed scheduler should count, as `(case id, attempt)` in
/// journal order, by the rule of [`losses_to_restore`]: those with no result of their unit after
/// them (a result ends the unit's attempts: a success makes them moot, and a failed record
/// already lists their errors), and, for a unit the retry round runs again, only those reported
/// during the round (`retry.failed_attempts_from` on): a resumed round keeps counting them, a
/// new round starts from none.
fn failed_attempts_to_restore(
    records: &[ResultRecord],
    attempts: Vec<ReplayedFailedAttempt>,
    placement: Placement,
    retry: &RetryPlan,
) -> Vec<(String, FailedAttempt)> {
    if attempts.is_empty() {
        return Vec::new();
    }
    let rule = ResumeRule::new(records, placement, retry);
    attempts
        .into_iter()
        .enumerate()
        .filter(|(i, a)| {
            let at = &a.attempt;
            let from = retry.failed_attempts_from;
            rule.counts(*i, &at.case_id, &at.device, a.after_records, from)
        })
        .map(|(_, a)| {
            let FailedAttemptRecord {
                case_id,
                agent_id,
                device,
                errors,
                ..
            } = a.attempt;
            (
                case_id,
                FailedAttempt {
                    agent_id,
                    device,
                    errors,
                },
            )
        })
        .collect()
}

/// Journals the losses the scheduler charged since the last call ([`LossRecord`]), so that a
/// resumed coordinator remembers them, then lets the units given up on after them go out for
/// their failed records ([`record_abandoned`] records them). Losses that cannot be written stay
/// with the scheduler for the next call; one that can never be written (it does not encode) is
/// logged and let go, so that it cannot hold the run up.
async fn record_losses(shared: &Shared, journal: &Arc<Mutex<Journal>>) {
    let events = shared.scheduler().take_losses();
    if events.is_empty() {
        return;
    }
    let lost_unix_ms = chrono::Utc::now().timestamp_millis();
    let records: Vec<LossRecord> = events
        .iter()
        .map(|e| LossRecord {
            run_id: shared.run_id.clone(),
            case_id: e.case_id.clone(),
            agent_id: e.loss.agent_id.clone(),
            device: e.loss.device.clone(),
            cause: e.loss.cause,
            lost_unix_ms,
        })
        .collect();
    let journal = journal.clone();
    let written = tokio::task::spawn_blocking(move || {
        let mut j = journal.lock().unwrap_or_else(|p| p.into_inner());
        match j.append_losses(&records) {
            Err(JournalError::Unencodable { .. }) => {
                for r in &records {
                    if let Err(e) = j.append_losses(std::slice::from_ref(r)) {
                        tracing::error!(case = %r.case_id, error = %e, "a loss could not be journaled; a resumed coordinator will not know of it");
                    }
                }
                Ok(())
            }
            other => other,
        }
    })
    .await;
    match written {
        Ok(Ok(())) => shared.scheduler().losses_recorded(events),
        Ok(Err(e)) => {
            tracing::error!(error = %e, losses = events.len(), "could not journal the losses of cases lost with their agents; trying again");
            shared.scheduler().return_losses(events);
        }
        Err(e) => {
            tracing::error!(error = %e, "the loss journaling task failed; trying again");
            shared.scheduler().return_losses(events);
        }
    }
}

/// A fresh run id: UTC time plus random bits, readable and unique across a fleet.
fn new_run_id() -> String {
    use rand::Rng;
    format!(
        "{}-{:08x}",
        chrono::Utc::now().format("%Y%m%dT%H%M%SZ"),
        rand::rng().random::<u32>()
    )
}

/// The time a run started, from its id, so every write of its outputs (on completion, on a signal,
/// after a resume) names the reference CSV the same and replaces it rather than adding another.
fn run_timestamp(run_id: &str) -> chrono::DateTime<chrono::Local> {
    run_id
        .get(..16)
        .and_then(|s| chrono::NaiveDateTime::parse_from_str(s, "%Y%m%dT%H%M%SZ").ok())
        .map(|t| t.and_utc().with_timezone(&chrono::Local))
        .unwrap_or_else(chrono::Local::now)
}

/// Identifies the set of cases a run measures (the grid after command-line overrides): a journal
/// written for other cases is refused rather than silently mixed in.
pub fn cases_hash(cases: &[BenchCase]) -> String {
    use sha2::{Digest, Sha256};
    let mut ids: Vec<&str> = cases.iter().map(|c| c.id.as_str()).collect();
    ids.sort_unstable();
    let mut h = Sha256::new();
    for id in ids {
        h.update(id.as_bytes());
        h.update(b"\n");
    }
    hex::encode(&h.finalize()[..8])
}

/// The journal writer: one thread that makes results durable in batches (one fsync per batch) and
/// tells each waiting handler when its result is on disk.
fn spawn_journal_writer(
    journal: Arc<Mutex<Journal>>,
    mut rx: mpsc::Receiver<JournalJob>,
) -> Result<std::thread::JoinHandle<()>, std::io::Error> {
    std::thread::Builder::new()
        .name("journal-writer".into())
        .spawn(move || {
            while let Some(first) = rx.blocking_recv() {
                let mut jobs = vec![first];
                while jobs.len() < JOURNAL_BATCH_MAX {
                    match rx.try_recv() {
                        Ok(j) => jobs.push(j),
                        Err(_) => break,
                    }
                }
                let mut records = Vec::with_capacity(jobs.len());
                let mut dones = Vec::with_capacity(jobs.len());
                let mut attempts = Vec::new();
                for job in jobs {
                    match job {
                        JournalJob::Result { record, done } => {
                            records.push(record);
                            dones.push(done);
                        }
                        JournalJob::FailedAttempt { attempt, done } => attempts.push((attempt, done)),
                    }
                }
                // Shared with the loss journaling (rare), which holds it for one small write.
                let mut journal = journal.lock().unwrap_or_else(|p| p.into_inner());
                // A failed attempt and a result of one unit are never in one batch (the unit
                // waits for the attempt's write before it is queued again), so their order here
                // does not matter.
                if !attempts.is_empty() {
                    write_failed_attempts(&mut journal, attempts);
                }
                if records.is_empty() {
                    continue;
                }
                match journal.append_batch(&records) {
                    Ok(()) => {
                        for (record, done) in records.into_iter().zip(dones) {
                            let _ = done.send((record, Ok(())));
                        }
                    }
                    Err(JournalError::Unencodable { .. }) => {
                        // One record cannot be stored: write the others one by one so it does
                        // not take the rest of the batch down with it.
                        for (record, done) in records.into_iter().zip(dones) {
                            let r = journal.append(&record).map_err(durability_error);
                            let _ = done.send((record, r));
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "journal write failed; results were not acknowledged");
                        let err = durability_error(e);
                        for (record, done) in records.into_iter().zip(dones) {
                            let _ = done.send((record, Err(err.clone())));
                        }
                    }
                }
            }
        })
}

/// Makes failed attempts durable with one write and one sync, and tells each waiting handler;
/// like results, one that cannot be encoded is refused alone, and a failed write refuses all.
fn write_failed_attempts(
    journal: &mut Journal,
    attempts: Vec<(
        FailedAttemptRecord,
        tokio::sync::oneshot::Sender<Result<(), crate::service::DurabilityError>>,
    )>,
) {
    let (events, dones): (Vec<FailedAttemptRecord>, Vec<_>) = attempts.into_iter().unzip();
    match journal.append_failed_attempts(&events) {
        Ok(()) => {
            for done in dones {
                let _ = done.send(Ok(()));
            }
        }
        Err(JournalError::Unencodable { .. }) => {
            for (event, done) in events.iter().zip(dones) {
                let r = journal
                    .append_failed_attempts(std::slice::from_ref(event))
                    .map_err(durability_error);
                let _ = done.send(r);
            }
        }
        Err(e) => {
            tracing::error!(error = %e, attempts = events.len(), "journal write failed; failed attempts were not acknowledged (nor counted)");
            let err = durability_error(e);
            for done in dones {
                let _ = done.send(Err(err.clone()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A loss counts on resume unless a result of its unit came after it: a success makes it
    /// moot, and a failure's losses are what `--retry-failed` starts afresh from.
    #[test]
    fn resume_restores_only_the_losses_no_result_of_their_unit_came_after() {
        use crate::record::LossCause;
        use crate::schema::tests::sample_record;
        let ok = sample_record(1, &[1.0], &[2.0]);
        let failed = sample_record(2, &[1.0], &[]);
        assert!(failed.failed());
        let never_ran = sample_record(3, &[1.0], &[2.0]);
        let mut other_gpu = ok.clone();
        other_gpu.device.uuid = "GPU-5678".into();
        let loss = |r: &ResultRecord, agent: &str, after_records| ReplayedLoss {
            loss: LossRecord {
                run_id: "run-1".into(),
                case_id: r.case.id.clone(),
                agent_id: agent.into(),
                device: r.device.clone(),
                cause: LossCause::Alone,
                lost_unix_ms: 0,
            },
            after_records,
        };
        let records = vec![ok.clone(), failed.clone()];
        let losses = || {
            vec![
                loss(&ok, "a", 0),
                loss(&failed, "b", 1),
                loss(&never_ran, "c", 2),
                loss(&failed, "d", 2),
                loss(&other_gpu, "e", 0),
            ]
        };
        let kept = |placement| -> Vec<(String, String)> {
            let no_retry = plan_retry(&records, &[], 5, 0, placement, None);
            losses_to_restore(&records, losses(), placement, &no_retry)
                .into_iter()
                .map(|(case, l)| (case, l.agent_id))
                .collect()
        };
        let pair = |r: &ResultRecord, agent: &str| (r.case.id.clone(), agent.to_string());
        assert_eq!(
            kept(Placement::Spread),
            [pair(&never_ran, "c"), pair(&failed, "d")]
        );
        // Per GPU, the loss on another GPU is another unit's, which has no result.
        assert_eq!(
            kept(Placement::PerGpu),
            [
                pair(&never_ran, "c"),
                pair(&failed, "d"),
                pair(&other_gpu, "e")
            ]
        );
    }

    /// A round started after the first `after_records` results, `after_losses` losses and
    /// `after_failed_attempts` failed attempts.
    fn round_at(
        name: &str,
        after_records: usize,
        after_losses: usize,
        after_failed_attempts: usize,
    ) -> ReplayedRetryRound {
        ReplayedRetryRound {
            round: RetryRoundRecord {
                run_id: "run-1".into(),
                round: name.into(),
                units: 0,
                started_unix_ms: 1_700_000_000_000,
            },
            after_records,
            after_losses,
            after_failed_attempts,
        }
    }

    fn spread_key(r: &ResultRecord) -> String {
        unit_key(&r.case.id, Placement::Spread, &r.device)
    }

    fn keys(records: &[&ResultRecord]) -> HashSet<String> {
        records.iter().map(|r| spread_key(r)).collect()
    }

    /// The retry rule: a round runs its failed units once; a restart with the same name resumes
    /// it (only units without a result since it started run, a failure recorded during it is
    /// final) and, once each of its units has a result, runs nothing; a new name starts a new
    /// round; a round with nothing to retry does not start.
    #[test]
    fn a_retry_round_runs_once_per_name_and_a_restart_resumes_it() {
        use crate::schema::tests::sample_record;
        let ok = sample_record(1, &[1.0], &[2.0]);
        let fails_again = sample_record(2, &[1.0], &[]);
        let still_to_run = sample_record(3, &[1.0], &[]);
        let first_fails_in_round = sample_record(4, &[1.0], &[]);
        let plan = |records: &[ResultRecord], rounds: &[ReplayedRetryRound], name| {
            plan_retry(records, rounds, 7, 5, Placement::Spread, name)
        };
        let mut records = vec![ok.clone(), fails_again.clone(), still_to_run.clone()];

        let off = plan(&records, &[], None);
        assert_eq!((off.outcome, off.rerun.len()), (RetryOutcome::Off, 0));
        let start = plan(&records, &[], Some("1"));
        assert_eq!(start.outcome, RetryOutcome::Start);
        assert_eq!(start.rerun, keys(&[&fails_again, &still_to_run]));
        assert_eq!(start.losses_from, 7, "a new round counts no earlier loss");
        assert_eq!(
            start.failed_attempts_from, 5,
            "nor an earlier failed attempt"
        );

        // The round started after those 3 results; since then one of its units failed again,
        // and a unit with no result before failed for the first time.
        let rounds = [round_at("1", 3, 7, 4)];
        records.push(fails_again.clone());
        records.push(first_fails_in_round.clone());
        let resume = plan(&records, &rounds, Some("1"));
        assert_eq!(resume.outcome, RetryOutcome::Resume);
        assert_eq!(
            resume.rerun,
            keys(&[&still_to_run]),
            "failures recorded during the round are final for it"
        );
        assert_eq!((resume.round_units, resume.losses_from), (2, 7));
        assert_eq!(resume.failed_attempts_from, 4);
        assert_eq!(resume.started_unix_ms, Some(1_700_000_000_000));

        // Its last unit gets a result (a failure): the round is over; the same name reruns
        // nothing, however often the coordinator is restarted with it.
        records.push(still_to_run.clone());
        for _ in 0..2 {
            let ran = plan(&records, &rounds, Some("1"));
            assert_eq!(ran.outcome, RetryOutcome::AlreadyRan);
            assert!(ran.rerun.is_empty());
        }
        // A new name is a new round, over the failures that stand now.
        let second = plan(&records, &rounds, Some("2"));
        assert_eq!(second.outcome, RetryOutcome::Start);
        assert_eq!(
            second.rerun,
            keys(&[&fails_again, &still_to_run, &first_fails_in_round])
        );
        // A success supersedes a failure: nothing left to retry, and no round starts.
        let mut fixed = records.clone();
        for r in [&fails_again, &still_to_run, &first_fails_in_round] {
            let mut good = r.clone();
            good.measurement = ok.measurement.clone();
            fixed.push(good);
        }
        let nothing = plan(&fixed, &rounds, Some("2"));
        assert_eq!(nothing.outcome, RetryOutcome::NothingToRetry);
        assert!(nothing.rerun.is_empty());
    }

    /// A unit the round runs again counts the losses charged during the round (a restart keeps
    /// counting them towards giving it up, so a case that kills every agent cannot loop across
    /// restarts), and none from before it: a new round starts from none.
    #[test]
    fn a_resumed_round_keeps_its_losses_and_a_new_round_starts_from_none() {
        use crate::record::LossCause;
        use crate::schema::tests::sample_record;
        let failed = sample_record(2, &[1.0], &[]);
        let never_ran = sample_record(3, &[1.0], &[2.0]);
        let records = vec![failed.clone()];
        let loss = |r: &ResultRecord, agent: &str| ReplayedLoss {
            loss: LossRecord {
                run_id: "run-1".into(),
                case_id: r.case.id.clone(),
                agent_id: agent.into(),
                device: r.device.clone(),
                cause: LossCause::Running,
                lost_unix_ms: 0,
            },
            after_records: 1,
        };
        // An earlier round `0`, interrupted, lost the failed case once; round `1` started after
        // that and lost it once more. A case with no result was lost before either round.
        let losses = || {
            vec![
                loss(&never_ran, "a"),
                loss(&failed, "b"),
                loss(&failed, "c"),
            ]
        };
        let rounds = [round_at("0", 1, 1, 0), round_at("1", 1, 2, 0)];
        let agents = |name| -> Vec<String> {
            let plan = plan_retry(&records, &rounds, 3, 0, Placement::Spread, Some(name));
            losses_to_restore(&records, losses(), Placement::Spread, &plan)
                .into_iter()
                .map(|(_, l)| l.agent_id)
                .collect()
        };
        assert_eq!(agents("1"), ["a", "c"], "round 1 resumed: its own loss");
        assert_eq!(agents("0"), ["a", "b", "c"], "round 0 resumed: both");
        assert_eq!(
            agents("2"),
            ["a"],
            "a new round: none against the failed case"
        );
        let off = plan_retry(&records, &rounds, 3, 0, Placement::Spread, None);
        let kept = losses_to_restore(&records, losses(), Placement::Spread, &off);
        assert_eq!(
            kept.len(),
            3,
            "a plain resume passes them all on (the scheduler ignores those of a unit that keeps \
             its failure)"
        );
    }

    /// Failed attempts are restored by the rule of the losses: none journaled before a result
    /// of their unit; for a unit the retry round reruns, only those reported during the round
    /// (a resumed round keeps them, a new round starts from none); the rest as they are.
    #[test]
    fn failed_attempts_are_restored_after_their_units_result_and_within_the_round() {
        use crate::schema::tests::sample_record;
        let ok = sample_record(1, &[1.0], &[2.0]);
        let failed = sample_record(2, &[1.0], &[]);
        let never_ran = sample_record(3, &[1.0], &[2.0]);
        let attempt = |r: &ResultRecord, agent: &str, after_records| ReplayedFailedAttempt {
            attempt: FailedAttemptRecord {
                run_id: "run-1".into(),
                case_id: r.case.id.clone(),
                agent_id: agent.into(),
                device: r.device.clone(),
                attempt: 1,
                errors: vec![format!("attempt 1 on {agent}: optimized: wrong")],
                failed_unix_ms: 0,
            },
            after_records,
        };
        let records = vec![ok.clone(), failed.clone()];
        // `a` failed `ok` before its result, `b` and `c` failed `failed` before its failed
        // record, `d` failed a case with no result; round `1` started after those, and `e`
        // failed `failed` in it, `f` the case with no result.
        let attempts = || {
            vec![
                attempt(&ok, "a", 0),
                attempt(&failed, "b", 1),
                attempt(&failed, "c", 1),
                attempt(&never_ran, "d", 2),
                attempt(&failed, "e", 2),
                attempt(&never_ran, "f", 2),
            ]
        };
        let rounds = [round_at("1", 2, 0, 4)];
        let agents = |name: Option<&str>| -> Vec<String> {
            let plan = plan_retry(&records, &rounds, 0, 6, Placement::Spread, name);
            failed_attempts_to_restore(&records, attempts(), Placement::Spread, &plan)
                .into_iter()
                .map(|(case, a)| {
                    assert!(a.errors[0].contains(&format!("on {}", a.agent_id)));
                    assert!(case == never_ran.case.id || case == failed.case.id);
                    a.agent_id
                })
                .collect()
        };
        assert_eq!(
            agents(None),
            ["d", "e", "f"],
            "a plain resume: none before their unit's result"
        );
        assert_eq!(
            agents(Some("1")),
            ["d", "e", "f"],
            "round 1 resumed: its own"
        );
        assert_eq!(
            agents(Some("2")),
            ["d", "f"],
            "a new round: none against the failed case it reruns"
        );
    }

    #[test]
    fn the_next_retry_flag_names_a_round_not_yet_run() {
        let flag = |rounds: &[&str]| {
            next_retry_flag(&rounds.iter().map(|r| r.to_string()).collect::<Vec<_>>())
        };
        assert_eq!(flag(&[]), "--retry-failed");
        assert_eq!(flag(&["2"]), "--retry-failed");
        assert_eq!(flag(&["1"]), "--retry-failed=2");
        assert_eq!(flag(&["1", "fix", "2"]), "--retry-failed=3");
    }

    #[test]
    fn run_ids_carry_their_start_time() {
        let id = new_run_id();
        let t = run_timestamp(&id);
        let age = chrono::Local::now().signed_duration_since(t);
        assert!(age.num_seconds().abs() <= 2, "{id} -> {t}");
        assert_eq!(
            run_timestamp("20240102T030405Z-deadbeef")
                .with_timezone(&chrono::Utc)
                .to_rfc3339(),
            "2024-01-02T03:04:05+00:00"
        );
    }
}
