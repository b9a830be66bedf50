# fp8full (#18), branch s6-fp8: full-depth Ling-2.6-flash (32 layers, vocab 157184) in FP8 (fp8-block, random weights
# quantized on device) on ONE H200. <= 240 s. Session 5 built it in 59 s but no row finished in 78 s (each row's
# 32-layer step compiled only when it ran). Now --compile-threads 4 lowers every row first and compiles them
# concurrently; the log shows the init phases, lowering and compile times, then decode B=1/16/64 at C=1024 and
# prefill 1x4096, and the memory left after the weights.
mkdir -p $OUT/fp8full
timeout 235 env XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 python3 scripts/bench_e2e.py --preset flash --quantize fp8-block \
  --decode 16x1024,64x1024,1x1024 --prefill 1x4096 --steps 5 --reps 2 --e2e-max-tokens 0 --compile-threads 4 \
  --out $OUT/fp8full/bench_e2e_flash_fp8.json > $OUT/fp8full/bench_e2e_flash_fp8.log 2>&1; echo "bench_e2e flash fp8 rc $?"
grep -v "^Unable to init\|^$" $OUT/fp8full/bench_e2e_flash_fp8.log | tail -25
