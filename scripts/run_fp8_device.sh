#!/bin/bash
# Issue 18 device call (one nvidia-h200, < 600 s): where an FP8 decode step's time goes, then FP8 against
# bf16 end to end on the flash8 cut, then full-depth Ling-2.6-flash in FP8. Each part has its own timeout
# and logs to $OUT/NAME.log (+ JSON). Run from the repository root with .whl/ carried (scripts/gpu_env.sh).
#   bash scripts/run_fp8_device.sh
# On nvidia-h200-x2, part 1 + 2 and part 3 + 4 can run as two queues (CUDA_VISIBLE_DEVICES=0 / 1).
T0=$(date +%s)
[ -n "${LINGJAX_GPU_ENV:-}" ] || . scripts/gpu_env.sh   # already sourced by a caller that runs two queues
export PYTHONPATH=$PYTHONPATH:$PWD/scripts
OUT=${OUT:-scripts/results}
mkdir -p "$OUT"
el() { echo $(( $(date +%s) - T0 )); }
q() {   # q NAME TIMEOUT CMD...: run CMD with a timeout (cut to what is left of 580 s), log to $OUT/NAME.log
  local n=$1 t=$2; shift 2
  local left=$(( ${FP8_BUDGET:-580} - $(el) )); [ $t -gt $left ] && t=$left
  [ $t -lt 30 ] && { echo "$n: skipped ($t s left) at $(el) s" >> $OUT/queue_fp8.txt; return; }
  timeout $t "$@" > $OUT/$n.log 2>&1
  echo "$n: rc $? at $(el) s (limit $t)" >> $OUT/queue_fp8.txt
}
# 1. per-kernel device time of one decode step, B=16 at 1k: bf16 / FP8 K-major / FP8 [in, out] (~60-90 s)
q profile_fp8_h200 90 python3 scripts/profile_fp8.py --out $OUT
# 2. FP8 (K-major weights, in-kernel activation quantization) end to end, flash8 (~100-150 s)
q bench_e2e_h200_flash8_fp8_r4 150 python3 scripts/bench_e2e.py --quantize fp8-block \
  --decode 1x1024,16x1024,64x1024,256x1024 --prefill 1x4096 --steps 10 --reps 2 --e2e-max-tokens 0 \
  --out $OUT/bench_e2e_h200_flash8_fp8_r4.json
# 3. bf16, the same rows in the same call (the comparison of the target: FP8 >= 1.6x bf16 at B 16 and 64)
q bench_e2e_h200_flash8_bf16_r4 130 python3 scripts/bench_e2e.py \
  --decode 1x1024,16x1024,64x1024,256x1024 --prefill 1x4096 --steps 10 --reps 2 --e2e-max-tokens 0 \
  --out $OUT/bench_e2e_h200_flash8_bf16_r4.json
# 4. full-depth Ling-2.6-flash (32 layers, vocabulary 157,184) in FP8 on one H200: 98.3 GiB of weights
#    (JAX's default 75% memory cap would leave ~6 GiB: raised to 95%); decode and prefill, memory left
q bench_e2e_h200_flash_fp8 120 env XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 python3 scripts/bench_e2e.py --preset flash \
  --quantize fp8-block --decode 16x1024,64x1024 --prefill 1x4096 --steps 5 --reps 1 --e2e-max-tokens 0 \
  --out $OUT/bench_e2e_h200_flash_fp8.json
cat $OUT/queue_fp8.txt
for f in $OUT/profile_fp8_h200.log $OUT/bench_e2e_h200_flash*_r4.log $OUT/bench_e2e_h200_flash_fp8.log; do
  echo "=== $f"; grep -v "^Unable to initialize backend\|^$" $f | tail -n 40
done
