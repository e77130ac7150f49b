#!/usr/bin/env bash
# Builds and runs gemm_bench.cu: the step graphs' GEMM shapes through cublasGemmEx (onnxruntime's
# MatMul) and through cuBLASLt (heuristic and searched algorithms, bias and residual epilogues).
#   benchmarks/device/gemm/run.sh
# Needs a GPU, nvcc (PATH or $NVCC) and cuBLAS 12 or 13: its headers (cublasLt.h) and libraries
# (libcublasLt.so.*), found in $CUBLAS_INCLUDE / $CUBLAS_LIB, else in the nvidia-cublas wheel of
# the python3 on PATH (pip install nvidia-cublas), else next to nvcc.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
nvcc=${NVCC:-nvcc}
command -v "$nvcc" > /dev/null || { echo "$0: nvcc not found: put a CUDA toolkit's bin/ on PATH or set NVCC" >&2; exit 2; }
. "$here/../find_cublas.sh"
arch=${CUDA_ARCH:-90}
arch=${arch#sm_}
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
echo "cuBLAS headers: $include; libraries: $lib ($lt, $blas)"
"$nvcc" -O3 -std=c++17 -arch="sm_$arch" -I "$include" -o "$build/gemm_bench" "$here/gemm_bench.cu" \
    -L "$lib" -l:"$lt" -l:"$blas" -Xlinker -rpath="$lib"
"$build/gemm_bench" "$@"
