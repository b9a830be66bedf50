#!/bin/bash
# device call 1 of session 6 (nvidia-h200-x2, main at the commit in run1_session6_commit.txt): the full-depth
# Ling-2.6-flash (32 layers, vocab 157,184, random bf16 weights generated on device in their shards) at --tp 2 on
# both GPUs: issue 13's table, then the rows issue 22 asks for at tp 4, run here at tp 2.
. scripts/gpu_env.sh >/dev/null; export PYTHONPATH=$PYTHONPATH:$PWD/scripts
T0=$(date +%s)
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
timeout 330 python3 scripts/bench_e2e.py --preset flash --tp 2 --decode 1x1024,16x1024,64x1024 --prefill 1x4096 \
  --steps 10 --reps 2 --e2e-max-tokens 0 --out $OUT/bench_e2e_h200x2_flash_tp2.json > $OUT/bench_e2e_h200x2_flash_tp2.log 2>&1
echo "tp2 a rc $? at $(( $(date +%s) - T0 )) s"; grep -v "^Unable" $OUT/bench_e2e_h200x2_flash_tp2.log | tail -14
LEFT=$(( 540 - ($(date +%s) - T0) ))
[ $LEFT -gt 120 ] && timeout $LEFT python3 scripts/bench_e2e.py --preset flash --tp 2 --decode 256x1024,64x32768 \
  --prefill 8x2048 --steps 10 --reps 2 --e2e-max-tokens 0 --out $OUT/bench_e2e_h200x2_flash_tp2_b.json \
  > $OUT/bench_e2e_h200x2_flash_tp2_b.log 2>&1
echo "tp2 b rc $? at $(( $(date +%s) - T0 )) s"; grep -v "^Unable" $OUT/bench_e2e_h200x2_flash_tp2_b.log | tail -14
