"""``prelu(y + bias)`` per channel of channels-last ``[..., C]`` as ONE op (semvoc's CUDA kernel).

The ConvNeXt block's 1x1 expansion runs as a bias-free GEMM; its bias joins the PReLU here
(``semvoc.cuda::BiasPRelu``, ``cuda/bias_prelu.cu``). Exported only with
``semvoc-export --cuda-kernels``.
"""

from __future__ import annotations

import torch

from semvoc.kernels.onnx_ops import CUDA_DOMAIN, contrib_op, register_translation


def bias_prelu_reference(y: torch.Tensor, bias: torch.Tensor, slope: torch.Tensor) -> torch.Tensor:
    """y ``[..., C]``, bias and slope ``[C]``."""
    v = y + bias
    return torch.where(v > 0, v, v * slope)


@torch.library.custom_op("semvoc::bias_prelu", mutates_args=())
def bias_prelu(y: torch.Tensor, bias: torch.Tensor, slope: torch.Tensor) -> torch.Tensor:
    return bias_prelu_reference(y, bias, slope)


@bias_prelu.register_fake
def _(y, bias, slope):
    return torch.empty_like(y)


def _onnx(y, bias, slope):
    return contrib_op("BiasPRelu", ["y", "bias", "slope"], ["out"], {}, domain=CUDA_DOMAIN)(y, bias, slope)


register_translation(torch.ops.semvoc.bias_prelu.default, _onnx)
