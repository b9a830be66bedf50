#!/bin/bash
# device call C of session 6 (nvidia-h200-x2, merged main at the commit in run_C_session6_commit.txt):
# 1. both GPUs: the full-depth Ling-2.6-flash tp 2 decode step profiled (profile_tp.py: all-reduce time per
#    step, host enqueue time; issue 22 and the B=1 row of issue 13's tp 2 table);
# 2. two queues, one GPU each:
#    GPU 0: flash8 bf16 and FP8 (fp8-block) decode 1/16/64 x 1024 and prefill 1x4096 (issues 13, 18), then
#           bench_spec B=1 k=1 (issue 16: the verify step with the MoE decode path at T <= 8);
#    GPU 1: float32 GPU-vs-CPU parity on ling-tiny (the Triton MLA, MoE decode and linear-attention kernels), then
#           the prefix-cache hit on flash8 in float32 (bench_prefix's checks: hit = miss bit for bit, hit vs the
#           cache-off engine within 1e-3), then the bf16 TTFT hit vs miss (issue 17).
T0=$(date +%s)
. scripts/gpu_env.sh >/dev/null
export PYTHONPATH=$PYTHONPATH:$PWD/scripts
el() { echo $(( $(date +%s) - T0 )); }
mkdir -p $OUT/tp $OUT/gpu0 $OUT/gpu1
( XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout 130 python3 scripts/profile_tp.py --preset flash --tp 2 --decode 1x1024,16x1024 \
    --steps 5 --reps 2 --out $OUT/tp/profile_tp_flash_tp2.json > $OUT/tp/profile_tp_flash_tp2.log 2>&1
  echo "profile_tp rc $? at $(el) s" )
q0() {
  export CUDA_VISIBLE_DEVICES=0
  timeout 110 python3 scripts/bench_e2e.py --decode 1x1024,16x1024,64x1024 --prefill 1x4096 --steps 10 --reps 2 \
    --e2e-max-tokens 0 --compile-threads 4 --out $OUT/gpu0/bench_e2e_flash8_bf16.json > $OUT/gpu0/bench_e2e_flash8_bf16.log 2>&1
  echo "e2e bf16 rc $? at $(el) s"
  timeout 110 python3 scripts/bench_e2e.py --quantize fp8-block --decode 1x1024,16x1024,64x1024 --prefill 1x4096 --steps 10 \
    --reps 2 --e2e-max-tokens 0 --compile-threads 4 --out $OUT/gpu0/bench_e2e_flash8_fp8.json > $OUT/gpu0/bench_e2e_flash8_fp8.log 2>&1
  echo "e2e fp8 rc $? at $(el) s"
  timeout 70 python3 scripts/bench_spec.py --batches 1 --ks 1,2 --profile --time-budget 50 --out $OUT/gpu0/bench_spec_b1.json \
    > $OUT/gpu0/bench_spec_b1.log 2>&1
  echo "spec rc $? at $(el) s"
}
q1() {
  export CUDA_VISIBLE_DEVICES=1
  timeout 150 python3 scripts/check_gpu_parity.py --only ling-tiny --out $OUT/gpu1/check_gpu_parity.json \
    > $OUT/gpu1/check_gpu_parity.log 2>&1
  echo "parity rc $? at $(el) s"
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout 80 python3 scripts/bench_prefix.py --preset flash8 --dtype float32 --prefix 2048 \
    --suffix 256 --prefill-chunk 1024 --n 1 --out $OUT/gpu1/bench_prefix_f32.json > $OUT/gpu1/bench_prefix_f32.log 2>&1
  echo "prefix f32 rc $? at $(el) s"
  timeout 80 python3 scripts/bench_prefix.py --preset flash8 --n 3 --out $OUT/gpu1/bench_prefix_bf16.json \
    > $OUT/gpu1/bench_prefix_bf16.log 2>&1
  echo "prefix bf16 rc $? at $(el) s"
}
q0 > $OUT/queue0.txt 2>&1 &
q1 > $OUT/queue1.txt 2>&1 &
wait
cat $OUT/queue0.txt $OUT/queue1.txt
for f in $OUT/tp/*.log $OUT/gpu*/*.log; do echo "=== $f"; grep -v "^Unable to init\|^$" $f | grep "|\|rc\|CHECK\|check\|worst\|error\|Error" | tail -14 | cut -c1-220; done
