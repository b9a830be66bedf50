# prefix (#17), branch s5-prefix: where a warm prefix-cache hit's TTFT (22.9 ms in session 4) goes.
# flash8, 8192 shared + 512 own tokens, prefix_cache_save_last=False engine. Checks hit == miss (token, logprob)
# on the device first (exits 1 if not), then: synced pieces, the step back to back, CUPTI kernel trace by
# category (MoE / MLA / linear attention / matmuls / copies / sampling / restore), MoE experts alone at T=512
# with block_m 16/32/64 + 6 layout/tile variants, the step's floor. JSON saved after each part. Expected ~90-150 s.
mkdir -p $OUT/prefix
timeout 225 env PYTHONPATH=.:scripts python3 scripts/profile_prefix.py --out $OUT/prefix > $OUT/prefix/profile_prefix_h200.log 2>&1; echo "profile_prefix rc $?"; tail -70 $OUT/prefix/profile_prefix_h200.log
