//! Offline verification of a whole chain, block by block, against the
//! membership its genesis block declares. Used by `tessera ledger verify`,
//! by every participant before it endorses a block, and by receipts.

use std::collections::{BTreeMap, BTreeSet};

use super::payload::{CohortSealed, Commitment, Genesis, Member, ModelsPruned, Payload, RoundCompleted, Summation};
use super::{Block, Header, Kind, merkle, sha256, verify_block_signature, verify_decision, verify_endorsement};
use crate::ids::{SiteId, sha256_hex};

/// Who may endorse: site id → Ed25519 public key.
pub type Members = BTreeMap<SiteId, [u8; 32]>;

/// The first thing wrong with a chain, and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("block {height}: {problem}")]
pub struct VerifyError {
    /// Position in the chain (the height the block should have).
    pub height: u64,
    pub problem: Problem,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error("the ledger is empty (no genesis block)")]
    Empty,
    #[error("malformed header: {0}")]
    Header(#[from] super::HeaderError),
    #[error("header says height {found}")]
    Height { found: u64 },
    #[error("previous-block hash does not match block {0}")]
    BrokenLink(u64),
    #[error("timestamp goes backwards")]
    Timestamp,
    #[error("payload does not match the payload hash in the header")]
    PayloadHash,
    #[error("stored block hash does not match its header")]
    StoredHash,
    #[error("{kind} payload is not valid: {reason}")]
    Payload { kind: &'static str, reason: String },
    #[error("only block 0 may be genesis, and block 0 must be")]
    Genesis,
    #[error("coordinator signature is not valid under the genesis coordinator key")]
    Signature,
    #[error("endorsement by `{0}`, which is not a member at this height")]
    UnknownEndorser(String),
    #[error("endorsement by `{0}` is not a valid signature of this block")]
    BadEndorsement(String),
    #[error("two endorsements by `{0}`")]
    DuplicateEndorsement(String),
    #[error("not final ({have} of {need} endorsements) although a later block is")]
    NotFinal { have: usize, need: usize },
    #[error("{0}")]
    Semantics(String),
    #[error(
        "equivocation: the coordinator also signed a different block at this height ({0}); \
         two sites were shown two histories"
    )]
    Equivocation(String),
    #[error("equivocation evidence is not valid: {0}")]
    Evidence(String),
}

/// What a valid chain holds.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub genesis: Genesis,
    pub genesis_hash: [u8; 32],
    pub blocks: u64,
    /// Blocks at the end still short of their endorsement quorum.
    pub pending: u64,
    /// The first of them: (height, valid endorsements, quorum).
    pub first_pending: Option<(u64, usize, usize)>,
    /// Every model hash a round block names, with the block's height.
    pub models: Vec<(u64, String)>,
    /// Models whose stored weights a `models_pruned` block says were
    /// deleted: a coordinator's database may lack them.
    pub pruned: BTreeSet<String>,
}

/// A block that passed verification.
#[derive(Debug, Clone)]
pub struct Verified {
    pub payload: Payload,
    pub hash: [u8; 32],
    /// Members whose valid endorsements the block carries.
    pub endorsers: BTreeSet<SiteId>,
    /// The members whose endorsement keys this block is checked against
    /// (the membership before a change it makes).
    pub members: Members,
    /// A membership change's subject: its endorsement is checked but never
    /// counted, so no site can approve its own rotation or revocation.
    pub subject: Option<SiteId>,
    /// Counted endorsements that make this block final.
    pub need: usize,
}

impl Verified {
    /// Endorsements in `endorsers` that count towards finality.
    pub fn counted(&self, endorsers: &BTreeSet<SiteId>) -> usize {
        endorsers.iter().filter(|s| Some(*s) != self.subject.as_ref()).count()
    }

    /// Whether `endorsers` make this block final.
    pub fn is_final_with(&self, endorsers: &BTreeSet<SiteId>) -> bool {
        self.counted(endorsers) >= self.need
    }
}

/// A strict majority of `n` members: two blocks at one height can both be
/// final only if some member endorsed both, which an honest site never does.
pub fn majority(n: usize) -> usize {
    n / 2 + 1
}

#[derive(Default, Clone)]
struct JobState {
    last_round: u32,
    last_model: Option<String>,
    ended: bool,
    job_sha256: String,
    /// Purposes of the job's `summation` blocks so far.
    summations: Vec<String>,
    /// Each site's decision on the job (accepted or not), at most one.
    decided: BTreeMap<String, bool>,
    /// The sealed cohort: no acceptance after it, no sum before it, and no
    /// contributor outside it.
    cohort: Option<BTreeSet<String>>,
    /// Every model the job's rounds started from or produced.
    models: BTreeSet<String>,
    /// Those a `models_pruned` block named.
    pruned: BTreeSet<String>,
}

impl JobState {
    /// The sealed cohort, which every round and summation needs.
    fn sealed(&self, job: u64) -> Result<&BTreeSet<String>, String> {
        self.cohort
            .as_ref()
            .ok_or_else(|| format!("job {job} has no sealed cohort yet"))
    }
}

/// Verifies blocks one at a time, in order. A participant keeps one over
/// its replica; `verify_chain` runs one over a whole file.
#[derive(Default, Clone)]
pub struct Verifier {
    genesis: Option<(Genesis, [u8; 32])>,
    coordinator_key: [u8; 32],
    members: Members,
    tip: Option<(u64, [u8; 32], u64)>,
    jobs: BTreeMap<u64, JobState>,
    models: Vec<(u64, String)>,
    pruned: BTreeSet<String>,
}

fn key_from_hex(hex_key: &str) -> Option<[u8; 32]> {
    hex::decode(hex_key).ok()?.try_into().ok()
}

fn bad(kind: Kind, reason: impl Into<String>) -> Problem {
    Problem::Payload {
        kind: kind.name(),
        reason: reason.into(),
    }
}

impl Verifier {
    pub fn new() -> Self {
        Self::default()
    }

    /// The height the next block must have.
    pub fn next_height(&self) -> u64 {
        self.tip.map_or(0, |(h, _, _)| h + 1)
    }

    pub fn tip_hash(&self) -> Option<[u8; 32]> {
        self.tip.map(|(_, h, _)| h)
    }

    pub fn genesis(&self) -> Option<&Genesis> {
        self.genesis.as_ref().map(|(g, _)| g)
    }

    /// The members who may endorse the next block.
    pub fn members(&self) -> &Members {
        &self.members
    }

    pub fn member_key(&self, site: &SiteId) -> Option<[u8; 32]> {
        self.members.get(site).copied()
    }

    /// Checks `block` as the next one and, if it is sound, takes it as the
    /// new tip. Nothing changes on error.
    pub fn push(&mut self, block: &Block) -> Result<Verified, VerifyError> {
        let height = self.next_height();
        self.check(block).map_err(|problem| VerifyError { height, problem })
    }

    fn check(&mut self, block: &Block) -> Result<Verified, Problem> {
        let height = self.next_height();
        let header = Header::decode(&block.header)?;
        if header.height != height {
            return Err(Problem::Height { found: header.height });
        }
        let expected_prev = self.tip.map_or([0u8; 32], |(_, h, _)| h);
        if header.prev_hash != expected_prev {
            return Err(Problem::BrokenLink(height.saturating_sub(1)));
        }
        if let Some((_, _, ts)) = self.tip
            && header.timestamp_ms < ts
        {
            return Err(Problem::Timestamp);
        }
        if sha256(&block.payload) != header.payload_hash {
            return Err(Problem::PayloadHash);
        }
        if (height == 0) != (header.kind == Kind::Genesis) {
            return Err(Problem::Genesis);
        }
        let payload = Payload::parse(header.kind, &block.payload).map_err(|e| bad(header.kind, e.to_string()))?;
        let hash = header.hash();
        // Genesis carries the key that signs it (and everything after).
        let (coordinator_key, members) = match &payload {
            Payload::Genesis(g) => genesis_members(g)?,
            _ => (self.coordinator_key, self.members.clone()),
        };
        if !verify_block_signature(&coordinator_key, &hash, &block.signature) {
            return Err(Problem::Signature);
        }
        let subject = match &payload {
            Payload::MembershipChange(c) => Some(SiteId::new(&c.site.id).map_err(|e| bad(header.kind, e.to_string()))?),
            _ => None,
        };
        // A majority of *all* members before the block, the subject of a
        // change included, even though its own endorsement is not counted:
        // two final blocks at one height then always share an endorser. (A
        // majority of the others would let "revoke S" and "revoke T" both be
        // final in a consortium of two, each endorsed by the other site.)
        let need = majority(members.len());
        let mut endorsers = BTreeSet::new();
        for e in &block.endorsements {
            let key = members
                .get(&e.site)
                .ok_or_else(|| Problem::UnknownEndorser(e.site.to_string()))?;
            if !verify_endorsement(key, &hash, &e.signature) {
                return Err(Problem::BadEndorsement(e.site.to_string()));
            }
            if !endorsers.insert(e.site.clone()) {
                return Err(Problem::DuplicateEndorsement(e.site.to_string()));
            }
        }
        // Semantics last, on a copy: a bad block leaves the state untouched.
        let mut jobs_after = None;
        let mut members_after = members.clone();
        match &payload {
            Payload::Genesis(g) => {
                self.genesis = Some((g.clone(), hash));
                self.coordinator_key = coordinator_key;
            }
            Payload::MembershipChange(c) => apply_change(&mut members_after, c)?,
            other => jobs_after = Some(self.check_job_block(other, &members_after)?),
        }
        if let Some((job, state)) = jobs_after {
            if let Payload::RoundCompleted(r) = &payload {
                self.models.push((height, r.model_sha256.clone()));
            }
            if let Payload::ModelsPruned(p) = &payload {
                self.pruned.extend(p.models.iter().cloned());
            }
            self.jobs.insert(job, state);
        }
        self.members = members_after;
        self.tip = Some((height, hash, header.timestamp_ms));
        Ok(Verified {
            payload,
            hash,
            endorsers,
            members,
            subject,
            need,
        })
    }

    fn check_job_block(&self, payload: &Payload, members: &Members) -> Result<(u64, JobState), Problem> {
        let kind = payload.kind();
        let job = payload.job_id().expect("job blocks name their job");
        let semantics = |s: String| Problem::Semantics(s);
        if let Payload::JobCreated(c) = payload {
            if self.jobs.contains_key(&job) {
                return Err(semantics(format!("job {job} is created twice")));
            }
            if sha256_hex(c.job_toml.as_bytes()) != c.job_sha256 {
                return Err(bad(kind, "job_sha256 is not the SHA-256 of job_toml"));
            }
            return Ok((
                job,
                JobState {
                    job_sha256: c.job_sha256.clone(),
                    ..JobState::default()
                },
            ));
        }
        let state = self
            .jobs
            .get(&job)
            .ok_or_else(|| semantics(format!("job {job} was never created")))?;
        if let Payload::ModelsPruned(p) = payload {
            if !state.ended {
                return Err(semantics(format!("models of job {job} pruned before the job ended")));
            }
            let mut next = state.clone();
            check_pruned(p, &mut next).map_err(|e| bad(kind, e))?;
            return Ok((job, next));
        }
        if state.ended {
            return Err(semantics(format!("job {job} has already ended")));
        }
        let mut next = state.clone();
        match payload {
            // A rejection after the seal is recorded (the data team's
            // decision belongs on the record) and changes nothing.
            Payload::JobAccepted(a) if a.accepted && state.cohort.is_some() => {
                return Err(semantics(format!(
                    "an acceptance by `{}` after the cohort of job {job} was sealed",
                    a.site
                )));
            }
            Payload::JobAccepted(a) if state.decided.contains_key(&a.site) => {
                return Err(semantics(format!("`{}` decides on job {job} twice", a.site)));
            }
            Payload::JobAccepted(a) => {
                let site = SiteId::new(&a.site).map_err(|e| bad(kind, e.to_string()))?;
                let key = members
                    .get(&site)
                    .ok_or_else(|| semantics(format!("`{}` is not a member", a.site)))?;
                if a.job_sha256 != state.job_sha256 {
                    return Err(bad(kind, "job_sha256 is not the job's"));
                }
                let job_hash: [u8; 32] = hex::decode(&a.job_sha256)
                    .ok()
                    .and_then(|b| b.try_into().ok())
                    .ok_or_else(|| bad(kind, "job_sha256 is not 32 hex bytes"))?;
                let signature = hex::decode(&a.signature).map_err(|_| bad(kind, "signature is not hex"))?;
                if !a.accepted && a.counts.is_some() {
                    return Err(bad(kind, "a rejection declares row counts"));
                }
                if !verify_decision(key, job, &job_hash, a.accepted, a.counts.as_ref(), &signature) {
                    return Err(bad(kind, format!("the decision is not signed by `{}`", a.site)));
                }
                next.decided.insert(a.site.clone(), a.accepted);
            }
            Payload::CohortSealed(seal) => {
                next.cohort = Some(check_seal(seal, state).map_err(|e| bad(kind, e))?);
            }
            Payload::RoundCompleted(r) => {
                if state.summations.iter().any(|p| p == Summation::FINAL_EVALUATION) {
                    return Err(bad(kind, "a round after the job's final evaluation"));
                }
                check_round(r, state, members).map_err(|e| bad(kind, e))?;
                check_in_cohort(&r.contributors, &r.commitments, state.sealed(job).map_err(&semantics)?)
                    .map_err(|e| bad(kind, e))?;
                next.last_round = r.round;
                next.last_model = Some(r.model_sha256.clone());
                next.models.insert(r.base_model_sha256.clone());
                next.models.insert(r.model_sha256.clone());
            }
            Payload::Summation(sum) => {
                check_summation(sum, state, members).map_err(|e| bad(kind, e))?;
                check_in_cohort(
                    &sum.contributors,
                    &sum.commitments,
                    state.sealed(job).map_err(&semantics)?,
                )
                .map_err(|e| bad(kind, e))?;
                next.summations.push(sum.purpose.clone());
            }
            Payload::JobEnded(_) => next.ended = true,
            _ => {}
        }
        Ok((job, next))
    }
}

fn genesis_members(g: &Genesis) -> Result<([u8; 32], Members), Problem> {
    let coordinator =
        key_from_hex(&g.coordinator_key).ok_or_else(|| bad(Kind::Genesis, "coordinator_key is not 32 hex bytes"))?;
    let mut members = BTreeMap::new();
    for m in &g.sites {
        let (id, key) = member_entry(m).map_err(|e| bad(Kind::Genesis, e))?;
        if let Some(other) = holder_of(&members, &key) {
            return Err(bad(Kind::Genesis, format!("`{}` has the key of `{other}`", m.id)));
        }
        if members.insert(id, key).is_some() {
            return Err(bad(Kind::Genesis, format!("site `{}` listed twice", m.id)));
        }
    }
    if g.quorum != majority(members.len()) {
        return Err(bad(
            Kind::Genesis,
            format!(
                "quorum {} for {} sites; it must be their majority, {}",
                g.quorum,
                members.len(),
                majority(members.len())
            ),
        ));
    }
    Ok((coordinator, members))
}

/// The member already holding `key`. Keys are unique among members: an
/// endorsement signs only the block hash, so a second member with a site's
/// key would count that site's endorsement twice.
fn holder_of<'a>(members: &'a Members, key: &[u8; 32]) -> Option<&'a SiteId> {
    members.iter().find(|(_, k)| *k == key).map(|(id, _)| id)
}

fn member_entry(m: &Member) -> Result<(SiteId, [u8; 32]), String> {
    let id = SiteId::new(&m.id).map_err(|e| e.to_string())?;
    let key = key_from_hex(&m.key).ok_or_else(|| format!("key of `{}` is not 32 hex bytes", m.id))?;
    Ok((id, key))
}

fn apply_change(members: &mut Members, change: &super::payload::MembershipChange) -> Result<(), Problem> {
    let kind = Kind::MembershipChange;
    let (id, key) = member_entry(&change.site).map_err(|e| bad(kind, e))?;
    let present = members.contains_key(&id);
    // Well-formed whenever present (lowercase hex of 64 bytes), as the
    // independent verifier reads the specification.
    if let Some(s) = &change.rotation_signature
        && (s.len() != 128 || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
    {
        return Err(bad(kind, "rotation_signature is not 64 bytes of lowercase hex"));
    }
    if change.change != "site_revoked"
        && let Some(other) = holder_of(members, &key)
    {
        return Err(bad(
            kind,
            format!("`{}` would take the key of `{other}`", change.site.id),
        ));
    }
    if change.change == "key_rotated" && present {
        let old = members[&id];
        let consent = change
            .rotation_signature
            .as_deref()
            .and_then(|s| hex::decode(s).ok())
            .is_some_and(|sig| super::verify_rotation(&old, &id, &key, &sig));
        if !consent {
            return Err(bad(
                kind,
                format!("key rotation of `{}` is not signed by its old key", change.site.id),
            ));
        }
    }
    match change.change.as_str() {
        "site_added" if !present => members.insert(id, key),
        "key_rotated" if present => members.insert(id, key),
        "site_revoked" if present => members.remove(&id),
        other => return Err(bad(kind, format!("`{other}` does not apply to `{}`", change.site.id))),
    };
    Ok(())
}

fn check_round(r: &RoundCompleted, state: &JobState, members: &Members) -> Result<(), String> {
    if r.round != state.last_round + 1 {
        return Err(format!("round {} follows round {}", r.round, state.last_round));
    }
    if let Some(previous) = &state.last_model
        && previous != &r.base_model_sha256
    {
        return Err(format!(
            "round {} starts from model {} but round {} produced {}",
            r.round, r.base_model_sha256, state.last_round, previous
        ));
    }
    check_commitments(&r.commitments, &r.commitment_root, &r.contributors, members)
}

/// A `summation` block: one per purpose and job, the statistics before the
/// first round, the normalisation hash exactly for the statistics, and its
/// commitments as a round's.
fn check_summation(s: &Summation, state: &JobState, members: &Members) -> Result<(), String> {
    let statistics = match s.purpose.as_str() {
        Summation::STATISTICS => true,
        Summation::FINAL_EVALUATION => false,
        other => return Err(format!("unknown purpose `{other}`")),
    };
    if state.summations.contains(&s.purpose) {
        return Err(format!("a second {} summation of job {}", s.purpose, s.job_id));
    }
    if statistics && state.last_round > 0 {
        return Err("the statistics summation comes after a round".into());
    }
    match (&s.normalization_sha256, statistics) {
        (Some(h), true) if is_lower_hex32(h) => {}
        (None, false) => {}
        _ => return Err("normalization_sha256 must be 32 lowercase hex bytes for statistics, null otherwise".into()),
    }
    check_commitments(&s.commitments, &s.commitment_root, &s.contributors, members)
}

/// A prune names models of its job, in strictly ascending order, none
/// pruned before.
fn check_pruned(p: &ModelsPruned, state: &mut JobState) -> Result<(), String> {
    if p.models.is_empty() {
        return Err("no model is named".into());
    }
    if p.models.windows(2).any(|w| w[0] >= w[1]) {
        return Err("models are not in strictly ascending order".into());
    }
    for model in &p.models {
        if !is_lower_hex32(model) {
            return Err(format!("`{model}` is not a lowercase hex SHA-256"));
        }
        if !state.models.contains(model) {
            return Err(format!("model {model} is not a model of the job's rounds"));
        }
        if !state.pruned.insert(model.clone()) {
            return Err(format!("model {model} was already pruned"));
        }
    }
    Ok(())
}

/// A seal: the first of its job, listing exactly the sites whose acceptance
/// is on the chain, in strictly ascending order, at least one.
fn check_seal(seal: &CohortSealed, state: &JobState) -> Result<BTreeSet<String>, String> {
    if state.cohort.is_some() {
        return Err(format!("the cohort of job {} is sealed twice", seal.job_id));
    }
    if seal.cohort.windows(2).any(|w| w[0] >= w[1]) {
        return Err("the cohort is not in strictly ascending site order".into());
    }
    let accepted: Vec<&String> = state.decided.iter().filter(|(_, a)| **a).map(|(s, _)| s).collect();
    if !seal.cohort.iter().eq(accepted.iter().copied()) {
        return Err(format!(
            "the cohort {:?} is not the sites that accepted the job on the chain, {accepted:?}",
            seal.cohort
        ));
    }
    if seal.cohort.is_empty() {
        return Err("an empty cohort".into());
    }
    Ok(seal.cohort.iter().cloned().collect())
}

/// Every contributor and committed site of a sum is in the sealed cohort.
fn check_in_cohort(
    contributors: &[String],
    commitments: &[Commitment],
    cohort: &BTreeSet<String>,
) -> Result<(), String> {
    let outside = contributors
        .iter()
        .chain(commitments.iter().map(|c| &c.site))
        .find(|s| !cohort.contains(*s));
    match outside {
        Some(site) => Err(format!("`{site}` is not in the job's sealed cohort")),
        None => Ok(()),
    }
}

fn is_lower_hex32(h: &str) -> bool {
    h.len() == 64 && h.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Commitments sorted by site and by members, covering every contributor,
/// with `root` their Merkle root.
fn check_commitments(
    commitments: &[Commitment],
    root: &str,
    contributors: &[String],
    members: &Members,
) -> Result<(), String> {
    let mut leaves = Vec::with_capacity(commitments.len());
    let mut last: Option<&str> = None;
    for c in commitments {
        if last.is_some_and(|l| l >= c.site.as_str()) {
            return Err("commitments are not in strictly ascending site order".into());
        }
        last = Some(&c.site);
        let site = SiteId::new(&c.site).map_err(|e| e.to_string())?;
        if !members.contains_key(&site) {
            return Err(format!("commitment by non-member `{}`", c.site));
        }
        let commitment: [u8; 32] = hex::decode(&c.sha256)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| format!("commitment of `{}` is not 32 hex bytes", c.site))?;
        leaves.push(merkle::leaf(&site, &commitment));
    }
    if hex::encode(merkle::root(&leaves)) != root {
        return Err("commitment_root is not the Merkle root of the commitments".into());
    }
    for c in contributors {
        if !commitments.iter().any(|k| &k.site == c) {
            return Err(format!("contributor `{c}` has no commitment"));
        }
    }
    Ok(())
}

/// Verifies a whole chain: every link, signature and endorsement, and that
/// only a tail of blocks is short of its quorum (sites endorse in order, so
/// a final block after a non-final one means endorsements were removed).
/// `stored_hashes`, if given, are the block hashes stored beside the blocks.
pub fn verify_chain(blocks: &[Block], stored_hashes: Option<&[[u8; 32]]>) -> Result<Report, VerifyError> {
    if blocks.is_empty() {
        return Err(VerifyError {
            height: 0,
            problem: Problem::Empty,
        });
    }
    let mut verifier = Verifier::new();
    let mut first_pending: Option<(u64, usize, usize)> = None;
    for (i, block) in blocks.iter().enumerate() {
        let height = i as u64;
        let verified = verifier.push(block)?;
        if let Some(stored) = stored_hashes
            && stored.get(i) != Some(&block.hash())
        {
            return Err(VerifyError {
                height,
                problem: Problem::StoredHash,
            });
        }
        let (endorsements, need) = (verified.counted(&verified.endorsers), verified.need);
        if endorsements < need {
            first_pending.get_or_insert((height, endorsements, need));
        } else if let Some((h, have, need)) = first_pending {
            return Err(VerifyError {
                height: h,
                problem: Problem::NotFinal { have, need },
            });
        }
    }
    let (genesis, genesis_hash) = verifier.genesis.clone().expect("block 0 is genesis");
    Ok(Report {
        genesis,
        genesis_hash,
        blocks: blocks.len() as u64,
        pending: first_pending.map_or(0, |(h, _, _)| blocks.len() as u64 - h),
        first_pending,
        models: verifier.models,
        pruned: verifier.pruned,
    })
}
