//! What an ML team takes away from a job. `tessera model export`: a
//! finished job's model in safetensors, loaded with Hugging Face's Python
//! package and NumPy (installed by scripts/test.sh), gives the
//! probabilities Tessera's own model (Burn,
//! `tessera_models::train::predict_logits`) gives, to 1e-5. `tessera job
//! metrics`: the job's metrics as CSV and JSON, the values `job status`
//! shows. `tessera completions`: a completion script bash loads and uses.

use std::process::Command;

use rand::{Rng, SeedableRng};
use tessera_models::data::Dataset;
use tessera_tests::{Federation, SITES, example_job};

/// Loads the safetensors file, checks it against the raw export, prints
/// its metadata and the probabilities of the rows in argv[3] (raw,
/// unstandardised features, as a site's encoded rows are).
const LOAD: &str = r#"
import json, sys
import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file

tensors = load_file(sys.argv[1])
with safe_open(sys.argv[1], framework="np") as f:
    meta = f.metadata()
raw = np.fromfile(sys.argv[2], dtype="<f4")
n_layers = sum(1 for k in tensors if k.endswith(".weight"))
flat = np.concatenate([np.concatenate([tensors[f"layers.{i}.weight"].ravel(), tensors[f"layers.{i}.bias"]])
                       for i in range(n_layers)])
assert flat.dtype == np.float32 and np.array_equal(flat, raw), "tensors differ from the raw export"
x = np.array(json.loads(open(sys.argv[3]).read()), dtype=np.float64)
h = (x - tensors["normalization.mean"]) / tensors["normalization.std"]
h = h.astype(np.float32)
for i in range(n_layers):
    h = h @ tensors[f"layers.{i}.weight"] + tensors[f"layers.{i}.bias"]
    if i < n_layers - 1:
        h = np.maximum(h, 0)
p = 1 / (1 + np.exp(-h[:, 0].astype(np.float64)))
print(json.dumps({"metadata": meta, "probabilities": p.tolist()}))
"#;

/// Runs the ONNX file in argv[1] with onnxruntime on the rows in argv[2]
/// (as a site encodes them) and prints its metadata and probabilities.
const ONNX: &str = r#"
import json, sys
import numpy as np
import onnxruntime as ort

session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
x = np.array(json.loads(open(sys.argv[2]).read()), dtype=np.float32)
(p,) = session.run(["probability"], {"features": x})
meta = session.get_modelmeta().custom_metadata_map
print(json.dumps({"metadata": meta, "probabilities": p[:, 0].astype(np.float64).tolist(),
                  "inputs": [i.name for i in session.get_inputs()]}))
"#;

/// Runs a Python script with `args` and parses the JSON it prints.
fn run_python(script: &str, args: &[&std::path::Path]) -> serde_json::Value {
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .expect("run python3");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The largest difference between two equally long lists of probabilities.
fn worst_difference(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
}

#[test]
fn an_exported_model_loads_in_python_and_predicts_as_tessera_does() {
    let federation = Federation::running(&SITES);
    let job_id = federation.submit(&federation.write_job("job.toml", &example_job(&[("rounds", "3")])));
    let status = federation.wait_for(job_id, &["finished", "failed", "cancelled"]);
    assert_eq!(status["job"]["status"], "finished", "{status:#}");
    let dir = federation.dir.path().to_owned();
    let (st, raw, onnx) = (
        dir.join("model.safetensors"),
        dir.join("model.bin"),
        dir.join("model.onnx"),
    );
    for (file, format) in [(&st, "safetensors"), (&raw, "raw"), (&onnx, "onnx")] {
        let out = federation.tessera(&[
            "model",
            "export",
            &job_id.to_string(),
            "--out",
            file.to_str().unwrap(),
            "--format",
            format,
        ]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("model.bin.json")).unwrap()).unwrap();
    let params = tessera_protocol::model::decode_params(&std::fs::read(&raw).unwrap()).unwrap();
    let n_features = manifest["n_features"].as_u64().unwrap() as usize;
    let mean: Vec<f64> = serde_json::from_value(manifest["normalization"]["mean"].clone()).unwrap();
    let std: Vec<f64> = serde_json::from_value(manifest["normalization"]["std"].clone()).unwrap();

    // Rows as a site encodes them (features on their own scale), and what
    // Tessera's model computes from them: standardised, then its logits.
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let rows: Vec<Vec<f64>> = (0..50)
        .map(|_| {
            (0..n_features)
                .map(|j| mean[j] + std[j] * rng.random_range(-2.5..2.5))
                .collect()
        })
        .collect();
    let standardised = Dataset {
        n_features,
        features: rows
            .iter()
            .flat_map(|r| r.iter().enumerate().map(|(j, v)| ((v - mean[j]) / std[j]) as f32))
            .collect(),
        labels: vec![0.0; rows.len()],
        groups: Vec::new(),
    };
    let spec = tessera_protocol::job::JobSpec::from_toml(manifest["job_toml"].as_str().unwrap()).unwrap();
    let layout = spec.model.layout(n_features);
    let device = tessera_models::default_device();
    let logits = tessera_models::train::predict_logits(&layout, &params, &standardised, &device).unwrap();
    let tessera: Vec<f64> = logits.iter().map(|&z| 1.0 / (1.0 + (-f64::from(z)).exp())).collect();

    let rows_path = dir.join("rows.json");
    std::fs::write(&rows_path, serde_json::to_string(&rows).unwrap()).unwrap();
    let python = run_python(LOAD, &[&st, &raw, &rows_path]);
    let probabilities: Vec<f64> = serde_json::from_value(python["probabilities"].clone()).unwrap();
    let worst = worst_difference(&probabilities, &tessera);
    assert!(worst < 1e-5, "Python's probabilities differ from Tessera's by {worst}");
    assert!(
        probabilities.iter().any(|p| *p < 0.4) && probabilities.iter().any(|p| *p > 0.6),
        "a model that says the same for every row tests nothing: {probabilities:?}"
    );

    // The ONNX graph, run by onnxruntime (installed by scripts/test.sh) on
    // the same rows: the normalisation and the sigmoid are inside it.
    let runtime = run_python(ONNX, &[&onnx, &rows_path]);
    let from_onnx: Vec<f64> = serde_json::from_value(runtime["probabilities"].clone()).unwrap();
    let worst = worst_difference(&from_onnx, &tessera);
    assert!(
        worst < 1e-5,
        "onnxruntime's probabilities differ from Tessera's by {worst}"
    );
    assert_eq!(runtime["inputs"], serde_json::json!(["features"]));
    assert_eq!(runtime["metadata"]["model_hash"], manifest["model_hash"]);

    // The encoding rows must have to go into the model: the features hash
    // the sites agreed on, which a site's `check` prints (its first 16
    // digits) for its own data.
    let check = Command::new(tessera_tests::bin("tessera-participant"))
        .args(["check", "--config"])
        .arg(tessera_tests::repo().join("examples/heart-disease/sites/cleveland.toml"))
        .output()
        .unwrap();
    let check = String::from_utf8_lossy(&check.stdout).into_owned();
    let site_hash = check
        .lines()
        .find_map(|l| l.split("features hash ").nth(1))
        .unwrap_or_else(|| panic!("{check}"));
    let agreed = manifest["features_sha256"].as_str().unwrap_or_default();
    assert!(
        agreed.len() == 64 && agreed.starts_with(site_hash.trim()),
        "{agreed} vs {site_hash}"
    );
    assert_eq!(python["metadata"]["features_sha256"], agreed);
    assert_eq!(runtime["metadata"]["features_sha256"], agreed);

    // The provenance a reader checks against the ledger.
    let meta = &python["metadata"];
    assert_eq!(meta["model_hash"], manifest["model_hash"]);
    assert_eq!(meta["job_id"], job_id.to_string());
    let block: serde_json::Value = serde_json::from_str(meta["ledger_block"].as_str().unwrap()).unwrap();
    assert_eq!(block, manifest["ledger_block"]);
    let pooled: serde_json::Value = serde_json::from_str(meta["final_pooled_metrics"].as_str().unwrap()).unwrap();
    assert_eq!(
        pooled["accuracy"], status["final_pooled_accuracy"],
        "{pooled:#}\n{status:#}"
    );

    // The metrics, as CSV and as JSON: one row per model and source, the
    // very values `job status --json` shows.
    let csv_path = dir.join("metrics.csv");
    let out = federation.tessera(&[
        "job",
        "metrics",
        &job_id.to_string(),
        "--out",
        csv_path.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = federation.tessera(&["job", "metrics", &job_id.to_string(), "--format", "json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let json: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let csv = std::fs::read_to_string(&csv_path).unwrap();
    let mut lines = csv.lines();
    assert_eq!(
        lines.next(),
        Some(
            "model_of_round,source,n_sites,n_test,accuracy,loss,roc_auc,average_precision,brier,\
             calibration_intercept,calibration_slope,threshold,sensitivity,specificity,ppv,train_loss"
        )
    );
    let cells: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    let expected = status["pooled"].as_array().unwrap().len() + status["metrics"].as_array().unwrap().len();
    assert_eq!(cells.len(), expected, "{csv}");
    assert_eq!(json.len(), expected);
    // Rounds 1–3 each evaluate the model before them, and the final
    // evaluation the last one: models 0 to 3, pooled and per site.
    let models: std::collections::BTreeSet<&str> = cells.iter().map(|c| c[0]).collect();
    assert_eq!(models.into_iter().collect::<Vec<_>>(), ["0", "1", "2", "3"]);
    let number = |v: &serde_json::Value| v.as_f64().map_or(String::new(), |x| x.to_string());
    for (row, object) in cells.iter().zip(&json) {
        assert_eq!(row[0], object["model_of_round"].to_string());
        assert_eq!(row[1], object["source"]);
        assert_eq!(row[4], number(&object["accuracy"]));
        let shown = if row[1] == "pooled" {
            status["pooled"]
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["model_of_round"] == object["model_of_round"])
        } else {
            status["metrics"]
                .as_array()
                .unwrap()
                .iter()
                .find(|m| m["model_of_round"] == object["model_of_round"] && m["site_id"] == object["source"])
        };
        let shown = shown.unwrap_or_else(|| panic!("{row:?} is not in job status: {status:#}"));
        assert_eq!(object["accuracy"], shown["accuracy"], "{row:?}");
        assert_eq!(object["loss"], shown["loss"], "{row:?}");
        assert_eq!(object["n_test"], shown["n_test"], "{row:?}");
        assert_eq!(object["roc_auc"], shown["roc_auc"], "{row:?}");
        assert_eq!(object["brier"], shown["brier"], "{row:?}");
        assert_eq!(row[8], number(&object["brier"]), "{row:?}");
    }
    // The final model's pooled row has the ranking metrics (from the summed
    // score histograms); a training round's pooled row its training loss.
    let final_pooled = json
        .iter()
        .find(|o| o["source"] == "pooled" && o["model_of_round"] == 3)
        .unwrap();
    assert!(final_pooled["roc_auc"].is_number() && final_pooled["average_precision"].is_number());
    let first_pooled = json
        .iter()
        .find(|o| o["source"] == "pooled" && o["model_of_round"] == 0)
        .unwrap();
    assert!(first_pooled["train_loss"].is_number(), "{first_pooled}");

    // Charts of the same metrics: loss, accuracy and ROC AUC, each an SVG
    // with a line per source (pooled, the site mean, each of the 4 sites).
    let charts = federation.dir.path().join("charts");
    let out = federation.tessera(&["job", "plot", &job_id.to_string(), "--out", charts.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let listing = String::from_utf8_lossy(&out.stdout).into_owned();
    // The pooled accuracy (a count of rows) exists for the final model
    // only: a marker, not a line.
    for (file, series, lines) in [("loss.svg", 7, 7), ("accuracy.svg", 6, 5)] {
        let svg = std::fs::read_to_string(charts.join(file)).unwrap();
        assert!(svg.starts_with("<svg") && svg.len() > 2000, "{file}: {svg}");
        assert!(listing.contains(&format!("{file} ({series} series)")), "{listing}");
        // Series lines are 2 or 3 wide; the grid's are 1.
        let drawn = svg
            .split("<polyline")
            .skip(1)
            .map(|p| p.split('>').next().unwrap_or_default())
            .filter(|p| p.contains("stroke-width=\"2\"") || p.contains("stroke-width=\"3\""))
            .count();
        assert_eq!(drawn, lines, "{file}");
    }
    // The pooled ROC AUC exists for the final model only: one marker.
    let roc = std::fs::read_to_string(charts.join("roc_auc.svg")).unwrap();
    assert!(roc.contains("ROC AUC, pooled (secure sum)"), "{roc}");
    assert_eq!(roc.matches("<circle").count(), 1);
    // The final model's pooled ROC and calibration curves, from the summed
    // score histograms: the ROC curve from (0, 0) to (1, 1), rising.
    let curve = status["final_roc_curve"].as_array().unwrap();
    assert!(curve.len() > 10, "{curve:?}");
    assert_eq!(curve[0], serde_json::json!([0.0, 0.0]));
    assert_eq!(curve.last().unwrap(), &serde_json::json!([1.0, 1.0]));
    let calibration = status["final_calibration"].as_array().unwrap();
    let rows: f64 = calibration.iter().map(|b| b["rows"].as_f64().unwrap()).sum();
    assert_eq!(rows, status["final_pooled"]["n_test"].as_f64().unwrap());
    for file in ["roc_curve.svg", "calibration.svg"] {
        assert!(listing.contains(&format!("{file} (2 series)")), "{listing}");
    }
    assert!(cells.iter().any(|c| c[1] == "pooled") && cells.iter().any(|c| c[1] == "cleveland"));

    // The watch view: each round once (it printed every round twice), the
    // pooled figures and the sites' means in labelled columns of their own.
    let out = federation.tessera(&["job", "status", &job_id.to_string(), "--watch"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let shown = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for round in 1..=3 {
        let prefix = format!("  {round}/3 ");
        let lines = shown.lines().filter(|l| l.starts_with(&prefix)).count();
        assert_eq!(lines, 1, "round {round} shown {lines} times:\n{shown}");
    }
    assert_eq!(
        shown.matches("loss pooled  brier pooled  acc site mean").count(),
        1,
        "{shown}"
    );
    // As JSON lines for a script: a `round` event per round, then `end`.
    let out = federation.tessera(&["job", "status", &job_id.to_string(), "--watch", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let events: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: not one JSON object: {l}")))
        .collect();
    let rounds: Vec<&serde_json::Value> = events.iter().filter(|e| e["event"] == "round").collect();
    assert_eq!(rounds.len(), 3, "{events:#?}");
    assert_eq!(rounds[2]["model_hash"], status["rounds"][2]["model_hash"]);
    let last = events.last().unwrap();
    assert_eq!(last["event"], "end");
    assert_eq!(last["status"]["job"]["status"], "finished");
}

/// `tessera completions bash`: the script bash loads completes the
/// command's own subcommands; zsh and fish get theirs.
#[test]
fn the_shell_completes_tessera_commands() {
    let tessera = tessera_tests::bin("tessera");
    let script = Command::new(&tessera).args(["completions", "bash"]).output().unwrap();
    assert!(script.status.success(), "{}", String::from_utf8_lossy(&script.stderr));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tessera.bash");
    std::fs::write(&path, &script.stdout).unwrap();
    // What bash offers after `tessera jo<TAB>` and `tessera job <TAB>`.
    let complete = |words: &str, current: usize| {
        let out = Command::new("bash")
            .arg("-c")
            .arg(format!(
                "source {} && COMP_WORDS=({words}) && COMP_CWORD={current} && _tessera tessera \"${{COMP_WORDS[COMP_CWORD]}}\" \"${{COMP_WORDS[COMP_CWORD-1]}}\" && echo \"${{COMPREPLY[@]}}\"",
                path.display()
            ))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    assert_eq!(complete("tessera jo", 1).trim(), "job");
    let job = complete("tessera job ''", 2);
    for sub in ["submit", "status", "metrics", "cancel", "prune"] {
        assert!(job.split_whitespace().any(|w| w == sub), "{sub} not offered: {job}");
    }
    for shell in ["zsh", "fish"] {
        let out = Command::new(&tessera).args(["completions", shell]).output().unwrap();
        assert!(out.status.success(), "{shell}");
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(text.contains("tessera") && text.contains("metrics"), "{shell}: {text}");
    }
}
