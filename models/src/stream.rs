//! Passes over a site's rows in batches, so that statistics, training and
//! evaluation need one batch (and a bounded shuffle buffer) in memory, not
//! the table: a hospital's table may be larger than the machine's memory.
//!
//! [`Rows`] is one split of a site's data, scanned from its start as often
//! as a consumer needs. A [`Dataset`] in memory is one; a [`TableSplit`]
//! re-reads the site's file on every pass. Both hand over the same rows in
//! the same order and in the same batches ([`PASS_ROWS`] rows; a model's
//! logits for a row can differ in the last bit with the shape of the batch),
//! and training fills its shuffle buffer row by row, draining it at exactly
//! `train::SHUFFLE_ROWS` rows: a streamed site computes, to the bit, the
//! statistics, model and metrics an in-memory one does.

use std::ops::ControlFlow;
use std::path::PathBuf;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use tessera_protocol::stats::{FeatureStats, Normalization};

use crate::data::{DataError, Dataset, ReadReport, scan_table};
use crate::schema::{Schema, SplitSpec};

/// Rows per batch of a streamed pass: about 4 MiB for a 131-feature table.
pub const PASS_ROWS: usize = 8192;

/// One split of a site's rows, read in batches as often as needed.
pub trait Rows: Send + Sync {
    fn n_features(&self) -> usize;
    /// Rows in one pass.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// One pass from the first row: `visit` gets the rows in order, in
    /// batches; it stops the pass by returning `Break`.
    fn scan(&self, visit: &mut dyn FnMut(&Dataset) -> ControlFlow<()>) -> Result<(), DataError>;
}

impl Rows for Dataset {
    fn n_features(&self) -> usize {
        self.n_features
    }

    fn len(&self) -> usize {
        Dataset::len(self)
    }

    /// Hands over slices of [`PASS_ROWS`] rows, as a streamed pass would.
    fn scan(&self, visit: &mut dyn FnMut(&Dataset) -> ControlFlow<()>) -> Result<(), DataError> {
        let width = self.n_features.max(1);
        for (features, labels) in self
            .features
            .chunks(PASS_ROWS * width)
            .zip(self.labels.chunks(PASS_ROWS))
        {
            let batch = Dataset {
                n_features: self.n_features,
                features: features.to_vec(),
                labels: labels.to_vec(),
            };
            if visit(&batch).is_break() {
                break;
            }
        }
        Ok(())
    }
}

/// Rows standardised on the fly, batch by batch, with the global statistics
/// (the in-memory path once made a standardised copy of the whole split).
pub struct Standardized<'a, R: ?Sized> {
    pub rows: &'a R,
    pub normalization: &'a Normalization,
}

impl<R: Rows + ?Sized> Rows for Standardized<'_, R> {
    fn n_features(&self) -> usize {
        self.rows.n_features()
    }

    fn len(&self) -> usize {
        self.rows.len()
    }

    fn scan(&self, visit: &mut dyn FnMut(&Dataset) -> ControlFlow<()>) -> Result<(), DataError> {
        self.rows.scan(&mut |batch| {
            let mut batch = batch.clone();
            for row in batch.features.chunks_exact_mut(batch.n_features.max(1)) {
                self.normalization.apply(row);
            }
            visit(&batch)
        })
    }
}

/// Which side of the train/test split.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    Train,
    Test,
}

/// Decides, row by row in file order, which rows are test rows: exactly
/// `ceil(test_fraction · n)` of the `n` usable rows, every such set equally
/// likely (selection sampling, Knuth's Algorithm S), drawn from a ChaCha20
/// stream seeded by the split's seed. It needs `n` and nothing else, so a
/// pass over a file larger than memory splits it as a table in memory is
/// split.
#[derive(Clone)]
pub struct Splitter {
    rng: ChaCha20Rng,
    rows_left: usize,
    test_left: usize,
}

impl Splitter {
    pub fn new(split: &SplitSpec, n: usize) -> Self {
        Self {
            rng: ChaCha20Rng::seed_from_u64(split.seed),
            rows_left: n,
            test_left: test_rows(split, n),
        }
    }

    /// Whether the next row is a test row.
    pub fn next_is_test(&mut self) -> bool {
        if self.rows_left == 0 {
            return false;
        }
        let u: f64 = self.rng.random();
        let take = (self.rows_left as f64) * u < self.test_left as f64;
        self.rows_left -= 1;
        if take {
            self.test_left -= 1;
        }
        take
    }
}

/// `ceil(test_fraction · n)`, guarded against `0.34 · 100 = 34.000000000000004`
/// rounding up to 35.
pub fn test_rows(split: &SplitSpec, n: usize) -> usize {
    let n_test = ((split.test_fraction * n as f64) - 1e-9).ceil().max(0.0) as usize;
    n_test.min(n)
}

/// One split of a data file, read from the file on every pass: memory
/// holds one batch, whatever the file's size.
pub struct TableSplit {
    path: PathBuf,
    schema: Schema,
    part: Part,
    /// Usable rows of the whole file (both parts).
    n_rows: usize,
    len: usize,
}

impl TableSplit {
    /// Both parts of `path`, after one pass that checks the whole file and
    /// counts its usable rows (the report `check` shows).
    pub fn open(path: PathBuf, schema: Schema) -> Result<(TableSplit, TableSplit, ReadReport), DataError> {
        let report = scan_table(&path, &schema, PASS_ROWS, &mut |_| ControlFlow::Continue(()))?;
        let n_rows = report.rows_kept;
        let n_test = test_rows(&schema.split, n_rows);
        let part = |part, len| TableSplit {
            path: path.clone(),
            schema: schema.clone(),
            part,
            n_rows,
            len,
        };
        Ok((part(Part::Train, n_rows - n_test), part(Part::Test, n_test), report))
    }
}

impl Rows for TableSplit {
    fn n_features(&self) -> usize {
        self.schema.feature_names().len()
    }

    fn len(&self) -> usize {
        self.len
    }

    fn scan(&self, visit: &mut dyn FnMut(&Dataset) -> ControlFlow<()>) -> Result<(), DataError> {
        let mut splitter = Splitter::new(&self.schema.split, self.n_rows);
        let mut out = Dataset {
            n_features: self.n_features(),
            features: Vec::new(),
            labels: Vec::new(),
        };
        let mut stopped = false;
        let mut seen = 0;
        scan_table(&self.path, &self.schema, PASS_ROWS, &mut |batch| {
            seen += batch.len();
            for (row, &label) in batch.rows().zip(&batch.labels) {
                if splitter.next_is_test() == (self.part == Part::Test) {
                    out.features.extend_from_slice(row);
                    out.labels.push(label);
                }
            }
            // Batches of exactly PASS_ROWS rows, as an in-memory `Dataset`
            // hands them over: a model's logits for a row may differ in the
            // last bit with the shape of the batch it is computed in.
            while out.len() >= PASS_ROWS && !stopped {
                let rest = Dataset {
                    n_features: out.n_features,
                    features: out.features.split_off(PASS_ROWS * out.n_features),
                    labels: out.labels.split_off(PASS_ROWS),
                };
                stopped = visit(&out).is_break();
                out = rest;
            }
            if stopped {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })?;
        if !stopped && seen != self.n_rows {
            // The file changed since it was opened: its split (and the
            // counts declared in the ledger) no longer describe it.
            return Err(DataError::Changed {
                file: self.path.clone(),
                expected: self.n_rows,
                found: seen,
            });
        }
        if !stopped && !out.is_empty() {
            let _ = visit(&out);
        }
        Ok(())
    }
}

impl Dataset {
    /// The train and test parts of these rows, as [`Splitter`] splits
    /// them: the parts a streamed pass over the same rows gives.
    pub fn split(&self, split: &SplitSpec) -> (Dataset, Dataset) {
        let mut splitter = Splitter::new(split, self.len());
        let empty = || Dataset {
            n_features: self.n_features,
            features: Vec::new(),
            labels: Vec::new(),
        };
        let (mut train, mut test) = (empty(), empty());
        for (row, &label) in self.rows().zip(&self.labels) {
            let part = if splitter.next_is_test() { &mut test } else { &mut train };
            part.features.extend_from_slice(row);
            part.labels.push(label);
        }
        (train, test)
    }
}

/// Count, sums and sums of squares of `rows`, in one pass.
pub fn feature_stats(rows: &dyn Rows) -> Result<FeatureStats, DataError> {
    let mut stats = FeatureStats::of_rows(rows.n_features(), std::iter::empty());
    rows.scan(&mut |batch| {
        stats.add_rows(batch.rows());
        ControlFlow::Continue(())
    })?;
    Ok(stats)
}

/// All of `rows` in memory (for tools that need the whole split, such as
/// the pooled baseline of the local demo).
pub fn to_dataset(rows: &dyn Rows) -> Result<Dataset, DataError> {
    let mut all = Dataset {
        n_features: rows.n_features(),
        features: Vec::new(),
        labels: Vec::new(),
    };
    rows.scan(&mut |batch| {
        all.append(batch.clone());
        ControlFlow::Continue(())
    })?;
    Ok(all)
}

/// Rows and positive labels of `rows`, in one pass.
pub fn census(rows: &dyn Rows) -> Result<(usize, usize), DataError> {
    let (mut n, mut positive) = (0, 0);
    rows.scan(&mut |batch| {
        n += batch.len();
        positive += batch.n_positive();
        ControlFlow::Continue(())
    })?;
    Ok((n, positive))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::{LocalTraining, SHUFFLE_ROWS, evaluate, train_local};
    use proptest::prelude::*;
    use tessera_protocol::job::{LocalWork, OptimizerKind, TrainingSpec};
    use tessera_protocol::model::{ModelSpec, initial_params};

    fn heart() -> (PathBuf, Schema) {
        let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let schema =
            Schema::from_toml(&std::fs::read_to_string(repo.join("examples/heart-disease/schema.toml")).unwrap())
                .unwrap();
        (
            repo.join("../shared/data/heart-disease/processed.cleveland.data"),
            schema,
        )
    }

    /// What one site computes in a round: statistics, training, evaluation.
    fn round(train: &dyn Rows, test: &dyn Rows, spec: &TrainingSpec) -> (FeatureStats, Vec<f32>, [f64; 3]) {
        let stats = feature_stats(train).unwrap();
        let normalization = Normalization::from_stats(&stats).unwrap();
        let layout = ModelSpec::LogisticRegression.layout(train.n_features());
        let cfg = LocalTraining {
            layout: &layout,
            spec,
            proximal_mu: 0.0,
            seed: 11,
        };
        let device = crate::default_device();
        let train = Standardized {
            rows: train,
            normalization: &normalization,
        };
        let test = Standardized {
            rows: test,
            normalization: &normalization,
        };
        let update = train_local(&cfg, &initial_params(&layout, 3), &train, &device).unwrap();
        let eval = evaluate(&layout, &update.params, &test, &device).unwrap();
        (stats, update.params, [eval.loss, eval.accuracy, eval.auc])
    }

    fn spec(batch_size: usize, local_work: LocalWork) -> TrainingSpec {
        TrainingSpec {
            optimizer: OptimizerKind::Sgd,
            learning_rate: 0.05,
            batch_size,
            local_work,
        }
    }

    /// The heart demo's site, read whole and streamed from its file: the
    /// same split, statistics, model and metrics, to the bit.
    #[test]
    fn a_streamed_site_computes_what_an_in_memory_one_does() {
        let (path, schema) = heart();
        let (all, report) = crate::data::read_table(&path, &schema).unwrap();
        let (train, test) = all.split(&schema.split);
        assert_eq!((train.len(), test.len()), (199, 104), "FLamby's sizes");
        let (s_train, s_test, s_report) = TableSplit::open(path, schema).unwrap();
        assert_eq!(s_report, report);
        assert_eq!((s_train.len(), s_test.len()), (199, 104));
        assert_eq!(census(&s_test).unwrap(), (test.len(), test.n_positive()));
        let spec = spec(16, LocalWork::Epochs(3));
        assert_eq!(round(&train, &test, &spec), round(&s_train, &s_test, &spec));
    }

    /// A table larger than the shuffle buffer: shuffled within windows,
    /// the windows' incomplete minibatches carried over, still the same
    /// training streamed as in memory, and every row seen once an epoch.
    #[test]
    fn a_table_larger_than_the_shuffle_buffer_streams_like_memory() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.csv");
        let n = SHUFFLE_ROWS + 3 * PASS_ROWS + 17;
        let mut text = String::from("x,k,y\n");
        for i in 0..n {
            let x = (i % 1000) as f32 / 100.0 - 5.0;
            text.push_str(&format!("{x},{},{}\n", i % 3, u8::from(x + (i % 7) as f32 * 0.3 > 0.5)));
        }
        std::fs::write(&path, text).unwrap();
        let schema = Schema::from_toml(
            r#"
[format]
header = true
[label]
column = "y"
positive_if = "> 0"
[split]
test_fraction = 0.2
seed = 5
[[column]]
name = "x"
kind = "numeric"
[[column]]
name = "k"
kind = "categorical"
categories = ["0", "1", "2"]
[[column]]
name = "y"
kind = "label"
"#,
        )
        .unwrap();
        let (all, _) = crate::data::read_table(&path, &schema).unwrap();
        let (train, test) = all.split(&schema.split);
        let (s_train, s_test, _) = TableSplit::open(path, schema).unwrap();
        assert_eq!(train.len() + test.len(), n);
        assert_eq!(census(&s_train).unwrap(), (train.len(), train.n_positive()));
        // One epoch, and a number of steps that ends inside a pass.
        for work in [LocalWork::Epochs(1), LocalWork::Steps(700)] {
            let spec = spec(100, work);
            assert_eq!(round(&train, &test, &spec), round(&s_train, &s_test, &spec));
        }
    }

    #[test]
    fn a_file_changed_under_a_running_site_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let (heart, schema) = heart();
        let path = dir.path().join("site.csv");
        std::fs::copy(&heart, &path).unwrap();
        let (train, _, _) = TableSplit::open(path.clone(), schema).unwrap();
        let text = std::fs::read_to_string(&heart).unwrap();
        std::fs::write(&path, text.lines().take(100).collect::<Vec<_>>().join("\n")).unwrap();
        let err = feature_stats(&train).unwrap_err();
        assert!(
            matches!(
                err,
                DataError::Changed {
                    expected: 303,
                    found: 100,
                    ..
                }
            ),
            "{err}"
        );
    }

    proptest! {
        /// Exactly `ceil(f·n)` test rows, whatever n, f and seed.
        #[test]
        fn the_splitter_picks_exactly_the_test_rows_it_must(n in 0usize..2000, f in 0.01f64..0.99, seed in any::<u64>()) {
            let split = SplitSpec { test_fraction: f, seed };
            let mut splitter = Splitter::new(&split, n);
            let picked = (0..n).filter(|_| splitter.next_is_test()).count();
            prop_assert_eq!(picked, test_rows(&split, n));
            prop_assert!(!splitter.next_is_test(), "past the end");
        }
    }
}
