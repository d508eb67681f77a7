//! `tessera model export`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;
use tessera_protocol::ids::sha256_hex;
use tessera_protocol::pb;
use tessera_protocol::pb::jobs_client::JobsClient;
use tokio_stream::StreamExt;

use super::{CliError, CliResult, connect};

#[derive(Subcommand)]
pub(crate) enum ModelCommand {
    /// Write a job's latest global model to FILE (safetensors by default).
    Export {
        job_id: u64,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, value_enum, default_value_t = Format::Safetensors)]
        format: Format,
    },
}

/// What `model export` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Format {
    /// Hugging Face safetensors: `layers.N.weight` [d_in, d_out] and
    /// `layers.N.bias` (f32), `normalization.mean`/`.std` (f64), and the
    /// job's provenance (ledger block, model hash, metrics) in its metadata.
    Safetensors,
    /// The raw little-endian f32 parameters (the bytes the ledger's model
    /// hash is over), and the manifest in FILE.json.
    Raw,
}

pub(crate) async fn exec(addr: &str, cmd: ModelCommand) -> CliResult {
    let ModelCommand::Export { job_id, out, format } = cmd;
    let mut client = JobsClient::new(connect(addr).await?);
    let mut stream = client
        .export_model(pb::ExportModelRequest { job_id })
        .await?
        .into_inner();
    let mut bytes = Vec::new();
    let mut manifest = String::new();
    let mut expected_hash = String::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        if chunk.offset != bytes.len() as u64 {
            return Err(CliError::Unexpected(anyhow::anyhow!(
                "model chunks arrived out of order"
            )));
        }
        if manifest.is_empty() {
            manifest = chunk.manifest_json;
        }
        expected_hash = chunk.model_hash;
        bytes.extend_from_slice(&chunk.data);
    }
    let actual = sha256_hex(&bytes);
    if actual != expected_hash {
        return Err(CliError::Unexpected(anyhow::anyhow!(
            "downloaded model hash {actual} does not match {expected_hash}"
        )));
    }
    if format == Format::Safetensors {
        let file = safetensors_file(&bytes, &manifest).map_err(CliError::Unexpected)?;
        std::fs::write(&out, file).with_context(|| format!("cannot write {}", out.display()))?;
        eprintln!(
            "wrote {} (safetensors, {} parameters, model sha256 {actual})",
            out.display(),
            bytes.len() / 4
        );
        return Ok(ExitCode::SUCCESS);
    }
    std::fs::write(&out, &bytes).with_context(|| format!("cannot write {}", out.display()))?;
    let manifest_path = PathBuf::from(format!("{}.json", out.display()));
    let pretty = serde_json::from_str::<serde_json::Value>(&manifest)
        .and_then(|v| serde_json::to_string_pretty(&v))
        .unwrap_or(manifest);
    std::fs::write(&manifest_path, pretty).with_context(|| format!("cannot write {}", manifest_path.display()))?;
    eprintln!(
        "wrote {} ({} parameters, sha256 {}) and {}",
        out.display(),
        bytes.len() / 4,
        actual,
        manifest_path.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// How a model computes, for whoever loads the file without Tessera.
const FORWARD: &str = "p = sigmoid(h_n), h_0 = (x - normalization.mean) / normalization.std, \
     h_{i+1} = h_i @ layers.i.weight + layers.i.bias, with relu between layers (not after the last); \
     x is a row encoded per the job's schema (features in schema order)";

/// The safetensors file of a model: its raw parameters (`bytes`, the
/// layout of `protocol::model`) cut into one weight and one bias tensor per
/// layer, the normalisation as two tensors, and the server's manifest
/// (each top-level field; JSON for all but strings) as the file's metadata.
fn safetensors_file(bytes: &[u8], manifest: &str) -> anyhow::Result<Vec<u8>> {
    use safetensors::tensor::{Dtype, TensorView};

    let manifest: serde_json::Value = serde_json::from_str(manifest).context("the model's manifest is not JSON")?;
    let job_toml = manifest["job_toml"].as_str().context("the manifest has no job file")?;
    let spec = tessera_protocol::job::JobSpec::from_toml(job_toml).context("the manifest's job file")?;
    let n_features = manifest["n_features"]
        .as_u64()
        .context("the manifest has no feature count")? as usize;
    let layout = spec.model.layout(n_features);
    anyhow::ensure!(
        bytes.len() == layout.n_params() * 4,
        "the model has {} parameters, its job's layout {}",
        bytes.len() / 4,
        layout.n_params()
    );
    let floats = |key: &str| -> anyhow::Result<Vec<u8>> {
        let values = manifest["normalization"][key]
            .as_array()
            .with_context(|| format!("the manifest has no normalization.{key}"))?;
        anyhow::ensure!(
            values.len() == n_features,
            "normalization.{key} has {} values",
            values.len()
        );
        Ok(values
            .iter()
            .map(|v| v.as_f64().unwrap_or(f64::NAN))
            .flat_map(f64::to_le_bytes)
            .collect())
    };
    let (mean, std) = (floats("mean")?, floats("std")?);
    let mut tensors = vec![
        (
            "normalization.mean".to_owned(),
            TensorView::new(Dtype::F64, vec![n_features], &mean)?,
        ),
        (
            "normalization.std".to_owned(),
            TensorView::new(Dtype::F64, vec![n_features], &std)?,
        ),
    ];
    let mut at = 0;
    for (i, layer) in layout.layers.iter().enumerate() {
        let weight = &bytes[at..at + 4 * layer.d_in * layer.d_out];
        at += weight.len();
        let bias = &bytes[at..at + 4 * layer.d_out];
        at += bias.len();
        tensors.push((
            format!("layers.{i}.weight"),
            TensorView::new(Dtype::F32, vec![layer.d_in, layer.d_out], weight)?,
        ));
        tensors.push((
            format!("layers.{i}.bias"),
            TensorView::new(Dtype::F32, vec![layer.d_out], bias)?,
        ));
    }
    let mut metadata: std::collections::HashMap<String, String> = manifest
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(key, _)| key.as_str() != "encoding")
        .map(|(key, value)| {
            let text = value.as_str().map_or_else(|| value.to_string(), str::to_owned);
            (key.clone(), text)
        })
        .collect();
    metadata.insert("format".into(), "tessera-model-v1 (safetensors)".into());
    metadata.insert("forward".into(), FORWARD.into());
    Ok(safetensors::tensor::serialize(tensors, Some(metadata))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::{Dtype, SafeTensors};

    /// The file reads back, with the reference crate, as the layout's tensors
    /// holding exactly the parameters' bytes, the normalisation, and the
    /// manifest's provenance.
    #[test]
    fn a_model_becomes_safetensors_by_layer_with_its_provenance() {
        let job = "name = \"t\"\nrounds = 2\n[model]\nkind = \"mlp\"\nhidden = [3]\n[training]\n\
                   learning_rate = 0.1\nlocal_epochs = 1\n";
        let layout = tessera_protocol::job::JobSpec::from_toml(job).unwrap().model.layout(2);
        let params: Vec<f32> = (0..layout.n_params()).map(|i| i as f32 * 0.5 - 3.0).collect();
        let bytes = tessera_protocol::model::encode_params(&params);
        let manifest = serde_json::json!({
            "job_id": 7, "job_toml": job, "n_features": 2, "model_hash": "abc",
            "normalization": { "mean": [1.5, -2.0], "std": [0.25, 4.0] },
            "ledger_block": { "height": 12, "hash": "def" },
            "encoding": "raw only",
        });
        let file = safetensors_file(&bytes, &manifest.to_string()).unwrap();
        let read = SafeTensors::deserialize(&file).unwrap();
        let tensor = |name: &str| read.tensor(name).unwrap();
        // [2, 3] weight, [3] bias, [3, 1] weight, [1] bias: 6 + 3 + 3 + 1.
        assert_eq!(tensor("layers.0.weight").shape(), [2, 3]);
        assert_eq!(tensor("layers.0.weight").data(), &bytes[..24]);
        assert_eq!(tensor("layers.0.bias").data(), &bytes[24..36]);
        assert_eq!(tensor("layers.1.weight").shape(), [3, 1]);
        assert_eq!(tensor("layers.1.weight").data(), &bytes[36..48]);
        assert_eq!(tensor("layers.1.bias").data(), &bytes[48..52]);
        assert_eq!(tensor("layers.1.bias").dtype(), Dtype::F32);
        let std: Vec<u8> = [0.25f64, 4.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(tensor("normalization.std").data(), &std[..]);
        assert_eq!(read.len(), 6);
        let (_, header) = SafeTensors::read_metadata(&file).unwrap();
        let metadata = header.metadata().clone().unwrap();
        assert_eq!(metadata["job_id"], "7");
        assert_eq!(metadata["model_hash"], "abc");
        assert_eq!(metadata["ledger_block"], r#"{"hash":"def","height":12}"#);
        assert!(metadata["forward"].contains("relu"));
        assert!(
            !metadata.contains_key("encoding"),
            "the raw format's note does not apply"
        );

        // Parameters that do not fit the job's layout are refused.
        assert!(safetensors_file(&bytes[..48], &manifest.to_string()).is_err());
    }
}
