"""The CUDA kernel micro-benchmarks (benchmarks/device/kernel_bench) compile here, with the library's
kernel sources on the include path, so a kernel change that breaks a bench fails before a GPU run."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from semvoc.kernels import cuda_build

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks" / "device" / "kernel_bench"
ALL_BENCHES = sorted(BENCH_DIR.glob("*_bench.cu"))
# Benches built against cuBLAS (ltgemm: its baseline is cublasGemmEx) need cuBLAS headers, which
# CI does not have: they are left out of the compile check. The op library they include builds
# without them (tests/test_cuda_build.py).
BENCHES = [b for b in ALL_BENCHES if "SEMVOC-BENCH-NEEDS: cublas" not in b.read_text()]


def test_run_sh_names_the_benches_for_an_unknown_op():
    result = subprocess.run(["bash", str(BENCH_DIR / "run.sh"), "no_such_op"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "no_such_op_bench.cu" in result.stderr
    assert all(b.name.removesuffix("_bench.cu") in result.stderr for b in ALL_BENCHES)


@pytest.mark.parametrize("bench", BENCHES, ids=[b.stem for b in BENCHES])
def test_bench_compiles(bench, tmp_path):
    try:
        nvcc = cuda_build.find_nvcc()
    except cuda_build.KernelBuildError as err:
        pytest.skip(str(err))
    # PTX only (no ptxas pass): the host code and the kernels' templates are checked, in seconds
    result = subprocess.run([nvcc, "-std=c++17", "-c", "-arch=compute_80", "-I", str(cuda_build.CUDA_SOURCES_DIR),
                             str(bench), "-o", str(tmp_path / "bench.o")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "warning" not in result.stderr.lower(), result.stderr[-3000:]


GEMM_BENCHES = sorted((BENCH_DIR.parent / "gemm").glob("*.cu"))
CUBLAS_BENCHES = [b for b in ALL_BENCHES if b not in BENCHES] + GEMM_BENCHES


@pytest.mark.parametrize("bench", CUBLAS_BENCHES, ids=[b.stem for b in CUBLAS_BENCHES])
def test_cublas_bench_compiles(bench, tmp_path):
    """The benches built against cuBLAS compile too, where its headers are here (they are not on CI)."""
    from tests.test_cuda_build import cublas_include_and_nvcc

    include, nvcc = cublas_include_and_nvcc()
    result = subprocess.run([nvcc, "-std=c++17", "-c", "-arch=compute_90", "-I", str(include), "-I",
                             str(cuda_build.CUDA_SOURCES_DIR), str(bench), "-o", str(tmp_path / "bench.o")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "warning" not in result.stderr.lower(), result.stderr[-3000:]


def test_gemm_run_sh_refuses_an_unknown_bench():
    result = subprocess.run(["bash", str(BENCH_DIR.parent / "gemm" / "run.sh"), "no_such_bench"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "no_such_bench.cu" in result.stderr and "fp8_bench" in result.stderr
