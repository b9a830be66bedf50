#!/bin/bash
# device calls A and B of session 6 (nvidia-h200-x2): each helper's fragment (devreq.sh) runs from a copy of
# its worktree in .wt_cache/<name> (commits in run_<call>_session6_commits.txt), two queues, one per GPU.
#   bash scripts/results/run_call_session6.sh LIMIT "names for GPU 0" "names for GPU 1" [BUDGET]
T0=$(date +%s); LIM=$1; G0=$2; G1=$3; BUDGET=${4:-555}
. scripts/gpu_env.sh
ROOT=$PWD
el() { echo $(( $(date +%s) - T0 )); }
runq() {
  local g=$1; shift
  for n in "$@"; do
    local t=$LIM left=$(( BUDGET - $(el) )); [ $t -gt $left ] && t=$left
    [ $t -lt 30 ] && { echo "$n: skipped ($t s left) at $(el) s" >> $OUT/queue$g.txt; continue; }
    mkdir -p $OUT/$n
    ( cd $ROOT/.wt_cache/$n && export PYTHONPATH=/tmp/site:$PWD:$PWD/scripts OUT=$OUT/$n CUDA_VISIBLE_DEVICES=$g \
      && timeout $t bash devreq.sh > $OUT/devreq.log 2>&1 )   # OUT is $OUT/$n here
    echo "$n: rc $? at $(el) s (limit $t)" >> $OUT/queue$g.txt
  done
}
runq 0 $G0 &
runq 1 $G1 &
wait
cat $OUT/queue0.txt $OUT/queue1.txt
for f in $OUT/*/devreq.log; do echo "=== $f"; grep -v "^Unable to initialize backend\|^$" $f | tail -n 12 | cut -c1-200; done
cd $OUT && tar czf /tmp/run.tgz * && rm -rf $OUT/* && mv /tmp/run.tgz $OUT/ && ls -la $OUT
