//! A coordinator process and several agent processes on loopback: work is spread, every case comes
//! back exactly once, and everyone exits cleanly when the grid is done.

use crate::util::*;
use std::collections::BTreeSet;
use std::time::Duration;

#[test]
fn three_agents_finish_a_grid_with_every_case_once() {
    let _serial = exclusive();
    let s = Scratch::new("three-agents");
    let spec = GridSpec::tiny();
    let grid = s.grid(&spec);
    let ids = grid_case_ids(&grid);
    let port = free_port();
    // Nothing is dispatched until all three have registered. Without this the first agent up can
    // finish the whole tiny grid before the others connect, and they would retry a coordinator
    // that has already exited until their connect timeout.
    let mut coord = coordinator(
        &s,
        "coordinator",
        &grid,
        port,
        &["--shard-cases", "2", "--expect-agents", "3"],
    );
    let mut agents: Vec<Proc> = (0..3)
        .map(|i| agent(&s, &format!("agent{i}"), port, &[]))
        .collect();

    coord.wait_success(Duration::from_secs(90));
    for a in agents.iter_mut() {
        a.wait_success(Duration::from_secs(20));
        let (run, accepted, _dups, _back) = agent_summary(&a.log())
            .unwrap_or_else(|| panic!("{} printed no closing summary:\n{}", a.name, a.log_tail()));
        assert!(
            accepted <= run,
            "{}: accepted more results than it ran",
            a.name
        );
    }
    assert_eq!(
        summary_totals(&agents).1,
        ids.len() as u64,
        "the agents together had exactly one accepted result per case"
    );
    assert_each_case_once(&s.out(), &ids);
}

/// Agents started for the many-agents test: real processes, each a whole `decodebench agent`.
const MANY_AGENTS: usize = 50;

#[test]
fn fifty_agent_processes_share_a_grid_with_every_case_once() {
    let _serial = exclusive();
    let s = Scratch::new("fifty-agents");
    // 5 x 5 x 3 = 75 tiny cases, one per shard, so that most agents get work.
    let spec = GridSpec {
        name: "it-many".into(),
        batch_sizes: vec![1, 2, 3, 4, 5],
        max_seq_lens: vec![16, 32, 48, 64, 80],
        trials: 2,
        ..GridSpec::tiny()
    };
    let grid = s.grid(&spec);
    let ids = grid_case_ids(&grid);
    assert_eq!(ids.len(), 75);
    let port = free_port();
    let expect = MANY_AGENTS.to_string();
    // Nothing is dispatched until all 50 have registered: they are all in the run at once.
    let mut coord = coordinator(
        &s,
        "coordinator",
        &grid,
        port,
        &[
            "--shard-cases",
            "1",
            "--expect-agents",
            &expect,
            "--lease-timeout-s",
            "60",
        ],
    );
    let mut agents: Vec<Proc> = (0..MANY_AGENTS)
        .map(|i| agent(&s, &format!("agent{i:02}"), port, &[]))
        .collect();

    coord.wait_success(Duration::from_secs(150));
    for a in agents.iter_mut() {
        a.wait_success(Duration::from_secs(30));
    }
    let rows = assert_each_case_once(&s.out(), &ids);
    let agent_ids: BTreeSet<&str> = rows.iter().map(|r| r.agent_id.as_str()).collect();
    assert!(
        agent_ids.len() > 1,
        "with {MANY_AGENTS} agents the work should be spread, but only {agent_ids:?} reported"
    );
    assert_eq!(
        summary_totals(&agents).1,
        ids.len() as u64,
        "one accepted result per case across all agents"
    );
}

/// An agent stopped while it has no work (here: waiting for a fleet that is not complete) says it
/// leaves, so `status` stops counting it at once, not a lease timeout (30 s) later; the one left
/// keeps being counted.
#[test]
fn an_idle_agent_that_stops_is_no_longer_counted_alive() {
    let _serial = exclusive();
    let s = Scratch::new("idle-agent-leaves");
    let grid = s.grid(&GridSpec::tiny());
    let port = free_port();
    let mut coord = coordinator(&s, "coordinator", &grid, port, &["--expect-agents", "3"]);
    let mut a = agent(&s, "agent-a", port, &[]);
    let _b = agent(&s, "agent-b", port, &[]);
    let probe = StatusProbe::new(port);
    probe.wait_for(Duration::from_secs(30), "two agents alive", |st| {
        st.agents_alive == 2
    });
    // The coordinator counts an agent before the agent has read its answer: wait for that too.
    wait_until(Duration::from_secs(30), "agent-a registered", || {
        a.log().contains("registered with the coordinator")
    });
    a.signal("TERM");
    let status = a.wait(Duration::from_secs(10));
    assert!(status.success(), "{}", a.log_tail());
    // Well under the 30-s lease timeout.
    let st = probe.wait_for(Duration::from_secs(5), "one agent alive", |st| {
        st.agents_alive == 1
    });
    assert_eq!(
        st.done, 0,
        "nothing was dispatched: the fleet is not complete"
    );
    coord.signal("TERM");
    coord.wait(Duration::from_secs(30));
}

/// A coordinator stopped by SIGTERM tells idle agents to drain too, not only those holding a lease
/// (an idle agent used to miss it, retry the gone coordinator for 300 s and exit 1).
#[test]
fn a_stopped_coordinator_drains_its_idle_agents() {
    let _serial = exclusive();
    let s = Scratch::new("stop-drains-idle");
    let grid = s.grid(&GridSpec::tiny());
    let port = free_port();
    // Two expected, one comes: nothing is dispatched and the agent waits, idle.
    let mut coord = coordinator(&s, "coordinator", &grid, port, &["--expect-agents", "2"]);
    let mut a = agent(&s, "agent-a", port, &[]);
    wait_until(Duration::from_secs(30), "agent-a registered", || {
        a.log().contains("registered with the coordinator")
    });
    coord.signal("TERM");
    coord.wait(Duration::from_secs(30));
    let status = a.wait(Duration::from_secs(20));
    let log = a.log();
    assert!(status.success(), "{log}");
    assert!(log.contains("coordinator says drain"), "{log}");
}

/// An expected agent that never comes (its GPU cannot be opened, its pod is pending) holds the run
/// only until `--fleet-timeout-s`: then the agent that is there gets the whole grid, and the
/// coordinator says what was missing.
#[test]
fn a_fleet_timeout_starts_the_run_with_the_agents_present() {
    let _serial = exclusive();
    let s = Scratch::new("fleet-timeout");
    let grid = s.grid(&GridSpec::tiny());
    let ids = grid_case_ids(&grid);
    let port = free_port();
    let mut coord = coordinator(
        &s,
        "coordinator",
        &grid,
        port,
        &["--expect-agents", "2", "--fleet-timeout-s", "6"],
    );
    let mut a = agent(&s, "agent-a", port, &[]);
    // While it waits, `status` says for what and for how long.
    let st = StatusProbe::new(port).wait_for(Duration::from_secs(5), "agent-a registered", |st| {
        st.agents_alive == 1
    });
    assert_eq!(st.fleet_waiting, "1 of 2 agents", "{st:?}");
    let left = st.fleet_timeout_left_s.expect("a fleet timeout is set");
    assert!(left > 0.0 && left <= 6.0, "{st:?}");
    let (status, stdout, stderr) = run_to_end(&["status", &url(port)], Duration::from_secs(10));
    assert!(status.success(), "{stderr}");
    assert!(
        stdout.contains("waiting for the fleet before handing out work: 1 of 2 agents"),
        "{stdout}"
    );
    coord.wait_success(Duration::from_secs(90));
    a.wait_success(Duration::from_secs(20));
    let log = coord.log();
    assert!(
        log.contains("--fleet-timeout-s: the fleet is still short")
            && log.contains("1 of 2 agents"),
        "the coordinator says what it started without: {log}"
    );
    assert_each_case_once(&s.out(), &ids);
}
