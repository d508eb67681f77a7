//! A site that cannot take part says why, and the ML lead sees it at once:
//! a site whose data file has a bad cell declines every job with a reason
//! naming the column (never the cell), a site whose schema encodes the data
//! differently is left out by name, and a job that can no longer reach its
//! `min_sites` fails at once with both reasons instead of waiting for its
//! round timeout. Real processes, real TLS, real ledger.

use tessera_tests::{Federation, bin, example_job, files_under, repo, site_config};

/// A value only the bad file holds: it must stay at the site.
const SECRET: &str = "Smith-4711";

#[test]
fn a_site_with_unusable_data_or_another_encoding_is_named_and_the_job_fails_at_once() {
    let mut federation = Federation::start(&["cleveland", "hungary", "switzerland", "va"]);
    let dir = federation.dir.path().to_owned();
    let heart = repo().join("../shared/data/heart-disease");
    let schema = repo().join("examples/heart-disease/schema.toml");

    // va: one age in its file is a name.
    let va = std::fs::read_to_string(heart.join("processed.va.data")).expect("va data");
    let mut lines: Vec<String> = va.lines().map(str::to_owned).collect();
    lines[56] = lines[56].replacen(lines[56].split(',').next().unwrap(), SECRET, 1);
    let bad_data = dir.join("va-bad.csv");
    std::fs::write(&bad_data, lines.join("\n") + "\n").unwrap();
    // hungary: its schema labels "num > 1" as positive: another encoding.
    let other_schema = dir.join("hungary-schema.toml");
    let text = std::fs::read_to_string(&schema).unwrap();
    assert!(text.contains("positive_if = \"> 0\""));
    std::fs::write(
        &other_schema,
        text.replace("positive_if = \"> 0\"", "positive_if = \"> 1\""),
    )
    .unwrap();

    for site in ["cleveland", "switzerland"] {
        federation.add_site(site);
    }
    let config = site_config(&dir, "va", &bad_data, &schema);
    federation.add_site_config("va", &config, &[]);
    let config = site_config(&dir, "hungary", &heart.join("processed.hungarian.data"), &other_schema);
    federation.add_site_config("hungary", &config, &[]);

    // A round timeout far beyond the harness's wait: waiting for a site
    // that declined, or for one left out, would fail the test.
    let job = federation.write_job(
        "job.toml",
        &example_job(&[("rounds", "2"), ("min_sites", "3"), ("round_timeout_s", "3600")]),
    );
    let job_id = federation.submit(&job);
    let status = federation.wait_for(job_id, &["failed", "finished"]);
    let logs = federation.logs();
    assert_eq!(status["job"]["status"], "failed", "{status:#}\n{logs}");
    let error = status["job"]["error"].as_str().unwrap();
    assert!(
        error.contains("only 2 sites sent statistics, min_sites is 3"),
        "{error}"
    );
    let va_reason = "this site's data is not usable: column `age` holds a value the schema cannot encode";
    assert!(
        error.contains(&format!("va declined: job {job_id}: {va_reason}")),
        "{error}"
    );
    assert!(
        error.contains("hungary left out: its data is encoded differently from the other sites'"),
        "{error}"
    );

    // `job status` lists both, with their state; the two others accepted.
    let sites: Vec<(String, String, String)> = status["sites"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["site_id"].as_str().unwrap().to_owned(),
                s["state"].as_str().unwrap().to_owned(),
                s["reason"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let state = |site: &str| sites.iter().find(|s| s.0 == site).cloned().unwrap_or_default();
    assert_eq!(state("cleveland").1, "accepted", "{sites:?}");
    assert_eq!(state("switzerland").1, "accepted", "{sites:?}");
    assert_eq!(state("hungary").1, "left out", "{sites:?}");
    assert_eq!(state("va").1, "declined", "{sites:?}");
    assert!(state("va").2.contains(va_reason), "{sites:?}");
    let out = federation.tessera(&["job", "status", &job_id.to_string()]);
    let human = String::from_utf8_lossy(&out.stdout);
    assert!(human.contains("  sites: 2 accepted"), "{human}");
    assert!(
        human.contains(&format!("  va declined: job {job_id}: {va_reason}")),
        "{human}"
    );

    // The site's own log has the detail (file, line, value); nothing else
    // does: not its egress log or ledger replica, not the coordinator's
    // database, ledger or log, not another site.
    let va_log = federation.log("va");
    assert!(va_log.contains(SECRET) && va_log.contains("va-bad.csv:57"), "{va_log}");
    assert_secret_only_in(&dir, &bad_data);
}

/// Two daemons on one kit would share one ledger replica, one egress log
/// and one record of the rounds the site contributed to: the second refuses
/// to start, saying which process holds the state directory.
#[test]
fn a_second_daemon_on_one_state_directory_refuses_to_start() {
    let mut federation = Federation::start(&["cleveland"]);
    federation.add_site("cleveland");
    let lock = federation.state_dir("cleveland").join("daemon.lock");
    let mut holder = String::new();
    for _ in 0..1200 {
        holder = std::fs::read_to_string(&lock).unwrap_or_default();
        if !holder.trim().is_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    assert!(
        !holder.trim().is_empty(),
        "the first daemon holds no lock: {}",
        federation.logs()
    );
    let mut second = std::process::Command::new(bin("tessera-participant"))
        .arg("run")
        .arg("--config")
        .arg(repo().join("examples/heart-disease/sites/cleveland.toml"))
        .arg("--coordinator")
        .arg(&federation.addr)
        .arg("--state-dir")
        .arg(federation.state_dir("cleveland"))
        .arg("--tls-dir")
        .arg(federation.state_dir("cleveland"))
        .arg("--roster")
        .arg(federation.ca().join("roster.toml"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start a second participant");
    // A guard against a daemon that starts anyway (it would run forever),
    // not a measure of speed.
    let mut status = None;
    for _ in 0..2400 {
        status = second.try_wait().expect("wait for the second participant");
        if status.is_some() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let Some(status) = status else {
        second.kill().ok();
        panic!("a second daemon started on the same state directory");
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut second.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "another tessera-participant (pid {}) is running with the state directory",
            holder.trim()
        )),
        "{stderr}"
    );
    // The first one is untouched: it still holds the lock.
    assert_eq!(std::fs::read_to_string(&lock).unwrap(), holder);
}

/// A site whose data breaks mid-job (its streamed file replaced by one with
/// a bad cell after the first round) stops taking part after a few failed
/// tasks and says why, once: the coordinator drops it at once instead of
/// waiting out the round (an hour here), the others finish the job, and
/// the ML lead sees the column, never the value.
#[test]
fn a_site_whose_data_breaks_mid_job_stops_and_says_why() {
    let mut federation = Federation::start(&["cleveland", "hungary", "switzerland", "va"]);
    let dir = federation.dir.path().to_owned();
    let heart = repo().join("../shared/data/heart-disease");
    let schema = repo().join("examples/heart-disease/schema.toml");
    for site in ["cleveland", "hungary", "switzerland"] {
        federation.add_site(site);
    }
    // va streams its file (nothing kept in memory): every pass reads it.
    let data = dir.join("va.csv");
    let good = std::fs::read_to_string(heart.join("processed.va.data")).unwrap();
    std::fs::write(&data, &good).unwrap();
    let config = site_config(&dir, "va", &data, &schema);
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace("[data]\n", "[data]\nin_memory_mib = 0\n")).unwrap();
    federation.add_site_config("va", &config, &[]);

    let job = federation.write_job(
        "job.toml",
        &example_job(&[
            ("rounds", "200"),
            ("dropout_after_s", "3600"),
            ("round_timeout_s", "3600"),
        ]),
    );
    let job_id = federation.submit(&job);
    for _ in 0..600 {
        if federation.status(job_id)["job"]["rounds_done"].as_u64().unwrap_or(0) >= 1 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // Replaced whole (a rename), as an extract job would: one age is a name.
    let mut lines: Vec<String> = good.lines().map(str::to_owned).collect();
    lines[56] = lines[56].replacen(lines[56].split(',').next().unwrap(), SECRET, 1);
    let broken = dir.join("va.csv.new");
    std::fs::write(&broken, lines.join("\n") + "\n").unwrap();
    std::fs::rename(&broken, &data).unwrap();

    let status = federation.wait_for(job_id, &["finished", "failed", "cancelled"]);
    assert_eq!(status["job"]["status"], "finished", "{status:#}\n{}", federation.logs());
    let va = status["sites"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["site_id"] == "va")
        .cloned()
        .unwrap_or_default();
    assert_eq!(va["state"], "left out", "{status:#}");
    let reason = va["reason"].as_str().unwrap_or_default();
    assert!(
        reason.starts_with("stopped taking part: this site's data failed mid-job: ") && reason.contains("column `age`"),
        "{reason}"
    );
    let rounds = status["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 200);
    let last: Vec<&str> = rounds.last().unwrap()["sites"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    assert_eq!(last, ["cleveland", "hungary", "switzerland"]);
    // Said once, and the value stayed at the site.
    let egress = std::fs::read_to_string(federation.state_dir("va").join("egress.jsonl")).unwrap();
    assert_eq!(egress.matches("\"kind\":\"ReportProblem\"").count(), 1, "{egress}");
    assert_secret_only_in(&dir, &data);
}

/// Checks that no file under `dir` holds the secret cell value but the
/// site's data file and its own log.
fn assert_secret_only_in(dir: &std::path::Path, data: &std::path::Path) {
    for file in files_under(dir) {
        if file == data || file.file_name().is_some_and(|n| n == "va.log") {
            continue;
        }
        let bytes = std::fs::read(&file).unwrap_or_default();
        assert!(
            !bytes.windows(SECRET.len()).any(|w| w == SECRET.as_bytes()),
            "{} holds the site's cell value",
            file.display()
        );
    }
}
