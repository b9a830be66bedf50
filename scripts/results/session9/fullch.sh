# issue 18, session 9 call 9 (one H200): full-depth Ling-2.6-flash (32 layers, full vocabulary) in fp8-channel, random
# weights quantized on device: decode B=1/16/64/256 at 1k context, prefill 1x4096, the memory left for caches.
export PYTHONPATH=$PYTHONPATH:$PWD/scripts
XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout 250 python3 scripts/bench_e2e.py --preset flash --quantize fp8-channel \
  --decode 16x1024,64x1024,1x1024,256x1024 --prefill 1x4096 --steps 5 --reps 2 --e2e-max-tokens 0 --compile-threads 4 \
  --out $OUT/bench_e2e_flash_fp8_channel.json > $OUT/bench_e2e_flash_fp8_channel.log 2>&1
echo "e2e full fp8-channel rc $?"; grep -v "^Unable" $OUT/bench_e2e_flash_fp8_channel.log | grep -v "^decode B\|^prefill 1x" | tail -16
