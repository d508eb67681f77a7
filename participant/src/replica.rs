//! The site's replica of the ledger (`<state_dir>/ledger.db`): every block is
//! verified before it is stored and endorsed, announcements are checked
//! against it, and any disagreement with the coordinator halts training.
//!
//! A site *acts* only on final blocks (endorsed by a majority of the current
//! members): the jobs, cohorts and models it checks announcements against
//! are taken from the final prefix of the chain. Two blocks at one height
//! cannot both be final, so every honest site that acts sees one history.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tessera_protocol::ids::SiteId;
use tessera_protocol::ledger::equivocation::{self, Gossip};
use tessera_protocol::ledger::payload::{DeclaredCounts, Payload, RoundCompleted, Summation};
use tessera_protocol::ledger::pin::Consortium;
use tessera_protocol::ledger::store::LedgerStore;
use tessera_protocol::ledger::verify::{Members, Verified, Verifier};
use tessera_protocol::ledger::{Block, Endorsement, Header, endorse, sha256};
use tessera_protocol::pb::ledger_client::LedgerClient;
use tessera_protocol::roster::Roster;
use tessera_protocol::secagg::crypto::SigningKey;
use tessera_protocol::{pb, wire};
use tonic::transport::Channel;
use tracing::{error, info, warn};

use crate::egress::EgressLog;

/// Blocks asked for per request.
const BATCH: u32 = 256;

/// Why this site stopped training: written to `<state_dir>/HALTED` and
/// logged; only the hospital removes it, after investigating.
pub const HALT_FILE: &str = "HALTED";

/// One stored block as this site knows it.
struct Known {
    hash: [u8; 32],
    endorsers: std::collections::BTreeSet<SiteId>,
    /// Members who may endorse it, the change's subject, the count needed.
    verified: Verified,
}

impl Known {
    fn is_final(&self) -> bool {
        self.verified.is_final_with(&self.endorsers)
    }
}

/// Why an announcement was not acted on.
#[derive(Debug)]
pub enum Refusal {
    /// It contradicts the final ledger: the coordinator lied; halt.
    Contradicts(String),
    /// What it relies on is not final yet: decline, wait, try again.
    NotFinal(String),
    /// It asks for work the final ledger shows is already done: decline.
    Stale(String),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Contradicts(s) | Refusal::NotFinal(s) | Refusal::Stale(s) => f.write_str(s),
        }
    }
}

pub struct Replica {
    site: SiteId,
    key: Arc<SigningKey>,
    store: LedgerStore,
    verifier: Verifier,
    blocks: Vec<Known>,
    /// Blocks `0..final_len` are final; only their effects below apply.
    final_len: usize,
    /// The last round block's model per job, and the jobs on the chain.
    job_hashes: HashMap<u64, String>,
    latest_model: HashMap<u64, (u32, String)>,
    /// Per job, the sites whose acceptance is final and the counts each declared.
    declared: HashMap<u64, std::collections::BTreeMap<SiteId, Option<DeclaredCounts>>>,
    /// Per job, its sealed cohort, once the seal is final.
    cohorts: HashMap<u64, std::collections::BTreeSet<SiteId>>,
    /// What this site uploaded per (job, round): its commitment must be in
    /// that round's block before the site endorses it.
    commitments: HashMap<(u64, u32), [u8; 32]>,
    halt_path: PathBuf,
    halted: Option<String>,
    /// The consortium the site's kit pins: the genesis must be its.
    pin: Option<Consortium>,
    /// The CA-issued roster this site was started with: it endorses a new
    /// member only under the key listed here. Empty: no such check.
    roster: Arc<Roster>,
    /// Heights whose objection was logged (once each).
    objected: std::collections::HashSet<u64>,
    /// Endorsements signed during a sync, sent together at its end (or
    /// every `BATCH` blocks): one request per sync, not one per block.
    unsent: Vec<pb::EndorseRequest>,
    /// Whether the coordinator knows `EndorseBlocks` (an older one answers
    /// it "unimplemented"; endorsements then go one by one).
    batches: bool,
}

impl Replica {
    /// Opens (or creates) the replica and re-verifies it: a replica that no
    /// longer verifies (changed on disk) halts the site at once.
    pub async fn open(
        state_dir: &Path,
        site: SiteId,
        key: Arc<SigningKey>,
        pin: Option<Consortium>,
        roster: Arc<Roster>,
    ) -> anyhow::Result<Self> {
        let path = state_dir.join("ledger.db");
        let store = LedgerStore::open(&path)
            .await
            .with_context(|| format!("cannot open ledger replica {}", path.display()))?;
        let halt_path = state_dir.join(HALT_FILE);
        let halted = std::fs::read_to_string(&halt_path).ok();
        let mut replica = Self {
            site,
            key,
            store,
            verifier: Verifier::new(),
            blocks: Vec::new(),
            final_len: 0,
            job_hashes: HashMap::new(),
            latest_model: HashMap::new(),
            declared: HashMap::new(),
            cohorts: HashMap::new(),
            commitments: HashMap::new(),
            halt_path,
            halted,
            pin,
            roster,
            objected: Default::default(),
            unsent: Vec::new(),
            batches: true,
        };
        for (block, stored_hash) in replica.store.blocks().await? {
            if block.hash() != stored_hash {
                replica.halt(format!(
                    "replica block {} does not match its stored hash",
                    replica.blocks.len()
                ));
                break;
            }
            if let Err(e) = replica.accept(&block) {
                replica.halt(format!("the replica itself does not verify: {e}"));
                break;
            }
        }
        replica.advance_finality();
        match replica.store.conflicts().await {
            Ok(conflicts) if !conflicts.is_empty() => replica.halt(format!(
                "this replica holds proof that the coordinator equivocated at height {}",
                conflicts[0].height
            )),
            Ok(_) => {}
            Err(e) => replica.halt(format!("cannot read the replica's equivocation evidence: {e}")),
        }
        if let Some(reason) = &replica.halted {
            error!("this site is halted and will not train: {reason}");
        }
        Ok(replica)
    }

    pub fn halted(&self) -> Option<&str> {
        self.halted.as_deref()
    }

    pub fn len(&self) -> u64 {
        self.blocks.len() as u64
    }

    /// Whether every block this replica holds is final.
    pub fn is_final(&self) -> bool {
        self.final_len == self.blocks.len()
    }

    /// Whether the first `len` blocks are final.
    pub fn is_final_up_to(&self, len: u64) -> bool {
        self.final_len as u64 >= len
    }

    /// Applies, in chain order, the effects of blocks that became final.
    fn advance_finality(&mut self) {
        while let Some(known) = self.blocks.get(self.final_len)
            && known.is_final()
        {
            match &known.verified.payload {
                Payload::JobCreated(j) => {
                    self.job_hashes.insert(j.job_id, j.job_sha256.clone());
                }
                Payload::RoundCompleted(r) => {
                    self.latest_model.insert(r.job_id, (r.round, r.model_sha256.clone()));
                }
                Payload::JobAccepted(a) if a.accepted => {
                    // The chain's rules verified the site's own signature.
                    if let Ok(site) = SiteId::new(&a.site) {
                        self.declared.entry(a.job_id).or_default().insert(site, a.counts);
                    }
                }
                Payload::CohortSealed(seal) => {
                    // The chain's rules checked that it lists exactly the
                    // accepting sites.
                    let cohort = seal.cohort.iter().filter_map(|s| SiteId::new(s).ok()).collect();
                    self.cohorts.insert(seal.job_id, cohort);
                }
                _ => {}
            }
            self.final_len += 1;
        }
    }

    /// Stops this site; the first reason is the one kept.
    fn halt(&mut self, reason: String) {
        if self.halted.is_some() {
            return;
        }
        error!("LEDGER MISMATCH: this site stops training: {reason}");
        if let Err(e) = std::fs::write(&self.halt_path, &reason) {
            error!("cannot write {}: {e}", self.halt_path.display());
        }
        self.halted = Some(reason);
    }

    /// Records what this site uploaded in a round.
    pub fn committed(&mut self, job: u64, round: u32, commitment: [u8; 32]) {
        self.commitments.insert((job, round), commitment);
    }

    /// Verifies `block` as the next one and applies this site's own check:
    /// a round it uploaded to must carry its commitment.
    fn accept(&mut self, block: &Block) -> Result<Verified, String> {
        if let Ok(header) = Header::decode(&block.header)
            && let Ok(Payload::RoundCompleted(r)) = Payload::parse(header.kind, &block.payload)
            && let Some(mine) = self.commitments.get(&(r.job_id, r.round))
        {
            let listed = r.commitments.iter().find(|c| c.site == self.site.as_str());
            if listed.map(|c| c.sha256.as_str()) != Some(hex::encode(mine).as_str()) {
                return Err(format!(
                    "round {} of job {} does not carry this site's commitment {}",
                    r.round,
                    r.job_id,
                    hex::encode(mine)
                ));
            }
        }
        if let (Ok(header), Some(pin)) = (Header::decode(&block.header), &self.pin)
            && let Ok(Payload::Genesis(genesis)) = Payload::parse(header.kind, &block.payload)
        {
            pin.check_genesis(&genesis)?;
        }
        let verified = self.verifier.push(block).map_err(|e| e.to_string())?;
        self.blocks.push(Known {
            hash: verified.hash,
            endorsers: verified.endorsers.clone(),
            verified: verified.clone(),
        });
        Ok(verified)
    }

    /// Brings the replica up to the coordinator's chain: new blocks are
    /// verified, stored and endorsed; blocks already held must be
    /// byte-identical (else the coordinator forked the chain); endorsements
    /// by other sites are merged after checking them.
    ///
    /// With `await_final = Some((below, wait))` the first request is a long
    /// poll: the coordinator answers once blocks up to `below` are final at
    /// its end (or after `wait`), so endorsements are read when they arrive.
    pub async fn sync(
        &mut self,
        client: &mut LedgerClient<Channel>,
        egress: &EgressLog,
        await_final: Option<(u64, Duration)>,
    ) -> anyhow::Result<()> {
        // The blocks verified before a failure (or a halt) are endorsed.
        let fetched = self.fetch(client, egress, await_final).await;
        let sent = self.send_endorsements(client, egress).await;
        fetched.and(sent)
    }

    async fn fetch(
        &mut self,
        client: &mut LedgerClient<Channel>,
        egress: &EgressLog,
        await_final: Option<(u64, Duration)>,
    ) -> anyhow::Result<()> {
        if self.halted.is_some() {
            return Ok(());
        }
        // Re-read from the first block this replica does not hold as final,
        // so its copy gathers the other sites' endorsements (however far
        // behind the tip: a block left pending would block all work); at
        // least the last block is re-read, which catches a rewritten tip.
        let len = self.len();
        let first_open = self.final_len as u64;
        let mut from = first_open.min(len.saturating_sub(1));
        let mut await_final = await_final.filter(|&(below, _)| below > first_open);
        loop {
            let (wait_final_below, wait_ms) = match await_final.take() {
                Some((below, wait)) => (below, wait.as_millis().clamp(1, u128::from(u32::MAX)) as u32),
                None => (0, 0),
            };
            let request = pb::GetBlocksRequest {
                from_height: from,
                max_blocks: BATCH,
                wait_final_below,
                wait_ms,
            };
            egress.record("GetBlocks", &request)?;
            let response = client.get_blocks(request).await?.into_inner();
            if response.chain_length < self.len() {
                self.halt(format!(
                    "the coordinator's chain has {} blocks but this replica holds {}: history was rolled back",
                    response.chain_length,
                    self.len()
                ));
                return Ok(());
            }
            let got = response.blocks.len() as u64;
            for b in response.blocks {
                if b.height != from {
                    anyhow::bail!("coordinator sent block {} where {from} was expected", b.height);
                }
                self.take(b).await?;
                if self.halted.is_some() {
                    return Ok(());
                }
                from += 1;
            }
            self.send_endorsements(client, egress).await?;
            if got == 0 || from >= response.chain_length {
                return Ok(());
            }
        }
    }

    async fn take(&mut self, b: pb::LedgerBlock) -> anyhow::Result<()> {
        let height = b.height;
        let relayed = b.endorsements.clone();
        let mut block = wire::block_from_pb(b);
        block.endorsements.clear();
        if let Some(known) = self.blocks.get(height as usize) {
            if known.hash != block.hash() {
                self.halt(format!(
                    "the coordinator's block {height} differs from this replica's: the chain was forked"
                ));
                return Ok(());
            }
            let (members, hash) = (known.verified.members.clone(), known.hash);
            self.merge(height, &relayed).await?;
            // An endorsement lost to a crash or a dropped connection is sent
            // again: the coordinator does not hold one from this site.
            if !relayed.iter().any(|e| e.site_id == self.site.as_str()) {
                self.endorse(height, hash, &members, &block).await?;
            }
            return Ok(());
        }
        let verified = match self.accept(&block) {
            Ok(v) => v,
            Err(reason) => {
                self.halt(format!("block {height} from the coordinator does not verify: {reason}"));
                return Ok(());
            }
        };
        self.store.append(height, &block).await?;
        self.merge(height, &relayed).await?;
        self.endorse(height, verified.hash, &verified.members, &block).await?;
        info!(height, kind = verified.payload.kind().name(), "ledger block verified");
        Ok(())
    }

    /// Signs block `height` (verified), if this site may endorse it, and
    /// counts the endorsement in this replica at once (later blocks' checks
    /// see the block final as soon as this site's signature makes it so);
    /// it goes to the coordinator with the sync's others
    /// (`send_endorsements`), and again at the next sync if the coordinator
    /// did not take it (its copy of the block then lacks it).
    async fn endorse(&mut self, height: u64, hash: [u8; 32], members: &Members, block: &Block) -> anyhow::Result<()> {
        if members.get(&self.site) != Some(&self.key.public_key()) {
            return Ok(());
        }
        if let Some(reason) = self.objection(height) {
            if self.objected.insert(height) {
                warn!(
                    height,
                    "not endorsing ledger block {height}: {reason}; this site follows it only once a majority \
                     of members has made it final (update this site's roster from the CA and restart if the \
                     change is legitimate)"
                );
            }
            return Ok(());
        }
        // The header and the coordinator's signature travel with the
        // endorsement: relayed to the other sites, they prove which block
        // this site was shown at this height (gossip against equivocation).
        let signature = endorse(&self.key, &hash);
        let mine = pb::LedgerEndorsement {
            site_id: self.site.to_string(),
            signature: signature.clone(),
            header: Vec::new(),
            coordinator_signature: Vec::new(),
        };
        self.merge(height, std::slice::from_ref(&mine)).await?;
        self.unsent.push(pb::EndorseRequest {
            site_id: self.site.to_string(),
            height,
            block_hash: hash.to_vec(),
            signature,
            header: block.header.clone(),
            coordinator_signature: block.signature.clone(),
        });
        Ok(())
    }

    /// Sends the endorsements signed since the last call, in one request.
    async fn send_endorsements(
        &mut self,
        client: &mut LedgerClient<Channel>,
        egress: &EgressLog,
    ) -> anyhow::Result<()> {
        if self.unsent.is_empty() {
            return Ok(());
        }
        let mut unsent = std::mem::take(&mut self.unsent);
        if self.batches {
            let request = pb::EndorseBlocksRequest { endorsements: unsent };
            egress.record("EndorseBlocks", &request)?;
            match client.endorse_blocks(request.clone()).await {
                Ok(_) => return Ok(()),
                Err(status) if status.code() == tonic::Code::Unimplemented => {
                    self.batches = false;
                    unsent = request.endorsements;
                }
                Err(status) => return Err(status.into()),
            }
        }
        for request in unsent {
            egress.record("Endorse", &request)?;
            client.endorse(request).await?;
        }
        Ok(())
    }

    /// Why this site must not endorse block `height`: the block itself, or
    /// an earlier block that is not final yet, adds a member under a key
    /// this site's roster does not list. Sites endorse in chain order, so
    /// nothing after an objected block is endorsed before the majority has
    /// made it final (a final block after a non-final one would make the
    /// chain invalid).
    fn objection(&self, height: u64) -> Option<String> {
        let height = height as usize;
        let own = self.objects_to(&self.blocks.get(height)?.verified.payload);
        own.or_else(|| {
            (self.final_len..height).find_map(|h| {
                self.objects_to(&self.blocks[h].verified.payload)
                    .map(|why| format!("it follows block {h}, which is not final and {why}"))
            })
        })
    }

    /// A membership change this site's own roster contradicts: a member
    /// added (or a key rotated to a key) the CA did not issue to that site.
    /// Without this, a coordinator could add members whose keys it holds
    /// until it alone makes blocks final.
    fn objects_to(&self, payload: &Payload) -> Option<String> {
        let Payload::MembershipChange(c) = payload else {
            return None;
        };
        if self.roster.is_empty() || !matches!(c.change.as_str(), "site_added" | "key_rotated") {
            return None;
        }
        let listed = SiteId::new(&c.site.id).ok().and_then(|id| self.roster.get(&id));
        match listed {
            Some(key) if hex::encode(key) == c.site.key => None,
            Some(key) => Some(format!(
                "gives `{}` the key {}, but this site's roster lists {}",
                c.site.id,
                c.site.key,
                hex::encode(key)
            )),
            None => Some(format!("adds `{}`, which this site's roster does not list", c.site.id)),
        }
    }

    /// Judges endorsements relayed for the block at `height`: valid ones are
    /// stored (and may make blocks final); one that proves the coordinator
    /// signed another block here is stored as evidence and halts the site.
    async fn merge(&mut self, height: u64, relayed: &[pb::LedgerEndorsement]) -> anyhow::Result<()> {
        let coordinator = self.coordinator_key();
        for e in relayed {
            let known = &self.blocks[height as usize];
            let Ok(site) = SiteId::new(&e.site_id) else { continue };
            let Some(key) = known.verified.members.get(&site).copied() else {
                continue;
            };
            if known.endorsers.contains(&site) && e.header.is_empty() {
                continue;
            }
            let gossip = equivocation::judge(
                height,
                &known.hash,
                &coordinator,
                &key,
                &equivocation::Relayed {
                    signature: &e.signature,
                    header: (!e.header.is_empty()).then_some(e.header.as_slice()),
                    coordinator_signature: (!e.coordinator_signature.is_empty())
                        .then_some(e.coordinator_signature.as_slice()),
                },
            );
            match gossip {
                Gossip::Agrees if !known.endorsers.contains(&site) => {
                    let endorsement = Endorsement {
                        site: site.clone(),
                        signature: e.signature.clone(),
                    };
                    self.store.add_endorsement(height, &endorsement).await?;
                    self.blocks[height as usize].endorsers.insert(site);
                }
                Gossip::Agrees => {}
                Gossip::Equivocation(conflict) => {
                    self.store.add_conflict(&conflict).await?;
                    self.halt(format!(
                        "the coordinator equivocated at height {height}: `{site}` endorsed another block it \
                         signed there ({}); evidence kept in ledger.db",
                        hex::encode(sha256(&conflict.header))
                    ));
                    return Ok(());
                }
                Gossip::Invalid(why) => {
                    warn!(height, %site, "relayed endorsement ignored: {why}");
                }
            }
        }
        self.advance_finality();
        Ok(())
    }

    fn coordinator_key(&self) -> [u8; 32] {
        self.verifier
            .genesis()
            .and_then(|g| hex::decode(&g.coordinator_key).ok())
            .and_then(|k| k.try_into().ok())
            .unwrap_or([0; 32])
    }

    /// Checks a job against the chain before this site touches its data:
    /// the job must be on the ledger with the announced hash.
    pub fn check_job(&self, job_id: u64, job_hash: &str) -> Result<(), Refusal> {
        match self.job_hashes.get(&job_id) {
            Some(h) if h == job_hash => Ok(()),
            Some(h) => Err(Refusal::Contradicts(format!(
                "job {job_id} is on the ledger with hash {h}, but was announced with {job_hash}"
            ))),
            None if !self.is_final() => Err(self.not_final(&format!("job {job_id}"))),
            None => Err(Refusal::Contradicts(format!("job {job_id} is not on the ledger"))),
        }
    }

    fn not_final(&self, what: &str) -> Refusal {
        let height = self.final_len;
        let known = &self.blocks[height];
        Refusal::NotFinal(format!(
            "{what} waits for ledger block {height} to be final ({} of {} endorsements); \
             this site acts only on final blocks",
            known.verified.counted(&known.endorsers),
            known.verified.need
        ))
    }

    /// Checks an announced model against the chain: after round r − 1 of a
    /// job, the model for round r is the one its block recorded.
    pub fn check_model(&self, job_id: u64, round: u32, model_hash: &str) -> Result<(), Refusal> {
        let latest = self.latest_model.get(&job_id);
        let done = latest.map_or(0, |(r, _)| *r);
        if round <= done {
            // Announced before the round's block became final here (this
            // site waited for finality meanwhile): too late, not a lie.
            return Err(Refusal::Stale(format!(
                "round {round} of job {job_id} is already complete on the ledger (round {done})"
            )));
        }
        if done + 1 < round && !self.is_final() {
            return Err(self.not_final(&format!("round {round} of job {job_id}")));
        }
        match latest {
            None if round == 1 => Ok(()),
            Some((r, m)) if *r + 1 == round && m == model_hash => Ok(()),
            Some((r, m)) => Err(Refusal::Contradicts(format!(
                "round {round} of job {job_id} was announced with model {model_hash}, \
                 but the ledger's last final round ({r}) produced {m}"
            ))),
            None => Err(Refusal::Contradicts(format!(
                "round {round} of job {job_id} was announced, but the ledger has no earlier round"
            ))),
        }
    }

    /// The job's cohort on this replica: the sites its final
    /// `cohort_sealed` block lists (exactly those whose signed acceptance
    /// came before it). A site's secure-aggregation threshold, quorum and
    /// quantiser are sized from it, and only its members may hold a share
    /// of this site's secrets. `None` until the seal is final here: a
    /// chain shown without its later acceptances has no seal, so it cannot
    /// pass for a smaller cohort.
    pub fn cohort(&self, job_id: u64) -> Option<&std::collections::BTreeSet<SiteId>> {
        self.cohorts.get(&job_id)
    }

    /// The sites whose acceptance of the job is final here.
    pub fn accepted(&self, job_id: u64) -> std::collections::BTreeSet<SiteId> {
        self.declared
            .get(&job_id)
            .into_iter()
            .flatten()
            .filter(|(_, counts)| counts.is_some())
            .map(|(site, _)| site.clone())
            .collect()
    }

    /// The row counts `site` declared in its final acceptance of the job.
    pub fn declared(&self, job_id: u64, site: &SiteId) -> Option<DeclaredCounts> {
        self.declared.get(&job_id)?.get(site).copied().flatten()
    }

    /// The final `round_completed` block of `round` of `job_id`: what the
    /// site replays the job's models from.
    pub fn round_block(&self, job_id: u64, round: u32) -> Option<&RoundCompleted> {
        self.blocks[..self.final_len]
            .iter()
            .rev()
            .find_map(|k| match &k.verified.payload {
                Payload::RoundCompleted(r) if r.job_id == job_id && r.round == round => Some(r.as_ref()),
                _ => None,
            })
    }

    /// The final `summation` block of `job_id` for `purpose`.
    pub fn summation(&self, job_id: u64, purpose: &str) -> Option<&Summation> {
        self.blocks[..self.final_len]
            .iter()
            .find_map(|k| match &k.verified.payload {
                Payload::Summation(s) if s.job_id == job_id && s.purpose == purpose => Some(s.as_ref()),
                _ => None,
            })
    }

    /// Halts training because an announcement disagrees with the ledger.
    pub fn refuse(&mut self, reason: String) {
        self.halt(reason);
    }
}
