"""A float32 model's matmuls run in full float32 (precision HIGHEST) on every backend (issue 21).

The check reads the lowered StableHLO of the engine's model step and of the full forward: every
dot_general over float32 operands must carry `precision = [HIGHEST, HIGHEST]` (XLA's GPU default
for float32 dots is TF32, i.e. DEFAULT precision). A bfloat16 model keeps the backend default for its
bf16 dots. The test fails if the precision context is dropped from any entry point."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lingjax.batch import StepBatch
from lingjax.cache import contiguous_page_table, init_caches
from lingjax.model import BailingModel
from lingjax.testing import tiny_config

DOT = re.compile(r"stablehlo\.dot_general .*?: \((tensor<[^>]*>), (tensor<[^>]*>)\)")


def _dots(text):
    """[(precision attribute or '', lhs type, rhs type)] of every dot_general in the module text."""
    out = []
    for line in text.splitlines():
        m = DOT.search(line)
        if m:
            prec = re.search(r"precision = \[([A-Z, ]+)\]", line)
            out.append((prec.group(1) if prec else "", m.group(1), m.group(2)))
    return out


def _batch(T=6):
    tokens = jnp.arange(T, dtype=jnp.int32) % 50
    return StepBatch(tokens=tokens, positions=jnp.arange(T, dtype=jnp.int32), token_seq=jnp.zeros(T, jnp.int32),
                     slots=jnp.array([0, -1], jnp.int32), cu_seqlens=jnp.array([0, T, T], jnp.int32),
                     fresh=jnp.array([True, False]), page_table=jnp.asarray(contiguous_page_table(2, 16, 8)))


def _lowered(dtype, which, **kw):
    # other test modules set jax_default_matmul_precision=highest globally at import; lower under the
    # library default so that this check sees only what the model itself asks for
    with jax.default_matmul_precision(None):
        return _lowered_here(dtype, which, **kw)


def _lowered_here(dtype, which, **kw):
    cfg = tiny_config()
    model = BailingModel(cfg, dtype=dtype, rngs=nnx.Rngs(0), mtp=True, **kw)
    graphdef, state = nnx.split(model)
    if which == "step":
        caches = init_caches(cfg, 2, 4, 8, latent_dtype=dtype)
        f = lambda s, b, c: nnx.merge(graphdef, s).step(b, c)             # noqa: E731
        return jax.jit(f).lower(state, _batch(), caches).as_text()
    if which == "mtp":
        f = lambda s, t: nnx.merge(graphdef, s).mtp_logits(t, jnp.zeros(t.shape + (cfg.hidden_size,), dtype))  # noqa: E731
    else:
        f = lambda s, t: nnx.merge(graphdef, s)(t)                          # noqa: E731
    return jax.jit(f).lower(state, jnp.zeros((1, 8), jnp.int32)).as_text()


@pytest.mark.parametrize("which", ["step", "forward", "mtp"])
def test_float32_model_matmuls_are_highest(which):
    dots = _dots(_lowered(jnp.float32, which))
    f32 = [d for d in dots if "f32" in d[1] and "f32" in d[2]]
    assert len(f32) >= 10, f"expected the model's float32 matmuls in the program, found {len(f32)}"
    low = [d for d in f32 if d[0] != "HIGHEST, HIGHEST"]
    assert not low, f"{len(low)} of {len(f32)} float32 dots below precision HIGHEST, e.g. {low[0]}"


def test_bfloat16_model_keeps_default_precision():
    dots = _dots(_lowered(jnp.bfloat16, "step"))
    bf16 = [d for d in dots if "bf16" in d[1] and "bf16" in d[2]]
    default = [d for d in bf16 if d[0] in ("", "DEFAULT, DEFAULT")]
    # the projections, experts and attention keep the backend default; only dots that ask for HIGHEST
    # themselves (the linear-attention reference's einsums, GroupRMSNorm's group sums) carry it
    assert len(default) >= 10 and len(default) > len(bf16) // 2, (len(default), len(bf16))


def test_matmul_precision_override_and_validation():
    dots = _dots(_lowered(jnp.float32, "step", matmul_precision="default"))
    # only the router's explicit precision='highest' remains HIGHEST
    assert sum(d[0] == "HIGHEST, HIGHEST" for d in dots) < len(dots) // 2
    with pytest.raises(ValueError, match="matmul_precision"):
        BailingModel(tiny_config(), dtype=jnp.float32, rngs=nnx.Rngs(0), matmul_precision="tf32")


def test_precision_does_not_change_cpu_values():
    """On the CPU float32 dots are exact float32 either way: the outputs agree to rounding."""
    cfg = tiny_config()
    a = BailingModel(cfg, dtype=jnp.float32, rngs=nnx.Rngs(1), mtp=False)
    b = BailingModel(cfg, dtype=jnp.float32, rngs=nnx.Rngs(1), mtp=False, matmul_precision="default")
    t = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 12)), jnp.int32)
    np.testing.assert_allclose(np.asarray(a(t)), np.asarray(b(t)), rtol=1e-5, atol=1e-5)
