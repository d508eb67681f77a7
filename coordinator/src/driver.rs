//! The job driver: takes queued jobs one at a time through
//! waiting for sites → federated preprocessing → rounds → final evaluation.
//!
//! Like quinn's connection driver it is mechanical: install a phase in the
//! shared state, wake the sites, then tick (feed heartbeats and the clock to
//! the protocol machine) until the phase settles, persist, repeat. Every
//! protocol decision is taken in `tessera_protocol`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tessera_protocol::aggregate::SecureSum;
use tessera_protocol::evaluation;
use tessera_protocol::ids::{JobId, SiteId, sha256_hex};
use tessera_protocol::job::{Aggregation, JobSpec, SecureAggSpec};
use tessera_protocol::ledger::merkle;
use tessera_protocol::ledger::payload::{
    Commitment, DeclaredCounts, Dropout, JobEnded, Metrics, Payload, PooledMetrics, RoundCompleted, SiteMetrics,
    Summation,
};
use tessera_protocol::model::{decode_params, encode_params, initial_params, model_hash};
use tessera_protocol::pb;
use tessera_protocol::replay::round_sum;
use tessera_protocol::round::{MemberState, RoundCollector, RoundParams};
use tessera_protocol::secagg::server::{Abort, Transcript};
use tessera_protocol::secagg::{Phase as SecPhase, RoundContext, commitment, exact};
use tessera_protocol::stats::{ClassCounts, FeatureStats, Normalization, sum_plaintext_stats};
use tessera_protocol::strategy;
use tracing::{error, info, warn};

use crate::secure::SecureSession;
use crate::state::{ActiveJob, Phase, RoundPhase, Shared, StatsPhase};
use crate::store::{CANCELLED, JobRow, PooledRow, RoundRecord, Store, binary_json, binary_metrics};
use crate::unix_ms;

/// Longest wait between two looks at a phase (dropouts are noticed this late
/// at most); deliveries wake the driver at once through `Shared::progress`.
const TICK: Duration = Duration::from_millis(100);
/// How often the driver looks for the endorsements that make a seal final.
const SEAL_POLL: Duration = Duration::from_millis(5);
/// Once `min_sites` are online, how long to wait for more before starting.
const GATHER_GRACE_MS: u64 = 3_000;

/// Why a job stopped before finishing.
enum Stop {
    Cancelled,
    Failed(String),
}

/// SQLite's word for a full disk (or a database at its size limit).
const DISK_FULL: &str = "database or disk is full";
/// SQLite's words for a store that may work again later (space freed, a
/// disk back, a lock released): a job's end is retried while they last.
const STORAGE_TROUBLE: [&str; 4] = [
    DISK_FULL,
    "disk I/O error",
    "database is locked",
    "unable to open database file",
];
const DISK_FULL_REASON: &str = "the coordinator's disk is full: it cannot store the job's progress";

impl From<anyhow::Error> for Stop {
    fn from(e: anyhow::Error) -> Self {
        let error = format!("{e:#}");
        if error.contains(DISK_FULL) {
            return Stop::Failed(format!("{DISK_FULL_REASON} ({error})"));
        }
        Stop::Failed(format!("internal error: {error}"))
    }
}

/// Runs queued jobs forever.
pub async fn run(shared: Arc<Shared>) {
    loop {
        match shared.store.next_to_run().await {
            Ok(Some(job)) => run_job(&shared, job).await,
            Ok(None) => {
                let _ = tokio::time::timeout(Duration::from_millis(500), shared.wake.notified()).await;
            }
            Err(e) => {
                error!("cannot read the job queue: {e:#}");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

async fn run_job(shared: &Arc<Shared>, row: JobRow) {
    let job_id = JobId(row.id as u64);
    let (status, reason) = match JobSpec::from_toml(&row.job_toml) {
        // Validated at submission; a failure here means the stored file was
        // changed or the validation rules tightened since.
        Err(e) => ("failed", format!("job file no longer valid: {e}")),
        Ok(spec) => {
            if row.status == "running" {
                info!(job = %job_id, phase = %row.phase, rounds_done = row.rounds_done, "job resumes after a coordinator restart");
            } else if let Err(e) = shared.store.set_status(job_id, "running", "", unix_ms()).await {
                error!("job {job_id}: {e:#}");
            }
            shared.lock().active = Some(ActiveJob {
                job_id,
                spec: spec.clone(),
                job_toml: row.job_toml.clone(),
                job_hash: row.job_hash.clone(),
                cancel_requested: false,
                phase: Phase::WaitingForSites,
                held: BTreeMap::new(),
                failed: BTreeSet::new(),
                restarted: BTreeSet::new(),
            });
            info!(job = %job_id, name = %spec.name, "job started");
            let result = drive(shared, job_id, &spec, &row).await;
            shared.lock().active = None;
            shared.wake.notify_waiters();
            match result {
                Ok(()) => ("finished", String::new()),
                Err(Stop::Cancelled) => ("cancelled", CANCELLED.to_owned()),
                Err(Stop::Failed(reason)) => ("failed", reason),
            }
        }
    };
    shared.telemetry.job_ended(status);
    match status {
        "finished" => info!(job = %job_id, "job finished"),
        _ => warn!(job = %job_id, status, reason = %reason, "job stopped"),
    }
    record_end(shared, job_id, status, &reason).await;
    if shared.auto_prune.applies_to(status) {
        auto_prune(shared, job_id).await;
    }
}

/// Prunes an ended job's round models by the coordinator's retention
/// policy (`--auto-prune`). Refused while a site runs software that would
/// not verify the block (said in the log; the job's models stay, for a
/// later `tessera job prune`).
async fn auto_prune(shared: &Arc<Shared>, job_id: JobId) {
    let policy = shared.auto_prune.name();
    let by = format!("the coordinator (--auto-prune {policy})");
    let reason = format!("retention policy `--auto-prune {policy}`: the job's round models, not its final one");
    if let Err(e) = crate::prune::apply(shared, &by, &reason, &[job_id.0], false).await {
        warn!(job = %job_id, "round models not pruned by the retention policy: {e}");
    }
}

/// Records how a job ended, retrying while the store fails for a reason
/// that can pass (`STORAGE_TROUBLE`): a job whose end could not be written
/// (a full disk) would otherwise stay "running" in the database for good
/// while the next job started. The next job waits meanwhile, for its blocks
/// must follow this one's end on the chain. The error is logged when it
/// first happens and when it changes, not at every attempt; the attempts
/// slow from 1 s to 30 s.
async fn record_end(shared: &Arc<Shared>, job_id: JobId, status: &str, reason: &str) {
    let mut reason = reason.to_owned();
    let mut last_error = String::new();
    let mut pause = Duration::from_secs(1);
    loop {
        match end_job(shared, job_id, status, &reason).await {
            Ok(()) => {
                if !last_error.is_empty() {
                    info!(job = %job_id, status, "the job's end is recorded at last");
                }
                return;
            }
            Err(e) => {
                let error = format!("{e:#}");
                // What stopped the job is then most likely the full disk
                // (sites whose endorsements could not be stored dropped
                // out of the round): the reason says so first.
                if error.contains(DISK_FULL) && !reason.starts_with(DISK_FULL_REASON) {
                    reason = format!("{DISK_FULL_REASON}; the job stopped with: {reason}");
                }
                // Anything else (a bug) would fail the same way forever and
                // hold up every later job: said, and given up as before.
                if !STORAGE_TROUBLE.iter().any(|t| error.contains(t)) {
                    error!(job = %job_id, status, "cannot record the job's end: {error}");
                    return;
                }
                if error != last_error {
                    error!(job = %job_id, status, "cannot record the job's end (retrying until it is stored): {error}");
                    last_error = error;
                }
            }
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(30));
    }
}

/// Stores how a job ended, with its ledger blocks: the final model's
/// evaluation (when there was one) and the end itself.
async fn end_job(shared: &Arc<Shared>, job_id: JobId, status: &str, reason: &str) -> anyhow::Result<()> {
    let row = shared.store.job(job_id).await?.context("job vanished")?;
    let now_ms = unix_ms();
    let final_round = row.rounds_done as u32 + 1;
    let final_metrics = match &row.final_model_hash {
        Some(hash) if status == "finished" => Some(metrics_block(shared, job_id, final_round, hash).await?),
        _ => None,
    };
    let mut tx = shared.ledger.begin().await?;
    Store::set_status_in(&mut tx.tx, job_id, status, reason, now_ms).await?;
    Store::forget_sessions_in(&mut tx.tx, job_id, u32::MAX).await?;
    if let Some(block) = final_metrics {
        tx.append(&block, now_ms as u64).await?;
    }
    tx.append(&job_ended(&row, status, reason), now_ms as u64).await?;
    tx.commit().await
}

/// The ledger block that closes a job.
pub fn job_ended(row: &JobRow, status: &str, reason: &str) -> Payload {
    Payload::JobEnded(JobEnded {
        job_id: row.id as u64,
        status: status.to_owned(),
        reason: reason.to_owned(),
        rounds_done: row.rounds_done as u32,
        final_model_sha256: row.final_model_hash.clone(),
    })
}

/// The ledger block of a finished round.
fn round_block(
    ctx: RoundContext,
    spec: &JobSpec,
    result: &RoundResult,
    base_hash: &str,
    model_hash: &str,
    n_params: usize,
    config_sha256: &str,
) -> Payload {
    let (commitments, commitment_root) = commitment_list(&result.commitments);
    let clip_norm = match &spec.aggregation {
        Aggregation::Secure(s) => Some(s.clip_norm),
        Aggregation::InsecurePlaintext => None,
    };
    Payload::RoundCompleted(Box::new(RoundCompleted {
        job_id: ctx.job_id,
        round: ctx.round,
        contributors: result.sum.contributors.iter().map(|s| s.to_string()).collect(),
        dropouts: result
            .dropouts
            .iter()
            .map(|(site, phase)| Dropout {
                site: site.to_string(),
                phase: phase.clone(),
            })
            .collect(),
        commitment_root,
        commitments,
        aggregate_sha256: result.aggregate_sha256.clone(),
        base_model_sha256: base_hash.to_owned(),
        model_sha256: model_hash.to_owned(),
        n_params: n_params as u64,
        total_weight: result.sum.total_weight,
        strategy: spec.strategy_label(),
        config_sha256: config_sha256.to_owned(),
        secure_aggregation: clip_norm.is_some(),
        clip_norm,
        quantization_bits: result.quantization_bits,
        transcript: result.transcript.as_deref().and_then(|t| serde_json::from_str(t).ok()),
        privacy_epsilon: None,
    }))
}

/// The commitments of a summation sorted by site, and their Merkle root.
fn commitment_list(commitments: &BTreeMap<SiteId, [u8; 32]>) -> (Vec<Commitment>, String) {
    let leaves: Vec<Vec<u8>> = commitments.iter().map(|(s, c)| merkle::leaf(s, c)).collect();
    let list = commitments
        .iter()
        .map(|(site, c)| Commitment {
            site: site.to_string(),
            sha256: hex::encode(c),
        })
        .collect();
    (list, hex::encode(merkle::root(&leaves)))
}

/// The ledger's record of a secure summation outside the rounds: who is in
/// `sum`, their commitments, its hash, and for the statistics the
/// normalisation every site re-derives from it.
fn summation_block(purpose: &str, sum: &[u32], t: &Transcript, normalization: Option<&Normalization>) -> Payload {
    let (commitments, commitment_root) = commitment_list(&t.masked.iter().cloned().collect());
    Payload::Summation(Box::new(Summation {
        job_id: t.ctx.job_id,
        purpose: purpose.to_owned(),
        contributors: contributors(t).iter().map(|s| s.to_string()).collect(),
        dropouts: t
            .dropped
            .iter()
            .map(|(site, phase)| Dropout {
                site: site.to_string(),
                phase: phase_name(*phase).to_owned(),
            })
            .collect(),
        commitments,
        commitment_root,
        aggregate_sha256: hex::encode(commitment(sum)),
        normalization_sha256: normalization.map(|n| hex::encode(n.sha256())),
        transcript: serde_json::from_str(&transcript_json(t, 0, 0.0)).ok(),
    }))
}

/// The evaluation of the model that round `round` started from (the final
/// model for the evaluation after the last round), as reported by the sites
/// and pooled by secure sum.
async fn metrics_block(shared: &Arc<Shared>, job_id: JobId, round: u32, model_hash: &str) -> anyhow::Result<Payload> {
    let r = i64::from(round);
    let sites = shared
        .store
        .metrics(job_id)
        .await?
        .into_iter()
        .filter(|m| m.round == r)
        .map(|m| SiteMetrics {
            site: m.site_id,
            n_test: m.n_test as u64,
            loss: m.loss,
            accuracy: m.accuracy,
            auc: m.auc,
            binary: binary_metrics(m.binary.as_deref()),
        })
        .collect();
    let pooled = shared
        .store
        .pooled(job_id)
        .await?
        .into_iter()
        .find(|p| p.round == r)
        .and_then(|p| {
            Some(PooledMetrics {
                n_sites: p.n_sites as u64,
                n_test: p.n_test as u64,
                loss: p.loss?,
                accuracy: p.accuracy,
                binary: binary_metrics(p.binary.as_deref()),
            })
        });
    Ok(Payload::Metrics(Metrics {
        job_id: job_id.0,
        model_of_round: round - 1,
        model_sha256: model_hash.to_owned(),
        sites,
        pooled,
    }))
}

/// Takes a job from its stored progress to its end: from the start for a
/// new job; for a job a previous coordinator process left running, from
/// where its stored progress ends (the preprocessing, the last recorded
/// round and the strategy's state after it, the stored stage of a secure
/// summation in flight).
async fn drive(shared: &Arc<Shared>, job_id: JobId, spec: &JobSpec, row: &JobRow) -> Result<(), Stop> {
    let job_hash = row.job_hash.clone();
    let timing = spec.timing;
    let dropout_ms = timing.dropout_after_s * 1000;
    let secure = match &spec.aggregation {
        Aggregation::Secure(s) => Some(*s),
        Aggregation::InsecurePlaintext => None,
    };
    if secure.is_some() && shared.roster.is_empty() {
        return Err(Stop::Failed(
            "secure aggregation needs the consortium roster (start the coordinator with --roster)".into(),
        ));
    }
    // Done already, all but recording its end (a previous process stopped
    // after the final evaluation's block): nothing to wait for.
    if row.phase == "done" {
        return Ok(());
    }
    let (members, normalization, classes) = match stored_preprocessing(row)? {
        Some((normalization, classes)) => {
            // Resumed past its preprocessing: the job is its sealed cohort's.
            set_phase(shared, job_id, "waiting for sites").await;
            let cohort = shared.ledger.cohort(job_id.0);
            let members = job_members(shared, job_id, &cohort).await?;
            wait_for_sites(shared, spec, Some(&members)).await?;
            (members, normalization, classes)
        }
        None => {
            set_phase(shared, job_id, "waiting for sites").await;
            let gathered = wait_for_sites(shared, spec, None).await?;
            info!(job = %job_id, sites = ?names(&gathered), secure = secure.is_some(), "sites gathered");
            set_phase(shared, job_id, "preprocessing").await;
            let (total, secure_sum) = preprocess(shared, job_id, spec, &gathered).await?;
            // From here on the job is its sealed cohort's: a site that never
            // accepted it on the ledger is in no round, nor is a site left out
            // of it (its encoding differs from the others').
            let members = job_members(shared, job_id, &gathered).await?;
            let normalization =
                Normalization::from_stats(&total).map_err(|e| Stop::Failed(format!("preprocessing: {e}")))?;
            // Stored with the statistics' block (committed before any round:
            // every site derives the normalisation from this sum, aggregate
            // "round 0", instead of taking it on trust): a resumed job skips
            // its preprocessing exactly when both are stored.
            let mut tx = shared.ledger.begin().await?;
            if let Some((sum, transcript)) = secure_sum {
                let block = summation_block(Summation::STATISTICS, &sum, &transcript, Some(&normalization));
                let bytes: Vec<u8> = sum.iter().flat_map(|w| w.to_le_bytes()).collect();
                Store::put_aggregate_in(&mut tx.tx, job_id, 0, &hex::encode(commitment(&sum)), &bytes).await?;
                tx.append(&block, unix_ms() as u64).await?;
            }
            Store::set_preprocessing_in(&mut tx.tx, job_id, total.sum.len(), &normalization, total.classes()).await?;
            Store::forget_sessions_in(&mut tx.tx, job_id, 0).await?;
            tx.commit().await?;
            info!(job = %job_id, n_features = total.sum.len(), rows = total.count, "global feature statistics computed");
            (members, normalization, total.classes())
        }
    };
    // The class weight every site derives from the same statistics sum
    // (and checks against this announced one).
    let mut pos_weight = classes
        .pos_weight(spec.training.pos_weight)
        .map_err(|e| Stop::Failed(format!("preprocessing: {e}")))?;
    if crate::malicious::attack() == Some(crate::malicious::Attack::SkewClassWeight) {
        pos_weight *= 2.0;
    }
    if pos_weight != 1.0 {
        info!(job = %job_id, pos_weight, rows = classes.rows, positives = classes.positives, "class weight");
    }
    let n_features = normalization.mean.len();

    let layout = spec.model.layout(n_features);
    let mut strategy = strategy::from_spec(&spec.strategy);
    let first_round = row.rounds_done as u32 + 1;
    let mut global = match &row.final_model_hash {
        Some(hash) if first_round > 1 => {
            strategy
                .load_state(&shared.store.strategy_state(job_id).await?)
                .map_err(|e| Stop::Failed(format!("cannot resume after round {}: {e}", first_round - 1)))?;
            let bytes = shared
                .store
                .model(hash)
                .await?
                .with_context(|| format!("the model of round {} ({hash}) is not stored", first_round - 1))?;
            decode_params(&bytes).with_context(|| format!("the stored model {hash} does not decode"))?
        }
        _ => initial_params(&layout, spec.seed),
    };
    let mut global_hash = model_hash(&global);
    shared
        .store
        .put_model(&global_hash, global.len(), &encode_params(&global), unix_ms())
        .await?;
    let pb_normalization = pb::Normalization {
        mean: normalization.mean.clone(),
        std: normalization.std.clone(),
    };

    for round in first_round..=spec.rounds {
        set_phase(shared, job_id, &format!("round {round}/{}", spec.rounds)).await;
        let started_at_ms = unix_ms();
        // A secure summation in flight when a previous process stopped goes
        // on from its stored stage, with the members it started with.
        let restored = restored_session(shared, job_id, round, secure.is_some()).await?;
        let round_members = match &restored {
            Some(session) => session.members.iter().cloned().collect(),
            None => taking_part(shared, &members, dropout_ms),
        };
        let announcement = pb::RoundAnnouncement {
            job_id: job_id.0,
            round,
            job_toml: String::new(),
            job_hash: String::new(),
            model_hash: global_hash.clone(),
            n_params: global.len() as u64,
            train: crate::malicious::attack() != Some(crate::malicious::Attack::EvaluateTwice),
            normalization: Some(pb_normalization.clone()),
            proximal_mu: strategy.configure_train(round).proximal_mu,
            members: round_members.iter().map(|s| s.to_string()).collect(),
            secure: secure.is_some(),
            pos_weight,
        };
        let result = match secure {
            None => plaintext_round(shared, spec, announcement, &round_members, global.len()).await?,
            Some(secure) => {
                secure_round(
                    shared,
                    spec,
                    &secure,
                    announcement,
                    &round_members,
                    global.len(),
                    restored,
                )
                .await?
            }
        };
        let next = strategy
            .aggregate_train(&global, &result.sum)
            .ok_or_else(|| Stop::Failed(format!("round {round}: strategy produced no model")))?;
        if let Some(i) = next.iter().position(|v| !v.is_finite()) {
            return Err(Stop::Failed(format!(
                "round {round}: aggregated model has a non-finite parameter at index {i} (learning rate too high?)"
            )));
        }
        let next_hash = model_hash(&next);
        let finished_at_ms = unix_ms();
        let block = round_block(
            RoundContext {
                job_id: job_id.0,
                round,
            },
            spec,
            &result,
            &global_hash,
            &next_hash,
            next.len(),
            &job_hash,
        );
        let metrics = metrics_block(shared, job_id, round, &global_hash).await?;
        // The round, its model and its ledger blocks in one transaction:
        // the new model is served to no one before its block is stored.
        let mut tx = shared.ledger.begin().await?;
        Store::record_round_in(
            &mut tx.tx,
            &RoundRecord {
                job_id,
                round,
                base_model_hash: &global_hash,
                model_hash: &next_hash,
                model_bytes: &encode_params(&next),
                n_params: next.len(),
                total_weight: result.sum.total_weight,
                mean_train_loss: result.mean_train_loss,
                started_at_ms,
                finished_at_ms,
                transcript: result.transcript.clone(),
                members: result.members.clone(),
                aggregate: result
                    .aggregate
                    .as_deref()
                    .map(|a| (result.aggregate_sha256.as_str(), a)),
                strategy_state: &strategy.save_state(),
            },
        )
        .await?;
        tx.append(&block, finished_at_ms as u64).await?;
        tx.append(&metrics, finished_at_ms as u64).await?;
        tx.commit().await?;
        shared
            .telemetry
            .round_recorded(finished_at_ms.saturating_sub(started_at_ms) as u64);
        info!(
            job = %job_id,
            round,
            sites = result.sum.contributors.len(),
            train_loss = ?result.mean_train_loss,
            model = %&next_hash[..12],
            "round complete"
        );
        global = next;
        global_hash = next_hash;
    }

    // Final evaluation of the last model.
    set_phase(shared, job_id, "final evaluation").await;
    let round = spec.rounds + 1;
    let ctx = RoundContext {
        job_id: job_id.0,
        round,
    };
    let session = match (secure, restored_session(shared, job_id, round, secure.is_some()).await?) {
        (_, Some(restored)) => Some(restored),
        (Some(secure), None) => {
            // The final model's evaluation, pooled by secure sum.
            let cohort = shared.ledger.cohort(job_id.0).len();
            let params = secure.params(cohort, spec.min_sites as usize, evaluation::FINAL_WORDS);
            let members = taking_part(shared, &members, dropout_ms);
            Some(durable(shared, SecureSession::new(ctx, params, members, shared.roster.clone())).await?)
        }
        (None, None) => None,
    };
    let members = match &session {
        Some(session) => session.members.iter().cloned().collect(),
        None => taking_part(shared, &members, dropout_ms),
    };
    let announcement = pb::RoundAnnouncement {
        job_id: job_id.0,
        round,
        job_toml: String::new(),
        job_hash: String::new(),
        model_hash: global_hash,
        n_params: global.len() as u64,
        train: false,
        normalization: Some(pb_normalization),
        proximal_mu: 0.0,
        members: members.iter().map(|s| s.to_string()).collect(),
        secure: secure.is_some(),
        pos_weight,
    };
    install_round(shared, announcement, None, session, &members);
    let mut tx = match run_phase(shared).await? {
        (_, Some(Ok((sum, transcript)))) => {
            store_pooled(shared, spec, ctx, &contributors(&transcript), &sum).await?;
            let block = summation_block(Summation::FINAL_EVALUATION, &sum, &transcript, None);
            let mut tx = shared.ledger.begin().await?;
            tx.append(&block, unix_ms() as u64).await?;
            // Kept for the pooled ROC and calibration curves (`job status`):
            // an aggregate over the evaluating sites, as the ledger block's
            // hash commits to.
            let bytes: Vec<u8> = sum.iter().flat_map(|w| w.to_le_bytes()).collect();
            Store::put_aggregate_in(&mut tx.tx, job_id, round, &hex::encode(commitment(&sum)), &bytes).await?;
            tx
        }
        (_, Some(Err(e))) => {
            warn!(job = %job_id, "final evaluation: secure sum aborted: {e}");
            shared.ledger.begin().await?
        }
        (_, None) => shared.ledger.begin().await?,
    };
    // "done" with the evaluation's block: a resumed job runs it once.
    Store::set_phase_in(&mut tx.tx, job_id, "done").await?;
    Store::forget_sessions_in(&mut tx.tx, job_id, u32::MAX).await?;
    tx.commit().await?;
    Ok(())
}

/// The members of a job among `candidates`: in its sealed cohort, and not
/// left out of it (a site whose encoding differs from the others').
async fn job_members(
    shared: &Arc<Shared>,
    job_id: JobId,
    candidates: &BTreeSet<SiteId>,
) -> Result<BTreeSet<SiteId>, Stop> {
    let cohort = shared.ledger.cohort(job_id.0);
    let left_out: BTreeSet<SiteId> = shared
        .store
        .problems(job_id)
        .await?
        .into_iter()
        .filter_map(|(site, _)| SiteId::new(&site).ok())
        .collect();
    Ok(candidates
        .intersection(&cohort)
        .filter(|s| !left_out.contains(*s))
        .cloned()
        .collect())
}

/// The normalisation and class counts a job's preprocessing stored, if it
/// got that far.
fn stored_preprocessing(row: &JobRow) -> Result<Option<(Normalization, ClassCounts)>, Stop> {
    let Some(json) = &row.normalization else {
        return Ok(None);
    };
    #[derive(serde::Deserialize)]
    struct Stored {
        mean: Vec<f64>,
        std: Vec<f64>,
        // Absent from jobs preprocessed before class weights: those jobs
        // can only have a fixed weight, which never reads them.
        #[serde(default)]
        rows: u64,
        #[serde(default)]
        positives: u64,
    }
    let stored: Stored = serde_json::from_str(json)
        .map_err(|e| Stop::Failed(format!("cannot resume: the stored preprocessing does not parse: {e}")))?;
    Ok(Some((
        Normalization {
            mean: stored.mean,
            std: stored.std,
        },
        ClassCounts {
            rows: stored.rows,
            positives: stored.positives,
        },
    )))
}

/// The secure summation of `round` a previous process left in flight, as
/// its open stage began.
async fn restored_session(
    shared: &Arc<Shared>,
    job_id: JobId,
    round: u32,
    secure: bool,
) -> Result<Option<SecureSession>, Stop> {
    if !secure {
        return Ok(None);
    }
    let Some(bytes) = shared.store.session(job_id, round).await? else {
        return Ok(None);
    };
    let session = SecureSession::restore(&bytes)?;
    if session.ctx.job_id != job_id.0 || session.ctx.round != round {
        return Err(Stop::Failed(format!(
            "cannot resume round {round}: its stored summation is of job {} round {}",
            session.ctx.job_id, session.ctx.round
        )));
    }
    info!(job = %job_id, round, stage = session.stage(), "secure summation resumes from its stored stage");
    Ok(Some(session))
}

/// Stores a new summation's first stage, so that no site gets a step of a
/// summation a crash would lose.
async fn durable(shared: &Arc<Shared>, mut session: SecureSession) -> Result<SecureSession, Stop> {
    if let Some(snapshot) = session.snapshot() {
        shared
            .store
            .put_session(JobId(session.ctx.job_id), session.ctx.round, &snapshot)
            .await?;
    }
    session.mark_durable();
    Ok(session)
}

/// What a round hands to the strategy and the store.
struct RoundResult {
    sum: SecureSum,
    mean_train_loss: Option<f64>,
    transcript: Option<String>,
    /// (site, outcome, n_samples)
    members: Vec<(SiteId, String, u64)>,
    /// For the ledger: each contributor's commitment to what it uploaded,
    /// who dropped at which phase, and the hash of the released aggregate.
    commitments: BTreeMap<SiteId, [u8; 32]>,
    dropouts: Vec<(SiteId, String)>,
    aggregate_sha256: String,
    /// A secure round's released sum, served to the sites so they derive
    /// the next model themselves (`tessera_protocol::replay`).
    aggregate: Option<Vec<u8>>,
    quantization_bits: Option<u32>,
}

async fn plaintext_round(
    shared: &Arc<Shared>,
    spec: &JobSpec,
    announcement: pb::RoundAnnouncement,
    members: &BTreeSet<SiteId>,
    n_params: usize,
) -> Result<RoundResult, Stop> {
    let round = announcement.round;
    let params = RoundParams {
        job_id: JobId(announcement.job_id),
        round,
        n_params,
        base_model_hash: announcement.model_hash.clone(),
        min_sites: spec.min_sites as usize,
        round_timeout_ms: spec.timing.round_timeout_s * 1000,
        dropout_after_ms: spec.timing.dropout_after_s * 1000,
    };
    let collector = RoundCollector::new(params, members.iter().cloned(), shared.now_ms());
    install_round(shared, announcement, Some(collector), None, members);
    let (collector, _) = run_phase(shared).await?;
    let collector = collector.expect("training round keeps its collector");
    let outcome = collector
        .finish()
        .map_err(|e| Stop::Failed(format!("round {round}: {e}; no aggregate released")))?;
    let members = outcome
        .members
        .iter()
        .map(|(site, state)| match state {
            MemberState::Submitted { n_samples, .. } => (site.clone(), "submitted".to_owned(), *n_samples),
            MemberState::Dropped { reason } => (
                site.clone(),
                format!("dropped:{}", format!("{reason:?}").to_lowercase()),
                0,
            ),
            MemberState::Expected { .. } => (site.clone(), "expected".to_owned(), 0),
        })
        .collect();
    let commitments = outcome
        .members
        .iter()
        .filter_map(|(site, state)| match state {
            MemberState::Submitted { commitment, .. } => Some((site.clone(), *commitment)),
            _ => None,
        })
        .collect();
    let dropouts = outcome
        .dropped()
        .into_iter()
        .map(|s| (s, "update".to_owned()))
        .collect();
    Ok(RoundResult {
        mean_train_loss: Some(outcome.mean_train_loss()),
        aggregate_sha256: sha256_hex(
            &outcome
                .sum
                .weighted_sum
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<u8>>(),
        ),
        sum: outcome.sum,
        transcript: None,
        members,
        commitments,
        dropouts,
        aggregate: None,
        quantization_bits: None,
    })
}

async fn secure_round(
    shared: &Arc<Shared>,
    spec: &JobSpec,
    secure: &SecureAggSpec,
    announcement: pb::RoundAnnouncement,
    members: &BTreeSet<SiteId>,
    n_params: usize,
    restored: Option<SecureSession>,
) -> Result<RoundResult, Stop> {
    let round = announcement.round;
    let ctx = RoundContext {
        job_id: announcement.job_id,
        round,
    };
    // The quantised update, then the sites' evaluation of the round's
    // starting model: both in one secure sum. Weights and test counts are
    // the ones the sites declared in the ledger, never summed.
    // Sized from the cohort on the ledger, as every site sizes its own.
    let cohort = shared.ledger.cohort(ctx.job_id).len();
    let params = secure.params(cohort, spec.min_sites as usize, n_params + evaluation::ROUND_WORDS);
    let session = match restored {
        Some(session) => session,
        None => {
            durable(
                shared,
                SecureSession::new(ctx, params, members.clone(), shared.roster.clone()),
            )
            .await?
        }
    };
    install_round(shared, announcement, None, Some(session), members);
    let (_, outcome) = run_phase(shared).await?;
    let (sum, transcript) = outcome.expect("secure round yields its outcome").map_err(|e| {
        Stop::Failed(format!(
            "round {round}: secure aggregation aborted: {e}; no aggregate released"
        ))
    })?;
    let quantizer = secure.quantizer(cohort);
    let contributors = contributors(&transcript);
    // The sites replay this with the same function and the same declared
    // weights, so the model below is the one they derive.
    let weights: Vec<(SiteId, f64)> = contributors
        .iter()
        .cloned()
        .zip(declared(shared, ctx.job_id, &contributors)?)
        .map(|(site, counts)| (site, secure.weight(counts.n_train)))
        .collect();
    let sum_of_round = round_sum(&quantizer, &sum, n_params, &weights);
    let pooled = store_pooled(shared, spec, ctx, &contributors, &sum[n_params..]).await?;
    let outcomes = member_outcomes(&transcript);
    let commitments = transcript.masked.iter().cloned().collect();
    let dropouts = transcript
        .dropped
        .iter()
        .map(|(s, phase)| (s.clone(), phase_name(*phase).to_owned()))
        .collect();
    Ok(RoundResult {
        sum: sum_of_round,
        mean_train_loss: pooled.and_then(|p| p.train_loss),
        transcript: Some(transcript_json(&transcript, quantizer.bits, secure.clip_norm)),
        members: outcomes,
        commitments,
        dropouts,
        aggregate_sha256: hex::encode(commitment(&sum)),
        aggregate: Some(tessera_protocol::wire::encode_words(&sum)),
        quantization_bits: Some(quantizer.bits),
    })
}

/// The members' signed category proposals (checked when each arrived with
/// its site's acceptance), for the sites to form the job's categories from.
async fn cohort_proposals(
    shared: &Arc<Shared>,
    job_id: JobId,
    members: &BTreeSet<SiteId>,
) -> Result<Vec<pb::CategoryProposal>, Stop> {
    let stored = shared
        .store
        .proposals(job_id)
        .await
        .map_err(|e| Stop::Failed(format!("{e:#}")))?;
    Ok(stored
        .into_iter()
        .filter(|(site, _)| members.iter().any(|m| m.as_str() == site))
        .filter_map(|(_, bytes)| <pb::CategoryProposal as prost::Message>::decode(bytes.as_slice()).ok())
        .collect())
}

/// Federated preprocessing: the sum of every member's training-split
/// statistics, securely summed unless the job is plaintext.
async fn preprocess(
    shared: &Arc<Shared>,
    job_id: JobId,
    spec: &JobSpec,
    members: &BTreeSet<SiteId>,
) -> Result<(FeatureStats, Option<(Vec<u32>, Transcript)>), Stop> {
    let secure = match &spec.aggregation {
        Aggregation::Secure(s) => Some(*s),
        Aggregation::InsecurePlaintext => None,
    };
    // The secure sum of the statistics, in flight when a previous process
    // stopped: the encodings were agreed and the cohort sealed before it
    // began, so it goes on from its stored stage.
    if let Some(session) = restored_session(shared, job_id, 0, secure.is_some()).await? {
        let n_features = (0..=session.vector_len)
            .find(|&n| FeatureStats::secure_len(n) * exact::LIMBS == session.vector_len)
            .ok_or_else(|| {
                Stop::Failed("cannot resume the statistics' secure sum: its length fits no feature count".into())
            })?;
        // No report is awaited: the encodings were agreed before.
        install(
            shared,
            Phase::Stats(Box::new(StatsPhase {
                pending: BTreeSet::new(),
                reports: BTreeMap::new(),
                encodings: BTreeMap::new(),
                secure: true,
                session: None,
                proposals: Vec::new(),
                proposals_ready: false,
            })),
        );
        return secure_stats(shared, job_id, session, n_features).await;
    }
    install(
        shared,
        Phase::Stats(Box::new(StatsPhase {
            pending: members.clone(),
            reports: BTreeMap::new(),
            encodings: BTreeMap::new(),
            secure: secure.is_some(),
            session: None,
            proposals: Vec::new(),
            proposals_ready: false,
        })),
    );
    let started = shared.now_ms();
    let deadline = started + spec.timing.round_timeout_s * 1000;
    let dropout_ms = spec.timing.dropout_after_s * 1000;
    let mut proposals_ready = false;
    let (mut reports, encodings, held, awaited) = loop {
        let _ = tokio::time::timeout(TICK, shared.progress.notified()).await;
        let now = shared.now_ms();
        // Until they are relayed, the proposals stored with the members'
        // acceptances (read before the state lock is taken).
        let stored = if proposals_ready {
            Vec::new()
        } else {
            cohort_proposals(shared, job_id, members).await?
        };
        // A site that declined the job sends nothing: no wait for it.
        let decisions = shared.ledger.decisions(job_id.0);
        let declined: BTreeSet<SiteId> = decisions
            .iter()
            .filter(|(_, (accepted, _))| !accepted)
            .map(|(site, _)| site.clone())
            .collect();
        let mut inner = shared.lock();
        let last_seen = inner.last_seen.clone();
        let active = inner.active.as_mut().expect("active job installed by run_job");
        if active.cancel_requested {
            return Err(Stop::Cancelled);
        }
        let Phase::Stats(stats) = &mut active.phase else {
            unreachable!("phase set above")
        };
        stats.pending.retain(|s| {
            !declined.contains(s)
                && !active.failed.contains(s)
                && now < deadline
                && now.saturating_sub(last_seen.get(s).copied().unwrap_or(0)) < dropout_ms
        });
        // A site holding the job for its data team may still report if it
        // is approved in time, but is not waited for: an approval can take
        // days.
        let awaited: BTreeSet<SiteId> = stats
            .pending
            .iter()
            .filter(|s| !active.held.contains_key(*s))
            .cloned()
            .collect();
        // The category proposals go out once every member still awaited
        // has decided (each accepting site's came with its acceptance), or,
        // when one keeps the others waiting, once min_sites have and a
        // dropout period has passed. Then they are fixed: every site forms
        // its categories from the same list, of recorded acceptances only.
        let accepted = |s: &SiteId| decisions.get(s).is_some_and(|(accepted, _)| *accepted);
        let deciding = awaited.iter().filter(|s| !decisions.contains_key(*s)).count();
        let decided = awaited.len() - deciding;
        if !proposals_ready && (deciding == 0 || (decided >= spec.min_sites as usize && now - started >= dropout_ms)) {
            stats.proposals = stored
                .into_iter()
                .filter(|p| SiteId::new(&p.site_id).is_ok_and(|s| accepted(&s)))
                .collect();
            stats.proposals_ready = true;
            proposals_ready = true;
        }
        // Done when no one is left to wait for, or when min_sites can no
        // longer be reached whoever still reports.
        if awaited.is_empty() || stats.reports.len() + awaited.len() < spec.min_sites as usize {
            let held: BTreeMap<SiteId, String> = active
                .held
                .iter()
                .filter(|(s, _)| !stats.reports.contains_key(*s))
                .map(|(s, r)| (s.clone(), r.clone()))
                .collect();
            break (stats.reports.clone(), stats.encodings.clone(), held, awaited);
        }
    };
    // A site still holding the job takes no part in it: its cohort is
    // sealed without it.
    for (site, reason) in &held {
        let problem = format!("held for its data team's approval when the statistics were gathered: {reason}");
        info!(job = %job_id, %site, "left out: {problem}");
        shared.store.record_problem(job_id, site, &problem, unix_ms()).await?;
    }
    // One encoding for the job: the most common one; a site with another
    // would train on other features (or another label) than the rest.
    let (encoding, outliers) =
        agree_on_encoding(&encodings).map_err(|e| Stop::Failed(format!("preprocessing: {e}")))?;
    shared.store.set_features_hash(job_id, &encoding).await?;
    for site in &outliers {
        reports.remove(site);
        let problem = format!(
            "its data is encoded differently from the other sites' (features hash {}…, theirs {}…); \
             every site must use the consortium's schema file",
            &encodings[site][..encodings[site].len().min(16)],
            &encoding[..encoding.len().min(16)]
        );
        warn!(job = %job_id, %site, "left out: {problem}");
        shared.store.record_problem(job_id, site, &problem, unix_ms()).await?;
    }
    if reports.len() < spec.min_sites as usize {
        // Ended early (min_sites out of reach): the sites still working are
        // not to blame.
        let (n, verb) = if awaited.is_empty() {
            (reports.len(), "sent")
        } else {
            (reports.len() + awaited.len(), "can send")
        };
        return Err(Stop::Failed(format!(
            "preprocessing: only {n} sites {verb} statistics, min_sites is {}{}",
            spec.min_sites,
            absent_reasons(shared, job_id, members, &encodings, &awaited).await?
        )));
    }
    seal_cohort(shared, job_id, spec).await?;
    let Some(secure) = secure else {
        let reports: Vec<FeatureStats> = reports.into_values().collect();
        let total = sum_plaintext_stats(&reports).map_err(|e| Stop::Failed(format!("preprocessing: {e}")))?;
        return Ok((total, None));
    };
    // Secure: the reports carried only the encoding; now sum the statistics.
    let n_features = reports.values().next().map_or(0, |r| r.sum.len());
    let sites: BTreeSet<SiteId> = reports.keys().cloned().collect();
    let vector_len = FeatureStats::secure_len(n_features) * exact::LIMBS;
    let cohort = shared.ledger.cohort(job_id.0).len();
    let params = secure.params(cohort, spec.min_sites as usize, vector_len);
    // Left-out sites stay in the sealed cohort, which sizes the threshold
    // and the consistency quorum: say so now rather than let the sum abort.
    let needed = params.threshold.max(cohort / 2 + 1);
    if sites.len() < needed {
        return Err(Stop::Failed(format!(
            "preprocessing: {} sites can take part in the secure sum, and it needs {needed} (a majority of the \
             {cohort} sites in the sealed cohort){}",
            sites.len(),
            absent_reasons(shared, job_id, members, &encodings, &BTreeSet::new()).await?
        )));
    }
    let ctx = RoundContext {
        job_id: job_id.0,
        round: 0,
    };
    let session = durable(shared, SecureSession::new(ctx, params, sites, shared.roster.clone())).await?;
    secure_stats(shared, job_id, session, n_features).await
}

/// The secure sum of the statistics, over `n_features` features.
async fn secure_stats(
    shared: &Arc<Shared>,
    job_id: JobId,
    session: SecureSession,
    n_features: usize,
) -> Result<(FeatureStats, Option<(Vec<u32>, Transcript)>), Stop> {
    if let Some(Phase::Stats(stats)) = shared.lock().active.as_mut().map(|a| &mut a.phase) {
        stats.session = Some(session);
    }
    shared.wake.notify_waiters();
    let (_, outcome) = run_phase(shared).await?;
    let (sum, transcript) = outcome
        .expect("secure preprocessing yields its outcome")
        .map_err(|e| Stop::Failed(format!("preprocessing: secure aggregation aborted: {e}")))?;
    info!(job = %job_id, sites = transcript.masked.len(), "feature statistics securely summed");
    let total =
        FeatureStats::from_secure_sum(&sum, n_features).map_err(|e| Stop::Failed(format!("preprocessing: {e}")))?;
    Ok((total, Some((sum, transcript))))
}

/// The encoding (features hash) most sites reported, and the sites that
/// reported another. No encoding is chosen when two are equally common:
/// which sites are "wrong" is then for the consortium to settle.
fn agree_on_encoding(encodings: &BTreeMap<SiteId, String>) -> Result<(String, BTreeSet<SiteId>), String> {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for hash in encodings.values() {
        *counts.entry(hash).or_default() += 1;
    }
    let mut ranked: Vec<(&str, usize)> = counts.into_iter().collect();
    ranked.sort_by_key(|&(_, n)| std::cmp::Reverse(n));
    match ranked.as_slice() {
        [] => Ok((String::new(), BTreeSet::new())),
        [(_, n), (_, m), ..] if n == m => {
            let sites: Vec<String> = encodings
                .iter()
                .map(|(site, hash)| format!("{site} {}…", &hash[..hash.len().min(16)]))
                .collect();
            Err(format!(
                "the sites encode their data in {} different ways and no encoding is shared by more sites \
                 than another ({}); every site must use the consortium's schema file",
                ranked.len(),
                sites.join(", ")
            ))
        }
        [(first, _), ..] => {
            let outliers = encodings
                .iter()
                .filter(|(_, hash)| hash.as_str() != *first)
                .map(|(site, _)| site.clone())
                .collect();
            Ok(((*first).to_owned(), outliers))
        }
    }
}

/// Why the members that are not taking part are absent, as the end of an
/// error message ("" when none is): declined, left out, or silent (except
/// those `still_working` when the phase ended early).
async fn absent_reasons(
    shared: &Arc<Shared>,
    job_id: JobId,
    members: &BTreeSet<SiteId>,
    reported: &BTreeMap<SiteId, String>,
    still_working: &BTreeSet<SiteId>,
) -> anyhow::Result<String> {
    let decisions = shared.ledger.decisions(job_id.0);
    let problems = shared.store.problems(job_id).await?;
    let mut reasons: Vec<String> = decisions
        .iter()
        .filter(|(_, (accepted, _))| !accepted)
        .map(|(site, (_, reason))| format!("{site} declined: {reason}"))
        .collect();
    reasons.extend(
        members
            .iter()
            .filter(|s| {
                !reported.contains_key(*s)
                    && !still_working.contains(*s)
                    && !problems.iter().any(|(p, _)| p == s.as_str())
                    && decisions.get(*s).is_none_or(|(accepted, _)| *accepted)
            })
            .map(|s| format!("{s} sent no statistics in time")),
    );
    reasons.extend(
        problems
            .into_iter()
            .map(|(site, problem)| format!("{site} left out: {problem}")),
    );
    Ok(if reasons.is_empty() {
        String::new()
    } else {
        format!(" ({})", reasons.join("; "))
    })
}

/// Installs a round (or the final evaluation). Its metrics are awaited from
/// every member, in a round resumed after a restart too: a site that
/// reported already sends the same report again (and is acknowledged), so
/// each is sure to get the round's announcement, and a site whose report
/// or training a crash cut short does them then.
fn install_round(
    shared: &Arc<Shared>,
    mut announcement: pb::RoundAnnouncement,
    collector: Option<RoundCollector>,
    session: Option<SecureSession>,
    members: &BTreeSet<SiteId>,
) {
    {
        let inner = shared.lock();
        let active = inner.active.as_ref().expect("active job installed by run_job");
        announcement.job_toml = active.job_toml.clone();
        announcement.job_hash = active.job_hash.clone();
    }
    install(
        shared,
        Phase::Round(Box::new(RoundPhase {
            announcement,
            collector,
            session,
            awaiting_metrics: members.clone(),
        })),
    );
}

/// Ticks the installed phase until every member has done its part or
/// dropped: plaintext updates (collector), each secure stage (closed when
/// no live site is pending or its deadline passed) and metrics. Returns the
/// collector or the secure outcome.
async fn run_phase(shared: &Arc<Shared>) -> Result<(Option<RoundCollector>, Option<SecureOutcome>), Stop> {
    let (timeout_ms, dropout_ms) = {
        let inner = shared.lock();
        let active = inner.active.as_ref().expect("active job installed by run_job");
        (
            active.spec.timing.round_timeout_s * 1000,
            active.spec.timing.dropout_after_s * 1000,
        )
    };
    let opened = shared.now_ms();
    let mut stage_opened = opened;
    let job_id = shared
        .lock()
        .active
        .as_ref()
        .expect("active job installed by run_job")
        .job_id;
    // A summation resumed from a previous process: the members whose daemon
    // restarted meanwhile lost their part of it.
    let restored = shared.lock().session_mut().is_some_and(|s| s.is_restored());
    if restored {
        for site in shared.drop_restarted_while_down() {
            warn!(%site, "site restarted while the coordinator was down: dropped from the resumed summation at once");
        }
    }
    loop {
        let _ = tokio::time::timeout(TICK, shared.progress.notified()).await;
        let now = shared.now_ms();
        // The stage a secure summation just opened, to store before any
        // site is given its step.
        let opened_stage = {
            let mut inner = shared.lock();
            let last_seen = inner.last_seen.clone();
            let active = inner.active.as_mut().expect("active job installed by run_job");
            // A site that said it cannot go on, or that restarted during this
            // phase's summation, counts as gone at once.
            let failed: BTreeSet<SiteId> = active.failed.union(&active.restarted).cloned().collect();
            let silent = |s: &SiteId| {
                failed.contains(s) || now.saturating_sub(last_seen.get(s).copied().unwrap_or(0)) >= dropout_ms
            };
            if active.cancel_requested {
                return Err(Stop::Cancelled);
            }
            let timed_out = now.saturating_sub(opened) >= timeout_ms;
            let (collector, session, awaiting_metrics, round_number) = match &mut active.phase {
                Phase::Round(round) => (
                    round.collector.as_mut(),
                    round.session.as_mut(),
                    Some(&mut round.awaiting_metrics),
                    round.announcement.round,
                ),
                Phase::Stats(stats) => (None, stats.session.as_mut(), None, 0),
                Phase::WaitingForSites => unreachable!("run_phase runs after sites gathered"),
            };
            if let Some(collector) = collector {
                for (site, &seen) in &last_seen {
                    collector.handle_heartbeat(seen, site);
                }
                for site in &failed {
                    if collector.handle_failure(site) {
                        warn!(%site, round = round_number, "site dropped from round: it cannot go on");
                    }
                }
                for site in collector.handle_tick(now) {
                    warn!(%site, round = round_number, "site dropped from round");
                }
            }
            let mut secure_done = true;
            let mut opened_stage = None;
            if let Some(session) = session {
                let stage_timed_out = now.saturating_sub(stage_opened) >= timeout_ms;
                let live_pending = session.pending().into_iter().filter(|s| !silent(s)).count();
                if !session.is_done() && (live_pending == 0 || stage_timed_out) {
                    for site in session.pending() {
                        warn!(%site, round = round_number, "site dropped from secure aggregation");
                    }
                    let closed = session.advance();
                    // `stage_ms` is what scripts/bench_rounds.sh reads per phase.
                    let stage_ms = now.saturating_sub(stage_opened);
                    shared.telemetry.stage_closed(closed, stage_ms);
                    info!(
                        round = round_number,
                        stage = closed,
                        stage_ms,
                        "secure aggregation stage closed"
                    );
                    stage_opened = now;
                    opened_stage = session.snapshot().map(|snapshot| (session.ctx.round, snapshot));
                    if opened_stage.is_none() {
                        shared.wake.notify_waiters();
                    }
                }
                secure_done = session.is_done();
            }
            let metrics_done = match awaiting_metrics {
                Some(awaiting) => {
                    awaiting.retain(|s| !timed_out && !silent(s));
                    awaiting.is_empty()
                }
                None => true,
            };
            let settled = match &active.phase {
                Phase::Round(round) => round.collector.as_ref().is_none_or(|c| c.is_settled()),
                _ => true,
            };
            if settled && secure_done && metrics_done {
                return Ok(match &mut active.phase {
                    Phase::Round(round) => (
                        round.collector.take(),
                        round.session.as_mut().and_then(|s| s.take_result()),
                    ),
                    Phase::Stats(stats) => (None, stats.session.as_mut().and_then(|s| s.take_result())),
                    Phase::WaitingForSites => (None, None),
                });
            }
            opened_stage
        };
        if let Some((round, snapshot)) = opened_stage {
            shared.store.put_session(job_id, round, &snapshot).await?;
            if let Some(session) = shared.lock().session_mut() {
                session.mark_durable();
            }
            shared.wake.notify_waiters();
        }
    }
}

type SecureOutcome = Result<(Vec<u32>, Transcript), Abort>;

/// The members online for the next step: heard from within the dropout
/// window, and not among the sites that said they cannot go on.
fn taking_part(shared: &Shared, members: &BTreeSet<SiteId>, dropout_ms: u64) -> BTreeSet<SiteId> {
    let failed = shared
        .lock()
        .active
        .as_ref()
        .map(|a| a.failed.clone())
        .unwrap_or_default();
    shared
        .online(dropout_ms)
        .intersection(members)
        .filter(|s| !failed.contains(*s))
        .cloned()
        .collect()
}

/// The sites whose masked input is in a secure sum.
fn contributors(t: &Transcript) -> Vec<SiteId> {
    t.masked.iter().map(|(s, _)| s.clone()).collect()
}

/// The row counts `sites` declared in their signed acceptance of the job.
fn declared(shared: &Arc<Shared>, job_id: u64, sites: &[SiteId]) -> Result<Vec<DeclaredCounts>, Stop> {
    let declared = shared.ledger.declared(job_id);
    sites
        .iter()
        .map(|s| {
            declared.get(s).copied().ok_or_else(|| {
                Stop::Failed(format!(
                    "{s} is in a secure sum but declared no row counts in the ledger; no aggregate released"
                ))
            })
        })
        .collect()
}

/// Stores the evaluation pooled over `sites` by secure sum: a training
/// round's tail, or the final evaluation's whole sum (`evaluation`). A sum
/// that does not decode is logged and stored as nothing: the round's model
/// does not depend on it.
async fn store_pooled(
    shared: &Arc<Shared>,
    spec: &JobSpec,
    ctx: RoundContext,
    sites: &[SiteId],
    words: &[u32],
) -> Result<Option<evaluation::Pooled>, Stop> {
    let n_sites = sites.len();
    let counts = declared(shared, ctx.job_id, sites)?;
    let n_test = counts.iter().map(|c| c.n_test).sum();
    let n_train = counts.iter().map(|c| c.n_train).sum();
    let threshold = spec.evaluation.threshold;
    let decoded = if ctx.round > spec.rounds {
        evaluation::decode_final(words, n_test, threshold)
    } else {
        evaluation::decode_round(words, n_test, n_train, threshold)
    };
    let pooled = match decoded {
        Ok(p) => p,
        Err(e) => {
            warn!(round = ctx.round, "pooled evaluation not stored: {e}");
            return Ok(None);
        }
    };
    info!(
        round = ctx.round,
        n_sites,
        accuracy = ?pooled.accuracy,
        auc = ?pooled.binary.roc_auc,
        train_loss = ?pooled.train_loss,
        "pooled evaluation (secure sum)"
    );
    shared
        .store
        .insert_pooled(
            JobId(ctx.job_id),
            &PooledRow {
                round: i64::from(ctx.round),
                n_sites: n_sites as i64,
                n_test: pooled.n_test as i64,
                accuracy: pooled.accuracy,
                loss: pooled.loss,
                binary: Some(binary_json(&pooled.binary)),
            },
        )
        .await?;
    Ok(Some(pooled))
}

/// One outcome per site of a secure round. A site can be both a contributor
/// and a dropout: one whose masked input is in the sum but that went silent
/// at unmasking (its self mask was rebuilt from the others' shares).
fn member_outcomes(t: &Transcript) -> Vec<(SiteId, String, u64)> {
    let mut outcomes: BTreeMap<SiteId, String> = t
        .masked
        .iter()
        .map(|(s, _)| (s.clone(), "submitted".to_owned()))
        .collect();
    for (site, phase) in &t.dropped {
        let dropped = format!("dropped:{}", phase_name(*phase));
        outcomes
            .entry(site.clone())
            .and_modify(|o| *o = format!("{o}; {dropped}"))
            .or_insert(dropped);
    }
    outcomes.into_iter().map(|(s, o)| (s, o, 0)).collect()
}

fn phase_name(phase: SecPhase) -> &'static str {
    match phase {
        SecPhase::AdvertiseKeys => "advertise_keys",
        SecPhase::ShareKeys => "share_keys",
        SecPhase::MaskedInput => "masked_input",
        SecPhase::Consistency => "consistency",
        SecPhase::Unmask => "unmask",
    }
}

/// The transcript as stored with the round (and, later, in the ledger).
fn transcript_json(t: &Transcript, bits: u32, clip_norm: f64) -> String {
    let ids = |v: &[SiteId]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    serde_json::json!({
        "job_id": t.ctx.job_id,
        "round": t.ctx.round,
        "threshold": t.threshold,
        "bits": bits,
        "clip_norm": clip_norm,
        "advertised": ids(&t.advertised),
        "shared": ids(&t.shared),
        "masked": t.masked.iter().map(|(s, c)| serde_json::json!({ "site": s.as_str(), "commitment": hex::encode(c) })).collect::<Vec<_>>(),
        "consistency_signers": ids(&t.consistency_signers),
        "unmask_responders": ids(&t.unmask_responders),
        "bad_shares": ids(&t.bad_shares),
        "dropped": t.dropped.iter().map(|(s, p)| serde_json::json!({ "site": s.as_str(), "phase": phase_name(*p) })).collect::<Vec<_>>(),
        "mask_keys_recovered": ids(&t.mask_keys_recovered),
    })
    .to_string()
}

/// Seals the job's cohort (the sites whose acceptance is on the chain) and
/// waits until a majority of members has endorsed the seal: sites size and
/// join every summation from the final seal only, so none starts earlier.
async fn seal_cohort(shared: &Arc<Shared>, job_id: JobId, spec: &JobSpec) -> Result<(), Stop> {
    let (height, cohort) = shared.ledger.seal_cohort(job_id.0, unix_ms() as u64).await?;
    info!(job = %job_id, height, cohort = ?names(&cohort), "cohort sealed");
    // Idle sites sync (and endorse the seal) when their long poll ends.
    shared.wake.notify_waiters();
    let deadline = shared.now_ms() + spec.timing.round_timeout_s * 1000;
    while !shared.ledger.is_final(height).await? {
        if cancel_requested(shared) {
            return Err(Stop::Cancelled);
        }
        if shared.now_ms() >= deadline {
            return Err(Stop::Failed(format!(
                "the cohort seal (ledger block {height}) was not endorsed by a majority of members within {} s",
                spec.timing.round_timeout_s
            )));
        }
        tokio::time::sleep(SEAL_POLL).await;
    }
    Ok(())
}

/// Waits until at least `min_sites` sites are online, then a short grace for
/// the rest (none if every allowed site is already there). `among`: only
/// those sites count (a resumed job's members, back after a restart).
async fn wait_for_sites(
    shared: &Arc<Shared>,
    spec: &JobSpec,
    among: Option<&BTreeSet<SiteId>>,
) -> Result<BTreeSet<SiteId>, Stop> {
    let window = spec.timing.dropout_after_s * 1000;
    let start = shared.now_ms();
    let mut ready_since: Option<u64> = None;
    loop {
        if cancel_requested(shared) {
            return Err(Stop::Cancelled);
        }
        let now = shared.now_ms();
        let mut online = shared.online(window);
        if let Some(among) = among {
            online.retain(|s| among.contains(s));
        }
        let all_online = match among {
            Some(among) => among.len() == online.len(),
            None => shared
                .allowed_sites
                .as_ref()
                .is_some_and(|allowed| allowed.is_subset(&online)),
        };
        if online.len() >= spec.min_sites as usize {
            let since = *ready_since.get_or_insert(now);
            if all_online || now - since >= GATHER_GRACE_MS {
                return Ok(online);
            }
        } else {
            ready_since = None;
        }
        if now - start >= spec.timing.wait_for_sites_s * 1000 {
            return Err(Stop::Failed(format!(
                "only {} sites online after {} s, min_sites is {}",
                online.len(),
                spec.timing.wait_for_sites_s,
                spec.min_sites
            )));
        }
        tokio::time::sleep(TICK).await;
    }
}

fn cancel_requested(shared: &Shared) -> bool {
    shared.lock().active.as_ref().is_some_and(|a| a.cancel_requested)
}

fn install(shared: &Shared, phase: Phase) {
    if let Some(active) = shared.lock().active.as_mut() {
        active.phase = phase;
        active.restarted.clear();
    }
    shared.wake.notify_waiters();
}

async fn set_phase(shared: &Shared, job_id: JobId, phase: &str) {
    if let Err(e) = shared.store.set_phase(job_id, phase).await {
        error!("job {job_id}: {e:#}");
    }
}

fn names(sites: &BTreeSet<SiteId>) -> Vec<&str> {
    sites.iter().map(SiteId::as_str).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(s: &str) -> SiteId {
        SiteId::new(s).unwrap()
    }

    /// The most common encoding wins whichever site reported first; a tie
    /// names every site's hash and picks none.
    #[test]
    fn the_most_common_encoding_is_kept_and_a_tie_is_an_error() {
        let encodings = |pairs: &[(&str, &str)]| -> BTreeMap<SiteId, String> {
            pairs.iter().map(|(s, h)| (site(s), h.repeat(20))).collect()
        };
        // `a` sorts first and is the odd one: it must not set the rule.
        let (kept, left_out) = agree_on_encoding(&encodings(&[("a", "x"), ("b", "y"), ("c", "y")])).unwrap();
        assert_eq!(kept, "y".repeat(20));
        assert_eq!(left_out, BTreeSet::from([site("a")]));
        let (_, left_out) = agree_on_encoding(&encodings(&[("a", "y"), ("b", "y")])).unwrap();
        assert!(left_out.is_empty());
        let err = agree_on_encoding(&encodings(&[
            ("a", "x"),
            ("b", "y"),
            ("c", "z"),
            ("d", "z"),
            ("e", "x"),
        ]))
        .unwrap_err();
        assert!(err.contains("3 different ways"), "{err}");
        assert!(
            err.contains("a xxxxxxxxxxxxxxxx…") && err.contains("d zzzzzzzzzzzzzzzz…"),
            "{err}"
        );
        assert_eq!(agree_on_encoding(&BTreeMap::new()).unwrap().1, BTreeSet::new());
    }

    #[test]
    fn a_site_silent_at_unmask_is_one_member_that_both_contributed_and_dropped() {
        let transcript = Transcript {
            ctx: RoundContext { job_id: 1, round: 7 },
            threshold: 2,
            advertised: vec![site("a"), site("b"), site("c"), site("d")],
            shared: vec![site("a"), site("b"), site("c")],
            masked: vec![(site("a"), [1; 32]), (site("b"), [2; 32]), (site("c"), [3; 32])],
            consistency_signers: vec![site("a"), site("b"), site("c")],
            unmask_responders: vec![site("a"), site("b")],
            bad_shares: vec![],
            dropped: vec![(site("d"), SecPhase::ShareKeys), (site("c"), SecPhase::Unmask)],
            mask_keys_recovered: vec![site("d")],
        };
        let outcomes = member_outcomes(&transcript);
        let names: Vec<(&str, &str)> = outcomes.iter().map(|(s, o, _)| (s.as_str(), o.as_str())).collect();
        assert_eq!(
            names,
            [
                ("a", "submitted"),
                ("b", "submitted"),
                ("c", "submitted; dropped:unmask"),
                ("d", "dropped:share_keys"),
            ]
        );
    }
}
