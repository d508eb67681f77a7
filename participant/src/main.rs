//! `tessera-participant`: the daemon a hospital runs next to its data.

mod answers;
mod baseline;
mod categories;
mod config;
mod contributions;
mod daemon;
mod egress;
mod identity;
mod live;
mod local;
mod policy;
mod replica;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tessera_models::metrics::Evaluation;
use tessera_models::schema::MissingRule;
use tessera_protocol::job::JobSpec;
use tessera_protocol::metrics;

use crate::config::SiteConfig;
use crate::local::LocalData;
use crate::policy::{Approvals, Decision};

/// Take part in federated training without any record leaving this site.
#[derive(Parser)]
#[command(name = "tessera-participant", version)]
struct Cli {
    /// `text` (for a person) or `json` (one object per line, for a log
    /// collector).
    #[arg(long, global = true, env = "TESSERA_LOG_FORMAT", default_value = "text")]
    log_format: tessera_protocol::cli::LogFormat,
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
        /// Override the site's TLS kit (tls.pem, tls.key, ca.pem) of the config file.
        #[arg(long)]
        tls_dir: Option<PathBuf>,
        /// Override the config's [policy] with this file's (a TOML file with
        /// the policy keys at top level).
        #[arg(long)]
        policy: Option<PathBuf>,
        /// Take part in jobs with `insecure_plaintext = true` (sets
        /// policy.allow_insecure_plaintext; off by default).
        #[arg(long)]
        allow_insecure_plaintext: bool,
        /// Keep this site's own test metrics local; its evaluation only enters
        /// the secure sum (sets policy.report_site_metrics = false).
        #[arg(long)]
        withhold_site_metrics: bool,
    },
    /// Enroll this site on its own host: create its Ed25519 signing key
    /// (site.key) and TLS key (tls.key) in the state directory, if missing,
    /// and write an enrollment request (public keys and a certificate
    /// signing request) for the consortium's CA: `tessera ca issue --csr`.
    /// No private key leaves this host.
    Enroll {
        /// The site's name in the consortium.
        #[arg(long)]
        site: String,
        /// Where the keys are kept (the site's state directory).
        #[arg(long)]
        state_dir: PathBuf,
    },
    /// Create this site's Ed25519 key (if missing) and print its roster line,
    /// to send to the consortium out of band.
    Keygen {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
    /// Show this site's daemon (running or not, connected to which
    /// coordinator, its last task and last error) and its ledger replica
    /// (verified or not, how far, and why the site halted if it did).
    /// Offline: reads the state directory. Exit 1 if halted or invalid.
    Status {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// One JSON object, for monitoring.
        #[arg(long)]
        json: bool,
    },
    /// Show exactly what a job waiting for approval would do with this
    /// site's data, and which policy limits it exceeds. Offline.
    Inspect {
        /// The job's hash (or a unique prefix), from the daemon's log.
        job_hash: String,
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
    /// Approve a job that is outside this site's policy: the daemon takes
    /// part from its next task on, and signs its acceptance into the ledger.
    Approve {
        job_hash: String,
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
    /// Reject a job: the daemon signs the rejection into the ledger and never
    /// touches this site's data for it.
    Reject {
        job_hash: String,
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
    tessera_protocol::cli::quiet_on_closed_pipe();
    let cli = Cli::parse();
    tessera_protocol::cli::init_logging(cli.log_format, "info,h2=warn");
    let result = match cli.command {
        Command::Run {
            config,
            coordinator,
            state_dir,
            roster,
            tls_dir,
            policy,
            allow_insecure_plaintext,
            withhold_site_metrics,
        } => run(
            &config,
            Overrides {
                coordinator,
                state_dir,
                roster,
                tls_dir,
                policy,
            },
            allow_insecure_plaintext,
            withhold_site_metrics,
        ),
        Command::Enroll { site, state_dir } => enroll(&site, &state_dir),
        Command::Keygen { config, state_dir } => keygen(&config, state_dir),
        Command::Check { config } => check(&config),
        Command::Inspect {
            job_hash,
            config,
            state_dir,
        } => inspect(&config, state_dir, &job_hash),
        Command::Approve {
            job_hash,
            config,
            state_dir,
        } => decide(&config, state_dir, &job_hash, Decision::Approved),
        Command::Reject {
            job_hash,
            config,
            state_dir,
        } => decide(&config, state_dir, &job_hash, Decision::Rejected),
        Command::Status {
            config,
            state_dir,
            json,
        } => status(&config, state_dir, json),
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

/// Command-line overrides of the site config.
struct Overrides {
    coordinator: Option<String>,
    state_dir: Option<PathBuf>,
    roster: Option<PathBuf>,
    tls_dir: Option<PathBuf>,
    policy: Option<PathBuf>,
}

fn run(path: &Path, o: Overrides, allow_insecure_plaintext: bool, withhold_site_metrics: bool) -> anyhow::Result<()> {
    let Overrides {
        coordinator,
        state_dir,
        roster,
        tls_dir,
        policy,
    } = o;
    let mut config = SiteConfig::load(path)?;
    if let Some(file) = policy {
        let text = std::fs::read_to_string(&file).with_context(|| format!("cannot read {}", file.display()))?;
        config.policy = toml::from_str(&text).with_context(|| format!("invalid policy {}", file.display()))?;
    }
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
    if let Some(dir) = tls_dir {
        config.tls_dir = Some(dir);
    }
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    let replica = config.state_dir.join("ledger.db");
    runtime.block_on(async {
        tokio::select! {
            result = daemon::run(config) => result,
            () = shutdown_signal() => {
                tracing::info!("shutting down");
                // The replica file alone then holds the whole ledger (a
                // regulator may copy `ledger.db` without its -wal file).
                if replica.exists() {
                    let checkpoint = async { tessera_protocol::ledger::store::LedgerStore::open(&replica).await?.checkpoint().await };
                    if let Err(e) = checkpoint.await {
                        tracing::warn!("cannot checkpoint {}: {e}", replica.display());
                    }
                }
                Ok(())
            }
        }
    })
}

/// SIGINT (Ctrl-C) or SIGTERM (systemd, `docker stop`, `kill`). Stopping
/// the daemon between two awaits is no worse than a crash, which every
/// step already survives (egress log, contributions, replica).
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

fn enroll(site: &str, state_dir: &Path) -> anyhow::Result<()> {
    use tessera_protocol::enroll;
    use tessera_protocol::identity::{Identity, Role};
    let identity = Identity::new(Role::Site, site)?;
    std::fs::create_dir_all(state_dir).with_context(|| format!("cannot create {}", state_dir.display()))?;
    let key = identity::load_or_create(state_dir)?;
    let request = enroll::make_request(&identity, state_dir, Some(&key))?;
    let path = state_dir.join(enroll::file_name(&identity));
    std::fs::write(&path, request.to_toml()).with_context(|| format!("cannot write {}", path.display()))?;
    println!(
        "{identity}: keys in {} (site.key, tls.key: keep them here)",
        state_dir.display()
    );
    println!("  enrollment request: {}", path.display());
    println!(
        "  send it to the consortium's CA: tessera ca issue --ca CA_DIR --csr {}",
        path.display()
    );
    println!("  then copy the kit it returns (tls.pem, ca.pem, roster.toml, site.toml) into this folder");
    Ok(())
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
    let ((n_train, train_positive), (n_test, test_positive)) = data.census()?;
    let all = n_train + n_test;
    let positives = train_positive + test_positive;
    println!("site {}: {}", config.site_id, config.source.label());
    println!(
        "  rows: {} read, {} kept, {} dropped for missing values",
        r.rows_read,
        r.rows_kept,
        r.rows_read - r.rows_kept
    );
    println!("  missing values per column:");
    let width = r
        .missing_per_column
        .iter()
        .map(|(name, _)| name.len())
        .max()
        .unwrap_or(0);
    for (name, n) in &r.missing_per_column {
        let rule = data.schema.columns.iter().find(|c| &c.name == name).map(|c| c.missing);
        let how = match rule {
            Some(MissingRule::Impute) if *n > 0 => " (imputed)".to_owned(),
            Some(MissingRule::Indicator) if *n > 0 => format!(" (imputed, flagged by {name}=(missing))"),
            _ => String::new(),
        };
        println!("    {name:<width$} {n}{how}");
    }
    if !r.other_per_column.is_empty() {
        println!("  values in an other bucket (no category or map rule took them):");
        for (name, n) in &r.other_per_column {
            println!("    {name:<width$} {n}");
        }
    }
    if !data.schema.discovered().is_empty() {
        println!("  categories this site would propose to a job:");
        print_proposal(&data, config.policy.discovery_min_rows, width);
        println!(
            "    (the job's categories are formed from every accepting site's proposal; the features hash below is before them)"
        );
    }
    println!(
        "  label: {positives} positive / {} negative ({:.1}% positive)",
        all - positives,
        100.0 * positives as f64 / all.max(1) as f64
    );
    let split = &data.schema.split;
    let grouped = split
        .group_by
        .as_ref()
        .map(|g| format!(", grouped by `{g}`"))
        .unwrap_or_default();
    println!(
        "  split (test_fraction {}, seed {}{grouped}): train {} ({} positive), test {} ({} positive)",
        split.test_fraction, split.seed, n_train, train_positive, n_test, test_positive
    );
    if data.streamed {
        println!(
            "  the encoded rows exceed [data] in_memory_mib = {}: read from the file on every pass",
            config.in_memory_mib
        );
    }
    println!(
        "  {} encoded features, features hash {}",
        data.n_features(),
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
            .map(|(s, e)| {
                let mut row = evaluation_json(e);
                row["site_id"] = serde_json::json!(s.as_str());
                row
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({
                "per_site": per_site,
                "mean_accuracy": result.mean_accuracy,
                "pooled": evaluation_json(&result.pooled),
            })
        );
    } else {
        println!(
            "pooled baseline, a development aid: {} trained centrally on all training splits \
             (no federation; only possible where every site's data is readable)",
            job.model.label()
        );
        println!(
            "  {:<16} {:>6} {:>9} {:>15} {:>7} {:>7}",
            "test split", "n_test", "accuracy", "roc_auc", "ap", "brier"
        );
        let row = |name: &str, e: &Evaluation| {
            println!(
                "  {:<16} {:>6} {:>9.4} {:>15} {:>7} {:>7}",
                name,
                e.n,
                e.accuracy,
                metrics::auc_cell(e.binary.roc_auc),
                metrics::cell(e.binary.average_precision),
                metrics::cell(e.binary.brier),
            )
        };
        for (site, e) in &result.per_site {
            row(site.as_str(), e);
        }
        println!("  {:<16} {:>6} {:>9.4}", "mean over sites", "", result.mean_accuracy);
        row("all sites pooled", &result.pooled);
    }
    Ok(())
}

/// An evaluation as the JSON outputs carry it: undefined metrics are `null`.
fn evaluation_json(e: &Evaluation) -> serde_json::Value {
    let mut v = serde_json::to_value(e.binary).expect("metrics serialise");
    v["n_test"] = serde_json::json!(e.n);
    v["accuracy"] = serde_json::json!(e.accuracy.is_finite().then_some(e.accuracy));
    v["loss"] = serde_json::json!(e.loss.is_finite().then_some(e.loss));
    v
}

/// `tessera-participant status`: the replica verified from scratch, and the
/// halt reason if any.
fn status(path: &Path, state_dir: Option<PathBuf>, json: bool) -> anyhow::Result<()> {
    let config = SiteConfig::load(path)?;
    let state_dir = state_dir.unwrap_or(config.state_dir);
    let file = state_dir.join("ledger.db");
    let halted = std::fs::read_to_string(state_dir.join(replica::HALT_FILE)).ok();
    let running = daemon::running_in(&state_dir);
    let live = live::read(&state_dir)?;
    let ledger = if file.exists() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        Some(runtime.block_on(async {
            let store = tessera_protocol::ledger::store::LedgerStore::open_read_only(&file).await?;
            let (blocks, hashes): (Vec<_>, Vec<_>) = store.blocks().await?.into_iter().unzip();
            anyhow::Ok(tessera_protocol::ledger::verify::verify_chain(&blocks, Some(&hashes)))
        })?)
    } else {
        None
    };
    let ago = |at_ms: u64| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        format!("{} s ago", now.saturating_sub(at_ms) / 1000)
    };
    if json {
        let verified = ledger.as_ref().and_then(|l| l.as_ref().ok());
        let report = serde_json::json!({
            "site": config.site_id.as_str(),
            "state_dir": state_dir,
            "running": running.is_some(),
            "pid": running,
            "coordinator": live.as_ref().map(|l| &l.coordinator),
            // A daemon that was killed left its last word behind.
            "connected": running.is_some() && live.as_ref().is_some_and(|l| l.connected),
            "since_ms": live.as_ref().map(|l| l.since_ms),
            "last_task": live.as_ref().and_then(|l| l.last_task.as_ref()),
            "last_error": live.as_ref().and_then(|l| l.last_error.as_ref()),
            "ledger": verified.map(|r| serde_json::json!({
                "blocks": r.blocks,
                "pending": r.pending,
                "consortium": r.genesis.consortium,
                "genesis_hash": hex::encode(r.genesis_hash),
            })),
            "ledger_error": ledger.as_ref().and_then(|l| l.as_ref().err()).map(ToString::to_string),
            "halted": halted,
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("site `{}`, state in {}", config.site_id, state_dir.display());
        match (&running, &live) {
            (Some(pid), Some(l)) if l.connected => println!(
                "daemon: running (pid {pid}), connected to {} since {}",
                l.coordinator,
                ago(l.since_ms)
            ),
            (Some(pid), Some(l)) => println!(
                "daemon: running (pid {pid}), NOT connected to {} (since {})",
                l.coordinator,
                ago(l.since_ms)
            ),
            (Some(pid), None) => println!("daemon: running (pid {pid})"),
            (None, _) => println!("daemon: not running"),
        }
        if let Some(task) = live.as_ref().and_then(|l| l.last_task.as_ref()) {
            println!("last task: job {}, {} ({})", task.job_id, task.step, ago(task.at_ms));
        }
        if let Some(error) = live.as_ref().and_then(|l| l.last_error.as_ref()) {
            println!("last error ({}): {}", ago(error.at_ms), error.message);
        }
        match &ledger {
            None => println!("ledger replica: none yet (the site has not synced with a coordinator)"),
            Some(Ok(r)) => println!(
                "ledger replica: {} blocks verified, {} awaiting their endorsement quorum; consortium `{}`, genesis {}",
                r.blocks,
                r.pending,
                r.genesis.consortium,
                hex::encode(r.genesis_hash)
            ),
            Some(Err(_)) => {}
        }
    }
    if let Some(Err(e)) = &ledger {
        anyhow::bail!("ledger replica {} does NOT verify: {e}", file.display());
    }
    match halted {
        Some(reason) => anyhow::bail!(
            "HALTED: this site does not train: {reason}\n(remove {} after investigating)",
            state_dir.join(replica::HALT_FILE).display()
        ),
        None => {
            if !json {
                println!("training: allowed (no ledger mismatch recorded)");
            }
            Ok(())
        }
    }
}

fn site_state(path: &Path, state_dir: Option<PathBuf>) -> anyhow::Result<(SiteConfig, PathBuf)> {
    let config = SiteConfig::load(path)?;
    let dir = state_dir.unwrap_or_else(|| config.state_dir.clone());
    Ok((config, dir))
}

/// The values this site would propose for each `discover = true` column
/// (what `check` and `inspect` show the data team), one line per column.
fn print_proposal(data: &LocalData, min_rows: u64, width: usize) {
    let discovered = data.schema.discovered();
    let proposal = tessera_protocol::discovery::propose(&discovered, &data.report.discovered, min_rows);
    for column in &discovered {
        let values: Vec<&str> = proposal.columns[&column.column].iter().map(String::as_str).collect();
        let seen = data.report.discovered.get(&column.column).map_or(0, |c| c.len());
        println!(
            "    {:<width$} {} of {seen} values with at least {min_rows} rows (discovery_min_rows; top_k {}): {}",
            column.column,
            values.len(),
            column.top_k,
            if values.is_empty() {
                "none".to_owned()
            } else {
                values.join(", ")
            }
        );
    }
}

/// `tessera-participant inspect`: what the job would do here, in plain words.
fn inspect(path: &Path, state_dir: Option<PathBuf>, prefix: &str) -> anyhow::Result<()> {
    let (config, dir) = site_state(path, state_dir)?;
    let approvals = Approvals::new(&dir);
    let hash = approvals.find(prefix)?;
    let (toml_text, why) = approvals.pending_job(&hash)?;
    let spec = tessera_protocol::job::JobSpec::from_toml(&toml_text)?;
    let data = LocalData::load(&config)?;
    let layout = spec.model.layout(data.n_features());
    println!("job `{}` ({hash})", spec.name);
    println!(
        "  model: {} with {} parameters, on this site's {} encoded features",
        spec.model.label(),
        layout.n_params(),
        data.n_features()
    );
    println!(
        "  training: {} rounds; each round {} with {:?}, learning rate {}, batch {} on the {} local training rows",
        spec.rounds,
        match spec.training.local_work {
            tessera_protocol::job::LocalWork::Epochs(e) => format!("{e} local epoch(s)"),
            tessera_protocol::job::LocalWork::Steps(s) => format!("{s} local step(s)"),
        },
        spec.training.optimizer,
        spec.training.learning_rate,
        spec.training.batch_size,
        data.train.len()
    );
    println!("  strategy: {}", spec.strategy_label());
    match &spec.aggregation {
        tessera_protocol::job::Aggregation::Secure(s) => println!(
            "  leaves this site: per-feature sums of the training rows and, each round, the model update \
             clipped to L2 norm {} — both only inside secure aggregation (the coordinator sees sums over \
             at least {} sites); test-set accuracy/loss/AUC{}",
            s.clip_norm,
            spec.min_sites.max(3),
            if config.policy.report_site_metrics {
                " in the clear"
            } else {
                " only inside the secure sum (policy)"
            }
        ),
        tessera_protocol::job::Aggregation::InsecurePlaintext => println!(
            "  leaves this site: per-feature sums and every round's model update IN THE CLEAR (insecure_plaintext)"
        ),
    }
    if !data.schema.discovered().is_empty() {
        println!(
            "  also leaves this site, with its acceptance (signed, to the coordinator and the job's sites): \
             the values it proposes as categories, without counts; the model then has one more input per \
             category the job's sites propose:"
        );
        print_proposal(&data, config.policy.discovery_min_rows, 0);
    }
    println!(
        "  no record leaves the site; every message is listed in {}",
        dir.join("egress.jsonl").display()
    );
    println!("outside this site's policy:");
    for line in why.lines() {
        println!("  - {line}");
    }
    match approvals.decision(&hash) {
        Some(decision) => println!("decided: {}", decision.word()),
        None => println!(
            "decide with: tessera-participant approve|reject {} --config {}{}",
            &hash[..12],
            path.display(),
            if dir == config.state_dir {
                String::new()
            } else {
                format!(" --state-dir {}", dir.display())
            }
        ),
    }
    Ok(())
}

/// `tessera-participant approve|reject`.
fn decide(path: &Path, state_dir: Option<PathBuf>, prefix: &str, decision: Decision) -> anyhow::Result<()> {
    let (_, dir) = site_state(path, state_dir)?;
    let approvals = Approvals::new(&dir);
    let hash = approvals.find(prefix)?;
    if approvals.decision(&hash) == Some(decision) {
        println!("job {hash} was already {}; nothing changed", decision.word());
        return Ok(());
    }
    approvals.decide(&hash, decision)?;
    println!(
        "job {hash} {}",
        match decision {
            Decision::Approved =>
                "approved; the daemon takes part and signs its acceptance into the ledger at its next task for the job \
                 (a job that has already started without this site runs on without it)",
            Decision::Rejected => "rejected; the daemon signs the rejection into the ledger at its next poll",
        }
    );
    Ok(())
}
