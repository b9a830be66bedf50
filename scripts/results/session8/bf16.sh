# issues 18 and 14, call 8: bench_e2e's bf16 table on flash8 beside call 7's FP8 one (same rows, same code).
export PYTHONPATH=$PYTHONPATH:$PWD/scripts
timeout 170 python3 scripts/bench_e2e.py --decode 1x1024,16x1024,64x1024,256x1024 --prefill 1x4096 \
  --steps 10 --reps 2 --e2e-max-tokens 0 --compile-threads 4 --out $OUT/bench_e2e_flash8_bf16.json \
  > $OUT/bench_e2e_flash8_bf16.log 2>&1; echo "e2e bf16 rc $?"; grep "^|\|GiB" $OUT/bench_e2e_flash8_bf16.log
