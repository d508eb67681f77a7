//! A site's cohort as SQL over its own files, run by an embedded Apache
//! DataFusion: joins of an encounters table with a diagnoses table,
//! `ROW_NUMBER() OVER (PARTITION BY patient ORDER BY admitted) = 1` to keep a
//! patient's first encounter, filters, derived columns and label expressions,
//! without a database to run or a preprocessing step outside Tessera.
//!
//! The query's text and the files it reads are in the site's own config:
//! they never leave the site. What every site must agree on, the result's
//! columns and their encoding, is the consortium schema (and its features
//! hash), so a site with SQL and a site with a flat file train the same
//! model.
//!
//! Each pass runs the query again and streams its result in record batches
//! into the encoder a Parquet file goes through (`columnar`), on a thread of
//! its own with a small runtime, over a channel of two batches: the site
//! holds one batch of the result at a time, plus what the query itself must
//! hold (a join's build side, a window's sort), which is capped by
//! [`SqlCohort::memory_mib`] and spills to disk where DataFusion can. The
//! query runs on one partition, so its rows come in one order on every pass;
//! the split is still a keyed hash of an id (`[split] group_by`), as for any
//! query source.
//!
//! Only a query runs: DataFusion's statements that define tables, write
//! files (`COPY ... TO`) or change settings are refused, as a PostgreSQL
//! source runs in a read-only transaction.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{SyncSender, sync_channel};

use arrow_array::RecordBatch;
use datafusion::execution::context::SQLOptions;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::prelude::{CsvReadOptions, ParquetReadOptions, SessionConfig, SessionContext};
use futures::StreamExt;

use crate::data::{DataError, ReadReport, Visit};
use crate::schema::Schema;

/// Rows a CSV table's column types are inferred from: a code column whose
/// first thousand values look numeric ("250.01") and a later one does not
/// ("V45") would otherwise fail the pass far into the file.
const INFER_ROWS: usize = 100_000;

/// A site's cohort: a query over named tables, each one CSV or Parquet file.
#[derive(Clone, Debug, PartialEq)]
pub struct SqlCohort {
    /// Table name → file, as the query names them.
    pub tables: Vec<(String, PathBuf)>,
    /// The cohort's `SELECT` (DataFusion's SQL dialect).
    pub query: String,
    /// Memory the query may hold (a join's build side, a sort); past it a
    /// sort spills to a temporary file and a join fails with a clear error
    /// instead of the daemon being killed.
    pub memory_mib: u64,
}

impl SqlCohort {
    /// How errors and `check` name this source.
    pub fn label(&self) -> String {
        let tables = self
            .tables
            .iter()
            .map(|(name, path)| format!("{name} = {}", path.display()))
            .collect::<Vec<_>>()
            .join(", ");
        format!("the site's cohort query over {tables}")
    }

    fn error(&self, reason: impl std::fmt::Display) -> DataError {
        DataError::Query {
            source_label: self.label(),
            reason: reason.to_string(),
        }
    }
}

/// One pass over the cohort, as `data::scan_table` makes over a file.
pub(crate) fn scan_sql(
    cohort: &SqlCohort,
    schema: &Schema,
    batch_rows: usize,
    visit: Visit,
) -> Result<ReadReport, DataError> {
    let origin = PathBuf::from(cohort.label());
    let batch_rows = batch_rows.clamp(1, crate::columnar::BATCH_ROWS);
    let (sender, batches) = sync_channel::<Result<RecordBatch, DataError>>(2);
    let worker = {
        let owned = cohort.clone();
        std::thread::Builder::new()
            .name("tessera-cohort".into())
            .spawn(move || run_query(&owned, batch_rows, &sender))
            .map_err(|e| cohort.error(format!("cannot start the query: {e}")))?
    };
    let mut stopped = false;
    let result = crate::columnar::encode_batches(&origin, schema, batches.iter(), &mut |rows| {
        let flow = visit(rows);
        stopped |= flow.is_break();
        flow
    });
    // Dropping the receiver ends a pass that stopped early (or failed): the
    // worker's next send fails and it stops.
    drop(batches);
    if worker.join().is_err() && !stopped {
        // The channel closed as at the end of the result: never take the
        // rows so far (or none) for the whole cohort.
        return Err(cohort.error("the query failed before the end of its result"));
    }
    result
}

/// The worker: runs the query and sends its batches until the result ends,
/// the receiver hangs up, or an error (which it sends).
fn run_query(cohort: &SqlCohort, batch_rows: usize, sender: &SyncSender<Result<RecordBatch, DataError>>) {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            let _ = sender.send(Err(cohort.error(format!("cannot start the query: {e}"))));
            return;
        }
    };
    if let Err(e) = runtime.block_on(stream(cohort, batch_rows, sender)) {
        let _ = sender.send(Err(e));
    }
}

async fn stream(
    cohort: &SqlCohort,
    batch_rows: usize,
    sender: &SyncSender<Result<RecordBatch, DataError>>,
) -> Result<(), DataError> {
    let context = session(cohort)?;
    for (name, path) in &cohort.tables {
        register(&context, cohort, name, path).await?;
    }
    let read_only = SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false);
    let frame = context
        .sql_with_options(&cohort.query, read_only)
        .await
        .map_err(|e| cohort.error(format!("the query cannot run: {}", message(&e))))?;
    let mut batches = frame
        .execute_stream()
        .await
        .map_err(|e| cohort.error(format!("the query failed: {}", message(&e))))?;
    while let Some(batch) = batches.next().await {
        let batch = batch.map_err(|e| cohort.error(format!("the query failed: {}", message(&e))))?;
        // A join or a sort may hand over more rows than asked for: the pass
        // gets at most `batch_rows` at a time (slices share the buffers).
        for start in (0..batch.num_rows()).step_by(batch_rows) {
            let rows = batch.slice(start, batch_rows.min(batch.num_rows() - start));
            if sender.send(Ok(rows)).is_err() {
                // The pass stopped early.
                return Ok(());
            }
        }
    }
    Ok(())
}

/// One partition and one batch size whatever the pass's (so the rows come
/// in one order on every pass: a sort of more than a few batches sorts
/// them one by one and merges, so ties in an `ORDER BY` could otherwise be
/// broken differently by a pass that asked for other batches), and the
/// query's memory capped.
fn session(cohort: &SqlCohort) -> Result<SessionContext, DataError> {
    let config = SessionConfig::new()
        .with_target_partitions(1)
        .with_batch_size(crate::columnar::BATCH_ROWS)
        .with_information_schema(false);
    let bytes = usize::try_from(cohort.memory_mib.saturating_mul(1 << 20)).unwrap_or(usize::MAX);
    let runtime = RuntimeEnvBuilder::new()
        .with_memory_limit(bytes, 1.0)
        .build_arc()
        .map_err(|e| cohort.error(format!("cannot start the query: {}", message(&e))))?;
    Ok(SessionContext::new_with_config_rt(config, runtime))
}

/// Registers one table by its file's extension (`.parquet`/`.pq`, anything
/// else CSV with a header row), after checking the file is there, so the
/// error names the file rather than an empty listing.
async fn register(context: &SessionContext, cohort: &SqlCohort, name: &str, path: &Path) -> Result<(), DataError> {
    std::fs::metadata(path).map_err(|source| DataError::Io {
        file: path.to_owned(),
        source,
    })?;
    let location = path
        .to_str()
        .ok_or_else(|| cohort.error(format!("table `{name}`: the file's path is not UTF-8")))?;
    let extension = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let dotted = if extension.is_empty() {
        String::new()
    } else {
        format!(".{extension}")
    };
    let registered = if extension.eq_ignore_ascii_case("parquet") || extension.eq_ignore_ascii_case("pq") {
        let options = ParquetReadOptions::default().file_extension(&dotted);
        context.register_parquet(name, location, options).await
    } else {
        let options = CsvReadOptions::new()
            .has_header(true)
            .file_extension(&dotted)
            .schema_infer_max_records(INFER_ROWS);
        context.register_csv(name, location, options).await
    };
    registered.map_err(|e| cohort.error(format!("table `{name}` ({}): {}", path.display(), message(&e))))
}

/// DataFusion's message without its error-kind prefixes' repetition.
fn message(error: &datafusion::error::DataFusionError) -> String {
    error.to_string().trim().to_owned()
}

#[cfg(test)]
mod tests {
    use std::ops::ControlFlow;

    use std::sync::Arc;

    use super::*;
    use crate::data::{Dataset, read_csv_from};
    use crate::schema::Schema;

    fn cohort(dir: &Path, query: &str) -> SqlCohort {
        SqlCohort {
            tables: vec![
                ("encounters".into(), dir.join("encounters.csv")),
                ("diagnoses".into(), dir.join("diagnoses.parquet")),
            ],
            query: query.into(),
            memory_mib: 256,
        }
    }

    fn read(cohort: &SqlCohort, schema: &Schema) -> Result<(Dataset, ReadReport), DataError> {
        crate::data::collect(|visit| scan_sql(cohort, schema, 2, visit), schema)
    }

    /// Two tables a hospital might extract: encounters (a patient may have
    /// several) and their diagnoses, with a text-coded outcome.
    fn write_tables(dir: &Path) {
        std::fs::write(
            dir.join("encounters.csv"),
            "encounter,patient,admitted,age,outcome\n\
             1,p1,2016-03-01,71,<30\n\
             2,p1,2015-01-09,70,NO\n\
             3,p2,2017-06-30,45,>30\n\
             4,p3,2018-02-11,17,NO\n\
             5,p4,2019-12-24,60,<30\n\
             6,p4,2019-12-25,60,NO\n",
        )
        .unwrap();
        let encounters = arrow_array::Int64Array::from(vec![1, 2, 3, 4, 5, 6]);
        let codes = arrow_array::StringArray::from(vec!["428", "250.01", "V45", "428", "250.02", "786"]);
        let batch = RecordBatch::try_from_iter([
            ("encounter", Arc::new(encounters) as arrow_array::ArrayRef),
            ("code", Arc::new(codes) as arrow_array::ArrayRef),
        ])
        .unwrap();
        let file = std::fs::File::create(dir.join("diagnoses.parquet")).unwrap();
        let mut writer = parquet::arrow::ArrowWriter::try_new(file, batch.schema(), None).unwrap();
        writer.write(&batch).unwrap();
        writer.close().unwrap();
    }

    const SCHEMA: &str = r#"
        [format]
        header = true
        [label]
        column = "readmitted"
        positive_if = "> 0"
        [split]
        test_fraction = 0.25
        seed = 7
        group_by = "patient"
        [[column]]
        name = "patient"
        kind = "id"
        [[column]]
        name = "age"
        kind = "numeric"
        [[column]]
        name = "diabetes"
        kind = "numeric"
        [[column]]
        name = "readmitted"
        kind = "label"
    "#;

    /// The first adult encounter per patient, joined with its diagnosis,
    /// labelled from the text-coded outcome.
    const QUERY: &str = "
        WITH ranked AS (
            SELECT e.patient, e.age, e.outcome, d.code,
                   ROW_NUMBER() OVER (PARTITION BY e.patient ORDER BY e.admitted) AS nth
            FROM encounters e JOIN diagnoses d ON d.encounter = e.encounter
            WHERE e.age >= 18
        )
        SELECT patient, age,
               CASE WHEN code LIKE '250%' THEN 1 ELSE 0 END AS diabetes,
               CASE WHEN outcome = '<30' THEN 1 ELSE 0 END AS readmitted
        FROM ranked WHERE nth = 1 ORDER BY patient";

    /// A join, a window de-duplication and a label expression give, row for
    /// row, what the same cohort written out as a CSV file gives.
    #[test]
    fn a_cohort_query_gives_the_rows_of_its_result_as_a_file() {
        let dir = tempfile::tempdir().unwrap();
        write_tables(dir.path());
        let schema = Schema::from_toml(SCHEMA).unwrap();
        let (rows, report) = read(&cohort(dir.path(), QUERY), &schema).unwrap();
        // p1's first encounter is #2 (2015); p3 is a minor; p4's first is #5.
        let expected = "patient,age,diabetes,readmitted\np1,70,1,0\np2,45,0,0\np4,60,1,1\n";
        let (twin, twin_report) = read_csv_from(expected.as_bytes(), Path::new("cohort.csv"), &schema).unwrap();
        assert_eq!(rows, twin);
        assert_eq!(report, twin_report);
        assert_eq!(rows.len(), 3);
        assert_eq!(rows.labels, vec![0.0, 0.0, 1.0]);
    }

    /// A pass that stops early leaves nothing running; the next pass reads
    /// the whole cohort again.
    #[test]
    fn a_pass_can_stop_early_and_the_next_reads_it_all() {
        let dir = tempfile::tempdir().unwrap();
        write_tables(dir.path());
        let schema = Schema::from_toml(SCHEMA).unwrap();
        let cohort = cohort(dir.path(), QUERY);
        let mut seen = 0;
        scan_sql(&cohort, &schema, 1, &mut |batch| {
            seen += batch.len();
            ControlFlow::Break(())
        })
        .unwrap();
        assert_eq!(seen, 1);
        assert_eq!(read(&cohort, &schema).unwrap().0.len(), 3);
    }

    /// Every mistake is named with the table, file or column it is about.
    #[test]
    fn bad_cohorts_are_named_with_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        write_tables(dir.path());
        let schema = Schema::from_toml(SCHEMA).unwrap();
        let err = |query: &str| read(&cohort(dir.path(), query), &schema).unwrap_err().to_string();

        let syntax = err("SELEC patient FROM encounters");
        assert!(syntax.contains("the query cannot run"), "{syntax}");
        let table = err("SELECT * FROM admissions");
        assert!(table.contains("admissions"), "{table}");
        let column = err("SELECT patient, age FROM encounters");
        assert!(column.contains("diabetes"), "{column}");
        let empty = err(&QUERY.replace("e.age >= 18", "e.age >= 200"));
        assert!(
            empty.contains("no usable rows") || empty.contains("no data rows"),
            "{empty}"
        );
        // The encoder names a bad cell by its row in the result.
        let bad = err("SELECT patient, 'old' AS age, 0 AS diabetes, 0 AS readmitted FROM encounters");
        assert!(bad.contains("row 1") && bad.contains("age"), "{bad}");

        let mut missing = cohort(dir.path(), QUERY);
        missing.tables[1].1 = dir.path().join("dx.parquet");
        let missing = read(&missing, &schema).unwrap_err().to_string();
        assert!(missing.contains("dx.parquet"), "{missing}");
    }

    /// A query that fails after it has handed over rows fails the pass: its
    /// first rows are never taken for the whole cohort.
    #[test]
    fn a_query_that_fails_midway_fails_the_pass() {
        let dir = tempfile::tempdir().unwrap();
        write_tables(dir.path());
        let schema = Schema::from_toml(SCHEMA).unwrap();
        // One table of one partition, read in 8,192-row batches: the first
        // batch's rows are handed over before the cast fails on the last
        // row, in the second batch. (A UNION ALL of a good and a failing
        // input ran its inputs concurrently: now and then the failure came
        // first.)
        let mut big = String::from("patient,score\n");
        for i in 0..10_000 {
            big.push_str(&format!(
                "p{i},{}\n",
                if i == 9_999 { "x".to_owned() } else { i.to_string() }
            ));
        }
        std::fs::write(dir.path().join("big.csv"), big).unwrap();
        let mut source = cohort(
            dir.path(),
            "SELECT patient, CAST(score AS INT) AS age, 0 AS diabetes, 0 AS readmitted FROM big",
        );
        source.tables.push(("big".into(), dir.path().join("big.csv")));
        let mut seen = 0;
        let err = scan_sql(&source, &schema, 1, &mut |batch| {
            seen += batch.len();
            ControlFlow::Continue(())
        })
        .unwrap_err()
        .to_string();
        assert!(seen > 0, "the failure came before any row: {err}");
        assert!(err.contains("the query failed"), "{err}");
    }

    /// The query reads; it cannot write a file, define a table or change a
    /// setting.
    #[test]
    fn a_cohort_query_cannot_write_or_define() {
        let dir = tempfile::tempdir().unwrap();
        write_tables(dir.path());
        let schema = Schema::from_toml(SCHEMA).unwrap();
        let out = dir.path().join("leak.csv");
        for statement in [
            format!("COPY encounters TO '{}' STORED AS CSV", out.display()),
            format!(
                "CREATE EXTERNAL TABLE other STORED AS CSV LOCATION '{}'",
                dir.path().join("encounters.csv").display()
            ),
            "SET datafusion.execution.batch_size = 1".to_owned(),
            "INSERT INTO encounters VALUES (7, 'p5', '2020-01-01', 50, 'NO')".to_owned(),
        ] {
            let err = read(&cohort(dir.path(), &statement), &schema).unwrap_err().to_string();
            assert!(err.contains("the query cannot run"), "{statement}: {err}");
        }
        assert!(!out.exists());
    }
}
