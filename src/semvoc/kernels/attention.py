"""Masked multi-head attention that exports as ONE fused ONNX ``Attention`` node.

``torch.onnx.export(dynamo=True, opset_version=23)`` turns
``F.scaled_dot_product_attention`` into a single ``Attention`` op; at lower opsets it
decomposes into MatMul/Softmax/MatMul. onnxruntime's CPU ``Attention`` rejects a boolean
mask whose query axis is broadcast (``[B, 1, 1, Lk]``), so the key mask is expanded to
``[B, 1, Lq, Lk]`` before the op (one ``Expand`` node, no extra arithmetic).

``attention_packed`` is the same function on packed heads (``[B, L, H*hd]`` in and out),
exported as an ``Attention`` node with ``q_num_heads``/``kv_num_heads``: the op splits the
heads itself, so the four transposes around a 4-D attention disappear from the graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from onnxscript import opset23 as op

from semvoc.kernels.onnx_ops import register_translation


def expand_key_mask(key_mask: torch.Tensor, num_queries: int) -> torch.Tensor:
    """``[B, Lk]`` bool (True = attend) -> ``[B, 1, Lq, Lk]`` bool."""
    batch, num_keys = key_mask.shape
    return key_mask[:, None, None, :].expand(batch, 1, num_queries, num_keys)


def key_mask_bias(key_mask: torch.Tensor, num_queries: int, dtype: torch.dtype) -> torch.Tensor:
    """``[B, Lk]`` bool (True = attend) -> additive ``[B, 1, Lq, Lk]`` of ``dtype`` (0 or the
    dtype's lowest value). onnxruntime's CUDA attention converts a boolean mask into such a bias
    on every call (a kernel per block in the DiT step); a graph that attends with the same mask
    in every block computes it once. A row needs one attended key (a text always has one token)."""
    bias = torch.zeros(key_mask.shape, dtype=dtype, device=key_mask.device)
    bias = bias.masked_fill(~key_mask, torch.finfo(dtype).min)
    return bias[:, None, None, :].expand(key_mask.shape[0], 1, num_queries, key_mask.shape[1])


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Softmax attention with scale ``head_dim ** -0.5``.

    q: ``[B, H, Lq, hd]``, k/v: ``[B, H, Lk, hd]``, key_mask: ``[B, Lk]`` bool or None.
    Returns ``[B, Lq, H * hd]`` (heads merged, ready for the output projection).
    """
    batch, heads, num_queries, head_dim = q.shape
    mask = None if key_mask is None else expand_key_mask(key_mask, num_queries)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).reshape(batch, num_queries, heads * head_dim)


def attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """The same function written out as MatMul-Softmax-MatMul (for tests only)."""
    batch, heads, num_queries, head_dim = q.shape
    logits = (q @ k.transpose(-2, -1)) * head_dim**-0.5
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    out = logits.softmax(dim=-1) @ v
    return out.transpose(1, 2).reshape(batch, num_queries, heads * head_dim)


def attention_packed_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                               num_heads: int) -> torch.Tensor:
    def heads(x):
        return x.reshape(x.shape[0], x.shape[1], num_heads, -1).transpose(1, 2)

    out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=mask)
    return out.transpose(1, 2).reshape(q.shape)


@torch.library.custom_op("semvoc::attention_packed", mutates_args=())
def attention_packed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                     num_heads: int) -> torch.Tensor:
    """q ``[B, Lq, H*hd]``, k/v ``[B, Lk, H*hd]``, mask ``[B, 1, Lq, Lk]`` bool (see
    ``expand_key_mask``), additive (``key_mask_bias``) or None -> ``[B, Lq, H*hd]``; scale ``hd ** -0.5``."""
    return attention_packed_reference(q, k, v, mask, num_heads)


@attention_packed.register_fake
def _(q, k, v, mask, num_heads):
    return torch.empty_like(q)


def _onnx(q, k, v, mask, num_heads: int):
    inputs = (q, k, v) if mask is None else (q, k, v, mask)
    # Attention has optional present-K/V outputs; only Y is used (the exporter drops the rest)
    return op.Attention(*inputs, q_num_heads=num_heads, kv_num_heads=num_heads)[0]


register_translation(torch.ops.semvoc.attention_packed.default, _onnx)
