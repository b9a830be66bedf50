#!/usr/bin/env bash
# Issue 13's MoE speed checks in ONE device call on nvidia-h200 (about 5 minutes; each part writes
# its JSON as it goes):
# 1. bench_moe.py at the flash shapes, T = 1, 16, 64, 256, 4096, 16384: the whole layer (new
#    comparison-built layout, and the old sort-built one where they differ), the layout alone, the
#    grouped matmuls alone, torch._grouped_mm; tile sweeps: decode tiles at T = 1 (run 2 swept 16
#    and 64); block_m, 128-wide tiles, stages, group order and the persistent schedule at T = 4096
#    and 16384. Every lingjax / grouped-matmul row is checked against a float64 oracle on the device.
# 2. bench_e2e.py on the flash8 cut: decode batch 1, 16, 64 at context 1024 (MBU) and a 4096-token
#    prefill (MFU).
# Results and logs in $OUT. From the repository root, with .whl/ carried (scripts/gpu_env.sh says
# how to fill it):
#   bash scripts/bench_moe_device.sh
set -u
. scripts/gpu_env.sh || exit 1
OUT=${OUT:-out}
mkdir -p "$OUT"
timeout 300 python3 scripts/bench_moe.py --shapes flash --tokens 1,16,64,256,4096,16384 \
  --methods lingjax,layout,lingjax-mm,torch-gmm --sweep 1,4096,16384 --out "$OUT/bench_moe.json" 2>&1 \
  | grep -v "^Unable to initialize backend" | tee "$OUT/bench_moe.log"
PYTHONPATH=$PYTHONPATH:scripts timeout 240 python3 scripts/bench_e2e.py --preset flash8 \
  --decode 1x1024,16x1024,64x1024 --prefill 1x4096 --steps 10 --e2e-max-tokens 1024 \
  --out "$OUT/bench_e2e.json" 2>&1 | grep -v "^Unable to initialize backend" | tee "$OUT/bench_e2e.log"
