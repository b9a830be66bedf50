# fp8 (#18), branch s6-fp8. <= 150 s. Two commands, each self-checking (err ref columns / profile check first).
# (1) bench_fp8 (~90 s): dense 4096x4096 at T=16/64: bf16 (cuBLAS) vs the Triton FP8 kernel (new defaults: swap_ab at
#     T<=32, split-K summed in the kernel, activations quantized by one Triton launch) vs XLA's own FP8 dot
#     (fp8-block-xla); a tile sweep of the dense kernel (x auto column = speed-up over the default; "auto xq" = the
#     default with XLA's quantization passes; "n128 s8 st4" = session 5's T=16 default); a sweep of the MoE FP8 grouped
#     matmuls at T=16/64 (auto = 16-row blocks with swapped operands, h quantized in gate_up; s5 = session 5's kernels;
#     bm64 = 64-row blocks with the new epilogue). Each row has err ref (vs the reference math, < 1e-2).
# (2) profile_fp8 flash8 B=16 C=1024 (~55 s): the device check (kernels vs reference), then the step and its per-kernel
#     breakdown (session 5: 5.02 ms; bf16 5.40 ms).
mkdir -p $OUT/fp8
timeout 90 python3 scripts/bench_fp8.py --tokens 16,64 --dense "attn 4096x4096" --methods bf16,fp8-block,fp8-block-xla --no-moe \
  --sweep --sweep-shapes "attn 4096x4096" --sweep-tokens 16,64 \
  --sweep-tags "auto xq,16:n128 s8 st4,16:swap n32 s4 red st6,16:swap n64 s2 red st6,16:swap n64 s8 red st6,16:swap n128 s4 red st6,16:swap n64 s4 st6,64:n128 s4 st4,64:n64 s4 red st4" \
  --moe-sweep --moe-sweep-tokens 16,64 \
  --moe-sweep-tags "auto,s5,bm64,16:auto xq,16:bm32,16:gu st4,16:gu n64 noqh st4,16:dn st6,16:dn n256 st3,64:dn st6" \
  --iters 20 --reps 2 --out $OUT/fp8/bench_fp8.json > $OUT/fp8/bench_fp8.log 2>&1; echo "bench_fp8 rc $?"; grep -v "^Unable to init\|^$\|^ *$" $OUT/fp8/bench_fp8.log | tail -45
timeout 56 python3 scripts/profile_fp8.py --modes fp8 --batch 16 --reps 2 --out $OUT/fp8 > $OUT/fp8/profile_fp8_h200.log 2>&1; echo "profile_fp8 rc $?"; grep -v "^Unable to init\|^$" $OUT/fp8/profile_fp8_h200.log | tail -30
