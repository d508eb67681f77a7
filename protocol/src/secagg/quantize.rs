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

use rand::{Rng, RngCore};

/// Coordinates quantised per draw of random words.
const RANDOM_BLOCK: usize = 2048;

/// L2 norm in f64, summed over eight independent lanes so that the loop
/// vectorises (a single running sum is a serial chain of additions).
fn l2_norm(values: &[f32]) -> f64 {
    let mut lanes = [0f64; 8];
    let mut chunks = values.chunks_exact(8);
    for chunk in &mut chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane += f64::from(v) * f64::from(v);
        }
    }
    let tail: f64 = chunks.remainder().iter().map(|&v| f64::from(v) * f64::from(v)).sum();
    (lanes.iter().sum::<f64>() + tail).sqrt()
}

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
        let step = self.step(range);
        self.round_scaled(value / step + range / step, rng.next_u32())
    }

    /// Stochastic rounding of a value already in units of steps: rounds up
    /// with probability equal to its fractional part, judged against 32
    /// random bits (so any bias is below 2⁻³² of a step). The clamped value
    /// is non-negative, so truncation is the floor: no `floor` call (a libm
    /// call on baseline x86-64) and no branch, so a loop over it vectorises.
    /// At the top level the fraction is 0 and it never rounds up past it.
    #[inline(always)]
    fn round_scaled(&self, scaled: f64, random: u32) -> u32 {
        let scaled = scaled.clamp(0.0, self.levels());
        let floor = scaled as u32;
        let u = f64::from(random) * (1.0 / 4_294_967_296.0);
        floor + u32::from(u < scaled - f64::from(floor))
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
        // A finite f32 squared fits an f64 with room for any length, so the
        // norm is finite exactly when every coordinate is.
        let norm = l2_norm(delta);
        if !norm.is_finite() {
            let index = delta.iter().position(|v| !v.is_finite()).unwrap_or(0);
            return Err(NonFiniteUpdate::Coordinate { index });
        }
        if !weight.is_finite() {
            return Err(NonFiniteUpdate::Weight);
        }
        let factor = if norm > self.clip { self.clip / norm } else { 1.0 };
        // q = sround((v·factor·w + C) / δ) = sround(v·scale + offset).
        let step = self.step(self.clip);
        let scale = factor * weight / step;
        let offset = self.clip / step;
        // Random words are drawn a block at a time (one keystream call per
        // block rather than one per coordinate), then consumed by a loop with
        // no calls or branches in it.
        let mut out = Vec::with_capacity(delta.len());
        let mut random = [0u32; RANDOM_BLOCK];
        for chunk in delta.chunks(RANDOM_BLOCK) {
            let random = &mut random[..chunk.len()];
            rng.fill(random);
            out.extend(
                chunk
                    .iter()
                    .zip(random.iter())
                    .map(|(&v, &r)| self.round_scaled(f64::from(v) * scale + offset, r)),
            );
        }
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

    proptest! {
        /// The blocked encoder rounds each coordinate to a neighbouring level
        /// (within one step of the clipped, weighted value), across block
        /// boundaries, and clips by the true L2 norm.
        #[test]
        fn encode_update_stays_within_a_step(
            delta in prop::collection::vec(-2.0f32..2.0, 0..5000),
            weight in 0.0f64..1.0,
            seed in any::<u64>(),
        ) {
            let q = Quantizer::for_sites(5, 3.0);
            let (words, factor) = q
                .encode_update(&delta, weight, &mut ChaCha20Rng::seed_from_u64(seed))
                .unwrap();
            let norm = delta.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>().sqrt();
            let expected = if norm > 3.0 { 3.0 / norm } else { 1.0 };
            prop_assert!((factor - expected).abs() < 1e-9 * expected);
            prop_assert_eq!(words.len(), delta.len());
            for (&w, &v) in words.iter().zip(&delta) {
                let decoded = q.decode_sum(w, 1, 3.0);
                let truth = f64::from(v) * factor * weight;
                prop_assert!((decoded - truth).abs() <= q.step(3.0) * (1.0 + 1e-6), "{decoded} vs {truth}");
            }
        }
    }

    /// The non-finite coordinate is named wherever it sits: in the
    /// eight-lane body of the norm or in its tail.
    #[test]
    fn non_finite_coordinate_is_named_in_body_and_tail() {
        let q = Quantizer::for_sites(4, 2.0);
        for index in [0, 7, 8, 13, 16, 18] {
            let mut delta = vec![0.1f32; 19];
            delta[index] = f32::NAN;
            assert_eq!(
                q.encode_update(&delta, 1.0, &mut ChaCha20Rng::seed_from_u64(1)),
                Err(NonFiniteUpdate::Coordinate { index })
            );
        }
    }

    /// Unbiased through the blocked encoder too: a vector of one value a
    /// third of a step above a level decodes, on average, to the value.
    #[test]
    fn encode_update_is_unbiased() {
        let q = Quantizer { bits: 4, clip: 1.0 };
        let step = q.step(1.0);
        let value = (-1.0 + 5.0 * step + step / 3.0) as f32;
        let n = 60_000;
        let (words, factor) = q
            .encode_update(&vec![value; n], 1.0, &mut ChaCha20Rng::seed_from_u64(3))
            .unwrap();
        // The vector's norm is far above the clip: undo the scaling.
        let mean = words.iter().map(|&w| q.decode_sum(w, 1, 1.0)).sum::<f64>() / n as f64;
        let target = f64::from(value) * factor;
        assert!((mean - target).abs() < step * 0.01, "{mean} vs {target}");
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
