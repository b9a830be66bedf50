# issue 17: the corrected prefix-cache device check (bench_prefix.device_check) and TTFT on flash8, then float32.
export PYTHONPATH=$PYTHONPATH:$PWD/scripts
timeout 200 python3 scripts/bench_prefix.py --preset flash8 --n 3 --out $OUT/bench_prefix_bf16.json > $OUT/bench_prefix_bf16.log 2>&1
echo "prefix bf16 rc $?"; grep -v "^Unable" $OUT/bench_prefix_bf16.log | grep -i "check\||\|hit:\|flash8" | cut -c1-400
XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout 150 python3 scripts/bench_prefix.py --preset flash8 --dtype float32 --prefix 2048 \
  --suffix 256 --prefill-chunk 1024 --n 1 --out $OUT/bench_prefix_f32.json > $OUT/bench_prefix_f32.log 2>&1
echo "prefix f32 rc $?"; grep -v "^Unable" $OUT/bench_prefix_f32.log | grep -i "check\||\|hit:\|flash8" | cut -c1-400
