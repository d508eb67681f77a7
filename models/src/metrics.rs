//! Evaluation of one model on one split: loss and accuracy, the clinical
//! metrics of `tessera_protocol::metrics`, and the sums the site adds to a
//! secure pooled evaluation, all from one pass over the scores.

use tessera_protocol::evaluation::SiteSums;
use tessera_protocol::metrics::BinaryMetrics;

/// One model judged on one split.
#[derive(Clone, Debug, PartialEq)]
pub struct Evaluation {
    pub n: usize,
    /// Mean binary cross-entropy (NaN on an empty split).
    pub loss: f64,
    /// At the job's threshold (NaN on an empty split).
    pub accuracy: f64,
    /// ROC AUC, AP, Brier, calibration and the threshold metrics; `None`
    /// where undefined (one class in the split).
    pub binary: BinaryMetrics,
    /// What this split adds to a secure pooled evaluation.
    pub sums: SiteSums,
}

impl Evaluation {
    /// Judges logits against 0/1 labels, a row predicted positive when its
    /// probability exceeds `threshold`.
    pub fn of_scores(logits: &[f32], labels: &[f32], threshold: f64) -> Self {
        let sums = SiteSums::of_scores(logits, labels, threshold);
        let n = logits.len();
        let per_row = |v: f64| if n == 0 { f64::NAN } else { v / n as f64 };
        Self {
            n,
            loss: per_row(sums.loss_sum),
            accuracy: per_row(sums.correct as f64),
            binary: BinaryMetrics::of_scores(logits, labels, threshold),
            sums,
        }
    }

    /// ROC AUC, NaN where undefined (for figures that are plain numbers).
    pub fn auc(&self) -> f64 {
        self.binary.roc_auc.unwrap_or(f64::NAN)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accuracy_and_loss_by_hand() {
        let e = Evaluation::of_scores(&[1.0, -1.0, 2.0, -0.5], &[1.0, 0.0, 0.0, 0.0], 0.5);
        assert_eq!(e.accuracy, 0.75);
        let e = Evaluation::of_scores(&[0.0, 0.0], &[1.0, 0.0], 0.5);
        assert!((e.loss - std::f64::consts::LN_2).abs() < 1e-12);
        // Large logits do not overflow.
        let e = Evaluation::of_scores(&[1000.0], &[0.0], 0.5);
        assert!((e.loss - 1000.0).abs() < 1e-9);
        // At threshold 0.8, logit 1 (p 0.73) is a negative prediction.
        let e = Evaluation::of_scores(&[1.0, -1.0], &[0.0, 0.0], 0.8);
        assert_eq!(e.accuracy, 1.0);
        assert!(Evaluation::of_scores(&[], &[], 0.5).accuracy.is_nan());
    }
}
