# issue 18, call 6: flash8's prefill 1x4096 with the routed experts' combine behind an optimization barrier (its
# gathers then fuse with nothing after them, so the shared expert's column-major product cannot set their layout),
# FP8 and bf16 models, each against the same model without the barrier (scripts/probe_fp8_layout.py --model).
export PYTHONPATH=$PYTHONPATH:$PWD/scripts
timeout 280 python3 scripts/probe_fp8_layout.py --shapes "" --reps 3 --model flash8 --prefill 4096 \
  --out $OUT/probe_barrier.json > $OUT/probe_barrier.log 2>&1; echo "probe rc $?"
grep -v "^Unable" $OUT/probe_barrier.log | grep "|\|prefill" | cut -c1-250
