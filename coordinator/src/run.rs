//! A coordinator's whole life: resume from the journal, serve agents until every unit has a result
//! (or a shutdown signal), drain the agents, and write the outputs atomically.

use crate::journal::{Journal, JournalError, JournalMeta, ReplayedLoss, JOURNAL_FILE_NAME};
use crate::metrics::Metrics;
use crate::record::{LossRecord, ResultRecord};
use crate::scheduler::{unit_key, Loss, Placement, Scheduler, SchedulerConfig};
use crate::service::{
    record_abandoned, status_snapshot, CoordinatorService, JournalJob, Shared, MAX_MESSAGE_BYTES,
};
use crate::sink::{write_outputs, OutputPaths, SinkError, CSV_FILE_NAME, PARQUET_FILE_NAME};
use decodebench_kernels::BenchCase;
use decodebench_proto::wire::coordinator_server::CoordinatorServer;
use std::collections::HashMap;
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
}

impl RunSummary {
    /// Every unit has a result that is not `failed`.
    pub fn complete(&self) -> bool {
        self.unfinished.is_empty() && self.failed == 0 && self.done == self.total
    }
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
    let (journal, replay) = Journal::replay(&cfg.out_dir, &meta)?;
    let run_id = journal.meta().run_id.clone();
    let stamp = run_timestamp(&run_id);
    let placement = cfg.scheduler.placement;
    let losses = losses_to_restore(&replay.records, replay.losses, placement);
    let replayed = replay.records;
    // A failure superseded by a later result of its unit (a --retry-failed resume ran it again)
    // is dropped; every other record is kept, whatever the placement now.
    let replayed = drop_superseded_failures(replayed, placement);
    let resumed = replayed.len();
    let key = |r: &ResultRecord| unit_key(&r.case.id, placement, &r.device);
    // With --retry-failed a failure's unit runs again: not done, not failed. Its failed record
    // stays in the results until a new result supersedes it (its device may never come back).
    let retry = cfg.scheduler.retry_failed;
    let done_keys: Vec<String> = replayed
        .iter()
        .filter(|r| !(retry && r.failed()))
        .map(key)
        .collect();
    let failed_keys: Vec<String> = replayed.iter().filter(|r| r.failed()).map(key).collect();
    if retry {
        tracing::info!(
            units = failed_keys.len(),
            "--retry-failed: the units whose recorded result is a failure run again"
        );
    }
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
        if retry { Vec::new() } else { failed_keys },
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

    // Drain: agents asking for work are told to exit; give them a moment to hear it.
    shared.scheduler().start_drain();
    let grace_end = Instant::now()
        + if interrupted {
            SHUTDOWN_GRACE
        } else {
            DRAIN_GRACE
        };
    while Instant::now() < grace_end {
        let busy = {
            let s = shared.scheduler();
            let timeout = s.config().lease_timeout;
            let busy = s.agents().any(|a| {
                let alive = a.last_seen.elapsed() < timeout;
                // Wait for running shards to be reported or handed back (interrupted), and for
                // idle agents to pick up their drain order at their next lease request (either
                // way: an idle agent that misses it retries a coordinator that is gone until its
                // connect timeout, then fails).
                alive && (a.lease.is_some() || !a.drained)
            });
            busy
        };
        if !busy {
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

/// The journaled losses a resumed scheduler should count, as `(case id, loss)` in journal order:
/// those with no result of their unit after them. A loss followed by a result of its unit belongs
/// to an attempt that ended: a success makes it moot, and a failure (given up on, or failed after
/// every attempt) is what `--retry-failed` reruns afresh, with no losses against it; a plain
/// resume keeps that failure anyway.
fn losses_to_restore(
    records: &[ResultRecord],
    losses: Vec<ReplayedLoss>,
    placement: Placement,
) -> Vec<(String, Loss)> {
    if losses.is_empty() {
        return Vec::new();
    }
    let last_result: HashMap<String, usize> = records
        .iter()
        .enumerate()
        .map(|(i, r)| (unit_key(&r.case.id, placement, &r.device), i))
        .collect();
    losses
        .into_iter()
        .filter(|l| {
            let key = unit_key(&l.loss.case_id, placement, &l.loss.device);
            last_result
                .get(&key)
                .is_none_or(|&last| last < l.after_records)
        })
        .map(|l| {
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
                let (records, dones): (Vec<ResultRecord>, Vec<_>) =
                    jobs.into_iter().map(|j| (j.record, j.done)).unzip();
                // Shared with the loss journaling (rare), which holds it for one small write.
                let mut journal = journal.lock().unwrap_or_else(|p| p.into_inner());
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
            losses_to_restore(&records, losses(), placement)
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
