"""What the jax-triton wrappers of the kernels share: importing jax-triton without its side effect on
the process, and the tl.dot precision of a kernel's inputs.

`import jax_triton` (0.3.1) sets os.environ["TRITON_CACHE_DIR"] = "" for the whole process, which
turns Triton's file cache off; every other Triton user in the process (PyTorch's Triton kernels,
flash-linear-attention's autotuners, triton.testing.do_bench) then fails with "Could not create or
locate cache dir" (seen on H200, runs 2-3 of scripts/bench_notes_moe.md). `jax_triton()` imports it
and puts the variable back as it was. Import it only on a GPU build of JAX: jax-triton refuses to
import on a CPU-only one.
"""
import os


def jax_triton():
    """The jax_triton module, with TRITON_CACHE_DIR as it was before its first import."""
    key = "TRITON_CACHE_DIR"
    before = os.environ.get(key)
    import jax_triton as jt
    if before is None:
        os.environ.pop(key, None)
    else:
        os.environ[key] = before
    return jt


def dot_precision(dtype, f32_dot: str) -> str:
    """The PRECISION constexpr of the Triton kernels: "" for 16-bit inputs (tensor-core products), or
    the tl.dot input_precision for float32 inputs: 'tf32x3' (float32-accurate), 'ieee' or 'tf32'."""
    import jax.numpy as jnp
    if dtype == jnp.float32:
        if f32_dot not in ("tf32x3", "ieee", "tf32"):
            raise ValueError(f"f32_dot must be 'tf32x3', 'ieee' or 'tf32', got {f32_dot!r}")
        return f32_dot
    return ""
