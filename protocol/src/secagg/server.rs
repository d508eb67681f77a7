//! The coordinator's side of secure aggregation, as consuming states:
//! [`ExpectKeys`] → [`ExpectShares`] → [`ExpectMaskedInputs`] →
//! [`ExpectUnmasking`] → the sum. Each state accepts messages (`handle_*`,
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
    AdvertisedKeys, EncryptedShare, Phase, RoundContext, SecAggParams, UnmaskRequest, UnmaskResponse, commitment,
    graph_seed, pair_seed, pair_sign,
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
    #[error("shares of `{0}` do not address exactly its neighbours, once each")]
    WrongShareSet(SiteId),
    #[error("masked input of `{site}` has {got} values, expected {expected}")]
    WrongLength { site: SiteId, expected: usize, got: usize },
    #[error("unmask response of `{0}` does not answer its request exactly")]
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
    pub unmask_responders: Vec<SiteId>,
    /// Who dropped, at which phase.
    pub dropped: Vec<(SiteId, Phase)>,
    /// Dropped sites whose pairwise masks were rebuilt from mask-key shares.
    pub mask_keys_recovered: Vec<SiteId>,
}

/// Phase 1.
pub struct ExpectKeys {
    ctx: RoundContext,
    params: SecAggParams,
    members: BTreeSet<SiteId>,
    roster: BTreeMap<SiteId, [u8; 32]>,
    keys: BTreeMap<SiteId, AdvertisedKeys>,
}

/// Phase 2.
pub struct ExpectShares {
    ctx: RoundContext,
    params: SecAggParams,
    keys: BTreeMap<SiteId, AdvertisedKeys>,
    neighbourhoods: BTreeMap<SiteId, BTreeSet<SiteId>>,
    shares: BTreeMap<SiteId, Vec<EncryptedShare>>,
    dropped: Vec<(SiteId, Phase)>,
}

/// Phase 3.
pub struct ExpectMaskedInputs {
    ctx: RoundContext,
    params: SecAggParams,
    keys: BTreeMap<SiteId, AdvertisedKeys>,
    neighbourhoods: BTreeMap<SiteId, BTreeSet<SiteId>>,
    shared: BTreeSet<SiteId>,
    sum: Vec<u32>,
    masked: BTreeMap<SiteId, [u8; 32]>,
    dropped: Vec<(SiteId, Phase)>,
}

/// Phase 4.
pub struct ExpectUnmasking {
    ctx: RoundContext,
    params: SecAggParams,
    keys: BTreeMap<SiteId, AdvertisedKeys>,
    neighbourhoods: BTreeMap<SiteId, BTreeSet<SiteId>>,
    shared: BTreeSet<SiteId>,
    sum: Vec<u32>,
    masked: BTreeMap<SiteId, [u8; 32]>,
    requests: BTreeMap<SiteId, UnmaskRequest>,
    responses: BTreeMap<SiteId, UnmaskResponse>,
    dropped: Vec<(SiteId, Phase)>,
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
        self.keys.insert(from.clone(), keys);
        Ok(())
    }

    /// Ends phase 1: returns the key list to send to every advertiser.
    pub fn close(self) -> Result<(ExpectShares, Vec<AdvertisedKeys>), Abort> {
        check_count(Phase::AdvertiseKeys, self.keys.len(), self.params.min_contributors())?;
        let list: Vec<AdvertisedKeys> = self.keys.values().cloned().collect();
        let u1: BTreeSet<SiteId> = self.keys.keys().cloned().collect();
        let neighbourhoods = self.params.graph.neighbourhoods(&u1, graph_seed(&self.ctx, &list));
        let dropped = self
            .members
            .iter()
            .filter(|s| !u1.contains(*s))
            .map(|s| (s.clone(), Phase::AdvertiseKeys))
            .collect();
        let next = ExpectShares {
            ctx: self.ctx,
            params: self.params,
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
        let mut dropped = self.dropped;
        dropped.extend(
            self.keys
                .keys()
                .filter(|s| !shared.contains(*s))
                .map(|s| (s.clone(), Phase::ShareKeys)),
        );
        let next = ExpectMaskedInputs {
            ctx: self.ctx,
            params: self.params,
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

    /// Ends phase 3: returns each survivor's unmask request.
    pub fn close(self) -> Result<(ExpectUnmasking, BTreeMap<SiteId, UnmaskRequest>), Abort> {
        let survivors: BTreeSet<SiteId> = self.masked.keys().cloned().collect();
        check_count(Phase::MaskedInput, survivors.len(), self.params.min_contributors())?;
        let mut requests = BTreeMap::new();
        for site in &survivors {
            // The request lists exactly the neighbours that shared with `site`.
            let hood = &self.neighbourhoods[site];
            let (alive, gone): (Vec<SiteId>, Vec<SiteId>) = hood
                .iter()
                .filter(|v| self.shared.contains(*v))
                .cloned()
                .partition(|v| survivors.contains(v));
            requests.insert(
                site.clone(),
                UnmaskRequest {
                    survivors: alive,
                    dropped: gone,
                },
            );
        }
        let mut dropped = self.dropped;
        dropped.extend(
            self.shared
                .iter()
                .filter(|s| !survivors.contains(*s))
                .map(|s| (s.clone(), Phase::MaskedInput)),
        );
        let next = ExpectUnmasking {
            ctx: self.ctx,
            params: self.params,
            keys: self.keys,
            neighbourhoods: self.neighbourhoods,
            shared: self.shared,
            sum: self.sum,
            masked: self.masked,
            requests: requests.clone(),
            responses: BTreeMap::new(),
            dropped,
        };
        Ok((next, requests))
    }
}

impl ExpectUnmasking {
    pub fn pending(&self) -> BTreeSet<SiteId> {
        self.requests
            .keys()
            .filter(|s| !self.responses.contains_key(*s))
            .cloned()
            .collect()
    }

    /// Accepts `from`'s revealed shares if they answer its request exactly.
    pub fn handle_unmask(&mut self, from: &SiteId, response: UnmaskResponse) -> Result<(), Misbehaviour> {
        let Some(request) = self.requests.get(from) else {
            return Err(Misbehaviour::NotExpected(from.clone()));
        };
        if self.responses.contains_key(from) {
            return Err(Misbehaviour::NotExpected(from.clone()));
        }
        let owners = |shares: &[(SiteId, Share)]| shares.iter().map(|(o, _)| o.clone()).collect::<Vec<_>>();
        if owners(&response.self_mask_shares) != request.survivors
            || owners(&response.mask_key_shares) != request.dropped
        {
            return Err(Misbehaviour::WrongUnmaskSet(from.clone()));
        }
        self.responses.insert(from.clone(), response);
        Ok(())
    }

    /// Removes every remaining mask and returns the sum of the survivors'
    /// inputs with the round transcript.
    pub fn finish(self) -> Result<(Vec<u32>, Transcript), Abort> {
        let t = self.params.threshold;
        let survivors: BTreeSet<&SiteId> = self.masked.keys().collect();
        let mut self_shares: BTreeMap<&SiteId, Vec<Share>> = BTreeMap::new();
        let mut key_shares: BTreeMap<&SiteId, Vec<Share>> = BTreeMap::new();
        for response in self.responses.values() {
            for (owner, share) in &response.self_mask_shares {
                self_shares.entry(owner).or_default().push(share.clone());
            }
            for (owner, share) in &response.mask_key_shares {
                key_shares.entry(owner).or_default().push(share.clone());
            }
        }
        let mut sum = self.sum;
        for site in &survivors {
            let shares = self_shares.get(site).map_or(&[][..], Vec::as_slice);
            let seed = rebuild(site, "self-mask seed", shares, t)?;
            if sha256(&seed) != self.keys[*site].self_mask_hash {
                return Err(Abort::BadReconstruction {
                    site: (*site).clone(),
                    what: "self-mask seed",
                });
            }
            apply_mask(&mut sum, &seed, Sign::Minus);
        }
        let gone: Vec<&SiteId> = self.shared.iter().filter(|s| !survivors.contains(s)).collect();
        for site in &gone {
            let shares = key_shares.get(site).map_or(&[][..], Vec::as_slice);
            let key = DhKeyPair::from_secret(rebuild(site, "mask key", shares, t)?);
            if key.public != self.keys[*site].mask_pk {
                return Err(Abort::BadReconstruction {
                    site: (*site).clone(),
                    what: "mask key",
                });
            }
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
        let mut dropped = self.dropped;
        dropped.extend(
            self.requests
                .keys()
                .filter(|s| !self.responses.contains_key(*s))
                .map(|s| (s.clone(), Phase::Unmask)),
        );
        let transcript = Transcript {
            ctx: self.ctx,
            threshold: t,
            advertised: self.keys.keys().cloned().collect(),
            shared: self.shared.iter().cloned().collect(),
            masked: self.masked.iter().map(|(s, c)| (s.clone(), *c)).collect(),
            unmask_responders: self.responses.keys().cloned().collect(),
            dropped,
            mask_keys_recovered: gone.into_iter().cloned().collect(),
        };
        Ok((sum, transcript))
    }
}

fn rebuild(site: &SiteId, what: &'static str, shares: &[Share], t: usize) -> Result<[u8; 32], Abort> {
    if shares.len() < t {
        return Err(Abort::Unrecoverable {
            site: site.clone(),
            what,
            got: shares.len(),
            needed: t,
        });
    }
    shamir::combine(shares, t).map_err(|_| Abort::BadReconstruction {
        site: site.clone(),
        what,
    })
}
