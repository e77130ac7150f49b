"""``y + bias + x * scale`` per channel of channels-last ``[..., C]`` as ONE op (semvoc's CUDA kernel).

The ConvNeXt block's output: its bias-free 1x1 projection ``y`` (a GEMM), the projection bias
and the scaled residual ``x * scale`` (``semvoc.cuda::BiasResidual``, ``cuda/bias_residual.cu``)
in one pass instead of a bias kernel, a Mul and an Add. Exported only with
``semvoc-export --cuda-kernels``.
"""

from __future__ import annotations

import torch

from semvoc.kernels.onnx_ops import CUDA_DOMAIN, contrib_op, register_translation


def bias_residual_reference(y: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """y, x ``[..., C]``; bias, scale ``[C]``."""
    return y + bias + x * scale


@torch.library.custom_op("semvoc::bias_residual", mutates_args=())
def bias_residual(y: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return bias_residual_reference(y, bias, x, scale)


@bias_residual.register_fake
def _(y, bias, x, scale):
    return torch.empty_like(y)


def _onnx(y, bias, x, scale):
    return contrib_op("BiasResidual", ["y", "bias", "x", "scale"], ["out"], {}, domain=CUDA_DOMAIN)(y, bias, x, scale)


register_translation(torch.ops.semvoc.bias_residual.default, _onnx)
