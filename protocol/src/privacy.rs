//! Privacy accounting: the Rényi differential privacy (RDP) of the sampled
//! Gaussian mechanism, its composition over steps, rounds and jobs, and its
//! conversion to (ε, δ).
//!
//! A site spends privacy each time its data shapes what leaves it; every
//! spend is an RDP curve (ε at each order α), curves add under composition,
//! and a curve becomes one (ε, δ) guarantee at the end. Sans-IO and
//! deterministic, so the figure a site records in the ledger is the figure
//! a regulator recomputes.
//!
//! - Sampled Gaussian: Mironov, Talwar and Zhang (2019), "Rényi Differential
//!   Privacy of the Sampled Gaussian Mechanism": the exact sum for integer
//!   orders, the two-sided series of their Section 3.3 for fractional ones.
//! - RDP to (ε, δ): the bound of Canonne, Kamath and Steinke (2020) /
//!   Asoodeh et al. (2020), `ε = r + ln(1 − 1/α) − (ln δ + ln α)/(α − 1)`,
//!   minimised over the orders.
//!
//! `tests/tests/accountant.rs` checks the figures against Google's
//! `dp-accounting` Python package on a grid of noise multipliers, sampling
//! rates and step counts.

/// The orders at which curves are kept: fine near 1 (where small budgets
/// are decided), then every integer to 63, then a few large ones (for tiny
/// δ and little noise). The same grid as `dp-accounting`'s default.
pub fn default_orders() -> Vec<f64> {
    let fine = (1..100).map(|x| 1.0 + f64::from(x) / 10.0);
    let integers = (11..64).map(f64::from);
    fine.chain(integers).chain([128.0, 256.0, 512.0, 1024.0]).collect()
}

/// An RDP curve: ε(α) at each of its orders. Composition adds curves.
#[derive(Clone, Debug, PartialEq)]
pub struct Rdp {
    orders: Vec<f64>,
    epsilons: Vec<f64>,
}

/// Why a mechanism cannot be accounted.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AccountingError {
    #[error("sampling rate {0} is not in [0, 1]")]
    SamplingRate(f64),
    #[error("noise multiplier {0} is not a positive number")]
    NoiseMultiplier(f64),
    #[error("delta {0} is not in (0, 1)")]
    Delta(f64),
}

impl Default for Rdp {
    fn default() -> Self {
        Self::new(default_orders())
    }
}

impl Rdp {
    /// Nothing spent yet, at `orders` (each > 1).
    pub fn new(orders: Vec<f64>) -> Self {
        let epsilons = vec![0.0; orders.len()];
        Self { orders, epsilons }
    }

    /// `steps` compositions of the sampled Gaussian mechanism: each step
    /// includes each record with probability `q` and adds Gaussian noise of
    /// `sigma` times the sensitivity (DP-SGD's noise multiplier).
    pub fn sampled_gaussian(mut self, q: f64, sigma: f64, steps: u64) -> Result<Self, AccountingError> {
        if !(0.0..=1.0).contains(&q) {
            return Err(AccountingError::SamplingRate(q));
        }
        if !(sigma > 0.0 && sigma.is_finite()) {
            return Err(AccountingError::NoiseMultiplier(sigma));
        }
        for (eps, &alpha) in self.epsilons.iter_mut().zip(&self.orders) {
            *eps += steps as f64 * sampled_gaussian_rdp(q, sigma, alpha);
        }
        Ok(self)
    }

    /// The composition of two spends (two jobs, or two mechanisms of one).
    ///
    /// # Panics
    /// If the curves are kept at different orders (every curve Tessera
    /// makes is at [`default_orders`]).
    pub fn compose(mut self, other: &Rdp) -> Self {
        assert_eq!(self.orders, other.orders, "curves at different orders");
        for (a, b) in self.epsilons.iter_mut().zip(&other.epsilons) {
            *a += b;
        }
        self
    }

    /// The smallest ε such that the spend is (ε, δ)-DP, and the order that
    /// gives it.
    pub fn epsilon(&self, delta: f64) -> Result<(f64, f64), AccountingError> {
        if !(delta > 0.0 && delta < 1.0) {
            return Err(AccountingError::Delta(delta));
        }
        let mut best = (f64::INFINITY, f64::NAN);
        for (&alpha, &rdp) in self.orders.iter().zip(&self.epsilons) {
            let eps = if rdp <= 0.0 || delta * delta + (-rdp).exp_m1() > 0.0 {
                // Pinsker-style: a divergence this small is (0, δ) already.
                0.0
            } else if alpha > 1.01 {
                rdp + (-1.0 / alpha).ln_1p() - (delta * alpha).ln() / (alpha - 1.0)
            } else {
                // Not numerically useful this close to 1.
                f64::INFINITY
            };
            if eps < best.0 {
                best = (eps, alpha);
            }
        }
        Ok((best.0.max(0.0), best.1))
    }
}

/// The RDP of one sampled Gaussian step at order `alpha` (> 1).
pub fn sampled_gaussian_rdp(q: f64, sigma: f64, alpha: f64) -> f64 {
    if q == 0.0 {
        return 0.0;
    }
    if q == 1.0 {
        // The plain Gaussian mechanism.
        return alpha / (2.0 * sigma * sigma);
    }
    if alpha.is_infinite() {
        return f64::INFINITY;
    }
    let log_a = if alpha.fract() == 0.0 {
        log_a_integer(q, sigma, alpha as u64)
    } else {
        log_a_fractional(q, sigma, alpha)
    };
    log_a / (alpha - 1.0)
}

/// ln A_α for integer α: the binomial expansion of E[(μ₁/μ₀)^α] over the
/// mixture, every term positive.
fn log_a_integer(q: f64, sigma: f64, alpha: u64) -> f64 {
    let (ln_q, ln_1mq) = (q.ln(), (-q).ln_1p());
    let a = alpha as f64;
    (0..=alpha)
        .map(|k| {
            let k = k as f64;
            ln_binomial(a, k) + k * ln_q + (a - k) * ln_1mq + (k * k - k) / (2.0 * sigma * sigma)
        })
        .fold(f64::NEG_INFINITY, log_add)
}

/// ln A_α for fractional α: the integral split at z₀ where the two Gaussians
/// of the mixture cross, each side a series in i whose terms are bounded
/// with erfc; summed until both sides' terms fall 30 nats below the total.
fn log_a_fractional(q: f64, sigma: f64, alpha: f64) -> f64 {
    let (ln_q, ln_1mq) = (q.ln(), (-q).ln_1p());
    let z0 = sigma * sigma * (1.0 / q - 1.0).ln() + 0.5;
    let scale = std::f64::consts::SQRT_2 * sigma;
    let (mut below, mut above) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    let (mut last_below, mut last_above) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    for i in 0..MAX_SERIES_TERMS {
        let i = i as f64;
        let j = alpha - i;
        let coef = ln_binomial(alpha, i);
        let term_below = coef + i * ln_q + j * ln_1mq + (i * i - i) / (2.0 * sigma * sigma) + ln_erfc((i - z0) / scale)
            - std::f64::consts::LN_2;
        let term_above = coef + j * ln_q + i * ln_1mq + (j * j - j) / (2.0 * sigma * sigma) + ln_erfc((z0 - j) / scale)
            - std::f64::consts::LN_2;
        below = log_add(below, term_below);
        above = log_add(above, term_above);
        let total = log_add(below, above);
        if term_below < last_below && term_above < last_above && term_below.max(term_above) < total - 30.0 {
            return total;
        }
        (last_below, last_above) = (term_below, term_above);
    }
    // Not converged: this order gives no bound (ε is the minimum over the
    // others).
    f64::INFINITY
}

const MAX_SERIES_TERMS: usize = 100_000;

/// ln |C(n, k)| for real n, through ln |Γ|.
fn ln_binomial(n: f64, k: f64) -> f64 {
    libm::lgamma(n + 1.0) - libm::lgamma(k + 1.0) - libm::lgamma(n - k + 1.0)
}

/// ln(e^a + e^b), exact at −∞.
fn log_add(a: f64, b: f64) -> f64 {
    let (hi, lo) = if a > b { (a, b) } else { (b, a) };
    if lo == f64::NEG_INFINITY {
        return hi;
    }
    hi + (lo - hi).exp().ln_1p()
}

/// ln erfc(x), accurate where erfc(x) underflows: beyond x = 20 the
/// asymptotic series erfc(x) ~ e^(−x²) / (x √π) · (1 − 1/(2x²) + 3/(4x⁴) − 15/(8x⁶)).
fn ln_erfc(x: f64) -> f64 {
    if x < 20.0 {
        libm::erfc(x).ln()
    } else {
        ln_erfc_asymptotic(x)
    }
}

fn ln_erfc_asymptotic(x: f64) -> f64 {
    let inv2 = 1.0 / (x * x);
    let series = 1.0 - inv2 / 2.0 + 0.75 * inv2 * inv2 - 1.875 * inv2 * inv2 * inv2;
    -x * x - x.ln() - 0.5 * std::f64::consts::PI.ln() + series.ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With q = 1 every record is in every step: the Gaussian mechanism,
    /// whose RDP is exactly α/(2σ²).
    #[test]
    fn without_sampling_it_is_the_gaussian_mechanism() {
        for alpha in [1.5, 2.0, 10.0, 32.0] {
            assert_eq!(sampled_gaussian_rdp(1.0, 2.0, alpha), alpha / 8.0);
        }
        // The integer expansion agrees: q → 1 from below.
        let near = sampled_gaussian_rdp(1.0 - 1e-12, 2.0, 3.0);
        assert!((near - 3.0 / 8.0).abs() < 1e-9, "{near}");
    }

    /// Fractional and integer orders meet: the curve is continuous in α.
    #[test]
    fn fractional_orders_join_the_integer_ones() {
        for (q, sigma) in [(0.01, 1.0), (0.1, 2.0), (0.001, 0.7)] {
            let at = |a: f64| sampled_gaussian_rdp(q, sigma, a);
            for k in [2.0f64, 3.0, 5.0] {
                let (below, exact, above) = (at(k - 1e-7), at(k), at(k + 1e-7));
                assert!(
                    (below - exact).abs() < 1e-5 * exact.max(1e-9),
                    "{q} {sigma} {k}: {below} {exact}"
                );
                assert!(
                    (above - exact).abs() < 1e-5 * exact.max(1e-9),
                    "{q} {sigma} {k}: {above} {exact}"
                );
            }
        }
    }

    /// A known value by hand: order 2, A₂ = 1 + q²(e^(1/σ²) − 1), from the
    /// binomial expansion (the k = 1 terms cancel to 1).
    #[test]
    fn order_two_by_hand() {
        let (q, sigma) = (0.05f64, 1.3f64);
        let a2 = (1.0 - q).powi(2) + 2.0 * q * (1.0 - q) + q * q * (1.0 / (sigma * sigma)).exp();
        assert!((sampled_gaussian_rdp(q, sigma, 2.0) - a2.ln()).abs() < 1e-12);
    }

    /// Spends add: k steps are one step k times; more noise or a lower
    /// sampling rate spends less; ε falls as δ grows.
    #[test]
    fn composition_and_monotonicity() {
        let one = Rdp::default().sampled_gaussian(0.01, 1.1, 1).unwrap();
        let mut many = Rdp::default();
        for _ in 0..100 {
            many = many.compose(&one);
        }
        let at_once = Rdp::default().sampled_gaussian(0.01, 1.1, 100).unwrap();
        for (a, b) in many.epsilons.iter().zip(&at_once.epsilons) {
            assert!((a - b).abs() <= 1e-12 * b.abs().max(1.0));
        }
        let eps = |q: f64, sigma: f64, steps: u64| {
            Rdp::default()
                .sampled_gaussian(q, sigma, steps)
                .unwrap()
                .epsilon(1e-5)
                .unwrap()
                .0
        };
        assert!(eps(0.01, 1.1, 1000) > eps(0.01, 1.1, 100));
        assert!(eps(0.01, 2.0, 1000) < eps(0.01, 1.1, 1000));
        assert!(eps(0.001, 1.1, 1000) < eps(0.01, 1.1, 1000));
        let curve = Rdp::default().sampled_gaussian(0.01, 1.1, 1000).unwrap();
        assert!(curve.epsilon(1e-3).unwrap().0 < curve.epsilon(1e-6).unwrap().0);
        assert_eq!(Rdp::default().epsilon(1e-5).unwrap().0, 0.0);
    }

    #[test]
    fn bad_parameters_are_named() {
        assert_eq!(
            Rdp::default().sampled_gaussian(1.5, 1.0, 1),
            Err(AccountingError::SamplingRate(1.5))
        );
        assert_eq!(
            Rdp::default().sampled_gaussian(0.1, 0.0, 1),
            Err(AccountingError::NoiseMultiplier(0.0))
        );
        assert_eq!(Rdp::default().epsilon(0.0), Err(AccountingError::Delta(0.0)));
        assert_eq!(Rdp::default().epsilon(1.0), Err(AccountingError::Delta(1.0)));
    }

    /// The asymptotic ln erfc joins libm's where both are accurate.
    #[test]
    fn log_erfc_is_continuous_at_the_switch() {
        for x in [12.0, 19.9, 25.0] {
            let (direct, series) = (libm::erfc(x).ln(), ln_erfc_asymptotic(x));
            assert!(
                (direct - series).abs() < 1e-7 * direct.abs(),
                "{x}: {direct} vs {series}"
            );
        }
        assert!(ln_erfc(40.0).is_finite() && ln_erfc(40.0) < -1600.0);
    }
}
