#!/bin/bash
# device call 1 (session 5, nvidia-h200-x2, main at the commit in run1_session5_commit.txt): two queues.
# GPU 0: float32 GPU-vs-CPU parity on the current kernels; bench_serve on the flash8 cut; multi-step overhead N=8,16.
# GPU 1: the FP8 call of issue 18 (scripts/run_fp8_device.sh).
T0=$(date +%s)
. scripts/gpu_env.sh
export PYTHONPATH=$PYTHONPATH:$PWD/scripts
el() { echo $(( $(date +%s) - T0 )); }
q() {   # q GPU NAME TIMEOUT CMD...: run CMD on GPU with a timeout, log to $OUT/NAME.log
  local g=$1 n=$2 t=$3; shift 3
  local left=$(( 560 - $(el) )); [ $t -gt $left ] && t=$left
  [ $t -lt 30 ] && { echo "$n: skipped ($t s left) at $(el) s" >> $OUT/queue$g.txt; return; }
  CUDA_VISIBLE_DEVICES=$g timeout $t "$@" > $OUT/$n.log 2>&1
  echo "$n: rc $? at $(el) s (limit $t)" >> $OUT/queue$g.txt
}
(
q 0 check_gpu_parity_h200_s5 150 python3 scripts/check_gpu_parity.py --out $OUT/check_gpu_parity_h200_s5.json
q 0 bench_serve_h200 270 python3 scripts/bench_serve.py --random-shapes flash8 --max-batch 16 --max-len 2048 --prefill-chunk 512 --max-step-tokens 512 --concurrency 16 --num-requests 96 --warmup 16 --prompt-len 128 1024 --output-len 64 256 --max-seconds 90 --start-timeout 150 --out $OUT/bench_serve_h200.json
q 0 bench_overlap_multistep16_h200 120 python3 scripts/bench_overlap.py --batch 1 --decode-steps 8 16 --out $OUT/bench_overlap_multistep16_h200.json
) &
( CUDA_VISIBLE_DEVICES=1 FP8_BUDGET=535 bash scripts/run_fp8_device.sh > $OUT/run_fp8_device.log 2>&1 ) &
wait
cat $OUT/queue0.txt $OUT/queue_fp8.txt
for f in $OUT/*.log; do echo "=== $f"; grep -v "^Unable to initialize backend\|^$" $f | tail -n 25 | cut -c1-220; done
cd $OUT && tar czf /tmp/run.tgz * && rm -rf $OUT/* && mv /tmp/run.tgz $OUT/ && ls -la $OUT
