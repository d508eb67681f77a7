//! The coordinator's side of the chain: turns payloads into signed blocks.

use super::payload::Payload;
use super::{Block, Header, VERSION, sha256, sign_block};
use crate::secagg::crypto::SigningKey;

/// Appends blocks after a known tip. Holds no storage: the caller stores
/// each block (and only then lets its effect happen) before asking for the
/// next one.
pub struct ChainWriter {
    key: SigningKey,
    tip: Option<Tip>,
}

/// The last block's height, hash and timestamp.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tip {
    pub height: u64,
    pub hash: [u8; 32],
    pub timestamp_ms: u64,
}

impl ChainWriter {
    /// `tip` is the last stored block, `None` for an empty ledger.
    pub fn new(key: SigningKey, tip: Option<Tip>) -> Self {
        Self { key, tip }
    }

    pub fn tip(&self) -> Option<Tip> {
        self.tip
    }

    pub fn public_key(&self) -> [u8; 32] {
        self.key.public_key()
    }

    /// The next block. Timestamps never go backwards, even if the clock does.
    /// The writer's tip moves only when the caller `commit`s the block, so a
    /// block that failed to store is never chained onto.
    pub fn next_block(&self, payload: &Payload, now_ms: u64) -> (Block, Tip) {
        self.block_after(self.tip, payload, now_ms)
    }

    /// A block after `tip` rather than the committed tip: for several blocks
    /// written in one transaction.
    pub fn block_after(&self, tip: Option<Tip>, payload: &Payload, now_ms: u64) -> (Block, Tip) {
        let bytes = payload.to_json();
        let (height, prev_hash, timestamp_ms) = match tip {
            None => (0, [0u8; 32], now_ms),
            Some(t) => (t.height + 1, t.hash, now_ms.max(t.timestamp_ms)),
        };
        let header = Header {
            version: VERSION,
            height,
            prev_hash,
            timestamp_ms,
            kind: payload.kind(),
            payload_hash: sha256(&bytes),
        };
        let hash = header.hash();
        let block = Block {
            header: header.encode().to_vec(),
            payload: bytes,
            signature: sign_block(&self.key, &hash),
            endorsements: Vec::new(),
        };
        (
            block,
            Tip {
                height,
                hash,
                timestamp_ms,
            },
        )
    }

    /// Records that the block ending at `tip` is stored.
    pub fn commit(&mut self, tip: Tip) {
        self.tip = Some(tip);
    }
}
