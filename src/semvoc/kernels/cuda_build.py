"""Builds ``libsemvoc_cuda.so``: semvoc's onnxruntime custom ops for the CUDA execution provider.

The sources are in ``semvoc/kernels/cuda`` (one kernel per ``.cu`` file, ``library.cu`` registers
them as the ``semvoc.cuda`` domain). Building needs ``nvcc`` and onnxruntime's C API header
``onnxruntime_c_api.h``, which the Python wheels do not ship: take the ``include/`` folder of the
onnxruntime release archive that matches your onnxruntime-gpu (for example
``onnxruntime-linux-x64-gpu-1.31.1.tgz`` from github.com/microsoft/onnxruntime/releases) and pass
it as ``--ort-include`` or ``SEMVOC_ORT_INCLUDE``. The library uses the C API of version 13 only,
so one build serves every onnxruntime from 1.13 on.

    python -m semvoc.kernels.cuda_build --out build/ --ort-include onnxruntime-linux-x64-gpu-1.31.1/include
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

CUDA_SOURCES_DIR = Path(__file__).with_name("cuda")
SOURCES = ("library.cu", "convnext_mix.cu", "bias_prelu.cu", "bias_residual.cu", "head_norm.cu",
           "gated_skip_norm.cu", "bias_geglu.cu", "bias_norm.cu")
LIBRARY_NAME = "libsemvoc_cuda.so"
DOMAIN = "semvoc.cuda"
OPS = ("ConvNeXtMix", "BiasPRelu", "BiasResidual", "HeadNorm", "HeadNormRope", "GatedSkipNorm", "BiasGeglu", "BiasNorm")
ORT_INCLUDE_ENV = "SEMVOC_ORT_INCLUDE"
DEFAULT_CUDA_ROOT = "/usr/local/cuda"


# what the kernels are built for (cuda/convnext_mix.cu): channels per branch, depthwise kernel sizes
MAX_CHANNELS = 1024
KERNEL_SIZES = (3, 5, 7, 9)


def unsupported_reason(channels: tuple[int, ...], kernel_sizes: tuple[int, ...]) -> str | None:
    """Why a vocoder of these branch widths and depthwise kernel sizes cannot use the CUDA ops
    (None when it can)."""
    if max(channels) > MAX_CHANNELS:
        return f"vocoder branches of {max(channels)} channels (ConvNeXtMix handles up to {MAX_CHANNELS})"
    odd = sorted(set(kernel_sizes) - set(KERNEL_SIZES))
    if odd:
        return f"depthwise kernel size(s) {odd} (ConvNeXtMix is built for {list(KERNEL_SIZES)})"
    return None


# what the DiT ops are built for (cuda/head_norm.cu, cuda/gated_skip_norm.cu)
HEAD_SIZES = (64, 128)
MAX_DIT_WIDTH = 1024


def dit_unsupported_reason(embed_dim: int, num_heads: int) -> str | None:
    """Why a fused DiT of this width cannot use the DiT's CUDA ops (``--cuda-kernels``) (None when it can)."""
    if embed_dim % num_heads or embed_dim // num_heads not in HEAD_SIZES:
        return f"attention heads of {embed_dim / num_heads:g} (HeadNorm handles {list(HEAD_SIZES)})"
    if embed_dim > MAX_DIT_WIDTH:
        return f"a DiT width of {embed_dim} (GatedSkipNorm handles up to {MAX_DIT_WIDTH})"
    return None


class KernelBuildError(RuntimeError):
    """The CUDA op library cannot be built here; the message says what is missing."""


def find_nvcc() -> str:
    candidates = [shutil.which("nvcc")]
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), DEFAULT_CUDA_ROOT):
        if root:
            candidates.append(str(Path(root) / "bin" / "nvcc"))
    for path in candidates:
        if path and Path(path).is_file():
            return path
    raise KernelBuildError("nvcc (the CUDA compiler) was not found on PATH, in $CUDA_HOME/bin or "
                           "/usr/local/cuda/bin: install the CUDA toolkit, or export without --cuda-kernels")


def find_ort_include(explicit: str | Path | None = None) -> Path:
    source = "--ort-include" if explicit else ORT_INCLUDE_ENV
    folder = explicit or os.environ.get(ORT_INCLUDE_ENV)
    if not folder:
        raise KernelBuildError(
            "building the CUDA kernels needs onnxruntime's C API header (onnxruntime_c_api.h), which the "
            "onnxruntime-gpu wheel does not include: download the onnxruntime release archive of your "
            "version (github.com/microsoft/onnxruntime/releases, onnxruntime-linux-x64-gpu-<version>.tgz) "
            f"and pass its include/ folder with --ort-include or {ORT_INCLUDE_ENV}")
    folder = Path(folder)
    if not (folder / "onnxruntime_c_api.h").is_file():
        raise KernelBuildError(f"{source} {folder} has no onnxruntime_c_api.h; pass the include/ folder "
                               "of the onnxruntime release archive")
    return folder


def _arch_flags(arch: str) -> list[str]:
    if arch == "native":
        return ["-arch=native"]
    caps = [a.strip().replace(".", "") for a in arch.split(",") if a.strip()]
    if not caps or not all(c.isdigit() for c in caps):
        raise KernelBuildError(f"--cuda-arch {arch!r}: give 'native' or compute capabilities like 80,90")
    flags = [f"-gencode=arch=compute_{c},code=sm_{c}" for c in caps]
    return [*flags, f"-gencode=arch=compute_{caps[-1]},code=compute_{caps[-1]}"]  # PTX for newer GPUs


def build_library(out_dir: str | Path, ort_include: str | Path | None = None, arch: str = "native",
                  verbose: bool = False) -> Path:
    """Compile the op library into ``out_dir/libsemvoc_cuda.so`` (written to a temporary name,
    then renamed) and return its path."""
    include = find_ort_include(ort_include)
    nvcc = find_nvcc()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / LIBRARY_NAME
    partial = out_dir / f".{LIBRARY_NAME}.partial-{os.getpid()}"
    command = [nvcc, "-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", *_arch_flags(arch),
               "-I", str(include), "-I", str(CUDA_SOURCES_DIR),
               *(str(CUDA_SOURCES_DIR / s) for s in SOURCES), "-o", str(partial)]
    if verbose:
        print(" ".join(command), file=sys.stderr)
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        raise KernelBuildError(f"nvcc failed (exit {result.returncode}):\n{result.stderr[-4000:]}")
    os.replace(partial, target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m semvoc.kernels.cuda_build", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help=f"folder for {LIBRARY_NAME}")
    parser.add_argument("--ort-include", type=Path, metavar="DIR",
                        help=f"onnxruntime's include/ folder (default: ${ORT_INCLUDE_ENV})")
    parser.add_argument("--arch", default="native",
                        help="'native' (this machine's GPU, default) or compute capabilities, e.g. 80,86,89,90")
    parser.add_argument("--verbose", action="store_true", help="print the nvcc command")
    args = parser.parse_args(argv)
    try:
        path = build_library(args.out, args.ort_include, args.arch, args.verbose)
    except KernelBuildError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
