//! Reading a site's CSV file through its [`Schema`] into encoded rows (and,
//! through [`read_table`], a Parquet file: `crate::columnar`).
//!
//! The file is streamed record by record (never read whole), each cell is
//! checked, and the first malformed cell stops the read with an error naming
//! the file, the line and the column. Missing values are counted per column,
//! so `tessera-participant check` can show the data team what was missing;
//! a row with one is left out, unless the column's `missing` rule imputes
//! it (a numeric feature is `NaN` until standardised, a categorical one has
//! no category, an indicator feature says it was missing).

use std::collections::{BTreeMap, HashMap};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use crate::schema::{CategoryMap, Column, ColumnKind, LabelRule, MissingRule, Schema};

/// Encoded rows of one site: features row-major, labels 0/1. A feature is
/// `NaN` where its value was missing and is to be imputed.
#[derive(Clone, Debug)]
pub struct Dataset {
    pub n_features: usize,
    pub features: Vec<f32>,
    pub labels: Vec<f32>,
    /// Per row, the keyed hash of its `[split] group_by` id, which decides
    /// its side of the split (`crate::stream::Splitter`). Empty when the
    /// split is not grouped, and in the parts a split returns: the ids
    /// themselves are never kept.
    pub groups: Vec<u64>,
}

/// Two reads are equal when they encode the same rows: features compare
/// by their bits, so that a value to impute (`NaN`) equals itself.
impl PartialEq for Dataset {
    fn eq(&self, other: &Self) -> bool {
        self.n_features == other.n_features
            && self.labels == other.labels
            && self.groups == other.groups
            && self.features.len() == other.features.len()
            && self
                .features
                .iter()
                .zip(&other.features)
                .all(|(a, b)| a.to_bits() == b.to_bits())
    }
}

/// What reading a file found, besides the rows.
#[derive(Clone, Debug, PartialEq)]
pub struct ReadReport {
    pub rows_read: usize,
    pub rows_kept: usize,
    /// Missing cells per used column, in file order.
    pub missing_per_column: Vec<(String, usize)>,
    /// Values sent to the other bucket, per column that has one (a map
    /// that misses most codes shows here).
    pub other_per_column: Vec<(String, usize)>,
    /// Per column with `discover = true`: the kept rows of each value that
    /// went to the other bucket (what the site may propose as a category;
    /// a row left out for a missing value does not count). At most
    /// [`MAX_DISTINCT`] values per column are counted.
    pub discovered: BTreeMap<String, BTreeMap<String, u64>>,
}

/// The most distinct values counted in one discovered column: a column of
/// free text or ids marked `discover` by mistake costs bounded memory.
pub const MAX_DISTINCT: usize = 1_000_000;

/// Why a data file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("cannot read {}: {source}", file.display())]
    Io { file: PathBuf, source: std::io::Error },
    #[error("{}:{line}: column {column} (`{name}`): {reason}", file.display())]
    Malformed {
        file: PathBuf,
        line: u64,
        /// 1-based column number.
        column: usize,
        name: String,
        reason: String,
    },
    #[error("{}:{line}: expected {expected} fields, found {found}", file.display())]
    FieldCount {
        file: PathBuf,
        line: u64,
        expected: usize,
        found: usize,
    },
    #[error("{}: header does not match the schema: expected `{expected}`, found `{found}`", file.display())]
    Header {
        file: PathBuf,
        expected: String,
        found: String,
    },
    /// The file cannot be read as CSV text at all (e.g. it is binary).
    #[error("{}:{line}: {reason}", file.display())]
    Unreadable { file: PathBuf, line: u64, reason: String },
    /// A Parquet file that cannot be opened or decoded.
    #[error("{}: cannot be read as Parquet: {reason}", file.display())]
    Parquet { file: PathBuf, reason: String },
    /// A column the schema uses is not in a columnar file or a query's
    /// result (`file` names either).
    #[error("{}: the schema's column `{name}` is missing (its columns: {found})", file.display())]
    MissingColumn { file: PathBuf, name: String, found: String },
    /// A columnar file's column holds values of a type the schema cannot use.
    #[error("{}: column `{name}` holds {found} values, which cannot be read as {wanted}", file.display())]
    ColumnType {
        file: PathBuf,
        name: String,
        found: String,
        wanted: &'static str,
    },
    /// A bad value in a columnar file, named by its 1-based data row.
    #[error("{}: row {row}, column `{name}`: {reason}", file.display())]
    MalformedRow {
        file: PathBuf,
        row: u64,
        name: String,
        reason: String,
    },
    /// A site with nothing to train on must say so at `check`, not join a
    /// job and fail (or divide by zero) in its first round.
    #[error("{}: no usable rows: {}", file.display(), no_rows_reason(*.rows_read))]
    NoRows { file: PathBuf, rows_read: usize },
    /// A split with an empty side: nothing to train on, or nothing to
    /// evaluate on (a grouped split of few patients can put them all on
    /// one side).
    #[error(
        "{}: the train/test split leaves the {empty} part empty ({rows} usable rows{}); \
         a site needs rows on both sides: adjust `[split] test_fraction` or bring more rows",
        file.display(),
        group_by.as_ref().map(|g| format!(", grouped by `{g}`")).unwrap_or_default()
    )]
    EmptySplit {
        file: PathBuf,
        empty: &'static str,
        rows: usize,
        group_by: Option<String>,
    },
    /// A query source (a warehouse or SQL over the site's files) that cannot
    /// be reached or whose query fails, with the engine's own message.
    #[error("{source_label}: {reason}")]
    Query { source_label: String, reason: String },
    /// A query's rows come in no fixed order, so only a split by a keyed
    /// hash of an id is the same on every pass.
    #[error(
        "{source_label}: a query source needs `[split] group_by` (an id column): the order of a query's rows \
         is not fixed, so a split by position would differ from one pass to the next"
    )]
    UngroupedQuery { source_label: String },
    /// A streamed pass found another number of usable rows than the pass
    /// that opened the file: the file was changed under the running site.
    #[error(
        "{}: the file changed while the site was running ({expected} usable rows when it was opened, {found} now); \
         restart the site to use the new data",
        file.display()
    )]
    Changed {
        file: PathBuf,
        expected: usize,
        found: usize,
    },
}

impl DataError {
    /// What may be said about this error outside the site: the kind of
    /// problem and the consortium schema's column names, never a cell's
    /// value, a line or row number, a path or the file's own column names.
    /// The coordinator shows it to the ML lead and the ledger keeps it in
    /// the site's decision, so it must not carry one record's content.
    pub fn public_reason(&self) -> String {
        match self {
            DataError::Io { .. } => "the data file cannot be read".to_owned(),
            DataError::Malformed { name, .. } | DataError::MalformedRow { name, .. } => {
                format!("column `{name}` holds a value the schema cannot encode")
            }
            DataError::FieldCount { .. } => "a line of the data file has the wrong number of fields".to_owned(),
            DataError::Header { expected, found, .. } => {
                let found: Vec<&str> = found.split(',').collect();
                match expected.split(',').find(|name| !found.contains(name)) {
                    Some(name) => format!("schema mismatch: column `{name}` missing"),
                    None => {
                        "schema mismatch: the file's header differs from the schema (other columns or another order)"
                            .to_owned()
                    }
                }
            }
            DataError::Unreadable { .. } => "the data file cannot be read as CSV text".to_owned(),
            DataError::Parquet { .. } => "the data file cannot be read as Parquet".to_owned(),
            DataError::MissingColumn { name, .. } => format!("schema mismatch: column `{name}` missing"),
            // Not the file's type: a struct type prints its fields' names.
            DataError::ColumnType { name, wanted, .. } => {
                format!("schema mismatch: column `{name}` cannot be read as {wanted}")
            }
            DataError::NoRows { rows_read: 0, .. } => "the data file holds no data rows".to_owned(),
            DataError::NoRows { .. } => "every data row was dropped for missing values".to_owned(),
            DataError::EmptySplit { empty, .. } => format!("the train/test split leaves the {empty} part empty"),
            DataError::Query { .. } => "the site's cohort query cannot be run".to_owned(),
            DataError::UngroupedQuery { .. } => "the site's query source has no `[split] group_by`".to_owned(),
            DataError::Changed { .. } => {
                "the data file changed while the site was running (the site must be restarted)".to_owned()
            }
        }
    }
}

fn no_rows_reason(rows_read: usize) -> String {
    if rows_read == 0 {
        "the file holds no data rows (it is empty or only a header)".to_owned()
    } else {
        format!("all {rows_read} data rows were dropped for missing values")
    }
}

impl Dataset {
    /// No rows, `n_features` wide.
    pub fn empty(n_features: usize) -> Self {
        Self {
            n_features,
            features: Vec::new(),
            labels: Vec::new(),
            groups: Vec::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    pub fn row(&self, i: usize) -> &[f32] {
        &self.features[i * self.n_features..(i + 1) * self.n_features]
    }

    pub fn rows(&self) -> impl Iterator<Item = &[f32]> {
        self.features.chunks_exact(self.n_features.max(1))
    }

    /// Positive labels.
    pub fn n_positive(&self) -> usize {
        self.labels.iter().filter(|&&y| y > 0.5).count()
    }

    /// Rows at `indices`, in that order.
    pub fn select(&self, indices: &[usize]) -> Dataset {
        let mut out = Dataset::empty(self.n_features);
        out.features.reserve(indices.len() * self.n_features);
        for &i in indices {
            out.features.extend_from_slice(self.row(i));
            out.labels.push(self.labels[i]);
            if let Some(&group) = self.groups.get(i) {
                out.groups.push(group);
            }
        }
        out
    }

    /// A copy with every row standardised by the global statistics.
    pub fn standardized(&self, normalization: &tessera_protocol::stats::Normalization) -> Dataset {
        let mut out = self.clone();
        for row in out.features.chunks_exact_mut(self.n_features.max(1)) {
            normalization.apply(row);
        }
        out
    }

    /// Appends `other`'s rows (of the same width).
    pub fn append(&mut self, mut other: Dataset) {
        assert_eq!(other.n_features, self.n_features, "datasets of different widths");
        if self.is_empty() {
            *self = other;
            return;
        }
        self.features.append(&mut other.features);
        self.labels.append(&mut other.labels);
        self.groups.append(&mut other.groups);
    }

    /// Concatenation of several datasets of the same width.
    pub fn concat(parts: &[Dataset]) -> Dataset {
        let mut out = Dataset::empty(parts.first().map_or(0, |d| d.n_features));
        for part in parts {
            out.append(part.clone());
        }
        out
    }
}

/// Reads and encodes a site's data file with `schema`: Parquet when its
/// name ends in `.parquet` or `.pq`, CSV otherwise.
pub fn read_table(path: &Path, schema: &Schema) -> Result<(Dataset, ReadReport), DataError> {
    collect(|visit| scan_table(path, schema, usize::MAX, visit), schema)
}

/// Where a site's rows come from: a file, or a query on its warehouse.
#[derive(Clone, Debug, PartialEq)]
pub enum Source {
    File(PathBuf),
    Postgres(crate::postgres::PgSource),
    /// SQL over the site's files (the `sql` feature).
    #[cfg(feature = "sql")]
    Sql(crate::cohort::SqlCohort),
}

impl Source {
    /// How errors and `check` name the source (never a password).
    pub fn label(&self) -> String {
        match self {
            Source::File(path) => path.display().to_string(),
            Source::Postgres(pg) => pg.label(),
            #[cfg(feature = "sql")]
            Source::Sql(cohort) => cohort.label(),
        }
    }

    /// Refuses a split that would not be the same on every pass.
    pub fn check_split(&self, schema: &Schema) -> Result<(), DataError> {
        match self {
            Source::File(_) => Ok(()),
            _ if schema.split.group_by.is_none() => Err(DataError::UngroupedQuery {
                source_label: self.label(),
            }),
            _ => Ok(()),
        }
    }
}

impl From<PathBuf> for Source {
    fn from(path: PathBuf) -> Self {
        Source::File(path)
    }
}

/// [`read_table`] over any source.
pub fn read_source(source: &Source, schema: &Schema) -> Result<(Dataset, ReadReport), DataError> {
    source.check_split(schema)?;
    collect(|visit| scan_source(source, schema, usize::MAX, visit), schema)
}

/// [`scan_table`] over any source.
pub fn scan_source(source: &Source, schema: &Schema, batch_rows: usize, visit: Visit) -> Result<ReadReport, DataError> {
    match source {
        Source::File(path) => scan_table(path, schema, batch_rows, visit),
        Source::Postgres(pg) => crate::postgres::scan_postgres(pg, schema, batch_rows, visit),
        #[cfg(feature = "sql")]
        Source::Sql(cohort) => crate::cohort::scan_sql(cohort, schema, batch_rows, visit),
    }
}

/// The batches a visitor is handed: encoded rows, in file order.
pub type Visit<'v> = &'v mut dyn FnMut(Dataset) -> ControlFlow<()>;

/// One pass over a site's data file (as [`read_table`] reads it), handing
/// the encoded rows to `visit` in batches of at most `batch_rows` rows, so
/// that no more than one batch is held: how a table larger than memory is
/// read. The report covers the whole file unless `visit` stopped the pass.
pub fn scan_table(path: &Path, schema: &Schema, batch_rows: usize, visit: Visit) -> Result<ReadReport, DataError> {
    match path.extension().and_then(|e| e.to_str()) {
        Some(e) if e.eq_ignore_ascii_case("parquet") || e.eq_ignore_ascii_case("pq") => {
            crate::columnar::scan_parquet(path, schema, batch_rows, visit)
        }
        _ => {
            let file = std::fs::File::open(path).map_err(|source| DataError::Io {
                file: path.to_owned(),
                source,
            })?;
            scan_csv(std::io::BufReader::new(file), path, schema, batch_rows, visit)
        }
    }
}

/// The rows of a whole pass, in one dataset.
pub(crate) fn collect(
    pass: impl FnOnce(Visit) -> Result<ReadReport, DataError>,
    schema: &Schema,
) -> Result<(Dataset, ReadReport), DataError> {
    let mut rows = Dataset::empty(schema.feature_names().len());
    let report = pass(&mut |batch| {
        rows.append(batch);
        ControlFlow::Continue(())
    })?;
    Ok((rows, report))
}

/// Reads and encodes a CSV file with `schema`.
pub fn read_csv(path: &Path, schema: &Schema) -> Result<(Dataset, ReadReport), DataError> {
    let file = std::fs::File::open(path).map_err(|source| DataError::Io {
        file: path.to_owned(),
        source,
    })?;
    read_csv_from(std::io::BufReader::new(file), path, schema)
}

/// [`read_csv`] over any reader; `path` is only used in error messages.
pub fn read_csv_from(
    reader: impl std::io::Read,
    path: &Path,
    schema: &Schema,
) -> Result<(Dataset, ReadReport), DataError> {
    collect(|visit| scan_csv(reader, path, schema, usize::MAX, visit), schema)
}

fn scan_csv(
    reader: impl std::io::Read,
    path: &Path,
    schema: &Schema,
    batch_rows: usize,
    visit: Visit,
) -> Result<ReadReport, DataError> {
    let mut csv_reader = csv::ReaderBuilder::new()
        .delimiter(schema.delimiter)
        .has_headers(false)
        // Lines end at `\n` only: with the default (CR, LF or CRLF) the
        // parser counts a CRLF file's lines one short. The `\r` of a CRLF
        // line stays in its last cell, and every cell is trimmed.
        .terminator(csv::Terminator::Any(b'\n'))
        .flexible(true)
        .from_reader(reader);
    let mut rows = RowEncoder::new(schema);
    let mut record = csv::StringRecord::new();
    let mut first = true;
    loop {
        let more = csv_reader
            .read_record(&mut record)
            .map_err(|e| csv_error(path, schema, e))?;
        if !more {
            break;
        }
        let line = record.position().map_or(0, |p| p.line());
        if first && schema.header {
            first = false;
            check_header(path, schema, &record)?;
            continue;
        }
        first = false;
        if record.len() == 1 && record[0].trim().is_empty() {
            continue; // blank line
        }
        if record.len() != schema.columns.len() {
            return Err(DataError::FieldCount {
                file: path.to_owned(),
                line,
                expected: schema.columns.len(),
                found: record.len(),
            });
        }
        rows.push(record.iter().map(|cell| Cell::Text(cell.trim())))
            .map_err(|(index, reason)| DataError::Malformed {
                file: path.to_owned(),
                line,
                column: index + 1,
                name: schema.columns[index].name.clone(),
                reason,
            })?;
        if rows.pending() >= batch_rows && visit(rows.take()).is_break() {
            return Ok(rows.report());
        }
    }
    if rows.pending() > 0 && visit(rows.take()).is_break() {
        return Ok(rows.report());
    }
    rows.finish(path)
}

/// One cell as a source hands it over: CSV gives text, a columnar file
/// typed values or nulls.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Cell<'a> {
    Missing,
    Text(&'a str),
    Number(f64),
}

/// Encodes rows through the schema, whatever the source: the one place that
/// decides what is missing, what a category or a label is, and what is
/// malformed, so CSV and Parquet files give the same rows.
pub(crate) struct RowEncoder<'s> {
    schema: &'s Schema,
    /// How each schema column is read, worked out once.
    slots: Vec<Slot>,
    /// Rows encoded since the last `take`.
    dataset: Dataset,
    rows_kept: usize,
    /// Missing cells per used column, in schema order.
    missing_per_column: Vec<(String, usize)>,
    /// Values in the other bucket, per used column (0 where it has none).
    other_per_column: Vec<usize>,
    rows_read: usize,
    encoded: Vec<f32>,
    /// Hashes the `[split] group_by` id of a grouped split.
    groups: Option<crate::stream::GroupHasher>,
    /// Rows per other-bucket value, per schema column with `discover`.
    discovered: Vec<Option<HashMap<String, u64>>>,
}

impl<'s> RowEncoder<'s> {
    pub(crate) fn new(schema: &'s Schema) -> Self {
        let n_features = schema.feature_names().len();
        Self {
            schema,
            dataset: Dataset::empty(n_features),
            slots: Slot::plan(schema),
            missing_per_column: schema
                .columns
                .iter()
                .filter(|c| c.kind != ColumnKind::Drop)
                .map(|c| (c.name.clone(), 0))
                .collect(),
            other_per_column: vec![0; schema.columns.iter().filter(|c| c.kind != ColumnKind::Drop).count()],
            rows_read: 0,
            rows_kept: 0,
            encoded: Vec::with_capacity(n_features),
            groups: schema
                .split
                .group_by
                .as_ref()
                .map(|_| crate::stream::GroupHasher::new(&schema.split)),
            discovered: schema
                .columns
                .iter()
                .map(|c| matches!(c.kind, ColumnKind::Categorical { discover: Some(_), .. }).then(HashMap::new))
                .collect(),
        }
    }

    /// Encodes one row, given one cell per schema column (those of dropped
    /// columns are ignored). A missing cell is counted, and leaves its row
    /// out unless its column imputes it; a malformed cell is an error: the
    /// index of its column and why.
    pub(crate) fn push<'c>(&mut self, cells: impl Iterator<Item = Cell<'c>>) -> Result<(), (usize, String)> {
        self.rows_read += 1;
        self.encoded.clear();
        let mut label = None;
        let mut group = None;
        let mut row_missing = false;
        // Values of discovered columns: counted if the row is kept.
        let mut row_values: Vec<(usize, String)> = Vec::new();
        for (index, ((column, slot), cell)) in self.schema.columns.iter().zip(&self.slots).zip(cells).enumerate() {
            let Some(used) = slot.used else { continue };
            let start = self.encoded.len();
            if self.is_missing(column, cell) {
                self.missing_per_column[used].1 += 1;
                if slot.imputes() {
                    self.encoded.resize(start + slot.width, 0.0);
                    slot.encode_missing(&mut self.encoded[start..]);
                } else {
                    row_missing = true;
                }
                continue;
            }
            let malformed = |reason: String| (index, reason);
            match &column.kind {
                ColumnKind::Numeric => {
                    let value = number(cell).map_err(malformed)?;
                    self.encoded.resize(start + slot.width, 0.0);
                    self.encoded[start] = value as f32;
                }
                ColumnKind::Categorical { .. } => {
                    let hit = slot.category(cell).map_err(malformed)?;
                    if Some(hit) == slot.other() {
                        self.other_per_column[used] += 1;
                        if slot.discover {
                            row_values.push((index, proposed_text(cell).into_owned()));
                        }
                    }
                    self.encoded
                        .extend((0..slot.width).map(|k| if k == hit { 1.0 } else { 0.0 }));
                }
                ColumnKind::Label => label = Some(label_of(&self.schema.label, cell).map_err(malformed)?),
                ColumnKind::Id => group = Some(self.group_of(cell)),
                ColumnKind::Drop => unreachable!("skipped above"),
            }
        }
        if !row_missing {
            // The schema has exactly one label column and no missing cell was
            // seen, so the label is set (and the group, where the split is
            // grouped: its id column is the one id column).
            self.dataset.labels.push(label.expect("label column present"));
            self.dataset.groups.extend(group);
            self.dataset.features.extend_from_slice(&self.encoded);
            self.rows_kept += 1;
            for (column, value) in &row_values {
                count_value(&mut self.discovered[*column], value);
            }
        }
        Ok(())
    }

    /// Whether `cell` is a missing value of `column`: no value, an empty
    /// cell, a missing marker, or a `0` where zero means "not measured".
    pub(crate) fn is_missing(&self, column: &Column, cell: Cell) -> bool {
        match cell {
            Cell::Missing => true,
            Cell::Text(text) => {
                text.is_empty()
                    || self.schema.missing_markers_of(column).iter().any(|m| m == text)
                    || (column.zero_means_missing && text.parse::<f64>() == Ok(0.0))
            }
            Cell::Number(value) => column.zero_means_missing && value == 0.0,
        }
    }

    /// The keyed hash of a (present) id cell. Ids are compared as text:
    /// `123` in a CSV file and the integer 123 in a Parquet file are the
    /// same patient.
    pub(crate) fn group_of(&self, cell: Cell) -> u64 {
        let hasher = self.groups.as_ref().expect("an id column is the split's group_by");
        hasher.hash(&as_text(cell))
    }

    pub(crate) fn slots(&self) -> &[Slot] {
        &self.slots
    }

    /// An empty batch of `n` rows for [`Self::commit`]: every row kept
    /// until a column says otherwise.
    pub(crate) fn start_batch(&self, n: usize) -> ColumnBatch {
        ColumnBatch {
            width: self.dataset.n_features,
            features: vec![0.0; n * self.dataset.n_features],
            labels: vec![0.0; n],
            keep: vec![true; n],
            missing: vec![0; self.missing_per_column.len()],
            other: vec![0; self.missing_per_column.len()],
            groups: if self.groups.is_some() { vec![0; n] } else { Vec::new() },
            discovered: Vec::new(),
        }
    }

    /// Adds a batch encoded column by column: what pushing its rows one by
    /// one would have added.
    pub(crate) fn commit(&mut self, batch: ColumnBatch) {
        self.rows_read += batch.keep.len();
        for ((_, count), missing) in self.missing_per_column.iter_mut().zip(&batch.missing) {
            *count += missing;
        }
        for (count, other) in self.other_per_column.iter_mut().zip(&batch.other) {
            *count += other;
        }
        for (column, row, value) in &batch.discovered {
            if batch.keep[*row] {
                count_value(&mut self.discovered[*column], value);
            }
        }
        let width = batch.width;
        if self.dataset.is_empty() && batch.keep.iter().all(|&keep| keep) {
            // The common case: every row kept, nothing pending; no copy.
            self.rows_kept += batch.keep.len();
            self.dataset.features = batch.features;
            self.dataset.labels = batch.labels;
            self.dataset.groups = batch.groups;
            return;
        }
        for (r, _) in batch.keep.iter().enumerate().filter(|(_, keep)| **keep) {
            self.dataset
                .features
                .extend_from_slice(&batch.features[r * width..(r + 1) * width]);
            self.dataset.labels.push(batch.labels[r]);
            if let Some(&group) = batch.groups.get(r) {
                self.dataset.groups.push(group);
            }
            self.rows_kept += 1;
        }
    }

    /// Rows encoded and not yet taken.
    pub(crate) fn pending(&self) -> usize {
        self.dataset.len()
    }

    /// The rows encoded since the last call.
    pub(crate) fn take(&mut self) -> Dataset {
        let empty = Dataset::empty(self.dataset.n_features);
        std::mem::replace(&mut self.dataset, empty)
    }

    /// What the pass found so far.
    pub(crate) fn report(&self) -> ReadReport {
        ReadReport {
            rows_read: self.rows_read,
            rows_kept: self.rows_kept,
            missing_per_column: self.missing_per_column.clone(),
            other_per_column: self
                .schema
                .columns
                .iter()
                .zip(&self.slots)
                .filter_map(|(column, slot)| {
                    let used = slot.used.filter(|_| slot.other().is_some())?;
                    Some((column.name.clone(), self.other_per_column[used]))
                })
                .collect(),
            discovered: self
                .schema
                .columns
                .iter()
                .zip(&self.discovered)
                .filter_map(|(column, counts)| {
                    let counts = counts.as_ref()?.iter().map(|(v, n)| (v.clone(), *n)).collect();
                    Some((column.name.clone(), counts))
                })
                .collect(),
        }
    }

    /// The report of a whole pass; no usable row at all is an error.
    pub(crate) fn finish(self, path: &Path) -> Result<ReadReport, DataError> {
        if self.rows_kept == 0 {
            return Err(DataError::NoRows {
                file: path.to_owned(),
                rows_read: self.rows_read,
            });
        }
        Ok(self.report())
    }
}

/// Counts a value that went to a discovered column's other bucket (`None`:
/// the column does not discover).
fn count_value(counts: &mut Option<HashMap<String, u64>>, value: &str) {
    if let Some(counts) = counts {
        if let Some(n) = counts.get_mut(value) {
            *n += 1;
        } else if counts.len() < MAX_DISTINCT {
            counts.insert(value.to_owned(), 1);
        }
    }
}

pub(crate) fn number(cell: Cell) -> Result<f64, String> {
    match cell {
        Cell::Text(text) => parse_number(text),
        Cell::Number(v) if v.is_finite() => Ok(v),
        Cell::Number(v) => Err(format!("`{v}` is not a finite number")),
        Cell::Missing => unreachable!("missing cells are counted, not encoded"),
    }
}

/// A present cell as text: an integer stored as a number reads as its
/// digits (`123`, not `123.0`), so a Parquet file's typed codes and ids
/// match a CSV file's text.
pub(crate) fn as_text(cell: Cell<'_>) -> std::borrow::Cow<'_, str> {
    match cell {
        Cell::Text(text) => text.into(),
        Cell::Number(v) if v.fract() == 0.0 && v.abs() < 2f64.powi(53) => (v as i64).to_string().into(),
        Cell::Number(v) => v.to_string().into(),
        Cell::Missing => unreachable!("missing cells are counted, not encoded"),
    }
}

/// A value of a discovered column as it is counted and proposed: a number
/// as its shortest text (`1.0` and `1` are one value, as a category matches
/// them, and so are `042` and `42`), anything else as written.
pub(crate) fn proposed_text(cell: Cell<'_>) -> std::borrow::Cow<'_, str> {
    match cell {
        Cell::Text(text) => match text.parse::<f64>() {
            Ok(v) if v.is_finite() => as_text(Cell::Number(v)).into_owned().into(),
            _ => text.into(),
        },
        _ => as_text(cell),
    }
}

/// The label of a present label cell.
pub(crate) fn label_of(rule: &LabelRule, cell: Cell) -> Result<f32, String> {
    let positive = match rule {
        LabelRule::Compare { op, threshold } => op.holds(number(cell)?, *threshold),
        LabelRule::OneOf { positive, negative } => {
            let text = as_text(cell);
            let is_positive = positive.iter().any(|p| *p == text);
            if !is_positive && !negative.is_empty() && !negative.iter().any(|n| *n == text) {
                return Err(format!(
                    "`{text}` is in neither positive_in {positive:?} nor negative_in {negative:?}"
                ));
            }
            is_positive
        }
    };
    Ok(if positive { 1.0 } else { 0.0 })
}

/// A cell as an error message quotes it.
fn shown(cell: Cell) -> String {
    match cell {
        Cell::Text(text) => text.to_owned(),
        Cell::Number(v) => v.to_string(),
        Cell::Missing => String::new(),
    }
}

fn parse_number(cell: &str) -> Result<f64, String> {
    match cell.parse::<f64>() {
        Ok(v) if v.is_finite() => Ok(v),
        Ok(_) => Err(format!("`{cell}` is not a finite number")),
        Err(_) => Err(format!("`{cell}` is not a number")),
    }
}

/// How the encoder reads one schema column, worked out once per pass.
pub(crate) struct Slot {
    /// Index among the used (not dropped) columns, as in the report.
    pub(crate) used: Option<usize>,
    /// The column's first encoded feature.
    pub(crate) offset: usize,
    /// A categorical column's declared categories, with their value as a
    /// number where they are one.
    categories: Vec<(String, Option<f64>)>,
    /// A categorical column's code map.
    map: Vec<CategoryMap>,
    /// Whether a categorical column has an other bucket (after its
    /// categories).
    other: bool,
    /// Whether the column's other-bucket values are counted for discovery.
    pub(crate) discover: bool,
    /// What a missing value does (`Drop` for the label and id).
    missing: MissingRule,
    /// The column's features: a number, or the categories and the other
    /// bucket; then the missing indicator where it has one (the last).
    pub(crate) width: usize,
}

impl Slot {
    fn plan(schema: &Schema) -> Vec<Slot> {
        let (mut used, mut offset) = (0, 0);
        let mut slots = Vec::with_capacity(schema.columns.len());
        for column in &schema.columns {
            let mut slot = Slot {
                used: (column.kind != ColumnKind::Drop).then_some(used),
                offset,
                categories: Vec::new(),
                map: Vec::new(),
                other: false,
                discover: false,
                missing: column.missing,
                width: 0,
            };
            match &column.kind {
                ColumnKind::Numeric => slot.width = 1,
                ColumnKind::Categorical {
                    categories,
                    other,
                    map,
                    discover,
                } => {
                    slot.categories = categories.iter().map(|c| (c.clone(), c.parse::<f64>().ok())).collect();
                    slot.map = map.clone();
                    slot.other = *other;
                    slot.discover = discover.is_some();
                    slot.width = categories.len() + usize::from(*other);
                }
                ColumnKind::Label | ColumnKind::Id | ColumnKind::Drop => {}
            }
            slot.width += usize::from(column.missing == MissingRule::Indicator);
            offset += slot.width;
            used += usize::from(slot.used.is_some());
            slots.push(slot);
        }
        slots
    }

    /// The other bucket's index, where the column has one.
    pub(crate) fn other(&self) -> Option<usize> {
        self.other.then_some(self.categories.len())
    }

    /// Whether a missing value keeps its row.
    pub(crate) fn imputes(&self) -> bool {
        self.missing != MissingRule::Drop
    }

    /// Writes a missing value's encoding into the column's features (zeros
    /// on entry): `NaN` for a number, for standardisation to replace with
    /// the mean; no category for a categorical value; and the indicator.
    pub(crate) fn encode_missing(&self, features: &mut [f32]) {
        if self.categories.is_empty() {
            features[0] = f32::NAN;
        }
        if self.missing == MissingRule::Indicator {
            features[self.width - 1] = 1.0;
        }
    }

    /// The index of a (present) cell's category (or of the other bucket,
    /// the last). The first `map` rule that takes the cell decides; else
    /// categories match as numbers when both are numbers (`1.0` is `1`),
    /// else as text.
    pub(crate) fn category(&self, cell: Cell) -> Result<usize, String> {
        let number = match cell {
            Cell::Number(v) => Some(v),
            Cell::Text(text) => text.parse::<f64>().ok(),
            Cell::Missing => None,
        };
        if !self.map.is_empty() {
            let text = as_text(cell);
            if let Some(rule) = self.map.iter().find(|rule| rule.matches.takes(&text, number)) {
                return Ok(rule.to);
            }
        }
        let other = self.other();
        self.categories
            .iter()
            .position(|(declared, declared_number)| match (declared_number, cell) {
                (Some(a), Cell::Number(_)) => Some(*a) == number,
                (Some(a), Cell::Text(text)) => number.map_or(declared == text, |b| *a == b),
                (None, Cell::Text(text)) => declared == text,
                (None, Cell::Number(_)) | (_, Cell::Missing) => false,
            })
            .or(other)
            .ok_or_else(|| {
                let declared: Vec<&str> = self.categories.iter().map(|(c, _)| c.as_str()).collect();
                format!(
                    "`{}` is not one of the declared categories {declared:?} (map it, or set `other = true`)",
                    shown(cell)
                )
            })
    }
}

/// A batch encoded column by column (Parquet's layout), committed to the
/// encoder at once: every row in place, and which rows are kept.
pub(crate) struct ColumnBatch {
    width: usize,
    pub(crate) features: Vec<f32>,
    pub(crate) labels: Vec<f32>,
    pub(crate) keep: Vec<bool>,
    /// Missing cells per used column.
    pub(crate) missing: Vec<usize>,
    /// Values in the other bucket per used column.
    pub(crate) other: Vec<usize>,
    pub(crate) groups: Vec<u64>,
    /// Other-bucket values of discovered columns: (schema column, row,
    /// value), counted if the row is kept.
    pub(crate) discovered: Vec<(usize, usize, String)>,
}

impl ColumnBatch {
    /// Row `r` has a missing value in the used column `used`, which `slot`
    /// reads: it is imputed, or the row is left out.
    pub(crate) fn missing(&mut self, used: usize, r: usize, slot: &Slot) {
        self.missing[used] += 1;
        if slot.imputes() {
            let start = r * self.width + slot.offset;
            slot.encode_missing(&mut self.features[start..start + slot.width]);
        } else {
            self.keep[r] = false;
        }
    }

    /// Writes each column's `values` (one per row of `rows`) to its feature
    /// `offset`. Eight columns of consecutive features (numeric columns side
    /// by side, the common case) are written together, row by row: one
    /// 32-byte store per row instead of eight strided ones (one column at a
    /// time, the strided stores were a tenth of a Parquet pass).
    pub(crate) fn copy_columns(&mut self, rows: std::ops::Range<usize>, columns: &[(usize, &[f64])]) {
        let n = rows.len();
        let width = self.width;
        let block = &mut self.features[rows.start * width..rows.end * width];
        let mut i = 0;
        while i < columns.len() {
            let base = columns[i].0;
            let side_by_side = columns.len() - i >= 8 && (0..8).all(|k| columns[i + k].0 == base + k);
            if side_by_side {
                let tile: [&[f64]; 8] = std::array::from_fn(|k| &columns[i + k].1[..n]);
                for (r, row) in block.chunks_exact_mut(width).enumerate() {
                    let out = &mut row[base..base + 8];
                    for k in 0..8 {
                        out[k] = tile[k][r] as f32;
                    }
                }
                i += 8;
            } else {
                let (offset, values) = columns[i];
                for (row, &v) in block.chunks_exact_mut(width).zip(values) {
                    row[offset] = v as f32;
                }
                i += 1;
            }
        }
    }

    /// Feature `offset` of row `r`.
    pub(crate) fn feature(&mut self, r: usize, offset: usize) -> &mut f32 {
        &mut self.features[r * self.width + offset]
    }
}

fn check_header(path: &Path, schema: &Schema, record: &csv::StringRecord) -> Result<(), DataError> {
    let expected: Vec<&str> = schema.columns.iter().map(|c| c.name.as_str()).collect();
    let found: Vec<&str> = record.iter().map(str::trim).collect();
    if expected != found {
        return Err(DataError::Header {
            file: path.to_owned(),
            expected: expected.join(","),
            found: found.join(","),
        });
    }
    Ok(())
}

fn csv_error(path: &Path, schema: &Schema, error: csv::Error) -> DataError {
    let line = error.position().map_or(0, |p| p.line());
    let reason = match error.kind() {
        csv::ErrorKind::Utf8 { err, .. } => {
            let column = schema.columns.get(err.field()).map_or_else(
                || format!("column {}", err.field() + 1),
                |c| format!("column {} (`{}`)", err.field() + 1, c.name),
            );
            format!(
                "{column} is not UTF-8 text (a binary file, or a text encoding such as Latin-1? \
                 convert the file to UTF-8)"
            )
        }
        _ => error.to_string(),
    };
    match error.into_kind() {
        csv::ErrorKind::Io(source) => DataError::Io {
            file: path.to_owned(),
            source,
        },
        _ => DataError::Unreadable {
            file: path.to_owned(),
            line,
            reason,
        },
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::schema::{Schema, SplitSpec};
    use proptest::prelude::*;

    /// A numeric column where 0 means missing, a categorical one, a dropped
    /// one and the label (shared with the Parquet reader's tests).
    pub(crate) const SCHEMA: &str = r#"
[format]
missing_markers = ["?"]
[label]
column = "y"
positive_if = "> 0"
[split]
test_fraction = 0.34
seed = 42
[[column]]
name = "a"
kind = "numeric"
zero_means_missing = true
[[column]]
name = "c"
kind = "categorical"
categories = ["1", "2", "3"]
[[column]]
name = "skip"
kind = "drop"
[[column]]
name = "y"
kind = "label"
"#;

    fn read(text: &str) -> Result<(Dataset, ReadReport), DataError> {
        let schema = Schema::from_toml(SCHEMA).unwrap();
        read_csv_from(text.as_bytes(), Path::new("site.csv"), &schema)
    }

    #[test]
    fn encodes_rows_and_drops_missing() {
        let (data, report) = read("1.5,2,?,0\n?,1,x,3\n0,3,x,1\n2,3.0,x,2\n").unwrap();
        assert_eq!(data.n_features, 4);
        assert_eq!(data.features, vec![1.5, 0.0, 1.0, 0.0, 2.0, 0.0, 0.0, 1.0]);
        assert_eq!(data.labels, vec![0.0, 1.0]);
        assert_eq!(report.rows_read, 4);
        assert_eq!(report.rows_kept, 2);
        // `?` in a dropped column does not count; `0` in `a` means missing.
        assert_eq!(
            report.missing_per_column,
            vec![("a".into(), 2), ("c".into(), 0), ("y".into(), 0)]
        );
    }

    /// `impute` keeps a row with a missing feature (a number is `NaN`
    /// until standardised, a category is none of them), `indicator` adds
    /// `name=(missing)`; a missing label still leaves its row out.
    #[test]
    fn imputed_and_flagged_missing_values_keep_their_rows() {
        let text = "1.5,2,x,0\n?,1,x,3\n0,?,x,1\n2,3,x,?\n";
        let imputing = SCHEMA.replace(
            "zero_means_missing = true",
            "zero_means_missing = true\nmissing = \"indicator\"",
        );
        let imputing = imputing.replace("[format]\n", "[format]\nmissing = \"impute\"\n");
        let schema = Schema::from_toml(&imputing).unwrap();
        assert_eq!(schema.feature_names(), ["a", "a=(missing)", "c=1", "c=2", "c=3"]);
        let (data, report) = read_csv_from(text.as_bytes(), Path::new("site.csv"), &schema).unwrap();
        let nan = f32::NAN;
        let expected = Dataset {
            n_features: 5,
            features: vec![
                1.5, 0.0, 0.0, 1.0, 0.0, // nothing missing
                nan, 1.0, 1.0, 0.0, 0.0, // `?` in `a`
                nan, 1.0, 0.0, 0.0, 0.0, // `0` in `a`, `?` in `c`
            ],
            labels: vec![0.0, 1.0, 1.0],
            groups: Vec::new(),
        };
        assert_eq!(data, expected);
        let mut other = expected.clone();
        other.features[5] = 0.0;
        assert_ne!(data, other, "an imputed value is not a 0");
        assert_eq!((report.rows_read, report.rows_kept), (4, 3));
        assert_eq!(
            report.missing_per_column,
            vec![("a".into(), 2), ("c".into(), 1), ("y".into(), 1)]
        );
        // Standardised, the imputed value is the mean of the present ones.
        let stats = tessera_protocol::stats::FeatureStats::of_rows(data.n_features, data.rows());
        assert_eq!((stats.missing[0], stats.sum[0]), (2, 1.5));
        let norm = tessera_protocol::stats::Normalization::from_stats(&stats).unwrap();
        let standard = data.standardized(&norm);
        assert_eq!(standard.row(1)[0], 0.0);
        assert!(standard.features.iter().all(|f| f.is_finite()));
    }

    #[test]
    fn a_header_must_name_the_schema_columns_and_a_missing_file_is_named() {
        let mut schema = Schema::from_toml(SCHEMA).unwrap();
        schema.header = true;
        let read = |text: &str| read_csv_from(text.as_bytes(), Path::new("site.csv"), &schema);
        let (data, report) = read("a,c,skip,y\n1,2,x,0\n").unwrap();
        assert_eq!((data.len(), report.rows_read), (1, 1), "the header is not a row");
        let err = read("a,c,y,skip\n1,2,x,0\n").unwrap_err().to_string();
        assert_eq!(
            err,
            "site.csv: header does not match the schema: expected `a,c,skip,y`, found `a,c,y,skip`"
        );
        for missing in ["/nonexistent/site.csv", "/nonexistent/site.parquet"] {
            let err = read_table(Path::new(missing), &schema).unwrap_err();
            assert!(matches!(err, DataError::Io { .. }), "{err}");
            assert!(
                err.to_string().starts_with(&format!("cannot read {missing}: ")),
                "{err}"
            );
        }
    }

    #[test]
    fn malformed_cells_name_file_line_and_column() {
        let err = read("1,2,x,0\n1,abc,x,0\n").unwrap_err().to_string();
        assert_eq!(
            err,
            "site.csv:2: column 2 (`c`): `abc` is not one of the declared categories [\"1\", \"2\", \"3\"] \
             (map it, or set `other = true`)"
        );
        let err = read("1,2,x,0\n1,2,x,0\nzz,2,x,0\n").unwrap_err().to_string();
        assert_eq!(err, "site.csv:3: column 1 (`a`): `zz` is not a number");
        let err = read("1,2,x,0\n1,2,x,inf\n").unwrap_err().to_string();
        assert_eq!(err, "site.csv:2: column 4 (`y`): `inf` is not a finite number");
        let err = read("1,2,x\n").unwrap_err().to_string();
        assert_eq!(err, "site.csv:1: expected 4 fields, found 3");
    }

    /// What the coordinator and the ledger may be told names the schema's
    /// column and the kind of problem, and none of the cell, its line, the
    /// file's path or the file's own column names.
    #[test]
    fn the_public_reason_names_the_column_never_the_value_line_or_path() {
        let secret = "Smith-4711";
        let private_path = Path::new("/srv/ward-7/site.csv");
        let schema = Schema::from_toml(SCHEMA).unwrap();
        let rows = format!("1,2,x,0\n1,2,x,0\n1,2,x,0\n{secret},2,x,0\n");
        let err = read_csv_from(rows.as_bytes(), private_path, &schema).unwrap_err();
        assert!(
            err.to_string().contains(secret),
            "the site's own log names the value: {err}"
        );
        assert_eq!(err.public_reason(), "column `a` holds a value the schema cannot encode");
        let mut with_header = schema.clone();
        with_header.header = true;
        let header = "a,c,hiv_status_private,y\n1,2,x,0\n";
        let err = read_csv_from(header.as_bytes(), private_path, &with_header).unwrap_err();
        assert_eq!(err.public_reason(), "schema mismatch: column `skip` missing");
        let err = read_csv_from("a,c,y,skip\n".as_bytes(), private_path, &with_header).unwrap_err();
        assert!(
            err.public_reason()
                .starts_with("schema mismatch: the file's header differs"),
            "{err}"
        );
        let err = read_csv_from("1,2,x\n".as_bytes(), private_path, &schema).unwrap_err();
        assert_eq!(
            err.public_reason(),
            "a line of the data file has the wrong number of fields"
        );
        let err = read_csv_from("".as_bytes(), private_path, &schema).unwrap_err();
        assert_eq!(err.public_reason(), "the data file holds no data rows");
        let err = read_table(private_path, &schema).unwrap_err();
        assert_eq!(err.public_reason(), "the data file cannot be read");
    }

    proptest! {
        /// Whatever a malformed cell holds and wherever it is, the public
        /// reason is the same sentence about its column.
        #[test]
        fn a_malformed_cell_never_reaches_the_public_reason(cell in "[A-Za-z][A-Za-z0-9 ._-]{0,20}", line in 0usize..40) {
            let schema = Schema::from_toml(SCHEMA).unwrap();
            let mut rows = "1,2,x,0\n".repeat(line);
            rows.push_str(&format!("{cell},2,x,0\n"));
            let err = read_csv_from(rows.as_bytes(), Path::new("site.csv"), &schema).unwrap_err();
            let public = err.public_reason();
            prop_assert_eq!(public.as_str(), "column `a` holds a value the schema cannot encode");
        }
    }

    /// A binary (or non-UTF-8) file gets a sentence naming the line and the
    /// column, not a dump of the parser's internals.
    #[test]
    fn binary_input_is_named_not_dumped() {
        let err = read("1,2,x,0\n1,\u{0}\u{1}2,x,0\n").err();
        // NUL bytes are valid UTF-8: that row is a malformed category.
        assert!(err.is_some());
        let schema = Schema::from_toml(SCHEMA).unwrap();
        let bytes: &[u8] = b"1,2,x,0\n1,\xff\xfe,x,0\n";
        let err = read_csv_from(bytes, Path::new("site.csv"), &schema)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("site.csv:2: column 2 (`c`) is not UTF-8 text"), "{err}");
        assert!(!err.contains("Utf8Error") && !err.contains("Position"), "{err}");
    }

    /// Windows line endings count lines as Unix ones do.
    #[test]
    fn crlf_line_numbers() {
        let err = read("1,2,x,0\r\n1,2,x,0\r\n1,abc,x,0\r\n").unwrap_err().to_string();
        assert!(err.starts_with("site.csv:3: column 2 (`c`)"), "{err}");
        let err = read("1,2,x,0\r\n\r\n1,2,x\r\n").unwrap_err().to_string();
        assert_eq!(err, "site.csv:3: expected 4 fields, found 3");
        // The `\r` never reaches a value: a CRLF file reads as its LF twin.
        let mut schema = Schema::from_toml(SCHEMA).unwrap();
        schema.header = true;
        let crlf = read_csv_from(
            "a,c,skip,y\r\n1,2,x,0\r\n2,3,x,1\r\n".as_bytes(),
            Path::new("f"),
            &schema,
        )
        .unwrap();
        let lf = read_csv_from("a,c,skip,y\n1,2,x,0\n2,3,x,1\n".as_bytes(), Path::new("f"), &schema).unwrap();
        assert_eq!(crlf.0, lf.0);
        assert_eq!(crlf.0.len(), 2);
    }

    /// Nothing to train on is an error that says why, never an empty dataset.
    #[test]
    fn a_file_without_usable_rows_is_an_error() {
        for empty in ["", "\n", "\n\n"] {
            assert_eq!(
                read(empty).unwrap_err().to_string(),
                "site.csv: no usable rows: the file holds no data rows (it is empty or only a header)"
            );
        }
        assert_eq!(
            read("?,1,x,3\n0,3,x,1\n").unwrap_err().to_string(),
            "site.csv: no usable rows: all 2 data rows were dropped for missing values"
        );
        let mut schema = Schema::from_toml(SCHEMA).unwrap();
        schema.header = true;
        let err = read_csv_from("a,c,skip,y\n".as_bytes(), Path::new("site.csv"), &schema).unwrap_err();
        assert!(matches!(err, DataError::NoRows { rows_read: 0, .. }), "{err}");
    }

    #[test]
    fn split_is_deterministic_and_sized_like_flamby() {
        let text: String = (1..=303).map(|i| format!("{i},1,x,{}\n", i % 2)).collect();
        let (data, _) = read(&text).unwrap();
        let schema = Schema::from_toml(SCHEMA).unwrap();
        let (train, test) = data.split(&schema.split);
        assert_eq!((train.len(), test.len()), (199, 104));
        assert_eq!(data.split(&schema.split), (train.clone(), test.clone()));
        let other = data.split(&SplitSpec {
            seed: 7,
            ..schema.split.clone()
        });
        assert_ne!(other.1, test);
        // Train and test partition the rows (first feature is the 1-based row number).
        let mut seen: Vec<f32> = train.rows().chain(test.rows()).map(|r| r[0]).collect();
        seen.sort_by(f32::total_cmp);
        assert_eq!(seen, (1..=303).map(|i| i as f32).collect::<Vec<_>>());
    }

    proptest! {
        /// The reader never panics, whatever bytes a file holds.
        #[test]
        fn reader_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
            let schema = Schema::from_toml(SCHEMA).unwrap();
            let _ = read_csv_from(bytes.as_slice(), Path::new("f"), &schema);
        }

        #[test]
        fn split_sizes(n in 1usize..400, frac in 0.01f64..0.99) {
            let data = Dataset { features: (0..n).map(|i| i as f32).collect(), labels: vec![0.0; n], ..Dataset::empty(1) };
            let (train, test) = data.split(&SplitSpec { test_fraction: frac, seed: 1, group_by: None });
            prop_assert_eq!(train.len() + test.len(), n);
            prop_assert!((test.len() as f64) >= frac * n as f64 - 1e-6);
            prop_assert!((test.len() as f64) < frac * n as f64 + 1.0);
        }
    }
}
