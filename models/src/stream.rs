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

use crate::data::{DataError, Dataset, ReadReport, Source, scan_source};
use crate::schema::{Schema, SplitSpec};

/// Rows per batch of a streamed pass: 512 KiB of features for a 131-feature
/// table, so that a batch decoded from Parquet is still in the core's cache
/// when it is encoded, standardised and trained on (8,192-row batches, 4 MiB,
/// made a pass 1.8 times slower).
pub const PASS_ROWS: usize = 1024;

/// One split of a site's rows, read in batches as often as needed.
pub trait Rows: Send + Sync {
    fn n_features(&self) -> usize;
    /// Rows in one pass.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// One pass from the first row: `visit` gets the rows in order, in
    /// batches; it stops the pass by returning `Break`. Each batch is the
    /// pass's own copy, which `visit` may change in place (standardising
    /// it), so no layer copies a batch to change it.
    fn scan(&self, visit: &mut dyn FnMut(&mut Dataset) -> ControlFlow<()>) -> Result<(), DataError>;
}

impl Rows for Dataset {
    fn n_features(&self) -> usize {
        self.n_features
    }

    fn len(&self) -> usize {
        Dataset::len(self)
    }

    /// Hands over copies of [`PASS_ROWS`] rows, as a streamed pass would.
    fn scan(&self, visit: &mut dyn FnMut(&mut Dataset) -> ControlFlow<()>) -> Result<(), DataError> {
        let width = self.n_features.max(1);
        let mut batch = Dataset::empty(self.n_features);
        for (index, (features, labels)) in self
            .features
            .chunks(PASS_ROWS * width)
            .zip(self.labels.chunks(PASS_ROWS))
            .enumerate()
        {
            let groups = self.groups.chunks(PASS_ROWS).nth(index).unwrap_or_default();
            batch.features.clear();
            batch.features.extend_from_slice(features);
            batch.labels.clear();
            batch.labels.extend_from_slice(labels);
            batch.groups.clear();
            batch.groups.extend_from_slice(groups);
            if visit(&mut batch).is_break() {
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

    fn scan(&self, visit: &mut dyn FnMut(&mut Dataset) -> ControlFlow<()>) -> Result<(), DataError> {
        self.rows.scan(&mut |batch| {
            for row in batch.features.chunks_exact_mut(batch.n_features.max(1)) {
                self.normalization.apply(row);
            }
            visit(batch)
        })
    }
}

/// Which side of the train/test split.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    Train,
    Test,
}

/// Decides, row by row in file order, which rows are test rows.
///
/// Without `group_by`: exactly `ceil(test_fraction · n)` of the `n` usable
/// rows, every such set equally likely (selection sampling, Knuth's
/// Algorithm S), drawn from a ChaCha20 stream seeded by the split's seed.
/// It needs `n` and nothing else, so a pass over a file larger than memory
/// splits it as a table in memory is split.
///
/// With `group_by`: a row is a test row when the keyed hash of its id
/// ([`GroupHasher`]) falls below `test_fraction` of the hash range, so
/// every row of one patient lands on the same side, wherever it is in the
/// file, and the sides are the same in every pass and every file format.
#[derive(Clone)]
pub struct Splitter {
    rng: ChaCha20Rng,
    rows_left: usize,
    test_left: usize,
    /// Hashes below this are test ids (grouped splits only).
    grouped_below: Option<u64>,
}

impl Splitter {
    pub fn new(split: &SplitSpec, n: usize) -> Self {
        Self {
            rng: ChaCha20Rng::seed_from_u64(split.seed),
            rows_left: n,
            test_left: test_rows(split, n),
            // test_fraction < 1, so this is below 2^64.
            grouped_below: split
                .group_by
                .as_ref()
                .map(|_| (split.test_fraction * 2f64.powi(64)) as u64),
        }
    }

    /// Whether the next row is a test row; `group` is its id's hash (the
    /// row's entry in `Dataset::groups`), which a grouped split needs.
    pub fn next_is_test(&mut self, group: Option<&u64>) -> bool {
        if let Some(below) = self.grouped_below {
            return *group.expect("rows of a grouped split carry their group") < below;
        }
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

    /// Appends each row of `batch` to `test` or `train` (without groups:
    /// once split, a row's id is not needed).
    fn deal(&mut self, batch: &Dataset, train: &mut Dataset, test: &mut Dataset) {
        for (i, (row, &label)) in batch.rows().zip(&batch.labels).enumerate() {
            let part = if self.next_is_test(batch.groups.get(i)) {
                &mut *test
            } else {
                &mut *train
            };
            part.features.extend_from_slice(row);
            part.labels.push(label);
        }
    }
}

/// The keyed hash of a patient id that places it in a grouped split:
/// SipHash-2-4 keyed by the split's seed, over the id's text.
pub(crate) struct GroupHasher(siphasher::sip::SipHasher24);

impl GroupHasher {
    pub(crate) fn new(split: &SplitSpec) -> Self {
        // The second key word only separates these hashes from other uses
        // of the seed ("tessera-split" in ASCII, truncated).
        Self(siphasher::sip::SipHasher24::new_with_keys(
            split.seed,
            0x7465_7373_6572_612d,
        ))
    }

    pub(crate) fn hash(&self, id: &str) -> u64 {
        self.0.hash(id.as_bytes())
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
    source: Source,
    schema: Schema,
    part: Part,
    /// Usable rows of the whole file (both parts).
    n_rows: usize,
    len: usize,
}

impl TableSplit {
    /// Both parts of `path`, after one pass that checks the whole file and
    /// counts its usable rows (the report `check` shows) and its test rows.
    pub fn open(source: impl Into<Source>, schema: Schema) -> Result<(TableSplit, TableSplit, ReadReport), DataError> {
        let source = source.into();
        source.check_split(&schema)?;
        let mut grouped_test = 0;
        let mut splitter = Splitter::new(&schema.split, 0);
        let report = scan_source(&source, &schema, PASS_ROWS, &mut |batch| {
            if schema.split.group_by.is_some() {
                grouped_test += batch.groups.iter().filter(|&g| splitter.next_is_test(Some(g))).count();
            }
            ControlFlow::Continue(())
        })?;
        let n_rows = report.rows_kept;
        let n_test = match schema.split.group_by {
            Some(_) => grouped_test,
            None => test_rows(&schema.split, n_rows),
        };
        if n_test == 0 || n_test == n_rows {
            return Err(DataError::EmptySplit {
                file: PathBuf::from(source.label()),
                empty: if n_test == 0 { "test" } else { "training" },
                rows: n_rows,
                group_by: schema.split.group_by.clone(),
            });
        }
        let part = |part, len| TableSplit {
            source: source.clone(),
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

    fn scan(&self, visit: &mut dyn FnMut(&mut Dataset) -> ControlFlow<()>) -> Result<(), DataError> {
        let mut splitter = Splitter::new(&self.schema.split, self.n_rows);
        let mut out = Dataset::empty(self.n_features());
        let mut stopped = false;
        let (mut seen, mut mine) = (0, 0);
        let wanted = self.part == Part::Test;
        scan_source(&self.source, &self.schema, PASS_ROWS, &mut |batch| {
            seen += batch.len();
            for (i, (row, &label)) in batch.rows().zip(&batch.labels).enumerate() {
                if splitter.next_is_test(batch.groups.get(i)) != wanted {
                    continue;
                }
                mine += 1;
                out.features.extend_from_slice(row);
                out.labels.push(label);
                // Batches of exactly PASS_ROWS rows, as an in-memory
                // `Dataset` hands them over: a model's logits for a row may
                // differ in the last bit with the shape of its batch.
                if out.len() == PASS_ROWS {
                    if visit(&mut out).is_break() {
                        stopped = true;
                        return ControlFlow::Break(());
                    }
                    out.features.clear();
                    out.labels.clear();
                }
            }
            ControlFlow::Continue(())
        })?;
        if !stopped && seen == self.n_rows && mine != self.len {
            // As many rows, dealt otherwise (a warehouse whose patients
            // changed): this part no longer has the rows it declared.
            return Err(DataError::Changed {
                file: PathBuf::from(self.source.label()),
                expected: self.len,
                found: mine,
            });
        }
        if !stopped && seen != self.n_rows {
            // The file changed since it was opened: its split (and the
            // counts declared in the ledger) no longer describe it.
            return Err(DataError::Changed {
                file: PathBuf::from(self.source.label()),
                expected: self.n_rows,
                found: seen,
            });
        }
        if !stopped && !out.is_empty() {
            let _ = visit(&mut out);
        }
        Ok(())
    }
}

impl Dataset {
    /// The train and test parts of these rows, as [`Splitter`] splits
    /// them: the parts a streamed pass over the same rows gives.
    pub fn split(&self, split: &SplitSpec) -> (Dataset, Dataset) {
        let (mut train, mut test) = (Dataset::empty(self.n_features), Dataset::empty(self.n_features));
        Splitter::new(split, self.len()).deal(self, &mut train, &mut test);
        (train, test)
    }
}

/// Count, sums and sums of squares of `rows`, in one pass.
pub fn feature_stats(rows: &dyn Rows) -> Result<FeatureStats, DataError> {
    let mut stats = FeatureStats::of_rows(rows.n_features(), std::iter::empty());
    rows.scan(&mut |batch| {
        stats.add_rows(batch.rows());
        stats.add_labels(&batch.labels);
        ControlFlow::Continue(())
    })?;
    Ok(stats)
}

/// All of `rows` in memory (for tools that need the whole split, such as
/// the pooled baseline of the local demo).
pub fn to_dataset(rows: &dyn Rows) -> Result<Dataset, DataError> {
    let mut all = Dataset::empty(rows.n_features());
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
            pos_weight: 1.0,
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
        let eval = evaluate(&layout, &update.params, &test, 0.5, &device).unwrap();
        (stats, update.params, [eval.loss, eval.accuracy, eval.auc()])
    }

    fn spec(batch_size: usize, local_work: LocalWork) -> TrainingSpec {
        TrainingSpec {
            optimizer: OptimizerKind::Sgd,
            learning_rate: 0.05,
            batch_size,
            local_work,
            pos_weight: Default::default(),
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

    const GROUPED: &str = r#"
[format]
header = true
missing_markers = ["NA"]
[label]
column = "y"
positive_if = "> 0"
[split]
test_fraction = 0.2
seed = 3
group_by = "patient"
[[column]]
name = "patient"
kind = "id"
[[column]]
name = "row"
kind = "numeric"
[[column]]
name = "who"
kind = "numeric"
[[column]]
name = "y"
kind = "label"
"#;

    /// The patient (feature `who`) of each row of a part.
    fn patients(rows: &dyn Rows) -> std::collections::BTreeSet<u32> {
        let all = to_dataset(rows).unwrap();
        all.rows().map(|r| r[1] as u32).collect()
    }

    /// One patient's encounters are scattered through the file; every one
    /// of them lands on the same side, in memory and streamed, from CSV and
    /// from Parquet (integer ids there, text in the CSV file), and a row
    /// without an id is left out and counted.
    #[test]
    fn a_grouped_split_keeps_each_patient_on_one_side() {
        let dir = tempfile::tempdir().unwrap();
        let n = 3000u32;
        let patient = |i: u32| 1_000_000_007u64 + u64::from((i * 37) % 400);
        let mut text = String::from("patient,row,who,y\n");
        for i in 0..n {
            let id = if i == 5 {
                "NA".to_string()
            } else {
                patient(i).to_string()
            };
            text.push_str(&format!("{id},{i},{},{}\n", (i * 37) % 400, i % 2));
        }
        let csv = dir.path().join("encounters.csv");
        std::fs::write(&csv, &text).unwrap();
        let parquet = dir.path().join("encounters.parquet");
        let ids: arrow_array::Int64Array = (0..n).map(|i| (i != 5).then(|| patient(i) as i64)).collect();
        let int_column = |f: &dyn Fn(u32) -> i64| {
            std::sync::Arc::new((0..n).map(f).collect::<arrow_array::Int64Array>()) as arrow_array::ArrayRef
        };
        let batch = arrow_array::RecordBatch::try_from_iter([
            ("patient", std::sync::Arc::new(ids) as arrow_array::ArrayRef),
            ("row", int_column(&|i| i64::from(i))),
            ("who", int_column(&|i| i64::from((i * 37) % 400))),
            ("y", int_column(&|i| i64::from(i % 2))),
        ])
        .unwrap();
        let mut writer =
            parquet::arrow::ArrowWriter::try_new(std::fs::File::create(&parquet).unwrap(), batch.schema(), None)
                .unwrap();
        writer.write(&batch).unwrap();
        writer.close().unwrap();

        let schema = Schema::from_toml(GROUPED).unwrap();
        let (all, report) = crate::data::read_table(&csv, &schema).unwrap();
        assert_eq!(report.rows_kept, n as usize - 1);
        assert!(report.missing_per_column.contains(&("patient".to_string(), 1)));
        let (train, test) = all.split(&schema.split);
        assert!(
            train.groups.is_empty() && test.groups.is_empty(),
            "ids do not outlive the split"
        );
        let (train_ids, test_ids) = (patients(&train), patients(&test));
        assert!(train_ids.is_disjoint(&test_ids), "a patient in both splits");
        assert_eq!(train_ids.len() + test_ids.len(), 400);
        // About a fifth of the patients are test patients.
        assert!((50..=110).contains(&test_ids.len()), "{} test patients", test_ids.len());
        for file in [&csv, &parquet] {
            let (s_train, s_test, s_report) = TableSplit::open(file.clone(), schema.clone()).unwrap();
            assert_eq!(s_report, report, "{}", file.display());
            assert_eq!((s_train.len(), s_test.len()), (train.len(), test.len()));
            assert_eq!(to_dataset(&s_train).unwrap(), train, "{}", file.display());
            assert_eq!(to_dataset(&s_test).unwrap(), test, "{}", file.display());
        }
        // Another seed deals the patients differently (still grouped).
        let other = SplitSpec {
            seed: 4,
            ..schema.split.clone()
        };
        let mut reseeded = schema.clone();
        reseeded.split = other;
        let (all, _) = crate::data::read_table(&csv, &reseeded).unwrap();
        let (o_train, o_test) = all.split(&reseeded.split);
        assert!(patients(&o_train).is_disjoint(&patients(&o_test)));
        assert_ne!(patients(&o_test), test_ids);
    }

    proptest! {
        /// Exactly `ceil(f·n)` test rows, whatever n, f and seed.
        #[test]
        fn the_splitter_picks_exactly_the_test_rows_it_must(n in 0usize..2000, f in 0.01f64..0.99, seed in any::<u64>()) {
            let split = SplitSpec { test_fraction: f, seed, group_by: None };
            let mut splitter = Splitter::new(&split, n);
            let picked = (0..n).filter(|_| splitter.next_is_test(None)).count();
            prop_assert_eq!(picked, test_rows(&split, n));
            prop_assert!(!splitter.next_is_test(None), "past the end");
        }

        /// A grouped split partitions the rows, never splits a group, and
        /// its test share of groups follows `test_fraction`.
        #[test]
        fn a_grouped_split_never_splits_a_group(
            groups in prop::collection::vec(0u32..50, 1..400),
            f in 0.05f64..0.95,
            seed in any::<u64>(),
        ) {
            let split = SplitSpec { test_fraction: f, seed, group_by: Some("patient".into()) };
            let hasher = GroupHasher::new(&split);
            let data = Dataset {
                features: groups.iter().enumerate().flat_map(|(i, &g)| [i as f32, g as f32]).collect(),
                labels: vec![0.0; groups.len()],
                groups: groups.iter().map(|g| hasher.hash(&g.to_string())).collect(),
                ..Dataset::empty(2)
            };
            let (train, test) = data.split(&split);
            let (train_ids, test_ids) = (patients(&train), patients(&test));
            prop_assert!(train_ids.is_disjoint(&test_ids));
            let mut rows: Vec<u32> = train.rows().chain(test.rows()).map(|r| r[0] as u32).collect();
            rows.sort_unstable();
            prop_assert_eq!(rows, (0..groups.len() as u32).collect::<Vec<_>>());
        }
    }

    /// Over many ids, the share of test ids is `test_fraction`.
    #[test]
    fn grouped_test_share_follows_the_fraction() {
        let split = SplitSpec {
            test_fraction: 0.3,
            seed: 9,
            group_by: Some("patient".into()),
        };
        let hasher = GroupHasher::new(&split);
        let mut splitter = Splitter::new(&split, 0);
        let test = (0..100_000)
            .filter(|i| splitter.next_is_test(Some(&hasher.hash(&format!("P{i}")))))
            .count();
        // Binomial(100000, 0.3): sd 145; 6 sd either side.
        assert!((29_130..=30_870).contains(&test), "{test}");
    }
}
