//! Command-line definitions (clap). Every flag that takes a secret also reads an environment
//! variable, so Kubernetes can inject it without putting it on a command line.

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "decodebench",
    version,
    about = "Distributed benchmark of paged-KV-cache decode attention on NVIDIA GPUs",
    long_about = "Expands a grid of decode-attention cases, shards it over gRPC to one agent per GPU, \
                  verifies and times the kernels, and merges timings and NVML telemetry into Parquet \
                  and CSV (including the vLLM reference script's CSV format)."
)]
pub struct Cli {
    /// Log filter (RUST_LOG syntax), e.g. `info`, `decodebench=debug`.
    #[arg(long, global = true, env = "DECODEBENCH_LOG", default_value = "info")]
    pub log: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a grid on this machine: an embedded coordinator plus one agent per visible GPU (one CPU
    /// agent when there is no GPU).
    Run(RunArgs),
    /// Serve a grid to remote agents.
    Coordinator(CoordinatorArgs),
    /// Run cases for a coordinator on one device.
    Agent(AgentArgs),
    /// Validate a grid and print its case count and a summary.
    Grid(GridArgs),
    /// Print a running coordinator's progress.
    Status(StatusArgs),
    /// Run every GPU kernel against the CPU reference on small shapes; exits non-zero on any mismatch.
    Selftest(SelftestArgs),
    /// Compare two runs per (case, kernel, GPU SKU): regression, improvement, unchanged, noisy or underpowered.
    Compare(CompareArgs),
    /// Per-GPU or per-SKU report of one run (slow-card finder) and the optimized-vs-baseline speedups.
    Report(ReportArgs),
    /// Compile the CUDA kernels into the compiled-module cache with NVRTC alone (no GPU needed),
    /// e.g. while building a container image, so that agents skip the first run's compile.
    Precompile(PrecompileArgs),
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendArg {
    /// CUDA when a GPU is visible, else CPU (with a notice).
    Auto,
    Cuda,
    Cpu,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LocalAgentsArg {
    /// Child processes on GPUs, in-process on the CPU backend.
    Auto,
    /// One child `decodebench agent` process per agent, restarted when it dies.
    Process,
    /// Agents inside the `run` process.
    InProcess,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlacementArg {
    /// Each case once, on any GPU.
    Spread,
    /// Each case once on every distinct GPU model.
    PerSku,
    /// Each case once on every GPU.
    PerGpu,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum L2Arg {
    Hot,
    Cold,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimingArg {
    Events,
    Graph,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PoolArg {
    /// The reference script's 256,000-token pool, pages shared at random.
    Shared,
    /// A pool sized to the case, every page used once (true HBM bandwidth).
    Unique,
}

/// Which grid to run.
#[derive(Args, Debug, Clone)]
pub struct GridSource {
    /// A TOML grid file.
    #[arg(long, conflicts_with = "preset")]
    pub grid: Option<PathBuf>,
    /// A built-in grid: `seed` (the reference script's 320 cases) or `smoke` (seconds on a CPU).
    #[arg(long)]
    pub preset: Option<String>,
}

/// Measurement-method overrides applied to every case of the grid.
#[derive(Args, Debug, Clone, Default)]
pub struct MethodOverrides {
    /// Untimed runs before timing.
    #[arg(long)]
    pub warmup: Option<u32>,
    /// Timed trials (the minimum when --target-rse is set).
    #[arg(long)]
    pub trials: Option<u32>,
    /// L2 state before each trial: hot (reference script) or cold (flushed, as nvbench).
    #[arg(long, value_enum)]
    pub l2: Option<L2Arg>,
    /// Time single launches with events, or CUDA-graph replays (no launch overhead).
    #[arg(long, value_enum)]
    pub timing: Option<TimingArg>,
    /// Launches captured per graph in graph mode.
    #[arg(long)]
    pub graph_launches: Option<u32>,
    /// Keep taking trials until the relative standard error is below this (e.g. 0.005).
    #[arg(long)]
    pub target_rse: Option<f64>,
    /// Most trials with --target-rse.
    #[arg(long)]
    pub max_trials: Option<u32>,
    /// Time cap per kernel with --target-rse, seconds.
    #[arg(long)]
    pub max_time_s: Option<f64>,
    /// Re-measure throttled results after a cool-down, up to this many times.
    #[arg(long)]
    pub throttle_retries: Option<u32>,
    /// Which kernels run: both (the default, as the reference script), or only one of them
    /// (optimized alone makes kernel-tuning sweeps several times shorter). Part of the case id.
    #[arg(long, value_enum)]
    pub kernels: Option<KernelArg>,
    /// KV pool scheme for every case.
    #[arg(long, value_enum)]
    pub pool: Option<PoolArg>,
}

/// Scheduling options shared by `run` and `coordinator`.
#[derive(Args, Debug, Clone)]
pub struct ScheduleArgs {
    #[arg(long, value_enum, default_value = "spread")]
    pub placement: PlacementArg,
    /// Wait for this many agents before dispatching.
    #[arg(long, default_value_t = 0)]
    pub expect_agents: usize,
    /// Wait for N agents of a GPU model before dispatching: `--wait-for "NVIDIA H100 80GB HBM3=4"`.
    #[arg(long, value_name = "SKU=N")]
    pub wait_for: Vec<String>,
    /// Stop waiting for --expect-agents / --wait-for after this many seconds and dispatch to the
    /// agents registered so far (a warning names what is missing; agents that register later
    /// still get work). Without it the coordinator waits however long it takes, e.g. for an agent
    /// whose GPU cannot be opened and which will never come.
    #[arg(long, value_name = "SECONDS")]
    pub fleet_timeout_s: Option<f64>,
    /// Lease lifetime without a heartbeat, seconds.
    #[arg(long, default_value_t = 30.0)]
    pub lease_timeout_s: f64,
    /// Agent heartbeat period, seconds (keep it well under the lease timeout).
    #[arg(long, default_value_t = 10.0)]
    pub heartbeat_s: f64,
    /// Attempts per case before it is recorded as failed: reported failures, or (counted apart)
    /// losses with an agent that died running it.
    #[arg(long, default_value_t = 3)]
    pub max_attempts: u32,
    /// Most cases per shard.
    #[arg(long, default_value_t = 8)]
    pub shard_cases: usize,
    /// Resuming an --out directory: run the cases whose recorded result is a failure again, in a
    /// retry round that runs once (the new result replaces the failure; the rest is kept).
    ///
    /// ROUND names the round (the bare flag is round 1). The round is journaled when it starts,
    /// so a coordinator restarted with the same flag (by a supervisor, a Kubernetes Deployment,
    /// a Job's retry, or by hand after a crash) resumes that round instead of starting another:
    /// only its cases without a result since it started run, and a failure recorded during the
    /// round is final. Once each of its cases has a result, the same name runs nothing again,
    /// so a case that always fails cannot loop. To retry again, say after fixing the cause, name
    /// a new round: --retry-failed=2 (the summary at the end of a run names a free one).
    #[arg(
        long,
        value_name = "ROUND",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = decodebench_coordinator::run::DEFAULT_RETRY_ROUND,
        value_parser = parse_retry_round
    )]
    pub retry_failed: Option<String>,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub grid: GridSource,
    /// Output directory (results.parquet, results.csv, the reference CSV, the journal).
    #[arg(long, default_value = "decodebench-out")]
    pub out: PathBuf,
    #[arg(long, value_enum, default_value = "auto")]
    pub backend: BackendArg,
    /// GPUs to use (CUDA ordinals), default all visible.
    #[arg(long, value_delimiter = ',')]
    pub gpus: Option<Vec<usize>>,
    /// CPU agents to start with the CPU backend (1 to 64; each one runs cases on every core, so
    /// more than a few only contend).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub cpu_agents: u16,
    /// How the local agents run. `process`: each is a child `decodebench agent` process,
    /// restarted when it dies, so a GPU fault or a crash costs the case it was running, not the
    /// run. `in-process`: inside this process, where a GPU fault ends that GPU's share of the run
    /// and a crash ends the run. `auto`: `process` on GPUs, `in-process` on the CPU backend.
    #[arg(long, value_enum, default_value_t = LocalAgentsArg::Auto)]
    pub local_agents: LocalAgentsArg,
    /// With `--local-agents process`: how many times each agent may be restarted before its GPU
    /// is given up for the rest of the run (0 to 1000).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(0..=1000))]
    pub agent_restarts: u32,
    #[command(flatten)]
    pub method: MethodOverrides,
    #[command(flatten)]
    pub schedule: ScheduleArgs,
}

#[derive(Args, Debug)]
pub struct TlsServerArgs {
    /// Server certificate (PEM); enables TLS.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Server private key (PEM).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// CA that client certificates must chain to (PEM); enables mutual TLS.
    #[arg(long, requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct TokenArgs {
    /// File holding the shared bearer token.
    #[arg(long, env = "DECODEBENCH_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// The bearer token itself (prefer --token-file or the environment).
    #[arg(long, env = "DECODEBENCH_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

#[derive(Args, Debug)]
pub struct CoordinatorArgs {
    #[command(flatten)]
    pub grid: GridSource,
    /// gRPC listen address.
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// Prometheus metrics listen address (GET /metrics).
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    #[arg(long, default_value = "decodebench-out")]
    pub out: PathBuf,
    /// Keep serving after all work is done (until SIGTERM), instead of exiting.
    #[arg(long)]
    pub keep_serving: bool,
    #[command(flatten)]
    pub method: MethodOverrides,
    #[command(flatten)]
    pub schedule: ScheduleArgs,
    #[command(flatten)]
    pub token: TokenArgs,
    #[command(flatten)]
    pub tls: TlsServerArgs,
}

#[derive(Args, Debug)]
pub struct AgentArgs {
    /// Coordinator URL, e.g. http://127.0.0.1:50051 (https:// with TLS).
    #[arg(long, env = "DECODEBENCH_COORDINATOR")]
    pub coordinator: String,
    /// CUDA device ordinal to run on.
    #[arg(long, default_value_t = 0)]
    pub gpu: usize,
    #[arg(long, value_enum, default_value = "auto")]
    pub backend: BackendArg,
    /// A name for logs and status (default HOST:gpuN, or HOST:cpu on the CPU backend).
    #[arg(long)]
    pub name: Option<String>,
    /// Give up if the coordinator cannot be reached for this long, seconds (at least 1), at
    /// start-up and when it goes away mid-run. SIGTERM or Ctrl-C ends the wait at once.
    #[arg(long, default_value_t = 300.0, value_parser = decodebench_agent::client::parse_connect_timeout_s)]
    pub connect_timeout_s: f64,
    #[command(flatten)]
    pub token: TokenArgs,
    #[command(flatten)]
    pub tls: ClientTlsArgs,
}

/// TLS options of a client of the coordinator (`agent`, `status`).
#[derive(Args, Debug, Clone)]
pub struct ClientTlsArgs {
    /// CA to verify the coordinator's certificate (PEM).
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate for mutual TLS (PEM).
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Client key for mutual TLS (PEM).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Server name to verify in the coordinator's certificate.
    #[arg(long)]
    pub tls_domain: Option<String>,
}

#[derive(Args, Debug)]
pub struct GridArgs {
    /// A TOML grid file.
    pub file: Option<PathBuf>,
    /// A built-in grid instead of a file.
    #[arg(long, conflicts_with = "file")]
    pub preset: Option<String>,
    /// Also list every case (id and parameters).
    #[arg(long)]
    pub cases: bool,
    /// Print the preset's TOML (a starting point for your own grid).
    #[arg(long, requires = "preset")]
    pub print_toml: bool,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// Coordinator URL, e.g. http://127.0.0.1:50051.
    pub addr: String,
    /// `table` for people; `json` (every field, each agent's unreported lease cases in full) for
    /// scripts and probes.
    #[arg(long, value_enum, default_value_t = StatusFormatArg::Table)]
    pub format: StatusFormatArg,
    #[command(flatten)]
    pub token: TokenArgs,
    #[command(flatten)]
    pub tls: ClientTlsArgs,
}

#[derive(Args, Debug)]
pub struct SelftestArgs {
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    pub gpu: usize,
    /// Only the layout x block size x quant mode grid (skips the head-size x GQA-group sweep).
    #[arg(long)]
    pub quick: bool,
}

#[derive(Args, Debug)]
pub struct PrecompileArgs {
    /// Compute capability to compile for, as MAJOR.MINOR (9.0: H100/H200, 8.0: A100, 8.9: L4/L40S,
    /// 10.0: B200); repeat for several. Default: those of the GPUs visible here.
    #[arg(long = "cc", value_name = "MAJOR.MINOR", value_parser = parse_compute_capability)]
    pub compute_capabilities: Vec<(i32, i32)>,
    /// Cache directory (default: $DECODEBENCH_CACHE_DIR, else $XDG_CACHE_HOME/decodebench, else
    /// ~/.cache/decodebench: where agents look).
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Fail (exit 1) when a kernel misses a resource budget: a register spill, a stack in an
    /// attention kernel, or (Hopper) a merge CTA that no longer fits beside a full SM of the
    /// long-sequence decode kernels. Without it a missed budget is printed and the cache is
    /// still filled. For CI and for checking a kernel change.
    #[arg(long)]
    pub strict: bool,
    /// Also write each target's per-kernel resources (registers, stack, spills, static shared
    /// memory, from ptxas) to DIR/kernel-resources-<arch>.csv.
    #[arg(long, value_name = "DIR")]
    pub resources: Option<PathBuf>,
}

/// Longest `--retry-failed` round name: a label, not a document.
pub const RETRY_ROUND_MAX_CHARS: usize = 64;

/// Exit code for a command line clap refuses (unknown flag, bad value, missing argument): the
/// agent's [`EXIT_AGENT_SETUP`](crate::commands::EXIT_AGENT_SETUP), so that a supervisor (`run`,
/// the Kubernetes Job's `podFailurePolicy`) does not restart an agent whose flags cannot work; 1
/// for every other command, as for any other error. Not clap's own 2, which `run` and
/// `coordinator` use for a run that ended incomplete: a nightly script must not take a typo for
/// a run worth resuming. `args` are the arguments after the program name; the subcommand is the
/// first one that is not a flag (the only global flag with a value, `--log`, is skipped with it).
pub fn usage_error_code(args: impl IntoIterator<Item = std::ffi::OsString>) -> u8 {
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let arg = arg.to_string_lossy();
        if arg == "--log" {
            args.next();
        } else if !arg.starts_with('-') {
            return if arg == "agent" {
                crate::commands::EXIT_AGENT_SETUP
            } else {
                1
            };
        }
    }
    1
}

/// A `--retry-failed` round name: 1 to [`RETRY_ROUND_MAX_CHARS`] letters, digits and `. _ - : +`,
/// so that it reads back the same from a log line, a manifest or a shell.
pub fn parse_retry_round(s: &str) -> Result<String, String> {
    let ok = |c: char| c.is_ascii_alphanumeric() || ".-_:+".contains(c);
    if s.is_empty() || s.chars().count() > RETRY_ROUND_MAX_CHARS || !s.chars().all(ok) {
        return Err(format!(
            "'{s}' is not a retry round name: use 1 to {RETRY_ROUND_MAX_CHARS} letters, digits \
             and . _ - : + (e.g. --retry-failed=2), or the bare --retry-failed for round 1"
        ));
    }
    Ok(s.to_string())
}

/// "9.0" -> (9, 0).
pub fn parse_compute_capability(s: &str) -> Result<(i32, i32), String> {
    let bad = || {
        format!(
            "'{s}' is not a compute capability: write MAJOR.MINOR, e.g. 9.0 for an H100 or H200 \
             (nvidia-smi --query-gpu=compute_cap --format=csv prints it)"
        )
    };
    let (major, minor) = s.trim().split_once('.').ok_or_else(bad)?;
    let major: i32 = major.parse().map_err(|_| bad())?;
    let minor: i32 = minor.parse().map_err(|_| bad())?;
    if !(3..=20).contains(&major) || !(0..=9).contains(&minor) {
        return Err(bad());
    }
    Ok((major, minor))
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum FormatArg {
    Table,
    Csv,
    Json,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatusFormatArg {
    Table,
    Json,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelArg {
    Optimized,
    Baseline,
    Both,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupByArg {
    Gpu,
    Sku,
}

#[derive(Args, Debug)]
pub struct CompareArgs {
    /// Baseline run: its --out directory or results.parquet.
    pub baseline: PathBuf,
    /// Candidate run: its --out directory or results.parquet.
    pub candidate: PathBuf,
    /// Smallest relative change of the median that counts (0.03 = 3 %).
    #[arg(long, default_value_t = 0.03)]
    pub threshold: f64,
    /// Significance level (the bootstrap interval has coverage 1 - alpha).
    #[arg(long, default_value_t = 0.01)]
    pub alpha: f64,
    #[arg(long, value_enum, default_value_t = KernelArg::Both)]
    pub kernel: KernelArg,
    #[arg(long, value_enum, default_value_t = FormatArg::Table)]
    pub format: FormatArg,
    /// Nightly CI gate: exit 4 when any regression (timing or status) is found, else exit 5 when
    /// the gate did not check the baseline: some of its cases are missing from the candidate
    /// (see --allow-missing), or no comparison could be decided (too few trials, nothing timed).
    #[arg(long)]
    pub fail_on_regression: bool,
    /// With --fail-on-regression: baseline cases missing from the candidate do not fail the gate
    /// (the grid shrank on purpose). They are still counted and listed in a warning.
    #[arg(long)]
    pub allow_missing: bool,
    /// Bootstrap resamples (at least 200).
    #[arg(long, default_value_t = 2000)]
    pub resamples: usize,
    /// Bootstrap seed.
    #[arg(long, default_value_t = decodebench_coordinator::analysis::compare::DEFAULT_BOOTSTRAP_SEED)]
    pub seed: u64,
}

#[derive(Args, Debug)]
pub struct ReportArgs {
    /// A run's --out directory or results.parquet.
    pub dir: PathBuf,
    #[arg(long, value_enum, default_value_t = GroupByArg::Gpu)]
    pub group_by: GroupByArg,
    #[arg(long, value_enum, default_value_t = FormatArg::Table)]
    pub format: FormatArg,
    /// Flag a GPU slower than its SKU's median by more than this fraction.
    #[arg(long, default_value_t = 0.03)]
    pub slow_threshold: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compute_capabilities_parse_as_major_dot_minor() {
        assert_eq!(parse_compute_capability("9.0"), Ok((9, 0)));
        assert_eq!(parse_compute_capability(" 10.0 "), Ok((10, 0)));
        assert_eq!(parse_compute_capability("8.9"), Ok((8, 9)));
        for bad in [
            "90", "9", "9.", ".0", "nine", "9.0.1", "-9.0", "99.0", "9.10",
        ] {
            let err = parse_compute_capability(bad).unwrap_err();
            assert!(err.contains("MAJOR.MINOR"), "{bad}: {err}");
        }
    }

    /// The bare flag is round 1, `=NAME` names a round, and a value needs the `=`: a following
    /// word is never taken for a round name.
    #[test]
    fn retry_failed_takes_an_optional_round_name() {
        use clap::Parser;
        let round = |extra: &[&str]| -> Result<Option<String>, String> {
            let argv = ["decodebench", "run", "--preset", "smoke"];
            let cli = Cli::try_parse_from(argv.iter().chain(extra)).map_err(|e| e.to_string())?;
            match cli.command {
                Command::Run(a) => Ok(a.schedule.retry_failed),
                _ => unreachable!("a run command line"),
            }
        };
        assert_eq!(round(&[]), Ok(None));
        assert_eq!(round(&["--retry-failed"]), Ok(Some("1".into())));
        assert_eq!(
            round(&["--retry-failed", "--max-attempts", "2"]),
            Ok(Some("1".into()))
        );
        assert_eq!(
            round(&["--retry-failed=fix-2024.06:1"]),
            Ok(Some("fix-2024.06:1".into()))
        );
        for bad in ["--retry-failed=", "--retry-failed=a b", "--retry-failed=é"] {
            let err = round(&[bad]).unwrap_err();
            assert!(err.contains("not a retry round name"), "{bad}: {err}");
        }
        let long = format!("--retry-failed={}", "x".repeat(RETRY_ROUND_MAX_CHARS + 1));
        assert!(round(&[&long]).is_err());
        let err = round(&["--retry-failed", "2"]).unwrap_err();
        assert!(err.contains("unexpected argument '2'"), "{err}");
    }

    /// A refused command line exits 6 for the agent (not restarted) and 1 for the rest, never
    /// clap's 2 (an incomplete run); the subcommand is found past the global `--log VALUE`.
    #[test]
    fn a_refused_command_line_exits_with_the_commands_setup_code() {
        let code = |args: &[&str]| usage_error_code(args.iter().map(std::ffi::OsString::from));
        let agent = crate::commands::EXIT_AGENT_SETUP;
        assert_eq!(code(&["agent", "--gpu", "x"]), agent);
        assert_eq!(code(&["--log", "debug", "agent", "--bogus"]), agent);
        assert_eq!(code(&["--log=debug", "agent"]), agent);
        assert_eq!(code(&["--log", "agent", "run", "--bogus"]), 1);
        assert_eq!(code(&["run", "--bogus"]), 1);
        assert_eq!(code(&["coordinator", "--listen", "nowhere"]), 1);
        assert_eq!(code(&["--bogus"]), 1);
        assert_eq!(code(&[]), 1);
        // And every such code differs from an incomplete run's.
        assert_ne!(agent, crate::commands::EXIT_INCOMPLETE);
    }
}
