# prefix (#17), branch s5-prefix: TTFT of prefix-cache hits after this session's fixes (flash8, 8192 shared + 512 own
# tokens). 1) bench_prefix (the table: off / miss / hit / hit1, checks the hits hit; the default engine's hit
# now runs one step). 2) profile_prefix (checks hit == miss on the device first, then the hit's pieces, its step
# alone / back to back / launch time, a kernel trace by category). The two share compiled steps through a JAX cache dir.
mkdir -p $OUT/prefix; export JAX_COMPILATION_CACHE_DIR=/tmp/jaxcache_prefix; s0=$SECONDS
timeout 120 python3 scripts/bench_prefix.py --preset flash8 --n 3 --out $OUT/prefix/bench_prefix_h200.json > $OUT/prefix/bench_prefix_h200.log 2>&1; echo "bench_prefix rc $? at $((SECONDS - s0)) s"; tail -9 $OUT/prefix/bench_prefix_h200.log
left=$((166 - (SECONDS - s0))); [ $left -gt 30 ] && { timeout $left python3 scripts/profile_prefix.py --n 2 --repeat 5 --moe-block-m '' --out $OUT/prefix > $OUT/prefix/profile_prefix_h200.log 2>&1; echo "profile_prefix rc $? at $((SECONDS - s0)) s"; grep -v "^ *[0-9.]* ([0-9]*) " $OUT/prefix/profile_prefix_h200.log | tail -40; }
