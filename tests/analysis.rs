//! `decodebench compare` and `report` as a nightly CI job runs them: on the files real CPU runs
//! wrote, through the binary, judged by exit status and messages. The gate must fail closed: runs
//! that share no case, a candidate that lost cases, and a comparison too small to decide anything
//! must not exit 0.

use crate::util::*;
use arrow::array::{Array, AsArray, BooleanArray};
use arrow::compute::filter_record_batch;
use arrow::datatypes::UInt32Type;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// `compare` exit code for a regression found.
const EXIT_REGRESSION: i32 = 4;
/// `compare` exit code for a gate that did not check the baseline.
const EXIT_UNCHECKED: i32 = 5;
/// Longest a tiny CPU run or an analysis of it may take on a busy 2-core machine.
const COMMAND_LIMIT: Duration = Duration::from_secs(120);

/// A grid of bf16 cases at `batch_sizes`, length 32, timed `trials` times.
fn grid(name: &str, batch_sizes: &[u32], trials: u32) -> GridSpec {
    GridSpec {
        name: name.to_string(),
        batch_sizes: batch_sizes.to_vec(),
        max_seq_lens: vec![32],
        quant_modes: vec!["bf16/bf16/bf16"],
        trials,
        ..GridSpec::tiny()
    }
}

/// Runs `spec` on the CPU into `scratch/<spec.name>` and returns that directory.
fn cpu_run(scratch: &Scratch, spec: &GridSpec) -> PathBuf {
    let grid = scratch.grid(spec);
    let out = scratch.path().join(&spec.name);
    let (grid, out_arg) = (grid.display().to_string(), out.display().to_string());
    let (status, _, stderr) = run_to_end(
        &[
            "run",
            "--backend",
            "cpu",
            "--grid",
            &grid,
            "--out",
            &out_arg,
        ],
        COMMAND_LIMIT,
    );
    assert!(status.success(), "the CPU run failed: {stderr}");
    out
}

/// `decodebench ARGS`: (exit code, stdout, stderr).
fn decodebench(args: &[&str]) -> (i32, String, String) {
    let (status, stdout, stderr) = run_to_end(args, COMMAND_LIMIT);
    let code = status
        .code()
        .unwrap_or_else(|| panic!("`decodebench {}` was killed: {stderr}", args.join(" ")));
    (code, stdout, stderr)
}

/// Copies the rows of `run`'s results.parquet whose batch size is `batch` into `to` (created),
/// keeping the file's schema and its version: the candidate of a run that lost its other cases.
fn keep_batch_size(run: &Path, batch: u32, to: &Path) -> PathBuf {
    let file = File::open(run.join("results.parquet")).expect("opening results.parquet");
    let reader = ParquetRecordBatchReaderBuilder::try_new(file).expect("a Parquet footer");
    let schema = reader.schema().clone();
    let mut batches = Vec::new();
    for b in reader.build().expect("a Parquet reader") {
        let b = b.expect("a record batch");
        let sizes = b
            .column_by_name("batch_size")
            .expect("a batch_size column")
            .as_primitive::<UInt32Type>();
        let keep: BooleanArray = (0..b.num_rows())
            .map(|i| Some(!sizes.is_null(i) && sizes.value(i) == batch))
            .collect();
        batches.push(filter_record_batch(&b, &keep).expect("filtering rows"));
    }
    std::fs::create_dir_all(to).expect("creating the candidate directory");
    let path = to.join("results.parquet");
    let mut w = ArrowWriter::try_new(
        File::create(&path).expect("creating the file"),
        schema,
        None,
    )
    .expect("a Parquet writer");
    for b in &batches {
        w.write(b).expect("writing rows");
    }
    w.close().expect("closing the Parquet file");
    path
}

#[test]
fn compare_gate_fails_closed_on_runs_it_cannot_check() {
    let _serial = exclusive();
    let s = Scratch::new("analysis-gate");
    let base = cpu_run(&s, &grid("base", &[1, 2], 6));
    let base_arg = base.display().to_string();

    // The same run less its batch-2 case: nothing got slower (the samples are the very same),
    // but half the baseline went unchecked.
    let lost = keep_batch_size(&base, 1, &s.path().join("lost"));
    let lost_arg = lost.display().to_string();
    let (code, stdout, stderr) =
        decodebench(&["compare", &base_arg, &lost_arg, "--fail-on-regression"]);
    assert_eq!(code, EXIT_UNCHECKED, "stdout: {stdout}\nstderr: {stderr}");
    assert!(
        stdout.contains("warning: 2 of 4 baseline comparisons are not in the candidate"),
        "{stdout}"
    );
    assert!(
        stderr.contains(
            "error: --fail-on-regression: no regression found, but the gate did not check"
        ) && stderr.contains("--allow-missing"),
        "{stderr}"
    );
    assert!(stderr.contains("the same run"), "a copy is noted: {stderr}");
    let (code, stdout, stderr) = decodebench(&[
        "compare",
        &base_arg,
        &lost_arg,
        "--fail-on-regression",
        "--allow-missing",
    ]);
    assert_eq!(code, 0, "stdout: {stdout}\nstderr: {stderr}");
    // Without the gate the comparison is printed and exits 0, JSON included.
    let (code, stdout, _) = decodebench(&["compare", &base_arg, &lost_arg, "--format", "json"]);
    assert_eq!(code, 0);
    let json: serde_json::Value = serde_json::from_str(&stdout).expect("one JSON document");
    assert_eq!(json["summary"]["missing"], 2);

    // Another grid: nothing in common, an error that says what differs.
    let other = cpu_run(&s, &grid("other", &[3], 6));
    let other_arg = other.display().to_string();
    let (code, stdout, stderr) =
        decodebench(&["compare", &base_arg, &other_arg, "--fail-on-regression"]);
    assert_eq!(code, 1, "stdout: {stdout}\nstderr: {stderr}");
    assert!(stdout.is_empty(), "{stdout}");
    assert!(
        stderr.starts_with("error: nothing was compared"),
        "{stderr}"
    );
    assert!(
        stderr.contains("batch_size differs: baseline 1, 2; candidate 3"),
        "{stderr}"
    );

    // A single trial: matched, but nothing can be decided.
    let single = cpu_run(&s, &grid("single", &[1], 1));
    let single_copy = keep_batch_size(&single, 1, &s.path().join("single-copy"));
    let (code, _, stderr) = decodebench(&[
        "compare",
        &single.display().to_string(),
        &single_copy.display().to_string(),
        "--fail-on-regression",
    ]);
    assert_eq!(code, EXIT_UNCHECKED, "{stderr}");
    assert!(
        stderr.contains("none of the 2 comparisons could be decided: 2 underpowered"),
        "{stderr}"
    );
    assert_ne!(code, EXIT_REGRESSION);

    // The run's CSV instead of its Parquet file, and one file on both sides.
    let csv = base.join("results.csv").display().to_string();
    let (code, _, stderr) = decodebench(&["compare", &base_arg, &csv]);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("is a CSV file")
            && stderr.contains(&base.join("results.parquet").display().to_string()),
        "{stderr}"
    );
    let (code, _, stderr) = decodebench(&["compare", &base_arg, &base_arg]);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("both the baseline and the candidate"),
        "{stderr}"
    );

    // report: one CPU "GPU", so no card has peers, and it says so rather than "none slow".
    let (code, stdout, stderr) = decodebench(&["report", &base_arg]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("slow GPUs: not checked"), "{stdout}");
}
