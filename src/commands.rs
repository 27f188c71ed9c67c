//! One function per subcommand. Each returns the process exit code, or an error that `main`
//! prints (the error says what was wrong and what to do).

use crate::cli::*;
use crate::supervise;
use anyhow::{anyhow, bail, Context, Result};
use decodebench_agent::backends::{self, OpenedBackend};
use decodebench_agent::client::{Agent, AgentConfig, ClientTls};
use decodebench_coordinator::analysis::{
    self, CompareOptions, GroupBy, KernelSelection, OutputFormat, ReportOptions,
};
use decodebench_coordinator::grid::Grid;
use decodebench_coordinator::run::{
    serve, CoordinatorConfig, ProgressDisplay, RunSummary, ServerTls,
};
use decodebench_coordinator::scheduler::{FleetRequirement, Placement, SchedulerConfig};
use decodebench_kernels::{workload::REFERENCE_POOL_TOKENS, BenchCase, KvPool, L2Mode, TimingMode};
use std::io::IsTerminal;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;
use tokio::sync::watch;

/// Git revision this binary was built from ("unknown" outside a checkout).
pub const GIT_REVISION: &str = env!("DECODEBENCH_GIT_REVISION");

/// "0.1.0 (abc123def456)": reported by agents and printed by `--version`.
pub fn version_string() -> String {
    format!("{} ({GIT_REVISION})", env!("CARGO_PKG_VERSION"))
}

/// How long `run` waits for its local agents to exit after the coordinator has finished.
const LOCAL_AGENT_EXIT_WAIT: Duration = Duration::from_secs(2);

/// Exit code when the run ended with cases that have no result (interrupted or failed).
pub const EXIT_INCOMPLETE: u8 = 2;
/// Exit code for a self-test mismatch.
pub const EXIT_SELFTEST_FAILED: u8 = 3;
/// Exit code of an agent that could not start (its backend, its flags or its fault drill): a
/// restart would fail the same way, so `run` does not restart it.
pub const EXIT_AGENT_SETUP: u8 = 6;

pub async fn execute(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Run(a) => run(a, &cli.log).await,
        Command::Coordinator(a) => coordinator(a).await,
        Command::Agent(a) => agent(a).await,
        Command::Grid(a) => grid(a),
        Command::Status(a) => status(a).await,
        Command::Selftest(a) => selftest(a),
        Command::Compare(a) => compare(a),
        Command::Report(a) => report(a),
        Command::Precompile(a) => precompile(a),
    }
}

/// Writes command output to stdout. A closed pipe (`decodebench grid ... | head`) is not an
/// error: the reader has what it wanted.
fn emit(text: &str) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|_| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

/// True when `e` is, at bottom, a closed stdout pipe (see [`emit`]).
pub fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    }) || e.to_string().contains("Broken pipe")
}

fn load_grid(src: &GridSource, default_preset: &str) -> Result<Grid> {
    Ok(match (&src.grid, &src.preset) {
        (Some(path), _) => Grid::from_file(path)?,
        (None, Some(name)) => Grid::preset(name)?,
        (None, None) => Grid::preset(default_preset)?,
    })
}

/// Applies command-line method overrides to every case (and recomputes the ids, since the method
/// is part of a case's identity).
pub fn apply_overrides(cases: Vec<BenchCase>, o: &MethodOverrides) -> Result<Vec<BenchCase>> {
    if let Some(t) = o.trials {
        if t == 0 {
            bail!("--trials 0: at least one timed trial is needed");
        }
    }
    if let Some(r) = o.target_rse {
        if !(r > 0.0 && r < 1.0) {
            bail!("--target-rse {r}: give a fraction between 0 and 1, e.g. 0.005 for 0.5 %");
        }
    }
    if let Some(g) = o.graph_launches {
        if g == 0 {
            bail!("--graph-launches 0: a graph needs at least one launch");
        }
    }
    let mut out: Vec<BenchCase> = cases
        .into_iter()
        .map(|mut c| {
            let m = &mut c.method;
            if let Some(v) = o.warmup {
                m.warmup = v;
            }
            if let Some(v) = o.trials {
                m.trials = v;
            }
            if let Some(v) = o.l2 {
                m.l2 = match v {
                    L2Arg::Hot => L2Mode::Hot,
                    L2Arg::Cold => L2Mode::Cold,
                };
            }
            if let Some(v) = o.timing {
                m.timing = match v {
                    TimingArg::Events => TimingMode::Events,
                    TimingArg::Graph => TimingMode::Graph,
                };
            }
            if let Some(v) = o.graph_launches {
                m.graph_launches = v;
            }
            if o.target_rse.is_some() {
                m.target_rse = o.target_rse;
            }
            if let Some(v) = o.max_trials {
                m.max_trials = v;
            }
            if let Some(v) = o.max_time_s {
                m.max_time_s = v;
            }
            if let Some(v) = o.throttle_retries {
                m.throttle_retries = v;
            }
            if let Some(v) = o.kernels {
                m.kernels = match v {
                    KernelArg::Both => KernelSelection::Both,
                    KernelArg::Optimized => KernelSelection::Optimized,
                    KernelArg::Baseline => KernelSelection::Baseline,
                };
            }
            if let Some(p) = o.pool {
                c.pool = match p {
                    PoolArg::Shared => match c.pool {
                        KvPool::Shared { tokens } => KvPool::Shared { tokens },
                        KvPool::Unique => KvPool::Shared {
                            tokens: REFERENCE_POOL_TOKENS,
                        },
                    },
                    PoolArg::Unique => KvPool::Unique,
                };
            }
            c.with_id()
        })
        .collect();
    let mut seen = std::collections::HashSet::new();
    out.retain(|c| seen.insert(c.id.clone()));
    Ok(out)
}

fn scheduler_config(s: &ScheduleArgs) -> Result<SchedulerConfig> {
    if !(s.lease_timeout_s > 0.0 && s.lease_timeout_s.is_finite()) {
        bail!(
            "--lease-timeout-s {}: must be a positive number of seconds",
            s.lease_timeout_s
        );
    }
    if !(s.heartbeat_s > 0.0 && s.heartbeat_s < s.lease_timeout_s) {
        bail!(
            "--heartbeat-s {}: must be positive and shorter than --lease-timeout-s ({})",
            s.heartbeat_s,
            s.lease_timeout_s
        );
    }
    if s.max_attempts == 0 {
        bail!("--max-attempts 0: at least one attempt is needed");
    }
    if s.shard_cases == 0 {
        bail!("--shard-cases 0: a shard needs at least one case");
    }
    let mut wait_for = Vec::new();
    for w in &s.wait_for {
        let (sku, n) = w.rsplit_once('=').ok_or_else(|| {
            anyhow!("--wait-for {w:?}: expected SKU=N, e.g. \"NVIDIA H100 80GB HBM3=4\"")
        })?;
        let n: usize = n
            .trim()
            .parse()
            .map_err(|_| anyhow!("--wait-for {w:?}: N must be a whole number"))?;
        wait_for.push((sku.trim().to_string(), n));
    }
    let timeout = match s.fleet_timeout_s {
        None => None,
        Some(t) if !(t > 0.0 && t.is_finite()) => {
            bail!("--fleet-timeout-s {t}: must be a positive number of seconds")
        }
        Some(_) if s.expect_agents == 0 && wait_for.is_empty() => bail!(
            "--fleet-timeout-s: there is no fleet to wait for; it goes with --expect-agents or \
             --wait-for"
        ),
        Some(t) => Some(Duration::from_secs_f64(t)),
    };
    Ok(SchedulerConfig {
        placement: match s.placement {
            PlacementArg::Spread => Placement::Spread,
            PlacementArg::PerSku => Placement::PerSku,
            PlacementArg::PerGpu => Placement::PerGpu,
        },
        lease_timeout: Duration::from_secs_f64(s.lease_timeout_s),
        heartbeat_interval: Duration::from_secs_f64(s.heartbeat_s),
        max_attempts: s.max_attempts,
        max_shard_cases: s.shard_cases,
        fleet: FleetRequirement {
            expect_agents: s.expect_agents,
            wait_for,
            timeout,
        },
        retry_failed: s.retry_failed.clone(),
    })
}

fn read_token(t: &TokenArgs) -> Result<Option<String>> {
    if let Some(path) = &t.token_file {
        let s = std::fs::read_to_string(path)
            .with_context(|| format!("reading the token file {}", path.display()))?;
        let s = s.trim().to_string();
        if s.is_empty() {
            bail!("the token file {} is empty", path.display());
        }
        return Ok(Some(s));
    }
    Ok(t.token.clone().filter(|s| !s.is_empty()))
}

/// A coordinator client's TLS material (agent, status): TLS for an https:// URL or when TLS files
/// are given; TLS files with an http:// URL are refused (the connection would be plaintext).
fn client_tls(t: &ClientTlsArgs, url: &str) -> Result<Option<ClientTls>> {
    if (t.tls_ca.is_some() || t.tls_cert.is_some()) && url.starts_with("http://") {
        bail!(
            "--tls-ca / --tls-cert are given but the coordinator URL {url} is plain http://: use \
             https:// for TLS, or drop the TLS flags"
        );
    }
    if !(t.tls_ca.is_some() || t.tls_cert.is_some() || url.starts_with("https://")) {
        return Ok(None);
    }
    Ok(Some(ClientTls {
        ca_pem: t
            .tls_ca
            .as_deref()
            .map(|p| read_pem(p, "CA certificate", "CERTIFICATE"))
            .transpose()?,
        identity: match (&t.tls_cert, &t.tls_key) {
            (Some(c), Some(k)) => Some((
                read_pem(c, "client certificate", "CERTIFICATE")?,
                read_pem(k, "client key", "PRIVATE KEY")?,
            )),
            _ => None,
        },
        domain: t.tls_domain.clone(),
    }))
}

fn read_file(path: &Path, what: &str) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading the {what} {}", path.display()))
}

/// A PEM file of TLS material, checked to hold a PEM block of the expected kind (`CERTIFICATE`
/// or `PRIVATE KEY`) before it goes to the TLS stack, whose own errors do not name the file.
fn read_pem(path: &Path, what: &str, kind: &str) -> Result<Vec<u8>> {
    let bytes = read_file(path, what)?;
    let text = String::from_utf8_lossy(&bytes);
    let found = text
        .lines()
        .any(|l| l.starts_with("-----BEGIN ") && l.trim_end().ends_with(&format!("{kind}-----")));
    if !found {
        bail!(
            "the {what} {} holds no PEM `{kind}` block (a `-----BEGIN ...{kind}-----` line); \
             give a PEM file",
            path.display()
        );
    }
    Ok(bytes)
}

fn progress_display() -> ProgressDisplay {
    if std::io::stderr().is_terminal() {
        ProgressDisplay::Bar
    } else {
        ProgressDisplay::Log
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let term = signal(SignalKind::terminate());
        let int = signal(SignalKind::interrupt());
        match (term, int) {
            (Ok(mut t), Ok(mut i)) => {
                tokio::select! {
                    _ = t.recv() => {}
                    _ = i.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn report_summary(s: &RunSummary) -> ExitCode {
    if let Some(o) = &s.outputs {
        eprintln!(
            "results: {}\n         {}\n         {}",
            o.parquet.display(),
            o.csv.display(),
            o.reference_csv.display()
        );
    }
    eprintln!(
        "run {}: {} of {} units done, {} failed, {} without a result ({} resumed from the journal) in {:.1} s",
        s.run_id,
        s.done,
        s.total,
        s.failed,
        s.unfinished.len(),
        s.resumed,
        s.elapsed.as_secs_f64()
    );
    if !s.wrong.is_empty() {
        eprintln!(
            "  {} kernel result(s) are wrong_result: the output disagreed with the reference, so \
             the kernel was not timed; the `message` column of results.csv says what was wrong \
             (a kernel bug: check it with `decodebench selftest`)",
            s.wrong.len()
        );
        for w in s.wrong.iter().take(20) {
            eprintln!("  wrong: {w}");
        }
        if s.wrong.len() > 20 {
            eprintln!("  ... and {} more", s.wrong.len() - 20);
        }
    }
    if s.complete() {
        ExitCode::SUCCESS
    } else {
        for u in s.unfinished.iter().take(20) {
            eprintln!("  no result: {u}");
        }
        if s.unfinished.len() > 20 {
            eprintln!("  ... and {} more", s.unfinished.len() - 20);
        }
        if s.failed > 0 {
            eprintln!(
                "  {} unit(s) failed after every attempt: the `message` column of results.csv says \
                 why. A rerun on the same --out keeps these failures; once the cause is fixed, \
                 rerun with {} to run only them again (a retry round runs once: a restart with \
                 the same flag resumes it rather than repeating it)",
                s.failed,
                s.next_retry_flag()
            );
        }
        if !s.unfinished.is_empty() {
            eprintln!(
                "rerun the same command on the same --out directory to finish the missing cases"
            );
        }
        ExitCode::from(EXIT_INCOMPLETE)
    }
}

/// An error and its causes on one line, `outer: cause: root`, as anyhow's `{:#}` prints them,
/// but without repeating a cause whose text the line already holds (many error types put their
/// source's message in their own, and a chain printer would print it twice).
pub fn error_report(e: &anyhow::Error) -> String {
    decodebench_proto::error_chain(e.to_string(), e.source())
}

/// `run`'s coordinator listens on a loopback port that only its own local agents know, so a
/// fleet requirement they cannot meet would wait forever: refuse it up front.
fn check_local_fleet(fleet: &FleetRequirement, skus: &[String]) -> Result<()> {
    let hint = "`decodebench run` starts only its local agents and nothing else can join its \
                loopback coordinator; drop the flag, or serve the grid with `decodebench \
                coordinator` and start the agents with `decodebench agent`";
    if fleet.expect_agents > skus.len() {
        bail!(
            "--expect-agents {}: this run has {} local agent(s); {hint}",
            fleet.expect_agents,
            skus.len()
        );
    }
    for (sku, n) in &fleet.wait_for {
        let have = skus.iter().filter(|s| *s == sku).count();
        if have < *n {
            bail!(
                "--wait-for {sku}={n}: this run has {have} local agent(s) of that model (local: \
                 {}); {hint}",
                skus.join(", ")
            );
        }
    }
    Ok(())
}

async fn run(a: RunArgs, log: &str) -> Result<ExitCode> {
    // Decide the backends first: the default preset depends on them.
    if a.backend == BackendArg::Cpu && a.gpus.is_some() {
        bail!("--gpus selects CUDA devices and --backend cpu uses none; drop --gpus (the number of CPU agents is --cpu-agents)");
    }
    let gpu_ordinals: Vec<usize> = match a.backend {
        BackendArg::Cpu => Vec::new(),
        // The driver is asked once; without a usable GPU, `why` says what is missing.
        BackendArg::Cuda | BackendArg::Auto => match backends::cuda_device_count() {
            Ok(n) if n > 0 => match &a.gpus {
                Some(list) => {
                    if let Some(bad) = list.iter().find(|&&g| g >= n) {
                        bail!("--gpus: GPU {bad} does not exist ({n} visible)");
                    }
                    list.clone()
                }
                None => (0..n).collect(),
            },
            none => {
                let why = none
                    .err()
                    .unwrap_or_else(|| "no CUDA device is visible".into());
                if a.backend == BackendArg::Cuda {
                    bail!("--backend cuda: {why}. Use --backend cpu (or auto) to run on the CPU");
                }
                if a.gpus.is_some() {
                    bail!("--gpus: {why}. Drop --gpus to run on the CPU backend");
                }
                eprintln!("notice: no usable GPU ({why}); running on the CPU backend instead (smoke preset by default)");
                Vec::new()
            }
        },
    };
    let on_gpu = !gpu_ordinals.is_empty();
    let grid = load_grid(&a.grid, if on_gpu { "seed" } else { "smoke" })?;
    let cases = apply_overrides(grid.expand(), &a.method)?;
    let mut sched = scheduler_config(&a.schedule)?;
    let agent_count = if on_gpu {
        gpu_ordinals.len()
    } else {
        usize::from(a.cpu_agents)
    };
    if sched.placement != Placement::Spread && sched.fleet.expect_agents == 0 {
        sched.fleet.expect_agents = agent_count;
    }

    let as_processes = match a.local_agents {
        LocalAgentsArg::Process => true,
        LocalAgentsArg::InProcess => false,
        LocalAgentsArg::Auto => on_gpu,
    };
    let names: Vec<String> = if on_gpu {
        gpu_ordinals
            .iter()
            .map(|g| format!("local-gpu{g}"))
            .collect()
    } else {
        (0..agent_count).map(|i| format!("local-cpu{i}")).collect()
    };
    // In-process agents open their backends here; child processes open their own (a CUDA
    // context in this process would only hold memory on every GPU).
    let mut opened: Vec<OpenedBackend> = Vec::new();
    let skus: Vec<String> = if as_processes {
        if on_gpu {
            let names = backends::cuda_device_names().map_err(|e| anyhow!("{e}"))?;
            gpu_ordinals
                .iter()
                .map(|&g| names.get(g).cloned().unwrap_or_default())
                .collect()
        } else {
            let sku = backends::open_cpu().backend.identity().sku.clone();
            vec![sku; agent_count]
        }
    } else {
        for &g in &gpu_ordinals {
            opened.push(backends::open_cuda(g).with_context(|| format!("opening GPU {g}"))?);
        }
        for _ in opened.len()..agent_count {
            opened.push(backends::open_cpu());
        }
        opened
            .iter()
            .map(|b| b.backend.identity().sku.clone())
            .collect()
    };
    check_local_fleet(&sched.fleet, &skus)?;
    // A malformed fault drill would stop every agent at start-up: say so once, here.
    decodebench_agent::failpoint::Failpoint::from_env().map_err(|e| anyhow!("{e}"))?;
    let exe = if as_processes {
        Some(std::env::current_exe().context(
            "finding this binary to start the agent processes; pass --local-agents in-process",
        )?)
    } else {
        None
    };
    eprintln!(
        "decodebench run: grid `{}`, {} cases, {} agent(s) on {}{}, output in {}",
        grid.name(),
        cases.len(),
        names.len(),
        if on_gpu { "GPU" } else { "CPU" },
        if as_processes {
            " (child processes, restarted if they die)"
        } else {
            ""
        },
        a.out.display()
    );

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("binding a loopback port for the embedded coordinator")?;
    let addr = listener.local_addr()?;
    let (stop_tx, stop_rx) = watch::channel(false);
    // Agent processes that die are reported to the coordinator, which loses their leases at once.
    let (exits_tx, agent_exits) = if as_processes {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        (Some(tx), Some(rx))
    } else {
        (None, None)
    };
    let cfg = CoordinatorConfig {
        out_dir: a.out.clone(),
        grid_hash: decodebench_coordinator::run::cases_hash(&cases),
        cases,
        scheduler: sched,
        token: None,
        tls: None,
        metrics_listen: None,
        progress: progress_display(),
        git_revision: GIT_REVISION.to_string(),
        exit_when_done: true,
        agent_exits,
    };
    // The embedded coordinator stops on a signal, or when every local agent has exited (an agent
    // whose GPU is lost exits; with nobody left to run the remaining cases, waiting is pointless:
    // the outputs are written and a rerun on the same --out finishes the rest).
    let signal_tx = stop_tx.clone();
    let agents_gone = std::sync::Arc::new(tokio::sync::Notify::new());
    let gone = agents_gone.clone();
    let coordinator = tokio::spawn(serve(cfg, listener, async move {
        tokio::select! {
            _ = shutdown_signal() => {}
            _ = gone.notified() => {
                tracing::warn!("every local agent has exited; stopping the run");
            }
        }
        let _ = signal_tx.send(true);
    }));

    let coordinator_url = format!("http://{addr}");
    let watcher = match exe {
        Some(exe) => {
            let cfg = supervise::SupervisorConfig {
                exe,
                log: log.to_string(),
                max_restarts: a.agent_restarts,
                setup_failed_code: i32::from(EXIT_AGENT_SETUP),
                exits: exits_tx,
            };
            let slots = local_agent_slots(&names, &gpu_ordinals, &coordinator_url);
            watch_local_processes(slots, cfg, stop_rx, agents_gone)
        }
        None => watch_local_agents(
            names.into_iter().zip(opened).collect(),
            &coordinator_url,
            stop_rx,
            agents_gone,
        ),
    };
    let summary = coordinator
        .await
        .map_err(|e| anyhow!("the embedded coordinator task failed: {e}"))??;
    let _ = stop_tx.send(true);
    // Agents drain on their own; one still trying to reach the (now stopped) coordinator, e.g.
    // when everything was already journaled, is not worth waiting for (an agent process gets
    // SIGTERM, then SIGKILL).
    let mut watcher = watcher;
    let wait = if as_processes {
        supervise::TERM_GRACE + LOCAL_AGENT_EXIT_WAIT
    } else {
        LOCAL_AGENT_EXIT_WAIT
    };
    match tokio::time::timeout(wait, &mut watcher).await {
        Ok(Ok(lines)) => {
            for line in lines {
                eprintln!("{line}");
            }
        }
        _ => watcher.abort(),
    }
    Ok(report_summary(&summary))
}

/// Local agents in their own processes talk to the embedded coordinator on loopback; this long
/// without it, they give up (a `run` killed with SIGKILL leaves no one to stop them).
const LOCAL_CONNECT_TIMEOUT_S: u32 = 30;

/// The `decodebench agent` command line of each local agent process: agent i runs on GPU
/// `gpus[i]`, or on the CPU when there are no GPUs.
fn local_agent_slots(
    names: &[String],
    gpus: &[usize],
    coordinator: &str,
) -> Vec<supervise::AgentSlot> {
    names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let device = match gpus.get(i) {
                Some(g) => vec![
                    "--backend".to_string(),
                    "cuda".into(),
                    "--gpu".into(),
                    g.to_string(),
                ],
                None => vec!["--backend".to_string(), "cpu".into()],
            };
            let mut args: Vec<String> = vec![
                "agent".into(),
                "--coordinator".into(),
                coordinator.into(),
                "--name".into(),
                name.clone(),
                "--connect-timeout-s".into(),
                LOCAL_CONNECT_TIMEOUT_S.to_string(),
            ];
            args.extend(device);
            supervise::AgentSlot {
                name: name.clone(),
                args,
            }
        })
        .collect()
}

/// Runs in-process agents until they exit; then says so through `gone`. Returns their errors as
/// lines for the end of the run.
fn watch_local_agents(
    agents: Vec<(String, OpenedBackend)>,
    coordinator: &str,
    stop: watch::Receiver<bool>,
    gone: std::sync::Arc<tokio::sync::Notify>,
) -> tokio::task::JoinHandle<Vec<String>> {
    let mut set = tokio::task::JoinSet::new();
    for (name, b) in agents {
        let acfg = AgentConfig {
            coordinator: coordinator.to_string(),
            name: name.clone(),
            token: None,
            tls: None,
            connect_timeout: Duration::from_secs(u64::from(LOCAL_CONNECT_TIMEOUT_S)),
            version: version_string(),
        };
        let stop = stop.clone();
        set.spawn(async move {
            let r = match Agent::connect(acfg, b.backend, b.probe).await {
                Ok(agent) => agent.run(stop).await,
                Err(e) => Err(e),
            };
            (name, r)
        });
    }
    tokio::spawn(async move {
        let mut errors = Vec::new();
        while let Some(joined) = set.join_next().await {
            match joined {
                Ok((name, Err(e))) => {
                    tracing::error!(agent = %name, error = %e, "local agent stopped");
                    errors.push(format!("agent error: {name}: {e}"));
                }
                Ok((_, Ok(_))) => {}
                Err(e) => errors.push(format!("agent error: the agent task failed: {e}")),
            }
        }
        gone.notify_one();
        errors
    })
}

/// Supervises one agent process per slot until every slot has ended; then says so through
/// `gone`. Returns a line per slot whose agent died, for the end of the run.
fn watch_local_processes(
    slots: Vec<supervise::AgentSlot>,
    cfg: supervise::SupervisorConfig,
    stop: watch::Receiver<bool>,
    gone: std::sync::Arc<tokio::sync::Notify>,
) -> tokio::task::JoinHandle<Vec<String>> {
    let mut set = tokio::task::JoinSet::new();
    for slot in slots {
        set.spawn(supervise::supervise(slot, cfg.clone(), stop.clone()));
    }
    tokio::spawn(async move {
        let mut lines = Vec::new();
        while let Some(joined) = set.join_next().await {
            match joined {
                Ok(o) => {
                    if !o.deaths.is_empty() {
                        lines.push(format!(
                            "agent {}: its process died {} time(s) and was restarted {} time(s): {}",
                            o.name,
                            o.deaths.len(),
                            o.restarts(),
                            o.deaths.join("; ")
                        ));
                    }
                    if let Some(why) = o.gave_up {
                        lines.push(format!("agent error: {}: {why}", o.name));
                    }
                }
                Err(e) => lines.push(format!("agent error: a supervisor task failed: {e}")),
            }
        }
        gone.notify_one();
        lines
    })
}

async fn coordinator(a: CoordinatorArgs) -> Result<ExitCode> {
    let grid = load_grid(&a.grid, "seed")?;
    let cases = apply_overrides(grid.expand(), &a.method)?;
    let sched = scheduler_config(&a.schedule)?;
    if sched.placement != Placement::Spread
        && sched.fleet.expect_agents == 0
        && sched.fleet.wait_for.is_empty()
    {
        tracing::warn!(
            "--placement {} without --expect-agents or --wait-for: the run ends once the agents \
             present have run their cases, and an agent that starts later finds it gone; set \
             --expect-agents to the fleet's size",
            sched.placement.as_str()
        );
    }
    let tls = match (&a.tls.tls_cert, &a.tls.tls_key) {
        (Some(c), Some(k)) => Some(ServerTls {
            cert_pem: read_pem(c, "TLS certificate", "CERTIFICATE")?,
            key_pem: read_pem(k, "TLS key", "PRIVATE KEY")?,
            client_ca_pem: a
                .tls
                .tls_client_ca
                .as_deref()
                .map(|p| read_pem(p, "client CA", "CERTIFICATE"))
                .transpose()?,
        }),
        _ => None,
    };
    let token = read_token(&a.token)?;
    if token.is_none() && !a.listen.ip().is_loopback() {
        tracing::warn!(listen = %a.listen, "listening beyond loopback without a bearer token: any client can register; set --token-file");
    }
    let listener = tokio::net::TcpListener::bind(a.listen).await.map_err(|e| {
        let hint = match e.kind() {
            std::io::ErrorKind::AddrInUse => {
                "the port is taken: is another coordinator running there? Pick another \
                     --listen port"
            }
            std::io::ErrorKind::AddrNotAvailable => {
                "that address is not one of this machine's: use 0.0.0.0:PORT to listen on \
                     every interface, or one of this machine's addresses"
            }
            std::io::ErrorKind::PermissionDenied => {
                "ports below 1024 need privileges: use a higher port"
            }
            _ => "check the --listen address",
        };
        anyhow!("binding {}: {e}; {hint}", a.listen)
    })?;
    eprintln!(
        "decodebench coordinator: grid `{}`, {} cases, placement {}, listening on {}{}",
        grid.name(),
        cases.len(),
        sched.placement,
        listener.local_addr()?,
        if tls.is_some() { " (TLS)" } else { "" }
    );
    let cfg = CoordinatorConfig {
        out_dir: a.out,
        grid_hash: decodebench_coordinator::run::cases_hash(&cases),
        cases,
        scheduler: sched,
        token,
        tls,
        metrics_listen: a.metrics_listen,
        progress: progress_display(),
        git_revision: GIT_REVISION.to_string(),
        exit_when_done: !a.keep_serving,
        agent_exits: None,
    };
    let summary = serve(cfg, listener, shutdown_signal()).await?;
    Ok(report_summary(&summary))
}

async fn agent(a: AgentArgs) -> Result<ExitCode> {
    let (cfg, opened) = match agent_setup(a) {
        Ok(set_up) => set_up,
        Err(e) => {
            eprintln!("error: {}", error_report(&e));
            return Ok(ExitCode::from(EXIT_AGENT_SETUP));
        }
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!(
            "signal received: stopping (a case in progress is finished first and the rest of its \
             lease handed back)"
        );
        let _ = stop_tx.send(true);
    });
    let agent = match Agent::connect(cfg, opened.backend, opened.probe).await {
        Ok(agent) => agent,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(EXIT_AGENT_SETUP));
        }
    };
    let summary = agent.run(stop_rx).await?;
    eprintln!(
        "agent done: {} cases run, {} results accepted, {} duplicates, {} cases handed back",
        summary.cases_run, summary.results_accepted, summary.duplicates, summary.released
    );
    Ok(ExitCode::SUCCESS)
}

/// An agent's backend and configuration, before it first calls its coordinator.
fn agent_setup(a: AgentArgs) -> Result<(AgentConfig, OpenedBackend)> {
    let opened = match a.backend {
        BackendArg::Cpu => backends::open_cpu(),
        BackendArg::Cuda => backends::open_cuda(a.gpu)?,
        BackendArg::Auto => match backends::open_cuda(a.gpu) {
            Ok(b) => b,
            Err(e) => {
                eprintln!("notice: {e}; this agent runs on the CPU backend instead");
                backends::open_cpu()
            }
        },
    };
    let tls = client_tls(&a.tls, &a.coordinator)?;
    let host = decodebench_agent::identity::host_name();
    let cfg = AgentConfig {
        coordinator: a.coordinator.clone(),
        name: a.name.unwrap_or_else(|| {
            if opened.backend.identity().backend == "cpu" {
                format!("{host}:cpu")
            } else {
                format!("{host}:gpu{}", a.gpu)
            }
        }),
        token: read_token(&a.token)?,
        tls,
        // At least 1 s: the flag's parser refuses less.
        connect_timeout: Duration::from_secs_f64(a.connect_timeout_s),
        version: version_string(),
    };
    Ok((cfg, opened))
}

fn grid(a: GridArgs) -> Result<ExitCode> {
    if a.print_toml {
        let Some(name) = a.preset.as_deref() else {
            bail!(
                "--print-toml prints a built-in preset's TOML: give --preset NAME (known presets: \
                 {}); a grid file is already TOML",
                Grid::preset_names().join(", ")
            );
        };
        let text = Grid::preset_toml(name).ok_or_else(|| {
            anyhow!(
                "unknown preset `{name}`; known presets: {}",
                Grid::preset_names().join(", ")
            )
        })?;
        emit(text)?;
        return Ok(ExitCode::SUCCESS);
    }
    let grid = match (&a.file, &a.preset) {
        (Some(f), _) => Grid::from_file(f)?,
        (None, Some(p)) => Grid::preset(p)?,
        (None, None) => bail!(
            "give a grid file or --preset NAME (known presets: {})",
            Grid::preset_names().join(", ")
        ),
    };
    let mut text = format!("{}\n", grid.summary());
    if a.cases {
        for c in grid.expand() {
            text.push_str(&format!("{}  {}\n", c.id, c.label()));
        }
    }
    emit(&text)?;
    Ok(ExitCode::SUCCESS)
}

async fn status(a: StatusArgs) -> Result<ExitCode> {
    use decodebench_proto::wire;
    decodebench_agent::client::check_coordinator_url(&a.addr)?;
    let mut endpoint = tonic::transport::Endpoint::from_shared(a.addr.clone())
        .with_context(|| format!("`{}` is not a URL like http://127.0.0.1:50051", a.addr))?
        .timeout(Duration::from_secs(10));
    if let Some(tls) = client_tls(&a.tls, &a.addr)? {
        endpoint = endpoint.tls_config(decodebench_agent::client::client_tls_config(&tls))?;
    }
    let channel = endpoint
        .connect()
        .await
        .with_context(|| format!("connecting to {}", a.addr))?;
    let mut client = wire::coordinator_client::CoordinatorClient::new(channel);
    let mut req = tonic::Request::new(wire::StatusRequest {});
    if let Some(t) = read_token(&a.token)? {
        req.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse()?);
    }
    let s = client
        .status(req)
        .await
        .map_err(|e| anyhow!("status: {}", e.message()))?
        .into_inner();
    if a.format == StatusFormatArg::Json {
        emit(&format!("{}\n", status_json(&s)))?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut text = format!(
        "run {} ({}): {} done, {} failed, {} running, {} pending of {}; {} agent(s) alive; {} lease(s) expired; {:.1} results/s over {:.0} s{}",
        s.run_id,
        s.placement,
        s.done,
        s.failed,
        s.running,
        s.pending,
        s.total,
        s.agents_alive,
        s.leases_expired,
        s.results_per_s,
        s.elapsed_s,
        if s.finished { "; finished" } else { "" }
    );
    text.push('\n');
    if !s.fleet_waiting.is_empty() {
        text.push_str(&format!(
            "  waiting for the fleet before handing out work: {}{}\n",
            s.fleet_waiting,
            match s.fleet_timeout_left_s {
                Some(left) => format!(
                    "; --fleet-timeout-s starts the run with the agents present in {left:.0} s"
                ),
                None => "; no --fleet-timeout-s, so until they come".to_string(),
            }
        ));
    }
    for ag in &s.agents {
        text.push_str(&format!(
            "  {:<10} {:<24} {:<28} {:>6} results {}{}{}",
            ag.agent_id,
            ag.name,
            ag.sku,
            ag.results,
            if ag.alive { "alive" } else { "gone" },
            if ag.current_lease.is_empty() {
                String::new()
            } else {
                format!(" lease {}", ag.current_lease)
            },
            match ag.lease_case_ids.split_first() {
                None => String::new(),
                Some((running, [])) => format!(": running {running}"),
                Some((running, rest)) => format!(": running {running}, {} more", rest.len()),
            }
        ));
        text.push('\n');
    }
    emit(&text)?;
    Ok(ExitCode::SUCCESS)
}

/// A status answer as JSON: every field, under the wire's names.
fn status_json(s: &decodebench_proto::wire::StatusResponse) -> serde_json::Value {
    let agents: Vec<serde_json::Value> = s
        .agents
        .iter()
        .map(|a| {
            serde_json::json!({
                "agent_id": a.agent_id,
                "name": a.name,
                "sku": a.sku,
                "uuid": a.uuid,
                "alive": a.alive,
                "results": a.results,
                "current_lease": a.current_lease,
                "lease_case_ids": a.lease_case_ids,
            })
        })
        .collect();
    serde_json::json!({
        "run_id": s.run_id,
        "placement": s.placement,
        "total": s.total,
        "pending": s.pending,
        "running": s.running,
        "done": s.done,
        "failed": s.failed,
        "finished": s.finished,
        "agents_alive": s.agents_alive,
        "leases_expired": s.leases_expired,
        "elapsed_s": s.elapsed_s,
        "results_per_s": s.results_per_s,
        "fleet_waiting": s.fleet_waiting,
        "fleet_timeout_left_s": s.fleet_timeout_left_s,
        "agents": agents,
    })
}

fn selftest(a: SelftestArgs) -> Result<ExitCode> {
    let opts = decodebench_kernels::cuda::selftest::SelftestOptions {
        ordinal: a.gpu,
        quick: a.quick,
        cache: None,
    };
    let report = decodebench_kernels::cuda::selftest::selftest(&opts)
        .map_err(|e| anyhow!("selftest could not start on GPU {}: {e}", a.gpu))?;
    emit(&format!("{report}\n"))?;
    Ok(if report.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_SELFTEST_FAILED)
    })
}

fn precompile(a: PrecompileArgs) -> Result<ExitCode> {
    use decodebench_kernels::cuda::{CompileCache, CudaBackend};
    let cache = match a.cache_dir {
        Some(dir) => CompileCache::at(Some(dir)),
        None => CompileCache::from_env(),
    };
    let Some(dir) = cache.dir().map(Path::to_path_buf) else {
        bail!(
            "no cache directory to compile into: set --cache-dir or DECODEBENCH_CACHE_DIR (HOME \
             and XDG_CACHE_HOME are unset)"
        );
    };
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("creating the cache directory {}", dir.display()))?;
    let mut targets = a.compute_capabilities;
    if targets.is_empty() {
        let devices = CudaBackend::probe().map_err(|e| {
            anyhow!("no GPU to take a compute capability from ({e}); name the targets with --cc, e.g. --cc 9.0")
        })?;
        for d in devices {
            let cc = parse_compute_capability(&d.compute_capability).map_err(|e| anyhow!(e))?;
            if !targets.contains(&cc) {
                targets.push(cc);
            }
        }
        if targets.is_empty() {
            bail!("no GPU is visible here: name the targets with --cc, e.g. --cc 9.0");
        }
    }
    let mut missed = 0;
    for (major, minor) in targets {
        let done = decodebench_kernels::cuda::precompile(major, minor, &cache).map_err(|e| {
            anyhow!("compiling the kernels for compute capability {major}.{minor}: {e}")
        })?;
        let mut text = format!(
            "cc {major}.{minor}: {} -> {}\n",
            done.description,
            dir.display()
        );
        if !done.messages.is_empty() {
            text.push_str(&format!("NVRTC messages:\n{}\n", done.messages));
        }
        text.push_str(&done.resources.summary());
        emit(&text)?;
        if let Some(out) = &a.resources {
            let path = out.join(format!("kernel-resources-{}.csv", done.resources.arch));
            std::fs::create_dir_all(out)
                .and_then(|_| std::fs::write(&path, done.resources.csv()))
                .with_context(|| format!("writing --resources to {}", path.display()))?;
        }
        missed += done.resources.violations.len();
    }
    if a.strict && missed > 0 {
        bail!(
            "{missed} kernel resource budget(s) missed (listed above); the modules are in the \
             cache, but --strict makes a missed budget an error"
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn output_format(f: FormatArg) -> OutputFormat {
    match f {
        FormatArg::Table => OutputFormat::Table,
        FormatArg::Csv => OutputFormat::Csv,
        FormatArg::Json => OutputFormat::Json,
    }
}

fn compare(a: CompareArgs) -> Result<ExitCode> {
    let mut o = CompareOptions::new(a.baseline, a.candidate);
    o.threshold = a.threshold;
    o.alpha = a.alpha;
    o.resamples = a.resamples;
    o.seed = a.seed;
    o.fail_on_regression = a.fail_on_regression;
    o.allow_missing = a.allow_missing;
    o.format = output_format(a.format);
    o.kernels = match a.kernel {
        KernelArg::Optimized => KernelSelection::Optimized,
        KernelArg::Baseline => KernelSelection::Baseline,
        KernelArg::Both => KernelSelection::Both,
    };
    Ok(ExitCode::from(analysis::run_compare(&o)?.exit_code()))
}

fn report(a: ReportArgs) -> Result<ExitCode> {
    let mut o = ReportOptions::new(a.dir);
    o.group_by = match a.group_by {
        GroupByArg::Gpu => GroupBy::Gpu,
        GroupByArg::Sku => GroupBy::Sku,
    };
    o.format = output_format(a.format);
    o.slow_threshold = a.slow_threshold;
    analysis::run_report(&o)?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The agent command lines `run` starts parse as the `agent` subcommand they mean.
    #[test]
    fn local_agent_slots_are_agent_commands() {
        use clap::Parser;
        let names = ["local-gpu1".to_string(), "local-cpu1".to_string()];
        let slots = local_agent_slots(&names, &[1], "http://127.0.0.1:9");
        let parse = |slot: &supervise::AgentSlot| {
            let argv = std::iter::once("decodebench".to_string()).chain(slot.args.clone());
            match Cli::try_parse_from(argv)
                .expect("a valid command line")
                .command
            {
                Command::Agent(a) => a,
                other => panic!("not an agent command: {other:?}"),
            }
        };
        let gpu = parse(&slots[0]);
        assert_eq!(
            (gpu.backend, gpu.gpu, gpu.name.as_deref()),
            (BackendArg::Cuda, 1, Some("local-gpu1"))
        );
        assert_eq!(gpu.coordinator, "http://127.0.0.1:9");
        assert_eq!(gpu.connect_timeout_s, f64::from(LOCAL_CONNECT_TIMEOUT_S));
        let cpu = parse(&slots[1]);
        assert_eq!(
            (cpu.backend, cpu.name.as_deref()),
            (BackendArg::Cpu, Some("local-cpu1"))
        );
    }

    #[test]
    fn readme_documents_every_result_column() {
        let readme = include_str!("../README.md");
        let schema = decodebench_coordinator::schema::schema();
        let missing: Vec<&str> = schema
            .fields()
            .iter()
            .map(|f| f.name().as_str())
            .filter(|name| !readme.contains(&format!("`{name}`")))
            .collect();
        assert!(
            missing.is_empty(),
            "README.md does not document: {missing:?}"
        );
    }

    #[test]
    fn overrides_change_ids_and_reject_nonsense() {
        let cases = Grid::preset("smoke").unwrap().expand();
        let o = MethodOverrides {
            l2: Some(L2Arg::Cold),
            ..Default::default()
        };
        let cold = apply_overrides(cases.clone(), &o).unwrap();
        assert_eq!(cold.len(), cases.len());
        assert!(cold.iter().all(|c| c.method.l2 == L2Mode::Cold));
        assert!(cold.iter().zip(&cases).all(|(a, b)| a.id != b.id));
        let bad = MethodOverrides {
            target_rse: Some(2.0),
            ..Default::default()
        };
        assert!(apply_overrides(cases, &bad).is_err());
    }

    #[test]
    fn wait_for_parses_sku_counts() {
        let args = ScheduleArgs {
            placement: PlacementArg::PerSku,
            expect_agents: 0,
            wait_for: vec!["NVIDIA H100 80GB HBM3=4".into()],
            lease_timeout_s: 30.0,
            heartbeat_s: 10.0,
            max_attempts: 3,
            shard_cases: 8,
            retry_failed: None,
            fleet_timeout_s: None,
        };
        let c = scheduler_config(&args).unwrap();
        assert_eq!(
            c.fleet.wait_for,
            vec![("NVIDIA H100 80GB HBM3".to_string(), 4)]
        );
        let bad = ScheduleArgs {
            wait_for: vec!["H100".into()],
            ..args.clone()
        };
        assert!(scheduler_config(&bad).is_err());

        // A fleet timeout: positive seconds, and only with a fleet to wait for.
        let timed = ScheduleArgs {
            fleet_timeout_s: Some(90.0),
            ..args.clone()
        };
        assert_eq!(
            scheduler_config(&timed).unwrap().fleet.timeout,
            Some(Duration::from_secs(90))
        );
        for t in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let err = scheduler_config(&ScheduleArgs {
                fleet_timeout_s: Some(t),
                ..args.clone()
            })
            .unwrap_err();
            assert!(
                err.to_string().contains("positive number of seconds"),
                "{err}"
            );
        }
        let alone = ScheduleArgs {
            wait_for: vec![],
            fleet_timeout_s: Some(90.0),
            ..args
        };
        let err = scheduler_config(&alone).unwrap_err().to_string();
        assert!(err.contains("--expect-agents or --wait-for"), "{err}");
    }

    /// A cause whose text the message already holds is not printed again; others are.
    #[test]
    fn error_report_prints_each_cause_once() {
        #[derive(Debug)]
        struct Wraps {
            path: &'static str,
            source: std::io::Error,
        }
        impl std::fmt::Display for Wraps {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "journal {}: {}", self.path, self.source)
            }
        }
        impl std::error::Error for Wraps {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.source)
            }
        }
        let io = || {
            std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "File exists (os error 17)",
            )
        };
        let e = anyhow::Error::new(Wraps {
            path: "/x/j",
            source: io(),
        })
        .context("opening the output");
        assert_eq!(
            error_report(&e),
            "opening the output: journal /x/j: File exists (os error 17)"
        );
        let plain = anyhow::Error::new(io()).context("reading /x");
        assert_eq!(
            error_report(&plain),
            "reading /x: File exists (os error 17)"
        );
    }
}
