//! The tamper-evident ledger: hash-chained blocks signed by the coordinator
//! and endorsed by the sites. Pure code: encoding, hashing, signing,
//! verification, Merkle proofs and receipts. `docs/ledger-format.md` is the
//! byte-for-byte specification this module implements; an independent
//! verifier (`scripts/verify_ledger.py`) is written from that page alone.

#[cfg(any(test, feature = "testkit"))]
pub mod corpus;
pub mod equivocation;
pub mod merkle;
pub mod payload;
pub mod pin;
pub mod receipt;
#[cfg(feature = "io")]
pub mod store;
#[cfg(any(test, feature = "testkit"))]
pub mod testkit;
pub mod verify;
pub mod writer;

use ring::digest;

use crate::ids::SiteId;
use crate::secagg::crypto::{SigningKey, verify as verify_signature};
use payload::DeclaredCounts;

/// The only block format version so far.
pub const VERSION: u16 = 1;
/// Length of an encoded header: version (2) + height (8) + previous hash (32)
/// + timestamp (8) + kind (1) + payload hash (32).
pub const HEADER_LEN: usize = 83;
/// Prefix of the message the coordinator signs (followed by the block hash):
/// a signature over a ledger block can never be replayed as anything else.
pub const COORDINATOR_DOMAIN: &[u8] = b"tessera/ledger/v1/coordinator";
/// Prefix of the message a site signs to endorse a block.
pub const ENDORSE_DOMAIN: &[u8] = b"tessera/ledger/v1/endorse";

/// Prefix of the message a site signs to accept or reject a job.
pub const DECISION_DOMAIN: &[u8] = b"tessera/ledger/v1/job-decision";
/// Domain of a site's old key consenting to its replacement.
pub const ROTATION_DOMAIN: &[u8] = b"tessera/ledger/v1/key-rotation";

/// What a block records. The numbers are part of the format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Genesis = 0,
    JobCreated = 1,
    JobAccepted = 2,
    RoundCompleted = 3,
    Metrics = 4,
    JobEnded = 5,
    MembershipChange = 6,
    Summation = 7,
    CohortSealed = 8,
    ModelsPruned = 9,
}

impl Kind {
    pub const ALL: [Kind; 10] = [
        Kind::Genesis,
        Kind::JobCreated,
        Kind::JobAccepted,
        Kind::RoundCompleted,
        Kind::Metrics,
        Kind::JobEnded,
        Kind::MembershipChange,
        Kind::Summation,
        Kind::CohortSealed,
        Kind::ModelsPruned,
    ];

    pub fn from_byte(b: u8) -> Option<Kind> {
        Kind::ALL.get(usize::from(b)).copied()
    }

    /// The name used in listings, JSON and the specification.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Genesis => "genesis",
            Kind::JobCreated => "job_created",
            Kind::JobAccepted => "job_accepted",
            Kind::RoundCompleted => "round_completed",
            Kind::Metrics => "metrics",
            Kind::JobEnded => "job_ended",
            Kind::MembershipChange => "membership_change",
            Kind::Summation => "summation",
            Kind::CohortSealed => "cohort_sealed",
            Kind::ModelsPruned => "models_pruned",
        }
    }
}

/// A block header: what the block hash covers. The payload is bound to it
/// through its SHA-256.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub version: u16,
    pub height: u64,
    pub prev_hash: [u8; 32],
    pub timestamp_ms: u64,
    pub kind: Kind,
    pub payload_hash: [u8; 32],
}

/// Why header bytes are not a header.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum HeaderError {
    #[error("header is {0} bytes, expected {HEADER_LEN}")]
    Length(usize),
    #[error("unknown format version {0}")]
    Version(u16),
    #[error("unknown block kind {0}")]
    Kind(u8),
}

impl Header {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0..2].copy_from_slice(&self.version.to_be_bytes());
        out[2..10].copy_from_slice(&self.height.to_be_bytes());
        out[10..42].copy_from_slice(&self.prev_hash);
        out[42..50].copy_from_slice(&self.timestamp_ms.to_be_bytes());
        out[50] = self.kind as u8;
        out[51..83].copy_from_slice(&self.payload_hash);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Header, HeaderError> {
        if bytes.len() != HEADER_LEN {
            return Err(HeaderError::Length(bytes.len()));
        }
        let version = u16::from_be_bytes([bytes[0], bytes[1]]);
        if version != VERSION {
            return Err(HeaderError::Version(version));
        }
        let kind = Kind::from_byte(bytes[50]).ok_or(HeaderError::Kind(bytes[50]))?;
        Ok(Header {
            version,
            height: u64::from_be_bytes(bytes[2..10].try_into().expect("8 bytes")),
            prev_hash: bytes[10..42].try_into().expect("32 bytes"),
            timestamp_ms: u64::from_be_bytes(bytes[42..50].try_into().expect("8 bytes")),
            kind,
            payload_hash: bytes[51..83].try_into().expect("32 bytes"),
        })
    }

    /// The block hash: SHA-256 of the encoded header.
    pub fn hash(&self) -> [u8; 32] {
        sha256(&self.encode())
    }
}

pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    digest::digest(&digest::SHA256, bytes)
        .as_ref()
        .try_into()
        .expect("SHA-256 is 32 bytes")
}

/// A site's signature over a block hash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endorsement {
    pub site: SiteId,
    pub signature: Vec<u8>,
}

/// A block as stored and shipped: the exact bytes that were hashed and
/// signed, never a re-encoding of parsed values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Block {
    pub header: Vec<u8>,
    pub payload: Vec<u8>,
    pub signature: Vec<u8>,
    pub endorsements: Vec<Endorsement>,
}

impl Block {
    /// SHA-256 of the header bytes as stored (whether or not they decode).
    pub fn hash(&self) -> [u8; 32] {
        sha256(&self.header)
    }
}

fn signed_message(domain: &[u8], block_hash: &[u8; 32]) -> Vec<u8> {
    [domain, block_hash.as_slice()].concat()
}

/// The coordinator's signature over a block hash.
pub fn sign_block(key: &SigningKey, block_hash: &[u8; 32]) -> Vec<u8> {
    key.sign(&signed_message(COORDINATOR_DOMAIN, block_hash))
}

pub fn verify_block_signature(coordinator_key: &[u8; 32], block_hash: &[u8; 32], signature: &[u8]) -> bool {
    verify_signature(
        coordinator_key,
        &signed_message(COORDINATOR_DOMAIN, block_hash),
        signature,
    )
}

/// A site's endorsement of a block it has verified.
pub fn endorse(key: &SigningKey, block_hash: &[u8; 32]) -> Vec<u8> {
    key.sign(&signed_message(ENDORSE_DOMAIN, block_hash))
}

pub fn verify_endorsement(site_key: &[u8; 32], block_hash: &[u8; 32], signature: &[u8]) -> bool {
    verify_signature(site_key, &signed_message(ENDORSE_DOMAIN, block_hash), signature)
}

/// The bytes a site signs for its decision on a job: the domain, the job id
/// (u64 BE), the job file's SHA-256 (32 bytes), 1 (accept) or 0 (reject),
/// then, when it declares them, its training and test row counts (u64 BE
/// each). The two layouts differ in length, so neither reads as the other.
pub fn decision_message(
    job_id: u64,
    job_sha256: &[u8; 32],
    accepted: bool,
    counts: Option<&DeclaredCounts>,
) -> Vec<u8> {
    let mut message = [
        DECISION_DOMAIN,
        &job_id.to_be_bytes(),
        job_sha256.as_slice(),
        &[u8::from(accepted)],
    ]
    .concat();
    if let Some(c) = counts {
        message.extend(c.n_train.to_be_bytes());
        message.extend(c.n_test.to_be_bytes());
    }
    message
}

/// A site's signed decision on a job.
pub fn sign_decision(
    key: &SigningKey,
    job_id: u64,
    job_sha256: &[u8; 32],
    accepted: bool,
    counts: Option<&DeclaredCounts>,
) -> Vec<u8> {
    key.sign(&decision_message(job_id, job_sha256, accepted, counts))
}

/// Checks a decision's signature; a rejection never carries counts (a site
/// that does not take part declares nothing about its data).
pub fn verify_decision(
    site_key: &[u8; 32],
    job_id: u64,
    job_sha256: &[u8; 32],
    accepted: bool,
    counts: Option<&DeclaredCounts>,
    signature: &[u8],
) -> bool {
    (accepted || counts.is_none())
        && verify_signature(
            site_key,
            &decision_message(job_id, job_sha256, accepted, counts),
            signature,
        )
}

/// The bytes a site's *old* key signs to hand its membership to a new key:
/// the domain, u16 BE length of the site id, the id's UTF-8 bytes and the
/// new 32-byte public key. Without it a coordinator (or a CA) could swap a
/// site's key for one it holds and endorse in the site's name.
pub fn rotation_message(site: &SiteId, new_key: &[u8; 32]) -> Vec<u8> {
    let id = site.as_str().as_bytes();
    let len = u16::try_from(id.len()).expect("site ids are short");
    [ROTATION_DOMAIN, &len.to_be_bytes(), id, new_key.as_slice()].concat()
}

/// The old key's consent to a key rotation.
pub fn sign_rotation(old_key: &SigningKey, site: &SiteId, new_key: &[u8; 32]) -> Vec<u8> {
    old_key.sign(&rotation_message(site, new_key))
}

pub fn verify_rotation(old_key: &[u8; 32], site: &SiteId, new_key: &[u8; 32], signature: &[u8]) -> bool {
    verify_signature(old_key, &rotation_message(site, new_key), signature)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn header_layout_matches_the_specification() {
        let header = Header {
            version: 1,
            height: 0x0102,
            prev_hash: [0xaa; 32],
            timestamp_ms: 0x0a0b_0c0d,
            kind: Kind::RoundCompleted,
            payload_hash: [0xbb; 32],
        };
        let bytes = header.encode();
        assert_eq!(&bytes[..2], &[0, 1]);
        assert_eq!(&bytes[2..10], &[0, 0, 0, 0, 0, 0, 1, 2]);
        assert_eq!(&bytes[42..50], &[0, 0, 0, 0, 0x0a, 0x0b, 0x0c, 0x0d]);
        assert_eq!(bytes[50], 3);
        // Known answer: SHA-256 of this exact header, computed independently
        // (`python3 -c "import hashlib; ..."`, see docs/ledger-format.md).
        assert_eq!(
            hex::encode(header.hash()),
            "be1a86cddd4ae975e7c62eab53278596f221fd02906ac98f3e2ea2cbbb70afa0"
        );
    }

    proptest! {
        #[test]
        fn headers_round_trip(height: u64, ts: u64, kind in 0u8..7, prev: [u8; 32], ph: [u8; 32]) {
            let header = Header {
                version: VERSION,
                height,
                prev_hash: prev,
                timestamp_ms: ts,
                kind: Kind::from_byte(kind).unwrap(),
                payload_hash: ph,
            };
            prop_assert_eq!(Header::decode(&header.encode()).unwrap(), header);
        }

        #[test]
        fn arbitrary_bytes_never_panic_the_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..100)) {
            let _ = Header::decode(&bytes);
        }
    }

    #[test]
    fn signatures_are_domain_separated() {
        let key = SigningKey::from_pkcs8(&SigningKey::generate_pkcs8()).unwrap();
        let hash = [7u8; 32];
        let by_coordinator = sign_block(&key, &hash);
        let by_site = endorse(&key, &hash);
        assert!(verify_block_signature(&key.public_key(), &hash, &by_coordinator));
        assert!(verify_endorsement(&key.public_key(), &hash, &by_site));
        // A coordinator signature is not an endorsement, and vice versa.
        assert!(!verify_endorsement(&key.public_key(), &hash, &by_coordinator));
        assert!(!verify_block_signature(&key.public_key(), &hash, &by_site));
    }
}
#[cfg(test)]
mod tamper_tests;
