# spec (#16), branch s5-spec: verify step vs plain decode step, flash8 + MTP layer, random bf16 weights (drafts never
# accepted: costs only). Each row prints measured ms beside the byte floor (bytes / measured copy bandwidth, uniform routing)
# and the device profile (busy, gaps, launches). Order: B=1 plain; B=1 k=1 the OLD way (greedy/sampling chosen by lax.cond
# on the device, which syncs the host on the GPU); B=1 k=1,3 the new way (static choice, MTP MoE at one row); then a
# SYNTHETIC routing pass at B=1 (hot8: every token uses the same 8 experts; reuses the compiled steps); then B=16, B=64 k=1,3.
# Correctness on the device before timing: verify's first token/logprob == the plain step's (agree %, |dlogprob| per row).
# ~145 s expected; no new measurement after 135 s. JSON + log in $OUT/spec.
mkdir -p $OUT/spec
timeout 165 python3 scripts/bench_spec.py --profile --routing uniform,hot8 --hot-batches 1 --cond-ks 1 --batches 1,16,64 --ks 1,3 --large-ks 1,3 --time-budget 135 --out $OUT/spec/bench_spec_h200.json > $OUT/spec/bench_spec_h200.log 2>&1; echo "bench_spec rc $?"; grep -v "^  " $OUT/spec/bench_spec_h200.log | tail -45
