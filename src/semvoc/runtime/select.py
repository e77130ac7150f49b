"""Backend choice: ``auto`` picks onnxruntime CUDA when a GPU answers, else the CPU.

TensorRT is used only when asked for (``--backend tensorrt``): that path is unverified.
"""

from __future__ import annotations

from semvoc.runtime.backends.base import Backend, BackendUnavailable
from semvoc.runtime.backends.ort_common import cuda_available
from semvoc.runtime.manifest import Manifest

BACKENDS = ("auto", "onnxruntime-cpu", "onnxruntime-cuda", "tensorrt")


def auto_backend() -> str:
    return "onnxruntime-cuda" if cuda_available() else "onnxruntime-cpu"


def make_backend(name: str, manifest: Manifest, *, device_id: int = 0, threads: int | None = None) -> Backend:
    if name not in BACKENDS:
        raise BackendUnavailable(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
    if name == "auto":
        name = auto_backend()
    if manifest.custom_ops_library is not None and name != "onnxruntime-cuda":
        raise BackendUnavailable(
            f"this engine was exported with --cuda-kernels: its vocoder graphs use semvoc's CUDA ops, which "
            f"only onnxruntime-cuda runs (asked for {name}). Run it on a GPU with --backend onnxruntime-cuda, "
            "or re-export without --cuda-kernels for CPU or TensorRT.")
    if name == "onnxruntime-cpu":
        from semvoc.runtime.backends.ort_cpu import OrtCpuBackend

        return OrtCpuBackend(manifest, threads=threads)
    if name == "onnxruntime-cuda":
        if not cuda_available():
            raise BackendUnavailable(
                "onnxruntime-cuda is not available here: onnxruntime has no CUDA provider or no GPU "
                "answers (install onnxruntime-gpu in place of onnxruntime on a machine with an NVIDIA "
                f"GPU). --backend auto would pick {auto_backend()}.")
        from semvoc.runtime.backends.ort_cuda import OrtCudaBackend
        from semvoc.runtime.gpu import kernel_arch_problem

        problem = kernel_arch_problem(manifest.data, device_id)
        if problem:
            raise BackendUnavailable(problem)
        return OrtCudaBackend(manifest, device_id=device_id)
    from semvoc.runtime.backends.tensorrt import TensorRTBackend, tensorrt_available

    reason = tensorrt_available(manifest)
    if reason:
        raise BackendUnavailable(f"tensorrt is not available: {reason}. --backend auto would pick "
                                 f"{auto_backend()}.")
    return TensorRTBackend(manifest, device_id=device_id)
