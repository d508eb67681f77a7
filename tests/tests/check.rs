//! `tessera-participant check`, the data team's offline validation: it must
//! fail (non-zero exit, a message naming the file) on data a site cannot
//! train on, and pass on the real heart data, as CSV or as Parquet.

use std::path::Path;
use std::process::Command;

use tessera_tests::{bin, repo};

/// Runs `check` on `data` with the heart-disease schema.
fn check(dir: &Path, data: &Path) -> std::process::Output {
    check_with(dir, data, "")
}

/// `check` with more lines in the config's `[data]` table.
fn check_with(dir: &Path, data: &Path, more: &str) -> std::process::Output {
    let config = dir.join("site.toml");
    let schema = repo().join("examples/heart-disease/schema.toml");
    std::fs::write(
        &config,
        format!(
            "site_id = \"cleveland\"\ncoordinator = \"http://127.0.0.1:1\"\n[data]\npath = {:?}\nschema = {:?}\n{more}\n",
            data, schema
        ),
    )
    .unwrap();
    Command::new(bin("tessera-participant"))
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .expect("run tessera-participant check")
}

#[test]
fn check_refuses_files_without_usable_rows_and_passes_real_data() {
    let dir = tempfile::tempdir().unwrap();
    let real = repo().join("../shared/data/heart-disease/processed.cleveland.data");
    let out = check(dir.path(), &real);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("303 read"));

    let first_row = std::fs::read_to_string(&real)
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .to_owned();
    // Every cell of the row missing: read, then dropped.
    let all_missing = first_row.split(',').map(|_| "?").collect::<Vec<_>>().join(",");
    for (name, text, reason) in [
        ("empty.csv", String::new(), "holds no data rows"),
        ("blank.csv", "\n\n".to_owned(), "holds no data rows"),
        (
            "missing.csv",
            format!("{all_missing}\n"),
            "all 1 data rows were dropped",
        ),
    ] {
        let data = dir.path().join(name);
        std::fs::write(&data, text).unwrap();
        let out = check(dir.path(), &data);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{name}: {stderr}");
        assert!(
            stderr.contains(name) && stderr.contains("no usable rows") && stderr.contains(reason),
            "{name}: {stderr}"
        );
    }
    // One usable row: the split leaves nothing to train on.
    let data = dir.path().join("one.csv");
    std::fs::write(&data, format!("{first_row}\n")).unwrap();
    let out = check(dir.path(), &data);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("one.csv") && stderr.contains("leaves the training part empty (1 usable rows)"),
        "{stderr}"
    );
}

/// The real Cleveland file as Parquet: a column whose cells are all numbers
/// (or `?`) becomes float64 with nulls, any other column stays text.
fn parquet_twin(csv: &Path, out: &Path) {
    use std::sync::Arc;

    use arrow_array::{ArrayRef, Float64Array, RecordBatch, StringArray};

    let schema_text = std::fs::read_to_string(repo().join("examples/heart-disease/schema.toml")).unwrap();
    let schema = tessera_models::schema::Schema::from_toml(&schema_text).unwrap();
    let text = std::fs::read_to_string(csv).unwrap();
    let rows: Vec<Vec<&str>> = text.lines().map(|l| l.split(',').map(str::trim).collect()).collect();
    let columns = schema.columns.iter().enumerate().map(|(i, column)| {
        let cells: Vec<&str> = rows.iter().map(|r| r[i]).collect();
        let numbers: Option<Vec<Option<f64>>> = cells
            .iter()
            .map(|c| {
                if *c == "?" {
                    Some(None)
                } else {
                    c.parse().ok().map(Some)
                }
            })
            .collect();
        let array: ArrayRef = match numbers {
            Some(numbers) => Arc::new(Float64Array::from(numbers)),
            None => Arc::new(StringArray::from(cells)),
        };
        (column.name.clone(), array)
    });
    let batch = RecordBatch::try_from_iter(columns).unwrap();
    let mut writer =
        parquet::arrow::ArrowWriter::try_new(std::fs::File::create(out).unwrap(), batch.schema(), None).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
}

#[test]
fn check_reads_a_parquet_file_as_it_reads_its_csv_twin() {
    let dir = tempfile::tempdir().unwrap();
    let real = repo().join("../shared/data/heart-disease/processed.cleveland.data");
    let twin = dir.path().join("cleveland.parquet");
    parquet_twin(&real, &twin);
    let (from_csv, from_parquet) = (check(dir.path(), &real), check(dir.path(), &twin));
    assert!(
        from_parquet.status.success(),
        "{}",
        String::from_utf8_lossy(&from_parquet.stderr)
    );
    let summary = |out: &std::process::Output, path: &Path| {
        String::from_utf8_lossy(&out.stdout).replace(&path.display().to_string(), "DATA")
    };
    assert!(summary(&from_csv, &real).contains("303 read"));
    assert_eq!(summary(&from_parquet, &twin), summary(&from_csv, &real));

    // Streamed from the file (a table over `in_memory_mib`), CSV or
    // Parquet: the same rows, counts and split, and said so.
    let streamed_note = "  the encoded rows exceed [data] in_memory_mib = 0: read from the file on every pass\n";
    for (path, in_memory) in [(&real, &from_csv), (&twin, &from_parquet)] {
        let out = check_with(dir.path(), path, "in_memory_mib = 0");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let streamed = summary(&out, path);
        assert!(streamed.contains(streamed_note), "{streamed}");
        assert_eq!(streamed.replace(streamed_note, ""), summary(in_memory, path));
    }

    // A damaged file: exit 1, the file named, no panic.
    let mut bytes = std::fs::read(&twin).unwrap();
    let middle = bytes.len() / 2;
    bytes.truncate(middle);
    let damaged = dir.path().join("damaged.parquet");
    std::fs::write(&damaged, bytes).unwrap();
    let out = check(dir.path(), &damaged);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("damaged.parquet: cannot be read as Parquet"),
        "{stderr}"
    );
}

/// The bring-your-own-data guide's example (docs/bring-your-own-data.md)
/// checks as the guide shows: `?` kept as a race, codes grouped, a coded
/// label, encounters split by patient, a missing age imputed and flagged.
#[test]
fn the_guides_encounter_example_checks_as_documented() {
    let out = Command::new(bin("tessera-participant"))
        .args(["check", "--config"])
        .arg(repo().join("examples/encounters/site.toml"))
        .output()
        .expect("run tessera-participant check");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let guide = std::fs::read_to_string(repo().join("docs/bring-your-own-data.md")).unwrap();
    for line in [
        "rows: 240 read, 240 kept, 0 dropped for missing values",
        "age             10 (imputed, flagged by age=(missing))",
        "label: 33 positive / 207 negative (13.8% positive)",
        "split (test_fraction 0.25, seed 11, grouped by `patient_id`): train 173 (21 positive), test 67 (12 positive)",
        "13 encoded features",
        "values in an other bucket (no category or map rule took them):\n    diag_1          81",
    ] {
        assert!(stdout.contains(line), "{line}\n{stdout}");
        assert!(guide.contains(line), "the guide no longer shows: {line}");
    }
}

/// The guide's cohort query over the raw two-table extract
/// (`examples/encounters/cohort.toml`): a join, a first-encounter window and
/// a label expression, checked as the guide shows.
#[test]
fn the_guides_cohort_query_checks_as_documented() {
    let out = Command::new(bin("tessera-participant"))
        .args(["check", "--config"])
        .arg(repo().join("examples/encounters/cohort.toml"))
        .output()
        .expect("run tessera-participant check");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let guide = std::fs::read_to_string(repo().join("docs/bring-your-own-data.md")).unwrap();
    for line in GUIDE_COHORT_LINES {
        assert!(stdout.contains(line), "{line}\n{stdout}");
        assert!(guide.contains(line), "the guide no longer shows: {line}");
    }
    // The flat file and the cohort share the schema, so the hash.
    let flat = Command::new(bin("tessera-participant"))
        .args(["check", "--config"])
        .arg(repo().join("examples/encounters/site.toml"))
        .output()
        .unwrap();
    assert!(flat.status.success(), "{}", String::from_utf8_lossy(&flat.stderr));
    let hash = |text: &str| text.lines().find(|l| l.contains("features hash")).map(str::to_owned);
    assert!(hash(&stdout).is_some(), "{stdout}");
    assert_eq!(hash(&stdout), hash(&String::from_utf8_lossy(&flat.stdout)));
}

const GUIDE_COHORT_LINES: [&str; 5] = [
    // One row per patient: the extract has 81 (counted independently).
    "rows: 81 read, 81 kept, 0 dropped for missing values",
    "age             2 (imputed, flagged by age=(missing))",
    // `>30` counted as no readmission by the query's CASE.
    "label: 10 positive / 71 negative (12.3% positive)",
    "split (test_fraction 0.25, seed 11, grouped by `patient_id`): train 58 (4 positive), test 23 (6 positive)",
    "diag_1          27",
];

/// A cohort query that cannot run, or that would write a file, stops
/// `check` with exit 1 and the engine's reason, and writes nothing.
#[test]
fn check_refuses_a_cohort_query_that_cannot_run_or_would_write() {
    let dir = tempfile::tempdir().unwrap();
    let extract = repo().join("examples/encounters/extract");
    let leak = dir.path().join("leak.csv");
    for (query, reason) in [
        ("SELEC patient_id FROM encounters".to_owned(), "the query cannot run"),
        ("SELECT * FROM admissions".to_owned(), "admissions"),
        (
            "SELECT patient_id, age, race FROM encounters".to_owned(),
            "column `diag_1`",
        ),
        (
            format!("COPY encounters TO '{}' STORED AS CSV", leak.display()),
            "the query cannot run",
        ),
    ] {
        let config = dir.path().join("site.toml");
        std::fs::write(
            &config,
            format!(
                "site_id = \"h\"\ncoordinator = \"http://127.0.0.1:1\"\n[data]\nschema = {:?}\nquery = {:?}\n\
                 [data.tables]\nencounters = {:?}\ndiagnoses = {:?}\n",
                repo().join("examples/encounters/schema.toml"),
                query,
                extract.join("encounters.csv"),
                extract.join("diagnoses.csv"),
            ),
        )
        .unwrap();
        let out = Command::new(bin("tessera-participant"))
            .args(["check", "--config"])
            .arg(&config)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{query}: {stderr}");
        assert!(
            stderr.contains("cohort query") && stderr.contains(reason),
            "{query}: {stderr}"
        );
    }
    assert!(!leak.exists());
}
