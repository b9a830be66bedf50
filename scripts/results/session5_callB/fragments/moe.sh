# moe (issue #13), branch s5-moe: the final MoE comparison, one H200, one process, <= 165 s. Flash shapes (d 4096,
# I 1024, E 256, top-8, bf16). Every lingjax / dec / grouped-matmul row is checked on the device against a float64
# oracle (rel err column, ~2-3e-3 expected); the table is printed at the end and the JSON written row by row.
# T=1: 'lingjax' = the new decode path (gpu.experts_decode, default config), 'lingjax-grouped' = the grouped path
#   it replaces at T=1, both also traced ('trace' lines: per-kernel device us, busy vs span per call; span - busy =
#   device idle between kernels); 'dec ...' = round-2 decode configs (first = the default); torch-gmm.
# T=4096, 16384: the grouped path with the new large-block default (group_m 16), matmuls alone, torch-gmm.
mkdir -p "$OUT/moe"
timeout 165 python3 scripts/bench_moe.py --shapes flash --tokens 1,4096,16384 --methods lingjax,lingjax-mm,torch-gmm \
  --sweep 1 --trace 1 --out "$OUT/moe/bench_moe_final.json" 2>&1 | grep -v "^Unable to initialize backend" \
  | tee "$OUT/moe/bench_moe_final.log"
