//! Federated preprocessing: global feature means and standard deviations from
//! per-site counts, sums and sums of squares. Only these aggregates leave a
//! site. A feature a schema imputes is `NaN` in an encoded row where the
//! value was missing: it counts in `missing`, not in the sums, so the mean
//! is over the values present, and [`Normalization::apply`] puts the mean
//! (0 once standardised) in its place. Secure jobs (the default) sum them with `secagg` (exact limb
//! encoding, see `secagg::exact`); [`sum_plaintext_stats`] combines them only
//! for `insecure_plaintext` jobs.

use crate::job::PosWeight;

/// Statistics of one site's training split over the encoded features.
#[derive(Clone, Debug, PartialEq)]
pub struct FeatureStats {
    /// Rows.
    pub count: u64,
    /// Per feature, over the rows where it is present.
    pub sum: Vec<f64>,
    pub sum_sq: Vec<f64>,
    /// Per feature, the rows where it was missing and is to be imputed.
    pub missing: Vec<u64>,
    /// Rows whose label is positive: what a "balanced" class weight needs.
    pub positives: u64,
}

/// The training rows of a job's cohort by class, from the statistics sum:
/// every site derives them itself, as it derives the normalisation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClassCounts {
    pub rows: u64,
    pub positives: u64,
}

/// Why a class weight cannot be resolved.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "pos_weight = \"balanced\" needs both classes in the cohort's training rows, which hold {positives} positive of {rows}"
)]
pub struct OneClass {
    pub rows: u64,
    pub positives: u64,
}

impl ClassCounts {
    /// The positive-class weight a job asks for: its fixed value, or the
    /// cohort's negatives per positive for "balanced".
    pub fn pos_weight(self, asked: PosWeight) -> Result<f64, OneClass> {
        match asked {
            PosWeight::Fixed(w) => Ok(w),
            PosWeight::Balanced if self.positives == 0 || self.positives >= self.rows => Err(OneClass {
                rows: self.rows,
                positives: self.positives,
            }),
            PosWeight::Balanced => Ok((self.rows - self.positives) as f64 / self.positives as f64),
        }
    }
}

/// Per-feature mean and standard deviation used to standardise inputs.
#[derive(Clone, Debug, PartialEq)]
pub struct Normalization {
    pub mean: Vec<f64>,
    pub std: Vec<f64>,
}

/// Why site statistics cannot be combined.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum StatsError {
    #[error("no site reported statistics")]
    Empty,
    #[error("site reports {got} features, others {expected}: the sites encode their data differently")]
    Width { expected: usize, got: usize },
    #[error("sum, sum_sq and missing have different lengths ({sum}, {sum_sq} and {missing})")]
    Ragged { sum: usize, sum_sq: usize, missing: usize },
    #[error("statistics contain a value that is not finite or a negative sum of squares")]
    NotFinite,
    #[error("a feature is missing in, or a label positive in, more rows than there are")]
    MissingExceedsRows,
    #[error("sites have no training rows in total")]
    NoRows,
    #[error(transparent)]
    Exact(#[from] crate::secagg::exact::ExactError),
}

impl FeatureStats {
    /// No rows yet, over `width` features.
    pub fn empty(width: usize) -> Self {
        Self {
            count: 0,
            sum: vec![0.0; width],
            sum_sq: vec![0.0; width],
            missing: vec![0; width],
            positives: 0,
        }
    }

    /// The class counts of these rows.
    pub fn classes(&self) -> ClassCounts {
        ClassCounts {
            rows: self.count,
            positives: self.positives,
        }
    }

    /// Counts the positive labels (1.0) among `labels`, the labels of rows
    /// added with [`Self::add_rows`].
    pub fn add_labels(&mut self, labels: &[f32]) {
        self.positives += labels.iter().filter(|&&y| y > 0.5).count() as u64;
    }

    /// How many values a site's statistics over `n_features` features
    /// put into the secure sum: the count, then per feature the sums, the
    /// sums of squares and the missing counts, then the positive labels.
    pub fn secure_len(n_features: usize) -> usize {
        2 + 3 * n_features
    }

    /// The values a site puts into the secure sum, in the order
    /// [`Self::from_secure_sum`] reads them back.
    pub fn secure_values(&self) -> Vec<f64> {
        let mut values = Vec::with_capacity(Self::secure_len(self.sum.len()));
        values.push(self.count as f64);
        values.extend(&self.sum);
        values.extend(&self.sum_sq);
        values.extend(self.missing.iter().map(|&m| m as f64));
        values.push(self.positives as f64);
        values
    }

    /// The statistics from the unmasked secure sum of the sites' exact
    /// encodings ([`Self::secure_values`]): the one decoding the
    /// coordinator and every site (checking the ledger's normalisation)
    /// share.
    pub fn from_secure_sum(words: &[u32], n_features: usize) -> Result<Self, StatsError> {
        let values = crate::secagg::exact::decode_sum(words)?;
        if values.len() != Self::secure_len(n_features) {
            return Err(StatsError::Width {
                expected: n_features,
                got: values.len().saturating_sub(2) / 3,
            });
        }
        let count = |v: f64| v.round().max(0.0) as u64;
        let n = n_features;
        let stats = Self {
            count: count(values[0]),
            sum: values[1..1 + n].to_vec(),
            sum_sq: values[1 + n..1 + 2 * n].to_vec(),
            missing: values[1 + 2 * n..1 + 3 * n].iter().map(|&v| count(v)).collect(),
            positives: count(values[1 + 3 * n]),
        };
        stats.check()?;
        Ok(stats)
    }

    /// Statistics of a set of rows (each of the same width).
    pub fn of_rows<'a>(width: usize, rows: impl IntoIterator<Item = &'a [f32]>) -> Self {
        let mut stats = Self::empty(width);
        stats.add_rows(rows);
        stats
    }

    /// Adds rows to the statistics: a table read in batches is summed in
    /// the order (and so to the bit) of one read whole. A `NaN` is a value
    /// to impute: counted as missing, left out of the sums.
    pub fn add_rows<'a>(&mut self, rows: impl IntoIterator<Item = &'a [f32]>) {
        for row in rows {
            self.count += 1;
            for (j, &x) in row.iter().enumerate() {
                if x.is_nan() {
                    self.missing[j] += 1;
                    continue;
                }
                let x = f64::from(x);
                self.sum[j] += x;
                self.sum_sq[j] += x * x;
            }
        }
    }

    /// Per feature, the rows where it is present.
    fn present(&self, j: usize) -> u64 {
        self.count - self.missing[j]
    }

    /// Refuses statistics no rows can have produced.
    pub fn check(&self) -> Result<(), StatsError> {
        if self.sum.len() != self.sum_sq.len() || self.sum.len() != self.missing.len() {
            return Err(StatsError::Ragged {
                sum: self.sum.len(),
                sum_sq: self.sum_sq.len(),
                missing: self.missing.len(),
            });
        }
        if self.sum.iter().any(|v| !v.is_finite()) || self.sum_sq.iter().any(|v| !v.is_finite() || *v < 0.0) {
            return Err(StatsError::NotFinite);
        }
        if self.missing.iter().any(|&m| m > self.count) || self.positives > self.count {
            return Err(StatsError::MissingExceedsRows);
        }
        Ok(())
    }
}

/// Adds plaintext site statistics (`insecure_plaintext` jobs only).
pub fn sum_plaintext_stats(reports: &[FeatureStats]) -> Result<FeatureStats, StatsError> {
    let first = reports.first().ok_or(StatsError::Empty)?;
    let width = first.sum.len();
    let mut total = FeatureStats::empty(width);
    for report in reports {
        report.check()?;
        if report.sum.len() != width {
            return Err(StatsError::Width {
                expected: width,
                got: report.sum.len(),
            });
        }
        total.count += report.count;
        total.positives += report.positives;
        for j in 0..width {
            total.sum[j] += report.sum[j];
            total.sum_sq[j] += report.sum_sq[j];
            total.missing[j] += report.missing[j];
        }
    }
    Ok(total)
}

impl Normalization {
    /// Mean and population standard deviation of the pooled rows, each
    /// feature's over the rows where it is present. A constant feature (or
    /// one missing everywhere) gets std 1, so it is centred but not blown
    /// up.
    pub fn from_stats(total: &FeatureStats) -> Result<Self, StatsError> {
        total.check()?;
        if total.count == 0 {
            return Err(StatsError::NoRows);
        }
        let (mut mean, mut std) = (Vec::with_capacity(total.sum.len()), Vec::with_capacity(total.sum.len()));
        for j in 0..total.sum.len() {
            let n = total.present(j) as f64;
            let m = if n > 0.0 { total.sum[j] / n } else { 0.0 };
            let var = if n > 0.0 {
                (total.sum_sq[j] / n - m * m).max(0.0)
            } else {
                0.0
            };
            mean.push(m);
            std.push(if var > 1e-12 { var.sqrt() } else { 1.0 });
        }
        Ok(Self { mean, std })
    }

    /// SHA-256 of the means then the standard deviations, each as
    /// little-endian f64: what a ledger `summation` block commits to.
    pub fn sha256(&self) -> [u8; 32] {
        let bytes: Vec<u8> = self
            .mean
            .iter()
            .chain(&self.std)
            .flat_map(|v| v.to_le_bytes())
            .collect();
        crate::ledger::sha256(&bytes)
    }

    /// Standardises one row in place; a value to impute (`NaN`) becomes
    /// the pooled mean, 0. With AVX2 the same divisions run four at a time
    /// (each one IEEE-exact: the same bits on every core).
    pub fn apply(&self, row: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2, checked just above.
            return unsafe { self.apply_avx2(row) };
        }
        self.apply_portable(row);
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn apply_avx2(&self, row: &mut [f32]) {
        self.apply_portable(row);
    }

    #[inline(always)]
    fn apply_portable(&self, row: &mut [f32]) {
        for ((x, m), s) in row.iter_mut().zip(&self.mean).zip(&self.std) {
            // Computed either way and then chosen, so the loop has no
            // branch and vectorises.
            let standard = ((f64::from(*x) - m) / s) as f32;
            *x = if x.is_nan() { 0.0 } else { standard };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn hand_computed_normalization() {
        let a = FeatureStats::of_rows(2, [[1.0f32, 5.0].as_slice(), [3.0, 5.0].as_slice()]);
        let b = FeatureStats::of_rows(2, [[5.0f32, 5.0].as_slice()]);
        let total = sum_plaintext_stats(&[a, b]).unwrap();
        assert_eq!(total.count, 3);
        let norm = Normalization::from_stats(&total).unwrap();
        assert_eq!(norm.mean, vec![3.0, 5.0]);
        // population variance of {1,3,5} = 8/3; constant column gets std 1.
        assert!((norm.std[0] - (8.0f64 / 3.0).sqrt()).abs() < 1e-12);
        assert_eq!(norm.std[1], 1.0);
        let mut row = [3.0f32, 6.0];
        norm.apply(&mut row);
        assert_eq!(row, [0.0, 1.0]);
    }

    #[test]
    fn mismatched_sites_are_refused() {
        let a = FeatureStats::of_rows(2, [[1.0f32, 2.0].as_slice()]);
        let b = FeatureStats::of_rows(3, [[1.0f32, 2.0, 3.0].as_slice()]);
        assert_eq!(
            sum_plaintext_stats(&[a.clone(), b]),
            Err(StatsError::Width { expected: 2, got: 3 })
        );
        let mut bad = a.clone();
        bad.sum_sq[0] = -1.0;
        assert_eq!(sum_plaintext_stats(&[a.clone(), bad]), Err(StatsError::NotFinite));
        assert_eq!(sum_plaintext_stats(&[]), Err(StatsError::Empty));
        assert_eq!(
            Normalization::from_stats(&FeatureStats::empty(1)),
            Err(StatsError::NoRows)
        );
        let mut impossible = FeatureStats::of_rows(1, [[1.0f32].as_slice()]);
        impossible.missing[0] = 2;
        assert_eq!(sum_plaintext_stats(&[impossible]), Err(StatsError::MissingExceedsRows));
    }

    /// A value to impute counts as missing and stays out of the mean and
    /// the spread; once standardised it is the mean, 0.
    #[test]
    fn imputed_values_are_the_mean_of_the_present_ones() {
        let nan = f32::NAN;
        let a = FeatureStats::of_rows(2, [[1.0f32, nan].as_slice(), [nan, nan].as_slice()]);
        let b = FeatureStats::of_rows(2, [[5.0f32, nan].as_slice()]);
        assert_eq!(a.missing, vec![1, 2]);
        let total = sum_plaintext_stats(&[a, b]).unwrap();
        assert_eq!((total.count, total.missing.clone()), (3, vec![1, 3]));
        let norm = Normalization::from_stats(&total).unwrap();
        // {1, 5}: mean 3, population std 2; the second feature is never
        // present: centred at 0 with std 1.
        assert_eq!((norm.mean.clone(), norm.std.clone()), (vec![3.0, 0.0], vec![2.0, 1.0]));
        let mut row = [nan, nan];
        norm.apply(&mut row);
        assert_eq!(row, [0.0, 0.0]);
        let mut row = [5.0f32, 2.0];
        norm.apply(&mut row);
        assert_eq!(row, [1.0, 2.0]);
    }

    /// The secure encoding reads back what was put in, and a sum that
    /// claims more missing values than rows is refused.
    #[test]
    fn secure_values_round_trip_through_the_exact_sum() {
        use crate::secagg::exact;
        let mut stats = FeatureStats::of_rows(2, [[1.5f32, f32::NAN].as_slice(), [-2.0, 4.0].as_slice()]);
        stats.add_labels(&[1.0, 0.0]);
        assert_eq!(stats.classes(), ClassCounts { rows: 2, positives: 1 });
        let values = stats.secure_values();
        assert_eq!(values.len(), FeatureStats::secure_len(2));
        let words = exact::encode(&values).unwrap();
        assert_eq!(FeatureStats::from_secure_sum(&words, 2).unwrap(), stats);
        assert!(matches!(
            FeatureStats::from_secure_sum(&words, 3),
            Err(StatsError::Width { expected: 3, .. })
        ));
        let mut lying = stats.clone();
        lying.missing[1] = 3;
        let words = exact::encode(&lying.secure_values()).unwrap();
        assert_eq!(
            FeatureStats::from_secure_sum(&words, 2),
            Err(StatsError::MissingExceedsRows)
        );
    }

    /// "balanced" weighs a positive row by the cohort's negatives per
    /// positive; a cohort with one class cannot be balanced, and says so.
    #[test]
    fn a_balanced_class_weight_comes_from_the_class_counts() {
        let counts = ClassCounts {
            rows: 740,
            positives: 100,
        };
        assert_eq!(counts.pos_weight(PosWeight::Balanced), Ok(6.4));
        assert_eq!(counts.pos_weight(PosWeight::Fixed(2.0)), Ok(2.0));
        let none = ClassCounts {
            rows: 261,
            positives: 0,
        };
        let e = none.pos_weight(PosWeight::Balanced).unwrap_err();
        assert!(e.to_string().contains("0 positive of 261"), "{e}");
        assert!(
            ClassCounts { rows: 5, positives: 5 }
                .pos_weight(PosWeight::Balanced)
                .is_err()
        );
        assert_eq!(none.pos_weight(PosWeight::Fixed(1.0)), Ok(1.0));
    }

    proptest! {
        /// Federated statistics equal the statistics of the pooled rows, however
        /// the rows are split between sites.
        #[test]
        fn federated_equals_pooled(
            rows in prop::collection::vec(prop::collection::vec(-100f32..100.0, 3), 1..60),
            cuts in prop::collection::vec(0usize..60, 0..4),
        ) {
            let mut bounds: Vec<usize> = cuts.into_iter().map(|c| c % (rows.len() + 1)).collect();
            bounds.push(0);
            bounds.push(rows.len());
            bounds.sort();
            let parts: Vec<FeatureStats> = bounds
                .windows(2)
                .map(|w| FeatureStats::of_rows(3, rows[w[0]..w[1]].iter().map(|r| r.as_slice())))
                .collect();
            let fed = Normalization::from_stats(&sum_plaintext_stats(&parts).unwrap()).unwrap();
            let pooled = Normalization::from_stats(&FeatureStats::of_rows(3, rows.iter().map(|r| r.as_slice()))).unwrap();
            for j in 0..3 {
                prop_assert!((fed.mean[j] - pooled.mean[j]).abs() < 1e-9);
                prop_assert!((fed.std[j] - pooled.std[j]).abs() < 1e-6);
            }
        }
    }
}
