//! The site's side of secure aggregation, as consuming states named for what
//! they await: [`ExpectKeys`] → [`ExpectShares`] → [`ExpectUnmask`]. A state
//! can only move forward, and [`ExpectUnmask::handle_unmask`] consumes the
//! state, so a site answers at most one unmask request per round.
//!
//! Driver: `let (s, keys) = ExpectKeys::new(cfg, rng)`; send `keys`; on the
//! coordinator's key list `let (s, shares) = s.handle_keys(list, rng)?`; send
//! `shares`; on the shares addressed to it `let (s, y) = s.handle_shares(in, x)?`;
//! send `y`; on the unmask request `let r = s.handle_unmask(req)?`; send `r`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use rand::CryptoRng;

use super::crypto::{DhKeyPair, SigningKey, verify};
use super::mask::{Sign, apply_mask};
use super::shamir::{self, Share};
use super::{
    AdvertisedKeys, EncryptedShare, RoundContext, SecAggParams, UnmaskRequest, UnmaskResponse, decode_share_pair,
    encode_share_pair, graph_seed, pair_seed, pair_sign, share_aad, share_key,
};
use crate::ids::SiteId;

/// Fixed inputs of a site's secure round.
pub struct ClientConfig {
    pub site: SiteId,
    pub ctx: RoundContext,
    pub params: SecAggParams,
    pub signing_key: Arc<SigningKey>,
    /// The consortium's Ed25519 public keys, distributed out of band; the
    /// only keys whose signatures a site accepts.
    pub roster: Arc<BTreeMap<SiteId, [u8; 32]>>,
}

/// Everything a site refuses, each naming the offender.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ClientError {
    #[error("site `{0}` is not in the consortium roster")]
    NotInRoster(SiteId),
    #[error("signature of `{0}`'s advertised keys does not verify: keys were substituted or forged")]
    BadSignature(SiteId),
    #[error("site `{0}` advertised keys twice")]
    DuplicateKeys(SiteId),
    #[error("the key list does not contain this site's own keys unaltered")]
    OwnKeysMissing,
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
    #[error("unmask request is inconsistent: {0}")]
    InconsistentUnmask(String),
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

/// Phase 3: masked input sent, waiting for the unmask request.
pub struct ExpectUnmask {
    site: SiteId,
    threshold: usize,
    /// Shares held for each peer (self included) that sent them: (self-mask
    /// share, mask-key share).
    held: BTreeMap<SiteId, (Share, Share)>,
}

fn random_32(rng: &mut impl CryptoRng) -> [u8; 32] {
    let mut out = [0u8; 32];
    rng.fill_bytes(&mut out);
    out
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

    /// Verifies every advertised key against the roster, then secret-shares
    /// this site's self-mask seed and mask key with its neighbours.
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
            if !verify(public, &k.signed_bytes(&ctx), &k.signature) {
                return Err(ClientError::BadSignature(k.site.clone()));
            }
            if keys.insert(k.site.clone(), k.clone()).is_some() {
                return Err(ClientError::DuplicateKeys(k.site.clone()));
            }
        }
        if keys.get(&self.cfg.site) != Some(&self.advertised) {
            return Err(ClientError::OwnKeysMissing);
        }
        let needed = self.cfg.params.threshold;
        if keys.len() < needed {
            return Err(ClientError::TooFewSites {
                phase: "advertise keys",
                got: keys.len(),
                needed,
            });
        }
        let mut ordered: Vec<AdvertisedKeys> = keys.values().cloned().collect();
        ordered.sort_by(|a, b| a.site.cmp(&b.site));
        let u1: BTreeSet<SiteId> = keys.keys().cloned().collect();
        let neighbours = self.cfg.params.graph.neighbourhoods(&u1, graph_seed(&ctx, &ordered))[&self.cfg.site].clone();
        if neighbours.len() < needed {
            return Err(ClientError::TooFewSites {
                phase: "advertise keys (neighbourhood)",
                got: neighbours.len(),
                needed,
            });
        }
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
    ) -> Result<(ExpectUnmask, Vec<u32>), ClientError> {
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
        let needed = self.cfg.params.threshold;
        if held.len() < needed {
            return Err(ClientError::TooFewSites {
                phase: "share keys",
                got: held.len(),
                needed,
            });
        }
        let mut masked = input.to_vec();
        apply_mask(&mut masked, &self.self_mask_seed, Sign::Plus);
        for peer in held.keys().filter(|p| *p != me) {
            let seed = pair_seed(&self.mask_key, &self.keys[peer].mask_pk, &ctx, me, peer)
                .ok_or_else(|| ClientError::LowOrderKey(peer.clone()))?;
            apply_mask(&mut masked, &seed, pair_sign(me, peer));
        }
        Ok((
            ExpectUnmask {
                site: me.clone(),
                threshold: needed,
                held,
            },
            masked,
        ))
    }
}

impl ExpectUnmask {
    /// Reveals, for each neighbour that shared, the self-mask share if it
    /// survived or the mask-key share if it dropped: never both, and only
    /// once (this consumes the state).
    pub fn handle_unmask(self, request: &UnmaskRequest) -> Result<UnmaskResponse, ClientError> {
        let survivors: BTreeSet<&SiteId> = request.survivors.iter().collect();
        let dropped: BTreeSet<&SiteId> = request.dropped.iter().collect();
        let inconsistent = |m: String| Err(ClientError::InconsistentUnmask(m));
        if survivors.len() != request.survivors.len() || dropped.len() != request.dropped.len() {
            return inconsistent("a site is listed twice".into());
        }
        if let Some(both) = survivors.intersection(&dropped).next() {
            return inconsistent(format!("`{both}` is listed as both survivor and dropped"));
        }
        let listed: BTreeSet<&SiteId> = survivors.union(&dropped).copied().collect();
        let held: BTreeSet<&SiteId> = self.held.keys().collect();
        if listed != held {
            return inconsistent("the lists do not match the sites that shared with this site".into());
        }
        if !survivors.contains(&self.site) {
            return inconsistent("this site is not listed as a survivor".into());
        }
        if survivors.len() < self.threshold {
            return Err(ClientError::TooFewSites {
                phase: "unmask",
                got: survivors.len(),
                needed: self.threshold,
            });
        }
        let mut response = UnmaskResponse {
            self_mask_shares: Vec::new(),
            mask_key_shares: Vec::new(),
        };
        for (peer, (b, s)) in self.held {
            if survivors.contains(&peer) {
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
