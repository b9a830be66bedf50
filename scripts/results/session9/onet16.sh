# issue 23, session 9 call 8 (both GPUs): what the lent kinds allow: a 16-layer cut of the Ling-2.5-1T shapes (d 8192,
# 14 linear + 2 MLA layers, 64 heads, 256 experts of width 2048, top-8, full vocabulary), random weights quantized to
# fp8-block on device in their shards, tp 2 on nvidia-h200-x2: decode B=1/16/64/256 at 4k context, prefill 1x8192.
export PYTHONPATH=$PYTHONPATH:$PWD/scripts
XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout 330 python3 scripts/bench_e2e.py --preset 1t --layers 16 --tp 2 --quantize fp8-block \
  --decode 1x4096,16x4096,64x4096,256x4096 --prefill 1x8192 --steps 5 --reps 2 --e2e-max-tokens 0 --compile-threads 4 \
  --out $OUT/bench_e2e_1t16_fp8_tp2.json > $OUT/bench_e2e_1t16_fp8_tp2.log 2>&1
echo "e2e 1t16 rc $?"; grep -v "^Unable" $OUT/bench_e2e_1t16_fp8_tp2.log | tail -16
