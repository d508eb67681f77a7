//! FedProx (Li et al. 2020): FedAvg aggregation, with a proximal term in each
//! site's local loss that keeps heterogeneous sites close to the global model.

use super::{Strategy, TrainInstructions, apply_mean};
use crate::aggregate::SecureSum;

/// Sites minimise `loss + μ/2 · ||w − w_global||²`; the server averages.
pub struct FedProx {
    pub mu: f64,
}

impl Strategy for FedProx {
    fn name(&self) -> &'static str {
        "fedprox"
    }

    fn configure_train(&self, _round: u32) -> TrainInstructions {
        TrainInstructions { proximal_mu: self.mu }
    }

    fn aggregate_train(&mut self, global: &[f32], sum: &SecureSum) -> Option<Vec<f32>> {
        apply_mean(global, sum)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tells_sites_mu_and_averages_like_fedavg() {
        let mut s = FedProx { mu: 0.25 };
        assert_eq!(s.configure_train(3).proximal_mu, 0.25);
        let sum = SecureSum {
            weighted_sum: vec![2.0],
            total_weight: 4.0,
            contributors: vec![],
        };
        assert_eq!(s.aggregate_train(&[1.0], &sum), Some(vec![1.5]));
    }
}
