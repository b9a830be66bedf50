# spec (issue 16), call B: one H200, <= 145 s, two runs of scripts/bench_spec.py (flash8 + MTP, random weights).
# Every verify row is checked (its first token and logprob against the plain step's) before its timing is kept
# (bf16 B >= 16 rows flag near-tied expert flips of the random model: float32 rows agree to 1e-5, session 5 call C).
# The branch's verify step: verify rows skip the linear-attention prefill kernel (outputs by the decode recurrence from
# S_0, state by the decode kernel over the accepted rows). Before it (session 5 call D): B=1 k=1 1.280x, B=64 k=1
# 1.448x; (session 6 call A) B=64 k=3 1.902x.
# 1. B=1 k=1 with the MoE decode path at T <= 1 (main) and forced to T <= 2 (the verify step's 2 tokens take it too),
#    one process, with the device profile (busy time, launches, verify minus plain by kernel category).
timeout 75 python3 scripts/bench_spec.py --batches 1 --ks 1 --moe-decode-max-tokens 1,2 --profile --time-budget 55 \
  --out $OUT/b1_dmt12.json > $OUT/b1_dmt12.log 2>&1; echo "b1 rc $?"; grep "copy\||\|BELOW\|target" $OUT/b1_dmt12.log | head -24
# 2. B=64, plain + k=1 and k=3 (the rollback's state traffic: 3 transfers per rejected request and layer, was 6).
timeout 70 python3 scripts/bench_spec.py --batches 64 --ks 1,3 --time-budget 45 --out $OUT/b64.json \
  > $OUT/b64.log 2>&1; echo "b64 rc $?"; grep "copy\||\|BELOW" $OUT/b64.log | head -8
