# fp8 (#18), branch s5-fp8. (1) profile_fp8, FP8 mode only (bf16's profile is in session5_run1), B=16 and B=64:
# first the XLA round-trip probe (expect False on the GPU: the cause of session 4's 2.6%) and the kernels-vs-reference
# check (bound 1e-2 / experts 2e-2; the reference's activation quantization must show ~2.6%), then flash8 decode at
# C=1024: step time, floor, CUPTI per-kernel categories. (2) FP8 end to end on flash8: decode 16/64/1/256 x 1024 and
# prefill 1x4096 (bf16 from session5_run1: 2.86 / 5.40 / 10.66 / 14.49 ms, prefill 39.8 ms). Expected ~80 + ~110 s.
mkdir -p $OUT/fp8
timeout 115 env PYTHONPATH=.:scripts python3 scripts/profile_fp8.py --modes fp8 --batch 16,64 --out $OUT/fp8 > $OUT/fp8/profile_fp8_h200.log 2>&1; echo "profile_fp8 rc $?"; grep -v "^Unable to init\|^$" $OUT/fp8/profile_fp8_h200.log | tail -45
timeout 125 env PYTHONPATH=.:scripts python3 scripts/bench_e2e.py --quantize fp8-block --decode 16x1024,64x1024,1x1024,256x1024 --prefill 1x4096 --steps 10 --reps 2 --e2e-max-tokens 0 --out $OUT/fp8/bench_e2e_h200_flash8_fp8.json > $OUT/fp8/bench_e2e_h200_flash8_fp8.log 2>&1; echo "bench_e2e fp8 rc $?"; grep -v "^Unable to init\|^$" $OUT/fp8/bench_e2e_h200_flash8_fp8.log | tail -16
