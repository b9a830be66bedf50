# prefix (issue 17): why enqueueing a step's kernels costs the host ~11 us each. One process, ~2 min:
# micro (64 chained XLA kernels vs jax-triton calls with 0/16/64 KiB opaques) and the flash8 hit step
# (512 tokens after 8192) + decode B=1 step, each compiled under XLA command-buffer settings
# (default / cb_off / cb_all / cb_min1); every variant's token+logprob checked against default's first.
timeout 140 python3 scripts/probe_launch.py --out $OUT --budget 95 > $OUT/probe_launch.log 2>&1; echo "probe_launch rc $?"; tail -45 $OUT/probe_launch.log
