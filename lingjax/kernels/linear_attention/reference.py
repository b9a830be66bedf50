"""Pure-jnp linear attention (simple GLA, SPEC §2.4/§2.8/§2.9): the CPU path and the oracle.

Conventions shared by every implementation in this package:
  q, k, v      [..., H, D] activations (any float dtype; math is float32)
  log_decay    [H] float32, g = -lambda <= 0, gamma = exp(g)
  state        [..., H, D_k, D_v] float32; o[v] = scale * sum_k q[k] S[k, v]
  recurrence   S_t = gamma S_{t-1} + k_t v_t^T ;  o_t = scale q_t^T S_t   (current token included)
"""
import jax
import jax.numpy as jnp

F32 = jnp.float32


def chunked(q, k, v, log_decay, initial_state=None, *, scale, chunk=64):
    """Fixed-length batched sequences. q,k,v [B, T, H, D]; initial_state [B, H, D, D] or None.

    Returns (o [B, T, H, D] in q.dtype, final_state [B, H, D, D] float32). All decay exponents are
    <= 0 (no gamma^-i rescaling), so this is exact for any lambda and chunk size.
    """
    B, T, H, D = q.shape
    dv = v.shape[-1]
    g = log_decay.astype(F32)
    S0 = jnp.zeros((B, H, D, dv), F32) if initial_state is None else initial_state.astype(F32)
    # Under shard_map the scan carry must vary over the same mesh axes as q, k, v (a zero or
    # replicated initial state varies over none): cast it up to their union.
    axes = frozenset().union(*(jax.typeof(x).manual_axis_type.varying for x in (q, k, v)))
    missing = tuple(sorted(axes - jax.typeof(S0).manual_axis_type.varying))
    if missing:
        S0 = jax.lax.pcast(S0, missing, to='varying')
    C = min(chunk, T)
    n = -(-T // C)
    pad = n * C - T
    # Padding at the end with k = v = 0 adds nothing to the state, but it would still decay it;
    # the final state is therefore taken at the true length (decay exponent m_last below).
    qf, kf, vf = (jnp.pad(x.astype(F32), ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
    qc, kc, vc = (x.reshape(B, n, C, H, -1).transpose(1, 0, 3, 2, 4) for x in (qf, kf, vf))  # [n,B,H,C,D]
    i = jnp.arange(C, dtype=F32)
    diff = i[:, None] - i[None, :]
    mask = jnp.where(diff >= 0, jnp.exp(g[:, None, None] * jnp.maximum(diff, 0.0)), 0.0)  # [H,C,C]
    q_decay = jnp.exp(g[:, None] * (i[None, :] + 1.0))                                      # [H,C]  gamma^(i+1)
    lens = jnp.full((n,), C, jnp.int32).at[-1].set(T - (n - 1) * C)

    def step(S, xs):
        qb, kb, vb, m = xs
        a = jnp.einsum('bhid,bhjd->bhij', qb, kb, precision='highest') * mask
        o = jnp.einsum('bhij,bhje->bhie', a, vb, precision='highest')
        o = o + q_decay[None, :, :, None] * jnp.einsum('bhid,bhde->bhie', qb, S, precision='highest')
        mf = m.astype(F32)
        k_decay = jnp.where(i < mf, jnp.exp(g[:, None] * jnp.maximum(mf - 1.0 - i[None, :], 0.0)), 0.0)  # [H,C]
        S = jnp.exp(g * mf)[None, :, None, None] * S + jnp.einsum(
            'bhjd,bhje->bhde', kb * k_decay[None, :, :, None], vb, precision='highest')
        return S, o * scale

    S, o = jax.lax.scan(step, S0, (qc, kc, vc, lens))
    o = o.transpose(1, 0, 3, 2, 4).reshape(B, n * C, H, dv)[:, :T]
    return o.astype(q.dtype), S


def prefill(q, k, v, log_decay, state_pool, slots, cu_seqlens, fresh, *, scale):
    """Packed variable-length sequences, each continuing from its slot's state.

    q,k,v [T, H, D]: sequence r owns tokens [cu_seqlens[r], cu_seqlens[r+1]); tokens at or past
    cu_seqlens[-1] are padding (output 0). state_pool [num_slots, H, D, D]; slots [R] int32;
    fresh [R] bool (start from zero instead of the slot's state). A sequence of length 0 or with a
    negative slot is skipped: its slot is left untouched. Returns (o [T,H,D] in q.dtype, new pool).

    Token-by-token scan: O(T) sequential steps. It is the oracle for the kernels and the CPU path.
    """
    T = q.shape[0]
    R = slots.shape[0]
    num_slots = state_pool.shape[0]
    g = jnp.exp(log_decay.astype(F32))[:, None, None]
    pos = jnp.arange(T)
    seq = jnp.searchsorted(cu_seqlens[1:], pos, side='right')            # [T] sequence of each token
    valid_tok = pos < cu_seqlens[-1]
    seq = jnp.where(valid_tok, seq, R)                                      # padding -> dummy row R
    valid_seq = (cu_seqlens[1:] > cu_seqlens[:-1]) & (slots >= 0)
    safe_slots = jnp.clip(slots, 0, num_slots - 1)
    h0 = jnp.where((fresh | ~valid_seq)[:, None, None, None], 0.0, state_pool[safe_slots].astype(F32))
    states = jnp.concatenate([h0, jnp.zeros((1,) + h0.shape[1:], F32)])    # [R+1, H, D, D]

    def step(states, xs):
        qt, kt, vt, r = xs
        S = g * states[r] + kt.astype(F32)[:, :, None] * vt.astype(F32)[:, None, :]
        o = scale * jnp.einsum('hk,hkv->hv', qt.astype(F32), S, precision='highest')
        return states.at[r].set(S), o

    states, o = jax.lax.scan(step, states, (q, k, v, seq))
    o = jnp.where((valid_tok & (seq < R) & valid_seq[jnp.minimum(seq, R - 1)])[:, None, None], o, 0.0)
    write = jnp.where(valid_seq, slots, num_slots)                          # out of range -> dropped
    pool = state_pool.at[write].set(states[:R].astype(state_pool.dtype), mode='drop')
    return o.astype(q.dtype), pool


def decode(q, k, v, log_decay, state_pool, slots, fresh, *, scale):
    """One token per request. q,k,v [B, H, D]; slots [B] (negative = padding row, skipped);
    fresh [B] bool. Returns (o [B, H, D] in q.dtype, new pool)."""
    num_slots = state_pool.shape[0]
    valid = slots >= 0
    safe = jnp.clip(slots, 0, num_slots - 1)
    S = jnp.where((fresh | ~valid)[:, None, None, None], 0.0, state_pool[safe].astype(F32))
    S = jnp.exp(log_decay.astype(F32))[None, :, None, None] * S + \
        k.astype(F32)[..., :, None] * v.astype(F32)[..., None, :]
    o = scale * jnp.einsum('bhk,bhkv->bhv', q.astype(F32), S, precision='highest')
    o = jnp.where(valid[:, None, None], o, 0.0)
    pool = state_pool.at[jnp.where(valid, slots, num_slots)].set(S.astype(state_pool.dtype), mode='drop')
    return o.astype(q.dtype), pool
