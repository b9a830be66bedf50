# issue 18, session 9 call 1: the e2e decode table in FP8 with the dense decode path on the Triton kernel
# (--fp8-dense-decode triton) and on XLA's FP8 dot, same GPU (flash8, C=1024); bf16 for scale: dtprof's profile.
export PYTHONPATH=$PYTHONPATH:$PWD/scripts
for dd in triton xla; do
timeout 120 python3 scripts/bench_e2e.py --quantize fp8-block --fp8-dense-decode $dd --decode 1x1024,16x1024,64x1024,256x1024 \
  --prefill "" --steps 10 --reps 2 --e2e-max-tokens 0 --compile-threads 4 --out $OUT/bench_e2e_flash8_fp8_$dd.json \
  > $OUT/bench_e2e_flash8_fp8_$dd.log 2>&1; echo "e2e fp8 $dd rc $?"; grep "^|" $OUT/bench_e2e_flash8_fp8_$dd.log
done
