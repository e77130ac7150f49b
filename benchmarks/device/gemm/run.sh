#!/usr/bin/env bash
# Builds and runs one GEMM bench of this folder against cuBLAS:
#   benchmarks/device/gemm/run.sh [gemm_bench|fp8_bench|branch_streams_bench|algo_search_bench|pdl_bench] [arguments]
# gemm_bench (the default): the step graphs' GEMM shapes through cublasGemmEx (onnxruntime's
# MatMul) and through cuBLASLt (heuristic and searched algorithms, bias and residual epilogues).
# fp8_bench: the DiT block's GEMMs in fp16 and in FP8 (E4M3), Hopper or newer.
# branch_streams_bench: the vocoder step's GEMMs, its three branches one after another or side by side.
# algo_search_bench: the batch-1 GEMM shapes, timed from CUDA graphs, over a wide cuBLASLt algorithm search.
# pdl_bench: a GEMM and a row-norm kernel in turn, with and without programmatic dependent launch.
# Needs a GPU, nvcc (PATH or $NVCC) and cuBLAS 12 or 13: its headers (cublasLt.h) and libraries
# (libcublasLt.so.*), found in $CUBLAS_INCLUDE / $CUBLAS_LIB, else in the nvidia-cublas wheel of
# the python3 on PATH (pip install nvidia-cublas), else next to nvcc.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bench=${1:-gemm_bench}
[ $# -gt 0 ] && shift
bench=${bench%.cu}
[ -f "$here/$bench.cu" ] || { echo "$0: no $here/$bench.cu (benches here: gemm_bench, fp8_bench, branch_streams_bench, algo_search_bench, pdl_bench)" >&2; exit 2; }
nvcc=${NVCC:-nvcc}
command -v "$nvcc" > /dev/null || { echo "$0: nvcc not found: put a CUDA toolkit's bin/ on PATH or set NVCC" >&2; exit 2; }
. "$here/../find_cublas.sh"
arch=${CUDA_ARCH:-90}
arch=${arch#sm_}
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
echo "cuBLAS headers: $include; libraries: $lib ($lt, $blas)"
"$nvcc" -O3 -std=c++17 -arch="sm_$arch" -I "$include" -o "$build/$bench" "$here/$bench.cu" \
    -L "$lib" -l:"$lt" -l:"$blas" -Xlinker -rpath="$lib"
"$build/$bench" "$@"
