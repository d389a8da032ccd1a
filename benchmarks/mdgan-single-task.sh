#!/usr/bin/env bash
# MD-GAN on one task (benchmarks/workloads/mnist-1task-4workers.yaml), one run per seed; prints
# each seed's FID at every evaluation. The README's before/after table comes from this script run
# once on the code before the MD-GAN faithfulness changes and once after.
#
#   benchmarks/mdgan-single-task.sh OUT_DIR [SEED ...]     (default seeds: 0 1 2)
set -euo pipefail
out=${1:?usage: $0 OUT_DIR [SEED ...]}; shift
[ $# -gt 0 ] && seeds=("$@") || seeds=(0 1 2)
here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-python}
mkdir -p "$out"
for seed in "${seeds[@]}"; do
  sed "s/^seed: .*/seed: $seed/; s/^name: .*/name: mdgan-single-task-seed$seed/" \
    "$here/workloads/mnist-1task-4workers.yaml" > "$out/seed$seed.yaml"
  "$python" -m entgan.cli run "$out/seed$seed.yaml" --run-dir "$out/seed$seed" --overwrite --no-progress > "$out/seed$seed.log" 2>&1
  "$python" - "$out/seed$seed/metrics.jsonl" "$seed" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
print(f"seed {sys.argv[2]}: " + ", ".join(f"round {r['round']} FID {r['fid/overall']:.1f}" for r in rows if "fid/overall" in r))
PY
done
