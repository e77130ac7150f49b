"""The DiT's U-Net skip path and its LayerNorms as semvoc CUDA ops (``cuda/skip_norm.cu``).

A skip block of the fused DiT (``fused_dit.FusedBlock``) first finishes the residual stream with
the previous block's pending MLP output, concatenates the U-Net skip, normalises over ``2D``
(``skip_norm``), projects back to ``D`` (``skip_linear``) and normalises again (``norm1``, the
adaLN modulation folded into its affine). In onnxruntime's stock ops that is a Mul, Adds, a
Concat, a LayerNormalization over ``2D``, the GEMM's bias Add and a LayerNormalization over
``D``: each a kernel and a pass over memory. Here the GEMM stays and the rest is two ops:

- ``GatedConcatNorm``: ``LayerNorm([x + out * gate + gbias, skip]) * gamma + beta`` over ``2D``
  (the sum rounded to the dtype first, as the graph held it; nothing else materialised);
- ``BiasAddNorm``: ``sum = y + bias``, ``h = LayerNorm(sum) * gamma + beta``, both outputs
  (``sum`` is the block's residual stream);
- ``LayerNorm``: the first block's plain ``norm1`` (``BiasAddNorm`` without bias or sum).

Four warps per row where the row (each half for ``GatedConcatNorm``) is at most 2 x 128 16-byte
vectors, else one warp per row; statistics in fp32 over the rounded values, one rounding of each
output.
Exported with ``semvoc-export --cuda-kernels``; ``SEMVOC_EXPORT_WITHOUT=GatedConcatNorm``
(``BiasAddNorm``, ``LayerNorm``) exports the stock form instead, for A/B measurements.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from onnx.defs import OpSchema

from semvoc.kernels.onnx_ops import CUDA_DOMAIN, contrib_op, register_translation

_EPS = {"epsilon": OpSchema.AttrType.FLOAT}


def gated_concat_norm_reference(x: torch.Tensor, out: torch.Tensor, gate: torch.Tensor, gbias: torch.Tensor,
                                skip: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
                                eps: float) -> torch.Tensor:
    """x, out, skip ``[..., D]``; gate, gbias ``[D]``; gamma, beta ``[2D]`` -> ``[..., 2D]`` in x's dtype."""
    total = (x.float() + out.float() * gate.float() + gbias.float()).to(x.dtype)
    joined = torch.cat([total.float(), skip.float()], dim=-1)
    return F.layer_norm(joined, joined.shape[-1:], gamma.float(), beta.float(), eps).to(x.dtype)


def bias_add_norm_reference(y: torch.Tensor, bias: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
                            eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """y ``[..., D]``; bias, gamma, beta ``[D]`` -> (h, sum), both in y's dtype."""
    total = (y.float() + bias.float()).to(y.dtype)
    h = F.layer_norm(total.float(), total.shape[-1:], gamma.float(), beta.float(), eps)
    return h.to(y.dtype), total


def layer_norm_reference(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float) -> torch.Tensor:
    """x ``[..., D]``; gamma, beta ``[D]`` -> ``[..., D]`` in x's dtype (fp32 statistics)."""
    return F.layer_norm(x.float(), x.shape[-1:], gamma.float(), beta.float(), eps).to(x.dtype)


@torch.library.custom_op("semvoc::gated_concat_norm", mutates_args=())
def gated_concat_norm(x: torch.Tensor, out: torch.Tensor, gate: torch.Tensor, gbias: torch.Tensor,
                      skip: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float) -> torch.Tensor:
    return gated_concat_norm_reference(x, out, gate, gbias, skip, gamma, beta, eps)


@gated_concat_norm.register_fake
def _(x, out, gate, gbias, skip, gamma, beta, eps):
    return x.new_empty((*x.shape[:-1], 2 * x.shape[-1]))


@torch.library.custom_op("semvoc::bias_add_norm", mutates_args=())
def bias_add_norm(y: torch.Tensor, bias: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
                  eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return bias_add_norm_reference(y, bias, gamma, beta, eps)


@bias_add_norm.register_fake
def _(y, bias, gamma, beta, eps):
    return torch.empty_like(y), torch.empty_like(y)


@torch.library.custom_op("semvoc::layer_norm", mutates_args=())
def layer_norm(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float) -> torch.Tensor:
    return layer_norm_reference(x, gamma, beta, eps)


@layer_norm.register_fake
def _(x, gamma, beta, eps):
    return torch.empty_like(x)


def _onnx_gated_concat_norm(x, out, gate, gbias, skip, gamma, beta, eps: float):
    op = contrib_op("GatedConcatNorm", ["x", "out", "gate", "gbias", "skip", "gamma", "beta"], ["h"], _EPS,
                    domain=CUDA_DOMAIN)
    return op(x, out, gate, gbias, skip, gamma, beta, epsilon=eps)


def _onnx_bias_add_norm(y, bias, gamma, beta, eps: float):
    op = contrib_op("BiasAddNorm", ["y", "bias", "gamma", "beta"], ["h", "sum"], _EPS, domain=CUDA_DOMAIN)
    return op(y, bias, gamma, beta, epsilon=eps)


def _onnx_layer_norm(x, gamma, beta, eps: float):
    op = contrib_op("LayerNorm", ["x", "gamma", "beta"], ["h"], _EPS, domain=CUDA_DOMAIN)
    return op(x, gamma, beta, epsilon=eps)


register_translation(torch.ops.semvoc.gated_concat_norm.default, _onnx_gated_concat_norm)
register_translation(torch.ops.semvoc.bias_add_norm.default, _onnx_bias_add_norm)
register_translation(torch.ops.semvoc.layer_norm.default, _onnx_layer_norm)
