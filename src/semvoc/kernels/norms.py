"""Norms whose statistics stay in float32 under fp16 (a known overflow site).

- ``RMSNorm`` (the official DiT ``RMSNorm``): ``x * rsqrt(mean(x^2) + eps) * weight``,
  statistics in float32, eps 1e-6.
- ``BiasNorm`` (the official Flow2GAN / Zipformer BiasNorm, inference form):
  ``x * mean_c((x - bias)^2) ** -0.5 * exp(log_scale)`` over dim 1, no epsilon and no centring
  of the output. In fp16, ``(x - bias)^2`` overflows past |x| ~ 256, so it is computed in
  float32 and only the product goes back to the input dtype.
"""

from __future__ import annotations

import torch


class RMSNorm(torch.nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class BiasNorm(torch.nn.Module):
    """BiasNorm over the channel axis (dim 1) of ``[B, C, T]``; keys ``bias``, ``log_scale``."""

    def __init__(self, num_channels: int):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(num_channels))
        self.log_scale = torch.nn.Parameter(torch.tensor(1.0))

    #: export form: the channel mean as a ``[1, C] @ [B, C, T]`` product. onnxruntime's CUDA
    #: ReduceMean over the channel axis of ``[B, C, T]`` is a strided cuDNN reduction (31 us per
    #: call at the reference vocoder's shapes on an H100, 10x the GEMV); same value, other kernel.
    mean_by_matmul: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return bias_norm(x, self.bias, self.log_scale, self.mean_by_matmul)


def bias_norm(x: torch.Tensor, bias: torch.Tensor, log_scale: torch.Tensor,
              mean_by_matmul: bool = False, channels_last: bool = False) -> torch.Tensor:
    """``BiasNorm`` as a function: x ``[B, C, T]`` (``channels_last``: ``[B, T, C]``, the mean a
    contiguous last-axis reduction), bias ``[C]``, log_scale one value."""
    x32 = x.float()
    if channels_last:
        centred = x32 - bias.float()
        scales = (centred * centred).mean(dim=-1, keepdim=True).pow(-0.5) * log_scale.float().exp()
        return (x32 * scales).to(x.dtype)
    centred = x32 - bias.float()[None, :, None]
    if mean_by_matmul:
        channels = x.shape[1]
        mean = torch.matmul(torch.full((1, channels), 1.0 / channels, device=x.device), centred.pow(2))
    else:
        mean = centred.pow(2).mean(dim=1, keepdim=True)
    scales = mean.pow(-0.5) * log_scale.float().exp()
    return (x32 * scales).to(x.dtype)
