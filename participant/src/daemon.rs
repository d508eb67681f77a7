//! The participant daemon: connects outbound to the coordinator, reconnects
//! with backoff, and works on the tasks it is given: preprocessing statistics,
//! local evaluation, local training.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use tessera_models::data::Dataset;
use tessera_models::train::{LocalTraining, evaluate, train_local};
use tessera_protocol::CHUNK_BYTES;
use tessera_protocol::ids::{SiteId, sha256_hex};
use tessera_protocol::job::JobSpec;
use tessera_protocol::model::{Layout, decode_params, encode_params};
use tessera_protocol::pb::federation_client::FederationClient;
use tessera_protocol::pb::{self, task, update_chunk};
use tessera_protocol::stats::Normalization;
use tokio_stream::StreamExt;
use tonic::transport::{Channel, Endpoint};
use tracing::{error, info, warn};

use crate::config::SiteConfig;
use crate::egress::EgressLog;
use crate::local::LocalData;

const HEARTBEAT: Duration = Duration::from_secs(2);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// Runs until the process is stopped.
pub async fn run(config: SiteConfig) -> anyhow::Result<()> {
    let data = LocalData::load(&config)?;
    info!(
        site = %config.site_id,
        train = data.train.len(),
        test = data.test.len(),
        "local data loaded"
    );
    let egress = Arc::new(EgressLog::open(&config.state_dir)?);
    info!(path = %egress.path().display(), "egress log");
    let endpoint = Endpoint::from_shared(config.coordinator.clone())
        .with_context(|| format!("bad coordinator address `{}`", config.coordinator))?
        .connect_timeout(Duration::from_secs(5));
    let mut site = Site {
        id: config.site_id.clone(),
        data,
        egress,
        done: HashSet::new(),
        device: tessera_models::default_device(),
    };
    let mut backoff = Duration::from_millis(250);
    loop {
        match endpoint.connect().await {
            Ok(channel) => {
                info!(coordinator = %config.coordinator, "connected");
                backoff = Duration::from_millis(250);
                let heartbeat = tokio::spawn(heartbeat_loop(
                    FederationClient::new(channel.clone()),
                    site.id.clone(),
                    site.egress.clone(),
                ));
                let result = site.serve(FederationClient::new(channel)).await;
                heartbeat.abort();
                if let Err(e) = result {
                    warn!("connection lost: {e:#}");
                }
            }
            Err(e) => warn!(coordinator = %config.coordinator, "cannot connect: {e}; retrying in {backoff:?}"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

async fn heartbeat_loop(mut client: FederationClient<Channel>, site: SiteId, egress: Arc<EgressLog>) {
    loop {
        let request = pb::HeartbeatRequest {
            site_id: site.to_string(),
        };
        if egress.record("Heartbeat", &request).is_err() {
            return;
        }
        if let Err(status) = client.heartbeat(request).await {
            warn!("heartbeat failed: {}", status.message());
        }
        tokio::time::sleep(HEARTBEAT).await;
    }
}

/// What one site does with its tasks.
struct Site {
    id: SiteId,
    data: LocalData,
    egress: Arc<EgressLog>,
    /// (job, round, what) already done, so a repeated announcement after a
    /// reconnect is not worked twice.
    done: HashSet<(u64, u32, Work)>,
    device: tessera_models::Device,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Work {
    Stats,
    Metrics,
    Update,
}

impl Site {
    /// Polls for tasks until the connection fails.
    async fn serve(&mut self, mut client: FederationClient<Channel>) -> anyhow::Result<()> {
        loop {
            let request = pb::PollTaskRequest {
                site_id: self.id.to_string(),
            };
            self.egress.record("PollTask", &request)?;
            let task = client.poll_task(request).await.context("poll failed")?.into_inner();
            let result = match task.kind {
                None | Some(task::Kind::Idle(_)) => Ok(()),
                Some(task::Kind::ComputeStats(t)) => self.compute_stats(&mut client, t).await,
                Some(task::Kind::Round(a)) => self.round(&mut client, a).await,
            };
            if let Err(e) = result {
                // A refused task is logged and the site carries on; transport
                // errors end this connection and trigger a reconnect.
                if e.downcast_ref::<tonic::Status>()
                    .is_some_and(|s| s.code() == tonic::Code::Unavailable)
                {
                    return Err(e);
                }
                error!("task failed: {e:#}");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }

    /// Checks a job file against its hash and parses it.
    fn job(&self, job_toml: &str, job_hash: &str) -> anyhow::Result<JobSpec> {
        if sha256_hex(job_toml.as_bytes()) != job_hash {
            bail!("job file does not match its announced hash {job_hash}");
        }
        JobSpec::from_toml(job_toml).context("announced job is invalid")
    }

    async fn compute_stats(
        &mut self,
        client: &mut FederationClient<Channel>,
        task: pb::ComputeStats,
    ) -> anyhow::Result<()> {
        if !self.done.insert((task.job_id, 0, Work::Stats)) {
            return Ok(());
        }
        let spec = self.job(&task.job_toml, &task.job_hash)?;
        info!(job = task.job_id, name = %spec.name, "sending preprocessing statistics");
        let stats = self.data.train_stats();
        let report = pb::StatsReport {
            site_id: self.id.to_string(),
            job_id: task.job_id,
            count: stats.count,
            sum: stats.sum,
            sum_sq: stats.sum_sq,
            features_hash: self.data.schema.features_hash(),
        };
        self.egress.record("SubmitStats", &report)?;
        client.submit_stats(report).await?;
        Ok(())
    }

    async fn round(&mut self, client: &mut FederationClient<Channel>, a: pb::RoundAnnouncement) -> anyhow::Result<()> {
        let spec = self.job(&a.job_toml, &a.job_hash)?;
        let layout = spec.model.layout(self.data.train.n_features);
        if layout.n_params() as u64 != a.n_params {
            bail!(
                "announced model has {} parameters, this site's data gives {} (different schema?)",
                a.n_params,
                layout.n_params()
            );
        }
        let normalization = a.normalization.clone().context("announcement without normalization")?;
        let normalization = Normalization {
            mean: normalization.mean,
            std: normalization.std,
        };
        if normalization.mean.len() != self.data.train.n_features
            || normalization.std.iter().any(|s| !(s.is_finite() && *s > 0.0))
        {
            bail!("announced normalization does not fit this site's features");
        }
        let global = self.fetch_model(client, &a.model_hash, a.n_params).await?;
        let (train, test) = self.data.normalized(&normalization);

        if self.done.insert((a.job_id, a.round, Work::Metrics)) {
            self.report_metrics(client, &a, &layout, &global, &test).await?;
        }
        if a.train && self.done.insert((a.job_id, a.round, Work::Update)) {
            self.train_and_submit(client, &a, &spec, &layout, &global, &train)
                .await?;
        }
        Ok(())
    }

    async fn report_metrics(
        &self,
        client: &mut FederationClient<Channel>,
        a: &pb::RoundAnnouncement,
        layout: &Layout,
        global: &[f32],
        test: &Dataset,
    ) -> anyhow::Result<()> {
        let eval = evaluate(layout, global, test, &self.device)?;
        info!(
            job = a.job_id,
            round = a.round,
            accuracy = eval.accuracy,
            loss = eval.loss,
            "evaluated global model"
        );
        let report = pb::MetricsReport {
            site_id: self.id.to_string(),
            job_id: a.job_id,
            round: a.round,
            model_hash: a.model_hash.clone(),
            n_test: eval.n as u64,
            loss: eval.loss,
            accuracy: eval.accuracy,
            auc: eval.auc,
        };
        self.egress.record("ReportMetrics", &report)?;
        client.report_metrics(report).await?;
        Ok(())
    }

    async fn train_and_submit(
        &self,
        client: &mut FederationClient<Channel>,
        a: &pb::RoundAnnouncement,
        spec: &JobSpec,
        layout: &Layout,
        global: &[f32],
        train: &Dataset,
    ) -> anyhow::Result<()> {
        let seed = spec.seed ^ (u64::from(a.round) << 32) ^ seed_of(&self.id);
        let proximal_mu = a.proximal_mu;
        let (device, layout_owned, training, global_owned, train_owned) = (
            self.device.clone(),
            layout.clone(),
            spec.training.clone(),
            global.to_vec(),
            train.clone(),
        );
        // Training is CPU-bound: keep it off the async threads so heartbeats go on.
        let update = tokio::task::spawn_blocking(move || {
            let cfg = LocalTraining {
                layout: &layout_owned,
                spec: &training,
                proximal_mu,
                seed,
            };
            train_local(&cfg, &global_owned, &train_owned, &device)
        })
        .await
        .context("training task panicked")??;
        let delta: Vec<f32> = update.params.iter().zip(global).map(|(w, g)| w - g).collect();
        info!(
            job = a.job_id,
            round = a.round,
            n = update.n_samples,
            train_loss = update.train_loss,
            "local training done"
        );
        let header = pb::UpdateChunk {
            kind: Some(update_chunk::Kind::Header(pb::UpdateHeader {
                site_id: self.id.to_string(),
                job_id: a.job_id,
                round: a.round,
                n_samples: update.n_samples as u64,
                n_params: delta.len() as u64,
                base_model_hash: a.model_hash.clone(),
                train_loss: update.train_loss,
            })),
        };
        let mut messages = vec![header];
        let bytes = encode_params(&delta);
        for chunk in bytes.chunks(CHUNK_BYTES) {
            messages.push(pb::UpdateChunk {
                kind: Some(update_chunk::Kind::Data(chunk.to_vec())),
            });
        }
        for m in &messages {
            self.egress.record("SubmitUpdate", m)?;
        }
        client.submit_update(tokio_stream::iter(messages)).await?;
        Ok(())
    }

    async fn fetch_model(
        &self,
        client: &mut FederationClient<Channel>,
        model_hash: &str,
        n_params: u64,
    ) -> anyhow::Result<Vec<f32>> {
        let request = pb::FetchModelRequest {
            site_id: self.id.to_string(),
            model_hash: model_hash.to_owned(),
        };
        self.egress.record("FetchModel", &request)?;
        let mut stream = client.fetch_model(request).await?.into_inner();
        let expected_len = n_params * 4;
        let mut bytes = Vec::with_capacity(expected_len as usize);
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            if chunk.offset != bytes.len() as u64
                || chunk.total_len != expected_len
                || bytes.len() + chunk.data.len() > expected_len as usize
            {
                bail!(
                    "model {model_hash} arrived malformed (chunk at offset {})",
                    chunk.offset
                );
            }
            bytes.extend_from_slice(&chunk.data);
        }
        if sha256_hex(&bytes) != model_hash {
            bail!("downloaded model does not match its hash {model_hash}");
        }
        Ok(decode_params(&bytes)?)
    }
}

/// A per-site seed component, so sites shuffle differently.
fn seed_of(site: &SiteId) -> u64 {
    let digest = sha256_hex(site.as_str().as_bytes());
    u64::from_str_radix(&digest[..16], 16).unwrap_or(0)
}
