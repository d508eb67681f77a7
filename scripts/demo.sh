#!/usr/bin/env bash
# The main job: a coordinator and four hospital participants on loopback train
# one model on the real UCI heart-disease data (../shared/data/heart-disease),
# with per-round progress, then the final test accuracy per site, the mean over
# sites, and the pooled (centralised) baseline.
#
#   scripts/demo.sh                 # the demo, with a live progress bar
#   scripts/demo.sh --seed 3 --quiet --json-out FILE   # used by the benchmark
#   scripts/demo.sh --insecure-plaintext                # same job without secure aggregation
#   scripts/demo.sh --job examples/heart-severe/job.toml --sites examples/heart-severe/sites
#                                   # another task on the same hospitals' data
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
seed=""
quiet=0
plaintext=0
json_out=""
job_file="examples/heart-disease/job.toml"
sites_dir="examples/heart-disease/sites"
while [ $# -gt 0 ]; do
  case "$1" in
    --seed) seed="$2"; shift 2 ;;
    --job) job_file="$2"; shift 2 ;;
    --sites) sites_dir="$2"; shift 2 ;;
    --quiet) quiet=1; shift ;;
    --insecure-plaintext) plaintext=1; shift ;;
    --json-out) json_out="$2"; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done

data_dir="$repo/../shared/data/heart-disease"
if [ ! -f "$data_dir/processed.cleveland.data" ]; then
  echo "error: heart-disease data not found in $data_dir (expected ../shared beside the repo)" >&2
  exit 1
fi

# The sites read plain files: the participant is built without SQL cohorts
# (its `sql` feature, an embedded query engine), which saves most of a clean
# release build.
cargo build --release --quiet --bins -p tessera-coordinator -p tessera-participant --no-default-features
target_dir="${CARGO_TARGET_DIR:-target}"
case "$target_dir" in /*) ;; *) target_dir="$repo/$target_dir" ;; esac
bin="$target_dir/release"
run_dir="$repo/runs/demo-$(date +%Y%m%d-%H%M%S)-$$"
mkdir -p "$run_dir"
sites=(cleveland hungary switzerland va)

job="$run_dir/job.toml"
cp "$job_file" "$job"
if [ -n "$seed" ]; then
  sed -i "s/^seed = .*/seed = $seed/" "$job"
fi
plaintext_flag=()
if [ "$plaintext" = 1 ]; then
  # For comparison only: the same job with updates in the clear.
  sed -i -e '/^\[secure_aggregation\]/,/^$/d' -e '0,/^name = /s//insecure_plaintext = true\nname = /' "$job"
  plaintext_flag=(--allow-insecure-plaintext)
fi

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

# The consortium is provisioned for this run: a CA, the coordinator's kit, one
# kit per hospital (TLS certificate, Ed25519 key, roster) and the ML lead's.
# Every connection below is mutual TLS. On one machine the CA makes every key
# (--generate-key); in a real deployment each hospital runs
# `tessera-participant enroll` and the CA only signs (see README).
ca="$run_dir/ca"
"$bin/tessera" ca init --consortium heart-disease-demo --out "$ca" > /dev/null
for s in "${sites[@]}"; do
  "$bin/tessera" ca issue --ca "$ca" --site "$s" --generate-key > /dev/null
done
"$bin/tessera" ca issue --ca "$ca" --operator lead --generate-key > /dev/null
export TESSERA_TLS_DIR="$ca/operators/lead"

"$bin/tessera-coordinator" --listen 127.0.0.1:0 --port-file "$run_dir/port" \
  --db "$run_dir/coordinator.db" --roster "$ca/roster.toml" --tls-dir "$ca/coordinator" \
  2> "$run_dir/coordinator.log" &
coordinator_pid=$!
pids+=("$coordinator_pid")
for _ in $(seq 100); do [ -s "$run_dir/port" ] && break; sleep 0.1; done
[ -s "$run_dir/port" ] || { echo "error: coordinator did not start; see $run_dir/coordinator.log" >&2; exit 1; }
addr="https://127.0.0.1:$(cat "$run_dir/port")"

participant_pids=()
for s in "${sites[@]}"; do
  "$bin/tessera-participant" run --config "$sites_dir/$s.toml" \
    --coordinator "$addr" --state-dir "$ca/sites/$s" --tls-dir "$ca/sites/$s" --roster "$ca/roster.toml" \
    "${plaintext_flag[@]}" 2> "$run_dir/site-$s.log" &
  pids+=("$!")
  participant_pids+=("$!")
done

[ "$quiet" = 1 ] || echo "coordinator on $addr (mutual TLS), sites: ${sites[*]}; logs in $run_dir"
job_id=$("$bin/tessera" --coordinator "$addr" job submit "$job")
start=$(date +%s.%N)
if [ "$quiet" = 1 ]; then
  until "$bin/tessera" --coordinator "$addr" job status "$job_id" --json > "$run_dir/status.json" \
        && python3 -c "import json,sys; s=json.load(open(sys.argv[1]))['job']['status']; sys.exit(0 if s in ('finished','failed','cancelled') else 1)" "$run_dir/status.json"; do
    sleep 0.5
  done
else
  "$bin/tessera" --coordinator "$addr" job status "$job_id" --watch || true
fi
end=$(date +%s.%N)
"$bin/tessera" --coordinator "$addr" job status "$job_id" --json > "$run_dir/status.json"

# Peak resident memory (VmHWM) of the coordinator and of one participant.
peak() { awk '/VmHWM/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
coord_kb=$(peak "$coordinator_pid")
site_kb=$(peak "${participant_pids[0]}")

configs=()
for s in "${sites[@]}"; do configs+=(--config "$sites_dir/$s.toml"); done
baseline_args=()
[ -n "$seed" ] && baseline_args=(--seed "$seed")
"$bin/tessera-participant" pooled-baseline --job "$job" "${configs[@]}" "${baseline_args[@]}" --json \
  > "$run_dir/baseline.json" 2> "$run_dir/baseline.log"

summary_rc=0
python3 - "$run_dir/status.json" "$run_dir/baseline.json" "$start" "$end" "$coord_kb" "$site_kb" "$json_out" "$quiet" "$plaintext" <<'PY' || summary_rc=$?
import json, sys
status = json.load(open(sys.argv[1])); baseline = json.load(open(sys.argv[2]))
start, end = float(sys.argv[3]), float(sys.argv[4])
coord_kb, site_kb, json_out, quiet = int(sys.argv[5]), int(sys.argv[6]), sys.argv[7], sys.argv[8] == "1"
job = status["job"]
last = job["rounds_done"]
final = [m for m in status["metrics"] if m["model_of_round"] == last]
rounds = status["rounds"]
per_round_ms = sorted(r["duration_ms"] for r in rounds)
median_ms = per_round_ms[len(per_round_ms) // 2] if per_round_ms else 0
fed_mean = sum(m["accuracy"] for m in final) / len(final) if final else float("nan")
result = {
    "status": job["status"], "error": job["error"], "rounds": last, "strategy": job["strategy"],
    "model": job["model"], "federated_mean_accuracy": fed_mean,
    "federated_per_site": {m["site_id"]: m["accuracy"] for m in final},
    "federated_pooled": status.get("final_pooled"),
    "pooled_mean_accuracy": baseline["mean_accuracy"],
    "pooled_per_site": {s["site_id"]: s["accuracy"] for s in baseline["per_site"]},
    "central_pooled": baseline.get("pooled"),
    "wall_s": end - start, "median_round_ms": median_ms, "plaintext": sys.argv[9] == "1",
    "coordinator_peak_rss_kb": coord_kb, "participant_peak_rss_kb": site_kb,
}
if json_out:
    json.dump(result, open(json_out, "w"), indent=2)
if not quiet:
    print()
    print(f"job {job['job_id']} {job['status']}: {last} rounds of {job['strategy']} on {job['model']}"
          + (f" ({job['error']})" if job["error"] else ""))
    print("the final federated model on each site's test split, next to the centralised reference")
    print("(a development aid: the same model trained on all sites' training rows in one process):")
    def cell(v, width):
        return f"{v:>{width}.4f}" if isinstance(v, (int, float)) else f"{'n/a':>{width}}"
    central = {s["site_id"]: s for s in baseline["per_site"]}
    print(f"{'test split':<18}{'n_test':>7}{'accuracy':>10}{'roc_auc':>9}{'brier':>8}   "
          f"{'central acc':>11}{'roc_auc':>9}")
    def row(name, n, fed, ref):
        fed, ref = fed or {}, ref or {}
        print(f"{name:<18}{n:>7}{cell(fed.get('accuracy'), 10)}{cell(fed.get('roc_auc'), 9)}"
              f"{cell(fed.get('brier'), 8)}   {cell(ref.get('accuracy'), 11)}{cell(ref.get('roc_auc'), 9)}")
    for m in final:
        row(m["site_id"], m["n_test"], m, central.get(m["site_id"]))
    print(f"{'mean over sites':<25}{cell(fed_mean, 10)}{'':>20}{cell(baseline['mean_accuracy'], 11)}")
    fp = result["federated_pooled"]
    if fp:
        row("pooled (secure)", fp["n_test"], fp, result["central_pooled"])
        print(f"pooled by secure sum over {fp['n_sites']} sites: average precision {cell(fp.get('average_precision'), 0)}, "
              f"calibration intercept {cell(fp.get('calibration_intercept'), 0)}, slope {cell(fp.get('calibration_slope'), 0)}; "
              f"at threshold {fp.get('threshold')}: sensitivity {cell(fp.get('sensitivity'), 0)}, "
              f"specificity {cell(fp.get('specificity'), 0)}, PPV {cell(fp.get('ppv'), 0)}")
    print("(n/a: undefined, e.g. a ROC AUC where a test split has one class)")
    print(f"wall time {result['wall_s']:.1f} s, median round {median_ms} ms; "
          f"peak RSS coordinator {coord_kb/1024:.1f} MiB, participant {site_kb/1024:.1f} MiB")
sys.exit(0 if job["status"] == "finished" else 1)
PY

# The ledger every round was written to, as a regulator would check it.
if [ "$quiet" != 1 ]; then
  echo
  "$bin/tessera" ledger verify --allow-pending "$run_dir/coordinator.db" || summary_rc=1
  "$bin/tessera" ledger report "$run_dir/coordinator.db" --out "$run_dir/ledger-report.html" 2> /dev/null \
    && echo "  regulator's report: $run_dir/ledger-report.html"
fi
exit "$summary_rc"
