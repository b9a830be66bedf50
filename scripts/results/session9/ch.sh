# issue 18, session 9 call 2: the compressed-tensors scheme (fp8-channel: per-channel FP8 weights, dynamic per-token
# activations; what vLLM's FP8 recipes load) on flash8: the device check of every kernel kind and the per-kernel
# profile (decode B=16/64, prefill 4096), then the e2e table (decode B=1/16/64/256, prefill 1x4096).
export PYTHONPATH=$PYTHONPATH:$PWD/scripts
timeout 170 python3 scripts/profile_fp8.py --scheme fp8-channel --modes fp8 --batch 16,64 --prefill 4096 --steps 5 --reps 2 \
  --out $OUT > $OUT/profile_fp8.log 2>&1; echo "profile_fp8 rc $?"; grep -v "^Unable\|^$" $OUT/profile_fp8.log | grep -B1 -A14 "step \|kernels vs" | cut -c1-220
timeout 170 python3 scripts/bench_e2e.py --quantize fp8-channel --decode 1x1024,16x1024,64x1024,256x1024 --prefill 1x4096 \
  --steps 10 --reps 2 --e2e-max-tokens 0 --compile-threads 4 --out $OUT/bench_e2e_flash8_fp8_channel.json \
  > $OUT/bench_e2e_flash8_fp8_channel.log 2>&1; echo "e2e fp8-channel rc $?"; grep "^|" $OUT/bench_e2e_flash8_fp8_channel.log
