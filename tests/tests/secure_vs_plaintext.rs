//! Secure aggregation changes what the coordinator can see, not what it
//! computes: the same job trained with secure and with plaintext aggregation
//! ends with the same model, up to the quantisation error.

use tessera_tests::{Federation, SITES, example_job, plaintext_job};

/// Trains `job` on a fresh four-hospital federation and returns the final
/// model and the final mean test accuracy.
fn train(job: &str, site_args: &[&str]) -> (Vec<f32>, f64) {
    let mut federation = Federation::start(&SITES);
    for site in SITES {
        federation.add_site_with(site, site_args);
    }
    let job_id = federation.submit(&federation.write_job("job.toml", job));
    let status = federation.wait_for(job_id, &["finished", "failed", "cancelled"]);
    assert_eq!(status["job"]["status"], "finished", "{status:#}");
    let out = federation.dir.path().join("model.bin");
    let export = federation.tessera(&[
        "model",
        "export",
        &job_id.to_string(),
        "--out",
        out.to_str().unwrap(),
        "--format",
        "raw",
    ]);
    assert!(export.status.success());
    let model = tessera_protocol::model::decode_params(&std::fs::read(&out).unwrap()).unwrap();
    (model, status["final_mean_accuracy"].as_f64().unwrap())
}

#[test]
fn secure_and_plaintext_training_agree_within_the_quantisation_bound() {
    let overrides = [("rounds", "5")];
    let (secure_model, secure_accuracy) = train(&example_job(&overrides), &[]);
    let (plain_model, plain_accuracy) = train(&plaintext_job(&overrides), &["--allow-insecure-plaintext"]);
    assert_eq!(secure_model.len(), plain_model.len());
    // Per round, the secure mean update differs from the plaintext one by
    // less than 4·δ/Σw ≈ 1e-6 (C = 10, b = 30, Σw ≈ 0.49); five rounds of
    // training carry that forward. 1e-4 leaves a wide margin while still
    // failing on any real aggregation difference (updates are ~1e-2).
    let max_diff = secure_model
        .iter()
        .zip(&plain_model)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    eprintln!(
        "secure vs plaintext: max parameter difference {max_diff:e}, accuracy {secure_accuracy} vs {plain_accuracy}"
    );
    assert!(max_diff < 1e-4, "models differ by {max_diff}");
    assert_ne!(secure_model, vec![0.0; secure_model.len()]);
    assert!(
        (secure_accuracy - plain_accuracy).abs() < 0.01,
        "{secure_accuracy} vs {plain_accuracy}"
    );
}
