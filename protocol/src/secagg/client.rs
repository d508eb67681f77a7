//! The site's side of secure aggregation, as consuming states named for what
//! they await: [`ExpectKeys`] → [`ExpectShares`] → [`ExpectSurvivors`] →
//! [`ExpectSignatures`]. A state can only move forward, and
//! [`ExpectSurvivors::handle_survivors`] consumes the state, so a site signs
//! at most one survivor set per round, and reveals shares at most once.
//!
//! Driver: `let (s, keys) = ExpectKeys::new(cfg, rng)`; send `keys`; on the
//! coordinator's key list `let (s, shares) = s.handle_keys(list, rng)?`; send
//! `shares`; on the shares addressed to it `let (s, y) = s.handle_shares(in, x)?`;
//! send `y`; on the survivor set `let (s, sig) = s.handle_survivors(u3)?`; send
//! `sig`; on everyone's signatures `let r = s.handle_signatures(sigs)?`; send `r`.
//!
//! Every check that protects the site's input is made here, from the site's
//! own configuration (cohort, roster, threshold, minimum aggregate size),
//! never from what the coordinator announces.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use rand::CryptoRng;

use super::crypto::{DhKeyPair, SigningKey, verify};
use super::mask::{Sign, apply_mask};
use super::shamir::{self, Share};
use super::{
    AdvertisedKeys, EncryptedShare, RoundContext, SecAggParams, SurvivorSignature, UnmaskResponse, decode_share_pair,
    encode_share_pair, graph_seed, pair_seed, pair_sign, share_aad, share_key, survivors_signed_bytes,
};
use crate::ids::SiteId;

/// Fixed inputs of a site's secure round.
pub struct ClientConfig {
    pub site: SiteId,
    pub ctx: RoundContext,
    /// Derived by the site from the job spec it accepted, its own policy and
    /// the cohort below (`params.cohort_size == cohort.len()`).
    pub params: SecAggParams,
    pub signing_key: Arc<SigningKey>,
    /// The consortium's Ed25519 public keys, distributed out of band; the
    /// only keys whose signatures a site accepts.
    pub roster: Arc<BTreeMap<SiteId, [u8; 32]>>,
    /// The sites that signed their acceptance of the job, from this site's
    /// verified ledger replica: nobody else may hold a share of its secrets.
    pub cohort: Arc<BTreeSet<SiteId>>,
    /// Jobs whose categories are discovered: the SHA-256 of how this site
    /// encodes the job's rows (its features hash, with the categories it
    /// formed), signed into the advertisement with the cohort, so that no
    /// sum mixes sites whose vectors mean different things (a coordinator
    /// that relayed other category proposals to one site could otherwise
    /// read that site's count of a code from a slot the others fill with
    /// public counts). `None` otherwise: each site's encoding is then its
    /// own schema file, which no coordinator can change, and sites on
    /// older software still share with it.
    pub encoding: Option<[u8; 32]>,
}

/// Everything a site refuses, each naming the offender.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ClientError {
    #[error("site `{0}` is not in the consortium roster")]
    NotInRoster(SiteId),
    #[error("site `{0}` did not accept this job (not in its cohort on this site's ledger)")]
    NotInCohort(SiteId),
    #[error("signature of `{0}`'s advertised keys does not verify: keys were substituted or forged")]
    BadSignature(SiteId),
    #[error("site `{0}` advertised keys twice")]
    DuplicateKeys(SiteId),
    #[error("the key list does not contain this site's own keys unaltered")]
    OwnKeysMissing,
    #[error("site `{site}` shares with threshold {theirs}, this site derived {ours} from the job's cohort")]
    ThresholdMismatch { site: SiteId, theirs: u32, ours: u32 },
    #[error("site `{site}` counts {theirs} sites in the job's cohort, this site's ledger has {ours}")]
    CohortSizeMismatch { site: SiteId, theirs: u32, ours: u32 },
    #[error(
        "site `{0}` read another cohort of this job from its ledger, or encodes its rows otherwise, than this site"
    )]
    CohortMismatch(SiteId),
    #[error("only {got} sites in {phase}, at least {needed} are needed")]
    TooFewSites {
        phase: &'static str,
        got: usize,
        needed: usize,
    },
    #[error("site `{0}` advertised a low-order key")]
    LowOrderKey(SiteId),
    #[error("a share from `{0}`, which is not a neighbour or sent no keys")]
    UnexpectedShare(SiteId),
    #[error("two shares from `{0}`")]
    DuplicateShare(SiteId),
    #[error("the share from `{0}` does not decrypt")]
    UndecryptableShare(SiteId),
    #[error("input has {got} values, the round expects {expected}")]
    InputLength { expected: usize, got: usize },
    #[error("survivor set is inconsistent: {0}")]
    InconsistentSurvivors(String),
    #[error(
        "consistency check failed: {valid} valid signatures on this site's survivor set, {needed} needed \
         (the coordinator showed sites different survivor sets, or too few signed)"
    )]
    ConsistencyFailed { valid: usize, needed: usize },
    #[error(transparent)]
    Shamir(#[from] shamir::ShamirError),
}

/// Phase 1: keys advertised, waiting for everyone's keys.
pub struct ExpectKeys {
    cfg: ClientConfig,
    enc: DhKeyPair,
    mask_key: DhKeyPair,
    self_mask_seed: [u8; 32],
    advertised: AdvertisedKeys,
}

/// Phase 2: shares sent, waiting for the shares addressed to this site.
pub struct ExpectShares {
    cfg: ClientConfig,
    enc: DhKeyPair,
    mask_key: DhKeyPair,
    self_mask_seed: [u8; 32],
    keys: BTreeMap<SiteId, AdvertisedKeys>,
    neighbours: BTreeSet<SiteId>,
}

/// Phase 3: masked input sent, waiting for the set U3 of sites whose masked
/// inputs the coordinator holds.
pub struct ExpectSurvivors {
    cfg: ClientConfig,
    /// U1 as this site saw it.
    advertised: BTreeSet<SiteId>,
    neighbours: BTreeSet<SiteId>,
    /// Shares held for each peer (self included) that sent them: (self-mask
    /// share, mask-key share).
    held: BTreeMap<SiteId, (Share, Share)>,
}

/// Phase 4: U3 signed, waiting for the other sites' signatures on it.
pub struct ExpectSignatures {
    cfg: ClientConfig,
    survivors: BTreeSet<SiteId>,
    held: BTreeMap<SiteId, (Share, Share)>,
}

fn random_32(rng: &mut impl CryptoRng) -> [u8; 32] {
    let mut out = [0u8; 32];
    rng.fill_bytes(&mut out);
    out
}

fn at_least(phase: &'static str, got: usize, needed: usize) -> Result<(), ClientError> {
    if got < needed {
        return Err(ClientError::TooFewSites { phase, got, needed });
    }
    Ok(())
}

impl ExpectKeys {
    /// Generates the round's key pairs and self-mask seed; returns the signed
    /// advertisement to send.
    pub fn new(cfg: ClientConfig, rng: &mut impl CryptoRng) -> (Self, AdvertisedKeys) {
        let enc = DhKeyPair::from_secret(random_32(rng));
        let mask_key = DhKeyPair::from_secret(random_32(rng));
        let self_mask_seed = random_32(rng);
        let mut advertised = AdvertisedKeys {
            site: cfg.site.clone(),
            enc_pk: enc.public,
            mask_pk: mask_key.public,
            self_mask_hash: sha256(&self_mask_seed),
            threshold: cfg.params.threshold as u32,
            cohort_size: cfg.params.cohort_size as u32,
            cohort_sha256: super::cohort_digest(&cfg.cohort, cfg.encoding.as_ref()),
            signature: Vec::new(),
        };
        advertised.signature = cfg.signing_key.sign(&advertised.signed_bytes(&cfg.ctx));
        let state = Self {
            cfg,
            enc,
            mask_key,
            self_mask_seed,
            advertised: advertised.clone(),
        };
        (state, advertised)
    }

    /// Verifies every advertised key against the roster and the cohort, then
    /// secret-shares this site's self-mask seed and mask key with its
    /// neighbours, with the threshold derived from the cohort.
    pub fn handle_keys(
        self,
        all: &[AdvertisedKeys],
        rng: &mut impl CryptoRng,
    ) -> Result<(ExpectShares, Vec<EncryptedShare>), ClientError> {
        let ctx = self.cfg.ctx;
        let mut keys = BTreeMap::new();
        for k in all {
            let Some(public) = self.cfg.roster.get(&k.site) else {
                return Err(ClientError::NotInRoster(k.site.clone()));
            };
            if !self.cfg.cohort.contains(&k.site) {
                return Err(ClientError::NotInCohort(k.site.clone()));
            }
            if !verify(public, &k.signed_bytes(&ctx), &k.signature) {
                return Err(ClientError::BadSignature(k.site.clone()));
            }
            if k.threshold != self.advertised.threshold {
                return Err(ClientError::ThresholdMismatch {
                    site: k.site.clone(),
                    theirs: k.threshold,
                    ours: self.advertised.threshold,
                });
            }
            if k.cohort_size != self.advertised.cohort_size {
                return Err(ClientError::CohortSizeMismatch {
                    site: k.site.clone(),
                    theirs: k.cohort_size,
                    ours: self.advertised.cohort_size,
                });
            }
            if k.cohort_sha256 != self.advertised.cohort_sha256 {
                return Err(ClientError::CohortMismatch(k.site.clone()));
            }
            if keys.insert(k.site.clone(), k.clone()).is_some() {
                return Err(ClientError::DuplicateKeys(k.site.clone()));
            }
        }
        if keys.get(&self.cfg.site) != Some(&self.advertised) {
            return Err(ClientError::OwnKeysMissing);
        }
        at_least("advertise keys", keys.len(), self.cfg.params.min_contributors())?;
        let needed = self.cfg.params.threshold;
        let mut ordered: Vec<AdvertisedKeys> = keys.values().cloned().collect();
        ordered.sort_by(|a, b| a.site.cmp(&b.site));
        let u1: BTreeSet<SiteId> = keys.keys().cloned().collect();
        let neighbours = self.cfg.params.graph.neighbourhoods(&u1, graph_seed(&ctx, &ordered))[&self.cfg.site].clone();
        at_least("advertise keys (neighbourhood)", neighbours.len(), needed)?;
        let b_shares = shamir::split(&self.self_mask_seed, needed, neighbours.len(), rng)?;
        let s_shares = shamir::split(&self.mask_key.secret_bytes(), needed, neighbours.len(), rng)?;
        let mut out = Vec::with_capacity(neighbours.len());
        for ((peer, b), s) in neighbours.iter().zip(b_shares).zip(s_shares) {
            let peer_keys = &keys[peer];
            let key = share_key(&self.enc, &peer_keys.enc_pk, &ctx, &self.cfg.site, peer)
                .ok_or_else(|| ClientError::LowOrderKey(peer.clone()))?;
            let aad = share_aad(&ctx, &self.cfg.site, peer);
            out.push(EncryptedShare {
                from: self.cfg.site.clone(),
                to: peer.clone(),
                ciphertext: super::crypto::seal(&key, &aad, &encode_share_pair(&b, &s)),
            });
        }
        let next = ExpectShares {
            cfg: self.cfg,
            enc: self.enc,
            mask_key: self.mask_key,
            self_mask_seed: self.self_mask_seed,
            keys,
            neighbours,
        };
        Ok((next, out))
    }
}

impl ExpectShares {
    /// Decrypts the shares addressed to this site and masks `input` with the
    /// self mask and a pairwise mask for every neighbour that shared.
    pub fn handle_shares(
        self,
        incoming: &[EncryptedShare],
        input: &[u32],
    ) -> Result<(ExpectSurvivors, Vec<u32>), ClientError> {
        let ctx = self.cfg.ctx;
        let me = &self.cfg.site;
        if input.len() != self.cfg.params.vector_len {
            return Err(ClientError::InputLength {
                expected: self.cfg.params.vector_len,
                got: input.len(),
            });
        }
        let mut held = BTreeMap::new();
        for share in incoming {
            if share.to != *me || !self.neighbours.contains(&share.from) {
                return Err(ClientError::UnexpectedShare(share.from.clone()));
            }
            if held.contains_key(&share.from) {
                return Err(ClientError::DuplicateShare(share.from.clone()));
            }
            let peer_keys = &self.keys[&share.from];
            let key = share_key(&self.enc, &peer_keys.enc_pk, &ctx, &share.from, me)
                .ok_or_else(|| ClientError::LowOrderKey(share.from.clone()))?;
            let plain = super::crypto::open(&key, &share_aad(&ctx, &share.from, me), &share.ciphertext)
                .and_then(|p| decode_share_pair(&p))
                .ok_or_else(|| ClientError::UndecryptableShare(share.from.clone()))?;
            held.insert(share.from.clone(), plain);
        }
        if !held.contains_key(me) {
            return Err(ClientError::UnexpectedShare(me.clone()));
        }
        at_least("share keys", held.len(), self.cfg.params.threshold)?;
        if self.neighbours.len() == self.keys.len() {
            // Complete graph: the sharers are the whole aggregate-to-be.
            at_least("share keys", held.len(), self.cfg.params.min_contributors())?;
        }
        let mut masked = input.to_vec();
        apply_mask(&mut masked, &self.self_mask_seed, Sign::Plus);
        for peer in held.keys().filter(|p| *p != me) {
            let seed = pair_seed(&self.mask_key, &self.keys[peer].mask_pk, &ctx, me, peer)
                .ok_or_else(|| ClientError::LowOrderKey(peer.clone()))?;
            apply_mask(&mut masked, &seed, pair_sign(me, peer));
        }
        Ok((
            ExpectSurvivors {
                advertised: self.keys.keys().cloned().collect(),
                cfg: self.cfg,
                neighbours: self.neighbours,
                held,
            },
            masked,
        ))
    }
}

impl ExpectSurvivors {
    /// Checks the survivor set U3 the coordinator announces and signs it.
    /// Refused: a set without this site, with a site that never advertised
    /// keys, with a neighbour that did not share with this site (this site's
    /// input carries no mask with it, so its presence would let the
    /// coordinator strip this site's masks), or too small an aggregate.
    pub fn handle_survivors(self, survivors: &[SiteId]) -> Result<(ExpectSignatures, SurvivorSignature), ClientError> {
        let inconsistent = |m: String| Err(ClientError::InconsistentSurvivors(m));
        let u3: BTreeSet<SiteId> = survivors.iter().cloned().collect();
        if u3.len() != survivors.len() {
            return inconsistent("a site is listed twice".into());
        }
        if !u3.contains(&self.cfg.site) {
            return inconsistent("this site is not listed, though it sent its masked input".into());
        }
        if let Some(stranger) = u3.iter().find(|s| !self.advertised.contains(*s)) {
            return inconsistent(format!("`{stranger}` never advertised keys in this round"));
        }
        if let Some(silent) = u3
            .iter()
            .find(|s| self.neighbours.contains(*s) && !self.held.contains_key(*s))
        {
            return inconsistent(format!("`{silent}` is listed but never shared its keys with this site"));
        }
        let params = &self.cfg.params;
        at_least("consistency check", u3.len(), params.min_contributors())?;
        let alive_here = self.held.keys().filter(|s| u3.contains(*s)).count();
        at_least("consistency check (neighbourhood)", alive_here, params.threshold)?;
        let signature = self.cfg.signing_key.sign(&survivors_signed_bytes(&self.cfg.ctx, &u3));
        let message = SurvivorSignature {
            site: self.cfg.site.clone(),
            signature,
        };
        Ok((
            ExpectSignatures {
                cfg: self.cfg,
                survivors: u3,
                held: self.held,
            },
            message,
        ))
    }
}

#[cfg(test)]
impl ExpectSurvivors {
    /// What a site that obeyed a coordinator's unmask instruction would
    /// reveal (the protocol before the consistency check): the self-mask
    /// share of every sharer except `dropped`, the mask-key share of those.
    /// Only the adversarial tests use it, to show their attacks have teeth.
    pub(crate) fn reveal_as_told_for_tests(&self, dropped: &[&SiteId]) -> UnmaskResponse {
        let mut response = UnmaskResponse {
            self_mask_shares: Vec::new(),
            mask_key_shares: Vec::new(),
        };
        for (peer, (b, s)) in &self.held {
            if dropped.contains(&peer) {
                response.mask_key_shares.push((peer.clone(), s.clone()));
            } else {
                response.self_mask_shares.push((peer.clone(), b.clone()));
            }
        }
        response
    }
}

impl ExpectSignatures {
    /// Counts the valid signatures of distinct cohort members of U3 on the
    /// very U3 this site signed; with a quorum, reveals for each neighbour
    /// that shared either its self-mask share (in U3) or its mask-key share
    /// (not in U3), never both, decided by this site from U3 alone.
    pub fn handle_signatures(self, signatures: &[SurvivorSignature]) -> Result<UnmaskResponse, ClientError> {
        let message = survivors_signed_bytes(&self.cfg.ctx, &self.survivors);
        let needed = self.cfg.params.consistency_quorum();
        let mut signers = BTreeSet::new();
        for s in signatures {
            if signers.len() >= needed {
                // Enough: the rest need not be checked.
                break;
            }
            if signers.contains(&s.site) {
                continue;
            }
            let valid = self.survivors.contains(&s.site)
                && self.cfg.cohort.contains(&s.site)
                && self
                    .cfg
                    .roster
                    .get(&s.site)
                    .is_some_and(|pk| verify(pk, &message, &s.signature));
            if valid {
                signers.insert(&s.site);
            }
        }
        if signers.len() < needed {
            return Err(ClientError::ConsistencyFailed {
                valid: signers.len(),
                needed,
            });
        }
        let mut response = UnmaskResponse {
            self_mask_shares: Vec::new(),
            mask_key_shares: Vec::new(),
        };
        for (peer, (b, s)) in self.held {
            if self.survivors.contains(&peer) {
                response.self_mask_shares.push((peer, b));
            } else {
                response.mask_key_shares.push((peer, s));
            }
        }
        Ok(response)
    }
}

pub(crate) fn sha256(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref());
    out
}
