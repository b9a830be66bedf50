# spec (issue 16), call A: one H200, <= 145 s, two runs of scripts/bench_spec.py (flash8 + MTP, random weights).
# Each verify row is checked (its first token and logprob against the plain step's) before its timing is kept.
# New on this branch: verify rows skip the linear-attention prefill kernel (decode recurrence from S_0 in XLA, then the
# decode kernel over the accepted rows writes the state) -- compare B=1 k=1 with call D's 1.280x, B=64 k=1 with 1.448x.
# 1. bfloat16: B=1 plain + k=1, B=64 plain + k=1,2,3 (B=64 k=2,3 were not measured in session 5).
timeout 100 python3 scripts/bench_spec.py --batches 1,64 --ks 1 --large-ks 1,2,3 --time-budget 75 \
  --out $OUT/b1_b64.json > $OUT/b1_b64.log 2>&1; echo "bf16 rc $?"; grep "copy\||\|BELOW\|CHECK\|skipped\|target" $OUT/b1_b64.log | head -14
# 2. float32, B=16, plain + k=1, with the copy probe bench_spec uses now. Session 5's call C floor looked broken only
#    because its 23.15 ms floor (at that run's own 1.74 TB/s probe) was rescaled with 2.66 TB/s; expected here:
#    plain / its floor ~1.2 and no "BELOW its floor" warning.
timeout 45 env XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 python3 scripts/bench_spec.py --dtype float32 --batches 16 --ks 1 \
  --time-budget 25 --out $OUT/f32_b16.json > $OUT/f32_b16.log 2>&1; echo "f32 rc $?"; grep "copy\||\|BELOW\|CHECK" $OUT/f32_b16.log | head -8
