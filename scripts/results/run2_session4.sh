#!/bin/bash
# device call 2 (session 4, nvidia-h200-x2): two queues, one per GPU; each helper branch's code runs from
# its own copy (.wt_cache/<branch> = `git archive` of the branch head; commits in run2_session4_commits.txt);
# "." = main.
T0=$(date +%s)
. scripts/gpu_env.sh
el() { echo $(( $(date +%s) - T0 )); }
q() {   # q GPU BRANCH NAME TIMEOUT CMD...: run CMD in .wt_cache/BRANCH on GPU with a timeout, log to $OUT/NAME.log
  local g=$1 b=$2 n=$3 t=$4; shift 4
  local left=$(( 560 - $(el) )); [ $t -gt $left ] && t=$left
  [ $t -lt 30 ] && { echo "$n: skipped ($t s left) at $(el) s" >> $OUT/queue$g.txt; return; }
  local d=.wt_cache/$b; [ "$b" = . ] && d=.
  (cd $d && CUDA_VISIBLE_DEVICES=$g PYTHONPATH=/tmp/site:$PWD:$PWD/scripts timeout $t "$@" > $OUT/$n.log 2>&1)
  echo "$n: rc $? at $(el) s (limit $t)" >> $OUT/queue$g.txt
}
(
q 0 mlaprefill bench_mla_prefill_h200 95 python3 scripts/bench_mla.py --batches "" --methods "" --prefill 4096,32768 --packed 8x512@8192 --out $OUT/bench_mla_prefill_h200.json
q 0 mladecode bench_mla_decode_h200_stdout 135 python3 scripts/bench_mla.py --methods paged-triton --prefill "" --sweep 16:32768,256:32768 --out $OUT --name bench_mla_decode_h200
q 0 hostover probe_dispatch_h200 100 python3 scripts/probe_dispatch.py --budget 85 --out $OUT
q 0 . bench_serve_h200 170 python3 scripts/bench_serve.py --random-shapes flash8 --max-batch 64 --max-len 2048 --prefill-chunk 256 --max-step-tokens 1024 --concurrency 64 --num-requests 256 --warmup 64 --prompt-len 128 1024 --output-len 64 256 --max-seconds 60 --start-timeout 100 --out $OUT/bench_serve_h200.json
) &
(
q 1 linattn bench_linear_attention_issue19_sweep 115 python3 scripts/bench_linear_attention.py --no-check --no-xla --no-fla --pt-default --sweep prefill:32:4096:16,prefill:64:4096:16,prefill:64:4096:1,prefill:32:4096:1 --sweep-variants --sweep-triton-only --rows none --deadline 105 --out $OUT --tag issue19_sweep
q 1 moe bench_moe_h200 150 python3 scripts/bench_moe.py --shapes flash --tokens 1,16,64,256,4096,16384 --methods lingjax,lingjax-mm,torch-gmm --sweep 1,4096,16384 --out $OUT/bench_moe_h200.json
q 1 fp8 profile_fp8_h200 90 python3 scripts/profile_fp8.py --out $OUT
q 1 linattn bench_linear_attention_issue19_h64long 170 python3 scripts/bench_linear_attention.py --compare --no-check --rows prefill:64:32768:1,prefill:64:32768:16 --deadline 160 --out $OUT --tag issue19_h64long
) &
wait
cat $OUT/queue0.txt $OUT/queue1.txt
for f in $OUT/*.log; do echo "=== $f"; grep -v "^Unable to initialize backend\|^$" $f | tail -n 20 | cut -c1-200; done
cd $OUT && tar czf /tmp/run.tgz * && rm -rf $OUT/* && mv /tmp/run.tgz $OUT/ && ls -la $OUT
