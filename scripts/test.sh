#!/usr/bin/env bash
# Sets everything up (.venv with semvoc[dev]) and runs the test suite. Extra arguments go to
# pytest. Exit 5 from pytest (no test collected) is a failure here.
set -uo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh dev || exit 1  # dev includes cuda-kernels: CI compiles the CUDA ops
. .venv/bin/activate
ruff check src tests benchmarks || exit 1
python -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: treating as a failure" >&2
  exit 1
fi
exit "$rc"
