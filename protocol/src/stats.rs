//! Federated preprocessing: global feature means and standard deviations from
//! per-site counts, sums and sums of squares. Only these aggregates leave a
//! site. Secure jobs (the default) sum them with `secagg` (exact limb
//! encoding, see `secagg::exact`); [`sum_plaintext_stats`] combines them only
//! for `insecure_plaintext` jobs.

/// Statistics of one site's training split over the encoded features.
#[derive(Clone, Debug, PartialEq)]
pub struct FeatureStats {
    pub count: u64,
    pub sum: Vec<f64>,
    pub sum_sq: Vec<f64>,
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
    #[error("sum and sum_sq have different lengths ({sum} and {sum_sq})")]
    Ragged { sum: usize, sum_sq: usize },
    #[error("statistics contain a value that is not finite or a negative sum of squares")]
    NotFinite,
    #[error("sites have no training rows in total")]
    NoRows,
    #[error(transparent)]
    Exact(#[from] crate::secagg::exact::ExactError),
}

impl FeatureStats {
    /// The statistics from the unmasked secure sum of the sites' exact
    /// encodings (count, per-feature sums, sums of squares): the one
    /// decoding the coordinator and every site (checking the ledger's
    /// normalisation) share.
    pub fn from_secure_sum(words: &[u32], n_features: usize) -> Result<Self, StatsError> {
        let values = crate::secagg::exact::decode_sum(words)?;
        if values.len() != 1 + 2 * n_features {
            return Err(StatsError::Width {
                expected: n_features,
                got: values.len().saturating_sub(1) / 2,
            });
        }
        Ok(Self {
            count: values[0].round().max(0.0) as u64,
            sum: values[1..1 + n_features].to_vec(),
            sum_sq: values[1 + n_features..].to_vec(),
        })
    }

    /// Statistics of a set of rows (each of the same width).
    pub fn of_rows<'a>(width: usize, rows: impl IntoIterator<Item = &'a [f32]>) -> Self {
        let mut stats = Self {
            count: 0,
            sum: vec![0.0; width],
            sum_sq: vec![0.0; width],
        };
        stats.add_rows(rows);
        stats
    }

    /// Adds rows to the statistics: a table read in batches is summed in
    /// the order (and so to the bit) of one read whole.
    pub fn add_rows<'a>(&mut self, rows: impl IntoIterator<Item = &'a [f32]>) {
        for row in rows {
            self.count += 1;
            for (j, &x) in row.iter().enumerate() {
                let x = f64::from(x);
                self.sum[j] += x;
                self.sum_sq[j] += x * x;
            }
        }
    }

    fn check(&self) -> Result<(), StatsError> {
        if self.sum.len() != self.sum_sq.len() {
            return Err(StatsError::Ragged {
                sum: self.sum.len(),
                sum_sq: self.sum_sq.len(),
            });
        }
        if self.sum.iter().any(|v| !v.is_finite()) || self.sum_sq.iter().any(|v| !v.is_finite() || *v < 0.0) {
            return Err(StatsError::NotFinite);
        }
        Ok(())
    }
}

/// Adds plaintext site statistics (`insecure_plaintext` jobs only).
pub fn sum_plaintext_stats(reports: &[FeatureStats]) -> Result<FeatureStats, StatsError> {
    let first = reports.first().ok_or(StatsError::Empty)?;
    let width = first.sum.len();
    let mut total = FeatureStats {
        count: 0,
        sum: vec![0.0; width],
        sum_sq: vec![0.0; width],
    };
    for report in reports {
        report.check()?;
        if report.sum.len() != width {
            return Err(StatsError::Width {
                expected: width,
                got: report.sum.len(),
            });
        }
        total.count += report.count;
        for j in 0..width {
            total.sum[j] += report.sum[j];
            total.sum_sq[j] += report.sum_sq[j];
        }
    }
    Ok(total)
}

impl Normalization {
    /// Mean and population standard deviation of the pooled rows. A constant
    /// feature gets std 1, so it is centred but not blown up.
    pub fn from_stats(total: &FeatureStats) -> Result<Self, StatsError> {
        if total.count == 0 {
            return Err(StatsError::NoRows);
        }
        let n = total.count as f64;
        let mean: Vec<f64> = total.sum.iter().map(|s| s / n).collect();
        let std = total
            .sum_sq
            .iter()
            .zip(&mean)
            .map(|(sq, m)| {
                let var = (sq / n - m * m).max(0.0);
                if var > 1e-12 { var.sqrt() } else { 1.0 }
            })
            .collect();
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

    /// Standardises one row in place.
    pub fn apply(&self, row: &mut [f32]) {
        for ((x, m), s) in row.iter_mut().zip(&self.mean).zip(&self.std) {
            *x = ((f64::from(*x) - m) / s) as f32;
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
        let empty = FeatureStats {
            count: 0,
            sum: vec![0.0],
            sum_sq: vec![0.0],
        };
        assert_eq!(Normalization::from_stats(&empty), Err(StatsError::NoRows));
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
