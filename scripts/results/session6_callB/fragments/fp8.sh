# fp8 (#18), branch s6-fp8 (defaults set by call A: dense FP8 projections at <= 64 rows on XLA's own FP8 dot; MoE and
# prefill kernels as session 5). <= 150 s, three commands, each self-checking.
# (1) bench_e2e flash8 FP8 (~50 s): the table: decode B=16/64/1/256 at C=1024 and prefill 1x4096 (bf16,
#     session5_run1: 5.40 / 10.66 / 2.86 / 14.49 ms, prefill 39.8 ms; target FP8 <= 3.38 / 6.66 ms at B=16 / 64).
# (2) profile_fp8 B=16 (~45 s): device check (kernels vs reference), then the step's per-kernel breakdown.
# (3) bench_fp8 (~45 s): MoE sweep at T=16 (auto = the default; qk = quantize_kernel; qh = h quantized in gate_up;
#     bm16 = 16-row blocks with swapped operands), dense at T=4096 (Triton FP8 vs dequantize + cuBLAS bf16 (fp8-ref)
#     vs bf16) and fp8-channel at T=16 (Triton vs XLA's dot). err ref < 1e-2 on every FP8 row.
mkdir -p $OUT/fp8
timeout 60 python3 scripts/bench_e2e.py --quantize fp8-block --decode 16x1024,64x1024,1x1024,256x1024 --prefill 1x4096 \
  --steps 10 --reps 2 --e2e-max-tokens 0 --compile-threads 5 --out $OUT/fp8/bench_e2e_flash8_fp8.json \
  > $OUT/fp8/bench_e2e_flash8_fp8.log 2>&1; echo "bench_e2e flash8 fp8 rc $?"; grep -v "^Unable to init\|^$" $OUT/fp8/bench_e2e_flash8_fp8.log | tail -22
timeout 45 python3 scripts/profile_fp8.py --modes fp8 --batch 16 --reps 2 --out $OUT/fp8 > $OUT/fp8/profile_fp8_h200.log 2>&1; echo "profile_fp8 rc $?"; grep -v "^Unable to init\|^$" $OUT/fp8/profile_fp8_h200.log | tail -24
timeout 45 python3 scripts/bench_fp8.py --tokens 4096 --dense "attn 4096x4096" --methods bf16,fp8-block,fp8-ref --no-moe \
  --moe-sweep --moe-sweep-tokens 16 --moe-sweep-tags "auto,auto qk,gu qh,bm16,bm16 qh,bm16 qh qk" \
  --iters 10 --reps 2 --out $OUT/fp8/bench_fp8.json > $OUT/fp8/bench_fp8.log 2>&1; echo "bench_fp8 rc $?"; grep -v "^Unable to init\|^$\|^ *$" $OUT/fp8/bench_fp8.log | tail -14
