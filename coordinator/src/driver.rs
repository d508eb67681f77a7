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

use tessera_protocol::ids::{JobId, SiteId};
use tessera_protocol::job::JobSpec;
use tessera_protocol::model::{encode_params, initial_params, model_hash};
use tessera_protocol::pb;
use tessera_protocol::round::{MemberState, RoundCollector, RoundParams};
use tessera_protocol::stats::{FeatureStats, Normalization, secure_sum_stats};
use tessera_protocol::strategy;
use tracing::{error, info, warn};

use crate::state::{ActiveJob, Phase, RoundPhase, Shared, StatsPhase};
use crate::store::{JobRow, RoundRecord};
use crate::unix_ms;

/// Longest wait between two looks at a phase (dropouts are noticed this late
/// at most); deliveries wake the driver at once through `Shared::progress`.
const TICK: Duration = Duration::from_millis(100);
/// Once `min_sites` are online, how long to wait for more before starting.
const GATHER_GRACE_MS: u64 = 3_000;

/// Why a job stopped before finishing.
enum Stop {
    Cancelled,
    Failed(String),
}

impl From<anyhow::Error> for Stop {
    fn from(e: anyhow::Error) -> Self {
        Stop::Failed(format!("internal error: {e:#}"))
    }
}

/// Runs queued jobs forever.
pub async fn run(shared: Arc<Shared>) {
    loop {
        match shared.store.next_queued().await {
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
            if let Err(e) = shared.store.set_status(job_id, "running", "", unix_ms()).await {
                error!("job {job_id}: {e:#}");
            }
            shared.lock().active = Some(ActiveJob {
                job_id,
                spec: spec.clone(),
                job_toml: row.job_toml.clone(),
                job_hash: row.job_hash.clone(),
                cancel_requested: false,
                phase: Phase::WaitingForSites,
            });
            info!(job = %job_id, name = %spec.name, "job started");
            let result = drive(shared, job_id, &spec).await;
            shared.lock().active = None;
            shared.wake.notify_waiters();
            match result {
                Ok(()) => ("finished", String::new()),
                Err(Stop::Cancelled) => ("cancelled", "cancelled by operator".to_owned()),
                Err(Stop::Failed(reason)) => ("failed", reason),
            }
        }
    };
    match status {
        "finished" => info!(job = %job_id, "job finished"),
        _ => warn!(job = %job_id, status, reason = %reason, "job stopped"),
    }
    if let Err(e) = shared.store.set_status(job_id, status, &reason, unix_ms()).await {
        error!("job {job_id}: {e:#}");
    }
}

async fn drive(shared: &Arc<Shared>, job_id: JobId, spec: &JobSpec) -> Result<(), Stop> {
    let timing = spec.timing;
    let dropout_ms = timing.dropout_after_s * 1000;
    set_phase(shared, job_id, "waiting for sites").await;
    let members = wait_for_sites(shared, spec).await?;
    info!(job = %job_id, sites = ?names(&members), "sites gathered");

    // Federated preprocessing.
    set_phase(shared, job_id, "preprocessing").await;
    install(
        shared,
        Phase::Stats(StatsPhase {
            pending: members.clone(),
            reports: BTreeMap::new(),
            features_hash: None,
        }),
    );
    let deadline = shared.now_ms() + timing.round_timeout_s * 1000;
    let reports: Vec<FeatureStats> = loop {
        let _ = tokio::time::timeout(TICK, shared.progress.notified()).await;
        let now = shared.now_ms();
        let mut inner = shared.lock();
        let last_seen = inner.last_seen.clone();
        let active = inner.active.as_mut().expect("active job installed by run_job");
        if active.cancel_requested {
            return Err(Stop::Cancelled);
        }
        let Phase::Stats(stats) = &mut active.phase else {
            unreachable!("phase set above")
        };
        stats
            .pending
            .retain(|s| now < deadline && now.saturating_sub(last_seen.get(s).copied().unwrap_or(0)) < dropout_ms);
        if stats.pending.is_empty() {
            break stats.reports.values().cloned().collect();
        }
    };
    if reports.len() < spec.min_sites as usize {
        return Err(Stop::Failed(format!(
            "preprocessing: only {} sites sent statistics, min_sites is {}",
            reports.len(),
            spec.min_sites
        )));
    }
    let total = secure_sum_stats(&reports).map_err(|e| Stop::Failed(format!("preprocessing: {e}")))?;
    let normalization = Normalization::from_stats(&total).map_err(|e| Stop::Failed(format!("preprocessing: {e}")))?;
    let n_features = total.sum.len();
    shared
        .store
        .set_preprocessing(job_id, n_features, &normalization)
        .await?;
    info!(job = %job_id, n_features, rows = total.count, "global feature statistics computed");

    let layout = spec.model.layout(n_features);
    let mut global = initial_params(&layout, spec.seed);
    let mut global_hash = model_hash(&global);
    shared
        .store
        .put_model(&global_hash, global.len(), &encode_params(&global), unix_ms())
        .await?;
    let mut strategy = strategy::from_spec(&spec.strategy);
    let pb_normalization = pb::Normalization {
        mean: normalization.mean.clone(),
        std: normalization.std.clone(),
    };

    for round in 1..=spec.rounds {
        set_phase(shared, job_id, &format!("round {round}/{}", spec.rounds)).await;
        let started_at_ms = unix_ms();
        let members: BTreeSet<SiteId> = shared.online(dropout_ms).intersection(&members).cloned().collect();
        let instructions = strategy.configure_train(round);
        let announcement = pb::RoundAnnouncement {
            job_id: job_id.0,
            round,
            job_toml: String::new(),
            job_hash: String::new(),
            model_hash: global_hash.clone(),
            n_params: global.len() as u64,
            train: true,
            normalization: Some(pb_normalization.clone()),
            proximal_mu: instructions.proximal_mu,
        };
        let params = RoundParams {
            job_id,
            round,
            n_params: global.len(),
            base_model_hash: global_hash.clone(),
            min_sites: spec.min_sites as usize,
            round_timeout_ms: timing.round_timeout_s * 1000,
            dropout_after_ms: dropout_ms,
        };
        let collector = RoundCollector::new(params, members.iter().cloned(), shared.now_ms());
        let collector = run_round_phase(shared, announcement, Some(collector), &members).await?;
        let collector = collector.expect("training round keeps its collector");
        let outcome = collector
            .finish()
            .map_err(|e| Stop::Failed(format!("round {round}: {e}; no aggregate released")))?;
        let next = strategy
            .aggregate_train(&global, &outcome.sum)
            .ok_or_else(|| Stop::Failed(format!("round {round}: strategy produced no model")))?;
        if let Some(i) = next.iter().position(|v| !v.is_finite()) {
            return Err(Stop::Failed(format!(
                "round {round}: aggregated model has a non-finite parameter at index {i} (learning rate too high?)"
            )));
        }
        let next_hash = model_hash(&next);
        let members_out: Vec<(SiteId, String, u64)> = outcome
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
        shared
            .store
            .record_round(&RoundRecord {
                job_id,
                round,
                base_model_hash: &global_hash,
                model_hash: &next_hash,
                model_bytes: &encode_params(&next),
                n_params: next.len(),
                total_weight: outcome.sum.total_weight,
                mean_train_loss: outcome.mean_train_loss(),
                started_at_ms,
                finished_at_ms: unix_ms(),
                members: members_out,
            })
            .await?;
        info!(
            job = %job_id,
            round,
            sites = outcome.sum.contributors.len(),
            dropped = ?names(&outcome.dropped().into_iter().collect()),
            train_loss = outcome.mean_train_loss(),
            model = %&next_hash[..12],
            "round complete"
        );
        global = next;
        global_hash = next_hash;
    }

    // Final evaluation of the last model.
    set_phase(shared, job_id, "final evaluation").await;
    let members: BTreeSet<SiteId> = shared.online(dropout_ms).intersection(&members).cloned().collect();
    let announcement = pb::RoundAnnouncement {
        job_id: job_id.0,
        round: spec.rounds + 1,
        job_toml: String::new(),
        job_hash: String::new(),
        model_hash: global_hash,
        n_params: global.len() as u64,
        train: false,
        normalization: Some(pb_normalization),
        proximal_mu: 0.0,
    };
    run_round_phase(shared, announcement, None, &members).await?;
    set_phase(shared, job_id, "done").await;
    Ok(())
}

/// Installs a round phase and ticks until every member has submitted (or
/// dropped) and reported metrics (or gone silent). Returns the collector.
async fn run_round_phase(
    shared: &Arc<Shared>,
    mut announcement: pb::RoundAnnouncement,
    collector: Option<RoundCollector>,
    members: &BTreeSet<SiteId>,
) -> Result<Option<RoundCollector>, Stop> {
    let (timeout_ms, dropout_ms) = {
        let inner = shared.lock();
        let active = inner.active.as_ref().expect("active job installed by run_job");
        announcement.job_toml = active.job_toml.clone();
        announcement.job_hash = active.job_hash.clone();
        (
            active.spec.timing.round_timeout_s * 1000,
            active.spec.timing.dropout_after_s * 1000,
        )
    };
    let opened = shared.now_ms();
    install(
        shared,
        Phase::Round(Box::new(RoundPhase {
            announcement,
            collector,
            awaiting_metrics: members.clone(),
        })),
    );
    loop {
        let _ = tokio::time::timeout(TICK, shared.progress.notified()).await;
        let now = shared.now_ms();
        let mut inner = shared.lock();
        let last_seen = inner.last_seen.clone();
        let active = inner.active.as_mut().expect("active job installed by run_job");
        if active.cancel_requested {
            return Err(Stop::Cancelled);
        }
        let Phase::Round(round) = &mut active.phase else {
            unreachable!("phase set above")
        };
        let timed_out = now.saturating_sub(opened) >= timeout_ms;
        if let Some(collector) = round.collector.as_mut() {
            for (site, &seen) in &last_seen {
                collector.handle_heartbeat(seen, site);
            }
            for site in collector.handle_tick(now) {
                warn!(%site, round = round.announcement.round, "site dropped from round");
                round.awaiting_metrics.remove(&site);
            }
        }
        round
            .awaiting_metrics
            .retain(|s| !timed_out && now.saturating_sub(last_seen.get(s).copied().unwrap_or(0)) < dropout_ms);
        let settled = round.collector.as_ref().is_none_or(|c| c.is_settled());
        if settled && round.awaiting_metrics.is_empty() {
            return Ok(round.collector.take());
        }
    }
}

/// Waits until at least `min_sites` sites are online, then a short grace for
/// the rest (none if every allowed site is already there).
async fn wait_for_sites(shared: &Arc<Shared>, spec: &JobSpec) -> Result<BTreeSet<SiteId>, Stop> {
    let window = spec.timing.dropout_after_s * 1000;
    let start = shared.now_ms();
    let mut ready_since: Option<u64> = None;
    loop {
        if cancel_requested(shared) {
            return Err(Stop::Cancelled);
        }
        let now = shared.now_ms();
        let online = shared.online(window);
        let all_allowed_online = shared
            .allowed_sites
            .as_ref()
            .is_some_and(|allowed| allowed.is_subset(&online));
        if online.len() >= spec.min_sites as usize {
            let since = *ready_since.get_or_insert(now);
            if all_allowed_online || now - since >= GATHER_GRACE_MS {
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
