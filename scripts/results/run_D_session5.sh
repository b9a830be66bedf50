#!/bin/bash
# device call D of session 5 (nvidia-h200, main at the commit in run_D_session5_commit.txt): issue 16's verify-step
# cost on merged main, k = 1, 2, 3 at B = 1, 16, 64, with the corrected copy bandwidth for the floor columns.
. scripts/gpu_env.sh >/dev/null; export PYTHONPATH=$PYTHONPATH:$PWD/scripts
timeout 175 python3 scripts/bench_spec.py --batches 1,16,64 --ks 1,2,3 --large-ks 1,2,3 --time-budget 125 --out $OUT/bench_spec_h200_main.json > $OUT/bench_spec_h200_main.log 2>&1
echo "bench_spec rc $?"; grep -v "^Unable" $OUT/bench_spec_h200_main.log | tail -32
