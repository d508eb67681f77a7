//! Thin tonic services: identify the caller, decode, call one method of the
//! shared state or the protocol machines, encode. All mapping from domain
//! errors to gRPC codes is in [`RpcError`].

mod federation;
mod jobs;
mod ledger;

pub use federation::FederationService;
pub use jobs::JobsService;
pub use ledger::LedgerService;

use tessera_protocol::round::UpdateRejection;
use tonic::Status;

/// Every way a request can fail, by category; converted to a gRPC status in
/// one place so handlers never build a `Status` by hand.
#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl From<RpcError> for Status {
    fn from(e: RpcError) -> Self {
        match e {
            RpcError::InvalidArgument(m) => Status::invalid_argument(m),
            RpcError::PermissionDenied(m) => Status::permission_denied(m),
            RpcError::FailedPrecondition(m) => Status::failed_precondition(m),
            RpcError::NotFound(m) => Status::not_found(m),
            RpcError::AlreadyExists(m) => Status::already_exists(m),
            RpcError::Internal(e) => {
                tracing::error!("internal error: {e:#}");
                Status::internal("internal error (see coordinator log)")
            }
        }
    }
}

impl From<UpdateRejection> for RpcError {
    fn from(r: UpdateRejection) -> Self {
        let message = r.to_string();
        match r {
            UpdateRejection::UnknownSite(_) => RpcError::PermissionDenied(message),
            UpdateRejection::WrongJob { .. }
            | UpdateRejection::WrongRound { .. }
            | UpdateRejection::Dropped(_)
            | UpdateRejection::WrongBaseModel { .. } => RpcError::FailedPrecondition(message),
            UpdateRejection::Duplicate(_) => RpcError::AlreadyExists(message),
            UpdateRejection::NoSamples | UpdateRejection::BadLoss | UpdateRejection::Vector(_) => {
                RpcError::InvalidArgument(message)
            }
        }
    }
}
