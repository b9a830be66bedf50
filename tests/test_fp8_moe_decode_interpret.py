"""The FP8 MoE decode path's kernel bodies (lingjax/kernels/moe/triton_fp8_decode.py) in Triton's CPU
interpreter, launched with the parameters gpu_fp8.experts_decode computes (decode_launch), against float64
numpy of the same fp8 operands and scales (the operands built with lingjax's own quantizers, as
tests/test_fp8_triton_interpret.py builds them; its helpers are reused).

Per pair q (token q // k, expert idx[q]): gate_up's h[q] and down's y[q] (down fed an independent random h,
quantized before the kernel or, QUANT_A, inside it). Tolerances as in test_fp8_triton_interpret.py: float32
outputs within 1e-5 relative of the float64 products of the same fp8 operands (float32 accumulation over
<= 256 terms), float16 within 1e-3 (its rounding, 2^-11); against the unquantized float64 product between
0.5% and 8% (the fp8 rounding of both operands is there and bounded: the scales address the right blocks).
Rows of dropped pairs (ids outside [0, E): another device's experts) stay unwritten. The cases cover the
swapped operands (rows per program < 64) and the plain ones, both weight layouts, per-token and per-128-group
scales, an expert with more pairs than a program's rows (two leaders), h quantized in down."""
import functools
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from tests.triton_interpreter import run_child

pytest.importorskip("torch")
pytest.importorskip("triton")

from tests.test_fp8_triton_interpret import _act_dequant, _act_parts, _dequant, _f8, _u8, _weight  # noqa: E402

D, I = 256, 256
SENTINEL = 1027.0
# (name, weight strategy, act, T, k, E, swap_ab, quant_a (down quantizes h), K-major, out dtype)
CASES = [
    ("block-swap-kmajor", "block", "group", 3, 2, 4, True, False, True, "float32"),
    ("block-swap-quant-h", "block", "group", 3, 2, 4, True, True, True, "float32"),
    ("block-plain-param", "block", "group", 5, 2, 4, False, False, False, "float32"),
    ("block-plain-quant-h", "block", "group", 5, 2, 4, False, True, True, "float32"),
    ("block-two-leaders", "block", "group", 20, 2, 2, True, False, True, "float32"),
    ("channel-token-f16", "channel", "token", 4, 2, 4, True, False, True, "float16"),
]


@functools.lru_cache(maxsize=None)
def _weights(strategy, act, E=4):
    """E experts' gate / up / down FP8 weights of one format (built once per format: the cases share them)."""
    rng = np.random.default_rng(len(strategy) + len(act))
    return {n: [_weight(rng, o, i, strategy, act) for _ in range(E)] for n, (o, i) in
            dict(g=(I, D), u=(I, D), d=(D, I)).items()}


ROWS = 64                                            # activation rows per case: x <= T, h <= T * k


@functools.lru_cache(maxsize=None)
def _acts(act):
    """2 * ROWS activation rows of varied magnitude and their quantization (per row, or per row and
    128-group): x and h of every case are rows of these."""
    rng = np.random.default_rng(len(act))
    a = rng.standard_normal((2 * ROWS, D)) * np.exp(rng.uniform(-1, 1, (2 * ROWS, 1)))
    return (a,) + _act_parts(a, act)


def _inputs(case):
    name, strategy, act, T, k, E, *_ = case
    rng = np.random.default_rng(len(name) * 13 + T)
    idx = np.stack([rng.choice(E, k, replace=False) for _ in range(T)]).astype(np.int32)
    idx[0, 1] = -1                                   # dropped pairs: another device's experts
    idx[-1, 0] = E
    ws = {n: lst[:E] for n, lst in _weights(strategy, act).items()}
    a, aq, as_ = _acts(act)                          # per-row quantization: rows of one quantized array
    x, h = slice(0, T), slice(ROWS, ROWS + T * k)
    out = dict(idx=idx, x=a[x], h=a[h], xq=aq[x], xs=as_[x], hq=aq[h], hs=as_[h])
    for n, lst in ws.items():
        out[f"w{n}q"] = np.stack([p.q for p, _ in lst])
        out[f"w{n}s"] = np.stack([np.asarray(p.scale, np.float32) for p, _ in lst])
        out[f"w{n}64"] = np.stack([_dequant(p) for p, _ in lst])
        out[f"w{n}full"] = np.stack([w for _, w in lst])
        out["block"] = np.array(lst[0][0].block)
    for key in ("xq", "hq", "wgq", "wuq", "wdq"):
        out[key] = _u8(out[key])
    for key in ("wgq", "wuq", "wdq"):
        out[key + "_k"] = _u8(np.swapaxes(out[key], 1, 2))
    return out


def _child(workdir):
    """Runs with TRITON_INTERPRET=1: launches both decode kernels per case, saves h and y."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    import dataclasses
    import torch
    from lingjax import quant
    from lingjax.kernels.moe import gpu_fp8
    from lingjax.kernels.moe.triton_fp8_decode import down_fp8_decode_kernel, gate_up_fp8_decode_kernel
    tt = lambda a: torch.from_numpy(np.ascontiguousarray(a))                      # noqa: E731
    f8 = lambda a: tt(a).view(torch.float8_e4m3fn)                                # noqa: E731
    for name, _, act, T, k, E, swap, qa, kmajor, out in CASES:
        z = np.load(Path(workdir) / f"{name}.npz")
        blk = tuple(int(b) for b in z["block"])
        sfx = "_k" if kmajor else ""
        wg = quant.FP8Weight(z["wgq" + sfx].view(quant.FP8_NP), z["wgs"], blk, act, kmajor)
        wd = quant.FP8Weight(z["wdq" + sfx].view(quant.FP8_NP), z["wds"], blk, act, kmajor)
        cg = dataclasses.replace(gpu_fp8.pick_decode_config("gate_up", T, D, I), block_n=64, swap_ab=swap)
        cd = dataclasses.replace(gpu_fp8.pick_decode_config("down", T, I, D), block_n=64, swap_ab=swap, quant_a=qa)
        assert gpu_fp8.decode_quant_a(wd, cd) == qa
        dt = getattr(torch, out)
        flat = tt(z["idx"].reshape(-1))
        h = torch.full((T * k, I), SENTINEL, dtype=dt)
        y = torch.full((T * k, D), SENTINEL, dtype=dt)
        launch, consts = gpu_fp8.decode_launch("gate_up", T, k, wg, z["xs"].shape[-1], cg)
        assert consts["M"] == 16 and consts["B_KMAJOR"] == kmajor
        gate_up_fp8_decode_kernel[launch["grid"]](
            f8(z["xq"]), tt(z["xs"]), flat, f8(z["wgq" + sfx]), tt(z["wgs"]), f8(z["wuq" + sfx]), tt(z["wus"]), h,
            **consts)
        groups = I // 128 if qa else z["hs"].shape[-1]
        launch, consts = gpu_fp8.decode_launch("down", T, k, wd, groups, cd)
        assert consts["QUANT_A"] == qa
        ha = tt(z["h"]).float() if qa else f8(z["hq"])
        down_fp8_decode_kernel[launch["grid"]](ha, tt(z["hs"]), flat, f8(z["wdq" + sfx]), tt(z["wds"]), y, **consts)
        np.savez(Path(workdir) / f"{name}-out.npz", h=h.double().numpy(), y=y.double().numpy())


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("fp8_decode_interp")
    for case in CASES:
        np.savez(d / f"{case[0]}.npz", **_inputs(case))
    run_child(__file__, d, JAX_PLATFORMS="cpu")
    return d


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_fp8_decode_kernels_match_float64(workdir, case):
    name, _, act, T, k, E, swap, qa, kmajor, out = case
    z = np.load(workdir / f"{name}.npz")
    o = np.load(workdir / f"{name}-out.npz")
    flat = z["idx"].reshape(-1)
    real = (flat >= 0) & (flat < E)
    q = np.nonzero(real)[0]
    e = flat[q]
    xd = _act_dequant(z["xq"].view(_f8()), z["xs"])[q // k]
    hd = _act_dequant(z["hq"].view(_f8()), z["hs"])[q]
    g, u = np.einsum("qk,qkn->qn", xd, z["wg64"][e]), np.einsum("qk,qkn->qn", xd, z["wu64"][e])
    want_h = g / (1 + np.exp(-g)) * u
    want_y = np.einsum("qk,qkn->qn", hd, z["wd64"][e])
    xf = z["x"][q // k]
    g, u = np.einsum("qk,qkn->qn", xf, z["wgfull"][e]), np.einsum("qk,qkn->qn", xf, z["wufull"][e])
    full_h = g / (1 + np.exp(-g)) * u
    tol = 1e-5 if out == "float32" else 1e-3
    assert _rel(o["h"][q], want_h) < tol, _rel(o["h"][q], want_h)
    assert _rel(o["y"][q], want_y) < tol, _rel(o["y"][q], want_y)
    assert 0.005 < _rel(o["h"][q], full_h) < 0.08
    dropped = np.nonzero(~real)[0]
    assert len(dropped) == 2
    assert np.all(o["h"][dropped] == SENTINEL) and np.all(o["y"][dropped] == SENTINEL), "dropped pairs written"
    if name == "block-two-leaders":                  # an expert with more pairs than a program's 16 rows
        assert np.bincount(e, minlength=E).max() > 16


if __name__ == "__main__":          # the child process
    _child(sys.argv[1])
