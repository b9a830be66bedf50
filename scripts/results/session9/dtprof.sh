# issue 18, session 9 call 1: the FP8 decode step with the dense projections of <= 64 rows on XLA's FP8 dot (fp8)
# against the Triton kernel with gpu.decode_config (fp8-dt: swapped operands, x quantized in the kernel, split-K
# sums fused into the consumer); the device check of every dense kind through the new path first; bf16 for scale.
export PYTHONPATH=$PYTHONPATH:$PWD/scripts
timeout 200 python3 scripts/profile_fp8.py --modes fp8,fp8-dt,bf16 --batch 16,64 --steps 5 --reps 2 --out $OUT \
  > $OUT/profile_fp8.log 2>&1; echo "profile_fp8 rc $?"; grep -v "^Unable\|^$" $OUT/profile_fp8.log | grep -B1 -A14 "step " | cut -c1-200
