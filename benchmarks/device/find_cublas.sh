# Sourced by benchmarks/device/gemm/run.sh and kernel_bench/run.sh (after they set $nvcc): finds
# cuBLAS's headers (cublasLt.h) and libraries (libcublasLt.so.*) in $CUBLAS_INCLUDE / $CUBLAS_LIB,
# else in the nvidia-cublas wheel of the python3 on PATH (pip install nvidia-cublas), else next to
# nvcc. Sets $include, $lib, $lt and $blas (the library file names), or exits 2 saying what is missing.
candidates=$(python3 - <<'PY' 2>/dev/null || true
import site, sys
for base in [*site.getsitepackages(), site.getusersitepackages(), *sys.path]:
    for sub in ("nvidia/cu13", "nvidia/cublas", "nvidia/cu12"):
        print(f"{base}/{sub}")
PY
)
toolkit=$(cd "$(dirname "$(command -v "$nvcc")")/.." && pwd)
candidates="$candidates $toolkit $toolkit/targets/x86_64-linux"
include=${CUBLAS_INCLUDE:-}
lib=${CUBLAS_LIB:-}
for dir in $candidates; do
  [ -z "$include" ] && [ -f "$dir/include/cublasLt.h" ] && include=$dir/include
  if [ -z "$lib" ]; then
    for l in "$dir/lib" "$dir/lib64"; do
      ls "$l"/libcublasLt.so* > /dev/null 2>&1 && { lib=$l; break; }
    done
  fi
done
[ -n "$include" ] || { echo "$0: no cublasLt.h found: pip install nvidia-cublas, or set CUBLAS_INCLUDE" >&2; exit 2; }
[ -n "$lib" ] || { echo "$0: no libcublasLt.so found: pip install nvidia-cublas, or set CUBLAS_LIB" >&2; exit 2; }
lt=$(cd "$lib" && ls libcublasLt.so* | sort | tail -1)
blas=$(cd "$lib" && ls libcublas.so* | sort | tail -1)
