//! The `Federation` service, called by participant daemons.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tessera_protocol::CHUNK_BYTES;
use tessera_protocol::discovery;
use tessera_protocol::identity::Identity;
use tessera_protocol::ids::{JobId, SiteId};
use tessera_protocol::model::decode_params;
use tessera_protocol::pb::federation_server::Federation;
use tessera_protocol::pb::{self, update_chunk};
use tessera_protocol::round::UpdateHeader;
use tessera_protocol::stats::FeatureStats;
use tessera_protocol::wire::{self, MAX_REASON_BYTES};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

use super::RpcError;
use crate::state::{Phase, SessionNote, Shared};
use tessera_protocol::ledger::payload::{DeclaredCounts, JobAccepted};
use tessera_protocol::ledger::verify_decision;

use crate::store::{MetricsRow, binary_json};
use crate::tls::Caller;
use crate::unix_ms;

/// How long a `PollTask` waits for work before answering `Idle`.
const LONG_POLL: Duration = Duration::from_secs(5);

/// How long new ledger blocks may wait for the sites at work to make them
/// final before idle members are woken to endorse them too.
const FINALITY_GRACE: Duration = Duration::from_secs(1);

/// How often a site the running job may judge by its silence sends a
/// heartbeat (`Shared::watched`: silence drops it from a round, or leaves
/// it out of the job), and how often any other site does (for `tessera
/// sites`; its polls say it is there meanwhile).
const HEARTBEAT_AT_WORK: Duration = Duration::from_secs(2);
const HEARTBEAT_IDLE: Duration = Duration::from_secs(15);

pub struct FederationService {
    shared: Arc<Shared>,
    /// Whether the last attempt to store when a site was heard from failed.
    touch_failing: AtomicBool,
}

impl FederationService {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self {
            shared,
            touch_failing: AtomicBool::new(false),
        }
    }

    /// The calling site. Under mutual TLS it is the site named by its
    /// certificate, and a message claiming any other site is refused;
    /// with `--insecure-dev` it is the id in the message. Either way it must
    /// be an admitted site.
    async fn identify(&self, caller: Option<&Identity>, site_id: &str) -> Result<SiteId, RpcError> {
        let site = SiteId::new(site_id).map_err(|e| RpcError::InvalidArgument(e.to_string()))?;
        if let Some(identity) = caller
            && identity.site().as_ref() != Some(&site)
        {
            warn!(%identity, claimed = %site, "site impersonation refused");
            return Err(RpcError::PermissionDenied(format!(
                "the certificate identifies {identity}; it cannot act as site `{site}`"
            )));
        }
        if let Some(allowed) = &self.shared.allowed_sites
            && !allowed.contains(&site)
        {
            warn!(%site, "request from unknown site refused");
            return Err(RpcError::PermissionDenied(format!("unknown site `{site}`")));
        }
        // When a site was last heard from is for operators (`tessera
        // sites`): a request is not refused because it cannot be stored.
        // Said once while it fails, not at every request.
        if self.shared.saw(&site) {
            match self.shared.store.touch_site(&site, unix_ms()).await {
                Ok(()) => {
                    if self.touch_failing.swap(false, Ordering::Relaxed) {
                        info!("when sites were last heard from is recorded again");
                    }
                }
                Err(e) if !self.touch_failing.swap(true, Ordering::Relaxed) => {
                    warn!(%site, "cannot record when sites were last heard from: {e:#}");
                }
                Err(e) => debug!(%site, "cannot record when the site was last heard from: {e:#}"),
            }
        }
        Ok(site)
    }

    /// Notes the daemon session a site's request carries (empty from a
    /// daemon that predates it). A new one means the daemon restarted: it
    /// is dropped at once from the secure summation in flight, whose keys
    /// and shares it lost, rather than waited for until the deadline.
    async fn note_session(&self, site: &SiteId, session: &str) -> Result<(), RpcError> {
        if session.len() > 32 || !session.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(RpcError::InvalidArgument(
                "session must be at most 32 hex digits".into(),
            ));
        }
        if session.is_empty() {
            return Ok(());
        }
        let note = self.shared.note_session(site, session);
        if let SessionNote::Restarted(Some(stage)) = note {
            warn!(%site, stage, "site restarted during a secure summation: dropped from it at once");
            self.shared.progress.notify_one();
        }
        // Stored for the next coordinator process (bookkeeping: a request
        // is not refused because it cannot be stored).
        if note.is_new()
            && let Err(e) = self.shared.store.set_site_session(site, session, unix_ms()).await
        {
            warn!(%site, "cannot record the site's session: {e:#}");
        }
        Ok(())
    }

    /// The site's next task, long-polled: a task as soon as there is one
    /// for `site`; `Idle` after `LONG_POLL`, or once the ledger grew and
    /// the new blocks want this site's endorsement (`sync_ledger`: the site
    /// syncs and endorses, and a job's next step may wait for that: the
    /// cohort seal). A site at work in the running job is woken for every
    /// new block, as is every site when the sites at work are too few to
    /// make blocks final; any other site only if the new blocks are still
    /// not final after `FINALITY_GRACE`. An idle site otherwise syncs at its
    /// own pace: a job it holds or sits out costs it a few requests a
    /// minute, not several per round. A task comes before an idle turn: a
    /// site syncs before it works anyway, and a round announced just after
    /// its predecessor's blocks is answered with the round, not with an
    /// idle turn to sync those blocks first.
    async fn next_task(&self, site: &SiteId, ledger_len: u64) -> pb::Task {
        let deadline = tokio::time::Instant::now() + LONG_POLL;
        let mut chain = self.shared.ledger.committed_len();
        // A replica behind the chain counts as the chain having grown (a
        // block appended between two polls, as a job ends, would otherwise
        // wait for the site's own pace).
        if ledger_len > 0 {
            chain = chain.min(ledger_len);
        }
        // When the chain grew past `chain` without this site being woken,
        // and to what length: the blocks given the grace to become final.
        let mut grown: Option<(tokio::time::Instant, u64)> = None;
        let idle = |sync_ledger| pb::Task {
            kind: Some(pb::task::Kind::Idle(pb::Idle {
                retry_after_ms: 0,
                sync_ledger,
            })),
        };
        loop {
            let notified = self.shared.wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(kind) = self.shared.lock().task_for(site) {
                return pb::Task { kind: Some(kind) };
            }
            let len = self.shared.ledger.committed_len();
            if len != chain {
                if self.shared.at_work(site) || !self.shared.at_work_make_blocks_final() {
                    return idle(true);
                }
                let (since, seen) = *grown.get_or_insert_with(|| (tokio::time::Instant::now(), len));
                if since.elapsed() >= FINALITY_GRACE {
                    // Blocks appended since get their own grace.
                    match self.shared.ledger.all_final(chain, seen).await {
                        Ok(true) => {
                            chain = seen;
                            grown = None;
                            continue;
                        }
                        _ => return idle(true),
                    }
                }
            }
            let wake_at = grown.map_or(deadline, |(since, _)| deadline.min(since + FINALITY_GRACE));
            tokio::select! {
                () = &mut notified => {}
                () = tokio::time::sleep_until(wake_at) => {
                    if wake_at >= deadline {
                        return idle(false);
                    }
                }
            }
        }
    }

    /// The answer to a submission: the next task when the site asked to
    /// wait for it, nothing otherwise.
    async fn answer(&self, site: &SiteId, wait_for_task: bool) -> Response<pb::Task> {
        Response::new(if wait_for_task {
            self.next_task(site, 0).await
        } else {
            pb::Task::default()
        })
    }
}

pub(crate) type ChunkStreamAlias = ChunkStream;
type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::ModelChunk, Status>> + Send>>;

/// Streams `bytes` as model chunks; the first chunk may carry a manifest.
pub(crate) fn chunk_stream(bytes: Vec<u8>, model_hash: String, manifest_json: String) -> ChunkStream {
    let total_len = bytes.len() as u64;
    let chunks: Vec<Result<pb::ModelChunk, Status>> = if bytes.is_empty() {
        vec![Ok(pb::ModelChunk {
            offset: 0,
            data: Vec::new(),
            total_len,
            model_hash,
            manifest_json,
        })]
    } else {
        bytes
            .chunks(CHUNK_BYTES)
            .enumerate()
            .map(|(i, chunk)| {
                Ok(pb::ModelChunk {
                    offset: (i * CHUNK_BYTES) as u64,
                    data: chunk.to_vec(),
                    total_len,
                    model_hash: model_hash.clone(),
                    manifest_json: if i == 0 { manifest_json.clone() } else { String::new() },
                })
            })
            .collect()
    };
    Box::pin(tokio_stream::iter(chunks))
}

#[tonic::async_trait]
impl Federation for FederationService {
    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let site = self.identify(Caller::of(&request), &request.get_ref().site_id).await?;
        self.note_session(&site, &request.get_ref().session).await?;
        self.shared.note_ledger_kinds(&site, request.get_ref().ledger_kinds);
        let version = &request.get_ref().version;
        if version.len() > 64 || !version.chars().all(|c| c.is_ascii_graphic() || c == ' ') {
            return Err(
                RpcError::InvalidArgument("version must be at most 64 printable ASCII characters".into()).into(),
            );
        }
        // Bookkeeping for `tessera sites`, like when a site was last heard
        // from: a heartbeat is not refused because it cannot be stored.
        if !version.is_empty()
            && self.shared.note_version(&site, version)
            && let Err(e) = self.shared.store.set_site_version(&site, version, unix_ms()).await
        {
            // Not cached as recorded: the next heartbeat tries again.
            self.shared.forget_version(&site);
            warn!(%site, "cannot record the site's version: {e:#}");
        }
        let next = if self.shared.watched(&site) {
            HEARTBEAT_AT_WORK
        } else {
            HEARTBEAT_IDLE
        };
        Ok(Response::new(pb::HeartbeatResponse {
            server_time_ms: unix_ms() as u64,
            next_heartbeat_ms: next.as_millis() as u32,
        }))
    }

    async fn poll_task(&self, request: Request<pb::PollTaskRequest>) -> Result<Response<pb::Task>, Status> {
        let site = self.identify(Caller::of(&request), &request.get_ref().site_id).await?;
        self.note_session(&site, &request.get_ref().session).await?;
        Ok(Response::new(self.next_task(&site, request.get_ref().ledger_len).await))
    }

    type FetchModelStream = ChunkStream;

    async fn fetch_model(
        &self,
        request: Request<pb::FetchModelRequest>,
    ) -> Result<Response<Self::FetchModelStream>, Status> {
        let caller = Caller::of(&request).cloned();
        let request = request.into_inner();
        self.identify(caller.as_ref(), &request.site_id).await?;
        let bytes = self
            .shared
            .store
            .model(&request.model_hash)
            .await
            .map_err(RpcError::from)?
            .ok_or_else(|| RpcError::NotFound(format!("no model with hash {}", request.model_hash)))?;
        self.shared.telemetry.model_sent(bytes.len());
        Ok(Response::new(chunk_stream(bytes, request.model_hash, String::new())))
    }

    type FetchAggregateStream = ChunkStream;

    async fn fetch_aggregate(
        &self,
        request: Request<pb::FetchAggregateRequest>,
    ) -> Result<Response<Self::FetchAggregateStream>, Status> {
        let caller = Caller::of(&request).cloned();
        let request = request.into_inner();
        let site = self.identify(caller.as_ref(), &request.site_id).await?;
        // The released sum is the cohort's output, not the world's.
        if !self.shared.ledger.cohort(request.job_id).contains(&site) {
            return Err(
                RpcError::PermissionDenied(format!("`{site}` is not in the cohort of job {}", request.job_id)).into(),
            );
        }
        let (sha256, bytes) = self
            .shared
            .store
            .aggregate(JobId(request.job_id), request.round)
            .await
            .map_err(RpcError::from)?
            .ok_or_else(|| {
                RpcError::NotFound(format!(
                    "no aggregate of job {} round {}",
                    request.job_id, request.round
                ))
            })?;
        let bytes = if crate::malicious::attack() == Some(crate::malicious::Attack::TamperedAggregate) {
            let mut bytes = bytes;
            if let Some(b) = bytes.first_mut() {
                *b ^= 1;
            }
            bytes
        } else {
            bytes
        };
        self.shared.telemetry.model_sent(bytes.len());
        Ok(Response::new(chunk_stream(bytes, sha256, String::new())))
    }

    async fn submit_stats(&self, request: Request<pb::StatsReport>) -> Result<Response<pb::Ack>, Status> {
        let caller = Caller::of(&request).cloned();
        let report = request.into_inner();
        let site = self.identify(caller.as_ref(), &report.site_id).await?;
        // The driver shows (a prefix of) each site's hash: nothing else.
        if report.features_hash.len() != 64 || !report.features_hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(RpcError::InvalidArgument("features_hash must be 64 hex digits (a SHA-256)".into()).into());
        }
        let secure_report = report.n_features > 0;
        let stats = if secure_report {
            // Secure jobs: only the encoding travels here; the statistics
            // follow by secure sum.
            if report.count != 0
                || report.positives != 0
                || !report.sum.is_empty()
                || !report.sum_sq.is_empty()
                || !report.missing.is_empty()
            {
                return Err(RpcError::InvalidArgument(
                    "a secure job's report carries no statistics in the clear".into(),
                )
                .into());
            }
            let width = report.n_features as usize;
            if width > 1 << 20 {
                return Err(RpcError::InvalidArgument(format!("{width} features is more than supported")).into());
            }
            FeatureStats::empty(width)
        } else {
            FeatureStats {
                count: report.count,
                sum: report.sum,
                sum_sq: report.sum_sq,
                missing: report.missing,
                positives: report.positives,
            }
        };
        if stats.sum.is_empty() {
            return Err(RpcError::InvalidArgument("statistics over no features".into()).into());
        }
        if let Err(e) = stats.check() {
            return Err(RpcError::InvalidArgument(format!("statistics refused: {e}")).into());
        }
        let mut inner = self.shared.lock();
        let Some(active) = inner.active.as_mut().filter(|a| a.job_id == JobId(report.job_id)) else {
            return Err(RpcError::FailedPrecondition(format!("job {} is not running", report.job_id)).into());
        };
        let Phase::Stats(phase) = &mut active.phase else {
            return Err(RpcError::FailedPrecondition("job is not collecting statistics".into()).into());
        };
        if !phase.pending.contains(&site) {
            return Err(RpcError::FailedPrecondition(format!("no statistics expected from `{site}`")).into());
        }
        if !self.shared.ledger.has_accepted(report.job_id, &site) {
            return Err(RpcError::FailedPrecondition(format!(
                "`{site}` has not accepted job {} in the ledger: send its signed decision first",
                report.job_id
            ))
            .into());
        }
        if phase.secure != secure_report {
            return Err(RpcError::InvalidArgument(if phase.secure {
                "this job sums statistics securely: send only features_hash and n_features".into()
            } else {
                "this job is plaintext: send the statistics".into()
            })
            .into());
        }
        // Sites with another encoding are not refused here (the first
        // report is no better than the others): the driver keeps the most
        // common encoding once every site has reported, and says which
        // sites it left out.
        if let Some(width) = phase
            .reports
            .iter()
            .find(|(other, _)| phase.encodings.get(*other) == Some(&report.features_hash))
            .map(|(_, s)| s.sum.len())
            && width != stats.sum.len()
        {
            return Err(RpcError::InvalidArgument(format!(
                "{} features, other sites with the same features hash have {width}",
                stats.sum.len()
            ))
            .into());
        }
        phase.encodings.insert(site.clone(), report.features_hash);
        phase.pending.remove(&site);
        phase.reports.insert(site.clone(), stats);
        self.shared.progress.notify_one();
        info!(%site, job = report.job_id, "statistics received");
        Ok(Response::new(pb::Ack {}))
    }

    async fn submit_update(&self, request: Request<Streaming<pb::UpdateChunk>>) -> Result<Response<pb::Task>, Status> {
        let caller = Caller::of(&request).cloned();
        let mut stream = request.into_inner();
        let header = match stream.next().await {
            Some(Ok(pb::UpdateChunk {
                kind: Some(update_chunk::Kind::Header(h)),
            })) => h,
            Some(Err(status)) => return Err(status),
            _ => return Err(RpcError::InvalidArgument("an update stream must start with its header".into()).into()),
        };
        let site = self.identify(caller.as_ref(), &header.site_id).await?;
        if header.masked {
            return self.submit_masked(site, header, stream).await;
        }
        let update = UpdateHeader {
            site: site.clone(),
            job_id: JobId(header.job_id),
            round: header.round,
            n_samples: header.n_samples,
            base_model_hash: header.base_model_hash.clone(),
            train_loss: header.train_loss,
        };
        // Refuse early, before reading a possibly large body.
        let n_params = self
            .open_round_params(&update)
            .inspect_err(|e| warn!(%site, "update refused: {e}"))?;
        if header.n_params as usize != n_params {
            let e = RpcError::InvalidArgument(format!("update has {} values, expected {n_params}", header.n_params));
            warn!(%site, "update refused: {e}");
            return Err(e.into());
        }
        let expected_bytes = n_params * 4;
        let mut bytes = Vec::with_capacity(expected_bytes);
        while let Some(chunk) = stream.next().await {
            match chunk?.kind {
                Some(update_chunk::Kind::Data(data)) => {
                    if bytes.len() + data.len() > expected_bytes {
                        let e =
                            RpcError::InvalidArgument(format!("update is longer than the declared {n_params} values"));
                        warn!(%site, "update refused: {e}");
                        return Err(e.into());
                    }
                    bytes.extend_from_slice(&data);
                }
                _ => return Err(RpcError::InvalidArgument("a second header in one update stream".into()).into()),
            }
        }
        if bytes.len() != expected_bytes {
            let e = RpcError::InvalidArgument(format!("update has {} values, expected {n_params}", bytes.len() / 4));
            warn!(%site, "update refused: {e}");
            return Err(e.into());
        }
        self.shared.telemetry.update_received(bytes.len());
        let delta = decode_params(&bytes).map_err(|e| {
            warn!(%site, "update refused: {e}");
            RpcError::InvalidArgument(format!("update rejected: {e}"))
        })?;
        let now = self.shared.now_ms();
        {
            let mut inner = self.shared.lock();
            let Some(collector) = inner.active.as_mut().and_then(|a| match &mut a.phase {
                Phase::Round(r) => r.collector.as_mut(),
                _ => None,
            }) else {
                return Err(
                    RpcError::FailedPrecondition("the round closed while the update was uploading".into()).into(),
                );
            };
            collector.handle_update(now, &update, &delta).map_err(|e| {
                warn!(%site, round = update.round, "update refused: {e}");
                RpcError::from(e)
            })?;
        }
        self.shared.progress.notify_one();
        info!(%site, round = update.round, n_samples = update.n_samples, "update accepted");
        Ok(self.answer(&site, header.wait_for_task).await)
    }

    async fn submit_sec_agg(&self, request: Request<pb::SecAggMessage>) -> Result<Response<pb::Task>, Status> {
        let caller = Caller::of(&request).cloned();
        let message = request.into_inner();
        let site = self.identify(caller.as_ref(), &message.site_id).await?;
        let Some(kind) = message.kind.as_ref() else {
            return Err(RpcError::InvalidArgument("empty secure-aggregation message".into()).into());
        };
        {
            let mut inner = self.shared.lock();
            let session = Self::session(&mut inner, message.job_id, message.round)?;
            session.handle_message(&site, kind).inspect_err(|e| {
                warn!(%site, job = message.job_id, round = message.round, "secure-aggregation message refused: {e}")
            })?;
        }
        self.shared.progress.notify_one();
        Ok(self.answer(&site, message.wait_for_task).await)
    }

    async fn decide_job(&self, request: Request<pb::JobDecision>) -> Result<Response<pb::Ack>, Status> {
        let caller = Caller::of(&request).cloned();
        let d = request.into_inner();
        let site = self.identify(caller.as_ref(), &d.site_id).await?;
        let row = self
            .shared
            .store
            .job(JobId(d.job_id))
            .await
            .map_err(RpcError::from)?
            .ok_or_else(|| RpcError::NotFound(format!("no job {}", d.job_id)))?;
        if row.job_hash != d.job_hash {
            return Err(RpcError::InvalidArgument(format!(
                "job {} has hash {}, not {}",
                row.id, row.job_hash, d.job_hash
            ))
            .into());
        }
        if d.reason.len() > MAX_REASON_BYTES {
            return Err(RpcError::InvalidArgument(format!(
                "a decision's reason is limited to {MAX_REASON_BYTES} bytes"
            ))
            .into());
        }
        if !matches!(row.status.as_str(), "queued" | "running") {
            return Err(RpcError::FailedPrecondition(format!("job {} is already {}", row.id, row.status)).into());
        }
        let key = self
            .shared
            .roster
            .get(&site)
            .ok_or_else(|| RpcError::PermissionDenied(format!("`{site}` has no key in the roster")))?;
        let job_hash: [u8; 32] = hex::decode(&d.job_hash)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| RpcError::InvalidArgument("job_hash is not 32 hex bytes".into()))?;
        let counts = d.counts.map(|c| DeclaredCounts {
            n_train: c.n_train,
            n_test: c.n_test,
        });
        if d.accepted && counts.is_none() {
            return Err(RpcError::InvalidArgument(
                "an acceptance must declare the site's row counts (weights and pooled test counts are computed from them)"
                    .into(),
            )
            .into());
        }
        if !verify_decision(key, d.job_id, &job_hash, d.accepted, counts.as_ref(), &d.signature) {
            warn!(%site, job = d.job_id, "job decision with a bad signature refused");
            return Err(RpcError::InvalidArgument("the decision's signature is not valid for this site".into()).into());
        }
        if let Some(proposal) = &d.proposal {
            let signed = wire::proposal_from_pb(proposal).map_err(|e| RpcError::InvalidArgument(e.to_string()))?;
            let job = discovery::JobRef {
                job_id: d.job_id,
                job_sha256: &job_hash,
            };
            if !d.accepted || signed.site != site || !discovery::verify(key, job, &signed) {
                return Err(RpcError::InvalidArgument(
                    "a category proposal must come with an acceptance, signed by the accepting site for this job"
                        .into(),
                )
                .into());
            }
            self.shared
                .store
                .put_proposal(JobId(d.job_id), &site, &prost::Message::encode_to_vec(proposal))
                .await
                .map_err(RpcError::from)?;
        }
        let decision = JobAccepted {
            job_id: d.job_id,
            site: site.to_string(),
            job_sha256: d.job_hash,
            accepted: d.accepted,
            reason: d.reason,
            signature: hex::encode(&d.signature),
            counts,
        };
        let recorded = self
            .shared
            .ledger
            .record_decision(decision, unix_ms() as u64)
            .await
            .map_err(|e| match e.downcast::<crate::ledger::CohortSealedError>() {
                Ok(sealed) => RpcError::FailedPrecondition(sealed.to_string()),
                Err(e) => RpcError::from(e),
            })?;
        if recorded {
            info!(%site, job = d.job_id, accepted = d.accepted, "site decision recorded in the ledger");
        }
        if let Some(active) = self.shared.lock().active.as_mut().filter(|a| a.job_id.0 == d.job_id) {
            active.held.remove(&site);
        }
        Ok(Response::new(pb::Ack {}))
    }

    async fn hold_job(&self, request: Request<pb::JobHold>) -> Result<Response<pb::Ack>, Status> {
        let caller = Caller::of(&request).cloned();
        let h = request.into_inner();
        let site = self.identify(caller.as_ref(), &h.site_id).await?;
        if h.reason.len() > MAX_REASON_BYTES {
            return Err(
                RpcError::InvalidArgument(format!("a hold's reason is limited to {MAX_REASON_BYTES} bytes")).into(),
            );
        }
        let mut inner = self.shared.lock();
        let Some(active) = inner.active.as_mut().filter(|a| a.job_id.0 == h.job_id) else {
            return Err(RpcError::FailedPrecondition(format!("job {} is not running", h.job_id)).into());
        };
        if active.job_hash != h.job_hash {
            return Err(RpcError::InvalidArgument(format!(
                "job {} has hash {}, not {}",
                h.job_id, active.job_hash, h.job_hash
            ))
            .into());
        }
        // A site that already decided is not holding the job any more.
        if self.shared.ledger.decisions(h.job_id).contains_key(&site) {
            return Err(
                RpcError::FailedPrecondition(format!("`{site}` has already decided on job {}", h.job_id)).into(),
            );
        }
        if active.held.insert(site.clone(), h.reason).is_none() {
            info!(%site, job = h.job_id, "site holds the job for its data team's approval");
        }
        self.shared.progress.notify_one();
        Ok(Response::new(pb::Ack {}))
    }

    async fn report_problem(&self, request: Request<pb::TaskProblem>) -> Result<Response<pb::Ack>, Status> {
        let caller = Caller::of(&request).cloned();
        let p = request.into_inner();
        let site = self.identify(caller.as_ref(), &p.site_id).await?;
        if p.reason.len() > MAX_REASON_BYTES || p.reason.chars().any(char::is_control) {
            return Err(RpcError::InvalidArgument(format!(
                "a problem's reason is at most {MAX_REASON_BYTES} bytes of text"
            ))
            .into());
        }
        // Only a site taking part can stop taking part.
        if !self.shared.ledger.has_accepted(p.job_id, &site) {
            return Err(RpcError::FailedPrecondition(format!("`{site}` has not accepted job {}", p.job_id)).into());
        }
        let first = {
            let mut inner = self.shared.lock();
            let Some(active) = inner.active.as_mut().filter(|a| a.job_id.0 == p.job_id) else {
                return Err(RpcError::FailedPrecondition(format!("job {} is not running", p.job_id)).into());
            };
            active.failed.insert(site.clone())
        };
        if first {
            warn!(%site, job = p.job_id, reason = %p.reason, "site stopped taking part in the job");
            self.shared
                .store
                .record_problem(
                    JobId(p.job_id),
                    &site,
                    &format!("stopped taking part: {}", p.reason),
                    unix_ms(),
                )
                .await
                .map_err(RpcError::from)?;
        }
        self.shared.progress.notify_one();
        self.shared.wake.notify_waiters();
        Ok(Response::new(pb::Ack {}))
    }

    async fn report_metrics(&self, request: Request<pb::MetricsReport>) -> Result<Response<pb::Ack>, Status> {
        let caller = Caller::of(&request).cloned();
        let report = request.into_inner();
        let site = self.identify(caller.as_ref(), &report.site_id).await?;
        if report.withheld {
            // The site keeps its own figures; its evaluation is in the secure sum.
            if self.check_metrics_expected(JobId(report.job_id), &site, &report)? {
                self.mark_metrics_received(&site, report.round);
            }
            return Ok(Response::new(pb::Ack {}));
        }
        if !(0.0..=1.0).contains(&report.accuracy) || !report.loss.is_finite() || report.loss < 0.0 {
            return Err(RpcError::InvalidArgument("accuracy must be in [0, 1] and loss finite and >= 0".into()).into());
        }
        if !report.auc.is_nan() && !(0.0..=1.0).contains(&report.auc) {
            return Err(RpcError::InvalidArgument("auc must be in [0, 1] or NaN".into()).into());
        }
        let binary = report
            .binary
            .as_ref()
            .map(wire::binary_from_pb)
            .transpose()
            .map_err(|e| RpcError::InvalidArgument(e.to_string()))?;
        let job_id = JobId(report.job_id);
        // Check, store, then mark as received: the driver may close the phase
        // only once the metrics are durable.
        if !self.check_metrics_expected(job_id, &site, &report)? {
            return Ok(Response::new(pb::Ack {}));
        }
        self.shared
            .store
            .insert_metrics(
                job_id,
                &MetricsRow {
                    round: i64::from(report.round),
                    site_id: site.to_string(),
                    model_hash: report.model_hash.clone(),
                    n_test: report.n_test as i64,
                    loss: report.loss,
                    accuracy: report.accuracy,
                    auc: (!report.auc.is_nan()).then_some(report.auc),
                    binary: binary.as_ref().map(binary_json),
                },
            )
            .await
            .map_err(RpcError::from)?;
        self.mark_metrics_received(&site, report.round);
        Ok(Response::new(pb::Ack {}))
    }
}

impl FederationService {
    /// Marks `site`'s metrics for `round` as in, and wakes the driver.
    fn mark_metrics_received(&self, site: &SiteId, round: u32) {
        if let Some(Phase::Round(open)) = self.shared.lock().active.as_mut().map(|a| &mut a.phase)
            && open.announcement.round == round
        {
            open.awaiting_metrics.remove(site);
        }
        self.shared.progress.notify_one();
    }

    /// The secure session of `job_id`'s round `round`, if it is the open one.
    fn session(
        inner: &mut crate::state::Inner,
        job_id: u64,
        round: u32,
    ) -> Result<&mut crate::secure::SecureSession, RpcError> {
        let active_job = inner.active.as_ref().map(|a| a.job_id);
        if active_job != Some(JobId(job_id)) {
            return Err(RpcError::FailedPrecondition(format!("job {job_id} is not running")));
        }
        match inner.session_mut() {
            Some(session) if session.ctx.round == round => Ok(session),
            Some(session) => Err(RpcError::FailedPrecondition(format!(
                "message is for round {round}, the open secure round is {}",
                session.ctx.round
            ))),
            None => Err(RpcError::FailedPrecondition(format!(
                "job {job_id} has no open secure-aggregation round"
            ))),
        }
    }

    /// A masked input (secure aggregation), streamed like an update.
    async fn submit_masked(
        &self,
        site: SiteId,
        header: pb::UpdateHeader,
        mut stream: Streaming<pb::UpdateChunk>,
    ) -> Result<Response<pb::Task>, Status> {
        let vector_len = {
            let mut inner = self.shared.lock();
            let session = Self::session(&mut inner, header.job_id, header.round)?;
            if !session.awaits_masked_from(&site) {
                return Err(RpcError::FailedPrecondition(format!("no masked input expected from `{site}` now")).into());
            }
            session.vector_len
        };
        if header.n_params as usize != vector_len {
            return Err(RpcError::InvalidArgument(format!(
                "masked input has {} words, expected {vector_len}",
                header.n_params
            ))
            .into());
        }
        let expected_bytes = vector_len * 4;
        let mut bytes = Vec::with_capacity(expected_bytes);
        while let Some(chunk) = stream.next().await {
            match chunk?.kind {
                Some(update_chunk::Kind::Data(data)) if bytes.len() + data.len() <= expected_bytes => {
                    bytes.extend_from_slice(&data)
                }
                Some(update_chunk::Kind::Data(_)) => {
                    return Err(
                        RpcError::InvalidArgument(format!("masked input is longer than {vector_len} words")).into(),
                    );
                }
                _ => return Err(RpcError::InvalidArgument("a second header in one update stream".into()).into()),
            }
        }
        self.shared.telemetry.update_received(bytes.len());
        let words =
            tessera_protocol::wire::decode_words(&bytes).map_err(|e| RpcError::InvalidArgument(e.to_string()))?;
        {
            let mut inner = self.shared.lock();
            let session = Self::session(&mut inner, header.job_id, header.round)?;
            session
                .handle_masked(&site, &words)
                .inspect_err(|e| warn!(%site, "masked input refused: {e}"))?;
        }
        self.shared.progress.notify_one();
        info!(%site, round = header.round, "masked input accepted");
        Ok(self.answer(&site, header.wait_for_task).await)
    }

    /// Checks that metrics answer the open round's announcement; true when
    /// this site still owes them, false when they are in already (a report
    /// made again because its answer was lost, to a coordinator that
    /// crashed or over a broken connection: acknowledged, nothing stored
    /// twice).
    fn check_metrics_expected(
        &self,
        job_id: JobId,
        site: &SiteId,
        report: &pb::MetricsReport,
    ) -> Result<bool, RpcError> {
        let inner = self.shared.lock();
        let Some(active) = inner.active.as_ref().filter(|a| a.job_id == job_id) else {
            return Err(RpcError::FailedPrecondition(format!("job {job_id} is not running")));
        };
        let Phase::Round(round) = &active.phase else {
            return Err(RpcError::FailedPrecondition("no round is open".into()));
        };
        if round.announcement.round != report.round || round.announcement.model_hash != report.model_hash {
            return Err(RpcError::FailedPrecondition(format!(
                "metrics are for round {} but round {} is open",
                report.round, round.announcement.round
            )));
        }
        Ok(round.awaiting_metrics.contains(site))
    }

    /// Checks that an update targets the open round, without changing it, and
    /// returns the round's vector length.
    fn open_round_params(&self, update: &UpdateHeader) -> Result<usize, RpcError> {
        let inner = self.shared.lock();
        let Some(active) = inner.active.as_ref().filter(|a| a.job_id == update.job_id) else {
            return Err(RpcError::FailedPrecondition(format!(
                "job {} is not running",
                update.job_id
            )));
        };
        let Phase::Round(round) = &active.phase else {
            return Err(RpcError::FailedPrecondition(format!(
                "job {} has no open round",
                update.job_id
            )));
        };
        let Some(collector) = round.collector.as_ref() else {
            return Err(RpcError::FailedPrecondition(format!(
                "round {} of job {} is finished; no updates accepted",
                update.round, update.job_id
            )));
        };
        let params = collector.params();
        if update.round != params.round {
            return Err(RpcError::FailedPrecondition(format!(
                "update is for round {}, the open round is {}",
                update.round, params.round
            )));
        }
        if !collector.members().contains_key(&update.site) {
            return Err(RpcError::PermissionDenied(format!(
                "site `{}` is not a member of this round",
                update.site
            )));
        }
        Ok(params.n_params)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn models_stream_in_chunks_under_the_message_limit() {
        // 2.5 chunks: any model size travels within gRPC's default 4 MiB limit.
        let bytes: Vec<u8> = (0..CHUNK_BYTES * 5 / 2).map(|i| (i % 251) as u8).collect();
        let chunks: Vec<pb::ModelChunk> = chunk_stream(bytes.clone(), "h".into(), "{}".into())
            .map(|c| c.unwrap())
            .collect()
            .await;
        assert_eq!(chunks.len(), 3);
        assert!(
            chunks
                .iter()
                .all(|c| c.data.len() <= CHUNK_BYTES && c.total_len == bytes.len() as u64)
        );
        assert_eq!(chunks[0].manifest_json, "{}");
        assert!(chunks[1..].iter().all(|c| c.manifest_json.is_empty()));
        let mut joined = Vec::new();
        for c in &chunks {
            assert_eq!(c.offset, joined.len() as u64);
            joined.extend_from_slice(&c.data);
        }
        assert_eq!(joined, bytes);
    }
}
