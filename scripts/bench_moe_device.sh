#!/usr/bin/env bash
# Issue 13's MoE speed checks in ONE device call on nvidia-h200 (about 3.5 minutes; each part writes
# its JSON as it goes, so a timeout keeps what finished):
# 1. bench_moe.py at the flash shapes, T = 1, 4, 16, 64, 256, 4096, 16384 (timeout 150 s): the whole layer
#    (lingjax: the decode path at T <= 4, lingjax-grouped: the grouped path there), the grouped matmuls alone
#    (lingjax-mm), torch._grouped_mm; sweeps: the decode path's configs at T = 1 (SWEEP_DECODE, rows 'dec ..')
#    and the large tiles at T = 4096 (SWEEP_LARGE, rows 'mm bm..'). Every lingjax / dec / grouped-matmul row is
#    checked against a float64 oracle on the device; 'best ...' lines name the fastest config per T.
# 2. bench_e2e.py on the flash8 cut, a 4096-token prefill (MFU; timeout 60 s).
# Results and logs in $OUT. From the repository root, with .whl/ carried (scripts/gpu_env.sh says
# how to fill it):
#   bash scripts/bench_moe_device.sh
set -u
. scripts/gpu_env.sh || exit 1
OUT=${OUT:-out}
mkdir -p "$OUT"
timeout 150 python3 scripts/bench_moe.py --shapes flash --tokens 1,4,16,64,256,4096,16384 \
  --methods lingjax,lingjax-mm,torch-gmm --sweep 1,4096 --out "$OUT/bench_moe.json" 2>&1 \
  | grep -v "^Unable to initialize backend" | tee "$OUT/bench_moe.log"
PYTHONPATH=$PYTHONPATH:scripts timeout 60 python3 scripts/bench_e2e.py --preset flash8 \
  --decode "" --prefill 1x4096 --e2e-max-tokens 0 --reps 3 \
  --out "$OUT/bench_e2e_prefill.json" 2>&1 | grep -v "^Unable to initialize backend" | tee "$OUT/bench_e2e_prefill.log"
