//! The result store end to end, as the coordinator uses it: expand a preset grid, journal one
//! result per case, "crash" with a torn tail, resume from the journal, and write the three output
//! files, then read them back with the Parquet and CSV readers.
//!
//! The measurements are synthetic (made up from the case parameters so that every value is
//! checkable); no kernel runs here.

use arrow::array::AsArray;
use arrow::datatypes::{Float64Type, UInt32Type};
use chrono::TimeZone;
use decodebench_coordinator::grid::Grid;
use decodebench_coordinator::journal::{Journal, JournalMeta, JOURNAL_FILE_NAME};
use decodebench_coordinator::record::ResultRecord;
use decodebench_coordinator::schema::{self, SAMPLES_COLUMN};
use decodebench_coordinator::sink::{self, parquet::read_parquet};
use decodebench_kernels::{
    BenchCase, CaseMeasurement, DeviceIdentity, KernelKind, KernelMeasurement, Status,
};
use std::fs::OpenOptions;

/// A synthetic result: the optimized kernel takes `batch/100` ms per trial, the baseline twice
/// that; fp8-output cases report the optimized kernel as skipped.
fn synthetic_record(case: &BenchCase, attempt: u32) -> ResultRecord {
    let base_ms = f64::from(case.batch_size) / 100.0;
    let kernel = |kind: KernelKind, ms: f64| {
        let mut k = KernelMeasurement {
            kernel: Some(kind),
            status: Some(Status::Ok),
            samples_ms: (0..case.method.trials)
                .map(|i| ms + f64::from(i) * 1e-4)
                .collect(),
            bytes_per_call: 1 << 20,
            ..Default::default()
        };
        k.finish_stats(Some(3100.0));
        k
    };
    let optimized = if case.quant.out == decodebench_kernels::Dtype::Fp8 {
        KernelMeasurement::not_timed(
            KernelKind::Optimized,
            Status::Skipped,
            "not on this backend",
        )
    } else {
        kernel(KernelKind::Optimized, base_ms)
    };
    ResultRecord {
        run_id: "it-run".into(),
        agent_id: "agent-0".into(),
        attempt,
        received_unix_ms: 1_750_000_000_000,
        git_revision: "0123abcd".into(),
        case: case.clone(),
        device: DeviceIdentity {
            backend: "cpu".into(),
            name: "test cpu".into(),
            uuid: "cpu-0".into(),
            sku: "test cpu".into(),
            host: "localhost".into(),
            ..Default::default()
        },
        measurement: CaseMeasurement {
            case_id: case.id.clone(),
            kernels: vec![kernel(KernelKind::Baseline, 2.0 * base_ms), optimized],
            wall_s: 0.25,
        },
    }
}

#[test]
fn journal_resume_and_outputs_agree() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path();
    let grid = Grid::preset("smoke").unwrap();
    let cases = grid.expand();
    let meta = JournalMeta {
        run_id: "it-run".into(),
        grid_hash: grid.grid_hash(),
    };

    // First coordinator: journals all but the last case, then "crashes" mid-append.
    let all: Vec<ResultRecord> = cases.iter().map(|c| synthetic_record(c, 1)).collect();
    {
        let (mut journal, replayed) = Journal::open(out, &meta).unwrap();
        assert!(replayed.is_empty());
        let (first, rest) = all[..all.len() - 1].split_at(3);
        for r in first {
            journal.append(r).unwrap();
        }
        journal.append_batch(rest).unwrap();
        journal.append(&all[all.len() - 1]).unwrap();
    }
    let path = out.join(JOURNAL_FILE_NAME);
    let len = std::fs::metadata(&path).unwrap().len();
    OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len - 7)
        .unwrap();

    // Second coordinator: resumes, finds the last case missing, and runs it again.
    let (mut journal, mut records) = Journal::open(out, &meta).unwrap();
    assert_eq!(records.len(), cases.len() - 1);
    assert_eq!(records[..], all[..all.len() - 1]);
    let redo = synthetic_record(&cases[cases.len() - 1], 2);
    journal.append(&redo).unwrap();
    records.push(redo);
    drop(journal);

    // A different grid cannot resume this directory.
    let other = Grid::preset("seed").unwrap();
    let refused = Journal::open(
        out,
        &JournalMeta {
            run_id: "x".into(),
            grid_hash: other.grid_hash(),
        },
    );
    assert!(refused.is_err());

    let ts = chrono::Local.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap();
    let paths = sink::write_outputs(out, &records, ts).unwrap();

    // Parquet: two rows per case, the schema's columns, samples intact.
    let batches = read_parquet(&paths.parquet).unwrap();
    let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
    assert_eq!(rows, 2 * cases.len());
    let batch = arrow::compute::concat_batches(&schema::schema(), &batches).unwrap();
    let samples = batch
        .column_by_name(SAMPLES_COLUMN)
        .unwrap()
        .as_list::<i32>();
    let batch_sizes = batch
        .column_by_name("batch_size")
        .unwrap()
        .as_primitive::<UInt32Type>();
    let kernels = batch.column_by_name("kernel").unwrap().as_string::<i32>();
    let statuses = batch.column_by_name("status").unwrap().as_string::<i32>();
    for row in 0..batch.num_rows() {
        let values = samples.value(row);
        let values = values.as_primitive::<Float64Type>();
        if statuses.value(row) == "skipped" {
            assert_eq!(values.len(), 0);
            continue;
        }
        assert_eq!(values.len() as u32, grid.method().trials);
        let scale = if kernels.value(row) == "baseline" {
            2.0
        } else {
            1.0
        };
        let expected = scale * f64::from(batch_sizes.value(row)) / 100.0;
        assert_eq!(values.value(0), expected, "row {row}");
    }
    let attempts = batch
        .column_by_name("attempt")
        .unwrap()
        .as_primitive::<UInt32Type>();
    assert_eq!(attempts.value(batch.num_rows() - 1), 2);

    // Flat CSV: same rows.
    let mut reader = csv::Reader::from_path(&paths.csv).unwrap();
    assert_eq!(
        reader.headers().unwrap().len(),
        schema::schema().fields().len()
    );
    assert_eq!(reader.records().count(), 2 * cases.len());

    // Reference CSV: one row per case, exact header, skipped kernels as empty cells.
    let text = std::fs::read_to_string(&paths.reference_csv).unwrap();
    let mut lines = text.lines();
    assert_eq!(
        lines.next().unwrap(),
        "batch_size,trtllm_mean,trtllm_std,baseline_mean,baseline_std,speedup_percent,q_dtype,\
         kv_cache_dtype,output_dtype,block_size,num_kv_heads,head_size,max_seq_len"
    );
    let body: Vec<&str> = lines.collect();
    assert_eq!(body.len(), cases.len());
    let fp8_out: Vec<&&str> = body
        .iter()
        .filter(|l| l.contains(",torch.float8_e4m3fn,torch.float8_e4m3fn,torch.float8_e4m3fn,"))
        .collect();
    assert_eq!(fp8_out.len(), 4);
    assert!(fp8_out.iter().all(|l| l.split(',').nth(1) == Some("")));
    let bf16 = body
        .iter()
        .find(|l| l.starts_with("4,") && l.contains("torch.bfloat16,torch.bfloat16,torch.bfloat16"))
        .unwrap();
    let speedup: f64 = bf16.split(',').nth(5).unwrap().parse().unwrap();
    assert!((speedup - 0.5).abs() < 5e-3, "{bf16}");
}

/// A unit recorded as failed stays failed when the run is resumed: the resumed coordinator counts
/// it as failed (not done) and the run is not complete, so a rerun of a failed run does not exit
/// 0. (Found by QA: the failure was counted as a resumed success.)
#[tokio::test]
async fn a_resumed_run_keeps_the_failures_its_journal_holds() {
    use decodebench_coordinator::run::{cases_hash, RunSummary};
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path();
    let cases = Grid::preset("smoke").unwrap().expand();
    let grid_hash = cases_hash(&cases);
    let mut all: Vec<ResultRecord> = cases.iter().map(|c| synthetic_record(c, 1)).collect();
    all[1].measurement.kernels[0] = KernelMeasurement::not_timed(
        KernelKind::Baseline,
        Status::Failed,
        "attempt 3: CUDA error",
    );
    assert!(all[1].failed() && !all[0].failed());
    {
        let meta = JournalMeta {
            run_id: "it-run".into(),
            grid_hash: grid_hash.clone(),
        };
        let (mut journal, _) = Journal::open(out, &meta).unwrap();
        journal.append_batch(&all).unwrap();
    }
    let resume = |retry_failed: bool, wait| {
        resume_run(
            out,
            &cases,
            &grid_hash,
            retry_failed.then(|| "1".to_string()),
            wait,
        )
    };
    let forever = std::time::Duration::from_secs(3600);
    for _ in 0..2 {
        let s: RunSummary = resume(false, forever).await;
        assert_eq!(s.resumed, cases.len());
        assert_eq!(
            (s.total, s.done, s.failed),
            (cases.len() as u64, cases.len() as u64 - 1, 1)
        );
        assert!(s.unfinished.is_empty());
        assert!(!s.complete(), "a run with a failed unit is not complete");
    }

    // --retry-failed: the failed unit runs again (no agent here, so it gets no new result), the
    // others stay done, and its failure stays in the outputs and the count until superseded.
    let s = resume(true, std::time::Duration::from_millis(300)).await;
    assert_eq!(
        (s.resumed, s.done, s.failed),
        (cases.len(), cases.len() as u64 - 1, 1)
    );
    assert_eq!(s.unfinished.len(), 1, "{:?}", s.unfinished);
    assert!(
        s.unfinished[0].starts_with(&cases[1].id),
        "{:?}",
        s.unfinished
    );
    assert!(!s.complete());
    let rows = read_parquet(&s.outputs.unwrap().parquet).unwrap();
    let rows: usize = rows.iter().map(|b| b.num_rows()).sum();
    assert_eq!(
        rows,
        2 * cases.len(),
        "the failure is kept until a new result replaces it"
    );

    // Its new result is appended after the failure (as an agent's would be): the latest result
    // stands, so a plain resume is complete.
    {
        let meta = JournalMeta {
            run_id: "ignored".into(),
            grid_hash: grid_hash.clone(),
        };
        let (mut journal, replayed) = Journal::open(out, &meta).unwrap();
        assert_eq!(
            replayed.len(),
            cases.len(),
            "the failure stays in the journal"
        );
        journal.append(&synthetic_record(&cases[1], 4)).unwrap();
    }
    let s = resume(false, forever).await;
    assert_eq!(
        (s.resumed, s.done, s.failed),
        (cases.len(), cases.len() as u64, 0)
    );
    assert!(s.complete());
    let rows = read_parquet(&s.outputs.unwrap().parquet).unwrap();
    let rows: usize = rows.iter().map(|b| b.num_rows()).sum();
    assert_eq!(rows, 2 * cases.len(), "the superseded failure is left out");
}

/// `--retry-failed` runs a retry round once per name, whoever restarts the coordinator with the
/// flag: a restart before the round's units have a result resumes the round (the unit still
/// runs, and no second round is journaled), a restart after they all have one runs nothing
/// again even though the unit failed again (a supervisor restarting a coordinator that exits 2
/// must not rerun a case that always fails for ever), and a new name runs a new round.
#[tokio::test]
async fn a_retry_round_runs_once_per_name_across_restarts() {
    use decodebench_coordinator::run::cases_hash;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path();
    let cases = Grid::preset("smoke").unwrap().expand();
    let grid_hash = cases_hash(&cases);
    let failed = |attempt| {
        let mut r = synthetic_record(&cases[1], attempt);
        r.measurement.kernels[0] =
            KernelMeasurement::not_timed(KernelKind::Baseline, Status::Failed, "CUDA error");
        r
    };
    let meta = JournalMeta {
        run_id: "it-run".into(),
        grid_hash: grid_hash.clone(),
    };
    {
        let mut all: Vec<ResultRecord> = cases.iter().map(|c| synthetic_record(c, 1)).collect();
        all[1] = failed(3);
        let (mut journal, _) = Journal::open(out, &meta).unwrap();
        journal.append_batch(&all).unwrap();
    }
    let wait = std::time::Duration::from_millis(300);
    let rounds = || -> Vec<(String, usize)> {
        let (_, replay) = Journal::replay(out, &meta).unwrap();
        replay
            .retry_rounds
            .iter()
            .map(|r| (r.round.round.clone(), r.after_records))
            .collect()
    };
    let rerun = |s: &decodebench_coordinator::run::RunSummary| -> Vec<String> {
        s.unfinished
            .iter()
            .map(|u| u.split('|').next().unwrap_or_default().to_string())
            .collect()
    };

    // Round 1 starts (no agent comes, so the failed case gets no new result), then the
    // coordinator is restarted with the same flag twice: the same round, resumed.
    for _ in 0..3 {
        let s = resume_run(out, &cases, &grid_hash, Some("1".into()), wait).await;
        assert_eq!(rerun(&s), [cases[1].id.clone()], "the round's case runs");
        assert_eq!(s.retry_rounds, ["1"]);
        assert_eq!(rounds(), [("1".to_string(), cases.len())], "one round");
    }
    // The round's agent fails the case again (journaled as the coordinator would).
    {
        let (mut journal, _) = Journal::open(out, &meta).unwrap();
        journal.append(&failed(6)).unwrap();
    }
    // Every restart with the same flag now runs nothing: the failure stands.
    for _ in 0..2 {
        let s = resume_run(out, &cases, &grid_hash, Some("1".into()), wait).await;
        assert!(
            s.unfinished.is_empty(),
            "nothing runs again: {:?}",
            s.unfinished
        );
        assert_eq!((s.done, s.failed), (cases.len() as u64 - 1, 1));
        assert!(!s.complete());
        assert_eq!(s.next_retry_flag(), "--retry-failed=2");
        assert_eq!(rounds().len(), 1, "no new round");
    }
    // A new name is a new round.
    let s = resume_run(out, &cases, &grid_hash, Some("2".into()), wait).await;
    assert_eq!(rerun(&s), [cases[1].id.clone()]);
    assert_eq!(s.retry_rounds, ["1", "2"]);
    assert_eq!(
        rounds(),
        [
            ("1".to_string(), cases.len()),
            ("2".to_string(), cases.len() + 1)
        ]
    );
}

/// With per-GPU placement a unit belongs to its device: a replayed failure from a device that does
/// not come back is in no scheduler count, and must still count as a failure of the run and stay
/// in its outputs, with or without --retry-failed. Records of the same case from other devices
/// are all kept (a review found a per-unit deduplication dropping them).
#[tokio::test]
async fn failures_of_devices_that_do_not_come_back_still_count() {
    use decodebench_coordinator::run::cases_hash;
    use decodebench_coordinator::scheduler::Placement;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path();
    let cases: Vec<BenchCase> = Grid::preset("smoke").unwrap().expand()[..2].to_vec();
    let grid_hash = cases_hash(&cases);
    // Case 0 ran fine on two devices; case 1 failed on a third.
    let on = |c: &BenchCase, uuid: &str| {
        let mut r = synthetic_record(c, 1);
        r.device.uuid = uuid.into();
        r
    };
    let mut failed = on(&cases[1], "gone-2");
    failed.measurement.kernels[0] =
        KernelMeasurement::not_timed(KernelKind::Baseline, Status::Failed, "CUDA error");
    {
        let meta = JournalMeta {
            run_id: "it-run".into(),
            grid_hash: grid_hash.clone(),
        };
        let (mut journal, _) = Journal::open(out, &meta).unwrap();
        journal
            .append_batch(&[on(&cases[0], "gone-0"), on(&cases[0], "gone-1"), failed])
            .unwrap();
    }
    for retry_failed in [false, true] {
        let s = resume_run_placed(
            out,
            &cases,
            &grid_hash,
            retry_failed.then(|| "1".to_string()),
            Placement::PerGpu,
            std::time::Duration::from_millis(300),
        )
        .await;
        assert_eq!((s.resumed, s.failed), (3, 1), "retry_failed {retry_failed}");
        assert!(!s.complete(), "retry_failed {retry_failed}");
        let rows = read_parquet(&s.outputs.unwrap().parquet).unwrap();
        let rows: usize = rows.iter().map(|b| b.num_rows()).sum();
        assert_eq!(
            rows,
            2 * 3,
            "retry_failed {retry_failed}: every record kept"
        );
    }
}

/// Serves `out`'s journal for `cases` until every unit has a result or `wait` has passed (no agent
/// comes), and returns how the run ended.
async fn resume_run(
    out: &std::path::Path,
    cases: &[BenchCase],
    grid_hash: &str,
    retry_failed: Option<String>,
    wait: std::time::Duration,
) -> decodebench_coordinator::run::RunSummary {
    use decodebench_coordinator::scheduler::Placement;
    resume_run_placed(out, cases, grid_hash, retry_failed, Placement::Spread, wait).await
}

/// [`resume_run`] with a placement.
async fn resume_run_placed(
    out: &std::path::Path,
    cases: &[BenchCase],
    grid_hash: &str,
    retry_failed: Option<String>,
    placement: decodebench_coordinator::scheduler::Placement,
    wait: std::time::Duration,
) -> decodebench_coordinator::run::RunSummary {
    use decodebench_coordinator::run::{serve, CoordinatorConfig, ProgressDisplay};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let cfg = CoordinatorConfig {
        out_dir: out.to_path_buf(),
        cases: cases.to_vec(),
        grid_hash: grid_hash.to_string(),
        scheduler: decodebench_coordinator::scheduler::SchedulerConfig {
            retry_failed,
            placement,
            ..Default::default()
        },
        token: None,
        tls: None,
        metrics_listen: None,
        progress: ProgressDisplay::Quiet,
        git_revision: "test".into(),
        exit_when_done: true,
        agent_exits: None,
    };
    // With every unit journaled the coordinator finishes without any agent.
    tokio::time::timeout(
        std::time::Duration::from_secs(30),
        serve(cfg, listener, tokio::time::sleep(wait)),
    )
    .await
    .expect("the coordinator stops")
    .unwrap()
}
