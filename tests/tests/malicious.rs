//! A malicious coordinator against real participant daemons over mutual
//! TLS. The coordinator binary of test builds can be told to attack
//! (`--malicious ATTACK`, feature `malicious`, compiled out of release
//! builds); the daemons must refuse, say why in their logs, and nothing
//! secret may reach the coordinator.

use tessera_tests::{Federation, SITES, example_job};

fn attacked(attack: &str) -> Federation {
    let mut federation = Federation::start_with(&SITES, &["--malicious", attack]);
    assert!(
        federation.log("coordinator").contains("MALICIOUS COORDINATOR"),
        "the coordinator was not built with the malicious test mode"
    );
    for site in SITES {
        federation.add_site(site);
    }
    federation
}

/// A short job: the attacks end it in its preprocessing summation. The
/// timeout leaves the cohort seal time to be endorsed on a loaded machine
/// (with 5 s it sometimes was not, and the job failed before the attack).
fn job(federation: &Federation) -> u64 {
    let file = federation.write_job(
        "job.toml",
        &example_job(&[("rounds", "1"), ("round_timeout_s", "20"), ("wait_for_sites_s", "60")]),
    );
    federation.submit(&file)
}

fn egress(federation: &Federation, site: &str) -> String {
    std::fs::read_to_string(federation.state_dir(site).join("egress.jsonl")).unwrap_or_default()
}

/// How many masked inputs (or updates) `site` sent: the bodies of its
/// `SubmitUpdate` uploads in its egress log.
fn inputs_sent(federation: &Federation, site: &str) -> usize {
    egress(federation, site)
        .lines()
        .filter(|l| l.contains("\"kind\":\"SubmitUpdate\"") && l.contains("\"chunks\""))
        .count()
}

/// Attack 3 end to end: the coordinator sets `secure = false` in its request
/// for a secure job's statistics. Every site refuses; no statistics leave.
#[test]
fn adversarial_real_daemons_refuse_a_plaintext_statistics_request() {
    let federation = attacked("plaintext-stats");
    let id = job(&federation);
    let status = federation.wait_for(id, &["finished", "failed", "cancelled"]);
    assert_eq!(status["job"]["status"], "failed", "{status:#}");
    assert!(
        status["job"]["error"].as_str().unwrap().contains("sent statistics"),
        "{status:#}"
    );
    assert!(status["rounds"].as_array().unwrap().is_empty(), "{status:#}");
    for site in SITES {
        let log = federation.log(site);
        assert!(
            log.contains("asked for this site's data in the clear"),
            "{site}:\n{log}"
        );
        assert!(
            !egress(&federation, site).contains("\"kind\":\"SubmitStats\""),
            "{site} sent statistics"
        );
    }
}

/// Attack 1 end to end: in the consistency check each site is shown a
/// different survivor set; the coordinator forwards every signature
/// unchecked. No view has a quorum of signatures: every site refuses to
/// reveal any share, the summation aborts and no aggregate or model exists.
#[test]
fn adversarial_real_daemons_reveal_nothing_to_a_coordinator_that_splits_views() {
    let federation = attacked("split-views");
    let id = job(&federation);
    let status = federation.wait_for(id, &["finished", "failed", "cancelled"]);
    assert_eq!(status["job"]["status"], "failed", "{status:#}");
    assert!(
        status["job"]["error"]
            .as_str()
            .unwrap()
            .contains("secure aggregation aborted"),
        "{status:#}"
    );
    assert!(status["rounds"].as_array().unwrap().is_empty(), "{status:#}");
    for site in SITES {
        let log = federation.log(site);
        assert!(
            log.contains("revealing nothing") && log.contains("consistency check failed"),
            "{site}:\n{log}"
        );
    }
    let log = federation.log("coordinator");
    assert!(log.contains("0 unmask responses received after the split"), "{log}");
    assert!(!log.contains("a site revealed shares"), "{log}");
}

/// The coordinator serves the released statistics sum with one word
/// changed (so sites would normalise their features as it chose): every
/// site checks what it downloads against the sum's ledger block, refuses to
/// train on it, and sends nothing for the round.
#[test]
fn adversarial_real_daemons_refuse_an_aggregate_their_ledger_does_not_commit_to() {
    let federation = attacked("tampered-aggregate");
    let id = job(&federation);
    let status = federation.wait_for(id, &["finished", "failed", "cancelled"]);
    assert_eq!(status["job"]["status"], "failed", "{status:#}");
    // The sites that made the sealed cohort in time are the ones that fetch
    // the sum; every site must send nothing.
    let out = federation.tessera(&["ledger", "show", "--json", "--job", &id.to_string()]);
    let blocks: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let cohort = blocks
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["kind"] == "cohort_sealed")
        .expect("a cohort seal")["payload"]["cohort"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_owned())
        .collect::<Vec<_>>();
    assert!(cohort.len() >= 3, "{cohort:?}");
    for site in &cohort {
        let log = federation.log(site);
        assert!(
            log.contains("is not the one its ledger block commits to"),
            "{site}:\n{log}\n{status:#}\n{}",
            federation.log("coordinator")
        );
    }
    // The statistics summation's masked input went out (round 0); nothing
    // was trained or sent for round 1.
    for site in SITES {
        let log = federation.log(site);
        assert!(
            !log.contains("local training done") && !log.contains("round=1"),
            "{site} trained or sent for round 1:\n{log}"
        );
    }
}

/// Attack 7 end to end: a coordinator that signs the ledger with another key
/// than the one the consortium's kits pin (a fresh chain of its own making)
/// is refused by every site at the genesis block: the site halts, says why,
/// and never trains.
#[test]
fn adversarial_real_daemons_refuse_a_genesis_their_kit_does_not_pin() {
    let dir = tempfile::tempdir().unwrap();
    let other_key = dir.path().join("other-ledger.key");
    let mut federation = Federation::start_with(&SITES, &["--ledger-key", other_key.to_str().unwrap()]);
    let site = SITES[0];
    federation.add_site(site);
    let halt = federation.state_dir(site).join("HALTED");
    for _ in 0..400 {
        if halt.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let reason = std::fs::read_to_string(&halt).unwrap_or_else(|_| panic!("{} never halted", site));
    assert!(
        reason.contains("genesis names coordinator key") && reason.contains("pins"),
        "{reason}"
    );
    assert!(federation.log(site).contains("ledger genesis pinned by the kit"));
    assert!(
        !std::fs::read_to_string(federation.state_dir(site).join("egress.jsonl"))
            .unwrap_or_default()
            .contains("\"kind\":\"Endorse\""),
        "the site endorsed a genesis it does not pin"
    );
}

/// The coordinator adds a member whose key it holds (its operator edits the
/// roster it reads and restarts it): every honest site's own CA-issued
/// roster does not list that member, so none endorses the `site_added`
/// block, which never becomes final; nothing after it can be final either,
/// so the new member never counts towards any quorum.
#[test]
fn adversarial_real_daemons_never_endorse_a_member_their_roster_does_not_list() {
    let mut federation = Federation::running(&SITES);
    // The daemons read the roster file at start: edit it only once each
    // has read it and synced (else they would start with mallory listed).
    for _ in 0..600 {
        if SITES
            .iter()
            .all(|s| federation.log(s).contains("ledger block verified"))
        {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let roster_path = federation.ca().join("roster.toml");
    let mut roster = tessera_protocol::roster::parse(&std::fs::read_to_string(&roster_path).unwrap()).unwrap();
    let held = tessera_protocol::secagg::crypto::SigningKey::from_pkcs8(
        &tessera_protocol::secagg::crypto::SigningKey::generate_pkcs8(),
    )
    .unwrap();
    let mallory = tessera_protocol::ids::SiteId::new("mallory").unwrap();
    roster.insert(mallory, held.public_key());
    std::fs::write(&roster_path, tessera_protocol::roster::to_toml(&roster)).unwrap();
    federation.restart_coordinator();

    let objected = |site: &str| {
        federation
            .log(site)
            .contains("adds `mallory`, which this site's roster does not list")
    };
    for _ in 0..600 {
        if SITES.iter().all(|s| objected(s)) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    for site in SITES {
        assert!(objected(site), "{site} never objected:\n{}", federation.log(site));
    }
    // Every site has now passed the block by without endorsing it: it is
    // the first pending block, whatever comes later.
    let out = std::process::Command::new(tessera_tests::bin("tessera"))
        .args(["ledger", "verify", "--json", "--allow-pending"])
        .arg(federation.db())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let out = std::process::Command::new(tessera_tests::bin("tessera"))
        .args(["ledger", "show", "--json"])
        .arg(federation.db())
        .output()
        .unwrap();
    let blocks: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let added = blocks
        .as_array()
        .unwrap()
        .iter()
        .position(|b| b["kind"] == "membership_change" && b["payload"]["site"]["id"] == "mallory")
        .expect("the coordinator recorded the addition");
    assert_eq!(report["first_pending"]["height"], added as u64, "{report:#}");
}

/// Row 27 end to end: the coordinator announces the job's training round as
/// an evaluation only, to have the sites send score histograms (whose
/// totals are their positive and negative test rows) in a summation besides
/// the final one. Every site takes the round's kind from the job file it
/// accepted, refuses before it evaluates, and sends no metrics and no
/// input besides its statistics.
#[test]
fn adversarial_real_daemons_refuse_to_evaluate_a_training_round_as_final() {
    let federation = attacked("evaluate-twice");
    let id = job(&federation);
    let status = federation.wait_for(id, &["finished", "failed", "cancelled"]);
    assert_eq!(status["job"]["status"], "failed", "{status:#}");
    assert!(status["rounds"].as_array().unwrap().is_empty(), "{status:#}");
    assert!(status["pooled"].as_array().unwrap().is_empty(), "{status:#}");
    for site in SITES {
        let log = federation.log(site);
        assert!(
            log.contains("round 1 was announced as an evaluation only"),
            "{site}:\n{log}"
        );
        assert!(
            !egress(&federation, site).contains("\"kind\":\"ReportMetrics\""),
            "{site} reported metrics"
        );
        // One masked input left the site: the statistics (round 0).
        assert_eq!(
            inputs_sent(&federation, site),
            1,
            "{site} sent an input besides its statistics"
        );
    }
}

/// Row 28 end to end: the coordinator announces twice the class weight the
/// job's statistics give. Every site derives the weight itself from the
/// statistics sum its ledger commits to, refuses the round, and sends no
/// update.
#[test]
fn adversarial_real_daemons_refuse_a_class_weight_they_did_not_derive() {
    let federation = attacked("skew-class-weight");
    let id = job(&federation);
    let status = federation.wait_for(id, &["finished", "failed", "cancelled"]);
    assert_eq!(status["job"]["status"], "failed", "{status:#}");
    assert!(status["rounds"].as_array().unwrap().is_empty(), "{status:#}");
    for site in SITES {
        let log = federation.log(site);
        assert!(
            log.contains("was announced with class weight 2, but this site derives 1"),
            "{site}:\n{log}"
        );
        assert_eq!(
            inputs_sent(&federation, site),
            1,
            "{site} sent an input besides its statistics"
        );
    }
}
