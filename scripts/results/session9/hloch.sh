# issue 18, session 9 call 3: what the fp8-channel decode step's large XLA fusion is (call 2: fusion_2855, 220 us per
# B=16 step in 7 launches, the same at B=64: a weight-sized pass). The B=16 step profiled with an HLO dump; each top
# XLA fusion printed with its source lines (scripts/hlo_fusion.py); the optimized module comes back gzipped.
export PYTHONPATH=$PYTHONPATH:$PWD/scripts
XLA_FLAGS="--xla_dump_to=/tmp/dump --xla_dump_hlo_module_re=jit_one" timeout 150 python3 scripts/profile_fp8.py \
  --scheme fp8-channel --modes fp8 --batch 16 --steps 3 --reps 1 --out $OUT > $OUT/profile_fp8_dump.log 2>&1; echo "profile rc $?"
NAMES=$(python3 -c "
import json; r = json.load(open('$OUT/profile_fp8.json'))['modes']['fp8']
print(','.join(k['name'] for k in r['top'] if 'fusion' in k['name'] or 'wrapped' in k['name'] or 'nvjet' in k['name']))")
echo "fusions: $NAMES"; ls /tmp/dump | grep after_optimizations.txt
timeout 60 python3 scripts/hlo_fusion.py --dump /tmp/dump --names "$NAMES" --body-lines 40 --width 300 \
  > $OUT/hlo_fusions_decode.txt; echo "hlo_fusion rc $?"
for f in /tmp/dump/*after_optimizations.txt; do gzip -c $f > $OUT/$(basename $f).gz; done
grep "^[a-z_0-9]*: \|^  from" $OUT/hlo_fusions_decode.txt | cut -c1-250 | head -60
