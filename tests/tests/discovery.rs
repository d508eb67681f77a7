//! Federated category discovery end to end (issue 13), real daemons over
//! mutual TLS: the consortium's schema lists no `restecg` category; each
//! site proposes the values it has at least k rows of, signed; every site
//! forms the same categories from the cohort's proposals, and a coordinator
//! that tampers with them is refused.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use tessera_tests::{Federation, example_job, heart_data, repo, site_config};

/// Three hospitals (min_sites 3): in each, `restecg` 2 is rarer than k.
const SITES: [&str; 3] = ["hungary", "switzerland", "va"];

/// This test's k (`[policy] discovery_min_rows`).
const K: u64 = 30;

/// The heart schema, with `restecg`'s categories discovered per job.
fn discovering_schema(federation: &Federation) -> PathBuf {
    let text = std::fs::read_to_string(repo().join("examples/heart-disease/schema.toml")).unwrap();
    let declared = "categories = [\"0\", \"1\", \"2\"]";
    assert!(text.contains(declared));
    let path = federation.dir.path().join("schema.toml");
    std::fs::write(&path, text.replace(declared, "discover = true\nother = true")).unwrap();
    path
}

/// Starts the sites over their real data with the discovering schema.
fn start_sites(federation: &mut Federation) {
    let schema = discovering_schema(federation);
    let policy = federation.write_job("policy.toml", &format!("discovery_min_rows = {K}\n"));
    for site in SITES {
        let config = site_config(federation.dir.path(), site, &heart_data(site), &schema);
        federation.add_site_config(site, &config, &["--policy", policy.to_str().unwrap()]);
    }
}

/// Rows per `restecg` value (the 7th field), counted here from the raw
/// file over the rows the schema keeps (no `?` in a used field: all but
/// slope, ca and thal), numbers as numbers (`2.0` is `2`).
fn restecg_counts(site: &str) -> BTreeMap<String, u64> {
    let mut counts = BTreeMap::new();
    for line in std::fs::read_to_string(heart_data(site)).unwrap().lines() {
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        if fields
            .iter()
            .enumerate()
            .any(|(i, f)| !(10..=12).contains(&i) && *f == "?")
        {
            continue;
        }
        let value = (fields[6].parse::<f64>().unwrap() as i64).to_string();
        *counts.entry(value).or_insert(0) += 1;
    }
    counts
}

fn short_job(federation: &Federation, rounds: &str) -> u64 {
    let file = federation.write_job(
        "job.toml",
        &example_job(&[
            ("rounds", rounds),
            ("round_timeout_s", "20"),
            ("wait_for_sites_s", "60"),
        ]),
    );
    federation.submit(&file)
}

/// What a site stored of the job's categories, if anything.
fn formed(federation: &Federation, site: &str, job: u64) -> Option<serde_json::Value> {
    let path = federation
        .state_dir(site)
        .join("categories")
        .join(format!("job-{job}.json"));
    let text = std::fs::read_to_string(path).ok()?;
    Some(serde_json::from_str(&text).unwrap())
}

/// `check`, and `inspect` of a job held for the data team, show what the
/// site would propose, offline.
#[test]
fn check_and_inspect_show_what_the_site_would_propose() {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(repo().join("examples/heart-disease/schema.toml")).unwrap();
    let schema = dir.path().join("schema.toml");
    std::fs::write(
        &schema,
        text.replace(
            "categories = [\"0\", \"1\", \"2\"]",
            "discover = true\nother = true\ntop_k = 1",
        ),
    )
    .unwrap();
    let config = site_config(dir.path(), "va", &heart_data("va"), &schema);
    let mut text = std::fs::read_to_string(&config).unwrap();
    text = text.replace("\n[data]", &format!("\n[policy]\ndiscovery_min_rows = {K}\n\n[data]"));
    std::fs::write(&config, text).unwrap();
    let out = std::process::Command::new(tessera_tests::bin("tessera-participant"))
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    // va keeps 57 rows of 1, 55 of 0, 18 of 2; top_k 1 keeps the most
    // frequent of those with k rows.
    let counts = restecg_counts("va");
    assert_eq!((counts["1"], counts["0"], counts["2"]), (57, 55, 18));
    assert!(
        stdout.lines().any(|l| l.trim_start().starts_with("restecg ")
            && l.ends_with(&format!(
                " 1 of 3 values with at least {K} rows (discovery_min_rows; top_k 1): 1"
            ))),
        "{stdout}"
    );

    // A job held for the data team (as the daemon keeps one).
    let job = example_job(&[]);
    let hash = tessera_protocol::ids::sha256_hex(job.as_bytes());
    let state = dir.path().join("state");
    std::fs::create_dir_all(state.join("pending")).unwrap();
    std::fs::write(state.join("pending").join(format!("{hash}.toml")), &job).unwrap();
    std::fs::write(
        state.join("pending").join(format!("{hash}.txt")),
        "30 rounds > policy.max_rounds 10",
    )
    .unwrap();
    let out = std::process::Command::new(tessera_tests::bin("tessera-participant"))
        .args(["inspect", &hash[..12], "--config"])
        .arg(&config)
        .arg("--state-dir")
        .arg(&state)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        stdout.contains("the values it proposes as categories, without counts")
            && stdout.contains(&format!(
                "restecg 1 of 3 values with at least {K} rows (discovery_min_rows; top_k 1): 1"
            )),
        "{stdout}"
    );
}

#[test]
fn sites_form_the_same_categories_from_their_signed_proposals_and_train() {
    let mut federation = Federation::start(&SITES);
    start_sites(&mut federation);
    let id = short_job(&federation, "2");
    let status = federation.wait_for(id, &["finished", "failed", "cancelled"]);
    assert_eq!(status["job"]["status"], "finished", "{status:#}\n{}", federation.logs());

    // Expected from the raw files: the values some site has k rows of.
    let counts: BTreeMap<&str, BTreeMap<String, u64>> = SITES.iter().map(|s| (*s, restecg_counts(s))).collect();
    let proposed = |site: &str| -> BTreeSet<String> {
        counts[site]
            .iter()
            .filter(|(_, n)| **n >= K)
            .map(|(v, _)| v.clone())
            .collect()
    };
    let expected: BTreeSet<String> = SITES.iter().flat_map(|s| proposed(s)).collect();
    assert_eq!(expected, BTreeSet::from(["0".to_owned(), "1".to_owned()]));
    // Switzerland has 12 kept rows of `1`, under k: it does not propose it,
    // yet encodes it, from the others' proposals.
    assert_eq!(proposed("switzerland"), BTreeSet::from(["0".to_owned()]));
    // `2` is in every site's data, under k rows in each: no site named it.
    for (site, c) in &counts {
        assert!((1..K).contains(&c["2"]), "{site}: {c:?}");
    }
    for site in SITES {
        let stored = formed(&federation, site, id).unwrap_or_else(|| panic!("{site} formed no categories"));
        assert_eq!(stored["categories"]["restecg"], serde_json::json!(["0", "1"]), "{site}");
        assert!(federation.log(site).contains("categories formed"), "{site}");
    }
    // One encoding for every site (0, 1 and the other bucket): none was
    // left out of the rounds for encoding its rows otherwise.
    let rounds = status["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 2, "{status:#}");
    for round in rounds {
        assert_eq!(round["sites"].as_array().unwrap().len(), SITES.len(), "{status:#}");
    }
}

/// The coordinator adds a rare code to another site's proposal when it
/// relays them: every site refuses before computing anything, and no site
/// encodes a category nobody proposed.
#[test]
fn adversarial_real_daemons_refuse_a_category_the_coordinator_slipped_in() {
    let mut federation = Federation::start_with(&SITES, &["--malicious", "inject-category"]);
    assert!(
        federation.log("coordinator").contains("MALICIOUS COORDINATOR"),
        "the coordinator was not built with the malicious test mode"
    );
    start_sites(&mut federation);
    let id = short_job(&federation, "1");
    let status = federation.wait_for(id, &["finished", "failed", "cancelled"]);
    assert_eq!(status["job"]["status"], "failed", "{status:#}");
    assert!(status["rounds"].as_array().unwrap().is_empty(), "{status:#}");
    // Each site told the coordinator why it stopped, and the lead sees it.
    assert!(
        status
            .to_string()
            .contains("refused the category proposals the coordinator relayed"),
        "{status:#}"
    );
    for site in SITES {
        let log = federation.log(site);
        assert!(
            log.contains("refusing the relayed category proposals") && log.contains("is not signed by its roster key"),
            "{site}:\n{log}"
        );
        assert!(formed(&federation, site, id).is_none(), "{site} formed categories");
        let egress = std::fs::read_to_string(federation.state_dir(site).join("egress.jsonl")).unwrap();
        assert!(!egress.contains("\"kind\":\"SubmitStats\""), "{site} sent statistics");
    }
}
