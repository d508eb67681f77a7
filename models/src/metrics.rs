//! Evaluation metrics for binary classification, in plain Rust so they can be
//! checked by hand.

/// Loss, accuracy and ROC AUC of one model on one split.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Evaluation {
    pub n: usize,
    pub loss: f64,
    pub accuracy: f64,
    /// NaN when the split holds only one class (AUC is undefined).
    pub auc: f64,
}

/// Area under the ROC curve via the Mann–Whitney U statistic, with tied scores
/// counted as half (the same value as scikit-learn's `roc_auc_score`).
pub fn roc_auc(scores: &[f32], labels: &[f32]) -> f64 {
    let mut pairs: Vec<(f32, bool)> = scores.iter().zip(labels).map(|(&s, &l)| (s, l > 0.5)).collect();
    let n_pos = pairs.iter().filter(|p| p.1).count();
    let n_neg = pairs.len() - n_pos;
    if n_pos == 0 || n_neg == 0 {
        return f64::NAN;
    }
    pairs.sort_by(|a, b| a.0.total_cmp(&b.0));
    // Sum of the (1-based, tie-averaged) ranks of the positives.
    let mut rank_sum = 0.0;
    let mut i = 0;
    while i < pairs.len() {
        let mut j = i;
        while j < pairs.len() && pairs[j].0 == pairs[i].0 {
            j += 1;
        }
        let avg_rank = (i + 1 + j) as f64 / 2.0;
        rank_sum += avg_rank * pairs[i..j].iter().filter(|p| p.1).count() as f64;
        i = j;
    }
    let n_pos = n_pos as f64;
    (rank_sum - n_pos * (n_pos + 1.0) / 2.0) / (n_pos * n_neg as f64)
}

/// Fraction of logits on the right side of 0.
pub fn accuracy(logits: &[f32], labels: &[f32]) -> f64 {
    if logits.is_empty() {
        return f64::NAN;
    }
    let correct = logits
        .iter()
        .zip(labels)
        .filter(|(z, y)| (**z > 0.0) == (**y > 0.5))
        .count();
    correct as f64 / logits.len() as f64
}

/// Mean binary cross-entropy of logits, computed stably.
pub fn bce_with_logits(logits: &[f32], labels: &[f32]) -> f64 {
    if logits.is_empty() {
        return f64::NAN;
    }
    let total: f64 = logits
        .iter()
        .zip(labels)
        .map(|(&z, &y)| {
            let (z, y) = (f64::from(z), f64::from(y));
            z.max(0.0) - z * y + (-z.abs()).exp().ln_1p()
        })
        .sum();
    total / logits.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auc_by_hand() {
        assert_eq!(roc_auc(&[0.1, 0.4, 0.35, 0.8], &[0.0, 0.0, 1.0, 1.0]), 0.75);
        assert_eq!(roc_auc(&[1.0, 2.0], &[0.0, 1.0]), 1.0);
        assert_eq!(roc_auc(&[2.0, 1.0], &[0.0, 1.0]), 0.0);
        // One positive tied with one negative: half credit.
        assert_eq!(roc_auc(&[0.5, 0.5, 0.1], &[1.0, 0.0, 0.0]), 0.75);
        assert!(roc_auc(&[0.5, 0.7], &[1.0, 1.0]).is_nan());
    }

    #[test]
    fn accuracy_and_loss_by_hand() {
        assert_eq!(accuracy(&[1.0, -1.0, 2.0, -0.5], &[1.0, 0.0, 0.0, 0.0]), 0.75);
        let loss = bce_with_logits(&[0.0, 0.0], &[1.0, 0.0]);
        assert!((loss - std::f64::consts::LN_2).abs() < 1e-12);
        // Large logits do not overflow.
        assert!(bce_with_logits(&[1000.0], &[0.0]).is_finite());
        assert!((bce_with_logits(&[1000.0], &[0.0]) - 1000.0).abs() < 1e-9);
    }
}
