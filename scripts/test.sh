#!/usr/bin/env bash
# Set up from nothing and run the tests: .venv with lingjax + test extras (scripts/setup.sh), then pytest
# on the CPU with 8 simulated devices for the sharding tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
export XLA_FLAGS="${XLA_FLAGS:---xla_force_host_platform_device_count=8}"
exec .venv/bin/python -m pytest "$@"
