# issue 22: the all-reduce time per step at tp 2 (needs both GPUs of nvidia-h200-x2; ~60 s; session 6 call C: 52 s).
# profile_tp now prints the kernel names and streams by device time, so the collectives can be identified.
export PYTHONPATH=$PYTHONPATH:$PWD/scripts
XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout 150 python3 scripts/profile_tp.py --preset flash --tp 2 --decode 1x1024,16x1024 \
  --steps 5 --reps 2 --out $OUT/profile_tp.json > $OUT/profile_tp.log 2>&1
echo "profile_tp rc $?"; grep -v "^Unable" $OUT/profile_tp.log | grep "|\|B=" | cut -c1-300
