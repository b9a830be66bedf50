"""The FP8 GPU path on the CPU, short of running it: the model's `kernels` option routes every FP8
projection and FP8 expert stack to the FP8 Triton kernels (jax-triton calls traced here; the kernel
bodies run in Triton's interpreter in tests/test_fp8_triton_interpret.py), weights the kernels do not
take fall back to the reference math, and the kernels compile for sm_90 (Triton -> PTX on the CPU,
jax-triton's own compile function) within shared memory, on the fp8 tensor cores (wgmma ... e4m3) where
the row tiles are 64 or more. On the CPU (kernels=None) the FP8 model's logits are the reference
math's (tests/test_fp8.py checks those against the dequantized model)."""
import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lingjax import quant, testing
from lingjax.kernels import fp8 as fp8_kernels
from lingjax.kernels import moe as moe_kernels
from lingjax.kernels.fp8 import gpu as fp8_gpu
from lingjax.kernels.moe import gpu_fp8
from lingjax.model.common import Dense
from lingjax.weights import load_hf
from tests.test_linear_attention_kernels import (SM90_SMEM, _compile_call, _triton_calls,  # noqa: F401
                                                 jax_triton_call)

SMALL = testing.tiny_config(num_hidden_layers=2)     # a linear and an MLA layer, a dense MLP and a MoE
TOKENS = jnp.array([[5, 9, 20, 33, 40, 41, 7, 8], [11, 12, 13, 14, 15, 16, 17, 18]])
sd = jax.ShapeDtypeStruct


def _fp8_weight(K, N, block=(128, 128), act="group", E=None, kmajor=False):
    lead = () if E is None else (E,)
    nk = -(-K // block[0]) if block[0] else 1
    nn = {0: 1, 1: N}.get(block[1], -(-N // 128))
    return quant.FP8Weight(sd(lead + ((N, K) if kmajor else (K, N)), jnp.float8_e4m3fn), sd(lead + (nk, nn), jnp.float32),
                           block, act, kmajor)


def _set_kernels(model, kernels):
    for _, m in nnx.iter_modules(model):
        if hasattr(m, "kernels"):
            m.kernels = kernels


@pytest.fixture(scope="module")
def fp8_model(tmp_path_factory):
    src = str(tmp_path_factory.mktemp("fp8gpu") / "fp8")
    testing.write_fp8_checkpoint(src, "fp8-block", SMALL, mtp=False)
    return load_hf(src, jnp.bfloat16, mtp=False)[1]


def test_model_routes_fp8_weights_to_the_fp8_kernels(fp8_model, jax_triton_call, monkeypatch):
    """kernels='gpu': every FP8 Dense call is one fp8_matmul launch and every MoE layer one FP8
    gate_up + down pair; quant.matmul (the reference FP8 matmul) is never reached with an FP8 weight.
    Weight-only FP8 (act 'none') stays on the reference (no FP8 launch)."""
    real = quant.matmul
    calls = {"fp8_ref": 0}

    def spy(x, w):
        calls["fp8_ref"] += quant.is_fp8(w)
        return real(x, w)
    monkeypatch.setattr(quant, "matmul", spy)
    monkeypatch.setattr(fp8_kernels, "XLA_DOT_MAX_ROWS", 0)     # the Triton kernel at every size (see below)
    _set_kernels(fp8_model, "gpu")
    try:
        jx = jax.make_jaxpr(lambda t: fp8_model(t))(TOKENS)
        names = [e.params["fn"].fn.__name__ for e in _triton_calls(jax_triton_call, jx.jaxpr)]
        assert calls["fp8_ref"] == 0, "an FP8 projection took the reference path under kernels='gpu'"
        n_moe = sum(1 for l in fp8_model.layers if l.is_moe)
        assert names.count("gate_up_fp8_kernel") == n_moe == names.count("down_fp8_kernel") == 1
        # every FP8 projection of the model, once: linear attention q/k/v (the fused QKV, split), g,
        # dense; MLA q_a, q_b, kv_a, kv_b, dense; the dense MLP's and the shared expert's gate/up/down
        n_dense = sum(1 for _, m in nnx.iter_modules(fp8_model) if isinstance(m, Dense)
                      and quant.is_fp8(m.kernel.get_value()))
        assert names.count("fp8_matmul_kernel") == n_dense == 5 + 5 + 3 + 3, names
        # up to XLA_DOT_MAX_ROWS rows the dense projections XLA's FP8 take go there instead
        from lingjax.kernels.fp8 import xla
        n_xla = sum(1 for _, m in nnx.iter_modules(fp8_model) if isinstance(m, Dense)
                    and quant.is_fp8(m.kernel.get_value()) and xla.supports(jnp.zeros((1, 1, m.kernel.get_value().shape[0]),
                                                                                        jnp.bfloat16), m.kernel.get_value()))
        monkeypatch.setattr(fp8_kernels, "XLA_DOT_MAX_ROWS", TOKENS.size)
        jx = jax.make_jaxpr(lambda t: fp8_model(t))(TOKENS)
        names = [e.params["fn"].fn.__name__ for e in _triton_calls(jax_triton_call, jx.jaxpr)]
        assert names.count("fp8_matmul_kernel") == n_dense - n_xla and calls["fp8_ref"] == 0, (n_xla, names)
        quant.without_activation_quant(fp8_model)
        jx = jax.make_jaxpr(lambda t: fp8_model(t))(TOKENS)
        names = [e.params["fn"].fn.__name__ for e in _triton_calls(jax_triton_call, jx.jaxpr)]
        assert not [n for n in names if "fp8" in n], names
        assert calls["fp8_ref"] == n_dense
    finally:
        _set_kernels(fp8_model, None)


def test_step_xla_options_turn_the_dot_merger_off_for_one_dot_fp8(monkeypatch):
    """kernels.fp8.step_xla_options: on a GPU, a model with weights on XLA's one-dot FP8 path (per-token
    activations, per-channel / per-tensor weight scales) compiles without XLA's dot merger (which would copy
    the concatenated weights of q / k / v / g every step); fp8-block, bf16 and any CPU model: no options."""
    cpu = {"x": _fp8_weight(256, 128, (0, 1), "token")}
    assert fp8_kernels.step_xla_options(cpu) == {}
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    for block, act, want in [((0, 1), "token", True), ((0, 0), "token", True), ((128, 128), "group", False),
                             ((0, 1), "none", False)]:
        tree = {"a": jnp.zeros((2, 2), jnp.bfloat16), "w": [_fp8_weight(256, 128, block, act, kmajor=True)]}
        assert fp8_kernels.step_xla_options(tree) == ({"xla_disable_hlo_passes": "dot-merger"} if want else {})
    assert fp8_kernels.step_xla_options({"a": jnp.zeros((2, 2))}) == {}


def test_dispatch_choices_and_fallbacks():
    assert fp8_kernels.resolve("mosaic_gpu") == "gpu" and fp8_kernels.resolve("tpu") == "reference"
    assert fp8_kernels.resolve("gpu_interpret") == "reference"
    with pytest.raises(ValueError, match="unknown FP8 matmul implementation 'cuda'"):
        fp8_kernels.resolve("cuda")
    x = sd((4, 256), jnp.bfloat16)
    assert fp8_gpu.supports(x, _fp8_weight(256, 384))
    assert fp8_gpu.supports(x, _fp8_weight(256, 384, (0, 1), "token"))
    assert fp8_gpu.supports(x, _fp8_weight(256, 96, (128, 1), "group"))
    assert not fp8_gpu.supports(x, _fp8_weight(256, 384, act="none"))               # weight-only
    whole = dataclasses.replace(_fp8_weight(256, 384), q=sd((256, 192), jnp.float8_e4m3fn))
    assert not fp8_gpu.supports(x, whole)          # a tp shard of 192 columns keeps the whole scale
    assert not fp8_gpu.supports(sd((4, 256), jnp.int8), _fp8_weight(256, 384))
    wg, wd = _fp8_weight(64, 32, E=8), _fp8_weight(32, 64, E=8)
    assert gpu_fp8.supports(sd((4, 64), jnp.bfloat16), wg, wg, wd)
    assert not gpu_fp8.supports(sd((4, 64), jnp.bfloat16), *(dataclasses.replace(w, act="none") for w in (wg, wg, wd)))
    w8 = _fp8_weight(64, 24, E=8)                  # 24 columns: not a multiple of a 16-wide tile
    assert not gpu_fp8.supports(sd((4, 64), jnp.bfloat16), w8, w8, _fp8_weight(24, 64, E=8))


def test_plain_and_reference_paths_unchanged():
    """A plain weight takes the plain dot; impl 'reference' is quant.matmul bit for bit."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, 256)), jnp.bfloat16)
    w = rng.standard_normal((384, 256)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(fp8_kernels.matmul(x, jnp.asarray(w.T, jnp.bfloat16)), np.float32),
                                  np.asarray(jnp.dot(x, jnp.asarray(w.T, jnp.bfloat16)), np.float32))
    q, s = quant.quantize_block(w)
    [p] = quant.from_hf("T", [q], [s], quant.SCHEMES["fp8-block"])
    p = jax.tree.map(jnp.asarray, p)
    np.testing.assert_array_equal(np.asarray(fp8_kernels.matmul(x, p, impl="reference"), np.float32),
                                  np.asarray(quant.matmul(x, p), np.float32))


def _ptx_ops(ptx):
    return set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.\w+\.f32\.(\w+)\.", ptx)), "mma.sync" in ptx


SWAP_REDUCE = fp8_gpu.Config(16, 64, 128, 4, 8, 4, 6, swap_ab=True, reduce=True, xla_quant=False)


@pytest.mark.parametrize("M,block,act,config", [(1, (128, 128), "group", None), (64, (128, 128), "group", None),
                                                (4096, (128, 128), "group", None), (16, (0, 1), "token", None),
                                                (16, (128, 128), "group", SWAP_REDUCE)],
                         ids=["1", "64", "4096", "16-channel", "16-swap-reduce-quantize-kernel"])
def test_dense_fp8_kernel_compiles_for_sm90(jax_triton_call, M, block, act, config):
    """Flash's 4096 x 4096 projection: decode M=1 and 64 (one 64-row tile, split-K) and prefill M=4096
    (128 x 128 tiles, 8 warps), all on the fp8 wgmma (no f16 conversion: gpu.pick_config); pipelined
    loads; within sm_90's shared memory. Session 6's options too (not the defaults): swap_ab (the weight
    tile as the 64-row operand, the 16 activation rows the wgmma's N), split-K summed in the kernel
    (an acq_rel atomic per tile) and the activations quantized by quantize_kernel."""
    jx = jax.make_jaxpr(lambda x, w: fp8_gpu.matmul(x, w, config=config))(
        sd((M, 4096), jnp.bfloat16), _fp8_weight(4096, 4096, block, act))
    calls = _triton_calls(jax_triton_call, jx.jaxpr)
    names = [c.params["fn"].fn.__name__ for c in calls]
    assert names == (["quantize_kernel", "fp8_matmul_kernel"] if config else ["fp8_matmul_kernel"]), names
    if config:
        shared, _, _ = _compile_call(jax_triton_call, calls[0])
        assert 0 < shared <= SM90_SMEM
    eqn = calls[-1]
    assert eqn.params["PER_K_SCALE"] == (act == "group")
    shared, ptx, _ = _compile_call(jax_triton_call, eqn)
    wgmma, mma = _ptx_ops(ptx)
    assert 0 < shared <= SM90_SMEM and "cp.async" in ptx
    assert (eqn.params["BLOCK_M"] >= 64 or eqn.params["SWAP_AB"]) and wgmma == {"e4m3"} and not mma, (wgmma, mma)
    assert eqn.params["SWAP_AB"] == bool(config) and eqn.params["REDUCE"] == bool(config)
    if config:
        assert "atom.global.gpu.acq_rel.add" in ptx


@pytest.mark.parametrize("M,N", [(1, 4096), (16, 4096), (64, 4096), (16, 1536)])
def test_dense_fp8_decode_config_compiles_for_sm90(jax_triton_call, monkeypatch, M, N):
    """DENSE_DECODE 'triton': a decode-sized projection (flash's 4096 x 4096 and q_a's 4096 x 1536, K-major as
    the engine stores it) is one launch of the kernel with gpu.decode_config (no quantization launch or XLA
    pass: x quantized in the kernel; swapped operands, split-K), on the fp8 wgmma, pipelined, within
    shared memory, without register spills."""
    monkeypatch.setattr(fp8_kernels, "DENSE_DECODE", "triton")
    jx = jax.make_jaxpr(lambda x, w: fp8_kernels.matmul(x, w, impl="gpu"))(
        sd((M, 4096), jnp.bfloat16), _fp8_weight(4096, N, kmajor=True))
    calls = _triton_calls(jax_triton_call, jx.jaxpr)
    assert [c.params["fn"].fn.__name__ for c in calls] == ["fp8_matmul_kernel"]
    eqn = calls[0]
    c = fp8_gpu.decode_config(M, N, 4096)
    assert eqn.params["QUANT_A"] and eqn.params["SWAP_AB"] and eqn.params["B_KMAJOR"]
    assert eqn.params["BLOCK_M"] == c.block_m == max(16, M) and eqn.params["SPLIT_K"] == c.split_k > 1
    assert c.split_k * (N // c.block_n) <= 2 * fp8_gpu.NUM_SMS + N // c.block_n
    assert not any(e.primitive.name == "reduce_max" for e in jx.jaxpr.eqns), "no XLA quantization pass"
    shared, ptx, _ = _compile_call(jax_triton_call, eqn)
    wgmma, mma = _ptx_ops(ptx)
    assert 0 < shared <= SM90_SMEM and "cp.async" in ptx
    assert wgmma == {"e4m3"} and not mma, (wgmma, mma)
    assert _ptxas_spills(ptx)[1] == 0, "register spills"


@pytest.mark.parametrize("T,block_m", [(16, None), (4096, None), (16, 16)])
def test_moe_fp8_kernels_compile_for_sm90(jax_triton_call, T, block_m):
    """The FP8 grouped matmuls at Ling-2.6-flash's expert shapes (256 experts, d 4096, I 1024, top-8):
    through the moe dispatch, decode-sized blocks (16 rows with swapped operands, the weight tile the
    wgmma's 64+-row operand: gpu_fp8.pick_block_m / pick_config) and prefill blocks (128 rows), both on
    the fp8 wgmma; and session 6's options (gate_up writing h quantized; x quantized by quantize_kernel)
    through gpu_fp8.grouped."""
    E, d, I, k = 256, 4096, 1024, 8
    wg, wd = _fp8_weight(d, I, E=E), _fp8_weight(I, d, E=E)
    args = (sd((T, d), jnp.bfloat16), sd((T, k), jnp.int32), sd((T, k), jnp.float32), wg, wg, wd)
    if block_m is None:
        jx = jax.make_jaxpr(lambda *a: moe_kernels.experts(*a, impl="gpu"))(*args)
    else:
        gc = dataclasses.replace(gpu_fp8.pick_config("gate_up", block_m, d, I, "group"), block_n=128, quant_h=True,
                                 xla_quant=False)
        dc = dataclasses.replace(gpu_fp8.pick_config("down", block_m, I, d, "group"), xla_quant=False)

        def f(x, idx, cw, a, b, c):
            lay = moe_kernels.make_layout(idx, E, block_m)
            return gpu_fp8.grouped(x, lay, a, b, c, gate_up_config=gc, down_config=dc)
        jx = jax.make_jaxpr(f)(*args)
    calls = _triton_calls(jax_triton_call, jx.jaxpr)
    names = [c.params["fn"].fn.__name__ for c in calls]
    assert names == ["quantize_kernel"] * (block_m is not None) + ["gate_up_fp8_kernel", "down_fp8_kernel"], names
    for c in calls[-2:]:
        assert c.params["BLOCK_M"] == (block_m or (16 if T == 16 else 128))
        assert c.params["SWAP_AB"] == (T == 16)
        shared, ptx, _ = _compile_call(jax_triton_call, c)
        wgmma, mma = _ptx_ops(ptx)
        assert 0 < shared <= SM90_SMEM
        assert wgmma == {"e4m3"} and not mma, (wgmma, mma)
    assert calls[-2].params["QUANT_H"] == (block_m is not None)


def _ptxas_spills(ptx):
    """(registers a thread, bytes of spill stores) of one kernel's PTX assembled for sm_90a by the ptxas that
    ships with Triton; skips the test where there is none."""
    import os
    import subprocess
    import tempfile
    import triton
    exe = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(exe):
        pytest.skip("no ptxas in the Triton install")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        p = subprocess.run([exe, "-arch=sm_90a", "-v", path, "-o", os.devnull], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    return int(re.search(r"Used (\d+) registers", p.stderr)[1]), int(re.search(r"(\d+) bytes spill stores", p.stderr)[1])


@pytest.mark.parametrize("T,quant_a", [(16, False), (64, True)])
def test_moe_fp8_decode_path_compiles_for_sm90(jax_triton_call, T, quant_a):
    """The FP8 decode path (experts(decode=True): gpu_fp8.experts_decode) at Ling-2.6-flash's expert shapes,
    K-major weights as the model stores them: two launches over the routing ids (no layout), 16 rows per
    program with swapped operands, on the fp8 wgmma (no mma.sync) within shared memory; h quantized by XLA's
    pass before down, or (quant_a) inside down."""
    E, d, I, k = 256, 4096, 1024, 8
    wg, wd = _fp8_weight(d, I, E=E, kmajor=True), _fp8_weight(I, d, E=E, kmajor=True)
    args = (sd((T, d), jnp.bfloat16), sd((T, k), jnp.int32), sd((T, k), jnp.float32), wg, wg, wd)
    cd = dataclasses.replace(gpu_fp8.pick_decode_config("down", T, I, d), quant_a=quant_a)
    f = lambda *a: gpu_fp8.experts_decode(*a, down_config=cd)                      # noqa: E731
    calls = _triton_calls(jax_triton_call, jax.make_jaxpr(f)(*args).jaxpr)
    assert [c.params["fn"].fn.__name__ for c in calls] == ["gate_up_fp8_decode_kernel", "down_fp8_decode_kernel"]
    jx = jax.make_jaxpr(lambda *a: moe_kernels.experts(*a, impl="gpu", decode=True))(*args)
    assert [c.params["fn"].fn.__name__ for c in _triton_calls(jax_triton_call, jx.jaxpr)] == [
        "gate_up_fp8_decode_kernel", "down_fp8_decode_kernel"]
    for c in calls:
        assert c.params["M"] == 16 and c.params["SWAP_AB"] == c.params["B_KMAJOR"] == True     # noqa: E712
        shared, ptx, _ = _compile_call(jax_triton_call, c)
        assert 0 < shared <= SM90_SMEM
        wgmma, mma = _ptx_ops(ptx)
        assert wgmma == {"e4m3"} and not mma, (wgmma, mma)
        assert _ptxas_spills(ptx)[1] == 0, "register spills"
    assert calls[1].params["QUANT_A"] == quant_a


@pytest.mark.parametrize("option", ["default", "w16"])
def test_moe_fp8_prefill_options_compile_without_spills(jax_triton_call, monkeypatch, option):
    """The prefill kernels at flash's T=4096 (128-row blocks), traced through the moe dispatch and compiled for
    sm_90a without register spills (4-warp tiles spill: a [128, 128] float32 accumulator and the per-k-step product
    it adds need ~256 registers a thread): the default, the FP8 kernels with 8 warps (bench_fp8's tag P, the
    default since session 8) on the fp8 wgmma, and session 7's option PREFILL_W16 (w16: weight tiles dequantized in the kernel, the bf16 kernels' tiles) on the
    bf16 wgmma, its activations passed quantize-dequantized in bf16; float32 tokens keep the fp8 products."""
    E, d, I, k, T = 256, 4096, 1024, 8, 4096
    wg, wd = _fp8_weight(d, I, E=E, kmajor=True), _fp8_weight(I, d, E=E, kmajor=True)
    args = (sd((T, d), jnp.bfloat16), sd((T, k), jnp.int32), sd((T, k), jnp.float32), wg, wg, wd)
    if option == "w16":
        monkeypatch.setattr(gpu_fp8, "PREFILL_W16", True)
        f32 = jax.make_jaxpr(lambda *a: moe_kernels.experts(*a, impl="gpu"))(sd((T, d), jnp.float32), *args[1:])
        assert not any(c.params["W16"] for c in _triton_calls(jax_triton_call, f32.jaxpr))
    jx = jax.make_jaxpr(lambda *a: moe_kernels.experts(*a, impl="gpu"))(*args)
    calls = _triton_calls(jax_triton_call, jx.jaxpr)
    assert [c.params["fn"].fn.__name__ for c in calls] == ["gate_up_fp8_kernel", "down_fp8_kernel"]
    for c in calls:
        assert c.params["BLOCK_M"] == 128 and c.params["num_warps"] == 8 and c.params["W16"] == (option == "w16")
        if option == "w16":
            assert c.invars[0].aval.dtype == jnp.bfloat16 and c.params["BLOCK_K"] == 64
        shared, ptx, _ = _compile_call(jax_triton_call, c)
        assert 0 < shared <= SM90_SMEM
        assert _ptx_ops(ptx) == ({"bf16"} if option == "w16" else {"e4m3"}, False)
        assert _ptxas_spills(ptx)[1] == 0, c.params["fn"].fn.__name__


@pytest.mark.parametrize("scheme", ["fp8-block", "fp8-channel"])
def test_quantize_param_on_device_matches_the_hf_quantizers(scheme):
    """quant.quantize_param (jnp, what the benchmarks quantize random models with) gives the HF
    quantizers' scales to float32 rounding (XLA may divide by 448 as a multiplication by its reciprocal:
    1 ulp) and their fp8 values (a value may round the other way only at a tie that the 1-ulp scale
    moves: at most one fp8 step, in a handful of the 180,000 entries), for a plain and a stacked weight."""
    rng = np.random.default_rng(1)
    fmt = quant.SCHEMES[scheme]
    w = rng.standard_normal((3, 200, 300)).astype(np.float32)                     # HF [E, out, in]
    got = quant.quantize_param(jnp.asarray(np.swapaxes(w, 1, 2)), quant.param_block(fmt), fmt.act)
    [want] = quant.from_hf("stack", *zip(*[fmt.quantize(we) for we in w]), fmt)
    assert got.block == want.block and got.act == want.act and got.scale.shape == want.scale.shape
    np.testing.assert_allclose(np.asarray(got.scale), want.scale, rtol=2.5e-7, atol=0)
    gq, wq = np.asarray(got.q), want.q
    assert np.mean(gq.view(np.uint8) != wq.view(np.uint8)) < 1e-3
    np.testing.assert_allclose(gq.astype(np.float32), wq.astype(np.float32), rtol=2 ** -3, atol=2 ** -9)
    one = quant.quantize_param(jnp.asarray(w[0].T), quant.param_block(fmt), fmt.act)
    np.testing.assert_array_equal(np.asarray(one.q).view(np.uint8), gq[0].view(np.uint8))


def _ptx_counts(ptx):
    """(cp.async copies, ldmatrix loads, ld.shared loads) in a kernel's PTX."""
    ins = [line.strip() for line in ptx.splitlines()]
    return (sum(i.startswith("cp.async.c") for i in ins), sum(i.startswith("ldmatrix") for i in ins),
            sum(i.startswith("ld.shared") for i in ins))


@pytest.mark.parametrize("kind,M", [("dense", 16), ("dense", 4096), ("moe", 16)])
def test_kmajor_weights_stream_by_async_copies(jax_triton_call, kind, M):
    """Hopper's fp8 MMAs read B K-major. Weights stored K-major (quant.with_layout) are fed the way
    bf16 weights are: 64+-row tiles (wgmma) copy weight tiles to shared memory by cp.async in the
    pipelined loop, 16-row tiles (mma.sync) read them from shared memory by ldmatrix (the scalar
    ld.shared left there are the activations' in-kernel quantization, a row reduction). In the param
    layout [K, N] the weight tiles go through registers unpipelined (fewer cp.async), or are gathered
    from shared memory byte by byte (scalar ld.shared): the FP8 decode slowdown of issue 18.
    Flash's shapes, compiled for sm_90 (the defaults run the fp8 wgmma at every size since session 5:
    64+-row tiles, or at decode sizes of the dense kernel the weight tile as the 64-row operand, swap_ab:
    gpu.pick_config, gpu_fp8.pick_block_m)."""
    counts = {}
    for kmajor in (False, True):
        if kind == "dense":
            f = lambda x, w: fp8_gpu.matmul(x, w)                        # noqa: E731  (a fresh trace)
            args = (sd((M, 4096), jnp.bfloat16), _fp8_weight(4096, 4096, kmajor=kmajor))
        else:
            E, d, I, k = 256, 4096, 1024, 8
            wg, wd = _fp8_weight(d, I, E=E, kmajor=kmajor), _fp8_weight(I, d, E=E, kmajor=kmajor)
            f = lambda *a: moe_kernels.experts(*a, impl="gpu")                        # noqa: E731
            args = (sd((M, d), jnp.bfloat16), sd((M, k), jnp.int32), sd((M, k), jnp.float32), wg, wg, wd)
        calls = [c for c in _triton_calls(jax_triton_call, jax.make_jaxpr(f)(*args).jaxpr)
                 if c.params["fn"].fn.__name__ != "quantize_kernel"]
        assert all(c.params["B_KMAJOR"] == kmajor for c in calls)
        c = calls[0]
        shared, ptx, _ = _compile_call(jax_triton_call, c)
        assert 0 < shared <= SM90_SMEM
        counts[kmajor] = _ptx_counts(ptx)
        wgmma = c.params["BLOCK_M"] >= 64 or bool(c.params.get("SWAP_AB"))     # swap_ab: 64+ weight rows
        assert _ptx_ops(ptx)[0] == {"e4m3"} if wgmma else _ptx_ops(ptx)[1]
    (cp_io, ldm_io, lds_io), (cp_k, ldm_k, lds_k) = counts[False], counts[True]
    if wgmma:
        assert cp_k > cp_io > 0, counts
    else:
        assert ldm_k > ldm_io and 4 * lds_k < lds_io, counts


def test_kernel_layout_same_model(fp8_model, jax_triton_call):
    """quant.to_kernel_layout lays every FP8 weight out K-major in place: the same weights (dequantize,
    all the reference path reads of them, bit for bit), the same output of an FP8 projection (the
    same values through a transposed operand: bf16 outputs equal up to a reordered float32 sum's
    rounding, 1e-3 relative), every FP8 launch under kernels='gpu' reads K-major weights, the HF
    export layout is unchanged (to_hf bit for bit), and back."""
    x = jnp.asarray(np.random.default_rng(2).standard_normal((5, SMALL.hidden_size)), jnp.bfloat16)
    dense = fp8_model.layers[0].attention.dense
    ref = np.asarray(dense(x), np.float32)
    fp8 = lambda: [v.get_value() for _, v in nnx.to_flat_state(nnx.state(fp8_model)) if quant.is_fp8(v.get_value())]  # noqa: E731
    deq = [np.asarray(quant.dequantize(w)) for w in fp8()]
    from lingjax.engine import _fp8_on_gpu_kernels      # when the engine calls to_kernel_layout
    assert _fp8_on_gpu_kernels(fp8_model, "gpu") and _fp8_on_gpu_kernels(fp8_model, "pallas_triton")
    assert not _fp8_on_gpu_kernels(fp8_model, None) and not _fp8_on_gpu_kernels(fp8_model, "gpu_interpret")
    w0 = jax.tree.map(np.asarray, fp8_model.layers[1].mlp.w_down.get_value())
    n = quant.to_kernel_layout(fp8_model)
    try:
        assert n == len(deq) and all(w.kmajor for w in fp8())
        for w, d in zip(fp8(), deq):
            np.testing.assert_array_equal(np.asarray(quant.dequantize(w)), d)
        w1 = fp8_model.layers[1].mlp.w_down.get_value()
        assert w1.kmajor and w1.shape == w0.shape and w1.q.shape == w0.q.shape[:1] + w0.q.shape[:0:-1]
        for (qa, sa), (qb, sb) in zip(quant.to_hf("stack", [w0], quant.SCHEMES["fp8-block"]),
                                      quant.to_hf("stack", [jax.tree.map(np.asarray, w1)], quant.SCHEMES["fp8-block"])):
            np.testing.assert_array_equal(qa.view(np.uint8), qb.view(np.uint8))
            np.testing.assert_array_equal(sa, sb)
        got = np.asarray(dense(x), np.float32)
        assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-3
        _set_kernels(fp8_model, "gpu")
        calls = _triton_calls(jax_triton_call, jax.make_jaxpr(lambda t: fp8_model(t))(TOKENS).jaxpr)
        assert calls and all(c.params["B_KMAJOR"] for c in calls if "fp8" in c.params["fn"].fn.__name__)
    finally:
        _set_kernels(fp8_model, None)
        quant.to_kernel_layout(fp8_model, kmajor=False)
    assert not fp8_model.layers[1].mlp.w_down.get_value().kmajor


@pytest.mark.parametrize("scheme", ["fp8-block", "fp8-channel"])
def test_xla_fp8_dot_is_the_reference_math(scheme):
    """impl 'xla' (XLA's own FP8 dot on the fp8 operands, scales after; fp8-block batched over the
    128-deep K groups): the reference math (quant.matmul) up to float32 summation order (1e-5 relative,
    float32), K-major (block) and [in, out] (channel) weights, N not a multiple of 128; a weight it does
    not take (weight-only) runs the reference."""
    rng = np.random.default_rng(3)
    blk, act = {"fp8-block": ((128, 128), "group"), "fp8-channel": ((0, 1), "token")}[scheme]
    K, N = 384, 200
    w = jnp.asarray(rng.standard_normal((K, N)) / np.sqrt(K), jnp.float32)
    x = jnp.asarray(rng.standard_normal((5, 2, K)) * np.exp(rng.uniform(-2, 2, (5, 2, 1))), jnp.float32)
    from lingjax.kernels.fp8 import xla
    wq = quant.with_layout(quant.quantize_param(w, blk, act), scheme == "fp8-block")
    assert xla.supports(x, wq)
    got = np.asarray(jax.jit(lambda x, w: fp8_kernels.matmul(x, w, impl="xla"))(x, wq))
    want = np.asarray(jax.jit(quant.matmul)(x, wq))
    assert got.shape == (5, 2, N)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5
    wo = dataclasses.replace(wq, act="none")
    assert not xla.supports(x, wo)
    np.testing.assert_array_equal(np.asarray(fp8_kernels.matmul(x, wo, impl="xla")), np.asarray(quant.matmul(x, wo)))


def test_gpu_dispatch_runs_xla_fp8_dot_at_decode_sizes(jax_triton_call):
    """impl 'gpu': up to XLA_DOT_MAX_ROWS rows a weight XLA's FP8 dot takes runs there (no Triton launch;
    on the CPU it runs: the reference math to 1e-5), above them the Triton kernel, from DEQUANT_MIN_ROWS
    the reference math (quant.matmul, bit for bit)."""
    rng = np.random.default_rng(4)
    w = quant.with_layout(quant.quantize_param(jnp.asarray(rng.standard_normal((256, 200)) / 16, jnp.float32)), True)
    for rows, triton in ((fp8_kernels.XLA_DOT_MAX_ROWS, False), (fp8_kernels.XLA_DOT_MAX_ROWS + 1, True),
                         (fp8_kernels.DEQUANT_MIN_ROWS, False)):
        x = jnp.asarray(rng.standard_normal((rows, 256)), jnp.float32)
        f = lambda x, w: fp8_kernels.matmul(x, w, impl="gpu")                          # noqa: E731
        names = [c.params["fn"].fn.__name__ for c in _triton_calls(jax_triton_call, jax.make_jaxpr(f)(x, w).jaxpr)]
        assert names == (["fp8_matmul_kernel"] if triton else []), names
        if not triton:
            got, want = np.asarray(jax.jit(f)(x, w)), np.asarray(jax.jit(quant.matmul)(x, w))
            assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5
            if rows >= fp8_kernels.DEQUANT_MIN_ROWS:
                np.testing.assert_array_equal(got, want)
