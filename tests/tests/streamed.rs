//! A federation whose sites stream their files from disk on every pass
//! (`[data] in_memory_mib = 0`, as a table larger than memory is read)
//! trains the model a federation of in-memory sites trains: issue 13's
//! "the federated result with a streamed source equals the in-memory path
//! on the heart demo".

use tessera_tests::{Federation, SITES, example_job, heart_data, plaintext_job, repo, site_config};

/// What a 3-round heart job gave: each round's model hash, and each site's
/// (accuracy, loss) on the final model, by site.
struct Outcome {
    models: Vec<String>,
    metrics: Vec<(String, f64, f64)>,
}

fn federated(streamed: bool, job_text: &str) -> Outcome {
    let mut federation = Federation::start(&SITES);
    let schema = repo().join("examples/heart-disease/schema.toml");
    for site in SITES {
        let config = site_config(federation.dir.path(), site, &heart_data(site), &schema);
        let mut text = std::fs::read_to_string(&config).unwrap();
        text = text.replace("\n[data]\n", "\n[policy]\nallow_insecure_plaintext = true\n\n[data]\n");
        if streamed {
            text = text.replace("[data]\n", "[data]\nin_memory_mib = 0\n");
        }
        std::fs::write(&config, text).unwrap();
        federation.add_site_config(site, &config, &[]);
    }
    let job = federation.write_job("job.toml", job_text);
    let id = federation.submit(&job);
    let status = federation.wait_for(id, &["finished", "failed", "cancelled"]);
    assert_eq!(status["job"]["status"], "finished", "{status:#}\n{}", federation.logs());
    for site in SITES {
        let log = federation.log(site);
        assert!(
            log.contains(&format!("streamed={streamed}")),
            "{site} did not load its data as asked:\n{log}"
        );
    }
    let models = status["rounds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["model_hash"].as_str().unwrap().to_owned())
        .collect();
    let mut metrics: Vec<(String, f64, f64)> = status["metrics"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["model_of_round"] == 3)
        .map(|m| {
            let site = m["site_id"].as_str().unwrap().to_owned();
            (site, m["accuracy"].as_f64().unwrap(), m["loss"].as_f64().unwrap())
        })
        .collect();
    metrics.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(metrics.len(), SITES.len(), "{status:#}");
    Outcome { models, metrics }
}

/// Secure aggregation rounds each update stochastically (fresh randomness
/// per run), so two runs' models differ in their last bits whatever the
/// source: the metrics agree to 1e-6 (accuracy) and 1e-4 (loss).
#[test]
fn streamed_sites_reach_the_accuracy_in_memory_sites_reach() {
    let job = example_job(&[("rounds", "3")]);
    let (memory, streamed) = (federated(false, &job), federated(true, &job));
    assert_eq!(memory.models.len(), 3);
    for ((site, a, loss_a), (other, b, loss_b)) in memory.metrics.iter().zip(&streamed.metrics) {
        assert_eq!(site, other);
        assert!((a - b).abs() <= 1e-6, "{site}: accuracy {a} in memory, {b} streamed");
        assert!(
            (loss_a - loss_b).abs() <= 1e-4,
            "{site}: loss {loss_a} in memory, {loss_b} streamed"
        );
    }
}

/// Without that rounding (a plaintext job), the two federations train the
/// same models to the bit: every round's hash is equal.
#[test]
fn streamed_sites_train_the_models_in_memory_sites_train_to_the_bit() {
    let job = plaintext_job(&[("rounds", "3")]);
    let (memory, streamed) = (federated(false, &job), federated(true, &job));
    assert_eq!(memory.models.len(), 3);
    assert_eq!(streamed.models, memory.models);
    assert_eq!(streamed.metrics, memory.metrics);
}
