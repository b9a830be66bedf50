"""Import jax-triton without its side effect on the process.

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
