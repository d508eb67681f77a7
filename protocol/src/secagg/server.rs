//! The coordinator's side of secure aggregation, as consuming states:
//! [`ExpectKeys`] → [`ExpectShares`] → [`ExpectMaskedInputs`] →
//! [`ExpectConsistency`] → [`ExpectUnmasking`] → the sum. Each state accepts messages (`handle_*`,
//! refusing misbehaviour without changing anything) and lists who is still
//! `pending`; the driver calls `close`/`finish` once nobody is pending or the
//! deadline passed: sites that did not answer have dropped at that phase.
//!
//! The coordinator never holds an unmasked individual input: it keeps only the
//! running sum of masked inputs, and removes masks from the sum.

use std::collections::{BTreeMap, BTreeSet};

use super::client::sha256;
use super::crypto::{DhKeyPair, verify};
use super::mask::{Sign, apply_mask};
use super::shamir::{self, Share};
use super::{
    AdvertisedKeys, EncryptedShare, Phase, RoundContext, SecAggParams, SurvivorSignature, UnmaskResponse, commitment,
    graph_seed, pair_seed, pair_sign, survivors_signed_bytes,
};
use crate::ids::SiteId;

/// A message refused; the round goes on without it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Misbehaviour {
    #[error("site `{0}` is not a member of this round")]
    NotMember(SiteId),
    #[error("site `{0}` is not expected in this phase (dropped earlier or already answered)")]
    NotExpected(SiteId),
    #[error("message claims to be from `{claimed}` but was sent by `{sender}`")]
    Impersonation { sender: SiteId, claimed: SiteId },
    #[error("keys of `{0}` carry an invalid signature")]
    BadSignature(SiteId),
    #[error("`{site}` shares with threshold {got}, this round's is {expected}")]
    WrongThreshold { site: SiteId, expected: usize, got: u32 },
    #[error("`{site}` counts {got} sites in the job's cohort, the coordinator's ledger has {expected}")]
    WrongCohortSize { site: SiteId, expected: usize, got: u32 },
    #[error("the survivor-set signature of `{0}` does not verify")]
    BadSurvivorSignature(SiteId),
    #[error("shares of `{0}` do not address exactly its neighbours, once each")]
    WrongShareSet(SiteId),
    #[error("masked input of `{site}` has {got} values, expected {expected}")]
    WrongLength { site: SiteId, expected: usize, got: usize },
    #[error("unmask response of `{0}` does not reveal exactly one share per neighbour that shared with it")]
    WrongUnmaskSet(SiteId),
}

/// Why a round produced no sum. Nothing is released.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Abort {
    #[error("only {got} sites left after {phase:?}, at least {needed} are needed")]
    TooFewSites { phase: Phase, got: usize, needed: usize },
    #[error("cannot rebuild the {what} of `{site}`: {got} shares, {needed} needed")]
    Unrecoverable {
        site: SiteId,
        what: &'static str,
        got: usize,
        needed: usize,
    },
    #[error("the rebuilt {what} of `{site}` does not match its advertised commitment (bad shares)")]
    BadReconstruction { site: SiteId, what: &'static str },
}

/// What happened in a secure round, for the ledger.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transcript {
    pub ctx: RoundContext,
    pub threshold: usize,
    pub advertised: Vec<SiteId>,
    pub shared: Vec<SiteId>,
    /// Sites whose masked input is in the sum, with the SHA-256 commitment to it.
    pub masked: Vec<(SiteId, [u8; 32])>,
    /// Sites whose signature on the survivor set was collected.
    pub consistency_signers: Vec<SiteId>,
    pub unmask_responders: Vec<SiteId>,
    /// Sites that revealed a share inconsistent with the others (skipped).
    pub bad_shares: Vec<SiteId>,
    /// Who dropped, at which phase.
    pub dropped: Vec<(SiteId, Phase)>,
    /// Dropped sites whose pairwise masks were rebuilt from mask-key shares.
    pub mask_keys_recovered: Vec<SiteId>,
}

/// Phase 1.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct ExpectKeys {
    ctx: RoundContext,
    params: SecAggParams,
    members: BTreeSet<SiteId>,
    roster: BTreeMap<SiteId, [u8; 32]>,
    keys: BTreeMap<SiteId, AdvertisedKeys>,
}

/// Phase 2.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct ExpectShares {
    ctx: RoundContext,
    params: SecAggParams,
    roster: BTreeMap<SiteId, [u8; 32]>,
    keys: BTreeMap<SiteId, AdvertisedKeys>,
    neighbourhoods: BTreeMap<SiteId, BTreeSet<SiteId>>,
    shares: BTreeMap<SiteId, Vec<EncryptedShare>>,
    dropped: Vec<(SiteId, Phase)>,
}

/// Phase 3.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct ExpectMaskedInputs {
    ctx: RoundContext,
    params: SecAggParams,
    roster: BTreeMap<SiteId, [u8; 32]>,
    keys: BTreeMap<SiteId, AdvertisedKeys>,
    neighbourhoods: BTreeMap<SiteId, BTreeSet<SiteId>>,
    shared: BTreeSet<SiteId>,
    sum: Vec<u32>,
    masked: BTreeMap<SiteId, [u8; 32]>,
    dropped: Vec<(SiteId, Phase)>,
}

/// Phase 4: the consistency check (each site in U3 signs U3).
#[derive(serde::Serialize, serde::Deserialize)]
pub struct ExpectConsistency {
    ctx: RoundContext,
    params: SecAggParams,
    roster: BTreeMap<SiteId, [u8; 32]>,
    keys: BTreeMap<SiteId, AdvertisedKeys>,
    neighbourhoods: BTreeMap<SiteId, BTreeSet<SiteId>>,
    shared: BTreeSet<SiteId>,
    sum: Vec<u32>,
    masked: BTreeMap<SiteId, [u8; 32]>,
    /// The bytes every site must sign: U3, fixed when this phase opened.
    signed_bytes: Vec<u8>,
    signatures: BTreeMap<SiteId, Vec<u8>>,
    dropped: Vec<(SiteId, Phase)>,
}

/// What a site's unmask response must reveal: self-mask shares of its
/// sharers in U3, mask-key shares of its sharers outside U3.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct Expected {
    survivors: Vec<SiteId>,
    dropped: Vec<SiteId>,
}

/// Phase 5.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct ExpectUnmasking {
    ctx: RoundContext,
    params: SecAggParams,
    keys: BTreeMap<SiteId, AdvertisedKeys>,
    neighbourhoods: BTreeMap<SiteId, BTreeSet<SiteId>>,
    shared: BTreeSet<SiteId>,
    sum: Vec<u32>,
    masked: BTreeMap<SiteId, [u8; 32]>,
    signers: Vec<SiteId>,
    expected: BTreeMap<SiteId, Expected>,
    responses: BTreeMap<SiteId, UnmaskResponse>,
    dropped: Vec<(SiteId, Phase)>,
}

/// `dropped` and every site of `expected` that did not answer, as dropped
/// at `phase`.
fn with_dropouts<'a>(
    mut dropped: Vec<(SiteId, Phase)>,
    expected: impl IntoIterator<Item = &'a SiteId>,
    answered: impl Fn(&SiteId) -> bool,
    phase: Phase,
) -> Vec<(SiteId, Phase)> {
    dropped.extend(
        expected
            .into_iter()
            .filter(|s| !answered(s))
            .map(|s| (s.clone(), phase)),
    );
    dropped
}

fn check_count(phase: Phase, got: usize, needed: usize) -> Result<(), Abort> {
    if got < needed {
        return Err(Abort::TooFewSites { phase, got, needed });
    }
    Ok(())
}

impl ExpectKeys {
    /// Opens a secure round among `members`; `roster` holds their Ed25519 keys.
    pub fn new(
        ctx: RoundContext,
        params: SecAggParams,
        members: BTreeSet<SiteId>,
        roster: BTreeMap<SiteId, [u8; 32]>,
    ) -> Self {
        Self {
            ctx,
            params,
            members,
            roster,
            keys: BTreeMap::new(),
        }
    }

    pub fn pending(&self) -> BTreeSet<SiteId> {
        self.members
            .iter()
            .filter(|s| !self.keys.contains_key(*s))
            .cloned()
            .collect()
    }

    /// Accepts `from`'s advertised keys (signature checked early, so a forged
    /// advertisement is refused before it reaches any site).
    pub fn handle_keys(&mut self, from: &SiteId, keys: AdvertisedKeys) -> Result<(), Misbehaviour> {
        if !self.members.contains(from) {
            return Err(Misbehaviour::NotMember(from.clone()));
        }
        if keys.site != *from {
            return Err(Misbehaviour::Impersonation {
                sender: from.clone(),
                claimed: keys.site,
            });
        }
        if self.keys.contains_key(from) {
            return Err(Misbehaviour::NotExpected(from.clone()));
        }
        let valid = self
            .roster
            .get(from)
            .is_some_and(|pk| verify(pk, &keys.signed_bytes(&self.ctx), &keys.signature));
        if !valid {
            return Err(Misbehaviour::BadSignature(from.clone()));
        }
        if keys.threshold as usize != self.params.threshold {
            return Err(Misbehaviour::WrongThreshold {
                site: from.clone(),
                expected: self.params.threshold,
                got: keys.threshold,
            });
        }
        if keys.cohort_size as usize != self.params.cohort_size {
            return Err(Misbehaviour::WrongCohortSize {
                site: from.clone(),
                expected: self.params.cohort_size,
                got: keys.cohort_size,
            });
        }
        self.keys.insert(from.clone(), keys);
        Ok(())
    }

    /// Ends phase 1: returns the key list to send to every advertiser.
    pub fn close(self) -> Result<(ExpectShares, Vec<AdvertisedKeys>), Abort> {
        check_count(Phase::AdvertiseKeys, self.keys.len(), self.params.min_contributors())?;
        let list: Vec<AdvertisedKeys> = self.keys.values().cloned().collect();
        let u1: BTreeSet<SiteId> = self.keys.keys().cloned().collect();
        let neighbourhoods = self.params.graph.neighbourhoods(&u1, graph_seed(&self.ctx, &list));
        let dropped = with_dropouts(Vec::new(), &self.members, |s| u1.contains(s), Phase::AdvertiseKeys);
        let next = ExpectShares {
            ctx: self.ctx,
            params: self.params,
            roster: self.roster,
            keys: self.keys,
            neighbourhoods,
            shares: BTreeMap::new(),
            dropped,
        };
        Ok((next, list))
    }
}

impl ExpectShares {
    pub fn pending(&self) -> BTreeSet<SiteId> {
        self.keys
            .keys()
            .filter(|s| !self.shares.contains_key(*s))
            .cloned()
            .collect()
    }

    /// Accepts `from`'s encrypted shares: exactly one per neighbour.
    pub fn handle_shares(&mut self, from: &SiteId, shares: Vec<EncryptedShare>) -> Result<(), Misbehaviour> {
        let Some(hood) = self.neighbourhoods.get(from) else {
            return Err(Misbehaviour::NotExpected(from.clone()));
        };
        if self.shares.contains_key(from) {
            return Err(Misbehaviour::NotExpected(from.clone()));
        }
        if let Some(s) = shares.iter().find(|s| s.from != *from) {
            return Err(Misbehaviour::Impersonation {
                sender: from.clone(),
                claimed: s.from.clone(),
            });
        }
        let recipients: BTreeSet<&SiteId> = shares.iter().map(|s| &s.to).collect();
        if recipients.len() != shares.len() || recipients != hood.iter().collect() {
            return Err(Misbehaviour::WrongShareSet(from.clone()));
        }
        self.shares.insert(from.clone(), shares);
        Ok(())
    }

    /// Ends phase 2: returns each sharer's mailbox (the shares addressed to it).
    pub fn close(self) -> Result<(ExpectMaskedInputs, BTreeMap<SiteId, Vec<EncryptedShare>>), Abort> {
        let shared: BTreeSet<SiteId> = self.shares.keys().cloned().collect();
        check_count(Phase::ShareKeys, shared.len(), self.params.min_contributors())?;
        let mut mailbox: BTreeMap<SiteId, Vec<EncryptedShare>> =
            shared.iter().map(|s| (s.clone(), Vec::new())).collect();
        for share in self.shares.into_values().flatten() {
            if let Some(inbox) = mailbox.get_mut(&share.to) {
                inbox.push(share);
            }
        }
        let dropped = with_dropouts(self.dropped, self.keys.keys(), |s| shared.contains(s), Phase::ShareKeys);
        let next = ExpectMaskedInputs {
            ctx: self.ctx,
            params: self.params,
            roster: self.roster,
            sum: vec![0; self.params.vector_len],
            keys: self.keys,
            neighbourhoods: self.neighbourhoods,
            shared,
            masked: BTreeMap::new(),
            dropped,
        };
        Ok((next, mailbox))
    }
}

impl ExpectMaskedInputs {
    pub fn pending(&self) -> BTreeSet<SiteId> {
        self.shared
            .iter()
            .filter(|s| !self.masked.contains_key(*s))
            .cloned()
            .collect()
    }

    /// Adds `from`'s masked input to the running sum (mod 2^32).
    pub fn handle_masked(&mut self, from: &SiteId, masked: &[u32]) -> Result<(), Misbehaviour> {
        if !self.shared.contains(from) || self.masked.contains_key(from) {
            return Err(Misbehaviour::NotExpected(from.clone()));
        }
        if masked.len() != self.params.vector_len {
            return Err(Misbehaviour::WrongLength {
                site: from.clone(),
                expected: self.params.vector_len,
                got: masked.len(),
            });
        }
        for (acc, &y) in self.sum.iter_mut().zip(masked) {
            *acc = acc.wrapping_add(y);
        }
        self.masked.insert(from.clone(), commitment(masked));
        Ok(())
    }

    /// Ends phase 3: returns U3, the set of sites whose masked input is in
    /// the sum, to send to each of them for signing.
    pub fn close(self) -> Result<(ExpectConsistency, Vec<SiteId>), Abort> {
        let survivors: BTreeSet<SiteId> = self.masked.keys().cloned().collect();
        check_count(Phase::MaskedInput, survivors.len(), self.params.min_contributors())?;
        let dropped = with_dropouts(
            self.dropped,
            &self.shared,
            |s| survivors.contains(s),
            Phase::MaskedInput,
        );
        let next = ExpectConsistency {
            ctx: self.ctx,
            params: self.params,
            roster: self.roster,
            keys: self.keys,
            neighbourhoods: self.neighbourhoods,
            shared: self.shared,
            sum: self.sum,
            masked: self.masked,
            signed_bytes: survivors_signed_bytes(&self.ctx, &survivors),
            signatures: BTreeMap::new(),
            dropped,
        };
        Ok((next, survivors.into_iter().collect()))
    }
}

impl ExpectConsistency {
    pub fn pending(&self) -> BTreeSet<SiteId> {
        self.masked
            .keys()
            .filter(|s| !self.signatures.contains_key(*s))
            .cloned()
            .collect()
    }

    /// Accepts `from`'s signature on U3, checked before it is forwarded.
    pub fn handle_signature(&mut self, from: &SiteId, signature: SurvivorSignature) -> Result<(), Misbehaviour> {
        if !self.masked.contains_key(from) || self.signatures.contains_key(from) {
            return Err(Misbehaviour::NotExpected(from.clone()));
        }
        if signature.site != *from {
            return Err(Misbehaviour::Impersonation {
                sender: from.clone(),
                claimed: signature.site,
            });
        }
        let valid = self
            .roster
            .get(from)
            .is_some_and(|pk| verify(pk, &self.signed_bytes, &signature.signature));
        if !valid {
            return Err(Misbehaviour::BadSurvivorSignature(from.clone()));
        }
        self.signatures.insert(from.clone(), signature.signature);
        Ok(())
    }

    /// Ends the consistency check: with a quorum of signatures, returns the
    /// signatures to send to every signer, who then unmask.
    pub fn close(self) -> Result<(ExpectUnmasking, Vec<SurvivorSignature>), Abort> {
        check_count(
            Phase::Consistency,
            self.signatures.len(),
            self.params.consistency_quorum().max(self.params.min_contributors()),
        )?;
        let survivors: BTreeSet<&SiteId> = self.masked.keys().collect();
        let mut expected = BTreeMap::new();
        for site in self.signatures.keys() {
            // The neighbours that shared with `site`, split by U3.
            let (alive, gone): (Vec<SiteId>, Vec<SiteId>) = self.neighbourhoods[site]
                .iter()
                .filter(|v| self.shared.contains(*v))
                .cloned()
                .partition(|v| survivors.contains(v));
            expected.insert(
                site.clone(),
                Expected {
                    survivors: alive,
                    dropped: gone,
                },
            );
        }
        let dropped = with_dropouts(
            self.dropped,
            self.masked.keys(),
            |s| self.signatures.contains_key(s),
            Phase::Consistency,
        );
        let signatures: Vec<SurvivorSignature> = self
            .signatures
            .into_iter()
            .map(|(site, signature)| SurvivorSignature { site, signature })
            .collect();
        let next = ExpectUnmasking {
            ctx: self.ctx,
            params: self.params,
            keys: self.keys,
            neighbourhoods: self.neighbourhoods,
            shared: self.shared,
            sum: self.sum,
            masked: self.masked,
            signers: signatures.iter().map(|s| s.site.clone()).collect(),
            expected,
            responses: BTreeMap::new(),
            dropped,
        };
        Ok((next, signatures))
    }
}

impl ExpectUnmasking {
    pub fn pending(&self) -> BTreeSet<SiteId> {
        self.expected
            .keys()
            .filter(|s| !self.responses.contains_key(*s))
            .cloned()
            .collect()
    }

    /// Accepts `from`'s revealed shares if they reveal exactly what U3 asks
    /// of it.
    pub fn handle_unmask(&mut self, from: &SiteId, response: UnmaskResponse) -> Result<(), Misbehaviour> {
        let Some(expected) = self.expected.get(from) else {
            return Err(Misbehaviour::NotExpected(from.clone()));
        };
        if self.responses.contains_key(from) {
            return Err(Misbehaviour::NotExpected(from.clone()));
        }
        let owners = |shares: &[(SiteId, Share)]| shares.iter().map(|(o, _)| o.clone()).collect::<Vec<_>>();
        if owners(&response.self_mask_shares) != expected.survivors
            || owners(&response.mask_key_shares) != expected.dropped
        {
            return Err(Misbehaviour::WrongUnmaskSet(from.clone()));
        }
        self.responses.insert(from.clone(), response);
        Ok(())
    }

    /// Removes every remaining mask and returns the sum of the survivors'
    /// inputs with the round transcript. A share that disagrees with the
    /// others is skipped (and its sender named in the transcript) as long
    /// as t consistent shares remain.
    pub fn finish(self) -> Result<(Vec<u32>, Transcript), Abort> {
        let t = self.params.threshold;
        let survivors: BTreeSet<&SiteId> = self.masked.keys().collect();
        let mut self_shares: BTreeMap<&SiteId, Vec<(&SiteId, Share)>> = BTreeMap::new();
        let mut key_shares: BTreeMap<&SiteId, Vec<(&SiteId, Share)>> = BTreeMap::new();
        for (responder, response) in &self.responses {
            for (owner, share) in &response.self_mask_shares {
                self_shares.entry(owner).or_default().push((responder, share.clone()));
            }
            for (owner, share) in &response.mask_key_shares {
                key_shares.entry(owner).or_default().push((responder, share.clone()));
            }
        }
        let mut bad_shares = BTreeSet::new();
        let mut sum = self.sum;
        for site in &survivors {
            let shares = self_shares.get(site).map_or(&[][..], Vec::as_slice);
            let commitment = self.keys[*site].self_mask_hash;
            let (seed, bad) = rebuild(site, "self-mask seed", shares, t, |s| sha256(s) == commitment)?;
            bad_shares.extend(bad);
            apply_mask(&mut sum, &seed, Sign::Minus);
        }
        let gone: Vec<&SiteId> = self.shared.iter().filter(|s| !survivors.contains(s)).collect();
        for site in &gone {
            let shares = key_shares.get(site).map_or(&[][..], Vec::as_slice);
            let public = self.keys[*site].mask_pk;
            let (secret, bad) = rebuild(site, "mask key", shares, t, |s| {
                DhKeyPair::from_secret(*s).public == public
            })?;
            bad_shares.extend(bad);
            let key = DhKeyPair::from_secret(secret);
            // Undo the pairwise mask each surviving neighbour added with it.
            for peer in self.neighbourhoods[*site].iter().filter(|p| survivors.contains(p)) {
                let seed = pair_seed(&key, &self.keys[peer].mask_pk, &self.ctx, site, peer).ok_or_else(|| {
                    Abort::BadReconstruction {
                        site: peer.clone(),
                        what: "mask public key",
                    }
                })?;
                let sign = match pair_sign(peer, site) {
                    Sign::Plus => Sign::Minus,
                    Sign::Minus => Sign::Plus,
                };
                apply_mask(&mut sum, &seed, sign);
            }
        }
        let dropped = with_dropouts(
            self.dropped,
            self.expected.keys(),
            |s| self.responses.contains_key(s),
            Phase::Unmask,
        );
        let transcript = Transcript {
            ctx: self.ctx,
            threshold: t,
            advertised: self.keys.keys().cloned().collect(),
            shared: self.shared.iter().cloned().collect(),
            masked: self.masked.iter().map(|(s, c)| (s.clone(), *c)).collect(),
            consistency_signers: self.signers,
            unmask_responders: self.responses.keys().cloned().collect(),
            bad_shares: bad_shares.into_iter().cloned().collect(),
            dropped,
            mask_keys_recovered: gone.into_iter().cloned().collect(),
        };
        Ok((sum, transcript))
    }
}

/// Rebuilds a secret from revealed shares, checked against the owner's
/// commitment. If the first `t` shares do not match it, leaves out one share
/// at a time (two at a time among ≤ 40 shares) until a set of `t` does;
/// the shares that disagree with the rebuilt polynomial are returned by
/// sender, so one bad share skips its sender instead of aborting the round.
fn rebuild<'a>(
    site: &SiteId,
    what: &'static str,
    shares: &[(&'a SiteId, Share)],
    t: usize,
    matches: impl Fn(&[u8; 32]) -> bool,
) -> Result<([u8; 32], Vec<&'a SiteId>), Abort> {
    if shares.len() < t {
        return Err(Abort::Unrecoverable {
            site: site.clone(),
            what,
            got: shares.len(),
            needed: t,
        });
    }
    let n = shares.len();
    let mut exclusions: Vec<Vec<usize>> = vec![vec![]];
    if n > t {
        exclusions.extend((0..n).map(|i| vec![i]));
    }
    if n > t + 1 && n <= 40 {
        exclusions.extend((0..n).flat_map(|i| (i + 1..n).map(move |j| vec![i, j])));
    }
    for excluded in exclusions {
        let used: Vec<Share> = (0..n)
            .filter(|i| !excluded.contains(i))
            .take(t)
            .map(|i| shares[i].1.clone())
            .collect();
        let Ok(secret) = shamir::combine(&used, t) else {
            continue;
        };
        if !matches(&secret) {
            continue;
        }
        let bad = shares
            .iter()
            .filter(|(_, s)| shamir::interpolate(&used, s.x).is_ok_and(|y| y != s.y))
            .map(|(sender, _)| *sender)
            .collect();
        return Ok((secret, bad));
    }
    Err(Abort::BadReconstruction {
        site: site.clone(),
        what,
    })
}
