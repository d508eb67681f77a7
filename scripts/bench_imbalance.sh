#!/usr/bin/env bash
# Imbalanced-task benchmark (issue 11): federated logistic regression with a
# "balanced" class weight on severe heart disease (num >= 3: 100 of 740 rows,
# 13.5 %, four real hospitals; examples/heart-severe/) against the same model
# trained centrally on the union of the training rows. Both are judged by
# the ROC AUC on all sites' test rows pooled: the federated one from the
# score histograms summed securely, the central one exactly.
#
#   scripts/bench_imbalance.sh [N_SEEDS=3]
#
# The last line is the figure:
#   pooled_auc_federated=<median> pooled_auc_central=<median> gap=<median |fed - central|>
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
n_seeds=${1:-3}
out_dir="$repo/runs/bench-imbalance-$(date +%Y%m%d-%H%M%S)"
mkdir -p "$out_dir"
for seed in $(seq 1 "$n_seeds"); do
  scripts/demo.sh --quiet --seed "$seed" --job examples/heart-severe/job.toml --sites examples/heart-severe/sites \
    --json-out "$out_dir/seed-$seed.json"
  echo "seed $seed done" >&2
done
python3 - "$out_dir" "$n_seeds" <<'PY'
import json, statistics, sys
out_dir, n = sys.argv[1], int(sys.argv[2])
runs = [json.load(open(f"{out_dir}/seed-{s}.json")) for s in range(1, n + 1)]
fed, central = [], []
for s, r in zip(range(1, n + 1), runs):
    f, c = r["federated_pooled"], r["central_pooled"]
    fed.append(f["roc_auc"]); central.append(c["roc_auc"])
    print(f"seed {s}: pooled ROC AUC federated {f['roc_auc']:.4f} (AP {f['average_precision']:.4f}, "
          f"Brier {f['brier']:.4f}), central {c['roc_auc']:.4f} (AP {c['average_precision']:.4f}, "
          f"Brier {c['brier']:.4f}); {f['n_test']} test rows")
gaps = [abs(a - b) for a, b in zip(fed, central)]
print(f"pooled_auc_federated={statistics.median(fed):.4f} pooled_auc_central={statistics.median(central):.4f} "
      f"gap={statistics.median(gaps):.4f}")
PY
