# serve (#15), branch s5-serve. 1) bench_serve on flash8 (random weights, 8 layers, full vocab): the child now gets
# --max-step-tokens (run 1 compiled 18 shapes up to T=8192 because it did not), precompiles the 10 step shapes
# (lowering serial, XLA compiles on 8 threads) and logs trace/lower/compile seconds; the parent waits for the
# server's ready line (no start clock). Prints throughput, TTFT/TPOT/ITL percentiles and the engine's host/wait ms
# and compilations during the measured run (expected ~100-150 s; correctness of served tokens = tests/test_server.py).
# 2) bench_overlap batch 1: overhead with the step outputs' device-to-host copies started right after dispatch
# (tokens of all modes checked equal to the non-overlapped run, printed in the table); also 2 steps in flight (D=2). ~50 s.
mkdir -p $OUT/serve
timeout 170 python3 scripts/bench_serve.py --random-shapes flash8 --max-batch 16 --max-len 2048 --prefill-chunk 512 --max-step-tokens 512 --concurrency 16 --num-requests 192 --warmup 16 --prompt-len 128 1024 --output-len 64 256 --max-seconds 60 --out $OUT/serve/bench_serve_flash8.json > $OUT/serve/bench_serve_flash8.log 2>&1; echo "bench_serve rc $?"; tail -22 $OUT/serve/bench_serve_flash8.log
timeout 65 python3 scripts/bench_overlap.py --batch 1 --overlap-depth 2 --decode-steps 8 --out $OUT/serve/bench_overlap_b1.json > $OUT/serve/bench_overlap_b1.log 2>&1; echo "bench_overlap rc $?"; tail -8 $OUT/serve/bench_overlap_b1.log
