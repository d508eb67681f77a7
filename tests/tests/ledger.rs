//! The ledger end to end: a real federation writes it, every site replicates
//! and endorses it, the regulator's tools (and an independent Python
//! verifier written from docs/ledger-format.md) check it, and tampering,
//! forks and restarts are caught.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use tessera_tests::{Federation, SITES, bin, example_job, repo};

fn tessera_offline(args: &[&str]) -> Output {
    Command::new(bin("tessera")).args(args).output().expect("run tessera")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn python_verify(path: &Path) -> Output {
    python_verify_with(path, &[])
}

fn python_verify_with(path: &Path, args: &[&str]) -> Output {
    Command::new("python3")
        .arg(repo().join("scripts/verify_ledger.py"))
        .arg(path)
        .args(args)
        .output()
        .expect("run python3 scripts/verify_ledger.py")
}

/// Copies a ledger database with its WAL file (recent pages live there).
fn copy_ledger(db: &Path, copy: &Path) {
    std::fs::copy(db, copy).unwrap();
    let wal = db.with_extension("db-wal");
    if wal.exists() {
        std::fs::copy(&wal, copy.with_extension("db-wal")).unwrap();
    } else {
        let _ = std::fs::remove_file(copy.with_extension("db-wal"));
    }
}

/// Runs SQL on a ledger file with Python's sqlite3 (the tests' stand-in for
/// someone editing the file by hand).
fn edit(path: &Path, sql: &str) {
    let out = Command::new("python3")
        .arg("-c")
        .arg("import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); c.executescript(sys.argv[2]); c.commit()")
        .arg(path)
        .arg(sql)
        .output()
        .expect("run python3");
    assert!(out.status.success(), "{}", text(&out));
}

fn verify_json(path: &Path) -> serde_json::Value {
    let out = tessera_offline(&["ledger", "verify", path.to_str().unwrap(), "--json"]);
    serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{}", text(&out)))
}

/// Waits until every block of the coordinator's chain has its endorsement
/// quorum (the sites endorse the last blocks on their next idle poll).
fn wait_until_final(federation: &Federation) -> serde_json::Value {
    for _ in 0..200 {
        let report = verify_json(&federation.db());
        if report["intact"] == true && report["pending"] == 0 {
            return report;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!("the chain never became final: {}", verify_json(&federation.db()));
}

/// Waits until every site's replica holds the coordinator's whole chain
/// (`wait_until_final` needs only a majority of endorsers to have it).
fn wait_until_replicated(federation: &Federation, blocks: u64) {
    for site in SITES {
        let replica = federation.state_dir(site).join("ledger.db");
        let held = || verify_json(&replica)["blocks"].as_u64().unwrap_or(0);
        for _ in 0..200 {
            if held() >= blocks {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        assert!(held() >= blocks, "{site} holds {} of {blocks} blocks", held());
    }
}

#[test]
fn every_copy_of_the_ledger_verifies_and_any_tampering_names_its_block() {
    let federation = Federation::running(&SITES);
    let job_id = federation.submit(&federation.write_job("job.toml", &example_job(&[("rounds", "3")])));
    let status = federation.wait_for(job_id, &["finished", "failed", "cancelled"]);
    assert_eq!(status["job"]["status"], "finished", "{status:#}");
    let report = wait_until_final(&federation);
    let db = federation.db();

    // genesis, job created, 4 signed site decisions, the cohort seal, the
    // statistics summation, 3 × (round, metrics), the final-evaluation
    // summation, final metrics, job ended.
    assert_eq!(report["blocks"], 17, "{report:#}");
    assert_eq!(report["models_checked"], 4);

    // Output into a closed pipe (`tessera ledger show DB | head`) ends the
    // program by SIGPIPE, as `head` expects, not with a panic.
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let out = Command::new(bin("tessera"))
        .args(["ledger", "show", db.to_str().unwrap()])
        .stdout(writer)
        .output()
        .expect("run tessera");
    assert!(!text(&out).contains("panicked"), "{}", text(&out));
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&out.status),
        Some(13),
        "{:?}: {}",
        out.status,
        text(&out)
    );

    // Read-only through the coordinator's API, and by the independent
    // verifier.
    let out = federation.tessera(&["ledger", "verify"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("ledger intact: 17 blocks"), "{}", text(&out));
    let out = python_verify(&db);
    assert!(out.status.success(), "python verifier: {}", text(&out));

    // Every site's replica holds the same chain and verifies on its own.
    let genesis = report["genesis_hash"].as_str().unwrap();
    for site in SITES {
        // The daemon as an operator sees it: running, connected to this
        // coordinator, last at work on the job's final evaluation (its
        // status file follows within a second).
        let last_task = format!("last task: job {job_id}, round 4");
        let mut out = federation.site_command(site, &["status"]);
        for _ in 0..100 {
            if text(&out).contains(&last_task) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
            out = federation.site_command(site, &["status"]);
        }
        assert!(out.status.success(), "{}", text(&out));
        assert!(text(&out).contains("training: allowed"), "{}", text(&out));
        assert!(
            text(&out).contains(&format!("connected to {} since", federation.addr)) && text(&out).contains(&last_task),
            "{}",
            text(&out)
        );
        let replica = federation.state_dir(site).join("ledger.db");
        let r = verify_json(&replica);
        assert_eq!(r["intact"], true, "{site}: {r:#}");
        assert_eq!(r["genesis_hash"], genesis, "{site}");
        assert!(r["blocks"].as_u64().unwrap() >= 13, "{site}: {r:#}");
        // And as a monitoring script does.
        let out = federation.site_command(site, &["status", "--json"]);
        assert!(out.status.success(), "{}", text(&out));
        let live: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(live["running"], true, "{site}: {live:#}");
        assert_eq!(live["connected"], true, "{site}: {live:#}");
        assert_eq!(live["coordinator"], federation.addr.as_str(), "{site}: {live:#}");
        assert_eq!(live["last_task"]["job_id"], job_id, "{site}: {live:#}");
        assert_eq!(live["last_task"]["step"], "round 4", "{site}: {live:#}");
        assert_eq!(live["ledger"]["genesis_hash"], genesis, "{site}: {live:#}");
        assert_eq!(live["halted"], serde_json::Value::Null, "{site}: {live:#}");
        // A replica gathers the other sites' endorsements of its last blocks
        // only on its next sync: its tail may still be pending.
        let out = python_verify_with(&replica, &["--allow-pending"]);
        assert!(out.status.success(), "python verifier on {site}: {}", text(&out));
    }

    // Finality. Without the last block's endorsements the chain is intact
    // but not final: both verifiers refuse it unless told to accept an
    // unendorsed tail. A non-final block *before* final ones (history a
    // coordinator could still rewrite under endorsed blocks) is refused even
    // then.
    let last = report["blocks"].as_u64().unwrap() - 1;
    for (height, tail) in [(last, true), (5, false)] {
        let copy = federation.dir.path().join(format!("unendorsed-{height}.db"));
        copy_ledger(&db, &copy);
        edit(
            &copy,
            &format!("DELETE FROM ledger_endorsements WHERE height = {height};"),
        );
        let path = copy.to_str().unwrap();
        let strict = tessera_offline(&["ledger", "verify", path]);
        let lenient = tessera_offline(&["ledger", "verify", path, "--allow-pending"]);
        let py_strict = python_verify(&copy);
        let py_lenient = python_verify_with(&copy, &["--allow-pending"]);
        for (who, out) in [("rust", &strict), ("python", &py_strict)] {
            assert_eq!(out.status.code(), Some(1), "{who}, block {height}: {}", text(out));
            assert!(text(out).contains(&format!("block {height}")), "{who}: {}", text(out));
        }
        for (who, out) in [("rust", &lenient), ("python", &py_lenient)] {
            let expected = if tail { Some(0) } else { Some(1) };
            assert_eq!(
                out.status.code(),
                expected,
                "{who} --allow-pending, block {height}: {}",
                text(out)
            );
        }
        if tail {
            assert!(text(&strict).contains("NOT final"), "{}", text(&strict));
        }
    }

    // The listing: every round block names its four contributors, each with
    // a commitment, under a quorum of endorsements.
    let out = tessera_offline(&["ledger", "show", db.to_str().unwrap(), "--json", "--job", "1"]);
    assert!(out.status.success(), "{}", text(&out));
    let blocks: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rounds: Vec<&serde_json::Value> = blocks
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["kind"] == "round_completed")
        .collect();
    assert_eq!(rounds.len(), 3);
    let decisions: Vec<&serde_json::Value> = blocks
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["kind"] == "job_accepted")
        .collect();
    assert_eq!(decisions.len(), 4, "one signed decision per site");
    assert!(decisions.iter().all(|d| d["payload"]["accepted"] == true));
    let height_of = |kind: &str, round: u64| -> u64 {
        blocks
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["kind"] == kind && b["payload"]["round"] == round)
            .and_then(|b| b["height"].as_u64())
            .unwrap()
    };
    let (round1, round2) = (height_of("round_completed", 1), height_of("round_completed", 2));
    for r in &rounds {
        assert_eq!(r["payload"]["contributors"].as_array().unwrap().len(), 4, "{r:#}");
        assert_eq!(r["payload"]["commitments"].as_array().unwrap().len(), 4);
        assert!(r["endorsed_by"].as_array().unwrap().len() >= 3);
    }

    // A receipt for Hungary's contribution to round 2, checked offline; a
    // receipt claiming another commitment fails.
    let receipt = federation.dir.path().join("receipt.json");
    let out = tessera_offline(&[
        "ledger",
        "receipt",
        db.to_str().unwrap(),
        "--site",
        "hungary",
        "--job",
        "1",
        "--round",
        "2",
        "--out",
        receipt.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let out = tessera_offline(&["ledger", "check-receipt", receipt.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("`hungary` contributed to round 2 of job 1"),
        "{}",
        text(&out)
    );
    let out = Command::new("python3")
        .arg(repo().join("scripts/verify_ledger.py"))
        .arg("--receipt")
        .arg(&receipt)
        .output()
        .unwrap();
    assert!(out.status.success(), "python receipt check: {}", text(&out));
    let mut forged: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&receipt).unwrap()).unwrap();
    forged["commitment"] = serde_json::Value::String("00".repeat(32));
    std::fs::write(&receipt, forged.to_string()).unwrap();
    let out = tessera_offline(&["ledger", "check-receipt", receipt.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));

    // Tampering with a copy of the coordinator's file: each edit is caught,
    // by both verifiers, naming the block.
    let cases: [(&str, String, u64); 5] = [
        (
            "a payload byte changed",
            format!(
                "UPDATE ledger_blocks SET payload = CAST(replace(CAST(payload AS TEXT), '\"round\":2', \
                 '\"round\":7') AS BLOB) WHERE height = {round2}"
            ),
            round2,
        ),
        (
            "a block deleted",
            format!("DELETE FROM ledger_blocks WHERE height = {round2}"),
            round2,
        ),
        (
            "two blocks swapped",
            format!(
                "UPDATE ledger_blocks SET height = -1 WHERE height = {round1}; \
                 UPDATE ledger_blocks SET height = {round1} WHERE height = {round1} + 1; \
                 UPDATE ledger_blocks SET height = {round1} + 1 WHERE height = -1"
            ),
            round1,
        ),
        (
            "an endorsement re-attributed to another site",
            format!(
                "DELETE FROM ledger_endorsements WHERE height = {round1} AND site_id = 'va'; \
                 UPDATE ledger_endorsements SET site_id = 'va' WHERE height = {round1} AND site_id = 'cleveland'"
            ),
            round1,
        ),
        (
            "a model file changed",
            "UPDATE models SET data = zeroblob(length(data)) WHERE hash = \
             (SELECT model_hash FROM rounds WHERE round = 2)"
                .to_owned(),
            round2,
        ),
    ];
    for (what, sql, height) in cases {
        // The database is in WAL mode: recent pages are in the -wal file.
        let copy = federation.dir.path().join("tampered.db");
        copy_ledger(&db, &copy);
        edit(&copy, &sql);
        let out = tessera_offline(&["ledger", "verify", copy.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(1), "{what}: {}", text(&out));
        assert!(
            text(&out).contains(&format!("block {height}:")),
            "{what}: expected block {height} to be named: {}",
            text(&out)
        );
        let out = python_verify(&copy);
        assert_eq!(out.status.code(), Some(1), "python, {what}: {}", text(&out));
        // The report of a tampered copy is written, and says so by its exit.
        let page = federation.dir.path().join("tampered.html");
        let out = tessera_offline(&[
            "ledger",
            "report",
            copy.to_str().unwrap(),
            "--out",
            page.to_str().unwrap(),
        ]);
        assert_eq!(out.status.code(), Some(1), "report, {what}: {}", text(&out));
        assert!(text(&out).contains("does not verify"), "report, {what}: {}", text(&out));
        assert!(std::fs::read_to_string(&page).unwrap().contains("id=\"verdict\""));
        assert!(
            text(&out).contains(&format!("block {height}")) || what.contains("model"),
            "python, {what}: {}",
            text(&out)
        );
    }

    // The regulator's report, rendered by a real browser.
    let html = federation.dir.path().join("report.html");
    let out = tessera_offline(&[
        "ledger",
        "report",
        db.to_str().unwrap(),
        "--out",
        html.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    check_report_in_chromium(&html, genesis);
}

/// Loads the report in headless Chromium, checks the rendered page and
/// saves a screenshot beside it (target/ledger-report.png for people).
fn check_report_in_chromium(html: &Path, genesis: &str) {
    let profile = tempfile::tempdir().unwrap();
    let flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ];
    let url = format!("file://{}", html.display());
    let out = Command::new("chromium")
        .args(flags)
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("--dump-dom")
        .arg(&url)
        .output()
        .expect("run chromium (installed by .ci/run: apt-get install chromium)");
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(dom.contains("Ledger intact."), "{dom}");
    assert!(dom.contains(genesis), "genesis hash missing from the report");
    assert!(dom.contains("id=\"rounds\""));
    for site in SITES {
        assert!(dom.contains(site), "{site} missing from the report");
    }
    assert!(dom.matches("<tr><td>").count() >= 3 + 10, "rounds and blocks tables");
    let shot = repo().join("target/ledger-report.png");
    let out = Command::new("chromium")
        .args(flags)
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("--screenshot={}", shot.display()))
        .arg("--window-size=1400,1800")
        .arg(&url)
        .output()
        .expect("run chromium");
    assert!(
        std::fs::metadata(&shot).map(|m| m.len() > 10_000).unwrap_or(false),
        "no screenshot: {}",
        text(&out)
    );
}

#[test]
fn a_restart_keeps_the_chain_and_a_forked_chain_stops_every_site() {
    let mut federation = Federation::running(&SITES);
    // A coordinator killed mid-job resumes it on restart (it goes on past
    // the round it was in), and the chain stays intact.
    let long = federation.submit(&federation.write_job("long.toml", &example_job(&[("rounds", "1000")])));
    let rounds_done = |federation: &Federation| federation.status(long)["job"]["rounds_done"].as_u64().unwrap_or(0);
    for _ in 0..600 {
        if rounds_done(&federation) >= 2 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let before = rounds_done(&federation);
    federation.restart_coordinator();
    for _ in 0..600 {
        if rounds_done(&federation) >= before + 2 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(
        rounds_done(&federation) >= before + 2,
        "the job did not resume:\n{}",
        federation.logs()
    );
    let out = federation.tessera(&["job", "cancel", &long.to_string()]);
    assert!(out.status.success(), "{}", text(&out));
    let status = federation.wait_for(long, &["finished", "failed", "cancelled"]);
    assert_eq!(status["job"]["status"], "cancelled", "{status:#}");
    let report = verify_json(&federation.db());
    assert_eq!(report["intact"], true, "{report:#}");
    let out = tessera_offline(&["ledger", "show", federation.db().to_str().unwrap(), "--json"]);
    let blocks: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let last = blocks.as_array().unwrap().last().unwrap();
    assert_eq!(last["kind"], "job_ended");
    assert_eq!(last["payload"]["status"], "cancelled");

    // The sites follow the restarted coordinator and train the next job.
    let next = federation.submit(&federation.write_job("next.toml", &example_job(&[("rounds", "2")])));
    let status = federation.wait_for(next, &["finished", "failed", "cancelled"]);
    assert_eq!(status["job"]["status"], "finished", "{status:#}");
    let report = wait_until_final(&federation);
    // Every site must hold the block the operator's restore loses, or it
    // sees no fork (its chain continues as the coordinator's does).
    wait_until_replicated(&federation, report["blocks"].as_u64().unwrap());

    // Now the operator restores an older database (the last block is gone)
    // and carries on: the coordinator's chain forks from the sites' replicas.
    federation.stop_coordinator();
    // A site's daemon says it lost the coordinator, and why.
    let live = |federation: &Federation| -> serde_json::Value {
        let out = federation.site_command("va", &["status", "--json"]);
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)))
    };
    for _ in 0..100 {
        if live(&federation)["connected"] == false {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let status = live(&federation);
    assert_eq!(status["connected"], false, "{status:#}");
    assert_eq!(status["running"], true, "{status:#}");
    let error = status["last_error"]["message"].as_str().unwrap_or_default();
    assert!(
        error.starts_with("connection lost") || error.starts_with("cannot connect"),
        "{status:#}"
    );
    edit(
        &federation.db(),
        "DELETE FROM ledger_endorsements WHERE height = (SELECT MAX(height) FROM ledger_blocks); \
         DELETE FROM ledger_blocks WHERE height = (SELECT MAX(height) FROM ledger_blocks);",
    );
    federation.restart_coordinator();
    let forked = federation.submit(&federation.write_job("forked.toml", &example_job(&[("rounds", "2")])));
    for site in SITES {
        let halt = federation.state_dir(site).join("HALTED");
        for _ in 0..300 {
            if halt.exists() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let reason =
            std::fs::read_to_string(&halt).unwrap_or_else(|_| panic!("{site} did not halt: {}", federation.log(site)));
        assert!(reason.contains("forked"), "{site}: {reason}\n{}", federation.log(site));
        assert!(federation.log(site).contains("LEDGER MISMATCH"), "{site}");
        let out = federation.site_command(site, &["status"]);
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        assert!(
            text(&out).contains("HALTED") && text(&out).contains("forked"),
            "{}",
            text(&out)
        );
        let out = federation.site_command(site, &["status", "--json"]);
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        let live: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(
            live["halted"].as_str().unwrap_or_default().contains("forked"),
            "{live:#}"
        );
    }
    // A daemon that is gone is not running, whatever its last word was.
    federation.terminate("va");
    let status = live(&federation);
    assert_eq!(
        (&status["running"], &status["connected"]),
        (&false.into(), &false.into()),
        "{status:#}"
    );
    // No site took part: the forked job never trained a round.
    let status = federation.status(forked);
    assert_eq!(status["job"]["rounds_done"], 0, "{status:#}");
    assert_eq!(status["job"]["status"], "running", "{status:#}");
}

/// The stored model hashes of a coordinator database, read with Python's
/// sqlite3 (an outside reader).
fn stored_models(db: &Path) -> Vec<String> {
    let out = Command::new("python3")
        .arg("-c")
        .arg(
            "import sqlite3,sys\nfor (h,) in sqlite3.connect(sys.argv[1]).execute('SELECT hash FROM models ORDER BY hash'): print(h)",
        )
        .arg(db)
        .output()
        .expect("run python3");
    assert!(out.status.success(), "{}", text(&out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Sends one heartbeat as `site` (with its kit), reporting `ledger_kinds`.
fn heartbeat_as(federation: &Federation, site: &str, ledger_kinds: u32) {
    use tessera_protocol::pb;
    use tessera_protocol::pb::federation_client::FederationClient;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let tls = tessera_protocol::keyfile::client_tls(&federation.state_dir(site)).unwrap();
        let channel = tonic::transport::Channel::from_shared(federation.addr.clone())
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .unwrap();
        FederationClient::new(channel)
            .heartbeat(pb::HeartbeatRequest {
                site_id: site.into(),
                ledger_kinds,
                ..Default::default()
            })
            .await
            .unwrap();
    });
}

/// `tessera job prune` deletes the weights of an ended job's models but its
/// final one, records it in a `models_pruned` block that every site
/// endorses, and leaves a ledger both verifiers accept and a model that
/// still exports; a second prune finds nothing.
#[test]
fn pruned_models_leave_a_verifiable_ledger_and_the_final_model() {
    let mut federation = Federation::running(&SITES);
    let job_id = federation.submit(&federation.write_job("job.toml", &example_job(&[("rounds", "3")])));
    let status = federation.wait_for(job_id, &["finished", "failed", "cancelled"]);
    assert_eq!(status["job"]["status"], "finished", "{status:#}");
    let before = wait_until_final(&federation);
    let db = federation.db();
    // The initial model and the three rounds' models.
    assert_eq!(stored_models(&db).len(), 4);

    let out = federation.tessera(&["job", "prune", "--dry-run"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains(&format!("job {job_id} (finished): 3 model(s)")),
        "{}",
        text(&out)
    );
    assert!(text(&out).contains("nothing deleted"), "{}", text(&out));
    assert_eq!(stored_models(&db).len(), 4);

    let out = federation.tessera(&["job", "prune", "99"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("no job 99"), "{}", text(&out));

    // A site whose software does not know the block kind would stop at
    // it: while one reports so (here, switzerland's old daemon), nothing is
    // pruned.
    federation.kill_site("switzerland");
    heartbeat_as(&federation, "switzerland", 9);
    let out = federation.tessera(&["job", "prune"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("site switzerland has not reported") && text(&out).contains("models_pruned"),
        "{}",
        text(&out)
    );
    assert_eq!(stored_models(&db).len(), 4);
    // Upgraded.
    heartbeat_as(
        &federation,
        "switzerland",
        tessera_protocol::ledger::Kind::ALL.len() as u32,
    );

    let out = federation.tessera(&["job", "prune"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("after compaction"), "{}", text(&out));
    let height = before["blocks"].as_u64().unwrap();
    assert!(
        text(&out).contains(&format!("job {job_id} (finished): 3 model(s)"))
            && text(&out).contains(&format!("ledger block {height}")),
        "{}",
        text(&out)
    );
    // One model left: the final one, as the export below shows.
    let left = stored_models(&db);
    assert_eq!(left.len(), 1, "{left:?}");

    // The sites verify and endorse the block: the chain becomes final again,
    // and both verifiers accept the models that are gone.
    let after = wait_until_final(&federation);
    assert_eq!(after["blocks"].as_u64().unwrap(), height + 1, "{after:#}");
    assert_eq!(after["models_checked"], 1);
    let out = python_verify(&db);
    assert!(out.status.success(), "{}", text(&out));
    let show = tessera_offline(&["ledger", "show", db.to_str().unwrap()]);
    assert!(
        text(&show).contains("the stored weights of 3 model(s) deleted at the request of"),
        "{}",
        text(&show)
    );

    // The final model still exports; nothing is left to prune.
    let scratch = tempfile::tempdir().unwrap();
    let export = scratch.path();
    let out = federation.tessera(&[
        "model",
        "export",
        &job_id.to_string(),
        "--out",
        export.join("model.bin").to_str().unwrap(),
        "--format",
        "raw",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let out = federation.tessera(&["job", "prune"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("nothing to prune"), "{}", text(&out));
    assert_eq!(verify_json(&db)["blocks"].as_u64().unwrap(), height + 1);

    // A copy a regulator can carry: one file, no -wal beside it, from the
    // database file or through the API; both verify on their own.
    let exported = scratch.path().join("export.db");
    let out = tessera_offline(&[
        "ledger",
        "export",
        db.to_str().unwrap(),
        "--out",
        exported.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let from_api = scratch.path().join("api.db");
    let out = federation.tessera(&["ledger", "export", "--out", from_api.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    for file in [&exported, &from_api] {
        assert!(!PathBuf::from(format!("{}-wal", file.display())).exists());
        let report = verify_json(file);
        assert_eq!(report["intact"], true, "{report:#}");
        assert_eq!(report["blocks"].as_u64().unwrap(), height + 1, "{report:#}");
        assert!(python_verify(file).status.success(), "{}", text(&python_verify(file)));
    }
    assert_eq!(verify_json(&exported)["models_checked"], 1);
    // Never over an existing file.
    let out = tessera_offline(&[
        "ledger",
        "export",
        db.to_str().unwrap(),
        "--out",
        exported.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("never overwrites"), "{}", text(&out));
    // A file without its ledger tables (a main file copied without its
    // -wal) is named as such.
    let bare = scratch.path().join("bare.db");
    std::fs::write(&bare, b"").unwrap();
    let out = tessera_offline(&["ledger", "verify", bare.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("bare.db-wal") && text(&out).contains("tessera ledger export"),
        "{}",
        text(&out)
    );

    // A clean stop (SIGTERM) leaves each file whole on its own: the
    // coordinator's database and a site's replica, copied without -wal.
    for (name, file) in [
        ("cleveland", federation.state_dir("cleveland").join("ledger.db")),
        ("coordinator", db.clone()),
    ] {
        let status = federation.terminate(name);
        assert!(status.success(), "{name} exited {status:?}");
        let alone = scratch.path().join(format!("{name}-alone.db"));
        std::fs::copy(&file, &alone).unwrap();
        let report = verify_json(&alone);
        assert_eq!(report["intact"], true, "{name}: {report:#}");
        assert_eq!(report["blocks"].as_u64().unwrap(), height + 1, "{name}: {report:#}");
    }

    // Deleting a model without a block is still caught.
    let copy = scratch.path().join("coordinator.db");
    copy_ledger(&db, &copy);
    edit(&copy, "DELETE FROM models;");
    let report = verify_json(&copy);
    assert_eq!(report["intact"], false, "{report:#}");
    assert_eq!(python_verify(&copy).status.code(), Some(1));
}

/// `--auto-prune unfinished`: a cancelled job's round models go as it ends
/// (its final model stays), on the record; a finished job's stay.
#[test]
fn the_retention_policy_prunes_an_unfinished_jobs_round_models_on_the_record() {
    let mut federation = Federation::start_with(&SITES, &["--auto-prune", "unfinished"]);
    for site in SITES {
        federation.add_site(site);
    }
    let db = federation.db();
    let finished = federation.submit(&federation.write_job("a.toml", &example_job(&[("rounds", "3")])));
    let status = federation.wait_for(finished, &["finished", "failed", "cancelled"]);
    assert_eq!(status["job"]["status"], "finished", "{status:#}");
    // The initial model and the three rounds' models, kept.
    assert_eq!(stored_models(&db).len(), 4);

    // Another seed: no model in common with the first job.
    let long = federation.submit(&federation.write_job("b.toml", &example_job(&[("rounds", "1000"), ("seed", "99")])));
    for _ in 0..600 {
        if federation.status(long)["job"]["rounds_done"].as_u64().unwrap_or(0) >= 3 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = federation.tessera(&["job", "cancel", &long.to_string()]);
    assert!(out.status.success(), "{}", text(&out));
    let status = federation.wait_for(long, &["finished", "failed", "cancelled"]);
    assert_eq!(status["job"]["status"], "cancelled", "{status:#}");
    let pruned_block = || {
        let out = tessera_offline(&["ledger", "show", db.to_str().unwrap(), "--json"]);
        let blocks: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        blocks.as_array().and_then(|b| {
            b.iter()
                .find(|b| b["kind"] == "models_pruned" && b["payload"]["job_id"] == long)
                .cloned()
        })
    };
    for _ in 0..200 {
        if pruned_block().is_some() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let block = pruned_block().unwrap_or_else(|| panic!("no models_pruned block:\n{}", federation.logs()));
    assert_eq!(
        block["payload"]["by"], "the coordinator (--auto-prune unfinished)",
        "{block:#}"
    );
    // The first job's four models and the cancelled job's final one.
    let left = stored_models(&db);
    assert_eq!(left.len(), 5, "{left:?}");
    let rounds = status["rounds"].as_array().unwrap();
    let final_model = rounds.last().unwrap()["model_hash"].as_str().unwrap().to_owned();
    assert!(left.contains(&final_model), "{final_model} not kept: {left:?}");
    let report = wait_until_final(&federation);
    assert_eq!(report["intact"], true, "{report:#}");
    let out = python_verify(&db);
    assert!(out.status.success(), "{}", text(&out));
}
