"""The torch-free runtime: engine directories, backends, samplers, audio, ``semvoc-run``.

Imports numpy, onnxruntime and tokenizers only (tensorrt and cuda-python where present);
never torch.
"""

from __future__ import annotations

__all__ = ["Pipeline"]


def __getattr__(name: str):
    if name == "Pipeline":
        from semvoc.runtime.pipeline import Pipeline

        return Pipeline
    raise AttributeError(name)
