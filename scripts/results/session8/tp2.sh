# issue 22, call 2: the all-reduce time per step at tp 2 (both GPUs of nvidia-h200-x2; call 1: 54 s for 2 rows), B=1/16/64;
# profile_tp counts XLA's psum kernels as all-reduces since call 1 (they were left out of its all-reduce column).
export PYTHONPATH=$PYTHONPATH:$PWD/scripts
XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout 120 python3 scripts/profile_tp.py --preset flash --tp 2 --decode 1x1024,16x1024,64x1024 \
  --steps 5 --reps 2 --out $OUT/profile_tp.json > $OUT/profile_tp.log 2>&1
echo "profile_tp rc $?"; grep -v "^Unable" $OUT/profile_tp.log | grep "|\|B=" | cut -c1-300
