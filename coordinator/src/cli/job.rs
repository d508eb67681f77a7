//! `tessera job submit | list | status | metrics | cancel | prune`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use tessera_protocol::job::JobSpec;
use tessera_protocol::metrics::{auc_cell, cell};
use tessera_protocol::pb;
use tessera_protocol::pb::jobs_client::JobsClient;
use tonic::transport::Channel;

use super::{CliError, CliResult, connect, metrics, plot};

#[derive(Subcommand)]
pub(crate) enum JobCommand {
    /// Validate a job file and submit it.
    Submit {
        file: PathBuf,
        /// Print the job id and hash as JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// List all jobs.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show a job's rounds and per-site metrics.
    Status {
        job_id: u64,
        /// Follow the job live until it ends: each round once, as it
        /// completes, under a progress bar.
        #[arg(long)]
        watch: bool,
        /// JSON; with --watch, one JSON object per line and event (`round`,
        /// `site`, then `end` with the whole status), for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Write a job's evaluation metrics, one row per model and source (the
    /// pooled evaluation, then each site): for pandas, R or a spreadsheet.
    Metrics {
        job_id: u64,
        #[arg(long, value_enum, default_value_t = metrics::Format::Csv)]
        format: metrics::Format,
        /// Write to FILE instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Draw a job's metrics as SVG charts in DIR: loss, accuracy and ROC
    /// AUC per round, pooled, the site mean and each site in its own series.
    Plot {
        job_id: u64,
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// Cancel a queued or running job.
    Cancel { job_id: u64 },
    /// Delete the stored weights of ended jobs' models, keeping each job's
    /// final model (the one `tessera model export` gives). The ledger keeps
    /// every model's hash and records each deletion (a `models_pruned`
    /// block). Refused while a job runs.
    Prune {
        /// The jobs to prune; every ended job when none is named.
        job_ids: Vec<u64>,
        /// Say what would be deleted, delete nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

pub(crate) async fn exec(addr: &str, cmd: JobCommand) -> CliResult {
    match cmd {
        JobCommand::Submit { file, json } => submit(addr, &file, json).await,
        JobCommand::List { json } => list(addr, json).await,
        JobCommand::Status { job_id, watch, json } => {
            let mut client = JobsClient::new(connect(addr).await?);
            if watch {
                watch_job(&mut client, job_id, json).await?;
            }
            let status = client.job_status(pb::JobStatusRequest { job_id }).await?.into_inner();
            if json && watch {
                let end = json!({ "event": "end", "status": status_json(&status) });
                println!("{end}");
            } else if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&status_json(&status)).context("cannot encode JSON")?
                );
            } else {
                // The watch printed each round as it came.
                print_status(&status, !watch);
            }
            let finished = status.job.as_ref().is_some_and(|j| j.status == "finished");
            Ok(if !watch || finished {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        JobCommand::Metrics { job_id, format, out } => {
            let mut client = JobsClient::new(connect(addr).await?);
            let status = client.job_status(pb::JobStatusRequest { job_id }).await?.into_inner();
            let rows = metrics::rows(&status);
            let bytes = metrics::render(&rows, format)?;
            match out {
                Some(path) => {
                    std::fs::write(&path, bytes).with_context(|| format!("cannot write {}", path.display()))?;
                    eprintln!("wrote {} ({} rows)", path.display(), rows.len());
                }
                None => {
                    use std::io::Write;
                    std::io::stdout()
                        .write_all(&bytes)
                        .context("cannot write to standard output")?;
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        JobCommand::Plot { job_id, out } => {
            let mut client = JobsClient::new(connect(addr).await?);
            let status = client.job_status(pb::JobStatusRequest { job_id }).await?.into_inner();
            let charts = plot::charts(&status).with_context(|| format!("job {job_id}"))?;
            std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
            for chart in charts {
                let path = out.join(chart.file);
                std::fs::write(&path, &chart.svg).with_context(|| format!("cannot write {}", path.display()))?;
                println!("{} ({} series)", path.display(), chart.series.len());
            }
            Ok(ExitCode::SUCCESS)
        }
        JobCommand::Cancel { job_id } => {
            let mut client = JobsClient::new(connect(addr).await?);
            let reply = client.cancel_job(pb::CancelJobRequest { job_id }).await?.into_inner();
            eprintln!("job {job_id}: {}", reply.status);
            Ok(ExitCode::SUCCESS)
        }
        JobCommand::Prune { job_ids, dry_run } => prune(addr, job_ids, dry_run).await,
    }
}

async fn prune(addr: &str, job_ids: Vec<u64>, dry_run: bool) -> CliResult {
    let mut client = JobsClient::new(connect(addr).await?);
    let reply = client
        .prune_jobs(pb::PruneJobsRequest { job_ids, dry_run })
        .await?
        .into_inner();
    let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
    for job in &reply.jobs {
        let block = if dry_run {
            String::new()
        } else {
            format!(", ledger block {}", job.ledger_height)
        };
        println!(
            "job {} ({}): {} model(s), {:.1} MiB{block}",
            job.job_id,
            job.status,
            job.models,
            mib(job.bytes)
        );
    }
    let total: u64 = reply.jobs.iter().map(|j| j.bytes).sum();
    let models: u32 = reply.jobs.iter().map(|j| j.models).sum();
    match (reply.jobs.is_empty(), dry_run) {
        (true, _) => eprintln!("nothing to prune: every ended job holds only its final model"),
        (false, true) => eprintln!(
            "would delete {models} model(s), {:.1} MiB (dry run: nothing deleted)",
            mib(total)
        ),
        (false, false) => eprintln!("deleted {models} model(s), {:.1} MiB", mib(total)),
    }
    if !reply.vacuum_error.is_empty() {
        eprintln!(
            "the database file was not compacted ({}): the freed space is reused by later writes",
            reply.vacuum_error
        );
    } else if !dry_run && !reply.jobs.is_empty() {
        eprintln!(
            "database file: {:.1} MiB, {:.1} MiB after compaction",
            mib(reply.file_bytes_before),
            mib(reply.file_bytes_after)
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn submit(addr: &str, file: &Path, json: bool) -> CliResult {
    let job_toml =
        std::fs::read_to_string(file).map_err(|e| CliError::User(format!("cannot read {}: {e}", file.display())))?;
    // Validate locally first: the same rules as the coordinator, with the
    // file name in the message.
    JobSpec::from_toml(&job_toml).map_err(|e| CliError::User(format!("{}: {e}", file.display())))?;
    let mut client = JobsClient::new(connect(addr).await?);
    let reply = client.submit_job(pb::SubmitJobRequest { job_toml }).await?.into_inner();
    if json {
        println!("{}", json!({ "job_id": reply.job_id, "job_hash": reply.job_hash }));
    } else {
        println!("{}", reply.job_id);
        eprintln!("submitted job {} (sha256 {})", reply.job_id, reply.job_hash);
    }
    Ok(ExitCode::SUCCESS)
}

async fn list(addr: &str, json: bool) -> CliResult {
    let mut client = JobsClient::new(connect(addr).await?);
    let jobs = client.list_jobs(pb::ListJobsRequest {}).await?.into_inner().jobs;
    if json {
        let rows: Vec<_> = jobs.iter().map(summary_json).collect();
        println!("{}", serde_json::to_string_pretty(&rows).context("cannot encode JSON")?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:>4}  {:<24} {:<10} {:>8}  {:<16} model",
        "id", "name", "status", "rounds", "strategy"
    );
    for j in &jobs {
        println!(
            "{:>4}  {:<24} {:<10} {:>8}  {:<16} {}",
            j.job_id,
            j.name,
            j.status,
            format!("{}/{}", j.rounds_done, j.rounds_total),
            j.strategy,
            j.model
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Follows a job with a progress bar, printing a line per completed round.
async fn watch_job(client: &mut JobsClient<Channel>, job_id: u64, json: bool) -> Result<(), CliError> {
    // JSON lines go to standard output alone: no bar to interleave.
    let bar = if json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(0)
    };
    bar.set_style(
        ProgressStyle::with_template("{spinner} job {prefix} [{bar:30}] {pos}/{len} rounds  {elapsed_precise}  {msg}")
            .expect("static template")
            .progress_chars("=> "),
    );
    bar.set_prefix(job_id.to_string());
    bar.enable_steady_tick(Duration::from_millis(120));
    // Without a terminal the bar is hidden, and its `println` with it: the
    // lines go to standard output then (a log file, a pipe).
    let say = |line: String| {
        if bar.is_hidden() {
            println!("{line}");
        } else {
            bar.println(line);
        }
    };
    let mut printed = 0usize;
    let mut absent_shown = BTreeSet::new();
    loop {
        let status = client.job_status(pb::JobStatusRequest { job_id }).await?.into_inner();
        let job = status.job.clone().unwrap_or_default();
        bar.set_length(u64::from(job.rounds_total));
        bar.set_position(u64::from(job.rounds_done));
        bar.set_message(match status.waiting.as_str() {
            "" => job.phase.clone(),
            waiting => format!("{}: waiting for {waiting}", job.phase),
        });
        // A site that holds, declines or is left out is news the moment it
        // happens (and again when its state changes): the ML lead should
        // not have to wait for a timeout.
        for site in absent(&status.sites) {
            if absent_shown.insert((site.site_id.clone(), site.state.clone())) {
                say(if json {
                    json!({ "event": "site", "site_id": site.site_id, "state": site.state, "reason": site.reason })
                        .to_string()
                } else {
                    absent_line(site)
                });
            }
        }
        let metrics = metrics_by_round(&status.metrics);
        let pooled = pooled_by_round(&status.pooled);
        if printed == 0 && !status.rounds.is_empty() && !json {
            say(ROUND_HEADER.to_owned());
        }
        for round in status.rounds.iter().skip(printed) {
            let (metrics, pooled) = (metrics.get(&round.round), pooled.get(&round.round).copied());
            say(if json {
                round_event(job_id, round, metrics, pooled).to_string()
            } else {
                round_line(round, job.rounds_total, metrics, pooled)
            });
            printed += 1;
        }
        if matches!(job.status.as_str(), "finished" | "failed" | "cancelled") {
            bar.finish_and_clear();
            if !job.error.is_empty() && !json {
                eprintln!("job {job_id} {}: {}", job.status, job.error);
            }
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Metrics of the model *before* each round, keyed by the round that produced
/// the model (metrics reported in round r describe the model of round r-1).
fn metrics_by_round(metrics: &[pb::SiteMetrics]) -> BTreeMap<u32, Vec<&pb::SiteMetrics>> {
    let mut by_round: BTreeMap<u32, Vec<&pb::SiteMetrics>> = BTreeMap::new();
    for m in metrics {
        by_round.entry(m.round.saturating_sub(1)).or_default().push(m);
    }
    by_round
}

/// Pooled metrics keyed like [`metrics_by_round`].
fn pooled_by_round(pooled: &[pb::PooledMetrics]) -> BTreeMap<u32, &pb::PooledMetrics> {
    pooled.iter().map(|p| (p.round.saturating_sub(1), p)).collect()
}

fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    if n == 0 { f64::NAN } else { sum / n as f64 }
}

/// The columns of [`round_line`]. The metrics are those of the model the
/// round started from (the sites evaluate it before they train): pooled
/// over every site's test rows by secure sum (log loss and Brier score:
/// counts such as accuracy are pooled for the final model only), and the
/// mean of the sites' own figures, in separate columns. The training loss
/// is the round's own, weighted by the sites' training rows (securely
/// summed in secure jobs).
const ROUND_HEADER: &str = "round       sites  loss pooled  brier pooled  acc site mean  auc site mean  train loss  \
                            round ms  model         (metrics: of the model each round started from)";

fn round_line(
    round: &pb::RoundSummary,
    total: u32,
    metrics: Option<&Vec<&pb::SiteMetrics>>,
    pooled: Option<&pb::PooledMetrics>,
) -> String {
    let figure = |v: Option<f64>, width: usize, digits: usize| match v.filter(|v| v.is_finite()) {
        Some(v) => format!("{v:>width$.digits$}"),
        None => format!("{:>width$}", "-"),
    };
    let dropped = if round.dropped.is_empty() {
        String::new()
    } else {
        format!("  dropped: {}", round.dropped.join(", "))
    };
    format!(
        "{:<11} {:>5}  {}  {}  {}  {}  {}  {:>8}  {}{dropped}",
        format!("{:>3}/{total}", round.round),
        round.sites.len(),
        figure(pooled.map(|p| p.loss), 11, 4),
        figure(pooled.and_then(|p| p.binary.as_ref()?.brier), 12, 4),
        figure(metrics.map(|ms| mean(ms.iter().map(|m| m.accuracy))), 13, 3),
        figure(metrics.and_then(|ms| site_mean_auc(ms)), 13, 3),
        figure(Some(round.mean_train_loss), 10, 4),
        round.duration_ms,
        &round.model_hash[..12.min(round.model_hash.len())],
    )
}

/// A round as `--watch --json` streams it.
fn round_event(
    job_id: u64,
    round: &pb::RoundSummary,
    metrics: Option<&Vec<&pb::SiteMetrics>>,
    pooled: Option<&pb::PooledMetrics>,
) -> serde_json::Value {
    json!({
        "event": "round", "job_id": job_id, "round": round.round, "sites": round.sites,
        "dropped": round.dropped, "duration_ms": round.duration_ms,
        "mean_train_loss": finite(round.mean_train_loss), "model_hash": round.model_hash,
        "accuracy_before": {
            "site_mean": metrics.map(|ms| finite(mean(ms.iter().map(|m| m.accuracy)))),
        },
        "loss_before": { "pooled": pooled.map(|p| finite(p.loss)) },
        "brier_before": { "pooled": pooled.and_then(|p| p.binary.as_ref()?.brier) },
        "roc_auc_before": { "site_mean": metrics.and_then(|ms| site_mean_auc(ms)) },
    })
}

/// The mean ROC AUC over the sites where it is defined (a site whose test
/// split has one class has none); `None` if no site has one.
fn site_mean_auc(metrics: &[&pb::SiteMetrics]) -> Option<f64> {
    let defined: Vec<f64> = metrics.iter().map(|m| m.auc).filter(|a| a.is_finite()).collect();
    (!defined.is_empty()).then(|| mean(defined.into_iter()))
}

/// The job's status; its rounds too unless `--watch` printed them already.
fn print_status(status: &pb::JobStatusResponse, with_rounds: bool) {
    let Some(job) = &status.job else { return };
    println!(
        "job {} \"{}\": {} ({}/{} rounds), {}, {}",
        job.job_id, job.name, job.status, job.rounds_done, job.rounds_total, job.strategy, job.model
    );
    if !job.error.is_empty() {
        println!("  reason: {}", job.error);
    }
    if !status.waiting.is_empty() {
        println!("  waiting for {}", status.waiting);
    }
    let accepted = status.sites.iter().filter(|s| s.state == "accepted").count();
    if !status.sites.is_empty() {
        println!("  sites: {accepted} accepted");
    }
    for site in absent(&status.sites) {
        println!("  {}", absent_line(site));
    }
    let metrics = metrics_by_round(&status.metrics);
    let pooled = pooled_by_round(&status.pooled);
    if with_rounds && !status.rounds.is_empty() {
        println!("  {ROUND_HEADER}");
    }
    for round in status.rounds.iter().filter(|_| with_rounds) {
        println!(
            "  {}",
            round_line(
                round,
                job.rounds_total,
                metrics.get(&round.round),
                pooled.get(&round.round).copied()
            )
        );
    }
    let last_model_round = job.rounds_done;
    if let Some(final_metrics) = metrics.get(&last_model_round).filter(|_| last_model_round > 0) {
        println!("final model (after round {last_model_round}) on each site's test split:");
        println!("  {FINAL_HEADER}");
        for m in final_metrics {
            println!(
                "  {}",
                final_line(&m.site_id, m.n_test, m.accuracy, m.loss, Some(m.auc), m.binary.as_ref())
            );
        }
        println!(
            "  {:<16} {:>9} {:>8} {:>15}",
            "mean over sites",
            "",
            format!("{:.4}", mean(final_metrics.iter().map(|m| m.accuracy))),
            cell(site_mean_auc(final_metrics)),
        );
    }
    if let Some(p) = pooled.get(&last_model_round).filter(|_| last_model_round > 0) {
        println!(
            "  {}",
            final_line("pooled (secure)", p.n_test, p.accuracy, p.loss, None, p.binary.as_ref())
        );
        println!(
            "  (pooled: over {} sites' {} test rows by secure sum; threshold {})",
            p.n_sites,
            p.n_test,
            p.binary.as_ref().map_or("-".to_owned(), |b| b.threshold.to_string())
        );
    }
}

/// The columns of [`final_line`]: a model's clinical metrics on one test split.
const FINAL_HEADER: &str = "source              n_test accuracy         roc_auc      ap   brier cal_int cal_slp    sens    spec     ppv    loss";

/// One row of the final model's table. `auc` is a site's own figure from
/// software that reports no `binary` metrics.
fn final_line(
    source: &str,
    n_test: u64,
    accuracy: f64,
    loss: f64,
    auc: Option<f64>,
    binary: Option<&pb::BinaryMetrics>,
) -> String {
    let b = binary.cloned().unwrap_or_default();
    let auc = if binary.is_some() {
        b.roc_auc
    } else {
        auc.filter(|a| a.is_finite())
    };
    let c = |v: Option<f64>| cell(v);
    format!(
        "{:<16} {:>9} {:>8} {:>15} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7}",
        source,
        n_test,
        c(Some(accuracy)),
        auc_cell(auc),
        c(b.average_precision),
        c(b.brier),
        c(b.calibration_intercept),
        c(b.calibration_slope),
        c(b.sensitivity),
        c(b.specificity),
        c(b.ppv),
        c(Some(loss)),
    )
}

/// The sites that are not taking part in the job: held, declined or left out.
fn absent(sites: &[pb::SiteState]) -> impl Iterator<Item = &pb::SiteState> {
    sites.iter().filter(|s| s.state != "accepted")
}

fn absent_line(site: &pb::SiteState) -> String {
    format!("{} {}: {}", site.site_id, site.state, site.reason)
}

fn summary_json(j: &pb::JobSummary) -> serde_json::Value {
    json!({
        "job_id": j.job_id, "name": j.name, "status": j.status, "phase": j.phase,
        "rounds_done": j.rounds_done, "rounds_total": j.rounds_total,
        "strategy": j.strategy, "model": j.model, "job_hash": j.job_hash,
        "created_at_ms": j.created_at_ms, "error": j.error,
    })
}

fn finite(v: f64) -> serde_json::Value {
    if v.is_finite() {
        json!(v)
    } else {
        serde_json::Value::Null
    }
}

fn status_json(status: &pb::JobStatusResponse) -> serde_json::Value {
    let job = status.job.clone().unwrap_or_default();
    let rounds: Vec<_> = status
        .rounds
        .iter()
        .map(|r| {
            json!({
                "round": r.round, "sites": r.sites, "dropped": r.dropped, "model_hash": r.model_hash,
                "total_weight": r.total_weight, "duration_ms": r.duration_ms, "mean_train_loss": finite(r.mean_train_loss),
            })
        })
        .collect();
    let metrics: Vec<_> = status
        .metrics
        .iter()
        .map(|m| {
            with_binary(
                json!({
                    "model_of_round": m.round.saturating_sub(1), "site_id": m.site_id, "n_test": m.n_test,
                    "accuracy": m.accuracy, "auc": finite(m.auc), "loss": m.loss, "model_hash": m.model_hash,
                }),
                m.binary.as_ref(),
            )
        })
        .collect();
    let by_round = metrics_by_round(&status.metrics);
    let final_metrics = by_round.get(&job.rounds_done).filter(|_| job.rounds_done > 0);
    let pooled: Vec<_> = status
        .pooled
        .iter()
        .map(|p| {
            with_binary(
                json!({
                    "model_of_round": p.round.saturating_sub(1), "n_sites": p.n_sites, "n_test": p.n_test,
                    "accuracy": finite(p.accuracy), "loss": finite(p.loss),
                }),
                p.binary.as_ref(),
            )
        })
        .collect();
    let final_pooled = pooled
        .iter()
        .find(|p| p["model_of_round"] == job.rounds_done && job.rounds_done > 0)
        .cloned();
    let sites: Vec<_> = status
        .sites
        .iter()
        .map(|s| json!({ "site_id": s.site_id, "state": s.state, "reason": s.reason }))
        .collect();
    json!({
        "job": summary_json(&job),
        "waiting": (!status.waiting.is_empty()).then_some(&status.waiting),
        "sites": sites,
        "rounds": rounds,
        "metrics": metrics,
        "pooled": pooled,
        "final_mean_accuracy": final_metrics.map(|ms| finite(mean(ms.iter().map(|m| m.accuracy)))),
        "final_pooled_accuracy": final_pooled.as_ref().map(|p| p["accuracy"].clone()),
        "final_pooled": final_pooled,
        "final_roc_curve": status.roc_curve.iter().map(|p| [p.x, p.y]).collect::<Vec<_>>(),
        "final_calibration": status
            .calibration
            .iter()
            .map(|b| json!({ "predicted": b.predicted, "observed": b.observed, "rows": b.rows }))
            .collect::<Vec<_>>(),
    })
}

/// A metrics object with the clinical metrics alongside (`null` where
/// undefined, or where the source reported none).
fn with_binary(mut object: serde_json::Value, binary: Option<&pb::BinaryMetrics>) -> serde_json::Value {
    let b = binary.cloned().unwrap_or_default();
    let fields = [
        ("roc_auc", b.roc_auc),
        ("average_precision", b.average_precision),
        ("brier", b.brier),
        ("calibration_intercept", b.calibration_intercept),
        ("calibration_slope", b.calibration_slope),
        ("threshold", binary.map(|b| b.threshold)),
        ("sensitivity", b.sensitivity),
        ("specificity", b.specificity),
        ("ppv", b.ppv),
    ];
    for (name, value) in fields {
        object[name] = json!(value);
    }
    object
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Switzerland's test split in the heart demo has one class: its AUC
    /// is undefined, said in the table and `null` in JSON, never NaN.
    #[test]
    fn an_undefined_auc_is_said_not_printed_as_nan() {
        assert_eq!(auc_cell(Some(0.81236)), "0.8124");
        assert_eq!(auc_cell(Some(f64::NAN)), "n/a (one class)");
        assert_eq!(auc_cell(None), "n/a (one class)");
        let line = final_line("switzerland", 16, 0.9375, 0.3, Some(f64::NAN), None);
        assert!(line.contains("n/a (one class)") && !line.contains("NaN"), "{line}");
        let b = pb::BinaryMetrics {
            roc_auc: Some(0.75),
            brier: Some(0.2),
            threshold: 0.5,
            ..Default::default()
        };
        let line = final_line("pooled (secure)", 120, 0.8, 0.45, None, Some(&b));
        assert!(
            line.contains("0.7500") && line.contains("0.2000") && !line.contains("NaN"),
            "{line}"
        );
        assert_eq!(FINAL_HEADER.split_whitespace().count(), 12);
        assert_eq!(finite(f64::NAN), serde_json::Value::Null);
        assert_eq!(finite(0.5), serde_json::json!(0.5));
    }
}
