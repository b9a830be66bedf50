# mla (#14), branch s6-mla. One H200, from the worktree root. Total <= 150 s (timeouts 76 + 72).
# MLA decode kernel, session 6: where the ~14 us per launch go, and candidate cuts. Every row is first checked
# against the jnp reference on the device (rel_err ~1e-3; CHECK FAILED above 2e-2), then timed: wall clock and
# CUPTI kernel time (kernel_us / pct_kern = the target's figure) and busy (+ split combine). Rows are saved as they
# finish (a timeout keeps the earlier ones). Tag suffixes: ea = slot/page id loaded before the queries; pb = bf16
# split partials; pf<k> = L2 bulk prefetch k blocks ahead (inline PTX, first device run: non-pf rows come first);
# qb = queries cast to bf16 before the launch; mk = splits merged by one Triton kernel (busy_us); s-1 = half the splits; st3 = 2 buffers, 1 program per SM.
# 1) B=16 4k: default + 8 candidates, then the kernel's own %globaltimer phases (profile rows) for 2 of them.
mkdir -p $OUT
timeout 76 python3 scripts/bench_mla.py --methods paged-triton --prefill "" --packed "" --shapes 16:4096 \
  --device-time --sweep 16:4096 --profile 16:4096 --profile-configs h32n64s0w4st2eapf2pb \
  --configs h32n64s0w4st2pb,h32n64s0w4st2eapb,h32n64s0w4st2eapf1pb,h32n64s0w4st2eapf2pb,h32n64s0w4st2eapf2pbqb,h32n64s0w4st2eapf2pbmk,h32n64s-1w4st2eapf2pb,h32n64s0w4st3eapf2pb \
  --out $OUT --name s6a_b16_4k > $OUT/s6a_b16_4k_stdout.log 2>&1
echo "run 1 rc $?"; grep -v "^Unable to init" $OUT/s6a_b16_4k_stdout.log | grep -v '^{' | tail -16
# 2) B=16 8k, B=64 4k, B=16 32k: default + 2 candidates each (eapf2pbmk = eapf2pb + merge kernel); profile phases of the default and eapf2pb at B=16 32k.
timeout 72 python3 scripts/bench_mla.py --methods paged-triton --prefill "" --packed "" \
  --shapes 16:8192,64:4096,16:32768 --device-time --sweep 16:8192,64:4096,16:32768 --profile 16:32768 \
  --profile-configs h32n64s0w4st2eapf2pb --configs h32n64s0w4st2eapb,h32n64s0w4st2eapf2pbmk \
  --out $OUT --name s6a_more > $OUT/s6a_more_stdout.log 2>&1
echo "run 2 rc $?"; grep -v "^Unable to init" $OUT/s6a_more_stdout.log | grep -v '^{' | tail -16
