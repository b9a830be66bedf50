"""lingjax.kernels.jax_triton_lib undoes jax-triton's TRITON_CACHE_DIR="" (which broke every other
Triton user in the process on the GPU). jax-triton cannot be imported on a CPU-only JAX, so a stand-in
module with the same import-time side effect is imported through the same function."""
import os
import sys

import pytest

from lingjax.kernels.jax_triton_lib import jax_triton


@pytest.fixture
def fake_jax_triton(tmp_path, monkeypatch):
    (tmp_path / "jax_triton.py").write_text('import os\nos.environ["TRITON_CACHE_DIR"] = ""\nMARK = 1\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "jax_triton", raising=False)
    yield
    sys.modules.pop("jax_triton", None)


@pytest.mark.parametrize("before", [None, "/tmp/my-triton-cache"])
def test_cache_dir_restored(fake_jax_triton, monkeypatch, before):
    if before is None:
        monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    else:
        monkeypatch.setenv("TRITON_CACHE_DIR", before)
    jt = jax_triton()
    assert jt.MARK == 1
    assert os.environ.get("TRITON_CACHE_DIR") == before
