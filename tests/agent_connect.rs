//! `decodebench agent` and its coordinator address: a stop signal while it waits for an
//! unreachable coordinator ends it at once, and a malformed address or a connect timeout under a
//! second is refused up front (QA found the agent retrying for the whole 300-s timeout in all
//! three cases).

use crate::util::*;
use std::time::{Duration, Instant};

/// `decodebench agent --backend cpu` for `coordinator`, with `extra` flags.
fn agent_for(s: &Scratch, name: &str, coordinator: &str, extra: &[&str]) -> Proc {
    let mut args: Vec<String> = ["agent", "--backend", "cpu", "--name", name, "--coordinator"]
        .iter()
        .map(|a| a.to_string())
        .collect();
    args.push(coordinator.to_string());
    args.extend(extra.iter().map(|a| a.to_string()));
    Proc::spawn(s, name, &args)
}

#[test]
fn a_stop_signal_ends_the_wait_for_an_unreachable_coordinator() {
    let s = Scratch::new("agent-stop-unreachable");
    for sig in ["TERM", "INT"] {
        // Nothing listens on a free port.
        let coordinator = url(free_port());
        let mut a = agent_for(
            &s,
            &format!("stop-{sig}"),
            &coordinator,
            &["--connect-timeout-s", "300"],
        );
        wait_until(Duration::from_secs(30), "the agent retrying", || {
            a.log().contains("coordinator not reachable; retrying")
        });
        let sent = Instant::now();
        a.signal(sig);
        let status = a.wait(Duration::from_secs(10));
        let log = a.log();
        assert!(
            sent.elapsed() < Duration::from_secs(3),
            "SIG{sig}: took {:?} to exit; log:\n{log}",
            sent.elapsed()
        );
        assert!(
            status.success(),
            "SIG{sig} before registering is a clean exit: {status}; log:\n{log}"
        );
        assert!(
            log.contains("stop requested before this agent could register"),
            "SIG{sig}: the log says why it stopped:\n{log}"
        );
        assert!(
            !log.contains("could not reach the coordinator"),
            "SIG{sig}: not a timeout:\n{log}"
        );
    }
}

#[test]
fn a_malformed_coordinator_address_is_refused_at_once() {
    let s = Scratch::new("agent-bad-address");
    for (i, (addr, says)) in [
        ("127.0.0.1:51999", "did you mean `http://127.0.0.1:51999`?"),
        (
            "garbage",
            "the scheme (http:// or https://) and the port are missing",
        ),
        ("http://", "the host and port are missing"),
        ("http://127.0.0.1", "the port is missing"),
        ("ftp://127.0.0.1:21", "scheme `ftp` is not supported"),
    ]
    .into_iter()
    .enumerate()
    {
        let mut a = agent_for(&s, &format!("bad-{i}"), addr, &[]);
        let status = a.wait(Duration::from_secs(10));
        let log = a.log();
        assert!(!status.success(), "{addr}: must fail; log:\n{log}");
        assert!(log.contains(says), "{addr}: should say `{says}`:\n{log}");
        assert!(
            log.contains("http://HOST:50051"),
            "{addr}: should show an example:\n{log}"
        );
        assert!(
            !log.contains("retrying") && !log.contains("is it running"),
            "{addr}: a bad address is not an unreachable coordinator:\n{log}"
        );
    }
}

#[test]
fn a_connect_timeout_under_a_second_is_refused() {
    let s = Scratch::new("agent-zero-timeout");
    for (i, bad) in ["0", "0.5", "-1"].into_iter().enumerate() {
        let coordinator = url(free_port());
        let flag = format!("--connect-timeout-s={bad}");
        let mut a = agent_for(&s, &format!("timeout-{i}"), &coordinator, &[&flag]);
        let status = a.wait(Duration::from_secs(10));
        let log = a.log();
        assert!(!status.success(), "{bad}: must be refused; log:\n{log}");
        assert!(
            log.contains("must be at least 1 second"),
            "{bad}: should say why:\n{log}"
        );
    }
}

#[test]
fn a_short_connect_timeout_still_gives_up_on_an_unreachable_coordinator() {
    let s = Scratch::new("agent-short-timeout");
    let mut a = agent_for(
        &s,
        "short",
        &url(free_port()),
        &["--connect-timeout-s", "1"],
    );
    let status = a.wait(Duration::from_secs(15));
    let log = a.log();
    assert!(!status.success(), "log:\n{log}");
    assert!(log.contains("could not reach the coordinator"), "{log}");
}
