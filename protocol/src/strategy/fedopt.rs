//! Adaptive federated optimisation (Reddi et al. 2021, "Adaptive Federated
//! Optimization"): the averaged update is treated as a pseudo-gradient and fed
//! to a server-side Adam or Yogi optimiser.

use super::{Strategy, TrainInstructions};
use crate::aggregate::SecureSum;
use crate::job::{FedOptParams, FedOptVariant};

/// FedAdam / FedYogi with first and second moments kept across rounds.
///
/// With `Δ` the weighted mean update:
/// `m ← β1 m + (1−β1) Δ`;
/// Adam: `v ← β2 v + (1−β2) Δ²`; Yogi: `v ← v − (1−β2) Δ² sign(v − Δ²)`;
/// `w ← w + η m / (√v + τ)`. `v` starts at `τ²` as in the paper.
pub struct FedOpt {
    params: FedOptParams,
    m: Vec<f64>,
    v: Vec<f64>,
}

impl FedOpt {
    pub fn new(params: FedOptParams) -> Self {
        Self {
            params,
            m: Vec::new(),
            v: Vec::new(),
        }
    }
}

impl Strategy for FedOpt {
    fn name(&self) -> &'static str {
        match self.params.variant {
            FedOptVariant::Adam => "fedadam",
            FedOptVariant::Yogi => "fedyogi",
        }
    }

    fn configure_train(&self, _round: u32) -> TrainInstructions {
        TrainInstructions::default()
    }

    fn save_state(&self) -> Vec<u8> {
        bincode::serde::encode_to_vec((&self.m, &self.v), bincode::config::standard())
            .expect("vectors of floats always encode")
    }

    fn load_state(&mut self, state: &[u8]) -> Result<(), String> {
        let ((m, v), _): ((Vec<f64>, Vec<f64>), _) =
            bincode::serde::decode_from_slice(state, bincode::config::standard())
                .map_err(|e| format!("{} state does not decode: {e}", self.name()))?;
        if m.len() != v.len() {
            return Err(format!(
                "{} state has {} first and {} second moments",
                self.name(),
                m.len(),
                v.len()
            ));
        }
        (self.m, self.v) = (m, v);
        Ok(())
    }

    fn aggregate_train(&mut self, global: &[f32], sum: &SecureSum) -> Option<Vec<f32>> {
        if sum.total_weight <= 0.0 || sum.weighted_sum.len() != global.len() {
            return None;
        }
        let p = self.params;
        if self.m.len() != global.len() {
            self.m = vec![0.0; global.len()];
            self.v = vec![p.tau * p.tau; global.len()];
        }
        let delta = sum.mean();
        let mut next = Vec::with_capacity(global.len());
        for (i, (&w, d)) in global.iter().zip(delta).enumerate() {
            self.m[i] = p.beta1 * self.m[i] + (1.0 - p.beta1) * d;
            let d2 = d * d;
            self.v[i] = match p.variant {
                FedOptVariant::Adam => p.beta2 * self.v[i] + (1.0 - p.beta2) * d2,
                FedOptVariant::Yogi => self.v[i] - (1.0 - p.beta2) * d2 * (self.v[i] - d2).signum(),
            };
            next.push((f64::from(w) + p.server_learning_rate * self.m[i] / (self.v[i].sqrt() + p.tau)) as f32);
        }
        Some(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(variant: FedOptVariant) -> FedOptParams {
        FedOptParams {
            variant,
            server_learning_rate: 0.1,
            beta1: 0.9,
            beta2: 0.99,
            tau: 0.01,
        }
    }

    fn sum(delta: f64) -> SecureSum {
        SecureSum {
            weighted_sum: vec![2.0 * delta],
            total_weight: 2.0,
            contributors: vec![],
        }
    }

    /// A coordinator resumed after a crash continues with the stored moments:
    /// the model it derives equals the one of a run never interrupted.
    #[test]
    fn a_restored_state_continues_as_if_never_interrupted() {
        for variant in [FedOptVariant::Adam, FedOptVariant::Yogi] {
            let mut straight = FedOpt::new(params(variant));
            let w1 = straight.aggregate_train(&[1.0, -2.0], &sum2(0.5, 0.1)).unwrap();
            let saved = straight.save_state();
            let w2 = straight.aggregate_train(&w1, &sum2(-0.3, 0.2)).unwrap();

            let mut resumed = FedOpt::new(params(variant));
            resumed.load_state(&saved).unwrap();
            assert_eq!(resumed.aggregate_train(&w1, &sum2(-0.3, 0.2)).unwrap(), w2);
            // Without the state the second step differs: the test can fail.
            let mut fresh = FedOpt::new(params(variant));
            assert_ne!(fresh.aggregate_train(&w1, &sum2(-0.3, 0.2)).unwrap(), w2);
        }
        let mut s = FedOpt::new(params(FedOptVariant::Adam));
        assert!(s.load_state(&[1, 2, 3]).is_err(), "garbage is refused");
        assert!(
            s.load_state(
                &bincode::serde::encode_to_vec((vec![1.0f64], Vec::<f64>::new()), bincode::config::standard()).unwrap()
            )
            .is_err()
        );
        assert!(
            crate::strategy::from_spec(&crate::job::StrategySpec::FedAvg)
                .load_state(&[0])
                .is_err()
        );
    }

    fn sum2(a: f64, b: f64) -> SecureSum {
        SecureSum {
            weighted_sum: vec![2.0 * a, 2.0 * b],
            total_weight: 2.0,
            contributors: vec![],
        }
    }

    #[test]
    fn fedadam_two_rounds_by_hand() {
        let mut s = FedOpt::new(params(FedOptVariant::Adam));
        // Round 1, Δ = 0.5: m = 0.05; v = 0.99*1e-4 + 0.01*0.25 = 0.002599;
        // w = 1 + 0.1 * 0.05 / (sqrt(0.002599) + 0.01).
        let w1 = s.aggregate_train(&[1.0], &sum(0.5)).unwrap()[0];
        let expect1 = 1.0 + 0.1 * 0.05 / (0.002599f64.sqrt() + 0.01);
        assert!((f64::from(w1) - expect1).abs() < 1e-6, "{w1} vs {expect1}");
        // Round 2, Δ = -0.5: m = 0.045 - 0.05 = -0.005; v = 0.99*0.002599 + 0.0025.
        let w2 = s.aggregate_train(&[w1], &sum(-0.5)).unwrap()[0];
        let v2: f64 = 0.99 * 0.002599 + 0.0025;
        let expect2 = f64::from(w1) + 0.1 * (-0.005) / (v2.sqrt() + 0.01);
        assert!((f64::from(w2) - expect2).abs() < 1e-6, "{w2} vs {expect2}");
    }

    #[test]
    fn fedyogi_first_round_by_hand() {
        let mut s = FedOpt::new(params(FedOptVariant::Yogi));
        // v0 = 1e-4 < Δ² = 0.25, so sign(v - Δ²) = -1: v = 1e-4 + 0.01*0.25 = 0.0026.
        let w1 = s.aggregate_train(&[0.0], &sum(0.5)).unwrap()[0];
        let expect = 0.1 * 0.05 / (0.0026f64.sqrt() + 0.01);
        assert!((f64::from(w1) - expect).abs() < 1e-6, "{w1} vs {expect}");
    }
}
