//! The `tessera` CLI. Each subcommand group is a module with its clap
//! definition and an `exec` that calls the coordinator.
//!
//! Exit codes: 0 success, 1 the request was refused or the job did not
//! finish (a user-facing outcome), 2 an unexpected error (a bug or an
//! unreachable coordinator).

mod ca;
mod job;
mod ledger;
mod metrics;
mod model;
mod onnx;
mod plot;
mod sites;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::OnceLock;

use clap::{Parser, Subcommand};
use tonic::Code;
use tonic::transport::Channel;

/// Launch, watch, cancel and export federated training jobs; verify the ledger.
#[derive(Parser)]
#[command(name = "tessera", version)]
struct Cli {
    /// Coordinator address [default: https://127.0.0.1:50051 with a kit,
    /// http://127.0.0.1:50051 without].
    #[arg(long, global = true, env = "TESSERA_COORDINATOR")]
    coordinator: Option<String>,
    /// This user's kit from `tessera ca issue --operator/--auditor` (tls.pem,
    /// tls.key, ca.pem): connect over mutual TLS (https:// addresses).
    #[arg(long, global = true, env = "TESSERA_TLS_DIR")]
    tls_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

/// The kit every connection of this process uses (set once, from the
/// command line).
static TLS_DIR: OnceLock<Option<PathBuf>> = OnceLock::new();

#[derive(Subcommand)]
enum Command {
    /// Submit, list, watch and cancel jobs.
    #[command(subcommand)]
    Job(job::JobCommand),
    /// Export trained models.
    #[command(subcommand)]
    Model(model::ModelCommand),
    /// Verify, list and report the ledger; issue and check receipts.
    #[command(subcommand)]
    Ledger(ledger::LedgerCommand),
    /// List the sites: connected or not, version, part in the running job,
    /// latest refusal.
    Sites {
        #[arg(long)]
        json: bool,
    },
    /// Provision the consortium: CA, coordinator and site/operator/auditor kits.
    #[command(subcommand)]
    Ca(ca::CaCommand),
    /// Print the shell completion script for SHELL, e.g.
    /// `tessera completions bash > /etc/bash_completion.d/tessera`, or
    /// `source <(tessera completions bash)` for this shell only.
    Completions { shell: clap_complete::Shell },
}

/// A failure the user can act on (exit 1) versus a bug or outage (exit 2).
pub(crate) enum CliError {
    User(String),
    Unexpected(anyhow::Error),
}

impl From<anyhow::Error> for CliError {
    fn from(e: anyhow::Error) -> Self {
        CliError::Unexpected(e)
    }
}

impl From<tonic::Status> for CliError {
    fn from(status: tonic::Status) -> Self {
        match status.code() {
            Code::InvalidArgument
            | Code::NotFound
            | Code::FailedPrecondition
            | Code::AlreadyExists
            | Code::PermissionDenied
            | Code::Unauthenticated => CliError::User(status.message().to_owned()),
            _ => {
                // A transport failure hides its cause (often a refused TLS
                // handshake: unknown CA, expired certificate) in the source
                // chain: show all of it.
                CliError::Unexpected(anyhow::anyhow!(
                    "coordinator error ({:?}): {}{}",
                    status.code(),
                    status.message(),
                    causes(&status)
                ))
            }
        }
    }
}

/// The causes behind an error, as `: cause: cause…`.
fn causes(e: &dyn std::error::Error) -> String {
    let mut out = String::new();
    let mut source = e.source();
    while let Some(cause) = source {
        out.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    out
}

pub(crate) type CliResult = Result<ExitCode, CliError>;

pub(crate) async fn connect(addr: &str) -> Result<Channel, CliError> {
    let kit = TLS_DIR.get().and_then(Option::as_ref);
    tessera_protocol::cli::check_coordinator_address(addr, kit.is_some()).map_err(CliError::User)?;
    let mut endpoint = Channel::from_shared(addr.to_owned())
        .map_err(|e| CliError::User(format!("bad coordinator address `{addr}`: {e}")))?;
    match kit {
        Some(dir) => {
            let tls = crate::tls::client_config(dir).map_err(|e| CliError::User(format!("{e:#}")))?;
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| CliError::User(format!("TLS configuration: {e}")))?;
        }
        None if addr.starts_with("https://") => {
            return Err(CliError::User(
                "an https:// coordinator needs your kit: --tls-dir DIR (or TESSERA_TLS_DIR)".into(),
            ));
        }
        None => {}
    }
    endpoint.connect().await.map_err(|e| {
        CliError::Unexpected(anyhow::anyhow!(
            "cannot reach the coordinator at {addr}: {e}{}",
            causes(&e)
        ))
    })
}

/// Entry point of the `tessera` binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let _ = TLS_DIR.set(cli.tls_dir.clone());
    let coordinator = cli.coordinator.clone().unwrap_or_else(|| {
        let scheme = if cli.tls_dir.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:50051")
    });
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Job(cmd) => job::exec(&coordinator, cmd).await,
            Command::Model(cmd) => model::exec(&coordinator, cmd).await,
            Command::Ledger(cmd) => ledger::exec(&coordinator, cmd).await,
            Command::Sites { json } => sites::exec(&coordinator, json).await,
            Command::Ca(cmd) => ca::exec(cmd),
            Command::Completions { shell } => {
                use clap::CommandFactory;
                clap_complete::generate(shell, &mut Cli::command(), "tessera", &mut std::io::stdout());
                Ok(ExitCode::SUCCESS)
            }
        }
    });
    match result {
        Ok(code) => code,
        Err(CliError::User(message)) => {
            eprintln!("error: {message}");
            ExitCode::from(1)
        }
        Err(CliError::Unexpected(e)) => {
            let message = format!("{e:#}");
            eprintln!("error: {message}");
            let transport = ["cannot reach the coordinator", "transport error", "h2 protocol error"];
            if coordinator.starts_with("http://") && transport.iter().any(|t| message.contains(t)) {
                eprintln!(
                    "hint: a coordinator serves mutual TLS unless it runs with --insecure-dev: \
                     connect to https://{} with --tls-dir YOUR_KIT",
                    coordinator.trim_start_matches("http://")
                );
            }
            ExitCode::from(2)
        }
    }
}
