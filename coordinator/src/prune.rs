//! `tessera job prune`: which stored model weights ended jobs no longer
//! need. Every round stores a model (a few MB for an MLP), so a coordinator
//! that ran a few dozen jobs holds hundreds of MB of weights nobody will
//! export. Each job keeps its final model (what `tessera model export`
//! gives); the models its rounds started from or produced go. The ledger
//! keeps every hash, and a `models_pruned` block per job records the
//! deletion, so a verifier knows those weights are gone on purpose.
//!
//! Nothing is pruned while a job runs: jobs with the same seed and model
//! start from the same model (the same hash), so a running job may be using
//! a model an ended job's round also names.

use std::collections::{BTreeMap, BTreeSet};

use tessera_protocol::ledger::Kind;
use tessera_protocol::ledger::payload::{ModelsPruned, Payload};
use tessera_protocol::pb;
use tracing::info;

use crate::rpc::RpcError;
use crate::state::Shared;
use crate::store::Store;
use crate::unix_ms;

/// Which ended jobs the coordinator prunes by itself, as each ends
/// (`--auto-prune`): their round models go as `tessera job prune` would
/// prune them, each job's final model stays.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum AutoPrune {
    /// None: models are pruned only on request.
    #[default]
    None,
    /// Failed and cancelled jobs: nobody trains further from their rounds.
    Unfinished,
    /// Every job, finished too.
    Ended,
}

impl AutoPrune {
    /// Whether a job that ended with `status` is pruned.
    pub fn applies_to(self, status: &str) -> bool {
        match self {
            AutoPrune::None => false,
            AutoPrune::Unfinished => status == "failed" || status == "cancelled",
            AutoPrune::Ended => true,
        }
    }

    /// The flag's value, as the ledger names who pruned.
    pub fn name(self) -> &'static str {
        match self {
            AutoPrune::None => "none",
            AutoPrune::Unfinished => "unfinished",
            AutoPrune::Ended => "ended",
        }
    }
}

/// One job as the plan sees it.
#[derive(Clone, Debug, Default)]
pub struct JobModels {
    pub job_id: u64,
    pub status: String,
    /// The model `tessera model export` gives: always kept.
    pub final_model: Option<String>,
    /// Models its ledger round blocks started from or produced.
    pub rounds: BTreeSet<String>,
    /// Those an earlier `models_pruned` block of the job named.
    pub pruned: BTreeSet<String>,
}

/// What goes for one job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pruning {
    pub job_id: u64,
    pub status: String,
    /// Strictly ascending, as the ledger block lists them.
    pub models: Vec<String>,
    /// What deleting them frees: a model two pruned jobs name is counted
    /// in the first one's only.
    pub bytes: u64,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error(
        "job {0} is running: prune once no job runs (a running job may start from a model an ended job's \
         rounds also name)"
    )]
    Running(u64),
    #[error("no job {0}")]
    NoSuchJob(u64),
    #[error("job {0} is {1}: only an ended job's models are pruned")]
    NotEnded(u64, String),
}

fn ended(status: &str) -> bool {
    matches!(status, "finished" | "failed" | "cancelled")
}

/// The models to delete: for each selected ended job (every ended job when
/// `selected` is empty), its round models that are stored, not pruned
/// yet, not any job's final model, and not a model of a job left alone.
/// `stored` maps each stored model to its size in bytes.
pub fn plan(jobs: &[JobModels], selected: &[u64], stored: &BTreeMap<String, u64>) -> Result<Vec<Pruning>, PlanError> {
    if let Some(job) = jobs.iter().find(|j| j.status == "running") {
        return Err(PlanError::Running(job.job_id));
    }
    let by_id: BTreeMap<u64, &JobModels> = jobs.iter().map(|j| (j.job_id, j)).collect();
    let chosen: BTreeSet<u64> = if selected.is_empty() {
        jobs.iter().filter(|j| ended(&j.status)).map(|j| j.job_id).collect()
    } else {
        for id in selected {
            match by_id.get(id) {
                None => return Err(PlanError::NoSuchJob(*id)),
                Some(job) if !ended(&job.status) => return Err(PlanError::NotEnded(*id, job.status.clone())),
                Some(_) => {}
            }
        }
        selected.iter().copied().collect()
    };
    let mut keep: BTreeSet<&String> = jobs.iter().filter_map(|j| j.final_model.as_ref()).collect();
    for job in jobs.iter().filter(|j| !chosen.contains(&j.job_id)) {
        keep.extend(job.rounds.difference(&job.pruned));
    }
    let mut counted: BTreeSet<String> = BTreeSet::new();
    Ok(chosen
        .iter()
        .filter_map(|id| {
            let job = by_id[id];
            let models: Vec<String> = job
                .rounds
                .iter()
                .filter(|m| !job.pruned.contains(*m) && !keep.contains(m) && stored.contains_key(*m))
                .cloned()
                .collect();
            let bytes = models
                .iter()
                .filter(|m| counted.insert((*m).clone()))
                .map(|m| stored[m])
                .sum();
            (!models.is_empty()).then(|| Pruning {
                job_id: job.job_id,
                status: job.status.clone(),
                bytes,
                models,
            })
        })
        .collect())
}

/// Prunes the models of `job_ids` (every ended job when empty) as `by`
/// asked, for `reason`, in one transaction with their `models_pruned`
/// ledger blocks. The transaction holds the database's write lock from
/// its start, so a job cannot start between the plan and the deletion: it
/// is seen running (and nothing is pruned), or it starts after the commit.
pub async fn apply(
    shared: &Shared,
    by: &str,
    reason: &str,
    job_ids: &[u64],
    dry_run: bool,
) -> Result<Vec<pb::PrunedJob>, RpcError> {
    if let Some(active) = shared.lock().active.as_ref() {
        return Err(RpcError::FailedPrecondition(
            PlanError::Running(active.job_id.0).to_string(),
        ));
    }
    if !dry_run {
        let kinds = Kind::ALL.len() as u32;
        let behind = shared.behind_on_ledger_kinds(&shared.ledger.members(), kinds);
        if !behind.is_empty() {
            let names: Vec<String> = behind.iter().map(ToString::to_string).collect();
            return Err(RpcError::FailedPrecondition(format!(
                "{} not reported (since the coordinator started) running software that verifies \
                 `models_pruned` ledger blocks; such a block would stop them: upgrade them, or try again \
                 once they are connected",
                match names.as_slice() {
                    [one] => format!("site {one} has"),
                    many => format!("sites {} have", many.join(", ")),
                }
            )));
        }
    }
    let now_ms = unix_ms();
    // Read before the transaction takes the write lock (through another
    // connection: holding the lock while it waits for one could stall
    // every writer). No round block is appended meanwhile: a job that
    // starts is seen running below, and nothing is pruned.
    let mut on_chain = shared.ledger.job_models().await?;
    let mut tx = shared.ledger.begin().await?;
    let rows = Store::jobs_in(&mut tx.tx).await?;
    let stored = Store::model_sizes_in(&mut tx.tx).await?;
    let jobs: Vec<JobModels> = rows
        .iter()
        .map(|row| {
            let (rounds, pruned) = on_chain.remove(&(row.id as u64)).unwrap_or_default();
            JobModels {
                job_id: row.id as u64,
                status: row.status.clone(),
                final_model: row.final_model_hash.clone(),
                rounds,
                pruned,
            }
        })
        .collect();
    let plan = plan(&jobs, job_ids, &stored).map_err(|e| match e {
        PlanError::NoSuchJob(_) => RpcError::NotFound(e.to_string()),
        _ => RpcError::FailedPrecondition(e.to_string()),
    })?;
    let mut out = Vec::with_capacity(plan.len());
    for job in plan {
        let ledger_height = if dry_run {
            0
        } else {
            Store::delete_models_in(&mut tx.tx, &job.models).await?;
            let block = Payload::ModelsPruned(ModelsPruned {
                job_id: job.job_id,
                models: job.models.clone(),
                by: by.to_owned(),
                reason: reason.to_owned(),
            });
            tx.append(&block, now_ms as u64).await?
        };
        out.push(pb::PrunedJob {
            job_id: job.job_id,
            status: job.status,
            models: job.models.len() as u32,
            bytes: job.bytes,
            ledger_height,
        });
    }
    if !dry_run && !out.is_empty() {
        tx.commit().await?;
        for job in &out {
            info!(job = job.job_id, models = job.models, bytes = job.bytes, %by, "models pruned");
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(id: u64, status: &str, rounds: &[&str], final_model: Option<&str>) -> JobModels {
        JobModels {
            job_id: id,
            status: status.into(),
            final_model: final_model.map(str::to_owned),
            rounds: rounds.iter().map(|m| (*m).to_owned()).collect(),
            pruned: BTreeSet::new(),
        }
    }

    fn stored(models: &[&str]) -> BTreeMap<String, u64> {
        models.iter().map(|m| ((*m).to_owned(), 100)).collect()
    }

    fn models(p: &Pruning) -> Vec<&str> {
        p.models.iter().map(String::as_str).collect()
    }

    /// A finished job keeps its final model; a failed one keeps its last.
    #[test]
    fn every_ended_job_keeps_its_final_model_only() {
        let jobs = [
            job(1, "finished", &["a0", "a1", "a2"], Some("a2")),
            job(2, "failed", &["b0", "b1"], Some("b1")),
        ];
        let plan = plan(&jobs, &[], &stored(&["a0", "a1", "a2", "b0", "b1"])).unwrap();
        assert_eq!(plan.len(), 2);
        assert_eq!(models(&plan[0]), ["a0", "a1"]);
        assert_eq!(plan[0].bytes, 200);
        assert_eq!(models(&plan[1]), ["b0"]);
    }

    /// Two jobs started from one model: pruning one leaves the model the
    /// other still names; pruning both deletes it.
    #[test]
    fn a_model_shared_with_a_job_left_alone_stays() {
        let jobs = [
            job(1, "finished", &["s", "a1"], Some("a1")),
            job(2, "cancelled", &["s", "b1", "b2"], None),
        ];
        let all = stored(&["s", "a1", "b1", "b2"]);
        let only_2 = plan(&jobs, &[2], &all).unwrap();
        assert_eq!(only_2.len(), 1);
        assert_eq!(models(&only_2[0]), ["b1", "b2"]);
        let both = plan(&jobs, &[], &all).unwrap();
        assert_eq!(models(&both[0]), ["s"]);
        assert_eq!(models(&both[1]), ["b1", "b2", "s"]);
        // `s` is freed once.
        assert_eq!((both[0].bytes, both[1].bytes), (100, 200));
    }

    /// Nothing while a job runs; a named job must exist and have ended.
    #[test]
    fn running_or_unknown_jobs_stop_the_plan() {
        let mut jobs = vec![
            job(1, "finished", &["a0", "a1"], Some("a1")),
            job(2, "queued", &[], None),
        ];
        let all = stored(&["a0", "a1"]);
        assert_eq!(plan(&jobs, &[2], &all), Err(PlanError::NotEnded(2, "queued".into())));
        assert_eq!(plan(&jobs, &[7], &all), Err(PlanError::NoSuchJob(7)));
        // A queued job holds no model yet: the others may be pruned.
        assert_eq!(plan(&jobs, &[], &all).unwrap().len(), 1);
        jobs.push(job(3, "running", &["a0"], None));
        assert_eq!(plan(&jobs, &[1], &all), Err(PlanError::Running(3)));
    }

    /// What a block already named, or what is not stored, is not named
    /// again: a second prune finds nothing.
    #[test]
    fn a_second_prune_finds_nothing() {
        let mut jobs = [job(1, "failed", &["a0", "a1", "a2"], Some("a2"))];
        let mut all = stored(&["a0", "a1", "a2"]);
        let first = plan(&jobs, &[], &all).unwrap();
        assert_eq!(models(&first[0]), ["a0", "a1"]);
        jobs[0].pruned.extend(first[0].models.iter().cloned());
        all.retain(|m, _| !first[0].models.contains(m));
        assert_eq!(plan(&jobs, &[], &all).unwrap(), []);
        // Without the block, a missing row is still not named.
        jobs[0].pruned.clear();
        assert_eq!(plan(&jobs, &[], &all).unwrap(), []);
    }
}
