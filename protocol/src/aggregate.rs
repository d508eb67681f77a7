//! What a strategy is allowed to see of a round: one weighted sum over several
//! sites, never a single site's vector.
//!
//! [`Summation`] is the one place where per-site updates are combined. Today it
//! adds plaintext vectors inside the coordinator's memory; secure aggregation
//! replaces it with a protocol whose output is the same [`SecureSum`], so
//! strategies and the round driver do not change.

use crate::ids::SiteId;

/// `Σ_i n_i · Δ_i` over the contributing sites, with `Σ_i n_i`.
#[derive(Clone, Debug, PartialEq)]
pub struct SecureSum {
    pub weighted_sum: Vec<f64>,
    pub total_weight: f64,
    pub contributors: Vec<SiteId>,
}

impl SecureSum {
    /// The weighted mean update `Σ n_i Δ_i / Σ n_i` (FedAvg's aggregate).
    pub fn mean(&self) -> Vec<f64> {
        self.weighted_sum.iter().map(|s| s / self.total_weight).collect()
    }
}

/// Why an input cannot join a sum. The sum is left untouched on error.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SumError {
    #[error("vector has {got} values, expected {expected}")]
    WrongLength { expected: usize, got: usize },
    #[error("value at index {index} is not finite")]
    NonFinite { index: usize },
    #[error("weight {0} is not a positive finite number")]
    BadWeight(f64),
}

/// Running weighted sum of updates, checked before anything is added.
#[derive(Clone, Debug)]
pub struct Summation {
    weighted_sum: Vec<f64>,
    total_weight: f64,
    contributors: Vec<SiteId>,
}

impl Summation {
    pub fn new(n_params: usize) -> Self {
        Self {
            weighted_sum: vec![0.0; n_params],
            total_weight: 0.0,
            contributors: Vec::new(),
        }
    }

    /// Checks the whole input, then adds `weight · update`.
    pub fn add(&mut self, site: SiteId, weight: f64, update: &[f32]) -> Result<(), SumError> {
        if !(weight.is_finite() && weight > 0.0) {
            return Err(SumError::BadWeight(weight));
        }
        if update.len() != self.weighted_sum.len() {
            return Err(SumError::WrongLength {
                expected: self.weighted_sum.len(),
                got: update.len(),
            });
        }
        if let Some(index) = update.iter().position(|v| !v.is_finite()) {
            return Err(SumError::NonFinite { index });
        }
        for (acc, &v) in self.weighted_sum.iter_mut().zip(update) {
            *acc += weight * f64::from(v);
        }
        self.total_weight += weight;
        self.contributors.push(site);
        Ok(())
    }

    pub fn n_contributors(&self) -> usize {
        self.contributors.len()
    }

    /// Releases the sum, only if at least `min_sites` sites contributed.
    pub fn finish(self, min_sites: usize) -> Option<SecureSum> {
        if self.contributors.len() < min_sites.max(3) {
            return None;
        }
        Some(SecureSum {
            weighted_sum: self.weighted_sum,
            total_weight: self.total_weight,
            contributors: self.contributors,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(n: u32) -> SiteId {
        SiteId::new(&format!("s{n}")).unwrap()
    }

    #[test]
    fn weighted_sum_matches_hand_computation() {
        let mut sum = Summation::new(2);
        sum.add(site(1), 1.0, &[1.0, 2.0]).unwrap();
        sum.add(site(2), 3.0, &[-1.0, 0.5]).unwrap();
        sum.add(site(3), 4.0, &[0.0, 1.0]).unwrap();
        let out = sum.finish(3).unwrap();
        assert_eq!(out.weighted_sum, vec![1.0 - 3.0, 2.0 + 1.5 + 4.0]);
        assert_eq!(out.total_weight, 8.0);
        assert_eq!(out.mean(), vec![-0.25, 7.5 / 8.0]);
    }

    #[test]
    fn bad_inputs_leave_the_sum_untouched() {
        let mut sum = Summation::new(2);
        sum.add(site(1), 2.0, &[1.0, 1.0]).unwrap();
        assert_eq!(
            sum.add(site(2), 1.0, &[1.0]),
            Err(SumError::WrongLength { expected: 2, got: 1 })
        );
        assert_eq!(
            sum.add(site(2), 1.0, &[1.0, f32::NAN]),
            Err(SumError::NonFinite { index: 1 })
        );
        assert_eq!(
            sum.add(site(2), 1.0, &[f32::NEG_INFINITY, 0.0]),
            Err(SumError::NonFinite { index: 0 })
        );
        assert_eq!(sum.add(site(2), 0.0, &[1.0, 1.0]), Err(SumError::BadWeight(0.0)));
        assert_eq!(sum.n_contributors(), 1);
        sum.add(site(2), 1.0, &[0.0, 0.0]).unwrap();
        sum.add(site(3), 1.0, &[0.0, 0.0]).unwrap();
        let out = sum.finish(3).unwrap();
        assert_eq!(out.weighted_sum, vec![2.0, 2.0]);
        assert_eq!(out.total_weight, 4.0);
    }

    #[test]
    fn no_sum_over_fewer_than_three_sites_even_if_asked() {
        let mut sum = Summation::new(1);
        sum.add(site(1), 1.0, &[1.0]).unwrap();
        sum.add(site(2), 1.0, &[1.0]).unwrap();
        assert!(sum.clone().finish(1).is_none());
        assert!(sum.clone().finish(2).is_none());
        sum.add(site(3), 1.0, &[1.0]).unwrap();
        assert!(sum.clone().finish(4).is_none());
        assert!(sum.finish(3).is_some());
    }
}
