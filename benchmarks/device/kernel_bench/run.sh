#!/usr/bin/env bash
# Builds and runs one standalone CUDA kernel micro-benchmark of this folder:
#   benchmarks/device/kernel_bench/run.sh <op> [arguments for the benchmark]
# compiles <op>_bench.cu with `nvcc -O3 -std=c++17 -arch=sm_${CUDA_ARCH:-90}` (the op library's
# sources, src/semvoc/kernels/cuda, on the include path) into a temporary folder and runs it.
# Needs a GPU and nvcc (PATH, or $NVCC); no onnxruntime. A bench marked "SEMVOC-BENCH-NEEDS: cublas"
# (ltgemm) is also built against cuBLAS, found as benchmarks/device/find_cublas.sh says
# ($CUBLAS_INCLUDE / $CUBLAS_LIB, or the nvidia-cublas wheel).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
op=${1:-}
if [ -z "$op" ] || [ ! -f "$here/${op}_bench.cu" ]; then
  benches=$(cd "$here" && ls ./*_bench.cu 2>/dev/null | sed 's|^\./||; s|_bench\.cu$||' | tr '\n' ' ')
  echo "usage: $0 <op> [args]: no $here/${op:-<op>}_bench.cu (benchmarks here: ${benches:-none})" >&2
  exit 2
fi
shift
nvcc=${NVCC:-nvcc}
command -v "$nvcc" > /dev/null || { echo "$0: nvcc not found: put a CUDA toolkit's bin/ on PATH or set NVCC" >&2; exit 2; }
arch=${CUDA_ARCH:-90}
arch=${arch#sm_}
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
extra=()
if grep -q "SEMVOC-BENCH-NEEDS: cublas" "$here/${op}_bench.cu"; then
  . "$here/../find_cublas.sh"
  echo "cuBLAS headers: $include; libraries: $lib ($lt, $blas)"
  extra=(-I "$include" -L "$lib" -l:"$lt" -l:"$blas" -Xlinker -rpath="$lib")
fi
"$nvcc" -O3 -std=c++17 -arch="sm_$arch" -I "$here/../../../src/semvoc/kernels/cuda" \
    -o "$build/${op}_bench" "$here/${op}_bench.cu" "${extra[@]}"
"$build/${op}_bench" "$@"
