# issue 18, call 2: where an FP8 decode step's time goes against bf16 (profile_fp8 modes bf16 and fp8, B=16 and 64), the
# dense projections at decode sizes by method (the Triton FP8 kernel / XLA's FP8 dot as dispatched, the reference math
# with the weight dequantized for a bf16 dot, XLA's FP8 dot alone, bf16), and the e2e step and prefill with the
# 8-warp prefill tiles (session 6 call C before: B=16 3.95, B=64 7.93, prefill 1x4096 59.2 ms).
export PYTHONPATH=$PYTHONPATH:$PWD/scripts
timeout 150 python3 scripts/profile_fp8.py --modes bf16,fp8 --batch 16,64 --steps 5 --reps 2 --out $OUT \
  > $OUT/profile_fp8.log 2>&1; echo "profile_fp8 rc $?"; grep -v "^Unable\|^$" $OUT/profile_fp8.log | grep -A7 "step " | cut -c1-200
timeout 100 python3 scripts/bench_fp8.py --no-moe --tokens 16,64 --methods bf16,fp8-block,fp8-ref,fp8-block-xla \
  --dense "attn 4096x4096,kv_a 4096x576,q_b 1536x6144,shared-up 4096x1024,shared-down 1024x4096" --iters 20 --reps 2 \
  --out $OUT/bench_fp8_dense.json > $OUT/bench_fp8_dense.log 2>&1; echo "bench_fp8 rc $?"; grep "^|" $OUT/bench_fp8_dense.log
timeout 110 python3 scripts/bench_e2e.py --quantize fp8-block --decode 16x1024,64x1024 --prefill 1x4096 --steps 10 --reps 2 \
  --e2e-max-tokens 0 --compile-threads 4 --out $OUT/bench_e2e_flash8_fp8.json > $OUT/bench_e2e_flash8_fp8.log 2>&1
echo "e2e fp8 rc $?"; grep "^|" $OUT/bench_e2e_flash8_fp8.log
