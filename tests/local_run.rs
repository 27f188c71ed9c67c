//! `decodebench run`: the embedded coordinator and a CPU agent in one process, end to end.

use crate::util::*;
use std::time::Duration;

/// The reference script's CSV header, byte for byte.
const REFERENCE_HEADER: &str = "batch_size,trtllm_mean,trtllm_std,baseline_mean,baseline_std,\
speedup_percent,q_dtype,kv_cache_dtype,output_dtype,block_size,num_kv_heads,head_size,max_seq_len";

/// `decodebench run` on the CPU backend for `grid`, writing to `out`, with `extra` flags.
fn cpu_run_args(grid: &std::path::Path, out: &std::path::Path, extra: &[&str]) -> Vec<String> {
    let (grid, out) = (grid.display().to_string(), out.display().to_string());
    ["run", "--backend", "cpu", "--grid", &grid, "--out", &out]
        .iter()
        .chain(extra)
        .map(|s| s.to_string())
        .collect()
}

#[test]
fn run_on_the_cpu_writes_every_case_once_in_all_three_files() {
    let _serial = exclusive();
    let s = Scratch::new("local-run");
    let spec = GridSpec::tiny();
    let grid = s.grid(&spec);
    let ids = grid_case_ids(&grid);
    assert_eq!(
        ids.len(),
        spec.case_count(),
        "the grid lists every case once"
    );
    let out = s.out();
    let args = cpu_run_args(&grid, &out, &[]);
    let mut run = Proc::spawn(&s, "run", &args);
    run.wait_success(Duration::from_secs(90));

    assert!(
        out.join("results.parquet").is_file(),
        "results.parquet is missing"
    );
    assert!(out.join("results.csv").is_file(), "results.csv is missing");
    let rows = assert_each_case_once(&out, &ids);
    let run_ids: std::collections::BTreeSet<&str> =
        rows.iter().map(|r| r.run_id.as_str()).collect();
    assert_eq!(run_ids.len(), 1, "one run id for one run: {run_ids:?}");
    assert!(
        temp_files(&out).is_empty(),
        "temporary files left: {:?}",
        temp_files(&out)
    );

    // The flat CSV: a header and one line per case and kernel, with the case ids of the grid.
    let mut flat = csv::Reader::from_path(out.join("results.csv")).expect("reading results.csv");
    let headers = flat.headers().expect("results.csv header").clone();
    let case_col = headers
        .iter()
        .position(|h| h == "case_id")
        .expect("results.csv has a case_id column");
    let mut flat_ids = Vec::new();
    for rec in flat.records() {
        let rec = rec.expect("a results.csv record");
        flat_ids.push(rec.get(case_col).unwrap_or_default().to_string());
    }
    assert_eq!(flat_ids.len(), ids.len() * KERNELS.len());
    let flat_set: std::collections::BTreeSet<String> = flat_ids.into_iter().collect();
    assert_eq!(flat_set, ids, "results.csv holds exactly the grid's cases");

    // The reference-format CSV: exactly the script's header, one row per case, script dtypes.
    let reference = reference_csv(&out);
    let text = std::fs::read_to_string(&reference).expect("reading the reference CSV");
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some(REFERENCE_HEADER));
    let data: Vec<&str> = lines.filter(|l| !l.is_empty()).collect();
    assert_eq!(data.len(), ids.len(), "one reference row per case");
    for line in &data {
        let cells: Vec<&str> = line.split(',').collect();
        assert_eq!(cells.len(), 13, "13 cells in {line:?}");
        let batch: u32 = cells[0].parse().expect("batch_size is a number");
        assert!(
            spec.batch_sizes.contains(&batch),
            "batch size {batch} is in the grid"
        );
        for dtype in &cells[6..9] {
            assert!(
                ["torch.bfloat16", "torch.float8_e4m3fn", "torch.uint8"].contains(dtype),
                "dtype {dtype:?} is spelled as the script prints it"
            );
        }
        let mean: f64 = cells[1]
            .parse()
            .expect("trtllm_mean is a number for an ok case");
        assert!(mean > 0.0, "a measured time is positive: {line}");
    }

    // Running the same command again on the same --out finds every case in the journal and runs
    // none of them again.
    let mut again = Proc::spawn(&s, "run-again", &args);
    again.wait_success(Duration::from_secs(60));
    let rows_again = assert_each_case_once(&out, &ids);
    let stamp = |rows: &[ResultRow]| {
        let mut v: Vec<(String, String, i64)> = rows
            .iter()
            .map(|r| {
                (
                    r.case_id.clone(),
                    r.kernel.clone().unwrap_or_default(),
                    r.received_unix_ms,
                )
            })
            .collect();
        v.sort();
        v
    };
    assert_eq!(
        stamp(&rows),
        stamp(&rows_again),
        "a resumed run that had nothing left to do must not re-measure any case"
    );
}

#[test]
fn kernels_optimized_runs_only_the_optimized_kernel() {
    let _serial = exclusive();
    let s = Scratch::new("optimized-only");
    let spec = GridSpec::tiny();
    let grid = s.grid(&spec);
    let default_ids = grid_case_ids(&grid);
    let out = s.out();
    let args = cpu_run_args(&grid, &out, &["--kernels", "optimized"]);
    let mut run = Proc::spawn(&s, "run", &args);
    run.wait_success(Duration::from_secs(90));

    let rows = read_parquet(&out).unwrap_or_else(|e| panic!("{e:#}"));
    let ids: std::collections::BTreeSet<&str> = rows.iter().map(|r| r.case_id.as_str()).collect();
    assert_eq!(ids.len(), spec.case_count(), "every case ran");
    assert_eq!(rows.len(), ids.len(), "one row per case: {rows:?}");
    for r in &rows {
        assert_eq!(r.kernel.as_deref(), Some("optimized"), "{r:?}");
        assert_eq!(r.status.as_deref(), Some("ok"), "{r:?}");
        assert!(
            !default_ids.contains(&r.case_id),
            "the selection is part of the case id: {}",
            r.case_id
        );
    }
    // The reference CSV keeps its 13 columns; the baseline and speedup cells are empty.
    let text = std::fs::read_to_string(reference_csv(&out)).expect("reading the reference CSV");
    let data: Vec<&str> = text.lines().skip(1).filter(|l| !l.is_empty()).collect();
    assert_eq!(data.len(), spec.case_count());
    for line in data {
        let cells: Vec<&str> = line.split(',').collect();
        assert_eq!(cells.len(), 13, "{line:?}");
        assert!(cells[1].parse::<f64>().is_ok_and(|m| m > 0.0), "{line:?}");
        assert_eq!(&cells[3..6], &["", "", ""], "{line:?}");
    }
}

/// A fleet requirement that `run`'s local agents cannot meet is refused at once, naming the flag
/// and what to use instead (it used to wait forever: nothing else can join `run`'s loopback
/// coordinator), and nothing is written.
#[test]
fn run_refuses_a_fleet_its_local_agents_cannot_make() {
    let _serial = exclusive();
    let s = Scratch::new("local-fleet");
    let grid = s.grid(&GridSpec::tiny());
    for (extra, flag) in [
        (&["--expect-agents", "5"][..], "--expect-agents 5"),
        (&["--wait-for", "NVIDIA H100 80GB HBM3=1"][..], "--wait-for"),
    ] {
        let out = s.out();
        let mut run = Proc::spawn(&s, "run", &cpu_run_args(&grid, &out, extra));
        let status = run.wait(Duration::from_secs(30));
        assert!(!status.success(), "{flag}: {}", run.log_tail());
        let log = run.log();
        assert!(log.contains(flag), "{log}");
        assert!(log.contains("decodebench coordinator"), "{log}");
        assert!(
            !out.join("journal.dbj").exists(),
            "{flag}: nothing is written"
        );
    }
    // Two local CPU agents do make `--expect-agents 2`.
    let out = s.out();
    let args = cpu_run_args(&grid, &out, &["--cpu-agents", "2", "--expect-agents", "2"]);
    Proc::spawn(&s, "run", &args).wait_success(Duration::from_secs(90));
}

/// An --out directory holding an earlier run's results but no journal (deleted, or written by
/// another copy) is refused, and the results in it are left as they were.
#[test]
fn run_never_writes_over_results_it_cannot_resume() {
    let _serial = exclusive();
    let s = Scratch::new("earlier-results");
    let grid = s.grid(&GridSpec::tiny());
    let out = s.out();
    let args = cpu_run_args(&grid, &out, &[]);
    Proc::spawn(&s, "run", &args).wait_success(Duration::from_secs(90));
    std::fs::remove_file(out.join("journal.dbj")).unwrap();
    let before = std::fs::read(out.join("results.csv")).unwrap();
    let mut again = Proc::spawn(&s, "run", &args);
    let status = again.wait(Duration::from_secs(30));
    assert!(!status.success(), "{}", again.log_tail());
    let log = again.log();
    assert!(
        log.contains("holds an earlier run's results.parquet"),
        "{log}"
    );
    assert!(log.contains("fresh --out"), "{log}");
    assert_eq!(std::fs::read(out.join("results.csv")).unwrap(), before);
    assert!(!out.join("journal.dbj").exists());
}

/// `precompile` refuses a malformed target naming the expected form, and with a well-formed one
/// either compiles every kernel within its resource budgets (`--strict`) and fills the cache, or,
/// where NVRTC is not installed, says that NVRTC is what is missing. A compile error or a missed
/// budget fails. `.ci/run` installs NVRTC and sets `DECODEBENCH_REQUIRE_NVRTC=1`, so that in CI
/// the kernels are always compiled.
#[test]
fn precompile_fills_the_cache_or_names_what_is_missing() {
    let s = Scratch::new("precompile");
    let (status, _, stderr) = run_to_end(&["precompile", "--cc", "nine"], Duration::from_secs(30));
    assert!(!status.success());
    assert!(stderr.contains("MAJOR.MINOR"), "{stderr}");

    let cache = s.path().join("cache");
    let resources = s.path().join("resources");
    let (dir, res) = (cache.display().to_string(), resources.display().to_string());
    let (status, stdout, stderr) = run_to_end(
        &[
            "precompile",
            "--cc",
            "9.0",
            "--cache-dir",
            &dir,
            "--strict",
            "--resources",
            &res,
        ],
        Duration::from_secs(600),
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    let required = std::env::var_os("DECODEBENCH_REQUIRE_NVRTC").is_some_and(|v| v == "1");
    if !status.success() {
        assert!(
            !required,
            "DECODEBENCH_REQUIRE_NVRTC=1, but precompile failed:\n{stdout}\n{stderr}"
        );
        assert!(
            stderr.contains("the NVRTC library (libnvrtc.so) was not found"),
            "precompile failed for another reason than a missing NVRTC:\n{stdout}\n{stderr}"
        );
        eprintln!("NVRTC is not installed here: the kernels were not compiled");
        return;
    }
    let cubins: Vec<_> = std::fs::read_dir(&cache)
        .expect("the cache directory exists")
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "cubin"))
        .collect();
    assert_eq!(cubins.len(), 1, "one sm_90a module: {stdout}");
    assert!(stdout.contains("sm_90a"), "{stdout}");
    // ptxas's report came with it, was checked, and is kept beside the module.
    assert!(stdout.contains("budgets: all met"), "{stdout}");
    assert!(
        stdout.contains("* decode_mma_d128_g8_bf16_bf16_bf16_s2"),
        "{stdout}"
    );
    let log = std::fs::read_to_string(cubins[0].with_extension("cubin.log")).unwrap();
    assert!(log.contains("Used"), "{log}");
    let csv = std::fs::read_to_string(resources.join("kernel-resources-sm_90a.csv")).unwrap();
    assert!(
        csv.lines().any(|l| l.starts_with("merge_d128_bf16,")),
        "{csv}"
    );
    // The report's registers are the ones the module records for each kernel (read from the
    // cubin itself, not from the log the report was parsed from).
    let recorded = cubin_register_counts(&std::fs::read(&cubins[0]).unwrap());
    let reported: std::collections::BTreeMap<String, u32> = csv
        .lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (f[0].to_string(), f[1].parse().unwrap())
        })
        .collect();
    assert!(reported.len() > 100, "{csv}");
    assert_eq!(
        reported, recorded,
        "ptxas's report against the cubin's own counts"
    );

    // From the cache, the stored report is checked again.
    let (status, stdout, stderr) = run_to_end(
        &["precompile", "--cc", "9.0", "--cache-dir", &dir, "--strict"],
        Duration::from_secs(60),
    );
    assert!(status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("from the cache"), "{stdout}");
    assert!(stdout.contains("budgets: all met"), "{stdout}");
}

/// Registers per thread of every kernel in a cubin, as the module records them for the driver:
/// the `EIATTR_REGCOUNT` entries (attribute 0x2f, format 4: a symbol index and a value) of its
/// `.nv.info` section.
fn cubin_register_counts(cubin: &[u8]) -> std::collections::BTreeMap<String, u32> {
    use object::{Object, ObjectSection, ObjectSymbol, ObjectSymbolTable, SymbolIndex};
    const EIFMT_SVAL: u8 = 4;
    const EIATTR_REGCOUNT: u8 = 0x2f;
    let file = object::File::parse(cubin).expect("the cubin is an ELF file");
    let info = file
        .section_by_name(".nv.info")
        .expect("a .nv.info section")
        .data()
        .unwrap();
    let symbols = file.symbol_table().expect("a symbol table");
    let mut counts = std::collections::BTreeMap::new();
    let mut at = 0;
    while at + 4 <= info.len() {
        let (format, attribute) = (info[at], info[at + 1]);
        let size = u16::from_le_bytes([info[at + 2], info[at + 3]]) as usize;
        if format == EIFMT_SVAL && attribute == EIATTR_REGCOUNT && size == 8 {
            let word = |o: usize| u32::from_le_bytes(info[o..o + 4].try_into().unwrap());
            let symbol = symbols
                .symbol_by_index(SymbolIndex(word(at + 4) as usize))
                .expect("the attribute's symbol");
            counts.insert(symbol.name().unwrap().to_string(), word(at + 8));
        }
        // Only format 4 has a payload; the others keep their value in the header's last 2 bytes.
        at += 4 + if format == EIFMT_SVAL { size } else { 0 };
    }
    counts
}

/// A metrics port that is taken stops the coordinator before it writes anything to --out (it used
/// to leave a journal behind), and the error names the flag.
#[test]
fn a_taken_metrics_port_leaves_the_output_directory_alone() {
    let s = Scratch::new("metrics-port-taken");
    let grid = s.grid(&GridSpec::tiny());
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("binding a loopback port");
    let metrics = taken.local_addr().unwrap().to_string();
    let mut c = coordinator(
        &s,
        "coordinator",
        &grid,
        free_port(),
        &["--metrics-listen", &metrics],
    );
    let status = c.wait(Duration::from_secs(20));
    let log = c.log();
    assert!(!status.success(), "{log}");
    assert!(log.contains("--metrics-listen"), "{log}");
    assert!(!s.out().exists(), "nothing is written: {log}");
}

/// `DECODEBENCH_HOST` names the host in the results (under Kubernetes the manifests set it to the
/// node's name; the rows carried the pod's name before).
#[test]
fn decodebench_host_names_the_host_column() {
    let s = Scratch::new("host-env");
    let grid = s.grid(&GridSpec::tiny());
    let out = s.out();
    let status = std::process::Command::new(DECODEBENCH)
        .args(cpu_run_args(&grid, &out, &[]))
        .env("DECODEBENCH_HOST", "gpu-node-17")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("running decodebench");
    assert!(status.success());
    let text = std::fs::read_to_string(out.join("results.csv")).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let col = header
        .iter()
        .position(|c| *c == "host")
        .expect("a host column");
    let hosts: std::collections::BTreeSet<&str> =
        lines.map(|l| l.split(',').nth(col).unwrap_or("")).collect();
    assert_eq!(hosts.into_iter().collect::<Vec<_>>(), vec!["gpu-node-17"]);
}

/// The pids of `parent`'s child processes, from /proc.
fn children_of(parent: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            // "pid (comm) state ppid ...": the name may hold spaces, so split after its `)`.
            let (_, rest) = stat.rsplit_once(')')?;
            let ppid: u32 = rest.split_whitespace().nth(1)?.parse().ok()?;
            (ppid == parent).then_some(pid)
        })
        .collect()
}

/// `run` flags for agent processes. The lease timeout is long on purpose: `run` sees its agent
/// processes die and has their leases lost at once, so no test here waits for a timeout.
const PROCESS_AGENTS: [&str; 8] = [
    "--local-agents",
    "process",
    "--lease-timeout-s",
    "60",
    "--heartbeat-s",
    "0.5",
    "--shard-cases",
    "4",
];

/// With `--local-agents process`, an agent process killed with SIGKILL mid-run (as the OOM
/// killer would) is replaced by a fresh one, and the run still ends with every case once.
#[test]
fn run_restarts_an_agent_process_killed_mid_run() {
    let _serial = exclusive();
    let s = Scratch::new("local-agent-killed");
    let grid = s.grid(&GridSpec::slow());
    let ids = grid_case_ids(&grid);
    let out = s.out();
    // The agent logs each case as it starts it (debug), after reporting the one before.
    let mut args = vec!["--log".to_string(), "info,decodebench_agent=debug".into()];
    args.extend(cpu_run_args(&grid, &out, &PROCESS_AGENTS));
    let mut run = Proc::spawn(&s, "run", &args);
    wait_until(
        Duration::from_secs(60),
        "the agent process to start its third case",
        || run.log().matches("running case").count() >= 3,
    );
    let agents = children_of(run.pid());
    assert_eq!(
        agents.len(),
        1,
        "one agent process: {agents:?}\n{}",
        run.log_tail()
    );
    let killed = std::process::Command::new("kill")
        .args(["-9", &agents[0].to_string()])
        .status()
        .expect("running kill");
    assert!(killed.success());
    // Well before the 60-s lease timeout: the death itself loses the lease.
    run.wait_success(Duration::from_secs(40));

    let rows = assert_each_case_once(&out, &ids);
    let agent_ids: std::collections::BTreeSet<&str> =
        rows.iter().map(|r| r.agent_id.as_str()).collect();
    assert_eq!(
        agent_ids.len(),
        2,
        "results from the killed agent and from its replacement: {agent_ids:?}"
    );
    let log = run.log();
    assert!(log.contains("was killed by signal 9 (SIGKILL"), "{log}");
    assert!(log.contains("its lease is lost now"), "{log}");
    assert!(
        log.contains("agent local-cpu0: its process died 1 time(s) and was restarted 1 time(s)"),
        "{log}"
    );
}

/// A case that crashes every agent process that runs it (here `DECODEBENCH_FAILPOINT=abort:`,
/// as a segfault would) is given up after `--max-attempts` losses and recorded as failed; the
/// run still measures every other case, and exits 2. Once the cause is gone, `--retry-failed`
/// runs that case alone again.
#[test]
fn run_records_a_case_that_crashes_its_agent_process_as_failed_and_finishes_the_rest() {
    let _serial = exclusive();
    let s = Scratch::new("local-agent-crash-case");
    let grid = s.grid(&GridSpec::tiny());
    let ids = grid_case_ids(&grid);
    let victim = nth_case(&ids, 5);
    let out = s.out();
    let mut args = cpu_run_args(&grid, &out, &PROCESS_AGENTS);
    args.extend(["--max-attempts".into(), "2".into()]);
    let drill = format!("abort:{}", &victim[..8]);
    let mut run = Proc::spawn_with_env(&s, "run", &args, &[("DECODEBENCH_FAILPOINT", &drill)]);
    // Two losses, each well before the 60-s lease timeout.
    let status = run.wait(Duration::from_secs(50));
    assert_eq!(status.code(), Some(2), "{}", run.log_tail());
    let log = run.log();
    assert!(log.contains("was killed by signal 6 (SIGABRT)"), "{log}");
    assert!(log.contains("giving up on it"), "{log}");
    // The agent names a case to the coordinator before it starts running it, so every loss is
    // charged to the victim: none to a case that merely shared its lease.
    let lost: Vec<String> = journal_events(&out)
        .iter()
        .filter(|e| e["event"] == "lost")
        .map(|e| e["case_id"].as_str().unwrap_or("?").to_string())
        .collect();
    assert_eq!(lost, vec![victim.clone(); 2], "losses charged: {lost:?}");

    let rows = read_parquet(&out).unwrap_or_else(|e| panic!("{e:#}"));
    check_each_case_at_most_once(&rows, &ids).unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(
        rows.len(),
        ids.len() * KERNELS.len(),
        "every case has its rows"
    );
    for r in &rows {
        let want = if r.case_id == victim { "failed" } else { "ok" };
        assert_eq!(r.status.as_deref(), Some(want), "{r:?}");
    }

    let mut retry_args = cpu_run_args(&grid, &out, &PROCESS_AGENTS);
    retry_args.push("--retry-failed".into());
    let mut retry = Proc::spawn(&s, "retry", &retry_args);
    retry.wait_success(Duration::from_secs(60));
    let after = assert_each_case_once(&out, &ids);
    let rerun: Vec<&ResultRow> = after
        .iter()
        .filter(|r| {
            !rows
                .iter()
                .any(|b| b.received_unix_ms == r.received_unix_ms && b.case_id == r.case_id)
        })
        .collect();
    assert!(
        !rerun.is_empty() && rerun.iter().all(|r| r.case_id == victim),
        "only the failed case runs again: {rerun:?}"
    );
}

/// `--retry-failed` runs its round once, however often the same command is run again (as a
/// supervisor or a Job restarting a run that exits 2 would): the case that crashes every agent
/// is retried in round 1, fails again, and the same command then reruns nothing, leaves the
/// journal as it was and names the next round; `--retry-failed=2` runs it again.
#[test]
fn retry_failed_runs_its_round_once_however_often_the_command_is_repeated() {
    let _serial = exclusive();
    let s = Scratch::new("local-retry-round");
    let grid = s.grid(&GridSpec::tiny());
    let ids = grid_case_ids(&grid);
    let victim = nth_case(&ids, 3);
    let out = s.out();
    let drill = format!("abort:{}", &victim[..8]);
    let args = |extra: &[&str]| {
        let mut args = cpu_run_args(&grid, &out, &PROCESS_AGENTS);
        args.extend(["--max-attempts".into(), "2".into()]);
        args.extend(extra.iter().map(|a| a.to_string()));
        args
    };
    let victim_losses = || journaled_losses(&out, &victim).len();
    let rounds = || -> Vec<String> {
        journal_events(&out)
            .iter()
            .filter(|e| e["event"] == "retry_round")
            .map(|e| e["round"].as_str().unwrap_or_default().to_string())
            .collect()
    };
    let crashing = |name: &str, extra: &[&str]| {
        let mut run =
            Proc::spawn_with_env(&s, name, &args(extra), &[("DECODEBENCH_FAILPOINT", &drill)]);
        let status = run.wait(Duration::from_secs(60));
        assert_eq!(status.code(), Some(2), "{}", run.log_tail());
        run
    };

    crashing("run", &[]);
    assert_eq!(victim_losses(), 2, "given up after --max-attempts 2 losses");
    let run = crashing("retry-1", &["--retry-failed"]);
    assert!(
        run.log().contains("retry round `1` starts"),
        "{}",
        run.log()
    );
    assert!(run.log().contains("giving up on it"), "{}", run.log());
    assert_eq!(victim_losses(), 4, "round 1 ran the case again, twice");
    assert_eq!(rounds(), ["1"]);
    let journal = std::fs::read(out.join("journal.dbj")).expect("the journal");

    // The same command again, twice: nothing runs, nothing is journaled.
    for attempt in ["retry-1-again", "retry-1-once-more"] {
        let run = crashing(attempt, &["--retry-failed"]);
        let log = run.log();
        assert!(log.contains("retry round `1` already ran"), "{log}");
        assert!(!log.contains("giving up on it"), "{log}");
        assert!(
            log.contains("rerun with --retry-failed=2 to run only them again"),
            "the summary names the next round: {log}"
        );
        assert_eq!(
            std::fs::read(out.join("journal.dbj")).expect("the journal"),
            journal,
            "{attempt}: the journal is unchanged"
        );
    }
    let rows = read_parquet(&out).unwrap_or_else(|e| panic!("{e:#}"));
    check_each_case_at_most_once(&rows, &ids).unwrap_or_else(|e| panic!("{e:#}"));
    assert!(rows
        .iter()
        .all(|r| (r.case_id == victim) == (r.status.as_deref() == Some("failed"))));

    // The cause gone, a new round: the case runs again and the run is complete.
    let mut fixed = Proc::spawn(&s, "retry-2", &args(&["--retry-failed=2"]));
    fixed.wait_success(Duration::from_secs(60));
    assert_eq!(rounds(), ["1", "2"]);
    let rows = assert_each_case_once(&out, &ids);
    assert!(rows.iter().all(|r| r.status.as_deref() == Some("ok")));
}

/// Whether process `pid` is gone (or a zombie waiting for a reaper that may never come).
fn process_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state == "Z" || state == "X"),
    }
}

/// A `run` killed with SIGKILL (the OOM killer, a node drain's last resort) takes its agent
/// processes with it: left running, they would hold the GPUs and skew the next run's timings.
#[test]
fn a_killed_run_leaves_no_agent_process_behind() {
    let _serial = exclusive();
    let s = Scratch::new("run-killed");
    let grid = s.grid(&GridSpec::slow());
    let out = s.out();
    // Quiet agents: one that logged would also die of its broken stderr pipe once `run` is gone,
    // which is not what this test is about (a GPU agent deep in a long case logs nothing).
    let mut args = vec!["--log".to_string(), "warn".into()];
    args.extend(cpu_run_args(&grid, &out, &PROCESS_AGENTS));
    let mut run = Proc::spawn(&s, "run", &args);
    let mut agents = Vec::new();
    wait_until(Duration::from_secs(60), "an agent process", || {
        agents = children_of(run.pid());
        !agents.is_empty()
    });
    // Into its first cases (about a second each).
    std::thread::sleep(Duration::from_secs(2));
    run.kill9();
    // The agent finishes the case it is running, finds its coordinator gone and exits at once;
    // without the parent-death signal it would keep trying to reach it for 30 s.
    wait_until(
        Duration::from_secs(10),
        "the agent process to exit after its run was killed",
        || process_gone(agents[0]),
    );
}
