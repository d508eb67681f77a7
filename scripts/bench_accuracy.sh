#!/usr/bin/env bash
# Accuracy benchmark of the main job: runs the four-hospital federation for
# several seeds (initial model and minibatch order; the FLamby split is fixed)
# and reports the mean over sites of the federated test accuracy and of the
# pooled baseline, as mean ± std over seeds, plus round time and peak memory.
#
#   scripts/bench_accuracy.sh [N_SEEDS=5] [--insecure-plaintext]
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
n_seeds=${1:-5}
extra=()
[ "${2:-}" = "--insecure-plaintext" ] && extra=(--insecure-plaintext)
job=examples/heart-disease/job.toml
out_dir="$repo/runs/bench-accuracy-$(date +%Y%m%d-%H%M%S)"
mkdir -p "$out_dir"
for seed in $(seq 1 "$n_seeds"); do
  scripts/demo.sh --quiet --seed "$seed" --job "$job" --json-out "$out_dir/seed-$seed.json" "${extra[@]}"
  echo "seed $seed done" >&2
done
python3 - "$out_dir" "$n_seeds" <<'PY'
import json, statistics, sys
out_dir, n = sys.argv[1], int(sys.argv[2])
runs = [json.load(open(f"{out_dir}/seed-{s}.json")) for s in range(1, n + 1)]
def ms(xs):
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)
fed = [r["federated_mean_accuracy"] for r in runs]
pooled = [r["pooled_mean_accuracy"] for r in runs]
gap = [p - f for f, p in zip(fed, pooled)]
print(f"job: {runs[0]['rounds']} rounds of {runs[0]['strategy']} on {runs[0]['model']}, {n} seeds, "
      f"{'plaintext' if runs[0].get('plaintext') else 'secure'} aggregation")
for r, s in zip(runs, range(1, n + 1)):
    print(f"  seed {s}: federated {r['federated_mean_accuracy']:.4f}  central {r['pooled_mean_accuracy']:.4f}  "
          f"median round {r['median_round_ms']} ms  wall {r['wall_s']:.1f} s")
print("mean site accuracy, federated: %.4f ± %.4f" % ms(fed))
print("mean site accuracy, central:   %.4f ± %.4f" % ms(pooled))
print("central - federated:           %.4f ± %.4f (max %.4f)" % (*ms(gap), max(gap)))
print("median round time: %d ms (median over seeds)" % statistics.median(r["median_round_ms"] for r in runs))
print("peak RSS: coordinator %.1f MiB, participant %.1f MiB (max over seeds)" % (
    max(r["coordinator_peak_rss_kb"] for r in runs) / 1024, max(r["participant_peak_rss_kb"] for r in runs) / 1024))
ok = statistics.mean(fed) >= 0.78 and statistics.mean(gap) <= 0.02
print("target (federated >= 0.78, within 2 points of central):", "met" if ok else "NOT met")
json.dump({"federated": ms(fed), "pooled": ms(pooled), "runs": runs}, open(f"{out_dir}/summary.json", "w"), indent=2)
PY
