//! Reading a site's CSV file through its [`Schema`] into encoded rows (and,
//! through [`read_table`], a Parquet file: `crate::columnar`).
//!
//! The file is streamed record by record (never read whole), each cell is
//! checked, and the first malformed cell stops the read with an error naming
//! the file, the line and the column. Rows with a missing value in a used
//! column are dropped and counted per column, so `tessera-participant check`
//! can show the data team exactly what was left out.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use crate::schema::{ColumnKind, Schema};

/// Encoded rows of one site: features row-major, labels 0/1.
#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    pub n_features: usize,
    pub features: Vec<f32>,
    pub labels: Vec<f32>,
}

/// What reading a file found, besides the rows.
#[derive(Clone, Debug, PartialEq)]
pub struct ReadReport {
    pub rows_read: usize,
    pub rows_kept: usize,
    /// Missing cells per used column, in file order.
    pub missing_per_column: Vec<(String, usize)>,
}

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
    /// A column the schema uses is not in a (columnar) file.
    #[error("{}: the schema's column `{name}` is not in the file (its columns: {found})", file.display())]
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

fn no_rows_reason(rows_read: usize) -> String {
    if rows_read == 0 {
        "the file holds no data rows (it is empty or only a header)".to_owned()
    } else {
        format!("all {rows_read} data rows were dropped for missing values")
    }
}

impl Dataset {
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
        let mut features = Vec::with_capacity(indices.len() * self.n_features);
        let mut labels = Vec::with_capacity(indices.len());
        for &i in indices {
            features.extend_from_slice(self.row(i));
            labels.push(self.labels[i]);
        }
        Dataset {
            n_features: self.n_features,
            features,
            labels,
        }
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
    }

    /// Concatenation of several datasets of the same width.
    pub fn concat(parts: &[Dataset]) -> Dataset {
        let n_features = parts.first().map_or(0, |d| d.n_features);
        let mut out = Dataset {
            n_features,
            features: Vec::new(),
            labels: Vec::new(),
        };
        for part in parts {
            assert_eq!(part.n_features, n_features, "datasets of different widths");
            out.features.extend_from_slice(&part.features);
            out.labels.extend_from_slice(&part.labels);
        }
        out
    }
}

/// Reads and encodes a site's data file with `schema`: Parquet when its
/// name ends in `.parquet` or `.pq`, CSV otherwise.
pub fn read_table(path: &Path, schema: &Schema) -> Result<(Dataset, ReadReport), DataError> {
    collect(|visit| scan_table(path, schema, usize::MAX, visit), schema)
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
fn collect(
    pass: impl FnOnce(Visit) -> Result<ReadReport, DataError>,
    schema: &Schema,
) -> Result<(Dataset, ReadReport), DataError> {
    let mut rows = Dataset {
        n_features: schema.feature_names().len(),
        features: Vec::new(),
        labels: Vec::new(),
    };
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
    /// Rows encoded since the last `take`.
    dataset: Dataset,
    rows_kept: usize,
    /// Missing cells per used column, in schema order.
    missing_per_column: Vec<(String, usize)>,
    rows_read: usize,
    encoded: Vec<f32>,
}

impl<'s> RowEncoder<'s> {
    pub(crate) fn new(schema: &'s Schema) -> Self {
        let n_features = schema.feature_names().len();
        Self {
            schema,
            dataset: Dataset {
                n_features,
                features: Vec::new(),
                labels: Vec::new(),
            },
            missing_per_column: schema
                .columns
                .iter()
                .filter(|c| c.kind != ColumnKind::Drop)
                .map(|c| (c.name.clone(), 0))
                .collect(),
            rows_read: 0,
            rows_kept: 0,
            encoded: Vec::with_capacity(n_features),
        }
    }

    /// Encodes one row, given one cell per schema column (those of dropped
    /// columns are ignored). A row with a missing cell in a used column is
    /// counted and left out; a malformed cell is an error: the index of its
    /// column and why.
    pub(crate) fn push<'c>(&mut self, cells: impl Iterator<Item = Cell<'c>>) -> Result<(), (usize, String)> {
        self.rows_read += 1;
        self.encoded.clear();
        let mut label = None;
        let mut row_missing = false;
        let mut used_index = 0;
        for (index, (column, cell)) in self.schema.columns.iter().zip(cells).enumerate() {
            if column.kind == ColumnKind::Drop {
                continue;
            }
            let is_missing = match cell {
                Cell::Missing => true,
                Cell::Text(text) => {
                    text.is_empty()
                        || self.schema.missing_markers.iter().any(|m| m == text)
                        || (column.zero_means_missing && text.parse::<f64>() == Ok(0.0))
                }
                Cell::Number(value) => column.zero_means_missing && value == 0.0,
            };
            if is_missing {
                self.missing_per_column[used_index].1 += 1;
                row_missing = true;
                used_index += 1;
                continue;
            }
            used_index += 1;
            let malformed = |reason: String| (index, reason);
            match &column.kind {
                ColumnKind::Numeric => {
                    let value = number(cell).map_err(malformed)?;
                    self.encoded.push(value as f32);
                }
                ColumnKind::Categorical { categories } => {
                    let hit = categories.iter().position(|c| same_category(c, cell)).ok_or_else(|| {
                        malformed(format!(
                            "`{}` is not one of the declared categories {categories:?}",
                            shown(cell)
                        ))
                    })?;
                    self.encoded
                        .extend((0..categories.len()).map(|k| if k == hit { 1.0 } else { 0.0 }));
                }
                ColumnKind::Label => {
                    let value = number(cell).map_err(malformed)?;
                    let rule = &self.schema.label;
                    label = Some(if rule.op.holds(value, rule.threshold) { 1.0 } else { 0.0 });
                }
                ColumnKind::Drop => unreachable!("skipped above"),
            }
        }
        if !row_missing {
            // The schema has exactly one label column and no missing cell was
            // seen, so the label is set.
            self.dataset.labels.push(label.expect("label column present"));
            self.dataset.features.extend_from_slice(&self.encoded);
            self.rows_kept += 1;
        }
        Ok(())
    }

    /// Rows encoded and not yet taken.
    pub(crate) fn pending(&self) -> usize {
        self.dataset.len()
    }

    /// The rows encoded since the last call.
    pub(crate) fn take(&mut self) -> Dataset {
        let empty = Dataset {
            n_features: self.dataset.n_features,
            features: Vec::new(),
            labels: Vec::new(),
        };
        std::mem::replace(&mut self.dataset, empty)
    }

    /// What the pass found so far.
    pub(crate) fn report(&self) -> ReadReport {
        ReadReport {
            rows_read: self.rows_read,
            rows_kept: self.rows_kept,
            missing_per_column: self.missing_per_column.clone(),
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

fn number(cell: Cell) -> Result<f64, String> {
    match cell {
        Cell::Text(text) => parse_number(text),
        Cell::Number(v) if v.is_finite() => Ok(v),
        Cell::Number(v) => Err(format!("`{v}` is not a finite number")),
        Cell::Missing => unreachable!("missing cells are counted, not encoded"),
    }
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

/// Categories match as numbers when both are numbers (`1.0` is `1`), else
/// as text.
fn same_category(declared: &str, cell: Cell) -> bool {
    match (declared.parse::<f64>(), cell) {
        (Ok(a), Cell::Number(b)) => a == b,
        (Err(_), Cell::Number(_)) | (_, Cell::Missing) => false,
        (Ok(a), Cell::Text(text)) => text.parse::<f64>().map_or(declared == text, |b| a == b),
        (Err(_), Cell::Text(text)) => declared == text,
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
            "site.csv:2: column 2 (`c`): `abc` is not one of the declared categories [\"1\", \"2\", \"3\"]"
        );
        let err = read("1,2,x,0\n1,2,x,0\nzz,2,x,0\n").unwrap_err().to_string();
        assert_eq!(err, "site.csv:3: column 1 (`a`): `zz` is not a number");
        let err = read("1,2,x,0\n1,2,x,inf\n").unwrap_err().to_string();
        assert_eq!(err, "site.csv:2: column 4 (`y`): `inf` is not a finite number");
        let err = read("1,2,x\n").unwrap_err().to_string();
        assert_eq!(err, "site.csv:1: expected 4 fields, found 3");
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
            ..schema.split
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
            let data = Dataset { n_features: 1, features: (0..n).map(|i| i as f32).collect(), labels: vec![0.0; n] };
            let (train, test) = data.split(&SplitSpec { test_fraction: frac, seed: 1 });
            prop_assert_eq!(train.len() + test.len(), n);
            prop_assert!((test.len() as f64) >= frac * n as f64 - 1e-6);
            prop_assert!((test.len() as f64) < frac * n as f64 + 1.0);
        }
    }
}
