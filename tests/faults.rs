//! Faults injected into a running fleet: an agent killed mid-shard, a coordinator killed and
//! restarted, an agent frozen past its lease and thawed, SIGTERM to either side, a case that kills
//! every agent that runs it. Whatever happens, the files at the end hold every case exactly once.

use crate::util::*;
use decodebench_proto::wire;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

/// Cases per shard in these tests: a shard is several cases long, so "mid-shard" exists.
const SHARD_CASES: u64 = 4;
const SHARD_CASES_ARG: &str = "4";

/// The agent named `name` in a status, if registered.
fn agent_named<'a>(st: &'a wire::StatusResponse, name: &str) -> Option<&'a wire::AgentStatus> {
    st.agents.iter().find(|a| a.name == name && a.alive)
}

/// True when `name` holds a lease of its first shard, has reported part of it, and has at least one
/// case left after the one it is running (so there is something to hand back or to lose).
fn mid_first_shard(st: &wire::StatusResponse, name: &str) -> bool {
    agent_named(st, name).is_some_and(|a| {
        !a.current_lease.is_empty() && a.results > 0 && a.results + 2 <= SHARD_CASES
    })
}

/// A coordinator with shards of [`SHARD_CASES`], leases that expire after `lease_s` seconds
/// without a heartbeat, agents told to beat every `heartbeat_s`, and `extra` flags.
fn fault_coordinator(
    s: &Scratch,
    grid: &Path,
    port: u16,
    (lease_s, heartbeat_s): (&str, &str),
    extra: &[&str],
) -> Proc {
    let mut flags = vec![
        "--lease-timeout-s",
        lease_s,
        "--heartbeat-s",
        heartbeat_s,
        "--shard-cases",
        SHARD_CASES_ARG,
    ];
    flags.extend_from_slice(extra);
    coordinator(s, "coordinator", grid, port, &flags)
}

/// Waits until agent `name` is half-way through its first shard ([`mid_first_shard`]).
fn wait_mid_first_shard(probe: &StatusProbe, name: &str) -> wire::StatusResponse {
    probe.wait_for(
        Duration::from_secs(60),
        &format!("{name} to be half-way through a shard"),
        |st| mid_first_shard(st, name),
    )
}

#[test]
fn a_killed_agents_cases_finish_on_other_agents() {
    let _serial = exclusive();
    let s = Scratch::new("kill-agent");
    let grid = s.grid(&GridSpec::slow());
    let ids = grid_case_ids(&grid);
    let port = free_port();
    let mut coord = fault_coordinator(&s, &grid, port, ("2", "0.5"), &[]);
    let probe = StatusProbe::new(port);
    let mut victim = agent(&s, "victim", port, &[]);
    let st = wait_mid_first_shard(&probe, "victim");
    victim.kill9();
    let victim_id = agent_named(&st, "victim")
        .map(|a| a.agent_id.clone())
        .unwrap_or_default();

    // Its lease expires (2 s without a heartbeat) and its cases go back in the queue.
    let st = probe.wait_for(
        Duration::from_secs(20),
        "the victim's lease to expire",
        |st| st.leases_expired >= 1,
    );
    assert!(st.done < st.total, "the grid is not done yet: {st:?}");

    let mut others = [
        agent(&s, "rescuer-a", port, &[]),
        agent(&s, "rescuer-b", port, &[]),
    ];
    coord.wait_success(Duration::from_secs(120));
    for a in others.iter_mut() {
        a.wait_success(Duration::from_secs(20));
    }
    let rows = assert_each_case_once(&s.out(), &ids);
    let by_victim: BTreeSet<&str> = rows
        .iter()
        .filter(|r| r.agent_id == victim_id)
        .map(|r| r.case_id.as_str())
        .collect();
    assert!(
        by_victim.len() < ids.len(),
        "the victim ({victim_id}) cannot have finished everything"
    );
}

#[test]
fn a_restarted_coordinator_resumes_from_its_journal() {
    let _serial = exclusive();
    let s = Scratch::new("kill-coordinator");
    let grid = s.grid(&GridSpec::slow());
    let ids = grid_case_ids(&grid);
    let port = free_port();
    let flags = [
        "--lease-timeout-s",
        "5",
        "--heartbeat-s",
        "1",
        "--shard-cases",
        "2",
    ];
    let mut first = coordinator(&s, "coordinator-1", &grid, port, &flags);
    let probe = StatusProbe::new(port);
    let mut agents = [
        agent(&s, "agent-a", port, &["--connect-timeout-s", "60"]),
        agent(&s, "agent-b", port, &["--connect-timeout-s", "60"]),
    ];
    let before = probe.wait_for(
        Duration::from_secs(90),
        "a third of the grid to be done",
        |st| st.done * 3 >= st.total && st.done < st.total,
    );
    first.kill9();
    let killed_at_ms = now_unix_ms();
    assert!(!first.is_running());

    // The agents keep retrying while it is down.
    std::thread::sleep(Duration::from_millis(1500));
    for a in agents.iter_mut() {
        assert!(
            a.is_running(),
            "{} gave up while the coordinator was down:\n{}",
            a.name,
            a.log_tail()
        );
    }
    let mut second = coordinator(&s, "coordinator-2", &grid, port, &flags);
    second.wait_success(Duration::from_secs(120));
    for a in agents.iter_mut() {
        a.wait_success(Duration::from_secs(30));
    }

    let rows = assert_each_case_once(&s.out(), &ids);
    // What the first coordinator had journaled survived, with its original receipt time: the
    // second one did not run those cases again.
    let kept: BTreeSet<&str> = rows
        .iter()
        .filter(|r| r.received_unix_ms <= killed_at_ms)
        .map(|r| r.case_id.as_str())
        .collect();
    assert!(
        kept.len() as u64 >= before.done,
        "{} cases were done before the kill but only {} results predate it: the journal was not \
         resumed",
        before.done,
        kept.len()
    );
    // Each agent counts the results the coordinators accepted from it; a case re-run and accepted
    // twice would push the total past the grid size. A result the first coordinator journaled but
    // was killed before acknowledging is sent again and the second one, which resumed it from the
    // journal, answers "duplicate": so accepted plus duplicates covers the grid, and accepted alone
    // may fall short of it (CI saw 11 + 1 of 12 once).
    let (_, accepted, duplicates, _) = summary_totals(&agents);
    let cases = ids.len() as u64;
    assert!(
        accepted <= cases,
        "{accepted} results accepted for {cases} cases: some case was accepted twice"
    );
    assert!(
        accepted + duplicates >= cases,
        "{accepted} accepted and {duplicates} duplicates for {cases} cases: some result was lost"
    );
}

#[test]
fn a_frozen_agents_late_results_are_counted_once() {
    let _serial = exclusive();
    let s = Scratch::new("sigstop-agent");
    let grid = s.grid(&GridSpec::slow());
    let ids = grid_case_ids(&grid);
    let port = free_port();
    // --keep-serving: the coordinator is still there when the frozen agent wakes up.
    let mut coord = fault_coordinator(&s, &grid, port, ("2", "0.5"), &["--keep-serving"]);
    let probe = StatusProbe::new(port);
    let mut frozen = agent(&s, "frozen", port, &[]);
    // Freeze it half-way through its first shard (re-check after the freeze: a report may have
    // been in flight).
    let mut attempts = 0;
    loop {
        wait_mid_first_shard(&probe, "frozen");
        frozen.signal("STOP");
        std::thread::sleep(Duration::from_millis(200));
        if probe.get().is_some_and(|st| mid_first_shard(&st, "frozen")) {
            break;
        }
        frozen.signal("CONT");
        attempts += 1;
        assert!(attempts < 5, "could not freeze the agent mid-shard");
    }
    probe.wait_for(
        Duration::from_secs(20),
        "the frozen agent's lease to expire",
        |st| st.leases_expired >= 1,
    );
    let mut rescuer = agent(&s, "rescuer", port, &[]);
    probe.wait_for(
        Duration::from_secs(120),
        "the rescuer to finish the grid",
        |st| st.done == st.total,
    );
    // Thaw: it finishes the case it was running and reports it; that case was already done.
    frozen.signal("CONT");
    frozen.wait_success(Duration::from_secs(30));
    rescuer.wait_success(Duration::from_secs(30));
    let (_, _, duplicates, _) = agent_summary(&frozen.log()).unwrap_or_else(|| {
        panic!(
            "no closing summary from the frozen agent:\n{}",
            frozen.log_tail()
        )
    });
    assert!(
        duplicates >= 1,
        "the thawed agent's late result should be a duplicate"
    );

    coord.signal("TERM");
    coord.wait_success(Duration::from_secs(30));
    assert_each_case_once(&s.out(), &ids);
}

#[test]
fn sigterm_to_the_coordinator_writes_what_was_gathered() {
    let _serial = exclusive();
    let s = Scratch::new("sigterm-coordinator");
    let grid = s.grid(&GridSpec::slow());
    let ids = grid_case_ids(&grid);
    let port = free_port();
    let mut coord = coordinator(&s, "coordinator", &grid, port, &["--shard-cases", "2"]);
    let probe = StatusProbe::new(port);
    // A long connect timeout: the agent must leave because it was told to drain, not because it
    // gave up on a coordinator that went away.
    let mut agent_proc = agent(&s, "agent", port, &["--connect-timeout-s", "120"]);
    let before = probe.wait_for(
        Duration::from_secs(90),
        "some of the grid to be done",
        |st| st.done >= 2 && st.done + 4 <= st.total,
    );
    coord.signal("TERM");
    let status = coord.wait(Duration::from_secs(30));
    // The drain order reaches the agent mid-shard (heartbeat or report): it finishes its case,
    // hands the rest back and exits 0.
    agent_proc.wait_success(Duration::from_secs(20));
    assert!(
        !status.success(),
        "an interrupted run with cases left must exit non-zero; log:\n{}",
        coord.log_tail()
    );
    let log = coord.log();
    assert!(
        log.contains("without a result"),
        "the exit summary should say how many cases have no result:\n{}",
        coord.log_tail()
    );
    let out = s.out();
    assert!(
        temp_files(&out).is_empty(),
        "temporary files left: {:?}",
        temp_files(&out)
    );
    let rows = read_parquet(&out).unwrap_or_else(|e| panic!("{e:#}"));
    check_each_case_at_most_once(&rows, &ids).unwrap_or_else(|e| panic!("{e:#}"));
    let cases: BTreeSet<&str> = rows.iter().map(|r| r.case_id.as_str()).collect();
    assert!(
        cases.len() as u64 >= before.done,
        "{} cases were done before SIGTERM but only {} are in results.parquet",
        before.done,
        cases.len()
    );
    assert!(
        cases.len() < ids.len(),
        "the run was interrupted before the end"
    );
    // The reference CSV was written too, from the same records.
    let reference =
        std::fs::read_to_string(reference_csv(&out)).expect("reading the reference CSV");
    assert_eq!(
        reference.lines().filter(|l| !l.is_empty()).count(),
        cases.len() + 1
    );
}

#[test]
fn sigterm_to_an_agent_finishes_its_case_and_hands_its_lease_back() {
    let _serial = exclusive();
    let s = Scratch::new("sigterm-agent");
    let grid = s.grid(&GridSpec::slow());
    let ids = grid_case_ids(&grid);
    let port = free_port();
    // A lease that would take a minute to expire: only a hand-back lets the grid finish in time.
    let mut coord = fault_coordinator(&s, &grid, port, ("60", "1"), &[]);
    let probe = StatusProbe::new(port);
    let mut leaving = agent(&s, "leaving", port, &[]);
    wait_mid_first_shard(&probe, "leaving");
    leaving.signal("TERM");
    leaving.wait_success(Duration::from_secs(30));
    let (run, accepted, _, handed_back) = agent_summary(&leaving.log())
        .unwrap_or_else(|| panic!("no closing summary from the agent:\n{}", leaving.log_tail()));
    assert_eq!(
        run, accepted,
        "the case it was running when told to stop was finished and reported"
    );
    assert!(
        handed_back >= 1,
        "the rest of its shard should have been handed back"
    );
    let st = probe.get().expect("the coordinator is still up");
    assert_eq!(
        st.running, 0,
        "nothing is leased once the agent handed its lease back: {st:?}"
    );
    assert_eq!(st.leases_expired, 0, "the lease was returned, not expired");

    let mut next = agent(&s, "next", port, &[]);
    coord.wait_success(Duration::from_secs(45));
    next.wait_success(Duration::from_secs(20));
    assert_each_case_once(&s.out(), &ids);
}

#[test]
fn an_agent_id_from_before_a_restart_is_not_taken_for_another_agent() {
    let _serial = exclusive();
    let s = Scratch::new("stale-agent-id");
    let grid = s.grid(&GridSpec::tiny());
    let ids = grid_case_ids(&grid);
    let port = free_port();
    let mut first = coordinator(&s, "coordinator-1", &grid, port, &["--keep-serving"]);
    wait_for_listener(port, Duration::from_secs(30));
    let rt = test_runtime();
    let register = |name: &str| -> String {
        rt.block_on(async {
            let mut c = connect(port).await;
            c.register(cpu_register_request(name))
                .await
                .expect("register")
                .into_inner()
                .agent_id
        })
    };
    let lease = |agent_id: &str| {
        rt.block_on(async {
            let mut c = connect(port).await;
            c.lease(wire::LeaseRequest {
                agent_id: agent_id.into(),
            })
            .await
        })
    };
    let x_before = register("x");
    let _y_before = register("y");
    first.kill9();

    let mut second = coordinator(&s, "coordinator-2", &grid, port, &["--keep-serving"]);
    wait_for_listener(port, Duration::from_secs(30));
    // y notices the restart first and registers again; x is still using its old id.
    let y_after = register("y");
    let err = match lease(&x_before) {
        Ok(_) => panic!(
            "x's id from the previous coordinator ({x_before}) was accepted by the new one, which \
             gave that id to y ({y_after}): x would act as y (its results recorded as y's device)"
        ),
        Err(e) => e,
    };
    assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
    // y's new id works (a heartbeat without a lease, so that y takes no shard it would sit on).
    let y_heartbeat = rt.block_on(async {
        let mut c = connect(port).await;
        c.heartbeat(wire::HeartbeatRequest {
            agent_id: y_after.clone(),
            lease_id: String::new(),
            current_case_id: String::new(),
        })
        .await
    });
    assert!(y_heartbeat.is_ok(), "y's new id works: {y_heartbeat:?}");
    assert!(second.is_running());

    // The restarted coordinator still finishes the grid with a real agent.
    let mut a = agent(&s, "agent", port, &[]);
    StatusProbe::new(port).wait_for(Duration::from_secs(90), "the grid to be done", |st| {
        st.done == st.total
    });
    a.wait_success(Duration::from_secs(30));
    second.signal("TERM");
    second.wait_success(Duration::from_secs(30));
    assert_each_case_once(&s.out(), &ids);
}

/// Exit code of a run that ends with failed cases or cases without a result (`EXIT_INCOMPLETE`).
const EXIT_INCOMPLETE: i32 = 2;

/// One row of `results.csv`, by column name.
type CsvRow = BTreeMap<String, String>;

/// Reads `results.csv` from an output directory, one map from column name to cell per row.
fn read_results_csv(out: &Path) -> Vec<CsvRow> {
    let path = out.join("results.csv");
    let mut reader =
        csv::Reader::from_path(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let headers = reader.headers().expect("results.csv header").clone();
    reader
        .records()
        .map(|r| {
            let r = r.expect("a results.csv record");
            headers
                .iter()
                .zip(r.iter())
                .map(|(h, v)| (h.to_string(), v.to_string()))
                .collect()
        })
        .collect()
}

/// An agent the poisoned-case drill killed: its id, and its lease's cases without a result when it
/// was killed (the poisoned one first).
struct Killed {
    agent_id: String,
    lease_cases: Vec<String>,
}

/// One round of the poisoned-case drill, on the status `st` of the coordinator on `port`: every
/// agent that starts running `poison` (the first of its lease's cases without a result) is
/// `kill -9`ed and added to `killed`, as if the case crashed it; when `replace` and no agent is
/// left, a new one is started, as Kubernetes restarts a crashed pod.
///
/// A case leaves its lease's list as soon as its report arrives, before it is journaled; until
/// then it counts as running but is in no lease. While one is (every running case is not in some
/// lease), the agent that sent it is still waiting for the answer, not running the next case:
/// the round waits, so that the kill lands on an agent running `poison`, not on one whose report
/// is in flight.
fn poison_drill_round(
    s: &Scratch,
    port: u16,
    st: &wire::StatusResponse,
    agents: &mut Vec<Proc>,
    poison: &str,
    killed: &mut Vec<Killed>,
    replace: bool,
) {
    let leased: u64 = st
        .agents
        .iter()
        .map(|a| a.lease_case_ids.len() as u64)
        .sum();
    let reports_in_flight = st.running > leased;
    for a in st.agents.iter().filter(|a| a.alive && !reports_in_flight) {
        if a.lease_case_ids.first().map(String::as_str) != Some(poison) {
            continue;
        }
        // A killed agent stays in the status (alive) until its lease expires: once is enough.
        if let Some(p) = agents.iter_mut().find(|p| p.name == a.name) {
            if p.is_running() {
                p.kill9();
                killed.push(Killed {
                    agent_id: a.agent_id.clone(),
                    lease_cases: a.lease_case_ids.clone(),
                });
            }
        }
    }
    if replace && !st.finished && !agents.iter_mut().any(|p| p.is_running()) {
        let name = format!("agent-{}", agents.len());
        agents.push(agent(s, &name, port, &[]));
    }
}

/// After the coordinator of a poison drill has exited: every agent still running exits by itself,
/// cleanly, having heard that the run is over. A replacement started as the run was ending may
/// have registered in the coordinator's last moments; it was then told in its Register answer
/// (the coordinator keeps serving until each agent it registered has heard it). Only one that
/// never reached the coordinator (started as it stopped) cannot have been told anything: that one
/// is stopped with SIGTERM, and must stop cleanly.
fn finish_replacements(agents: &mut [Proc]) {
    for a in agents.iter_mut() {
        if !a.is_running() {
            continue;
        }
        if !a.log().contains("registered with the coordinator") {
            a.signal("TERM");
            a.wait_success(Duration::from_secs(20));
            assert!(
                a.log()
                    .contains("stop requested before this agent could register"),
                "{} never registered, and says so when stopped:\n{}",
                a.name,
                a.log_tail()
            );
            continue;
        }
        let what = format!(
            "{} to exit by itself: it registered with the coordinator, which must have told it \
             that the run is over before it stopped serving (else the agent retries the gone \
             coordinator until its connect timeout)",
            a.name
        );
        wait_until(Duration::from_secs(20), &what, || !a.is_running());
        a.wait_success(Duration::from_secs(1));
        assert!(
            a.log().contains("coordinator says drain"),
            "{} exited without being told to drain:\n{}",
            a.name,
            a.log_tail()
        );
    }
}

/// Waits for the first agent to hold a shard with 3 cases or more left, and returns the one after
/// the case it is running: the case the drill poisons, with at least one more after it in the
/// same shard (returned too: a shard-mate that must not pay for it).
fn pick_poison(probe: &StatusProbe) -> (String, String) {
    let st = probe.wait_for(
        Duration::from_secs(60),
        "the first agent to hold a shard with 3 cases or more left",
        |st| agent_named(st, "agent-0").is_some_and(|a| a.lease_case_ids.len() >= 3),
    );
    let first_shard = agent_named(&st, "agent-0")
        .map(|a| a.lease_case_ids.clone())
        .unwrap_or_default();
    (first_shard[1].clone(), first_shard[2].clone())
}

/// Five cases of one KV pool: a first shard of four, then one.
fn poison_grid_spec(name: &str) -> GridSpec {
    GridSpec {
        name: name.into(),
        batch_sizes: vec![1, 2, 3, 4, 5],
        max_seq_lens: vec![256],
        quant_modes: vec!["bf16/bf16/bf16"],
        ..GridSpec::slow()
    }
}

/// Checks the outputs of a run whose `poison` was given up after the agents `killed` died with
/// it: every case has its rows, only the poisoned one failed, and its message and columns say
/// why.
fn check_poisoned_outputs(out: &Path, ids: &BTreeSet<String>, poison: &str, killed: &[Killed]) {
    let rows = read_parquet(out).unwrap_or_else(|e| panic!("{e:#}"));
    check_each_case_at_most_once(&rows, ids).unwrap_or_else(|e| panic!("{e:#}"));
    let seen: BTreeSet<&str> = rows.iter().map(|r| r.case_id.as_str()).collect();
    assert_eq!(seen.len(), ids.len(), "every case has a result: {seen:?}");
    for r in &rows {
        let expected = if r.case_id == poison { "failed" } else { "ok" };
        assert_eq!(
            r.status.as_deref(),
            Some(expected),
            "case {} kernel {:?} (poisoned: {poison})",
            r.case_id,
            r.kernel
        );
    }
    let ids_killed: Vec<&str> = killed.iter().map(|k| k.agent_id.as_str()).collect();
    let csv_rows = read_results_csv(out);
    let poisoned: Vec<&CsvRow> = csv_rows.iter().filter(|r| r["case_id"] == poison).collect();
    assert_eq!(poisoned.len(), KERNELS.len(), "one row per kernel");
    for r in poisoned {
        let message = &r["message"];
        assert_eq!(r["status"], "failed");
        assert!(
            message.starts_with(&format!("lost {} times", killed.len()))
                && message.contains("stopped without reporting")
                && message.contains("may crash the agent")
                && ids_killed.iter().all(|id| message.contains(id)),
            "the message should say the case was lost with agents {ids_killed:?}: {message}"
        );
        assert_eq!(
            Some(r["agent_id"].as_str()),
            ids_killed.last().copied(),
            "recorded on the agent it was last lost with"
        );
        assert_eq!(r["attempt"], killed.len().to_string(), "every try was lost");
    }
}

/// A nightly job's nightmare: one case crashes every agent that runs it (segfault, OOM kill), so
/// no result ever comes back and its lease expires each time. Here every agent is `kill -9`ed as
/// soon as it starts that case, and a replacement started, as Kubernetes restarts a crashed pod.
/// After `--max-attempts` losses the coordinator must give the case up and record the failure
/// itself, with a message that says so; its shard-mates (one reported before the crash, one
/// leased with it) must still finish; the run must end with the failure exit code; a resume must
/// keep the failure and `--retry-failed` run it again.
#[test]
fn a_case_that_kills_every_agent_running_it_is_recorded_as_failed() {
    let _serial = exclusive();
    let s = Scratch::new("poisoned-case");
    let grid = s.grid(&poison_grid_spec("it-poison"));
    let ids = grid_case_ids(&grid);
    let port = free_port();
    let mut coord = fault_coordinator(&s, &grid, port, ("2", "0.5"), &["--max-attempts", "2"]);
    let probe = StatusProbe::new(port);
    let mut agents = vec![agent(&s, "agent-0", port, &[])];
    let (poison, _) = pick_poison(&probe);

    // Kill whoever starts running it; keep one agent up while the run lasts.
    let mut killed: Vec<Killed> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while coord.is_running() {
        assert!(
            Instant::now() < deadline,
            "the run did not end; killed so far: {:?}; last status: {:?}",
            killed.iter().map(|k| &k.agent_id).collect::<Vec<_>>(),
            probe.get()
        );
        if let Some(st) = probe.get() {
            poison_drill_round(&s, port, &st, &mut agents, &poison, &mut killed, true);
        }
        std::thread::sleep(POLL_PERIOD);
    }
    let status = coord.wait(Duration::from_secs(5));
    assert_eq!(
        status.code(),
        Some(EXIT_INCOMPLETE),
        "a run with a failed case exits {EXIT_INCOMPLETE}; log:\n{}",
        coord.log_tail()
    );
    assert_eq!(
        killed.len(),
        2,
        "--max-attempts 2: the case is given up after its second loss"
    );
    // The one left (if it got as far as registering) was told to drain.
    finish_replacements(&mut agents);
    assert!(
        coord.log().contains("1 unit(s) failed after every attempt"),
        "the exit summary counts the given-up case as failed:\n{}",
        coord.log_tail()
    );

    // Every case has its rows; only the poisoned one failed, and it says why.
    let out = s.out();
    check_poisoned_outputs(&out, &ids, &poison, &killed);

    // A resume keeps the failure (nothing to run, so it ends at once, failing again).
    let mut resumed = coordinator(&s, "coordinator-resume", &grid, port, &[]);
    let status = resumed.wait(Duration::from_secs(30));
    assert_eq!(
        status.code(),
        Some(EXIT_INCOMPLETE),
        "the journaled failure still fails the run; log:\n{}",
        resumed.log_tail()
    );
    // --retry-failed runs it again; here it does not crash, and the run is complete.
    let port = free_port();
    let mut retry = coordinator(&s, "coordinator-retry", &grid, port, &["--retry-failed"]);
    let mut last = agent(&s, "agent-retry", port, &[]);
    retry.wait_success(Duration::from_secs(60));
    last.wait_success(Duration::from_secs(20));
    let (run, _, _, _) = agent_summary(&last.log())
        .unwrap_or_else(|| panic!("no closing summary from the agent:\n{}", last.log_tail()));
    assert_eq!(run, 1, "only the failed case runs again");
    assert_each_case_once(&out, &ids);
}

/// The poisoned-case drill with the coordinator itself killed (`kill -9`, as a node failure or an
/// evicted pod) and restarted on its journal between the case's two losses. The first loss was
/// journaled, so the restarted coordinator still runs the case alone and gives it up after its
/// second loss: two in all with `--max-attempts 2`, not two more after every restart (which, with
/// a Deployment restarting the coordinator, could go on for ever).
#[test]
fn a_case_that_kills_agents_is_given_up_across_a_coordinator_restart() {
    let _serial = exclusive();
    let s = Scratch::new("poisoned-case-restart");
    let grid = s.grid(&poison_grid_spec("it-poison-restart"));
    let ids = grid_case_ids(&grid);
    let out = s.out();
    let flags = [
        "--lease-timeout-s",
        "2",
        "--heartbeat-s",
        "0.5",
        "--shard-cases",
        SHARD_CASES_ARG,
        "--max-attempts",
        "2",
    ];
    let port = free_port();
    let mut first = coordinator(&s, "coordinator-1", &grid, port, &flags);
    let probe = StatusProbe::new(port);
    let mut agents = vec![agent(&s, "agent-0", port, &[])];
    let (poison, leased_with_it) = pick_poison(&probe);

    // The first agent dies as it starts the poisoned case; no other takes its place yet.
    let mut killed: Vec<Killed> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while killed.is_empty() {
        assert!(
            Instant::now() < deadline,
            "agent-0 never started {poison}; last status: {:?}",
            probe.get()
        );
        if let Some(st) = probe.get() {
            poison_drill_round(&s, port, &st, &mut agents, &poison, &mut killed, false);
        }
        std::thread::sleep(POLL_PERIOD);
    }
    // Its lease expires (2 s) and the loss is journaled; then the coordinator dies too.
    wait_until(
        Duration::from_secs(20),
        "the first loss of the poisoned case to be journaled",
        || !journaled_losses(&out, &poison).is_empty(),
    );
    first.kill9();
    let before = journaled_losses(&out, &poison);
    assert_eq!(
        before.iter().map(|(a, _)| a.as_str()).collect::<Vec<_>>(),
        [killed[0].agent_id.as_str()]
    );
    // The agent's heartbeat named the case as it started it: its shard-mate after it never
    // started and was not charged (unless the kill beat that heartbeat: then every case of the
    // lease without a result was, as "shard").
    if before[0].1 == "running" {
        assert!(
            journaled_losses(&out, &leased_with_it).is_empty(),
            "{leased_with_it} never started: {:?}",
            journal_events(&out)
        );
    } else {
        assert_eq!(before[0].1, "shard", "{:?}", journal_events(&out));
    }

    // A new coordinator resumes the journal; agents come and the drill goes on.
    let port = free_port();
    let mut second = coordinator(&s, "coordinator-2", &grid, port, &flags);
    let probe = StatusProbe::new(port);
    let deadline = Instant::now() + Duration::from_secs(120);
    while second.is_running() {
        assert!(
            Instant::now() < deadline,
            "the resumed run did not end; killed so far: {:?}; last status: {:?}",
            killed.iter().map(|k| &k.agent_id).collect::<Vec<_>>(),
            probe.get()
        );
        if let Some(st) = probe.get() {
            poison_drill_round(&s, port, &st, &mut agents, &poison, &mut killed, true);
        }
        std::thread::sleep(POLL_PERIOD);
    }
    let status = second.wait(Duration::from_secs(5));
    assert_eq!(
        status.code(),
        Some(EXIT_INCOMPLETE),
        "a run with a failed case exits {EXIT_INCOMPLETE}; log:\n{}",
        second.log_tail()
    );
    let log = second.log();
    assert!(
        log.contains("resuming the losses the journal holds"),
        "the restarted coordinator says it resumed the loss:\n{}",
        second.log_tail()
    );
    assert_eq!(
        killed.len(),
        2,
        "--max-attempts 2 across the restart: given up after its second loss in all, the first \
         before the restart: {:?}",
        killed.iter().map(|k| &k.agent_id).collect::<Vec<_>>()
    );
    assert_eq!(
        killed[1].lease_cases,
        std::slice::from_ref(&poison),
        "after the restart the case lost once still runs alone"
    );
    finish_replacements(&mut agents);
    check_poisoned_outputs(&out, &ids, &poison, &killed);
    let after: Vec<String> = journaled_losses(&out, &poison)
        .into_iter()
        .map(|(a, _)| a)
        .collect();
    let expected: Vec<String> = killed.iter().map(|k| k.agent_id.clone()).collect();
    assert_eq!(after, expected, "both losses are in the journal");
}

/// A case whose kernel fails every time it runs (here the agent's `DECODEBENCH_FAILPOINT=fail:`
/// reports it failed), with the coordinator `kill -9`ed and restarted on its journal after the
/// first failed attempt was answered. That attempt was journaled before its answer, so the
/// restarted coordinator goes on counting: the case ends failed after `--max-attempts 3` attempts
/// in all, not 3 more after every restart (which, with a Deployment restarting the coordinator,
/// could go on for ever), and its failed record lists the error of the attempt before the
/// restart too.
/// Coordinator flags of the failing-case restart tests, `--max-attempts` aside: short leases and
/// heartbeats, and shards of several cases.
fn failing_run_flags(max_attempts: &str) -> [&str; 8] {
    [
        "--lease-timeout-s",
        "2",
        "--heartbeat-s",
        "0.5",
        "--shard-cases",
        SHARD_CASES_ARG,
        "--max-attempts",
        max_attempts,
    ]
}

/// A `fail:CASE` run stopped right after its first failed attempt: a coordinator with
/// `--max-attempts 3` is killed with SIGKILL once that attempt is journaled and answered, while
/// the agent still runs the rest of its shard. The agent stays up and reconnects to the next
/// coordinator on `port`.
struct FirstAttemptFailed {
    grid: std::path::PathBuf,
    ids: BTreeSet<String>,
    failing: String,
    out: std::path::PathBuf,
    port: u16,
    agent: Proc,
    /// The journaled failed attempts of `failing` when the coordinator was killed: attempt 1.
    before: Vec<JournaledFailedAttempt>,
}

impl FirstAttemptFailed {
    /// A second coordinator on the same journal with `--max-attempts max_attempts`: waits for the
    /// run to end with a failed case (exit 2) and for the agent to exit cleanly, and returns the
    /// coordinator's process for its log.
    fn resume(&mut self, s: &Scratch, max_attempts: &str) -> Proc {
        let flags = failing_run_flags(max_attempts);
        let mut second = coordinator(s, "coordinator-2", &self.grid, self.port, &flags);
        let status = second.wait(Duration::from_secs(60));
        assert_eq!(
            status.code(),
            Some(EXIT_INCOMPLETE),
            "a run with a failed case exits {EXIT_INCOMPLETE}; log:\n{}",
            second.log_tail()
        );
        self.agent.wait_success(Duration::from_secs(30));
        second
    }

    /// The run's final files: every case has exactly one result; the results.csv rows.
    fn final_rows(&self) -> Vec<CsvRow> {
        let rows = read_parquet(&self.out).unwrap_or_else(|e| panic!("{e:#}"));
        check_each_case_at_most_once(&rows, &self.ids).unwrap_or_else(|e| panic!("{e:#}"));
        let seen: BTreeSet<&str> = rows.iter().map(|r| r.case_id.as_str()).collect();
        assert_eq!(
            seen.len(),
            self.ids.len(),
            "every case has a result: {seen:?}"
        );
        read_results_csv(&self.out)
    }
}

fn first_attempt_failed_then_coordinator_killed(
    s: &Scratch,
    grid_name: &str,
) -> FirstAttemptFailed {
    let grid = s.grid(&poison_grid_spec(grid_name));
    let ids = grid_case_ids(&grid);
    // The first case of the grid's one KV pool: the first case of the first shard, so that after
    // its failure the agent runs the three slow cases of its shard before it can get it again.
    let failing = grid_case_ids_in_order(&grid)[0].clone();
    let out = s.out();
    let port = free_port();
    let mut first = coordinator(s, "coordinator-1", &grid, port, &failing_run_flags("3"));
    let probe = StatusProbe::new(port);
    let drill = format!("fail:{failing}");
    let agent = agent_with_env(
        s,
        "agent-0",
        port,
        &["--connect-timeout-s", "60"],
        &[("DECODEBENCH_FAILPOINT", &drill)],
    );

    // The first failed attempt is journaled and answered (the case left the agent's lease),
    // while the agent still runs the rest of its shard: it cannot have been retried yet.
    probe.wait_for(
        Duration::from_secs(60),
        "the first failed attempt to be journaled and answered, mid-shard",
        |st| {
            !journaled_failed_attempts(&out, &failing).is_empty()
                && agent_named(st, "agent-0").is_some_and(|a| {
                    !a.lease_case_ids.is_empty() && !a.lease_case_ids.contains(&failing)
                })
        },
    );
    first.kill9();
    let before = journaled_failed_attempts(&out, &failing);
    assert_eq!(
        before.iter().map(|a| a.attempt).collect::<Vec<_>>(),
        [1],
        "one failed attempt before the restart: {before:?}"
    );
    assert!(
        before[0].errors.len() == 1
            && before[0].errors[0].starts_with(&format!("attempt 1 on {} (", before[0].agent_id))
            && before[0].errors[0].contains("optimized: injected failure"),
        "{before:?}"
    );
    FirstAttemptFailed {
        grid,
        ids,
        failing,
        out,
        port,
        agent,
        before,
    }
}

#[test]
fn a_failing_case_keeps_its_attempts_and_errors_across_a_coordinator_restart() {
    let _serial = exclusive();
    let s = Scratch::new("failing-case-restart");
    let mut run = first_attempt_failed_then_coordinator_killed(&s, "it-failing-restart");
    let (failing, out, before) = (run.failing.clone(), run.out.clone(), run.before.clone());
    let first_agent_id = before[0].agent_id.clone();

    // The same agent reconnects to a new coordinator on the same journal, and the run ends.
    let second = run.resume(&s, "3");
    assert!(
        second
            .log()
            .contains("resuming the failed attempts the journal holds"),
        "the restarted coordinator says it resumed the failed attempt:\n{}",
        second.log_tail()
    );

    // Attempts 1 and 2 were journaled as failed attempts, attempt 3 is the failed record.
    let after = journaled_failed_attempts(&out, &failing);
    assert_eq!(
        after.iter().map(|a| a.attempt).collect::<Vec<_>>(),
        [1, 2],
        "2 failed attempts in all, then the final one: {after:?}"
    );
    assert_eq!(
        after[0], before[0],
        "the attempt before the restart is kept"
    );
    assert_ne!(
        after[1].agent_id, first_agent_id,
        "a new coordinator, a new id"
    );
    let csv_rows = run.final_rows();
    for r in &csv_rows {
        let expected = match (r["case_id"] == failing, r["kernel"].as_str()) {
            (false, _) => "ok",
            (true, "optimized") => "failed",
            (true, _) => "skipped",
        };
        assert_eq!(r["status"], expected, "{r:?}");
    }
    let failed: Vec<&CsvRow> = csv_rows
        .iter()
        .filter(|r| r["case_id"] == failing && r["kernel"] == "optimized")
        .collect();
    assert_eq!(failed.len(), 1, "{csv_rows:?}");
    let (message, attempt) = (&failed[0]["message"], &failed[0]["attempt"]);
    assert_eq!(
        attempt, "3",
        "3 attempts in all, not 3 more after the restart"
    );
    assert!(
        message.starts_with("failed after 3 attempts: ")
            && message.contains(&before[0].errors[0])
            && message.contains(&after[1].errors[0])
            && message.contains("attempt 3 on ")
            && message.matches("injected failure").count() == 3,
        "the failed record lists every attempt's error, the one before the restart first: \
         {message}"
    );
}

/// A run resumed with a lower `--max-attempts` than its journaled failed attempts were reported
/// under: the case whose attempts already reach the new limit is recorded failed at once, with
/// their errors and what to do, and is not run again; every other case runs as usual.
#[test]
fn a_run_resumed_with_fewer_attempts_fails_a_case_whose_attempts_reach_them_without_running_it() {
    let _serial = exclusive();
    let s = Scratch::new("failing-case-lowered-attempts");
    let mut run = first_attempt_failed_then_coordinator_killed(&s, "it-failing-lowered");
    let (failing, before) = (run.failing.clone(), run.before.clone());
    run.resume(&s, "1");

    // Nothing ran it again: the journal holds the one attempt from before the restart.
    assert_eq!(
        journaled_failed_attempts(&run.out, &failing),
        before,
        "no attempt after the restart"
    );
    let csv_rows = run.final_rows();
    for r in csv_rows.iter().filter(|r| r["case_id"] != failing) {
        assert_eq!(r["status"], "ok", "{r:?}");
    }
    // The journal keeps only the failed kernels' errors, not the other kernels' results of that
    // attempt, so every kernel of the case carries the explanation.
    let failed: Vec<&CsvRow> = csv_rows
        .iter()
        .filter(|r| r["case_id"] == failing)
        .collect();
    assert!(!failed.is_empty(), "{csv_rows:?}");
    for r in failed {
        let message = &r["message"];
        assert_eq!(r["status"], "failed", "{r:?}");
        assert_eq!(r["attempt"], "1", "{r:?}");
        assert!(
            message.starts_with(&format!("failed after 1 attempt: {}", before[0].errors[0]))
                && message.contains("already reach --max-attempts 1")
                && message.contains("--retry-failed"),
            "the record names the journaled error, the new limit and what to do: {message}"
        );
    }
}

/// Two coordinators on one `--out` would interleave their journal frames: the second is refused
/// at once (exit 1, naming the journal and what to do), and the first, already serving, finishes
/// the grid with every case once, as if the second had never started.
#[test]
fn a_second_coordinator_on_the_same_out_is_refused_and_the_first_finishes() {
    let _serial = exclusive();
    let s = Scratch::new("second-coordinator");
    let grid = s.grid(&GridSpec::tiny());
    let ids = grid_case_ids(&grid);
    let port = free_port();
    // Waits for an agent, so it is alive (and holds the journal) while the second one starts.
    let mut first = coordinator(&s, "coordinator", &grid, port, &["--expect-agents", "1"]);
    StatusProbe::new(port).wait_for(Duration::from_secs(30), "the first coordinator", |_| true);
    let other_port = free_port();
    let mut second = coordinator(&s, "coordinator-2", &grid, other_port, &[]);
    let status = second.wait(Duration::from_secs(30));
    assert_eq!(status.code(), Some(1), "{}", second.log_tail());
    let log = second.log();
    assert!(
        log.contains("journal.dbj") && log.contains("another process") && log.contains("--out"),
        "the refusal names the journal and what to do: {log}"
    );
    let mut a = agent(&s, "agent-a", port, &[]);
    first.wait_success(Duration::from_secs(90));
    a.wait_success(Duration::from_secs(20));
    assert_each_case_once(&s.out(), &ids);
}

/// An agent that registers as the run ends (a replacement pod that came up late) hears in its
/// Register answer that the run is over, and exits cleanly at once without asking for work: the
/// coordinator may stop serving right after that answer, and a first Lease would then find it
/// gone (the agent used to retry it until its connect timeout and fail: a failed Kubernetes pod
/// for no reason). The late agent starts early behind a [`Gate`], so that its registration
/// reaches the coordinator just as the grid is complete, however long it took to start; a client
/// that registered earlier and never asks for work holds the coordinator in its drain grace
/// meanwhile (up to 3 s), and its leaving ends the run.
#[test]
fn an_agent_registering_as_the_run_ends_is_told_so_and_exits_cleanly() {
    let _serial = exclusive();
    let s = Scratch::new("late-agent");
    let grid = s.grid(&GridSpec::tiny());
    let ids = grid_case_ids(&grid);
    let port = free_port();
    let mut coord = coordinator(&s, "coordinator", &grid, port, &[]);
    wait_for_listener(port, Duration::from_secs(30));
    let rt = test_runtime();
    let quiet = rt.block_on(async {
        let mut c = connect(port).await;
        c.register(cpu_register_request("quiet"))
            .await
            .expect("register")
            .into_inner()
    });
    assert!(!quiet.drain, "work is left: {quiet:?}");

    let gate = Gate::new(port);
    let mut late = agent(&s, "late", gate.port(), &[]);
    wait_until(
        Duration::from_secs(30),
        "the late agent to connect to the gate and wait there in its first call",
        || gate.accepted() > 0,
    );
    let mut worker = agent(&s, "worker", port, &[]);
    StatusProbe::new(port).wait_for(Duration::from_secs(60), "the grid to be complete", |st| {
        st.finished
    });
    gate.open();
    late.wait_success(Duration::from_secs(10));
    let log = late.log();
    assert!(
        log.contains("registered with the coordinator")
            && log.contains("coordinator says drain at registration"),
        "the late agent is told at registration that the run is over:\n{log}"
    );
    let (run, _, _, _) = agent_summary(&log)
        .unwrap_or_else(|| panic!("no closing summary from the late agent:\n{log}"));
    assert_eq!(run, 0, "the late agent ran nothing");
    worker.wait_success(Duration::from_secs(20));

    // The quiet client leaves too; the coordinator, which waited for both, exits with its
    // outputs (or has already, at the end of its drain grace: then this call finds it gone).
    let _ = rt.block_on(async {
        let mut c = wire::coordinator_client::CoordinatorClient::connect(url(port)).await?;
        c.release(wire::ReleaseRequest {
            agent_id: quiet.agent_id.clone(),
            reason: "integration test".into(),
            leaving: true,
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))
    });
    // Its connection closes with its runtime (an idle one would hold the server's shutdown).
    drop(rt);
    coord.wait_success(Duration::from_secs(20));
    assert!(
        coord
            .log()
            .contains("agent registered as the run ends: told to drain"),
        "the coordinator says it told the late agent:\n{}",
        coord.log_tail()
    );
    assert_each_case_once(&s.out(), &ids);
}

/// A kernel whose calls disturb each other (here the agent's `DECODEBENCH_FAILPOINT=disturb:`:
/// the optimized kernel's output is corrupted from its second call on) passes the one call
/// verified before timing. The check of the output its timed calls left catches it: its row is
/// `wrong_result`, with its error, no timings and a message that says what happened, and every
/// other row of the run is measured.
#[test]
fn a_kernel_whose_calls_disturb_each_other_is_recorded_wrong_without_timings() {
    let _serial = exclusive();
    let s = Scratch::new("disturbed-kernel");
    let grid = s.grid(&GridSpec::tiny());
    let ids = grid_case_ids(&grid);
    let victim = nth_case(&ids, 3);
    let out = s.out();
    let port = free_port();
    let mut coord = coordinator(&s, "coordinator", &grid, port, &[]);
    let drill = format!("disturb:{}", &victim[..8]);
    let mut agent = agent_with_env(
        &s,
        "agent-0",
        port,
        &[],
        &[("DECODEBENCH_FAILPOINT", &drill)],
    );
    coord.wait_success(Duration::from_secs(60));
    agent.wait_success(Duration::from_secs(30));
    // A wrong result is a result (the run is complete), but the end of the run names it.
    let log = coord.log();
    assert!(
        log.contains("1 kernel result(s) are wrong_result")
            && log.contains(&format!("wrong: {victim} optimized")),
        "{log}"
    );

    let rows = read_results_csv(&out);
    assert_eq!(
        rows.len(),
        ids.len() * KERNELS.len(),
        "every case has its rows"
    );
    let mut wrong = 0;
    for r in &rows {
        if r["case_id"] == victim && r["kernel"] == "optimized" {
            wrong += 1;
            assert_eq!(r["status"], "wrong_result", "{r:?}");
            let message = &r["message"];
            assert!(
                message.contains("passed verification after one call")
                    && message.contains("timed calls")
                    && message.contains("decodebench selftest"),
                "{message}"
            );
            assert!(
                r["samples_ms"].is_empty() && r["median_ms"].is_empty(),
                "no timings: {r:?}"
            );
            let err: f64 = r["max_abs_err"].parse().expect("the error is recorded");
            assert!(err > 1.0, "{r:?}");
        } else {
            assert_eq!(r["status"], "ok", "{r:?}");
        }
    }
    assert_eq!(wrong, 1, "the victim's optimized row");
}
