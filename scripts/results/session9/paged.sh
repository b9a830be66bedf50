# issue 14, session 9 call 6: the e2e rows re-run on main: decode B=256 at a 131k cache (target <= 40 ms; was
# 138 ms) and the capacity of a 40 GiB MLA budget, requests of uniform 1k-128k lengths, per-slot against paged.
export PYTHONPATH=$PYTHONPATH:$PWD/scripts
timeout 240 python3 scripts/bench_e2e.py --decode 256x131072,64x8192 --prefill "" --steps 5 --reps 2 --e2e-max-tokens 0 \
  --capacity 40 --out $OUT/bench_e2e_paged.json > $OUT/bench_e2e_paged.log 2>&1
echo "e2e paged rc $?"; grep -v "^Unable" $OUT/bench_e2e_paged.log | tail -12
