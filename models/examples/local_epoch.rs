//! One site's local work on a large synthetic clinical table: the figures of
//! `scripts/bench_local_data.sh` (issue 13).
//!
//!   local_epoch generate ROWS DIR   # DIR/synthetic-ROWS.{csv,parquet} and DIR/schema.toml, once
//!   local_epoch epoch FILE SCHEMA   # one logistic-regression epoch, streamed from FILE
//!
//! The table has 120 numeric columns and one code column of 11 values (131
//! encoded features) and about 9 % positive labels. `epoch` opens the file
//! as a site does (one checking pass), computes the training split's
//! statistics (a second pass), then times [`EPOCHS`] epochs of training
//! (SGD, batch 256, each from the model the last one ended with) over the
//! standardised training split read from the file (reading, encoding and
//! standardising included), and prints
//! `rows=N epoch_s=S train_rows_per_s=R rss_peak_mib=M`: S is the median
//! epoch (this machine's timings vary by a fifth from run to run), M the
//! peak resident memory of the whole process (from /proc/self/status).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use arrow_array::{ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray};
use parquet::arrow::ArrowWriter;
use tessera_models::schema::Schema;
use tessera_models::stream::{Rows, Standardized, TableSplit, feature_stats};
use tessera_models::train::{LocalTraining, train_local};
use tessera_protocol::job::{LocalWork, OptimizerKind, TrainingSpec};
use tessera_protocol::model::{ModelSpec, initial_params};
use tessera_protocol::stats::Normalization;

const NUMERIC: usize = 120;
/// Epochs timed; the median is reported (PyTorch's side does the same).
const EPOCHS: usize = 3;
const CODES: usize = 11;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("generate") => generate(args[2].parse().expect("ROWS"), Path::new(&args[3])),
        Some("epoch") => epoch(PathBuf::from(&args[2]), Path::new(&args[3])),
        _ => {
            eprintln!("usage: local_epoch generate ROWS DIR | local_epoch epoch FILE SCHEMA");
            std::process::exit(2);
        }
    }
}

/// splitmix64: a fixed, fast stream of pseudo-random words.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn uniform(row: u64, col: u64) -> f64 {
    (mix(row.wrapping_mul(1_000_003) ^ col) >> 11) as f64 / (1u64 << 53) as f64
}

/// One row: numeric values, the code index and the label.
fn row(i: u64) -> (Vec<f64>, usize, i64) {
    let x: Vec<f64> = (0..NUMERIC as u64)
        .map(|j| ((uniform(i, j) * 2.0 - 1.0) * 100.0).round() / 100.0)
        .collect();
    let code = (mix(i ^ 0xC0DE) % CODES as u64) as usize;
    let score = 1.5 * x[0] - x[1] + 0.8 * x[2] + if code < 2 { 0.7 } else { 0.0 } - 3.0;
    let p = 1.0 / (1.0 + (-score).exp());
    let label = i64::from(uniform(i, 999) < p);
    (x, code, label)
}

/// `k / 100` as decimal text (`-0.07`, `0.5`, `1`), without a float
/// formatter: the CSV of 10M rows has 1.2 billion such cells.
fn write_hundredths(out: &mut Vec<u8>, k: i64) {
    if k < 0 {
        out.push(b'-');
    }
    let (whole, cents) = (k.unsigned_abs() / 100, k.unsigned_abs() % 100);
    out.extend_from_slice(whole.to_string().as_bytes());
    if cents != 0 {
        out.push(b'.');
        out.push(b'0' + (cents / 10) as u8);
        if cents % 10 != 0 {
            out.push(b'0' + (cents % 10) as u8);
        }
    }
}

fn generate(rows: u64, dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let mut schema = String::from(
        "[format]\nheader = true\n[label]\ncolumn = \"y\"\npositive_if = \"> 0\"\n[split]\ntest_fraction = 0.2\nseed = 1\n",
    );
    for j in 0..NUMERIC {
        schema.push_str(&format!("[[column]]\nname = \"x{j}\"\nkind = \"numeric\"\n"));
    }
    let codes: Vec<String> = (0..CODES).map(|c| format!("\"c{c}\"")).collect();
    schema.push_str(&format!(
        "[[column]]\nname = \"code\"\nkind = \"categorical\"\ncategories = [{}]\n",
        codes.join(", ")
    ));
    schema.push_str("[[column]]\nname = \"y\"\nkind = \"label\"\n");
    std::fs::write(dir.join("schema.toml"), schema).unwrap();

    let csv_path = dir.join(format!("synthetic-{rows}.csv"));
    if !csv_path.exists() {
        let tmp = csv_path.with_extension("csv.part");
        let mut out = std::io::BufWriter::new(std::fs::File::create(&tmp).unwrap());
        let header: Vec<String> = (0..NUMERIC).map(|j| format!("x{j}")).collect();
        writeln!(out, "{},code,y", header.join(",")).unwrap();
        let mut line = Vec::with_capacity(1024);
        for i in 0..rows {
            let (x, code, label) = row(i);
            line.clear();
            for v in &x {
                write_hundredths(&mut line, (v * 100.0).round() as i64);
                line.push(b',');
            }
            writeln!(line, "c{code},{label}").unwrap();
            out.write_all(&line).unwrap();
        }
        out.flush().unwrap();
        std::fs::rename(tmp, &csv_path).unwrap();
    }
    let parquet_path = dir.join(format!("synthetic-{rows}.parquet"));
    if !parquet_path.exists() {
        let tmp = parquet_path.with_extension("parquet.part");
        let mut writer: Option<ArrowWriter<std::fs::File>> = None;
        let mut start = 0;
        while start < rows {
            let end = (start + 65_536).min(rows);
            let generated: Vec<_> = (start..end).map(row).collect();
            let mut columns: Vec<(String, ArrayRef)> = (0..NUMERIC)
                .map(|j| {
                    let values: Float64Array = generated.iter().map(|r| r.0[j]).collect();
                    (format!("x{j}"), Arc::new(values) as ArrayRef)
                })
                .collect();
            let codes: StringArray = generated.iter().map(|r| Some(format!("c{}", r.1))).collect();
            columns.push(("code".into(), Arc::new(codes)));
            let labels: Int64Array = generated.iter().map(|r| r.2).collect();
            columns.push(("y".into(), Arc::new(labels)));
            let batch = RecordBatch::try_from_iter(columns).unwrap();
            let w = writer.get_or_insert_with(|| {
                ArrowWriter::try_new(std::fs::File::create(&tmp).unwrap(), batch.schema(), None).unwrap()
            });
            w.write(&batch).unwrap();
            start = end;
        }
        writer.expect("at least one row").close().unwrap();
        std::fs::rename(tmp, &parquet_path).unwrap();
    }
}

fn epoch(file: PathBuf, schema_path: &Path) {
    let schema = Schema::from_toml(&std::fs::read_to_string(schema_path).unwrap()).unwrap();
    let (train, _test, report) = TableSplit::open(file, schema).unwrap();
    // The site's statistics pass (the secure sum of one site), not timed.
    let normalization = Normalization::from_stats(&feature_stats(&train).unwrap()).unwrap();
    let standardized = Standardized {
        rows: &train,
        normalization: &normalization,
    };
    let layout = ModelSpec::LogisticRegression.layout(train.n_features());
    let spec = TrainingSpec {
        optimizer: OptimizerKind::Sgd,
        learning_rate: 0.05,
        batch_size: 256,
        local_work: LocalWork::Epochs(1),
        pos_weight: Default::default(),
    };
    let cfg = LocalTraining {
        layout: &layout,
        spec: &spec,
        proximal_mu: 0.0,
        seed: 1,
        pos_weight: 1.0,
    };
    let device = tessera_models::default_device();
    let mut params = initial_params(&layout, 1);
    let mut times = Vec::new();
    for _ in 0..EPOCHS {
        let start = Instant::now();
        let update = train_local(&cfg, &params, &standardized, &device).unwrap();
        times.push(start.elapsed().as_secs_f64());
        assert_eq!(update.n_samples, train.len());
        params = update.params;
    }
    times.sort_by(f64::total_cmp);
    let seconds = times[EPOCHS / 2];
    let rss = peak_rss_mib();
    // Where the time goes: one pass of reading alone, and (for tables
    // that fit) the same epoch on the split already standardised in memory.
    let start = Instant::now();
    tessera_models::stream::census(&standardized).unwrap();
    let read_s = start.elapsed().as_secs_f64();
    let in_memory_s = if train.len() <= 2_000_000 {
        let rows = tessera_models::stream::to_dataset(&standardized).unwrap();
        let start = Instant::now();
        train_local(&cfg, &initial_params(&layout, 1), &rows, &device).unwrap();
        format!("{:.2}", start.elapsed().as_secs_f64())
    } else {
        "-".to_owned()
    };
    eprintln!("read_pass_s={read_s:.2} in_memory_epoch_s={in_memory_s}");
    println!(
        "rows={} epoch_s={seconds:.2} train_rows_per_s={:.0} rss_peak_mib={rss}",
        report.rows_kept,
        train.len() as f64 / seconds,
    );
}

fn peak_rss_mib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb / 1024)
}
