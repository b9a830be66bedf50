#!/bin/bash
# device call 2 (session 3, nvidia-h200-x2): GPU 0: #21 float32 cost, #15 overlap, #14 MLA decode; GPU 1: #19 rows
T0=$(date +%s)
. scripts/gpu_env.sh
export PYTHONPATH=$PYTHONPATH:$PWD/scripts
(
  export CUDA_VISIBLE_DEVICES=0
  timeout 250 python3 scripts/bench_e2e.py --dtype float32 --matmul-precision default,highest --decode 16x1024 --prefill 1x4096 --steps 10 --reps 2 --out $OUT/bench_e2e_h200_f32.json > $OUT/bench_e2e_h200_f32.log 2>&1
  echo "e2e f32 rc $? at $(( $(date +%s) - T0 )) s" >> $OUT/gpu0.log
  timeout 150 python3 scripts/bench_overlap.py --batch 1 64 256 --out $OUT/bench_overlap_h200.json > $OUT/bench_overlap_h200.log 2>&1
  echo "overlap rc $? at $(( $(date +%s) - T0 )) s" >> $OUT/gpu0.log
  LEFT=$(( 560 - ($(date +%s) - T0) ))
  timeout $LEFT python3 scripts/bench_mla.py --out $OUT/bench_mla_h200.json > $OUT/bench_mla_h200.log 2>&1
  echo "mla rc $? at $(( $(date +%s) - T0 )) s" >> $OUT/gpu0.log
) &
(
  export CUDA_VISIBLE_DEVICES=1
  timeout 330 python3 scripts/bench_linear_attention.py --compare --no-check --rows decode:64:1,decode:64:16,decode:64:64,decode:64:256,prefill:64:4096:1,prefill:64:4096:16,prefill:64:32768:1,prefill:64:32768:16 --deadline 310 --tag run16_h64 --out $OUT > $OUT/la_h64.out 2>&1
  echo "la h64 rc $? at $(( $(date +%s) - T0 )) s" >> $OUT/gpu1.log
  LEFT=$(( 555 - ($(date +%s) - T0) ))
  timeout $LEFT python3 scripts/bench_linear_attention.py --no-check --no-xla --pt-default --sweep prefill:32:4096:16,prefill:64:4096:16 --rows prefill:32:4096:16,prefill:64:4096:16 --trace --deadline $((LEFT-10)) --tag run16_sweep --out $OUT > $OUT/la_sweep.out 2>&1
  echo "la sweep rc $? at $(( $(date +%s) - T0 )) s" >> $OUT/gpu1.log
) &
wait
cat $OUT/gpu0.log $OUT/gpu1.log
for f in bench_e2e_h200_f32 bench_overlap_h200 bench_mla_h200; do echo "== $f"; tail -n 22 $OUT/$f.log; done
echo "== la"; tail -n 30 $OUT/la_h64.out; tail -n 40 $OUT/la_sweep.out
