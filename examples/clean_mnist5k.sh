#!/usr/bin/env bash
# The README's measured pivotal-clean run: MNIST-5k's 4,000 training digits with 40% uniform
# label noise written as an .npz, its validation and test digits as --val / --test, budget 60 =
# 30 random + 2 rounds of 15, method rbc, --model auto (LeNet-5), seed 0. The person is played
# from the ground truth: each to_label.csv is copied with its `label` column filled in.
#   bash examples/clean_mnist5k.sh [WORKDIR]      (default /tmp/clean-mnist5k; run from the repo root)
set -euo pipefail
DIR=${1:-/tmp/clean-mnist5k}
rm -rf "$DIR" && mkdir -p "$DIR"
python3 - "$DIR" <<'PY'
import sys, numpy as np
from experiments import noise
from experiments.datasets import load_dataset
d, out = load_dataset("mnist5k", seed=0), sys.argv[1]
noisy = noise.uniform(d.y_train, 0.4, 10, seed=0).labels
np.savez(f"{out}/train.npz", x=d.x_train, y=noisy)
np.save(f"{out}/truth.npy", d.y_train)
np.savez(f"{out}/val.npz", x=d.x_val, y=d.y_val)
np.savez(f"{out}/test.npz", x=d.x_test, y=d.y_test)
print(f"wrote {out}/train.npz: realised noise {np.mean(noisy != d.y_train):.3f}")
PY
answer() {  # answer ROUND: the person labels round-ROUND/to_label.csv from the ground truth
  python3 - "$DIR" "$1" <<'PY'
import csv, sys, numpy as np
out, r = sys.argv[1], sys.argv[2]
truth = np.load(f"{out}/truth.npy")
rows = list(csv.DictReader(open(f"{out}/work/round-{r}/to_label.csv")))
with open(f"{out}/answers-{r}.csv", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0])); w.writeheader()
    for row in rows:
        row["label"] = str(truth[int(row["id"])]); w.writerow(row)
PY
}
step() { local t0=$SECONDS; "$@"; echo "step '${*:1:2}': $((SECONDS - t0)) s"; }
T0=$SECONDS
step pivotal-clean start --data "$DIR/train.npz" --val "$DIR/val.npz" --test "$DIR/test.npz" \
    --work "$DIR/work" --budget 60 --warmup 30 --rounds 2 --method rbc --seed 0
answer 0; step pivotal-clean next --work "$DIR/work" --labels "$DIR/answers-0.csv"
answer 1; step pivotal-clean next --work "$DIR/work" --labels "$DIR/answers-1.csv"
answer 2; step pivotal-clean finish --work "$DIR/work" --labels "$DIR/answers-2.csv" --base
echo "total: $((SECONDS - T0)) s"
python3 - "$DIR" <<'PY'
import csv, json, sys, numpy as np
out = sys.argv[1]
truth, noisy = np.load(f"{out}/truth.npy"), np.load(f"{out}/train.npz")["y"]
rows = list(csv.DictReader(open(f"{out}/work/suspects.csv")))
ids = np.array([int(r["id"]) for r in rows])
bad = noisy[ids] != truth[ids]
for f in (0.05, 0.1, 0.2, 0.4):
    k = round(f * len(rows))
    print(f"suspects' precision, top {f:.0%} ({k} of {len(rows)}): {bad[:k].mean():.3f}")
print(f"wrong given labels among the unlabelled: {bad.mean():.3f}")
print(json.dumps(json.load(open(f"{out}/work/state.json")).get("summary"), indent=1))
PY
