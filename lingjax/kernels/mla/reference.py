"""Absorbed MLA attention over a paged latent cache, in pure jnp: the CPU path and the oracle of the
kernels (cache format and conventions: lingjax/kernels/mla/__init__.py).

Flash-style: one page of keys at a time (a loop over page index j up to the longest length in the
batch), with a running max / sum / accumulator in float32, so no [rows, context] score matrix exists;
per step the live keys are [rows, page_size, r + rope]. A row reads the pages of its own slot at page
indices < ceil(length / page_size); keys at positions >= its length are zeroed before any product,
so whatever an unused page holds (even NaN) never reaches the result. Page-table entries past a
slot's length may hold anything (they are clipped into range before the gather).
"""
import jax
import jax.numpy as jnp

F32 = jnp.float32


def write(pages, page_table, slots, positions, latents):
    """Scatter latents [T, r + rope] of tokens in `slots` [T] (-1: padding, dropped) at `positions` [T]
    into `pages` [num_pages, page_size, r + rope]; returns the new pages (in their dtype)."""
    num_pages, page_size, _ = pages.shape
    valid = slots >= 0
    page = page_table[jnp.where(valid, slots, 0), positions // page_size]
    page = jnp.where(valid, page, num_pages)                                 # out of range: dropped
    return pages.at[page, positions % page_size].set(latents.astype(pages.dtype), mode='drop')


def attend(q_lat, q_pe, pages, page_table, slots, lengths, scale):
    """Row i (one query) attends to positions [0, lengths[i]) of slot slots[i]. q_lat [N, H, r],
    q_pe [N, H, rope] -> ctx [N, H, r] float32 (0 for a row with length 0 or slot -1)."""
    num_pages, page_size, _ = pages.shape
    r = q_lat.shape[-1]
    qf, qpf = q_lat.astype(F32), q_pe.astype(F32)
    lengths = jnp.where(slots >= 0, lengths, 0).astype(jnp.int32)
    safe_slots = jnp.maximum(slots, 0)
    N, H = q_lat.shape[:2]

    def body(j, carry):
        m, l, acc = carry
        pos = j * page_size + jnp.arange(page_size)
        valid = pos[None, :] < lengths[:, None]                              # [N, ps]
        ids = jnp.clip(page_table[safe_slots, j], 0, num_pages - 1)
        keys = jnp.where(valid[..., None], pages[ids].astype(F32), 0.0)       # [N, ps, r + rope]
        c, kpe = keys[..., :r], keys[..., r:]
        s = (jnp.einsum('nhr,nsr->nhs', qf, c, preferred_element_type=F32)
             + jnp.einsum('nhd,nsd->nhs', qpf, kpe, preferred_element_type=F32)) * scale
        s = jnp.where(valid[:, None, :], s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(-1))
        shift = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.exp(s - shift[..., None])
        alpha = jnp.exp(m - shift)
        l = l * alpha + p.sum(-1)
        acc = acc * alpha[..., None] + jnp.einsum('nhs,nsr->nhr', p, c, preferred_element_type=F32)
        return m_new, l, acc

    n_pages = (jnp.max(lengths, initial=0) + page_size - 1) // page_size
    init = (jnp.full((N, H), -jnp.inf, F32), jnp.zeros((N, H), F32), jnp.zeros((N, H, r), F32))
    # Under shard_map (heads split over tp) the loop carry must vary over the mesh axes the queries and
    # pages vary over; the zero initial carry varies over none: cast it up to their union.
    axes = frozenset().union(*(jax.typeof(x).manual_axis_type.varying for x in (q_lat, q_pe, pages, page_table)))
    missing = tuple(sorted(axes))
    if missing:
        init = tuple(jax.lax.pcast(x, missing, to='varying') for x in init)
    _, l, acc = jax.lax.fori_loop(0, jnp.minimum(n_pages, page_table.shape[1]), body, init)
    return jnp.where(l[..., None] > 0, acc / jnp.where(l > 0, l, 1.0)[..., None], 0.0)


def decode(q_lat, q_pe, pages, page_table, slots, lengths, scale):
    """One query per request: q_lat [B, H, r], q_pe [B, H, rope]; request b attends to positions
    [0, lengths[b]) of slot slots[b] -> [B, H, r] float32."""
    return attend(q_lat, q_pe, pages, page_table, slots, lengths, scale)


def prefill(q_lat, q_pe, pages, page_table, token_slots, positions, scale, block=None):
    """A packed ragged batch of query tokens: token t (slot token_slots[t], -1: padding) attends to its
    slot's positions <= positions[t] (which must already be written) -> [T, H, r] float32.
    block: at most this many query tokens at a time (lax.map over blocks; padding tokens fill the last), so
    that the keys gathered per page stay [block, page_size, r + rope]; None: all T at once. Each token's
    result is the same either way (the tokens are independent)."""
    T = q_lat.shape[0]
    if block is None or T <= block:
        return attend(q_lat, q_pe, pages, page_table, token_slots, positions + 1, scale)
    n = -(-T // block)

    def split(a, fill=0):
        a = jnp.pad(a, [(0, n * block - T)] + [(0, 0)] * (a.ndim - 1), constant_values=fill)
        return a.reshape((n, block) + a.shape[1:])
    out = jax.lax.map(lambda a: attend(a[0], a[1], pages, page_table, a[2], a[3] + 1, scale),
                      (split(q_lat), split(q_pe), split(token_slots, -1), split(positions)))
    return out.reshape((n * block,) + out.shape[2:])[:T]
