# issue 16, call 3: the float32 check of the default verify path (decode) at B=64 (call 2 ran out of its time budget
# before it; B=1 agreed 100%, |dlogprob| 9.5e-7), matmuls at full float32 precision.
export PYTHONPATH=$PYTHONPATH:$PWD/scripts
JAX_DEFAULT_MATMUL_PRECISION=highest XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout 150 python3 scripts/bench_spec.py \
  --dtype float32 --batches 64 --ks 1 --verify-paths decode --time-budget 120 --out $OUT/spec_f32_b64.json \
  > $OUT/spec_f32_b64.log 2>&1
echo "spec f32 rc $?"; grep -v "^Unable" $OUT/spec_f32_b64.log | grep "|\|CHECK\|skipped\|agrees" | cut -c1-300
