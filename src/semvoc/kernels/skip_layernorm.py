"""Residual add + LayerNorm in one op: onnxruntime's ``SkipLayerNormalization``.

``sum = x + skip + bias``; ``out = LayerNorm(sum) * weight + beta`` (statistics in fp32).
Returns ``(out, sum)``: the DiT keeps the residual stream (``sum``) and feeds ``out`` to the
next sub-layer, so one kernel replaces an Add and a LayerNormalization (on an H100, in the
reference DiT step: 2.6 us per SkipLayerNormalization call, against ~2 us per Add plus 6-12 us
per LayerNormalization call; ``benchmarks/results/h100-2026-11-25b-raw/ref16_kernels_b1.json``).
``bias`` is one vector ``[D]``: the DiT passes its gated projection bias there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from onnx.defs import OpSchema

from semvoc.kernels.onnx_ops import contrib_op, register_translation


def skip_layer_norm_reference(x: torch.Tensor, skip: torch.Tensor, weight: torch.Tensor, beta: torch.Tensor,
                              bias: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    total = x + skip + bias
    return F.layer_norm(total, (total.shape[-1],), weight, beta, eps), total


@torch.library.custom_op("semvoc::skip_layer_norm", mutates_args=())
def skip_layer_norm(x: torch.Tensor, skip: torch.Tensor, weight: torch.Tensor, beta: torch.Tensor,
                    bias: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x, skip ``[B, L, D]``; weight, beta, bias ``[D]`` -> (normed, x + skip + bias)."""
    out, total = skip_layer_norm_reference(x, skip, weight, beta, bias, eps)
    return out, total.clone()


@skip_layer_norm.register_fake
def _(x, skip, weight, beta, bias, eps):
    return torch.empty_like(x), torch.empty_like(x)


def _onnx(x, skip, weight, beta, bias, eps: float):
    op = contrib_op("SkipLayerNormalization", ["input", "skip", "gamma", "beta?", "bias?"],
                    ["output", "mean?", "inv_std_var?", "input_skip_bias_sum?"],
                    {"epsilon": OpSchema.AttrType.FLOAT})
    out, _mean, _inv_std, total = op(x, skip, weight, beta, bias, epsilon=eps)
    return out, total


register_translation(torch.ops.semvoc.skip_layer_norm.default, _onnx)
