# issue 18, session 9 call 5: bf16 and fp8-channel alternated on one GPU (ORDER: the first one first), B=16 and 64, two
# rounds: the ratio's run-to-run spread (call 4: B=16 1.59x, B=64 1.61x across the two GPUs of one host).
export PYTHONPATH=$PYTHONPATH:$PWD/scripts
for r in 1 2; do for q in $ORDER; do
timeout 90 python3 scripts/bench_e2e.py --quantize $q --decode 16x1024,64x1024 --prefill "" --steps 10 --reps 3 \
  --e2e-max-tokens 0 --compile-threads 4 --out $OUT/bench_e2e_${q}_r$r.json > $OUT/bench_e2e_${q}_r$r.log 2>&1
echo "round $r $q rc $?"; grep "^| 16 \|^| 64 " $OUT/bench_e2e_${q}_r$r.log
done; done
