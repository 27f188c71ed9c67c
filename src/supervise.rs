//! `decodebench run`'s local agents as child processes, each restarted when it dies.
//!
//! A GPU fault (an illegal address, an Xid) poisons the CUDA context for the rest of the process,
//! and a crash (a segfault, an OOM kill) ends it. With the agents inside `run`'s own process,
//! either ends the run. As children, a dead agent costs the case it was running: the coordinator
//! (still up, in `run`'s process) requeues or gives up that case, and a fresh agent process takes
//! the GPU over with a fresh context, as a restarted pod would in a Kubernetes fleet.

use decodebench_coordinator::run::AgentExit;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, watch};

/// The first wait before restarting an agent that died soon after it started; it doubles with
/// each such death in a row, up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// An agent that lived this long before dying was healthy until then: its next restart waits
/// only [`FIRST_BACKOFF`].
const HEALTHY_UPTIME: Duration = Duration::from_secs(60);
/// After SIGTERM, how long an agent gets to hand its lease back before SIGKILL.
pub const TERM_GRACE: Duration = Duration::from_secs(5);

/// One local agent slot: its name and the `decodebench agent` flags that run it.
#[derive(Debug, Clone)]
pub struct AgentSlot {
    pub name: String,
    /// Everything after `decodebench`: `agent --coordinator ... --gpu N ...`.
    pub args: Vec<String>,
}

/// How the children are started and how often they may die.
#[derive(Debug, Clone)]
pub struct SupervisorConfig {
    /// This binary.
    pub exe: PathBuf,
    /// The log filter the children run with (the parent's `--log`).
    pub log: String,
    /// Restarts per slot before the slot is given up.
    pub max_restarts: u32,
    /// The exit code of an agent that could not start at all: not restarted.
    pub setup_failed_code: i32,
    /// Where to report each death (the embedded coordinator, which then loses the dead agent's
    /// lease at once instead of waiting for its timeout).
    pub exits: Option<mpsc::UnboundedSender<AgentExit>>,
}

/// How a slot ended.
#[derive(Debug, Clone)]
pub struct SlotOutcome {
    pub name: String,
    /// How each dead agent process ended ("killed by signal 6 (SIGABRT) after 12.3 s"), in order.
    pub deaths: Vec<String>,
    /// Set when the slot was given up (restarts used up, or the agent could not be started).
    pub gave_up: Option<String>,
}

impl SlotOutcome {
    pub fn restarts(&self) -> usize {
        self.deaths
            .len()
            .saturating_sub(usize::from(self.gave_up.is_some()))
    }
}

/// Runs the slot's agent until it exits cleanly (the coordinator drained it) or `stop` turns
/// true, restarting it each time it dies, at most `cfg.max_restarts` times.
pub async fn supervise(
    slot: AgentSlot,
    cfg: SupervisorConfig,
    mut stop: watch::Receiver<bool>,
) -> SlotOutcome {
    let mut out = SlotOutcome {
        name: slot.name.clone(),
        deaths: Vec::new(),
        gave_up: None,
    };
    let mut backoff = FIRST_BACKOFF;
    loop {
        if *stop.borrow() {
            return out;
        }
        let started = Instant::now();
        let mut child = match spawn(&slot, &cfg) {
            Ok(c) => c,
            Err(e) => {
                let why = format!(
                    "cannot start `{} agent`: {e}; was the binary moved or replaced during the \
                     run? Rerun, or pass --local-agents in-process",
                    cfg.exe.display()
                );
                tracing::error!(agent = %slot.name, "{why}");
                out.gave_up = Some(why);
                return out;
            }
        };
        let status = tokio::select! {
            s = child.wait() => s,
            _ = stopped(&mut stop) => {
                return finish(child, &slot.name, out).await;
            }
        };
        let uptime = started.elapsed();
        if !matches!(&status, Ok(s) if s.success()) {
            if let Some(tx) = &cfg.exits {
                let _ = tx.send(AgentExit {
                    name: slot.name.clone(),
                    at: Instant::now(),
                });
            }
        }
        let how = match status {
            Ok(s) if s.success() => return out,
            Ok(s) if s.code() == Some(cfg.setup_failed_code) => {
                let why = format!(
                    "its agent process could not start (exit code {}: see its error above); a \
                     restart would fail the same way, so this slot is given up",
                    cfg.setup_failed_code
                );
                tracing::error!(agent = %slot.name, "{why}");
                out.deaths.push(describe_exit(s, uptime));
                out.gave_up = Some(why);
                return out;
            }
            Ok(s) => describe_exit(s, uptime),
            Err(e) => format!(
                "could not be waited for ({e}) after {:.1} s",
                uptime.as_secs_f64()
            ),
        };
        if *stop.borrow() {
            return out;
        }
        out.deaths.push(how.clone());
        let restarts = out.deaths.len() as u32;
        if restarts > cfg.max_restarts {
            let why = format!(
                "its agent process died {restarts} times (last: {how}); --agent-restarts {} \
                 are used up, so this slot is given up. The journal keeps every result; fix the \
                 cause (see the agent's log above) and rerun with the same --out to finish",
                cfg.max_restarts
            );
            tracing::error!(agent = %slot.name, "{why}");
            out.gave_up = Some(why);
            return out;
        }
        if uptime >= HEALTHY_UPTIME {
            backoff = FIRST_BACKOFF;
        }
        tracing::warn!(
            agent = %slot.name,
            restart = restarts,
            of = cfg.max_restarts,
            "the agent process {how}; the case it was running is requeued or given up by the \
             coordinator; starting a fresh agent process in {:.0} s",
            backoff.as_secs_f64()
        );
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stopped(&mut stop) => return out,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Resolves once `stop` is true (or its sender is gone, which means the same).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

fn spawn(slot: &AgentSlot, cfg: &SupervisorConfig) -> std::io::Result<Child> {
    let mut cmd = Command::new(&cfg.exe);
    cmd.arg("--log")
        .arg(&cfg.log)
        .args(&slot.args)
        .stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::piped())
        // A terminal's Ctrl-C reaches `run` alone, which drains the agents through the
        // coordinator.
        .process_group(0)
        .kill_on_drop(true);
    // A `run` that is itself killed (SIGKILL, OOM) must not leave agents running on its GPUs,
    // where they would skew the timings of the next run: each child asks the kernel for SIGTERM
    // when its parent dies (it then stops at once, its coordinator being gone). The kernel sends
    // it when the spawning *thread* ends: this runs on a runtime worker thread, which lives as
    // long as the process (never on a blocking-pool thread, which may retire when idle).
    #[cfg(target_os = "linux")]
    {
        let parent = std::process::id();
        // SAFETY: the closure runs in the child between fork and exec and calls only
        // async-signal-safe functions (prctl, getppid, _exit), touching no memory of the parent.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The parent may have died before the request took effect.
                if libc::getppid() as u32 != parent {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
    }
    let mut child = cmd.spawn()?;
    if let Some(stderr) = child.stderr.take() {
        let name = slot.name.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                // Never a panic (eprintln! panics on a closed stderr): the pipe must keep
                // draining, or the agent would block on its next log line.
                use std::io::Write;
                let _ = writeln!(std::io::stderr().lock(), "[{name}] {line}");
            }
        });
    }
    Ok(child)
}

/// `run` is stopping: SIGTERM, then SIGKILL after [`TERM_GRACE`].
async fn finish(mut child: Child, name: &str, out: SlotOutcome) -> SlotOutcome {
    if let Some(pid) = child.id() {
        terminate(pid);
    }
    match tokio::time::timeout(TERM_GRACE, child.wait()).await {
        Ok(_) => {}
        Err(_) => {
            tracing::warn!(agent = %name, "the agent did not exit within {TERM_GRACE:?} of SIGTERM; killing it");
            let _ = child.kill().await;
        }
    }
    out
}

/// Sends SIGTERM to `pid` (a child of ours that has not been reaped, so the pid is still its).
fn terminate(pid: u32) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: kill(2) with a valid signal number has no memory effects; `pid` is an unreaped
    // child of this process, so it cannot name another process.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
}

/// "exited with code 1 after 3.2 s", "was killed by signal 6 (SIGABRT) after 12.0 s".
fn describe_exit(s: ExitStatus, uptime: Duration) -> String {
    use std::os::unix::process::ExitStatusExt;
    let after = format!("after {:.1} s", uptime.as_secs_f64());
    match (s.code(), s.signal()) {
        (Some(code), _) => format!("exited with code {code} {after}"),
        (None, Some(sig)) => format!("was killed by signal {sig} ({}) {after}", signal_name(sig)),
        _ => format!("ended ({s}) {after}"),
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGILL => "SIGILL",
        libc::SIGINT => "SIGINT",
        libc::SIGKILL => "SIGKILL, e.g. the OOM killer",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGTERM => "SIGTERM",
        _ => "a signal",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    #[test]
    fn exits_are_described_with_their_cause() {
        let d = describe_exit(ExitStatus::from_raw(6), Duration::from_millis(12_340));
        assert_eq!(d, "was killed by signal 6 (SIGABRT) after 12.3 s");
        let d = describe_exit(ExitStatus::from_raw(1 << 8), Duration::from_secs(3));
        assert_eq!(d, "exited with code 1 after 3.0 s");
    }

    /// A slot whose "agent" is a shell script (it ignores the flags it is given).
    fn script_slot(dir: &tempfile::TempDir, body: &str) -> (AgentSlot, SupervisorConfig) {
        use std::os::unix::fs::PermissionsExt;
        let exe = dir.path().join("fake-agent");
        std::fs::write(&exe, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        let slot = AgentSlot {
            name: "t".into(),
            args: vec!["agent".into()],
        };
        let cfg = SupervisorConfig {
            exe,
            log: "info".into(),
            max_restarts: 2,
            setup_failed_code: 6,
            exits: None,
        };
        (slot, cfg)
    }

    #[tokio::test]
    async fn a_dying_child_is_restarted_until_its_restarts_are_used_up() {
        let dir = tempfile::tempdir().unwrap();
        let (slot, mut cfg) = script_slot(&dir, "exit 3");
        let (exits_tx, mut exits) = mpsc::unbounded_channel();
        cfg.exits = Some(exits_tx);
        let (_tx, rx) = watch::channel(false);
        let t = Instant::now();
        let out = supervise(slot, cfg, rx).await;
        assert_eq!(out.deaths.len(), 3, "{out:?}");
        for _ in 0..3 {
            let e = exits.try_recv().expect("each death is reported");
            assert_eq!(e.name, "t");
        }
        assert!(exits.try_recv().is_err(), "three deaths, three reports");
        assert!(out.deaths[0].starts_with("exited with code 3"), "{out:?}");
        assert!(out
            .gave_up
            .as_deref()
            .unwrap()
            .contains("--agent-restarts 2"));
        assert_eq!(out.restarts(), 2);
        // Backoff 1 s, then 2 s, between the three deaths.
        assert!(t.elapsed() >= Duration::from_secs(3), "{:?}", t.elapsed());
    }

    #[tokio::test]
    async fn an_agent_that_cannot_start_is_not_restarted() {
        let dir = tempfile::tempdir().unwrap();
        let (slot, cfg) = script_slot(&dir, "exit 6");
        let (_tx, rx) = watch::channel(false);
        let out = supervise(slot, cfg, rx).await;
        assert_eq!(out.deaths.len(), 1, "{out:?}");
        assert!(out.gave_up.as_deref().unwrap().contains("could not start"));
        assert_eq!(out.restarts(), 0);
    }

    #[tokio::test]
    async fn a_clean_exit_ends_the_slot_without_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let (slot, cfg) = script_slot(&dir, "exit 0");
        let (_tx, rx) = watch::channel(false);
        let out = supervise(slot, cfg, rx).await;
        assert!(out.deaths.is_empty() && out.gave_up.is_none(), "{out:?}");
    }

    #[tokio::test]
    async fn a_stop_ends_a_running_child_and_is_not_a_death() {
        let dir = tempfile::tempdir().unwrap();
        let (slot, cfg) = script_slot(&dir, "exec sleep 60");
        let (tx, rx) = watch::channel(false);
        let task = tokio::spawn(supervise(slot, cfg, rx));
        tokio::time::sleep(Duration::from_millis(300)).await;
        let t = Instant::now();
        tx.send(true).unwrap();
        let out = task.await.unwrap();
        assert!(out.deaths.is_empty() && out.gave_up.is_none(), "{out:?}");
        assert!(
            t.elapsed() < TERM_GRACE,
            "SIGTERM should end the child at once"
        );
    }
}
