//! The coordinator's edge: a wrong bearer token and a wrong protocol version are refused with
//! errors that say what is wrong, a report holding a timing no timer produces is refused naming
//! the sample, and garbage on the gRPC port neither crashes nor wedges it.

use crate::util::*;
use decodebench_proto::{wire, PROTOCOL_VERSION};
use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

#[test]
fn an_agent_with_the_wrong_token_is_refused_and_exits_non_zero() {
    let _serial = exclusive();
    let s = Scratch::new("wrong-token");
    let grid = s.grid(&GridSpec::tiny());
    let ids = grid_case_ids(&grid);
    let right = s.write("right.token", "correct-horse-battery-staple\n");
    let wrong = s.write("wrong.token", "not-the-token\n");
    let port = free_port();
    let right_arg = right.display().to_string();
    let wrong_arg = wrong.display().to_string();
    let mut coord = coordinator(
        &s,
        "coordinator",
        &grid,
        port,
        &["--token-file", &right_arg],
    );
    wait_for_listener(port, Duration::from_secs(30));

    for (name, extra) in [
        ("wrong-token", vec!["--token-file", wrong_arg.as_str()]),
        ("no-token", vec![]),
    ] {
        let mut a = agent(&s, name, port, &extra);
        let status = a.wait(Duration::from_secs(30));
        assert!(
            !status.success(),
            "{name}: an unauthenticated agent must exit non-zero"
        );
        let log = a.log().to_lowercase();
        assert!(
            log.contains("token"),
            "{name}: the error should say the token is the problem:\n{}",
            a.log_tail()
        );
    }
    // Nothing was run for them, and the coordinator is still serving.
    assert!(
        coord.is_running(),
        "the coordinator died:\n{}",
        coord.log_tail()
    );
    let st = StatusProbe::new(port)
        .with_token("correct-horse-battery-staple")
        .get()
        .expect("status with the right token");
    assert_eq!(st.done, 0);
    assert!(
        st.agents.is_empty(),
        "refused agents must not be registered: {:?}",
        st.agents
    );
    assert!(
        StatusProbe::new(port).get().is_none(),
        "status without a token is refused too"
    );

    // The right token works.
    let mut good = agent(&s, "right-token", port, &["--token-file", &right_arg]);
    coord.wait_success(Duration::from_secs(90));
    good.wait_success(Duration::from_secs(20));
    assert_each_case_once(&s.out(), &ids);
}

/// A protocol version no coordinator speaks.
const ALIEN_PROTOCOL_VERSION: u32 = 999;

#[test]
fn a_client_speaking_another_protocol_version_gets_failed_precondition() {
    let _serial = exclusive();
    let s = Scratch::new("protocol-version");
    let grid = s.grid(&GridSpec::tiny());
    let ids = grid_case_ids(&grid);
    let port = free_port();
    let mut coord = coordinator(&s, "coordinator", &grid, port, &[]);
    wait_for_listener(port, Duration::from_secs(30));

    let rt = test_runtime();
    let register = |version: u32| {
        rt.block_on(async {
            let mut client = connect(port).await;
            client
                .register(wire::RegisterRequest {
                    protocol_version: version,
                    ..cpu_register_request("version-probe")
                })
                .await
        })
    };
    let err = register(ALIEN_PROTOCOL_VERSION).expect_err("version 999 must be refused");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    let msg = err.message();
    assert!(
        msg.contains(&ALIEN_PROTOCOL_VERSION.to_string()),
        "the message names the client's version: {msg}"
    );
    assert!(
        msg.contains(&format!("v{PROTOCOL_VERSION}")),
        "the message names the coordinator's version: {msg}"
    );
    // The same request with the right version is accepted: it is the version that was refused.
    let ok = register(PROTOCOL_VERSION).expect("the current protocol version is accepted");
    assert_eq!(ok.get_ref().protocol_version, PROTOCOL_VERSION);
    assert!(coord.is_running());

    // A real agent still runs the whole grid.
    let mut a = agent(&s, "agent", port, &[]);
    coord.wait_success(Duration::from_secs(90));
    a.wait_success(Duration::from_secs(20));
    assert_each_case_once(&s.out(), &ids);
}

/// How long the raw client below waits for the coordinator to hand it a shard.
const SHARD_WAIT: Duration = Duration::from_secs(30);

/// Both kernels of `case_id` timed ok with three samples each, as a real agent reports them.
fn well_formed_report(case_id: &str) -> wire::CaseMeasurement {
    (&decodebench_kernels::CaseMeasurement::example_ok(case_id)).into()
}

/// A hand-written client that registers as an agent and speaks the protocol call by call, on
/// its own runtime so that the test stays synchronous.
struct RawAgent {
    rt: tokio::runtime::Runtime,
    client: wire::coordinator_client::CoordinatorClient<tonic::transport::Channel>,
    agent_id: String,
}

impl RawAgent {
    fn register(port: u16, name: &str) -> RawAgent {
        let rt = test_runtime();
        let mut client = rt.block_on(connect(port));
        let agent_id = rt
            .block_on(client.register(cpu_register_request(name)))
            .expect("registering")
            .into_inner()
            .agent_id;
        RawAgent {
            rt,
            client,
            agent_id,
        }
    }

    /// The next shard, or `None` once the coordinator says drain.
    fn lease(&mut self) -> Option<wire::Shard> {
        let deadline = std::time::Instant::now() + SHARD_WAIT;
        loop {
            let lease = self
                .rt
                .block_on(self.client.lease(wire::LeaseRequest {
                    agent_id: self.agent_id.clone(),
                }))
                .expect("asking for a lease")
                .into_inner();
            match lease.action {
                Some(wire::lease_response::Action::Shard(shard)) => return Some(shard),
                Some(wire::lease_response::Action::Drain(true)) => return None,
                other => {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "no shard within {SHARD_WAIT:?}; last answer: {other:?}"
                    );
                    std::thread::sleep(POLL_PERIOD);
                }
            }
        }
    }

    fn report(
        &mut self,
        lease_id: &str,
        measurement: wire::CaseMeasurement,
    ) -> Result<wire::ReportResponse, tonic::Status> {
        let req = wire::ReportRequest {
            agent_id: self.agent_id.clone(),
            lease_id: lease_id.to_string(),
            measurement: Some(measurement),
        };
        self.rt
            .block_on(self.client.report(req))
            .map(|r| r.into_inner())
    }

    /// Hands the lease back and says this agent is leaving.
    fn leave(&mut self, lease_id: &str) {
        let req = wire::ReleaseRequest {
            agent_id: self.agent_id.clone(),
            lease_id: lease_id.to_string(),
            reason: "integration test done".into(),
            leaving: true,
        };
        self.rt
            .block_on(self.client.release(req))
            .expect("releasing the lease");
    }
}

/// A report whose optimized kernel (reported second) has a sample that is not a time.
fn report_with_sample(case_id: &str, sample: f64) -> wire::CaseMeasurement {
    let mut m = well_formed_report(case_id);
    m.kernels[1].samples_ms[1] = sample;
    m
}

#[test]
fn a_report_with_a_sample_that_is_not_a_time_is_refused_and_the_coordinator_carries_on() {
    let _serial = exclusive();
    let s = Scratch::new("bad-sample");
    let grid = s.grid(&GridSpec::tiny());
    let ids = grid_case_ids(&grid);
    let port = free_port();
    let mut coord = coordinator(&s, "coordinator", &grid, port, &[]);
    wait_for_listener(port, Duration::from_secs(30));
    let mut raw = RawAgent::register(port, "raw-reporter");
    let shard = raw.lease().expect("a shard");
    let case_id = shard.cases[0].id.clone();

    for (bad, shown) in [(0.0, "0"), (f64::NAN, "NaN")] {
        let err = raw
            .report(&shard.lease_id, report_with_sample(&case_id, bad))
            .expect_err("a sample that is not a time must be refused");
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        let msg = err.message();
        for part in [
            "kernels[optimized].samples_ms[1]".to_string(),
            format!("is {shown} ms"),
            "bug in the agent's timing".to_string(),
        ] {
            assert!(msg.contains(&part), "missing {part:?} in: {msg}");
        }
        assert!(
            coord.is_running(),
            "the coordinator died of a bad report:\n{}",
            coord.log_tail()
        );
    }

    // The first refusal counted as a failed attempt (queued again); no value of the refused
    // reports was kept: the same case, well formed, is taken as its result.
    let ok = raw
        .report(&shard.lease_id, well_formed_report(&case_id))
        .expect("a well-formed report is accepted");
    assert!(ok.accepted, "{ok:?}");
    let st = StatusProbe::new(port)
        .get()
        .expect("the coordinator still answers Status");
    assert_eq!(st.done, 1, "{st:?}");

    // The raw client hands the rest back; a real agent finishes the grid, every case once.
    raw.leave(&shard.lease_id);
    let mut a = agent(&s, "agent", port, &[]);
    coord.wait_success(Duration::from_secs(90));
    a.wait_success(Duration::from_secs(20));
    assert_each_case_once(&s.out(), &ids);
}

/// An agent whose every result is refused (a timing bug that repeats) does not keep a run going
/// forever: each refusal counts as a failed attempt of its case, so after `--max-attempts` every
/// case is recorded failed, with the refusal as its message, and the run ends (exit 2).
#[test]
fn an_agent_whose_results_are_always_refused_ends_with_its_cases_failed() {
    let _serial = exclusive();
    let s = Scratch::new("always-refused");
    let grid = s.grid(&GridSpec::tiny());
    let ids = grid_case_ids(&grid);
    let port = free_port();
    let mut coord = coordinator(&s, "coordinator", &grid, port, &["--max-attempts", "2"]);
    wait_for_listener(port, Duration::from_secs(30));
    let mut raw = RawAgent::register(port, "always-refused");
    let mut refused = 0;
    while let Some(shard) = raw.lease() {
        for case in &shard.cases {
            let err = raw
                .report(&shard.lease_id, report_with_sample(&case.id, 0.0))
                .expect_err("a zero sample is refused");
            assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
            refused += 1;
            assert!(
                refused <= ids.len() * 2,
                "{refused} refusals for {} cases at 2 attempts each: the run does not end",
                ids.len()
            );
        }
    }
    assert_eq!(refused, ids.len() * 2, "two attempts per case");
    let status = coord.wait(Duration::from_secs(60));
    assert_eq!(status.code(), Some(2), "{}", coord.log_tail());
    let text = std::fs::read_to_string(s.out().join("results.csv")).expect("results.csv");
    let mut rows = csv::Reader::from_reader(text.as_bytes());
    let headers = rows.headers().expect("a header").clone();
    let col = |name: &str| headers.iter().position(|h| h == name).expect(name);
    let (status_col, message_col) = (col("status"), col("message"));
    let mut n = 0;
    for r in rows.records() {
        let r = r.expect("a record");
        n += 1;
        assert_eq!(&r[status_col], "failed", "{r:?}");
        assert!(
            r[message_col].contains("the coordinator refused this agent's result")
                && r[message_col].contains("samples_ms[1]"),
            "{r:?}"
        );
    }
    assert_eq!(n, ids.len() * 2, "a failed row per case and kernel");
}

/// Deterministic noise (xorshift64*), so a failure can be replayed.
fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            seed ^= seed >> 12;
            seed ^= seed << 25;
            seed ^= seed >> 27;
            (seed.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
        })
        .collect()
}

/// The HTTP/2 client connection preface.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// An HTTP/2 frame header: 24-bit length, type, flags, 31-bit stream id.
fn frame_header(len: u32, kind: u8, flags: u8, stream: u32) -> Vec<u8> {
    let mut h = len.to_be_bytes()[1..].to_vec();
    h.push(kind);
    h.push(flags);
    h.extend_from_slice(&stream.to_be_bytes());
    h
}

/// Sends `bytes` on a fresh connection and closes it (a write error just means the server hung up
/// first, which is fine).
fn send_and_close(port: u16, bytes: &[u8]) {
    if let Ok(mut c) = TcpStream::connect(("127.0.0.1", port)) {
        let _ = c.set_write_timeout(Some(Duration::from_secs(2)));
        let _ = c.write_all(bytes);
        let _ = c.flush();
    }
}

#[test]
fn garbage_on_the_port_leaves_the_coordinator_serving() {
    let _serial = exclusive();
    let s = Scratch::new("garbage");
    let grid = s.grid(&GridSpec::tiny());
    let ids = grid_case_ids(&grid);
    let port = free_port();
    let mut coord = coordinator(&s, "coordinator", &grid, port, &[]);
    wait_for_listener(port, Duration::from_secs(30));

    // Connections that stay open, half-way through a preface or a frame, while the rest goes on.
    let mut held = Vec::new();
    for partial in [
        &H2_PREFACE[..10],
        &[H2_PREFACE, &frame_header(100, 0x4, 0, 0)[..5]].concat()[..],
    ] {
        if let Ok(mut c) = TcpStream::connect(("127.0.0.1", port)) {
            let _ = c.write_all(partial);
            held.push(c);
        }
    }
    for seed in 1..=16u64 {
        send_and_close(port, &noise(4096 * seed as usize, seed));
    }
    // Truncated frames after a valid preface.
    let settings_cut = [H2_PREFACE, &frame_header(18, 0x4, 0, 0), &[0, 3, 0]].concat();
    let headers_cut = [
        H2_PREFACE,
        &frame_header(0, 0x4, 0, 0),
        &frame_header(16_384, 0x1, 0x4, 1),
        &noise(100, 7),
    ]
    .concat();
    let huge_frame = [H2_PREFACE, &frame_header(0x00ff_ffff, 0x0, 0, 1)].concat();
    let bad_stream = [
        H2_PREFACE,
        &frame_header(0, 0x4, 0, 0),
        &frame_header(8, 0x0, 0, 2),
        &noise(8, 9),
    ]
    .concat();
    for bytes in [settings_cut, headers_cut, huge_frame, bad_stream] {
        send_and_close(port, &bytes);
    }
    send_and_close(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    send_and_close(
        port,
        b"POST /decodebench.v1.Coordinator/Register HTTP/1.1\r\nContent-Length: 5\r\n\r\nab",
    );
    // Many connections opened and dropped at once.
    for _ in 0..200 {
        let _ = TcpStream::connect(("127.0.0.1", port));
    }

    assert!(
        coord.is_running(),
        "the coordinator died of garbage:\n{}",
        coord.log_tail()
    );
    let st = StatusProbe::new(port)
        .get()
        .expect("the coordinator still answers Status");
    assert_eq!(st.done, 0);

    // A normal agent still finishes the grid, with the junk connections still open.
    let mut a = agent(&s, "agent", port, &[]);
    coord.wait_success(Duration::from_secs(90));
    a.wait_success(Duration::from_secs(20));
    drop(held);
    assert_each_case_once(&s.out(), &ids);
}
