# issue 18, call 7: quant.matmul's FP8 product pinned row-major (jax.experimental.layout.with_layout_constraint): the FP8
# prefill of 4096 tokens traced again (call 3: 52.5 ms, loop_add_fusion_9 12.1 ms), then bench_e2e's FP8 table on flash8
# (decode B=1/16/64/256 at 1k, prefill 1x4096; call 2: B=16 3.99, B=64 8.00, prefill 67.8 ms).
export PYTHONPATH=$PYTHONPATH:$PWD/scripts
timeout 150 python3 scripts/profile_fp8.py --modes fp8 --batch 16 --steps 3 --reps 2 --prefill 4096 --out $OUT \
  > $OUT/profile_fp8_fix.log 2>&1; echo "profile_fp8 rc $?"
grep -v "^Unable\|^$" $OUT/profile_fp8_fix.log | grep -A14 "prefill 4096:\|kernels vs" | cut -c1-220
timeout 170 python3 scripts/bench_e2e.py --quantize fp8-block --decode 1x1024,16x1024,64x1024,256x1024 --prefill 1x4096 \
  --steps 10 --reps 2 --e2e-max-tokens 0 --compile-threads 4 --out $OUT/bench_e2e_flash8_fp8.json \
  > $OUT/bench_e2e_flash8_fp8.log 2>&1; echo "e2e fp8 rc $?"; grep "^|\|GiB" $OUT/bench_e2e_flash8_fp8.log
