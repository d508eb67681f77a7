//! Federated evaluation through the secure sum: each site adds its correct
//! predictions and summed loss; the coordinator learns only the pooled
//! accuracy and loss over all sites' test rows.
//!
//! The test-row count is not in the sum: it is the same in every round, so
//! two rounds whose survivor sets differ by one site would reveal it. Each
//! site declares it in its signed acceptance of the job instead (public in
//! the ledger), and the pooled count is the sum of the survivors'
//! declarations.

use crate::secagg::exact;

/// Words a site's evaluation takes in a secure input.
pub const WORDS: usize = 2 * exact::LIMBS;

/// Pooled evaluation of one model over several sites.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Pooled {
    pub n_test: f64,
    pub accuracy: f64,
    pub loss: f64,
}

/// A mean loss beyond this (a diverged model) is sent as this bound, so the
/// encoded sum stays exact.
const MAX_MEAN_LOSS: f64 = 1e6;

/// A site's contribution from its accuracy and mean loss on its `n` test
/// rows (`n` is the count it declared): correct predictions and summed loss.
pub fn encode_site(n: usize, accuracy: f64, mean_loss: f64) -> Vec<u32> {
    let n = (n as f64).min(1e9);
    let loss = if mean_loss.is_finite() {
        mean_loss
    } else {
        MAX_MEAN_LOSS
    };
    let loss = loss.clamp(-MAX_MEAN_LOSS, MAX_MEAN_LOSS);
    let accuracy = if accuracy.is_finite() {
        accuracy.clamp(0.0, 1.0)
    } else {
        0.0
    };
    exact::encode(&[(accuracy * n).round(), loss * n]).expect("bounded values always encode")
}

/// The pooled metrics from the summed contributions of sites whose declared
/// test counts add up to `n_test`.
pub fn decode_sum(words: &[u32], n_test: u64) -> Result<Pooled, exact::ExactError> {
    let v = exact::decode_sum(words)?;
    let n = n_test as f64;
    if n_test == 0 {
        return Ok(Pooled {
            n_test: 0.0,
            accuracy: f64::NAN,
            loss: f64::NAN,
        });
    }
    Ok(Pooled {
        n_test: n,
        accuracy: v[0].round() / n,
        loss: v[1] / n,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooled_accuracy_by_hand() {
        // 104 rows at 0.75 (78 correct) and 16 rows at 0.5 (8 correct): 86/120.
        let a = encode_site(104, 0.75, 0.5);
        let b = encode_site(16, 0.5, 1.0);
        let sum: Vec<u32> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
        let pooled = decode_sum(&sum, 120).unwrap();
        assert_eq!(pooled.n_test, 120.0);
        assert_eq!(pooled.accuracy, 86.0 / 120.0);
        assert!((pooled.loss - (52.0 + 16.0) / 120.0).abs() < 1e-4);
        assert!(decode_sum(&[0; WORDS], 0).unwrap().accuracy.is_nan());
    }

    /// Differencing: the count a site declares is not in what it sends, so
    /// two rounds summed over sets that differ by this site reveal only its
    /// correct predictions and loss sum of that round, never a job constant.
    #[test]
    fn adversarial_differencing_reveals_no_job_constant_count() {
        // Same correct count (60) and loss sum (30) from 100 and 120 rows.
        assert_eq!(encode_site(100, 0.6, 0.3), encode_site(120, 0.5, 0.25));
        assert_eq!(encode_site(100, 0.6, 0.3).len(), WORDS);
    }
}
