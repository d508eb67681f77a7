//! `tessera-coordinator`: the gRPC server that runs federated jobs.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use tessera_coordinator::ca::{Revoked, consortium_name};
use tessera_coordinator::ledger::Ledger;
use tessera_coordinator::prune::AutoPrune;
use tessera_coordinator::rpc::{FederationService, JobsService, LedgerService};
use tessera_coordinator::state::Shared;
use tessera_coordinator::store::Store;
use tessera_coordinator::tls::{self, Gate, RateLimiter};
use tessera_coordinator::{driver, unix_ms};
use tessera_protocol::identity::Role;
use tessera_protocol::ids::SiteId;
use tessera_protocol::pb::federation_server::FederationServer;
use tessera_protocol::pb::jobs_server::JobsServer;
use tessera_protocol::pb::ledger_server::LedgerServer;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::TcpIncoming;
use tracing::{info, warn};

/// Largest message accepted (models and updates stream in 1 MiB chunks).
const MAX_MESSAGE: usize = 4 << 20;

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
    /// 0600, on first start). Default: `<tls-dir>/ledger.key`, or beside the
    /// database (`<db>.ledger-key`) with --insecure-dev.
    #[arg(long)]
    ledger_key: Option<PathBuf>,
    /// The coordinator's kit from `tessera ca init` (tls.pem, tls.key,
    /// ca.pem, ledger.key): every connection is mutual TLS.
    #[arg(long, required_unless_present = "insecure_dev", conflicts_with = "insecure_dev")]
    tls_dir: Option<PathBuf>,
    /// The CA's revocation list (`tessera ca revoke` writes it); re-read when
    /// it changes. Default: `<tls-dir>/../revoked.toml`.
    #[arg(long)]
    revoked: Option<PathBuf>,
    /// Development only: no TLS, identities taken from messages. Recorded in
    /// every job's ledger block.
    #[arg(long)]
    insecure_dev: bool,
    /// Requests per second each caller (identity) may make on average; a
    /// flooding client is refused with RESOURCE_EXHAUSTED, others go on.
    /// (A site at full speed makes about 700 per second: ~12 requests per
    /// secure round.)
    #[arg(long, default_value_t = 2000.0)]
    rate_limit: f64,
    /// Requests a caller may make in a burst above the average rate.
    #[arg(long, default_value_t = 4000.0)]
    rate_burst: f64,
    /// The consortium's name, recorded in the ledger's genesis block.
    /// Default: the name in `<tls-dir>/consortium.toml`, else `tessera`.
    #[arg(long)]
    consortium: Option<String>,
    /// Write the bound port to this file once listening (for scripts and tests).
    #[arg(long)]
    port_file: Option<PathBuf>,
    /// Serve Prometheus `/metrics` and `/healthz` over plain HTTP on this
    /// address (counts and timings only; keep it on a monitoring network).
    /// Port 0 picks a free port; the log names the one bound.
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// `text` (for a person) or `json` (one object per line, for a log
    /// collector).
    #[arg(long, env = "TESSERA_LOG_FORMAT", default_value = "text")]
    log_format: tessera_protocol::cli::LogFormat,
    /// Prune the round models of ended jobs as each ends, keeping its final
    /// model (as `tessera job prune` does, with a `models_pruned` ledger
    /// block naming this policy): `unfinished` for failed and cancelled
    /// jobs, `ended` for every job.
    #[arg(long, value_enum, default_value_t = AutoPrune::None)]
    auto_prune: AutoPrune,
    /// Test builds only: attack the sites (the end-to-end adversarial tests).
    #[cfg(all(feature = "malicious", debug_assertions))]
    #[arg(long, value_enum)]
    malicious: Option<tessera_coordinator::malicious::Attack>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Handshake refusals (no or foreign certificate) are logged by tonic at
    // debug level: show them.
    tessera_protocol::cli::init_logging(
        args.log_format,
        "info,sqlx=warn,h2=warn,tonic::transport::server::io_stream=debug",
    );
    #[cfg(all(feature = "malicious", debug_assertions))]
    if let Some(attack) = args.malicious {
        tessera_coordinator::malicious::arm(attack);
    }
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
    let key_path = match (&args.ledger_key, &args.tls_dir) {
        (Some(path), _) => path.clone(),
        (None, Some(dir)) => dir.join("ledger.key"),
        (None, None) => args.db.with_extension("ledger-key"),
    };
    let key = tessera_protocol::keyfile::load_or_create(&key_path)
        .with_context(|| format!("ledger key {}", key_path.display()))?;
    let consortium = args
        .consortium
        .clone()
        .or_else(|| args.tls_dir.as_deref().and_then(consortium_name))
        .unwrap_or_else(|| "tessera".to_owned());
    let ledger = Ledger::open(store.pool().clone(), key, &consortium, &roster, unix_ms() as u64).await?;
    let sessions = store.site_sessions().await?;
    let mut shared = Shared::new(store, ledger, allowed_sites, roster);
    shared.remember_sessions(sessions);
    shared.insecure_transport = args.insecure_dev;
    shared.auto_prune = args.auto_prune;
    let shared = Arc::new(shared);
    tokio::spawn(driver::run(shared.clone()));
    if let Some(addr) = args.metrics_listen {
        serve_metrics(shared.clone(), addr).await?;
    }

    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let bound = listener.local_addr()?;
    if let Some(path) = &args.port_file {
        std::fs::write(path, bound.port().to_string()).with_context(|| format!("cannot write {}", path.display()))?;
    }
    let mut server = tonic::transport::Server::builder()
        // A slow or stuck client cannot hold a request forever (long polls
        // answer within seconds; a model upload of any size streams well
        // within this), nor open unbounded parallel requests.
        .timeout(Duration::from_secs(120))
        .concurrency_limit_per_connection(16)
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)));
    let limiter = RateLimiter::new(args.rate_limit, args.rate_burst);
    let gate = match &args.tls_dir {
        Some(dir) => {
            server = server
                .tls_config(tls::server_config(dir)?)
                .context("invalid TLS configuration")?;
            let revoked = args
                .revoked
                .clone()
                .unwrap_or_else(|| dir.join("..").join("revoked.toml"));
            info!(tls = %dir.display(), revoked = %revoked.display(), "mutual TLS");
            tokio::spawn(record_revoked_sites(shared.clone(), revoked.clone()));
            Gate::mutual_tls(revoked, limiter)
        }
        None => {
            warn!(
                "--insecure-dev: NO TLS. Anyone who can reach this port can claim any identity; \
                 every job will be marked insecure_transport in the ledger. Development only."
            );
            Gate::insecure_dev(limiter)
        }
    };
    info!(addr = %bound, db = %args.db.display(), "coordinator listening");
    let on_exit = shared.clone();
    let (g1, g2, g3) = (gate.clone(), gate.clone(), gate);
    server
        .add_service(InterceptedService::new(
            FederationServer::new(FederationService::new(shared.clone())).max_decoding_message_size(MAX_MESSAGE),
            move |r| g1.admit(r, "Federation", &[Role::Site]),
        ))
        .add_service(InterceptedService::new(
            JobsServer::new(JobsService::new(shared.clone())).max_decoding_message_size(MAX_MESSAGE),
            move |r| g2.admit(r, "Jobs", &[Role::Operator]),
        ))
        .add_service(InterceptedService::new(
            LedgerServer::new(LedgerService::new(shared)).max_decoding_message_size(MAX_MESSAGE),
            move |r| g3.admit(r, "Ledger", &[Role::Site, Role::Operator, Role::Auditor]),
        ))
        // TCP_NODELAY: protocol steps are small request/response exchanges
        // that Nagle's algorithm would delay by ~40 ms each.
        .serve_with_incoming_shutdown(TcpIncoming::from(listener).with_nodelay(Some(true)), async {
            shutdown_signal().await;
            info!("shutting down");
        })
        .await
        .context("server failed")?;
    // The database file alone then holds everything (a regulator may copy
    // it without its -wal file).
    if let Err(e) = on_exit.store.checkpoint().await {
        warn!("cannot checkpoint the database's write-ahead log: {e:#}");
    }
    Ok(())
}

/// SIGINT (Ctrl-C) or SIGTERM (systemd, `docker stop`, `kill`).
async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Serves `/metrics` and `/healthz` on `addr` in the background: HTTP/1.1
/// (what Prometheus and probes speak), no TLS, no identity.
async fn serve_metrics(shared: Arc<Shared>, addr: SocketAddr) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen for metrics on {addr}"))?;
    let bound = listener.local_addr()?;
    info!(addr = %bound, "serving /metrics and /healthz at http://{bound}");
    let routes = tonic::service::Routes::from(tessera_coordinator::telemetry::router(shared));
    let server = tonic::transport::Server::builder()
        .accept_http1(true)
        .timeout(Duration::from_secs(10))
        .add_routes(routes)
        .serve_with_incoming(TcpIncoming::from(listener));
    tokio::spawn(async move {
        if let Err(e) = server.await {
            tracing::error!("metrics server failed: {e:#}");
        }
    });
    Ok(())
}

/// Watches the CA's revocation list: a revoked site leaves the ledger's
/// membership (a `site_revoked` block) as soon as the list names it. (The
/// gate already refuses its requests from the same moment.)
async fn record_revoked_sites(shared: Arc<Shared>, path: PathBuf) {
    let mut seen = None;
    loop {
        let modified = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
        if modified != seen {
            seen = modified;
            match Revoked::load(&path) {
                Ok(list) => match shared.ledger.record_revocations(&list.revoked, unix_ms() as u64).await {
                    Ok(sites) => {
                        for site in sites {
                            warn!(%site, "site revoked by the consortium CA: recorded in the ledger");
                        }
                    }
                    Err(e) => tracing::error!("cannot record revocations in the ledger: {e:#}"),
                },
                Err(e) => warn!("{e:#}"),
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
