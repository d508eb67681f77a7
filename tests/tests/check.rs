//! `tessera-participant check`, the data team's offline validation: it must
//! fail (non-zero exit, a message naming the file) on data a site cannot
//! train on, and pass on the real heart data.

use std::path::Path;
use std::process::Command;

use tessera_tests::{bin, repo};

/// Runs `check` on `data` with the heart-disease schema.
fn check(dir: &Path, data: &Path) -> std::process::Output {
    let config = dir.join("site.toml");
    let schema = repo().join("examples/heart-disease/schema.toml");
    std::fs::write(
        &config,
        format!(
            "site_id = \"cleveland\"\ncoordinator = \"http://127.0.0.1:1\"\n[data]\npath = {:?}\nschema = {:?}\n",
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
}
