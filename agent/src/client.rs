//! The agent's work loop: connect (retrying while the coordinator is not up yet), register, then
//! pull shards, run each case on the backend while heartbeating, and report every result as it
//! finishes. It survives a coordinator restart (re-registers) and drains on request.
//!
//! Stopping: every wait for the coordinator (the first registration, and the backoff of a call
//! that keeps failing because the coordinator went away mid-run) also watches the stop channel
//! given to [`Agent::run`]. A stop while the coordinator cannot be reached ends that wait at once:
//! a finished case's report or a lease hand-back gets one last try of at most [`STOP_GRACE`], then
//! the agent returns normally (`Ok`, [`AgentSummary::stopped_while_unreachable`] set), since being
//! told to stop is not a failure; the coordinator re-leases whatever was left once the lease
//! expires. A stop before the agent ever registered returns at once with nothing done.
//!
//! Draining: the coordinator says the run is over in a Lease, heartbeat or Report answer, or, to
//! an agent that registers as the run ends (or re-registers with a restarted coordinator that is
//! ending), in the Register answer itself. Then the agent makes no further call but one brief
//! "leaving" (so that the coordinator, which waits for it, can stop), and returns `Ok`: the
//! coordinator may stop serving right after that answer, so a Lease sent anyway could find it
//! gone and be retried until the connect timeout.

use crate::failpoint::{FailAction, Failpoint, FAILPOINT_ENV};
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
/// Once a stop is requested, how long one last call (reporting the finished case, handing the
/// lease back) may take before the agent gives up on it: well inside Kubernetes' default 30-s
/// termination grace period, even for a coordinator that accepts connections but never answers.
pub const STOP_GRACE: Duration = Duration::from_secs(5);
/// The shortest `--connect-timeout-s`.
pub const MIN_CONNECT_TIMEOUT_S: f64 = 1.0;
/// Longest wait for the answer to the heartbeat that names a case before it runs (see
/// `run_case_heartbeating`): on a healthy link the answer takes a round trip, and a coordinator
/// slower than this does not hold the GPU idle for long.
pub const FIRST_BEAT_WAIT: Duration = Duration::from_secs(2);

#[derive(Debug, Error)]
pub enum AgentError {
    #[error(
        "invalid coordinator address `{addr}`: {reason} (expected a URL such as http://HOST:50051, or https://HOST:50051 with TLS)"
    )]
    Address { addr: String, reason: String },
    #[error("the TLS handshake with the coordinator at {addr} failed: {reason}; {hint}")]
    Handshake {
        addr: String,
        reason: String,
        hint: &'static str,
    },
    #[error("could not reach the coordinator at {addr} for {waited:?}: {last_error}; {hint}")]
    Unreachable {
        addr: String,
        waited: Duration,
        last_error: String,
        /// What to check ([`UNREACHABLE_HINT`], or a more specific one).
        hint: String,
    },
    #[error("the coordinator refused this agent: {0}")]
    Refused(String),
    #[error("the coordinator rejected a request as invalid: {0}")]
    Rejected(String),
    #[error("TLS set-up: {0}")]
    Tls(String),
    #[error("the backend task failed: {0}")]
    Backend(String),
    #[error("{0}")]
    Failpoint(String),
    #[error("the device is in an unrecoverable state ({0}); this agent exits so that a fresh process (a restarted pod or agent) takes over; its unfinished cases go to other agents")]
    DeviceLost(String),
    /// A stop was requested while the coordinator could not be reached, so the agent stopped
    /// waiting for it. [`Agent::run`] does not return this (it logs it and returns `Ok`, as for
    /// any stop); [`Agent::connect_with_stop`] does when stopped before registering.
    #[error(
        "stopped on request while waiting for the coordinator at {addr} (last error: {last_error})"
    )]
    Stopped { addr: String, last_error: String },
    /// The coordinator said at registration that the run is over (`RegisterResponse.drain`).
    /// [`Agent::run`] does not return this (it returns `Ok`, with
    /// [`AgentSummary::drained_by_coordinator`] set); it ends the calls that led to it.
    #[error("the coordinator says the run is over: there is no work left for this agent")]
    RunOver,
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
    /// How long to keep retrying a coordinator that cannot be reached, at start-up and mid-run,
    /// before giving up with [`AgentError::Unreachable`]. Zero means "try once". The CLI takes
    /// at least [`MIN_CONNECT_TIMEOUT_S`] (see [`parse_connect_timeout_s`]).
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
    /// The agent registered with the coordinator (false: stopped before it could).
    pub registered: bool,
    /// A stop came while the coordinator could not be reached, and the agent left without it:
    /// a result it could not report, or a lease it could not hand back, returns to the pool
    /// when the lease expires.
    pub stopped_while_unreachable: bool,
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
    decodebench_proto::error_chain(s.message().to_string(), std::error::Error::source(s))
}

/// Retry pacing for one call that keeps failing transiently: exponential delays up to
/// [`BACKOFF_MAX`], giving up once the connect timeout has passed since the first failure.
struct Backoff {
    started: Instant,
    delay: Duration,
    limit: Duration,
    /// TLS without a client certificate (see [`unreachable_hint`]).
    tls_without_client_cert: bool,
}

impl Backoff {
    fn new(limit: Duration, tls: Option<&ClientTls>) -> Backoff {
        Backoff {
            started: Instant::now(),
            delay: BACKOFF_START,
            limit,
            tls_without_client_cert: tls.is_some_and(|t| t.identity.is_none()),
        }
    }

    /// After the transient failure `s`: sleeps before the next try, or says the coordinator is
    /// unreachable (the connect timeout has passed) or that the agent is stopping.
    ///
    /// A stop already requested ends it at once: the attempt that just failed was the last one
    /// (see [`with_grace`]). A stop arriving during the sleep ends the sleep; `on_stop` says
    /// whether to give up right away ([`OnStop::Abort`]) or make one last try ([`OnStop::LastTry`]).
    async fn wait_after(
        &mut self,
        s: &Status,
        addr: &str,
        stop: &mut watch::Receiver<bool>,
        on_stop: OnStop,
    ) -> Result<(), AgentError> {
        let stopped = || AgentError::Stopped {
            addr: addr.to_string(),
            last_error: describe(s),
        };
        if *stop.borrow() {
            return Err(stopped());
        }
        if self.started.elapsed() >= self.limit {
            return Err(AgentError::Unreachable {
                addr: addr.to_string(),
                waited: self.started.elapsed(),
                last_error: describe(s),
                hint: unreachable_hint(self.tls_without_client_cert, &describe(s)),
            });
        }
        tracing::info!(retry_in = ?self.delay, error = %describe(s), "coordinator not reachable; retrying");
        tokio::select! {
            _ = tokio::time::sleep(self.delay) => {}
            _ = until_stopped(stop) => {
                if on_stop == OnStop::Abort {
                    return Err(stopped());
                }
            }
        }
        self.delay = (self.delay * 2).min(BACKOFF_MAX);
        Ok(())
    }
}

/// What an unreachable coordinator's error says to check, unless something more specific is known.
pub const UNREACHABLE_HINT: &str = "is it running and reachable?";

/// Whether an error says the peer closed or reset a connection that had been made (as opposed to
/// one that could not be made at all).
fn closed_by_peer(error: &str) -> bool {
    let e = error.to_ascii_lowercase();
    [
        "connection closed",
        "broken pipe",
        "connection reset",
        "unexpected eof",
        "unexpectedeof",
    ]
    .iter()
    .any(|needle| e.contains(needle))
}

/// The hint for an agent with TLS but no client certificate whose connections were closed by the
/// coordinator: under TLS 1.3 a server that requires a client certificate (`--tls-client-ca`)
/// refuses after the client's side of the handshake has finished, so the refusal can arrive as a
/// closed connection instead of a handshake error (which [`handshake_problem`] explains at once).
fn unreachable_hint(tls_without_client_cert: bool, last_error: &str) -> String {
    if tls_without_client_cert && closed_by_peer(last_error) {
        "the coordinator closed the connection right after the TLS handshake: if it was started \
         with --tls-client-ca it requires a client certificate, so pass --tls-cert and --tls-key \
         (signed by that CA); otherwise check that it is running and reachable"
            .to_string()
    } else {
        UNREACHABLE_HINT.to_string()
    }
}

/// What a stop does to a call that is waiting for the coordinator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OnStop {
    /// Give up at once: nothing is lost (the first registration).
    Abort,
    /// One last try of at most [`STOP_GRACE`]: a finished case's report, a lease hand-back.
    LastTry,
}

impl OnStop {
    fn grace(self) -> Duration {
        match self {
            OnStop::Abort => Duration::ZERO,
            OnStop::LastTry => STOP_GRACE,
        }
    }
}

/// Resolves once `stop` is true; never, if its sender is gone without having said so.
async fn until_stopped(stop: &mut watch::Receiver<bool>) {
    if stop.wait_for(|s| *s).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Runs one RPC attempt; once a stop is requested (before or during it), the attempt gets at
/// most `grace` more before it counts as a transient failure.
async fn with_grace<T>(
    attempt: impl std::future::Future<Output = Result<T, Status>>,
    stop: &mut watch::Receiver<bool>,
    grace: Duration,
) -> Result<T, Status> {
    tokio::pin!(attempt);
    tokio::select! {
        biased;
        r = &mut attempt => return r,
        _ = until_stopped(stop) => {}
    }
    match tokio::time::timeout(grace, attempt).await {
        Ok(r) => r,
        Err(_) => Err(Status::cancelled("abandoned: the agent is stopping")),
    }
}

/// A transport error that no retry can fix: the address itself is unusable.
fn is_bad_address(s: &Status) -> bool {
    describe(s).contains("invalid URI")
}

/// A failed TLS handshake or a plaintext/TLS mismatch: retrying cannot help, the set-up must
/// change. The hint says which part.
fn handshake_problem(s: &Status) -> Option<&'static str> {
    let text = describe(s);
    let has = |needle: &str| text.contains(needle);
    if has("InvalidContentType") || has("corrupt message") {
        Some("the coordinator does not speak TLS here: use http:// (or start it with --tls-cert/--tls-key)")
    } else if has("h2 protocol error") {
        Some("an http:// client talking to a TLS coordinator gets this: if the coordinator uses TLS, connect with https:// and --tls-ca")
    } else if has("UnknownIssuer") || has("UnknownCA") || has("invalid peer certificate") {
        Some("the coordinator's certificate does not chain to the CA given: pass its CA with --tls-ca (and the name it is issued for with --tls-domain)")
    } else if has("not valid for name") || has("NotValidForName") {
        Some("the certificate is issued for another name: connect by that name or pass it with --tls-domain")
    } else if has("CertificateRequired") || has("BadCertificate") || has("certificate required") {
        Some("the coordinator requires a client certificate it trusts: pass --tls-cert and --tls-key signed by its --tls-client-ca")
    } else {
        None
    }
}

fn is_transient(s: &Status) -> bool {
    !is_bad_address(s)
        && handshake_problem(s).is_none()
        && matches!(
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
    /// The Register answer said the run is over: make no call but a last "leaving".
    run_over: bool,
    /// A shard is being worked on (its lease held, results perhaps not yet reported): what a stop
    /// while the coordinator is unreachable leaves behind.
    holding_lease: bool,
    /// Turns true when the agent should stop (set by [`Agent::run`]; never, before).
    stop: watch::Receiver<bool>,
    /// A fault drill (`DECODEBENCH_FAILPOINT`), armed for tests and drills only.
    failpoint: Option<Failpoint>,
}

impl Agent {
    /// Checks the configuration (the coordinator URL above all) and prepares the connection,
    /// without waiting for the coordinator: the agent registers when [`Agent::run`] starts,
    /// retrying with backoff until `connect_timeout`, and gives up at once on a stop request.
    /// (Use [`Agent::connect_with_stop`] to register before `run`.)
    pub async fn connect(
        cfg: AgentConfig,
        backend: Box<dyn Backend>,
        probe: Box<dyn TelemetryProbe>,
    ) -> Result<Agent, AgentError> {
        let client = make_client(&cfg)?;
        let (_never, stop) = watch::channel(false);
        let failpoint = Failpoint::from_env().map_err(AgentError::Failpoint)?;
        if let Some(f) = &failpoint {
            tracing::warn!(failpoint = %f, "{FAILPOINT_ENV} is set: this agent will fail on purpose at that case (a fault drill); unset it for a real run");
        }
        Ok(Agent {
            cfg,
            backend: Arc::new(Mutex::new(backend)),
            probe: Arc::new(Mutex::new(probe)),
            client,
            agent_id: String::new(),
            heartbeat_interval: Duration::from_secs(10),
            summary: AgentSummary::default(),
            drain_requested: false,
            run_over: false,
            holding_lease: false,
            stop,
            failpoint,
        })
    }

    /// [`Agent::connect`], then registers now (retrying with backoff until `connect_timeout`);
    /// a stop request ends the wait at once with [`AgentError::Stopped`]. When the coordinator
    /// answers that the run is over, the agent is returned all the same: [`Agent::run`] then
    /// returns at once.
    pub async fn connect_with_stop(
        cfg: AgentConfig,
        backend: Box<dyn Backend>,
        probe: Box<dyn TelemetryProbe>,
        stop: watch::Receiver<bool>,
    ) -> Result<Agent, AgentError> {
        let mut agent = Agent::connect(cfg, backend, probe).await?;
        agent.stop = stop;
        if *agent.stop.borrow() {
            return Err(agent.stopped_before_registering());
        }
        match agent.register(OnStop::Abort).await {
            Ok(()) | Err(AgentError::RunOver) => Ok(agent),
            Err(e) => Err(e),
        }
    }

    /// The stop came before the first attempt to register.
    fn stopped_before_registering(&self) -> AgentError {
        AgentError::Stopped {
            addr: self.cfg.coordinator.clone(),
            last_error: "none, the stop came before the first attempt".into(),
        }
    }

    /// The error of a call that no retry can fix, because the set-up is wrong: a malformed
    /// address, or a TLS handshake that fails (the hint says which flag to change).
    fn set_up_error(&self, s: &Status) -> Option<AgentError> {
        let addr = self.cfg.coordinator.clone();
        if is_bad_address(s) {
            return Some(AgentError::Address {
                addr,
                reason: describe(s),
            });
        }
        handshake_problem(s).map(|hint| AgentError::Handshake {
            addr,
            reason: describe(s),
            hint,
        })
    }

    fn device(&self) -> wire::DeviceIdentity {
        let b = self.backend.lock().unwrap_or_else(|e| e.into_inner());
        b.identity().into()
    }

    /// Registers (again, after a coordinator restart), retrying transient failures until the
    /// connect timeout; `on_stop` says what a stop request does to the wait. Returns
    /// [`AgentError::RunOver`] when the answer says the run is over.
    async fn register(&mut self, on_stop: OnStop) -> Result<(), AgentError> {
        let device = self.device();
        let req = wire::RegisterRequest {
            protocol_version: PROTOCOL_VERSION,
            agent_version: self.cfg.version.clone(),
            agent_name: self.cfg.name.clone(),
            device: Some(device),
        };
        let mut backoff = Backoff::new(self.cfg.connect_timeout, self.cfg.tls.as_ref());
        let mut stop = self.stop.clone();
        loop {
            let mut c = self.client.clone();
            let attempt = c.register(req.clone());
            match with_grace(attempt, &mut stop, on_stop.grace()).await {
                Ok(r) => {
                    let r = r.into_inner();
                    self.agent_id = r.agent_id;
                    self.summary.registered = true;
                    self.heartbeat_interval =
                        Duration::from_millis(r.heartbeat_interval_ms.max(100) as u64);
                    tracing::info!(agent = %self.agent_id, run = %r.run_id, "registered with the coordinator");
                    if r.drain {
                        tracing::info!(
                            "coordinator says drain at registration: the run is over; exiting"
                        );
                        self.run_over = true;
                        self.summary.drained_by_coordinator = true;
                        return Err(AgentError::RunOver);
                    }
                    return Ok(());
                }
                Err(s) => {
                    if let Some(e) = self.set_up_error(&s) {
                        return Err(e);
                    }
                    if !is_transient(&s) {
                        return Err(AgentError::Refused(s.message().to_string()));
                    }
                    backoff
                        .wait_after(&s, &self.cfg.coordinator, &mut stop, on_stop)
                        .await?;
                }
            }
        }
    }

    /// Calls `f` until it succeeds, retrying transient errors with backoff (up to the connect
    /// timeout) and re-registering when the coordinator no longer knows this agent. Once a stop
    /// is requested, it makes one last try of at most [`STOP_GRACE`], then returns
    /// [`AgentError::Stopped`]. A re-registration answered "the run is over" ends it with
    /// [`AgentError::RunOver`], without calling `f` again.
    async fn call<T, F, Fut>(&mut self, mut f: F) -> Result<T, AgentError>
    where
        F: FnMut(Client, String) -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        let mut backoff = Backoff::new(self.cfg.connect_timeout, self.cfg.tls.as_ref());
        let mut stop = self.stop.clone();
        loop {
            let attempt = f(self.client.clone(), self.agent_id.clone());
            match with_grace(attempt, &mut stop, STOP_GRACE).await {
                Ok(v) => return Ok(v),
                Err(s) if s.code() == Code::NotFound && s.message().contains("unknown agent") => {
                    tracing::warn!(
                        "the coordinator does not know this agent (restarted?): registering again"
                    );
                    self.register(OnStop::LastTry).await?;
                }
                Err(s) => {
                    if let Some(e) = self.set_up_error(&s) {
                        return Err(e);
                    }
                    if !is_transient(&s) {
                        return Err(if s.code() == Code::InvalidArgument {
                            AgentError::Rejected(s.message().to_string())
                        } else {
                            AgentError::Refused(format!("{:?}: {}", s.code(), s.message()))
                        });
                    }
                    backoff
                        .wait_after(&s, &self.cfg.coordinator, &mut stop, OnStop::LastTry)
                        .await?;
                }
            }
        }
    }

    /// Registers (unless [`Agent::connect_with_stop`] did), then pulls and runs shards until the
    /// coordinator says drain or `stop` turns true (then finishes the current case, hands the
    /// rest of the lease back and returns).
    ///
    /// A stop is not an error: it returns `Ok`, also when it came while the coordinator could
    /// not be reached (before registering, or mid-run); then it stops waiting at once (after one
    /// last try of at most [`STOP_GRACE`] to report a finished case or hand a lease back), says
    /// so in the log and sets [`AgentSummary::stopped_while_unreachable`].
    pub async fn run(mut self, stop: watch::Receiver<bool>) -> Result<AgentSummary, AgentError> {
        self.stop = stop;
        match self.work().await {
            Ok(()) => {
                if self.run_over {
                    // A lease hand-back re-registered with a coordinator that is ending.
                    self.say_leaving("the coordinator said at registration that the run is over")
                        .await;
                } else if *self.stop.borrow() && self.summary.registered && !self.holding_lease {
                    self.say_leaving("agent stopping (signal)").await;
                }
                Ok(self.summary)
            }
            Err(AgentError::Stopped { addr, last_error }) => {
                self.summary.stopped_while_unreachable = true;
                if self.holding_lease {
                    tracing::warn!(coordinator = %addr, %last_error, "stop requested while the coordinator cannot be reached: exiting without waiting for it; a result not reported and cases not handed back return to other agents when this agent's lease expires");
                } else if self.summary.registered {
                    tracing::warn!(coordinator = %addr, %last_error, "stop requested while the coordinator cannot be reached: exiting; this agent held no lease, so nothing is lost");
                } else {
                    tracing::warn!(coordinator = %addr, %last_error, "stop requested before this agent could register with the coordinator: exiting; it took no work, so nothing is lost");
                }
                Ok(self.summary)
            }
            Err(AgentError::RunOver) => {
                self.say_leaving("the coordinator said at registration that the run is over")
                    .await;
                Ok(self.summary)
            }
            Err(e) => Err(e),
        }
    }

    async fn work(&mut self) -> Result<(), AgentError> {
        let mut stop = self.stop.clone();
        if self.run_over {
            // connect_with_stop registered, and heard that the run is over.
            return Err(AgentError::RunOver);
        }
        if self.agent_id.is_empty() {
            if *stop.borrow() {
                return Err(self.stopped_before_registering());
            }
            self.register(OnStop::Abort).await?;
        }
        loop {
            if *stop.borrow() {
                return Ok(());
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
                    self.holding_lease = true;
                    let stopped = self.run_shard(shard, &mut stop).await?;
                    self.holding_lease = false;
                    if stopped {
                        return Ok(());
                    }
                }
                Some(wire::lease_response::Action::WaitMs(ms)) => {
                    let wait = Duration::from_millis(ms.clamp(10, 10_000) as u64);
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = until_stopped(&mut stop) => {}
                    }
                }
                Some(wire::lease_response::Action::Drain(_)) | None => {
                    tracing::info!("coordinator says drain: exiting");
                    self.summary.drained_by_coordinator = true;
                    return Ok(());
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
                    // The coordinator will never take this result; it counts the refusal as a
                    // failed attempt of the case (recorded failed, with the reason, after
                    // --max-attempts). Sending the same bytes again would be refused again: carry
                    // on with the next case.
                    tracing::error!(case = %case.id, %why, "result rejected by the coordinator");
                    continue;
                }
                Err(AgentError::RunOver) => {
                    tracing::warn!(case = %case.id, "the coordinator, which no longer knew this agent (restarted?), says the run is over: this case's result is not reported (if the run lacks it, a resumed run measures the case again)");
                    return Err(AgentError::RunOver);
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

    /// Tells the coordinator that this agent, stopping while holding no lease, is leaving (so
    /// that `status` stops counting it at once, and a draining coordinator stops waiting for it).
    /// One attempt, briefly: a stop must stay prompt, and an agent told that the run is over
    /// exits whether or not this gets through.
    async fn say_leaving(&mut self, reason: &str) {
        let req = wire::ReleaseRequest {
            agent_id: self.agent_id.clone(),
            lease_id: String::new(),
            reason: reason.into(),
            leaving: true,
        };
        let mut c = self.client.clone();
        match tokio::time::timeout(Duration::from_secs(1), c.release(req)).await {
            Ok(Ok(_)) => tracing::info!("told the coordinator that this agent is leaving"),
            Ok(Err(s)) => {
                tracing::debug!(error = %s.message(), "could not say this agent is leaving")
            }
            Err(_) => tracing::debug!("could not say this agent is leaving in time"),
        }
    }

    async fn release(&mut self, lease_id: &str, reason: &str) {
        let lid = lease_id.to_string();
        let reason = reason.to_string();
        let r = self
            .call(move |mut c, id| {
                // Every hand-back is the agent's last word (a signal, a drain, a lost device).
                let req = wire::ReleaseRequest {
                    agent_id: id,
                    lease_id: lid.clone(),
                    reason: reason.clone(),
                    leaving: true,
                };
                async move { c.release(req).await.map(|r| r.into_inner()) }
            })
            .await;
        match r {
            Ok(r) => self.summary.released += r.cases_returned as u64,
            Err(AgentError::RunOver) => tracing::info!(
                "the coordinator, which no longer knew this agent (restarted?), says the run is \
                 over: nothing to hand back"
            ),
            Err(e) => tracing::warn!(error = %e, "could not hand the lease back; it will expire"),
        }
    }

    /// Takes in a heartbeat's answer: a drain request is kept; returns whether the lease is lost.
    fn take_heartbeat_answer(&mut self, r: wire::HeartbeatResponse) -> bool {
        self.drain_requested |= r.drain;
        !r.lease_valid
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
        let failpoint = self.failpoint.clone().filter(|f| f.matches(&case.id));
        // The case is named to the coordinator before it starts, and the answer awaited (briefly):
        // if the case kills this process at once (a segfault, an abort, the OOM killer), the
        // coordinator already suspects it, not the case before it in the lease. A coordinator
        // slow to answer delays the case by at most FIRST_BEAT_WAIT; the beat is not repeated.
        let mut lease_lost = false;
        let beat = |agent: &Self| wire::HeartbeatRequest {
            agent_id: agent.agent_id.clone(),
            lease_id: lease_id.to_string(),
            current_case_id: case.id.clone(),
        };
        let mut client = self.client.clone();
        match tokio::time::timeout(FIRST_BEAT_WAIT, client.heartbeat(beat(self))).await {
            Ok(Ok(r)) => lease_lost |= self.take_heartbeat_answer(r.into_inner()),
            Ok(Err(s)) => {
                tracing::debug!(error = %s.message(), "heartbeat failed; will retry")
            }
            Err(_) => tracing::debug!(
                wait_ms = FIRST_BEAT_WAIT.as_millis() as u64,
                "the coordinator did not answer the case's first heartbeat in time; running it anyway"
            ),
        }
        tracing::debug!(case = %case.id, label = %case.label(), "running case");
        let mut task = tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let mut b = backend.lock().unwrap_or_else(|e| e.into_inner());
            let mut p = probe.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(f) = failpoint {
                if let Some(m) = trigger(&f, &c, b.as_mut()) {
                    return m;
                }
            }
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
        // Then a heartbeat every interval while the case runs.
        let mut ticker = tokio::time::interval_at(
            tokio::time::Instant::now() + self.heartbeat_interval,
            self.heartbeat_interval,
        );
        loop {
            tokio::select! {
                r = &mut task => {
                    let m = r.map_err(|e| AgentError::Backend(format!("case {} crashed the backend task: {e}", case.id)))?;
                    return Ok((m, lease_lost));
                }
                _ = ticker.tick() => {
                    let req = beat(self);
                    let mut c = self.client.clone();
                    // A coordinator that hangs must not hold the finished case back for the
                    // whole RPC timeout: the case ending abandons the heartbeat.
                    let beat = tokio::select! {
                        biased;
                        r = &mut task => {
                            let m = r.map_err(|e| AgentError::Backend(format!("case {} crashed the backend task: {e}", case.id)))?;
                            return Ok((m, lease_lost));
                        }
                        b = c.heartbeat(req) => b,
                    };
                    match beat {
                        Ok(r) => lease_lost |= self.take_heartbeat_answer(r.into_inner()),
                        Err(s) => tracing::debug!(error = %s.message(), "heartbeat failed; will retry"),
                    }
                }
            }
        }
    }
}

/// Carries out an armed failpoint at its case (see [`crate::failpoint`]); returns what to report
/// instead of running the case, if anything.
fn trigger(f: &Failpoint, case: &BenchCase, backend: &mut dyn Backend) -> Option<CaseMeasurement> {
    let case_id = &case.id;
    match f.action {
        FailAction::Abort => {
            tracing::error!(case = %case_id, failpoint = %f, "fault drill: aborting this agent process");
            std::process::abort();
        }
        FailAction::DeviceFault => match backend.inject_device_fault() {
            Ok(what) => {
                tracing::error!(case = %case_id, failpoint = %f, %what, "fault drill: device fault injected")
            }
            Err(why) => {
                tracing::error!(case = %case_id, failpoint = %f, %why, "fault drill: no device fault injected")
            }
        },
        FailAction::Fail => {
            tracing::error!(case = %case_id, failpoint = %f, "fault drill: reporting this case failed without running it");
            return Some(f.injected_failure(case));
        }
        FailAction::Disturb => match backend.disturb_next_case() {
            Ok(what) => {
                tracing::error!(case = %case_id, failpoint = %f, %what, "fault drill: kernel calls disturbed")
            }
            Err(why) => {
                tracing::error!(case = %case_id, failpoint = %f, %why, "fault drill: nothing disturbed")
            }
        },
    }
    None
}

/// Parses `--connect-timeout-s`: a number of seconds, at least [`MIN_CONNECT_TIMEOUT_S`]. Zero is
/// refused rather than taken to mean "the default" or "forever".
pub fn parse_connect_timeout_s(text: &str) -> Result<f64, String> {
    let v: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("`{text}` is not a number of seconds"))?;
    if !v.is_finite() {
        return Err(format!("`{text}` is not a number of seconds"));
    }
    if v < MIN_CONNECT_TIMEOUT_S {
        return Err(format!(
            "must be at least {MIN_CONNECT_TIMEOUT_S} second (got {text})"
        ));
    }
    Duration::try_from_secs_f64(v).map_err(|_| format!("{text} seconds is too long"))?;
    Ok(v)
}

/// Checks a coordinator URL before any attempt to reach it: the scheme must be http or https
/// (https with TLS), with a host and a port, e.g. `http://HOST:50051`. A bad address is reported
/// at once, rather than retried until the connect timeout as if the coordinator were down.
pub fn check_coordinator_url(addr: &str) -> Result<(), AgentError> {
    coordinator_url_problem(addr).map_or(Ok(()), |reason| {
        Err(AgentError::Address {
            addr: addr.to_string(),
            reason,
        })
    })
}

/// What is wrong with a coordinator URL, if anything.
fn coordinator_url_problem(addr: &str) -> Option<String> {
    use tonic::codegen::http::Uri;
    if addr.trim().is_empty() {
        return Some("it is empty".into());
    }
    if addr.trim() != addr {
        return Some("it has spaces around it".into());
    }
    let uri: Uri = match addr.parse() {
        Ok(u) => u,
        Err(_) if addr.ends_with("://") => return Some("the host and port are missing".into()),
        Err(e) => return Some(format!("not a URL ({e})")),
    };
    let Some(scheme) = uri.scheme_str() else {
        // `127.0.0.1:50051`, `coordinator:50051`: a host and port without a scheme.
        return Some(match uri.authority() {
            Some(a) if a.port().is_some() && !a.host().is_empty() => {
                format!("the scheme is missing (did you mean `http://{addr}`?)")
            }
            Some(_) => "the scheme (http:// or https://) and the port are missing".into(),
            None => "it is not a URL with a scheme, a host and a port".into(),
        });
    };
    if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
        return Some(format!(
            "the scheme `{scheme}` is not supported: use http:// (or https:// with TLS)"
        ));
    }
    if !addr.starts_with("http://") && !addr.starts_with("https://") {
        // The CLI turns TLS on for a URL that starts with `https://`, as written.
        return Some(format!(
            "write the scheme in lower case (`{}://`)",
            scheme.to_ascii_lowercase()
        ));
    }
    let Some(authority) = uri.authority() else {
        return Some("the host and port are missing".into());
    };
    if authority.host().is_empty() {
        return Some("the host is missing".into());
    }
    match authority.port_u16() {
        None => {
            return Some(format!(
                "the port is missing (e.g. `{scheme}://{}:50051`)",
                authority.host()
            ))
        }
        Some(0) => return Some("port 0 cannot be connected to".into()),
        Some(_) => {}
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Some(format!(
            "a coordinator address has no path or query (`{}`)",
            uri.path_and_query().map_or("", |p| p.as_str())
        ));
    }
    None
}

/// tonic's TLS configuration for a client of the coordinator (the agent, `decodebench status`).
pub fn client_tls_config(tls: &ClientTls) -> ClientTlsConfig {
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
    t
}

fn make_client(cfg: &AgentConfig) -> Result<Client, AgentError> {
    check_coordinator_url(&cfg.coordinator)?;
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
        endpoint = endpoint
            .tls_config(client_tls_config(tls))
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

#[cfg(test)]
mod tests {
    use super::*;
    use decodebench_proto::wire::coordinator_server::{Coordinator, CoordinatorServer};
    use std::sync::atomic::{AtomicU32, Ordering};
    use tonic::Response;

    fn config(coordinator: String, connect_timeout: Duration) -> AgentConfig {
        AgentConfig {
            coordinator,
            name: "test-agent".into(),
            token: None,
            tls: None,
            connect_timeout,
            version: "test".into(),
        }
    }

    async fn agent(coordinator: String, connect_timeout: Duration) -> Agent {
        let b = crate::backends::open_cpu();
        Agent::connect(config(coordinator, connect_timeout), b.backend, b.probe)
            .await
            .expect("a valid configuration")
    }

    /// A loopback URL that nothing listens on (connections are refused at once).
    fn closed_port_url() -> String {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("binding a loopback port");
        let port = l.local_addr().expect("local address").port();
        drop(l);
        format!("http://127.0.0.1:{port}")
    }

    #[test]
    fn good_coordinator_urls_pass() {
        for url in [
            "http://127.0.0.1:50051",
            "https://coordinator.example.com:443",
            "http://[::1]:50051",
            "http://coordinator:50051/",
        ] {
            assert!(check_coordinator_url(url).is_ok(), "{url}");
        }
    }

    #[test]
    fn bad_coordinator_urls_say_what_is_wrong_and_show_an_example() {
        for (url, says) in [
            ("127.0.0.1:51999", "did you mean `http://127.0.0.1:51999`?"),
            ("coordinator:50051", "scheme is missing"),
            (
                "garbage",
                "scheme (http:// or https://) and the port are missing",
            ),
            ("http://", "host and port are missing"),
            ("http://h:50051 x", "not a URL"),
            ("", "empty"),
            (" http://h:1", "spaces"),
            ("ftp://h:21", "scheme `ftp` is not supported"),
            ("grpc://h:50051", "scheme `grpc` is not supported"),
            ("HTTPS://h:50051", "lower case (`https://`)"),
            (
                "http://coordinator",
                "port is missing (e.g. `http://coordinator:50051`)",
            ),
            ("https://coordinator.example.com", "port is missing"),
            ("http://:50051", "host"),
            ("http://h:0", "port 0"),
            ("http://h:50051/api", "no path"),
            ("http://h:50051?x=1", "no path"),
        ] {
            let e = check_coordinator_url(url).expect_err(url).to_string();
            assert!(e.contains(says), "{url}: {e}");
            assert!(e.contains("http://HOST:50051"), "{url}: {e}");
        }
    }

    #[tokio::test]
    async fn connect_refuses_a_bad_address_at_once() {
        let b = crate::backends::open_cpu();
        let started = Instant::now();
        let r = Agent::connect(
            config("127.0.0.1:51999".into(), Duration::from_secs(300)),
            b.backend,
            b.probe,
        )
        .await;
        assert!(
            matches!(r, Err(AgentError::Address { .. })),
            "{:?}",
            r.err()
        );
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn a_connection_closed_after_tls_without_a_client_certificate_names_the_flags() {
        let h = unreachable_hint(
            true,
            "transport error: connection closed before message completed",
        );
        assert!(
            h.contains("--tls-cert") && h.contains("--tls-client-ca"),
            "{h}"
        );
        assert!(unreachable_hint(true, "h2 protocol error: Broken pipe").contains("--tls-key"));
        // Not without TLS, with a client certificate, or when no connection was made at all.
        assert_eq!(
            unreachable_hint(false, "connection closed"),
            UNREACHABLE_HINT
        );
        assert_eq!(
            unreachable_hint(true, "tcp connect error: Connection refused (os error 111)"),
            UNREACHABLE_HINT
        );
    }

    #[test]
    fn connect_timeout_is_at_least_one_second() {
        for bad in ["0", "0.0", "0.5", "-3", "abc", "", "inf", "NaN", "1e300"] {
            let e = parse_connect_timeout_s(bad).expect_err(bad);
            if matches!(bad, "0" | "0.0" | "0.5" | "-3") {
                assert!(e.contains("must be at least 1 second"), "{bad}: {e}");
            }
        }
        assert_eq!(parse_connect_timeout_s("1"), Ok(1.0));
        assert_eq!(parse_connect_timeout_s("2.5"), Ok(2.5));
        assert_eq!(parse_connect_timeout_s("300"), Ok(300.0));
    }

    #[test]
    fn an_invalid_uri_transport_error_is_not_transient() {
        #[derive(Debug)]
        struct Inner;
        impl std::fmt::Display for Inner {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("invalid URI")
            }
        }
        impl std::error::Error for Inner {}
        let s = Status::from_error(Box::new(Inner));
        assert!(is_bad_address(&s));
        assert!(!is_transient(&s));
        assert!(is_transient(&Status::unavailable("connection refused")));
    }

    #[tokio::test]
    async fn a_stop_ends_the_wait_for_an_unreachable_coordinator() {
        let a = agent(closed_port_url(), Duration::from_secs(300)).await;
        let (tx, rx) = watch::channel(false);
        let run = tokio::spawn(a.run(rx));
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert!(!run.is_finished(), "still retrying before the stop");
        let stopped = Instant::now();
        tx.send(true).expect("the agent listens");
        let summary = tokio::time::timeout(Duration::from_secs(2), run)
            .await
            .expect("the agent returns promptly after a stop")
            .expect("the agent task")
            .expect("a stop is not an error");
        assert!(stopped.elapsed() < Duration::from_secs(2));
        assert!(!summary.registered);
        assert!(summary.stopped_while_unreachable);
        assert_eq!(summary.cases_run, 0);
    }

    #[tokio::test]
    async fn a_stop_before_run_returns_at_once() {
        let a = agent(closed_port_url(), Duration::from_secs(300)).await;
        let (_tx, rx) = watch::channel(true);
        let summary = tokio::time::timeout(Duration::from_secs(1), a.run(rx))
            .await
            .expect("no wait at all")
            .expect("a stop is not an error");
        assert!(!summary.registered);
    }

    #[tokio::test]
    async fn connect_with_stop_gives_up_on_a_stop() {
        let b = crate::backends::open_cpu();
        let (tx, rx) = watch::channel(false);
        let connecting = tokio::spawn(Agent::connect_with_stop(
            config(closed_port_url(), Duration::from_secs(300)),
            b.backend,
            b.probe,
            rx,
        ));
        tokio::time::sleep(Duration::from_millis(500)).await;
        tx.send(true).expect("the agent listens");
        let r = tokio::time::timeout(Duration::from_secs(2), connecting)
            .await
            .expect("connect_with_stop returns promptly after a stop")
            .expect("the task");
        match r {
            Err(e @ AgentError::Stopped { .. }) => {
                assert!(e.to_string().contains("stopped on request"), "{e}")
            }
            other => panic!("expected Stopped, got {:?}", other.err()),
        }
    }

    #[tokio::test]
    async fn without_a_stop_an_unreachable_coordinator_still_times_out() {
        let a = agent(closed_port_url(), Duration::from_secs(1)).await;
        let (_tx, rx) = watch::channel(false);
        let r = tokio::time::timeout(Duration::from_secs(10), a.run(rx))
            .await
            .expect("gives up after the connect timeout");
        assert!(
            matches!(r, Err(AgentError::Unreachable { .. })),
            "{:?}",
            r.err()
        );
    }

    /// A coordinator for the agent's own tests. Serving (`run_over` false): it registers agents,
    /// then answers every lease with "ask again soon". Ending (`run_over` true): it answers
    /// Register with "drain", takes a leaving Release, and answers a Lease as one that has
    /// stopped serving would (unavailable).
    #[derive(Default)]
    struct FakeCoordinator {
        run_over: bool,
        leases: Arc<AtomicU32>,
        leaving: Arc<Mutex<Vec<String>>>,
    }

    #[tonic::async_trait]
    impl Coordinator for FakeCoordinator {
        async fn register(
            &self,
            _: Request<wire::RegisterRequest>,
        ) -> Result<Response<wire::RegisterResponse>, Status> {
            Ok(Response::new(wire::RegisterResponse {
                agent_id: if self.run_over {
                    "agent-late"
                } else {
                    "agent-1"
                }
                .into(),
                protocol_version: PROTOCOL_VERSION,
                run_id: "run".into(),
                heartbeat_interval_ms: 1000,
                lease_timeout_ms: 5000,
                drain: self.run_over,
            }))
        }
        async fn lease(
            &self,
            _: Request<wire::LeaseRequest>,
        ) -> Result<Response<wire::LeaseResponse>, Status> {
            self.leases.fetch_add(1, Ordering::SeqCst);
            if self.run_over {
                return Err(Status::unavailable("the coordinator has stopped serving"));
            }
            Ok(Response::new(wire::LeaseResponse {
                action: Some(wire::lease_response::Action::WaitMs(20)),
            }))
        }
        async fn heartbeat(
            &self,
            _: Request<wire::HeartbeatRequest>,
        ) -> Result<Response<wire::HeartbeatResponse>, Status> {
            Err(Status::unimplemented("not in this test"))
        }
        async fn report(
            &self,
            _: Request<wire::ReportRequest>,
        ) -> Result<Response<wire::ReportResponse>, Status> {
            Err(Status::unimplemented("not in this test"))
        }
        async fn release(
            &self,
            r: Request<wire::ReleaseRequest>,
        ) -> Result<Response<wire::ReleaseResponse>, Status> {
            if !self.run_over {
                return Err(Status::unimplemented("not in this test"));
            }
            let r = r.into_inner();
            if r.leaving && r.lease_id.is_empty() {
                let mut leaving = self.leaving.lock().unwrap_or_else(|e| e.into_inner());
                leaving.push(r.agent_id);
            }
            Ok(Response::new(wire::ReleaseResponse { cases_returned: 0 }))
        }
        async fn status(
            &self,
            _: Request<wire::StatusRequest>,
        ) -> Result<Response<wire::StatusResponse>, Status> {
            Err(Status::unimplemented("not in this test"))
        }
    }

    /// An agent that registers as the run ends is told so in the Register answer. The
    /// coordinator may stop serving right after it, so the agent must ask for no work: it says it
    /// leaves and returns `Ok` at once, drained, whether it registers in `run` or in
    /// `connect_with_stop`. (Asking for a lease, it would retry the gone coordinator until its
    /// connect timeout and fail: a failed Kubernetes pod for no reason.)
    #[tokio::test]
    async fn an_agent_told_at_registration_that_the_run_is_over_exits_cleanly_at_once() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding a loopback port");
        let url = format!("http://{}", listener.local_addr().expect("local address"));
        let coordinator = FakeCoordinator {
            run_over: true,
            ..Default::default()
        };
        let (leases, leaving) = (coordinator.leases.clone(), coordinator.leaving.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(CoordinatorServer::new(coordinator))
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );

        let (_tx, rx) = watch::channel(false);
        let a = agent(url.clone(), Duration::from_secs(300)).await;
        let summary = tokio::time::timeout(Duration::from_secs(5), a.run(rx.clone()))
            .await
            .expect("the agent exits at once, without waiting for a coordinator that is gone")
            .expect("being told the run is over is not an error");
        assert!(summary.registered && summary.drained_by_coordinator);
        assert_eq!(summary.cases_run, 0);

        let b = crate::backends::open_cpu();
        let a = Agent::connect_with_stop(
            config(url, Duration::from_secs(300)),
            b.backend,
            b.probe,
            rx.clone(),
        )
        .await
        .expect("registered, and told the run is over");
        let summary = tokio::time::timeout(Duration::from_secs(5), a.run(rx))
            .await
            .expect("run returns at once")
            .expect("being told the run is over is not an error");
        assert!(summary.drained_by_coordinator);

        assert_eq!(leases.load(Ordering::SeqCst), 0, "no work asked for");
        let leaving = leaving.lock().unwrap_or_else(|e| e.into_inner()).clone();
        assert_eq!(leaving, ["agent-late", "agent-late"], "each said it leaves");
    }

    #[tokio::test]
    async fn a_stop_ends_the_reconnect_wait_after_the_coordinator_is_lost() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding a loopback port");
        let url = format!("http://{}", listener.local_addr().expect("local address"));
        let leases = Arc::new(AtomicU32::new(0));
        let service = CoordinatorServer::new(FakeCoordinator {
            leases: leases.clone(),
            ..Default::default()
        });
        let (down_tx, down_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(
                    tonic::transport::server::TcpIncoming::from(listener),
                    async {
                        let _ = down_rx.await;
                    },
                ),
        );

        let a = agent(url, Duration::from_secs(300)).await;
        let (tx, rx) = watch::channel(false);
        let run = tokio::spawn(a.run(rx));
        // Registered and polling for work; then the coordinator goes away.
        let t = Instant::now();
        while leases.load(Ordering::SeqCst) < 3 {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "the agent never leased"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let _ = down_tx.send(());
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("the server shuts down")
            .expect("server task")
            .expect("server");
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert!(!run.is_finished(), "still retrying before the stop");
        tx.send(true).expect("the agent listens");
        let summary = tokio::time::timeout(Duration::from_secs(2), run)
            .await
            .expect("the agent returns promptly after a stop")
            .expect("the agent task")
            .expect("a stop is not an error");
        assert!(summary.registered);
        assert!(summary.stopped_while_unreachable);
    }
}
