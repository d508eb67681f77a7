//! Block payloads: UTF-8 JSON objects, one schema per block kind. The
//! payload bytes are hashed as stored, so the JSON need not be canonical;
//! these types are how Tessera writes and reads them.

use serde::{Deserialize, Serialize};

use crate::metrics::BinaryMetrics;

use super::Kind;

/// A consortium member as the ledger knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub id: String,
    /// Hex Ed25519 public key: signs SecAgg keys and endorsements.
    pub key: String,
    /// SHA-256 of the site's TLS certificate, once sites have certificates.
    #[serde(default)]
    pub certificate_sha256: Option<String>,
}

/// Block 0: who is in the consortium and what makes a block final.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Genesis {
    pub consortium: String,
    /// Hex Ed25519 public key that signs every block.
    pub coordinator_key: String,
    pub sites: Vec<Member>,
    /// Distinct member endorsements that make a block final.
    pub quorum: usize,
    pub software: String,
}

/// A job as submitted: the full job file, so the ledger alone says what
/// was trained, how.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobCreated {
    pub job_id: u64,
    pub name: String,
    pub job_sha256: String,
    pub job_toml: String,
    pub software: String,
    /// The coordinator ran without mutual TLS (`--insecure-dev`): anyone on
    /// the network could have claimed any identity during this job.
    #[serde(default)]
    pub insecure_transport: bool,
}

/// A site's decision on a job under its policy, signed by the site, so the
/// ledger shows who agreed to what without trusting the coordinator.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobAccepted {
    pub job_id: u64,
    pub site: String,
    pub job_sha256: String,
    pub accepted: bool,
    pub reason: String,
    /// Hex Ed25519 signature by the site over `decision_message`.
    pub signature: String,
    /// The row counts an accepting site declares public for this job (and
    /// signs). Weights and pooled test counts are computed from these, so
    /// no job-constant count is ever summed, and two summations over sets
    /// that differ by one site reveal nothing the ledger does not already
    /// say. Absent in rejections and in blocks written before counts were
    /// declared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counts: Option<DeclaredCounts>,
}

/// A site's training and test row counts, declared in its signed acceptance.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeclaredCounts {
    pub n_train: u64,
    pub n_test: u64,
}

/// A site that dropped out of a round, and at which phase.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dropout {
    pub site: String,
    pub phase: String,
}

/// A site's SHA-256 commitment to what it uploaded (its masked vector under
/// secure aggregation, its encoded update otherwise).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Commitment {
    pub site: String,
    pub sha256: String,
}

/// One finished round: enough to re-derive who contributed, what was
/// released and which model came out.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoundCompleted {
    pub job_id: u64,
    pub round: u32,
    /// Sites whose update is in the aggregate.
    pub contributors: Vec<String>,
    pub dropouts: Vec<Dropout>,
    /// Sorted by site id; `commitment_root` is their Merkle root.
    pub commitments: Vec<Commitment>,
    pub commitment_root: String,
    pub aggregate_sha256: String,
    pub base_model_sha256: String,
    pub model_sha256: String,
    pub n_params: u64,
    pub total_weight: f64,
    pub strategy: String,
    /// SHA-256 of the job file: strategy, hyperparameters and clipping.
    pub config_sha256: String,
    pub secure_aggregation: bool,
    pub clip_norm: Option<f64>,
    pub quantization_bits: Option<u32>,
    /// The secure-aggregation transcript (advertised, shared, masked,
    /// unmask responders, recovered keys).
    pub transcript: Option<serde_json::Value>,
    /// No differential privacy yet: every round spends nothing.
    pub privacy_epsilon: Option<f64>,
}

/// A secure summation of a job outside its training rounds (the
/// preprocessing statistics, the final evaluation), committed like a round:
/// who contributed, their commitments and the released sum's hash.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Summation {
    pub job_id: u64,
    /// [`Summation::STATISTICS`] or [`Summation::FINAL_EVALUATION`].
    pub purpose: String,
    pub contributors: Vec<String>,
    pub dropouts: Vec<Dropout>,
    /// Sorted by site id; `commitment_root` is their Merkle root.
    pub commitments: Vec<Commitment>,
    pub commitment_root: String,
    /// SHA-256 of the unmasked sum, little-endian u32 words.
    pub aggregate_sha256: String,
    /// Statistics only: SHA-256 of the normalisation derived from the sum
    /// (`Normalization::sha256`), which every site re-derives.
    pub normalization_sha256: Option<String>,
    pub transcript: Option<serde_json::Value>,
}

impl Summation {
    pub const STATISTICS: &str = "statistics";
    pub const FINAL_EVALUATION: &str = "final_evaluation";
}

/// The job's cohort, fixed once before its first summation: the sites whose
/// signed acceptance is on the chain, and no others, ever. Every site sizes
/// its threshold and quorum from this list and shares only with its members,
/// so a coordinator that shows some sites a shorter history (without later
/// acceptances) cannot give them a smaller cohort: that history has no seal,
/// and two different seals at one height cannot both be final.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CohortSealed {
    pub job_id: u64,
    /// Site ids in strictly ascending order (UTF-8 bytes).
    pub cohort: Vec<String>,
}

/// Evaluation results of one global model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    pub job_id: u64,
    pub model_of_round: u32,
    pub model_sha256: String,
    /// Per-site results, from the sites that chose to report them.
    pub sites: Vec<SiteMetrics>,
    /// The securely summed evaluation over all evaluating sites.
    pub pooled: Option<PooledMetrics>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SiteMetrics {
    pub site: String,
    pub n_test: u64,
    pub loss: f64,
    pub accuracy: f64,
    pub auc: Option<f64>,
    /// The site's clinical metrics (absent from blocks written before them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub binary: Option<BinaryMetrics>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PooledMetrics {
    pub n_sites: u64,
    pub n_test: u64,
    pub loss: f64,
    /// A count of rows: pooled for the final model only (`null` in the
    /// blocks of models evaluated during training since the clinical
    /// metrics; see `evaluation`).
    pub accuracy: Option<f64>,
    /// Pooled clinical metrics: the Brier score for every model, the ranking
    /// and threshold metrics for the final one (absent from older blocks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub binary: Option<BinaryMetrics>,
}

/// How a job ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobEnded {
    pub job_id: u64,
    /// finished | cancelled | failed
    pub status: String,
    pub reason: String,
    pub rounds_done: u32,
    pub final_model_sha256: Option<String>,
}

/// Stored weights of an ended job's models deleted from the coordinator to
/// free its disk. The chain keeps every model's hash, so what was trained
/// stays on the record; this block says which weights can no longer be
/// exported, and at whose request, so that their absence from the
/// coordinator's `models` table is a recorded decision, not a loss.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelsPruned {
    pub job_id: u64,
    /// Hashes of the deleted models, strictly ascending: each one a model
    /// the job's rounds started from or produced, pruned once.
    pub models: Vec<String>,
    /// Who asked: the operator's certificate identity.
    pub by: String,
    pub reason: String,
}

/// A change to the consortium after genesis.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MembershipChange {
    /// site_added | key_rotated | site_revoked
    pub change: String,
    pub site: Member,
    pub reason: String,
    /// `key_rotated` only: hex signature by the site's old key over
    /// `rotation_message` (the old key hands over to the new one).
    #[serde(default)]
    pub rotation_signature: Option<String>,
}

/// A payload of any kind, parsed.
#[derive(Clone, Debug, PartialEq)]
pub enum Payload {
    Genesis(Genesis),
    JobCreated(JobCreated),
    JobAccepted(JobAccepted),
    RoundCompleted(Box<RoundCompleted>),
    Metrics(Metrics),
    JobEnded(JobEnded),
    MembershipChange(MembershipChange),
    Summation(Box<Summation>),
    CohortSealed(CohortSealed),
    ModelsPruned(ModelsPruned),
}

impl Payload {
    pub fn kind(&self) -> Kind {
        match self {
            Payload::Genesis(_) => Kind::Genesis,
            Payload::JobCreated(_) => Kind::JobCreated,
            Payload::JobAccepted(_) => Kind::JobAccepted,
            Payload::RoundCompleted(_) => Kind::RoundCompleted,
            Payload::Metrics(_) => Kind::Metrics,
            Payload::JobEnded(_) => Kind::JobEnded,
            Payload::MembershipChange(_) => Kind::MembershipChange,
            Payload::Summation(_) => Kind::Summation,
            Payload::CohortSealed(_) => Kind::CohortSealed,
            Payload::ModelsPruned(_) => Kind::ModelsPruned,
        }
    }

    pub fn to_json(&self) -> Vec<u8> {
        let value = match self {
            Payload::Genesis(p) => serde_json::to_vec(p),
            Payload::JobCreated(p) => serde_json::to_vec(p),
            Payload::JobAccepted(p) => serde_json::to_vec(p),
            Payload::RoundCompleted(p) => serde_json::to_vec(p),
            Payload::Metrics(p) => serde_json::to_vec(p),
            Payload::JobEnded(p) => serde_json::to_vec(p),
            Payload::MembershipChange(p) => serde_json::to_vec(p),
            Payload::Summation(p) => serde_json::to_vec(p),
            Payload::CohortSealed(p) => serde_json::to_vec(p),
            Payload::ModelsPruned(p) => serde_json::to_vec(p),
        };
        value.expect("payloads serialise")
    }

    pub fn parse(kind: Kind, bytes: &[u8]) -> Result<Payload, serde_json::Error> {
        Ok(match kind {
            Kind::Genesis => Payload::Genesis(serde_json::from_slice(bytes)?),
            Kind::JobCreated => Payload::JobCreated(serde_json::from_slice(bytes)?),
            Kind::JobAccepted => Payload::JobAccepted(serde_json::from_slice(bytes)?),
            Kind::RoundCompleted => Payload::RoundCompleted(serde_json::from_slice(bytes)?),
            Kind::Metrics => Payload::Metrics(serde_json::from_slice(bytes)?),
            Kind::JobEnded => Payload::JobEnded(serde_json::from_slice(bytes)?),
            Kind::MembershipChange => Payload::MembershipChange(serde_json::from_slice(bytes)?),
            Kind::Summation => Payload::Summation(serde_json::from_slice(bytes)?),
            Kind::CohortSealed => Payload::CohortSealed(serde_json::from_slice(bytes)?),
            Kind::ModelsPruned => Payload::ModelsPruned(serde_json::from_slice(bytes)?),
        })
    }

    /// The job a block belongs to, if any.
    pub fn job_id(&self) -> Option<u64> {
        match self {
            Payload::JobCreated(p) => Some(p.job_id),
            Payload::JobAccepted(p) => Some(p.job_id),
            Payload::RoundCompleted(p) => Some(p.job_id),
            Payload::Metrics(p) => Some(p.job_id),
            Payload::JobEnded(p) => Some(p.job_id),
            Payload::Summation(p) => Some(p.job_id),
            Payload::CohortSealed(p) => Some(p.job_id),
            Payload::ModelsPruned(p) => Some(p.job_id),
            Payload::Genesis(_) | Payload::MembershipChange(_) => None,
        }
    }
}
