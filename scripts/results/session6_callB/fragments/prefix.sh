# prefix (issue 17), final state of s6-prefix: the hit's state restore rides in its step (one jitted call fewer).
# 1) TTFT hit vs miss on flash8 (8192 shared + 512 own tokens); checks the hit's token/logprob against the
#    cache-off engine first (CHECK FAILED = stop). ~60 s.
timeout 80 python3 scripts/bench_prefix.py --preset flash8 --n 3 --out $OUT/bench_prefix.json > $OUT/bench_prefix.log 2>&1; echo "bench_prefix rc $?"; tail -9 $OUT/bench_prefix.log
# 2) where the hit's and decode B=1 step's time goes from an idle device: host return, readback latency,
#    profiled startup gaps; default vs command buffers off / all (tokens checked equal first). ~50 s.
timeout 65 python3 scripts/probe_launch.py --parts steps --variants default cb_off cb_all --budget 40 --out $OUT > $OUT/probe_launch.log 2>&1; echo "probe_launch rc $?"; tail -40 $OUT/probe_launch.log
