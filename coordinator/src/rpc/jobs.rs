//! The `Jobs` service, called by the `tessera` CLI of ML leads.

use std::collections::BTreeMap;
use std::sync::Arc;

use tessera_protocol::ids::JobId;
use tessera_protocol::job::JobSpec;
use tessera_protocol::ledger::payload::{JobCreated, JobEnded, Payload};
use tessera_protocol::pb::jobs_server::Jobs;
use tessera_protocol::{evaluation, metrics};
use tessera_protocol::{pb, wire};
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use super::RpcError;
use super::federation::chunk_stream;
use crate::ledger::SOFTWARE;
use crate::state::Shared;
use crate::store::{CANCELLED, JobRow, NewJob, Store, binary_metrics};
use crate::tls::Caller;
use crate::unix_ms;

pub struct JobsService {
    shared: Arc<Shared>,
}

impl JobsService {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    async fn job_row(&self, job_id: u64) -> Result<JobRow, RpcError> {
        self.shared
            .store
            .job(JobId(job_id))
            .await?
            .ok_or_else(|| RpcError::NotFound(format!("no job {job_id}")))
    }

    /// Each site's part in the job: its decision on the ledger, why the
    /// coordinator left it out, or its hold (only the running job has
    /// holds; they are not on the ledger).
    async fn site_states(&self, job_id: JobId) -> Result<Vec<pb::SiteState>, RpcError> {
        let decisions = self.shared.ledger.decisions(job_id.0);
        let problems = self.shared.store.problems(job_id).await?;
        let held: Vec<(String, String)> = self
            .shared
            .lock()
            .active
            .as_ref()
            .filter(|a| a.job_id == job_id)
            .map(|a| a.held.iter().map(|(s, r)| (s.to_string(), r.clone())).collect())
            .unwrap_or_default();
        Ok(site_states(
            decisions.into_iter().map(|(site, d)| (site.to_string(), d)),
            problems,
            held,
        ))
    }
}

fn summary(row: &JobRow) -> pb::JobSummary {
    pb::JobSummary {
        job_id: row.id as u64,
        name: row.name.clone(),
        status: row.status.clone(),
        rounds_done: row.rounds_done as u32,
        rounds_total: row.rounds_total as u32,
        strategy: row.strategy.clone(),
        model: row.model.clone(),
        created_at_ms: row.created_at_ms as u64,
        error: row.error.clone(),
        job_hash: row.job_hash.clone(),
        phase: row.phase.clone(),
    }
}

#[tonic::async_trait]
impl Jobs for JobsService {
    async fn submit_job(
        &self,
        request: Request<pb::SubmitJobRequest>,
    ) -> Result<Response<pb::SubmitJobResponse>, Status> {
        let job_toml = request.into_inner().job_toml;
        let spec = JobSpec::from_toml(&job_toml).map_err(|e| RpcError::InvalidArgument(format!("job refused: {e}")))?;
        let job_hash = JobSpec::hash_of(&job_toml);
        // The job and its ledger block are stored together: no job runs
        // without being on the ledger first.
        let now_ms = unix_ms();
        let mut tx = self.shared.ledger.begin().await.map_err(RpcError::from)?;
        let job_id = Store::insert_job_in(
            &mut tx.tx,
            &NewJob {
                job_toml: &job_toml,
                job_hash: &job_hash,
                name: &spec.name,
                rounds: spec.rounds,
                strategy: &spec.strategy_label(),
                model: &spec.model.label(),
                now_ms,
            },
        )
        .await
        .map_err(RpcError::from)?;
        let block = Payload::JobCreated(JobCreated {
            job_id: job_id.0,
            name: spec.name.clone(),
            job_sha256: job_hash.clone(),
            job_toml: job_toml.clone(),
            software: SOFTWARE.to_owned(),
            insecure_transport: self.shared.insecure_transport,
        });
        tx.append(&block, now_ms as u64).await.map_err(RpcError::from)?;
        tx.commit().await.map_err(RpcError::from)?;
        info!(job = %job_id, name = %spec.name, hash = %job_hash, "job submitted");
        self.shared.wake.notify_waiters();
        Ok(Response::new(pb::SubmitJobResponse {
            job_id: job_id.0,
            job_hash,
        }))
    }

    async fn list_jobs(
        &self,
        _request: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        let rows = self.shared.store.jobs().await.map_err(RpcError::from)?;
        Ok(Response::new(pb::ListJobsResponse {
            jobs: rows.iter().map(summary).collect(),
        }))
    }

    async fn job_status(
        &self,
        request: Request<pb::JobStatusRequest>,
    ) -> Result<Response<pb::JobStatusResponse>, Status> {
        let row = self.job_row(request.get_ref().job_id).await?;
        let job_id = JobId(row.id as u64);
        let store = &self.shared.store;
        let rounds = store.rounds(job_id).await.map_err(RpcError::from)?;
        let mut members: BTreeMap<i64, (Vec<String>, Vec<String>)> = BTreeMap::new();
        for m in store.members(job_id).await.map_err(RpcError::from)? {
            let entry = members.entry(m.round).or_default();
            // "submitted; dropped:unmask" puts a site in both lists: its
            // update counts, but it went silent before the round closed.
            if m.outcome.starts_with("submitted") {
                entry.0.push(m.site_id.clone());
            }
            if let Some(at) = m.outcome.find("dropped:") {
                entry.1.push(format!("{} ({})", m.site_id, &m.outcome[at..]));
            }
        }
        let rounds = rounds
            .into_iter()
            .map(|r| {
                let (sites, dropped) = members.remove(&r.round).unwrap_or_default();
                pb::RoundSummary {
                    round: r.round as u32,
                    sites,
                    dropped,
                    model_hash: r.model_hash,
                    total_weight: r.total_weight,
                    duration_ms: (r.finished_at_ms - r.started_at_ms).max(0) as u64,
                    mean_train_loss: r.mean_train_loss.unwrap_or(f64::NAN),
                }
            })
            .collect();
        let metrics = store
            .metrics(job_id)
            .await
            .map_err(RpcError::from)?
            .into_iter()
            .map(|m| pb::SiteMetrics {
                round: m.round as u32,
                site_id: m.site_id,
                n_test: m.n_test as u64,
                loss: m.loss,
                accuracy: m.accuracy,
                auc: m.auc.unwrap_or(f64::NAN),
                binary: binary_metrics(m.binary.as_deref()).as_ref().map(wire::binary_to_pb),
                model_hash: m.model_hash,
            })
            .collect();
        let pooled: Vec<pb::PooledMetrics> = store
            .pooled(job_id)
            .await
            .map_err(RpcError::from)?
            .into_iter()
            .map(|p| pb::PooledMetrics {
                round: p.round as u32,
                n_sites: p.n_sites as u32,
                n_test: p.n_test as u64,
                accuracy: p.accuracy.unwrap_or(f64::NAN),
                loss: p.loss.unwrap_or(f64::NAN),
                binary: binary_metrics(p.binary.as_deref()).as_ref().map(wire::binary_to_pb),
            })
            .collect();
        let (roc_curve, calibration) = final_curves(store, &row, &pooled).await?;
        let waiting = {
            let inner = self.shared.lock();
            match inner.active.as_ref() {
                Some(active) if active.job_id == job_id => inner.waiting(self.shared.now_ms()),
                _ => None,
            }
        };
        Ok(Response::new(pb::JobStatusResponse {
            job: Some(summary(&row)),
            waiting: waiting.unwrap_or_default(),
            sites: self.site_states(job_id).await?,
            rounds,
            metrics,
            pooled,
            roc_curve,
            calibration,
        }))
    }

    async fn list_sites(
        &self,
        _request: Request<pb::ListSitesRequest>,
    ) -> Result<Response<pb::ListSitesResponse>, Status> {
        let store = &self.shared.store;
        let seen = store.sites().await.map_err(RpcError::from)?;
        let online = self.shared.online(crate::telemetry::CONNECTED_MS);
        let running = self.shared.lock().active.as_ref().map(|a| a.job_id);
        let (job_phase, job_states) = match running {
            Some(job_id) => {
                let phase = store.job(job_id).await.map_err(RpcError::from)?.map(|r| r.phase);
                let states = self.site_states(job_id).await?;
                (phase.unwrap_or_default(), states)
            }
            None => (String::new(), Vec::new()),
        };
        // The latest refusal of each site: its own signed decline, or why
        // the coordinator left it out, whichever came in the later job.
        let mut last_problem = store.latest_problems().await.map_err(RpcError::from)?;
        for (site, (job, reason)) in self.shared.ledger.latest_declines() {
            let site = site.to_string();
            if last_problem.get(&site).is_none_or(|(j, _)| *j <= job) {
                last_problem.insert(site, (job, format!("declined: {reason}")));
            }
        }
        let mut names: std::collections::BTreeSet<String> = self.shared.roster.keys().map(|s| s.to_string()).collect();
        names.extend(self.shared.allowed_sites.iter().flatten().map(|s| s.to_string()));
        names.extend(seen.iter().map(|(site, _, _)| site.clone()));
        let sites = names
            .into_iter()
            .map(|name| {
                let row = seen.iter().find(|(site, _, _)| *site == name);
                let id = tessera_protocol::ids::SiteId::new(&name).ok();
                pb::SiteInfo {
                    in_roster: id.as_ref().is_some_and(|id| self.shared.roster.contains_key(id)),
                    version: row.map(|r| r.2.clone()).unwrap_or_default(),
                    last_seen_ms: row.map_or(0, |r| r.1),
                    connected: id.as_ref().is_some_and(|id| online.contains(id)),
                    job_id: running.map_or(0, |j| j.0),
                    job_phase: job_phase.clone(),
                    job_state: job_states
                        .iter()
                        .find(|s| s.site_id == name)
                        .map(|s| s.state.clone())
                        .unwrap_or_default(),
                    last_problem: last_problem
                        .get(&name)
                        .map(|(job, reason)| format!("job {job}: {reason}"))
                        .unwrap_or_default(),
                    site_id: name,
                }
            })
            .collect();
        Ok(Response::new(pb::ListSitesResponse { sites }))
    }

    async fn cancel_job(
        &self,
        request: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::CancelJobResponse>, Status> {
        let row = self.job_row(request.get_ref().job_id).await?;
        let job_id = JobId(row.id as u64);
        let now_ms = unix_ms();
        let mut tx = self.shared.ledger.begin().await.map_err(RpcError::from)?;
        if Store::cancel_if_queued_in(&mut tx.tx, job_id, now_ms)
            .await
            .map_err(RpcError::from)?
        {
            let block = Payload::JobEnded(JobEnded {
                job_id: job_id.0,
                status: "cancelled".into(),
                reason: CANCELLED.into(),
                rounds_done: 0,
                final_model_sha256: None,
            });
            tx.append(&block, now_ms as u64).await.map_err(RpcError::from)?;
            tx.commit().await.map_err(RpcError::from)?;
            info!(job = %job_id, "queued job cancelled");
            return Ok(Response::new(pb::CancelJobResponse {
                status: "cancelled".into(),
            }));
        }
        drop(tx);
        {
            let mut inner = self.shared.lock();
            if let Some(active) = inner.active.as_mut().filter(|a| a.job_id == job_id) {
                active.cancel_requested = true;
                info!(job = %job_id, "cancellation requested");
                return Ok(Response::new(pb::CancelJobResponse {
                    status: "cancelling".into(),
                }));
            }
        }
        Err(RpcError::FailedPrecondition(format!("job {job_id} is already {}", row.status)).into())
    }

    async fn prune_jobs(
        &self,
        request: Request<pb::PruneJobsRequest>,
    ) -> Result<Response<pb::PruneJobsResponse>, Status> {
        let by = Caller::of(&request).map_or_else(
            || "an operator (the coordinator runs with --insecure-dev)".to_owned(),
            |identity| identity.to_string(),
        );
        let dry_run = request.get_ref().dry_run;
        let request = request.into_inner();
        let jobs = crate::prune::apply(
            &self.shared,
            &by,
            "tessera job prune: the weights of the job's models other than its final one",
            &request.job_ids,
            request.dry_run,
        )
        .await?;
        let mut reply = pb::PruneJobsResponse {
            jobs,
            ..Default::default()
        };
        if !dry_run && !reply.jobs.is_empty() {
            match self.shared.store.vacuum().await {
                Ok((before, after)) => (reply.file_bytes_before, reply.file_bytes_after) = (before, after),
                Err(e) => {
                    warn!("cannot compact the database after pruning: {e:#}");
                    reply.vacuum_error = format!("{e:#}");
                }
            }
        }
        Ok(Response::new(reply))
    }

    type ExportModelStream = super::federation::ChunkStreamAlias;

    async fn export_model(
        &self,
        request: Request<pb::ExportModelRequest>,
    ) -> Result<Response<Self::ExportModelStream>, Status> {
        let row = self.job_row(request.get_ref().job_id).await?;
        let Some(hash) = row.final_model_hash.clone() else {
            return Err(RpcError::FailedPrecondition(format!(
                "job {} has no model yet (status {})",
                row.id, row.status
            ))
            .into());
        };
        let bytes = self
            .shared
            .store
            .model(&hash)
            .await
            .map_err(RpcError::from)?
            .ok_or_else(|| RpcError::NotFound(format!("model {hash} is missing from the store")))?;
        let normalization: serde_json::Value = row
            .normalization
            .as_deref()
            .and_then(|n| serde_json::from_str(n).ok())
            .unwrap_or(serde_json::Value::Null);
        let block = self
            .shared
            .ledger
            .round_block_for(row.id as u64, &hash)
            .await
            .map_err(RpcError::from)?;
        // The final model's evaluation, pooled by secure sum (secure jobs).
        let final_round = row.rounds_done + 1;
        let pooled = self
            .shared
            .store
            .pooled(JobId(row.id as u64))
            .await
            .map_err(RpcError::from)?
            .into_iter()
            .find(|p| p.round == final_round)
            .map(|p| {
                let mut pooled = serde_json::json!({
                    "n_sites": p.n_sites, "n_test": p.n_test, "accuracy": p.accuracy, "loss": p.loss,
                });
                if let Some(binary) = binary_metrics(p.binary.as_deref()) {
                    pooled["binary"] = serde_json::to_value(binary).expect("metrics serialise");
                }
                pooled
            });
        let manifest = serde_json::json!({
            "format": "tessera-model-v1",
            "final_pooled_metrics": pooled,
            // The ledger block that recorded this model: verify the ledger,
            // then check this file's SHA-256 against the block.
            "ledger_block": block.map(|(height, block_hash)| serde_json::json!({
                "height": height,
                "hash": block_hash,
            })),
            "encoding": "little-endian f32, layer by layer: weight [d_in, d_out] row-major, then bias",
            "job_id": row.id,
            "job_name": row.name,
            "job_hash": row.job_hash,
            "job_status": row.status,
            "rounds_done": row.rounds_done,
            "model": row.model,
            "model_hash": hash,
            "n_params": bytes.len() / 4,
            "n_features": row.n_features,
            // The encoding rows must have to go into this model: the SHA-256
            // of the schema as the sites applied it (`tessera-participant
            // check` prints a site's first 16 digits).
            "features_sha256": row.features_hash,
            "normalization": normalization,
            "job_toml": row.job_toml,
        });
        Ok(Response::new(chunk_stream(bytes, hash, manifest.to_string())))
    }
}

/// Each site's part in a job, as `job status` shows it: its signed decision
/// (accepted or declined), overridden by why the coordinator left it out
/// unless it declined (its own signed word is the better reason: a held job
/// its data team rejected), and a hold for a site with neither.
fn site_states(
    decisions: impl IntoIterator<Item = (String, (bool, String))>,
    problems: impl IntoIterator<Item = (String, String)>,
    held: impl IntoIterator<Item = (String, String)>,
) -> Vec<pb::SiteState> {
    let state = |site: &str, state: &str, reason: String| pb::SiteState {
        site_id: site.to_owned(),
        state: state.to_owned(),
        reason,
    };
    let mut sites: BTreeMap<String, pb::SiteState> = decisions
        .into_iter()
        .map(|(site, (accepted, reason))| {
            let s = state(&site, if accepted { "accepted" } else { "declined" }, reason);
            (site, s)
        })
        .collect();
    for (site, problem) in problems {
        if sites.get(&site).is_none_or(|s| s.state != "declined") {
            let s = state(&site, "left out", problem);
            sites.insert(site, s);
        }
    }
    for (site, reason) in held {
        let s = state(&site, "held", format!("waiting for its data team's approval: {reason}"));
        sites.entry(site).or_insert(s);
    }
    sites.into_values().collect()
}

/// The final model's pooled ROC and calibration curves, from the final
/// evaluation's stored sum (score histograms); none before it ran, for a
/// plaintext job, or for a sum that does not decode.
async fn final_curves(
    store: &Store,
    row: &JobRow,
    pooled: &[pb::PooledMetrics],
) -> Result<(Vec<pb::CurvePoint>, Vec<pb::CalibrationBin>), RpcError> {
    let round = row.rounds_total as u32 + 1;
    let Some(n_test) = pooled.iter().find(|p| p.round == round).map(|p| p.n_test) else {
        return Ok(Default::default());
    };
    let Some((_, bytes)) = store.aggregate(JobId(row.id as u64), round).await? else {
        return Ok(Default::default());
    };
    let Ok(spec) = JobSpec::from_toml(&row.job_toml) else {
        return Ok(Default::default());
    };
    let Ok(words) = wire::decode_words(&bytes) else {
        return Ok(Default::default());
    };
    let Ok(groups) = evaluation::final_groups(&words, n_test, spec.evaluation.threshold) else {
        return Ok(Default::default());
    };
    let roc = metrics::roc_curve(&groups)
        .into_iter()
        .map(|(x, y)| pb::CurvePoint { x, y })
        .collect();
    let calibration = metrics::calibration_curve(&groups, 10)
        .into_iter()
        .map(|(predicted, observed, rows)| pb::CalibrationBin {
            predicted,
            observed,
            rows,
        })
        .collect();
    Ok((roc, calibration))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sites_state_is_its_decision_unless_left_out_and_a_hold_only_fills_silence() {
        let d = |site: &str, accepted: bool| (site.to_owned(), (accepted, format!("{site} said")));
        let p = |site: &str| (site.to_owned(), format!("{site} left out"));
        let h = |site: &str| {
            (
                site.to_owned(),
                "outside the site's policy: 2 rounds > policy.max_rounds 1".to_owned(),
            )
        };
        let states = site_states(
            [d("a", true), d("b", true), d("c", false), d("d", false)],
            [p("b"), p("c"), p("e")],
            [h("c"), h("e"), h("f")],
        );
        let got: Vec<(&str, &str, &str)> = states
            .iter()
            .map(|s| (s.site_id.as_str(), s.state.as_str(), s.reason.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("a", "accepted", "a said"),
                ("b", "left out", "b left out"),
                ("c", "declined", "c said"),
                ("d", "declined", "d said"),
                ("e", "left out", "e left out"),
                (
                    "f",
                    "held",
                    "waiting for its data team's approval: outside the site's policy: 2 rounds > policy.max_rounds 1"
                ),
            ]
        );
    }
}
