"""Builds ``libsemvoc_cuda.so``: semvoc's onnxruntime custom ops for the CUDA execution provider.

The sources are in ``semvoc/kernels/cuda`` (one kernel per ``.cu`` file, every ``.cu`` file there is
compiled; ``library.cu`` registers the ops as the ``semvoc.cuda`` domain). Building needs only
``nvcc`` and the CUDA headers, which ``pip install 'semvoc[cuda-kernels]'`` brings (the
``nvidia-cuda-nvcc``, ``nvidia-cuda-runtime`` and ``nvidia-cuda-cccl`` wheels); a CUDA toolkit on
PATH, in ``$CUDA_HOME`` or ``$CUDA_PATH`` is used first when there is one. No GPU is needed to build.

onnxruntime's C API comes from ``cuda/ort_api.h``, the part of it the library calls (API version
13, so one build serves every onnxruntime from 1.13 on; the library refuses older ones when it is
loaded). ``--ort-include`` (or ``SEMVOC_ORT_INCLUDE``) builds against the official
``onnxruntime_c_api.h`` of an onnxruntime release's ``include/`` folder instead.

By default the library carries machine code for compute capabilities 8.0, 8.6, 8.9, 9.0, 10.0
and 12.0 (A100, A10/RTX 30, L4/L40/RTX 40, H100/H200, B200, RTX 50) and PTX for newer GPUs;
``--arch native`` builds for this machine's GPU only (faster to build).

    pip install '.[cuda-kernels]'
    python -m semvoc.kernels.cuda_build --out build/
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

CUDA_SOURCES_DIR = Path(__file__).with_name("cuda")
LIBRARY_NAME = "libsemvoc_cuda.so"
DOMAIN = "semvoc.cuda"
OPS = ("ConvNeXtMix", "BiasPRelu", "BiasResidual", "HeadNorm", "HeadNormRope", "HeadNormRopeQkv", "GatedSkipNorm",
       "BiasGeglu", "BiasNorm", "GatedConcatNorm", "BiasAddNorm", "LayerNorm", "CrossAttention", "QkvAttention",
       "LtGemm", "SplitMlp", "AudioFrames", "EulerOverlapAdd")
ORT_INCLUDE_ENV = "SEMVOC_ORT_INCLUDE"
DEFAULT_CUDA_ROOT = "/usr/local/cuda"
ORT_API_VERSION = 13  # what cuda/ort_op.h asks onnxruntime for (kOrtApiVersion)
# machine code for these compute capabilities, PTX of the last one for newer GPUs
DEFAULT_ARCHS = (80, 86, 89, 90, 100, 120)
DEFAULT_ARCH = ",".join(str(a) for a in DEFAULT_ARCHS)
PIP_HINT = "pip install 'semvoc[cuda-kernels]'"


def sources() -> list[Path]:
    """Every ``.cu`` file of ``semvoc/kernels/cuda``: a new kernel file is built without listing it."""
    return sorted(CUDA_SOURCES_DIR.glob("*.cu"))


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


# what the DiT ops are built for (cuda/head_norm.cu, cuda/gated_skip_norm.cu, cuda/skip_norm.cu)
HEAD_SIZES = (64, 128)
MAX_DIT_WIDTH = 1024


def dit_unsupported_reason(embed_dim: int, num_heads: int) -> str | None:
    """Why a fused DiT of this width cannot use the DiT's CUDA ops (``--cuda-kernels``) (None when it can)."""
    if embed_dim % num_heads or embed_dim // num_heads not in HEAD_SIZES:
        return f"attention heads of {embed_dim / num_heads:g} (HeadNorm handles {list(HEAD_SIZES)})"
    if embed_dim > MAX_DIT_WIDTH:
        return (f"a DiT width of {embed_dim} (GatedSkipNorm and the skip path's norms handle rows of up to "
                f"{MAX_DIT_WIDTH})")
    return None


class KernelBuildError(RuntimeError):
    """The CUDA op library cannot be built here; the message says what is missing."""


def _wheel_nvcc() -> list[Path]:
    """nvcc of the ``nvidia-cuda-nvcc`` wheel (``site-packages/nvidia/cu13/bin/nvcc``; the CUDA 12
    wheels used ``nvidia/cuda_nvcc/bin``). Its ``nvcc.profile`` points at the headers and static
    runtime of the ``nvidia-cuda-runtime`` and ``nvidia-cuda-cccl`` wheels, installed beside it."""
    spec = importlib.util.find_spec("nvidia")
    found: list[Path] = []
    for root in (spec.submodule_search_locations or []) if spec else []:
        found += sorted(Path(root).glob("cu[0-9]*/bin/nvcc"), reverse=True)  # newest CUDA first
        found += [p for p in [Path(root) / "cuda_nvcc" / "bin" / "nvcc"] if p.is_file()]
    return found


def find_nvcc() -> str:
    """A CUDA toolkit's nvcc (PATH, ``$CUDA_HOME``, ``$CUDA_PATH``), else the pip wheel's, else
    ``/usr/local/cuda``'s."""
    candidates = [shutil.which("nvcc")]
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if root:
            candidates.append(str(Path(root) / "bin" / "nvcc"))
    candidates += [str(p) for p in _wheel_nvcc()]
    candidates.append(str(Path(DEFAULT_CUDA_ROOT) / "bin" / "nvcc"))
    for path in candidates:
        if path and Path(path).is_file() and os.access(path, os.X_OK):
            return path
    raise KernelBuildError(f"nvcc (the CUDA compiler) was not found: {PIP_HINT} (nvcc and the CUDA headers "
                           "from PyPI), or put a CUDA toolkit's bin/ on PATH")


def nvcc_version(nvcc: str) -> str:
    result = subprocess.run([nvcc, "--version"], capture_output=True, text=True)
    match = re.search(r"release ([0-9.]+)", result.stdout)
    return match.group(1) if match else "unknown"


def nvcc_archs(nvcc: str) -> set[int]:
    """Compute capabilities this nvcc can generate machine code for (``--list-gpu-code``)."""
    result = subprocess.run([nvcc, "--list-gpu-code"], capture_output=True, text=True)
    return {int(m) for m in re.findall(r"^sm_(\d+)$", result.stdout, flags=re.M)}


def find_ort_include(explicit: str | Path | None = None) -> Path | None:
    """The official header's folder (``--ort-include`` or ``$SEMVOC_ORT_INCLUDE``), or None:
    then the library builds against its own declaration, ``cuda/ort_api.h``."""
    source = "--ort-include" if explicit else ORT_INCLUDE_ENV
    folder = explicit or os.environ.get(ORT_INCLUDE_ENV)
    if not folder:
        return None
    folder = Path(folder)
    if not (folder / "onnxruntime_c_api.h").is_file():
        raise KernelBuildError(f"{source} {folder} has no onnxruntime_c_api.h; pass the include/ folder "
                               f"of an onnxruntime release archive, or unset it to use semvoc's own declaration")
    return folder


def parse_arch(arch: str) -> list[int] | None:
    """``"80,86,8.9"`` -> [80, 86, 89]; ``"native"`` -> None (nvcc picks this machine's GPU)."""
    if arch == "native":
        return None
    caps = [a.strip().replace(".", "") for a in arch.split(",") if a.strip()]
    if not caps or not all(c.isdigit() for c in caps):
        raise KernelBuildError(f"--cuda-arch {arch!r}: give 'native' or compute capabilities like 80,90")
    return sorted({int(c) for c in caps})


def _arch_flags(caps: list[int] | None) -> list[str]:
    if caps is None:
        return ["-arch=native"]
    flags = [f"-gencode=arch=compute_{c},code=sm_{c}" for c in caps]
    return [*flags, f"-gencode=arch=compute_{caps[-1]},code=compute_{caps[-1]}"]  # PTX for newer GPUs


@dataclass
class BuiltLibrary:
    path: Path
    archs: list[int] | None  # compute capabilities with machine code (None: 'native', this machine's GPU)
    ptx: int | None  # PTX of this compute capability rides along (newer GPUs JIT-compile it)
    nvcc: str
    nvcc_version: str
    official_header: bool
    seconds: float

    def manifest_entry(self) -> dict:
        return {"archs": self.archs, "ptx": self.ptx, "nvcc": self.nvcc_version,
                "ort_api_version": ORT_API_VERSION, "official_ort_header": self.official_header}


def build(out_dir: str | Path, ort_include: str | Path | None = None, arch: str = DEFAULT_ARCH,
          verbose: bool = False) -> BuiltLibrary:
    """Compile the op library into ``out_dir/libsemvoc_cuda.so`` (written to a temporary name,
    then renamed)."""
    include = find_ort_include(ort_include)
    caps = parse_arch(arch)
    nvcc = find_nvcc()
    if caps is not None:
        known = nvcc_archs(nvcc)
        missing = [c for c in caps if known and c not in known]
        if missing and arch == DEFAULT_ARCH and len(missing) < len(caps):
            # an older toolkit (e.g. CUDA 12.0 has no sm_100/sm_120): the default list shrinks to what
            # it can build; the PTX of its newest architecture still runs on the newer GPUs
            caps = [c for c in caps if c not in missing]
            missing = []
        if missing:
            raise KernelBuildError(f"{nvcc} (CUDA {nvcc_version(nvcc)}) cannot build for compute capability "
                                   f"{', '.join(str(c) for c in missing)}: pass --cuda-arch with those it "
                                   f"supports ({', '.join(str(c) for c in sorted(known))}), or {PIP_HINT}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / LIBRARY_NAME
    partial = out_dir / f".{LIBRARY_NAME}.partial-{os.getpid()}"
    header = ["-DSEMVOC_OFFICIAL_ORT_HEADER", "-I", str(include)] if include else []
    # --threads 0: one nvcc job per architecture, on every core
    command = [nvcc, "-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", "--threads", "0", *_arch_flags(caps),
               *header, "-I", str(CUDA_SOURCES_DIR), *(str(s) for s in sources()), "-o", str(partial)]
    if verbose:
        print(" ".join(command), file=sys.stderr)
    started = time.time()
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        # nvcc reports some failures (a crashed sub-process, a full temp dir) on stdout, not stderr
        message = (result.stderr.strip() or result.stdout.strip() or "(no output)")[-4000:]
        raise KernelBuildError(f"nvcc failed (exit {result.returncode}):\n{message}")
    os.replace(partial, target)
    return BuiltLibrary(target, caps, caps[-1] if caps else None, nvcc, nvcc_version(nvcc), include is not None,
                        round(time.time() - started, 1))


def build_library(out_dir: str | Path, ort_include: str | Path | None = None, arch: str = DEFAULT_ARCH,
                  verbose: bool = False) -> Path:
    """:func:`build`, returning the library's path."""
    return build(out_dir, ort_include, arch, verbose).path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m semvoc.kernels.cuda_build", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help=f"folder for {LIBRARY_NAME}")
    parser.add_argument("--ort-include", type=Path, metavar="DIR",
                        help=f"build against this official onnxruntime_c_api.h (default: ${ORT_INCLUDE_ENV}, "
                             "else semvoc's own declaration of the API)")
    parser.add_argument("--arch", default=DEFAULT_ARCH,
                        help=f"compute capabilities, e.g. 80,90 (default {DEFAULT_ARCH}, + PTX of the last), "
                             "or 'native' (this machine's GPU)")
    parser.add_argument("--verbose", action="store_true", help="print the nvcc command")
    args = parser.parse_args(argv)
    try:
        built = build(args.out, args.ort_include, args.arch, args.verbose)
    except KernelBuildError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"built with {built.nvcc} (CUDA {built.nvcc_version}) in {built.seconds:.0f} s", file=sys.stderr)
    print(built.path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
