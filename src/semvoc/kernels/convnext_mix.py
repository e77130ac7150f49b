"""The front half of the vocoder's ConvNeXt block as ONE op (semvoc's CUDA kernel), channels-last.

``out = (BiasNorm(depthwise_conv(x) + conv_bias) + cond_bias) * time_scale`` on ``[B, L, C]``
activations: in onnxruntime's stock ops this is ~12 kernels per block (cuDNN depthwise conv, its
separate bias kernel, the fp32 BiasNorm chain, the condition add and the time scale);
``semvoc.cuda::ConvNeXtMix`` (``cuda/convnext_mix.cu``) does it in one pass with fp32 statistics.
Exported only with ``semvoc-export --cuda-kernels`` (the op exists on the CUDA execution provider
alone), where the vocoder decoder runs channels-last (``ConvNeXtDecoder.forward_channels_last``).
With ``lead = H`` the output is ``[B, L, H + C]``, the block's values in the last C columns: the
first H are left for ``SplitMlp`` (``semvoc.kernels.split_mlp``) to write its hidden rows into
(zeros in the reference; not written by the CUDA kernel).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from onnx.defs import OpSchema

from semvoc.kernels.norms import bias_norm
from semvoc.kernels.onnx_ops import CUDA_DOMAIN, contrib_op, register_translation


def convnext_mix_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, norm_bias: torch.Tensor,
                           log_scale: torch.Tensor, cond_bias: torch.Tensor, time_scale: torch.Tensor,
                           layer: int = 0, lead: int = 0) -> torch.Tensor:
    """x ``[B, L, C]``, weight ``[C, 1, K]``, bias/norm_bias ``[C]``, log_scale ``[]``,
    cond_bias ``[B|1, L, C]``, time_scale ``[B|1, C]`` -> ``[B, L, lead + C]`` (``lead`` columns
    of zeros first). Tables: cond_bias ``[N, B|1, L, C]`` and time_scale ``[B|1, N, C]``, of which
    entry ``layer`` is used (the step graph passes a branch's tables whole instead of splitting
    them into N copies)."""
    if cond_bias.dim() == 4:
        cond_bias = cond_bias[layer]
    if time_scale.dim() == 3:
        time_scale = time_scale[:, layer]
    y = F.conv1d(x.transpose(1, 2), weight, bias, padding=weight.shape[-1] // 2, groups=x.shape[2])
    out = (bias_norm(y, norm_bias, log_scale).transpose(1, 2) + cond_bias) * time_scale[:, None, :]
    return F.pad(out, (lead, 0)) if lead else out


@torch.library.custom_op("semvoc::convnext_mix", mutates_args=())
def convnext_mix(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, norm_bias: torch.Tensor,
                 log_scale: torch.Tensor, cond_bias: torch.Tensor, time_scale: torch.Tensor,
                 layer: int = 0, lead: int = 0) -> torch.Tensor:
    return convnext_mix_reference(x, weight, bias, norm_bias, log_scale, cond_bias, time_scale, layer, lead)


@convnext_mix.register_fake
def _(x, weight, bias, norm_bias, log_scale, cond_bias, time_scale, layer=0, lead=0):
    return x.new_empty((*x.shape[:-1], lead + x.shape[-1]))


def _onnx(x, weight, bias, norm_bias, log_scale, cond_bias, time_scale, layer: int = 0, lead: int = 0):
    op = contrib_op("ConvNeXtMix", ["x", "weight", "bias", "norm_bias", "log_scale", "cond_bias", "time_scale"],
                    ["y"], {"layer": OpSchema.AttrType.INT, "lead": OpSchema.AttrType.INT}, domain=CUDA_DOMAIN)
    return op(x, weight, bias, norm_bias, log_scale, cond_bias, time_scale, layer=layer, lead=lead)


register_translation(torch.ops.semvoc.convnext_mix.default, _onnx)
