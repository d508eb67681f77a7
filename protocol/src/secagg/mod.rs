//! Secure aggregation (Bonawitz et al. 2017, "Practical Secure Aggregation for
//! Privacy-Preserving Machine Learning"), with SecAgg+'s sparse masking graph
//! (Bell et al. 2020) as an option. Pure state machines: the coordinator runs
//! a [`server`] machine, each site a [`client`] machine; the IO layers only
//! move the messages defined here.
//!
//! ```text
//!  site u                                   coordinator
//!  ExpectKeys     ── AdvertisedKeys (signed) ──►  ExpectKeys        U1 = advertisers
//!                 ◄── all AdvertisedKeys ───────
//!  ExpectShares   ── EncryptedShare per peer ──►  ExpectShares      U2 = sharers
//!                 ◄── shares addressed to u ────
//!  ExpectSurvivors ─ masked input y_u ─────────►  ExpectMaskedInputs U3 = maskers
//!                 ◄── U3 ───────────────────────
//!  ExpectSignatures ─ signature over U3 ───────►  ExpectConsistency  (Bonawitz §4)
//!                 ◄── every signature over U3 ──
//!  (done)         ── UnmaskResponse ───────────►  ExpectUnmasking   → Σ x_u over U3
//! ```
//!
//! **Against a malicious coordinator** (docs/threat-model.md) a site decides
//! every privacy-relevant number itself: the threshold `t` comes from the
//! job's accepted cohort in the site's verified ledger replica (and is signed
//! into each advertisement, so every site in a round uses the same one), the
//! key list must be a subset of that cohort, and no message goes out for an
//! aggregate that could end with fewer than `min_contributors` sites. Before
//! revealing anything, a site needs valid signatures of at least
//! [`SecAggParams::consistency_quorum`] cohort members on the very set U3 it
//! signed; since an honest site signs one U3 per round and the quorum is a
//! majority of the cohort, two different survivor sets can never both reach
//! it. The unmask response is then computed by the site from that U3 alone:
//! the coordinator never tells a site which shares to reveal.
//!
//! `y_u = x_u + PRG(b_u) + Σ_{v∈U2∩N(u)} ±PRG(s_uv) (mod 2^32)`: pairwise
//! masks cancel in the sum; self masks `b_u` of survivors and pairwise masks
//! of sites that dropped after sharing are rebuilt from Shamir shares.
//! Advertised keys are signed with each site's long-term Ed25519 key and
//! verified by every peer against the consortium roster, so a coordinator
//! cannot substitute keys.

pub mod client;
pub mod crypto;
pub mod exact;
pub mod graph;
pub mod mask;
pub mod quantize;
pub mod server;
pub mod shamir;

use crate::ids::SiteId;

/// What binds every signature, key derivation and ciphertext to one round of
/// one job, so nothing can be replayed into another.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RoundContext {
    pub job_id: u64,
    pub round: u32,
}

impl RoundContext {
    pub fn bytes(&self) -> [u8; 12] {
        let mut out = [0u8; 12];
        out[..8].copy_from_slice(&self.job_id.to_le_bytes());
        out[8..].copy_from_slice(&self.round.to_le_bytes());
        out
    }
}

/// Phase 1 message: a site's two fresh X25519 public keys, a commitment to
/// its self-mask seed and the Shamir threshold it shares with, signed with
/// its long-term key.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AdvertisedKeys {
    pub site: SiteId,
    /// Key agreement for encrypting shares.
    pub enc_pk: [u8; 32],
    /// Key agreement for pairwise masks.
    pub mask_pk: [u8; 32],
    /// SHA-256 of the self-mask seed `b_u`; lets the coordinator check a
    /// reconstructed seed.
    pub self_mask_hash: [u8; 32],
    /// The threshold this site splits its secrets with, derived from the
    /// job's cohort in its own ledger replica: every peer checks that it is
    /// the same as its own, so a coordinator cannot give one site a smaller
    /// threshold than the others.
    pub threshold: u32,
    /// The cohort size the site derived its parameters (threshold,
    /// quantiser) from; checked like the threshold.
    pub cohort_size: u32,
    /// [`cohort_digest`] of the cohort the site read from its ledger (and,
    /// where categories are discovered, of its encoding): checked like the
    /// threshold, so two sites whose ledgers disagree on the cohort (not
    /// only on its size), or whose vectors mean different things, never
    /// share with each other.
    pub cohort_sha256: [u8; 32],
    /// Ed25519 over [`AdvertisedKeys::signed_bytes`].
    pub signature: Vec<u8>,
}

impl AdvertisedKeys {
    /// The exact bytes that are signed.
    pub fn signed_bytes(&self, ctx: &RoundContext) -> Vec<u8> {
        let mut out = Vec::with_capacity(160);
        out.extend_from_slice(b"tessera/secagg/v2/advertise");
        out.extend_from_slice(&ctx.bytes());
        out.extend_from_slice(&(self.site.as_str().len() as u32).to_le_bytes());
        out.extend_from_slice(self.site.as_str().as_bytes());
        out.extend_from_slice(&self.enc_pk);
        out.extend_from_slice(&self.mask_pk);
        out.extend_from_slice(&self.self_mask_hash);
        out.extend_from_slice(&self.threshold.to_le_bytes());
        out.extend_from_slice(&self.cohort_size.to_le_bytes());
        out.extend_from_slice(&self.cohort_sha256);
        out
    }
}

/// SHA-256 of a job's cohort: `"tessera/secagg/v2/cohort"`, the number of
/// sites, then each site id (length-prefixed), in ascending order. With an
/// encoding ([`client::ClientConfig::encoding`]): the domain
/// `"tessera/secagg/v3/cohort"` and the 32-byte encoding hash after the ids.
pub fn cohort_digest(cohort: &std::collections::BTreeSet<SiteId>, encoding: Option<&[u8; 32]>) -> [u8; 32] {
    let mut out = Vec::with_capacity(64 + 24 * cohort.len());
    out.extend_from_slice(match encoding {
        None => b"tessera/secagg/v2/cohort",
        Some(_) => b"tessera/secagg/v3/cohort",
    });
    out.extend_from_slice(&(cohort.len() as u32).to_le_bytes());
    for site in cohort {
        out.extend_from_slice(&(site.as_str().len() as u32).to_le_bytes());
        out.extend_from_slice(site.as_str().as_bytes());
    }
    if let Some(encoding) = encoding {
        out.extend_from_slice(encoding);
    }
    client::sha256(&out)
}

/// The exact bytes a site signs in the consistency check: the round and the
/// sorted set U3 of sites whose masked inputs the coordinator says it holds.
pub fn survivors_signed_bytes(ctx: &RoundContext, survivors: &std::collections::BTreeSet<SiteId>) -> Vec<u8> {
    let mut out = Vec::with_capacity(48 + 24 * survivors.len());
    out.extend_from_slice(b"tessera/secagg/v2/survivors");
    out.extend_from_slice(&ctx.bytes());
    out.extend_from_slice(&(survivors.len() as u32).to_le_bytes());
    for site in survivors {
        out.extend_from_slice(&(site.as_str().len() as u32).to_le_bytes());
        out.extend_from_slice(site.as_str().as_bytes());
    }
    out
}

/// Consistency-check message: one site's signature over U3.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SurvivorSignature {
    pub site: SiteId,
    /// Ed25519 over [`survivors_signed_bytes`].
    pub signature: Vec<u8>,
}

/// Phase 2 message: Shamir shares of the sender's self-mask seed and mask key
/// for one recipient, encrypted so only that recipient can read them.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EncryptedShare {
    pub from: SiteId,
    pub to: SiteId,
    pub ciphertext: Vec<u8>,
}

/// Last message of a site: for each neighbour that shared with it, the
/// self-mask share if the neighbour is in the signed U3, else the mask-key
/// share; never both.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UnmaskResponse {
    /// (owner, share of owner's self-mask seed), one per requested survivor.
    pub self_mask_shares: Vec<(SiteId, shamir::Share)>,
    /// (owner, share of owner's mask key), one per requested dropped site.
    pub mask_key_shares: Vec<(SiteId, shamir::Share)>,
}

/// The phase at which a site left a round.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub enum Phase {
    AdvertiseKeys,
    ShareKeys,
    MaskedInput,
    /// Signing U3 (Bonawitz's ConsistencyCheck).
    Consistency,
    Unmask,
}

/// Sizes and thresholds of one secure round.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SecAggParams {
    pub graph: graph::Graph,
    /// Shamir threshold t.
    pub threshold: usize,
    /// Size of the job's cohort (the sites that signed their acceptance of
    /// the job): what the threshold and the consistency quorum are
    /// majorities of.
    pub cohort_size: usize,
    /// No sum over fewer sites is released (never below 3).
    pub min_sites: usize,
    /// Length of each input vector (update coordinates + 1 weight).
    pub vector_len: usize,
}

impl SecAggParams {
    /// The fewest contributors a released sum may have.
    pub fn min_contributors(&self) -> usize {
        self.min_sites.max(3).max(self.threshold)
    }

    /// Valid signatures on one survivor set a site needs before it reveals
    /// any share: a strict majority of the cohort (and at least t), so no
    /// two different sets can both collect it from honest sites.
    pub fn consistency_quorum(&self) -> usize {
        self.threshold.max(self.cohort_size / 2 + 1)
    }
}

/// Encodes a share pair for encryption: `x_b ‖ y_b ‖ x_s ‖ y_s` (66 bytes).
fn encode_share_pair(b: &shamir::Share, s: &shamir::Share) -> Vec<u8> {
    let mut out = Vec::with_capacity(66);
    out.push(b.x);
    out.extend_from_slice(&b.y);
    out.push(s.x);
    out.extend_from_slice(&s.y);
    out
}

fn decode_share_pair(bytes: &[u8]) -> Option<(shamir::Share, shamir::Share)> {
    if bytes.len() != 66 {
        return None;
    }
    let mut yb = [0u8; 32];
    yb.copy_from_slice(&bytes[1..33]);
    let mut ys = [0u8; 32];
    ys.copy_from_slice(&bytes[34..66]);
    Some((
        shamir::Share { x: bytes[0], y: yb },
        shamir::Share { x: bytes[33], y: ys },
    ))
}

/// Associated data of a share ciphertext: context, sender, recipient.
fn share_aad(ctx: &RoundContext, from: &SiteId, to: &SiteId) -> Vec<u8> {
    let mut aad = ctx.bytes().to_vec();
    for id in [from, to] {
        aad.extend_from_slice(&(id.as_str().len() as u32).to_le_bytes());
        aad.extend_from_slice(id.as_str().as_bytes());
    }
    aad
}

/// Key for the share ciphertext from `from` to `to` (direction-specific).
fn share_key(
    own: &crypto::DhKeyPair,
    peer_pk: &[u8; 32],
    ctx: &RoundContext,
    from: &SiteId,
    to: &SiteId,
) -> Option<[u8; 32]> {
    own.agree(
        peer_pk,
        &[
            b"tessera/secagg/v1/share",
            &ctx.bytes(),
            from.as_str().as_bytes(),
            b"\0",
            to.as_str().as_bytes(),
        ],
    )
}

/// Seed of the pairwise mask between `a` and `b` (symmetric).
fn pair_seed(
    own: &crypto::DhKeyPair,
    peer_pk: &[u8; 32],
    ctx: &RoundContext,
    a: &SiteId,
    b: &SiteId,
) -> Option<[u8; 32]> {
    let (lo, hi) = if a < b { (a, b) } else { (b, a) };
    own.agree(
        peer_pk,
        &[
            b"tessera/secagg/v1/mask",
            &ctx.bytes(),
            lo.as_str().as_bytes(),
            b"\0",
            hi.as_str().as_bytes(),
        ],
    )
}

/// The sign with which `owner` adds its pairwise mask with `peer`.
fn pair_sign(owner: &SiteId, peer: &SiteId) -> mask::Sign {
    if owner < peer {
        mask::Sign::Plus
    } else {
        mask::Sign::Minus
    }
}

/// Public seed of the sparse graph: hash of the context and every advertised
/// key, known only once all keys are fixed.
fn graph_seed(ctx: &RoundContext, keys: &[AdvertisedKeys]) -> [u8; 32] {
    let mut ctx_bytes = ring::digest::Context::new(&ring::digest::SHA256);
    ctx_bytes.update(b"tessera/secagg/v1/graph");
    ctx_bytes.update(&ctx.bytes());
    for k in keys {
        ctx_bytes.update(k.site.as_str().as_bytes());
        ctx_bytes.update(&k.mask_pk);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx_bytes.finish().as_ref());
    out
}

/// SHA-256 of a masked input (little-endian u32 words): the commitment that
/// goes into the round transcript.
pub fn commitment(masked: &[u32]) -> [u8; 32] {
    crate::ids::sha256_le_words(masked)
}

#[cfg(test)]
mod adversary;
#[cfg(test)]
mod sim;
