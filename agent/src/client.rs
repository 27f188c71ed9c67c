//! The agent's work loop: connect (retrying while the coordinator is not up yet), register, then
//! pull shards, run each case on the backend while heartbeating, and report every result as it
//! finishes. It survives a coordinator restart (re-registers) and drains on request.

use decodebench_kernels::{Backend, BenchCase, CaseMeasurement, TelemetryProbe};
use decodebench_proto::wire::coordinator_client::CoordinatorClient;
use decodebench_proto::{wire, PROTOCOL_VERSION};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use thiserror::Error;
use tokio::sync::watch;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Request, Status};

/// First retry delay when the coordinator cannot be reached; doubles up to [`BACKOFF_MAX`].
pub const BACKOFF_START: Duration = Duration::from_millis(200);
/// Longest delay between reconnection attempts: agents on Kubernetes often start before the
/// coordinator, and a restarted coordinator should be found again within seconds.
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long an agent keeps trying to reach its coordinator before giving up, by default.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(300);
/// Per-RPC deadline: a coordinator that does not answer in this time is treated as unreachable.
pub const RPC_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Error)]
pub enum AgentError {
    #[error(
        "invalid coordinator address `{addr}`: {reason} (expected e.g. http://127.0.0.1:50051)"
    )]
    Address { addr: String, reason: String },
    #[error("could not reach the coordinator at {addr} for {waited:?}: {last_error}; is it running and reachable?")]
    Unreachable {
        addr: String,
        waited: Duration,
        last_error: String,
    },
    #[error("the coordinator refused this agent: {0}")]
    Refused(String),
    #[error("the coordinator rejected a request as invalid: {0}")]
    Rejected(String),
    #[error("TLS set-up: {0}")]
    Tls(String),
    #[error("the backend task failed: {0}")]
    Backend(String),
    #[error("the device is in an unrecoverable state ({0}); this agent exits so that a fresh process (a restarted pod or agent) takes over; its unfinished cases go to other agents")]
    DeviceLost(String),
}

/// Client-side TLS, from PEM files.
#[derive(Debug, Clone)]
pub struct ClientTls {
    pub ca_pem: Option<Vec<u8>>,
    /// Client certificate and key, for mutual TLS.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    /// Server name to verify (defaults to the address's host).
    pub domain: Option<String>,
}

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub coordinator: String,
    pub name: String,
    pub token: Option<String>,
    pub tls: Option<ClientTls>,
    pub connect_timeout: Duration,
    /// decodebench version and git revision of this agent, sent at registration.
    pub version: String,
}

/// What an agent did before it exited.
#[derive(Debug, Clone, Default)]
pub struct AgentSummary {
    pub cases_run: u64,
    pub results_accepted: u64,
    pub duplicates: u64,
    pub released: u64,
    /// The agent exited because the coordinator told it to drain (rather than on a signal).
    pub drained_by_coordinator: bool,
}

#[derive(Clone)]
struct TokenInterceptor(Option<MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for TokenInterceptor {
    fn call(&mut self, mut r: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            r.metadata_mut().insert("authorization", v.clone());
        }
        Ok(r)
    }
}

type Client = CoordinatorClient<InterceptedService<Channel, TokenInterceptor>>;

/// A status with its cause chain ("transport error: tls handshake eof ..."), so a TLS or DNS
/// problem is named rather than hidden behind "transport error".
fn describe(s: &Status) -> String {
    let mut text = s.message().to_string();
    let mut source = std::error::Error::source(s);
    while let Some(e) = source {
        let part = e.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = e.source();
    }
    text
}

/// Retry pacing for one call that keeps failing transiently: exponential delays up to
/// [`BACKOFF_MAX`], giving up once the connect timeout has passed since the first failure.
struct Backoff {
    started: Instant,
    delay: Duration,
    limit: Duration,
}

impl Backoff {
    fn new(limit: Duration) -> Backoff {
        Backoff {
            started: Instant::now(),
            delay: BACKOFF_START,
            limit,
        }
    }

    /// Sleeps before the next try, or says the coordinator is unreachable.
    async fn wait_after(&mut self, s: &Status, addr: &str) -> Result<(), AgentError> {
        if self.started.elapsed() >= self.limit {
            return Err(AgentError::Unreachable {
                addr: addr.to_string(),
                waited: self.started.elapsed(),
                last_error: describe(s),
            });
        }
        tracing::info!(retry_in = ?self.delay, error = %describe(s), "coordinator not reachable; retrying");
        tokio::time::sleep(self.delay).await;
        self.delay = (self.delay * 2).min(BACKOFF_MAX);
        Ok(())
    }
}

fn is_transient(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Unknown
            | Code::Cancelled
            | Code::Aborted
    )
}

/// A shared, blocking-safe handle on the backend (cases run on a blocking thread).
type SharedBackend = Arc<Mutex<Box<dyn Backend>>>;
type SharedProbe = Arc<Mutex<Box<dyn TelemetryProbe>>>;

pub struct Agent {
    cfg: AgentConfig,
    backend: SharedBackend,
    probe: SharedProbe,
    client: Client,
    agent_id: String,
    heartbeat_interval: Duration,
    summary: AgentSummary,
    /// A heartbeat said the coordinator is draining: stop after the current case.
    drain_requested: bool,
}

impl Agent {
    /// Connects to the coordinator (retrying with backoff until `connect_timeout`) and registers.
    pub async fn connect(
        cfg: AgentConfig,
        backend: Box<dyn Backend>,
        probe: Box<dyn TelemetryProbe>,
    ) -> Result<Agent, AgentError> {
        let client = make_client(&cfg)?;
        let mut agent = Agent {
            cfg,
            backend: Arc::new(Mutex::new(backend)),
            probe: Arc::new(Mutex::new(probe)),
            client,
            agent_id: String::new(),
            heartbeat_interval: Duration::from_secs(10),
            summary: AgentSummary::default(),
            drain_requested: false,
        };
        agent.register().await?;
        Ok(agent)
    }

    fn device(&self) -> wire::DeviceIdentity {
        let b = self.backend.lock().unwrap_or_else(|e| e.into_inner());
        b.identity().into()
    }

    /// Registers (again, after a coordinator restart), retrying transient failures.
    async fn register(&mut self) -> Result<(), AgentError> {
        let device = self.device();
        let req = wire::RegisterRequest {
            protocol_version: PROTOCOL_VERSION,
            agent_version: self.cfg.version.clone(),
            agent_name: self.cfg.name.clone(),
            device: Some(device),
        };
        let mut backoff = Backoff::new(self.cfg.connect_timeout);
        loop {
            match self.client.register(req.clone()).await {
                Ok(r) => {
                    let r = r.into_inner();
                    self.agent_id = r.agent_id;
                    self.heartbeat_interval =
                        Duration::from_millis(r.heartbeat_interval_ms.max(100) as u64);
                    tracing::info!(agent = %self.agent_id, run = %r.run_id, "registered with the coordinator");
                    return Ok(());
                }
                Err(s) if is_transient(&s) => {
                    backoff.wait_after(&s, &self.cfg.coordinator).await?;
                }
                Err(s) => return Err(AgentError::Refused(s.message().to_string())),
            }
        }
    }

    /// Calls `f` until it succeeds, retrying transient errors with backoff (up to the connect
    /// timeout) and re-registering when the coordinator no longer knows this agent.
    async fn call<T, F, Fut>(&mut self, mut f: F) -> Result<T, AgentError>
    where
        F: FnMut(Client, String) -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        let mut backoff = Backoff::new(self.cfg.connect_timeout);
        loop {
            match f(self.client.clone(), self.agent_id.clone()).await {
                Ok(v) => return Ok(v),
                Err(s) if s.code() == Code::NotFound && s.message().contains("unknown agent") => {
                    tracing::warn!(
                        "the coordinator does not know this agent (restarted?): registering again"
                    );
                    self.register().await?;
                }
                Err(s) if is_transient(&s) => {
                    backoff.wait_after(&s, &self.cfg.coordinator).await?;
                }
                Err(s) if s.code() == Code::InvalidArgument => {
                    return Err(AgentError::Rejected(s.message().to_string()))
                }
                Err(s) => {
                    return Err(AgentError::Refused(format!(
                        "{:?}: {}",
                        s.code(),
                        s.message()
                    )))
                }
            }
        }
    }

    /// Pulls and runs shards until the coordinator says drain or `stop` turns true (then finishes
    /// the current case, hands the rest of the lease back and returns).
    pub async fn run(
        mut self,
        mut stop: watch::Receiver<bool>,
    ) -> Result<AgentSummary, AgentError> {
        loop {
            if *stop.borrow() {
                return Ok(self.summary);
            }
            let resp = self
                .call(|mut c, id| async move {
                    c.lease(wire::LeaseRequest { agent_id: id })
                        .await
                        .map(|r| r.into_inner())
                })
                .await?;
            match resp.action {
                Some(wire::lease_response::Action::Shard(shard)) => {
                    let stopped = self.run_shard(shard, &mut stop).await?;
                    if stopped {
                        return Ok(self.summary);
                    }
                }
                Some(wire::lease_response::Action::WaitMs(ms)) => {
                    let wait = Duration::from_millis(ms.clamp(10, 10_000) as u64);
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = stop.changed() => {}
                    }
                }
                Some(wire::lease_response::Action::Drain(_)) | None => {
                    tracing::info!("coordinator says drain: exiting");
                    self.summary.drained_by_coordinator = true;
                    return Ok(self.summary);
                }
            }
        }
    }

    /// Runs one shard. Returns true when the agent should stop (signal).
    async fn run_shard(
        &mut self,
        shard: wire::Shard,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<bool, AgentError> {
        let lease_id = shard.lease_id.clone();
        let mut cases = Vec::with_capacity(shard.cases.len());
        for c in shard.cases {
            match BenchCase::try_from(c) {
                Ok(c) => cases.push(c),
                Err(e) => {
                    return Err(AgentError::Refused(format!(
                        "the coordinator sent a case this agent cannot read ({e})"
                    )))
                }
            }
        }
        for (i, case) in cases.iter().enumerate() {
            if *stop.borrow() {
                self.release(&lease_id, "agent stopping (signal)").await;
                return Ok(true);
            }
            let (measurement, lease_lost) = self.run_case_heartbeating(case, &lease_id).await?;
            self.summary.cases_run += 1;
            let wire_m: wire::CaseMeasurement = (&measurement).into();
            let lid = lease_id.clone();
            let resp = match self
                .call(move |mut c, id| {
                    let req = wire::ReportRequest {
                        agent_id: id,
                        lease_id: lid.clone(),
                        measurement: Some(wire_m.clone()),
                    };
                    async move { c.report(req).await.map(|r| r.into_inner()) }
                })
                .await
            {
                Ok(r) => r,
                Err(AgentError::Rejected(why)) => {
                    // The coordinator will never take this result; the case is counted as
                    // missing there and reported at the end of the run. Carry on.
                    tracing::error!(case = %case.id, %why, "result rejected by the coordinator");
                    continue;
                }
                Err(e) => return Err(e),
            };
            if resp.accepted {
                self.summary.results_accepted += 1;
            } else {
                self.summary.duplicates += 1;
            }
            let lost = {
                let b = self.backend.lock().unwrap_or_else(|e| e.into_inner());
                b.needs_restart()
            };
            if lost {
                self.release(&lease_id, "device lost; agent restarting")
                    .await;
                return Err(AgentError::DeviceLost(format!(
                    "after case {}, the CUDA context cannot be rebuilt in this process",
                    case.id
                )));
            }
            if lease_lost || !resp.lease_valid {
                tracing::warn!(lease = %lease_id, skipped = cases.len() - i - 1, "lease no longer held; dropping the rest of the shard");
                return Ok(false);
            }
            if resp.drain || self.drain_requested {
                // The coordinator is done or shutting down: hand back what is left and exit
                // without asking for more work.
                self.release(&lease_id, "coordinator asked to drain").await;
                self.summary.drained_by_coordinator = true;
                return Ok(true);
            }
        }
        Ok(false)
    }

    async fn release(&mut self, lease_id: &str, reason: &str) {
        let lid = lease_id.to_string();
        let reason = reason.to_string();
        let r = self
            .call(move |mut c, id| {
                let req = wire::ReleaseRequest {
                    agent_id: id,
                    lease_id: lid.clone(),
                    reason: reason.clone(),
                };
                async move { c.release(req).await.map(|r| r.into_inner()) }
            })
            .await;
        match r {
            Ok(r) => self.summary.released += r.cases_returned as u64,
            Err(e) => tracing::warn!(error = %e, "could not hand the lease back; it will expire"),
        }
    }

    /// Runs one case on a blocking thread while heartbeating its lease.
    async fn run_case_heartbeating(
        &mut self,
        case: &BenchCase,
        lease_id: &str,
    ) -> Result<(CaseMeasurement, bool), AgentError> {
        let backend = self.backend.clone();
        let probe = self.probe.clone();
        let c = case.clone();
        tracing::debug!(case = %case.id, label = %case.label(), "running case");
        let mut task = tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let mut b = backend.lock().unwrap_or_else(|e| e.into_inner());
            let mut p = probe.lock().unwrap_or_else(|e| e.into_inner());
            let mut m = crate::gating::run_gated(
                b.as_mut(),
                p.as_mut(),
                &c,
                crate::gating::THROTTLE_COOLDOWN,
            );
            m.case_id = c.id.clone();
            if m.wall_s == 0.0 {
                m.wall_s = started.elapsed().as_secs_f64();
            }
            m
        });
        let mut ticker = tokio::time::interval(self.heartbeat_interval);
        ticker.tick().await;
        let mut lease_lost = false;
        loop {
            tokio::select! {
                r = &mut task => {
                    let m = r.map_err(|e| AgentError::Backend(format!("case {} crashed the backend task: {e}", case.id)))?;
                    return Ok((m, lease_lost));
                }
                _ = ticker.tick() => {
                    let req = wire::HeartbeatRequest {
                        agent_id: self.agent_id.clone(),
                        lease_id: lease_id.to_string(),
                        current_case_id: case.id.clone(),
                    };
                    let mut c = self.client.clone();
                    match c.heartbeat(req).await {
                        Ok(r) => {
                            let r = r.into_inner();
                            if !r.lease_valid {
                                lease_lost = true;
                            }
                            if r.drain {
                                self.drain_requested = true;
                            }
                        }
                        Err(s) => tracing::debug!(error = %s.message(), "heartbeat failed; will retry"),
                    }
                }
            }
        }
    }
}

fn make_client(cfg: &AgentConfig) -> Result<Client, AgentError> {
    let addr_err = |reason: String| AgentError::Address {
        addr: cfg.coordinator.clone(),
        reason,
    };
    let mut endpoint = Endpoint::from_shared(cfg.coordinator.clone())
        .map_err(|e| addr_err(e.to_string()))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(RPC_TIMEOUT)
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_while_idle(true);
    if let Some(tls) = &cfg.tls {
        let mut t = ClientTlsConfig::new();
        if let Some(ca) = &tls.ca_pem {
            t = t.ca_certificate(Certificate::from_pem(ca));
        }
        if let Some((cert, key)) = &tls.identity {
            t = t.identity(Identity::from_pem(cert, key));
        }
        if let Some(d) = &tls.domain {
            t = t.domain_name(d.clone());
        }
        endpoint = endpoint
            .tls_config(t)
            .map_err(|e| AgentError::Tls(e.to_string()))?;
    }
    let channel = endpoint.connect_lazy();
    let token = match &cfg.token {
        Some(t) => Some(
            format!("Bearer {t}")
                .parse::<MetadataValue<_>>()
                .map_err(|_| {
                    AgentError::Refused(
                        "the token contains characters not allowed in an HTTP header".into(),
                    )
                })?,
        ),
        None => None,
    };
    Ok(
        CoordinatorClient::with_interceptor(channel, TokenInterceptor(token))
            .max_decoding_message_size(4 * 1024 * 1024)
            .max_encoding_message_size(4 * 1024 * 1024),
    )
}
