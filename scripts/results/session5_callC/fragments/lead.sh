# float32 GPU vs CPU parity with the current MLA kernels: the shipped ling-tiny (kv_lora_rank 64, rope 16: the
# Triton MLA decode and prefill kernels run). Call B's 90 s were too few (the CPU pass took 33 s; the GPU pass did not finish).
timeout 230 python3 scripts/check_gpu_parity.py --only ling-tiny --out $OUT/check_gpu_parity_h200_s5.json > $OUT/check_gpu_parity_h200_s5.log 2>&1; echo "parity rc $?"; grep -v "^Unable" $OUT/check_gpu_parity_h200_s5.log | tail -14
