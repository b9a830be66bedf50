# issue 16, call 2: the verify cost table with the new default path (decode) at B=1/16/64, k=1/2/3 (bf16), then the
# float32 check of the paths (matmuls at full float32 precision, not TF32): does the decode path's verify agree with the
# plain step where bf16 near-ties of the random model flip tokens (call 1: B=64 agreement 70-72% in bf16)?
export PYTHONPATH=$PYTHONPATH:$PWD/scripts
timeout 200 python3 scripts/bench_spec.py --batches 1,16,64 --ks 1,2,3 --time-budget 150 --out $OUT/spec_decode_bf16.json \
  > $OUT/spec_decode_bf16.log 2>&1
echo "spec bf16 rc $?"; grep -v "^Unable" $OUT/spec_decode_bf16.log | grep "|\|target\|CHECK\|skipped" | cut -c1-300
JAX_DEFAULT_MATMUL_PRECISION=highest XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout 150 python3 scripts/bench_spec.py \
  --dtype float32 --batches 1,64 --ks 1 --verify-paths prefill,decode --time-budget 100 --out $OUT/spec_f32.json \
  > $OUT/spec_f32.log 2>&1
echo "spec f32 rc $?"; grep -v "^Unable" $OUT/spec_f32.log | grep "|\|CHECK\|skipped\|agrees" | cut -c1-300
