//! Clipping, weighting and quantisation of an update into Z_{2^32}.
//!
//! A site's update Δ is clipped to L2 norm ≤ C, multiplied by its weight
//! `w = min(n_samples / weight_cap, 1)`, and each coordinate `v ∈ [−C, C]` is
//! mapped to `{0, …, 2^b − 1}` by `q = sround((v + C) / δ)` with step
//! `δ = 2C / (2^b − 1)` and *stochastic* rounding (unbiased: E[q·δ − C] = v).
//! The weight itself is not in the vector: it is computed from the row
//! count the site declared in its signed acceptance of the job (public in
//! the ledger). A count summed in every round would be revealed by two
//! rounds whose survivor sets differ by one site.
//!
//! **No wrap-around.** With `n` sites, `b = 32 − ⌈log2 n⌉`, so a sum of `n`
//! values each below `2^b` stays below `2^32`: the masked sum, taken mod
//! 2^32, equals the true integer sum.
//!
//! **Error bound.** Stochastic rounding moves each coordinate by less than one
//! step, so the decoded sum of `m` contributions differs from the true sum by
//! less than `m·δ` per coordinate. For the heart-disease demo (n = 4, b = 30,
//! C = 10) that is below 8·10⁻⁸ per coordinate.

use rand::RngCore;

/// Quantiser for a given number of sites.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Quantizer {
    /// Bits per contribution.
    pub bits: u32,
    /// Clipping bound C of the update coordinates.
    pub clip: f64,
}

/// Why a site refuses to send its update.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NonFiniteUpdate {
    #[error("the update's coordinate {index} is NaN or infinite (training diverged?); not sending it")]
    Coordinate { index: usize },
    #[error("the update's weight is NaN or infinite; not sending it")]
    Weight,
}

impl Quantizer {
    /// Largest bit width whose sum over `n_sites` cannot wrap in 32 bits.
    pub fn for_sites(n_sites: usize, clip: f64) -> Self {
        let n = n_sites.max(1) as u64;
        let log2_ceil = 64 - (n - 1).leading_zeros();
        Self {
            bits: 32 - log2_ceil.min(31),
            clip,
        }
    }

    fn levels(&self) -> f64 {
        ((1u64 << self.bits) - 1) as f64
    }

    /// Quantisation step δ of a coordinate with range [−r, r].
    pub fn step(&self, range: f64) -> f64 {
        2.0 * range / self.levels()
    }

    /// Guaranteed bound on |decoded sum − true sum| for `m` contributions of
    /// a coordinate with range `range`.
    pub fn sum_error_bound(&self, m: usize, range: f64) -> f64 {
        m as f64 * self.step(range)
    }

    /// Quantises `value` (clamped to [−range, range]) with stochastic rounding.
    pub fn quantize(&self, value: f64, range: f64, rng: &mut impl RngCore) -> u32 {
        let scaled = ((value.clamp(-range, range) + range) / self.step(range)).clamp(0.0, self.levels());
        let floor = scaled.floor();
        let frac = scaled - floor;
        // Uniform in [0, 1) from 53 random bits.
        let u = (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
        let q = if u < frac { floor + 1.0 } else { floor };
        q.min(self.levels()) as u32
    }

    /// Decodes the sum of `m` quantised contributions of one coordinate.
    pub fn decode_sum(&self, sum: u32, m: usize, range: f64) -> f64 {
        f64::from(sum) * self.step(range) - m as f64 * range
    }

    /// The input vector of one site: its clipped, weighted, quantised
    /// update (one word per coordinate). Returns the vector and the clipping factor
    /// applied (1 when the update was within the bound). A non-finite
    /// coordinate or weight is refused: clipping would turn it into ±C and
    /// hide a diverged (or manipulated) training run in the sum.
    pub fn encode_update(
        &self,
        delta: &[f32],
        weight: f64,
        rng: &mut impl RngCore,
    ) -> Result<(Vec<u32>, f64), NonFiniteUpdate> {
        if let Some(index) = delta.iter().position(|v| !v.is_finite()) {
            return Err(NonFiniteUpdate::Coordinate { index });
        }
        if !weight.is_finite() {
            return Err(NonFiniteUpdate::Weight);
        }
        let norm = delta.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>().sqrt();
        let factor = if norm > self.clip { self.clip / norm } else { 1.0 };
        let out = delta
            .iter()
            .map(|&v| self.quantize(f64::from(v) * factor * weight, self.clip, rng))
            .collect();
        Ok((out, factor))
    }

    /// Decodes an unmasked sum of `m` site vectors into `Σ wΔ`.
    pub fn decode_update_sum(&self, sum: &[u32], m: usize) -> Vec<f64> {
        sum.iter().map(|&s| self.decode_sum(s, m, self.clip)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    #[test]
    fn bit_widths_leave_room_for_the_sum() {
        assert_eq!(Quantizer::for_sites(1, 1.0).bits, 32);
        assert_eq!(Quantizer::for_sites(2, 1.0).bits, 31);
        assert_eq!(Quantizer::for_sites(4, 1.0).bits, 30);
        assert_eq!(Quantizer::for_sites(5, 1.0).bits, 29);
        assert_eq!(Quantizer::for_sites(100, 1.0).bits, 25);
        for n in [1usize, 2, 3, 4, 7, 8, 9, 100, 1000] {
            let q = Quantizer::for_sites(n, 1.0);
            assert!((n as u64) * ((1u64 << q.bits) - 1) <= u64::from(u32::MAX), "{n}");
        }
    }

    #[test]
    fn extremes_and_clipping() {
        let q = Quantizer::for_sites(4, 2.0);
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        assert_eq!(q.quantize(-2.0, 2.0, &mut rng), 0);
        assert_eq!(q.quantize(2.0, 2.0, &mut rng), (1 << 30) - 1);
        assert_eq!(q.quantize(99.0, 2.0, &mut rng), (1 << 30) - 1);
        // ||(3, 4)|| = 5 > C = 2: scaled by 0.4 to (1.2, 1.6).
        let (v, factor) = q.encode_update(&[3.0, 4.0], 1.0, &mut rng).unwrap();
        assert!((factor - 0.4).abs() < 1e-12);
        assert_eq!(v.len(), 2, "one word per coordinate, no weight word");
        let sum = q.decode_update_sum(&v, 1);
        assert!((sum[0] - 1.2).abs() <= q.step(2.0));
        assert!((sum[1] - 1.6).abs() <= q.step(2.0));
    }

    /// Clipping would map NaN to a valid-looking coordinate and ∞ to ±C:
    /// the site refuses instead, naming the coordinate.
    #[test]
    fn adversarial_non_finite_update_is_refused_not_clipped() {
        let q = Quantizer::for_sites(4, 2.0);
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            assert_eq!(
                q.encode_update(&[0.5, bad, 0.1], 1.0, &mut rng),
                Err(NonFiniteUpdate::Coordinate { index: 1 })
            );
        }
        assert_eq!(
            q.encode_update(&[0.5], f64::NAN, &mut rng),
            Err(NonFiniteUpdate::Weight)
        );
    }

    /// Differencing: the weight is public (from the declared count), so it
    /// is not a word of the input; only the weighted update is, which
    /// changes every round. Two inputs with the same `w·Δ` are identical.
    #[test]
    fn adversarial_differencing_update_carries_no_weight_word() {
        let q = Quantizer::for_sites(4, 2.0);
        let (a, _) = q
            .encode_update(&[0.5, -0.25], 1.0, &mut ChaCha20Rng::seed_from_u64(7))
            .unwrap();
        let (b, _) = q
            .encode_update(&[1.0, -0.5], 0.5, &mut ChaCha20Rng::seed_from_u64(7))
            .unwrap();
        assert_eq!(a, b);
        assert_eq!(a.len(), 2);
    }

    proptest! {
        /// The decoded sum over sites is within the documented bound of the
        /// true sum, and the integer sum never wraps.
        #[test]
        fn sum_round_trip_within_bound(
            values in prop::collection::vec(-3.0f64..3.0, 1..40),
            seed in any::<u64>(),
        ) {
            let q = Quantizer::for_sites(values.len(), 3.0);
            let mut rng = ChaCha20Rng::seed_from_u64(seed);
            let mut sum: u64 = 0;
            for &v in &values {
                sum += u64::from(q.quantize(v, 3.0, &mut rng));
            }
            prop_assert!(sum <= u64::from(u32::MAX));
            let decoded = q.decode_sum(sum as u32, values.len(), 3.0);
            let truth: f64 = values.iter().sum();
            prop_assert!((decoded - truth).abs() < q.sum_error_bound(values.len(), 3.0) + 1e-9,
                "{decoded} vs {truth}");
        }
    }

    #[test]
    fn stochastic_rounding_is_unbiased() {
        // A value a third of the way between two levels rounds up a third of
        // the time: the mean over many draws is the value itself.
        let q = Quantizer { bits: 4, clip: 1.0 };
        let step = q.step(1.0);
        let value = -1.0 + 5.0 * step + step / 3.0;
        let mut rng = ChaCha20Rng::seed_from_u64(9);
        let n = 60_000;
        let mean: f64 = (0..n)
            .map(|_| q.decode_sum(q.quantize(value, 1.0, &mut rng), 1, 1.0))
            .sum::<f64>()
            / n as f64;
        assert!((mean - value).abs() < step * 0.01, "{mean} vs {value}");
    }
}
