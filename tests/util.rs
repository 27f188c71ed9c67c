//! What every integration test needs: tiny grid files in a scratch directory, real `decodebench`
//! processes that are killed when the test ends (whatever way it ends), a Status client to watch a
//! coordinator's progress, and readers for the output files that check every case came back
//! exactly once.
//!
//! Tests here run real processes on a 2-core machine, so every wait has a deadline and a failure
//! prints the tail of each process's log.

use anyhow::{anyhow, bail, Context, Result};
use arrow::array::{Array, AsArray};
use arrow::datatypes::Int64Type;
use decodebench_proto::wire;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The `decodebench` binary Cargo built for these tests.
pub const DECODEBENCH: &str = env!("CARGO_BIN_EXE_decodebench");

/// How often waits poll. Short enough that a test notices a change within a case's run time.
pub const POLL_PERIOD: Duration = Duration::from_millis(25);

/// Lines of a process's log printed when a test fails.
const LOG_TAIL_LINES: usize = 40;

/// Tests that start processes take this lock: the machine has 2 cores, and timing-sensitive tests
/// (leases of 2 s) must not compete with a 50-agent test for them.
static PROCESS_TESTS: Mutex<()> = Mutex::new(());

/// Holds [`PROCESS_TESTS`] for the rest of a test (a test that failed earlier poisons nothing).
pub fn exclusive() -> MutexGuard<'static, ()> {
    PROCESS_TESTS.lock().unwrap_or_else(|p| p.into_inner())
}

/// A free TCP port on 127.0.0.1: bind port 0, read what the kernel picked, release it. A child
/// process cannot report a port it picked itself, so the test picks one.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1:0 for a free port");
    l.local_addr()
        .expect("local address of a bound socket")
        .port()
}

/// The axes of a small grid, written as a TOML file for the binary to read.
#[derive(Debug, Clone)]
pub struct GridSpec {
    pub name: String,
    pub batch_sizes: Vec<u32>,
    pub max_seq_lens: Vec<u32>,
    pub quant_modes: Vec<&'static str>,
    pub heads: (u32, u32),
    pub head_size: u32,
    pub pool_tokens: u32,
    pub warmup: u32,
    pub trials: u32,
    /// When set, each kernel is timed for this long (noise-based stopping with an unreachable
    /// target and this time cap), so a case takes about twice this, on any machine.
    pub seconds_per_kernel: Option<f64>,
}

impl GridSpec {
    /// 2 batch sizes x 2 lengths x 3 quant modes = 12 cases that take milliseconds each.
    pub fn tiny() -> GridSpec {
        GridSpec {
            name: "it-tiny".into(),
            batch_sizes: vec![1, 2],
            max_seq_lens: vec![32, 64],
            quant_modes: vec!["bf16/bf16/bf16", "fp8/fp8/bf16", "fp8/fp8/nvfp4"],
            heads: (4, 1),
            head_size: 64,
            pool_tokens: 256,
            warmup: 1,
            trials: 3,
            seconds_per_kernel: None,
        }
    }

    /// 12 cases that take about half a second each whatever the machine's speed (each kernel is
    /// timed for [`SLOW_SECONDS_PER_KERNEL`]), so that a test can act while a shard is half done.
    pub fn slow() -> GridSpec {
        GridSpec {
            name: "it-slow".into(),
            batch_sizes: vec![1, 2, 3],
            max_seq_lens: vec![256, 512],
            quant_modes: vec!["bf16/bf16/bf16", "fp8/fp8/bf16"],
            heads: (4, 1),
            head_size: 64,
            pool_tokens: 1024,
            warmup: 1,
            trials: 3,
            seconds_per_kernel: Some(SLOW_SECONDS_PER_KERNEL),
        }
    }

    pub fn case_count(&self) -> usize {
        self.batch_sizes.len() * self.max_seq_lens.len() * self.quant_modes.len()
    }

    pub fn to_toml(&self) -> String {
        let list = |v: &[u32]| {
            v.iter()
                .map(|x| x.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let modes = self
            .quant_modes
            .iter()
            .map(|m| format!("{m:?}"))
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            "name = {name:?}\n\
             batch_sizes = [{b}]\n\
             max_seq_lens = [{s}]\n\
             quant_modes = [{modes}]\n\
             heads = [[{hq}, {hkv}]]\n\
             head_sizes = [{d}]\n\
             layouts = [\"HND\"]\n\
             block_sizes = [16]\n\
             pools = [\"shared\"]\n\
             pool_tokens = {pool}\n\
             seed = 0\n\
             \n\
             [method]\n\
             warmup = {warmup}\n\
             trials = {trials}\n\
             {time_cap}",
            name = self.name,
            b = list(&self.batch_sizes),
            s = list(&self.max_seq_lens),
            hq = self.heads.0,
            hkv = self.heads.1,
            d = self.head_size,
            pool = self.pool_tokens,
            warmup = self.warmup,
            trials = self.trials,
            time_cap = match self.seconds_per_kernel {
                Some(s) => format!(
                    "target_rse = {UNREACHABLE_RSE:e}\nmax_trials = {TIME_CAPPED_MAX_TRIALS}\n\
                     max_time_s = {s}\n"
                ),
                None => String::new(),
            },
        )
    }
}

/// How long [`GridSpec::slow`] times each kernel: a case (two kernels) then takes about half a
/// second, long enough to signal an agent mid-shard, short enough for a 12-case grid to finish in
/// a few seconds.
pub const SLOW_SECONDS_PER_KERNEL: f64 = 0.2;

/// A relative standard error no timing reaches, so noise-based stopping runs to its time cap.
const UNREACHABLE_RSE: f64 = 1e-6;
/// Trial cap with a time cap: high enough that the time cap binds first.
const TIME_CAPPED_MAX_TRIALS: u32 = 100_000;

/// A scratch directory for one test: grid files, the output directory, process logs. Kept (and
/// its path printed) when the test fails, so the logs can be read afterwards.
pub struct Scratch {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
}

impl Scratch {
    pub fn new(test: &str) -> Scratch {
        let dir = tempfile::Builder::new()
            .prefix(&format!("decodebench-it-{test}-"))
            .tempdir()
            .expect("creating a scratch directory");
        let path = dir.path().to_path_buf();
        Scratch {
            dir: Some(dir),
            path,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The output directory (`--out`) of the run.
    pub fn out(&self) -> PathBuf {
        self.path.join("out")
    }

    /// Writes a grid file and returns its path.
    pub fn grid(&self, spec: &GridSpec) -> PathBuf {
        self.write(&format!("{}.toml", spec.name), &spec.to_toml())
    }

    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.path.join(name);
        std::fs::write(&p, text).unwrap_or_else(|e| panic!("writing {}: {e}", p.display()));
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Some(d) = self.dir.take() {
                let kept = d.keep();
                eprintln!("scratch directory kept for inspection: {}", kept.display());
            }
        }
    }
}

/// A running `decodebench` process. Killed (SIGKILL) and reaped when dropped, so a failing test
/// leaves nothing behind; prints its log tail when dropped during a panic.
pub struct Proc {
    pub name: String,
    child: Child,
    log: PathBuf,
    status: Option<ExitStatus>,
}

impl Proc {
    /// Starts `decodebench ARGS`, stdout and stderr going to `<scratch>/<name>.log`.
    pub fn spawn(scratch: &Scratch, name: &str, args: &[String]) -> Proc {
        Proc::spawn_with_env(scratch, name, args, &[])
    }

    /// [`Proc::spawn`] with these environment variables set as well.
    pub fn spawn_with_env(
        scratch: &Scratch,
        name: &str,
        args: &[String],
        env: &[(&str, &str)],
    ) -> Proc {
        let log = scratch.path().join(format!("{name}.log"));
        let out = File::create(&log).expect("creating a process log");
        let err = out.try_clone().expect("duplicating a log handle");
        let child = Command::new(DECODEBENCH)
            .args(args)
            .env("NO_COLOR", "1")
            .env_remove("DECODEBENCH_TOKEN")
            .env_remove("DECODEBENCH_TOKEN_FILE")
            .env_remove("DECODEBENCH_COORDINATOR")
            .env_remove("DECODEBENCH_FAILPOINT")
            .env("DECODEBENCH_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {DECODEBENCH}: {e}"));
        Proc {
            name: name.to_string(),
            child,
            log,
            status: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal by name (`TERM`, `STOP`, `CONT`) with the system's `kill`.
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "kill -{sig} {} ({}) failed", self.pid(), self.name);
    }

    /// `kill -9`, and reap it.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        if let Ok(s) = self.child.wait() {
            self.status = Some(s);
        }
    }

    /// The exit status if it has exited.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    pub fn is_running(&mut self) -> bool {
        self.try_status().is_none()
    }

    /// Waits for the process to exit, at most `limit`; panics (with its log) past that.
    pub fn wait(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = self.try_status() {
                return s;
            }
            if Instant::now() >= deadline {
                panic!(
                    "{} did not exit within {limit:?}; its log:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            std::thread::sleep(POLL_PERIOD);
        }
    }

    /// Waits for a clean exit (status 0).
    pub fn wait_success(&mut self, limit: Duration) {
        let s = self.wait(limit);
        assert!(
            s.success(),
            "{} exited with {s}; its log:\n{}",
            self.name,
            self.log_tail()
        );
    }

    /// Everything the process wrote so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn log_tail(&self) -> String {
        let text = self.log();
        let lines: Vec<&str> = text.lines().collect();
        let from = lines.len().saturating_sub(LOG_TAIL_LINES);
        lines[from..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.try_status().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "----- {} (pid {}) log tail -----\n{}",
                self.name,
                self.pid(),
                self.log_tail()
            );
        }
    }
}

/// `decodebench coordinator` serving `grid` on 127.0.0.1:`port` into `scratch.out()`.
pub fn coordinator(scratch: &Scratch, name: &str, grid: &Path, port: u16, extra: &[&str]) -> Proc {
    let mut args: Vec<String> = vec![
        "coordinator".into(),
        "--grid".into(),
        grid.display().to_string(),
        "--listen".into(),
        format!("127.0.0.1:{port}"),
        "--out".into(),
        scratch.out().display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    Proc::spawn(scratch, name, &args)
}

/// `decodebench agent --backend cpu` for the coordinator on 127.0.0.1:`port`.
pub fn agent(scratch: &Scratch, name: &str, port: u16, extra: &[&str]) -> Proc {
    agent_with_env(scratch, name, port, extra, &[])
}

/// [`agent`] with `env` set in its environment (a fault drill's `DECODEBENCH_FAILPOINT`).
pub fn agent_with_env(
    scratch: &Scratch,
    name: &str,
    port: u16,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Proc {
    let mut args: Vec<String> = vec![
        "agent".into(),
        "--backend".into(),
        "cpu".into(),
        "--coordinator".into(),
        url(port),
        "--name".into(),
        name.into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    Proc::spawn_with_env(scratch, name, &args, env)
}

/// The `n`-th of a grid's case ids in id order (the test fails if there are not that many).
pub fn nth_case(ids: &BTreeSet<String>, n: usize) -> String {
    ids.iter()
        .nth(n)
        .unwrap_or_else(|| panic!("the grid has {} cases, no case {n}", ids.len()))
        .clone()
}

pub fn url(port: u16) -> String {
    format!("http://127.0.0.1:{port}")
}

/// A raw gRPC client of the coordinator on `port` (a test's hand-made agent), or the test fails
/// saying it could not connect.
pub async fn connect(
    port: u16,
) -> wire::coordinator_client::CoordinatorClient<tonic::transport::Channel> {
    wire::coordinator_client::CoordinatorClient::connect(url(port))
        .await
        .unwrap_or_else(|e| panic!("connecting to the coordinator on port {port}: {e}"))
}

/// A single-threaded tokio runtime for a test's raw gRPC client.
pub fn test_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// The Register request of a raw test client named `name`, on a CPU "device" of its own (uuid
/// `CPU-{name}`), speaking this build's protocol version.
pub fn cpu_register_request(name: &str) -> wire::RegisterRequest {
    wire::RegisterRequest {
        protocol_version: decodebench_proto::PROTOCOL_VERSION,
        agent_version: "integration-test".into(),
        agent_name: name.into(),
        device: Some(wire::DeviceIdentity {
            backend: "cpu".into(),
            name: format!("device of {name}"),
            uuid: format!("CPU-{name}"),
            sku: "cpu".into(),
            host: "localhost".into(),
            ..Default::default()
        }),
    }
}

/// Runs `decodebench ARGS` to completion (at most `limit`) and returns (status, stdout, stderr).
pub fn run_to_end(args: &[&str], limit: Duration) -> (ExitStatus, String, String) {
    let mut child = Command::new(DECODEBENCH)
        .args(args)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {DECODEBENCH}: {e}"));
    // Read both pipes on threads so a chatty child never blocks on a full pipe.
    let mut so = child.stdout.take().expect("piped stdout");
    let mut se = child.stderr.take().expect("piped stderr");
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut so, &mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut se, &mut s);
        s
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().expect("polling a child") {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "`decodebench {}` did not finish within {limit:?}",
                args.join(" ")
            );
        }
        std::thread::sleep(POLL_PERIOD);
    };
    let stdout = t_out.join().unwrap_or_default();
    let stderr = t_err.join().unwrap_or_default();
    (status, stdout, stderr)
}

/// The case ids of a grid file, as `decodebench grid FILE --cases` lists them.
pub fn grid_case_ids(grid: &Path) -> BTreeSet<String> {
    grid_case_ids_in_order(grid).into_iter().collect()
}

/// The case ids of a grid file in the order `decodebench grid FILE --cases` lists them: the
/// grid's expansion order, in which a coordinator queues the cases of one KV pool.
pub fn grid_case_ids_in_order(grid: &Path) -> Vec<String> {
    let path = grid.display().to_string();
    let (status, stdout, stderr) = run_to_end(&["grid", &path, "--cases"], Duration::from_secs(30));
    assert!(
        status.success(),
        "`decodebench grid {path} --cases` failed: {stderr}"
    );
    let ids: Vec<String> = stdout
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|t| t.len() == 16 && t.chars().all(|c| c.is_ascii_hexdigit()))
        .map(str::to_string)
        .collect();
    assert!(
        !ids.is_empty(),
        "no case ids in `decodebench grid --cases` output:\n{stdout}"
    );
    ids
}

/// Blocks until `cond` holds, polling every [`POLL_PERIOD`]; panics with `what` past `limit`.
pub fn wait_until(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        if Instant::now() >= deadline {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::sleep(POLL_PERIOD);
    }
}

/// A Status client for one coordinator, with its own small runtime so tests stay synchronous.
pub struct StatusProbe {
    rt: tokio::runtime::Runtime,
    url: String,
    token: Option<String>,
}

/// Per-call deadline of the Status probe: a coordinator that cannot answer in this time counts as
/// unreachable for that poll.
const STATUS_RPC_TIMEOUT: Duration = Duration::from_secs(2);

impl StatusProbe {
    pub fn new(port: u16) -> StatusProbe {
        StatusProbe {
            rt: test_runtime(),
            url: url(port),
            token: None,
        }
    }

    pub fn with_token(mut self, token: &str) -> StatusProbe {
        self.token = Some(token.to_string());
        self
    }

    /// The coordinator's status, or `None` when it cannot be reached.
    pub fn get(&self) -> Option<wire::StatusResponse> {
        self.rt.block_on(async {
            let endpoint = tonic::transport::Endpoint::from_shared(self.url.clone())
                .ok()?
                .connect_timeout(STATUS_RPC_TIMEOUT)
                .timeout(STATUS_RPC_TIMEOUT);
            let channel = endpoint.connect().await.ok()?;
            let mut client = wire::coordinator_client::CoordinatorClient::new(channel);
            let mut req = tonic::Request::new(wire::StatusRequest {});
            if let Some(t) = &self.token {
                req.metadata_mut()
                    .insert("authorization", format!("Bearer {t}").parse().ok()?);
            }
            client.status(req).await.ok().map(|r| r.into_inner())
        })
    }

    /// Polls until the status satisfies `cond`; returns that status. Panics past `limit`.
    pub fn wait_for(
        &self,
        limit: Duration,
        what: &str,
        mut cond: impl FnMut(&wire::StatusResponse) -> bool,
    ) -> wire::StatusResponse {
        let deadline = Instant::now() + limit;
        let mut last = None;
        loop {
            if let Some(s) = self.get() {
                if cond(&s) {
                    return s;
                }
                last = Some(s);
            }
            if Instant::now() >= deadline {
                panic!("timed out after {limit:?} waiting for {what}; last status: {last:?}");
            }
            std::thread::sleep(POLL_PERIOD);
        }
    }
}

/// The columns of `results.parquet` the tests look at, one per row.
#[derive(Debug, Clone)]
pub struct ResultRow {
    pub run_id: String,
    pub agent_id: String,
    pub received_unix_ms: i64,
    pub case_id: String,
    pub kernel: Option<String>,
    pub status: Option<String>,
}

/// Reads `results.parquet` from an output directory.
pub fn read_parquet(out: &Path) -> Result<Vec<ResultRow>> {
    let path = out.join("results.parquet");
    let file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .with_context(|| format!("reading the Parquet footer of {}", path.display()))?
        .build()?;
    let mut rows = Vec::new();
    for batch in reader {
        let batch = batch?;
        let utf8 = |name: &str| -> Result<Vec<Option<String>>> {
            let col = batch
                .column_by_name(name)
                .ok_or_else(|| anyhow!("{} has no column `{name}`", path.display()))?;
            let col = col
                .as_string_opt::<i32>()
                .ok_or_else(|| anyhow!("column `{name}` is {:?}, not Utf8", col.data_type()))?;
            Ok((0..col.len())
                .map(|i| (!col.is_null(i)).then(|| col.value(i).to_string()))
                .collect())
        };
        let run_id = utf8("run_id")?;
        let agent_id = utf8("agent_id")?;
        let case_id = utf8("case_id")?;
        let kernel = utf8("kernel")?;
        let status = utf8("status")?;
        let received = batch
            .column_by_name("received_unix_ms")
            .ok_or_else(|| anyhow!("no column `received_unix_ms`"))?;
        let received = received.as_primitive_opt::<Int64Type>().ok_or_else(|| {
            anyhow!(
                "`received_unix_ms` is {:?}, not Int64",
                received.data_type()
            )
        })?;
        for i in 0..batch.num_rows() {
            rows.push(ResultRow {
                run_id: run_id[i].clone().unwrap_or_default(),
                agent_id: agent_id[i].clone().unwrap_or_default(),
                received_unix_ms: received.value(i),
                case_id: case_id[i].clone().unwrap_or_default(),
                kernel: kernel[i].clone(),
                status: status[i].clone(),
            });
        }
    }
    Ok(rows)
}

/// Kernels every case reports (one Parquet row each).
pub const KERNELS: [&str; 2] = ["baseline", "optimized"];

/// Checks that `results.parquet` holds every case of `expected` exactly once: one row per case and
/// kernel, no case missing, none extra, none twice, every kernel `ok`. Returns the rows.
pub fn assert_each_case_once(out: &Path, expected: &BTreeSet<String>) -> Vec<ResultRow> {
    let rows = read_parquet(out).unwrap_or_else(|e| panic!("{e:#}"));
    check_each_case_at_most_once(&rows, expected).unwrap_or_else(|e| panic!("{e:#}"));
    let seen: BTreeSet<&str> = rows.iter().map(|r| r.case_id.as_str()).collect();
    let missing: Vec<&String> = expected
        .iter()
        .filter(|id| !seen.contains(id.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} cases have no result: {missing:?}",
        missing.len(),
        expected.len()
    );
    assert_eq!(
        rows.len(),
        expected.len() * KERNELS.len(),
        "results.parquet should have one row per case and kernel"
    );
    for r in &rows {
        assert_eq!(
            r.status.as_deref(),
            Some("ok"),
            "case {} kernel {:?} is not ok on the CPU backend",
            r.case_id,
            r.kernel
        );
    }
    rows
}

/// Checks that no case appears twice (per kernel), no case is outside the grid, and each case has
/// both kernels. Cases may be missing (an interrupted run).
pub fn check_each_case_at_most_once(rows: &[ResultRow], expected: &BTreeSet<String>) -> Result<()> {
    let mut per_case: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for r in rows {
        if !expected.contains(&r.case_id) {
            bail!("case {} in the results is not in the grid", r.case_id);
        }
        let k = r
            .kernel
            .as_deref()
            .ok_or_else(|| anyhow!("case {} has a row without a kernel", r.case_id))?;
        per_case.entry(&r.case_id).or_default().push(k);
    }
    for (case, mut kernels) in per_case {
        kernels.sort_unstable();
        if kernels != KERNELS {
            bail!("case {case} has kernel rows {kernels:?}; expected exactly {KERNELS:?}");
        }
    }
    Ok(())
}

/// The reference-format CSV in an output directory (exactly one is expected).
pub fn reference_csv(out: &Path) -> PathBuf {
    let found: Vec<PathBuf> = std::fs::read_dir(out)
        .unwrap_or_else(|e| panic!("listing {}: {e}", out.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.starts_with("decode_attention_benchmark_") && n.ends_with(".csv")
            })
        })
        .collect();
    assert_eq!(
        found.len(),
        1,
        "expected one reference CSV in {}, found {found:?}",
        out.display()
    );
    found.into_iter().next().expect("one element")
}

/// Leftover temporary files of an atomic write (`.<name>.<pid>.tmp`) in an output directory.
pub fn temp_files(out: &Path) -> Vec<String> {
    std::fs::read_dir(out)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.ends_with(".tmp"))
                .collect()
        })
        .unwrap_or_default()
}

/// Parses the agent's closing line (`agent done: N cases run, N results accepted, N duplicates,
/// N cases handed back`) into (run, accepted, duplicates, handed back).
pub fn agent_summary(log: &str) -> Option<(u64, u64, u64, u64)> {
    let line = log.lines().rev().find(|l| l.contains("agent done:"))?;
    let tail = line.split("agent done:").nth(1)?;
    let nums: Vec<u64> = tail
        .split(',')
        .filter_map(|part| part.split_whitespace().next()?.parse().ok())
        .collect();
    match nums.as_slice() {
        [run, accepted, dups, back] => Some((*run, *accepted, *dups, *back)),
        _ => None,
    }
}

/// The agents' closing lines summed: (cases run, results accepted, duplicates, cases handed back);
/// an agent without one counts nothing.
pub fn summary_totals(agents: &[Proc]) -> (u64, u64, u64, u64) {
    agents
        .iter()
        .filter_map(|a| agent_summary(&a.log()))
        .fold((0, 0, 0, 0), |t, s| {
            (t.0 + s.0, t.1 + s.1, t.2 + s.2, t.3 + s.3)
        })
}

/// Waits until something accepts TCP connections on 127.0.0.1:`port`.
pub fn wait_for_listener(port: u16, limit: Duration) {
    wait_until(limit, &format!("a listener on 127.0.0.1:{port}"), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
}

/// A TCP relay on 127.0.0.1 to the listener on port `to` (a coordinator) that accepts
/// connections at once but carries no byte until [`Gate::open`]. A client started early (an
/// agent) connects and waits in its first call, which reaches the coordinator the moment the test
/// opens the gate, however long the client took to start. Once open, connections go straight
/// through. Dropping it drops the connections still held and stops accepting.
pub struct Gate {
    port: u16,
    state: Arc<GateState>,
}

#[derive(Default)]
struct GateState {
    flags: Mutex<GateFlags>,
    changed: Condvar,
    accepted: AtomicUsize,
}

#[derive(Default)]
struct GateFlags {
    open: bool,
    closed: bool,
}

impl GateState {
    fn flags(&self) -> MutexGuard<'_, GateFlags> {
        self.flags.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Gate {
    pub fn new(to: u16) -> Gate {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1:0 for a gate");
        let port = listener
            .local_addr()
            .expect("local address of a bound socket")
            .port();
        let state = Arc::new(GateState::default());
        let accepting = state.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if accepting.flags().closed {
                    break;
                }
                let Ok(client) = client else { continue };
                accepting.accepted.fetch_add(1, Ordering::SeqCst);
                let state = accepting.clone();
                std::thread::spawn(move || gate_relay(client, to, &state));
            }
        });
        Gate { port, state }
    }

    /// The port to give the client instead of the coordinator's.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Connections accepted so far (held, until the gate is open).
    pub fn accepted(&self) -> usize {
        self.state.accepted.load(Ordering::SeqCst)
    }

    pub fn open(&self) {
        self.state.flags().open = true;
        self.state.changed.notify_all();
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.state.flags().closed = true;
        self.state.changed.notify_all();
        // Wakes the accept loop, which sees `closed`.
        let _ = std::net::TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// One connection through a [`Gate`]: held until the gate opens, then relayed both ways to
/// 127.0.0.1:`to` (dropped if the gate closes first or nothing listens there).
fn gate_relay(client: std::net::TcpStream, to: u16, state: &GateState) {
    {
        let mut flags = state.flags();
        while !flags.open && !flags.closed {
            flags = state.changed.wait(flags).unwrap_or_else(|p| p.into_inner());
        }
        if flags.closed {
            return;
        }
    }
    let Ok(upstream) = std::net::TcpStream::connect(("127.0.0.1", to)) else {
        return;
    };
    // HTTP/2 sends small frames: no Nagle delay on the relay's hop.
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (Ok(client_in), Ok(upstream_out)) = (client.try_clone(), upstream.try_clone()) else {
        return;
    };
    std::thread::spawn(move || pipe(client_in, upstream_out));
    pipe(upstream, client);
}

/// Copies `from` to `to` until `from` ends, then ends `to`'s writing side.
fn pipe(mut from: std::net::TcpStream, mut to: std::net::TcpStream) {
    let _ = std::io::copy(&mut from, &mut to);
    let _ = to.shutdown(std::net::Shutdown::Write);
}

/// Milliseconds since the Unix epoch, as the coordinator stamps `received_unix_ms`.
pub fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The events (`{"event": ...}` frames, such as the `lost` ones) in the journal of an output
/// directory, in order, read without opening the journal as the coordinator does (no lock, no
/// repair), so that it can be read while a coordinator runs: a frame cut short or not yet whole
/// ends the list. Empty when there is no journal yet.
pub fn journal_events(out: &Path) -> Vec<serde_json::Value> {
    const MAGIC_BYTES: usize = 8;
    let Ok(bytes) = std::fs::read(out.join("journal.dbj")) else {
        return Vec::new();
    };
    let mut events = Vec::new();
    let mut pos = MAGIC_BYTES;
    let mut header = true;
    while pos + 8 <= bytes.len() {
        let len = u32::from_le_bytes([bytes[pos], bytes[pos + 1], bytes[pos + 2], bytes[pos + 3]])
            as usize;
        let Some(payload) = bytes.get(pos + 8..pos + 8 + len) else {
            break;
        };
        pos += 8 + len;
        if std::mem::take(&mut header) || !payload.starts_with(br#"{"event":"#) {
            continue;
        }
        match serde_json::from_slice(payload) {
            Ok(v) => events.push(v),
            Err(_) => break,
        }
    }
    events
}

/// The `lost` events of [`journal_events`] for one case: (agent id, cause) of each, in order.
pub fn journaled_losses(out: &Path, case_id: &str) -> Vec<(String, String)> {
    journal_events(out)
        .iter()
        .filter(|e| e["event"] == "lost" && e["case_id"] == case_id)
        .map(|e| {
            (
                e["agent_id"].as_str().unwrap_or_default().to_string(),
                e["cause"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// One `attempt_failed` event of [`journal_events`]: a reported failure the coordinator queued
/// for another attempt.
#[derive(Debug, Clone, PartialEq)]
pub struct JournaledFailedAttempt {
    pub agent_id: String,
    pub attempt: u64,
    pub errors: Vec<String>,
}

/// The `attempt_failed` events of [`journal_events`] for one case, in order.
pub fn journaled_failed_attempts(out: &Path, case_id: &str) -> Vec<JournaledFailedAttempt> {
    journal_events(out)
        .iter()
        .filter(|e| e["event"] == "attempt_failed" && e["case_id"] == case_id)
        .map(|e| JournaledFailedAttempt {
            agent_id: e["agent_id"].as_str().unwrap_or_default().to_string(),
            attempt: e["attempt"].as_u64().unwrap_or_default(),
            errors: e["errors"]
                .as_array()
                .map(|v| {
                    v.iter()
                        .map(|x| x.as_str().unwrap_or_default().to_string())
                        .collect()
                })
                .unwrap_or_default(),
        })
        .collect()
}
