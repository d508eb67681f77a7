//! Weighted federated averaging (McMahan et al. 2017).

use super::{Strategy, TrainInstructions, apply_mean};
use crate::aggregate::SecureSum;

/// `w ← w + Σ n_i Δ_i / Σ n_i`.
pub struct FedAvg;

impl Strategy for FedAvg {
    fn name(&self) -> &'static str {
        "fedavg"
    }

    fn configure_train(&self, _round: u32) -> TrainInstructions {
        TrainInstructions::default()
    }

    fn aggregate_train(&mut self, global: &[f32], sum: &SecureSum) -> Option<Vec<f32>> {
        apply_mean(global, sum)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::SiteId;

    #[test]
    fn weighted_average_by_hand() {
        // Sites with 1 and 3 samples send Δ = [4, 0] and [0, 4]:
        // mean = [(1*4)/4, (3*4)/4] = [1, 3].
        let sum = SecureSum {
            weighted_sum: vec![4.0, 12.0],
            total_weight: 4.0,
            contributors: vec![SiteId::new("a").unwrap(), SiteId::new("b").unwrap()],
        };
        let next = FedAvg.aggregate_train(&[0.5, -1.0], &sum).unwrap();
        assert_eq!(next, vec![1.5, 2.0]);
    }

    #[test]
    fn mismatched_sum_keeps_the_model() {
        let sum = SecureSum {
            weighted_sum: vec![1.0],
            total_weight: 1.0,
            contributors: vec![],
        };
        assert_eq!(FedAvg.aggregate_train(&[0.0, 0.0], &sum), None);
    }
}
