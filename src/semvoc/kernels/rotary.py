"""RoPE on packed heads in one op: ONNX ``RotaryEmbedding`` (opset 23).

Half-split rotation (the official ``Rotary``: ``x * cos + cat(-x2, x1) * sin``) of
``x [B, L, H*hd]`` by positions ``position_ids [B, L]``, with ``cos``/``sin`` tables
``[P, hd/2]``. Working on ``[B, L, H*hd]`` keeps the heads packed as the projections emit
them: no transposes around it. The official code rotates in fp32; the fused op rotates in the
graph's dtype (angles and tables are still computed in fp32).
"""

from __future__ import annotations

import torch
from onnxscript import opset23 as op

from semvoc.kernels.onnx_ops import register_translation


def rope_tables(inv_freq: torch.Tensor, length: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin ``[length, hd/2]`` for positions ``0..length-1`` (angles in fp32)."""
    t = torch.arange(length, device=inv_freq.device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq.float())
    return freqs.cos().to(dtype), freqs.sin().to(dtype)


def rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, position_ids: torch.Tensor,
                     num_heads: int) -> torch.Tensor:
    batch, length, width = x.shape
    heads = x.reshape(batch, length, num_heads, width // num_heads)
    c, s = cos[position_ids][:, :, None], sin[position_ids][:, :, None]  # [B, L, 1, hd/2]
    x1, x2 = heads.chunk(2, dim=-1)
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).reshape(batch, length, width)


@torch.library.custom_op("semvoc::rotary", mutates_args=())
def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, position_ids: torch.Tensor,
           num_heads: int) -> torch.Tensor:
    return rotary_reference(x, cos, sin, position_ids, num_heads)


@rotary.register_fake
def _(x, cos, sin, position_ids, num_heads):
    return torch.empty_like(x)


def _onnx(x, cos, sin, position_ids, num_heads: int):
    return op.RotaryEmbedding(x, cos, sin, position_ids, interleaved=0, num_heads=num_heads)


register_translation(torch.ops.semvoc.rotary.default, _onnx)
