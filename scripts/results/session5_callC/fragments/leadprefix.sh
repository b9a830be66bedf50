# issue 17 on merged main: prefix-cache TTFT, flash8, 8192 shared + 512 own tokens (call B ran the prefix branch alone)
timeout 80 python3 scripts/bench_prefix.py --preset flash8 --n 3 --out $OUT/bench_prefix_h200_main.json > $OUT/bench_prefix_h200_main.log 2>&1; echo "bench_prefix rc $?"; tail -9 $OUT/bench_prefix_h200_main.log
