#!/bin/bash
# device call 2 (session 4, nvidia-h200): one queue; each helper branch's code runs from its own copy
# (.wt_cache/<branch> = `git archive` of the branch head; commits in run2_session4_commits.txt).
T0=$(date +%s)
. scripts/gpu_env.sh
el() { echo $(( $(date +%s) - T0 )); }
q() {   # q BRANCH NAME TIMEOUT CMD...: run CMD in .wt_cache/BRANCH with a timeout, log to $OUT/NAME.log
  local b=$1 n=$2 t=$3; shift 3
  local left=$(( 560 - $(el) )); [ $t -gt $left ] && t=$left
  [ $t -lt 30 ] && { echo "$n: skipped ($t s left) at $(el) s" >> $OUT/queue.txt; return; }
  (cd .wt_cache/$b && PYTHONPATH=/tmp/site:$PWD:$PWD/scripts timeout $t "$@" > $OUT/$n.log 2>&1)
  echo "$n: rc $? at $(el) s (limit $t)" >> $OUT/queue.txt
}
q mlaprefill bench_mla_prefill_h200 95 python3 scripts/bench_mla.py --batches "" --methods "" --prefill 4096,32768 --packed 8x512@8192 --out $OUT/bench_mla_prefill_h200.json
q mladecode bench_mla_decode_h200_stdout 135 python3 scripts/bench_mla.py --methods paged-triton --prefill "" --sweep 16:32768,256:32768 --out $OUT --name bench_mla_decode_h200
q linattn bench_linear_attention_issue19_sweep 115 python3 scripts/bench_linear_attention.py --no-check --no-xla --no-fla --pt-default --sweep prefill:32:4096:16,prefill:64:4096:16,prefill:64:4096:1,prefill:32:4096:1 --sweep-variants --sweep-triton-only --rows none --deadline 105 --out $OUT --tag issue19_sweep
q moe bench_moe_h200 150 python3 scripts/bench_moe.py --shapes flash --tokens 1,16,64,256,4096,16384 --methods lingjax,lingjax-mm,torch-gmm --sweep 1,4096,16384 --out $OUT/bench_moe_h200.json
q hostover probe_dispatch_h200 100 python3 scripts/probe_dispatch.py --budget 85 --out $OUT
cat $OUT/queue.txt
for f in $OUT/*.log; do echo "=== $f"; grep -v "^Unable to initialize backend\|^$" $f | tail -n 22 | cut -c1-220; done
cd $OUT && tar czf /tmp/run.tgz * && rm -rf $OUT/* && mv /tmp/run.tgz $OUT/ && ls -la $OUT
