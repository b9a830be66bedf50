#!/bin/bash
# A device call of sessions 8-9 (nvidia-h200-x2), run from the repository root: two queues of fragments (*.sh of
# $FRAGMENTS, default this folder), one per GPU, then the fragments that need both GPUs; outputs in
# $OUT/<fragment>/, tarred.
#   [FRAGMENTS=scripts/results/session9] bash scripts/results/session8/run_call.sh BUDGET "fragments for GPU 0" \
#       "fragments for GPU 1" ["both GPUs"]
T0=$(date +%s); BUDGET=$1; G0=$2; G1=$3; BOTH=$4
HERE=${FRAGMENTS:-scripts/results/session8}
. scripts/gpu_env.sh
el() { echo $(( $(date +%s) - T0 )); }
run1() {  # run1 GPUS NAME: one fragment, no later than the budget allows
  local g=$1 n=$2 left=$(( BUDGET - $(el) ))
  [ $left -lt 30 ] && { echo "$n: skipped ($left s left) at $(el) s" >> $OUT/queue.txt; return; }
  mkdir -p $OUT/$n
  ( export OUT=$OUT/$n CUDA_VISIBLE_DEVICES=$g PYTHONPATH=$PYTHONPATH:$PWD/scripts && timeout $left bash $HERE/$n.sh > $OUT/fragment.log 2>&1 )   # OUT is $OUT/$n here
  echo "$n: rc $? at $(el) s on GPU $g" >> $OUT/queue.txt
}
runq() { local g=$1; shift; for n in "$@"; do run1 $g $n; done; }
runq 0 $G0 &
runq 1 $G1 &
wait
for n in $BOTH; do run1 0,1 $n; done
cat $OUT/queue.txt
for f in $OUT/*/fragment.log; do echo "=== $f"; grep -v "^Unable to initialize backend\|^$" $f | tail -n 40 | cut -c1-300; done
cd $OUT && tar czf /tmp/run.tgz * && rm -rf $OUT/* && mv /tmp/run.tgz $OUT/ && ls -la $OUT
