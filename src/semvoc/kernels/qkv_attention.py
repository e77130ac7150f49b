"""The DiT's self-attention from its q|k|v GEMM output as ONE op (semvoc's CUDA kernel).

qkv ``[R, L, 3*H*hd]`` is the output of one GEMM of the q, k and v projections (q heads, then k
heads, then v heads). The op norms the q and k heads (a per-head LayerNorm with the affine
``gamma``/``beta``, ``[2H, hd]`` (q heads' rows, then k heads') or ``[hd]``), rotates them (the
half-split RoPE at positions ``0..L-1``, tables ``cos``/``sin`` ``[>= L, hd/2]``), rounds them once
to fp16, and attends over all L keys with scale ``hd ** -0.5``: out ``[R, L, H*hd]``.

The separate form is ``HeadNormRopeQkv`` (one pass reading q|k|v and writing q, k and v) and
onnxruntime's ``Attention`` (flash attention). ``semvoc.cuda::QkvAttention``
(``cuda/qkv_attention.cu``, kernel in ``cuda/qkv_attention_kernel.cuh``) reads q, k and v where the
GEMM wrote them, norms and rotates each query tile once and each key tile once per query tile (in
shared memory), and runs the attention on tensor cores with an online softmax: one kernel instead
of two, and q, k, v never written out. fp16 with hd 64 only; the export uses it there with
``--cuda-kernels`` (``SEMVOC_EXPORT_WITHOUT=QkvAttention`` keeps the separate form).
"""

from __future__ import annotations

import torch
from onnx.defs import OpSchema

from semvoc.kernels.head_norm import head_norm_rope_reference
from semvoc.kernels.onnx_ops import CUDA_DOMAIN, contrib_op, register_translation

FUSION = "QkvAttention"  # SEMVOC_EXPORT_WITHOUT=QkvAttention: HeadNormRopeQkv and onnxruntime's Attention
HEAD_SIZE = 64  # the kernel's head size (fp16 only)


def qkv_attention_reference(qkv: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, cos: torch.Tensor,
                            sin: torch.Tensor, eps: float, num_heads: int) -> torch.Tensor:
    """The op's function: q and k normed and rotated as ``head_norm_rope`` writes them (rounded to
    qkv's dtype), attention in fp32, the output rounded to qkv's dtype."""
    rows, length, width = qkv.shape
    dim = width // 3
    hd = dim // num_heads
    qk, v = qkv.split([2 * dim, dim], dim=-1)
    q, k = head_norm_rope_reference(qk, gamma, beta, cos, sin, eps).chunk(2, dim=-1)

    def heads(x: torch.Tensor) -> torch.Tensor:
        return x.float().reshape(rows, length, num_heads, hd).transpose(1, 2)

    weights = torch.softmax((heads(q) @ heads(k).transpose(-2, -1)) * hd**-0.5, dim=-1)
    return (weights @ heads(v)).transpose(1, 2).reshape(rows, length, dim).to(qkv.dtype)


@torch.library.custom_op("semvoc::qkv_attention", mutates_args=())
def qkv_attention(qkv: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  eps: float, num_heads: int) -> torch.Tensor:
    """qkv ``[R, L, 3*H*hd]`` -> ``[R, L, H*hd]`` (see the module docstring)."""
    return qkv_attention_reference(qkv, gamma, beta, cos, sin, eps, num_heads)


@qkv_attention.register_fake
def _(qkv, gamma, beta, cos, sin, eps, num_heads):
    return qkv.new_empty((*qkv.shape[:-1], qkv.shape[-1] // 3))


def _onnx_qkv_attention(qkv, gamma, beta, cos, sin, eps: float, num_heads: int):
    op = contrib_op("QkvAttention", ["qkv", "gamma", "beta", "cos", "sin"], ["y"],
                    {"epsilon": OpSchema.AttrType.FLOAT, "num_heads": OpSchema.AttrType.INT}, domain=CUDA_DOMAIN)
    return op(qkv, gamma, beta, cos, sin, epsilon=eps, num_heads=num_heads)


register_translation(torch.ops.semvoc.qkv_attention.default, _onnx_qkv_attention)
