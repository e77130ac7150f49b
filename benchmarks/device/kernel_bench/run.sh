#!/usr/bin/env bash
# Builds and runs one kernel micro-benchmark, benchmarks/device/kernel_bench/<op>_bench.cu:
#   benchmarks/device/kernel_bench/run.sh <op> [arguments for the bench]
# compiled with nvcc -O3 -std=c++17 -arch=sm_$CUDA_ARCH (default 90) into a temporary folder, with
# semvoc's kernel sources (src/semvoc/kernels/cuda) on the include path, so the bench times the
# library's own kernels. NVCC names another compiler.
set -euo pipefail
op=${1:?usage: run.sh <op> [arguments for the bench]}
shift
here=$(cd "$(dirname "$0")" && pwd)
src="$here/${op}_bench.cu"
if [ ! -f "$src" ]; then
  echo "run.sh: no bench $src; benches here: $(cd "$here" && ls -- *_bench.cu 2>/dev/null | sed 's/_bench\.cu$//' | tr '\n' ' ')" >&2
  exit 2
fi
root=$(cd "$here/../../.." && pwd)
arch=${CUDA_ARCH:-90}
arch=${arch#sm_}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"${NVCC:-nvcc}" -O3 -std=c++17 -arch="sm_${arch}" -I"$root/src/semvoc/kernels/cuda" -o "$tmp/${op}_bench" "$src"
"$tmp/${op}_bench" "$@"
