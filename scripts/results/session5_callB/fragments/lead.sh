# float32 GPU vs CPU parity with the current MLA kernels: the shipped ling-tiny (kv_lora_rank 64, rope 16: the
# Triton MLA decode and prefill kernels run) and the float32-weight tiny model (rope 8: the reference MLA decode).
timeout 90 python3 scripts/check_gpu_parity.py --only ling-tiny --out $OUT/check_gpu_parity_h200_s5.json > $OUT/check_gpu_parity_h200_s5.log 2>&1; echo "parity rc $?"; tail -20 $OUT/check_gpu_parity_h200_s5.log
