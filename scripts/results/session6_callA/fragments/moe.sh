# moe (issue #13 / #16): the MoE decode path at T = 1..16, one H200, <= 145 s. Every row of lingjax's kernels is
# checked against a float64 oracle (rel ~3e-3 for bf16) before timing, and timed twice: wall clock (20 calls chained
# in one jitted function) and CUPTI device time of the same calls (columns 'dev us', 'dev%copy'). Tables at the end
# of each log (rows past --budget-s are listed as skipped, so the tables print before the timeout).
# 1. T = 1, 2, 3, 4, 8, 16: decode path (lingjax at T=1 / lingjax-decode at T>1) vs grouped path (lingjax-grouped at
#    T=1 / lingjax at T>1), default configs.
timeout 80 python3 scripts/bench_moe.py --shapes flash --tokens 1,2,3,4,8,16 --methods lingjax,decode \
  --trace all --iters 20 --budget-s 62 --out $OUT/bench_moe_s6a_paths.json 2>&1 \
  | grep -v "^Unable to initialize backend" | tee $OUT/bench_moe_s6a_paths.log
# 2. decode-config sweeps at T = 1 (7 configs) and T = 2 (3), rows 'dec ...' (first = the default).
timeout 65 python3 scripts/bench_moe.py --shapes flash --tokens 1,2 --methods none --sweep 1,2 \
  --trace all --iters 20 --budget-s 48 --out $OUT/bench_moe_s6a_sweep.json 2>&1 \
  | grep -v "^Unable to initialize backend" | tee $OUT/bench_moe_s6a_sweep.log
