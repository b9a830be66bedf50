# serve (#15), branch s5-serve; ~150 s. Most important first.
# 1) bench_overlap, batch 1, flash8 cut (random weights, vocab 157184), greedy: ms per decode step with overlap off /
#    on (N=1; D=2 = two steps in flight) / multi-step N=8; tokens of every mode compared with overlap off first (a
#    row says "tokens differ" otherwise). Device reference = min(single-step replay, step inside a replayed window).
#    Call A (same code but the reference): overlap N=1 2.03 ms/step vs 1.98 ms device = ~2.5% (was 36.5%).
mkdir -p $OUT/serve
timeout 55 python3 scripts/bench_overlap.py --batch 1 --overlap-depth 2 --decode-steps 8 --replay 30 --out $OUT/serve/bench_overlap_b1.json > $OUT/serve/bench_overlap_b1.log 2>&1; echo "bench_overlap rc $?"; tail -7 $OUT/serve/bench_overlap_b1.log
# 2) bench_serve flash8, final code: 10 step shapes precompiled (XLA compiles on 8 threads), the parent waits for the
#    ready line; throughput, TTFT/TPOT/ITL, engine host/wait ms and compilations inside the measured window (~100 s).
timeout 112 python3 scripts/bench_serve.py --random-shapes flash8 --max-batch 16 --max-len 2048 --prefill-chunk 512 --max-step-tokens 512 --concurrency 16 --num-requests 128 --warmup 8 --prompt-len 128 1024 --output-len 64 256 --max-seconds 20 --out $OUT/serve/bench_serve_flash8.json > $OUT/serve/bench_serve_flash8.log 2>&1; echo "bench_serve rc $?"; grep -v "cuda_timer\|transformers" $OUT/serve/bench_serve_flash8.log | tail -14
