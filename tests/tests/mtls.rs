//! Every connection is authenticated and every role is held to what it may
//! do: refusals over real mutual TLS, each with a clear status and a line in
//! the coordinator's log.

use std::path::Path;
use std::process::Output;

use tessera_protocol::pb;
use tessera_protocol::pb::federation_client::FederationClient;
use tessera_protocol::pb::jobs_client::JobsClient;
use tessera_protocol::pb::ledger_client::LedgerClient;
use tessera_tests::{Federation, SITES, bin};
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

async fn channel(addr: &str, kit: &Path) -> Channel {
    let tls = tessera_protocol::keyfile::client_tls(kit).unwrap();
    Channel::from_shared(addr.to_owned())
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_and_roles_are_checked_against_the_consortium_ca() {
    // A tiny rate budget (40 requests, refilled at one per 100 s) so that a
    // flood is refused whatever the speed of this machine.
    let mut federation = Federation::start_with(&SITES, &["--rate-limit", "0.01", "--rate-burst", "40"]);
    let ca = federation.ca();
    for (role, name) in [("--auditor", "regulator"), ("--operator", "revoked-lead")] {
        let out = federation.ca_command(&["issue", role, name, "--generate-key"]);
        assert!(out.status.success(), "{}", text(&out));
    }
    let out = federation.ca_command(&[
        "issue",
        "--operator",
        "old-lead",
        "--valid-until",
        "2020-01-01",
        "--generate-key",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("already expired"));

    // No client certificate at all: a clear UNAUTHENTICATED.
    let ca_only = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(
        std::fs::read_to_string(ca.join("ca.pem")).unwrap(),
    ));
    let anonymous = Channel::from_shared(federation.addr.clone())
        .unwrap()
        .tls_config(ca_only)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let status = JobsClient::new(anonymous)
        .list_jobs(pb::ListJobsRequest {})
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(status.message().contains("no client certificate"), "{status:?}");

    // A certificate from another consortium's CA, and an expired one: the
    // handshake fails, the CLI says so, the coordinator logs it.
    let other = federation.dir.path().join("other-ca");
    let other_str = other.to_str().unwrap();
    for args in [
        &["ca", "init", "--consortium", "other", "--out", other_str][..],
        &["ca", "issue", "--operator", "lead", "--ca", other_str, "--generate-key"],
    ] {
        let out = std::process::Command::new(bin("tessera")).args(args).output().unwrap();
        assert!(out.status.success(), "{}", text(&out));
    }
    for kit in [other.join("operators/lead"), ca.join("operators/old-lead")] {
        let out = federation.tessera_as(&kit, &["job", "list"]);
        assert!(!out.status.success(), "{}: {}", kit.display(), text(&out));
        assert!(text(&out).contains("transport error"), "{}", text(&out));
        eprintln!("refused as expected: {}", text(&out));
    }
    // A plaintext address: refused before connecting when a kit is given,
    // and with a hint after the transport error when none is.
    let plain = federation.addr.replacen("https://", "http://", 1);
    let lead = ca.join("operators/lead");
    let out = std::process::Command::new(bin("tessera"))
        .args([
            "--coordinator",
            &plain,
            "--tls-dir",
            lead.to_str().unwrap(),
            "job",
            "list",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("is plaintext, but a TLS kit is configured: use https://127.0.0.1:"),
        "{}",
        text(&out)
    );
    let out = std::process::Command::new(bin("tessera"))
        .args(["--coordinator", &plain, "job", "list"])
        .env_remove("TESSERA_TLS_DIR")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("hint: a coordinator serves mutual TLS unless it runs with --insecure-dev"),
        "{}",
        text(&out)
    );
    let log = federation.log("coordinator");
    assert!(
        log.contains("tls accept error"),
        "handshake refusals not logged:\n{log}"
    );
    assert!(log.contains("connection refused: no client certificate"), "{log}");

    // An auditor reads the ledger and nothing else.
    let auditor = ca.join("auditors/regulator");
    let out = federation.tessera_as(&auditor, &["ledger", "verify", "--allow-pending"]);
    assert!(out.status.success(), "{}", text(&out));
    let job = federation.write_job("job.toml", &tessera_tests::example_job(&[]));
    let out = federation.tessera_as(&auditor, &["job", "submit", job.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("may not call the Jobs service"), "{}", text(&out));

    // A flooding auditor is cut off; a site's requests still go through.
    let flood = LedgerClient::new(channel(&federation.addr, &auditor).await);
    let mut exhausted = 0;
    for _ in 0..60 {
        if let Err(status) = flood.clone().get_blocks(pb::GetBlocksRequest::default()).await {
            assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
            assert!(status.message().contains("rate limit"), "{status:?}");
            exhausted += 1;
        }
    }
    assert!(exhausted >= 20, "only {exhausted} of 60 requests refused");
    let hungary = channel(&federation.addr, &federation.state_dir("hungary")).await;
    FederationClient::new(hungary)
        .heartbeat(pb::HeartbeatRequest {
            site_id: "hungary".into(),
            ..Default::default()
        })
        .await
        .unwrap();

    // An operator cannot take part in a round.
    let operator = channel(&federation.addr, &ca.join("operators/lead")).await;
    let status = FederationClient::new(operator)
        .poll_task(pb::PollTaskRequest {
            site_id: "cleveland".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("may not call the Federation service"));

    // Site cleveland's certificate cannot act as hungary: not poll its tasks
    // (where its secure-aggregation shares would come), not endorse.
    let cleveland = channel(&federation.addr, &federation.state_dir("cleveland")).await;
    let status = FederationClient::new(cleveland.clone())
        .poll_task(pb::PollTaskRequest {
            site_id: "hungary".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("cannot act as site `hungary`"), "{status:?}");
    let status = LedgerClient::new(cleveland.clone())
        .endorse(pb::EndorseRequest {
            site_id: "hungary".into(),
            height: 0,
            block_hash: vec![0; 32],
            signature: vec![0; 64],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    // As itself it is admitted, with a version fit for `tessera sites`.
    let status = FederationClient::new(cleveland.clone())
        .heartbeat(pb::HeartbeatRequest {
            site_id: "cleveland".into(),
            version: "0.1\n\u{1b}[31m".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("printable"), "{status:?}");
    // The daemon's session id (how a restart is told) is hex, and short.
    for session in ["not hex", &"a".repeat(33)] {
        let status = FederationClient::new(cleveland.clone())
            .poll_task(pb::PollTaskRequest {
                site_id: "cleveland".into(),
                session: session.into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains("at most 32 hex digits"), "{status:?}");
    }
    FederationClient::new(cleveland)
        .heartbeat(pb::HeartbeatRequest {
            site_id: "cleveland".into(),
            version: "0.1.0".into(),
            ..Default::default()
        })
        .await
        .unwrap();

    // Revocation takes effect on the next request, without a restart.
    let revoked = ca.join("operators/revoked-lead");
    let out = federation.tessera_as(&revoked, &["job", "list"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = federation.ca_command(&["revoke", "--operator", "revoked-lead"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = federation.tessera_as(&revoked, &["job", "list"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("has been revoked"), "{}", text(&out));

    // A revoked site is refused at once and, from the coordinator's next
    // start, is out of the ledger's membership.
    let out = federation.ca_command(&["revoke", "--site", "va"]);
    assert!(out.status.success(), "{}", text(&out));
    let va = channel(&federation.addr, &federation.state_dir("va")).await;
    let status = FederationClient::new(va)
        .heartbeat(pb::HeartbeatRequest {
            site_id: "va".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    // The coordinator notices the list and records the revocation at once.
    // (Read from the coordinator's file: the operator's request budget in
    // this test is small.)
    let revocations = |federation: &Federation| -> usize {
        let out = std::process::Command::new(bin("tessera"))
            .args(["ledger", "show", "--json"])
            .arg(federation.db())
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        let blocks: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        blocks
            .as_array()
            .unwrap()
            .iter()
            .filter(|b| {
                b["kind"] == "membership_change"
                    && b["payload"]["change"] == "site_revoked"
                    && b["payload"]["site"]["id"] == "va"
            })
            .count()
    };
    let mut recorded = 0;
    for _ in 0..200 {
        recorded = revocations(&federation);
        if recorded > 0 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(recorded, 1, "the revocation of va never reached the ledger");
    // A restart (which compares the roster with the ledger) does not record
    // it twice, and the chain verifies.
    federation.restart_coordinator();
    assert_eq!(revocations(&federation), 1);
    let out = federation.tessera(&["ledger", "verify", "--allow-pending"]);
    assert!(out.status.success(), "{}", text(&out));

    let log = federation.log("coordinator");
    for refusal in [
        "call refused for this role",
        "site impersonation refused",
        "endorsement under another identity refused",
        "revoked identity refused",
        "request over the rate limit refused",
    ] {
        assert!(log.contains(refusal), "`{refusal}` not logged:\n{log}");
    }
}
