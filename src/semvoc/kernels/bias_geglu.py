"""GEGLU after one bias-free GEMM as ONE op (semvoc's CUDA kernel).

``u = h @ [W_value; W_gate]^T`` (one GEMM of width ``2F``), then
``out = (u[..., :F] + b_value) * gelu(u[..., F:] + b_gate)`` (exact, erf GELU).
With onnxruntime's stock ops the DiT's feed-forward runs two GEMMs (the value's with a
bias-broadcast kernel), ``BiasGelu`` and a Mul; ``semvoc.cuda::BiasGeglu``
(``cuda/bias_geglu.cu``) reads both halves in place. Arithmetic in fp32, one rounding.
Exported with ``semvoc-export --cuda-kernels``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from semvoc.kernels.onnx_ops import CUDA_DOMAIN, contrib_op, register_translation


def bias_geglu_reference(u: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """u ``[..., 2F]`` (value half, gate half), bias ``[2F]`` -> ``[..., F]`` in u's dtype."""
    value, gate = (u.float() + bias.float()).chunk(2, dim=-1)
    return (value * F.gelu(gate)).to(u.dtype)


@torch.library.custom_op("semvoc::bias_geglu", mutates_args=())
def bias_geglu(u: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return bias_geglu_reference(u, bias)


@bias_geglu.register_fake
def _(u, bias):
    return u.new_empty((*u.shape[:-1], u.shape[-1] // 2))


def _onnx(u, bias):
    return contrib_op("BiasGeglu", ["u", "bias"], ["out"], {}, domain=CUDA_DOMAIN)(u, bias)


register_translation(torch.ops.semvoc.bias_geglu.default, _onnx)
