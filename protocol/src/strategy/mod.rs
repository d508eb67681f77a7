//! Server-side aggregation strategies, one file each, behind [`Strategy`].
//!
//! A strategy sees the round's [`SecureSum`] (never per-site vectors) and the
//! current global model, and returns the next global model. Adding a strategy
//! is one file here plus one arm in [`from_spec`].

mod fedavg;
mod fedopt;
mod fedprox;

pub use fedavg::FedAvg;
pub use fedopt::FedOpt;
pub use fedprox::FedProx;

use crate::aggregate::SecureSum;
use crate::job::StrategySpec;

/// What every site is told to do differently in a round.
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub struct TrainInstructions {
    /// FedProx proximal coefficient μ (0 = plain local training).
    pub proximal_mu: f64,
}

/// One aggregation strategy: how sites train (configure) and how their summed
/// updates become the next global model (aggregate).
pub trait Strategy: Send {
    fn name(&self) -> &'static str;

    /// Per-round instructions sent to every site.
    fn configure_train(&self, round: u32) -> TrainInstructions;

    /// Next global model from the current one and the round's weighted sum of
    /// updates (`Δ = w_local − w_global`). `None` keeps the current model.
    fn aggregate_train(&mut self, global: &[f32], sum: &SecureSum) -> Option<Vec<f32>>;

    /// What the strategy carries from one round to the next (a server
    /// optimiser's moments), as bytes the coordinator stores with each
    /// round: a coordinator restarted after a crash resumes the job with
    /// the state the next round would have had. Empty when stateless.
    fn save_state(&self) -> Vec<u8> {
        Vec::new()
    }

    /// Restores what [`Strategy::save_state`] returned.
    fn load_state(&mut self, state: &[u8]) -> Result<(), String> {
        match state {
            [] => Ok(()),
            _ => Err(format!(
                "{} keeps no state, but {} bytes were stored",
                self.name(),
                state.len()
            )),
        }
    }
}

/// The strategy a validated job asks for.
pub fn from_spec(spec: &StrategySpec) -> Box<dyn Strategy> {
    match spec {
        StrategySpec::FedAvg => Box::new(FedAvg),
        StrategySpec::FedProx { mu } => Box::new(FedProx { mu: *mu }),
        StrategySpec::FedOpt(params) => Box::new(FedOpt::new(*params)),
    }
}

/// `global + mean(Δ)`: the FedAvg step shared by FedAvg and FedProx.
fn apply_mean(global: &[f32], sum: &SecureSum) -> Option<Vec<f32>> {
    if sum.total_weight <= 0.0 || sum.weighted_sum.len() != global.len() {
        return None;
    }
    // The mean is taken coordinate by coordinate, exactly as
    // `SecureSum::mean` does, but without an intermediate vector.
    let total = sum.total_weight;
    Some(
        global
            .iter()
            .zip(&sum.weighted_sum)
            .map(|(&w, &s)| (f64::from(w) + s / total) as f32)
            .collect(),
    )
}
