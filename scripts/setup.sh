#!/usr/bin/env bash
# Creates .venv (Python >= 3.10) and installs semvoc with the given extras, e.g. `export,dev`.
# torch is installed first at a pinned CPU-capable version ($SEMVOC_TORCH, default
# torch==2.13.0) so that the extras' `torch>=2.6` does not pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${1:-export}
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || { echo "semvoc needs Python >= 3.10 (found $("$python" --version))" >&2; exit 1; }
  "$python" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
if [[ "$extras" == *export* || "$extras" == *dev* ]] && ! python -c 'import torch' 2>/dev/null; then
  python -m pip install -q "${SEMVOC_TORCH:-torch==2.13.0}"
fi
python -m pip install -q -e ".[${extras}]"
