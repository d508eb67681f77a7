//! The coordinator's ledger writer: appends signed blocks to the chain in
//! the coordinator's database, in the same transaction as the state they
//! describe, and takes the sites' endorsements.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context, bail};
use sqlx::{Sqlite, SqlitePool, Transaction};
use tessera_protocol::ids::SiteId;
use tessera_protocol::ledger::payload::{
    CohortSealed, DeclaredCounts, Genesis, JobAccepted, Member, MembershipChange, Payload,
};
use tessera_protocol::ledger::store::{LedgerStore, StoredBlock};
use tessera_protocol::ledger::verify::{Members, Verifier, verify_chain};
use tessera_protocol::ledger::writer::{ChainWriter, Tip};
use tessera_protocol::ledger::{Endorsement, Header, verify_endorsement};
use tessera_protocol::secagg::crypto::SigningKey;
use tracing::{info, warn};

/// The software that wrote a block, as recorded in it.
pub const SOFTWARE: &str = concat!("tessera-coordinator ", env!("CARGO_PKG_VERSION"));

/// A decision on the chain: accepted or not, the counts it declared, and
/// the site's stated reason (what `tessera job status` shows for a refusal).
type Decision = (bool, Option<DeclaredCounts>, String);

/// The chain, its writer and the membership history (to check endorsements
/// against the membership at the endorsed block).
pub struct Ledger {
    store: LedgerStore,
    writer: tokio::sync::Mutex<Chain>,
    /// (first height, members from that height on), ascending.
    membership: std::sync::Mutex<Vec<(u64, Members)>>,
    /// Every (job, site) decision on the chain (one per pair): whether it
    /// accepted, and the row counts it declared.
    decisions: std::sync::Mutex<std::collections::HashMap<(u64, SiteId), Decision>>,
    /// Blocks on the chain, for long polls to notice new ones cheaply.
    len: std::sync::atomic::AtomicU64,
    /// Per job, the height of its `cohort_sealed` block and the cohort.
    sealed: std::sync::Mutex<std::collections::HashMap<u64, (u64, BTreeSet<SiteId>)>>,
    /// Woken by every stored endorsement: long polls for finality wait on it.
    endorsed: tokio::sync::Notify,
}

/// The writer together with a verifier over the chain it writes: every
/// block is checked against the rules auditors apply before it is stored.
struct Chain {
    writer: ChainWriter,
    verifier: Verifier,
}

/// An acceptance that came after its job's cohort was sealed: the job runs
/// without that site (a late rejection is recorded).
#[derive(Debug, thiserror::Error)]
#[error("job {0} has started: its cohort is sealed on the ledger, so no further acceptance is recorded")]
pub struct CohortSealedError(pub u64);

/// Why an endorsement was refused.
#[derive(Debug, thiserror::Error)]
pub enum EndorseError {
    #[error("there is no block {0}")]
    NoSuchBlock(u64),
    #[error("`{site}` is not a member at block {height}")]
    NotMember { site: SiteId, height: u64 },
    #[error("the block hash does not match block {0}")]
    WrongHash(u64),
    #[error("the endorsement signature is not valid for `{0}`")]
    BadSignature(SiteId),
    #[error(transparent)]
    Store(#[from] sqlx::Error),
}

/// A transaction that may append blocks; the blocks become the chain's tip
/// only when it commits.
pub struct LedgerTx<'a> {
    pub tx: Transaction<'static, Sqlite>,
    chain: tokio::sync::MutexGuard<'a, Chain>,
    ledger: &'a Ledger,
    appended: Vec<(Tip, Members)>,
    verifier: Option<Verifier>,
}

impl Ledger {
    /// Opens the chain in `pool`: verifies what is stored (a coordinator
    /// never extends a chain it cannot verify), writes the genesis block of
    /// a new consortium, and records changes between the stored membership
    /// and `roster` as membership-change blocks.
    pub async fn open(
        pool: SqlitePool,
        key: SigningKey,
        consortium: &str,
        roster: &Members,
        now_ms: u64,
    ) -> anyhow::Result<Self> {
        if roster.is_empty() {
            bail!("the roster lists no sites: the ledger's genesis needs the consortium's members");
        }
        let store = LedgerStore::attach(pool)
            .await
            .context("cannot create the ledger tables")?;
        let stored = store.blocks().await.context("cannot read the ledger")?;
        let mut verifier = Verifier::new();
        let mut membership = Vec::new();
        let mut decisions = std::collections::HashMap::new();
        let mut sealed = std::collections::HashMap::new();
        if !stored.is_empty() {
            let (blocks, hashes): (Vec<_>, Vec<_>) = stored.into_iter().unzip();
            verify_chain(&blocks, Some(&hashes)).context("the stored ledger does not verify; refusing to extend it")?;
            for (height, block) in blocks.iter().enumerate() {
                let verified = verifier.push(block).expect("verified above");
                if let Payload::JobAccepted(a) = &verified.payload
                    && let Ok(site) = SiteId::new(&a.site)
                {
                    decisions.insert((a.job_id, site), (a.accepted, a.counts, a.reason.clone()));
                }
                if let Payload::CohortSealed(c) = &verified.payload {
                    let cohort = c.cohort.iter().filter_map(|s| SiteId::new(s).ok()).collect();
                    sealed.insert(c.job_id, (height as u64, cohort));
                }
                if membership.last().is_none_or(|(_, m)| m != &verified.members) {
                    membership.push((height as u64, verified.members));
                }
            }
            let genesis_key = verifier
                .genesis()
                .map(|g| g.coordinator_key.clone())
                .unwrap_or_default();
            if genesis_key != hex::encode(key.public_key()) {
                bail!(
                    "the ledger's genesis names coordinator key {genesis_key}, not this coordinator's {} (wrong --ledger-key?)",
                    hex::encode(key.public_key())
                );
            }
        }
        let tip = store.tip().await?;
        let ledger = Self {
            store,
            writer: tokio::sync::Mutex::new(Chain {
                writer: ChainWriter::new(key, tip),
                verifier,
            }),
            membership: std::sync::Mutex::new(membership),
            decisions: std::sync::Mutex::new(decisions),
            sealed: std::sync::Mutex::new(sealed),
            endorsed: tokio::sync::Notify::new(),
            len: std::sync::atomic::AtomicU64::new(tip.map_or(0, |t| t.height + 1)),
        };
        ledger.reconcile(consortium, roster, now_ms).await?;
        Ok(ledger)
    }

    async fn reconcile(&self, consortium: &str, roster: &Members, now_ms: u64) -> anyhow::Result<()> {
        let member = |id: &SiteId, key: &[u8; 32]| Member {
            id: id.to_string(),
            key: hex::encode(key),
            certificate_sha256: None,
        };
        let mut tx = self.begin().await?;
        let current = tx.chain.verifier.genesis().is_some().then(|| tx.members());
        let Some(current) = current else {
            let coordinator_key = hex::encode(tx.chain.writer.public_key());
            let genesis = Genesis {
                consortium: consortium.to_owned(),
                coordinator_key,
                sites: roster.iter().map(|(id, k)| member(id, k)).collect(),
                quorum: tessera_protocol::ledger::verify::majority(roster.len()),
                software: SOFTWARE.to_owned(),
            };
            let quorum = genesis.quorum;
            tx.append(&Payload::Genesis(genesis), now_ms).await?;
            tx.commit().await?;
            info!(consortium, sites = roster.len(), quorum, "ledger genesis written");
            return Ok(());
        };
        // A site whose key changed is revoked and added again: a
        // `key_rotated` block needs the old key's consent, which a roster
        // entry does not carry, and the ledger must not claim a rotation
        // nobody proved.
        // Newcomers come first and leavers last, so that every change keeps
        // some member able to endorse it.
        let mut changes = Vec::new();
        for (id, key) in roster {
            if !current.contains_key(id) {
                changes.push(("site_added", member(id, key)));
            }
        }
        for (id, key) in roster {
            if let Some(old) = current.get(id)
                && old != key
            {
                changes.push(("site_revoked", member(id, old)));
                changes.push(("site_added", member(id, key)));
            }
        }
        for (id, key) in &current {
            if !roster.contains_key(id) {
                changes.push(("site_revoked", member(id, key)));
            }
        }
        for (change, site) in changes {
            warn!(change, site = %site.id, "roster differs from the ledger's membership: recording the change");
            let payload = Payload::MembershipChange(MembershipChange {
                change: change.to_owned(),
                site,
                reason: "roster changed".to_owned(),
                rotation_signature: None,
            });
            tx.append(&payload, now_ms).await?;
        }
        tx.commit().await
    }

    /// Starts a transaction that can append blocks. Appends are serialised:
    /// the next one waits until this transaction commits or is dropped.
    ///
    /// It takes SQLite's write lock at once: a deferred transaction that
    /// reads, then writes after another connection committed (a site's
    /// endorsement, a heartbeat) fails at its first write with "database is
    /// locked", without waiting, for its snapshot is stale. Taken up front,
    /// the lock waits for those short writes. (A statement that writes
    /// nothing takes it; `BEGIN IMMEDIATE` would too, but sqlx refuses it on
    /// a pooled connection whose commit once failed on a full disk.)
    pub async fn begin(&self) -> anyhow::Result<LedgerTx<'_>> {
        let chain = self.writer.lock().await;
        let mut tx = self.store.pool().begin().await.context("cannot begin transaction")?;
        sqlx::query("DELETE FROM ledger_blocks WHERE 0")
            .execute(&mut *tx)
            .await
            .context("cannot lock the database for writing")?;
        Ok(LedgerTx {
            tx,
            chain,
            ledger: self,
            appended: Vec::new(),
            verifier: None,
        })
    }

    /// Appends one block on its own.
    pub async fn append(&self, payload: &Payload, now_ms: u64) -> anyhow::Result<u64> {
        let mut tx = self.begin().await?;
        let height = tx.append(payload, now_ms).await?;
        tx.commit().await?;
        Ok(height)
    }

    /// Records a site's signed decision on a job, once per (job, site);
    /// returns whether it was new. The chain's rules check the signature.
    pub async fn record_decision(&self, decision: JobAccepted, now_ms: u64) -> anyhow::Result<bool> {
        let site = SiteId::new(&decision.site)?;
        let pair = (decision.job_id, site);
        let value = (decision.accepted, decision.counts, decision.reason.clone());
        let mut tx = self.begin().await?;
        if self.decisions.lock().expect("decisions lock").contains_key(&pair) {
            return Ok(false);
        }
        if decision.accepted && self.is_sealed(pair.0) {
            return Err(CohortSealedError(pair.0).into());
        }
        tx.append(&Payload::JobAccepted(decision), now_ms).await?;
        tx.commit().await?;
        self.decisions.lock().expect("decisions lock").insert(pair, value);
        Ok(true)
    }

    /// Whether `site`'s signed acceptance of the job is on the chain: a site
    /// takes part in nothing of a job (not even its statistics) before it
    /// has accepted it there, so every contributor ends up in the seal.
    pub fn has_accepted(&self, job_id: u64, site: &SiteId) -> bool {
        self.decisions
            .lock()
            .expect("decisions lock")
            .get(&(job_id, site.clone()))
            .is_some_and(|(accepted, ..)| *accepted)
    }

    /// The job's sealed cohort (empty before [`Ledger::seal_cohort`]).
    /// Every site reads the same set from its replica's final seal, and the
    /// secure summations' threshold and quantiser are sized from it.
    pub fn cohort(&self, job_id: u64) -> BTreeSet<SiteId> {
        self.sealed
            .lock()
            .expect("sealed lock")
            .get(&job_id)
            .map(|(_, c)| c.clone())
            .unwrap_or_default()
    }

    /// Every site's decision on the job that is on the chain: whether it
    /// accepted, and the reason it gave (a refusal's is what the ML lead
    /// needs to see).
    pub fn decisions(&self, job_id: u64) -> BTreeMap<SiteId, (bool, String)> {
        self.decisions
            .lock()
            .expect("decisions lock")
            .iter()
            .filter(|((job, _), _)| *job == job_id)
            .map(|((_, site), (accepted, _, reason))| (site.clone(), (*accepted, reason.clone())))
            .collect()
    }

    /// Per site, the latest job it declined on the chain, with its reason.
    pub fn latest_declines(&self) -> BTreeMap<SiteId, (u64, String)> {
        let mut latest: BTreeMap<SiteId, (u64, String)> = BTreeMap::new();
        for ((job, site), (accepted, _, reason)) in self.decisions.lock().expect("decisions lock").iter() {
            if !accepted && latest.get(site).is_none_or(|(j, _)| j < job) {
                latest.insert(site.clone(), (*job, reason.clone()));
            }
        }
        latest
    }

    /// Whether the job's cohort is sealed: no decision is recorded after.
    pub fn is_sealed(&self, job_id: u64) -> bool {
        self.sealed.lock().expect("sealed lock").contains_key(&job_id)
    }

    /// Seals the job's cohort, once, as the sites whose acceptance is on the
    /// chain: a `cohort_sealed` block, which must be final before any site
    /// takes part in a summation. Returns the block's height and the cohort.
    pub async fn seal_cohort(&self, job_id: u64, now_ms: u64) -> anyhow::Result<(u64, BTreeSet<SiteId>)> {
        // Under the chain's lock: no decision can land between reading the
        // accepting sites and sealing them.
        let mut tx = self.begin().await?;
        if let Some(sealed) = self.sealed.lock().expect("sealed lock").get(&job_id) {
            return Ok(sealed.clone());
        }
        let cohort: BTreeSet<SiteId> = self
            .decisions
            .lock()
            .expect("decisions lock")
            .iter()
            .filter(|((job, _), (accepted, ..))| *job == job_id && *accepted)
            .map(|((_, site), _)| site.clone())
            .collect();
        if cohort.is_empty() {
            bail!("no site accepted job {job_id}: there is no cohort to seal");
        }
        let seal = Payload::CohortSealed(CohortSealed {
            job_id,
            cohort: cohort.iter().map(|s| s.to_string()).collect(),
        });
        let height = tx.append(&seal, now_ms).await?;
        tx.commit().await?;
        let sealed = (height, cohort);
        self.sealed.lock().expect("sealed lock").insert(job_id, sealed.clone());
        Ok(sealed)
    }

    /// Whether block `height` (a job block: no membership change) carries
    /// endorsements from a majority of the members at that height. The
    /// stored endorsements were checked when they were taken.
    pub async fn is_final(&self, height: u64) -> anyhow::Result<bool> {
        if self.store.blocks_from(height, 1).await?.is_empty() {
            bail!("there is no block {height}");
        }
        self.all_final(height, height + 1).await
    }

    /// Whether every block from `from` up to `below` (or the tip) carries
    /// endorsements from a majority of the members at its height.
    pub async fn all_final(&self, from: u64, below: u64) -> anyhow::Result<bool> {
        let stored = self.store.blocks_from(from, below.saturating_sub(from)).await?;
        let membership = self.membership.lock().expect("membership lock");
        for (i, (block, _)) in stored.iter().enumerate() {
            let height = from + i as u64;
            let members = membership
                .iter()
                .rev()
                .find(|(first, _)| *first <= height)
                .map(|(_, m)| m)
                .context("no membership at this height")?;
            let counted = block
                .endorsements
                .iter()
                .filter(|e| members.contains_key(&e.site))
                .count();
            if counted < tessera_protocol::ledger::verify::majority(members.len()) {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Waits, at most `max`, until blocks `from..below` are final: a site
    /// that needs them final hears of the endorsement that makes them so
    /// when it arrives (the site checks the endorsements itself).
    pub async fn wait_final(&self, from: u64, below: u64, max: std::time::Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + max;
        loop {
            let endorsed = self.endorsed.notified();
            tokio::pin!(endorsed);
            endorsed.as_mut().enable();
            if self.all_final(from, below).await? || tokio::time::timeout_at(deadline, endorsed).await.is_err() {
                return Ok(());
            }
        }
    }

    /// The row counts each site of the job's cohort declared in its signed
    /// acceptance: the public weights and test counts of the job.
    pub fn declared(&self, job_id: u64) -> BTreeMap<SiteId, DeclaredCounts> {
        self.decisions
            .lock()
            .expect("decisions lock")
            .iter()
            .filter(|((job, _), (accepted, ..))| *job == job_id && *accepted)
            .filter_map(|((_, site), (_, counts, _))| Some((site.clone(), (*counts)?)))
            .collect()
    }

    /// Records, as `site_revoked` blocks, the current members whose site
    /// identity is in the CA's revocation list (`tessera://site/NAME`);
    /// returns them. Nothing is written when none is.
    pub async fn record_revocations(
        &self,
        revoked: &std::collections::BTreeSet<String>,
        now_ms: u64,
    ) -> anyhow::Result<Vec<SiteId>> {
        let mut tx = self.begin().await?;
        let mut done = Vec::new();
        for (site, key) in tx.members() {
            let uri =
                tessera_protocol::identity::Identity::new(tessera_protocol::identity::Role::Site, site.as_str())?.uri();
            if revoked.contains(&uri) {
                let change = Payload::MembershipChange(MembershipChange {
                    change: "site_revoked".to_owned(),
                    site: Member {
                        id: site.to_string(),
                        key: hex::encode(key),
                        certificate_sha256: None,
                    },
                    reason: "certificate revoked by the consortium CA".to_owned(),
                    rotation_signature: None,
                });
                tx.append(&change, now_ms).await?;
                done.push(site);
            }
        }
        if !done.is_empty() {
            tx.commit().await?;
        }
        Ok(done)
    }

    /// At most `limit` stored blocks from `from` on.
    pub async fn blocks_from(&self, from: u64, limit: u64) -> sqlx::Result<Vec<StoredBlock>> {
        self.store.blocks_from(from, limit).await
    }

    /// The round block that recorded `model_hash` for `job_id`: (height,
    /// block hash hex).
    pub async fn round_block_for(&self, job_id: u64, model_hash: &str) -> anyhow::Result<Option<(u64, String)>> {
        let blocks = self.store.blocks().await?;
        Ok(blocks.iter().enumerate().rev().find_map(|(height, (block, hash))| {
            let header = Header::decode(&block.header).ok()?;
            match Payload::parse(header.kind, &block.payload).ok()? {
                Payload::RoundCompleted(r) if r.job_id == job_id && r.model_sha256 == model_hash => {
                    Some((height as u64, hex::encode(hash)))
                }
                _ => None,
            }
        }))
    }

    /// The consortium's current members.
    pub fn members(&self) -> Vec<SiteId> {
        let membership = self.membership.lock().expect("membership lock");
        membership
            .last()
            .map(|(_, m)| m.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Per job, the models its round blocks started from or produced, and
    /// those its `models_pruned` blocks named.
    pub async fn job_models(&self) -> anyhow::Result<BTreeMap<u64, (BTreeSet<String>, BTreeSet<String>)>> {
        let mut jobs: BTreeMap<u64, (BTreeSet<String>, BTreeSet<String>)> = BTreeMap::new();
        for (block, _) in self.store.blocks().await? {
            let Ok(header) = Header::decode(&block.header) else {
                continue;
            };
            match Payload::parse(header.kind, &block.payload) {
                Ok(Payload::RoundCompleted(r)) => {
                    let (rounds, _) = jobs.entry(r.job_id).or_default();
                    rounds.insert(r.base_model_sha256);
                    rounds.insert(r.model_sha256);
                }
                Ok(Payload::ModelsPruned(p)) => jobs.entry(p.job_id).or_default().1.extend(p.models),
                _ => {}
            }
        }
        Ok(jobs)
    }

    /// The number of committed blocks, without waiting for the writer.
    pub fn committed_len(&self) -> u64 {
        self.len.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The number of blocks.
    pub async fn chain_length(&self) -> u64 {
        self.writer.lock().await.writer.tip().map_or(0, |t| t.height + 1)
    }

    /// Stores a site's endorsement of block `height` after checking it
    /// against the membership at that block.
    pub async fn endorse(
        &self,
        site: &SiteId,
        height: u64,
        block_hash: &[u8],
        signature: &[u8],
    ) -> Result<(), EndorseError> {
        let stored = self.store.blocks_from(height, 1).await?;
        let Some((block, _)) = stored
            .into_iter()
            .next()
            .filter(|(b, _)| tessera_protocol::ledger::Header::decode(&b.header).is_ok_and(|h| h.height == height))
        else {
            return Err(EndorseError::NoSuchBlock(height));
        };
        let hash = block.hash();
        if hash.as_slice() != block_hash {
            return Err(EndorseError::WrongHash(height));
        }
        let key = {
            let membership = self.membership.lock().expect("membership lock");
            membership
                .iter()
                .rev()
                .find(|(from, _)| *from <= height)
                .and_then(|(_, m)| m.get(site).copied())
        };
        let key = key.ok_or_else(|| EndorseError::NotMember {
            site: site.clone(),
            height,
        })?;
        if !verify_endorsement(&key, &hash, signature) {
            return Err(EndorseError::BadSignature(site.clone()));
        }
        self.store
            .add_endorsement(
                height,
                &Endorsement {
                    site: site.clone(),
                    signature: signature.to_vec(),
                },
            )
            .await?;
        self.endorsed.notify_waiters();
        Ok(())
    }
}

impl LedgerTx<'_> {
    /// The members who may endorse the next block.
    fn members(&self) -> Members {
        self.verifier.as_ref().unwrap_or(&self.chain.verifier).members().clone()
    }

    /// Appends a block after the chain's tip (or after the last block
    /// appended in this transaction). Returns its height.
    pub async fn append(&mut self, payload: &Payload, now_ms: u64) -> anyhow::Result<u64> {
        let tip = self.appended.last().map(|(t, _)| *t).or(self.chain.writer.tip());
        let (block, new_tip) = self.chain.writer.block_after(tip, payload, now_ms);
        let verifier = self.verifier.get_or_insert_with(|| self.chain.verifier.clone());
        let verified = verifier
            .push(&block)
            .map_err(|e| anyhow::anyhow!("refusing to write an invalid ledger block: {e}"))?;
        LedgerStore::append_in(&mut self.tx, new_tip.height, &block)
            .await
            .context("cannot store ledger block")?;
        self.appended.push((new_tip, verified.members));
        Ok(new_tip.height)
    }

    /// Commits the transaction: the blocks and the state they describe are
    /// stored together, and only then become the chain's tip.
    pub async fn commit(mut self) -> anyhow::Result<()> {
        self.tx.commit().await.context("cannot commit ledger transaction")?;
        if let Some(verifier) = self.verifier.take() {
            self.chain.verifier = verifier;
        }
        let mut membership = self.ledger.membership.lock().expect("membership lock");
        for (tip, members) in self.appended.drain(..) {
            self.chain.writer.commit(tip);
            self.ledger
                .len
                .store(tip.height + 1, std::sync::atomic::Ordering::Release);
            if membership.last().is_none_or(|(_, m)| m != &members) {
                membership.push((tip.height, members));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};
    use tessera_protocol::ledger::payload::{JobEnded, MembershipChange};

    use super::*;

    fn key() -> SigningKey {
        SigningKey::from_pkcs8(&SigningKey::generate_pkcs8()).unwrap()
    }

    async fn pool(path: &std::path::Path) -> SqlitePool {
        let options = SqliteConnectOptions::new().filename(path).create_if_missing(true);
        SqlitePoolOptions::new().connect_with(options).await.unwrap()
    }

    fn roster(sites: &[(&str, &SigningKey)]) -> Members {
        sites
            .iter()
            .map(|(id, k)| (SiteId::new(id).unwrap(), k.public_key()))
            .collect()
    }

    async fn chain(path: &std::path::Path) -> Vec<Payload> {
        let store = LedgerStore::attach(pool(path).await).await.unwrap();
        let (blocks, hashes): (Vec<_>, Vec<_>) = store.blocks().await.unwrap().into_iter().unzip();
        verify_chain(&blocks, Some(&hashes)).unwrap();
        let mut verifier = Verifier::new();
        blocks.iter().map(|b| verifier.push(b).unwrap().payload).collect()
    }

    /// A ledger transaction that reads, then writes after another
    /// connection committed (a site's endorsement landing as a job ends)
    /// still commits: a deferred one failed there with "database is
    /// locked", and the retention policy's pruning was lost with it.
    #[tokio::test]
    async fn a_ledger_transaction_commits_though_another_connection_wrote_meanwhile() {
        let dir = tempfile::tempdir().unwrap();
        let options = SqliteConnectOptions::new()
            .filename(dir.path().join("c.db"))
            .create_if_missing(true)
            .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal);
        let pool = SqlitePoolOptions::new()
            .max_connections(2)
            .connect_with(options)
            .await
            .unwrap();
        let ledger = Ledger::open(pool.clone(), key(), "test", &roster(&[("a", &key())]), 1)
            .await
            .unwrap();
        sqlx::query("CREATE TABLE other (x INTEGER)")
            .execute(&pool)
            .await
            .unwrap();
        let mut tx = ledger.begin().await.unwrap();
        sqlx::query("SELECT COUNT(*) FROM ledger_blocks")
            .fetch_one(&mut *tx.tx)
            .await
            .unwrap();
        let mut other = tokio::spawn({
            let pool = pool.clone();
            async move { sqlx::query("INSERT INTO other VALUES (1)").execute(&pool).await }
        });
        // Lets the other write land first if it can (it must wait instead).
        let _ = tokio::time::timeout(std::time::Duration::from_millis(300), &mut other).await;
        sqlx::query("INSERT INTO other VALUES (2)")
            .execute(&mut *tx.tx)
            .await
            .expect("the transaction's write");
        tx.commit().await.unwrap();
        other
            .await
            .unwrap()
            .expect("the other connection's write, after the commit");
        let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM other")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(rows, 2);
    }

    #[tokio::test]
    async fn genesis_then_roster_changes_become_membership_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        let (a, b, c, b2) = (key(), key(), key(), key());
        let coordinator = SigningKey::generate_pkcs8();
        let ledger = Ledger::open(
            pool(&path).await,
            SigningKey::from_pkcs8(&coordinator).unwrap(),
            "test",
            &roster(&[("a", &a), ("b", &b), ("c", &c)]),
            1,
        )
        .await
        .unwrap();
        assert_eq!(ledger.chain_length().await, 1);
        drop(ledger);
        // Same roster: nothing new. Then b gets a new key (revoked and
        // re-added: nothing proves the old key consented), c leaves, d joins.
        let d = key();
        for sites in [
            vec![("a", &a), ("b", &b), ("c", &c)],
            vec![("a", &a), ("b", &b2), ("d", &d)],
        ] {
            Ledger::open(
                pool(&path).await,
                SigningKey::from_pkcs8(&coordinator).unwrap(),
                "test",
                &roster(&sites),
                2,
            )
            .await
            .unwrap();
        }
        let payloads = chain(&path).await;
        let changes: Vec<(String, String)> = payloads
            .iter()
            .filter_map(|p| match p {
                Payload::MembershipChange(MembershipChange { change, site, .. }) => {
                    Some((change.clone(), site.id.clone()))
                }
                _ => None,
            })
            .collect();
        assert_eq!(
            changes,
            [
                ("site_added".to_owned(), "d".to_owned()),
                ("site_revoked".to_owned(), "b".to_owned()),
                ("site_added".to_owned(), "b".to_owned()),
                ("site_revoked".to_owned(), "c".to_owned()),
            ]
        );
        let Payload::Genesis(g) = &payloads[0] else {
            panic!("genesis first")
        };
        assert_eq!(g.quorum, 2);
    }

    #[tokio::test]
    async fn a_coordinator_refuses_a_chain_it_did_not_start_or_that_does_not_verify() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        let site = key();
        let sites = roster(&[("a", &site)]);
        let coordinator = SigningKey::generate_pkcs8();
        let ledger = Ledger::open(
            pool(&path).await,
            SigningKey::from_pkcs8(&coordinator).unwrap(),
            "t",
            &sites,
            1,
        )
        .await
        .unwrap();
        let toml = "name = \"x\"";
        ledger
            .append(
                &Payload::JobCreated(tessera_protocol::ledger::payload::JobCreated {
                    job_id: 1,
                    name: "x".into(),
                    job_sha256: tessera_protocol::ids::sha256_hex(toml.as_bytes()),
                    job_toml: toml.into(),
                    software: SOFTWARE.into(),
                    insecure_transport: false,
                }),
                2,
            )
            .await
            .unwrap();
        // The writer refuses to sign a block the rules reject.
        let bad = Payload::JobEnded(JobEnded {
            job_id: 9,
            status: "failed".into(),
            reason: String::new(),
            rounds_done: 0,
            final_model_sha256: None,
        });
        assert!(ledger.append(&bad, 3).await.is_err());
        assert_eq!(ledger.chain_length().await, 2);
        drop(ledger);

        let other = Ledger::open(pool(&path).await, key(), "t", &sites, 4).await;
        assert!(other.err().unwrap().to_string().contains("names coordinator key"));

        sqlx::query("UPDATE ledger_blocks SET payload = CAST('{}' AS BLOB) WHERE height = 1")
            .execute(&pool(&path).await)
            .await
            .unwrap();
        let tampered = Ledger::open(
            pool(&path).await,
            SigningKey::from_pkcs8(&coordinator).unwrap(),
            "t",
            &sites,
            5,
        )
        .await;
        let e = format!("{:#}", tampered.err().unwrap());
        assert!(e.contains("does not verify") && e.contains("block 1"), "{e}");
    }

    #[tokio::test]
    async fn endorsements_need_a_member_signature_over_that_block() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (key(), key());
        let ledger = Ledger::open(
            pool(&dir.path().join("c.db")).await,
            key(),
            "t",
            &roster(&[("a", &a), ("b", &b)]),
            1,
        )
        .await
        .unwrap();
        let block = ledger.blocks_from(0, 1).await.unwrap().remove(0).0;
        let hash = block.hash();
        let site_a = SiteId::new("a").unwrap();
        let sig = tessera_protocol::ledger::endorse(&a, &hash);
        ledger.endorse(&site_a, 0, &hash, &sig).await.unwrap();
        // b's name on a's signature; a stranger; a wrong hash; no such block.
        let site_b = SiteId::new("b").unwrap();
        assert!(matches!(
            ledger.endorse(&site_b, 0, &hash, &sig).await,
            Err(EndorseError::BadSignature(_))
        ));
        let stranger = SiteId::new("z").unwrap();
        assert!(matches!(
            ledger.endorse(&stranger, 0, &hash, &sig).await,
            Err(EndorseError::NotMember { .. })
        ));
        assert!(matches!(
            ledger.endorse(&site_a, 0, &[0; 32], &sig).await,
            Err(EndorseError::WrongHash(0))
        ));
        assert!(matches!(
            ledger.endorse(&site_a, 5, &hash, &sig).await,
            Err(EndorseError::NoSuchBlock(5))
        ));
        let stored = ledger.blocks_from(0, 1).await.unwrap().remove(0).0;
        assert_eq!(stored.endorsements.len(), 1);
    }

    #[tokio::test]
    async fn a_finality_long_poll_answers_when_the_majority_has_endorsed() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, c) = (key(), key(), key());
        let ledger = std::sync::Arc::new(
            Ledger::open(
                pool(&dir.path().join("c.db")).await,
                key(),
                "t",
                &roster(&[("a", &a), ("b", &b), ("c", &c)]),
                1,
            )
            .await
            .unwrap(),
        );
        let hash = ledger.blocks_from(0, 1).await.unwrap().remove(0).0.hash();
        let endorse = |id: &str, k: &SigningKey| {
            let (ledger, site, sig) = (
                ledger.clone(),
                SiteId::new(id).unwrap(),
                tessera_protocol::ledger::endorse(k, &hash),
            );
            async move { ledger.endorse(&site, 0, &hash, &sig).await.unwrap() }
        };
        endorse("a", &a).await;
        // One of three: not final; the poll gives up at its bound.
        ledger
            .wait_final(0, 1, std::time::Duration::from_millis(20))
            .await
            .unwrap();
        assert!(!ledger.is_final(0).await.unwrap());
        // A long poll far longer than the test waits: only the second
        // endorsement can end it.
        let waiting = {
            let ledger = ledger.clone();
            tokio::spawn(async move { ledger.wait_final(0, 1, std::time::Duration::from_secs(600)).await })
        };
        endorse("b", &b).await;
        tokio::time::timeout(std::time::Duration::from_secs(60), waiting)
            .await
            .expect("the endorsement that makes the block final ends the long poll")
            .unwrap()
            .unwrap();
        assert!(ledger.is_final(0).await.unwrap());
        // A range past the tip is what exists of it: answered at once, not
        // after the long poll's bound.
        tokio::time::timeout(
            std::time::Duration::from_secs(60),
            ledger.wait_final(0, 5, std::time::Duration::from_secs(600)),
        )
        .await
        .expect("blocks that do not exist are not waited for")
        .unwrap();
    }
}
