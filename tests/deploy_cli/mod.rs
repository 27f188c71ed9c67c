//! The deployment artifacts and the documented command lines stay in step with the CLI: every
//! `decodebench` command line in deploy/ (the Kubernetes manifests as kustomize builds them, with
//! and without each component; the Slurm script; the Dockerfile) and in the fenced code blocks of
//! README.md and docs/*.md is parsed with the real clap definition ([`Cli`]), then checked where
//! the public API allows it (the preset exists, the method overrides are accepted). The files the
//! manifests point the binary at must be there: `--grid` on a ConfigMap from a generator is loaded
//! with the coordinator's own grid loader, a token or certificate on a Secret needs a Secret with
//! that key (in deploy/k8s or created by a command in the docs), `--out` must be on a writable
//! volume. Agents must reach the coordinator's Service on the port it listens on, with TLS on both
//! sides or neither, and the coordinator must expect as many agents as the agent Jobs run. An agent
//! Job must not retry an agent that could not start (its exit code, `EXIT_AGENT_SETUP`, fails the
//! index or the Job through a `podFailurePolicy`) and must not count pod disruptions.
//!
//! Parsing ignores the environment of the test process (clap's `env = ...` fallbacks are taken
//! off): a command line must be complete by itself, and a developer's exported
//! `DECODEBENCH_COORDINATOR` must not hide a missing `--coordinator`.

mod kustomize;
mod shell;

use clap::error::ErrorKind;
use clap::{CommandFactory, FromArgMatches};
use decodebench::cli::{Cli, Command};
use decodebench::commands::EXIT_AGENT_SETUP;
use decodebench_coordinator::grid::Grid;
use kustomize::{display, Build, Resource};
use serde_json::Value;
use shell::{Env, SimpleCommand};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    let path = root().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Values for what the deployment files read from their environment and never set themselves:
/// what Slurm, a login shell or a user provides. Plausible, so that a command line using one
/// parses as it would for real.
fn plausible_env() -> Env {
    [
        ("HOME", "/home/user"),
        ("USER", "user"),
        ("PWD", "/home/user/work"),
        // README's shorthand for the binary, defined in its first shell block.
        ("B", "target/release/decodebench"),
        ("SLURM_JOB_ID", "4242"),
        ("SLURM_NTASKS", "16"),
        ("SLURM_JOB_NODELIST", "gpu[001-002]"),
        ("SLURM_CPUS_PER_TASK", "8"),
        ("SECONDS", "0"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// One `decodebench` command line and where it was found.
#[derive(Debug, Clone)]
struct Invocation {
    /// `deploy/slurm/decodebench.sbatch:75 (inside bash -c)`.
    source: String,
    argv: Vec<String>,
}

impl Invocation {
    fn subcommand(&self) -> &str {
        self.argv
            .iter()
            .skip(1)
            .find(|a| !a.starts_with('-'))
            .map(String::as_str)
            .unwrap_or("")
    }
}

/// The argv a shell-quoted reader can paste: words with blanks or nothing in them are quoted.
fn show(argv: &[String]) -> String {
    argv.iter()
        .map(|a| {
            if a.is_empty() || a.contains(char::is_whitespace) {
                format!("'{a}'")
            } else {
                a.clone()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn problem(source: &str, argv: &[String], message: &str) -> String {
    let message = message.trim_end().replace('\n', "\n    ");
    format!("{source}: `{}`\n    {message}", show(argv))
}

/// The image name `registry/decodebench:tag` (any registry, tag or digest).
fn is_decodebench_image(word: &str) -> bool {
    let name = word.split('@').next().unwrap_or(word);
    let name = match name.rsplit_once(':') {
        Some((n, tag)) if !tag.contains('/') => n,
        _ => name,
    };
    shell::basename(name) == "decodebench"
}

/// The `decodebench ...` argv that a command runs, if it runs decodebench: the binary itself
/// (any path, behind launchers such as `exec` or `srun`), `cargo run [--release] -- ARGS`, or
/// `docker run ... IMAGE ARGS` with the decodebench image (whose entry point is the binary).
fn decodebench_argv(argv: &[String]) -> Option<Vec<String>> {
    let w = shell::strip_wrappers(argv);
    let first = w.first()?;
    if shell::basename(first) == "decodebench" {
        return Some(w.to_vec());
    }
    let prefixed = |rest: &[String]| {
        std::iter::once("decodebench".to_string())
            .chain(rest.iter().cloned())
            .collect()
    };
    match (first.as_str(), w.get(1).map(String::as_str)) {
        ("cargo", Some("run")) => {
            let dashes = w.iter().position(|a| a == "--").unwrap_or(w.len());
            let options = &w[2..dashes];
            // Another package's binary or an example is not this CLI.
            let other = options.iter().enumerate().any(|(i, o)| {
                let value = |flag: &str| {
                    o.strip_prefix(&format!("{flag}="))
                        .or_else(|| (o == flag).then(|| options.get(i + 1).map_or("", |s| s)))
                };
                o.starts_with("--example")
                    || ["-p", "--package", "--bin"]
                        .iter()
                        .any(|f| value(f).is_some_and(|v| v != "decodebench"))
            });
            (!other).then(|| prefixed(w.get(dashes + 1..).unwrap_or(&[])))
        }
        ("docker" | "podman", Some("run")) => {
            let image = w.iter().position(|a| is_decodebench_image(a))?;
            Some(prefixed(&w[image + 1..]))
        }
        _ => None,
    }
}

/// The CLI with clap's environment fallbacks taken off (see the module docs).
fn cli_without_env() -> clap::Command {
    fn no_env(c: clap::Command) -> clap::Command {
        c.mut_args(|a| a.env(None)).mut_subcommands(no_env)
    }
    no_env(Cli::command())
}

/// Parses with the real CLI; `Ok(None)` for `--help` and `--version`, which are complete
/// command lines too.
fn parse(argv: &[String]) -> Result<Option<Cli>, String> {
    match cli_without_env().try_get_matches_from(argv) {
        Ok(m) => Cli::from_arg_matches(&m)
            .map(Some)
            .map_err(|e| e.render().to_string()),
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            Ok(None)
        }
        Err(e) => Err(e.render().to_string()),
    }
}

/// What `decodebench` checks after clap and before it does anything, as far as the library
/// exposes it: a named preset exists, and the method overrides are valid.
fn check_parsed(cli: &Cli) -> Result<(), String> {
    let (preset, method) = match &cli.command {
        Command::Run(a) => (a.grid.preset.as_deref(), Some(&a.method)),
        Command::Coordinator(a) => (a.grid.preset.as_deref(), Some(&a.method)),
        Command::Grid(a) => (a.preset.as_deref(), None),
        _ => (None, None),
    };
    if let Some(name) = preset {
        Grid::preset(name).map_err(|e| format!("--preset {name}: {e}"))?;
    }
    if let Some(m) = method {
        decodebench::commands::apply_overrides(Vec::new(), m).map_err(|e| format!("{e:#}"))?;
    }
    Ok(())
}

/// Parses and checks one command line.
fn check(inv: &Invocation) -> Result<Option<Cli>, String> {
    let cli = parse(&inv.argv).map_err(|e| problem(&inv.source, &inv.argv, &e))?;
    if let Some(cli) = &cli {
        check_parsed(cli).map_err(|e| problem(&inv.source, &inv.argv, &e))?;
    }
    Ok(cli)
}

/// A grid file that a command line names and that exists in the repository (relative paths are
/// taken from the repository root, where the docs' commands run) must load.
fn check_repo_grid_file(inv: &Invocation, cli: &Cli) -> Result<(), String> {
    let file = match &cli.command {
        Command::Run(a) => a.grid.grid.as_ref(),
        Command::Coordinator(a) => a.grid.grid.as_ref(),
        Command::Grid(a) => a.file.as_ref(),
        _ => None,
    };
    let Some(path) = file.map(|f| root().join(f)).filter(|p| p.is_file()) else {
        return Ok(());
    };
    Grid::from_file(&path)
        .map(drop)
        .map_err(|e| problem(&inv.source, &inv.argv, &format!("{}: {e}", path.display())))
}

/// Checks every command line; returns the problems.
fn check_all(invocations: &[Invocation]) -> Vec<String> {
    let mut problems = Vec::new();
    for inv in invocations {
        // Shown with --nocapture: what was checked.
        println!("{}: {}", inv.source, show(&inv.argv));
        match check(inv) {
            Ok(Some(cli)) => problems.extend(check_repo_grid_file(inv, &cli).err()),
            Ok(None) => {}
            Err(e) => problems.push(e),
        }
    }
    problems
}

fn fail_on(problems: &[String]) {
    assert!(
        problems.is_empty(),
        "{} problem(s):\n\n{}",
        problems.len(),
        problems.join("\n\n")
    );
}

/// The `decodebench` command lines among `commands` (from a script at `label`, whose line 1 is
/// line `first_line` of the file), with a problem for each that uses a variable nothing sets.
fn invocations_of(
    label: &str,
    first_line: usize,
    commands: &[SimpleCommand],
    problems: &mut Vec<String>,
) -> Vec<Invocation> {
    let mut out = Vec::new();
    for c in commands {
        let Some(argv) = decodebench_argv(&c.argv) else {
            continue;
        };
        let mut source = format!("{label}:{}", first_line + c.line - 1);
        if let Some(via) = &c.nested_in {
            source.push_str(&format!(" (inside {via})"));
        }
        if !c.unset.is_empty() {
            let vars: Vec<String> = c.unset.iter().map(|v| format!("${v}")).collect();
            problems.push(problem(
                &source,
                &argv,
                &format!(
                    "uses {}, which nothing sets: the shell would drop it (give it a value \
                     before this line, or add it to plausible_env() in tests/deploy_cli/mod.rs \
                     if the environment provides it)",
                    vars.join(", ")
                ),
            ));
        }
        out.push(Invocation { source, argv });
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The docs.

/// Fence languages whose blocks are shell scripts (evaluated whole, so `B=...` then `$B ...` and
/// `for ... do $B ... done` are followed).
const SHELL_LANGS: &[&str] = &["sh", "bash", "shell", "zsh"];

/// In any block, a line that starts with one of these words is a decodebench command line and
/// must be found and parse (in a shell block, as one of the script's commands).
const COMMAND_PREFIXES: &[&str] = &[
    "decodebench",
    "$B",
    "target/release/decodebench",
    "cargo run --release --",
];

/// Documented lines that look like command lines but deliberately are not complete ones:
/// (file, the line's text, trimmed, why). Each entry must still match a line, so that a stale
/// entry is noticed; anything not listed here must parse.
const DOC_ALLOW_LIST: &[(&str, &str, &str)] = &[
    (
        "docs/ANALYSIS.md",
        "decodebench compare BASELINE CANDIDATE [--threshold 0.03] [--alpha 0.01]",
        "a synopsis: placeholders and [optional] flags",
    ),
    (
        "docs/ANALYSIS.md",
        "decodebench report DIR [--group-by gpu|sku] [--format table|csv|json]",
        "a synopsis: a placeholder and [optional] flags with their choices",
    ),
];

/// A fenced code block: its language, the file line of its first content line, its text.
struct Block {
    lang: String,
    first_line: usize,
    text: String,
}

fn fenced_blocks(markdown: &str) -> Vec<Block> {
    let mut blocks = Vec::new();
    let mut open: Option<(String, Block)> = None;
    for (i, line) in markdown.lines().enumerate() {
        let trimmed = line.trim_start();
        let fence: String = trimmed
            .chars()
            .take_while(|&c| c == '`' || c == '~')
            .collect();
        let is_fence = fence.len() >= 3 && fence.chars().all(|c| c == fence.as_bytes()[0] as char);
        match &mut open {
            None if is_fence => {
                let lang = trimmed[fence.len()..]
                    .split_whitespace()
                    .next()
                    .unwrap_or("")
                    .to_string();
                open = Some((
                    fence,
                    Block {
                        lang,
                        first_line: i + 2,
                        text: String::new(),
                    },
                ));
            }
            Some((f, _))
                if is_fence && fence.starts_with(f.as_str()) && trimmed.trim() == fence =>
            {
                blocks.push(open.take().expect("a block is open").1);
            }
            Some((_, b)) => {
                b.text.push_str(line);
                b.text.push('\n');
            }
            None => {}
        }
    }
    blocks
}

/// What the docs hold: their decodebench command lines (including those of a script that a
/// documented `sbatch` line runs, with that line's variables), and every command of their shell
/// blocks (the k8s check reads the `kubectl create secret` lines from them).
#[derive(Default)]
struct DocsScan {
    invocations: Vec<Invocation>,
    commands: Vec<(String, SimpleCommand)>,
    problems: Vec<String>,
    /// DOC_ALLOW_LIST entries that matched a line.
    allowed: BTreeSet<usize>,
}

fn allow_listed(label: &str, line: &str, allow: &[(&str, &str, &str)]) -> Option<usize> {
    allow
        .iter()
        .position(|(file, text, _)| *file == label && *text == line.trim())
}

/// A line's command text, without a `$ ` prompt, when it starts with one of
/// [`COMMAND_PREFIXES`] as a whole word.
fn command_text(line: &str) -> Option<&str> {
    let t = line.trim_start();
    let t = t.strip_prefix("$ ").unwrap_or(t);
    COMMAND_PREFIXES
        .iter()
        .any(|p| {
            t.strip_prefix(p)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with(char::is_whitespace))
        })
        .then_some(t)
}

fn scan_markdown(label: &str, markdown: &str, allow: &[(&str, &str, &str)], scan: &mut DocsScan) {
    let lines: Vec<&str> = markdown.lines().collect();
    for block in fenced_blocks(markdown) {
        let block_lines = block.first_line..block.first_line + block.text.lines().count();
        let command_lines: Vec<usize> = block_lines
            .filter(|&n| command_text(lines[n - 1]).is_some())
            .collect();
        if SHELL_LANGS.contains(&block.lang.as_str()) {
            scan_shell_block(label, &lines, &block, &command_lines, allow, scan);
        } else {
            scan_command_lines(label, &lines, &command_lines, allow, scan);
        }
    }
}

/// A shell block, evaluated as one script; every line that looks like a command line must turn
/// out to be one of its decodebench commands.
fn scan_shell_block(
    label: &str,
    lines: &[&str],
    block: &Block,
    command_lines: &[usize],
    allow: &[(&str, &str, &str)],
    scan: &mut DocsScan,
) {
    let commands = match shell::evaluate(&block.text, &plausible_env()) {
        Ok(c) => c,
        Err(e) => {
            scan.problems.push(format!(
                "{label}:{}: this {} block cannot be read as a script: {e}",
                block.first_line, block.lang
            ));
            return;
        }
    };
    let mut found_lines = BTreeSet::new();
    let mut kept = Vec::new();
    for c in commands {
        let line = block.first_line + c.line - 1;
        scan.commands.push((format!("{label}:{line}"), c.clone()));
        if decodebench_argv(&c.argv).is_some() {
            found_lines.insert(line);
            if let Some(i) = allow_listed(label, lines[line - 1], allow) {
                scan.allowed.insert(i);
                continue;
            }
        }
        if let Some(script) = sbatch_script(&c.argv) {
            scan_sbatch(&format!("{label}:{line}"), &script, &c, scan);
        }
        kept.push(c);
    }
    let found = invocations_of(label, block.first_line, &kept, &mut scan.problems);
    scan.invocations.extend(found);
    for n in command_lines.iter().filter(|n| !found_lines.contains(n)) {
        scan.problems.push(format!(
            "{label}:{n}: `{}` looks like a decodebench command line, but the test found no \
             decodebench command in it (teach decodebench_argv in tests/deploy_cli/mod.rs)",
            lines[n - 1].trim()
        ));
    }
}

/// The command lines of a block in another language (output, a synopsis): each line on its own,
/// with its backslash continuations.
fn scan_command_lines(
    label: &str,
    lines: &[&str],
    command_lines: &[usize],
    allow: &[(&str, &str, &str)],
    scan: &mut DocsScan,
) {
    for &n in command_lines {
        if let Some(i) = allow_listed(label, lines[n - 1], allow) {
            scan.allowed.insert(i);
            continue;
        }
        let mut text = String::new();
        for l in std::iter::once(command_text(lines[n - 1]).unwrap_or_default())
            .chain(lines[n..].iter().copied())
        {
            text.push_str(l);
            text.push('\n');
            if !l.trim_end().ends_with('\\') {
                break;
            }
        }
        let commands = match shell::evaluate(&text, &plausible_env()) {
            Ok(c) => c,
            Err(e) => {
                scan.problems.push(format!(
                    "{label}:{n}: cannot be read as a command line: {e}"
                ));
                continue;
            }
        };
        let found = invocations_of(label, n, &commands, &mut scan.problems);
        if found.is_empty() {
            scan.problems.push(format!(
                "{label}:{n}: `{}` looks like a decodebench command line, but the test found no \
                 decodebench command in it",
                lines[n - 1].trim()
            ));
        }
        scan.invocations.extend(found);
    }
}

/// The repository script that an `sbatch [options] SCRIPT` line submits.
fn sbatch_script(argv: &[String]) -> Option<PathBuf> {
    let w = shell::strip_wrappers(argv);
    if w.first().map(String::as_str) != Some("sbatch") {
        return None;
    }
    w[1..]
        .iter()
        .find(|a| !a.starts_with('-'))
        .map(|a| root().join(a))
        .filter(|p| p.is_file())
}

/// A documented `sbatch` line: the script's command lines with that line's variables.
fn scan_sbatch(source: &str, script: &Path, submit: &SimpleCommand, scan: &mut DocsScan) {
    let label = display(script, &root());
    let text = std::fs::read_to_string(script).unwrap_or_default();
    let mut env = plausible_env();
    env.extend(submit.assignments.iter().cloned());
    match slurm_invocations(&label, &text, &env) {
        Ok((found, problems)) => {
            scan.invocations.extend(found.into_iter().map(|mut inv| {
                inv.source = format!("{source} runs {}", inv.source);
                inv
            }));
            scan.problems.extend(problems);
        }
        Err(e) => scan.problems.push(format!("{source} runs {label}: {e}")),
    }
}

/// README.md and docs/*.md.
fn doc_files() -> Vec<String> {
    let mut files = vec!["README.md".to_string()];
    let mut docs: Vec<String> = std::fs::read_dir(root().join("docs"))
        .expect("reading docs/")
        .map(|e| e.expect("a docs/ entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .map(|p| display(&p, &root()))
        .collect();
    docs.sort();
    files.extend(docs);
    files
}

fn scan_docs() -> DocsScan {
    let mut scan = DocsScan::default();
    for file in doc_files() {
        scan_markdown(&file, &read(&file), DOC_ALLOW_LIST, &mut scan);
    }
    for (i, (file, text, why)) in DOC_ALLOW_LIST.iter().enumerate() {
        if !scan.allowed.contains(&i) {
            scan.problems.push(format!(
                "DOC_ALLOW_LIST entry {i} ({file}: `{text}`, {why}) matches no line any more: \
                 remove it"
            ));
        }
    }
    scan
}

// ---------------------------------------------------------------------------------------------
// Slurm.

const SLURM_SCRIPT: &str = "deploy/slurm/decodebench.sbatch";

/// The script's decodebench command lines under `env` (the submitter's variables).
fn slurm_invocations(
    label: &str,
    text: &str,
    env: &Env,
) -> Result<(Vec<Invocation>, Vec<String>), String> {
    let commands = shell::evaluate(text, env).map_err(|e| format!("{label}: {e}"))?;
    let mut problems = Vec::new();
    let found = invocations_of(label, 1, &commands, &mut problems);
    Ok((found, problems))
}

// ---------------------------------------------------------------------------------------------
// The Dockerfile.

const DOCKERFILE: &str = "deploy/Dockerfile";

/// What the final stage runs, and the decodebench command lines of the RUN instructions.
#[derive(Debug, Default)]
struct Dockerfile {
    entrypoint: Vec<String>,
    cmd: Vec<String>,
    /// Line of the CMD (or ENTRYPOINT) instruction.
    cmd_line: usize,
    workdir: String,
    run_invocations: Vec<Invocation>,
}

impl Dockerfile {
    /// The image's default command line (ENTRYPOINT + CMD).
    fn default_invocation(&self) -> Option<Invocation> {
        let argv: Vec<String> = self.entrypoint.iter().chain(&self.cmd).cloned().collect();
        Some(Invocation {
            source: format!("{DOCKERFILE}:{} (ENTRYPOINT + CMD)", self.cmd_line),
            argv: decodebench_argv(&argv)?,
        })
    }
}

/// Reads the Dockerfile's instructions. `build_args` are `--build-arg` values; ARG defaults
/// fill in the rest.
fn dockerfile(
    label: &str,
    text: &str,
    build_args: &Env,
    problems: &mut Vec<String>,
) -> Result<Dockerfile, String> {
    let lines: Vec<&str> = text.lines().collect();
    let mut d = Dockerfile::default();
    let mut env = plausible_env();
    let mut i = 0;
    while i < lines.len() {
        let start = i + 1;
        let trimmed = lines[i].trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            i += 1;
            continue;
        }
        // The instruction and its continuation lines (comment lines inside are dropped, as
        // Docker does; blank ones keep the line count).
        let mut body = String::new();
        loop {
            let l = lines[i];
            i += 1;
            if l.trim_start().starts_with('#') {
                body.push('\n');
                continue;
            }
            body.push_str(l);
            body.push('\n');
            if !l.trim_end().ends_with('\\') || i == lines.len() {
                break;
            }
        }
        let (keyword, rest) = body
            .trim_start()
            .split_once(char::is_whitespace)
            .unwrap_or((body.trim(), ""));
        let at = |e: String| format!("{label}:{start}: {e}");
        let words = |rest: &str, env: &Env| -> Result<Vec<String>, String> {
            let c = shell::evaluate(&format!("words {rest}"), env).map_err(at)?;
            Ok(c.into_iter()
                .next()
                .map(|c| c.argv[1..].to_vec())
                .unwrap_or_default())
        };
        // The exec form `["a", "b"]`, or the shell form, which Docker runs with `/bin/sh -c`.
        let exec_form = |rest: &str| -> Vec<String> {
            serde_json::from_str(rest.trim())
                .unwrap_or_else(|_| vec!["/bin/sh".into(), "-c".into(), rest.trim().into()])
        };
        match keyword.to_ascii_uppercase().as_str() {
            "FROM" => {
                d.entrypoint.clear();
                d.cmd.clear();
            }
            "ARG" => {
                for w in words(rest, &env)? {
                    let (name, default) = w.split_once('=').unwrap_or((&w, ""));
                    let value = build_args.get(name).map_or(default, String::as_str);
                    env.insert(name.to_string(), value.to_string());
                }
            }
            "ENV" => {
                for w in words(rest, &env)? {
                    if let Some((name, value)) = w.split_once('=') {
                        env.insert(name.to_string(), value.to_string());
                    }
                }
            }
            "WORKDIR" => d.workdir = rest.trim().to_string(),
            "ENTRYPOINT" => {
                d.entrypoint = exec_form(rest);
                d.cmd_line = start;
            }
            "CMD" => {
                d.cmd = exec_form(rest);
                d.cmd_line = start;
            }
            "RUN" => {
                // RUN's own options (`--mount=...`) come before the command.
                let mut script = rest;
                let mut skipped_lines = 0;
                loop {
                    let t = script.trim_start_matches([' ', '\t']);
                    if let Some(after) = t.strip_prefix("\\\n") {
                        skipped_lines += 1;
                        script = after;
                    } else if t.starts_with("--") {
                        let end = t.find(char::is_whitespace).unwrap_or(t.len());
                        script = &t[end..];
                    } else {
                        script = t;
                        break;
                    }
                }
                let commands = if script.trim_start().starts_with('[') {
                    vec![SimpleCommand {
                        argv: exec_form(script),
                        assignments: Vec::new(),
                        line: 1,
                        unset: Vec::new(),
                        nested_in: None,
                    }]
                } else {
                    shell::evaluate(script, &env).map_err(at)?
                };
                d.run_invocations.extend(invocations_of(
                    label,
                    start + skipped_lines,
                    &commands,
                    problems,
                ));
            }
            _ => {}
        }
    }
    Ok(d)
}

/// The Dockerfile as built with the build arguments its comments suggest: PRECOMPILE_CC is empty
/// by default, which would leave the precompile loop's command line unchecked.
fn the_dockerfile(problems: &mut Vec<String>) -> Dockerfile {
    let build_args = [("PRECOMPILE_CC".to_string(), "9.0 10.0".to_string())].into();
    dockerfile(DOCKERFILE, &read(DOCKERFILE), &build_args, problems)
        .unwrap_or_else(|e| panic!("{e}"))
}

// ---------------------------------------------------------------------------------------------
// Kubernetes.

const K8S: &str = "deploy/k8s";
const K8S_BASE: &str = "deploy/k8s/base";

/// Files under deploy/k8s that no kustomization lists, on purpose.
const UNLISTED_K8S_FILES: &[(&str, &str)] = &[(
    "deploy/k8s/base/secret-token.example.yaml",
    "an example Secret, kept out of kustomization.yaml so that a real token never lands in git",
)];

/// The pod spec of a workload resource.
fn pod_spec(doc: &Value) -> Option<&Value> {
    let spec = match doc["kind"].as_str()? {
        "Pod" => &doc["spec"],
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => {
            &doc["spec"]["template"]["spec"]
        }
        "CronJob" => &doc["spec"]["jobTemplate"]["spec"]["template"]["spec"],
        _ => return None,
    };
    spec.is_object().then_some(spec)
}

fn containers(pod: &Value) -> impl Iterator<Item = &Value> {
    ["initContainers", "containers"]
        .into_iter()
        .flat_map(|k| pod[k].as_array().into_iter().flatten())
}

/// Kubelet's `$(VAR)` expansion from the container's environment (`$$` escapes a `$`). A
/// reference to a variable the container does not define stays as written: the names of those
/// that look like variables are returned.
fn kubelet_expand(s: &str, env: &Env) -> (String, Vec<String>) {
    let mut out = String::new();
    let mut undefined = Vec::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        if let Some(after) = rest.strip_prefix("$$") {
            out.push('$');
            rest = after;
        } else if let Some((name, after)) = rest
            .strip_prefix("$(")
            .and_then(|r| r.split_once(')'))
            .filter(|(n, _)| {
                !n.is_empty()
                    && n.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
            })
        {
            match env.get(name) {
                Some(v) => out.push_str(v),
                None => {
                    undefined.push(name.to_string());
                    out.push_str(&format!("$({name})"));
                }
            }
            rest = after;
        } else {
            out.push('$');
            rest = &rest[1..];
        }
    }
    out.push_str(rest);
    (out, undefined)
}

/// The container's environment: literal values, and a plausible value for each `valueFrom`.
fn container_env(c: &Value) -> Env {
    c["env"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let name = e["name"].as_str()?.to_string();
            let value = match &e["value"] {
                Value::String(v) => v.clone(),
                _ if e["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName" => {
                    "gpu-node-1".into()
                }
                _ => "from-the-cluster".into(),
            };
            Some((name, value))
        })
        .collect()
}

/// A decodebench command line in a container of a build, parsed.
struct K8sCommand<'a> {
    resource: &'a Resource,
    pod: &'a Value,
    container: &'a Value,
    invocation: Invocation,
    cli: Cli,
}

/// Where a container's command line came from, for messages.
fn container_source(build: &str, r: &Resource, c: &Value) -> String {
    format!(
        "{build}: {}, container {}",
        r.describe(),
        c["name"].as_str().unwrap_or("?")
    )
}

/// The decodebench command lines of a container (argv from `command` + `args` after kubelet's
/// expansion; no `command` means the image's ENTRYPOINT, and no `args` its CMD).
fn container_invocations(
    source: &str,
    c: &Value,
    image: &Dockerfile,
    problems: &mut Vec<String>,
) -> Vec<Invocation> {
    let ours = c["image"].as_str().is_some_and(is_decodebench_image);
    let strings = |v: &Value| -> Option<Vec<String>> {
        v.as_array().map(|a| {
            a.iter()
                .map(|s| match s {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
                .collect()
        })
    };
    let command = strings(&c["command"]);
    let args = strings(&c["args"]);
    let argv: Vec<String> = match (command, ours) {
        (Some(cmd), _) => cmd.into_iter().chain(args.unwrap_or_default()).collect(),
        (None, true) => image
            .entrypoint
            .iter()
            .cloned()
            .chain(args.unwrap_or_else(|| image.cmd.clone()))
            .collect(),
        (None, false) => return Vec::new(),
    };
    let env = container_env(c);
    let mut undefined = Vec::new();
    let argv: Vec<String> = argv
        .iter()
        .map(|a| {
            let (s, u) = kubelet_expand(a, &env);
            undefined.extend(u);
            s
        })
        .collect();
    let mut found = Vec::new();
    if let Some(db) = decodebench_argv(&argv) {
        if !undefined.is_empty() {
            problems.push(problem(
                source,
                &db,
                &format!(
                    "refers to $({}), which the container's env does not define: kubelet passes \
                     the text on unexpanded",
                    undefined.join("), $(")
                ),
            ));
        }
        found.push(Invocation {
            source: source.to_string(),
            argv: db,
        });
    } else if let [sh, flag, script, ..] = shell::strip_wrappers(&argv) {
        if matches!(shell::basename(sh), "sh" | "bash") && flag == "-c" {
            // The shell sees the container's environment.
            let mut shell_env = plausible_env();
            shell_env.extend(env);
            match shell::evaluate(script, &shell_env) {
                Ok(commands) => found.extend(invocations_of(
                    &format!("{source}, its {} -c script", shell::basename(sh)),
                    1,
                    &commands,
                    problems,
                )),
                Err(e) => problems.push(format!("{source}: the shell script: {e}")),
            }
        }
    }
    if ours && found.is_empty() {
        problems.push(format!(
            "{source}: runs the decodebench image, but the test found no decodebench command \
             line in `{}` (teach decodebench_argv in tests/deploy_cli/mod.rs)",
            show(&argv)
        ));
    }
    found
}

/// Secrets by name and their keys: those defined under deploy/k8s (the example included: it
/// documents the Secret the operator creates), and those that the docs' `kubectl create secret`
/// lines create.
fn known_secrets(docs: &DocsScan) -> BTreeMap<String, BTreeSet<String>> {
    let mut secrets: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for path in files_under(&root().join(K8S)) {
        if !path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        for (doc, _) in kustomize::documents(&text, &display(&path, &root())).unwrap_or_default() {
            if doc["kind"] == "Secret" {
                let keys = secrets
                    .entry(doc["metadata"]["name"].as_str().unwrap_or("").to_string())
                    .or_default();
                for field in ["data", "stringData"] {
                    keys.extend(
                        doc[field]
                            .as_object()
                            .into_iter()
                            .flat_map(|m| m.keys().cloned()),
                    );
                }
            }
        }
    }
    for (_, c) in &docs.commands {
        let w = shell::strip_wrappers(&c.argv);
        if w.first().map(String::as_str) != Some("kubectl") {
            continue;
        }
        // The words that are not options (nor the namespace after `-n`).
        let mut positional = Vec::new();
        let mut words = w.iter();
        while let Some(a) = words.next() {
            if a == "-n" || a == "--namespace" {
                words.next();
            } else if !a.starts_with('-') {
                positional.push(a.as_str());
            }
        }
        let [_, "create", "secret", kind, name, ..] = positional.as_slice() else {
            continue;
        };
        let keys = secrets.entry(name.to_string()).or_default();
        if *kind == "tls" {
            keys.extend(["tls.crt".to_string(), "tls.key".to_string()]);
        }
        for a in w {
            if let Some(spec) = a.strip_prefix("--from-file=") {
                let key = match spec.split_once('=') {
                    Some((key, _)) => key,
                    None => shell::basename(spec),
                };
                keys.insert(key.to_string());
            } else if let Some((key, _)) = a
                .strip_prefix("--from-literal=")
                .and_then(|s| s.split_once('='))
            {
                keys.insert(key.to_string());
            }
        }
    }
    secrets
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let p = e.expect("a directory entry").path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

#[derive(Clone, Copy, PartialEq)]
enum Access {
    Read,
    Write,
}

/// The files and folders a command line points the binary at.
fn path_flags(cli: &Cli) -> Vec<(&'static str, PathBuf, Access)> {
    use Access::*;
    let mut v = Vec::new();
    let mut push = |flag, p: &Option<PathBuf>, access| {
        if let Some(p) = p {
            v.push((flag, p.clone(), access));
        }
    };
    match &cli.command {
        Command::Run(a) => {
            push("--grid", &a.grid.grid, Read);
            push("--out", &Some(a.out.clone()), Write);
        }
        Command::Coordinator(a) => {
            push("--grid", &a.grid.grid, Read);
            push("--out", &Some(a.out.clone()), Write);
            push("--token-file", &a.token.token_file, Read);
            push("--tls-cert", &a.tls.tls_cert, Read);
            push("--tls-key", &a.tls.tls_key, Read);
            push("--tls-client-ca", &a.tls.tls_client_ca, Read);
        }
        Command::Agent(a) => {
            push("--token-file", &a.token.token_file, Read);
            push("--tls-ca", &a.tls.tls_ca, Read);
            push("--tls-cert", &a.tls.tls_cert, Read);
            push("--tls-key", &a.tls.tls_key, Read);
        }
        Command::Status(a) => {
            push("--token-file", &a.token.token_file, Read);
            push("--tls-ca", &a.tls.tls_ca, Read);
            push("--tls-cert", &a.tls.tls_cert, Read);
            push("--tls-key", &a.tls.tls_key, Read);
        }
        Command::Precompile(a) => {
            push("--cache-dir", &a.cache_dir, Write);
            push("--resources", &a.resources, Write);
        }
        Command::Grid(a) => push("FILE", &a.file, Read),
        _ => {}
    }
    v
}

/// What a build's checks found, beyond the problems: for the test's expectations.
#[derive(Default)]
struct K8sReport {
    subcommands: BTreeSet<String>,
    grids_loaded: Vec<PathBuf>,
    problems: Vec<String>,
}

/// Every path flag of a container's command line is on a volume that holds it: a ConfigMap or
/// Secret key, a claim of the build; `--out` writable. A `--grid` from a ConfigMap is loaded.
fn check_paths(
    cmd: &K8sCommand,
    build: &Build,
    image: &Dockerfile,
    secrets: &BTreeMap<String, BTreeSet<String>>,
    report: &mut K8sReport,
) {
    let workdir = cmd.container["workingDir"]
        .as_str()
        .unwrap_or(&image.workdir)
        .to_string();
    let mounts: Vec<&Value> = cmd.container["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .collect();
    let inv = &cmd.invocation;
    for (flag, path, access) in path_flags(&cmd.cli) {
        let mut bad = |msg: String| {
            report.problems.push(problem(
                &inv.source,
                &inv.argv,
                &format!("{flag} {}: {msg}", path.display()),
            ))
        };
        let abs = Path::new(&workdir).join(&path);
        let Some(mount) = mounts
            .iter()
            .filter(|m| {
                m["mountPath"]
                    .as_str()
                    .is_some_and(|mp| abs.starts_with(mp))
            })
            .max_by_key(|m| m["mountPath"].as_str().map_or(0, str::len))
        else {
            bad(format!(
                "{} is on no volume of the container: {}",
                abs.display(),
                match access {
                    Access::Read => "nothing puts a file there",
                    Access::Write => "what is written there is lost with the container",
                }
            ));
            continue;
        };
        let mount_path = mount["mountPath"].as_str().unwrap_or("");
        let volume_name = mount["name"].as_str().unwrap_or("");
        let Some(volume) = cmd.pod["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|v| v["name"] == volume_name)
        else {
            bad(format!(
                "the volume mount {volume_name} names no volume of the pod"
            ));
            continue;
        };
        if access == Access::Write && mount["readOnly"] == true {
            bad(format!(
                "it is written, but {mount_path} is mounted read-only"
            ));
            continue;
        }
        // The key a ConfigMap or Secret file is: the mount's subPath, or the first component
        // under the mount, through the volume's items when it lists them.
        let rel = abs.strip_prefix(mount_path).unwrap_or(Path::new(""));
        let file_name = match mount["subPath"].as_str() {
            Some(sub) => sub.to_string(),
            None => rel
                .components()
                .next()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .unwrap_or_default(),
        };
        let key_of = |source: &Value| -> Option<String> {
            match source["items"].as_array() {
                Some(items) => items
                    .iter()
                    .find(|i| i["path"] == file_name.as_str())
                    .and_then(|i| i["key"].as_str().map(str::to_string)),
                None => Some(file_name.clone()),
            }
        };
        if let Some(cm) = volume.get("configMap") {
            let name = cm["name"].as_str().unwrap_or("");
            if access == Access::Write {
                bad(format!(
                    "it is written, but the ConfigMap {name} is read-only"
                ));
                continue;
            }
            let Some(generated) = build.config_maps.iter().find(|c| c.name == name) else {
                bad(format!(
                    "the ConfigMap {name} is not generated by the build"
                ));
                continue;
            };
            let Some(file) = key_of(cm).and_then(|k| generated.files.get(&k)) else {
                bad(format!(
                    "the ConfigMap {name} has no key for {file_name} (it has {:?})",
                    generated.files.keys().collect::<Vec<_>>()
                ));
                continue;
            };
            if flag == "--grid" {
                match Grid::from_file(file) {
                    Ok(_) => report.grids_loaded.push(file.clone()),
                    Err(e) => bad(format!("{}: {e}", display(file, &root()))),
                }
            }
        } else if let Some(secret) = volume.get("secret") {
            let name = secret["secretName"].as_str().unwrap_or("");
            if access == Access::Write {
                bad(format!("it is written, but the Secret {name} is read-only"));
                continue;
            }
            let Some(keys) = secrets.get(name) else {
                bad(format!(
                    "the Secret {name} is neither in deploy/k8s nor created by a command in the \
                     docs"
                ));
                continue;
            };
            if !key_of(secret).is_some_and(|k| keys.contains(&k)) {
                bad(format!(
                    "the Secret {name} has no key {file_name} (it has {keys:?})"
                ));
            }
        } else if let Some(pvc) = volume.get("persistentVolumeClaim") {
            let claim = pvc["claimName"].as_str().unwrap_or("");
            let exists = build
                .resources
                .iter()
                .any(|r| r.kind() == "PersistentVolumeClaim" && r.name() == claim);
            if !exists {
                bad(format!(
                    "the PersistentVolumeClaim {claim} is not in the build"
                ));
            }
        } else if volume.get("emptyDir").is_some() && access == Access::Read {
            bad(format!(
                "{mount_path} is an emptyDir: nothing puts a file there"
            ));
        }
    }
}

/// `scheme://host:port` of a URL.
fn url_parts(url: &str) -> Option<(&str, &str, u16)> {
    let (scheme, rest) = url.split_once("://")?;
    let authority = rest.split('/').next()?;
    let (host, port) = authority.rsplit_once(':')?;
    Some((scheme, host, port.parse().ok()?))
}

/// Agents reach a coordinator of the build: through its Service, on the port it listens on, with
/// TLS on both sides or neither; the coordinator expects as many agents as the agent Jobs run.
fn check_fleet(commands: &[K8sCommand], build: &Build, report: &mut K8sReport) {
    let coordinators: Vec<(&K8sCommand, &decodebench::cli::CoordinatorArgs)> = commands
        .iter()
        .filter_map(|c| match &c.cli.command {
            Command::Coordinator(a) => Some((c, a)),
            _ => None,
        })
        .collect();
    let agents: Vec<(&K8sCommand, &decodebench::cli::AgentArgs)> = commands
        .iter()
        .filter_map(|c| match &c.cli.command {
            Command::Agent(a) => Some((c, a)),
            _ => None,
        })
        .collect();
    if agents.is_empty() {
        return;
    }
    let [(coord, coord_args)] = coordinators.as_slice() else {
        report.problems.push(format!(
            "{}: an agent, but the build has {} coordinators (one expected)",
            agents[0].0.invocation.source,
            coordinators.len()
        ));
        return;
    };
    let mut bad = |c: &K8sCommand, msg: String| {
        report
            .problems
            .push(problem(&c.invocation.source, &c.invocation.argv, &msg))
    };
    let coordinator_tls = coord_args.tls.tls_cert.is_some();
    let mut agent_pods = 0;
    let mut counted = BTreeSet::new();
    for (agent, a) in &agents {
        if counted.insert(agent.resource.origin.clone() + agent.resource.name()) {
            agent_pods += agent.resource.doc["spec"]["parallelism"]
                .as_u64()
                .unwrap_or(1);
        }
        let Some((scheme, host, port)) = url_parts(&a.coordinator) else {
            bad(
                agent,
                format!("--coordinator {}: not scheme://host:port", a.coordinator),
            );
            continue;
        };
        let service_name = host.split('.').next().unwrap_or(host);
        let Some(service) = build
            .resources
            .iter()
            .find(|r| r.kind() == "Service" && r.name() == service_name)
        else {
            bad(
                agent,
                format!(
                    "--coordinator {}: no Service {service_name} in the build",
                    a.coordinator
                ),
            );
            continue;
        };
        let selects_coordinator = service.doc["spec"]["selector"]
            .as_object()
            .into_iter()
            .flatten()
            .all(|(k, v)| pod_labels(coord.resource)[k] == *v);
        if !selects_coordinator {
            bad(
                agent,
                format!("the Service {service_name} does not select the coordinator's pods"),
            );
        }
        let Some(service_port) = service.doc["spec"]["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["port"].as_u64() == Some(port.into()))
        else {
            bad(
                agent,
                format!(
                    "--coordinator {}: the Service {service_name} has no port {port}",
                    a.coordinator
                ),
            );
            continue;
        };
        let target = &service_port["targetPort"];
        let container_port = match target {
            Value::String(name) => coord.container["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|p| p["name"] == name.as_str())
                .and_then(|p| p["containerPort"].as_u64()),
            Value::Number(n) => n.as_u64(),
            _ => Some(port.into()),
        };
        if container_port != Some(coord_args.listen.port().into()) {
            bad(
                agent,
                format!(
                    "--coordinator {}: the Service sends port {port} to {target} (container port \
                     {container_port:?}), but the coordinator listens on {}",
                    a.coordinator, coord_args.listen
                ),
            );
        }
        let agent_tls = a.tls.tls_ca.is_some() || a.tls.tls_cert.is_some();
        if (scheme == "https") != coordinator_tls || (agent_tls && scheme != "https") {
            bad(
                agent,
                format!(
                    "--coordinator {}: the coordinator serves {}, the agent {}",
                    a.coordinator,
                    if coordinator_tls { "TLS" } else { "plain text" },
                    if agent_tls {
                        "has TLS flags"
                    } else {
                        "has no TLS flags"
                    }
                ),
            );
        }
        if coord_args.tls.tls_client_ca.is_some() && a.tls.tls_cert.is_none() {
            bad(
                agent,
                "the coordinator requires client certificates (--tls-client-ca), the agent has \
                 no --tls-cert"
                    .into(),
            );
        }
    }
    let expected = coord_args.schedule.expect_agents as u64;
    if expected > 0 && expected != agent_pods {
        bad(
            coord,
            format!(
                "--expect-agents {expected}, but the agent Jobs run {agent_pods} pods at once \
                 (their parallelism)"
            ),
        );
    }
}

/// A coordinator's probes reach what it serves: gRPC health (for the generated service's name) on
/// `--listen`, plain HTTP on `--metrics-listen`.
fn check_probes(cmd: &K8sCommand, report: &mut K8sReport) {
    let Command::Coordinator(a) = &cmd.cli.command else {
        return;
    };
    let port_number = |port: &Value| match port {
        Value::Number(n) => n.as_u64(),
        Value::String(name) => cmd.container["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["name"] == name.as_str())
            .and_then(|p| p["containerPort"].as_u64()),
        _ => None,
    };
    let grpc_port = u64::from(a.listen.port());
    let http_port = a.metrics_listen.map(|m| u64::from(m.port()));
    for kind in ["readinessProbe", "livenessProbe", "startupProbe"] {
        let probe = &cmd.container[kind];
        let (what, port, want) = if probe["grpc"].is_object() {
            let service = probe["grpc"]["service"].as_str().unwrap_or("");
            let served = decodebench_proto::wire::coordinator_server::SERVICE_NAME;
            if !service.is_empty() && service != served {
                report.problems.push(problem(
                    &cmd.invocation.source,
                    &cmd.invocation.argv,
                    &format!(
                        "{kind} asks gRPC health about `{service}`; the service is `{served}`"
                    ),
                ));
            }
            ("gRPC", &probe["grpc"]["port"], Some(grpc_port))
        } else if probe["httpGet"].is_object() {
            ("HTTP", &probe["httpGet"]["port"], http_port)
        } else {
            continue;
        };
        if port_number(port) != want || want.is_none() {
            report.problems.push(problem(
                &cmd.invocation.source,
                &cmd.invocation.argv,
                &format!(
                    "{kind} is a {what} probe on port {port} (container port {:?}), but the \
                     coordinator serves {what} on {}",
                    port_number(port),
                    want.map_or("no port (no --metrics-listen)".to_string(), |p| p
                        .to_string())
                ),
            ));
        }
    }
}

/// The Job spec of a Job, or of a CronJob's jobs.
fn job_spec(r: &Resource) -> Option<&Value> {
    match r.kind() {
        "Job" => Some(&r.doc["spec"]),
        "CronJob" => Some(&r.doc["spec"]["jobTemplate"]["spec"]),
        _ => None,
    }
}

/// A Job's pod failure policy rule matches a failure of `container` with exit code `code`
/// (the `onExitCodes` requirement: `In` or `NotIn` the values, for that container or any).
fn exit_code_rule_matches(rule: &Value, container: &str, code: i64) -> bool {
    let on = &rule["onExitCodes"];
    if !on.is_object() {
        return false;
    }
    if on["containerName"].as_str().is_some_and(|n| n != container) {
        return false;
    }
    let listed = on["values"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|v| v.as_i64() == Some(code));
    match on["operator"].as_str() {
        Some("In") => listed,
        Some("NotIn") => !listed,
        _ => false,
    }
}

/// An agent that cannot start exits with [`EXIT_AGENT_SETUP`], and a new pod would fail the same
/// way: an agent Job must not retry it (today's `restartPolicy: OnFailure` restarted such a pod
/// in place until the backoff limit). The Job's `podFailurePolicy` must send that exit code of
/// the agent container to `FailIndex` (with `backoffLimitPerIndex`, which it needs) or `FailJob`
/// (the first rule that matches it decides), and `Ignore` pod disruptions (node drains,
/// preemption), which are not the agent's doing; `restartPolicy: Never` is what the policy
/// requires. Checked with the constant the binary exits with, so that the manifests follow it.
fn check_agent_failure_policy(cmd: &K8sCommand, report: &mut K8sReport) {
    if !matches!(cmd.cli.command, Command::Agent(_)) {
        return;
    }
    // Only a Job has a failure policy; an agent in another workload is not checked here.
    let Some(job) = job_spec(cmd.resource) else {
        return;
    };
    let container = cmd.container["name"].as_str().unwrap_or("");
    let code = i64::from(EXIT_AGENT_SETUP);
    let mut bad = |msg: String| {
        report
            .problems
            .push(problem(&cmd.invocation.source, &cmd.invocation.argv, &msg))
    };
    let rules: Vec<&Value> = job["podFailurePolicy"]["rules"]
        .as_array()
        .into_iter()
        .flatten()
        .collect();
    let restart = cmd.pod["restartPolicy"].as_str().unwrap_or("(unset)");
    if restart != "Never" {
        bad(format!(
            "restartPolicy {restart}: an agent Job's pods need restartPolicy Never, which its \
             podFailurePolicy requires"
        ));
    }
    let decides = rules
        .iter()
        .find(|r| exit_code_rule_matches(r, container, code));
    match decides.map(|r| r["action"].as_str().unwrap_or("")) {
        Some("FailJob") => {}
        Some("FailIndex") => {
            if !job["backoffLimitPerIndex"].is_number() {
                bad(
                    "the podFailurePolicy's FailIndex rule needs backoffLimitPerIndex in the \
                     Job spec"
                        .into(),
                );
            }
        }
        other => bad(format!(
            "exit code {code} (EXIT_AGENT_SETUP: the agent could not start, and a new pod would \
             fail the same way) of container {container} {}; the Job's podFailurePolicy needs a \
             rule `action: FailIndex` (or FailJob) `onExitCodes: {{containerName: {container}, \
             operator: In, values: [{code}]}}` before any other rule that matches it",
            match other {
                None => "matches no podFailurePolicy rule, so it is retried".to_string(),
                Some(action) => format!("is matched first by a rule with action {action:?}"),
            }
        )),
    }
    let ignores_disruptions = rules.iter().any(|r| {
        r["action"] == "Ignore"
            && r["onPodConditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "DisruptionTarget")
    });
    if !ignores_disruptions {
        bad(
            "the Job's podFailurePolicy has no `action: Ignore` rule `onPodConditions: [{type: \
             DisruptionTarget}]`, so node drains and preemptions count against the agents' \
             retries"
                .into(),
        );
    }
}

fn pod_labels(r: &Resource) -> &Value {
    match r.kind() {
        "CronJob" => &r.doc["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"],
        "Pod" => &r.doc["metadata"]["labels"],
        _ => &r.doc["spec"]["template"]["metadata"]["labels"],
    }
}

/// All checks of one build.
fn check_build(
    label: &str,
    build: &Build,
    image: &Dockerfile,
    secrets: &BTreeMap<String, BTreeSet<String>>,
) -> K8sReport {
    let mut report = K8sReport::default();
    let mut commands = Vec::new();
    let mut unparsed = 0;
    for r in &build.resources {
        let Some(pod) = pod_spec(&r.doc) else {
            continue;
        };
        for c in containers(pod) {
            let source = container_source(label, r, c);
            for inv in container_invocations(&source, c, image, &mut report.problems) {
                println!("{}: {}", inv.source, show(&inv.argv));
                report.subcommands.insert(inv.subcommand().to_string());
                match check(&inv) {
                    Ok(Some(cli)) => commands.push(K8sCommand {
                        resource: r,
                        pod,
                        container: c,
                        invocation: inv,
                        cli,
                    }),
                    Ok(None) => {}
                    Err(e) => {
                        unparsed += 1;
                        report.problems.push(e);
                    }
                }
            }
        }
    }
    for cmd in &commands {
        check_paths(cmd, build, image, secrets, &mut report);
        check_probes(cmd, &mut report);
        check_agent_failure_policy(cmd, &mut report);
    }
    // How agents and coordinator fit together is only known when every command line parsed.
    if unparsed == 0 {
        check_fleet(&commands, build, &mut report);
    }
    report
}

/// Directories under deploy/k8s with a kustomization: (Kustomizations, Components).
fn kustomizations() -> (Vec<PathBuf>, Vec<PathBuf>) {
    let mut kustomizations = Vec::new();
    let mut components = Vec::new();
    for file in files_under(&root().join(K8S)) {
        if file.file_name().is_some_and(|n| n == "kustomization.yaml") {
            let label = display(&file, &root());
            let docs =
                kustomize::documents(&read(&label), &label).unwrap_or_else(|e| panic!("{e}"));
            let dir = file.parent().expect("a file has a parent").to_path_buf();
            match docs.first().map(|(d, _)| &d["kind"]) {
                Some(kind) if kind == "Component" => components.push(dir),
                _ => kustomizations.push(dir),
            }
        }
    }
    (kustomizations, components)
}

// ---------------------------------------------------------------------------------------------
// Environment variables.

/// The words of `text` that start with `prefix`, with their offsets.
fn word_positions<'a>(
    text: &'a str,
    prefix: &'a str,
) -> impl Iterator<Item = (usize, &'a str)> + 'a {
    let is_word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    text.match_indices(prefix).filter_map(move |(i, _)| {
        if text[..i].chars().next_back().is_some_and(is_word) {
            return None;
        }
        let end = text[i..]
            .find(|c: char| !is_word(c))
            .map_or(text.len(), |e| i + e);
        Some((i, &text[i..end]))
    })
}

/// Names in the binary's namespace (`DECODEBENCH_*`), and the usual log variable `RUST_LOG` where
/// it is set (`RUST_LOG=`, `name: RUST_LOG`) rather than named as a syntax.
fn env_names(text: &str) -> impl Iterator<Item = (usize, &str)> {
    let set = move |(i, w): &(usize, &str)| {
        *w == "RUST_LOG" && (text[i + w.len()..].starts_with('=') || text[..*i].ends_with("name: "))
    };
    word_positions(text, "DECODEBENCH_").chain(word_positions(text, "RUST_LOG").filter(set))
}

/// The environment variables the binary reads: clap's `env = ...`, and the names quoted in the
/// workspace's Rust sources (`std::env::var("DECODEBENCH_HOST")`, `env!(...)` in build scripts).
fn variables_the_binary_reads() -> BTreeSet<String> {
    fn clap_env(c: &clap::Command, out: &mut BTreeSet<String>) {
        out.extend(
            c.get_arguments()
                .filter_map(|a| a.get_env())
                .map(|e| e.to_string_lossy().into_owned()),
        );
        c.get_subcommands().for_each(|s| clap_env(s, out));
    }
    let mut read = BTreeSet::new();
    clap_env(&Cli::command(), &mut read);
    let mut sources = vec![root().join("build.rs")];
    for krate in ["src", "agent", "coordinator", "kernels", "proto"] {
        sources.extend(files_under(&root().join(krate)));
    }
    for file in sources
        .iter()
        .filter(|f| f.extension().is_some_and(|e| e == "rs"))
    {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        for (i, name) in env_names(&text) {
            if text[..i].ends_with('"') && text[i + name.len()..].starts_with('"') {
                read.insert(name.to_string());
            }
        }
    }
    read
}

/// A problem for each variable that `text` (a deployment file or a doc) names but the binary
/// does not read: setting it does nothing.
fn unread_variables(label: &str, text: &str, read: &BTreeSet<String>) -> Vec<String> {
    env_names(text)
        .filter(|(_, name)| !read.contains(*name))
        .map(|(i, name)| {
            let line = text[..i].lines().count().max(1);
            let line = if text[..i].ends_with('\n') {
                line + 1
            } else {
                line
            };
            format!(
                "{label}:{line}: {name} is not read by decodebench (it reads {}), so setting it \
                 does nothing",
                read.iter().cloned().collect::<Vec<_>>().join(", ")
            )
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The tests.

#[test]
fn documented_command_lines_parse() {
    let scan = scan_docs();
    assert!(
        scan.invocations.len() >= 8,
        "only {} decodebench command lines found in the docs: is the extraction broken?",
        scan.invocations.len()
    );
    let mut problems = scan.problems;
    problems.extend(check_all(&scan.invocations));
    fail_on(&problems);
}

#[test]
fn slurm_script_command_lines_parse() {
    let text = read(SLURM_SCRIPT);
    let mut problems = Vec::new();
    // The defaults, and each placement the script's header documents.
    for placement in [None, Some("spread"), Some("per-sku"), Some("per-gpu")] {
        let mut env = plausible_env();
        if let Some(p) = placement {
            env.insert("PLACEMENT".into(), p.into());
        }
        let (found, p) =
            slurm_invocations(SLURM_SCRIPT, &text, &env).unwrap_or_else(|e| panic!("{e}"));
        problems.extend(p);
        let subcommands: Vec<&str> = found.iter().map(Invocation::subcommand).collect();
        assert_eq!(
            subcommands,
            ["coordinator", "agent"],
            "{SLURM_SCRIPT} (PLACEMENT={placement:?}): expected one coordinator and one agent \
             command line, found {found:#?}"
        );
        problems.extend(check_all(&found));
    }
    fail_on(&problems);
}

#[test]
fn dockerfile_command_lines_parse() {
    let mut problems = Vec::new();
    let d = the_dockerfile(&mut problems);
    let default = d.default_invocation().unwrap_or_else(|| {
        panic!(
            "{DOCKERFILE}: the image's ENTRYPOINT {:?} + CMD {:?} does not run decodebench; the \
             Kubernetes manifests rely on it",
            d.entrypoint, d.cmd
        )
    });
    assert!(
        d.run_invocations
            .iter()
            .any(|i| i.subcommand() == "precompile"),
        "{DOCKERFILE}: the precompile RUN line was not found: {:#?}",
        d.run_invocations
    );
    problems.extend(check_all(&[default]));
    problems.extend(check_all(&d.run_invocations));
    fail_on(&problems);
}

#[test]
fn kubernetes_manifests_parse_as_kustomize_builds_them() {
    let root = root();
    let mut problems = Vec::new();
    let image = the_dockerfile(&mut problems);
    let secrets = known_secrets(&scan_docs());
    let (targets, components) = kustomizations();
    assert!(
        targets.contains(&root.join(K8S_BASE)) && !components.is_empty(),
        "no kustomizations found under {K8S}: {targets:?} {components:?}"
    );
    let mut files_read = BTreeSet::new();
    for target in &targets {
        for component in std::iter::once(None).chain(components.iter().map(Some)) {
            let extra: Vec<PathBuf> = component.iter().map(|c| c.to_path_buf()).collect();
            let mut label = display(target, &root);
            if let Some(c) = component {
                label.push_str(&format!(" + {}", display(c, &root)));
            }
            let build = match kustomize::build(target, &extra, &root) {
                Ok(b) => b,
                Err(e) => {
                    problems.push(format!("{label}: {e}"));
                    continue;
                }
            };
            files_read.extend(build.files_read.iter().cloned());
            let report = check_build(&label, &build, &image, &secrets);
            problems.extend(report.problems);
            if report.subcommands.is_empty() {
                problems.push(format!("{label}: no decodebench command line in the build"));
            }
            if *target == root.join(K8S_BASE) {
                assert_eq!(
                    report.subcommands,
                    BTreeSet::from(["agent".to_string(), "coordinator".to_string()]),
                    "{label}: the base runs a coordinator and agents"
                );
                assert_eq!(
                    report.grids_loaded,
                    [root.join("deploy/k8s/base/grid.toml")],
                    "{label}: the coordinator's --grid is the generated ConfigMap's grid.toml"
                );
            }
        }
    }
    for file in files_under(&root.join(K8S)) {
        let rel = display(&file, &root);
        if !files_read.contains(&file) && !UNLISTED_K8S_FILES.iter().any(|(f, _)| *f == rel) {
            problems.push(format!(
                "{rel}: no kustomization under {K8S} uses it, so nothing checks it (list it in a \
                 kustomization, or in UNLISTED_K8S_FILES with the reason)"
            ));
        }
    }
    fail_on(&problems);
}

#[test]
fn environment_variables_in_deploy_and_docs_are_read_by_the_binary() {
    let read = variables_the_binary_reads();
    assert!(
        read.contains("DECODEBENCH_HOST") && read.contains("DECODEBENCH_COORDINATOR"),
        "the sources were not found: {read:?}"
    );
    let mut files = files_under(&root().join("deploy"));
    files.extend(doc_files().iter().map(|f| root().join(f)));
    let mut problems = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        problems.extend(unread_variables(&display(&file, &root()), &text, &read));
    }
    fail_on(&problems);
}

// ---------------------------------------------------------------------------------------------
// The checks fail on drift: each test below feeds a copy of a real file with one thing changed
// (a renamed flag, a variable, a patch) and expects the error, after the unchanged copy passed.

/// The decodebench command lines of the containers in one manifest's text, checked.
fn manifest_problems(label: &str, text: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let image = the_dockerfile(&mut problems);
    for (doc, line) in kustomize::documents(text, label).unwrap() {
        let r = Resource {
            doc,
            origin: format!("{label}:{line}"),
            patched_by: Vec::new(),
        };
        let pod = pod_spec(&r.doc).expect("a workload");
        for c in containers(pod) {
            let found =
                container_invocations(&container_source(label, &r, c), c, &image, &mut problems);
            assert!(!found.is_empty(), "{label}: no command line found");
            problems.extend(check_all(&found));
        }
    }
    problems
}

/// The 1-based line of the first occurrence of `needle` in `text`.
fn line_of(text: &str, needle: &str) -> usize {
    let at = text
        .find(needle)
        .unwrap_or_else(|| panic!("`{needle}` is in the text"));
    text[..at].lines().count() + usize::from(text[..at].ends_with('\n') || at == 0)
}

/// `text` with `from` replaced by `to`, which must occur exactly once.
fn renamed(text: &str, from: &str, to: &str) -> String {
    assert_eq!(text.matches(from).count(), 1, "`{from}` occurs once");
    text.replace(from, to)
}

fn assert_one_problem_saying(problems: &[String], needles: &[&str]) {
    assert_eq!(problems.len(), 1, "one problem expected: {problems:#?}");
    for needle in needles {
        assert!(
            problems[0].contains(needle),
            "`{needle}` is not in:\n{}",
            problems[0]
        );
    }
}

#[test]
fn a_renamed_flag_in_a_manifest_fails() {
    let label = "deploy/k8s/base/coordinator-deployment.yaml";
    let text = read(label);
    assert_eq!(manifest_problems(label, &text), Vec::<String>::new());
    let problems = manifest_problems(
        label,
        &renamed(&text, "- --expect-agents", "- --expected-agents"),
    );
    assert_one_problem_saying(
        &problems,
        &[
            "deploy/k8s/base/coordinator-deployment.yaml:1",
            "container coordinator",
            "decodebench coordinator --listen",
            "unexpected argument '--expected-agents'",
            "tip: a similar argument exists: '--expect-agents'",
        ],
    );
}

#[test]
fn an_invalid_value_or_an_undefined_variable_in_a_manifest_fails() {
    let label = "deploy/k8s/base/agent-job.yaml";
    let text = read(label);
    assert_eq!(manifest_problems(label, &text), Vec::<String>::new());
    let problems = manifest_problems(label, &renamed(&text, "- \"0\"", "- \"first\""));
    assert_one_problem_saying(&problems, &["--gpu", "invalid value 'first'"]);
    // The env entry renamed: kubelet would pass `$(DECODEBENCH_COORDINATOR)` on as it is.
    let problems = manifest_problems(
        label,
        &renamed(
            &text,
            "name: DECODEBENCH_COORDINATOR",
            "name: COORDINATOR_URL",
        ),
    );
    assert_one_problem_saying(
        &problems,
        &[
            "$(DECODEBENCH_COORDINATOR)",
            "the container's env does not define",
        ],
    );
}

/// deploy/k8s copied to a scratch folder, with `edit` applied to one file.
fn k8s_copy_with(file: &str, edit: impl Fn(String) -> String) -> tempfile::TempDir {
    let scratch = tempfile::tempdir().expect("a scratch folder");
    for src in files_under(&root().join(K8S)) {
        let rel = src.strip_prefix(root()).expect("under the root");
        let dst = scratch.path().join(rel);
        std::fs::create_dir_all(dst.parent().expect("a parent")).expect("mkdir");
        let mut text = std::fs::read_to_string(&src).expect("read");
        if rel == Path::new(file) {
            text = edit(text);
        }
        std::fs::write(&dst, text).expect("write");
    }
    scratch
}

/// Builds `target` (with `component`) in a scratch copy of deploy/k8s; the problems.
fn build_problems(scratch: &Path, target: &str, component: Option<&str>) -> Vec<String> {
    let mut ignored = Vec::new();
    let image = the_dockerfile(&mut ignored);
    let secrets = known_secrets(&scan_docs());
    let extra: Vec<PathBuf> = component.iter().map(|c| scratch.join(c)).collect();
    match kustomize::build(&scratch.join(target), &extra, scratch) {
        Ok(build) => check_build(target, &build, &image, &secrets).problems,
        Err(e) => vec![e],
    }
}

#[test]
fn a_renamed_flag_in_a_kustomize_patch_fails() {
    let tls = "deploy/k8s/components/tls/kustomization.yaml";
    let fine = k8s_copy_with(tls, |t| t);
    assert_eq!(
        build_problems(
            fine.path(),
            "deploy/k8s/overlays/fleet",
            Some("deploy/k8s/components/tls")
        ),
        Vec::<String>::new()
    );
    let broken = k8s_copy_with(tls, |t| {
        renamed(
            &t,
            "value: --tls-client-ca\n",
            "value: --tls-client-ca-file\n",
        )
    });
    let problems = build_problems(
        broken.path(),
        "deploy/k8s/overlays/fleet",
        Some("deploy/k8s/components/tls"),
    );
    let patched_at = format!(
        "patched by {tls}:{}",
        line_of(&read(tls), "  - target:\n      kind: Deployment")
    );
    assert_one_problem_saying(
        &problems,
        &[
            "Deployment decodebench-coordinator",
            &patched_at,
            "unexpected argument '--tls-client-ca-file'",
        ],
    );
    // Without the component, the fleet overlay is unaffected.
    assert_eq!(
        build_problems(broken.path(), "deploy/k8s/overlays/fleet", None),
        Vec::<String>::new()
    );
}

#[test]
fn a_base_whose_arguments_moved_fails_the_overlays_test_operation() {
    let base = "deploy/k8s/base/coordinator-deployment.yaml";
    let moved = k8s_copy_with(base, |t| {
        renamed(&t, "            - --placement\n            - spread\n", "").replace(
            "            - --keep-serving\n",
            "            - --keep-serving\n            - --placement\n            - spread\n",
        )
    });
    assert_eq!(
        build_problems(moved.path(), "deploy/k8s/base", None),
        Vec::<String>::new()
    );
    let problems = build_problems(moved.path(), "deploy/k8s/overlays/fleet", None);
    let fleet = "deploy/k8s/overlays/fleet/kustomization.yaml";
    let patch_at = format!("{fleet}:{}", line_of(&read(fleet), "  - target:"));
    assert_one_problem_saying(&problems, &[&patch_at, "test failed", "--placement"]);
}

#[test]
fn agents_that_do_not_match_the_coordinator_fail() {
    let agent = "deploy/k8s/base/agent-job.yaml";
    let problems = build_problems(
        k8s_copy_with(agent, |t| renamed(&t, "parallelism: 4", "parallelism: 3")).path(),
        K8S_BASE,
        None,
    );
    assert_one_problem_saying(&problems, &["--expect-agents 4", "run 3 pods"]);
    let problems = build_problems(
        k8s_copy_with(agent, |t| {
            renamed(
                &t,
                "decodebench-coordinator:50051",
                "decodebench-coordinator:50052",
            )
        })
        .path(),
        K8S_BASE,
        None,
    );
    assert_one_problem_saying(&problems, &["has no port 50052"]);
    let problems = build_problems(
        k8s_copy_with(agent, |t| {
            renamed(
                &t,
                "/var/run/secrets/decodebench/token",
                "/var/run/secrets/decodebench/tokn",
            )
        })
        .path(),
        K8S_BASE,
        None,
    );
    assert_one_problem_saying(&problems, &["--token-file", "has no key tokn"]);
}

/// Every agent Job fails (its index) at once on the exit code of an agent that cannot start,
/// [`EXIT_AGENT_SETUP`], instead of retrying it, and ignores pod disruptions: the real manifests
/// pass, and each way of breaking that, in the base or in the fleet overlay's own Job, fails.
#[test]
fn an_agent_job_that_would_retry_a_setup_failure_fails() {
    let base_job = "deploy/k8s/base/agent-job.yaml";
    let h200_job = "deploy/k8s/overlays/fleet/agent-h200-job.yaml";
    let fleet = "deploy/k8s/overlays/fleet";
    let code = format!("values: [{EXIT_AGENT_SETUP}]");
    for (target, file) in [(K8S_BASE, base_job), (fleet, base_job), (fleet, h200_job)] {
        let check = |edit: &dyn Fn(String) -> String| {
            build_problems(k8s_copy_with(file, edit).path(), target, None)
        };
        assert_eq!(check(&|t| t), Vec::<String>::new(), "{target}: {file}");
        let problems = check(&|t| renamed(&t, &code, "values: [7]"));
        assert_one_problem_saying(
            &problems,
            &[
                &format!("exit code {EXIT_AGENT_SETUP} (EXIT_AGENT_SETUP"),
                "matches no podFailurePolicy rule",
            ],
        );
        let problems = check(&|t| renamed(&t, "action: FailIndex", "action: Count"));
        assert_one_problem_saying(
            &problems,
            &["matched first by a rule with action \"Count\""],
        );
        let problems = check(&|t| renamed(&t, "containerName: agent", "containerName: sidecar"));
        assert_one_problem_saying(&problems, &["matches no podFailurePolicy rule"]);
        let problems = check(&|t| renamed(&t, "backoffLimitPerIndex: 8", "backoffLimit: 8"));
        assert_one_problem_saying(&problems, &["FailIndex rule needs backoffLimitPerIndex"]);
        let problems = check(&|t| renamed(&t, "restartPolicy: Never", "restartPolicy: OnFailure"));
        assert_one_problem_saying(&problems, &["restartPolicy OnFailure", "requires"]);
        let problems = check(&|t| renamed(&t, "type: DisruptionTarget", "type: Ready"));
        assert_one_problem_saying(&problems, &["DisruptionTarget", "node drains"]);
    }
}

#[test]
fn a_broken_grid_in_the_config_map_fails() {
    let problems = build_problems(
        k8s_copy_with("deploy/k8s/base/grid.toml", |t| {
            renamed(&t, "batch_sizes =", "batch_size =")
        })
        .path(),
        K8S_BASE,
        None,
    );
    assert_one_problem_saying(
        &problems,
        &[
            "--grid /etc/decodebench/grid.toml",
            "grid.toml",
            "batch_size",
        ],
    );
}

#[test]
fn a_renamed_flag_in_the_slurm_script_fails() {
    let text = read(SLURM_SCRIPT);
    let check = |text: &str| {
        let (found, mut problems) =
            slurm_invocations(SLURM_SCRIPT, text, &plausible_env()).unwrap();
        problems.extend(check_all(&found));
        problems
    };
    assert_eq!(check(&text), Vec::<String>::new());
    // The agent's line, inside `bash -c '...'`.
    let problems = check(&renamed(&text, "--gpu 0 \\", "--gpu-index 0 \\"));
    let agent_at = format!(
        "{SLURM_SCRIPT}:{} (inside bash -c)",
        line_of(&text, "bash -c")
    );
    assert_one_problem_saying(
        &problems,
        &[
            &agent_at,
            "decodebench agent --coordinator http://gpu001:50051",
            "unexpected argument '--gpu-index'",
        ],
    );
    // The coordinator's: a documented placement the CLI does not know.
    let mut env = plausible_env();
    env.insert("PLACEMENT".into(), "per-node".into());
    let (found, _) = slurm_invocations(SLURM_SCRIPT, &text, &env).unwrap();
    assert_one_problem_saying(
        &check_all(&found),
        &[
            &format!("{SLURM_SCRIPT}:{}", line_of(&text, "srun --overlap")),
            "invalid value 'per-node' for '--placement",
        ],
    );
}

#[test]
fn a_renamed_flag_in_the_dockerfile_fails() {
    let text = read(DOCKERFILE);
    let build_args = [("PRECOMPILE_CC".to_string(), "9.0".to_string())].into();
    let mut problems = Vec::new();
    let d = dockerfile(
        DOCKERFILE,
        &renamed(&text, "precompile --cc", "precompile --arch"),
        &build_args,
        &mut problems,
    )
    .unwrap();
    assert_one_problem_saying(
        &check_all(&d.run_invocations),
        &[
            &format!("{DOCKERFILE}:{}", line_of(&text, "RUN for cc in")),
            "unexpected argument '--arch'",
        ],
    );
    let d = dockerfile(
        DOCKERFILE,
        &renamed(&text, "CMD [\"--help\"]", "CMD [\"--hlep\"]"),
        &build_args,
        &mut problems,
    )
    .unwrap();
    assert_one_problem_saying(
        &check_all(&[d.default_invocation().unwrap()]),
        &[
            &format!(
                "{DOCKERFILE}:{} (ENTRYPOINT + CMD)",
                line_of(&text, "CMD [")
            ),
            "unexpected argument '--hlep'",
        ],
    );
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn a_renamed_flag_in_the_docs_fails_unless_allow_listed() {
    let md = "Run it:\n\n```sh\nB=target/release/decodebench\n\
              for i in 0 1; do $B agent --coordinator http://127.0.0.1:50051 --gpu-id $i & done\n\
              ```\n\n```\ndecodebench report DIR --format FORMAT\n```\n";
    let mut scan = DocsScan::default();
    scan_markdown("docs/X.md", md, &[], &mut scan);
    let mut problems = scan.problems;
    problems.extend(check_all(&scan.invocations));
    assert_eq!(problems.len(), 2, "{problems:#?}");
    assert!(
        problems[0].contains(
            "docs/X.md:5: `target/release/decodebench agent --coordinator \
             http://127.0.0.1:50051 --gpu-id 0`"
        ) && problems[0].contains("unexpected argument '--gpu-id'"),
        "{}",
        problems[0]
    );
    assert!(
        problems[1].contains("docs/X.md:9") && problems[1].contains("invalid value 'FORMAT'"),
        "{}",
        problems[1]
    );
    // The placeholder line, allow-listed, is skipped; the renamed flag still fails.
    let allow = [(
        "docs/X.md",
        "decodebench report DIR --format FORMAT",
        "placeholders",
    )];
    let mut scan = DocsScan::default();
    scan_markdown("docs/X.md", md, &allow, &mut scan);
    assert_eq!(scan.allowed, BTreeSet::from([0]));
    assert_eq!(check_all(&scan.invocations).len(), 1);
}

#[test]
fn a_documented_command_line_the_test_cannot_read_fails() {
    for (md, needle) in [
        (
            "```sh\ndecodebench run --out \"unclosed\n```\n",
            "docs/X.md:2: this sh block cannot be read as a script",
        ),
        (
            "```text\ndecodebench run --preset $PRESET\n```\n",
            "docs/X.md:2: `decodebench run --preset`\n    uses $PRESET, which nothing sets",
        ),
        // Inside a here-document: text, not a command the shell runs.
        (
            "```sh\ncat <<EOF\ndecodebench run --bogus\nEOF\n```\n",
            "docs/X.md:3: `decodebench run --bogus` looks like a decodebench command line",
        ),
    ] {
        let mut scan = DocsScan::default();
        scan_markdown("docs/X.md", md, &[], &mut scan);
        assert_one_problem_saying(&scan.problems, &[needle]);
    }
}

#[test]
fn rust_log_in_a_manifest_is_reported_as_unread() {
    let read = variables_the_binary_reads();
    let manifest =
        "env:\n  - name: RUST_LOG\n    value: debug\n# RUST_LOG syntax, as a name of a syntax\n";
    assert_one_problem_saying(
        &unread_variables("m.yaml", manifest, &read),
        &[
            "m.yaml:2: RUST_LOG is not read by decodebench",
            "DECODEBENCH_LOG",
        ],
    );
    assert_one_problem_saying(
        &unread_variables("d.md", "set `DECODEBENCH_LOGS=debug`", &read),
        &["d.md:1: DECODEBENCH_LOGS"],
    );
    assert!(unread_variables("ok", "DECODEBENCH_LOG=debug decodebench run", &read).is_empty());
}
