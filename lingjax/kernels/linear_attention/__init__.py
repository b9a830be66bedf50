"""Linear-attention kernels behind one dispatch point (see reference.py for the conventions).

``prefill`` and ``decode`` pick an implementation by ``jax.default_backend()``:
gpu -> Pallas GPU kernels (gpu.py, Triton lowering), tpu -> Pallas Mosaic TPU kernels (tpu.py),
anything else -> the pure-jnp reference. Choose another with ``impl=`` (the model's `kernels`
option, the engine's `kernels=`, the CLI's `--kernels`), one of
  reference | gpu | tpu | mosaic_gpu | gpu_interpret | tpu_interpret | mosaic_gpu_interpret
mosaic_gpu: the Pallas Mosaic GPU kernels (mosaic_gpu.py) where they take the inputs (head dim a
multiple of 64; prefill: bf16/f16 q, k, v), gpu.py's otherwise. Opt-in: on H200 they are correct
but slower than gpu.py's (decode 1.02-1.22x, prefill 1.26-1.57x the time; notes file, round 6).
float32 q, k, v on the GPU: gpu.py's prefill multiplies them as 3xTF32 (fp32 accuracy); the model
hands bf16 models' q, k, v over in bf16 (model/linear_attention.py).
(The *_interpret forms run the Pallas kernels in interpret mode on the CPU; for tests.)
Both functions are traceable inside jit and shard_map (any local head count); pass the state pool
donated so that its update happens in place.
"""
import logging

import jax
import jax.numpy as jnp

from lingjax.kernels.linear_attention.reference import chunked  # noqa: F401
from lingjax.kernels.linear_attention import reference

log = logging.getLogger(__name__)
IMPLS = ('reference', 'gpu', 'tpu', 'mosaic_gpu', 'gpu_interpret', 'tpu_interpret', 'mosaic_gpu_interpret')


def _resolve(impl):
    if impl is None:
        backend = jax.default_backend()
        impl = backend if backend in ('gpu', 'tpu') else 'reference'
    if impl not in IMPLS:
        raise ValueError(f'unknown linear-attention kernel implementation {impl!r}; '
                         f'expected one of {IMPLS} (argument impl=)')
    return impl


def prefill(q, k, v, log_decay, state_pool, slots, cu_seqlens, fresh, *, scale, impl=None):
    """Varlen chunked prefill over slot-indexed states; see reference.prefill."""
    impl = _resolve(impl)
    args = (q, k, v, log_decay, state_pool, slots, cu_seqlens, fresh)
    if impl == 'reference':
        return reference.prefill(*args, scale=scale)
    if impl.startswith('mosaic_gpu') and _mosaic_ok(q, state_pool, prefill=True):
        from lingjax.kernels.linear_attention import mosaic_gpu
        return mosaic_gpu.prefill(*args, scale=scale, interpret=impl.endswith('_interpret'))
    if impl.startswith(('gpu', 'mosaic_gpu')):
        from lingjax.kernels.linear_attention import gpu
        return gpu.prefill(*args, scale=scale, interpret=impl.endswith('_interpret'))
    from lingjax.kernels.linear_attention import tpu
    return tpu.prefill(*args, scale=scale, interpret=_tpu_interpret(impl))


def decode(q, k, v, log_decay, state_pool, slots, fresh, *, scale, impl=None):
    """One-token decode over slot-indexed states; see reference.decode."""
    impl = _resolve(impl)
    args = (q, k, v, log_decay, state_pool, slots, fresh)
    if impl == 'reference':
        return reference.decode(*args, scale=scale)
    if impl.startswith('mosaic_gpu') and _mosaic_ok(q, state_pool):
        from lingjax.kernels.linear_attention import mosaic_gpu
        return mosaic_gpu.decode(*args, scale=scale, interpret=impl.endswith('_interpret'))
    if impl.startswith(('gpu', 'mosaic_gpu')):
        from lingjax.kernels.linear_attention import gpu
        return gpu.decode(*args, scale=scale, interpret=impl.endswith('_interpret'))
    from lingjax.kernels.linear_attention import tpu
    return tpu.decode(*args, scale=scale, interpret=_tpu_interpret(impl))


def _mosaic_ok(q, state_pool, prefill=False):
    """Whether the Mosaic GPU kernels take these inputs: head dim a multiple of 64, an f32 state
    pool; prefill's tensor-core products also need 16-bit q, k, v (f32 inputs go to gpu.py, which
    multiplies them as 3xTF32)."""
    return (q.shape[-1] % 64 == 0 and state_pool.dtype == jnp.float32
            and (not prefill or q.dtype in (jnp.bfloat16, jnp.float16)))


def _tpu_interpret(impl):
    if impl != 'tpu_interpret':
        return None
    from jax.experimental.pallas import tpu as pltpu
    return pltpu.InterpretParams()
