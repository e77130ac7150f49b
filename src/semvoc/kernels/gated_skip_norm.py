"""The DiT's gated residual + the next LayerNorm as ONE op (semvoc's CUDA kernel).

``sum = x + y * gate + bias``; ``h = LayerNorm(sum) * gamma + beta``. Returns ``(h, sum)``: the
block keeps ``sum`` as its residual stream and feeds ``h`` to the next sub-layer. ``gate`` and
``bias`` are the step's ``1 - gate`` row and the gated projection bias; ``gamma``/``beta`` the
norm's affine, with the next adaLN modulation folded in where there is one (``fused_dit``).
onnxruntime's stock ops need a Mul and a ``SkipLayerNormalization`` for this;
``semvoc.cuda::GatedSkipNorm`` (``cuda/gated_skip_norm.cu``) is one block of 128 threads per row
of at most 128 16-byte vectors (the DiT's width in fp16), else one warp per row, statistics in fp32
over the rounded sum. Exported with ``semvoc-export --cuda-kernels``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from onnx.defs import OpSchema

from semvoc.kernels.onnx_ops import CUDA_DOMAIN, contrib_op, register_translation


def gated_skip_norm_reference(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, bias: torch.Tensor,
                              gamma: torch.Tensor, beta: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x, y ``[..., D]``; gate, bias, gamma, beta ``[D]`` -> (h, sum), both in x's dtype."""
    total = (x.float() + y.float() * gate.float() + bias.float()).to(x.dtype)
    h = F.layer_norm(total.float(), total.shape[-1:], gamma.float(), beta.float(), eps)
    return h.to(x.dtype), total


@torch.library.custom_op("semvoc::gated_skip_norm", mutates_args=())
def gated_skip_norm(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, bias: torch.Tensor, gamma: torch.Tensor,
                    beta: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return gated_skip_norm_reference(x, y, gate, bias, gamma, beta, eps)


@gated_skip_norm.register_fake
def _(x, y, gate, bias, gamma, beta, eps):
    return torch.empty_like(x), torch.empty_like(x)


def _onnx(x, y, gate, bias, gamma, beta, eps: float):
    op = contrib_op("GatedSkipNorm", ["x", "y", "gate", "bias", "gamma", "beta"], ["h", "sum"],
                    {"epsilon": OpSchema.AttrType.FLOAT}, domain=CUDA_DOMAIN)
    return op(x, y, gate, bias, gamma, beta, epsilon=eps)


register_translation(torch.ops.semvoc.gated_skip_norm.default, _onnx)
