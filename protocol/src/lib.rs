//! Tessera's protocol core: everything two parties must agree on, and nothing
//! that touches a socket, a clock or a file.
//!
//! ```text
//!  job.toml ──► job::JobSpec (validated once, at submission)
//!  site stats   ──► secagg (secure sum; round 0) ──► stats::Normalization
//!  site updates ──► secagg::client / secagg::server ──► aggregate::SecureSum ──► strategy::Strategy ──► new model
//!  (insecure_plaintext jobs: stats::sum_plaintext_stats and round::RoundCollector instead of secagg)
//!  round results ──► ledger::writer (signed blocks) ──► ledger::verify (sites, auditors)
//! ```
//!
//! Non-goals: no async runtime, no tonic service implementations, no
//! filesystem access. The one exception is `ledger::store`, `keyfile` and `enroll` (feature `io`):
//! the ledger tables that the coordinator's database and every site replica
//! share, and the private key files, kept in one place so every reader agrees. The coordinator and the participant wrap these pure types
//! in thin IO layers, so a test can drive dozens of simulated sites in
//! milliseconds. The only wire-level item here is [`pb`], the code generated from
//! `proto/tessera.proto`, shared by both ends.

pub mod aggregate;
pub mod cli;
pub mod discovery;
#[cfg(feature = "io")]
pub mod enroll;
pub mod evaluation;
pub mod identity;
pub mod ids;
pub mod job;
#[cfg(feature = "io")]
pub mod keyfile;
pub mod ledger;
pub mod metrics;
pub mod model;
pub mod noise;
pub mod privacy;
pub mod replay;
pub mod roster;
pub mod round;
pub mod secagg;
pub mod stats;
pub mod strategy;
pub mod wire;

/// Generated protobuf messages and tonic stubs for `proto/tessera.proto`.
#[allow(missing_docs, clippy::all)]
pub mod pb {
    tonic::include_proto!("tessera.v1");
}

/// Size of the chunks that models and updates are streamed in. Well under
/// gRPC's default 4 MiB message limit, so a model of any size travels with
/// default limits.
pub const CHUNK_BYTES: usize = 1 << 20;
