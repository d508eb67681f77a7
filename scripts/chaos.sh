#!/usr/bin/env bash
# Chaos run: a coordinator and four hospitals (the heart-disease demo, mutual
# TLS, secure aggregation) run jobs back to back while processes are killed
# with SIGKILL at random moments (the coordinator N times, and a random site
# about as often in between) and started again at once. Then every job is
# waited for, the processes are stopped cleanly, and the coordinator's
# ledger is verified.
#
#   scripts/chaos.sh [--kills N] [--jobs J] [--rounds R] [--seed S] [--sites-only]
#
# --sites-only never kills the coordinator (a site's crash and rejoin alone);
# N then counts site kills. After the jobs, the same job runs once more with
# nothing killed: the reference for their final accuracy.
#
# Prints, as its last line:
#   kills=<N> jobs_completed=<C> ledger_intact=<yes|no> rounds_counted_twice=<D>
# jobs_completed counts jobs that finished (not failed or cancelled);
# rounds_counted_twice counts (job, round) pairs with more than one
# round_completed block. Logs, databases and the job list stay in runs/.
#
# TESSERA_BIN=DIR uses the binaries in DIR instead of building release ones.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
kills=20
jobs=5
rounds=200
seed=1
sites_only=0
while [ $# -gt 0 ]; do
  case "$1" in
    --kills) kills="$2"; shift 2 ;;
    --jobs) jobs="$2"; shift 2 ;;
    --rounds) rounds="$2"; shift 2 ;;
    --seed) seed="$2"; shift 2 ;;
    --sites-only) sites_only=1; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
RANDOM=$seed

if [ -n "${TESSERA_BIN:-}" ]; then
  bin="$TESSERA_BIN"
else
  cargo build --release --quiet --bins -p tessera-coordinator -p tessera-participant --no-default-features
  target_dir="${CARGO_TARGET_DIR:-target}"
  case "$target_dir" in /*) ;; *) target_dir="$repo/$target_dir" ;; esac
  bin="$target_dir/release"
fi
run_dir="$repo/runs/chaos-$(date +%Y%m%d-%H%M%S)-$$"
mkdir -p "$run_dir"
sites=(cleveland hungary switzerland va)

declare -A pid
cleanup() { for p in "${pid[@]}"; do kill -9 "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

ca="$run_dir/ca"
"$bin/tessera" ca init --consortium chaos --out "$ca" > /dev/null
for s in "${sites[@]}"; do
  "$bin/tessera" ca issue --ca "$ca" --site "$s" --generate-key > /dev/null
done
"$bin/tessera" ca issue --ca "$ca" --operator lead --generate-key > /dev/null
export TESSERA_TLS_DIR="$ca/operators/lead"

listen="127.0.0.1:0"
start_coordinator() {
  rm -f "$run_dir/port"
  "$bin/tessera-coordinator" --listen "$listen" --port-file "$run_dir/port" \
    --db "$run_dir/coordinator.db" --roster "$ca/roster.toml" --tls-dir "$ca/coordinator" \
    2>> "$run_dir/coordinator.log" &
  pid[coordinator]=$!
  for _ in $(seq 200); do [ -s "$run_dir/port" ] && break; sleep 0.05; done
  [ -s "$run_dir/port" ] || { echo "error: the coordinator did not start; see $run_dir/coordinator.log" >&2; exit 1; }
  # Restarts listen on the same port, as a service would.
  listen="127.0.0.1:$(cat "$run_dir/port")"
}
start_site() {
  "$bin/tessera-participant" run --config "examples/heart-disease/sites/$1.toml" \
    --coordinator "https://$listen" --state-dir "$ca/sites/$1" --tls-dir "$ca/sites/$1" \
    --roster "$ca/roster.toml" 2>> "$run_dir/site-$1.log" &
  pid[$1]=$!
}
start_coordinator
addr="https://$listen"
for s in "${sites[@]}"; do start_site "$s"; done

# Short timeouts, so that a killed site is dropped in seconds, not minutes.
job="$run_dir/job.toml"
sed -e "s/^rounds = .*/rounds = $rounds/" -e "s/^seed = .*/seed = $seed/" \
  -e "s/^round_timeout_s = .*/round_timeout_s = 20/" -e "s/^dropout_after_s = .*/dropout_after_s = 3/" \
  examples/heart-disease/job.toml > "$job"
submitted=0
until [ "$submitted" = "$jobs" ]; do
  if "$bin/tessera" --coordinator "$addr" job submit "$job" > /dev/null 2>> "$run_dir/cli.log"; then
    submitted=$((submitted + 1))
  else
    sleep 0.2
  fi
done

all_ended() {
  "$bin/tessera" --coordinator "$addr" job list --json > "$run_dir/jobs.json" 2>> "$run_dir/cli.log" \
    && python3 -c "import json,sys; j=json.load(open(sys.argv[1])); sys.exit(0 if j and all(x['status'] in ('finished','failed','cancelled') for x in j) else 1)" \
       "$run_dir/jobs.json"
}

# N counts the coordinator's kills, one per turn of the loop; before it, a
# random site is killed too, one turn in two (--sites-only: N counts site
# kills, and the coordinator is never killed). A kill of the coordinator
# every turn, not on a coin toss: N kills fit in the jobs' run time however
# fast the machine runs them.
done_kills=0
site_kills=0
kill_and_restart() {
  kill -9 "${pid[$1]}" 2>/dev/null || true
  wait "${pid[$1]}" 2>/dev/null || true
  echo "$(date +%T) kill -9 $1" >> "$run_dir/kills.log"
  if [ "$1" = coordinator ]; then start_coordinator; else start_site "$1"; fi
}
while [ "$done_kills" -lt "$kills" ] && ! all_ended; do
  if [ "$sites_only" = 1 ] || [ $((RANDOM % 2)) = 0 ]; then
    sleep "$((RANDOM % 2 + 1)).$((RANDOM % 10))"
    kill_and_restart "${sites[$((RANDOM % 4))]}"
    site_kills=$((site_kills + 1))
    [ "$sites_only" = 1 ] && done_kills=$((done_kills + 1)) && continue
  fi
  sleep "$((RANDOM % 2 + 1)).$((RANDOM % 10))"
  all_ended && break
  kill_and_restart coordinator
  done_kills=$((done_kills + 1))
done

# Every job ends (finished, or failed with its reason) within ten minutes.
for _ in $(seq 1200); do all_ended && break; sleep 0.5; done
completed=$(python3 -c "import json,sys; print(sum(x['status']=='finished' for x in json.load(open(sys.argv[1]))))" "$run_dir/jobs.json")

# The same job once more, with nothing killed: the reference for the final
# accuracy of the jobs above.
reference=""
if "$bin/tessera" --coordinator "$addr" job submit "$job" > "$run_dir/reference.id" 2>> "$run_dir/cli.log"; then
  for _ in $(seq 1200); do all_ended && break; sleep 0.5; done
  reference=$(grep -o '[0-9]\+' "$run_dir/reference.id" | head -1)
fi
final_accuracy() {
  "$bin/tessera" --coordinator "$addr" job status "$1" --json 2>> "$run_dir/cli.log" \
    | python3 -c "import json,sys; a=json.load(sys.stdin).get('final_pooled_accuracy'); print('n/a' if a is None else f'{a:.4f}')"
}

: > "$run_dir/accuracy.log"
for id in $(python3 -c "import json,sys; print(' '.join(str(x['job_id']) for x in json.load(open(sys.argv[1]))))" "$run_dir/jobs.json"); do
  label="job $id"; [ "$id" = "$reference" ] && label="job $id (reference, nothing killed)"
  echo "$label: final pooled accuracy $(final_accuracy "$id")" >> "$run_dir/accuracy.log"
done

# Stop cleanly (SIGTERM: the databases are checkpointed), then verify.
for p in "${pid[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
wait 2>/dev/null || true
pid=()
intact=no
"$bin/tessera" ledger verify --allow-pending "$run_dir/coordinator.db" > "$run_dir/verify.log" 2>&1 && intact=yes
"$bin/tessera" ledger show "$run_dir/coordinator.db" --json > "$run_dir/ledger.json" 2>> "$run_dir/verify.log" || true
twice=$(python3 - "$run_dir/ledger.json" <<'PY'
import collections, json, sys
try:
    blocks = json.load(open(sys.argv[1]))
except ValueError:
    print(-1)
    sys.exit()
seen = collections.Counter((b["payload"]["job_id"], b["payload"]["round"])
                           for b in blocks if b["kind"] == "round_completed")
print(sum(1 for n in seen.values() if n > 1))
PY
)
python3 -c "import json,sys; [print(f\"job {x['job_id']}: {x['status']}\", x.get('error','')) for x in json.load(open(sys.argv[1]))]" "$run_dir/jobs.json"
cat "$run_dir/accuracy.log"
echo "logs in $run_dir"
echo "site kills: $site_kills"
echo "kills=$done_kills jobs_completed=$completed ledger_intact=$intact rounds_counted_twice=$twice"
