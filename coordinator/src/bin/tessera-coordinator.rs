//! `tessera-coordinator`: the gRPC server that runs federated jobs.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use tessera_coordinator::driver::job_ended;
use tessera_coordinator::ledger::Ledger;
use tessera_coordinator::rpc::{FederationService, JobsService, LedgerService};
use tessera_coordinator::state::Shared;
use tessera_coordinator::store::{INTERRUPTED, Store};
use tessera_coordinator::{driver, unix_ms};
use tessera_protocol::ids::SiteId;
use tessera_protocol::pb::federation_server::FederationServer;
use tessera_protocol::pb::jobs_server::JobsServer;
use tessera_protocol::pb::ledger_server::LedgerServer;
use tonic::transport::server::TcpIncoming;
use tracing::{info, warn};

/// Runs federated training jobs for a consortium of sites.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    /// SQLite database holding jobs, rounds, models and metrics.
    #[arg(long, default_value = "tessera-coordinator.db")]
    db: PathBuf,
    /// Site ids allowed to take part (comma-separated or repeated). Without
    /// it, any well-formed site id is admitted.
    #[arg(long = "allow-site", value_delimiter = ',')]
    allow_sites: Vec<String>,
    /// The consortium roster (site Ed25519 public keys): the ledger's
    /// membership and the keys secure aggregation checks. Without
    /// --allow-site, the roster's sites are the ones admitted.
    #[arg(long)]
    roster: PathBuf,
    /// The coordinator's Ed25519 key that signs ledger blocks (created,
    /// 0600, on first start). Default: beside the database, `<db>.ledger-key`.
    #[arg(long)]
    ledger_key: Option<PathBuf>,
    /// The consortium's name, recorded in the ledger's genesis block.
    #[arg(long, default_value = "tessera")]
    consortium: String,
    /// Write the bound port to this file once listening (for scripts and tests).
    #[arg(long)]
    port_file: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,sqlx=warn,h2=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let path = &args.roster;
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read roster {}", path.display()))?;
    let roster =
        tessera_protocol::roster::parse(&text).with_context(|| format!("invalid roster {}", path.display()))?;
    let allowed_sites = if args.allow_sites.is_empty() && !roster.is_empty() {
        Some(roster.keys().cloned().collect())
    } else if args.allow_sites.is_empty() {
        warn!("no --allow-site given: any site id is admitted");
        None
    } else {
        let sites = args
            .allow_sites
            .iter()
            .map(|s| SiteId::new(s).with_context(|| format!("bad --allow-site `{s}`")))
            .collect::<anyhow::Result<BTreeSet<_>>>()?;
        Some(sites)
    };
    let store = Store::open(&args.db).await?;
    let key_path = args
        .ledger_key
        .clone()
        .unwrap_or_else(|| args.db.with_extension("ledger-key"));
    let key = tessera_protocol::keyfile::load_or_create(&key_path)
        .with_context(|| format!("ledger key {}", key_path.display()))?;
    let ledger = Ledger::open(store.pool().clone(), key, &args.consortium, &roster, unix_ms() as u64).await?;
    fail_interrupted(&ledger).await?;
    let shared = Arc::new(Shared::new(store, ledger, allowed_sites, roster));
    tokio::spawn(driver::run(shared.clone()));

    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let bound = listener.local_addr()?;
    if let Some(path) = &args.port_file {
        std::fs::write(path, bound.port().to_string()).with_context(|| format!("cannot write {}", path.display()))?;
    }
    info!(addr = %bound, db = %args.db.display(), "coordinator listening");
    tonic::transport::Server::builder()
        .add_service(FederationServer::new(FederationService::new(shared.clone())))
        .add_service(JobsServer::new(JobsService::new(shared.clone())))
        .add_service(LedgerServer::new(LedgerService::new(shared)))
        // TCP_NODELAY: protocol steps are small request/response exchanges
        // that Nagle's algorithm would delay by ~40 ms each.
        .serve_with_incoming_shutdown(TcpIncoming::from(listener).with_nodelay(Some(true)), async {
            let _ = tokio::signal::ctrl_c().await;
            info!("shutting down");
        })
        .await
        .context("server failed")?;
    Ok(())
}

/// Jobs left running by a previous process cannot resume (their round state
/// lived in memory): they are marked failed, each with its ledger block.
async fn fail_interrupted(ledger: &Ledger) -> anyhow::Result<()> {
    let now_ms = unix_ms();
    let mut tx = ledger.begin().await?;
    let interrupted = Store::fail_interrupted_in(&mut tx.tx, now_ms).await?;
    for row in &interrupted {
        tx.append(&job_ended(row, "failed", INTERRUPTED), now_ms as u64).await?;
    }
    tx.commit().await?;
    if !interrupted.is_empty() {
        warn!(
            interrupted = interrupted.len(),
            "jobs interrupted by a previous shutdown were marked failed"
        );
    }
    Ok(())
}
