# issue 18, call 4: what the FP8 prefill's largest XLA kernels compute (call 3: loop_add_fusion_9, 12.1 ms of the
# 52.5 ms prefill of 4096 tokens, 7 launches, absent from bf16). The fp8 prefill profiled again with an HLO dump of
# the engine's step, then each top XLA fusion of the prefill row printed with its source lines (scripts/hlo_fusion.py);
# the prefill step's optimized HLO comes back gzipped.
export PYTHONPATH=$PYTHONPATH:$PWD/scripts
XLA_FLAGS="--xla_dump_to=/tmp/dump --xla_dump_hlo_module_re=.*step_fn.*" timeout 200 python3 scripts/profile_fp8.py \
  --modes fp8 --batch 16 --steps 2 --reps 1 --prefill 4096 --out $OUT > $OUT/profile_fp8_dump.log 2>&1; echo "profile rc $?"
NAMES=$(python3 -c "
import json; r = json.load(open('$OUT/profile_fp8.json'))['modes']['fp8 prefill 4096']
print(','.join(k['name'] for k in r['top'] if 'fusion' in k['name'] or 'wrapped' in k['name']))")
echo "fusions: $NAMES"
timeout 60 python3 scripts/hlo_fusion.py --dump /tmp/dump --names "$NAMES" --module-contains prefill_kernel,gate_up_fp8 \
  --body-lines 60 > $OUT/hlo_fusions.txt; echo "hlo_fusion rc $?"
grep -l "prefill_kernel" /tmp/dump/*after_optimizations.txt | xargs grep -l gate_up_fp8 | head -1 | xargs -I{} sh -c 'gzip -c {} > $OUT/prefill_step_after_optimizations.txt.gz'
ls -la $OUT; grep -A3 "^loop_add_fusion_9\|^[a-z_0-9]*fusion[_0-9]*: " $OUT/hlo_fusions.txt | cut -c1-300 | head -60
