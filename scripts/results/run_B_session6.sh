#!/bin/bash
# device call B of session 6 (nvidia-h200-x2): first, on both GPUs, the full-depth tp 2 decode step profiled
# (scripts/profile_tp.py: all-reduce time per step, host enqueue time; main at the commit in
# run_B_session6_commits.txt, "lead"), then the helpers' fragments (run_call_session6.sh, two queues).
#   bash scripts/results/run_B_session6.sh LIMIT "names for GPU 0" "names for GPU 1" BUDGET
T0=$(date +%s)
. scripts/gpu_env.sh
mkdir -p $OUT/lead_tp
( export PYTHONPATH=$PYTHONPATH:$PWD/scripts XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
  timeout 150 python3 scripts/profile_tp.py --preset flash --tp 2 --decode 1x1024,16x1024 --steps 10 --reps 2 \
    --out $OUT/lead_tp/profile_tp_flash_tp2.json > $OUT/lead_tp/profile_tp_flash_tp2.log 2>&1
  echo "profile_tp rc $? at $(( $(date +%s) - T0 )) s"; grep -v "^Unable" $OUT/lead_tp/profile_tp_flash_tp2.log | tail -12 )
bash scripts/results/run_call_session6.sh "$1" "$2" "$3" $(( $4 - ($(date +%s) - T0) ))
