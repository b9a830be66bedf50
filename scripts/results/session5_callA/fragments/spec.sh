# spec (#16): verify step vs plain decode step, flash8 + MTP on the H200, with the byte floor (uniform routing) beside
# every measurement and the device profile (busy/gaps/launches, verify-minus-plain by kernel category). New on the branch:
# the greedy/sampling choice is static (no lax.cond: on the GPU it syncs the host); --cond-ks 1 also times B=1 k=1 the old
# way for comparison. Then, if time is left, a SYNTHETIC routing pass at B=1 (hot8: every token uses the same 8 experts;
# reuses the compiled B=1 steps). Checks on the device first: verify's first token/logprob == the plain step's (per row).
# B=1,16,64 x k=1,2,3; expected ~170-190 s (no new measurement after 165 s). Branch s5-spec.
mkdir -p $OUT/spec
timeout 200 env PYTHONPATH=.:scripts python3 scripts/bench_spec.py --profile --routing uniform,hot8 --hot-batches 1 --cond-ks 1 --batches 1,16,64 --ks 1,2,3 --time-budget 165 --out $OUT/spec/bench_spec_h200.json > $OUT/spec/bench_spec_h200.log 2>&1; echo "bench_spec rc $?"; grep -v "^  " $OUT/spec/bench_spec_h200.log | tail -60
