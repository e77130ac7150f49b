"""``gelu(x + bias)`` (exact, erf) in one op: onnxruntime's ``BiasGelu``.

The DiT's GEGLU gate runs its projection without bias and adds it here, so the projection
is a plain MatMul and the bias costs no extra pass over the activations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from semvoc.kernels.onnx_ops import contrib_op, register_translation


def bias_gelu_reference(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return F.gelu(x + bias)


@torch.library.custom_op("semvoc::bias_gelu", mutates_args=())
def bias_gelu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x ``[..., N]``, bias ``[N]``."""
    return bias_gelu_reference(x, bias)


@bias_gelu.register_fake
def _(x, bias):
    return torch.empty_like(x)


def _onnx(x, bias):
    return contrib_op("BiasGelu", ["A", "B"], ["C"], {})(x, bias)


register_translation(torch.ops.semvoc.bias_gelu.default, _onnx)
