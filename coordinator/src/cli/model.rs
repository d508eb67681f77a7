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
    /// Write a job's latest global model to FILE and its manifest to FILE.json.
    Export {
        job_id: u64,
        #[arg(long)]
        out: PathBuf,
    },
}

pub(crate) async fn exec(addr: &str, cmd: ModelCommand) -> CliResult {
    let ModelCommand::Export { job_id, out } = cmd;
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
