"""1-D convolutions of the text-to-audio graphs as GEMMs on channels-last tensors.

The convolutions of a text-to-audio request are small (the DiT's patch embedding and final
3-tap convolution, the vocoder's condition encoder and condition MLPs, all at the latent rate of
25 frames per second), but a graph holding one makes onnxruntime call cuDNN, whose first run of a
convolution in a process costs about a second on an H200 (measured in the cold start of the
reference engine: the warm-up run of vocoder_prepare, the graph with most of them, took 1.3-1.45 s
against 0.05-0.25 s for the graphs without). As GEMMs over the K shifted copies of the input
they run on cuBLAS, like everything else, with the same function.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def conv1d_channels_last(x: torch.Tensor, conv: nn.Conv1d, linear: Callable = F.linear) -> torch.Tensor:
    """``conv(x.transpose(1, 2)).transpose(1, 2)`` for x ``[B, T, C_in]``, as one GEMM over the
    kernel's taps: ``[B, T', K C_in] @ [K C_in, C_out]`` (``linear(taps, weight, bias)``, e.g. a
    GEMM with the bias in its epilogue). Covers ``groups=1``, dilation 1, zero padding, with
    stride 1 or stride = kernel size (a patch embedding)."""
    (k,), (stride,), (pad,) = conv.kernel_size, conv.stride, conv.padding
    if conv.groups != 1 or conv.dilation != (1,) or conv.padding_mode != "zeros" or stride not in (1, k):
        raise ValueError(f"conv1d_channels_last covers groups=1 convolutions with stride 1 or {k}: got {conv}")
    weight = conv.weight.permute(0, 2, 1).reshape(conv.out_channels, k * conv.in_channels)  # [C_out, K C_in]
    if k == 1:
        return linear(x[:, ::stride] if stride > 1 else x, weight, conv.bias)
    if pad:
        x = F.pad(x, (0, 0, pad, pad))  # [B, T + 2 pad, C_in]
    frames = (x.shape[1] - k) // stride + 1
    if stride == k:  # non-overlapping patches: a reshape, no copies of the input
        taps = x[:, : frames * k].reshape(x.shape[0], frames, k * x.shape[2])
    else:
        taps = torch.cat([x[:, j : j + frames] for j in range(k)], dim=-1)  # [B, T', K C_in]
    return linear(taps, weight, conv.bias)


def depthwise_conv1d_channels_last(x: torch.Tensor, conv: nn.Conv1d) -> torch.Tensor:
    """A depthwise ``conv`` (groups = channels, stride 1) on x ``[B, T, C]`` as K shifted
    multiply-adds (no cuDNN)."""
    (k,), (pad,) = conv.kernel_size, conv.padding
    if conv.groups != conv.in_channels or conv.out_channels != conv.in_channels or conv.stride != (1,):
        raise ValueError(f"depthwise_conv1d_channels_last covers depthwise stride-1 convolutions: got {conv}")
    frames = x.shape[1] + 2 * pad - k + 1
    x = F.pad(x, (0, 0, pad, pad))
    weight = conv.weight[:, 0, :]  # [C, K]
    out = x[:, 0:frames] * weight[:, 0]
    for j in range(1, k):
        out = out + x[:, j : j + frames] * weight[:, j]
    return out + conv.bias if conv.bias is not None else out


def prelu_channels_last(x: torch.Tensor, prelu: nn.PReLU) -> torch.Tensor:
    """``nn.PReLU`` (one slope per channel, or one for all) on x ``[..., C]``."""
    return torch.where(x >= 0, x, x * prelu.weight)
