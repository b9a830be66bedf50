# moe (issue #13 / #16), one H200, <= 145 s. Every row of lingjax's kernels is checked against a float64 oracle (rel
# ~3e-3 for bf16) before timing, and timed twice: wall clock (20 calls chained in one jitted function) and CUPTI device
# time of the same calls ('dev us', 'dev%copy': what the T <= 256 target is judged on). Tables at the end of each log.
# 1. T = 1..16: decode path vs grouped path (rows lingjax / lingjax-grouped at T <= 4 = gpu.DECODE_MAX_TOKENS,
#    lingjax / lingjax-decode above), and the decode path with the n tiles of a pair launched first ('dec ...N' rows
#    against 'dec ...' = the default): if the N rows win at T = 8 / 16, set DecodeConfig.n_first's default and raise
#    DECODE_MAX_TOKENS to where the decode path stops winning.
timeout 75 python3 scripts/bench_moe.py --shapes flash --tokens 1,2,4,8,16 --methods lingjax,decode \
  --sweep 2,4,8,16 --trace all --iters 20 --budget-s 60 --out $OUT/bench_moe_s6b_small.json 2>&1 \
  | grep -v "^Unable to initialize backend" | tee $OUT/bench_moe_s6b_small.log
# 2. T = 32, 64 (decode batches 32 / 64): the same comparison (M = 32 / 64-row tiles on the decode path).
timeout 40 python3 scripts/bench_moe.py --shapes flash --tokens 32,64 --methods lingjax,decode \
  --sweep 32,64 --trace all --iters 20 --budget-s 28 --out $OUT/bench_moe_s6b_b3264.json 2>&1 \
  | grep -v "^Unable to initialize backend" | tee $OUT/bench_moe_s6b_b3264.log
# 3. T = 4096: per-kernel device time of the grouped matmuls (what limits the 60% target: gate/up vs down).
timeout 30 python3 scripts/bench_moe.py --shapes flash --tokens 4096 --methods lingjax,lingjax-mm \
  --trace all --iters 5 --budget-s 20 --out $OUT/bench_moe_s6b_4096.json 2>&1 \
  | grep -v "^Unable to initialize backend" | tee $OUT/bench_moe_s6b_4096.log
