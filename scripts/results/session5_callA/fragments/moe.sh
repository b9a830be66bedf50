# moe (issue #13), branch s5-moe. One H200, after `. scripts/gpu_env.sh`, from the branch root. <= 235 s total.
# 1. decode path (new: gpu.experts_decode, T*k <= 32) at T=1 and T=4: whole layer 'lingjax' (now the decode path)
#    vs 'lingjax-grouped' (last session's grouped path) vs torch-gmm, plus the decode config sweep ('dec ...' rows);
#    every lingjax/dec row checked against a float64 oracle on the device (rel err column, ~3e-3 expected).
# 2. T=16..4096: unchanged grouped path (regression check), layout alone, torch-gmm, and the large-block sweep at
#    T=4096 (blocks of 64 rows with wide tiles, group_m 16); mm-gate-up = the gate/up grouped matmul alone.
mkdir -p "$OUT/moe"
timeout 95 python3 scripts/bench_moe.py --shapes flash --tokens 1,4 --methods lingjax,torch-gmm \
  --sweep 1,4 --out "$OUT/moe/bench_moe_decode.json" 2>&1 | grep -v "^Unable to initialize backend" \
  | tee "$OUT/moe/bench_moe_decode.log"
timeout 140 python3 scripts/bench_moe.py --shapes flash --tokens 16,64,256,4096 \
  --methods lingjax,lingjax-mm,layout,parts,torch-gmm --sweep 4096 --out "$OUT/moe/bench_moe_large.json" 2>&1 \
  | grep -v "^Unable to initialize backend" | tee "$OUT/moe/bench_moe_large.log"
