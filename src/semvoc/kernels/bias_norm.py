"""The vocoder decoder's input norm with the bias of the GEMM before it, channels-last, as ONE op.

``BiasNorm(x + input_bias)`` over the channels of ``[..., C]`` with fp32 statistics
(``semvoc.cuda::BiasNorm``, ``cuda/bias_norm.cu``): in onnxruntime's stock ops a bias Add, two
Casts and the fp32 chain Sub, Mul, ReduceMean, Pow, Mul, Mul. Exported only with
``semvoc-export --cuda-kernels``.
"""

from __future__ import annotations

import torch

from semvoc.kernels.norms import bias_norm
from semvoc.kernels.onnx_ops import CUDA_DOMAIN, contrib_op, register_translation


def bias_norm_reference(x: torch.Tensor, input_bias: torch.Tensor, norm_bias: torch.Tensor,
                        log_scale: torch.Tensor) -> torch.Tensor:
    """x ``[..., C]``; input_bias, norm_bias ``[C]``; log_scale one value."""
    y = (x.float() + input_bias.float())
    return bias_norm(y, norm_bias, log_scale, channels_last=True).to(x.dtype)


@torch.library.custom_op("semvoc::bias_norm", mutates_args=())
def bias_norm_op(x: torch.Tensor, input_bias: torch.Tensor, norm_bias: torch.Tensor,
                 log_scale: torch.Tensor) -> torch.Tensor:
    return bias_norm_reference(x, input_bias, norm_bias, log_scale)


@bias_norm_op.register_fake
def _(x, input_bias, norm_bias, log_scale):
    return torch.empty_like(x)


def _onnx(x, input_bias, norm_bias, log_scale):
    op = contrib_op("BiasNorm", ["x", "input_bias", "norm_bias", "log_scale"], ["y"], {}, domain=CUDA_DOMAIN)
    return op(x, input_bias, norm_bias, log_scale)


register_translation(torch.ops.semvoc.bias_norm.default, _onnx)
