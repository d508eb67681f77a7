#!/usr/bin/env bash
# What a job held for a site's data team costs that site in requests (issue
# 10: "a held job costs the site < 1 request/s"). Four hospitals on loopback
# with mutual TLS; hungary's policy allows 1 round, so it holds the job (a
# secure heart job of ROUNDS rounds) while the other three train it. Counts
# the HTTP/2 HEADERS frames (one per gRPC call) hungary sends during
# SECONDS, with h2's debug log, then the same with no job running.
#
#   scripts/bench_held_site.sh [ROUNDS] [SECONDS]      (defaults: 900, 60)
#
# TESSERA_BIN=DIR uses the binaries in DIR instead of building release ones.
# Last line: held_site_requests_per_s=<while the job runs> idle_requests_per_s=<with no job>
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
rounds=${1:-900}
seconds=${2:-60}
if [ -n "${TESSERA_BIN:-}" ]; then
  bin="$TESSERA_BIN"
else
  cargo build --release --quiet --bins -p tessera-coordinator -p tessera-participant --no-default-features
  target_dir="${CARGO_TARGET_DIR:-target}"
  case "$target_dir" in /*) ;; *) target_dir="$repo/$target_dir" ;; esac
  bin="$target_dir/release"
fi
run_dir="$repo/runs/held-$(date +%Y%m%d-%H%M%S)-$$"
mkdir -p "$run_dir"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

ca="$run_dir/ca"
"$bin/tessera" ca init --consortium held --out "$ca" > /dev/null
for s in cleveland hungary switzerland va; do
  "$bin/tessera" ca issue --ca "$ca" --site "$s" --generate-key > /dev/null
done
"$bin/tessera" ca issue --ca "$ca" --operator lead --generate-key > /dev/null
export TESSERA_TLS_DIR="$ca/operators/lead"
"$bin/tessera-coordinator" --listen 127.0.0.1:0 --port-file "$run_dir/port" --db "$run_dir/coordinator.db" \
  --roster "$ca/roster.toml" --tls-dir "$ca/coordinator" 2> "$run_dir/coordinator.log" &
pids+=($!)
for _ in $(seq 200); do [ -s "$run_dir/port" ] && break; sleep 0.05; done
addr="https://127.0.0.1:$(cat "$run_dir/port")"
echo "max_rounds = 1" > "$run_dir/hungary-policy.toml"
for s in cleveland hungary switzerland va; do
  extra=(); filter=info
  if [ "$s" = hungary ]; then extra=(--policy "$run_dir/hungary-policy.toml"); filter=info,h2=debug; fi
  RUST_LOG=$filter "$bin/tessera-participant" run --config "examples/heart-disease/sites/$s.toml" \
    --coordinator "$addr" --state-dir "$ca/sites/$s" --tls-dir "$ca/sites/$s" --roster "$ca/roster.toml" \
    "${extra[@]}" 2> "$run_dir/$s.log" &
  pids+=($!)
done
count() { grep -c 'send frame=Headers' "$run_dir/hungary.log" || true; }
rate() {  # requests per second over $seconds
  local a b
  a=$(count); sleep "$seconds"; b=$(count)
  python3 -c "print(f'{($b - $a) / $seconds:.2f}')"
}
sleep 3
sed -e "s/^rounds = .*/rounds = $rounds/" examples/heart-disease/job.toml > "$run_dir/job.toml"
job=$("$bin/tessera" --coordinator "$addr" job submit "$run_dir/job.toml" 2>> "$run_dir/cli.log")
sleep 5
held=$(rate)
state=$("$bin/tessera" --coordinator "$addr" job status "$job" --json 2>> "$run_dir/cli.log" \
  | python3 -c "import json,sys; j=json.load(sys.stdin)['job']; print(j['status'], j['rounds_done'])")
echo "job $job after the window: $state (a job that ended inside the window makes the first rate an idle one)"
"$bin/tessera" --coordinator "$addr" job cancel "$job" > /dev/null 2>&1 || true
sleep 3
idle=$(rate)
echo "logs in $run_dir"
echo "held_site_requests_per_s=$held idle_requests_per_s=$idle"
