"""Linear-attention kernels behind one dispatch point (see reference.py for the conventions)."""
from lingjax.kernels.linear_attention.reference import chunked  # noqa: F401
from lingjax.kernels.linear_attention import reference


def prefill(q, k, v, log_decay, state_pool, slots, cu_seqlens, fresh, *, scale):
    return reference.prefill(q, k, v, log_decay, state_pool, slots, cu_seqlens, fresh, scale=scale)


def decode(q, k, v, log_decay, state_pool, slots, fresh, *, scale):
    return reference.decode(q, k, v, log_decay, state_pool, slots, fresh, scale=scale)
