//! A site's proof that its contribution was included in a round: the
//! genesis block (the trust anchor, compared out of band by its hash), the
//! round block with its signature and endorsements, and a Merkle inclusion
//! proof of the site's commitment under the block's commitment root.

use serde::{Deserialize, Serialize};

use super::payload::Payload;
use super::verify::Verifier;
use super::{Block, Endorsement, Header, merkle, sha256, verify_block_signature, verify_endorsement};
use crate::ids::SiteId;

pub const FORMAT: &str = "tessera-receipt-v1";

/// A block in a receipt: hex bytes, payload as its JSON text.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceiptBlock {
    pub header: String,
    pub payload: String,
    pub signature: String,
    pub endorsements: Vec<ReceiptEndorsement>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceiptEndorsement {
    pub site: String,
    pub signature: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    pub format: String,
    pub site: String,
    pub job_id: u64,
    pub round: u32,
    pub commitment: String,
    pub leaf_index: usize,
    pub tree_size: usize,
    pub audit_path: Vec<String>,
    pub genesis: ReceiptBlock,
    pub block: ReceiptBlock,
}

/// What a valid receipt establishes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checked {
    pub genesis_hash: [u8; 32],
    pub consortium: String,
    pub block_height: u64,
    pub block_hash: [u8; 32],
    /// Genesis members whose endorsement of the block is valid.
    pub endorsed_by: Vec<String>,
    pub quorum: usize,
}

#[derive(Debug, thiserror::Error)]
#[error("receipt is not valid: {0}")]
pub struct ReceiptError(pub String);

fn to_receipt_block(b: &Block) -> ReceiptBlock {
    ReceiptBlock {
        header: hex::encode(&b.header),
        payload: String::from_utf8_lossy(&b.payload).into_owned(),
        signature: hex::encode(&b.signature),
        endorsements: b
            .endorsements
            .iter()
            .map(|e| ReceiptEndorsement {
                site: e.site.to_string(),
                signature: hex::encode(&e.signature),
            })
            .collect(),
    }
}

fn from_receipt_block(b: &ReceiptBlock) -> Result<Block, ReceiptError> {
    let hex = |what: &str, s: &str| hex::decode(s).map_err(|_| ReceiptError(format!("{what} is not hex")));
    Ok(Block {
        header: hex("header", &b.header)?,
        payload: b.payload.as_bytes().to_vec(),
        signature: hex("signature", &b.signature)?,
        endorsements: b
            .endorsements
            .iter()
            .map(|e| {
                Ok(Endorsement {
                    site: SiteId::new(&e.site).map_err(|e| ReceiptError(e.to_string()))?,
                    signature: hex("endorsement", &e.signature)?,
                })
            })
            .collect::<Result<_, ReceiptError>>()?,
    })
}

/// Builds the receipt of `site` for the round recorded in `block`.
pub fn build(genesis: &Block, block: &Block, site: &SiteId) -> Result<Receipt, ReceiptError> {
    let header = Header::decode(&block.header).map_err(|e| ReceiptError(e.to_string()))?;
    let Ok(Payload::RoundCompleted(round)) = Payload::parse(header.kind, &block.payload) else {
        return Err(ReceiptError(format!("block {} is not a round block", header.height)));
    };
    let leaves = leaves(&round.commitments)?;
    let index = round
        .commitments
        .iter()
        .position(|c| c.site == site.as_str())
        .ok_or_else(|| {
            ReceiptError(format!(
                "`{site}` has no commitment in round {} of job {}",
                round.round, round.job_id
            ))
        })?;
    Ok(Receipt {
        format: FORMAT.to_owned(),
        site: site.to_string(),
        job_id: round.job_id,
        round: round.round,
        commitment: round.commitments[index].sha256.clone(),
        leaf_index: index,
        tree_size: leaves.len(),
        audit_path: merkle::proof(&leaves, index).iter().map(hex::encode).collect(),
        genesis: to_receipt_block(genesis),
        block: to_receipt_block(block),
    })
}

fn leaves(commitments: &[super::payload::Commitment]) -> Result<Vec<Vec<u8>>, ReceiptError> {
    commitments
        .iter()
        .map(|c| {
            let site = SiteId::new(&c.site).map_err(|e| ReceiptError(e.to_string()))?;
            let commitment = decode32(&c.sha256, "commitment")?;
            Ok(merkle::leaf(&site, &commitment))
        })
        .collect()
}

fn decode32(s: &str, what: &str) -> Result<[u8; 32], ReceiptError> {
    hex::decode(s)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| ReceiptError(format!("{what} is not 32 hex bytes")))
}

/// Checks a receipt offline: the genesis block is self-consistent, the
/// round block is signed by the genesis coordinator key, its payload is the
/// one its header commits to, and the site's commitment is in its tree.
pub fn check(receipt: &Receipt) -> Result<Checked, ReceiptError> {
    if receipt.format != FORMAT {
        return Err(ReceiptError(format!("unknown format `{}`", receipt.format)));
    }
    let genesis = from_receipt_block(&receipt.genesis)?;
    let mut verifier = Verifier::new();
    verifier
        .push(&Block {
            endorsements: Vec::new(),
            ..genesis.clone()
        })
        .map_err(|e| ReceiptError(format!("genesis: {e}")))?;
    let g = verifier.genesis().expect("genesis was pushed").clone();
    let coordinator_key = decode32(&g.coordinator_key, "coordinator key")?;
    let block = from_receipt_block(&receipt.block)?;
    let header = Header::decode(&block.header).map_err(|e| ReceiptError(e.to_string()))?;
    let hash = header.hash();
    if sha256(&block.payload) != header.payload_hash {
        return Err(ReceiptError("block payload does not match its header".into()));
    }
    if !verify_block_signature(&coordinator_key, &hash, &block.signature) {
        return Err(ReceiptError("coordinator signature of the block is not valid".into()));
    }
    let mut endorsed_by = Vec::new();
    for e in &block.endorsements {
        let key = verifier
            .member_key(&e.site)
            .ok_or_else(|| ReceiptError(format!("endorsement by non-member `{}`", e.site)))?;
        if !verify_endorsement(&key, &hash, &e.signature) {
            return Err(ReceiptError(format!("endorsement by `{}` is not valid", e.site)));
        }
        endorsed_by.push(e.site.to_string());
    }
    let Ok(Payload::RoundCompleted(round)) = Payload::parse(header.kind, &block.payload) else {
        return Err(ReceiptError("the block is not a round block".into()));
    };
    if (round.job_id, round.round) != (receipt.job_id, receipt.round) {
        return Err(ReceiptError("the block records another round".into()));
    }
    let root = decode32(&round.commitment_root, "commitment root")?;
    let site = SiteId::new(&receipt.site).map_err(|e| ReceiptError(e.to_string()))?;
    let commitment = decode32(&receipt.commitment, "commitment")?;
    let path = receipt
        .audit_path
        .iter()
        .map(|p| decode32(p, "audit path entry"))
        .collect::<Result<Vec<_>, _>>()?;
    if !merkle::verify(
        &root,
        &merkle::leaf(&site, &commitment),
        receipt.leaf_index,
        receipt.tree_size,
        &path,
    ) {
        return Err(ReceiptError(format!(
            "the commitment of `{site}` is not under the block's commitment root"
        )));
    }
    Ok(Checked {
        genesis_hash: sha256(&genesis.header),
        consortium: g.consortium,
        block_height: header.height,
        block_hash: hash,
        endorsed_by,
        quorum: g.quorum,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::testkit::TestConsortium;

    #[test]
    fn a_receipt_proves_inclusion_and_any_change_breaks_it() {
        let mut c = TestConsortium::new(5);
        c.job(1, 2);
        let round_block = c
            .blocks
            .iter()
            .find(|b| {
                let h = Header::decode(&b.header).unwrap();
                matches!(Payload::parse(h.kind, &b.payload), Ok(Payload::RoundCompleted(r)) if r.round == 2)
            })
            .unwrap();
        let height = Header::decode(&round_block.header).unwrap().height;
        let site = SiteId::new("site-3").unwrap();
        let receipt = build(&c.blocks[0], round_block, &site).unwrap();
        assert_eq!((receipt.job_id, receipt.round), (1, 2));
        let checked = check(&receipt).unwrap();
        assert_eq!(checked.block_height, height);
        assert_eq!(checked.endorsed_by.len(), 5);
        // Survives JSON.
        let text = serde_json::to_string(&receipt).unwrap();
        check(&serde_json::from_str(&text).unwrap()).unwrap();

        let mut other_commitment = receipt.clone();
        other_commitment.commitment = crate::ids::sha256_hex(b"not mine");
        assert!(check(&other_commitment).unwrap_err().to_string().contains("not under"));
        let mut wrong_index = receipt.clone();
        wrong_index.leaf_index = (wrong_index.leaf_index + 1) % wrong_index.tree_size;
        assert!(check(&wrong_index).is_err());
        let mut edited_payload = receipt.clone();
        edited_payload.block.payload = edited_payload.block.payload.replace("fedavg", "fedprx");
        assert!(check(&edited_payload).unwrap_err().to_string().contains("payload"));
        let mut other_site = receipt.clone();
        other_site.site = "site-1".into();
        assert!(check(&other_site).is_err());
        // A site that is not in the round gets no receipt.
        assert!(build(&c.blocks[0], round_block, &SiteId::new("stranger").unwrap()).is_err());
    }
}
