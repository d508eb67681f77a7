//! The job file an ML lead writes, parsed and validated once, at submission.
//!
//! Parsing goes through private "raw" serde structs that accept what TOML can
//! express; [`JobSpec::from_toml`] then checks every value and names the field
//! in its error (`training.learning_rate: must be > 0 ...`), so a bad job is
//! refused by `tessera job submit` before it reaches any site.

use serde::Deserialize;

use crate::ids::sha256_hex;
use crate::model::ModelSpec;
use crate::secagg::SecAggParams;
use crate::secagg::graph::Graph;
use crate::secagg::quantize::Quantizer;

/// A validated job. Every field has been range-checked.
#[derive(Clone, Debug, PartialEq)]
pub struct JobSpec {
    pub name: String,
    pub rounds: u32,
    /// Seeds the initial model and the sites' minibatch order.
    pub seed: u64,
    /// No aggregate over fewer sites is ever released (never below 3).
    pub min_sites: u32,
    pub model: ModelSpec,
    pub training: TrainingSpec,
    pub strategy: StrategySpec,
    pub timing: TimingSpec,
    pub aggregation: Aggregation,
    pub evaluation: EvaluationSpec,
}

/// How the sites judge each model on their test rows.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EvaluationSpec {
    /// A row is predicted positive when its probability exceeds this:
    /// accuracy, sensitivity, specificity and PPV are taken at it.
    pub threshold: f64,
}

impl Default for EvaluationSpec {
    fn default() -> Self {
        Self { threshold: 0.5 }
    }
}

/// How site contributions are combined.
#[derive(Clone, Debug, PartialEq)]
pub enum Aggregation {
    /// The default: the coordinator only ever sees sums over ≥ min_sites.
    Secure(SecureAggSpec),
    /// Plaintext updates reach the coordinator. Only with an explicit
    /// `insecure_plaintext = true`, and each site's policy may refuse it.
    InsecurePlaintext,
}

/// Parameters of secure aggregation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SecureAggSpec {
    /// L2 bound C on each site's update (before weighting).
    pub clip_norm: f64,
    /// Declared largest sample count of a site: a site's weight is
    /// `min(n_samples / weight_cap, 1)`.
    pub weight_cap: u64,
    pub graph: Graph,
    /// Shamir threshold; never below a strict majority of a neighbourhood.
    pub threshold: Option<usize>,
}

impl SecureAggSpec {
    /// Parameters of a secure summation of a job whose cohort (the sites
    /// that signed their acceptance) has `cohort_size` sites, over vectors of
    /// `vector_len` words. The threshold is a majority of a neighbourhood
    /// *of the cohort*, never of a member list a coordinator announces, so a
    /// short announcement cannot lower it; the coordinator and every site
    /// compute it the same way from the same ledger.
    pub fn params(&self, cohort_size: usize, min_sites: usize, vector_len: usize) -> SecAggParams {
        let majority = self.graph.default_threshold(cohort_size);
        SecAggParams {
            graph: self.graph,
            threshold: self.threshold.unwrap_or(majority).max(majority),
            cohort_size,
            min_sites,
            vector_len,
        }
    }

    /// The quantiser for a cohort of `cohort_size` sites (no round can have
    /// more contributors, so the sum never wraps).
    pub fn quantizer(&self, cohort_size: usize) -> Quantizer {
        Quantizer::for_sites(cohort_size, self.clip_norm)
    }

    /// A site's weight in the secure sum.
    pub fn weight(&self, n_samples: u64) -> f64 {
        (n_samples as f64 / self.weight_cap as f64).min(1.0)
    }
}

/// How each site trains locally in one round.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainingSpec {
    pub optimizer: OptimizerKind,
    pub learning_rate: f64,
    pub batch_size: usize,
    pub local_work: LocalWork,
    /// How much a positive row's loss counts against a negative one's.
    pub pos_weight: PosWeight,
}

/// The weight of the positive class in the training loss (PyTorch's
/// `pos_weight`): for rare outcomes, where an unweighted model learns to
/// predict "negative" for everyone.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum PosWeight {
    /// A fixed weight; 1 is the plain loss.
    Fixed(f64),
    /// Negatives per positive over the cohort's training rows, which every
    /// site computes from the secure statistics (`stats::ClassCounts`).
    Balanced,
}

impl Default for PosWeight {
    fn default() -> Self {
        PosWeight::Fixed(1.0)
    }
}

/// Local optimiser used by the sites.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OptimizerKind {
    Sgd,
    Adam,
}

/// How much a site trains per round: whole passes or a fixed number of steps
/// (steps make sites with very different sizes do equal work).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LocalWork {
    Epochs(u32),
    Steps(u32),
}

/// The server-side aggregation strategy and its hyperparameters.
#[derive(Clone, Debug, PartialEq)]
pub enum StrategySpec {
    FedAvg,
    /// FedAvg aggregation; sites add `mu / 2 * ||w - w_global||^2` to their loss.
    FedProx {
        mu: f64,
    },
    /// Server-side Adam or Yogi over the averaged update (Reddi et al. 2021).
    FedOpt(FedOptParams),
}

/// Hyperparameters of FedAdam / FedYogi.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FedOptParams {
    pub variant: FedOptVariant,
    pub server_learning_rate: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub tau: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FedOptVariant {
    Adam,
    Yogi,
}

/// Deadlines of a round, in seconds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TimingSpec {
    /// A round closes after this long with whoever has submitted.
    pub round_timeout_s: u64,
    /// A site that sent no heartbeat for this long is dropped from the round.
    pub dropout_after_s: u64,
    /// How long the coordinator waits for `min_sites` sites to be online.
    pub wait_for_sites_s: u64,
}

/// Why a job file was refused; `field` is the dotted TOML path.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum JobError {
    #[error("job file is not valid TOML for a job: {0}")]
    Syntax(String),
    #[error("job file refused: {0}")]
    NotText(String),
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
}

fn invalid(field: &'static str, reason: impl Into<String>) -> JobError {
    JobError::Invalid {
        field,
        reason: reason.into(),
    }
}

/// A coordinator asked for plaintext where the accepted job is secure.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "the coordinator asked for this site's data in the clear, but the job it accepted uses secure aggregation; \
     refusing (a malicious or misconfigured coordinator)"
)]
pub struct PlaintextRequest;

/// What a round of a job is, by the job file the site accepted: rounds 1 to
/// `rounds` train, round `rounds + 1` is the final evaluation, and no other
/// round exists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RoundKind {
    Training,
    /// The one summation per job that carries score histograms
    /// (`evaluation`): a coordinator cannot call for a second one.
    FinalEvaluation,
}

/// A round announced otherwise than the accepted job file allows.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "round {round} was announced {}, but the accepted job has {rounds} training rounds and its final evaluation is round {}; refusing",
    if *train { "to train" } else { "as an evaluation only" },
    rounds + 1
)]
pub struct AnnouncedRound {
    pub round: u32,
    pub train: bool,
    pub rounds: u32,
}

impl JobSpec {
    /// The kind of an announced round, checked against the announcement's
    /// `train` flag: a coordinator cannot turn a training round into a
    /// second final evaluation (whose histograms, summed over another
    /// survivor set, would reveal a site's count of positive test rows).
    pub fn round_kind(&self, round: u32, announced_train: bool) -> Result<RoundKind, AnnouncedRound> {
        let refused = AnnouncedRound {
            round,
            train: announced_train,
            rounds: self.rounds,
        };
        let kind = if (1..=self.rounds).contains(&round) {
            RoundKind::Training
        } else if round == self.rounds.saturating_add(1) {
            RoundKind::FinalEvaluation
        } else {
            return Err(refused);
        };
        if (kind == RoundKind::Training) != announced_train {
            return Err(refused);
        }
        Ok(kind)
    }

    /// Parses and validates a job file.
    pub fn from_toml(text: &str) -> Result<Self, JobError> {
        if let Some(reason) = crate::cli::not_config_text(text) {
            return Err(JobError::NotText(reason));
        }
        let raw: RawJob = toml::from_str(text).map_err(|e| JobError::Syntax(e.to_string()))?;
        raw.validate()
    }

    /// SHA-256 of the job file bytes exactly as submitted: what sites accept and
    /// what the ledger will record.
    pub fn hash_of(text: &str) -> String {
        sha256_hex(text.as_bytes())
    }

    /// Short human label for listings, e.g. `fedavg` or `fedprox(mu=0.01)`.
    pub fn strategy_label(&self) -> String {
        match &self.strategy {
            StrategySpec::FedAvg => "fedavg".into(),
            StrategySpec::FedProx { mu } => format!("fedprox(mu={mu})"),
            StrategySpec::FedOpt(p) => match p.variant {
                FedOptVariant::Adam => "fedadam".into(),
                FedOptVariant::Yogi => "fedyogi".into(),
            },
        }
    }

    /// Whether this job's aggregates go through secure aggregation. A site
    /// takes this from the job file it accepted (whose hash it signed),
    /// never from a flag in a later coordinator message.
    pub fn is_secure(&self) -> bool {
        matches!(self.aggregation, Aggregation::Secure(_))
    }

    /// Checks the `secure` flag a coordinator message carries against the
    /// accepted job: a coordinator that asks a site of a secure job for its
    /// statistics, update or metrics in the clear is refused.
    pub fn check_announced_secure(&self, announced: bool) -> Result<(), PlaintextRequest> {
        match (self.is_secure(), announced) {
            (true, false) => Err(PlaintextRequest),
            _ => Ok(()),
        }
    }

    /// FedProx proximal coefficient sites must apply (0 for other strategies).
    pub fn proximal_mu(&self) -> f64 {
        match self.strategy {
            StrategySpec::FedProx { mu } => mu,
            _ => 0.0,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJob {
    name: String,
    rounds: i64,
    #[serde(default)]
    seed: u64,
    #[serde(default = "default_min_sites")]
    min_sites: i64,
    model: RawModel,
    training: RawTraining,
    #[serde(default)]
    strategy: RawStrategy,
    #[serde(default)]
    timing: RawTiming,
    #[serde(default)]
    insecure_plaintext: bool,
    secure_aggregation: Option<RawSecureAgg>,
    #[serde(default)]
    evaluation: RawEvaluation,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEvaluation {
    #[serde(default = "default_threshold")]
    threshold: f64,
}

fn default_threshold() -> f64 {
    EvaluationSpec::default().threshold
}

impl Default for RawEvaluation {
    fn default() -> Self {
        Self {
            threshold: default_threshold(),
        }
    }
}

impl RawEvaluation {
    fn validate(self) -> Result<EvaluationSpec, JobError> {
        let t = self.threshold;
        if !(t.is_finite() && t > 0.0 && t < 1.0) {
            return Err(invalid(
                "evaluation.threshold",
                format!("must be a probability strictly between 0 and 1, got {t}"),
            ));
        }
        Ok(EvaluationSpec { threshold: t })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSecureAgg {
    #[serde(default = "default_clip_norm")]
    clip_norm: f64,
    #[serde(default = "default_weight_cap")]
    weight_cap: i64,
    #[serde(default = "default_graph")]
    graph: String,
    neighbours: Option<i64>,
    threshold: Option<i64>,
}

fn default_clip_norm() -> f64 {
    10.0
}
fn default_weight_cap() -> i64 {
    100_000
}
fn default_graph() -> String {
    "complete".into()
}

impl Default for RawSecureAgg {
    fn default() -> Self {
        Self {
            clip_norm: default_clip_norm(),
            weight_cap: default_weight_cap(),
            graph: default_graph(),
            neighbours: None,
            threshold: None,
        }
    }
}

impl RawSecureAgg {
    fn validate(self) -> Result<SecureAggSpec, JobError> {
        let clip_norm = finite_in("secure_aggregation.clip_norm", self.clip_norm, 0.0, 1e6)?;
        let weight_cap = positive_int("secure_aggregation.weight_cap", self.weight_cap, 1 << 40)? as u64;
        let graph = match (self.graph.as_str(), self.neighbours) {
            ("complete", None) => Graph::Complete,
            ("complete", Some(_)) => {
                return Err(invalid(
                    "secure_aggregation.neighbours",
                    "only applies to graph = \"sparse\"",
                ));
            }
            ("sparse", Some(k)) => Graph::Sparse {
                neighbours: positive_int("secure_aggregation.neighbours", k, 254)? as usize,
            },
            ("sparse", None) => {
                return Err(invalid(
                    "secure_aggregation.neighbours",
                    "graph = \"sparse\" needs neighbours (e.g. 14)",
                ));
            }
            (other, _) => {
                return Err(invalid(
                    "secure_aggregation.graph",
                    format!("unknown graph `{other}`; expected complete (SecAgg) or sparse (SecAgg+)"),
                ));
            }
        };
        let threshold = match self.threshold {
            None => None,
            Some(t) => Some(positive_int("secure_aggregation.threshold", t, 255)? as usize),
        };
        Ok(SecureAggSpec {
            clip_norm,
            weight_cap,
            graph,
            threshold,
        })
    }
}

fn default_min_sites() -> i64 {
    3
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    kind: String,
    #[serde(default)]
    hidden: Vec<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTraining {
    #[serde(default = "default_optimizer")]
    optimizer: String,
    learning_rate: f64,
    #[serde(default = "default_batch_size")]
    batch_size: i64,
    local_epochs: Option<i64>,
    local_steps: Option<i64>,
    pos_weight: Option<RawPosWeight>,
}

/// `pos_weight = 3.0` or `pos_weight = "balanced"`.
#[derive(Deserialize)]
#[serde(untagged)]
enum RawPosWeight {
    Number(f64),
    Text(String),
}

fn default_optimizer() -> String {
    "sgd".into()
}

fn default_batch_size() -> i64 {
    32
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStrategy {
    kind: String,
    mu: Option<f64>,
    server_learning_rate: Option<f64>,
    beta1: Option<f64>,
    beta2: Option<f64>,
    tau: Option<f64>,
}

impl Default for RawStrategy {
    fn default() -> Self {
        Self {
            kind: "fedavg".into(),
            mu: None,
            server_learning_rate: None,
            beta1: None,
            beta2: None,
            tau: None,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTiming {
    #[serde(default = "default_round_timeout")]
    round_timeout_s: i64,
    #[serde(default = "default_dropout_after")]
    dropout_after_s: i64,
    #[serde(default = "default_wait_for_sites")]
    wait_for_sites_s: i64,
}

fn default_round_timeout() -> i64 {
    600
}
fn default_dropout_after() -> i64 {
    30
}
fn default_wait_for_sites() -> i64 {
    300
}

impl Default for RawTiming {
    fn default() -> Self {
        Self {
            round_timeout_s: default_round_timeout(),
            dropout_after_s: default_dropout_after(),
            wait_for_sites_s: default_wait_for_sites(),
        }
    }
}

fn positive_int(field: &'static str, value: i64, max: i64) -> Result<i64, JobError> {
    if value < 1 || value > max {
        return Err(invalid(field, format!("must be between 1 and {max}, got {value}")));
    }
    Ok(value)
}

fn finite_in(field: &'static str, value: f64, lo: f64, hi: f64) -> Result<f64, JobError> {
    if !value.is_finite() || value <= lo || value > hi {
        return Err(invalid(field, format!("must be in ({lo}, {hi}], got {value}")));
    }
    Ok(value)
}

impl RawJob {
    fn validate(self) -> Result<JobSpec, JobError> {
        let name = self.name.trim().to_owned();
        if name.is_empty() || name.len() > 128 {
            return Err(invalid("name", "must be 1 to 128 characters"));
        }
        let rounds = positive_int("rounds", self.rounds, 100_000)? as u32;
        if self.min_sites < 3 {
            return Err(invalid(
                "min_sites",
                format!(
                    "must be at least 3 (an aggregate over fewer sites reveals too much), got {}",
                    self.min_sites
                ),
            ));
        }
        let min_sites = positive_int("min_sites", self.min_sites, 10_000)? as u32;
        let model = self.model.validate()?;
        let training = self.training.validate()?;
        let strategy = self.strategy.validate()?;
        let timing = self.timing.validate()?;
        let aggregation = match (self.insecure_plaintext, self.secure_aggregation) {
            (false, raw) => Aggregation::Secure(raw.unwrap_or_default().validate()?),
            (true, None) => Aggregation::InsecurePlaintext,
            (true, Some(_)) => {
                return Err(invalid(
                    "insecure_plaintext",
                    "cannot be combined with a [secure_aggregation] section",
                ));
            }
        };
        let evaluation = self.evaluation.validate()?;
        Ok(JobSpec {
            name,
            rounds,
            seed: self.seed,
            min_sites,
            model,
            training,
            strategy,
            timing,
            aggregation,
            evaluation,
        })
    }
}

impl RawModel {
    fn validate(self) -> Result<ModelSpec, JobError> {
        match self.kind.as_str() {
            "logistic_regression" => {
                if !self.hidden.is_empty() {
                    return Err(invalid(
                        "model.hidden",
                        "logistic_regression has no hidden layers; remove `hidden` or use kind = \"mlp\"",
                    ));
                }
                Ok(ModelSpec::LogisticRegression)
            }
            "mlp" => {
                if self.hidden.is_empty() {
                    return Err(invalid("model.hidden", "an mlp needs at least one hidden layer size"));
                }
                let mut hidden = Vec::with_capacity(self.hidden.len());
                for &h in &self.hidden {
                    hidden.push(positive_int("model.hidden", h, 65_536)? as usize);
                }
                Ok(ModelSpec::Mlp { hidden })
            }
            other => Err(invalid(
                "model.kind",
                format!("unknown model `{other}`; expected one of: logistic_regression, mlp"),
            )),
        }
    }
}

impl RawTraining {
    fn validate(self) -> Result<TrainingSpec, JobError> {
        let optimizer = match self.optimizer.as_str() {
            "sgd" => OptimizerKind::Sgd,
            "adam" => OptimizerKind::Adam,
            other => {
                return Err(invalid(
                    "training.optimizer",
                    format!("unknown optimizer `{other}`; expected sgd or adam"),
                ));
            }
        };
        let learning_rate = finite_in("training.learning_rate", self.learning_rate, 0.0, 10.0)?;
        let batch_size = positive_int("training.batch_size", self.batch_size, 1 << 20)? as usize;
        let local_work = match (self.local_epochs, self.local_steps) {
            (Some(e), None) => LocalWork::Epochs(positive_int("training.local_epochs", e, 10_000)? as u32),
            (None, Some(s)) => LocalWork::Steps(positive_int("training.local_steps", s, 10_000_000)? as u32),
            (None, None) => {
                return Err(invalid(
                    "training.local_epochs",
                    "set one of local_epochs or local_steps",
                ));
            }
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "training.local_steps",
                    "set local_epochs or local_steps, not both",
                ));
            }
        };
        let pos_weight = match self.pos_weight {
            None => PosWeight::default(),
            Some(RawPosWeight::Number(w)) => PosWeight::Fixed(finite_in("training.pos_weight", w, 0.0, 1e4)?),
            Some(RawPosWeight::Text(t)) if t == "balanced" => PosWeight::Balanced,
            Some(RawPosWeight::Text(t)) => {
                return Err(invalid(
                    "training.pos_weight",
                    format!("expected a number or \"balanced\", got \"{t}\""),
                ));
            }
        };
        Ok(TrainingSpec {
            optimizer,
            learning_rate,
            batch_size,
            local_work,
            pos_weight,
        })
    }
}

impl RawStrategy {
    fn validate(self) -> Result<StrategySpec, JobError> {
        let only = |allowed: &[&str]| -> Result<(), JobError> {
            let given = [
                ("mu", self.mu.is_some()),
                ("server_learning_rate", self.server_learning_rate.is_some()),
                ("beta1", self.beta1.is_some()),
                ("beta2", self.beta2.is_some()),
                ("tau", self.tau.is_some()),
            ];
            for (key, present) in given {
                if present && !allowed.contains(&key) {
                    return Err(invalid(
                        "strategy",
                        format!("`{key}` does not apply to strategy `{}`", self.kind),
                    ));
                }
            }
            Ok(())
        };
        match self.kind.as_str() {
            "fedavg" => {
                only(&[])?;
                Ok(StrategySpec::FedAvg)
            }
            "fedprox" => {
                only(&["mu"])?;
                let mu = self
                    .mu
                    .ok_or_else(|| invalid("strategy.mu", "fedprox needs mu (e.g. 0.01)"))?;
                if !mu.is_finite() || !(0.0..=100.0).contains(&mu) {
                    return Err(invalid("strategy.mu", format!("must be in [0, 100], got {mu}")));
                }
                Ok(StrategySpec::FedProx { mu })
            }
            "fedadam" | "fedyogi" => {
                only(&["server_learning_rate", "beta1", "beta2", "tau"])?;
                let variant = if self.kind == "fedadam" {
                    FedOptVariant::Adam
                } else {
                    FedOptVariant::Yogi
                };
                let params = FedOptParams {
                    variant,
                    server_learning_rate: finite_in(
                        "strategy.server_learning_rate",
                        self.server_learning_rate.unwrap_or(0.1),
                        0.0,
                        10.0,
                    )?,
                    beta1: beta("strategy.beta1", self.beta1.unwrap_or(0.9))?,
                    beta2: beta("strategy.beta2", self.beta2.unwrap_or(0.99))?,
                    tau: finite_in("strategy.tau", self.tau.unwrap_or(1e-3), 0.0, 1.0)?,
                };
                Ok(StrategySpec::FedOpt(params))
            }
            other => Err(invalid(
                "strategy.kind",
                format!("unknown strategy `{other}`; expected one of: fedavg, fedprox, fedadam, fedyogi"),
            )),
        }
    }
}

fn beta(field: &'static str, value: f64) -> Result<f64, JobError> {
    if !value.is_finite() || !(0.0..1.0).contains(&value) {
        return Err(invalid(field, format!("must be in [0, 1), got {value}")));
    }
    Ok(value)
}

impl RawTiming {
    fn validate(self) -> Result<TimingSpec, JobError> {
        Ok(TimingSpec {
            round_timeout_s: positive_int("timing.round_timeout_s", self.round_timeout_s, 86_400)? as u64,
            dropout_after_s: positive_int("timing.dropout_after_s", self.dropout_after_s, 86_400)? as u64,
            wait_for_sites_s: positive_int("timing.wait_for_sites_s", self.wait_for_sites_s, 7 * 86_400)? as u64,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
name = "t"
rounds = 5
[model]
kind = "logistic_regression"
[training]
learning_rate = 0.1
local_epochs = 1
"#;

    /// A coordinator that announces a training round as a final
    /// evaluation (or the reverse, or a round beyond the last) is refused:
    /// the score histograms go into one summation per job.
    #[test]
    fn adversarial_a_second_final_evaluation_is_refused() {
        let spec = JobSpec::from_toml(BASE).unwrap();
        assert_eq!(spec.rounds, 5);
        assert_eq!(spec.round_kind(1, true), Ok(RoundKind::Training));
        assert_eq!(spec.round_kind(5, true), Ok(RoundKind::Training));
        assert_eq!(spec.round_kind(6, false), Ok(RoundKind::FinalEvaluation));
        let e = spec.round_kind(3, false).unwrap_err();
        assert!(
            e.to_string().contains("round 3 was announced as an evaluation only"),
            "{e}"
        );
        assert!(spec.round_kind(6, true).is_err());
        assert!(spec.round_kind(7, false).is_err());
        assert!(spec.round_kind(0, true).is_err());
        assert_eq!(spec.evaluation.threshold, 0.5);
    }

    /// Replaces `from` in the base job with `to` and returns the error.
    fn check_err(from: &str, to: &str, field: &str, reason_part: &str) {
        let text = BASE.replace(from, to);
        assert_ne!(text, BASE, "replacement `{from}` not found");
        match JobSpec::from_toml(&text) {
            Err(JobError::Invalid { field: f, reason }) => {
                assert_eq!(f, field);
                assert!(reason.contains(reason_part), "{reason}");
            }
            other => panic!("expected error on {field}, got {other:?}"),
        }
    }

    /// Attack 3: the `secure` flag of a coordinator message cannot turn a
    /// secure job into a plaintext one at a site.
    #[test]
    fn adversarial_plaintext_request_for_a_secure_job_is_refused() {
        let secure = JobSpec::from_toml(BASE).unwrap();
        assert!(secure.is_secure());
        assert_eq!(secure.check_announced_secure(false), Err(PlaintextRequest));
        assert_eq!(secure.check_announced_secure(true), Ok(()));
        // A job that is plaintext by its own (signed) file is governed by the
        // site's policy, not by this check.
        let plain = JobSpec::from_toml(&format!("insecure_plaintext = true\n{BASE}")).unwrap();
        assert!(!plain.is_secure());
        assert_eq!(plain.check_announced_secure(false), Ok(()));
    }

    #[test]
    fn base_job_parses_with_defaults() {
        let job = JobSpec::from_toml(BASE).unwrap();
        assert_eq!(job.rounds, 5);
        assert_eq!(job.min_sites, 3);
        assert_eq!(job.model, ModelSpec::LogisticRegression);
        assert_eq!(job.training.optimizer, OptimizerKind::Sgd);
        assert_eq!(job.training.local_work, LocalWork::Epochs(1));
        assert_eq!(job.training.pos_weight, PosWeight::Fixed(1.0));
        let with = |v: &str| {
            JobSpec::from_toml(&BASE.replace("local_epochs = 1", &format!("local_epochs = 1\npos_weight = {v}")))
                .unwrap()
                .training
                .pos_weight
        };
        assert_eq!(with("\"balanced\""), PosWeight::Balanced);
        assert_eq!(with("3"), PosWeight::Fixed(3.0));
        assert_eq!(with("0.5"), PosWeight::Fixed(0.5));
        assert_eq!(job.strategy, StrategySpec::FedAvg);
        let Aggregation::Secure(secure) = job.aggregation else {
            panic!("secure by default")
        };
        assert_eq!(secure.graph, Graph::Complete);
        assert_eq!(secure.clip_norm, 10.0);
    }

    #[test]
    fn aggregation_settings() {
        let plain = JobSpec::from_toml(&BASE.replace("rounds = 5", "rounds = 5\ninsecure_plaintext = true")).unwrap();
        assert_eq!(plain.aggregation, Aggregation::InsecurePlaintext);
        let sparse = JobSpec::from_toml(&format!(
            "{BASE}[secure_aggregation]\ngraph = \"sparse\"\nneighbours = 6\nclip_norm = 2.5\nthreshold = 2\n"
        ))
        .unwrap();
        let Aggregation::Secure(spec) = sparse.aggregation else {
            panic!()
        };
        assert_eq!(spec.graph, Graph::Sparse { neighbours: 6 });
        // A threshold below a majority is raised to it: 7-site neighbourhoods need 4.
        assert_eq!(spec.params(100, 3, 10).threshold, 4);
        assert_eq!(spec.weight(50_000), 0.5);
        check_err(
            "rounds = 5",
            "rounds = 5\ninsecure_plaintext = true\n[secure_aggregation]\nclip_norm = 1.0",
            "insecure_plaintext",
            "cannot be combined",
        );
        check_err(
            "local_epochs = 1",
            "local_epochs = 1\n[secure_aggregation]\ngraph = \"sparse\"",
            "secure_aggregation.neighbours",
            "needs neighbours",
        );
        check_err(
            "local_epochs = 1",
            "local_epochs = 1\n[secure_aggregation]\nclip_norm = 0.0",
            "secure_aggregation.clip_norm",
            "0",
        );
        check_err(
            "local_epochs = 1",
            "local_epochs = 1\n[secure_aggregation]\ngraph = \"ring\"",
            "secure_aggregation.graph",
            "unknown graph",
        );
    }

    #[test]
    fn invalid_values_name_their_field() {
        check_err("logistic_regression", "resnet", "model.kind", "unknown model `resnet`");
        check_err(
            "learning_rate = 0.1",
            "learning_rate = -1.0",
            "training.learning_rate",
            "-1",
        );
        check_err(
            "learning_rate = 0.1",
            "learning_rate = nan",
            "training.learning_rate",
            "NaN",
        );
        check_err("rounds = 5", "rounds = 0", "rounds", "between 1");
        for (bad, reason) in [
            ("0.0", "(0, 10000]"),
            ("-2", "(0, 10000]"),
            ("\"balance\"", "\"balanced\""),
        ] {
            check_err(
                "local_epochs = 1",
                &format!("local_epochs = 1\npos_weight = {bad}"),
                "training.pos_weight",
                reason,
            );
        }
        for bad in ["0.0", "1.0", "1.5", "nan", "-0.2"] {
            check_err(
                "local_epochs = 1",
                &format!("local_epochs = 1\n[evaluation]\nthreshold = {bad}"),
                "evaluation.threshold",
                "strictly between 0 and 1",
            );
        }
        check_err("rounds = 5", "rounds = 5\nmin_sites = 2", "min_sites", "at least 3");
        check_err(
            "local_epochs = 1",
            "local_epochs = 0",
            "training.local_epochs",
            "between 1",
        );
        check_err(
            "local_epochs = 1",
            "local_epochs = 1\nlocal_steps = 3",
            "training.local_steps",
            "not both",
        );
        check_err("local_epochs = 1", "", "training.local_epochs", "set one of");
        check_err(
            "learning_rate = 0.1",
            "learning_rate = 0.1\noptimizer = \"lbfgs\"",
            "training.optimizer",
            "lbfgs",
        );
        check_err(
            "local_epochs = 1",
            "local_epochs = 1\n[strategy]\nkind = \"fedprox\"",
            "strategy.mu",
            "needs mu",
        );
        check_err(
            "local_epochs = 1",
            "local_epochs = 1\n[strategy]\nkind = \"fedavg\"\nmu = 0.1",
            "strategy",
            "`mu` does not apply",
        );
        check_err(
            "local_epochs = 1",
            "local_epochs = 1\n[strategy]\nkind = \"fedadam\"\nbeta1 = 1.0",
            "strategy.beta1",
            "[0, 1)",
        );
        check_err(
            "kind = \"logistic_regression\"",
            "kind = \"mlp\"",
            "model.hidden",
            "at least one",
        );
        check_err(
            "kind = \"logistic_regression\"",
            "kind = \"mlp\"\nhidden = [0]",
            "model.hidden",
            "between 1",
        );
    }

    #[test]
    fn unknown_keys_and_bad_types_are_syntax_errors_that_name_the_key() {
        let err = JobSpec::from_toml(&BASE.replace("rounds = 5", "rounds = 5\nround = 3")).unwrap_err();
        assert!(matches!(&err, JobError::Syntax(m) if m.contains("round")), "{err}");
        let err = JobSpec::from_toml(&BASE.replace("rounds = 5", "rounds = \"five\"")).unwrap_err();
        assert!(matches!(&err, JobError::Syntax(m) if m.contains("rounds")), "{err}");
    }

    #[test]
    fn strategies_parse() {
        let job = JobSpec::from_toml(&format!("{BASE}[strategy]\nkind = \"fedyogi\"\ntau = 0.01\n")).unwrap();
        let StrategySpec::FedOpt(p) = job.strategy else {
            panic!()
        };
        assert_eq!(p.variant, FedOptVariant::Yogi);
        assert_eq!(p.tau, 0.01);
        assert_eq!(p.beta1, 0.9);
        let job = JobSpec::from_toml(&format!("{BASE}[strategy]\nkind = \"fedprox\"\nmu = 0.5\n")).unwrap();
        assert_eq!(job.proximal_mu(), 0.5);
        assert_eq!(job.strategy_label(), "fedprox(mu=0.5)");
    }
}
