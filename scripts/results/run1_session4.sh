#!/bin/bash
# device call 1 (session 4, nvidia-h200): one queue, each part with its own timeout.
T0=$(date +%s)
. scripts/gpu_env.sh
export PYTHONPATH=$PYTHONPATH:$PWD/scripts
el() { echo $(( $(date +%s) - T0 )); }
q() {   # q NAME TIMEOUT CMD...: run CMD with a timeout, log to $OUT/NAME.log
  local n=$1 t=$2; shift 2
  local left=$(( 440 - $(el) )); [ $t -gt $left ] && t=$left
  [ $t -lt 30 ] && { echo "$n: skipped ($t s left) at $(el) s" >> $OUT/queue.txt; return; }
  timeout $t "$@" > $OUT/$n.log 2>&1
  echo "$n: rc $? at $(el) s (limit $t)" >> $OUT/queue.txt
}
q bench_spec_h200_paged 140 python3 scripts/bench_spec.py --time-budget 100 --out $OUT/bench_spec_h200_paged.json
q bench_serve_h200 170 python3 scripts/bench_serve.py --random-shapes flash8 --max-batch 64 --max-len 2048 --prefill-chunk 256 --max-step-tokens 1024 --concurrency 64 --num-requests 256 --warmup 64 --prompt-len 128 1024 --output-len 64 256 --max-seconds 60 --start-timeout 100 --out $OUT/bench_serve_h200.json
q bench_linear_attention_run18 120 python3 scripts/bench_linear_attention.py --compare --no-check --no-xla --rows prefill:64:32768:1,prefill:64:32768:16 --deadline 110 --tag run18 --out $OUT
cat $OUT/queue.txt
for f in $OUT/*.log; do echo "=== $f"; grep -v "^Unable to initialize backend\|^$" $f | tail -n 16; done
cd $OUT && tar czf /tmp/run.tgz * && rm -rf $OUT/* && mv /tmp/run.tgz $OUT/ && ls -la $OUT
