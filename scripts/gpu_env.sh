# Source on a GPU machine of the device tool (the CUDA image has jax, flax, torch and triton, not these):
# installs the wheels carried in .whl/ (jax-triton 0.3.1, and tokamax with what its import needs, for
# the MoE peer comparison) into /tmp/site and puts it and the repository on PYTHONPATH. tokamax imports
# xprof's kernel-stats tool at import time (only its benchmarking helpers use it): a stub stands in.
#   . scripts/gpu_env.sh
# .whl/ is git-ignored; fill it here (on the CPU machine) before the device call, with `carry: [".whl"]`:
#   .venv/bin/pip download --no-deps -d .whl jax-triton==0.3.1 fla-core==0.6.0 flash-linear-attention==0.6.0
#   .venv/bin/pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl tokamax==0.0.17 einshape qwix \
#     immutabledict pydantic==2.14.4 pydantic-core annotated-types typing-inspection typing_extensions==4.16.0
#   (for lingjax serve / bench_serve also: fastapi uvicorn starlette httpx httpcore h11 anyio sniffio
#    prometheus_client opentelemetry-api annotated-doc, whichever the image lacks: KINDS.md lists what it has)
if [ -n "${LINGJAX_GPU_ENV:-}" ]; then   # sourced before (a queue inside a device call): only the paths
  export PYTHONPATH=/tmp/site:$PWD; return 0
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "gpu_env: installing .whl/ failed" >&2; return 1; }
mkdir -p /tmp/site/xprof/cli
[ -f /tmp/site/xprof/cli/tools.py ] || {
  : > /tmp/site/xprof/__init__.py; : > /tmp/site/xprof/cli/__init__.py
  echo 'def get_kernel_stats_tool(*a, **k): raise NotImplementedError("xprof stub (scripts/gpu_env.sh)")' > /tmp/site/xprof/cli/tools.py
}
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv,noheader
export HOME=/tmp/home XDG_CACHE_HOME=/tmp/cache TRITON_CACHE_DIR=/tmp/cache/triton TORCHINDUCTOR_CACHE_DIR=/tmp/cache/inductor
mkdir -p $HOME $XDG_CACHE_HOME $TRITON_CACHE_DIR
export LINGJAX_GPU_ENV=1   # sourced: scripts that run inside another queue skip the install
