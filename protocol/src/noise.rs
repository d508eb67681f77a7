//! Exact discrete Gaussian noise, for distributed differential privacy
//! under secure aggregation: each site adds integer noise to its quantised
//! input before masking, so the noise lives in the same modular integers as
//! the sum and no floating-point sampler can leak through its rounding
//! (Mironov 2012 broke floating-point Laplace samplers that way).
//!
//! Canonne, Kamath and Steinke (2020), "The Discrete Gaussian for
//! Differential Privacy": Bernoulli(exp(−γ)) for rational γ from uniform
//! integers alone, a discrete Laplace proposal, and rejection to the
//! discrete Gaussian N_Z(0, σ²) with P(x) ∝ exp(−x²/(2σ²)). Every step uses
//! exact integer arithmetic (u128) on a rational σ² = `num/den`; the only
//! randomness is uniform integers from the caller's RNG (a CSPRNG in
//! production).

use rand::Rng;

/// A variance σ² = `num / den`, exactly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Variance {
    pub num: u64,
    pub den: u64,
}

/// Why a variance cannot be sampled.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NoiseError {
    #[error("the variance {num}/{den} is not positive")]
    NotPositive { num: u64, den: u64 },
    #[error("the variance {num}/{den} is beyond what exact sampling supports (num and den below 2^40)")]
    TooLarge { num: u64, den: u64 },
}

/// Bound on `num` and `den`, so every intermediate product fits in u128.
const LIMIT: u64 = 1 << 40;

impl Variance {
    /// Checks the variance can be sampled exactly.
    pub fn new(num: u64, den: u64) -> Result<Self, NoiseError> {
        if num == 0 || den == 0 {
            return Err(NoiseError::NotPositive { num, den });
        }
        if num >= LIMIT || den >= LIMIT {
            return Err(NoiseError::TooLarge { num, den });
        }
        Ok(Self { num, den })
    }

    pub fn value(self) -> f64 {
        self.num as f64 / self.den as f64
    }
}

/// True with probability `num / den` (`num ≤ den`), from one uniform integer.
fn bernoulli<R: Rng + ?Sized>(rng: &mut R, num: u128, den: u128) -> bool {
    rng.random_range(0..den) < num
}

/// True with probability exp(−num/den), for any num/den ≥ 0.
fn bernoulli_exp<R: Rng + ?Sized>(rng: &mut R, num: u128, den: u128) -> bool {
    // exp(−γ) = exp(−1)^⌊γ⌋ · exp(−(γ − ⌊γ⌋)).
    for _ in 0..num / den {
        if !bernoulli_exp_unit(rng, 1, 1) {
            return false;
        }
    }
    bernoulli_exp_unit(rng, num % den, den)
}

/// True with probability exp(−γ) for γ = num/den in [0, 1]: draw
/// A_k ~ Bernoulli(γ/k) for k = 1, 2, … until one is false; the answer is
/// whether that k is odd.
fn bernoulli_exp_unit<R: Rng + ?Sized>(rng: &mut R, num: u128, den: u128) -> bool {
    let mut k: u128 = 1;
    while bernoulli(rng, num, den * k) {
        k += 1;
    }
    k % 2 == 1
}

/// A discrete Laplace sample with scale `t` (P(y) ∝ exp(−|y|/t)).
fn discrete_laplace<R: Rng + ?Sized>(rng: &mut R, t: u128) -> i128 {
    loop {
        let u = rng.random_range(0..t);
        if !bernoulli_exp(rng, u, t) {
            continue;
        }
        let mut v: u128 = 0;
        while bernoulli_exp(rng, 1, 1) {
            v += 1;
        }
        let magnitude = (u + t * v) as i128;
        let negative = bernoulli(rng, 1, 2);
        if negative && magnitude == 0 {
            continue;
        }
        return if negative { -magnitude } else { magnitude };
    }
}

/// ⌊√(num/den)⌋, exactly.
fn floor_sqrt(v: Variance) -> u128 {
    let (num, den) = (u128::from(v.num), u128::from(v.den));
    // Largest s with s² · den ≤ num: start from the float estimate, correct.
    let mut s = (v.value().sqrt() as u128).saturating_sub(1);
    while (s + 1) * (s + 1) * den <= num {
        s += 1;
    }
    while s > 0 && s * s * den > num {
        s -= 1;
    }
    s
}

/// One sample of the discrete Gaussian N_Z(0, σ²).
pub fn discrete_gaussian<R: Rng + ?Sized>(rng: &mut R, variance: Variance) -> i64 {
    let (num, den) = (u128::from(variance.num), u128::from(variance.den));
    let t = floor_sqrt(variance) + 1;
    loop {
        let y = discrete_laplace(rng, t);
        // Accept with exp(−(|y| − σ²/t)² / (2σ²)), that is exp(−γ) with
        // γ = (|y|·t·den − num)² / (2·num·t²·den).
        let gap = (y.unsigned_abs() * t * den).abs_diff(num);
        if bernoulli_exp(rng, gap * gap, 2 * num * t * t * den) {
            return y as i64;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    /// The exact probabilities of N_Z(0, σ²) on −limit..=limit, by summing
    /// the unnormalised weights far into the tails.
    fn pmf(sigma2: f64, limit: i64) -> Vec<f64> {
        let weight = |x: i64| (-((x * x) as f64) / (2.0 * sigma2)).exp();
        let total: f64 = (-2000..=2000).map(weight).sum();
        (-limit..=limit).map(|x| weight(x) / total).collect()
    }

    /// Chi-square goodness of fit on 10⁶ samples, at a small σ where the
    /// discrete Gaussian differs from a rounded continuous one, and at a
    /// larger one. The statistic must stay below the 0.1 % critical value.
    #[test]
    fn a_million_samples_fit_the_discrete_gaussian() {
        let mut rng = ChaCha20Rng::seed_from_u64(20_261_208);
        for (num, den, limit, critical) in [
            // σ² = 0.49: bins −4..=4 (9 bins + 2 tails, 10 degrees of
            // freedom): χ²(10) at 0.1 % is 29.59.
            (49u64, 100u64, 4i64, 29.59),
            // σ² = 12.25: bins −12..=12 (25 bins + 2 tails, 26 degrees of
            // freedom): χ²(26) at 0.1 % is 54.05.
            (49, 4, 12, 54.05),
        ] {
            let v = Variance::new(num, den).unwrap();
            let n = 1_000_000usize;
            let width = (2 * limit + 1) as usize;
            let mut counts = vec![0u64; width + 2];
            for _ in 0..n {
                let x = discrete_gaussian(&mut rng, v);
                let bin = if x < -limit {
                    width
                } else if x > limit {
                    width + 1
                } else {
                    (x + limit) as usize
                };
                counts[bin] += 1;
            }
            let p = pmf(v.value(), limit);
            let tail = (1.0 - p.iter().sum::<f64>()) / 2.0;
            let expected: Vec<f64> = p.iter().copied().chain([tail, tail]).map(|q| q * n as f64).collect();
            let chi2: f64 = counts
                .iter()
                .zip(&expected)
                .filter(|(_, e)| **e > 0.0)
                .map(|(&c, &e)| (c as f64 - e).powi(2) / e)
                .sum();
            println!(
                "σ² = {num}/{den}: χ² = {chi2:.2} over {} bins (0.1 % critical value {critical})",
                width + 2
            );
            assert!(
                chi2 < critical,
                "σ² = {num}/{den}: χ² = {chi2} ≥ {critical}; counts {counts:?}"
            );
        }
    }

    /// Rounding a continuous Gaussian is not the discrete Gaussian: at
    /// σ² = 0.49 the same test rejects it, so the test above has power.
    #[test]
    fn the_fit_test_rejects_a_rounded_continuous_gaussian() {
        let mut rng = ChaCha20Rng::seed_from_u64(7);
        // Box–Muller, σ = 0.7.
        let mut normal = || {
            let (u1, u2): (f64, f64) = (rng.random::<f64>().max(f64::MIN_POSITIVE), rng.random());
            0.7 * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
        };
        let (n, limit) = (1_000_000usize, 4i64);
        let mut counts = [0u64; 9];
        for _ in 0..n {
            let x = normal().round() as i64;
            if x.abs() <= limit {
                counts[(x + limit) as usize] += 1;
            }
        }
        let p = pmf(0.49, limit);
        let chi2: f64 = counts
            .iter()
            .zip(&p)
            .map(|(&c, &q)| (c as f64 - q * n as f64).powi(2) / (q * n as f64))
            .sum();
        println!("rounded continuous Gaussian, σ² = 0.49: χ² = {chi2:.0}");
        assert!(chi2 > 1000.0, "χ² = {chi2}");
    }

    /// The samplers' parts, by their exact probabilities on small cases.
    #[test]
    fn bernoulli_exp_and_the_integer_square_root() {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let n = 200_000;
        for (num, den) in [(1u128, 2u128), (3, 1), (0, 5)] {
            let hits = (0..n).filter(|_| bernoulli_exp(&mut rng, num, den)).count() as f64;
            let p = (-(num as f64) / den as f64).exp();
            let sd = (p * (1.0 - p) / n as f64).sqrt().max(1e-9);
            assert!((hits / n as f64 - p).abs() < 5.0 * sd, "exp(-{num}/{den})");
        }
        assert_eq!(floor_sqrt(Variance::new(49, 4).unwrap()), 3);
        assert_eq!(floor_sqrt(Variance::new(9, 1).unwrap()), 3);
        assert_eq!(floor_sqrt(Variance::new(8, 1).unwrap()), 2);
        assert_eq!(floor_sqrt(Variance::new(1, 4).unwrap()), 0);
        assert_eq!(Variance::new(0, 1), Err(NoiseError::NotPositive { num: 0, den: 1 }));
        assert!(matches!(Variance::new(1 << 41, 1), Err(NoiseError::TooLarge { .. })));
    }
}
