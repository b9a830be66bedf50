# issue 18, call 5: the FP8 prefill's transposed shared-expert product (call 4: cuBLAS wrote bf16[4096,4096]{0,1}, the
# combine's fusion read it transposed, 12.1 ms of 52.5). scripts/probe_fp8_layout.py: the product's layout and time per
# form of the reference matmul (K-major weight) at T=4096, then flash8's FP8 prefill 1x4096 per form.
export PYTHONPATH=$PYTHONPATH:$PWD/scripts
timeout 280 python3 scripts/probe_fp8_layout.py --tokens 4096 --iters 20 --reps 3 --model flash8 --prefill 4096 \
  --out $OUT/probe_fp8_layout.json > $OUT/probe_fp8_layout.log 2>&1; echo "probe rc $?"
grep -v "^Unable" $OUT/probe_fp8_layout.log | grep "|\|form" | cut -c1-250
