# mla (#14), branch s6-mla. One H200, from the worktree root. Total <= 150 s (timeouts 86 + 62).
# 1) The decode table with the NEW default (gpu.pick_config: h32n64w4st2 + bf16 split partials "pb";
#    call A: +3-5 points at B=16 4k-32k and B=64 4k). Every row is checked against the jnp reference on the device
#    first (rel_err ~1-2e-3; CHECK FAILED above 2e-2), then timed: CUPTI kernel time of the decode kernel alone
#    (kernel_us / pct_kern: the target's figure, >= 80% of copy at batch >= 16, context >= 4k), every kernel of a
#    call (busy_us / pct_busy: + the split merge), and the wall clock (us / pct_copy, with the loop's launch cost).
#    Rows in order of importance (a timeout keeps the earlier ones).
mkdir -p $OUT
timeout 86 python3 scripts/bench_mla.py --methods paged-triton --prefill "" --packed "" --device-time \
  --shapes 16:4096,16:8192,16:32768,64:4096,64:8192,64:32768,256:4096,256:8192,256:32768,1:131072,16:131072,64:131072,1:32768,256:131072 \
  --out $OUT --name s6b_table > $OUT/s6b_table_stdout.log 2>&1
echo "table rc $?"; grep -v "^Unable to init" $OUT/s6b_table_stdout.log | grep -v '^{' | tail -18
# 2) Alternatives at the shapes still short of 80% (after the table; a failure cannot cost it): session 5's default
#    (float32 partials: the same-run A/B of pb), 2 buffers + 1 program per SM with bf16 partials (st3pb: session 5
#    measured st3 ahead of st2 at B=16 4k), and the merge kernel (pbmk: read busy_us, the kernel is the default's).
timeout 62 python3 scripts/bench_mla.py --methods paged-triton --prefill "" --packed "" --device-time \
  --shapes 16:4096,64:4096,16:8192 --sweep 16:4096,64:4096,16:8192 \
  --configs h32n64s0w4st2pbmk,h32n64s0w4st3pb,h32n64s0w4st2 --out $OUT --name s6b_alt > $OUT/s6b_alt_stdout.log 2>&1
echo "alternatives rc $?"; grep -v "^Unable to init" $OUT/s6b_alt_stdout.log | grep -v '^{' | tail -14
