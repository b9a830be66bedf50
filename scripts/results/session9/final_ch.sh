# issue 18, session 9 call 4: the final table, fp8-channel with the library's default step options (XLA's dot merger
# off: kernels.fp8.step_xla_options), then its profile (the weight concatenations of call 2 must be gone).
export PYTHONPATH=$PYTHONPATH:$PWD/scripts
timeout 170 python3 scripts/bench_e2e.py --quantize fp8-channel --decode 1x1024,16x1024,64x1024,256x1024 --prefill 1x4096 \
  --steps 10 --reps 3 --e2e-max-tokens 0 --compile-threads 4 --out $OUT/bench_e2e_flash8_fp8_channel.json \
  > $OUT/bench_e2e_flash8_fp8_channel.log 2>&1; echo "e2e fp8-channel rc $?"; grep "^|" $OUT/bench_e2e_flash8_fp8_channel.log
timeout 120 python3 scripts/profile_fp8.py --scheme fp8-channel --modes fp8 --batch 16,64 --steps 5 --reps 2 \
  --out $OUT > $OUT/profile_fp8.log 2>&1; echo "profile_fp8 rc $?"; grep -v "^Unable\|^$" $OUT/profile_fp8.log | grep -B1 -A14 "step \|kernels vs" | cut -c1-220
