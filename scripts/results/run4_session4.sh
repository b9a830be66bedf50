#!/bin/bash
# device call 4 (session 4, nvidia-h200-x2): two queues, one per GPU, main at the commit in
# run4_session4_commit.txt. The rest of the issue-19 table (the prefill rows run 3's deadline skipped) with the
# float64-oracle checks of every kernel variant (--smoke) in the same call; MLA decode round 2; prefix TTFT.
T0=$(date +%s)
. scripts/gpu_env.sh
export PYTHONPATH=$PYTHONPATH:$PWD/scripts
el() { echo $(( $(date +%s) - T0 )); }
q() {   # q GPU NAME TIMEOUT CMD...: run CMD on GPU with a timeout, log to $OUT/NAME.log
  local g=$1 n=$2 t=$3; shift 3
  local left=$(( 405 - $(el) )); [ $t -gt $left ] && t=$left
  [ $t -lt 30 ] && { echo "$n: skipped ($t s left) at $(el) s" >> $OUT/queue$g.txt; return; }
  CUDA_VISIBLE_DEVICES=$g timeout $t "$@" > $OUT/$n.log 2>&1
  echo "$n: rc $? at $(el) s (limit $t)" >> $OUT/queue$g.txt
}
(
q 0 bench_linear_attention_issue19_smoke 170 python3 scripts/bench_linear_attention.py --smoke --out $OUT --tag issue19_smoke
q 0 bench_linear_attention_issue19_prefill4k 160 python3 scripts/bench_linear_attention.py --compare --no-check --rows prefill:64:4096:16,prefill:32:4096:1 --deadline 150 --out $OUT --tag issue19_prefill4k
q 0 bench_mla_decode_h200_r2_stdout 100 python3 scripts/bench_mla.py --methods paged-triton --prefill "" --batches 16,256 --contexts 32768 --sweep 16:32768,256:32768 --configs h32n64s0w4st3,h32n64s0w8st3,h32n32s0w4st3,h32n64s0w8st1swaprp,h16n64s0w4st3 --out $OUT --name bench_mla_decode_h200_r2
) &
(
q 1 bench_linear_attention_issue19_prefill32k 240 python3 scripts/bench_linear_attention.py --compare --no-check --rows prefill:32:32768:1,prefill:32:32768:16 --deadline 230 --out $OUT --tag issue19_prefill32k
q 1 bench_prefix_h200 165 python3 scripts/bench_prefix.py --preset flash8 --n 2 --out $OUT/bench_prefix_h200.json
) &
wait
cat $OUT/queue0.txt $OUT/queue1.txt
for f in $OUT/*.log; do echo "=== $f"; grep -v "^Unable to initialize backend\|^$" $f | tail -n 22 | cut -c1-200; done
cd $OUT && tar czf /tmp/run.tgz * && rm -rf $OUT/* && mv /tmp/run.tgz $OUT/ && ls -la $OUT
