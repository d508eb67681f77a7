//! State shared between the RPC handlers and the job driver.
//!
//! One `std::sync::Mutex` guards it; it is never held across an `.await`.
//! Every decision about an update is taken by
//! [`tessera_protocol::round::RoundCollector`]; this module only decides which
//! task a polling site gets.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::Instant;

use tessera_protocol::ids::{JobId, SiteId};
use tessera_protocol::job::JobSpec;
use tessera_protocol::pb;
use tessera_protocol::round::RoundCollector;
use tessera_protocol::stats::FeatureStats;
use tokio::sync::Notify;

use crate::malicious::Attack;
use crate::secure::SecureSession;
use crate::store::Store;

/// Everything the services and the driver share.
pub struct Shared {
    pub store: Store,
    /// The chain every job, round and decision is written to first.
    pub ledger: crate::ledger::Ledger,
    pub inner: Mutex<Inner>,
    /// Wakes long-polling sites when the phase changes (all waiters).
    pub wake: Notify,
    /// Wakes the driver when a site delivered something (one stored permit,
    /// so a delivery between two driver ticks is never missed).
    pub progress: Notify,
    /// Sites allowed to take part; `None` admits any well-formed site id.
    pub allowed_sites: Option<BTreeSet<SiteId>>,
    /// The consortium's Ed25519 keys: secure aggregation needs them to check
    /// signed key advertisements early. Empty: secure jobs cannot run.
    pub roster: BTreeMap<SiteId, [u8; 32]>,
    /// Running with `--insecure-dev` (no TLS): recorded in every job block.
    pub insecure_transport: bool,
    /// Which ended jobs' round models are pruned as each ends.
    pub auto_prune: crate::prune::AutoPrune,
    /// What `/metrics` shows.
    pub telemetry: crate::telemetry::Telemetry,
    started: Instant,
}

/// Mutable state behind [`Shared::inner`].
#[derive(Default)]
pub struct Inner {
    /// Monotonic milliseconds at which each site was last heard from.
    pub last_seen: HashMap<SiteId, u64>,
    /// When each site's `last_seen` was last written to the database.
    persisted_seen: HashMap<SiteId, u64>,
    /// The version each site last reported (its heartbeat carries it).
    versions: HashMap<SiteId, String>,
    /// The session id each site's daemon drew when it started (as the
    /// previous process stored it, until the site is heard from).
    sessions: HashMap<SiteId, String>,
    /// Sites whose daemon restarted since the previous coordinator process
    /// last heard from them (or since this one did): they lost their part
    /// of any summation that process left in flight.
    restarted_while_down: BTreeSet<SiteId>,
    /// How many ledger block kinds each site's software knows (heartbeat).
    ledger_kinds: HashMap<SiteId, u32>,
    pub active: Option<ActiveJob>,
}

/// How stale the database's record of when a site was last heard from may
/// get: liveness decisions use the in-memory `last_seen`; the stored one is
/// for operators, and writing it on every request put a database write on
/// every step of every round.
const PERSIST_SEEN_MS: u64 = 1_000;

/// The job currently being run (one at a time; others wait in the queue).
pub struct ActiveJob {
    pub job_id: JobId,
    pub spec: JobSpec,
    pub job_toml: String,
    pub job_hash: String,
    pub cancel_requested: bool,
    pub phase: Phase,
    /// Sites holding the job for their data team's approval, with what in
    /// the job is outside their policy: not waited for, shown to the ML lead.
    pub held: BTreeMap<SiteId, String>,
    /// Sites that said they can no longer take part (`ReportProblem`):
    /// dropped at once, given no more tasks of this job.
    pub failed: BTreeSet<SiteId>,
    /// Sites whose daemon restarted during the current phase's secure
    /// summation: it lost its keys and shares, so it is dropped from that
    /// summation at once and given no more of its steps. Cleared when the
    /// next phase is installed: the site takes part again from there.
    pub restarted: BTreeSet<SiteId>,
}

impl ActiveJob {
    /// The sites taking part in the current phase (those whose silence
    /// drops them, and who sync the ledger as they work); `None` while the
    /// job waits for its sites, when every member may be about to.
    pub fn at_work(&self) -> Option<BTreeSet<SiteId>> {
        let sites: BTreeSet<SiteId> = match &self.phase {
            Phase::WaitingForSites => return None,
            // A site holding the job is not waited for (`held`).
            Phase::Stats(stats) => stats
                .pending
                .iter()
                .chain(stats.reports.keys())
                .filter(|s| !self.held.contains_key(*s))
                .cloned()
                .collect(),
            Phase::Round(round) => round
                .announcement
                .members
                .iter()
                .filter_map(|s| SiteId::new(s).ok())
                .collect(),
        };
        Some(
            sites
                .into_iter()
                .filter(|s| !self.failed.contains(s) && !self.restarted.contains(s))
                .collect(),
        )
    }
}

/// What a request's session id said about the site's daemon.
#[derive(Debug, PartialEq, Eq)]
pub enum SessionNote {
    /// The first one this process has heard (and the previous one stored none).
    First,
    Same,
    /// Another than before: the daemon restarted. With the stage of the
    /// secure summation in flight it was dropped from, if any.
    Restarted(Option<&'static str>),
}

impl SessionNote {
    /// Whether the session id is new, and due to be stored.
    pub fn is_new(&self) -> bool {
        *self != SessionNote::Same
    }
}

impl ActiveJob {
    /// Drops a restarted `site` from the summation in flight if it held part
    /// of it; returns that summation's stage if so (for the log).
    fn drop_restarted(&mut self, site: &SiteId) -> Option<&'static str> {
        let stage = match &self.phase {
            // Its statistics input lived only in memory: lost.
            Phase::Stats(stats) => stats.session.as_ref(),
            // A site that has not advertised its keys yet holds nothing of
            // the round's summation: it is given the round again and can
            // still take part (dropping it could cost the round its quorum).
            Phase::Round(round) => round.session.as_ref().filter(|s| !s.awaits_keys_from(site)),
            Phase::WaitingForSites => None,
        }
        .filter(|s| !s.is_done() && s.is_member(site))?
        .stage();
        self.restarted.insert(site.clone()).then_some(stage)
    }
}

/// What the active job is waiting for.
pub enum Phase {
    WaitingForSites,
    Stats(Box<StatsPhase>),
    Round(Box<RoundPhase>),
}

/// Federated preprocessing: waiting for each member's statistics.
pub struct StatsPhase {
    pub pending: BTreeSet<SiteId>,
    pub reports: BTreeMap<SiteId, FeatureStats>,
    /// Each reporting site's features hash (its whole encoding): the sites
    /// that differ from the most common one are left out of the job.
    pub encodings: BTreeMap<SiteId, String>,
    /// Secure jobs: whether this job sums statistics securely; the report of
    /// each site then only carries its encoding (hash, width).
    pub secure: bool,
    /// Secure jobs: the secure sum, once every encoding is in.
    pub session: Option<SecureSession>,
    /// The members' signed category proposals (the schema's `discover`
    /// columns; none otherwise), read from the store, where each is kept
    /// as its site accepts, and fixed once `proposals_ready`.
    pub proposals: Vec<pb::CategoryProposal>,
    /// Whether the members have decided (see the driver's `preprocess`):
    /// only then are the proposals relayed with the task (before, it
    /// carries none, and a discovering site decides, proposes and asks
    /// again), each time the same list.
    pub proposals_ready: bool,
}

/// The cohort's category proposals as `site` is sent them: all of them,
/// unaltered, unless a test build attacks (the site must then refuse).
fn relayed_proposals(proposals: &[pb::CategoryProposal], site: &SiteId) -> Vec<pb::CategoryProposal> {
    let mut relayed = proposals.to_vec();
    if crate::malicious::attack() == Some(Attack::InjectCategory)
        && let Some(column) = relayed
            .iter_mut()
            .find(|p| p.site_id != site.as_str())
            .and_then(|p| p.columns.first_mut())
    {
        column.values.push("V62.84".into());
    }
    relayed
}

/// A training round (or the final evaluation when `collector` is `None`).
pub struct RoundPhase {
    pub announcement: pb::RoundAnnouncement,
    /// Plaintext training rounds.
    pub collector: Option<RoundCollector>,
    /// Secure training rounds.
    pub session: Option<SecureSession>,
    pub awaiting_metrics: BTreeSet<SiteId>,
}

impl Shared {
    pub fn new(
        store: Store,
        ledger: crate::ledger::Ledger,
        allowed_sites: Option<BTreeSet<SiteId>>,
        roster: BTreeMap<SiteId, [u8; 32]>,
    ) -> Self {
        Self {
            store,
            ledger,
            roster,
            inner: Mutex::new(Inner::default()),
            wake: Notify::new(),
            progress: Notify::new(),
            allowed_sites,
            insecure_transport: false,
            auto_prune: Default::default(),
            telemetry: Default::default(),
            started: Instant::now(),
        }
    }

    /// Monotonic milliseconds since the coordinator started.
    pub fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Locks the shared state. A poisoned lock means a handler panicked while
    /// holding it; the state may be half-updated, so stopping is the only safe
    /// answer.
    pub fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("coordinator state lock poisoned")
    }

    /// Records that `site` is alive.
    /// Records that `site` was heard from; true when the database's record
    /// of it is due to be refreshed.
    pub fn saw(&self, site: &SiteId) -> bool {
        let now = self.now_ms();
        let mut inner = self.lock();
        inner.last_seen.insert(site.clone(), now);
        match inner.persisted_seen.get(site) {
            Some(&at) if now.saturating_sub(at) < PERSIST_SEEN_MS => false,
            _ => {
                inner.persisted_seen.insert(site.clone(), now);
                true
            }
        }
    }

    /// Records the version `site` reported; true when it changed (and the
    /// database's record is due).
    pub fn note_version(&self, site: &SiteId, version: &str) -> bool {
        let mut inner = self.lock();
        if inner.versions.get(site).is_some_and(|v| v == version) {
            return false;
        }
        inner.versions.insert(site.clone(), version.to_owned());
        true
    }

    /// Forgets the version noted for `site` (it could not be stored), so
    /// that the next heartbeat stores it again.
    pub fn forget_version(&self, site: &SiteId) {
        self.lock().versions.remove(site);
    }

    /// Records how many ledger block kinds `site`'s software knows.
    pub fn note_ledger_kinds(&self, site: &SiteId, kinds: u32) {
        self.lock().ledger_kinds.insert(site.clone(), kinds);
    }

    /// Those of `members` that have not reported knowing `kinds` ledger
    /// block kinds since this process started (older software, or not
    /// heard from yet): a block of a newer kind would stop them.
    pub fn behind_on_ledger_kinds<'a>(&self, members: impl IntoIterator<Item = &'a SiteId>, kinds: u32) -> Vec<SiteId> {
        let inner = self.lock();
        members
            .into_iter()
            .filter(|site| inner.ledger_kinds.get(*site).is_none_or(|k| *k < kinds))
            .cloned()
            .collect()
    }

    /// The session ids the previous process stored for each site.
    pub fn remember_sessions(&self, sessions: impl IntoIterator<Item = (SiteId, String)>) {
        self.lock().sessions.extend(sessions);
    }

    /// Records the session id `site`'s daemon sent. When it differs from
    /// the last one, the daemon restarted: if it held part of the secure
    /// summation in flight (a member past advertising its keys, or any
    /// member of a statistics summation), it is dropped from it.
    pub fn note_session(&self, site: &SiteId, session: &str) -> SessionNote {
        let mut inner = self.lock();
        let before = inner.sessions.insert(site.clone(), session.to_owned());
        match before {
            None => return SessionNote::First,
            Some(b) if b == session => return SessionNote::Same,
            Some(_) => {}
        }
        // Whenever it happened (while this process was down, or before the
        // summation it resumes is installed), a summation resumed from a
        // previous process is lost to the site (`drop_restarted_while_down`).
        inner.restarted_while_down.insert(site.clone());
        let Some(active) = inner.active.as_mut() else {
            return SessionNote::Restarted(None);
        };
        SessionNote::Restarted(active.drop_restarted(site))
    }

    /// A summation resumed from a previous process: its members whose
    /// daemon restarted since that process last heard from them are
    /// dropped from it at once. Returns them.
    pub fn drop_restarted_while_down(&self) -> Vec<SiteId> {
        let mut inner = self.lock();
        let sites: Vec<SiteId> = inner.restarted_while_down.iter().cloned().collect();
        let Some(active) = inner.active.as_mut() else {
            return Vec::new();
        };
        sites
            .into_iter()
            .filter(|site| active.drop_restarted(site).is_some())
            .collect()
    }

    /// Whether `site` takes part in the running job's current phase (or
    /// may be about to: the job waits for its sites).
    pub fn at_work(&self, site: &SiteId) -> bool {
        let inner = self.lock();
        let Some(active) = inner.active.as_ref() else {
            return false;
        };
        active.at_work().is_none_or(|sites| sites.contains(site))
    }

    /// Whether the sites at work in the running job are enough to make new
    /// ledger blocks final by themselves (a majority of the members): the
    /// other members' endorsements are then not waited for, and idle
    /// members need not be woken for each block (`PollTask`).
    pub fn at_work_make_blocks_final(&self) -> bool {
        let members = self.ledger.members();
        let inner = self.lock();
        let Some(at_work) = inner.active.as_ref().and_then(ActiveJob::at_work) else {
            return false;
        };
        let endorsers = members.iter().filter(|m| at_work.contains(*m)).count();
        endorsers >= tessera_protocol::ledger::verify::majority(members.len())
    }

    /// Whether the running job may judge `site` by its silence: while the
    /// job gathers its sites and their statistics, every site; in its
    /// rounds, the sites of its sealed cohort (one dropped from a round is
    /// picked again for the next only if it was heard from lately). They
    /// heartbeat at the working pace; other sites seldom.
    pub fn watched(&self, site: &SiteId) -> bool {
        let in_rounds_of = {
            let inner = self.lock();
            match inner.active.as_ref() {
                None => return false,
                Some(active) if matches!(active.phase, Phase::Round(_)) => Some(active.job_id),
                Some(_) => None,
            }
        };
        in_rounds_of.is_none_or(|job_id| self.ledger.cohort(job_id.0).contains(site))
    }

    /// Sites heard from within the last `window_ms`.
    pub fn online(&self, window_ms: u64) -> BTreeSet<SiteId> {
        let now = self.now_ms();
        self.lock()
            .last_seen
            .iter()
            .filter(|&(_, &t)| now.saturating_sub(t) < window_ms)
            .map(|(s, _)| s.clone())
            .collect()
    }
}

/// A site silent this long is named as such in `job status` (a site at
/// work heartbeats every 2 s).
const SILENT_MS: u64 = 5_000;

impl Inner {
    /// What the running job's current step waits for and from whom, for
    /// the ML lead: the secure stage, the statistics, the updates or the
    /// metrics, each silent site with how long it has been silent and when
    /// it will be dropped. `None` when nothing is awaited.
    pub fn waiting(&self, now_ms: u64) -> Option<String> {
        let active = self.active.as_ref()?;
        let (what, sites): (String, BTreeSet<SiteId>) = match &active.phase {
            Phase::WaitingForSites => return None,
            Phase::Stats(stats) => match stats.session.as_ref().filter(|s| !s.is_done()) {
                Some(session) => (
                    format!("secure sum of the statistics ({})", session.stage()),
                    session.pending(),
                ),
                // A site holding the job is not waited for.
                None => (
                    "statistics".to_owned(),
                    stats
                        .pending
                        .iter()
                        .filter(|s| !active.held.contains_key(*s) && !stats.reports.contains_key(*s))
                        .cloned()
                        .collect(),
                ),
            },
            Phase::Round(round) => {
                let expected: BTreeSet<SiteId> = round
                    .collector
                    .iter()
                    .flat_map(|c| c.members().keys().filter(|s| c.is_expected(s)).cloned())
                    .collect();
                match round.session.as_ref().filter(|s| !s.is_done()) {
                    Some(session) => (session.stage().to_owned(), session.pending()),
                    None if !expected.is_empty() => ("updates".to_owned(), expected),
                    None => ("metrics".to_owned(), round.awaiting_metrics.clone()),
                }
            }
        };
        if sites.is_empty() {
            return None;
        }
        let dropout_s = active.spec.timing.dropout_after_s;
        let named: Vec<String> = sites
            .iter()
            .map(|site| {
                let silent_ms = now_ms.saturating_sub(self.last_seen.get(site).copied().unwrap_or(0));
                if silent_ms >= SILENT_MS {
                    format!("{site} (silent {} s; dropped at {dropout_s} s)", silent_ms / 1000)
                } else {
                    site.to_string()
                }
            })
            .collect();
        Some(format!("{what} from {}", named.join(", ")))
    }

    /// The task `site` should work on now, if any.
    pub fn task_for(&self, site: &SiteId) -> Option<pb::task::Kind> {
        let active = self
            .active
            .as_ref()
            .filter(|a| !a.failed.contains(site) && !a.restarted.contains(site))?;
        match &active.phase {
            Phase::WaitingForSites => None,
            Phase::Stats(stats) => {
                if let Some(step) = stats.session.as_ref().and_then(|s| s.task_for(site)) {
                    return Some(pb::task::Kind::Secagg(step));
                }
                // A site holding the job is asked again once it decides
                // (its data team's approval arrives with an idle poll).
                (stats.pending.contains(site) && !active.held.contains_key(site)).then(|| {
                    pb::task::Kind::ComputeStats(pb::ComputeStats {
                        job_id: active.job_id.0,
                        job_toml: active.job_toml.clone(),
                        job_hash: active.job_hash.clone(),
                        members: Vec::new(),
                        secure: stats.secure && crate::malicious::attack() != Some(Attack::PlaintextStats),
                        // Only to a site whose own proposal is among them
                        // (not to one that declined meanwhile).
                        proposals: if stats.proposals_ready
                            && stats.proposals.iter().any(|p| p.site_id == site.as_str())
                        {
                            relayed_proposals(&stats.proposals, site)
                        } else {
                            Vec::new()
                        },
                    })
                })
            }
            Phase::Round(round) => {
                let owes_metrics = round.awaiting_metrics.contains(site);
                let owes_update = round.collector.as_ref().is_some_and(|c| c.is_expected(site));
                // A secure round asks for metrics and training through the
                // announcement first, then for each protocol step.
                if owes_metrics || owes_update {
                    return Some(pb::task::Kind::Round(round.announcement.clone()));
                }
                let step = round.session.as_ref().and_then(|s| s.task_for(site))?;
                Some(pb::task::Kind::Secagg(step))
            }
        }
    }

    /// The secure session of the active job, if its current phase has one.
    pub fn session_mut(&mut self) -> Option<&mut SecureSession> {
        match &mut self.active.as_mut()?.phase {
            Phase::Stats(stats) => stats.session.as_mut(),
            Phase::Round(round) => round.session.as_mut(),
            Phase::WaitingForSites => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_protocol::round::RoundParams;

    fn site(name: &str) -> SiteId {
        SiteId::new(name).unwrap()
    }

    fn job(phase: Phase, held: &[&str]) -> Inner {
        let toml = "name = \"t\"\nrounds = 2\n[model]\nkind = \"logistic_regression\"\n[training]\n\
                    learning_rate = 0.1\nlocal_epochs = 1\n[timing]\ndropout_after_s = 30\n";
        let spec = JobSpec::from_toml(toml).unwrap();
        Inner {
            active: Some(ActiveJob {
                job_id: JobId(7),
                spec,
                job_toml: toml.to_owned(),
                job_hash: String::new(),
                cancel_requested: false,
                phase,
                held: held.iter().map(|s| (site(s), "2 rounds > 1".to_owned())).collect(),
                failed: BTreeSet::new(),
                restarted: BTreeSet::new(),
            }),
            ..Inner::default()
        }
    }

    /// `job status` names the step, whom it waits for and who is silent
    /// (and when that site will be dropped); a held site is not awaited.
    #[test]
    fn waiting_names_the_step_the_sites_and_the_silent_ones() {
        let now = 60_000;
        let params = RoundParams {
            job_id: JobId(7),
            round: 1,
            n_params: 4,
            base_model_hash: "h".into(),
            min_sites: 3,
            round_timeout_ms: 120_000,
            dropout_after_ms: 30_000,
        };
        let collector = RoundCollector::new(params, ["a", "b", "c"].map(site), 0);
        let round = RoundPhase {
            announcement: pb::RoundAnnouncement::default(),
            collector: Some(collector),
            session: None,
            awaiting_metrics: BTreeSet::from([site("c")]),
        };
        let mut inner = job(Phase::Round(Box::new(round)), &[]);
        inner.last_seen.insert(site("a"), now - 1_000);
        inner.last_seen.insert(site("b"), now - 12_000);
        assert_eq!(
            inner.waiting(now).as_deref(),
            Some("updates from a, b (silent 12 s; dropped at 30 s), c (silent 60 s; dropped at 30 s)")
        );

        let stats = StatsPhase {
            pending: BTreeSet::from([site("a"), site("b")]),
            reports: BTreeMap::new(),
            encodings: BTreeMap::new(),
            secure: false,
            session: None,
            proposals: Vec::new(),
            proposals_ready: false,
        };
        let mut inner = job(Phase::Stats(Box::new(stats)), &["b"]);
        inner.last_seen.insert(site("a"), now);
        assert_eq!(inner.waiting(now).as_deref(), Some("statistics from a"));

        assert_eq!(job(Phase::WaitingForSites, &[]).waiting(now), None);
        assert_eq!(Inner::default().waiting(now), None);
    }

    /// Who is at work (woken for each new block): while the job gathers
    /// its sites, anyone; in its statistics, the sites reporting, not one
    /// holding the job; in a round, its members still in it.
    #[test]
    fn at_work_are_the_sites_the_current_phase_waits_on() {
        assert_eq!(job(Phase::WaitingForSites, &[]).active.unwrap().at_work(), None);
        let stats = StatsPhase {
            pending: BTreeSet::from([site("a"), site("h")]),
            reports: BTreeMap::from([(site("b"), FeatureStats::empty(1))]),
            encodings: BTreeMap::new(),
            secure: false,
            session: None,
            proposals: Vec::new(),
            proposals_ready: false,
        };
        let inner = job(Phase::Stats(Box::new(stats)), &["h"]);
        assert_eq!(
            inner.active.unwrap().at_work(),
            Some(BTreeSet::from([site("a"), site("b")]))
        );
        let round = RoundPhase {
            announcement: pb::RoundAnnouncement {
                members: vec!["a".into(), "c".into(), "d".into()],
                ..Default::default()
            },
            collector: None,
            session: None,
            awaiting_metrics: BTreeSet::new(),
        };
        let mut inner = job(Phase::Round(Box::new(round)), &[]);
        let active = inner.active.as_mut().unwrap();
        active.failed.insert(site("c"));
        active.restarted.insert(site("d"));
        assert_eq!(active.at_work(), Some(BTreeSet::from([site("a")])));
    }
}
