# mla (#14), branch s5-mla. One H200, from the branch root (runner's PYTHONPATH). ~130 s, limit 165 s.
# 1) The decode table with the NEW default (gpu.pick_config: h32n64w4st2 = one latent buffer, two programs
#    per SM; call A measured it at 87% of copy at B=64/256 x 32k, 79.7% at B=16 x 32k, CUPTI kernel time). Every
#    row is checked against the jnp reference on the device first (first 2 and last 2 requests; rel_err ~1e-3;
#    CHECK FAILED above 2e-2), then timed: wall clock per call (pct_copy, as rounds 1-2; it holds the jitted loop's
#    launch overhead) and CUPTI device time of the decode kernel alone (kernel_us, pct_kern: the target's figure)
#    and of every kernel of a call (busy_us, pct_busy: + the split combine + the bench loop's q update).
#    Target: >= 80% of copy at batch >= 16, context >= 4k. Order: B=16/64/256 x 32k, 8k, 4k, 128k, 1k, then B=1.
# 2) Separately (a failure cannot cost the table): the stream-K form of the default (sk: the batch's blocks in 264
#    equal runs; its first device run, so read its rel_err first) and round 2's default, at B=16/64/256 x 32k.
mkdir -p $OUT/mla
timeout 110 python3 scripts/bench_mla.py --methods paged-triton --prefill "" --packed "" --batches 16,64,256,1 \
  --contexts 32768,8192,4096,131072,1024 --device-time --out $OUT/mla --name bench_mla_decode_h200_table_s5 \
  > $OUT/mla/bench_mla_decode_h200_table_s5_stdout.log 2>&1
echo "table rc $?"; grep -v "^Unable to init" $OUT/mla/bench_mla_decode_h200_table_s5_stdout.log | grep -v '^{' | tail -24
timeout 50 python3 scripts/bench_mla.py --methods paged-triton --prefill "" --packed "" --batches 16,64,256 \
  --contexts 32768 --device-time --sweep 16:32768,64:32768,256:32768 --configs h32n64s0w4st2sk,h32n64s0w4st3 \
  --out $OUT/mla --name bench_mla_decode_h200_sk_s5 > $OUT/mla/bench_mla_decode_h200_sk_s5_stdout.log 2>&1
echo "stream-K rc $?"; grep -v "^Unable to init" $OUT/mla/bench_mla_decode_h200_sk_s5_stdout.log | grep -v '^{' | tail -12
