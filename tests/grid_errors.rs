//! A malformed grid file is refused by `decodebench grid` (and never reaches a fleet) with an
//! error that names the offending key.

use crate::util::*;
use std::time::Duration;

/// A valid grid to break one key at a time.
fn base() -> String {
    GridSpec::tiny().to_toml()
}

#[test]
fn malformed_grids_are_refused_naming_the_key() {
    let s = Scratch::new("bad-grids");
    let good = s.write("good.toml", &base());
    let (status, _, stderr) = run_to_end(
        &["grid", &good.display().to_string()],
        Duration::from_secs(30),
    );
    assert!(status.success(), "the unbroken grid is valid: {stderr}");

    let cases: Vec<(&str, String, &str)> = vec![
        (
            "typo",
            base().replace("batch_sizes =", "batch_size ="),
            "batch_size",
        ),
        (
            "zero-batch",
            base().replace("batch_sizes = [1, 2]", "batch_sizes = [1, 0]"),
            "batch_sizes",
        ),
        (
            "empty-axis",
            base().replace("max_seq_lens = [32, 64]", "max_seq_lens = []"),
            "max_seq_lens",
        ),
        (
            "missing-axis",
            base().replace("max_seq_lens = [32, 64]\n", ""),
            "max_seq_lens",
        ),
        (
            "bad-dtype",
            base().replace("\"fp8/fp8/bf16\"", "\"fp8/fp9/bf16\""),
            "quant_modes",
        ),
        (
            "bad-head-size",
            base().replace("head_sizes = [64]", "head_sizes = [100]"),
            "head_sizes",
        ),
        (
            "zero-trials",
            base().replace("trials = 3", "trials = 0"),
            "trials",
        ),
        (
            "method-typo",
            base().replace("warmup = 1", "warmpu = 1"),
            "warmpu",
        ),
        (
            "small-pool",
            base().replace("pool_tokens = 256", "pool_tokens = 16"),
            "pool_tokens",
        ),
        (
            "wrong-type",
            base().replace("batch_sizes = [1, 2]", "batch_sizes = \"1,2\""),
            "batch_sizes",
        ),
        (
            "duplicate",
            base().replace("batch_sizes = [1, 2]", "batch_sizes = [2, 2]"),
            "batch_sizes",
        ),
    ];
    for (name, text, key) in cases {
        assert_ne!(text, base(), "{name}: the edit must change the grid");
        let path = s.write(&format!("{name}.toml"), &text);
        let (status, stdout, stderr) = run_to_end(
            &["grid", &path.display().to_string()],
            Duration::from_secs(30),
        );
        assert!(
            !status.success(),
            "{name}: a malformed grid must be refused; stdout:\n{stdout}"
        );
        assert!(
            stderr.contains(key),
            "{name}: the error should name `{key}`; stderr:\n{stderr}"
        );
    }

    // A syntax error gives its position.
    let path = s.write(
        "syntax.toml",
        &base().replace("batch_sizes = [1, 2]", "batch_sizes = [1, 2"),
    );
    let (status, _, stderr) = run_to_end(
        &["grid", &path.display().to_string()],
        Duration::from_secs(30),
    );
    assert!(!status.success());
    assert!(
        stderr.contains("line"),
        "a TOML syntax error names its line: {stderr}"
    );

    // A missing file says which path.
    let missing = s.path().join("no-such-grid.toml");
    let (status, _, stderr) = run_to_end(
        &["grid", &missing.display().to_string()],
        Duration::from_secs(30),
    );
    assert!(!status.success());
    assert!(
        stderr.contains("no-such-grid.toml"),
        "the error names the path: {stderr}"
    );
}

/// A command line clap refuses exits 1 (6 for the agent, which its supervisors then do not
/// restart), never 2, which `run` and `coordinator` keep for a run that ended incomplete; help and
/// --version still succeed.
#[test]
fn refused_command_lines_exit_with_their_own_codes() {
    let agent = i32::from(decodebench::commands::EXIT_AGENT_SETUP);
    for (args, want) in [
        (&["agent", "--no-such-flag"][..], agent),
        (&["--log", "debug", "agent", "--gpu", "zero"][..], agent),
        (&["run", "--no-such-flag"][..], 1),
        (&["coordinator", "--grid"][..], 1),
        (&["compare", "only-one.parquet"][..], 1),
        (&[][..], 1),
        (&["--help"][..], 0),
        (&["agent", "--help"][..], 0),
        (&["--version"][..], 0),
    ] {
        let (status, stdout, stderr) = run_to_end(args, Duration::from_secs(30));
        assert_eq!(status.code(), Some(want), "{args:?}: {stdout}{stderr}");
        if want != 0 {
            // (A bare `decodebench` prints the usage instead.)
            assert!(
                stderr.contains("error:") || (args.is_empty() && stderr.contains("Usage:")),
                "{args:?} says why: {stderr}"
            );
        }
    }
}
