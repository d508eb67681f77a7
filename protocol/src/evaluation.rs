//! Federated evaluation through the secure sum: each site adds its test-row
//! count, correct predictions and summed loss; the coordinator learns only
//! the pooled accuracy and loss over all sites' test rows.

use crate::secagg::exact;

/// Words a site's evaluation takes in a secure input.
pub const WORDS: usize = 3 * exact::LIMBS;

/// Pooled evaluation of one model over several sites.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Pooled {
    pub n_test: f64,
    pub accuracy: f64,
    pub loss: f64,
}

/// A site's contribution: `n` test rows, its accuracy and mean loss on them.
/// A mean loss beyond this (a diverged model) is sent as this bound, so the
/// encoded sum stays exact.
const MAX_MEAN_LOSS: f64 = 1e6;

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
    exact::encode(&[n, (accuracy * n).round(), loss * n]).expect("bounded values always encode")
}

/// The pooled metrics from the summed contributions.
pub fn decode_sum(words: &[u32]) -> Result<Pooled, exact::ExactError> {
    let v = exact::decode_sum(words)?;
    let n = v[0].round();
    if n <= 0.0 {
        return Ok(Pooled {
            n_test: 0.0,
            accuracy: f64::NAN,
            loss: f64::NAN,
        });
    }
    Ok(Pooled {
        n_test: n,
        accuracy: v[1].round() / n,
        loss: v[2] / n,
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
        let pooled = decode_sum(&sum).unwrap();
        assert_eq!(pooled.n_test, 120.0);
        assert_eq!(pooled.accuracy, 86.0 / 120.0);
        assert!((pooled.loss - (52.0 + 16.0) / 120.0).abs() < 1e-4);
        assert!(decode_sum(&[0; WORDS]).unwrap().accuracy.is_nan());
    }
}
