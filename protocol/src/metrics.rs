//! Clinical metrics of a binary classifier: ROC AUC, average precision,
//! Brier score, calibration, and sensitivity, specificity and PPV at a
//! threshold.
//!
//! One implementation serves both ends: a site computes them exactly from its
//! own scores ([`BinaryMetrics::of_scores`]), and the coordinator computes the
//! pooled figures from score histograms summed securely
//! (`evaluation::decode_final`). Both go through the same functions over
//! *score groups* (the rows sharing one score, or one histogram bin), so the
//! two can differ only by the binning.
//!
//! A metric that is undefined (one class present; no predicted positive for
//! PPV; a calibration fit that does not converge, as on separable data) is
//! `None`, never NaN.

use serde::{Deserialize, Serialize};

/// The metrics clinical ML leads judge a binary classifier by, beyond loss
/// and accuracy (which every task has).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BinaryMetrics {
    /// Area under the ROC curve, ties counted half (scikit-learn's value).
    pub roc_auc: Option<f64>,
    /// Area under the precision-recall curve as scikit-learn's
    /// `average_precision_score` computes it (no interpolation).
    pub average_precision: Option<f64>,
    /// Mean squared error of the predicted probability.
    pub brier: Option<f64>,
    /// Calibration in the large: `a` in `logit P(y=1) = a + logit p` (0 when
    /// the predicted risks are right on average).
    pub calibration_intercept: Option<f64>,
    /// `b` in `logit P(y=1) = a + b · logit p` (1 when calibrated; below 1
    /// when the predictions are too extreme).
    pub calibration_slope: Option<f64>,
    /// A row is predicted positive when its probability exceeds this.
    pub threshold: f64,
    pub sensitivity: Option<f64>,
    pub specificity: Option<f64>,
    /// Positive predictive value (precision) at the threshold.
    pub ppv: Option<f64>,
}

/// Rows that share one score (an exact score, or one histogram bin),
/// weighted by their count in each class.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Group {
    /// The score, as a logit.
    pub logit: f64,
    pub positives: f64,
    pub negatives: f64,
}

/// Counts at a threshold, and the sum of squared errors, which the groups
/// alone cannot give exactly when they are histogram bins.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct AtThreshold {
    pub threshold: f64,
    pub true_positives: f64,
    pub false_positives: f64,
    pub brier_sum: f64,
}

impl BinaryMetrics {
    /// Exact metrics of one split from its logits and 0/1 labels.
    pub fn of_scores(logits: &[f32], labels: &[f32], threshold: f64) -> Self {
        let cut = logit(threshold);
        let mut at = AtThreshold {
            threshold,
            ..AtThreshold::default()
        };
        let mut rows: Vec<(f32, bool)> = Vec::with_capacity(logits.len());
        for (&z, &y) in logits.iter().zip(labels) {
            let positive = y > 0.5;
            if f64::from(z) > cut {
                if positive {
                    at.true_positives += 1.0;
                } else {
                    at.false_positives += 1.0;
                }
            }
            at.brier_sum += squared_error(f64::from(z), positive);
            rows.push((z, positive));
        }
        rows.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut groups: Vec<Group> = Vec::new();
        for (z, positive) in rows {
            let z = f64::from(z);
            match groups.last_mut() {
                Some(g) if g.logit == z || (g.logit.is_nan() && z.is_nan()) => {}
                _ => groups.push(Group {
                    logit: z,
                    positives: 0.0,
                    negatives: 0.0,
                }),
            }
            let g = groups.last_mut().expect("pushed above");
            if positive {
                g.positives += 1.0;
            } else {
                g.negatives += 1.0;
            }
        }
        Self::of_groups(&groups, at)
    }

    /// Metrics from score groups in ascending order of score, and the
    /// threshold counts taken on the same rows.
    pub fn of_groups(groups: &[Group], at: AtThreshold) -> Self {
        let n_pos: f64 = groups.iter().map(|g| g.positives).sum();
        let n_neg: f64 = groups.iter().map(|g| g.negatives).sum();
        let n = n_pos + n_neg;
        let both = n_pos > 0.0 && n_neg > 0.0;
        let (roc_auc, average_precision) = if both {
            ranking(groups, n_pos, n_neg)
        } else {
            (None, None)
        };
        let (calibration_intercept, calibration_slope) = if both { calibration(groups) } else { (None, None) };
        let ratio = |num: f64, den: f64| (den > 0.0).then(|| num / den);
        Self {
            roc_auc,
            average_precision,
            brier: ratio(at.brier_sum, n),
            calibration_intercept,
            calibration_slope,
            threshold: at.threshold,
            sensitivity: if both { ratio(at.true_positives, n_pos) } else { None },
            specificity: if both {
                ratio(n_neg - at.false_positives, n_neg)
            } else {
                None
            },
            ppv: ratio(at.true_positives, at.true_positives + at.false_positives),
        }
    }
}

/// The ROC curve of score groups in ascending order of score: (false
/// positive rate, true positive rate) with the threshold lowered past one
/// group at a time, from (0, 0) to (1, 1). Empty with one class.
pub fn roc_curve(groups: &[Group]) -> Vec<(f64, f64)> {
    let n_pos: f64 = groups.iter().map(|g| g.positives).sum();
    let n_neg: f64 = groups.iter().map(|g| g.negatives).sum();
    if n_pos == 0.0 || n_neg == 0.0 {
        return Vec::new();
    }
    let mut points = vec![(0.0, 0.0)];
    let (mut tp, mut fp) = (0.0, 0.0);
    for g in groups.iter().rev() {
        tp += g.positives;
        fp += g.negatives;
        points.push((fp / n_neg, tp / n_pos));
    }
    points
}

/// A calibration curve: the rows in order of score cut into `bins` groups
/// of about equal size (a score group is never split), each as (mean
/// predicted probability, observed rate of positives, rows).
pub fn calibration_curve(groups: &[Group], bins: usize) -> Vec<(f64, f64, f64)> {
    let total: f64 = groups.iter().map(|g| g.positives + g.negatives).sum();
    if total == 0.0 || bins == 0 {
        return Vec::new();
    }
    let per_bin = total / bins as f64;
    let mut curve = Vec::new();
    let (mut seen, mut rows, mut predicted, mut positives) = (0.0, 0.0, 0.0, 0.0);
    for g in groups {
        let n = g.positives + g.negatives;
        seen += n;
        rows += n;
        predicted += n * sigmoid(g.logit);
        positives += g.positives;
        // Close the k-th bin once k shares of the rows have been seen.
        let share = per_bin * (curve.len() + 1) as f64;
        if seen >= share * (1.0 - 1e-12) && rows > 0.0 {
            curve.push((predicted / rows, positives / rows, rows));
            (rows, predicted, positives) = (0.0, 0.0, 0.0);
        }
    }
    if rows > 0.0 {
        curve.push((predicted / rows, positives / rows, rows));
    }
    curve
}

/// A metric as a table shows it: four decimals, or `n/a` where undefined.
pub fn cell(v: Option<f64>) -> String {
    match v.filter(|v| v.is_finite()) {
        Some(v) => format!("{v:.4}"),
        None => "n/a".to_owned(),
    }
}

/// A ROC AUC as a table shows it: a split with one class has none, and says
/// why (`n/a (one class)`) instead of printing NaN.
pub fn auc_cell(v: Option<f64>) -> String {
    match v.filter(|v| v.is_finite()) {
        Some(v) => format!("{v:.4}"),
        None => "n/a (one class)".to_owned(),
    }
}

/// The logit of a probability: the score a threshold on probabilities cuts at.
pub fn logit(p: f64) -> f64 {
    (p / (1.0 - p)).ln()
}

fn sigmoid(z: f64) -> f64 {
    if z >= 0.0 {
        1.0 / (1.0 + (-z).exp())
    } else {
        let e = z.exp();
        e / (1.0 + e)
    }
}

/// `(p - y)²` for the probability of logit `z`; a non-finite score counts as
/// the worst error (1), so a diverged model cannot look calibrated.
pub fn squared_error(z: f64, positive: bool) -> f64 {
    if z.is_nan() {
        return 1.0;
    }
    let p = sigmoid(z);
    let y = if positive { 1.0 } else { 0.0 };
    (p - y) * (p - y)
}

/// ROC AUC (Mann–Whitney, ties half) and average precision over groups in
/// ascending order of score; both classes must be present.
fn ranking(groups: &[Group], n_pos: f64, n_neg: f64) -> (Option<f64>, Option<f64>) {
    let (mut negatives_below, mut wins) = (0.0, 0.0);
    for g in groups {
        wins += g.positives * (negatives_below + g.negatives / 2.0);
        negatives_below += g.negatives;
    }
    // Average precision: thresholds from the highest score down, each group
    // one step of recall weighted by the precision at it.
    let (mut tp, mut fp, mut ap) = (0.0, 0.0, 0.0);
    for g in groups.iter().rev() {
        tp += g.positives;
        fp += g.negatives;
        if g.positives > 0.0 {
            ap += g.positives / n_pos * tp / (tp + fp);
        }
    }
    (Some(wins / (n_pos * n_neg)), Some(ap))
}

/// Logits beyond this are taken as this in the calibration fit: the fit is
/// about the bulk of the predictions, and exp() of a larger one overflows
/// the Hessian of a saturated row to nothing useful.
const MAX_LOGIT: f64 = 30.0;

/// Log-likelihood of `logit P(y) = a + b z` over the groups.
fn log_likelihood(groups: &[Group], a: f64, b: f64) -> f64 {
    groups
        .iter()
        .map(|g| {
            let eta = a + b * g.logit.clamp(-MAX_LOGIT, MAX_LOGIT);
            // log σ(η) = -softplus(-η); log(1 - σ(η)) = -softplus(η).
            -g.positives * softplus(-eta) - g.negatives * softplus(eta)
        })
        .sum()
}

fn softplus(x: f64) -> f64 {
    x.max(0.0) + (-x.abs()).exp().ln_1p()
}

/// Calibration intercept (slope fixed at 1) and slope (both free), fitted by
/// Newton's method with step halving. `None` for a fit that does not
/// converge (separable data: the slope runs off to infinity).
fn calibration(groups: &[Group]) -> (Option<f64>, Option<f64>) {
    let groups: Vec<Group> = groups.iter().filter(|g| g.logit.is_finite()).copied().collect();
    let intercept = newton(&groups, false).map(|(a, _)| a);
    let slope = newton(&groups, true).map(|(_, b)| b);
    (intercept, slope)
}

fn newton(groups: &[Group], free_slope: bool) -> Option<(f64, f64)> {
    let (mut a, mut b) = (0.0, 1.0);
    let mut ll = log_likelihood(groups, a, b);
    for _ in 0..100 {
        // Gradient and (negated) Hessian of the log-likelihood.
        let (mut g0, mut g1, mut h00, mut h01, mut h11) = (0.0, 0.0, 0.0, 0.0, 0.0);
        for g in groups {
            let z = g.logit.clamp(-MAX_LOGIT, MAX_LOGIT);
            let p = sigmoid(a + b * z);
            let n = g.positives + g.negatives;
            let r = g.positives - n * p;
            let w = n * p * (1.0 - p);
            g0 += r;
            g1 += r * z;
            h00 += w;
            h01 += w * z;
            h11 += w * z * z;
        }
        let (da, db) = if free_slope {
            let det = h00 * h11 - h01 * h01;
            if det.abs() <= f64::EPSILON * (h00 * h11).abs().max(f64::MIN_POSITIVE) {
                return None;
            }
            ((h11 * g0 - h01 * g1) / det, (h00 * g1 - h01 * g0) / det)
        } else {
            if h00 <= 0.0 {
                return None;
            }
            (g0 / h00, 0.0)
        };
        // Step halving keeps every step uphill (a NaN likelihood is no
        // improvement).
        let uphill = |next: f64| next.partial_cmp(&ll).is_some_and(|o| o.is_ge());
        let mut step = 1.0;
        let (mut next_a, mut next_b, mut next_ll) = (a + da, b + db, log_likelihood(groups, a + da, b + db));
        while !uphill(next_ll) && step > 1e-6 {
            step /= 2.0;
            (next_a, next_b) = (a + step * da, b + step * db);
            next_ll = log_likelihood(groups, next_a, next_b);
        }
        if !uphill(next_ll) {
            return None;
        }
        let moved = (next_a - a).abs().max((next_b - b).abs());
        (a, b, ll) = (next_a, next_b, next_ll);
        if !(a.is_finite() && b.is_finite()) || a.abs() > 1e6 || b.abs() > 1e6 {
            return None;
        }
        if moved < 1e-10 {
            return Some((a, b));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn auc(scores: &[f32], labels: &[f32]) -> Option<f64> {
        BinaryMetrics::of_scores(scores, labels, 0.5).roc_auc
    }

    #[test]
    fn auc_by_hand() {
        assert_eq!(auc(&[0.1, 0.4, 0.35, 0.8], &[0.0, 0.0, 1.0, 1.0]), Some(0.75));
        assert_eq!(auc(&[1.0, 2.0], &[0.0, 1.0]), Some(1.0));
        assert_eq!(auc(&[2.0, 1.0], &[0.0, 1.0]), Some(0.0));
        // One positive tied with one negative: half credit.
        assert_eq!(auc(&[0.5, 0.5, 0.1], &[1.0, 0.0, 0.0]), Some(0.75));
        assert_eq!(auc(&[0.5, 0.7], &[1.0, 1.0]), None);
    }

    /// scikit-learn: `average_precision_score([0,0,1,1], [0.1,0.4,0.35,0.8])`
    /// is 0.8333…; with ties `([1,0,1], [0.5,0.5,0.1])` it is 0.5 · 0.5 + 0.5 · 2/3.
    #[test]
    fn average_precision_by_hand() {
        let ap = |s: &[f32], y: &[f32]| BinaryMetrics::of_scores(s, y, 0.5).average_precision.unwrap();
        assert!((ap(&[0.1, 0.4, 0.35, 0.8], &[0.0, 0.0, 1.0, 1.0]) - 5.0 / 6.0).abs() < 1e-12);
        assert!((ap(&[0.5, 0.5, 0.1], &[1.0, 0.0, 1.0]) - (0.25 + 1.0 / 3.0)).abs() < 1e-12);
        assert_eq!(ap(&[3.0, 2.0, 1.0], &[1.0, 1.0, 0.0]), 1.0);
    }

    #[test]
    fn threshold_counts_and_brier_by_hand() {
        // Probabilities 0.5 (logit 0), 0.731 (1), 0.269 (-1), 0.881 (2).
        let m = BinaryMetrics::of_scores(&[0.0, 1.0, -1.0, 2.0], &[1.0, 0.0, 0.0, 1.0], 0.5);
        // Predicted positive (p > 0.5): logits 1 and 2. TP 1 (2), FP 1 (1).
        assert_eq!(m.sensitivity, Some(0.5));
        assert_eq!(m.specificity, Some(0.5));
        assert_eq!(m.ppv, Some(0.5));
        let p = |z: f64| 1.0 / (1.0 + (-z).exp());
        let brier = ((0.5 - 1.0f64).powi(2) + p(1.0).powi(2) + p(-1.0).powi(2) + (p(2.0) - 1.0).powi(2)) / 4.0;
        assert!((m.brier.unwrap() - brier).abs() < 1e-12);
        // A higher threshold: only logit 2 (p 0.881) is above 0.8.
        let m = BinaryMetrics::of_scores(&[0.0, 1.0, -1.0, 2.0], &[1.0, 0.0, 0.0, 1.0], 0.8);
        assert_eq!((m.sensitivity, m.specificity, m.ppv), (Some(0.5), Some(1.0), Some(1.0)));
        // Nothing predicted positive: PPV is undefined, not 0/0.
        let m = BinaryMetrics::of_scores(&[-3.0, -2.0], &[1.0, 0.0], 0.5);
        assert_eq!(m.ppv, None);
        assert_eq!(m.sensitivity, Some(0.0));
    }

    #[test]
    fn one_class_leaves_the_ranking_metrics_undefined_not_nan() {
        let m = BinaryMetrics::of_scores(&[0.1, -0.4, 2.0], &[0.0, 0.0, 0.0], 0.5);
        assert_eq!(m.roc_auc, None);
        assert_eq!(m.average_precision, None);
        assert_eq!(m.calibration_intercept, None);
        assert_eq!(m.calibration_slope, None);
        assert_eq!(m.sensitivity, None);
        assert!(m.brier.unwrap().is_finite());
        let empty = BinaryMetrics::of_scores(&[], &[], 0.5);
        assert_eq!(empty.brier, None);
        // `null` in JSON, never NaN.
        let json = serde_json::to_string(&m).unwrap();
        assert!(json.contains("\"roc_auc\":null") && !json.contains("NaN"), "{json}");
    }

    /// Labels drawn from the model's own probabilities are calibrated: the
    /// intercept near 0 and the slope near 1. Predictions twice as extreme
    /// as the truth have slope 1/2; shifted ones the opposite intercept.
    #[test]
    fn calibration_recovers_a_known_miscalibration() {
        let groups = |scale: f64, shift: f64| -> Vec<Group> {
            (-40..=40)
                .map(|k| {
                    let true_logit = f64::from(k) / 10.0;
                    let p = sigmoid(true_logit);
                    Group {
                        logit: scale * true_logit + shift,
                        positives: 1000.0 * p,
                        negatives: 1000.0 * (1.0 - p),
                    }
                })
                .collect()
        };
        let at = AtThreshold::default();
        let m = BinaryMetrics::of_groups(&groups(1.0, 0.0), at);
        assert!(m.calibration_intercept.unwrap().abs() < 1e-9, "{m:?}");
        assert!((m.calibration_slope.unwrap() - 1.0).abs() < 1e-9, "{m:?}");
        let m = BinaryMetrics::of_groups(&groups(2.0, 0.0), at);
        assert!((m.calibration_slope.unwrap() - 0.5).abs() < 1e-9, "{m:?}");
        let m = BinaryMetrics::of_groups(&groups(1.0, 0.7), at);
        assert!((m.calibration_intercept.unwrap() + 0.7).abs() < 1e-9, "{m:?}");
        assert!((m.calibration_slope.unwrap() - 1.0).abs() < 1e-9, "{m:?}");
    }

    #[test]
    fn curves_by_hand() {
        // Scores ascending: (neg), (pos, neg), (pos).
        let groups = [
            Group {
                logit: -1.0,
                positives: 0.0,
                negatives: 1.0,
            },
            Group {
                logit: 0.0,
                positives: 1.0,
                negatives: 1.0,
            },
            Group {
                logit: 2.0,
                positives: 1.0,
                negatives: 0.0,
            },
        ];
        assert_eq!(roc_curve(&groups), [(0.0, 0.0), (0.0, 0.5), (0.5, 1.0), (1.0, 1.0)]);
        assert!(roc_curve(&groups[2..]).is_empty(), "one class: no curve");
        // Two bins of 2 rows: {-1 (neg), 0 (half)} then {2 (pos)}: the
        // middle group is not split, so the first bin takes 3 rows.
        let curve = calibration_curve(&groups, 2);
        assert_eq!(curve.len(), 2);
        assert_eq!((curve[0].2, curve[1].2), (3.0, 1.0));
        assert!((curve[0].1 - 1.0 / 3.0).abs() < 1e-12);
        let predicted = (sigmoid(-1.0) + 2.0 * 0.5) / 3.0;
        assert!((curve[0].0 - predicted).abs() < 1e-12);
        assert_eq!(curve[1].1, 1.0);
        // Many equal groups in ten bins: ten bins of equal size.
        let flat: Vec<Group> = (0..100)
            .map(|i| Group {
                logit: f64::from(i) / 10.0 - 5.0,
                positives: 1.0,
                negatives: 1.0,
            })
            .collect();
        let curve = calibration_curve(&flat, 10);
        assert_eq!(curve.len(), 10);
        assert!(curve.iter().all(|c| c.2 == 20.0), "{curve:?}");
    }

    #[test]
    fn separable_data_has_no_calibration_slope() {
        let m = BinaryMetrics::of_scores(&[-2.0, -1.0, 1.0, 2.0], &[0.0, 0.0, 1.0, 1.0], 0.5);
        assert_eq!(m.roc_auc, Some(1.0));
        assert_eq!(m.calibration_slope, None);
        assert!(m.calibration_intercept.is_some());
    }

    proptest! {
        /// The rank formula agrees with counting every (positive, negative)
        /// pair, and AP with the precision at each positive's rank.
        #[test]
        fn ranking_matches_pair_counting(rows in proptest::collection::vec((-8i8..8, any::<bool>()), 2..60)) {
            let logits: Vec<f32> = rows.iter().map(|r| f32::from(r.0) / 2.0).collect();
            let labels: Vec<f32> = rows.iter().map(|r| if r.1 { 1.0 } else { 0.0 }).collect();
            let m = BinaryMetrics::of_scores(&logits, &labels, 0.5);
            let pos: Vec<i8> = rows.iter().filter(|r| r.1).map(|r| r.0).collect();
            let neg: Vec<i8> = rows.iter().filter(|r| !r.1).map(|r| r.0).collect();
            if pos.is_empty() || neg.is_empty() {
                prop_assert_eq!(m.roc_auc, None);
                return Ok(());
            }
            let mut wins = 0.0;
            for p in &pos {
                for n in &neg {
                    wins += if p > n { 1.0 } else if p == n { 0.5 } else { 0.0 };
                }
            }
            let expected = wins / (pos.len() * neg.len()) as f64;
            prop_assert!((m.roc_auc.unwrap() - expected).abs() < 1e-12);
            // AP: precision at threshold "score ≥ s" for each positive's score s.
            let ap: f64 = pos.iter().map(|p| {
                let above = rows.iter().filter(|r| r.0 >= *p);
                let (tp, all) = above.fold((0.0, 0.0), |(t, a), r| (t + f64::from(u8::from(r.1)), a + 1.0));
                tp / all
            }).sum::<f64>() / pos.len() as f64;
            prop_assert!((m.average_precision.unwrap() - ap).abs() < 1e-12);
            let ppv = m.ppv.unwrap_or(0.0);
            prop_assert!((0.0..=1.0).contains(&ppv));
        }
    }
}
