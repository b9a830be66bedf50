"""Shared by the tests that run Triton kernel bodies on the CPU: Triton reads TRITON_INTERPRET when it is
imported, so each such test module runs its kernel cases in a child Python started with it set (the test
module's own `__main__` block), and the parent compares the child's results with a float64 oracle."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_child(script, *args, **env):
    """Run `python script *args` from the repository root with TRITON_INTERPRET=1, the repository on
    PYTHONPATH and `env` added; assert it exits 0 (its stderr's tail is the failure message). -> its stdout."""
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **env)
    p = subprocess.run([sys.executable, str(script), *map(str, args)], env=env, capture_output=True, text=True,
                       timeout=600, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout
