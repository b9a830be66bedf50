#!/bin/bash
# device call D of session 6 (nvidia-h200, main at the commit in run_D_session6_commit.txt): is call C's failed
# prefix-cache check (a hit differing from a miss of the same prompt on the H200, bf16 flash8) the restore riding
# in the hit's first step? bench_prefix (its checks first, then TTFT) on main with that change reverted, then on
# the tree before the revert (.wt_cache/prerevert).
. scripts/gpu_env.sh >/dev/null; export PYTHONPATH=$PYTHONPATH:$PWD/scripts
timeout 75 python3 scripts/bench_prefix.py --preset flash8 --n 1 --out $OUT/bench_prefix_reverted.json > $OUT/bench_prefix_reverted.log 2>&1
echo "reverted rc $?"; grep -v "^Unable" $OUT/bench_prefix_reverted.log | grep -i "check\||\|hit:" | cut -c1-300
cd .wt_cache/prerevert && export PYTHONPATH=/tmp/site:$PWD:$PWD/scripts
timeout 75 python3 scripts/bench_prefix.py --preset flash8 --n 1 --out $OUT/bench_prefix_prerevert.json > $OUT/bench_prefix_prerevert.log 2>&1
echo "prerevert rc $?"; grep -v "^Unable" $OUT/bench_prefix_prerevert.log | grep -i "check\||\|hit:" | cut -c1-300
