//! A site's cohort as the result of a query on its PostgreSQL warehouse (an
//! OMOP CDM, say), streamed through a server-side cursor: the query runs
//! where the data lives, and the site holds one batch of its result at a
//! time, however large the cohort.
//!
//! Each pass opens a read-only, repeatable-read transaction, declares a
//! cursor over the site's query and fetches it `FETCH_ROWS` rows at a time
//! in the text format, so every cell reaches the schema as a CSV cell does
//! (the same missing markers, numbers, categories and label rule) and a
//! NULL is a missing value. Columns are matched to the schema by name, as
//! in a Parquet file. The database work runs on a thread of its own with a
//! small runtime, handing batches over a channel of two, so a pass reads
//! the same way from the daemon, `check` or a benchmark.

use std::path::PathBuf;
use std::sync::mpsc::{SyncSender, sync_channel};

use sqlx::postgres::{PgConnectOptions, PgRow};
use sqlx::{AssertSqlSafe, Column, ConnectOptions, Connection, Row, ValueRef};

use crate::data::{Cell, DataError, ReadReport, RowEncoder, Visit};
use crate::schema::{ColumnKind, Schema};

/// Rows per `FETCH`: enough to keep the round trips few, few enough that a
/// batch of wide rows stays small.
const FETCH_ROWS: usize = 8192;

/// A query on a PostgreSQL server: the site's cohort.
#[derive(Clone, Debug, PartialEq)]
pub struct PgSource {
    /// `postgresql://user@host:port/database`; what it leaves out comes
    /// from the usual `PG*` environment variables (`PGPASSWORD` among
    /// them, so no password needs to be written in the site's config).
    pub url: String,
    /// The cohort's `SELECT`, from the site's own config: it is never sent
    /// anywhere, and runs with whatever rights the site's database role has
    /// (give it a read-only one).
    pub query: String,
}

impl PgSource {
    /// How errors name this source: the server and database, never the
    /// password a URL may hold.
    pub fn label(&self) -> String {
        match self.url.parse::<PgConnectOptions>() {
            Ok(options) => format!(
                "postgres://{}:{}/{} (the site's query)",
                options.get_host(),
                options.get_port(),
                options.get_database().unwrap_or("")
            ),
            Err(_) => "postgres (the site's query)".to_owned(),
        }
    }

    fn error(&self, reason: impl std::fmt::Display) -> DataError {
        DataError::Query {
            source_label: self.label(),
            reason: reason.to_string(),
        }
    }
}

/// One fetched batch: its rows' cells as text, `None` for NULL.
struct TextBatch {
    /// The result's column names (on the first batch of a pass only).
    columns: Option<Vec<String>>,
    /// Cells per row: the result's width.
    width: usize,
    cells: Vec<Option<String>>,
}

/// One pass over the query's result, as `data::scan_table` makes over a
/// file.
pub(crate) fn scan_postgres(
    source: &PgSource,
    schema: &Schema,
    batch_rows: usize,
    visit: Visit,
) -> Result<ReadReport, DataError> {
    scan_with(source, schema, batch_rows, FETCH_ROWS, visit)
}

/// [`scan_postgres`] fetching `fetch_rows` rows at a time.
fn scan_with(
    source: &PgSource,
    schema: &Schema,
    batch_rows: usize,
    fetch_rows: usize,
    visit: Visit,
) -> Result<ReadReport, DataError> {
    let file = PathBuf::from(source.label());
    let (sender, batches) = sync_channel::<Result<TextBatch, DataError>>(2);
    let worker = {
        let owned = source.clone();
        std::thread::Builder::new()
            .name("tessera-postgres".into())
            .spawn(move || fetch_all(&owned, fetch_rows, &sender))
            .map_err(|e| source.error(format!("cannot start the database reader: {e}")))?
    };
    let mut rows = RowEncoder::new(schema);
    // For each schema column, its index in the result (a dropped column
    // may be absent).
    let mut index: Vec<Option<usize>> = Vec::new();
    let mut row_number = 0u64;
    let mut stopped = false;
    for batch in batches.iter() {
        let batch = batch?;
        if batch.cells.is_empty() {
            continue;
        }
        if let Some(columns) = &batch.columns {
            index = match_columns(&file, schema, columns)?;
        }
        for row in batch.cells.chunks(batch.width) {
            row_number += 1;
            rows.push(index.iter().map(|i| match i.map(|i| row[i].as_deref()) {
                Some(Some(text)) => Cell::Text(text.trim()),
                _ => Cell::Missing,
            }))
            .map_err(|(column, reason)| DataError::MalformedRow {
                file: file.clone(),
                row: row_number,
                name: schema.columns[column].name.clone(),
                reason,
            })?;
            if rows.pending() >= batch_rows && visit(rows.take()).is_break() {
                stopped = true;
                break;
            }
        }
        if stopped {
            break;
        }
    }
    // Dropping the receiver ends a pass that stopped early: the worker's
    // next send fails and it closes its connection (the transaction is
    // rolled back).
    drop(batches);
    if worker.join().is_err() && !stopped {
        // Its channel closed as at the end of the result: never take the
        // rows so far for the whole cohort.
        return Err(source.error("the database reader failed before the end of the result"));
    }
    if stopped || (rows.pending() > 0 && visit(rows.take()).is_break()) {
        return Ok(rows.report());
    }
    rows.finish(&file)
}

/// Where each schema column is in the result: by name, as in Parquet. A
/// column the schema uses must be there; a dropped one may be missing.
fn match_columns(file: &std::path::Path, schema: &Schema, columns: &[String]) -> Result<Vec<Option<usize>>, DataError> {
    schema
        .columns
        .iter()
        .map(|column| match columns.iter().position(|c| *c == column.name) {
            Some(i) => Ok(Some(i)),
            None if column.kind == ColumnKind::Drop => Ok(None),
            None => Err(DataError::MissingColumn {
                file: file.to_owned(),
                name: column.name.clone(),
                found: columns.join(", "),
            }),
        })
        .collect()
}

/// The worker: connects, runs the query through a cursor and sends its
/// batches until the result ends, the receiver hangs up, or an error
/// (which it sends).
fn fetch_all(source: &PgSource, fetch_rows: usize, sender: &SyncSender<Result<TextBatch, DataError>>) {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            let _ = sender.send(Err(source.error(format!("cannot start the database reader: {e}"))));
            return;
        }
    };
    if let Err(e) = runtime.block_on(fetch(source, fetch_rows, sender)) {
        let _ = sender.send(Err(e));
    }
}

async fn fetch(
    source: &PgSource,
    fetch_rows: usize,
    sender: &SyncSender<Result<TextBatch, DataError>>,
) -> Result<(), DataError> {
    let options: PgConnectOptions = source
        .url
        .parse()
        .map_err(|e| source.error(format!("the connection URL is not valid: {e}")))?;
    let mut conn = options
        .connect()
        .await
        .map_err(|e| source.error(format!("cannot connect: {e}")))?;
    let query = source.query.trim().trim_end_matches(';');
    // One snapshot for the whole pass; nothing the site runs can write.
    sqlx::raw_sql("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .execute(&mut conn)
        .await
        .map_err(|e| source.error(e))?;
    // The extended protocol takes one statement only: a query that tried
    // `...; COMMIT; DELETE ...` fails here instead of leaving the
    // read-only transaction.
    sqlx::query(AssertSqlSafe(format!(
        "DECLARE tessera_cohort NO SCROLL CURSOR FOR {query}"
    )))
    .persistent(false)
    .execute(&mut conn)
    .await
    .map_err(|e| source.error(format!("the query failed: {}", db_message(&e))))?;
    let fetch = format!("FETCH FORWARD {fetch_rows} FROM tessera_cohort");
    let mut first = true;
    loop {
        // The simple-query protocol returns text cells, the way `psql`
        // prints them.
        let rows: Vec<PgRow> = sqlx::raw_sql(AssertSqlSafe(fetch.clone()))
            .fetch_all(&mut conn)
            .await
            .map_err(|e| source.error(format!("the query failed: {}", db_message(&e))))?;
        let done = rows.len() < fetch_rows;
        let columns = first.then(|| {
            rows.first()
                .map(|r| r.columns().iter().map(|c| c.name().to_owned()).collect())
                .unwrap_or_default()
        });
        first = false;
        let mut cells = Vec::with_capacity(rows.first().map_or(0, |r| r.len()) * rows.len());
        for row in &rows {
            for i in 0..row.len() {
                let value = row.try_get_raw(i).map_err(|e| source.error(e))?;
                cells.push(if value.is_null() {
                    None
                } else {
                    Some(value.as_str().map_err(|e| source.error(e))?.to_owned())
                });
            }
        }
        let width = rows.first().map_or(0, |r| r.len());
        if sender.send(Ok(TextBatch { columns, width, cells })).is_err() {
            break;
        }
        if done {
            break;
        }
    }
    let _ = conn.close().await;
    Ok(())
}

/// A database error as its server says it (no driver wrapping).
fn db_message(e: &sqlx::Error) -> String {
    match e.as_database_error() {
        Some(db) => db.message().to_owned(),
        None => e.to_string(),
    }
}

/// A real PostgreSQL server for the tests: a throw-away cluster (initdb)
/// in a temporary directory, started on a free loopback port and stopped
/// on drop. `scripts/test.sh` installs PostgreSQL where it is missing.
#[cfg(test)]
pub(crate) mod server {
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, Stdio};
    use std::time::Duration;

    pub(crate) struct Server {
        pub(crate) port: u16,
        child: Child,
        _dir: tempfile::TempDir,
    }

    impl Drop for Server {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// The directory of `initdb` and `postgres`: on the PATH, or where
    /// Debian's packages put them (newest version first).
    fn bin_dir() -> PathBuf {
        if let Ok(out) = Command::new("sh").args(["-c", "command -v initdb"]).output()
            && out.status.success()
        {
            let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            let real = std::fs::canonicalize(&path).unwrap_or(path);
            return real.parent().expect("initdb has a directory").to_owned();
        }
        let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
            .map(|d| d.flatten().map(|e| e.path().join("bin")).collect())
            .unwrap_or_default();
        versions.sort_by_key(|p| {
            p.parent()
                .and_then(|v| v.file_name())
                .and_then(|v| v.to_str())
                .and_then(|v| v.parse::<u32>().ok())
                .unwrap_or(0)
        });
        versions
            .pop()
            .filter(|d| d.join("initdb").exists())
            .expect("PostgreSQL is not installed (scripts/test.sh installs the `postgresql` package)")
    }

    /// `program` as a user PostgreSQL agrees to run as: it refuses root, so
    /// a root test runs it as the `postgres` account the package creates.
    fn command(program: &Path) -> Command {
        let root = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
        if root {
            let mut cmd = Command::new("runuser");
            cmd.args(["-u", "postgres", "--"]).arg(program);
            cmd
        } else {
            Command::new(program)
        }
    }

    pub(crate) fn start() -> Server {
        let bin = bin_dir();
        let dir = tempfile::tempdir().expect("temp dir");
        let root = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
        if root {
            let status = Command::new("chown")
                .args(["-R", "postgres:"])
                .arg(dir.path())
                .status()
                .expect("chown");
            assert!(
                status.success(),
                "cannot hand the cluster's directory to the postgres account"
            );
        }
        let data = dir.path().join("data");
        let out = command(&bin.join("initdb"))
            .args([
                "-A",
                "trust",
                "-U",
                "tessera",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
                "-D",
            ])
            .arg(&data)
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let child = command(&bin.join("postgres"))
            .arg("-D")
            .arg(&data)
            .args([
                "-p",
                &port.to_string(),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
            ])
            .args(["-c", &format!("unix_socket_directories={}", dir.path().display())])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start postgres");
        let server = Server { port, child, _dir: dir };
        for _ in 0..300 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return server;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("postgres did not start listening on port {port}");
    }

    impl Server {
        pub(crate) fn url(&self) -> String {
            format!("postgresql://tessera@127.0.0.1:{}/postgres", self.port)
        }

        /// Runs SQL statements (setup), on a runtime of their own.
        pub(crate) fn execute(&self, sql: &str) {
            use sqlx::{ConnectOptions, Executor};
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                // The server accepts connections a little after it listens.
                let mut last = None;
                for _ in 0..100 {
                    match self
                        .url()
                        .parse::<sqlx::postgres::PgConnectOptions>()
                        .unwrap()
                        .connect()
                        .await
                    {
                        Ok(mut conn) => {
                            conn.execute(sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned())))
                                .await
                                .unwrap();
                            return;
                        }
                        Err(e) => last = Some(e),
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                panic!("cannot connect to the test server: {last:?}");
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{Source, read_csv_from, read_source};
    use crate::stream::{Rows, TableSplit, to_dataset};

    fn encounters() -> (String, Schema) {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/encounters");
        let csv = std::fs::read_to_string(dir.join("encounters.csv")).unwrap();
        let schema = Schema::from_toml(&std::fs::read_to_string(dir.join("schema.toml")).unwrap()).unwrap();
        (csv, schema)
    }

    /// The guide's encounter table as a typed SQL table: numbers as
    /// integers, missing markers as NULL.
    fn load(server: &server::Server, csv: &str) {
        let quote = |v: &str| format!("'{}'", v.replace('\'', "''"));
        let values: Vec<String> = csv
            .lines()
            .skip(1)
            .map(|line| {
                let c: Vec<&str> = line.split(',').collect();
                let int = |v: &str| {
                    if v.is_empty() || v == "NA" {
                        "NULL".to_owned()
                    } else {
                        v.to_owned()
                    }
                };
                let text = |v: &str| {
                    if v.is_empty() || v == "NA" {
                        "NULL".to_owned()
                    } else {
                        quote(v)
                    }
                };
                format!(
                    "({}, {}, {}, {}, {}, {}, {})",
                    int(c[0]),
                    text(c[1]),
                    int(c[2]),
                    text(c[3]),
                    text(c[4]),
                    int(c[5]),
                    text(c[6])
                )
            })
            .collect();
        server.execute(&format!(
            "CREATE TABLE encounters (encounter_id integer PRIMARY KEY, patient_id text, age integer, \
             diag_1 text, race text, num_medications integer, readmitted text); \
             INSERT INTO encounters VALUES {};",
            values.join(", ")
        ));
    }

    /// One real server: a whole table read through the cursor gives the
    /// CSV file's rows and report to the bit, in memory and streamed, in
    /// fetches of every size; a cohort query (first encounter per patient,
    /// a derived label) gives what the same filter on the file gives; and
    /// every mistake is named.
    #[test]
    fn a_query_on_a_real_postgres_server_reads_as_its_csv_twin() {
        let server = server::start();
        let (csv, schema) = encounters();
        load(&server, &csv);
        let source = |query: &str| PgSource {
            url: server.url(),
            query: query.to_owned(),
        };
        let file = std::path::Path::new("encounters.csv");
        let (from_csv, csv_report) = read_csv_from(csv.as_bytes(), file, &schema).unwrap();

        let whole = Source::Postgres(source("SELECT * FROM encounters ORDER BY encounter_id;"));
        let (from_pg, pg_report) = read_source(&whole, &schema).unwrap();
        assert_eq!(from_pg, from_csv);
        assert_eq!(pg_report, csv_report);
        // Fetches smaller than the table and batches of every size.
        for (fetch_rows, batch_rows) in [(1, 1), (7, 5), (64, 1000), (239, 240), (240, 17)] {
            let Source::Postgres(pg) = &whole else { unreachable!() };
            let mut rows = crate::data::Dataset::empty(schema.feature_names().len());
            let report = scan_with(pg, &schema, batch_rows, fetch_rows, &mut |batch| {
                assert!(batch.len() <= batch_rows);
                rows.append(batch);
                std::ops::ControlFlow::Continue(())
            })
            .unwrap();
            assert_eq!(
                (&rows, &report),
                (&from_csv, &csv_report),
                "fetch {fetch_rows}, batch {batch_rows}"
            );
        }
        // Streamed: the split by patient is the CSV file's.
        let (train, test, _) = TableSplit::open(whole.clone(), schema.clone()).unwrap();
        let (csv_train, csv_test) = from_csv.split(&schema.split);
        assert_eq!(to_dataset(&train).unwrap(), csv_train);
        assert_eq!(to_dataset(&test).unwrap(), csv_test);
        assert_eq!(train.len() + test.len(), from_csv.len());

        // A cohort: each patient's first encounter, "readmitted at all" as
        // the label, computed by the warehouse.
        let cohort = source(
            "SELECT encounter_id, patient_id, age, diag_1, race, num_medications, \
                    CASE WHEN readmitted IN ('<30', '>30') THEN '<30' WHEN readmitted = 'NO' THEN 'NO' END \
                      AS readmitted \
             FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY patient_id ORDER BY encounter_id) AS n \
                   FROM encounters) e \
             WHERE n = 1 ORDER BY encounter_id",
        );
        let mut seen = std::collections::HashSet::new();
        let mut expected = String::from(csv.lines().next().unwrap());
        for line in csv.lines().skip(1) {
            let c: Vec<&str> = line.split(',').collect();
            if seen.insert(c[1].to_owned()) {
                let label = match c[6] {
                    "<30" | ">30" => "<30",
                    other => other,
                };
                expected.push_str(&format!("\n{},{label}", c[..6].join(",")));
            }
        }
        let (want, _) = read_csv_from(expected.as_bytes(), file, &schema).unwrap();
        let (got, report) = read_source(&Source::Postgres(cohort), &schema).unwrap();
        assert_eq!(got, want);
        assert_eq!(report.rows_read, seen.len());
        assert!(seen.len() < from_csv.len());

        // Mistakes, named.
        let err = read_source(&Source::Postgres(source("SELECT patient_id FROM encounters")), &schema).unwrap_err();
        assert!(
            err.to_string()
                .contains("the schema's column `age` is missing (its columns: patient_id)"),
            "{err}"
        );
        assert_eq!(err.public_reason(), "schema mismatch: column `age` missing");
        let err = read_source(
            &Source::Postgres(source("SELECT * FROM encounters; COMMIT; DELETE FROM encounters")),
            &schema,
        )
        .unwrap_err();
        assert!(err.to_string().contains("the query failed: "), "{err}");
        let (still, _) = read_source(&whole, &schema).unwrap();
        assert_eq!(still, from_csv, "a query cannot write");
        let err = read_source(&Source::Postgres(source("SELEC * FROM encounters")), &schema).unwrap_err();
        assert!(
            err.to_string()
                .contains("the query failed: syntax error at or near \"SELEC\""),
            "{err}"
        );
        let err = read_source(
            &Source::Postgres(source(
                "SELECT encounter_id, patient_id, 'Smith-4711' AS age, diag_1, race, \
                num_medications, readmitted FROM encounters",
            )),
            &schema,
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("row 1, column `age`: `Smith-4711` is not a number"),
            "{err}"
        );
        assert!(!err.public_reason().contains("Smith"), "{}", err.public_reason());
        let err = read_source(
            &Source::Postgres(source("SELECT * FROM encounters WHERE age > 1000")),
            &schema,
        )
        .unwrap_err();
        assert!(matches!(err, DataError::NoRows { rows_read: 0, .. }), "{err}");
        let mut ungrouped = schema.clone();
        ungrouped.split.group_by = None;
        let err = TableSplit::open(whole.clone(), ungrouped)
            .err()
            .expect("an ungrouped query is refused");
        assert!(err.to_string().contains("needs `[split] group_by`"), "{err}");
        let closed = PgSource {
            url: format!("postgresql://tessera:secret-pw@127.0.0.1:{}/postgres", free_port()),
            query: "SELECT 1".into(),
        };
        let err = read_source(&Source::Postgres(closed), &schema).unwrap_err();
        assert!(err.to_string().contains("cannot connect"), "{err}");
        assert!(!err.to_string().contains("secret-pw"), "{err}");
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }
}
