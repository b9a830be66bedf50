# float32 GPU vs CPU parity with the current MLA kernels (and the tiny models' reference fallback)
timeout 160 python3 scripts/check_gpu_parity.py --out $OUT/check_gpu_parity_h200_s5.json > $OUT/check_gpu_parity_h200_s5.log 2>&1; echo "parity rc $?"; tail -25 $OUT/check_gpu_parity_h200_s5.log
