# issue 18, session 9 call 1: each dense projection shape of flash at T = 1 / 16 / 64: bf16, fp8-block as dispatched
# (XLA's FP8 dot), the Triton decode config (fp8-block-tdec); 4 weight copies per loop trip (no L2 residency); then
# the decode config's tile sweep at flash's 4096 x 4096 (dec tags).
export PYTHONPATH=$PYTHONPATH:$PWD/scripts
timeout 170 python3 scripts/bench_fp8.py --no-moe --tokens 1,16,64 --methods bf16,fp8-block,fp8-block-tdec --copies 4 \
  --iters 24 --reps 2 --out $OUT/bench_fp8_dense.json > $OUT/bench_fp8_dense.log 2>&1; echo "bench_fp8 dense rc $?"
grep "^|" $OUT/bench_fp8_dense.log
timeout 150 python3 scripts/bench_fp8.py --no-moe --dense "attn 4096x4096" --tokens 16 --methods fp8-block --sweep \
  --sweep-tokens 16,64 --sweep-tags "dec,dec n64 s4 st3,dec n64 s8 st3,dec n64 s8 st6,dec n64 s2 st3,dec n128 s4 st3,dec n128 s8 st3,dec n128 s8 st6,dec n128 s16 st3,dec n128 s2 st3,dec n64 s16 st3" \
  --copies 4 --iters 24 --reps 2 --out $OUT/bench_fp8_sweep.json > $OUT/bench_fp8_sweep.log 2>&1; echo "sweep rc $?"
grep "^|" $OUT/bench_fp8_sweep.log
