# issue 18, call 3: why the FP8 prefill (call 2: 1x4096 67.8 ms) is slower than bf16 (session 6: 38.9 ms): one prefill
# step of 4096 tokens traced per mode (profile_fp8 --prefill), by kernel category, beside the B=16 decode step.
export PYTHONPATH=$PYTHONPATH:$PWD/scripts
timeout 220 python3 scripts/profile_fp8.py --modes bf16,fp8 --batch 16 --steps 3 --reps 2 --prefill 4096 --out $OUT \
  > $OUT/profile_fp8_prefill.log 2>&1; echo "profile_fp8 rc $?"
grep -v "^Unable\|^$" $OUT/profile_fp8_prefill.log | grep -A24 "prefill 4096:" | cut -c1-200; grep "^|" $OUT/profile_fp8_prefill.log
