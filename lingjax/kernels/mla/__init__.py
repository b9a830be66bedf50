"""Absorbed MLA attention (SPEC §3.4) over a paged latent cache, behind one dispatch point.

Cache format (one pool per MLA layer):
  pages       [num_pages, page_size, r + rope]   the latent rows [c (kv_lora_rank, post-norm) | k_pe
                                                 (post-RoPE)], bf16 or the model dtype
  page_table  [num_slots, max_pages] int32       page ids of each slot, in order; entries at page indices
                                                 >= ceil(length / page_size) are unused (may hold anything)
  token i of slot s lives at pages[page_table[s, i // page_size], i % page_size].
Pages may be scattered, shuffled and reused across slots; a slot's reads touch only its own pages up to
its length. Allocating pages (and the free list, the budget) is the engine's job, not this package's.

The attention works on absorbed queries: q_lat[h] = q_nope[h] @ W_UK[h] [.., H, r] and the rotated
q_pe [.., H, rope]; it returns ctx_lat [.., H, r] float32 (softmax and accumulation in float32), which
the layer maps through W_UV. `scale` is the softmax scale (MLA.scaling, YaRN's mscale^2 included).

    pages = write(pages, page_table, slots, positions, latents)           scatter new tokens' latents
    ctx   = decode(q_lat, q_pe, pages, page_table, slots, lengths, scale)  one query per request
    ctx   = prefill(q_lat, q_pe, pages, page_table, token_slots, positions, scale)
                                     a packed ragged batch, each token causal over its own slot

Implementations (impl=):
  reference      pure jnp (reference.py), flash-style over pages: the CPU path and the oracle
  gpu            decode: Triton kernel through jax-triton (gpu.py, kernel body in triton_kernels.py;
                 split over the context, combined in jnp); prefill: Triton kernel through jax-triton
                 (gpu_prefill.py, the whole packed batch in one call); write: the reference. Latent sizes
                 the kernels cannot tile (gpu.supports / gpu_prefill.supports: not powers of two >= 16,
                 as in the tiny test models) run the reference
  tpu            decode: Pallas Mosaic TPU kernel (tpu.py; grid over (request, page), scalar-prefetched
                 page table); write/prefill: the reference
  tpu_interpret  tpu.py's kernel in Pallas TPU interpret mode (on the CPU; for tests)
impl=None picks by jax.default_backend(): gpu -> 'gpu', tpu -> 'tpu', anything else -> 'reference'. A name of the
model's `kernels` option (a linear-attention implementation) maps to its family (FROM_MODEL_KERNELS).
The kernel modules are imported only when chosen.
"""
import importlib

import jax

from lingjax.kernels.mla import reference

IMPLS = ('reference', 'gpu', 'tpu', 'tpu_interpret')
FROM_MODEL_KERNELS = {'mosaic_gpu': 'gpu', 'pallas_triton': 'gpu', 'gpu_interpret': 'reference',
                      'mosaic_gpu_interpret': 'reference',
                      'pallas_triton_interpret': 'reference'}


def resolve(impl=None) -> str:
    """The implementation that impl names (None: by the default backend); ValueError if unknown."""
    impl = FROM_MODEL_KERNELS.get(impl, impl)
    if impl is None:
        backend = jax.default_backend()
        return backend if backend in ('gpu', 'tpu') else 'reference'
    if impl not in IMPLS:
        raise ValueError(f'unknown MLA kernel implementation {impl!r}; expected one of {IMPLS}')
    return impl


def _check(name, q_lat, q_pe, pages, page_table, rows, lens):
    N, H, r = q_lat.shape
    if q_pe.shape[:2] != (N, H) or pages.ndim != 3 or pages.shape[-1] != r + q_pe.shape[-1]:
        raise ValueError(f'mla.{name}: q_lat {q_lat.shape}, q_pe {q_pe.shape} and pages {pages.shape} do not fit '
                         f'[N, H, r], [N, H, rope], [num_pages, page_size, r + rope]')
    if page_table.ndim != 2 or rows.shape != (N,) or lens.shape != (N,):
        raise ValueError(f'mla.{name}: page_table {page_table.shape} must be [num_slots, max_pages] and slots '
                         f'{rows.shape} / lengths {lens.shape} [N={N}]')


def write(pages, page_table, slots, positions, latents, *, impl=None):
    """Scatter latents [T, r + rope] at (slots [T] (-1: dropped), positions [T]); returns the new pages."""
    resolve(impl)
    return reference.write(pages, page_table, slots, positions, latents)


def decode(q_lat, q_pe, pages, page_table, slots, lengths, scale, *, impl=None):
    """q_lat [B, H, r], q_pe [B, H, rope]; request b reads positions [0, lengths[b]) of slot slots[b]
    (-1: padding row, output 0) -> [B, H, r] float32."""
    _check('decode', q_lat, q_pe, pages, page_table, slots, lengths)
    impl = resolve(impl)
    if impl == 'gpu' and importlib.import_module('lingjax.kernels.mla.gpu').supports(q_lat.shape[-1], q_pe.shape[-1]):
        return importlib.import_module('lingjax.kernels.mla.gpu').decode(
            q_lat, q_pe, pages, page_table, slots, lengths, scale)
    if impl in ('tpu', 'tpu_interpret'):
        tpu = importlib.import_module('lingjax.kernels.mla.tpu')
        kw = {'interpret': tpu.pltpu.InterpretParams()} if impl == 'tpu_interpret' else {}
        return tpu.decode(q_lat, q_pe, pages, page_table, slots, lengths, scale, **kw)
    return reference.decode(q_lat, q_pe, pages, page_table, slots, lengths, scale)


def prefill(q_lat, q_pe, pages, page_table, token_slots, positions, scale, *, impl=None, block=None):
    """q_lat [T, H, r], q_pe [T, H, rope]; token t reads positions [0, positions[t]] of slot token_slots[t]
    (-1: padding, output 0) -> [T, H, r] float32. The tokens' own latents must be written first.
    The GPU kernel takes the whole packed batch in one call; the jnp reference (every other impl) gathers
    keys per query token, so a caller with many tokens passes `block` (reference.prefill: at most that many
    query tokens at a time; None: all at once)."""
    _check('prefill', q_lat, q_pe, pages, page_table, token_slots, positions)
    if resolve(impl) == 'gpu' and importlib.import_module('lingjax.kernels.mla.gpu_prefill').supports(q_lat.shape[-1]):
        return importlib.import_module('lingjax.kernels.mla.gpu_prefill').prefill(
            q_lat, q_pe, pages, page_table, token_slots, positions, scale)
    return reference.prefill(q_lat, q_pe, pages, page_table, token_slots, positions, scale, block=block)
