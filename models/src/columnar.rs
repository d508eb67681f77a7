//! Reading a site's Parquet file through its [`Schema`]: the same rows, the
//! same missing-value rules and the same errors as a CSV file of the same
//! table (both go through [`RowEncoder`]).
//!
//! Only the schema's columns are read (a column projection), in record
//! batches of [`BATCH_ROWS`] rows, so the file itself is never held whole.
//! Columns are found by name: the file may hold more columns, in any order.
//! A null is a missing value; numbers and booleans are numbers; strings
//! (plain or dictionary-encoded) are text, parsed as a CSV cell would be.

use std::path::Path;

use arrow_array::cast::AsArray;
use arrow_array::types::Float64Type;
use arrow_array::{Array, ArrayRef, Float64Array, RecordBatch, StringArray};
use arrow_schema::DataType;
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::{ArrowReaderOptions, ParquetRecordBatchReaderBuilder};

use crate::data::{
    Cell, ColumnBatch, DataError, Dataset, ReadReport, RowEncoder, Visit, label_of, number, proposed_text,
};
use crate::schema::{ColumnKind, LabelRule, Schema};

/// Rows per record batch: a few MiB for a wide clinical table.
pub const BATCH_ROWS: usize = 8192;

/// Reads and encodes a Parquet file with `schema`.
pub fn read_parquet(path: &Path, schema: &Schema) -> Result<(Dataset, ReadReport), DataError> {
    read_parquet_batched(path, schema, BATCH_ROWS)
}

fn read_parquet_batched(path: &Path, schema: &Schema, batch_rows: usize) -> Result<(Dataset, ReadReport), DataError> {
    crate::data::collect(|visit| scan_parquet(path, schema, batch_rows, visit), schema)
}

/// The `parquet` crate's decoders can panic on damaged data (an RLE run
/// past its buffer, found by `damaged_files_never_panic`): a damaged file
/// is an error like any other, not a crashed daemon. Nothing outlives the
/// read, so a panic leaves no broken state behind.
/// One pass over a Parquet file in record batches of `batch_rows` rows
/// (`data::scan_table`).
pub(crate) fn scan_parquet(
    path: &Path,
    schema: &Schema,
    batch_rows: usize,
    visit: Visit,
) -> Result<ReadReport, DataError> {
    let batch_rows = batch_rows.clamp(1, BATCH_ROWS);
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| decode(path, schema, batch_rows, visit))).unwrap_or_else(
        |panic| {
            let detail = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            Err(DataError::Parquet {
                file: path.to_owned(),
                reason: format!("the file is damaged (the decoder failed: {detail})"),
            })
        },
    )
}

fn decode(path: &Path, schema: &Schema, batch_rows: usize, visit: Visit) -> Result<ReadReport, DataError> {
    let unreadable = |reason: String| DataError::Parquet {
        file: path.to_owned(),
        reason,
    };
    let file = std::fs::File::open(path).map_err(|source| DataError::Io {
        file: path.to_owned(),
        source,
    })?;
    // The types come from the Parquet schema itself: the Arrow schema some
    // writers embed is IPC-encoded metadata whose decoder panics on a
    // damaged file (found by `damaged_files_never_panic`), and nothing here
    // needs its hints.
    let options = ArrowReaderOptions::new().with_skip_arrow_metadata(true);
    let builder =
        ParquetRecordBatchReaderBuilder::try_new_with_options(file, options).map_err(|e| unreadable(e.to_string()))?;
    let fields = builder.schema().fields().clone();
    let mut projected = Vec::new();
    for column in schema.columns.iter().filter(|c| c.kind != ColumnKind::Drop) {
        let index = fields
            .iter()
            .position(|f| f.name() == &column.name)
            .ok_or_else(|| DataError::MissingColumn {
                file: path.to_owned(),
                name: column.name.clone(),
                found: fields.iter().map(|f| f.name().as_str()).collect::<Vec<_>>().join(", "),
            })?;
        projected.push(index);
    }
    let mask = ProjectionMask::roots(builder.parquet_schema(), projected);
    let batches = builder
        .with_projection(mask)
        .with_batch_size(batch_rows)
        .build()
        .map_err(|e| unreadable(e.to_string()))?;
    encode_batches(
        path,
        schema,
        batches.map(|b| b.map_err(|e| unreadable(e.to_string()))),
        visit,
    )
}

/// Encodes Arrow record batches with `schema` and hands each batch's rows to
/// `visit`: how a Parquet file and a SQL cohort's result (`cohort`) become
/// rows alike. Columns are found by name in each batch; `origin` names the
/// source in errors, and a bad row by its place in the whole stream.
pub(crate) fn encode_batches(
    origin: &Path,
    schema: &Schema,
    batches: impl Iterator<Item = Result<RecordBatch, DataError>>,
    visit: Visit,
) -> Result<ReadReport, DataError> {
    let mut rows = RowEncoder::new(schema);
    let mut rows_before = 0;
    for batch in batches {
        let batch = batch?;
        let views = schema
            .columns
            .iter()
            .map(|column| match (&column.kind, batch.column_by_name(&column.name)) {
                (ColumnKind::Drop, _) => Ok(View::Absent),
                (_, None) => Err(DataError::MissingColumn {
                    file: origin.to_owned(),
                    name: column.name.clone(),
                    found: batch
                        .schema()
                        .fields()
                        .iter()
                        .map(|f| f.name().as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                }),
                (kind, Some(array)) => View::of(origin, &column.name, kind, array),
            })
            .collect::<Result<Vec<_>, _>>()?;
        match encode_columns(&rows, schema, &views, batch.num_rows()) {
            Some(encoded) => rows.commit(encoded),
            None => {
                for row in 0..batch.num_rows() {
                    rows.push(views.iter().map(|v| v.cell(row)))
                        .map_err(|(index, reason)| DataError::MalformedRow {
                            file: origin.to_owned(),
                            row: (rows_before + row + 1) as u64,
                            name: schema.columns[index].name.clone(),
                            reason,
                        })?;
                }
            }
        }
        rows_before += batch.num_rows();
        if rows.pending() > 0 && visit(rows.take()).is_break() {
            return Ok(rows.report());
        }
    }
    rows.finish(origin)
}

/// Encodes a batch column by column: each column's values are read in one
/// loop (a Parquet file's layout), instead of one cell of every column per
/// row; typed numbers without a parse. Gives what pushing the rows one by
/// one gives, or `None` at a malformed cell, which the row path then names
/// (the first one in file order).
fn encode_columns(rows: &RowEncoder, schema: &Schema, views: &[View], n: usize) -> Option<ColumnBatch> {
    let mut batch = rows.start_batch(n);
    let numeric_label = matches!(schema.label, LabelRule::Compare { .. });
    // The block's numeric columns without missing values: copied together.
    let mut plain: Vec<(usize, &[f64])> = Vec::new();
    // Rows in blocks whose encoded features stay in the core's cache while
    // every column writes its values into them.
    for start in (0..n).step_by(ENCODE_BLOCK_ROWS) {
        let block = start..(start + ENCODE_BLOCK_ROWS).min(n);
        plain.clear();
        for (index, ((column, view), slot)) in schema.columns.iter().zip(views).zip(rows.slots()).enumerate() {
            let Some(used) = slot.used else { continue };
            match (view, &column.kind) {
                // The common case, a numeric column without missing values:
                // one check of the block, then a copy with the others.
                (View::Numbers(values), ColumnKind::Numeric)
                    if values.null_count() == 0
                        && !column.zero_means_missing
                        && all_finite(&values.values()[block.clone()]) =>
                {
                    plain.push((slot.offset, &values.values()[block.clone()]));
                }
                (View::Numbers(values), ColumnKind::Numeric) | (View::Numbers(values), ColumnKind::Label)
                    if column.kind == ColumnKind::Numeric || numeric_label =>
                {
                    for r in block.clone() {
                        let v = values.value(r);
                        if values.is_null(r) || (column.zero_means_missing && v == 0.0) {
                            batch.missing(used, r, slot);
                            continue;
                        }
                        if !v.is_finite() {
                            return None;
                        }
                        if column.kind == ColumnKind::Numeric {
                            *batch.feature(r, slot.offset) = v as f32;
                        } else {
                            batch.labels[r] = label_of(&schema.label, Cell::Number(v)).ok()?;
                        }
                    }
                }
                _ => {
                    for r in block.clone() {
                        let cell = view.cell(r);
                        if rows.is_missing(column, cell) {
                            batch.missing(used, r, slot);
                            continue;
                        }
                        match column.kind {
                            ColumnKind::Numeric => *batch.feature(r, slot.offset) = number(cell).ok()? as f32,
                            ColumnKind::Categorical { .. } => {
                                let hit = slot.category(cell).ok()?;
                                if Some(hit) == slot.other() {
                                    batch.other[used] += 1;
                                    if slot.discover {
                                        batch.discovered.push((index, r, proposed_text(cell).into_owned()));
                                    }
                                }
                                *batch.feature(r, slot.offset + hit) = 1.0;
                            }
                            ColumnKind::Label => batch.labels[r] = label_of(&schema.label, cell).ok()?,
                            ColumnKind::Id => batch.groups[r] = rows.group_of(cell),
                            ColumnKind::Drop => unreachable!("dropped columns are not used"),
                        }
                    }
                }
            }
        }
        batch.copy_columns(block, &plain);
    }
    Some(batch)
}

/// Whether every value is finite, in one branch-free pass the compiler
/// vectorises (an early exit per value made this check a tenth of a pass).
fn all_finite(values: &[f64]) -> bool {
    values.iter().fold(true, |all, v| all & v.is_finite())
}

/// Rows encoded together by [`encode_columns`]: 256 rows of a 131-feature
/// table are 134 KiB, within a core's L2 cache.
const ENCODE_BLOCK_ROWS: usize = 256;

/// One column of a batch, cast once to what the encoder reads.
enum View {
    Numbers(Float64Array),
    Texts(StringArray),
    /// A dropped column: never read.
    Absent,
}

impl View {
    fn of(path: &Path, name: &str, kind: &ColumnKind, array: &ArrayRef) -> Result<Self, DataError> {
        let data_type = array.data_type();
        let text = |t: &DataType| matches!(t, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View);
        let is_text = text(data_type) || matches!(data_type, DataType::Dictionary(_, v) if text(v));
        let is_number = data_type.is_numeric() || *data_type == DataType::Boolean;
        let wrong_type = || DataError::ColumnType {
            file: path.to_owned(),
            name: name.to_owned(),
            found: data_type.to_string(),
            wanted: match kind {
                ColumnKind::Categorical { .. } => "categories",
                _ => "numbers",
            },
        };
        let target = if *kind == ColumnKind::Id && (is_number || is_text) {
            // An id is read as text, so a 64-bit integer id stays exact.
            DataType::Utf8
        } else if is_number {
            DataType::Float64
        } else if is_text {
            DataType::Utf8
        } else {
            return Err(wrong_type());
        };
        let cast = arrow_cast::cast(array, &target).map_err(|_| wrong_type())?;
        Ok(if target == DataType::Float64 {
            View::Numbers(cast.as_primitive::<Float64Type>().clone())
        } else {
            View::Texts(cast.as_string::<i32>().clone())
        })
    }

    fn cell(&self, row: usize) -> Cell<'_> {
        match self {
            View::Numbers(a) if a.is_valid(row) => Cell::Number(a.value(row)),
            View::Texts(a) if a.is_valid(row) => Cell::Text(a.value(row).trim()),
            _ => Cell::Missing,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use arrow_array::{
        BinaryArray, DictionaryArray, Float64Array, Int32Array, Int64Array, RecordBatch, StringArray, types::Int32Type,
    };
    use parquet::arrow::ArrowWriter;
    use proptest::prelude::*;

    use super::*;
    use crate::data::read_csv_from;
    use crate::data::tests::SCHEMA;

    fn schema() -> Schema {
        Schema::from_toml(SCHEMA).unwrap()
    }

    fn write(dir: &Path, columns: Vec<(&str, ArrayRef)>) -> std::path::PathBuf {
        let path = dir.join("site.parquet");
        let batch = RecordBatch::try_from_iter(columns).unwrap();
        let mut writer = ArrowWriter::try_new(std::fs::File::create(&path).unwrap(), batch.schema(), None).unwrap();
        writer.write(&batch).unwrap();
        writer.close().unwrap();
        path
    }

    fn csv(text: &str) -> (Dataset, ReadReport) {
        read_csv_from(text.as_bytes(), Path::new("site.csv"), &schema()).unwrap()
    }

    #[test]
    fn a_parquet_file_gives_the_rows_of_its_csv_twin() {
        let dir = tempfile::tempdir().unwrap();
        // Typed columns in another order, an extra column, no dropped
        // column, nulls for missing values.
        let path = write(
            dir.path(),
            vec![
                ("y", Arc::new(Int32Array::from(vec![0, 2, 3, 1, 2])) as ArrayRef),
                ("extra", Arc::new(StringArray::from(vec!["p", "q", "r", "s", "t"]))),
                (
                    "a",
                    Arc::new(Float64Array::from(vec![
                        Some(1.5),
                        None,
                        Some(0.0),
                        Some(-2.0),
                        Some(4.0),
                    ])),
                ),
                (
                    "c",
                    Arc::new(Int64Array::from(vec![Some(2), Some(1), Some(3), Some(3), None])),
                ),
            ],
        );
        let (data, report) = read_parquet(&path, &schema()).unwrap();
        let (twin, twin_report) = csv("1.5,2,x,0\n?,1,x,2\n0,3,x,3\n-2,3,x,1\n4,,x,2\n");
        assert_eq!(data, twin);
        assert_eq!(report, twin_report);
        assert_eq!(data.labels, vec![0.0, 1.0]);
        assert_eq!(
            report.missing_per_column,
            vec![("a".into(), 2), ("c".into(), 1), ("y".into(), 0)]
        );
    }

    #[test]
    fn strings_and_dictionaries_are_read_as_text_cells() {
        let dir = tempfile::tempdir().unwrap();
        let c: DictionaryArray<Int32Type> = vec!["3", "1", "2.0"].into_iter().collect();
        let path = write(
            dir.path(),
            vec![
                ("a", Arc::new(StringArray::from(vec![" 7 ", "?", "8"])) as ArrayRef),
                ("c", Arc::new(c)),
                ("y", Arc::new(StringArray::from(vec!["2", "0", "5"]))),
            ],
        );
        let (data, report) = read_parquet(&path, &schema()).unwrap();
        assert_eq!((data, report), csv("7,3,x,2\n?,1,x,0\n8,2.0,x,5\n"));
    }

    #[test]
    fn bad_files_are_named_with_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let schema = schema();
        let ints = |v: Vec<i64>| Arc::new(Int64Array::from(v)) as ArrayRef;

        let path = write(dir.path(), vec![("a", ints(vec![1])), ("y", ints(vec![1]))]);
        let err = read_parquet(&path, &schema).unwrap_err().to_string();
        assert!(
            err.ends_with("site.parquet: the schema's column `c` is missing (its columns: a, y)"),
            "{err}"
        );

        let path = write(
            dir.path(),
            vec![
                ("a", ints(vec![1, 2])),
                ("c", ints(vec![1, 7])),
                ("y", ints(vec![0, 1])),
            ],
        );
        let err = read_parquet(&path, &schema).unwrap_err().to_string();
        assert!(
            err.ends_with(
                "site.parquet: row 2, column `c`: `7` is not one of the declared categories [\"1\", \"2\", \"3\"] \
                 (map it, or set `other = true`)"
            ),
            "{err}"
        );

        let path = write(
            dir.path(),
            vec![
                ("a", Arc::new(BinaryArray::from(vec![&b"\x00"[..]])) as ArrayRef),
                ("c", ints(vec![1])),
                ("y", ints(vec![1])),
            ],
        );
        let err = read_parquet(&path, &schema).unwrap_err().to_string();
        assert!(
            err.ends_with("site.parquet: column `a` holds Binary values, which cannot be read as numbers"),
            "{err}"
        );

        let path = write(
            dir.path(),
            vec![
                ("a", ints(vec![1])),
                ("c", ints(vec![1])),
                ("y", Arc::new(Float64Array::from(vec![f64::NAN]))),
            ],
        );
        let err = read_parquet(&path, &schema).unwrap_err().to_string();
        assert!(
            err.ends_with("site.parquet: row 1, column `y`: `NaN` is not a finite number"),
            "{err}"
        );

        let path = write(
            dir.path(),
            vec![("a", ints(vec![])), ("c", ints(vec![])), ("y", ints(vec![]))],
        );
        assert!(matches!(
            read_parquet(&path, &schema),
            Err(DataError::NoRows { rows_read: 0, .. })
        ));

        let path = dir.path().join("text.parquet");
        std::fs::write(&path, "a,c,skip,y\n1,2,x,0\n").unwrap();
        let err = read_parquet(&path, &schema).unwrap_err().to_string();
        assert!(err.contains("text.parquet: cannot be read as Parquet: "), "{err}");
    }

    #[test]
    fn read_table_reads_by_extension() {
        let dir = tempfile::tempdir().unwrap();
        let ints = |v: Vec<i64>| Arc::new(Int64Array::from(v)) as ArrayRef;
        let parquet = write(
            dir.path(),
            vec![("a", ints(vec![5])), ("c", ints(vec![2])), ("y", ints(vec![2]))],
        );
        let pq = dir.path().join("site.PQ");
        std::fs::copy(&parquet, &pq).unwrap();
        let text = dir.path().join("site.data");
        std::fs::write(&text, "5,2,x,2\n").unwrap();
        let from_csv = crate::data::read_table(&text, &schema()).unwrap();
        assert_eq!(crate::data::read_table(&parquet, &schema()).unwrap(), from_csv);
        assert_eq!(crate::data::read_table(&pq, &schema()).unwrap(), from_csv);
    }

    /// A generated row: `a`, the category of `c`, `y`.
    type Row = (Option<f64>, u8, Option<f64>);

    /// A cell of a generated table: a number, or missing in one of the ways
    /// a file can say so.
    fn cell() -> impl Strategy<Value = Option<f64>> {
        prop_oneof![
            4 => (-1000i32..1000).prop_map(|v| Some(f64::from(v) / 8.0)),
            1 => Just(None),
        ]
    }

    proptest! {
        /// Any table, written as CSV and as Parquet (typed numbers with
        /// nulls, and again as strings with the `?` marker), reads to the
        /// same rows and the same report, batch boundaries included.
        #[test]
        fn parquet_and_csv_agree(
            rows in prop::collection::vec((cell(), 1u8..4, cell()), 1..40),
            batch in 1usize..9,
            rules in (0usize..3, 0usize..3),
        ) {
            // Each feature column drops, imputes or flags its missing values.
            let rule = |k: usize| ["drop", "impute", "indicator"][k];
            let schema = Schema::from_toml(
                &SCHEMA
                    .replace("zero_means_missing = true", &format!("zero_means_missing = true\nmissing = \"{}\"", rule(rules.0)))
                    .replace("categories = [\"1\", \"2\", \"3\"]", &format!("categories = [\"1\", \"2\", \"3\"]\nmissing = \"{}\"", rule(rules.1))),
            )
            .unwrap();
            let dir = tempfile::tempdir().unwrap();
            let text: String = rows
                .iter()
                .map(|(a, c, y)| {
                    let show = |v: &Option<f64>| v.map_or("?".to_owned(), |v| v.to_string());
                    format!("{},{c},x,{}\n", show(a), show(y))
                })
                .collect();
            let expected = read_csv_from(text.as_bytes(), Path::new("site.csv"), &schema);
            let a: Float64Array = rows.iter().map(|r| r.0).collect();
            let c: Int64Array = rows.iter().map(|r| Some(i64::from(r.1))).collect();
            let y: Float64Array = rows.iter().map(|r| r.2).collect();
            let path = write(dir.path(), vec![("a", Arc::new(a) as ArrayRef), ("c", Arc::new(c)), ("y", Arc::new(y))]);
            let typed = read_parquet_batched(&path, &schema, batch);
            let texts = |f: fn(&Row) -> Option<f64>| -> ArrayRef {
                Arc::new(StringArray::from_iter_values(
                    rows.iter().map(|r| f(r).map_or("?".to_owned(), |v| v.to_string())),
                ))
            };
            let path = write(
                dir.path(),
                vec![("a", texts(|r| r.0)), ("c", texts(|r| Some(f64::from(r.1)))), ("y", texts(|r| r.2))],
            );
            let as_text = read_parquet_batched(&path, &schema, batch);
            match expected {
                Ok(expected) => {
                    prop_assert_eq!(&typed.unwrap(), &expected);
                    prop_assert_eq!(&as_text.unwrap(), &expected);
                }
                Err(e) => {
                    fn no_rows<T>(r: &Result<T, DataError>) -> bool {
                        matches!(r, Err(DataError::NoRows { .. }))
                    }
                    prop_assert!(no_rows(&Err::<(), _>(e)));
                    prop_assert!(no_rows(&typed));
                    prop_assert!(no_rows(&as_text));
                }
            }
        }
    }

    /// Codes as a hospital extract holds them: a diagnosis column of ICD-9
    /// codes grouped into chapters (prefix, range, exact values) with an
    /// other bucket, `?` a legitimate category in one column and a missing
    /// marker in the others, and a text-coded outcome as the label.
    const CODED: &str = r#"
[format]
header = true
missing_markers = ["?"]
[label]
column = "readmitted"
positive_in = ["<30"]
negative_in = [">30", "NO"]
[split]
test_fraction = 0.25
[[column]]
name = "age"
kind = "numeric"
[[column]]
name = "diag"
kind = "categorical"
categories = ["diabetes", "circulatory", "injury"]
other = true
map = [
  { prefix = "250", to = "diabetes" },
  { range = [390, 459], to = "circulatory" },
  { values = ["E878", "E880"], to = "injury" },
]
[[column]]
name = "race"
kind = "categorical"
categories = ["A", "B", "?"]
missing_markers = ["NA"]
[[column]]
name = "readmitted"
kind = "label"
"#;

    /// A discovered column counts the values its other bucket takes (after
    /// the map), alike in CSV and Parquet; the categories a job forms from
    /// them then encode those values as their own features.
    #[test]
    fn a_discovered_column_counts_its_other_values_and_encodes_the_formed_categories() {
        let schema =
            Schema::from_toml(&CODED.replace("other = true", "other = true\ndiscover = true\ntop_k = 2")).unwrap();
        // `460.0` is `460`, as a category would match it; the rows without
        // an age are left out, and their codes do not count.
        let diag = [
            "250.01", "V45", "428", "V45", "460", "799", "V45", "460.0", "E880", "V45", "V10",
        ];
        let age = |i: usize| (i < 9).then_some(50.0);
        let text: String = std::iter::once("age,diag,race,readmitted\n".to_owned())
            .chain(diag.iter().enumerate().map(|(i, d)| {
                let age = age(i).map_or("?".to_owned(), |a| a.to_string());
                format!("{age},{d},A,NO\n")
            }))
            .collect();
        let (data, report) = read_csv_from(text.as_bytes(), Path::new("extract.csv"), &schema).unwrap();
        let counts: BTreeMap<String, u64> = [("V45", 3), ("460", 2), ("799", 1)]
            .into_iter()
            .map(|(v, n)| (v.to_owned(), n))
            .collect();
        assert_eq!(report.discovered, BTreeMap::from([("diag".to_owned(), counts)]));
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            vec![
                (
                    "age",
                    Arc::new(Float64Array::from_iter((0..diag.len()).map(age))) as ArrayRef,
                ),
                ("diag", Arc::new(StringArray::from_iter_values(diag))),
                ("race", Arc::new(StringArray::from_iter_values(diag.map(|_| "A")))),
                (
                    "readmitted",
                    Arc::new(StringArray::from_iter_values(diag.map(|_| "NO"))),
                ),
            ],
        );
        assert_eq!(read_parquet_batched(&path, &schema, 4).unwrap(), (data, report.clone()));

        // With k = 2, top_k = 2: V45 and 460; 799 stays in the other bucket.
        let discovered = schema.discovered();
        let proposal = tessera_protocol::discovery::propose(&discovered, &report.discovered, 2);
        let union: BTreeMap<String, Vec<String>> = discovered
            .iter()
            .map(|c| {
                let mut categories = c.declared.clone();
                categories.extend(proposal.columns[&c.column].iter().cloned());
                (c.column.clone(), categories)
            })
            .collect();
        assert_eq!(union["diag"], ["diabetes", "circulatory", "injury", "460", "V45"]);
        let resolved = schema.with_categories(&union);
        assert_ne!(resolved.features_hash(), schema.features_hash());
        assert_eq!(resolved.features_hash(), schema.with_categories(&union).features_hash());
        let (data, report) = read_csv_from(text.as_bytes(), Path::new("extract.csv"), &resolved).unwrap();
        assert_eq!(data.len(), 9);
        let diag_features: Vec<Vec<f32>> = data.rows().map(|row| row[1..7].to_vec()).collect();
        #[rustfmt::skip]
        assert_eq!(diag_features, [
            // diabetes, circulatory, injury, 460, V45, (other)
            [1.0, 0.0, 0.0, 0.0, 0.0, 0.0],
            [0.0, 0.0, 0.0, 0.0, 1.0, 0.0],
            [0.0, 1.0, 0.0, 0.0, 0.0, 0.0],
            [0.0, 0.0, 0.0, 0.0, 1.0, 0.0],
            [0.0, 0.0, 0.0, 1.0, 0.0, 0.0],
            [0.0, 0.0, 0.0, 0.0, 0.0, 1.0],
            [0.0, 0.0, 0.0, 0.0, 1.0, 0.0],
            [0.0, 0.0, 0.0, 1.0, 0.0, 0.0],
            [0.0, 0.0, 1.0, 0.0, 0.0, 0.0],
        ]);
        assert_eq!(report.discovered["diag"], BTreeMap::from([("799".to_owned(), 1)]));
    }

    #[test]
    fn codes_are_grouped_bucketed_and_labelled_by_value_alike_in_csv_and_parquet() {
        let schema = Schema::from_toml(CODED).unwrap();
        assert_eq!(
            schema.feature_names(),
            [
                "age",
                "diag=diabetes",
                "diag=circulatory",
                "diag=injury",
                "diag=(other)",
                "race=A",
                "race=B",
                "race=?"
            ]
        );
        let rows = [
            ("70", "250.01", "A", "<30"),
            ("55", "428", "?", "NO"),
            ("?", "428", "A", "NO"),      // `?` is missing in `age`
            ("61", "459.9", "NA", ">30"), // `NA` is missing in `race`
            ("40", "V45", "B", ">30"),    // no rule, no category: the other bucket
            ("33", "E880", "B", "<30"),
            ("80", "460", "?", "NO"), // past the circulatory range
        ];
        let text: String = std::iter::once("age,diag,race,readmitted\n".to_owned())
            .chain(rows.iter().map(|(a, d, r, y)| format!("{a},{d},{r},{y}\n")))
            .collect();
        let (data, report) = read_csv_from(text.as_bytes(), Path::new("extract.csv"), &schema).unwrap();
        #[rustfmt::skip]
        let expected: Vec<f32> = vec![
            70.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0,
            55.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0,
            40.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0,
            33.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0,
            80.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0,
        ];
        assert_eq!(data.features, expected);
        assert_eq!(data.labels, [1.0, 0.0, 0.0, 1.0, 0.0]);
        assert_eq!(report.missing_per_column[0], ("age".to_owned(), 1));
        assert_eq!(report.missing_per_column[2], ("race".to_owned(), 1));
        // V45 and 460, kept rows or not.
        assert_eq!(report.other_per_column, [("diag".to_owned(), 2)]);

        // The same extract as Parquet, typed: `age` as numbers (nulls for
        // `?`), the codes and outcome as text; batches of 3 rows.
        let dir = tempfile::tempdir().unwrap();
        let age: Float64Array = rows.iter().map(|r| r.0.parse::<f64>().ok()).collect();
        let texts = |f: fn(&(&'static str, &'static str, &'static str, &'static str)) -> &'static str| -> ArrayRef {
            Arc::new(StringArray::from_iter_values(rows.iter().map(f)))
        };
        let path = write(
            dir.path(),
            vec![
                ("age", Arc::new(age) as ArrayRef),
                ("diag", texts(|r| r.1)),
                ("race", texts(|r| r.2)),
                ("readmitted", texts(|r| r.3)),
            ],
        );
        assert_eq!(read_parquet_batched(&path, &schema, 3).unwrap(), (data, report));

        // A value outside both label lists, and a code no rule or category
        // takes without an other bucket, are named.
        let err = read_csv_from(
            "age,diag,race,readmitted\n1,250,A,maybe\n".as_bytes(),
            Path::new("x.csv"),
            &schema,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("x.csv:2") && err.contains("`maybe` is in neither positive_in"),
            "{err}"
        );
        let strict = Schema::from_toml(&CODED.replace("other = true", "")).unwrap();
        let err = read_csv_from(
            "age,diag,race,readmitted\n1,V45,A,NO\n".as_bytes(),
            Path::new("x.csv"),
            &strict,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("`V45` is not one of the declared categories") && err.contains("other = true"),
            "{err}"
        );
    }

    /// Whatever decides the encoded rows is in the features hash, so sites
    /// that disagree on it are told; the split is local and is not.
    #[test]
    fn the_features_hash_covers_the_encoding_and_the_label_rule() {
        let base = Schema::from_toml(CODED).unwrap().features_hash();
        for (from, to) in [
            ("positive_in = [\"<30\"]", "positive_in = [\"<30\", \"maybe\"]"),
            ("negative_in = [\">30\", \"NO\"]", "negative_in = [\"NO\"]"),
            ("prefix = \"250\"", "prefix = \"25\""),
            ("range = [390, 459]", "range = [390, 460]"),
            ("missing_markers = [\"NA\"]", "missing_markers = [\"N/A\"]"),
            ("missing_markers = [\"?\"]", "missing_markers = [\"?\", \"-\"]"),
            (
                "name = \"age\"\nkind = \"numeric\"",
                "name = \"age\"\nkind = \"numeric\"\nzero_means_missing = true",
            ),
            (
                "name = \"age\"\nkind = \"numeric\"",
                "name = \"age\"\nkind = \"numeric\"\nmissing = \"impute\"",
            ),
            ("[format]", "[format]\nmissing = \"impute\""),
        ] {
            let text = CODED.replace(from, to);
            assert_ne!(text, CODED, "{from}");
            assert_ne!(
                Schema::from_toml(&text).unwrap().features_hash(),
                base,
                "{from} -> {to}"
            );
        }
        let resplit = CODED.replace("test_fraction = 0.25", "test_fraction = 0.3\nseed = 9");
        assert_eq!(Schema::from_toml(&resplit).unwrap().features_hash(), base);
    }

    #[test]
    fn schema_v2_mistakes_are_named() {
        for (from, to, needle) in [
            (
                "to = \"injury\"",
                "to = \"injuries\"",
                "`to = \"injuries\"` is not a declared category",
            ),
            (
                "{ prefix = \"250\", to",
                "{ prefix = \"250\", range = [1, 2], to",
                "exactly one of",
            ),
            ("range = [390, 459]", "range = [459, 390]", "exactly one of"),
            (
                "categories = [\"A\", \"B\", \"?\"]",
                "categories = [\"A\", \"(other)\"]",
                "set `other = true`",
            ),
            (
                "positive_in = [\"<30\"]",
                "positive_in = [\"<30\"]\npositive_if = \"> 0\"",
                "not both",
            ),
            ("positive_in = [\"<30\"]", "positive_in = [\"NO\"]", "`NO` is in both"),
            ("positive_in = [\"<30\"]", "positive_in = []", "at least one value"),
            (
                "name = \"age\"\nkind = \"numeric\"",
                "name = \"age\"\nkind = \"numeric\"\nother = true",
                "`other` only applies",
            ),
            (
                "name = \"age\"\nkind = \"numeric\"",
                "name = \"age\"\nkind = \"numeric\"\nmissing = \"mean\"",
                "unknown missing rule `mean`; expected drop, impute or indicator",
            ),
            (
                "categories = [\"A\", \"B\", \"?\"]",
                "categories = [\"A\", \"(missing)\"]",
                "set `missing = \"indicator\"`",
            ),
            (
                "name = \"readmitted\"\nkind = \"label\"",
                "name = \"readmitted\"\nkind = \"label\"\nmissing = \"impute\"",
                "only applies to feature columns",
            ),
            (
                "[format]",
                "[format]\nmissing = \"zero\"",
                "format.missing: unknown missing rule",
            ),
        ] {
            let text = CODED.replace(from, to);
            assert_ne!(text, CODED, "{from}");
            let err = Schema::from_toml(&text).unwrap_err().to_string();
            assert!(err.contains(needle), "{from} -> {to}: {err}");
        }
    }

    /// Reads in batches of `rows` rows: rows straddle batch boundaries.
    fn read_parquet_in_batches(path: &Path, rows: usize) -> Result<(Dataset, ReadReport), DataError> {
        read_parquet_batched(path, &schema(), rows)
    }

    #[test]
    fn a_bad_row_is_named_by_its_place_in_the_file_not_in_its_batch() {
        let dir = tempfile::tempdir().unwrap();
        let ints = |v: Vec<i64>| Arc::new(Int64Array::from(v)) as ArrayRef;
        let path = write(
            dir.path(),
            vec![
                ("a", ints(vec![1, 2, 3, 4, 5])),
                ("c", ints(vec![1, 2, 3, 1, 9])),
                ("y", ints(vec![0, 1, 2, 3, 4])),
            ],
        );
        let err = read_parquet_in_batches(&path, 2).unwrap_err();
        assert!(matches!(err, DataError::MalformedRow { row: 5, .. }), "{err}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// A damaged file is an error, never a panic: a valid file with
        /// bytes flipped anywhere (footer and page headers included).
        #[test]
        fn damaged_files_never_panic(flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6)) {
            let dir = tempfile::tempdir().unwrap();
            let ints = |v: Vec<i64>| Arc::new(Int64Array::from(v)) as ArrayRef;
            let path = write(
                dir.path(),
                vec![("a", ints((1..50).collect())), ("c", ints(vec![2; 49])), ("y", ints((0..49).collect()))],
            );
            let mut bytes = std::fs::read(&path).unwrap();
            for (at, value) in &flips {
                let i = at.index(bytes.len());
                bytes[i] ^= value | 1;
            }
            std::fs::write(&path, &bytes).unwrap();
            let _ = read_parquet(&path, &schema());
        }
    }
}
