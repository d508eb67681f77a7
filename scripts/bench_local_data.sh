#!/usr/bin/env bash
# Local big data benchmark (issue 13): one site's logistic-regression epoch
# on a synthetic clinical table, streamed from Parquet and from CSV, next to
# PyTorch on the same Parquet file.
#
#   scripts/bench_local_data.sh ROWS
#
# Generates once (cached in $TESSERA_BENCH_DATA, default target/bench-data)
# a table of ROWS rows: 120 numeric columns and one code column of 11 values
# (131 encoded features), about 9 % positive, as Parquet and CSV with their
# schema. Then, each in its own process, so that peak memory is the
# process's own:
#   - Tessera, from Parquet and from CSV (models/examples/local_epoch.rs):
#     the site opens the file (one checking pass), computes its statistics
#     (a second pass), and trains one epoch, SGD, batch 256, streamed and
#     standardised batch by batch, shuffled within 65,536-row windows;
#   - PyTorch (CPU, one thread, same model, batch, optimiser and shuffle
#     window; pyarrow record batches from the same Parquet file), in a venv
#     this script creates with torch (CPU wheel) and pyarrow.
# Its last line is exactly:
#   rows=<N> rss_peak_mib=<M> train_rows_per_s=<R> torch_rows_per_s=<T>
# where M and R are Tessera's, from Parquet.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
rows=${1:?usage: scripts/bench_local_data.sh ROWS}
data=${TESSERA_BENCH_DATA:-$repo/target/bench-data}
target=${CARGO_TARGET_DIR:-$repo/target}
venv=${TESSERA_BENCH_VENV:-$repo/target/bench-venv}

cargo build --release -q -p tessera-models --example local_epoch
tool="$target/release/examples/local_epoch"
"$tool" generate "$rows" "$data"

if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import torch, pyarrow' 2>/dev/null; then
  echo "creating $venv (torch CPU, pyarrow)" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
  # The CPU wheel where PyTorch's index is reachable; else PyPI's (it
  # pulls CUDA libraries, about 5 GB, unused here).
  "$venv/bin/pip" install -q --timeout 10 --retries 0 --index-url https://download.pytorch.org/whl/cpu torch 2>/dev/null \
    || "$venv/bin/pip" install -q torch
  "$venv/bin/pip" install -q pyarrow numpy
fi

field() { sed -n "s/.*\b$1=\([^ ]*\).*/\1/p" <<<"$2"; }
parquet=$("$tool" epoch "$data/synthetic-$rows.parquet" "$data/schema.toml")
echo "tessera parquet: $parquet" >&2
csv=$("$tool" epoch "$data/synthetic-$rows.csv" "$data/schema.toml")
echo "tessera csv:     $csv" >&2
test_fraction=$(sed -n 's/^test_fraction = //p' "$data/schema.toml")
torch=$("$venv/bin/python" scripts/bench_local_torch.py "$data/synthetic-$rows.parquet" "$test_fraction")
echo "torch parquet:   $torch" >&2
echo "rows=$(field rows "$parquet") rss_peak_mib=$(field rss_peak_mib "$parquet") train_rows_per_s=$(field train_rows_per_s "$parquet") torch_rows_per_s=$(field torch_rows_per_s "$torch")"
