//! The participant daemon: connects outbound to the coordinator, reconnects
//! with backoff, and works on the tasks it is given: preprocessing statistics,
//! local evaluation, local training.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use tessera_models::stream::{Standardized, feature_stats};
use tessera_models::train::{LocalTraining, evaluate, train_local};
use tessera_protocol::CHUNK_BYTES;
use tessera_protocol::discovery;
use tessera_protocol::evaluation::{self, SiteSums};
use tessera_protocol::ids::{SiteId, sha256_hex, sha256_le_words};
use tessera_protocol::job::{Aggregation, JobSpec, PosWeight, RoundKind, SecureAggSpec};
use tessera_protocol::ledger::payload::{DeclaredCounts, Summation};
use tessera_protocol::ledger::pin::Consortium;
use tessera_protocol::ledger::sign_decision;
use tessera_protocol::model::{Layout, check_initial_model, decode_params};
use tessera_protocol::pb::federation_client::FederationClient;
use tessera_protocol::pb::ledger_client::LedgerClient;
use tessera_protocol::pb::{self, sec_agg_step, task, update_chunk};
use tessera_protocol::replay::{ModelReplay, ReplayError};
use tessera_protocol::roster::Roster;
use tessera_protocol::secagg::client::{self, ClientConfig};
use tessera_protocol::secagg::crypto::SigningKey;
use tessera_protocol::secagg::quantize::NonFiniteUpdate;
use tessera_protocol::secagg::{RoundContext, commitment, exact};
use tessera_protocol::stats::{ClassCounts, FeatureStats, Normalization};
use tessera_protocol::wire;
use tokio_stream::StreamExt;
use tonic::transport::{Channel, Endpoint};
use tracing::{debug, error, info, warn};

use crate::answers::{Answer, Answers, PlainUpdates};
use crate::categories;
use crate::config::{Policy, SiteConfig};
use crate::contributions::Contributions;
use crate::egress::EgressLog;
use crate::live::Live;
use crate::local::LocalData;
use crate::policy::{self, Approvals, Decision};
use crate::replica::{HALT_FILE, Refusal, Replica};

/// Heartbeat period unless the coordinator asks for another (within
/// `HEARTBEAT_BOUNDS`): soon while the site is at work in a job, seldom
/// while it is idle or sits a job out.
const HEARTBEAT: Duration = Duration::from_secs(2);
const HEARTBEAT_BOUNDS: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(30));
/// How often an idle site brings its replica up to date by itself. The
/// coordinator wakes it sooner when blocks need its endorsement to become
/// final (`Idle.sync_ledger`), and it syncs before any work anyway.
const IDLE_SYNC: Duration = Duration::from_secs(30);
/// Reconnect delays: from 250 ms, doubling up to 5 s, each stretched by a
/// random factor in [1, 2). The randomness keeps a fleet of sites that lost
/// the coordinator from reconnecting in step when it comes back.
fn reconnect_delays() -> impl Iterator<Item = Duration> {
    use backon::BackoffBuilder;
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(250))
        .with_max_delay(Duration::from_secs(5))
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
}
/// How long a site waits for the blocks a task relies on to become final
/// before declining it: long enough for idle members, which the
/// coordinator wakes to endorse (within its long poll, 5 s), to do so.
const FINALITY_WAIT: Duration = Duration::from_secs(20);

/// Runs until the process is stopped.
pub async fn run(config: SiteConfig) -> anyhow::Result<()> {
    let _lock = lock_state_dir(&config.state_dir)?;
    let live = Live::start(&config.state_dir, &config.coordinator);
    // A site whose data cannot be used still connects: it declines every
    // job with a reason the ML lead can act on, instead of being a site
    // that is simply absent. The full error stays in this log.
    let data = match LocalData::load(&config) {
        Ok(data) => {
            info!(
                site = %config.site_id,
                train = data.train.len(),
                test = data.test.len(),
                streamed = data.streamed,
                "local data loaded"
            );
            Ok(data)
        }
        Err(e) => {
            let public = crate::local::public_reason(&e);
            error!(
                site = %config.site_id,
                "local data not usable: {e:#}; this site declines every job and tells the coordinator only: \
                 {public} (run `tessera-participant check` for the details)"
            );
            Err(public)
        }
    };
    let egress = Arc::new(EgressLog::open(&config.state_dir)?);
    info!(path = %egress.path().display(), "egress log");
    let signing_key = Arc::new(crate::identity::load_or_create(&config.state_dir)?);
    let roster = match &config.roster_path {
        Some(path) => {
            let text =
                std::fs::read_to_string(path).with_context(|| format!("cannot read roster {}", path.display()))?;
            tessera_protocol::roster::parse(&text).with_context(|| format!("invalid roster {}", path.display()))?
        }
        None => {
            warn!("no roster configured: this site cannot take part in secure aggregation");
            Roster::new()
        }
    };
    if let Some(listed) = roster.get(&config.site_id)
        && *listed != signing_key.public_key()
    {
        anyhow::bail!(
            "the roster lists a different key for `{}` than {}/site.key",
            config.site_id,
            config.state_dir.display()
        );
    }
    tessera_protocol::cli::check_coordinator_address(&config.coordinator, config.tls_dir.is_some())
        .map_err(anyhow::Error::msg)?;
    let mut endpoint = Endpoint::from_shared(config.coordinator.clone())
        .with_context(|| format!("bad coordinator address `{}`", config.coordinator))?
        .connect_timeout(Duration::from_secs(5));
    match &config.tls_dir {
        Some(dir) => {
            let tls = tessera_protocol::keyfile::client_tls(dir).context("the site's TLS kit")?;
            endpoint = endpoint.tls_config(tls).context("TLS configuration")?;
        }
        None => warn!("no TLS kit configured: this only works with a coordinator run with --insecure-dev"),
    }
    let pin = consortium_pin(config.tls_dir.as_deref())?;
    let roster = Arc::new(roster);
    let replica = Replica::open(
        &config.state_dir,
        config.site_id.clone(),
        signing_key.clone(),
        pin,
        roster.clone(),
    )
    .await?;
    let halted = Arc::new(AtomicBool::new(replica.halted().is_some()));
    let mut site = Site {
        replica,
        halted: halted.clone(),
        id: config.site_id.clone(),
        data,
        job_data: None,
        egress,
        done: HashSet::new(),
        device: tessera_models::default_device(),
        signing_key,
        roster,
        policy: config.policy.clone(),
        jobs: HashMap::new(),
        decided: HashSet::new(),
        held: HashMap::new(),
        given_up: HashSet::new(),
        retries: Retries::default(),
        // Per process, not per connection: a reconnect keeps what the
        // daemon holds of a round; a restart does not.
        session: format!("{:016x}", rand::random::<u64>()),
        state_dir: config.state_dir.clone(),
        inputs: HashMap::new(),
        training: HashMap::new(),
        sessions: HashMap::new(),
        answers: Answers::default(),
        plain_updates: PlainUpdates::default(),
        stats_sent: None,
        metrics_sent: HashMap::new(),
        metric_inputs: HashMap::new(),
        replays: HashMap::new(),
        normalizations: HashMap::new(),
        contributions: Contributions::open(&config.state_dir)?,
        pace: Arc::default(),
        synced_at: None,
        live: live.clone(),
    };
    let mut delays = reconnect_delays();
    loop {
        match endpoint.connect().await {
            Ok(channel) => {
                info!(coordinator = %config.coordinator, "connected");
                live.connected(true);
                delays = reconnect_delays();
                let heartbeat = tokio::spawn(heartbeat_loop(
                    FederationClient::new(channel.clone()),
                    site.id.clone(),
                    site.egress.clone(),
                    halted.clone(),
                    site.session.clone(),
                    site.pace.clone(),
                ));
                let result = site
                    .serve(FederationClient::new(channel.clone()), LedgerClient::new(channel))
                    .await;
                heartbeat.abort();
                live.connected(false);
                if let Err(e) = result {
                    warn!("connection lost: {e:#}");
                    live.failed(format!("connection lost: {e:#}"));
                }
            }
            Err(e) => {
                warn!(coordinator = %config.coordinator, "cannot connect: {e}; retrying");
                live.failed(format!("cannot connect to {}: {e}", config.coordinator));
            }
        }
        tokio::time::sleep(delays.next().unwrap_or(Duration::from_secs(10))).await;
    }
}

/// The heartbeat's pace, shared with the task loop: a site the coordinator
/// let heartbeat seldom (idle) sends one at once when work arrives, so the
/// coordinator hears from it at the working pace from the first task.
#[derive(Default)]
struct HeartbeatPace {
    slow: AtomicBool,
    now: tokio::sync::Notify,
    /// Tasks worked on so far: a heartbeat answered "seldom" while work
    /// arrived is paced at the working pace instead.
    work: std::sync::atomic::AtomicU64,
    /// Whether the coordinator paces this site (`next_heartbeat_ms`, and
    /// `Idle.sync_ledger` with it); an older one does not, and wakes an
    /// idle site only for the site to sync.
    paced: AtomicBool,
}

impl HeartbeatPace {
    /// Work arrived: a slow heartbeat is sent now (and paced again by the
    /// coordinator's answer).
    fn at_work(&self) {
        self.work.fetch_add(1, Ordering::Relaxed);
        if self.slow.swap(false, Ordering::Relaxed) {
            self.now.notify_one();
        }
    }
}

/// Heartbeats until the connection ends; a halted site stops them, so the
/// coordinator stops counting on it.
async fn heartbeat_loop(
    mut client: FederationClient<Channel>,
    site: SiteId,
    egress: Arc<EgressLog>,
    halted: Arc<AtomicBool>,
    session: String,
    pace: Arc<HeartbeatPace>,
) {
    loop {
        if halted.load(Ordering::Relaxed) {
            return;
        }
        let request = pb::HeartbeatRequest {
            site_id: site.to_string(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            session: session.clone(),
            ledger_kinds: tessera_protocol::ledger::Kind::ALL.len() as u32,
        };
        if egress.record("Heartbeat", &request).is_err() {
            return;
        }
        let work = pace.work.load(Ordering::Relaxed);
        let mut next = match client.heartbeat(request).await {
            Ok(response) => {
                let ms = response.into_inner().next_heartbeat_ms;
                pace.paced.store(ms > 0, Ordering::Relaxed);
                match ms {
                    0 => HEARTBEAT,
                    ms => Duration::from_millis(ms.into()).clamp(HEARTBEAT_BOUNDS.0, HEARTBEAT_BOUNDS.1),
                }
            }
            Err(status) => {
                warn!("heartbeat failed: {}", status.message());
                HEARTBEAT
            }
        };
        if pace.work.load(Ordering::Relaxed) != work {
            next = next.min(HEARTBEAT);
        }
        pace.slow.store(next > HEARTBEAT, Ordering::Relaxed);
        tokio::select! {
            () = tokio::time::sleep(next) => {}
            () = pace.now.notified() => {}
        }
    }
}

/// What one site does with its tasks.
struct Site {
    id: SiteId,
    /// The verified ledger replica every task is checked against.
    replica: Replica,
    /// Set once the replica disagrees with the coordinator: no more work.
    halted: Arc<AtomicBool>,
    /// The site's data, or why it cannot be used (what may be said about
    /// it outside the site: `local::public_reason`).
    data: Result<LocalData, String>,
    /// The job whose schema discovers categories, with the site's data
    /// encoded with them (one job at a time: the coordinator runs one).
    job_data: Option<(u64, LocalData)>,
    egress: Arc<EgressLog>,
    /// (job, round, what) already done, so a repeated announcement after a
    /// reconnect is not worked twice.
    done: HashSet<(u64, u32, Work)>,
    device: tessera_models::Device,
    signing_key: Arc<SigningKey>,
    roster: Arc<Roster>,
    policy: Policy,
    /// Jobs this site has seen, by id (from their announced files).
    jobs: HashMap<u64, JobSpec>,
    /// Jobs whose decision this site has sent.
    decided: HashSet<u64>,
    /// Jobs held for the data team's approval, with their hashes: a
    /// rejection is signed as soon as the data team makes it, even when the
    /// job no longer sends this site tasks (its cohort sealed without it).
    held: HashMap<u64, String>,
    state_dir: std::path::PathBuf,
    /// Secure jobs: this site's quantised input per (job, round), ready for
    /// the summation (round 0 = preprocessing statistics).
    inputs: HashMap<(u64, u32), Vec<u32>>,
    /// Secure rounds: the input being trained in the background, with its
    /// length; the summation's key and share exchanges run meanwhile and
    /// the masked-input step waits for it.
    training: HashMap<(u64, u32), (usize, Training)>,
    /// Secure summations in progress.
    sessions: HashMap<(u64, u32), ClientState>,
    /// The last step this site answered in each of `sessions`, with its
    /// answer: a coordinator restored after a crash asks for its current
    /// stage's step again, and gets the same bytes, never a new answer
    /// (`answers`).
    answers: Answers,
    /// Plaintext jobs: the last update submitted, sent again (the same
    /// bytes) when a restarted coordinator starts its round over.
    plain_updates: PlainUpdates,
    /// The metrics reports sent for the rounds still open, sent again (the
    /// same bytes) when a restarted coordinator announces the round again.
    metrics_sent: HashMap<(u64, u32), pb::MetricsReport>,
    /// The last statistics report sent, sent again (the same bytes) when a
    /// restarted coordinator starts the job's preprocessing over.
    stats_sent: Option<pb::StatsReport>,
    /// Secure jobs: this site's evaluation of a round's model, waiting to be
    /// appended to its update.
    metric_inputs: HashMap<(u64, u32), SiteSums>,
    /// Per secure job, the model history this site derived itself.
    replays: HashMap<u64, ModelReplay>,
    /// Per secure job, the normalisation this site derived itself.
    normalizations: HashMap<u64, (Normalization, ClassCounts)>,
    /// The rounds this site has sent a masked input to, on disk: never two
    /// summations of one round's input (their difference would reveal it).
    contributions: Contributions,
    /// Jobs this site stopped taking part in (its data failed mid-job,
    /// training could not run), and told the coordinator so.
    given_up: HashSet<u64>,
    retries: Retries,
    /// Drawn when the daemon starts and sent with each poll and heartbeat,
    /// so the coordinator knows a restarted daemon (`PollTaskRequest`).
    session: String,
    pace: Arc<HeartbeatPace>,
    /// When the replica was last brought up to date (`IDLE_SYNC`).
    synced_at: Option<tokio::time::Instant>,
    /// What `tessera-participant status` shows of this daemon.
    live: Live,
}

/// What a task is part of, as `tessera-participant status` says it.
fn task_step(task: &pb::Task) -> String {
    let round = match task.kind.as_ref() {
        Some(task::Kind::Round(a)) => a.round,
        Some(task::Kind::Secagg(step)) => step.round,
        _ => 0,
    };
    match round {
        0 => "statistics".to_owned(),
        r => format!("round {r}"),
    }
}

/// Whether a daemon holds `dir`'s lock now, and its pid if so: a daemon
/// that was killed holds none (its status file says what it last did).
/// (Read-only: a user who may only read the state directory is told too.
/// The probe holds the lock for an instant: a daemon starting in that
/// instant refuses to start, saying another one runs.)
pub fn running_in(dir: &std::path::Path) -> Option<String> {
    let path = dir.join("daemon.lock");
    let file = std::fs::File::open(&path).ok()?;
    match file.try_lock() {
        Err(std::fs::TryLockError::WouldBlock) => {
            Some(std::fs::read_to_string(&path).unwrap_or_default().trim().to_owned())
        }
        _ => None,
    }
}

/// The job a task belongs to.
fn task_job(task: &pb::Task) -> Option<u64> {
    match task.kind.as_ref()? {
        task::Kind::ComputeStats(t) => Some(t.job_id),
        task::Kind::Round(a) => Some(a.job_id),
        task::Kind::Secagg(step) => Some(step.job_id),
        task::Kind::Idle(_) => None,
    }
}

/// The data error behind a failed task, if that is what failed it (a
/// training or evaluation pass wraps it, transparently: look inside).
fn data_error(error: &anyhow::Error) -> Option<&tessera_models::data::DataError> {
    use tessera_models::train::TrainError;
    error
        .chain()
        .find_map(|cause| match cause.downcast_ref::<TrainError>() {
            Some(TrainError::Data(data)) => Some(data),
            _ => cause.downcast_ref(),
        })
}

/// Why a failed task would fail the same way however often it were
/// retried, as the public reason the coordinator is told: this site's data
/// failed mid-job (no longer the data whose counts it declared and whose
/// statistics it summed), local training cannot run, or it diverged. A
/// training error says counts and shapes, never a value. `None` for a
/// failure worth retrying: a transport error, a block not final yet, a
/// refusal of the coordinator's message.
fn lasting_failure(error: &anyhow::Error) -> Option<String> {
    use tessera_models::train::TrainError;
    if let Some(data) = data_error(error) {
        return Some(format!("this site's data failed mid-job: {}", data.public_reason()));
    }
    error.chain().find_map(|cause| {
        if let Some(train) = cause.downcast_ref::<TrainError>() {
            return Some(format!("local training cannot run: {train}"));
        }
        if let Some(outside) = cause.downcast_ref::<OutsidePolicy>() {
            return Some(outside.to_string());
        }
        // A proposal from a site whose acceptance is not final here yet
        // may be soon; any other fault is the coordinator's, every time.
        if let Some(refused) = cause.downcast_ref::<discovery::DiscoveryError>() {
            return (!matches!(refused, discovery::DiscoveryError::NotAccepted(_)))
                .then(|| format!("refused the category proposals the coordinator relayed: {refused}"));
        }
        // Which coordinate went non-finite is a (small) signal about this
        // site's update: not said.
        cause.downcast_ref::<NonFiniteUpdate>()?;
        Some("local training diverged: the update is not finite".to_owned())
    })
}

/// Pauses between attempts at tasks that keep failing. The first few are
/// a second apart (the usual cause is a block that is not final yet, soon
/// fixed); then they double, up to five seconds (each stretched by up to a
/// quarter at random): a site whose task cannot
/// succeed neither spins (it once downloaded its model 3,028 times in a
/// minute) nor writes the same error every second, and a site whose
/// failure clears still answers well within a round's dropout deadline.
#[derive(Debug, Default)]
struct Retries {
    /// Failures since the last task that succeeded.
    failures: u32,
    last: Option<String>,
}

impl Retries {
    const QUICK: u32 = 5;
    const LONGEST: Duration = Duration::from_secs(5);

    /// The pause before the next attempt, and whether `message` differs
    /// from the last failure's (it is then worth an error in the log).
    fn failed(&mut self, message: &str) -> (Duration, bool) {
        self.failures = self.failures.saturating_add(1);
        let new = self.last.as_deref() != Some(message);
        if new {
            self.last = Some(message.to_owned());
        }
        let doublings = self.failures.saturating_sub(Self::QUICK).min(8);
        let pause = Duration::from_secs(1 << doublings).min(Self::LONGEST);
        // Stretched by up to a quarter, at random, so that sites failing
        // for one cause (a coordinator's outage) do not retry in step.
        (pause.mul_f64(1.0 + rand::random::<f64>() / 4.0), new)
    }

    fn succeeded(&mut self) {
        *self = Self::default();
    }
}

/// One daemon per state directory: two would share one ledger replica, one
/// egress log and one record of the rounds this site contributed to (and
/// so could send two inputs for one round). The lock is the operating
/// system's, so a crashed daemon leaves none behind; the file says which
/// process holds it.
fn lock_state_dir(dir: &std::path::Path) -> anyhow::Result<std::fs::File> {
    use std::io::Write;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create state directory {}", dir.display()))?;
    let path = dir.join("daemon.lock");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {
            file.set_len(0)?;
            writeln!(file, "{}", std::process::id())?;
            Ok(file)
        }
        Err(std::fs::TryLockError::WouldBlock) => {
            let pid = std::fs::read_to_string(&path).unwrap_or_default();
            bail!(
                "another tessera-participant (pid {}) is running with the state directory {}; \
                 stop it first, or give this one its own --state-dir",
                pid.trim(),
                dir.display()
            )
        }
        Err(std::fs::TryLockError::Error(e)) => Err(e).with_context(|| format!("cannot lock {}", path.display())),
    }
}

/// A job that waits for the data team's approval: not an error of the
/// site's, so it is logged once, when the job is first held.
#[derive(Debug, thiserror::Error)]
#[error("job {job_id} waits for the data team's approval ({exceeded})")]
struct Held {
    job_id: u64,
    exceeded: String,
}

/// A discovering job's statistics task came before the members' category
/// proposals (this site's own was just sent with its acceptance): asked
/// again shortly, not an error.
#[derive(Debug, thiserror::Error)]
#[error("job {0}: waiting for the members' category proposals")]
struct AwaitingProposals(u64);

/// A job that the site's policy refuses once its work shows more than its
/// file did (the model grown by discovered categories): the site stops
/// taking part and says why.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct OutsidePolicy(String);

/// A secure input being trained, clipped and quantised off the async threads.
type Training = tokio::task::JoinHandle<anyhow::Result<Vec<u32>>>;

/// Where this site stands in one secure summation.
enum ClientState {
    Keys(client::ExpectKeys),
    Shares(client::ExpectShares),
    Survivors(client::ExpectSurvivors),
    Signatures(client::ExpectSignatures),
    Done,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Work {
    Stats,
    Metrics,
    Update,
}

impl Site {
    /// Polls for tasks until the connection fails.
    async fn serve(
        &mut self,
        mut client: FederationClient<Channel>,
        mut ledger: LedgerClient<Channel>,
    ) -> anyhow::Result<()> {
        // A submission that waited for the site's next task hands it over
        // here, in place of a poll.
        let mut next: Option<pb::Task> = None;
        loop {
            if let Some(reason) = self.replica.halted() {
                self.halted.store(true, Ordering::Relaxed);
                error!(
                    "halted, not training (remove {} after investigating): {reason}",
                    HALT_FILE
                );
                tokio::time::sleep(Duration::from_secs(30)).await;
                continue;
            }
            let task = match next.take() {
                Some(task) => task,
                None => {
                    let request = pb::PollTaskRequest {
                        site_id: self.id.to_string(),
                        session: self.session.clone(),
                        ledger_len: self.replica.len(),
                    };
                    self.egress.record("PollTask", &request)?;
                    client.poll_task(request).await.context("poll failed")?.into_inner()
                }
            };
            // Before any work on a job, when idle, and before a secure
            // summation starts (its cohort is read from the replica): bring
            // the replica up to date (verifying and endorsing new blocks).
            let mid_summation = matches!(
                &task.kind,
                Some(task::Kind::Secagg(pb::SecAggStep {
                    kind: Some(k),
                    ..
                })) if !matches!(k, sec_agg_step::Kind::Advertise(_))
            );
            // A round syncs and waits for finality itself, after it has
            // advertised its keys (`round`).
            let round = matches!(&task.kind, Some(task::Kind::Round(_)));
            // An idle site syncs when the coordinator says blocks wait for
            // its endorsement, else every `IDLE_SYNC`: a job it sits out
            // costs it a few requests a minute.
            let due =
                !self.pace.paced.load(Ordering::Relaxed) || self.synced_at.is_none_or(|at| at.elapsed() >= IDLE_SYNC);
            let (idle, sync) = match &task.kind {
                None => (true, due),
                Some(task::Kind::Idle(idle)) => (true, idle.sync_ledger || due),
                Some(_) => (false, true),
            };
            if !idle {
                self.pace.at_work();
            }
            if !mid_summation && !round && sync {
                self.sync_to_finality(&mut ledger, idle).await?;
            }
            if self.replica.halted().is_some() {
                continue;
            }
            let job = task_job(&task);
            if let Some(job) = job {
                self.live.working_on(job, task_step(&task));
            }
            if job.is_some_and(|job| self.given_up.contains(&job)) {
                // The coordinator was told; it sends no more of this job.
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            let result = match task.kind {
                None | Some(task::Kind::Idle(_)) => self.send_held_decisions(&mut client).await.map(|()| None),
                Some(task::Kind::ComputeStats(t)) => self.compute_stats(&mut client, t).await.map(|()| None),
                Some(task::Kind::Round(a)) => self.round(&mut client, &mut ledger, a).await,
                Some(task::Kind::Secagg(step)) => self.secagg_step(&mut client, step).await,
            };
            match result {
                Ok(task) => {
                    // An idle turn between two failures of one task is no
                    // success of it.
                    if job.is_some() {
                        self.retries.succeeded();
                    }
                    next = task;
                }
                Err(e) => {
                    // A refused task is logged and the site carries on; transport
                    // errors end this connection and trigger a reconnect.
                    if e.downcast_ref::<tonic::Status>()
                        .is_some_and(|s| s.code() == tonic::Code::Unavailable)
                    {
                        return Err(e);
                    }
                    // A failure that would repeat however often the task
                    // is retried (this site's data failed mid-job, training
                    // cannot run or diverged): the site stops taking part
                    // rather than retry, and says why.
                    if let (Some(job), Some(reason)) = (job, lasting_failure(&e)) {
                        error!("task failed: {e:#}");
                        self.stop_taking_part(&mut client, job, reason).await?;
                        continue;
                    }
                    // A held job was said once, when it was first held, and
                    // is asked after every second until it is decided.
                    let pause = if e.downcast_ref::<Held>().is_some() {
                        Duration::from_secs(1)
                    } else if e.downcast_ref::<AwaitingProposals>().is_some() {
                        Duration::from_millis(200)
                    } else {
                        let message = format!("{e:#}");
                        let (pause, new) = self.retries.failed(&message);
                        if new {
                            error!("task failed: {message}");
                            self.live.failed(message);
                        } else {
                            debug!(attempts = self.retries.failures, "task failed again: {message}");
                        }
                        pause
                    };
                    tokio::time::sleep(pause).await;
                }
            }
        }
    }

    /// Stops taking part in `job` and tells the coordinator why (the public
    /// reason: the kind of problem and the schema's column, never a value),
    /// so that it drops this site at once instead of waiting out the round.
    async fn stop_taking_part(
        &mut self,
        client: &mut FederationClient<Channel>,
        job: u64,
        reason: String,
    ) -> anyhow::Result<()> {
        let problem = pb::TaskProblem {
            site_id: self.id.to_string(),
            job_id: job,
            reason: wire::brief_reason(&reason),
        };
        self.egress.record("ReportProblem", &problem)?;
        match client.report_problem(problem).await {
            Ok(_) => {
                error!(
                    job,
                    "stopped taking part in the job; the coordinator was told: {reason}"
                );
                self.given_up.insert(job);
                Ok(())
            }
            Err(status) if status.code() == tonic::Code::Unavailable => Err(status.into()),
            // The job ended meanwhile, or never was this site's: nothing to stop.
            Err(status) => {
                warn!(job, "could not report the problem: {}", status.message());
                self.given_up.insert(job);
                Ok(())
            }
        }
    }

    /// A check against the final ledger: a contradiction halts the site; a
    /// block that is not final yet only declines this task.
    fn acts_on(&mut self, check: Result<(), Refusal>) -> anyhow::Result<()> {
        match check {
            Ok(()) => Ok(()),
            Err(Refusal::Contradicts(reason)) => {
                self.replica.refuse(reason.clone());
                bail!("{reason}")
            }
            Err(Refusal::NotFinal(reason) | Refusal::Stale(reason)) => bail!("{reason}"),
        }
    }

    /// Brings the replica up to date and, before work, waits (bounded) for
    /// the other sites' endorsements to make the blocks it held when the
    /// task arrived final: this site acts only on final blocks. The wait is
    /// a long poll (the coordinator answers when its copy of those blocks
    /// is final), so the endorsements are read as they arrive, usually
    /// within milliseconds of this site's own.
    async fn sync_to_finality(&mut self, ledger: &mut LedgerClient<Channel>, idle: bool) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + FINALITY_WAIT;
        self.replica
            .sync(ledger, &self.egress, None)
            .await
            .context("ledger sync failed")?;
        // Only a sync that went through counts: after a failed one an idle
        // site tries again at its next turn, not 30 s later.
        self.synced_at = Some(tokio::time::Instant::now());
        // Waits for the blocks held when the task arrived, not for blocks
        // appended meanwhile (other sites' decisions keep arriving): the
        // task's own checks decline what it needs and is not final.
        let target = self.replica.len();
        // A pause between long polls that come back without finality here
        // (an older coordinator answers at once; an endorsement this site
        // does not count): no tight loop.
        let mut pause = Duration::from_millis(1);
        loop {
            if idle || self.replica.is_final_up_to(target) || self.replica.halted().is_some() {
                return Ok(());
            }
            let now = tokio::time::Instant::now();
            if now + pause > deadline {
                // The task's own checks decline what is not final.
                warn!("ledger blocks still lack a majority of endorsements; declining work that relies on them");
                return Ok(());
            }
            self.replica
                .sync(ledger, &self.egress, Some((target, deadline - now)))
                .await
                .context("ledger sync failed")?;
            if !self.replica.is_final_up_to(target) {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(250));
            }
        }
    }

    /// Checks a job file against its hash and the ledger, parses it and
    /// applies the site's policy. The site's decision is signed and sent
    /// once per job (the coordinator records it in the ledger) before the
    /// site touches its data for the job; a rejected job never does.
    async fn job(
        &mut self,
        client: &mut FederationClient<Channel>,
        job_id: u64,
        job_toml: &str,
        job_hash: &str,
    ) -> anyhow::Result<JobSpec> {
        if sha256_hex(job_toml.as_bytes()) != job_hash {
            bail!("job file does not match its announced hash {job_hash}");
        }
        self.acts_on(self.replica.check_job(job_id, job_hash))?;
        let spec = JobSpec::from_toml(job_toml).context("announced job is invalid")?;
        let approvals = Approvals::new(&self.state_dir);
        let review = self
            .data
            .as_ref()
            .map(|data| policy::review(&self.policy, &spec, spec.model.layout(data.n_features()).n_params()));
        let verdict = match review {
            Err(reason) => Err(format!(
                "job {job_id}: this site's data is not usable: {reason}; not taking part"
            )),
            Ok(review) => match self.policy_verdict(job_id, job_hash, job_toml, &review, &approvals) {
                Ok(verdict) => verdict,
                Err(e) => {
                    // Said again only if asked again: the coordinator sends
                    // no task for a job it knows is held.
                    if let Some(held) = e.downcast_ref::<Held>() {
                        self.send_hold(client, job_id, job_hash, &held.exceeded).await;
                    }
                    return Err(e);
                }
            },
        };
        if !self.decided.contains(&job_id) {
            self.send_decision(client, job_id, job_hash, &verdict).await?;
        }
        if let Err(reason) = verdict {
            bail!("{reason}");
        }
        self.jobs.insert(job_id, spec.clone());
        Ok(spec)
    }

    /// The policy's verdict on a job the site could take part in: within
    /// the policy, or the data team's decision on it (a job waiting for
    /// one is held, and nothing is sent).
    fn policy_verdict(
        &mut self,
        job_id: u64,
        job_hash: &str,
        job_toml: &str,
        review: &policy::Review,
        approvals: &Approvals,
    ) -> anyhow::Result<Result<String, String>> {
        Ok(if !review.refusals.is_empty() {
            Err(format!("job {job_id} {}; not taking part", review.refusals.join("; ")))
        } else if review.exceeded.is_empty() {
            Ok("within this site's policy".to_owned())
        } else {
            match approvals.decision(job_hash) {
                Some(Decision::Approved) => Ok("outside the policy, approved by the site's data team".to_owned()),
                Some(Decision::Rejected) => Err(format!("job {job_id} was rejected by the site's data team")),
                None => {
                    // Nothing is decided, nothing is sent, no data is read:
                    // the job waits for the data team.
                    approvals.hold(job_hash, job_toml, review)?;
                    let exceeded = review.exceeded.join("; ");
                    if self.held.insert(job_id, job_hash.to_owned()).is_none() {
                        warn!(
                            job = job_id,
                            "job is outside this site's policy ({exceeded}); waiting for the data team: \
                             tessera-participant inspect {} --config <this site's config> --state-dir {}, \
                             then approve or reject",
                            &job_hash[..job_hash.len().min(12)],
                            self.state_dir.display()
                        );
                    }
                    return Err(Held { job_id, exceeded }.into());
                }
            }
        })
    }

    /// Tells the coordinator that the job waits for the data team, so that
    /// it does not wait for this site, sends it no task for the job until
    /// it decides, and the ML lead sees why. Says only
    /// what the data team's `inspect` shows: what in the job exceeds the
    /// policy. Best effort: the job goes on without this site either way.
    async fn send_hold(&self, client: &mut FederationClient<Channel>, job_id: u64, job_hash: &str, exceeded: &str) {
        let hold = pb::JobHold {
            site_id: self.id.to_string(),
            job_id,
            job_hash: job_hash.to_owned(),
            reason: wire::brief_reason(&format!("outside the site's policy: {exceeded}")),
        };
        let sent = match self.egress.record("HoldJob", &hold) {
            Ok(()) => client.hold_job(hold).await.map(drop).map_err(anyhow::Error::from),
            Err(e) => Err(e),
        };
        if let Err(e) = sent {
            warn!(
                job = job_id,
                "could not tell the coordinator that the job is held: {e:#}"
            );
        }
    }

    /// Signs and sends this site's decision on a job (the coordinator records
    /// it in the ledger), once per job.
    async fn send_decision(
        &mut self,
        client: &mut FederationClient<Channel>,
        job_id: u64,
        job_hash: &str,
        verdict: &Result<String, String>,
    ) -> anyhow::Result<()> {
        let hash: [u8; 32] = hex::decode(job_hash)
            .ok()
            .and_then(|b| b.try_into().ok())
            .context("job hash is not 32 hex bytes")?;
        let accepted = verdict.is_ok();
        // An accepting site declares its row counts, public from then on:
        // weights and pooled test counts are computed from them, so no
        // job-constant count is ever summed (and differenced).
        let counts = accepted.then(|| self.counts()).transpose()?;
        // An accepting site proposes the categories it may name (the
        // schema's `discover` columns): signed apart from the decision.
        let job = discovery::JobRef {
            job_id,
            job_sha256: &hash,
        };
        let proposal = match (&self.data, accepted) {
            (Ok(data), true) => {
                categories::proposal(data, self.policy.discovery_min_rows, &self.signing_key, job, &self.id)
            }
            _ => None,
        };
        let decision = pb::JobDecision {
            site_id: self.id.to_string(),
            job_id,
            job_hash: job_hash.to_owned(),
            accepted,
            reason: match verdict {
                Ok(why) | Err(why) => wire::brief_reason(why),
            },
            signature: sign_decision(&self.signing_key, job_id, &hash, accepted, counts.as_ref()),
            counts: counts.map(|c| pb::DeclaredCounts {
                n_train: c.n_train,
                n_test: c.n_test,
            }),
            proposal: proposal.as_ref().map(wire::proposal_to_pb),
        };
        self.egress.record("DecideJob", &decision)?;
        client.decide_job(decision).await?;
        self.decided.insert(job_id);
        self.held.remove(&job_id);
        info!(job = job_id, accepted, "decision on the job signed and sent");
        Ok(())
    }

    /// Signs the data team's decisions on held jobs as soon as they are
    /// made, without waiting for a task: the coordinator sends a site that
    /// holds a job no task for it (so a held job costs one idle long poll
    /// at a time), and a rejection belongs in the ledger even when the
    /// job's cohort was sealed without this site. An approval that comes
    /// after the seal joins nothing: the coordinator refuses it, and the
    /// job is forgotten here.
    async fn send_held_decisions(&mut self, client: &mut FederationClient<Channel>) -> anyhow::Result<()> {
        let approvals = Approvals::new(&self.state_dir);
        let decided: Vec<(u64, String, Decision)> = self
            .held
            .iter()
            .filter(|(job_id, _)| !self.decided.contains(job_id))
            .filter_map(|(job_id, hash)| Some((*job_id, hash.clone(), approvals.decision(hash)?)))
            .collect();
        for (job_id, hash, decision) in decided {
            let verdict = match decision {
                Decision::Approved => Ok("outside the policy, approved by the site's data team".to_owned()),
                Decision::Rejected => Err(format!("job {job_id} was rejected by the site's data team")),
            };
            if let Err(e) = self.send_decision(client, job_id, &hash, &verdict).await {
                if e.downcast_ref::<tonic::Status>()
                    .is_some_and(|s| s.code() == tonic::Code::Unavailable)
                {
                    return Err(e);
                }
                warn!(job = job_id, "the data team's decision was not taken: {e:#}");
                self.held.remove(&job_id);
            }
        }
        Ok(())
    }

    /// The site's data, for work on a job it accepted (a site without
    /// usable data accepts none).
    fn data(&self) -> anyhow::Result<&LocalData> {
        self.data
            .as_ref()
            .map_err(|reason| anyhow::anyhow!("this site's data is not usable: {reason}"))
    }

    /// The data a job's work reads: the site's own, encoded with the job's
    /// categories where its schema discovers some ([`Self::form_categories`]).
    fn data_for(&self, job_id: u64) -> anyhow::Result<&LocalData> {
        let data = self.data()?;
        if data.schema.discovered().is_empty() {
            return Ok(data);
        }
        match &self.job_data {
            Some((id, data)) if *id == job_id => Ok(data),
            _ => bail!("the categories of job {job_id} are not formed at this site yet"),
        }
    }

    /// Forms a discovering job's categories from the cohort's signed
    /// proposals (`relayed`, with the statistics task), or takes those this
    /// site formed before a restart, and encodes the site's data with them
    /// (a pass over it). Nothing the coordinator says decides a category:
    /// a proposal that is not the cohort's own, signed, within the schema,
    /// and the site takes no part.
    async fn form_categories(
        &mut self,
        spec: &JobSpec,
        job_id: u64,
        job_hash: &str,
        relayed: Option<&[pb::CategoryProposal]>,
    ) -> anyhow::Result<()> {
        let data = self.data()?;
        let discovered = data.schema.discovered();
        if discovered.is_empty() || self.job_data.as_ref().is_some_and(|(id, _)| *id == job_id) {
            return Ok(());
        }
        let union = match categories::load(&self.state_dir, job_id, job_hash)? {
            Some(union) => union,
            None => {
                let relayed = relayed.with_context(|| {
                    format!("the categories of job {job_id} are not formed at this site yet (its statistics task forms them)")
                })?;
                if relayed.is_empty() {
                    return Err(AwaitingProposals(job_id).into());
                }
                let hash: [u8; 32] = hex::decode(job_hash)
                    .ok()
                    .and_then(|b| b.try_into().ok())
                    .context("job hash is not 32 hex bytes")?;
                let job = discovery::JobRef {
                    job_id,
                    job_sha256: &hash,
                };
                // The cohort is sealed after the encodings agree, so the
                // proposals are checked against the final acceptances.
                let accepted = self.replica.accepted(job_id);
                let own = categories::proposal(data, self.policy.discovery_min_rows, &self.signing_key, job, &self.id)
                    .expect("the schema discovers");
                let relayed = relayed
                    .iter()
                    .map(wire::proposal_from_pb)
                    .collect::<Result<Vec<_>, _>>()
                    .context("a relayed category proposal is malformed")?;
                let union = discovery::union(job, &self.roster, &accepted, &discovered, &own, &relayed)
                    .with_context(|| format!("job {job_id}: refusing the relayed category proposals"))?;
                categories::save(&self.state_dir, job_id, job_hash, &union)?;
                union
            }
        };
        let opener = data.with_categories(&union);
        let (n_train, n_test) = (data.train.len(), data.test.len());
        // One job's encoding in memory at a time.
        self.job_data = None;
        let resolved = tokio::task::spawn_blocking(opener)
            .await
            .context("encoding task panicked")?
            .with_context(|| format!("this site's data, encoded with the categories of job {job_id}"))?;
        // The rows must be those it declared (and proposed from).
        if (resolved.train.len(), resolved.test.len()) != (n_train, n_test) {
            bail!(
                "this site's data changed since the daemon started ({n_train} training and {n_test} test rows then, \
                 {} and {} now); restart it",
                resolved.train.len(),
                resolved.test.len()
            );
        }
        // The policy's model size, with the categories formed.
        let n_params = spec.model.layout(resolved.n_features()).n_params() as u64;
        if n_params > self.policy.max_params {
            return Err(OutsidePolicy(format!(
                "with the categories formed for job {job_id} its model has {n_params} parameters > policy.max_params {}",
                self.policy.max_params
            ))
            .into());
        }
        let sizes: Vec<String> = union.iter().map(|(c, v)| format!("{c}: {}", v.len())).collect();
        info!(
            job = job_id,
            "categories formed from the cohort's proposals ({})",
            sizes.join(", ")
        );
        self.job_data = Some((job_id, resolved));
        Ok(())
    }

    /// The size of the job's sealed cohort, which the secure summations and
    /// the quantiser are sized from; an error until the seal is final here.
    fn cohort_size(&self, job_id: u64) -> anyhow::Result<usize> {
        match self.replica.cohort(job_id) {
            Some(cohort) => Ok(cohort.len()),
            None => bail!("the cohort of job {job_id} is not sealed in a final block on this site's ledger yet"),
        }
    }

    /// This site's row counts, as it declares them when it accepts a job.
    fn counts(&self) -> anyhow::Result<DeclaredCounts> {
        let data = self.data()?;
        Ok(DeclaredCounts {
            n_train: data.train.len() as u64,
            n_test: data.test.len() as u64,
        })
    }

    /// Refuses to contribute to a job whose final acceptance by this site
    /// declared other counts than its data has now (the data changed, or
    /// the coordinator announced a job this site never accepted): weights
    /// and pooled counts would be wrong, and a sum would mix two datasets.
    fn check_declared(&self, job_id: u64) -> anyhow::Result<()> {
        let now = self.counts()?;
        match self.replica.declared(job_id, &self.id) {
            Some(declared) if declared == now => Ok(()),
            Some(d) => bail!(
                "this site declared {} training and {} test rows when it accepted job {job_id}, \
                 but its data now has {} and {}; not taking part (restore the data, or submit the job again)",
                d.n_train,
                d.n_test,
                now.n_train,
                now.n_test
            ),
            None => bail!("this site's acceptance of job {job_id} (with its row counts) is not final on its ledger"),
        }
    }

    async fn compute_stats(
        &mut self,
        client: &mut FederationClient<Channel>,
        task: pb::ComputeStats,
    ) -> anyhow::Result<()> {
        if self.done.contains(&(task.job_id, 0, Work::Stats)) {
            // Asked again: a restarted coordinator gathers the statistics
            // anew. The report it may have lost goes again, unchanged (a
            // secure job's carries only the encoding; its input is still
            // waiting for the summation).
            if let Some(report) = self.stats_sent.as_ref().filter(|r| r.job_id == task.job_id) {
                info!(
                    job = task.job_id,
                    "sending the same statistics report again (the coordinator restarted?)"
                );
                self.egress.record("SubmitStats", report)?;
                client.submit_stats(report.clone()).await?;
            }
            return Ok(());
        }
        let spec = self.job(client, task.job_id, &task.job_toml, &task.job_hash).await?;
        // Secure or not is the accepted job's choice, never the message's.
        spec.check_announced_secure(task.secure)?;
        self.form_categories(&spec, task.job_id, &task.job_hash, Some(&task.proposals))
            .await?;
        // Only now: a job held for the data team and approved later is
        // asked again, and must be computed then.
        self.done.insert((task.job_id, 0, Work::Stats));
        // A pass over the training split: off the async threads (a
        // streamed table is read from its file).
        let train = self.data_for(task.job_id)?.train.clone();
        let stats = tokio::task::spawn_blocking(move || feature_stats(train.as_ref()))
            .await
            .context("statistics task panicked")??;
        let n_features = stats.sum.len() as u64;
        let report = if spec.is_secure() {
            // Only the encoding goes in the clear; the statistics go into the
            // secure sum.
            info!(job = task.job_id, name = %spec.name, "preparing statistics for secure summation");
            let words =
                exact::encode(&stats.secure_values()).context("training-split statistics cannot be summed exactly")?;
            self.inputs.insert((task.job_id, 0), words);
            pb::StatsReport {
                site_id: self.id.to_string(),
                job_id: task.job_id,
                count: 0,
                sum: Vec::new(),
                sum_sq: Vec::new(),
                missing: Vec::new(),
                features_hash: self.data_for(task.job_id)?.schema.features_hash(),
                n_features,
                positives: 0,
            }
        } else {
            info!(job = task.job_id, name = %spec.name, "sending preprocessing statistics in the clear");
            pb::StatsReport {
                site_id: self.id.to_string(),
                job_id: task.job_id,
                count: stats.count,
                sum: stats.sum,
                sum_sq: stats.sum_sq,
                missing: stats.missing,
                features_hash: self.data_for(task.job_id)?.schema.features_hash(),
                n_features: 0,
                positives: stats.positives,
            }
        };
        self.egress.record("SubmitStats", &report)?;
        self.stats_sent = Some(report.clone());
        client.submit_stats(report).await?;
        Ok(())
    }

    async fn round(
        &mut self,
        client: &mut FederationClient<Channel>,
        ledger: &mut LedgerClient<Channel>,
        a: pb::RoundAnnouncement,
    ) -> anyhow::Result<Option<pb::Task>> {
        // Keys first, before the ledger sync, when this is a secure job the
        // site has already accepted (the final ledger holds it under the
        // announced hash) and its declared counts still hold.
        let accepted = self
            .jobs
            .get(&a.job_id)
            .filter(|spec| spec.is_secure() && a.secure)
            .filter(|spec| spec.round_kind(a.round, a.train).is_ok())
            .filter(|_| self.replica.check_job(a.job_id, &a.job_hash).is_ok())
            .filter(|_| self.check_declared(a.job_id).is_ok())
            .and_then(|spec| Some(spec.model.layout(self.data_for(a.job_id).ok()?.n_features())));
        if let Some(layout) = accepted {
            self.advertise_early(client, &a, &layout).await;
        }
        // The round's model comes from the previous round's block: only once
        // it is final.
        self.sync_to_finality(ledger, false).await?;
        if self.replica.halted().is_some() {
            return Ok(None);
        }
        let spec = self.job(client, a.job_id, &a.job_toml, &a.job_hash).await?;
        spec.check_announced_secure(a.secure)?;
        spec.round_kind(a.round, a.train)?;
        self.form_categories(&spec, a.job_id, &a.job_hash, None).await?;
        let layout = spec.model.layout(self.data_for(a.job_id)?.n_features());
        if spec.is_secure() {
            self.check_declared(a.job_id)?;
            self.advertise_early(client, &a, &layout).await;
        }
        self.acts_on(self.replica.check_model(a.job_id, a.round, &a.model_hash))?;
        if a.round == 1 && !spec.is_secure() {
            // The first model must be the job's own initial model: a
            // coordinator cannot choose what this site trains on. (A secure
            // job's models are all derived by the site, below.)
            check_initial_model(&layout, spec.seed, &a.model_hash)?;
        }
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
        if normalization.mean.len() != self.data_for(a.job_id)?.n_features()
            || normalization.std.iter().any(|s| !(s.is_finite() && *s > 0.0))
        {
            bail!("announced normalization does not fit this site's features");
        }
        let normalization = if spec.is_secure() {
            self.derived_normalization(client, a.job_id, normalization).await?
        } else {
            normalization
        };
        // Checked before this site evaluates or trains anything.
        self.pos_weight(&spec, &a)?;
        // Inputs and summations of earlier rounds of this job can no longer
        // be used.
        self.inputs
            .retain(|&(job, round), _| job != a.job_id || round >= a.round);
        self.training
            .retain(|&(job, round), _| job != a.job_id || round >= a.round);
        self.sessions
            .retain(|&(job, round), _| job != a.job_id || round >= a.round);
        self.answers.retain(|(job, round)| job != a.job_id || round >= a.round);
        self.metrics_sent
            .retain(|&(job, round), _| job != a.job_id || round >= a.round);
        // Announced again after this site reported: a restarted coordinator
        // awaits every site's report again. The same report goes again.
        if self.done.contains(&(a.job_id, a.round, Work::Metrics))
            && let Some(report) = self.metrics_sent.get(&(a.job_id, a.round)).cloned()
        {
            info!(
                "sending the same metrics report for round {} of job {} again (the coordinator restarted?)",
                a.round, a.job_id
            );
            self.egress.record("ReportMetrics", &report)?;
            client.report_metrics(report).await?;
        }
        // A restarted coordinator starts a plaintext round over and announces
        // it again: a site that already submitted its update for this round
        // of this model sends the same one again (the coordinator saw it in
        // the clear anyway), instead of leaving the round to time out. Any
        // other model gets nothing: this site trains once per round.
        if a.train
            && !spec.is_secure()
            && self.done.contains(&(a.job_id, a.round, Work::Update))
            && let Some((header, delta)) = self.plain_updates.repeat(a.job_id, a.round, &a.model_hash)
        {
            info!(
                "sending the same plaintext update for round {} of job {} again (the coordinator restarted?)",
                a.round, a.job_id
            );
            let (commitment, next) = self
                .send_update_stream(client, header.clone(), bytemuck::cast_slice(delta))
                .await?;
            self.replica.committed(a.job_id, a.round, commitment);
            return Ok(next);
        }
        let global = match &spec.aggregation {
            Aggregation::Secure(secure) => self.replayed_model(client, &spec, secure, &layout, &a).await?,
            Aggregation::InsecurePlaintext => self.fetch_model(client, &a.model_hash, a.n_params).await?,
        };
        let secure = spec.is_secure();
        // Done once the coordinator has it: a report lost with the
        // connection (to a coordinator that crashed) is made again when the
        // restarted coordinator announces the round again.
        if !self.done.contains(&(a.job_id, a.round, Work::Metrics)) {
            self.report_metrics(client, &a, &spec, &layout, &global, &normalization)
                .await?;
            self.done.insert((a.job_id, a.round, Work::Metrics));
        }
        if secure && !a.train && self.done.insert((a.job_id, a.round, Work::Update)) {
            // Final evaluation: the secure sum carries only the metrics.
            if let Some(input) = self.inputs.get(&(a.job_id, a.round)) {
                self.start_summation(client, &a, input.len()).await?;
            }
        }
        if a.train && self.done.insert((a.job_id, a.round, Work::Update)) {
            return self
                .train_and_submit(client, &a, &spec, &layout, &global, &normalization)
                .await;
        }
        Ok(None)
    }

    /// The weight of a positive row's loss in this job. A secure job's is
    /// this site's own, from the class counts of the statistics sum it
    /// derived (`derived_normalization`), and the announced one must be it:
    /// a coordinator cannot skew what the site's training optimises. A
    /// plaintext job's "balanced" weight is taken as announced (its
    /// statistics were sent in the clear to the coordinator that sums them).
    fn pos_weight(&self, spec: &JobSpec, a: &pb::RoundAnnouncement) -> anyhow::Result<f64> {
        let own = match (spec.is_secure(), spec.training.pos_weight) {
            (true, asked) => {
                let (_, classes) = self
                    .normalizations
                    .get(&a.job_id)
                    .context("the class counts of this secure job were not derived")?;
                classes.pos_weight(asked)?
            }
            (false, PosWeight::Fixed(w)) => w,
            (false, PosWeight::Balanced) => {
                if !(a.pos_weight.is_finite() && a.pos_weight > 0.0) {
                    bail!("announced class weight {} is not a positive number", a.pos_weight);
                }
                a.pos_weight
            }
        };
        if own != a.pos_weight {
            bail!(
                "round {} of job {} was announced with class weight {}, but this site derives {own} from the \
                 job file and its statistics; refusing",
                a.round,
                a.job_id,
                a.pos_weight
            );
        }
        Ok(own)
    }

    /// The normalisation of a secure job, derived by this site from the
    /// statistics sum its final `summation` block commits to (fetched and
    /// checked against `aggregate_sha256`); the block's
    /// `normalization_sha256` and the announced normalisation must both be
    /// that one. A coordinator cannot scale or shift this site's features.
    async fn derived_normalization(
        &mut self,
        client: &mut FederationClient<Channel>,
        job_id: u64,
        announced: Normalization,
    ) -> anyhow::Result<Normalization> {
        let derived = match self.normalizations.get(&job_id) {
            Some((n, _)) => n.clone(),
            None => {
                let block = self
                    .replica
                    .summation(job_id, Summation::STATISTICS)
                    .cloned()
                    .with_context(|| {
                        format!("the statistics summation of job {job_id} is not final on this site's ledger")
                    })?;
                let words = self.fetch_aggregate(client, job_id, 0).await?;
                if hex::encode(commitment(&words)) != block.aggregate_sha256 {
                    bail!(
                        "the statistics sum of job {job_id} served by the coordinator is not the one its \
                         ledger block commits to"
                    );
                }
                let stats = FeatureStats::from_secure_sum(&words, self.data_for(job_id)?.n_features())
                    .with_context(|| format!("the statistics sum of job {job_id}"))?;
                let derived =
                    Normalization::from_stats(&stats).with_context(|| format!("the statistics sum of job {job_id}"))?;
                if block.normalization_sha256.as_deref() != Some(hex::encode(derived.sha256()).as_str()) {
                    let reason = format!(
                        "job {job_id}: the ledger's statistics summation records a normalisation \
                         that its own committed sum does not give"
                    );
                    self.replica.refuse(reason.clone());
                    bail!("{reason}");
                }
                self.normalizations.insert(job_id, (derived.clone(), stats.classes()));
                derived
            }
        };
        if announced != derived {
            bail!("the announced normalisation of job {job_id} is not the one its committed statistics give");
        }
        Ok(derived)
    }

    /// The model an announced round of a secure job starts from, derived by
    /// this site: the job's initial model, then the strategy's step on each
    /// final round's committed aggregate (`tessera_protocol::replay`). It
    /// must be the announced model; a coordinator cannot make this site
    /// train on (or evaluate) a model of its choosing. A round block that
    /// contradicts its own aggregate halts the site, as any provable lie.
    async fn replayed_model(
        &mut self,
        client: &mut FederationClient<Channel>,
        spec: &JobSpec,
        secure: &SecureAggSpec,
        layout: &Layout,
        a: &pb::RoundAnnouncement,
    ) -> anyhow::Result<Vec<f32>> {
        let job_id = a.job_id;
        let mut replay = match self.replays.remove(&job_id) {
            Some(r) if r.next_round() <= a.round => r,
            _ => ModelReplay::new(spec, secure, layout, self.cohort_size(job_id)?),
        };
        while replay.next_round() < a.round {
            let round = replay.next_round();
            let block = self
                .replica
                .round_block(job_id, round)
                .cloned()
                .with_context(|| format!("round {round} of job {job_id} is not final on this site's ledger"))?;
            let words = self.fetch_aggregate(client, job_id, round).await?;
            if let Err(e) = replay.apply(&block, &words, |s| self.replica.declared(job_id, s)) {
                let reason = format!("job {job_id}: {e}");
                if matches!(
                    e,
                    ReplayError::ModelMismatch { .. }
                        | ReplayError::WeightMismatch { .. }
                        | ReplayError::Undeclared { .. }
                ) {
                    self.replica.refuse(reason.clone());
                }
                bail!("{reason}");
            }
        }
        if replay.model_hash() != a.model_hash {
            bail!(
                "round {} of job {job_id} was announced with model {}, but this site derives {}",
                a.round,
                a.model_hash,
                replay.model_hash()
            );
        }
        let model = replay.model().to_vec();
        if a.train {
            // The final evaluation is the job's last use of it.
            self.replays.insert(job_id, replay);
        }
        Ok(model)
    }

    async fn report_metrics(
        &mut self,
        client: &mut FederationClient<Channel>,
        a: &pb::RoundAnnouncement,
        spec: &JobSpec,
        layout: &Layout,
        global: &[f32],
        normalization: &Normalization,
    ) -> anyhow::Result<()> {
        let threshold = spec.evaluation.threshold;
        // A pass over the test split, off the async threads.
        let (test, device) = (self.data_for(a.job_id)?.test.clone(), self.device.clone());
        let (layout_owned, global_owned, normalization) = (layout.clone(), global.to_vec(), normalization.clone());
        let eval = tokio::task::spawn_blocking(move || {
            let test = Standardized {
                rows: test.as_ref(),
                normalization: &normalization,
            };
            evaluate(&layout_owned, &global_owned, &test, threshold, &device)
        })
        .await
        .context("evaluation task panicked")??;
        info!(
            job = a.job_id,
            round = a.round,
            accuracy = eval.accuracy,
            loss = eval.loss,
            auc = ?eval.binary.roc_auc,
            "evaluated global model"
        );
        if spec.is_secure() {
            // The evaluation joins this round's secure sum: after the update
            // in a training round, with the training loss; alone, with the
            // score histograms, in the final evaluation (the job file says
            // which, never the announcement alone: `round_kind`).
            let key = (a.job_id, a.round);
            match spec.round_kind(a.round, a.train)? {
                RoundKind::Training => {
                    self.metric_inputs.insert(key, eval.sums.clone());
                }
                RoundKind::FinalEvaluation => {
                    self.inputs.insert(key, eval.sums.encode_final());
                }
            }
        }
        let withheld = !self.policy.report_site_metrics;
        let report = pb::MetricsReport {
            site_id: self.id.to_string(),
            job_id: a.job_id,
            round: a.round,
            model_hash: a.model_hash.clone(),
            n_test: if withheld { 0 } else { eval.n as u64 },
            loss: if withheld { 0.0 } else { eval.loss },
            accuracy: if withheld { 0.0 } else { eval.accuracy },
            auc: if withheld { 0.0 } else { eval.auc() },
            withheld,
            binary: (!withheld).then(|| wire::binary_to_pb(&eval.binary)),
        };
        self.egress.record("ReportMetrics", &report)?;
        self.metrics_sent.insert((a.job_id, a.round), report.clone());
        client.report_metrics(report).await?;
        Ok(())
    }

    async fn train_and_submit(
        &mut self,
        client: &mut FederationClient<Channel>,
        a: &pb::RoundAnnouncement,
        spec: &JobSpec,
        layout: &Layout,
        global: &[f32],
        normalization: &Normalization,
    ) -> anyhow::Result<Option<pb::Task>> {
        let pos_weight = self.pos_weight(spec, a)?;
        let seed = spec.seed ^ (u64::from(a.round) << 32) ^ seed_of(&self.id);
        let (job_id, round, proximal_mu) = (a.job_id, a.round, a.proximal_mu);
        let (device, layout_owned, training, global_owned, train, normalization) = (
            self.device.clone(),
            layout.clone(),
            spec.training.clone(),
            global.to_vec(),
            self.data_for(a.job_id)?.train.clone(),
            normalization.clone(),
        );
        let local_delta = move || -> anyhow::Result<(Vec<f32>, usize, f64)> {
            let cfg = LocalTraining {
                layout: &layout_owned,
                spec: &training,
                proximal_mu,
                seed,
                pos_weight,
            };
            let train = Standardized {
                rows: train.as_ref(),
                normalization: &normalization,
            };
            let update = train_local(&cfg, &global_owned, &train, &device)?;
            let delta: Vec<f32> = update.params.iter().zip(&global_owned).map(|(w, g)| w - g).collect();
            info!(
                job = job_id,
                round,
                n = update.n_samples,
                train_loss = update.train_loss,
                "local training done"
            );
            Ok((delta, update.n_samples, update.train_loss))
        };
        if let Aggregation::Secure(secure) = &spec.aggregation {
            // Clip, weight and quantise, in the background: the key and
            // share exchanges of the summation go on meanwhile, and its
            // masked-input step waits for the input (`take_input`).
            // Sized from the cohort on this site's ledger, as the
            // coordinator sizes its decoder (both are checked to agree in
            // the signed key advertisement).
            let quantizer = secure.quantizer(self.cohort_size(job_id)?);
            // The weight of the count declared in the ledger (checked to be
            // this data's in `round`), never summed.
            let n_train = self.counts()?.n_train;
            let weight = secure.weight(n_train);
            let metrics = self
                .metric_inputs
                .remove(&(job_id, round))
                .context("this round's evaluation is missing; not sending an input without it")?;
            let vector_len = layout.n_params() + evaluation::ROUND_WORDS;
            // Training is CPU-bound: off the async threads, so heartbeats
            // and the summation's steps go on.
            let input = tokio::task::spawn_blocking(move || {
                let (delta, _, train_loss) = local_delta()?;
                let (mut input, factor) = quantizer.encode_update(&delta, weight, &mut rand::rng())?;
                if factor < 1.0 {
                    info!(job = job_id, round, factor, "update clipped to the job's clip_norm");
                }
                // The training loss weighted by the declared rows, as the
                // pooled loss is the survivors' weighted mean.
                input.extend(metrics.encode_round(train_loss * n_train as f64));
                Ok(input)
            });
            self.training.insert((job_id, round), (vector_len, input));
            self.start_summation(client, a, vector_len).await?;
            return Ok(None);
        }
        let (delta, n_samples, train_loss) = tokio::task::spawn_blocking(local_delta)
            .await
            .context("training task panicked")??;
        // As the secure path's quantiser refuses it: a diverged model is
        // not sent (the coordinator would refuse it, and the site retry).
        if let Some(index) = delta.iter().position(|v| !v.is_finite()) {
            return Err(NonFiniteUpdate::Coordinate { index }.into());
        }
        let header = pb::UpdateHeader {
            site_id: self.id.to_string(),
            job_id,
            round,
            n_samples: n_samples as u64,
            n_params: delta.len() as u64,
            base_model_hash: a.model_hash.clone(),
            train_loss,
            masked: false,
            wait_for_task: true,
        };
        // The commitment to a plaintext update is the hash of its f32 words'
        // bit patterns (`round::update_commitment`).
        let sent = self
            .send_update_stream(client, header.clone(), bytemuck::cast_slice(&delta))
            .await;
        // Kept whether or not it arrived: what may be sent again is this
        // update, the only one this site trains for the round.
        self.plain_updates.record(header, delta);
        let (commitment, next) = sent?;
        self.replica.committed(job_id, round, commitment);
        Ok(next)
    }

    /// This site's input to summation `key`: ready, or awaited from its
    /// background training.
    async fn take_input(&mut self, key: (u64, u32)) -> anyhow::Result<Vec<u32>> {
        if let Some(input) = self.inputs.remove(&key) {
            return Ok(input);
        }
        let (_, training) = self.training.remove(&key).context("input of this summation is gone")?;
        training.await.context("training task panicked")?
    }

    /// Streams an update (or masked input): the header, then 1 MiB chunks
    /// of its little-endian words. The header and the body are recorded in
    /// the egress log before anything is sent; the body's hash is returned,
    /// for it is the commitment this site expects the round block to record,
    /// with the next task when the header asked to wait for it.
    async fn send_update_stream(
        &self,
        client: &mut FederationClient<Channel>,
        header: pb::UpdateHeader,
        words: &[u32],
    ) -> anyhow::Result<([u8; 32], Option<pb::Task>)> {
        let wait = header.wait_for_task;
        let commitment = sha256_le_words(words);
        let mut messages = vec![pb::UpdateChunk {
            kind: Some(update_chunk::Kind::Header(header)),
        }];
        // One copy, straight from the words into each chunk's buffer.
        for chunk in words.chunks(CHUNK_BYTES / 4) {
            messages.push(pb::UpdateChunk {
                kind: Some(update_chunk::Kind::Data(wire::encode_words(chunk))),
            });
        }
        self.egress.record("SubmitUpdate", &messages[0])?;
        self.egress
            .record_body("SubmitUpdate", words.len() * 4, messages.len() - 1, &commitment)?;
        let next = client.submit_update(tokio_stream::iter(messages)).await?.into_inner();
        Ok((commitment, wait.then_some(next)))
    }

    /// Advertises this site's keys for a secure round as soon as the round
    /// is announced: keys depend on nothing but fresh randomness, the
    /// job and the final cohort, so the key and share exchanges overlap
    /// the finality wait and local training instead of following them. The
    /// input is masked only later, from the model this site derives once
    /// the previous round is final. Failing here costs nothing:
    /// `start_summation` advertises when the input is ready.
    async fn advertise_early(
        &mut self,
        client: &mut FederationClient<Channel>,
        a: &pb::RoundAnnouncement,
        layout: &Layout,
    ) {
        let key = (a.job_id, a.round);
        if self.sessions.contains_key(&key) || self.done.contains(&(a.job_id, a.round, Work::Update)) {
            return;
        }
        // `round` checked the announced kind against the job file.
        let vector_len = if a.train {
            layout.n_params() + evaluation::ROUND_WORDS
        } else {
            evaluation::FINAL_WORDS
        };
        let advertise = pb::Advertise {
            members: a.members.clone(),
            vector_len: vector_len as u64,
        };
        let (state, result) = self.advertise(client, key, &advertise, vector_len, false).await;
        match result {
            Ok(_) => {
                self.sessions.insert(key, state);
            }
            Err(e) => {
                // Its state is dropped: the keys cannot be followed up, so
                // they are not sent again either.
                self.answers.forget(key);
                warn!(job = a.job_id, round = a.round, "keys not advertised early: {e:#}")
            }
        }
    }

    /// Advertises keys for this round's secure summation over an input of
    /// `vector_len` words (kept in `inputs` or `training`), unless
    /// `advertise_early` did (the announcement names the members).
    async fn start_summation(
        &mut self,
        client: &mut FederationClient<Channel>,
        a: &pb::RoundAnnouncement,
        vector_len: usize,
    ) -> anyhow::Result<()> {
        let key = (a.job_id, a.round);
        if self.sessions.contains_key(&key) {
            return Ok(());
        }
        let advertise = pb::Advertise {
            members: a.members.clone(),
            vector_len: vector_len as u64,
        };
        let (state, result) = self.advertise(client, key, &advertise, vector_len, false).await;
        self.sessions.insert(key, state);
        result.map(|_| ())
    }

    /// One step of a secure summation. Its message waits for the site's
    /// next task, which is returned.
    async fn secagg_step(
        &mut self,
        client: &mut FederationClient<Channel>,
        step: pb::SecAggStep,
    ) -> anyhow::Result<Option<pb::Task>> {
        let key = (step.job_id, step.round);
        let Some(kind) = step.kind else { return Ok(None) };
        // A coordinator restored after a crash asks again for the step of
        // the stage it restored. The exact step this site last answered gets
        // the exact answer it sent, and the client state machine is not run
        // again: the same bytes reveal nothing new, where fresh shares or a
        // second unmask response could. Any other step goes on below.
        if let Some(answer) = self.answers.repeat(key, &kind) {
            info!(
                "answering a repeated step of round {} of job {} with the same answer (the coordinator restarted?)",
                key.1, key.0
            );
            return match answer {
                Answer::Message(message) => self.send_secagg(client, key, message.clone(), true).await,
                Answer::Masked(masked) => {
                    let (commitment, next) = self.send_masked(client, key, masked).await?;
                    // The same commitment as the first time (which may not
                    // have been recorded, if that send failed).
                    self.replica.committed(key.0, key.1, commitment);
                    Ok(next)
                }
            };
        }
        let state = self.sessions.remove(&key);
        // Each answer is recorded once handed to the transport, whether or
        // not it arrived: the state machine has moved on either way, so
        // that answer is the only one this site can give to this step, and
        // sending its bytes again reveals nothing (the simplest rule, and a
        // site whose send failed can still answer the step when asked again).
        let (next, result) = match (state, &kind) {
            (None, sec_agg_step::Kind::Advertise(advertise)) => match self
                .inputs
                .get(&key)
                .map(Vec::len)
                .or(self.training.get(&key).map(|(len, _)| *len))
            {
                // Records its answer itself.
                Some(len) => self.advertise(client, key, advertise, len, true).await,
                None => (
                    ClientState::Done,
                    Err(anyhow::anyhow!(
                        "no input prepared for round {} of job {}",
                        key.1,
                        key.0
                    )),
                ),
            },
            (Some(ClientState::Keys(s)), sec_agg_step::Kind::Keys(list)) => {
                let keys = list
                    .keys
                    .iter()
                    .map(wire::keys_from_pb)
                    .collect::<Result<Vec<_>, _>>()?;
                match s.handle_keys(&keys, &mut rand::rng()) {
                    Ok((s, shares)) => {
                        let message = pb::sec_agg_message::Kind::Shares(wire::shares_to_pb(&shares));
                        let sent = self.send_secagg(client, key, message.clone(), true).await;
                        self.answers.record(key, &kind, Answer::Message(message));
                        (ClientState::Shares(s), sent)
                    }
                    Err(e) => (ClientState::Done, Err(anyhow::anyhow!("refusing the key list: {e}"))),
                }
            }
            (Some(ClientState::Shares(s)), sec_agg_step::Kind::Shares(inbox)) => {
                let shares = wire::shares_from_pb(inbox)?;
                let input = self.take_input(key).await?;
                match s.handle_shares(&shares, &input) {
                    Ok(_) if !self.contributions.claim(key.0, key.1)? => (
                        ClientState::Done,
                        Err(anyhow::anyhow!(
                            "this site already sent its masked input for round {} of job {} (before a \
                             restart); a second summation of it could reveal it, so it sends none",
                            key.1,
                            key.0
                        )),
                    ),
                    Ok((s, masked)) => {
                        let sent = self.send_masked(client, key, &masked).await;
                        let sent = sent.map(|(commitment, next)| {
                            self.replica.committed(key.0, key.1, commitment);
                            next
                        });
                        self.answers.record(key, &kind, Answer::Masked(masked));
                        (ClientState::Survivors(s), sent)
                    }
                    Err(e) => (ClientState::Done, Err(anyhow::anyhow!("refusing the shares: {e}"))),
                }
            }
            (Some(ClientState::Survivors(s)), sec_agg_step::Kind::Survivors(list)) => {
                let survivors = wire::survivors_from_pb(list)?;
                match s.handle_survivors(&survivors) {
                    Ok((s, signature)) => {
                        let message =
                            pb::sec_agg_message::Kind::SurvivorsSignature(wire::survivor_signature_to_pb(&signature));
                        let sent = self.send_secagg(client, key, message.clone(), true).await;
                        self.answers.record(key, &kind, Answer::Message(message));
                        (ClientState::Signatures(s), sent)
                    }
                    Err(e) => (
                        ClientState::Done,
                        Err(anyhow::anyhow!(
                            "refusing to sign the survivor set of round {} of job {}: {e}",
                            key.1,
                            key.0
                        )),
                    ),
                }
            }
            (Some(ClientState::Signatures(s)), sec_agg_step::Kind::Signatures(list)) => {
                let signatures = wire::survivor_signatures_from_pb(list)?;
                match s.handle_signatures(&signatures) {
                    Ok(response) => {
                        let message = pb::sec_agg_message::Kind::Unmask(wire::unmask_response_to_pb(&response));
                        let sent = self.send_secagg(client, key, message.clone(), true).await;
                        self.answers.record(key, &kind, Answer::Message(message));
                        (ClientState::Done, sent)
                    }
                    Err(e) => (
                        ClientState::Done,
                        Err(anyhow::anyhow!(
                            "revealing nothing for round {} of job {}: {e}",
                            key.1,
                            key.0
                        )),
                    ),
                }
            }
            (state, _) => {
                // A step this site cannot take: already taken with other
                // content (a step it answered is repeated above, only if
                // identical), or its state was lost in a restart. Keep what
                // it has; the coordinator will count it as dropped if it
                // never answers.
                if let Some(state) = state {
                    self.sessions.insert(key, state);
                }
                // The coordinator repeats the step until the stage closes:
                // do not spin on it.
                tokio::time::sleep(Duration::from_millis(500)).await;
                return Ok(None);
            }
        };
        self.sessions.insert(key, next);
        result
    }

    /// Starts a secure summation over an input of `vector_len` words (the
    /// length this site computes for it, whatever the coordinator asks);
    /// with `wait_for_task`, returns the site's next task too.
    async fn advertise(
        &mut self,
        client: &mut FederationClient<Channel>,
        key: (u64, u32),
        advertise: &pb::Advertise,
        vector_len: usize,
        wait_for_task: bool,
    ) -> (ClientState, anyhow::Result<Option<pb::Task>>) {
        let Some(spec) = self.jobs.get(&key.0) else {
            return (
                ClientState::Done,
                Err(anyhow::anyhow!("secure summation for unknown job {}", key.0)),
            );
        };
        let Aggregation::Secure(secure) = spec.aggregation else {
            return (
                ClientState::Done,
                Err(anyhow::anyhow!("job {} is not a secure job", key.0)),
            );
        };
        if vector_len as u64 != advertise.vector_len || !advertise.members.contains(&self.id.to_string()) {
            return (
                ClientState::Done,
                Err(anyhow::anyhow!("secure summation does not match this site's input")),
            );
        }
        // Every privacy-relevant number comes from what this site accepted
        // and verified: the job spec, its own policy, its ledger's cohort;
        // the announced member list only says who is asked to start.
        let cohort = match self.replica.cohort(key.0) {
            Some(c) if c.contains(&self.id) => c.clone(),
            Some(_) => {
                return (
                    ClientState::Done,
                    Err(anyhow::anyhow!(
                        "this site is not in the sealed cohort of job {}; not taking part in its summations",
                        key.0
                    )),
                );
            }
            None => {
                return (
                    ClientState::Done,
                    Err(anyhow::anyhow!(
                        "the cohort of job {} is not sealed in a final block on this site's ledger yet; \
                         not starting a summation",
                        key.0
                    )),
                );
            }
        };
        // Where categories are discovered, how this site encodes the job's
        // rows: peers that encode otherwise (other categories relayed to
        // them) are refused by name.
        let encoding = match self.data_for(key.0).map(|data| {
            let discovers = !data.schema.discovered().is_empty();
            let hash = hex::decode(data.schema.features_hash()).ok();
            (discovers, hash.and_then(|bytes| <[u8; 32]>::try_from(bytes).ok()))
        }) {
            Ok((false, _)) => None,
            Ok((true, Some(encoding))) => Some(encoding),
            _ => {
                return (
                    ClientState::Done,
                    Err(anyhow::anyhow!(
                        "job {}: this site's encoding of its rows is not ready",
                        key.0
                    )),
                );
            }
        };
        let min_sites = (spec.min_sites as usize).max(self.policy.min_sites as usize);
        let params = secure.params(cohort.len(), min_sites, vector_len);
        let cfg = ClientConfig {
            site: self.id.clone(),
            ctx: RoundContext {
                job_id: key.0,
                round: key.1,
            },
            params,
            signing_key: self.signing_key.clone(),
            roster: self.roster.clone(),
            cohort: Arc::new(cohort),
            encoding,
        };
        let (state, keys) = client::ExpectKeys::new(cfg, &mut rand::rng());
        let kind = pb::sec_agg_message::Kind::Keys(wire::keys_to_pb(&keys));
        let result = self.send_secagg(client, key, kind.clone(), wait_for_task).await;
        // The answer to the coordinator's `Advertise` step for these
        // members and this length (the step `advertise_early` and
        // `start_summation` answer before it is asked).
        let step = sec_agg_step::Kind::Advertise(advertise.clone());
        self.answers.record(key, &step, Answer::Message(kind));
        (ClientState::Keys(state), result)
    }

    async fn send_secagg(
        &self,
        client: &mut FederationClient<Channel>,
        key: (u64, u32),
        kind: pb::sec_agg_message::Kind,
        wait_for_task: bool,
    ) -> anyhow::Result<Option<pb::Task>> {
        let message = pb::SecAggMessage {
            site_id: self.id.to_string(),
            job_id: key.0,
            round: key.1,
            kind: Some(kind),
            wait_for_task,
        };
        self.egress.record("SubmitSecAgg", &message)?;
        let next = client.submit_sec_agg(message).await?.into_inner();
        Ok(wait_for_task.then_some(next))
    }

    async fn send_masked(
        &self,
        client: &mut FederationClient<Channel>,
        key: (u64, u32),
        masked: &[u32],
    ) -> anyhow::Result<([u8; 32], Option<pb::Task>)> {
        let header = pb::UpdateHeader {
            site_id: self.id.to_string(),
            job_id: key.0,
            round: key.1,
            n_samples: 0,
            n_params: masked.len() as u64,
            base_model_hash: String::new(),
            train_loss: 0.0,
            masked: true,
            wait_for_task: true,
        };
        let sent = self.send_update_stream(client, header, masked).await?;
        info!(job = key.0, round = key.1, "masked input sent");
        Ok(sent)
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
        let stream = client.fetch_model(request).await?.into_inner();
        let bytes = download(stream, n_params * 4, "model").await?;
        if sha256_hex(&bytes) != model_hash {
            bail!("downloaded model does not match its hash {model_hash}");
        }
        Ok(decode_params(&bytes)?)
    }

    /// A secure round's released aggregate, as the coordinator serves it.
    /// Not checked here: each use checks it against the hash its final
    /// ledger block commits to (`ModelReplay::apply` for a round, and
    /// `derived_normalization` for the statistics), so that 4 MB of a large
    /// model's aggregate are hashed once, where the words are used.
    async fn fetch_aggregate(
        &self,
        client: &mut FederationClient<Channel>,
        job_id: u64,
        round: u32,
    ) -> anyhow::Result<Vec<u32>> {
        let request = pb::FetchAggregateRequest {
            site_id: self.id.to_string(),
            job_id,
            round,
        };
        self.egress.record("FetchAggregate", &request)?;
        let stream = client.fetch_aggregate(request).await?.into_inner();
        let what = format!("the aggregate of round {round} of job {job_id}");
        let max_len = MAX_AGGREGATE_WORDS * 4;
        let bytes = download(stream, max_len, &what).await?;
        wire::decode_words(&bytes).with_context(|| what.clone())
    }
}

/// Largest aggregate a site downloads: the biggest model a policy can
/// accept plus the evaluation words.
const MAX_AGGREGATE_WORDS: u64 = (1 << 30) / 4;

/// Collects a chunked download, refusing chunks out of order or a total
/// over `max_len` bytes (for a model, exactly its length).
async fn download(mut stream: tonic::Streaming<pb::ModelChunk>, max_len: u64, what: &str) -> anyhow::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    let mut total = None;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        let expected = *total.get_or_insert(chunk.total_len);
        if chunk.offset != bytes.len() as u64
            || chunk.total_len != expected
            || expected > max_len
            || bytes.len() + chunk.data.len() > expected as usize
        {
            bail!("{what} arrived malformed (chunk at offset {})", chunk.offset);
        }
        bytes.extend_from_slice(&chunk.data);
    }
    Ok(bytes)
}

/// The consortium this site's kit pins (`consortium.toml` beside its TLS
/// files): the replica accepts no genesis but that consortium's, signed by
/// that coordinator key.
fn consortium_pin(tls_dir: Option<&std::path::Path>) -> anyhow::Result<Option<Consortium>> {
    let Some(path) = tls_dir.map(|d| d.join("consortium.toml")) else {
        return Ok(None);
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let pin = Consortium::parse(&text).with_context(|| format!("invalid {}", path.display()))?;
            info!(consortium = %pin.name, coordinator_key = ?pin.coordinator_key, "ledger genesis pinned by the kit");
            Ok(Some(pin))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            warn!(
                "no {} in the kit: this site trusts the first genesis block the coordinator serves",
                path.display()
            );
            Ok(None)
        }
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// A per-site seed component, so sites shuffle differently.
fn seed_of(site: &SiteId) -> u64 {
    let digest = sha256_hex(site.as_str().as_bytes());
    u64::from_str_radix(&digest[..16], 16).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Delays double from 250 ms up to 5 s, each stretched by a random
    /// factor in [1, 2); and two sites do not wait alike.
    #[test]
    fn reconnect_delays_grow_bounded_and_differ_between_sites() {
        let a: Vec<Duration> = reconnect_delays().take(12).collect();
        let b: Vec<Duration> = reconnect_delays().take(12).collect();
        assert_eq!(a.len(), 12, "the delays never run out");
        for (k, d) in a.iter().enumerate() {
            let base = Duration::from_millis(250 << k.min(5)).min(Duration::from_secs(5));
            assert!(
                *d >= base && *d < base * 2,
                "delay {k}: {d:?} outside [{base:?}, {:?})",
                base * 2
            );
        }
        assert_ne!(a, b, "two sites would reconnect in step");
    }

    /// A data error is found behind the training or evaluation pass that
    /// met it, and behind context; another error is not one.
    #[test]
    fn a_data_error_is_found_however_it_is_wrapped() {
        use tessera_models::data::DataError;
        use tessera_models::train::TrainError;
        let data = || DataError::NoRows {
            file: "site.csv".into(),
            rows_read: 0,
        };
        let direct = anyhow::Error::from(data()).context("statistics");
        let wrapped = anyhow::Error::from(TrainError::Data(data())).context("evaluation of round 2");
        for e in [direct, wrapped] {
            assert!(matches!(data_error(&e), Some(DataError::NoRows { .. })), "{e:#}");
        }
        assert!(data_error(&anyhow::Error::from(TrainError::NoData)).is_none());
        assert!(data_error(&anyhow::anyhow!("this round's evaluation is missing")).is_none());
    }

    #[test]
    fn failures_that_would_repeat_are_told_and_the_others_retried() {
        use tessera_models::data::DataError;
        use tessera_models::train::TrainError;
        let lasting = |e: anyhow::Error| lasting_failure(&e.context("round 3 of job 1"));
        assert_eq!(
            lasting(TrainError::Width { expected: 13, got: 12 }.into()).as_deref(),
            Some("local training cannot run: data has 12 features, the model expects 13")
        );
        assert_eq!(
            lasting(NonFiniteUpdate::Coordinate { index: 4 }.into()).as_deref(),
            Some("local training diverged: the update is not finite")
        );
        let data = TrainError::Data(DataError::NoRows {
            file: "/secret/path/site.csv".into(),
            rows_read: 0,
        });
        let reason = lasting(data.into()).unwrap();
        assert!(reason.starts_with("this site's data failed mid-job: "), "{reason}");
        assert!(!reason.contains("secret"), "{reason}");
        // Worth retrying: not final yet, a refusal, a transport error, a held job.
        assert_eq!(
            lasting(anyhow::anyhow!("the cohort of job 1 is not sealed in a final block")),
            None
        );
        assert_eq!(lasting(tonic::Status::unavailable("connection reset").into()), None);
        let held = Held {
            job_id: 1,
            exceeded: "rounds".into(),
        };
        assert_eq!(lasting(held.into()), None);
    }

    #[test]
    fn a_task_that_keeps_failing_is_retried_ever_more_slowly_and_logged_once() {
        let mut retries = Retries::default();
        let pauses: Vec<(Duration, bool)> = (0..10).map(|_| retries.failed("not final")).collect();
        // Each pause is its base, stretched by less than a quarter.
        for ((pause, _), base) in pauses.iter().zip([1, 1, 1, 1, 1, 2, 4, 5, 5, 5]) {
            let base = Duration::from_secs(base);
            assert!(*pause >= base && *pause < base.mul_f64(1.25), "{pauses:?}");
        }
        assert!(
            pauses[..5].windows(2).any(|w| w[0].0 != w[1].0),
            "no jitter: {pauses:?}"
        );
        assert_eq!(pauses.iter().filter(|p| p.1).count(), 1, "{pauses:?}");
        // Another failure is logged, and keeps the pace; a success resets it.
        let (pause, new) = retries.failed("refused");
        assert!(new && pause >= Duration::from_secs(5), "{pause:?}");
        retries.succeeded();
        let (pause, new) = retries.failed("refused");
        assert!(new && pause < Duration::from_millis(1250), "{pause:?}");
    }
}
