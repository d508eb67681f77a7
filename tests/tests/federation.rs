//! A real four-hospital federation: coordinator and participants as separate
//! processes on loopback, driven by the real `tessera` CLI.

use std::collections::BTreeSet;

use tessera_tests::{Federation, SITES, example_job, repo, site_config};

/// Mean test accuracy the 3-round model must exceed. A converged logistic
/// regression reaches about 0.81 here; the initial random model about 0.5.
const ACCURACY_FLOOR: f64 = 0.72;

#[test]
fn four_hospitals_train_three_rounds() {
    let mut federation = Federation::start_with(&SITES, &["--metrics-listen", "127.0.0.1:0"]);
    for site in SITES {
        federation.add_site(site);
    }
    let job = federation.write_job("job.toml", &example_job(&[("rounds", "3")]));
    let job_id = federation.submit(&job);
    let status = federation.wait_for(job_id, &["finished", "failed", "cancelled"]);
    assert_eq!(status["job"]["status"], "finished", "{status:#}\n{}", federation.logs());

    let rounds = status["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 3);
    let all: BTreeSet<&str> = SITES.into_iter().collect();
    for round in rounds {
        let sites: BTreeSet<&str> = round["sites"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap())
            .collect();
        assert_eq!(sites, all, "round {} lacks a site", round["round"]);
        assert!(round["dropped"].as_array().unwrap().is_empty());
    }

    // The global model changes every round: the initial model (evaluated in
    // round 1) and each round's result all differ.
    let metrics = status["metrics"].as_array().unwrap();
    let initial_hash = metrics.iter().find(|m| m["model_of_round"] == 0).unwrap()["model_hash"]
        .as_str()
        .unwrap();
    let mut hashes = vec![initial_hash];
    hashes.extend(rounds.iter().map(|r| r["model_hash"].as_str().unwrap()));
    let distinct: BTreeSet<&str> = hashes.iter().copied().collect();
    assert_eq!(distinct.len(), 4, "model did not change every round: {hashes:?}");

    // Every site evaluated every model, including the final one.
    for model_of_round in 0..=3 {
        let sites: BTreeSet<&str> = metrics
            .iter()
            .filter(|m| m["model_of_round"] == model_of_round)
            .map(|m| m["site_id"].as_str().unwrap())
            .collect();
        assert_eq!(sites, all, "metrics of model {model_of_round}");
    }
    let mean_of = |round: u64| {
        let accs: Vec<f64> = metrics
            .iter()
            .filter(|m| m["model_of_round"] == round)
            .map(|m| m["accuracy"].as_f64().unwrap())
            .collect();
        accs.iter().sum::<f64>() / accs.len() as f64
    };
    let final_mean = status["final_mean_accuracy"].as_f64().unwrap();
    assert!((final_mean - mean_of(3)).abs() < 1e-12);
    assert!(
        final_mean > ACCURACY_FLOOR,
        "final mean accuracy {final_mean} <= {ACCURACY_FLOOR}"
    );
    assert!(final_mean > mean_of(0), "training did not improve on the initial model");

    // The evaluation pooled by secure sum equals the test-row-weighted mean of
    // the sites' own reports: the loss for every model, the accuracy (a
    // count of rows, summed once per job) for the final model only.
    let pooled = status["pooled"].as_array().unwrap();
    assert_eq!(pooled.len(), 4, "{pooled:?}");
    for p in pooled {
        let round = p["model_of_round"].as_u64().unwrap();
        let reports: Vec<&serde_json::Value> = metrics.iter().filter(|m| m["model_of_round"] == round).collect();
        let n: u64 = reports.iter().map(|m| m["n_test"].as_u64().unwrap()).sum();
        let weighted = |key: &str| -> f64 {
            reports
                .iter()
                .map(|m| m[key].as_f64().unwrap() * m["n_test"].as_u64().unwrap() as f64)
                .sum::<f64>()
                / n as f64
        };
        assert_eq!(p["n_test"].as_u64().unwrap(), n);
        assert_eq!(p["n_sites"], 4);
        assert!((p["loss"].as_f64().unwrap() - weighted("loss")).abs() < 1e-4, "{p}");
        if round == 3 {
            assert!(
                (p["accuracy"].as_f64().unwrap() - weighted("accuracy")).abs() < 1e-9,
                "{p}"
            );
        } else {
            assert!(p["accuracy"].is_null(), "a count pooled in a training round: {p}");
        }
    }

    // Clinical metrics (issue 11): the weighted training loss of every
    // round, summed securely; the pooled Brier score of every model, equal
    // to the test-row-weighted mean of the sites' own; the final model's
    // pooled ROC AUC, AP, calibration and threshold metrics from the summed
    // score histograms.
    for round in rounds {
        let loss = round["mean_train_loss"].as_f64();
        assert!(
            loss.is_some_and(|l| l.is_finite() && l > 0.0),
            "round without train loss: {round}"
        );
    }
    for p in pooled {
        let round = p["model_of_round"].as_u64().unwrap();
        let reports: Vec<&serde_json::Value> = metrics.iter().filter(|m| m["model_of_round"] == round).collect();
        let n: f64 = reports.iter().map(|m| m["n_test"].as_f64().unwrap()).sum();
        let weighted: f64 = reports
            .iter()
            .map(|m| m["brier"].as_f64().unwrap() * m["n_test"].as_f64().unwrap())
            .sum();
        let brier = p["brier"].as_f64().unwrap_or_else(|| panic!("no pooled Brier: {p}"));
        assert!((brier - weighted / n).abs() < 1e-4, "{p} vs {}", weighted / n);
        let is_final = round == 3;
        assert_eq!(p["roc_auc"].is_number(), is_final, "{p}");
    }
    let final_pooled = &status["final_pooled"];
    for field in [
        "roc_auc",
        "average_precision",
        "brier",
        "sensitivity",
        "specificity",
        "ppv",
    ] {
        let v = final_pooled[field]
            .as_f64()
            .unwrap_or_else(|| panic!("{field}: {final_pooled}"));
        assert!((0.0..=1.0).contains(&v), "{field}: {final_pooled}");
    }
    assert!(
        final_pooled["calibration_intercept"]
            .as_f64()
            .is_some_and(f64::is_finite)
    );
    assert!(final_pooled["calibration_slope"].as_f64().is_some_and(f64::is_finite));
    assert!(final_pooled["roc_auc"].as_f64().unwrap() > 0.7, "{final_pooled}");
    // A site whose test split has one class has no AUC: `null`, shown as
    // "n/a (one class)"; no table shows NaN.
    let one_class = metrics
        .iter()
        .filter(|m| m["model_of_round"] == 3)
        .inspect(|m| assert!(m["brier"].is_number(), "{m}"))
        .any(|m| m["roc_auc"].is_null());
    let out = federation.tessera(&["job", "status", &job_id.to_string()]);
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && !shown.contains("NaN"), "{shown}");
    assert!(shown.contains("pooled (secure)"), "{shown}");
    assert_eq!(shown.contains("n/a (one class)"), one_class, "{shown}");

    // Differencing: each site declared its row counts in its signed
    // acceptance; its declared test count is the one it evaluated on, and
    // every round's total weight is computed from the declarations of its
    // contributors (weight_cap 1000), not summed.
    let out = federation.tessera(&["ledger", "show", "--json", "--job", &job_id.to_string()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let blocks: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let blocks = blocks.as_array().unwrap();
    // The final model's metrics block records the pooled clinical metrics.
    let final_block = blocks
        .iter()
        .find(|b| b["kind"] == "metrics" && b["payload"]["model_of_round"] == 3)
        .expect("final metrics block");
    let recorded = &final_block["payload"]["pooled"]["binary"];
    assert_eq!(recorded["roc_auc"], final_pooled["roc_auc"], "{final_block:#}");
    assert!(
        final_block["payload"]["sites"][0]["binary"]["brier"].is_number(),
        "{final_block:#}"
    );
    let declared: std::collections::BTreeMap<&str, (u64, u64)> = blocks
        .iter()
        .filter(|b| b["kind"] == "job_accepted")
        .map(|b| {
            let c = &b["payload"]["counts"];
            let site = b["payload"]["site"].as_str().unwrap();
            (site, (c["n_train"].as_u64().unwrap(), c["n_test"].as_u64().unwrap()))
        })
        .collect();
    assert_eq!(declared.keys().copied().collect::<BTreeSet<_>>(), all);
    for m in metrics {
        assert_eq!(
            m["n_test"].as_u64().unwrap(),
            declared[m["site_id"].as_str().unwrap()].1,
            "{m}"
        );
    }
    let expected_weight: f64 = declared.values().map(|(n, _)| (*n as f64 / 1000.0).min(1.0)).sum();
    // Every secure summation outside the rounds is committed too.
    let purposes: Vec<&str> = blocks
        .iter()
        .filter(|b| b["kind"] == "summation")
        .map(|b| b["payload"]["purpose"].as_str().unwrap())
        .collect();
    assert_eq!(purposes, ["statistics", "final_evaluation"]);

    // An operator's monitoring: Prometheus text over plain HTTP, on the
    // address the coordinator's log names.
    let log = federation.log("coordinator");
    let metrics_addr = log
        .split("serving /metrics and /healthz at http://")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no metrics address in the log:\n{log}"));
    let (code, body) = http_get(metrics_addr, "/healthz");
    assert_eq!((code, body.as_str()), (200, "ok\n"));
    let (code, body) = http_get(metrics_addr, "/metrics");
    assert_eq!(code, 200, "{body}");
    let samples = parse_openmetrics(&body);
    assert_eq!(samples["tessera_rounds_total"], 3.0, "{body}");
    assert_eq!(samples["tessera_round_duration_seconds_count"], 3.0, "{body}");
    assert_eq!(samples["tessera_jobs_ended_total{status=\"finished\"}"], 1.0, "{body}");
    assert_eq!(samples["tessera_sites_connected"], 4.0, "{body}");
    assert_eq!(samples["tessera_job_running"], 0.0, "{body}");
    // Each round's four masked inputs, and more than the models sent.
    assert!(samples["tessera_update_bytes_received_total"] > 0.0, "{body}");
    assert!(samples["tessera_model_bytes_sent_total"] > 0.0, "{body}");
    // Three rounds, the statistics and the final evaluation: five secure
    // sums, each through the unmask stage.
    assert_eq!(
        samples["tessera_secagg_stage_duration_seconds_count{stage=\"unmask\"}"], 5.0,
        "{body}"
    );
    let (code, _) = http_get(metrics_addr, "/nothing-here");
    assert_eq!(code, 404);
    // The cohort is sealed, as exactly the accepting sites, before any sum.
    let kinds: Vec<&str> = blocks.iter().map(|b| b["kind"].as_str().unwrap()).collect();
    let seal = kinds.iter().position(|k| *k == "cohort_sealed").expect("a cohort seal");
    assert!(
        seal < kinds.iter().position(|k| *k == "summation").unwrap(),
        "{kinds:?}"
    );
    let cohort: BTreeSet<&str> = blocks[seal]["payload"]["cohort"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    assert_eq!(cohort, all);
    let round_blocks: Vec<&serde_json::Value> = blocks.iter().filter(|b| b["kind"] == "round_completed").collect();
    assert_eq!(round_blocks.len(), 3);
    for b in round_blocks {
        let w = b["payload"]["total_weight"].as_f64().unwrap();
        assert!((w - expected_weight).abs() < 1e-12, "{w} vs {expected_weight}");
    }

    // Each site's egress log lists only protocol messages.
    let allowed = [
        "Heartbeat",
        "PollTask",
        "SubmitStats",
        "FetchModel",
        "FetchAggregate",
        "ReportMetrics",
        "SubmitUpdate",
        "SubmitSecAgg",
        "GetBlocks",
        "EndorseBlocks",
        "DecideJob",
    ];
    for site in SITES {
        let sequence = federation.egress_kinds(site);
        let kinds: BTreeSet<&str> = sequence.iter().map(String::as_str).collect();
        assert!(kinds.iter().all(|k| allowed.contains(k)), "{site}: {kinds:?}");
        for needed in [
            "SubmitStats",
            "SubmitSecAgg",
            "SubmitUpdate",
            "ReportMetrics",
            "EndorseBlocks",
            // Rounds 2, 3 and the final evaluation start from models the
            // site derived from the committed aggregates.
            "FetchAggregate",
        ] {
            assert!(kinds.contains(needed), "{site} never logged {needed}");
        }
        // A secure job's site never takes a model on the coordinator's word.
        assert!(!kinds.contains("FetchModel"), "{site} downloaded a model");
        // A summation step's answer carries the next step: a site sends
        // its next message without polling for it in between.
        let chained = sequence
            .windows(2)
            .filter(|w| w[0] == "SubmitSecAgg" && (w[1] == "SubmitSecAgg" || w[1] == "SubmitUpdate"))
            .count();
        assert!(chained > 0, "{site} polled after every secure-aggregation message");
    }

    // Export: the model file matches the last round's hash and the manifest.
    let out_path = federation.dir.path().join("model.bin");
    let out = federation.tessera(&[
        "model",
        "export",
        &job_id.to_string(),
        "--out",
        out_path.to_str().unwrap(),
        "--format",
        "raw",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let bytes = std::fs::read(&out_path).unwrap();
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(federation.dir.path().join("model.bin.json")).unwrap()).unwrap();
    let last_hash = rounds[2]["model_hash"].as_str().unwrap();
    assert_eq!(manifest["model_hash"], last_hash);
    // The manifest points to the ledger block that recorded the model.
    let height = manifest["ledger_block"]["height"]
        .as_u64()
        .expect("manifest names its block");
    let out = federation.tessera(&["ledger", "show", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let blocks: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let block = &blocks[height as usize];
    assert_eq!(block["kind"], "round_completed");
    assert_eq!(block["payload"]["model_sha256"], last_hash);
    assert_eq!(block["hash"], manifest["ledger_block"]["hash"]);
    assert_eq!(tessera_protocol::ids::sha256_hex(&bytes), last_hash);
    // 15 encoded features + bias.
    assert_eq!(bytes.len(), 16 * 4);
    assert_eq!(manifest["n_features"], 15);

    // A long job can be cancelled while it runs (1000 rounds: the sites'
    // default policy limit; beyond it every site would hold the job for its
    // data team, and the job would fail at once for want of sites).
    let long = federation.write_job("long.toml", &example_job(&[("rounds", "1000")]));
    let long_id = federation.submit(&long);
    federation.wait_for(long_id, &["running"]);
    let out = federation.tessera(&["job", "cancel", &long_id.to_string()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let status = federation.wait_for(long_id, &["finished", "failed", "cancelled"]);
    assert_eq!(status["job"]["status"], "cancelled");
    // Cancelling again is refused with a clear message.
    let out = federation.tessera(&["job", "cancel", &long_id.to_string()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already cancelled"));
}

/// A schema that imputes the heart data's missing values, and flags them,
/// instead of dropping their rows (or FLamby's three sparse columns) keeps
/// all 920 rows. The pooled means come from the secure statistics (missing
/// counts included); the secure job trains and evaluates on every row.
#[test]
fn imputed_missing_values_keep_every_row_in_a_secure_job() {
    let mut federation = Federation::start(&SITES);
    let dir = federation.dir.path().to_owned();
    let heart = repo().join("../shared/data/heart-disease");
    let flamby = std::fs::read_to_string(repo().join("examples/heart-disease/schema.toml")).unwrap();
    let mut text = flamby.replace(
        "missing_markers = [\"?\"]",
        "missing_markers = [\"?\"]\nmissing = \"indicator\"",
    );
    for (column, kind) in [
        ("slope", "kind = \"numeric\""),
        ("ca", "kind = \"numeric\""),
        ("thal", "kind = \"categorical\"\ncategories = [\"3\", \"6\", \"7\"]"),
    ] {
        let from = format!("name = \"{column}\"\nkind = \"drop\"");
        assert!(text.contains(&from), "{from}");
        text = text.replace(&from, &format!("name = \"{column}\"\n{kind}"));
    }
    let schema = dir.join("imputing-schema.toml");
    std::fs::write(&schema, text).unwrap();
    for (site, file) in [
        ("cleveland", "cleveland"),
        ("hungary", "hungarian"),
        ("switzerland", "switzerland"),
        ("va", "va"),
    ] {
        let data = heart.join(format!("processed.{file}.data"));
        federation.add_site_config(site, &site_config(&dir, site, &data, &schema), &[]);
    }
    let job_id = federation.submit(&federation.write_job("job.toml", &example_job(&[("rounds", "3")])));
    let status = federation.wait_for(job_id, &["finished", "failed", "cancelled"]);
    assert_eq!(status["job"]["status"], "finished", "{status:#}\n{}", federation.logs());
    // Every row of every hospital, in the signed declarations and in the
    // pooled final evaluation.
    let out = federation.tessera(&["ledger", "show", "--json", "--job", &job_id.to_string()]);
    let blocks: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows: u64 = blocks
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["kind"] == "job_accepted")
        .map(|b| {
            let c = &b["payload"]["counts"];
            c["n_train"].as_u64().unwrap() + c["n_test"].as_u64().unwrap()
        })
        .sum();
    assert_eq!(rows, 920);
    let pooled = status["pooled"].as_array().unwrap().last().unwrap().clone();
    let accuracy = pooled["accuracy"].as_f64().unwrap();
    assert!(
        accuracy > ACCURACY_FLOOR,
        "{pooled}: an imputed value reached a model as NaN?"
    );
}

/// A rare outcome (severe disease, 13.5 % of rows; none at Hungary) with
/// `pos_weight = "balanced"`: the weight is the cohort's negatives per
/// positive over the training rows, which every site derives from the
/// secure statistics and the coordinator announces (a site would refuse
/// another, so the job finishing shows they agree). The weighted model
/// ranks the rare class: its pooled ROC AUC, from the summed histograms.
#[test]
fn a_balanced_class_weight_is_derived_from_the_secure_statistics() {
    let mut federation = Federation::start(&SITES);
    let dir = federation.dir.path().to_owned();
    let schema_path = repo().join("examples/heart-severe/schema.toml");
    let schema = tessera_models::schema::Schema::from_toml(&std::fs::read_to_string(&schema_path).unwrap()).unwrap();
    let (mut rows, mut positives) = (0u64, 0u64);
    for site in SITES {
        let data = tessera_tests::heart_data(site);
        let (table, _) = tessera_models::data::read_csv(&data, &schema).unwrap();
        let (train, _) = table.split(&schema.split);
        rows += train.len() as u64;
        positives += train.n_positive() as u64;
        federation.add_site_config(site, &site_config(&dir, site, &data, &schema_path), &[]);
    }
    let expected = (rows - positives) as f64 / positives as f64;
    let job = std::fs::read_to_string(repo().join("examples/heart-severe/job.toml"))
        .unwrap()
        .replace("rounds = 400", "rounds = 3");
    let job_id = federation.submit(&federation.write_job("job.toml", &job));
    let status = federation.wait_for(job_id, &["finished", "failed", "cancelled"]);
    assert_eq!(status["job"]["status"], "finished", "{status:#}\n{}", federation.logs());
    let log = federation.log("coordinator");
    assert!(
        log.contains(&format!("pos_weight={expected}")),
        "expected pos_weight={expected} ({positives} positive of {rows}):\n{log}"
    );
    let auc = status["final_pooled"]["roc_auc"].as_f64().unwrap();
    assert!(auc > 0.7, "{:#}", status["final_pooled"]);
    // Hungary's test split has no severe case: its own AUC is undefined.
    let hungary = status["metrics"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["site_id"] == "hungary" && m["model_of_round"] == 3)
        .unwrap();
    assert!(hungary["roc_auc"].is_null(), "{hungary}");
}

/// A round that waits for a site that went silent says so, naming the
/// step, the site, how long it has been silent and when it will be
/// dropped, instead of "running" until the dropout window ends.
#[test]
fn job_status_says_what_a_round_waits_for_and_who_is_silent() {
    let mut federation = Federation::running(&SITES);
    let text = example_job(&[
        ("rounds", "200"),
        ("dropout_after_s", "3600"),
        ("round_timeout_s", "3600"),
    ]);
    let job_id = federation.submit(&federation.write_job("job.toml", &text));
    kill_after_first_round(&mut federation, job_id, "switzerland");
    // A guard against a status that never says it, not a measure of speed:
    // the site is named silent once 5 s have passed without a word.
    let mut waiting = String::new();
    for _ in 0..600 {
        waiting = federation.status(job_id)["waiting"].as_str().unwrap_or("").to_owned();
        if waiting.contains("switzerland (silent") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(
        waiting.contains("switzerland (silent") && waiting.contains("s; dropped at 3600 s)"),
        "{waiting:?}\n{}",
        federation.log("coordinator")
    );
    let step = waiting.split(" from ").next().unwrap();
    assert!(
        [
            "advertise keys",
            "share keys",
            "masked input",
            "consistency check",
            "unmask",
            "metrics"
        ]
        .contains(&step),
        "{waiting}"
    );
    let out = federation.tessera(&["job", "status", &job_id.to_string()]);
    let human = String::from_utf8_lossy(&out.stdout);
    assert!(
        human.contains("  waiting for ") && human.contains("switzerland (silent"),
        "{human}"
    );
    let out = federation.tessera(&["job", "cancel", &job_id.to_string()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let status = federation.wait_for(job_id, &["finished", "failed", "cancelled"]);
    assert_eq!(status["job"]["status"], "cancelled", "{status:#}");
    assert!(status["waiting"].is_null(), "{status:#}");
}

/// A site that crashes mid-round and comes back long before the dropout
/// window ends is dropped at once from the summation whose keys and shares
/// it lost, and takes part again from the next round. The window and the
/// round deadline are an hour here, past the harness's wait: a coordinator
/// that waited for the restarted site would fail the test.
#[test]
fn a_site_that_restarts_mid_round_is_dropped_at_once_and_rejoins() {
    let mut federation = Federation::running(&SITES);
    let text = example_job(&[
        ("rounds", "40"),
        ("dropout_after_s", "3600"),
        ("round_timeout_s", "3600"),
    ]);
    let job_id = federation.submit(&federation.write_job("job.toml", &text));
    kill_after_first_round(&mut federation, job_id, "switzerland");
    federation.add_site("switzerland");
    let status = federation.wait_for(job_id, &["finished", "failed", "cancelled"]);
    assert_eq!(status["job"]["status"], "finished", "{status:#}\n{}", federation.logs());
    let rounds = status["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 40);
    let with_switzerland = |r: &serde_json::Value| r["sites"].as_array().unwrap().iter().any(|s| s == "switzerland");
    assert!(with_switzerland(rounds.last().unwrap()), "{status:#}");
    // A round that went on without it (with the dropout window at an hour,
    // only its restart can have dropped it) was told why. It need not have
    // happened: the site may have come back before it owed anything.
    let dropped = federation
        .log("coordinator")
        .contains("site restarted during a secure summation: dropped from it at once");
    let dropped_in_a_round = rounds.iter().any(|r| {
        r["dropped"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s.as_str().unwrap().starts_with("switzerland "))
    });
    assert!(dropped || !dropped_in_a_round, "{status:#}");
}

/// Kills `site` as soon as the job's first round is in: it dies inside a
/// later round, at whatever secure-aggregation phase it is in.
fn kill_after_first_round(federation: &mut Federation, job_id: u64, site: &str) {
    let rounds_done = || federation.status(job_id)["job"]["rounds_done"].as_u64().unwrap_or(0);
    for _ in 0..3000 {
        if rounds_done() >= 1 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // Mid-job, not in the statistics phase: what the callers test.
    assert!(rounds_done() >= 1, "round 1 never came in:\n{}", federation.logs());
    federation.kill_site(site);
}

/// A plain HTTP/1.1 GET: the status code and the body.
fn http_get(addr: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).expect("connect to the metrics address");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status code");
    (code, body.to_owned())
}

/// Parses the OpenMetrics text format strictly enough to catch a malformed
/// exposition: `# HELP/TYPE/UNIT` comments, samples `name{labels} value`,
/// `# EOF` last. Returns each sample's value by `name{labels}`.
fn parse_openmetrics(text: &str) -> std::collections::BTreeMap<String, f64> {
    let mut samples = std::collections::BTreeMap::new();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.last(), Some(&"# EOF"), "{text}");
    let is_name = |n: &str| {
        !n.is_empty()
            && !n.starts_with(|c: char| c.is_ascii_digit())
            && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    };
    for line in &lines[..lines.len() - 1] {
        if let Some(comment) = line.strip_prefix("# ") {
            let mut words = comment.splitn(3, ' ');
            let (kind, name) = (words.next().unwrap(), words.next().unwrap_or(""));
            assert!(["HELP", "TYPE", "UNIT"].contains(&kind) && is_name(name), "{line}");
            continue;
        }
        let (key, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("not a sample: {line}"));
        let name = key.split('{').next().unwrap();
        assert!(is_name(name), "bad metric name: {line}");
        if let Some(labels) = key.strip_prefix(name).filter(|l| !l.is_empty()) {
            let inner = labels.strip_prefix('{').and_then(|l| l.strip_suffix('}')).expect(line);
            for pair in inner.split(',') {
                let (k, v) = pair.split_once('=').expect(line);
                assert!(
                    is_name(k) && v.starts_with('"') && v.ends_with('"'),
                    "bad label: {line}"
                );
            }
        }
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("bad value: {line}")),
        };
        assert!(
            samples.insert(key.to_owned(), value).is_none(),
            "duplicate sample: {line}"
        );
    }
    samples
}

#[test]
fn invalid_job_is_refused_naming_the_field() {
    let federation = Federation::start(&SITES);
    for (from, to, field) in [
        ("kind = \"logistic_regression\"", "kind = \"transformer\"", "model.kind"),
        (
            "learning_rate = 0.05",
            "learning_rate = -0.05",
            "training.learning_rate",
        ),
        ("min_sites = 3", "min_sites = 1", "min_sites"),
    ] {
        let text = example_job(&[]).replace(from, to);
        let path = federation.write_job("bad.toml", &text);
        let out = federation.tessera(&["job", "submit", path.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(1), "{field}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(field), "error does not name {field}: {stderr}");
    }
    // A binary file, a 100 KiB line and a 6 MB file get a short refusal,
    // not their bytes echoed back.
    let line = |bytes: usize| format!("{}name = \"{}\"\n", example_job(&[]), "x".repeat(bytes));
    for (text, reason) in [
        (
            format!("{}\0\u{1}\u{2}", example_job(&[])),
            "holds control characters: a binary file, not text",
        ),
        (line(100 << 10), "is longer than 64 KiB; not a configuration file"),
        (line(6 << 20), "a configuration file is at most 1024 KiB"),
    ] {
        let path = federation.write_job("odd.toml", &text);
        let out = federation.tessera(&["job", "submit", path.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(1));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(reason) && stderr.len() < 1000, "{stderr}");
    }
    // Nothing was queued.
    let out = federation.tessera(&["job", "list", "--json"]);
    let jobs: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(jobs.as_array().unwrap().len(), 0);
}

#[test]
fn check_reports_flamby_preprocessing_offline() {
    // (site, rows read, rows kept, train, test) of FLamby's Fed-Heart-Disease.
    let expected = [
        ("cleveland", 303, 303, 199, 104),
        ("hungary", 294, 261, 172, 89),
        ("switzerland", 123, 46, 30, 16),
        ("va", 200, 130, 85, 45),
    ];
    for (site, read, kept, train, test) in expected {
        let out = std::process::Command::new(tessera_tests::bin("tessera-participant"))
            .args(["check", "--config"])
            .arg(tessera_tests::repo().join(format!("examples/heart-disease/sites/{site}.toml")))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains(&format!("rows: {read} read, {kept} kept")),
            "{site}: {text}"
        );
        assert!(text.contains(&format!("train {train} (")), "{site}: {text}");
        assert!(text.contains(&format!("test {test} (")), "{site}: {text}");
        assert!(text.contains("15 encoded features"), "{site}: {text}");
    }
}

#[test]
fn a_participant_killed_mid_job_does_not_stop_the_rounds() {
    let mut federation = Federation::running(&SITES);
    let text = example_job(&[("rounds", "200"), ("dropout_after_s", "2")]);
    let job_id = federation.submit(&federation.write_job("job.toml", &text));
    kill_after_first_round(&mut federation, job_id, "switzerland");
    let status = federation.wait_for(job_id, &["finished", "failed", "cancelled"]);
    assert_eq!(
        status["job"]["status"],
        "finished",
        "{status:#}\n{}",
        federation.log("coordinator")
    );
    let rounds = status["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 200);
    let dropped_in: Vec<u64> = rounds
        .iter()
        .filter(|r| {
            r["dropped"]
                .as_array()
                .unwrap()
                .iter()
                .any(|d| d.as_str().unwrap().starts_with("switzerland"))
        })
        .map(|r| r["round"].as_u64().unwrap())
        .collect();
    assert_eq!(
        dropped_in.len(),
        1,
        "switzerland should drop out of exactly one round: {dropped_in:?}"
    );
    let last = rounds.last().unwrap();
    let sites: Vec<&str> = last["sites"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    assert_eq!(sites, ["cleveland", "hungary", "va"]);
    // The model still improved over the initial one.
    assert!(status["final_mean_accuracy"].as_f64().unwrap() > ACCURACY_FLOOR);
}

#[test]
fn sites_refuse_plaintext_jobs_unless_their_policy_allows_them() {
    let mut federation = Federation::start(&SITES[..3]);
    for site in &SITES[..3] {
        federation.add_site(site);
    }
    let text = tessera_tests::plaintext_job(&[("round_timeout_s", "3")]);
    let job_id = federation.submit(&federation.write_job("plain.toml", &text));
    let status = federation.wait_for(job_id, &["finished", "failed", "cancelled"]);
    assert_eq!(status["job"]["status"], "failed");
    assert!(
        status["job"]["error"]
            .as_str()
            .unwrap()
            .contains("only 0 sites sent statistics"),
        "{status:#}"
    );
    for site in &SITES[..3] {
        // The site logs the refusal once its decision is sent, so the job
        // can end (everyone declined) a moment before the line is written.
        let logged = || federation.log(site).contains("policy does not allow it");
        for _ in 0..200 {
            if logged() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        assert!(logged(), "{site} did not log its refusal");
        let egress = std::fs::read_to_string(federation.state_dir(site).join("egress.jsonl")).unwrap();
        assert!(
            !egress.contains("SubmitStats") && !egress.contains("SubmitUpdate"),
            "{site} sent data for a refused job"
        );
    }
    // Each refusal is on the ledger, signed by the site that refused.
    let out = federation.tessera(&["ledger", "show", "--json", "--job", &job_id.to_string()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let blocks: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut refused: Vec<&str> = blocks
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["kind"] == "job_accepted" && b["payload"]["accepted"] == false)
        .map(|b| b["payload"]["site"].as_str().unwrap())
        .collect();
    refused.sort();
    assert_eq!(refused, SITES[..3]);
    let out = federation.tessera(&["ledger", "verify", "--allow-pending"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn a_site_can_keep_its_metrics_local_and_still_count_in_the_pooled_evaluation() {
    let mut federation = Federation::start(&SITES);
    for site in &SITES[..3] {
        federation.add_site(site);
    }
    federation.add_site_with("va", &["--withhold-site-metrics"]);
    let job_id = federation.submit(&federation.write_job("job.toml", &example_job(&[("rounds", "2")])));
    let status = federation.wait_for(job_id, &["finished", "failed", "cancelled"]);
    assert_eq!(status["job"]["status"], "finished", "{status:#}");
    let metrics = status["metrics"].as_array().unwrap();
    assert!(!metrics.is_empty());
    assert!(
        metrics.iter().all(|m| m["site_id"] != "va"),
        "va's own metrics reached the coordinator"
    );
    // VA's 45 test rows are in every pooled evaluation: 104 + 89 + 16 + 45.
    for p in status["pooled"].as_array().unwrap() {
        assert_eq!(p["n_test"], 254, "{p}");
        assert_eq!(p["n_sites"], 4);
    }
}

/// The (round, stage) of each secure summation of `job_id` the coordinator's
/// database holds in flight, read with Python's sqlite3 (an outside
/// reader). The stage is the variant index in the bincode snapshot (0: the
/// key exchange, 1: shares, 2: masked inputs, 3: consistency, 4: unmask),
/// after the job id, the round, the members and the vector length, each a
/// bincode varint (one byte below 251; 251, 252, 253: a 2, 4, 8-byte
/// little-endian integer follows).
fn summations_in_flight(db: &std::path::Path, job_id: u64) -> Vec<(u32, u64)> {
    let script = r#"
import sqlite3, sys
def varint(b, i):
    t = b[i]
    if t < 251: return t, i + 1
    n = {251: 2, 252: 4, 253: 8}[t]
    return int.from_bytes(b[i + 1:i + 1 + n], 'little'), i + 1 + n
c = sqlite3.connect(sys.argv[1], timeout=5)
for (r, b) in c.execute('SELECT round, snapshot FROM secure_sessions WHERE job_id = ?', (int(sys.argv[2]),)):
    i = 0
    _, i = varint(b, i)
    _, i = varint(b, i)
    n, i = varint(b, i)
    for _ in range(n):
        l, i = varint(b, i)
        i += l
    _, i = varint(b, i)
    stage, i = varint(b, i)
    print(r, stage)
"#;
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(db)
        .arg(job_id.to_string())
        .output()
        .expect("run python3");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let (round, stage) = l.trim().split_once(' ')?;
            Some((round.parse().ok()?, stage.parse().ok()?))
        })
        .collect()
}

/// Freezes the coordinator (SIGSTOP) once the database holds a summation of
/// `job_id` in flight at a round ≥ 1 and a stage ≥ `min_stage`; false if the
/// job ended first. A frozen process writes nothing more, so what the
/// database holds is what a SIGKILL now leaves behind.
fn freeze_with_summation_in_flight(federation: &Federation, job_id: u64, min_stage: u64) -> bool {
    let signal = |sig: &str| {
        let status = std::process::Command::new("kill")
            .args([sig, &federation.pid("coordinator").to_string()])
            .status()
            .expect("run kill");
        assert!(status.success());
    };
    for _ in 0..2000 {
        if federation.status(job_id)["job"]["status"] != "running" {
            return false;
        }
        signal("-STOP");
        if summations_in_flight(&federation.db(), job_id)
            .iter()
            .any(|&(round, stage)| round >= 1 && stage >= min_stage)
        {
            return true;
        }
        signal("-CONT");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    panic!(
        "no summation in flight at stage {min_stage} or later:\n{}",
        federation.logs()
    );
}

/// A coordinator killed (SIGKILL) while a secure summation is in flight
/// resumes the job when it starts again: the summation goes on from its
/// stored stage (the sites answer a step they already took with the answer
/// they gave), and the job finishes with each round recorded once and a
/// ledger that verifies. Before, every such job failed. Two sites keep their
/// metrics to themselves (their report says only that they evaluated), and
/// the dropout window and round deadline are an hour: a resumed round that
/// waited for a report it already had would fail the test.
#[test]
fn a_coordinator_killed_mid_round_resumes_the_job_and_counts_no_round_twice() {
    let mut federation = Federation::start(&SITES);
    for site in SITES {
        let withhold: &[&str] = if site == "cleveland" || site == "va" {
            &["--withhold-site-metrics"]
        } else {
            &[]
        };
        federation.add_site_with(site, withhold);
    }
    let rounds = 12;
    let text = example_job(&[
        ("rounds", "12"),
        ("dropout_after_s", "3600"),
        ("round_timeout_s", "3600"),
    ]);
    let job_id = federation.submit(&federation.write_job("job.toml", &text));
    // Killed once at each stage a summation can be stored at (when the job
    // is not over first).
    let mut kills = 0;
    for stage in 0..5 {
        if !freeze_with_summation_in_flight(&federation, job_id, stage) {
            break;
        }
        federation.restart_coordinator();
        kills += 1;
    }
    let status = federation.wait_for(job_id, &["finished", "failed", "cancelled"]);
    assert_eq!(status["job"]["status"], "finished", "{status:#}\n{}", federation.logs());
    assert!(kills >= 1, "the job ended before the coordinator could be killed");
    let log = federation.log("coordinator");
    assert!(log.contains("job resumes after a coordinator restart"), "{log}");
    assert!(log.contains("secure summation resumes from its stored stage"), "{log}");
    assert_eq!(status["job"]["rounds_done"], rounds);
    assert!(
        summations_in_flight(&federation.db(), job_id).is_empty(),
        "snapshots outlive their job"
    );

    // Each round is on the ledger once, in order, each from the model the
    // round before produced; the chain verifies.
    let out = federation.tessera(&["ledger", "verify", "--allow-pending"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = federation.tessera(&["ledger", "show", "--json"]);
    let blocks: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ledger show --json");
    let completed: Vec<&serde_json::Value> = blocks
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["kind"] == "round_completed" && b["payload"]["job_id"] == job_id)
        .map(|b| &b["payload"])
        .collect();
    let numbers: Vec<u64> = completed.iter().map(|p| p["round"].as_u64().unwrap()).collect();
    assert_eq!(
        numbers,
        (1..=rounds).collect::<Vec<u64>>(),
        "rounds counted twice or missing"
    );
    for pair in completed.windows(2) {
        assert_eq!(pair[1]["base_model_sha256"], pair[0]["model_sha256"]);
    }
    let ended: Vec<&serde_json::Value> = blocks
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["kind"] == "job_ended" && b["payload"]["job_id"] == job_id)
        .collect();
    assert_eq!(ended.len(), 1, "{ended:?}");
    assert_eq!(ended[0]["payload"]["status"], "finished");
}

/// A site whose daemon restarts while the coordinator is down lost its part
/// of the summation the coordinator resumes: the coordinator knows it from
/// the session id it stored, and drops the site from that summation at
/// once. The dropout window and the round deadline are an hour here, past
/// the harness's wait: a coordinator that waited for the site would fail
/// the test.
#[test]
fn a_site_restarted_while_the_coordinator_was_down_is_dropped_from_the_resumed_summation() {
    let mut federation = Federation::running(&SITES);
    let text = example_job(&[
        ("rounds", "12"),
        ("dropout_after_s", "3600"),
        ("round_timeout_s", "3600"),
    ]);
    let job_id = federation.submit(&federation.write_job("job.toml", &text));
    let dropped = |federation: &Federation| {
        federation
            .log("coordinator")
            .contains("site restarted while the coordinator was down: dropped from the resumed summation at once")
    };
    // Past the key exchange: a summation resumed at its key exchange takes
    // a restarted site back instead (it holds nothing of it yet).
    assert!(
        freeze_with_summation_in_flight(&federation, job_id, 1),
        "the job ended first"
    );
    federation.stop_coordinator();
    federation.kill_site("cleveland");
    federation.add_site("cleveland");
    federation.restart_coordinator();
    let status = federation.wait_for(job_id, &["finished", "failed", "cancelled"]);
    assert_eq!(status["job"]["status"], "finished", "{status:#}\n{}", federation.logs());
    assert!(dropped(&federation), "{}", federation.log("coordinator"));
    assert_eq!(status["job"]["rounds_done"], 12);
}
