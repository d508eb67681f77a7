//! `tessera-participant`: the daemon a hospital runs next to its data.

mod baseline;
mod config;
mod daemon;
mod egress;
mod identity;
mod local;
mod replica;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tessera_protocol::job::JobSpec;

use crate::config::SiteConfig;
use crate::local::LocalData;

/// Take part in federated training without any record leaving this site.
#[derive(Parser)]
#[command(name = "tessera-participant", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Connect to the coordinator and take part in jobs.
    Run {
        #[arg(long)]
        config: PathBuf,
        /// Override the coordinator address of the config file.
        #[arg(long)]
        coordinator: Option<String>,
        /// Override the state directory (egress log, site key) of the config file.
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Override the consortium roster of the config file.
        #[arg(long)]
        roster: Option<PathBuf>,
        /// Take part in jobs with `insecure_plaintext = true` (sets
        /// policy.allow_insecure_plaintext; off by default).
        #[arg(long)]
        allow_insecure_plaintext: bool,
        /// Keep this site's own test metrics local; its evaluation only enters
        /// the secure sum (sets policy.report_site_metrics = false).
        #[arg(long)]
        withhold_site_metrics: bool,
    },
    /// Create this site's Ed25519 key (if missing) and print its roster line,
    /// to send to the consortium out of band.
    Keygen {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
    /// Show this site's ledger replica: verified or not, how far, and why
    /// the site halted if it did. Offline. Exit 1 if halted or invalid.
    Status {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
    /// Validate the local data offline and summarise it; sends nothing.
    Check {
        #[arg(long)]
        config: PathBuf,
    },
    /// Train the job's model centrally on the union of several sites' data
    /// (research baseline for local simulations; needs every site's files).
    PooledBaseline {
        #[arg(long)]
        job: PathBuf,
        #[arg(long = "config", required = true)]
        configs: Vec<PathBuf>,
        /// Override the job's seed.
        #[arg(long)]
        seed: Option<u64>,
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,h2=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match Cli::parse().command {
        Command::Run {
            config,
            coordinator,
            state_dir,
            roster,
            allow_insecure_plaintext,
            withhold_site_metrics,
        } => run(
            &config,
            coordinator,
            state_dir,
            roster,
            allow_insecure_plaintext,
            withhold_site_metrics,
        ),
        Command::Keygen { config, state_dir } => keygen(&config, state_dir),
        Command::Check { config } => check(&config),
        Command::Status { config, state_dir } => status(&config, state_dir),
        Command::PooledBaseline {
            job,
            configs,
            seed,
            json,
        } => pooled(&job, &configs, seed, json),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(
    path: &Path,
    coordinator: Option<String>,
    state_dir: Option<PathBuf>,
    roster: Option<PathBuf>,
    allow_insecure_plaintext: bool,
    withhold_site_metrics: bool,
) -> anyhow::Result<()> {
    let mut config = SiteConfig::load(path)?;
    if withhold_site_metrics {
        config.policy.report_site_metrics = false;
    }
    if allow_insecure_plaintext {
        tracing::warn!(
            "this site takes part in insecure_plaintext jobs: its updates reach the coordinator in the clear"
        );
        config.policy.allow_insecure_plaintext = true;
    }
    if let Some(addr) = coordinator {
        config.coordinator = addr;
    }
    if let Some(dir) = state_dir {
        config.state_dir = dir;
    }
    if let Some(roster) = roster {
        config.roster_path = Some(roster);
    }
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(daemon::run(config))
}

fn keygen(path: &Path, state_dir: Option<PathBuf>) -> anyhow::Result<()> {
    let mut config = SiteConfig::load(path)?;
    if let Some(dir) = state_dir {
        config.state_dir = dir;
    }
    let key = identity::load_or_create(&config.state_dir)?;
    println!("{} = \"{}\"", config.site_id, hex::encode(key.public_key()));
    Ok(())
}

fn check(path: &Path) -> anyhow::Result<()> {
    let config = SiteConfig::load(path)?;
    let data = LocalData::load(&config)?;
    let r = &data.report;
    let all = data.train.len() + data.test.len();
    let positives = data.train.n_positive() + data.test.n_positive();
    println!("site {}: {}", config.site_id, config.data_path.display());
    println!(
        "  rows: {} read, {} kept, {} dropped for missing values",
        r.rows_read,
        r.rows_kept,
        r.rows_read - r.rows_kept
    );
    println!("  missing values per column:");
    for (name, n) in &r.missing_per_column {
        println!("    {name:<12} {n}");
    }
    println!(
        "  label: {positives} positive / {} negative ({:.1}% positive)",
        all - positives,
        100.0 * positives as f64 / all.max(1) as f64
    );
    println!(
        "  split (test_fraction {}, seed {}): train {} ({} positive), test {} ({} positive)",
        data.schema.split.test_fraction,
        data.schema.split.seed,
        data.train.len(),
        data.train.n_positive(),
        data.test.len(),
        data.test.n_positive()
    );
    println!(
        "  {} encoded features, features hash {}",
        data.train.n_features,
        &data.schema.features_hash()[..16]
    );
    println!("  nothing was sent: check runs offline");
    Ok(())
}

fn pooled(job_path: &Path, configs: &[PathBuf], seed: Option<u64>, json: bool) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(job_path).with_context(|| format!("cannot read {}", job_path.display()))?;
    let mut job = JobSpec::from_toml(&text).with_context(|| format!("{}", job_path.display()))?;
    if let Some(seed) = seed {
        job.seed = seed;
    }
    let mut sites = Vec::new();
    for path in configs {
        let config = SiteConfig::load(path)?;
        sites.push((config.site_id.clone(), LocalData::load(&config)?));
    }
    let result = baseline::pooled_baseline(&job, &sites)?;
    if json {
        let per_site: Vec<_> = result
            .per_site
            .iter()
            .map(|(s, n, a)| serde_json::json!({ "site_id": s.as_str(), "n_test": n, "accuracy": a }))
            .collect();
        println!(
            "{}",
            serde_json::json!({ "per_site": per_site, "mean_accuracy": result.mean_accuracy })
        );
    } else {
        println!(
            "pooled baseline ({} trained centrally on all training splits):",
            job.model.label()
        );
        for (site, n, acc) in &result.per_site {
            println!("  {:<16} {:>6} {:>9.4}", site.as_str(), n, acc);
        }
        println!("  {:<16} {:>6} {:>9.4}", "mean over sites", "", result.mean_accuracy);
    }
    Ok(())
}

/// `tessera-participant status`: the replica verified from scratch, and the
/// halt reason if any.
fn status(path: &Path, state_dir: Option<PathBuf>) -> anyhow::Result<()> {
    let config = SiteConfig::load(path)?;
    let state_dir = state_dir.unwrap_or(config.state_dir);
    let file = state_dir.join("ledger.db");
    let halted = std::fs::read_to_string(state_dir.join(replica::HALT_FILE)).ok();
    println!("site `{}`, state in {}", config.site_id, state_dir.display());
    if !file.exists() {
        println!("ledger replica: none yet (the site has not synced with a coordinator)");
    } else {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let verdict = runtime.block_on(async {
            let store = tessera_protocol::ledger::store::LedgerStore::open_read_only(&file).await?;
            let (blocks, hashes): (Vec<_>, Vec<_>) = store.blocks().await?.into_iter().unzip();
            anyhow::Ok(tessera_protocol::ledger::verify::verify_chain(&blocks, Some(&hashes)))
        })?;
        match verdict {
            Ok(r) => println!(
                "ledger replica: {} blocks verified, {} awaiting their endorsement quorum; consortium `{}`, genesis {}",
                r.blocks,
                r.pending,
                r.genesis.consortium,
                hex::encode(r.genesis_hash)
            ),
            Err(e) => anyhow::bail!("ledger replica {} does NOT verify: {e}", file.display()),
        }
    }
    match halted {
        Some(reason) => anyhow::bail!(
            "HALTED: this site does not train: {reason}\n(remove {} after investigating)",
            state_dir.join(replica::HALT_FILE).display()
        ),
        None => {
            println!("training: allowed (no ledger mismatch recorded)");
            Ok(())
        }
    }
}
