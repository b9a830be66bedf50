# issue 18, session 9 call 4: the same table in bf16 and fp8-block (the second GPU of the same host as final_ch.sh).
export PYTHONPATH=$PYTHONPATH:$PWD/scripts
timeout 150 python3 scripts/bench_e2e.py --decode 1x1024,16x1024,64x1024,256x1024 --prefill 1x4096 --steps 10 --reps 3 \
  --e2e-max-tokens 0 --compile-threads 4 --out $OUT/bench_e2e_flash8_bf16.json > $OUT/bench_e2e_flash8_bf16.log 2>&1
echo "e2e bf16 rc $?"; grep "^|" $OUT/bench_e2e_flash8_bf16.log
timeout 170 python3 scripts/bench_e2e.py --quantize fp8-block --decode 1x1024,16x1024,64x1024,256x1024 --prefill 1x4096 \
  --steps 10 --reps 3 --e2e-max-tokens 0 --compile-threads 4 --out $OUT/bench_e2e_flash8_fp8_block.json \
  > $OUT/bench_e2e_flash8_fp8_block.log 2>&1; echo "e2e fp8-block rc $?"; grep "^|" $OUT/bench_e2e_flash8_fp8_block.log
