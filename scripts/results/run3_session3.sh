#!/bin/bash
# device call 3 (session 3, nvidia-h200-x2): two queues, one per GPU, each part with its own timeout.
T0=$(date +%s)
. scripts/gpu_env.sh
export PYTHONPATH=$PYTHONPATH:$PWD/scripts
el() { echo $(( $(date +%s) - T0 )); }
q() {   # q GPU NAME TIMEOUT CMD...: run CMD on GPU with a timeout, log to $OUT/NAME.log
  local g=$1 n=$2 t=$3; shift 3
  local left=$(( 478 - $(el) )); [ $t -gt $left ] && t=$left
  [ $t -lt 30 ] && { echo "$n: skipped ($t s left) at $(el) s" >> $OUT/queue$g.txt; return; }
  CUDA_VISIBLE_DEVICES=$g timeout $t "$@" > $OUT/$n.log 2>&1
  echo "$n: rc $? at $(el) s (limit $t)" >> $OUT/queue$g.txt
}
(
  q 0 bench_spec_h200 150 python3 scripts/bench_spec.py --time-budget 105 --out $OUT/bench_spec_h200.json
  (cd .wt_cache && PYTHONPATH=/tmp/site:$PWD:$PWD/scripts q 0 bench_prefix_h200 130 python3 scripts/bench_prefix.py --preset flash8 --out $OUT/bench_prefix_h200.json)
  q 0 bench_e2e_h200_f32_prefill 110 python3 scripts/bench_e2e.py --dtype float32 --matmul-precision default,highest --decode "" --prefill 1x4096 --reps 2 --out $OUT/bench_e2e_h200_f32_prefill.json
  q 0 bench_linear_attention_run17 90 python3 scripts/bench_linear_attention.py --compare --no-check --rows prefill:64:32768:1,prefill:64:32768:16 --deadline 80 --tag run17 --out $OUT
) &
(
  q 1 bench_moe_h200 170 python3 scripts/bench_moe.py --shapes flash --tokens 1,16,64,256,4096,16384 --methods lingjax,layout,lingjax-mm,torch-gmm --sweep 4096 --out $OUT/bench_moe_h200.json
  q 1 bench_e2e_h200_flash8 100 python3 scripts/bench_e2e.py --decode 1x1024,16x1024,64x1024 --prefill 1x4096 --steps 10 --e2e-max-tokens 1024 --out $OUT/bench_e2e_h200_flash8.json
  (cd .wt_cache && PYTHONPATH=/tmp/site:$PWD:$PWD/scripts q 1 bench_e2e_h200_paged 100 python3 scripts/bench_e2e.py --decode 256x131072,64x8192 --prefill "" --e2e-max-tokens 0 --steps 10 --capacity 40 --out $OUT/bench_e2e_h200_paged.json)
  q 1 bench_e2e_h200_flash8_fp8 110 python3 scripts/bench_e2e.py --quantize fp8-block --decode 1x1024,16x1024,64x1024 --prefill 1x4096 --steps 10 --e2e-max-tokens 0 --out $OUT/bench_e2e_h200_flash8_fp8.json
) &
wait
cat $OUT/queue0.txt $OUT/queue1.txt
for f in $OUT/*.log; do echo "=== $f"; grep -v "^Unable to initialize backend\|^$" $f | tail -n 14; done
cd $OUT && tar czf /tmp/run3.tgz * && rm -rf $OUT/* && mv /tmp/run3.tgz $OUT/ && ls -la $OUT
