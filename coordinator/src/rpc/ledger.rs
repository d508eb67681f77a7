//! The `Ledger` service: sites replicate and endorse the chain, auditors
//! read it. Reading is open to any caller that reaches the coordinator (the
//! chain holds no records, updates or keys); an endorsement is accepted
//! only with a valid signature by a member at that block.

use std::sync::Arc;

use tessera_protocol::identity::Identity;
use tessera_protocol::ids::SiteId;
use tessera_protocol::pb::ledger_server::Ledger;
use tessera_protocol::{pb, wire};
use tonic::{Request, Response, Status};
use tracing::warn;

use super::RpcError;
use crate::ledger::EndorseError;
use crate::state::Shared;
use crate::tls::Caller;

/// Blocks per `GetBlocks` answer unless the caller asks for fewer: keeps an
/// answer far below gRPC's 4 MiB default message limit.
const MAX_BLOCKS: u32 = 256;

/// Endorsements per `EndorseBlocks` call: a few syncs' worth of blocks.
const MAX_ENDORSEMENTS: usize = 4 * MAX_BLOCKS as usize;

/// The longest a `GetBlocks` long poll for finality is held.
const MAX_FINALITY_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

pub struct LedgerService {
    shared: Arc<Shared>,
}

impl LedgerService {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

#[tonic::async_trait]
impl Ledger for LedgerService {
    async fn get_blocks(
        &self,
        request: Request<pb::GetBlocksRequest>,
    ) -> Result<Response<pb::GetBlocksResponse>, Status> {
        let request = request.into_inner();
        let limit = match request.max_blocks {
            0 => MAX_BLOCKS,
            n => n.min(MAX_BLOCKS),
        };
        let ledger = &self.shared.ledger;
        if request.wait_ms > 0 && request.wait_final_below > request.from_height {
            let wait = std::time::Duration::from_millis(u64::from(request.wait_ms)).min(MAX_FINALITY_WAIT);
            ledger
                .wait_final(request.from_height, request.wait_final_below, wait)
                .await
                .map_err(RpcError::Internal)?;
        }
        let chain_length = ledger.chain_length().await;
        let blocks = ledger
            .blocks_from(request.from_height, u64::from(limit))
            .await
            .map_err(|e| RpcError::Internal(e.into()))?;
        let blocks = blocks
            .into_iter()
            .enumerate()
            .map(|(i, (b, _))| wire::block_to_pb(request.from_height + i as u64, b))
            .collect();
        Ok(Response::new(pb::GetBlocksResponse { blocks, chain_length }))
    }

    async fn endorse(&self, request: Request<pb::EndorseRequest>) -> Result<Response<pb::EndorseResponse>, Status> {
        let caller = Caller::of(&request).cloned();
        self.take_endorsement(caller.as_ref(), request.into_inner()).await?;
        Ok(Response::new(pb::EndorseResponse {}))
    }

    async fn endorse_blocks(
        &self,
        request: Request<pb::EndorseBlocksRequest>,
    ) -> Result<Response<pb::EndorseResponse>, Status> {
        let caller = Caller::of(&request).cloned();
        let endorsements = request.into_inner().endorsements;
        if endorsements.len() > MAX_ENDORSEMENTS {
            return Err(RpcError::InvalidArgument(format!(
                "{} endorsements in one call; at most {MAX_ENDORSEMENTS}",
                endorsements.len()
            ))
            .into());
        }
        for endorsement in endorsements {
            self.take_endorsement(caller.as_ref(), endorsement).await?;
        }
        Ok(Response::new(pb::EndorseResponse {}))
    }
}

impl LedgerService {
    /// Checks and stores one endorsement, or says why it is refused.
    async fn take_endorsement(&self, caller: Option<&Identity>, request: pb::EndorseRequest) -> Result<(), Status> {
        let site = SiteId::new(&request.site_id).map_err(|e| RpcError::InvalidArgument(e.to_string()))?;
        // Only a site endorses, and only as itself (the signature would fail
        // anyway; this says why).
        if let Some(identity) = caller
            && identity.site().as_ref() != Some(&site)
        {
            warn!(%identity, claimed = %site, "endorsement under another identity refused");
            return Err(RpcError::PermissionDenied(format!(
                "the certificate identifies {identity}; it cannot endorse as site `{site}`"
            ))
            .into());
        }
        let result = self
            .shared
            .ledger
            .endorse(&site, request.height, &request.block_hash, &request.signature)
            .await;
        result.map_err(|e| {
            let refusal = e.to_string();
            let error = match e {
                EndorseError::NoSuchBlock(_) => RpcError::NotFound(refusal.clone()),
                EndorseError::NotMember { .. } => RpcError::PermissionDenied(refusal.clone()),
                EndorseError::WrongHash(_) => RpcError::FailedPrecondition(refusal.clone()),
                EndorseError::BadSignature(_) => RpcError::InvalidArgument(refusal.clone()),
                EndorseError::Store(e) => RpcError::Internal(e.into()),
            };
            // An internal error (a full disk) is logged once, as such.
            if !matches!(error, RpcError::Internal(_)) {
                warn!(%site, height = request.height, "endorsement refused: {refusal}");
            }
            error.into()
        })
    }
}
