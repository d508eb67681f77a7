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
    /// Write a job's latest global model to FILE (safetensors by default,
    /// or ONNX, or the raw parameters).
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
    /// ONNX (IR 8, opset 13): input `features` [rows, n_features], rows
    /// encoded per the job's schema; output `probability` [rows, 1]; the
    /// normalisation and the sigmoid are in the graph, the provenance in
    /// its metadata.
    Onnx,
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
    let file = match format {
        Format::Safetensors => Some(("safetensors", safetensors_file(&bytes, &manifest)?)),
        Format::Onnx => Some(("ONNX", super::onnx::model_file(&Parts::of(&bytes, &manifest)?))),
        Format::Raw => None,
    };
    if let Some((name, file)) = file {
        std::fs::write(&out, file).with_context(|| format!("cannot write {}", out.display()))?;
        eprintln!(
            "wrote {} ({name}, {} parameters, model sha256 {actual})",
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

/// A model as both file formats need it: its layers' parameters (the
/// layout of `protocol::model`), the normalisation, and the manifest's
/// provenance (each top-level field; JSON for all but strings).
pub(crate) struct Parts<'a> {
    pub mean: Vec<f64>,
    pub std: Vec<f64>,
    /// Per layer: [d_in, d_out], the weight's and the bias's bytes
    /// (little-endian f32, the weight row-major).
    pub layers: Vec<([usize; 2], &'a [u8], &'a [u8])>,
    pub metadata: std::collections::BTreeMap<String, String>,
}

impl<'a> Parts<'a> {
    /// Cuts the raw parameters (`bytes`) per the manifest's job layout.
    pub fn of(bytes: &'a [u8], manifest: &str) -> anyhow::Result<Self> {
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
        let floats = |key: &str| -> anyhow::Result<Vec<f64>> {
            let values = manifest["normalization"][key]
                .as_array()
                .with_context(|| format!("the manifest has no normalization.{key}"))?;
            anyhow::ensure!(
                values.len() == n_features,
                "normalization.{key} has {} values",
                values.len()
            );
            Ok(values.iter().map(|v| v.as_f64().unwrap_or(f64::NAN)).collect())
        };
        let mut at = 0;
        let layers = layout
            .layers
            .iter()
            .map(|layer| {
                let weight = &bytes[at..at + 4 * layer.d_in * layer.d_out];
                at += weight.len();
                let bias = &bytes[at..at + 4 * layer.d_out];
                at += bias.len();
                ([layer.d_in, layer.d_out], weight, bias)
            })
            .collect();
        let mut metadata: std::collections::BTreeMap<String, String> = manifest
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(key, _)| key.as_str() != "encoding")
            .map(|(key, value)| {
                let text = value.as_str().map_or_else(|| value.to_string(), str::to_owned);
                (key.clone(), text)
            })
            .collect();
        metadata.insert("forward".into(), FORWARD.into());
        Ok(Self {
            mean: floats("mean")?,
            std: floats("std")?,
            layers,
            metadata,
        })
    }
}

/// The safetensors file of a model: one weight and one bias tensor per
/// layer, the normalisation as two f64 tensors, the provenance as the
/// file's metadata.
fn safetensors_file(bytes: &[u8], manifest: &str) -> anyhow::Result<Vec<u8>> {
    use safetensors::tensor::{Dtype, TensorView};

    let parts = Parts::of(bytes, manifest)?;
    let f64_bytes = |v: &[f64]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
    let (mean, std) = (f64_bytes(&parts.mean), f64_bytes(&parts.std));
    let n_features = parts.mean.len();
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
    for (i, ([d_in, d_out], weight, bias)) in parts.layers.iter().enumerate() {
        tensors.push((
            format!("layers.{i}.weight"),
            TensorView::new(Dtype::F32, vec![*d_in, *d_out], weight)?,
        ));
        tensors.push((
            format!("layers.{i}.bias"),
            TensorView::new(Dtype::F32, vec![*d_out], bias)?,
        ));
    }
    let mut metadata: std::collections::HashMap<String, String> = parts.metadata.into_iter().collect();
    metadata.insert("format".into(), "tessera-model-v1 (safetensors)".into());
    Ok(safetensors::tensor::serialize(tensors, Some(metadata))?)
}

/// An MLP of 2 features, 3 hidden units and 1 output (6 + 3 + 3 + 1
/// parameters), its raw bytes and its manifest: what the export tests cut.
#[cfg(test)]
pub(crate) fn mlp_fixture() -> (Vec<u8>, serde_json::Value) {
    let job = "name = \"t\"\nrounds = 2\n[model]\nkind = \"mlp\"\nhidden = [3]\n[training]\n\
               learning_rate = 0.1\nlocal_epochs = 1\n";
    let layout = tessera_protocol::job::JobSpec::from_toml(job).unwrap().model.layout(2);
    let params: Vec<f32> = (0..layout.n_params()).map(|i| i as f32 * 0.5 - 3.0).collect();
    let manifest = serde_json::json!({
        "job_id": 7, "job_name": "t", "job_toml": job, "n_features": 2, "model_hash": "abc",
        "normalization": { "mean": [1.5, -2.0], "std": [0.25, 4.0] },
        "ledger_block": { "height": 12, "hash": "def" },
        "encoding": "raw only",
    });
    (tessera_protocol::model::encode_params(&params), manifest)
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
        let (bytes, manifest) = mlp_fixture();
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
