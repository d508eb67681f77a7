#!/usr/bin/env bash
# Round-time benchmark: what secure aggregation costs next to plaintext
# updates, on real processes over mutual TLS on loopback.
#
# One coordinator and N participant daemons run the same job again and again,
# alternating a secure job and its plaintext twin (interleaved, so that drift
# of the machine hits both alike). Sites beyond the four heart-disease
# hospitals reuse their data files under new names (`cleveland-2`, ...): the
# figures are about time, not accuracy.
#
#   scripts/bench_rounds.sh [--repeats K=3] [--bin DIR]
#   scripts/bench_rounds.sh --sites N --model logistic|mlp1m [--rounds R] [--repeats K=3] [--bin DIR]
#
# Without --sites or --model, the whole suite (issue 14): the heart job
# (logistic regression, 4 sites), the 1M-parameter MLP with 4 and with 10
# sites, then `apply_mask` on one core (examples/mask_throughput.rs) and the
# machine's fastest ChaCha20 keystream (`openssl speed -evp chacha20`, 16 KiB
# blocks), all in this run. Its last line is exactly:
#   heart_secure_ms=A heart_plain_ms=B mlp4_secure_s=C mlp4_plain_s=D mlp10_secure_s=E mlp10_plain_s=F mask_gbps=G keystream_limit_gbps=H
# (medians per round). With --sites or --model, one configuration:
# `--bin DIR` runs the binaries in DIR instead of building this checkout's
# (to compare with another commit's release build on the same machine).
#
# `mlp1m` is an MLP with hidden layers [1000, 1000]: 1,018,001 parameters on
# the heart data's 15 features. Reported: the median round time over every
# round of every secure job and of every plaintext job, their ratio, and the
# median time of the consistency-check stage of the secure summations (the
# round trip the malicious-coordinator defence added: every survivor signs
# the set of sites whose masked input was received). The last line is the
# figure in a fixed format:
#   bench_rounds sites=N model=M secure_median_ms=X plain_median_ms=Y ratio=Z consistency_median_ms=W
# (--sites alone keeps the logistic model; --model alone keeps 4 sites.)
set -euo pipefail
shopt -s inherit_errexit  # a failed configuration fails the suite
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
n_sites=4
model=logistic
rounds=""
repeats=3
bin_dir=""
suite=1
while [ $# -gt 0 ]; do
  case "$1" in
    --sites) n_sites="$2"; suite=0; shift 2 ;;
    --model) model="$2"; suite=0; shift 2 ;;
    --rounds) rounds="$2"; shift 2 ;;
    --repeats) repeats="$2"; shift 2 ;;
    --bin) bin_dir="$2"; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
if [ "$suite" = 1 ]; then
  [ -z "$rounds" ] || { echo "--rounds needs --sites or --model (one configuration)" >&2; exit 2; }
  pass=(--repeats "$repeats")
  [ -z "$bin_dir" ] || pass+=(--bin "$bin_dir")
  # Each configuration's report goes to stderr; its figure line is kept.
  figures() {
    local report
    report=$("$0" "$@" "${pass[@]}")
    printf '%s\n' "$report" >&2
    tail -n 1 <<< "$report"
  }
  heart=$(figures --sites 4 --model logistic)
  mlp4=$(figures --sites 4 --model mlp1m)
  mlp10=$(figures --sites 10 --model mlp1m)
  field() { sed -n "s/.* $2=\([0-9.]*\).*/\1/p" <<< "$1"; }
  seconds() { awk -v ms="$(field "$1" "$2")" 'BEGIN { printf "%.3f", ms / 1000 }'; }
  cargo build --release --quiet -p tessera-protocol --example mask_throughput
  mask=$("${CARGO_TARGET_DIR:-$repo/target}/release/examples/mask_throughput" | sed -n 's/^mask_gbps=//p')
  if ! command -v openssl > /dev/null; then
    echo "installing openssl (for the keystream limit)" >&2
    if [ "$(id -u)" = 0 ]; then apt-get install -y -qq openssl > /dev/null; else sudo apt-get install -y -qq openssl > /dev/null; fi
  fi
  # `openssl speed` reports thousands of bytes per second; its last column
  # is 16 KiB blocks, its fastest.
  limit=$(openssl speed -evp chacha20 -seconds 1 2> /dev/null \
    | awk 'tolower($1) == "chacha20" { v = $NF; sub(/k$/, "", v); printf "%.2f", v * 1000 / 1e9 }')
  [ -n "$mask" ] && [ -n "$limit" ] || { echo "error: no mask or keystream figure" >&2; exit 1; }
  echo "heart_secure_ms=$(field "$heart" secure_median_ms) heart_plain_ms=$(field "$heart" plain_median_ms)" \
    "mlp4_secure_s=$(seconds "$mlp4" secure_median_ms) mlp4_plain_s=$(seconds "$mlp4" plain_median_ms)" \
    "mlp10_secure_s=$(seconds "$mlp10" secure_median_ms) mlp10_plain_s=$(seconds "$mlp10" plain_median_ms)" \
    "mask_gbps=$mask keystream_limit_gbps=$limit"
  exit 0
fi

case "$model" in
  logistic) model_toml='kind = "logistic_regression"'; rounds=${rounds:-10} ;;
  mlp1m) model_toml=$'kind = "mlp"\nhidden = [1000, 1000]'; rounds=${rounds:-4} ;;
  *) echo "--model is logistic or mlp1m, not $model" >&2; exit 2 ;;
esac
[ "$n_sites" -ge 3 ] || { echo "--sites must be at least 3 (the smallest secure aggregate)" >&2; exit 2; }

data_dir="$repo/../shared/data/heart-disease"
[ -f "$data_dir/processed.cleveland.data" ] || { echo "error: no heart-disease data in $data_dir" >&2; exit 1; }
if [ -n "$bin_dir" ]; then
  bin=$(cd "$bin_dir" && pwd)
else
  cargo build --release --quiet --bins
  bin="${CARGO_TARGET_DIR:-$repo/target}/release"
fi
# Older builds generate a site's key without being asked.
generate_key=""
"$bin/tessera" ca issue --help | grep -q -- --generate-key && generate_key="--generate-key"
run_dir="$repo/runs/bench-rounds-$(date +%Y%m%d-%H%M%S)-$$"
mkdir -p "$run_dir/sites"

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

hospitals=(cleveland hungarian switzerland va)
names=(cleveland hungary switzerland va)
ca="$run_dir/ca"
"$bin/tessera" ca init --consortium bench-rounds --out "$ca" > /dev/null
sites=()
for i in $(seq 0 $((n_sites - 1))); do
  h=$((i % 4))
  name=${names[$h]}
  [ "$i" -ge 4 ] && name="$name-$((i / 4 + 1))"
  sites+=("$name")
  cat > "$run_dir/sites/$name.toml" <<EOF
site_id = "$name"
[data]
path = "$data_dir/processed.${hospitals[$h]}.data"
schema = "$repo/examples/heart-disease/schema.toml"
EOF
  "$bin/tessera" ca issue --ca "$ca" --site "$name" $generate_key > /dev/null
done
"$bin/tessera" ca issue --ca "$ca" --operator lead $generate_key > /dev/null
export TESSERA_TLS_DIR="$ca/operators/lead"

"$bin/tessera-coordinator" --listen 127.0.0.1:0 --port-file "$run_dir/port" \
  --db "$run_dir/coordinator.db" --roster "$ca/roster.toml" --tls-dir "$ca/coordinator" \
  2> "$run_dir/coordinator.log" &
pids+=("$!")
for _ in $(seq 100); do [ -s "$run_dir/port" ] && break; sleep 0.1; done
[ -s "$run_dir/port" ] || { echo "error: coordinator did not start; see $run_dir/coordinator.log" >&2; exit 1; }
addr="https://127.0.0.1:$(cat "$run_dir/port")"
for s in "${sites[@]}"; do
  "$bin/tessera-participant" run --config "$run_dir/sites/$s.toml" \
    --coordinator "$addr" --state-dir "$ca/sites/$s" --tls-dir "$ca/sites/$s" --roster "$ca/roster.toml" \
    --allow-insecure-plaintext 2> "$run_dir/site-$s.log" &
  pids+=("$!")
done

# The secure job and its plaintext twin: same model, data, seed and steps.
common="rounds = $rounds
seed = 1
min_sites = 3

[model]
$model_toml

[training]
optimizer = \"sgd\"
learning_rate = 0.01
batch_size = 16
local_epochs = 1

[strategy]
kind = \"fedavg\"

[timing]
round_timeout_s = 300
dropout_after_s = 60
wait_for_sites_s = 300
"
printf 'name = "bench-secure"\n%s\n[secure_aggregation]\nclip_norm = 10.0\nweight_cap = 1000\ngraph = "complete"\n' \
  "$common" > "$run_dir/secure.toml"
printf 'insecure_plaintext = true\nname = "bench-plain"\n%s' "$common" > "$run_dir/plain.toml"

run_job() { # mode repeat
  local id
  id=$("$bin/tessera" --coordinator "$addr" job submit "$run_dir/$1.toml")
  until "$bin/tessera" --coordinator "$addr" job status "$id" --json > "$run_dir/$1-$2.json" \
        && python3 -c "import json,sys; s=json.load(open(sys.argv[1]))['job']['status']; sys.exit(0 if s in ('finished','failed','cancelled') else 1)" "$run_dir/$1-$2.json"; do
    sleep 0.2
  done
  python3 -c "import json,sys; j=json.load(open(sys.argv[1]))['job']; sys.exit(0 if j['status']=='finished' else f\"job {j['job_id']} {j['status']}: {j['error']}\")" "$run_dir/$1-$2.json"
  echo "$1 job $id done ($2/$repeats)" >&2
}
for r in $(seq 1 "$repeats"); do
  run_job secure "$r"
  run_job plain "$r"
done

python3 - "$run_dir" "$repeats" "$n_sites" "$model" <<'PY'
import json, re, statistics, sys
run_dir, repeats, n_sites, model = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
def rounds(mode):
    return [r["duration_ms"] for k in range(1, repeats + 1)
            for r in json.load(open(f"{run_dir}/{mode}-{k}.json"))["rounds"]]
secure, plain = rounds("secure"), rounds("plain")
ansi = re.compile(r"\x1b\[[0-9;]*m")
stage = re.compile(r'stage="?([a-z ]+?)"? stage_ms=(\d+)')
phases = {}
for line in open(f"{run_dir}/coordinator.log"):
    m = stage.search(ansi.sub("", line))
    if m and "secure aggregation stage closed" in line:
        phases.setdefault(m.group(1), []).append(int(m.group(2)))
sm, pm = statistics.median(secure), statistics.median(plain)
print(f"{n_sites} sites, model {model}, {len(secure)} secure and {len(plain)} plaintext rounds (logs in {run_dir})")
print(f"round time, secure:    median {sm:.0f} ms (min {min(secure)}, max {max(secure)})")
print(f"round time, plaintext: median {pm:.0f} ms (min {min(plain)}, max {max(plain)})")
for name in ["advertise keys", "share keys", "masked input", "consistency check", "unmask"]:
    xs = phases.get(name, [])
    if xs:
        print(f"  secure stage {name:<18} median {statistics.median(xs):>6.0f} ms over {len(xs)} summations")
consistency = statistics.median(phases.get("consistency check", [0]))
print(f"bench_rounds sites={n_sites} model={model} secure_median_ms={sm:.0f} plain_median_ms={pm:.0f} "
      f"ratio={sm / pm:.2f} consistency_median_ms={consistency:.0f}")
PY
