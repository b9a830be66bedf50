# fp8 (#18). <= 150 s on a fresh nvidia-h200 (Triton compiles included). Run from the repository
# root with `. scripts/gpu_env.sh` sourced and $OUT set. Every command checks before it times:
# (1) profile_fp8, flash8 decode C=1024 at B=16 and 64 (~80 s): per mode first the device check (each FP8 projection
#     kind and one MoE layer through the GPU kernels against the reference math: dense < 1e-2, moe.experts < 5e-2;
#     in mode fp8-dec only the MoE check, through the new decode path), then the step time (median of 2) and the per-kernel
#     breakdown. fp8 = main's defaults (session 6 call C: 3.95 / 7.93 ms); fp8-dec = the FP8 MoE decode path
#     (gpu_fp8.experts_decode: no layout, one program per touched expert and n tile; 3 launches + 2 XLA
#     quantization passes per layer instead of ~8-10).
# (2) bench_fp8 --moe-sweep, flash's experts (256 x 4096 x 1024, top-8) alone (~60 s), every row with err ref against
#     the reference math (bound 5e-2): T=16/64 auto (default: grouped, 16-row swapped blocks) vs dec (the decode
#     path), dec qh (h quantized inside down), dec wide (gate/up 128-wide, down 256-wide tiles: bf16's bytes per
#     program); prefill T=4096 auto (128-row blocks, 4 warps: they spill registers, ptxas sm_90a) vs P (8 warps, same
#     tiles: no spills) and W L (w16: the reference math on the bf16 tensor cores, fp8 weight tiles dequantized in the
#     kernel, the bf16 kernels' large tiles; bf16 grouped matmuls at T=4096: 2227.8 us, bench_notes_moe.md session 6).
# (3) one table: each option against the default (option / default < 1 = faster).
mkdir -p $OUT/fp8
timeout 82 python3 scripts/profile_fp8.py --modes fp8,fp8-dec --batch 16,64 --steps 5 --reps 2 --out $OUT/fp8 \
  > $OUT/fp8/profile_fp8.log 2>&1; echo "profile_fp8 rc $?"; grep -v "^Unable to init\|^$" $OUT/fp8/profile_fp8.log | tail -42
timeout 60 python3 scripts/bench_fp8.py --dense "" --no-moe --moe-sweep --moe-sweep-tokens 16,64,4096 \
  --moe-sweep-tags "auto,16:dec,16:dec qh,16:dec wide,64:dec,4096:P,4096:W L" \
  --iters 20 --reps 2 --out $OUT/fp8/bench_fp8.json > $OUT/fp8/bench_fp8.log 2>&1; echo "bench_fp8 rc $?"; grep "^|" $OUT/fp8/bench_fp8.log | tail -14
timeout 5 python3 scripts/fp8_options_table.py --profile $OUT/fp8/profile_fp8.json --bench $OUT/fp8/bench_fp8.json | tee $OUT/fp8/options_table.md
