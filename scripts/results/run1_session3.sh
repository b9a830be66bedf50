#!/bin/bash
# device call 1 (session 3): parity of the remaining checkpoints (in parallel), then the linear-attention compare table
T0=$(date +%s)
. scripts/gpu_env.sh
export XLA_PYTHON_CLIENT_PREALLOCATE=false
for m in tiny-hd64 tiny-tp-f32w ling-tiny; do
  timeout 240 python3 scripts/check_gpu_parity.py --only $m --out $OUT/check_gpu_parity_h200_$m.json > $OUT/check_gpu_parity_h200_$m.log 2>&1 &
done
wait
tail -n 25 $OUT/check_gpu_parity_h200_*.log
unset XLA_PYTHON_CLIENT_PREALLOCATE
LEFT=$(( 570 - ($(date +%s) - T0) ))
echo "=== LA compare, deadline $LEFT"
timeout $((LEFT+15)) python3 scripts/bench_linear_attention.py --compare --deadline $((LEFT-25)) --tag run15 --out $OUT 2>&1 | tail -n 60
echo "total $(( $(date +%s) - T0 )) s"
