# mla (#14), branch s5-mla. One H200, from the branch root after `. scripts/gpu_env.sh`. ~200 s.
# MLA decode kernel, round 3: every row is checked against the jnp reference on the device first (first 2 and last
# 2 requests; rel_err column, ~1e-3 expected; CHECK FAILED above 2e-2), then timed: wall clock per call (as rounds
# 1-2) AND the CUPTI device time of the decode kernel alone / of every kernel of the call (--device-time). Rows in
# order: B=16 32k, B=16 4k, B=256 32k, B=256 4k, B=64 32k, B=64 4k (saved as they finish: a timeout keeps the
# earlier ones).
#  - default (h32n64w4st3) at each shape;
#  - sweep: in-kernel split combine (fc), 32-token blocks with 2/3/4 blocks in flight (st4/st5/st6), 2 programs
#    per SM (h32n64w4st2), twice the splits merged in the kernel (s-2 fc), stream-K runs (sk: the batch's blocks
#    in equal runs, one per resident program: 132, or 264 for h32n64w4st2sk);
#  - profile rows: the kernel's own %globaltimer per program (start/end spread, program times, SMs used) for the
#    default and fc at B=16 32k, B=16 4k and B=256 32k.
mkdir -p $OUT/mla
timeout 228 python3 scripts/bench_mla.py --methods paged-triton --prefill "" --batches 16,256,64 --contexts 32768,4096 \
  --device-time --sweep 16:32768,16:4096,256:32768,64:32768 --profile 16:32768,16:4096,256:32768 \
  --profile-configs h32n64s0w4st3fc \
  --configs h32n64s0w4st3fc,h32n32s0w4st4,h32n32s0w4st5,h32n32s0w4st6,h32n64s0w4st2,h32n64s-2w4st3fc,h32n64s0w4st3sk,h32n32s0w4st5sk,h32n64s0w4st2sk \
  --out $OUT/mla --name bench_mla_decode_h200_r3 > $OUT/mla/bench_mla_decode_h200_r3_stdout.log 2>&1
echo "bench_mla rc $?"; grep -v "^Unable to init" $OUT/mla/bench_mla_decode_h200_r3_stdout.log | grep -v '^{' | tail -60
