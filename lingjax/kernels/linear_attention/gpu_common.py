"""Static choices shared by the GPU linear-attention kernels (triton_gpu.py, the default;
mosaic_gpu.py and pallas_triton.py, opt-in): output structs under shard_map, the automatic
segment split of prefill and its pipelining depth. Measurements behind the numbers:
scripts/bench_notes_linear_attention.md (H200)."""
import jax
import numpy as np

# Auto segment split (segment=None), for H100/H200 (132 SMs): split only when at most
# SPLIT_MAX_PROGRAMS (sequence, head, value-block) programs would run (at most ~half the SMs
# busy), into segments giving about TARGET_PROGRAMS programs. Measured on H200 (notes file):
# H=32, one 32k sequence (64 programs): 1092 us unsplit -> 846-892 us split (L=2048); H=64, one
# 32k sequence (128 programs): 1140 us unsplit vs 1566 us split (L=4096): with the SMs already
# mostly busy, the split's extra pass costs more than its parallelism gains. Segments are at least
# 16 chunks (1024 tokens): each output program folds every earlier segment's increment, so short
# segments cost more in the fold than they gain (H=32, one 4096-token sequence, device time, run 8:
# L=256 140.8 us, 512 112.6, 1024 101.0, unsplit 116.3; fla 106.6).
SPLIT_MAX_PROGRAMS = 64
TARGET_PROGRAMS = 1024
MIN_SEGMENT_CHUNKS = 16


def like(x, shape=None, dtype=None):
    """Output struct varying over the same shard_map axes as x (needed under check_vma)."""
    aval = jax.typeof(x)
    return jax.ShapeDtypeStruct(aval.shape if shape is None else shape,
                                aval.dtype if dtype is None else dtype,
                                manual_axis_type=aval.manual_axis_type)


def pick_segment(T, R, H, NV, C, segment):
    """Static segment length (tokens, a multiple of C) or None for no split."""
    if segment is not None:
        if segment <= 0:
            return None
        if segment % C:
            raise ValueError(f'segment={segment} is not a multiple of chunk={C}')
        return segment if segment < T else None
    programs = R * H * NV
    if programs > SPLIT_MAX_PROGRAMS:
        return None
    per_seq = -(-TARGET_PROGRAMS // programs)                  # segments wanted per sequence
    L = max(MIN_SEGMENT_CHUNKS * C, C * 2 ** int(np.ceil(np.log2(max(T / (R * per_seq * C), 1)))))
    return L if 2 * L <= T else None


def pick_stages(L, programs, f32=False):
    """Pipelining depth of the prefill passes (num_stages=None). float32 inputs: 2 (their tiles
    are twice the bytes; tf32x3 at 3 stages asked for 256 KiB of shared memory on H200, over its
    227 KiB). bf16/f16, measured on H200 (notes file, Pallas-Triton kernels): unsplit with at most
    one wave of programs (few long sequences), 3 stages: H=64 one 32k sequence (128 programs)
    1152 us vs 1994 at 2, H=32 1195 vs 1343; split, or a full grid, 2 stages: H=32 one 32k
    sequence split 899 vs 1045 us, 16 sequences unsplit 645 vs 762."""
    return 3 if not f32 and L is None and programs <= 132 else 2
