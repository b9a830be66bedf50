# issue 16 (speculative decoding), prepared in session 7 , not yet run. One H200, <= 150 s on a fresh
# machine (Triton compiles included). Run from the repository root with `. scripts/gpu_env.sh` sourced and $OUT set.
# What it decides: whether the new verify paths (Engine(spec_verify=...), lingjax.speculative.VERIFY_PATHS) beat
# today's default ("prefill") at B=1 and at B=64, and so whether the default should change. The paths:
#   prefill     today: the verify rows packed as a prefill-shaped step (MLA through the paged prefill kernel: at B=1
#               one program for 2 tokens x 32 heads walks all 1024 positions; the linear layers' prefill kernel
#               launched with every verify sequence skipped)
#   decode      MLA through the paged decode kernel, a row per token (context split over programs); the MTP
#               attention at its one output row per request; no linear prefill-kernel launch (committed row through
#               the decode kernel, the rollback over the drafts only)
#   mla_decode  decode's MLA part only (the linear layers as today)
# Correctness on the device before each timing: bench_spec checks every verify step's first emitted token and its
# logprob against the plain step's greedy token (agreement %, max |dlogprob|), per path; it reports "CHECK FAILED"
# below 75% or at |dlogprob| >= 0.1 (bf16 B=64 may flag near-tied expert flips of the random model, as in sessions
# 5-6 (rc 1; float32 agreed to 1e-5 there); B=1 agreed 100%, |dlogprob| 0.004 in session 6).
# One process (one model init): B=1 plain, k=1 for the 3 paths, then B=64 plain, k=1 for the 3 paths; no new
# measurement starts after 100 s (rows are written to the JSON as they finish), with the device profile (per path:
# busy us, launches, by category, and the verify-minus-plain per-kernel table). k=2 is left out for time.
export PYTHONPATH=$PYTHONPATH:$PWD/scripts
timeout 140 python3 scripts/bench_spec.py --batches 1,64 --ks 1 --verify-paths prefill,decode,mla_decode --profile \
  --time-budget 100 --out $OUT/spec_paths.json > $OUT/spec_paths.log 2>&1
echo "spec rc $?"
grep -v "^Unable" $OUT/spec_paths.log | grep "copy bandwidth\||\|target\|CHECK\|BELOW\|skipped" | cut -c1-400
grep -A 17 "verify minus plain by kernel \[uniform, verify=prefill\] B=1 k=1" $OUT/spec_paths.log | tail -16
grep -A 17 "verify minus plain by kernel \[uniform, verify=decode\] B=1 k=1" $OUT/spec_paths.log | tail -16
