# issue 14, session 9 call 6: the MLA decode table re-run on main (the command of session 6 call B: every row
# checked against the reference first, CUPTI time of the decode kernel, percent of the measured copy bandwidth).
export PYTHONPATH=$PYTHONPATH:$PWD/scripts
timeout 150 python3 scripts/bench_mla.py --methods paged-triton --prefill "" --packed "" --device-time \
  --shapes 16:4096,16:8192,16:32768,64:4096,64:8192,64:32768,256:4096,256:8192,256:32768,1:131072,16:131072,64:131072,1:32768,256:131072 \
  --out $OUT --name s9_table > $OUT/s9_table_stdout.log 2>&1
echo "table rc $?"; grep -v "^Unable to init" $OUT/s9_table_stdout.log | grep -v '^{' | tail -20
timeout 90 python3 scripts/bench_mla.py --methods paged-triton --packed "" --shapes 1:1024 --device-time \
  --out $OUT --name s9_prefill > $OUT/s9_prefill_stdout.log 2>&1
echo "prefill rc $?"; grep -v "^Unable to init" $OUT/s9_prefill_stdout.log | grep -v '^{' | tail -12
