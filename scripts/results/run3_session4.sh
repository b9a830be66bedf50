#!/bin/bash
# device call 3 (session 4, nvidia-h200-x2): two queues, one per GPU, main at the commit in
# run3_session4_commit.txt. The issue-19 table: prefill rows on GPU 0, decode rows on GPU 1 (each process
# runs the float64-oracle checks first), same call, same code.
T0=$(date +%s)
. scripts/gpu_env.sh
export PYTHONPATH=$PYTHONPATH:$PWD/scripts
el() { echo $(( $(date +%s) - T0 )); }
q() {   # q GPU NAME TIMEOUT CMD...: run CMD on GPU with a timeout, log to $OUT/NAME.log
  local g=$1 n=$2 t=$3; shift 3
  local left=$(( 550 - $(el) )); [ $t -gt $left ] && t=$left
  [ $t -lt 30 ] && { echo "$n: skipped ($t s left) at $(el) s" >> $OUT/queue$g.txt; return; }
  CUDA_VISIBLE_DEVICES=$g timeout $t "$@" > $OUT/$n.log 2>&1
  echo "$n: rc $? at $(el) s (limit $t)" >> $OUT/queue$g.txt
}
(
q 0 bench_linear_attention_issue19_prefill 400 python3 scripts/bench_linear_attention.py --compare --no-check --rows prefill:64:32768:1,prefill:64:32768:16,prefill:32:4096:16,prefill:64:4096:1,prefill:64:4096:16,prefill:32:4096:1,prefill:32:32768:1,prefill:32:32768:16 --deadline 390 --out $OUT --tag issue19_prefill
q 0 bench_spec_h200 140 python3 scripts/bench_spec.py --time-budget 100 --out $OUT/bench_spec_h200.json
) &
(
q 1 bench_linear_attention_issue19_decode 250 python3 scripts/bench_linear_attention.py --compare --no-check --rows decode:32:1,decode:32:16,decode:32:64,decode:32:256,decode:64:1,decode:64:16,decode:64:64,decode:64:256 --deadline 240 --out $OUT --tag issue19_decode
q 1 bench_e2e_h200_flash8 120 python3 scripts/bench_e2e.py --decode 1x1024,16x1024,64x1024 --prefill 1x4096 --steps 10 --e2e-max-tokens 1024 --out $OUT/bench_e2e_h200_flash8.json
q 1 bench_prefix_h200 170 python3 scripts/bench_prefix.py --preset flash8 --out $OUT/bench_prefix_h200.json
) &
wait
cat $OUT/queue0.txt $OUT/queue1.txt
for f in $OUT/*.log; do echo "=== $f"; grep -v "^Unable to initialize backend\|^$" $f | tail -n 24 | cut -c1-200; done
cd $OUT && tar czf /tmp/run.tgz * && rm -rf $OUT/* && mv /tmp/run.tgz $OUT/ && ls -la $OUT
