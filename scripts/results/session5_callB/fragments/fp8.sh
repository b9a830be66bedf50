# fp8 (#18), branch s5-fp8 (<= 170 s). Since call A: FP8 kernels on the fp8 wgmma at decode sizes (64-row tiles;
# A's 16-row tiles ran f16 mma.sync with every fp8 operand converted: MoE 6731 us of an 8.68 ms B=16 step) and the
# activations quantized before the kernels. (1) profile_fp8: the device check first (each FP8 projection kind, both
# grouped matmuls on shared inputs: bound 1e-2; whole experts 5e-2; it stops the run if wrong), then flash8 decode
# at B=16 and B=64 (C=1024): step ms, floor, per-kernel categories. Compare: A's FP8 8.68 ms (B=16); bf16 5.40 / 10.66
# ms (session5_run1); target FP8 <= 3.38 / 6.66 ms. (2) full-depth Ling-2.6-flash in FP8 on one H200: memory left
# after the weights, decode 16x1024 and 64x1024, prefill 1x4096 (what finishes in the time left; rows print as they finish).
mkdir -p $OUT/fp8
timeout 90 python3 scripts/profile_fp8.py --modes fp8 --batch 16,64 --reps 2 --out $OUT/fp8 > $OUT/fp8/profile_fp8_h200.log 2>&1; echo "profile_fp8 rc $?"; grep -v "^Unable to init\|^$" $OUT/fp8/profile_fp8_h200.log | tail -50
timeout 78 env XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 python3 scripts/bench_e2e.py --preset flash --quantize fp8-block --decode 16x1024,64x1024 --prefill 1x4096 --steps 3 --reps 1 --e2e-max-tokens 0 --out $OUT/fp8/bench_e2e_h200_flash_fp8.json > $OUT/fp8/bench_e2e_h200_flash_fp8.log 2>&1; echo "bench_e2e flash fp8 rc $?"; grep -v "^Unable to init\|^$" $OUT/fp8/bench_e2e_h200_flash_fp8.log | tail -16
