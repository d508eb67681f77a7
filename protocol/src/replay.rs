//! A site's own replay of a secure job's model history, so that it trains
//! only on a model it computed itself.
//!
//! A coordinator that chooses the model a site trains on can craft one whose
//! update reveals the site's data (a trap model). Round 1's model is the
//! job's deterministic initial model; every later model is the previous one
//! plus the strategy's step on the round's released aggregate. The ledger's
//! final `round_completed` block commits to that aggregate
//! (`aggregate_sha256`), its contributors and the resulting model. A site
//! fetches each aggregate, checks it against the block, decodes it with the
//! weights the contributors declared in their signed acceptances, applies
//! the strategy, and refuses when the result is not the model the block
//! records. The coordinator builds its models with the same [`round_sum`]
//! and strategy code, so honest replays agree bit for bit.

use crate::aggregate::SecureSum;
use crate::ids::SiteId;
use crate::job::{JobSpec, SecureAggSpec};
use crate::ledger::payload::{DeclaredCounts, RoundCompleted};
use crate::model::{Layout, initial_params, model_hash};
use crate::secagg::commitment;
use crate::secagg::quantize::Quantizer;
use crate::strategy::{self, Strategy};

/// Why a site refuses a round's model.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ReplayError {
    #[error("the ledger's round {got} of the job cannot follow round {}", .expected - 1)]
    OutOfOrder { expected: u32, got: u32 },
    #[error("round {round} starts from model {recorded}, but this site's replay is at {replayed}")]
    BaseMismatch {
        round: u32,
        recorded: String,
        replayed: String,
    },
    #[error("round {round} is not a secure round of {n_params} parameters")]
    NotThisJob { round: u32, n_params: usize },
    #[error("round {round}'s aggregate has {got} words, expected at least {expected}")]
    WrongLength { round: u32, expected: usize, got: usize },
    #[error("round {round}'s aggregate does not match the ledger's aggregate_sha256")]
    AggregateMismatch { round: u32 },
    #[error("round {round}'s contributor `{site}` declared no row counts in the ledger")]
    Undeclared { round: u32, site: String },
    #[error("round {round} records total weight {recorded}, the contributors' declared counts give {computed}")]
    WeightMismatch { round: u32, recorded: f64, computed: f64 },
    #[error("round {round}: the strategy produced no model from the aggregate")]
    NoModel { round: u32 },
    #[error("an earlier round's model did not check out; this replay is unusable")]
    Broken,
    #[error(
        "round {round} records model {recorded}, but its aggregate and the job's strategy give {replayed}: \
         refusing a model this site cannot derive (trap model?)"
    )]
    ModelMismatch {
        round: u32,
        recorded: String,
        replayed: String,
    },
}

/// The strategy's view of a round from the unmasked words of its summation
/// (the quantised weighted update first; evaluation words after it are
/// ignored) and the public weight of each contributor, in the ledger's
/// contributor order. The coordinator and the sites both call this.
pub fn round_sum(quantizer: &Quantizer, words: &[u32], n_params: usize, contributors: &[(SiteId, f64)]) -> SecureSum {
    let weighted_sum = quantizer.decode_update_sum(&words[..n_params.min(words.len())], contributors.len());
    SecureSum {
        weighted_sum,
        total_weight: contributors.iter().map(|(_, w)| w).sum(),
        contributors: contributors.iter().map(|(s, _)| s.clone()).collect(),
    }
}

/// A job's model history as this site derived it: the model that starts
/// `next_round`, and the strategy's state (FedOpt's moments) after the
/// rounds before it.
pub struct ModelReplay {
    strategy: Box<dyn Strategy>,
    secure: SecureAggSpec,
    quantizer: Quantizer,
    model: Vec<f32>,
    hash: String,
    next_round: u32,
    /// The strategy stepped on a round whose model did not check out: its
    /// state is no longer the ledger's.
    broken: bool,
}

impl ModelReplay {
    /// Starts at round 1 with the job's deterministic initial model; sized
    /// from the job's cohort as the coordinator's decoder is.
    pub fn new(spec: &JobSpec, secure: &SecureAggSpec, layout: &Layout, cohort_size: usize) -> Self {
        let model = initial_params(layout, spec.seed);
        Self {
            strategy: strategy::from_spec(&spec.strategy),
            secure: *secure,
            quantizer: secure.quantizer(cohort_size),
            hash: model_hash(&model),
            model,
            next_round: 1,
            broken: false,
        }
    }

    /// The round whose starting model [`Self::model`] is.
    pub fn next_round(&self) -> u32 {
        self.next_round
    }

    pub fn model(&self) -> &[f32] {
        &self.model
    }

    pub fn model_hash(&self) -> &str {
        &self.hash
    }

    /// Applies the round recorded in `block` (final on this site's ledger),
    /// given its aggregate `words` as fetched and `declared`, the counts each
    /// site declared in its acceptance. An error leaves the replay where it
    /// was, except [`ReplayError::ModelMismatch`], after which every call
    /// fails with [`ReplayError::Broken`] (the strategy's state moved).
    pub fn apply(
        &mut self,
        block: &RoundCompleted,
        words: &[u32],
        declared: impl Fn(&SiteId) -> Option<DeclaredCounts>,
    ) -> Result<(), ReplayError> {
        if self.broken {
            return Err(ReplayError::Broken);
        }
        let round = block.round;
        if round != self.next_round {
            return Err(ReplayError::OutOfOrder {
                expected: self.next_round,
                got: round,
            });
        }
        if block.base_model_sha256 != self.hash {
            return Err(ReplayError::BaseMismatch {
                round,
                recorded: block.base_model_sha256.clone(),
                replayed: self.hash.clone(),
            });
        }
        let n_params = self.model.len();
        if !block.secure_aggregation || block.n_params != n_params as u64 {
            return Err(ReplayError::NotThisJob { round, n_params });
        }
        if words.len() < n_params {
            return Err(ReplayError::WrongLength {
                round,
                expected: n_params,
                got: words.len(),
            });
        }
        if hex::encode(commitment(words)) != block.aggregate_sha256 {
            return Err(ReplayError::AggregateMismatch { round });
        }
        let mut weights = Vec::with_capacity(block.contributors.len());
        for name in &block.contributors {
            let undeclared = || ReplayError::Undeclared {
                round,
                site: name.clone(),
            };
            let site = SiteId::new(name).map_err(|_| undeclared())?;
            let counts = declared(&site).ok_or_else(undeclared)?;
            weights.push((site, self.secure.weight(counts.n_train)));
        }
        let sum = round_sum(&self.quantizer, words, n_params, &weights);
        // The model below uses this site's own total; the recorded one is
        // for readers of the ledger and must say the same (to the precision
        // a JSON reader other than serde's may keep).
        if (sum.total_weight - block.total_weight).abs() > 1e-12 * sum.total_weight.abs().max(1.0) {
            return Err(ReplayError::WeightMismatch {
                round,
                recorded: block.total_weight,
                computed: sum.total_weight,
            });
        }
        let next = self
            .strategy
            .aggregate_train(&self.model, &sum)
            .ok_or(ReplayError::NoModel { round })?;
        let next_hash = model_hash(&next);
        if next_hash != block.model_sha256 {
            self.broken = true;
            return Err(ReplayError::ModelMismatch {
                round,
                recorded: block.model_sha256.clone(),
                replayed: next_hash,
            });
        }
        self.model = next;
        self.hash = next_hash;
        self.next_round += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use rand::{RngCore, SeedableRng};
    use rand_chacha::ChaCha20Rng;

    use super::*;
    use crate::ledger::payload::RoundCompleted;

    const N_SITES: usize = 3;

    fn spec(strategy: &str) -> JobSpec {
        JobSpec::from_toml(&format!(
            "name = \"replay\"\nrounds = 3\nseed = 5\nmin_sites = 3\n\
             [model]\nkind = \"logistic_regression\"\n\
             [training]\noptimizer = \"sgd\"\nlearning_rate = 0.1\nbatch_size = 8\nlocal_epochs = 1\n\
             [strategy]\n{strategy}\n\
             [secure_aggregation]\nclip_norm = 2.0\nweight_cap = 100\n"
        ))
        .unwrap()
    }

    fn secure(spec: &JobSpec) -> SecureAggSpec {
        match &spec.aggregation {
            crate::job::Aggregation::Secure(s) => *s,
            crate::job::Aggregation::InsecurePlaintext => unreachable!(),
        }
    }

    fn sites() -> BTreeMap<SiteId, DeclaredCounts> {
        (0..N_SITES)
            .map(|i| {
                let counts = DeclaredCounts {
                    n_train: 40 + 30 * i as u64,
                    n_test: 10,
                };
                (SiteId::new(&format!("site-{i}")).unwrap(), counts)
            })
            .collect()
    }

    /// What an honest coordinator records for `rounds` rounds: each block
    /// and its aggregate (three sites' quantised updates, summed).
    fn honest_history(spec: &JobSpec, layout: &Layout, rounds: u32) -> Vec<(RoundCompleted, Vec<u32>)> {
        let secure = secure(spec);
        let q = secure.quantizer(N_SITES);
        let mut strategy = strategy::from_spec(&spec.strategy);
        let mut model = initial_params(layout, spec.seed);
        let mut rng = ChaCha20Rng::seed_from_u64(9);
        let mut out = Vec::new();
        for round in 1..=rounds {
            let mut words = vec![0u32; model.len() + 4];
            let mut weights = Vec::new();
            for (site, counts) in sites() {
                let delta: Vec<f32> = (0..model.len())
                    .map(|_| (rng.next_u32() % 200) as f32 / 1000.0 - 0.1)
                    .collect();
                let weight = secure.weight(counts.n_train);
                let (x, _) = q.encode_update(&delta, weight, &mut rng).unwrap();
                for (acc, v) in words.iter_mut().zip(x) {
                    *acc = acc.wrapping_add(v);
                }
                weights.push((site, weight));
            }
            let sum = round_sum(&q, &words, model.len(), &weights);
            let next = strategy.aggregate_train(&model, &sum).unwrap();
            out.push((
                RoundCompleted {
                    job_id: 1,
                    round,
                    contributors: weights.iter().map(|(s, _)| s.to_string()).collect(),
                    dropouts: Vec::new(),
                    commitments: Vec::new(),
                    commitment_root: String::new(),
                    aggregate_sha256: hex::encode(commitment(&words)),
                    base_model_sha256: model_hash(&model),
                    model_sha256: model_hash(&next),
                    n_params: model.len() as u64,
                    total_weight: sum.total_weight,
                    strategy: String::new(),
                    config_sha256: String::new(),
                    secure_aggregation: true,
                    clip_norm: Some(secure.clip_norm),
                    quantization_bits: Some(q.bits),
                    transcript: None,
                    privacy_epsilon: None,
                },
                words,
            ));
            model = next;
        }
        out
    }

    fn declared(site: &SiteId) -> Option<DeclaredCounts> {
        sites().get(site).copied()
    }

    #[test]
    fn honest_rounds_replay_to_the_recorded_models() {
        for strategy in ["kind = \"fedavg\"", "kind = \"fedadam\"\nserver_learning_rate = 0.05"] {
            let spec = spec(strategy);
            let layout = spec.model.layout(6);
            let history = honest_history(&spec, &layout, 3);
            let mut replay = ModelReplay::new(&spec, &secure(&spec), &layout, N_SITES);
            for (block, words) in &history {
                assert_eq!(replay.model_hash(), block.base_model_sha256);
                replay.apply(block, words, declared).unwrap();
                assert_eq!(replay.model_hash(), block.model_sha256, "{strategy}");
            }
            assert_eq!(replay.next_round(), 4);
        }
    }

    /// A coordinator records (and a majority endorses) a round block whose
    /// model is not the strategy's step on the aggregate: a crafted model to
    /// train on. The site refuses, and so for every lie it could tell about
    /// the round instead.
    #[test]
    fn adversarial_trap_later_model_is_refused() {
        let spec = spec("kind = \"fedadam\"\nserver_learning_rate = 0.05");
        let layout = spec.model.layout(6);
        let history = honest_history(&spec, &layout, 2);
        let (block, words) = &history[1];
        let at_round_2 = || {
            let mut r = ModelReplay::new(&spec, &secure(&spec), &layout, N_SITES);
            r.apply(&history[0].0, &history[0].1, declared).unwrap();
            r
        };
        // A crafted model in place of round 2's.
        let mut crafted = initial_params(&layout, 77);
        crafted[0] = 50.0;
        let trap = RoundCompleted {
            model_sha256: model_hash(&crafted),
            ..block.clone()
        };
        let mut replay = at_round_2();
        assert!(matches!(
            replay.apply(&trap, words, declared),
            Err(ReplayError::ModelMismatch { round: 2, .. })
        ));
        assert_eq!(replay.apply(block, words, declared), Err(ReplayError::Broken));
        // An aggregate other than the committed one (to steer the model).
        let mut steered = words.clone();
        steered[0] = steered[0].wrapping_add(1 << 20);
        assert_eq!(
            at_round_2().apply(block, &steered, declared),
            Err(ReplayError::AggregateMismatch { round: 2 })
        );
        // The committed aggregate re-weighted: a smaller total weight scales
        // the mean step up.
        let reweighted = RoundCompleted {
            total_weight: block.total_weight / 4.0,
            ..block.clone()
        };
        assert!(matches!(
            at_round_2().apply(&reweighted, words, declared),
            Err(ReplayError::WeightMismatch { round: 2, .. })
        ));
        // A contributor that declared nothing, or fewer contributors (m
        // decodes the sum).
        let outsider = RoundCompleted {
            contributors: vec!["site-0".into(), "site-1".into(), "mallory".into()],
            ..block.clone()
        };
        assert!(matches!(
            at_round_2().apply(&outsider, words, declared),
            Err(ReplayError::Undeclared { round: 2, .. })
        ));
        let fewer = RoundCompleted {
            contributors: vec!["site-0".into(), "site-1".into()],
            ..block.clone()
        };
        assert!(at_round_2().apply(&fewer, words, declared).is_err());
        // Skipping round 1, or starting round 2 from another model.
        let mut fresh = ModelReplay::new(&spec, &secure(&spec), &layout, N_SITES);
        assert!(matches!(
            fresh.apply(block, words, declared),
            Err(ReplayError::OutOfOrder { expected: 1, got: 2 })
        ));
        let rebased = RoundCompleted {
            base_model_sha256: model_hash(&crafted),
            ..block.clone()
        };
        assert!(matches!(
            at_round_2().apply(&rebased, words, declared),
            Err(ReplayError::BaseMismatch { round: 2, .. })
        ));
        // And the honest block still replays.
        at_round_2().apply(block, words, declared).unwrap();
    }
}
