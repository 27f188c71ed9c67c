//! TLS and mutual TLS between real processes: certificates are made for the test (a throwaway CA
//! signs a server certificate for `localhost` and a client certificate), the coordinator requires
//! client certificates and a token, and an agent that presents its certificate finishes the grid
//! while one without it is refused.

use crate::util::*;
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use std::path::Path;
use std::time::Duration;

struct Pki {
    ca: std::path::PathBuf,
    server_cert: std::path::PathBuf,
    server_key: std::path::PathBuf,
    client_cert: std::path::PathBuf,
    client_key: std::path::PathBuf,
}

fn make_pki(dir: &Path) -> Pki {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().expect("CA key");
    let ca = ca_params.self_signed(&ca_key).expect("self-signing the CA");
    let server_key = KeyPair::generate().expect("server key");
    let server = CertificateParams::new(vec!["localhost".to_string()])
        .expect("server params")
        .signed_by(&server_key, &ca, &ca_key)
        .expect("signing the server certificate");
    let client_key = KeyPair::generate().expect("client key");
    let client = CertificateParams::new(vec!["decodebench-agent".to_string()])
        .expect("client params")
        .signed_by(&client_key, &ca, &ca_key)
        .expect("signing the client certificate");
    let write = |name: &str, text: String| {
        let p = dir.join(name);
        std::fs::write(&p, text).expect("writing a PEM file");
        p
    };
    Pki {
        ca: write("ca.pem", ca.pem()),
        server_cert: write("server.pem", server.pem()),
        server_key: write("server.key", server_key.serialize_pem()),
        client_cert: write("client.pem", client.pem()),
        client_key: write("client.key", client_key.serialize_pem()),
    }
}

fn tls_agent(s: &Scratch, name: &str, port: u16, pki: &Pki, with_client_cert: bool) -> Proc {
    let mut args: Vec<String> = vec![
        "agent".into(),
        "--backend".into(),
        "cpu".into(),
        "--coordinator".into(),
        format!("https://localhost:{port}"),
        "--name".into(),
        name.into(),
        "--tls-ca".into(),
        pki.ca.display().to_string(),
        "--token-file".into(),
        s.path().join("token").display().to_string(),
        "--connect-timeout-s".into(),
        "5".into(),
    ];
    if with_client_cert {
        args.extend([
            "--tls-cert".into(),
            pki.client_cert.display().to_string(),
            "--tls-key".into(),
            pki.client_key.display().to_string(),
        ]);
    }
    Proc::spawn(s, name, &args)
}

#[test]
fn mutual_tls_agents_finish_and_agents_without_a_certificate_are_refused() {
    let _serial = exclusive();
    let s = Scratch::new("mtls");
    let pki = make_pki(s.path());
    std::fs::write(s.path().join("token"), "tls-test-token\n").expect("writing the token");
    let grid = s.grid(&GridSpec::tiny());
    let ids = grid_case_ids(&grid);
    let port = free_port();
    let token = s.path().join("token").display().to_string();
    let (cert, key, ca) = (
        pki.server_cert.display().to_string(),
        pki.server_key.display().to_string(),
        pki.ca.display().to_string(),
    );
    let mut coord = coordinator(
        &s,
        "coordinator",
        &grid,
        port,
        &[
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--tls-client-ca",
            &ca,
            "--token-file",
            &token,
        ],
    );

    // No client certificate: the TLS handshake fails, and the agent says why at once instead of
    // retrying it as an unreachable coordinator until its connect timeout.
    let mut stranger = tls_agent(&s, "no-cert", port, &pki, false);
    let status = stranger.wait(Duration::from_secs(60));
    assert!(
        !status.success(),
        "an agent without a client certificate must be refused; log:\n{}",
        stranger.log_tail()
    );
    let log = stranger.log();
    assert!(
        log.contains("TLS handshake") && log.contains("--tls-cert"),
        "the refusal should be explained:\n{log}"
    );
    // A CA the coordinator's certificate does not chain to: the same, naming --tls-ca.
    let other_dir = s.path().join("other-pki");
    std::fs::create_dir_all(&other_dir).expect("a directory for a second PKI");
    let other = make_pki(&other_dir);
    let wrong_ca = Pki {
        ca: other.ca,
        server_cert: pki.server_cert.clone(),
        server_key: pki.server_key.clone(),
        client_cert: pki.client_cert.clone(),
        client_key: pki.client_key.clone(),
    };
    let started = std::time::Instant::now();
    let mut wrong = tls_agent(&s, "wrong-ca", port, &wrong_ca, true);
    let status = wrong.wait(Duration::from_secs(60));
    let log = wrong.log();
    assert!(!status.success(), "{log}");
    assert!(
        log.contains("TLS handshake") && log.contains("--tls-ca"),
        "the refusal should be explained:\n{log}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "a handshake failure is not retried for the connect timeout (5 s here): {:?}",
        started.elapsed()
    );

    // `status` speaks mutual TLS too (it had no client-certificate flags).
    let url = format!("https://localhost:{port}");
    let (client_cert, client_key) = (
        pki.client_cert.display().to_string(),
        pki.client_key.display().to_string(),
    );
    let status = |extra: &[&str]| {
        let mut args = vec![
            "status",
            url.as_str(),
            "--tls-ca",
            ca.as_str(),
            "--tls-cert",
            client_cert.as_str(),
            "--tls-key",
            client_key.as_str(),
            "--token-file",
            token.as_str(),
        ];
        args.extend_from_slice(extra);
        run_to_end(&args, Duration::from_secs(20))
    };
    let (st, out, err) = status(&[]);
    assert!(st.success(), "{out}{err}");
    assert!(out.contains("pending"), "{out}");
    // The same answer as JSON, for scripts: every count, and the agents (none has a lease yet).
    let (st, out, err) = status(&["--format", "json"]);
    assert!(st.success(), "{out}{err}");
    let json: serde_json::Value = serde_json::from_str(&out).expect("status --format json");
    assert_eq!(json["total"], ids.len(), "{out}");
    assert_eq!(json["done"], 0, "{out}");
    assert!(json["agents"].is_array(), "{out}");

    let mut good = tls_agent(&s, "with-cert", port, &pki, true);
    coord.wait_success(Duration::from_secs(90));
    good.wait_success(Duration::from_secs(20));
    assert_each_case_once(&s.out(), &ids);
}
