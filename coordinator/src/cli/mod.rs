//! The `tessera` CLI. Each subcommand group is a module with its clap
//! definition and an `exec` that calls the coordinator.
//!
//! Exit codes: 0 success, 1 the request was refused or the job did not
//! finish (a user-facing outcome), 2 an unexpected error (a bug or an
//! unreachable coordinator).

mod job;
mod ledger;
mod model;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tonic::Code;
use tonic::transport::Channel;

/// Launch, watch, cancel and export federated training jobs; verify the ledger.
#[derive(Parser)]
#[command(name = "tessera", version)]
struct Cli {
    /// Coordinator address.
    #[arg(
        long,
        global = true,
        env = "TESSERA_COORDINATOR",
        default_value = "http://127.0.0.1:50051"
    )]
    coordinator: String,
    #[command(subcommand)]
    command: Command,
}

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
            | Code::PermissionDenied => CliError::User(status.message().to_owned()),
            _ => CliError::Unexpected(anyhow::anyhow!(
                "coordinator error ({:?}): {}",
                status.code(),
                status.message()
            )),
        }
    }
}

pub(crate) type CliResult = Result<ExitCode, CliError>;

pub(crate) async fn connect(addr: &str) -> Result<Channel, CliError> {
    let endpoint = Channel::from_shared(addr.to_owned())
        .map_err(|e| CliError::User(format!("bad coordinator address `{addr}`: {e}")))?;
    endpoint
        .connect()
        .await
        .map_err(|e| CliError::Unexpected(anyhow::anyhow!("cannot reach the coordinator at {addr}: {e}")))
}

/// Entry point of the `tessera` binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Job(cmd) => job::exec(&cli.coordinator, cmd).await,
            Command::Model(cmd) => model::exec(&cli.coordinator, cmd).await,
            Command::Ledger(cmd) => ledger::exec(&cli.coordinator, cmd).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(CliError::User(message)) => {
            eprintln!("error: {message}");
            ExitCode::from(1)
        }
        Err(CliError::Unexpected(e)) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
