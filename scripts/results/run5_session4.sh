#!/bin/bash
# device call 5 (session 4, nvidia-h200-x2, warm after call 4, same commit): multi-step decode overhead.
. scripts/gpu_env.sh >/dev/null; export PYTHONPATH=$PYTHONPATH:$PWD/scripts; timeout 95 python3 scripts/bench_overlap.py --batch 1 --decode-steps 8 --out $OUT/bench_overlap_multistep_h200.json > $OUT/bench_overlap_multistep_h200.log 2>&1; echo rc $?; grep -v "^Unable" $OUT/bench_overlap_multistep_h200.log | tail -15
