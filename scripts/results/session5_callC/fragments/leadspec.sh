# issue 16: is call B's B=16/64 check failure (verify's first token vs the plain step's) a bug or routing flips of the
# random bf16 model (near-tied experts; B=1 uniform differed by 0.089 in logprob, SYNTHETIC hot8 by 0.0027)?
# (1) SYNTHETIC hot8 routing at B=16 (no near-ties), bf16; (2) uniform routing in float32 (flash8, vocab 32768), B=16.
timeout 75 python3 scripts/bench_spec.py --routing hot8 --hot-batches 16 --batches 16 --ks 1,3 --large-ks 1,3 --time-budget 40 --out $OUT/bench_spec_hot8_b16.json > $OUT/bench_spec_hot8_b16.log 2>&1; echo "hot8 rc $?"; grep "|\|CHECK\|target" $OUT/bench_spec_hot8_b16.log | head -8
timeout 75 env XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 python3 scripts/bench_spec.py --dtype float32 --vocab 32768 --batches 16 --ks 1,3 --large-ks 1,3 --time-budget 40 --out $OUT/bench_spec_f32_b16.json > $OUT/bench_spec_f32_b16.log 2>&1; echo "f32 rc $?"; grep "|\|CHECK\|target" $OUT/bench_spec_f32_b16.log | head -8
