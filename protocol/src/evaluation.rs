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
pub fn encode_site(n: usize, accuracy: f64, mean_loss: f64) -> Vec<u32> {
    let n = n as f64;
    let finite = |v: f64| if v.is_finite() { v } else { 0.0 };
    exact::encode(&[n, (finite(accuracy) * n).round(), finite(mean_loss) * n])
}

/// The pooled metrics from the summed contributions.
pub fn decode_sum(words: &[u32]) -> Pooled {
    let v = exact::decode_sum(words);
    let n = v[0].round();
    if n <= 0.0 {
        return Pooled {
            n_test: 0.0,
            accuracy: f64::NAN,
            loss: f64::NAN,
        };
    }
    Pooled {
        n_test: n,
        accuracy: v[1].round() / n,
        loss: v[2] / n,
    }
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
        let pooled = decode_sum(&sum);
        assert_eq!(pooled.n_test, 120.0);
        assert_eq!(pooled.accuracy, 86.0 / 120.0);
        assert!((pooled.loss - (52.0 + 16.0) / 120.0).abs() < 1e-4);
        assert!(decode_sum(&[0; WORDS]).accuracy.is_nan());
    }
}
