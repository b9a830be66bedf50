# issue 18, session 9 call 3: the decode steps with XLA's dot merger off (--xla_disable_hlo_passes=dot-merger: the
# q / k / v projections of one input stay three dots instead of one dot on a concatenation of their weights), fp8-channel,
# fp8-block and bf16 (flash8, C=1024); compare with call 2's tables (the merger on).
export PYTHONPATH=$PYTHONPATH:$PWD/scripts
for q in fp8-channel fp8-block none; do
XLA_FLAGS="--xla_disable_hlo_passes=dot-merger" timeout 100 python3 scripts/bench_e2e.py --quantize $q --decode 16x1024,64x1024 \
  --prefill "" --steps 10 --reps 2 --e2e-max-tokens 0 --compile-threads 4 --out $OUT/bench_e2e_nomerge_$q.json \
  > $OUT/bench_e2e_nomerge_$q.log 2>&1; echo "e2e nomerge $q rc $?"; grep "^|" $OUT/bench_e2e_nomerge_$q.log
done
