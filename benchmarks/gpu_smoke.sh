#!/usr/bin/env bash
# CUDA code paths end to end (run on a GPU machine from the repository root) on the demo-size data: train (bf16, --compile, --cache_dir, DDPM preset),
# sample with DDPM and DDIM in bf16 (each twice: same bytes?) and compiled, and sample_auto.
# Usage:
#   python scripts/make_demo_data.py --out /tmp/tiny --n_train 4 --n_val 1 --n_pseudo 2   # where nilearn is installed
#   bash benchmarks/gpu_smoke.sh /tmp/tiny [OUT_DIR]
set -euo pipefail
D=$(realpath "${1:?usage: bash benchmarks/gpu_smoke.sh DEMO_DATA_DIR [OUT_DIR]}"); O=$(realpath -m "${2:-/tmp/gpu_smoke}")
cd "$(dirname "$0")/.."
python3 scripts/train.py --preset demo --data_dir $D/training --run_dir $O/runs --target t2f --max_steps 40 \
    --val_cases 1 --val_interval 20 --precision bf16 --compile --cache_dir $O/cache --save_interval 20
ls $O/cache | head -3
for s in ddpm ddim; do
  for rep in a b; do
    python3 scripts/sample.py --checkpoint $O/runs/t2f/best.pt --data_dir $D/pseudo_validation_gt --target t2f \
        --out_dir $O/s_${s}_$rep --sampler $s --nfe 4 --device cuda --precision bf16
  done
  python3 - <<PY
import gzip, hashlib, pathlib
a = sorted(pathlib.Path("$O/s_${s}_a").rglob("*-t2f.nii.gz")); b = sorted(pathlib.Path("$O/s_${s}_b").rglob("*-t2f.nii.gz"))
h = lambda p: hashlib.sha256(gzip.open(p).read()).hexdigest()
print("$s", len(a), "volumes; identical across two runs:", [h(x) == h(y) for x, y in zip(a, b)])
PY
done
python3 scripts/sample.py --checkpoint $O/runs/t2f/best.pt --data_dir $D/pseudo_validation_gt --target t2f \
    --out_dir $O/s_compiled --sampler ddim --nfe 4 --device cuda --precision bf16 --compile
python3 scripts/sample_auto.py --checkpoint t2f=$O/runs/t2f/best.pt --data_dir $D/pseudo_validation --out_dir $O/auto \
    --device cuda || echo "sample_auto exit $? (cases missing other modalities have no model here)"
cat $O/s_ddim_a/metrics.json | head -30
