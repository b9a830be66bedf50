#!/usr/bin/env bash
# Create .venv (Python 3.12) and install lingjax with pinned dependencies; `--test` adds the test extras.
# --no-cache-dir: the test extras pull torch with ~3.5 GB of CUDA wheels (PyPI has no CPU torch for 3.12);
# caching them too doubled the disk the install needs, and CI once ran out of space.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  PY=""
  for cand in python3.12 "env PYENV_VERSION=3.12.1 python3.12"; do
    if $cand -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then PY="$cand"; break; fi
  done
  [ -n "$PY" ] || { echo "lingjax needs Python 3.12 (python3.12 not found)" >&2; exit 1; }
  $PY -m venv .venv
fi
target="."
[ "${1:-}" = "--test" ] && target=".[test]"
.venv/bin/python -m pip install -q --no-cache-dir --disable-pip-version-check -e "$target"
