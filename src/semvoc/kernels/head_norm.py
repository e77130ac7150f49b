"""Per-head LayerNorm (+ RoPE) on packed heads as ONE op (semvoc's CUDA kernel).

The fused DiT's qk-norm: q|k ``[B, L, 2H*hd]`` from one GEMM, LayerNorm over each head's ``hd``
values with a per-head affine, then the half-split rotation of ``rotary.py``. In onnxruntime's
stock ops that is a LayerNormalization (~12 us at the release shapes on an H100), an affine Mul
and Add, and a RotaryEmbedding per block; ``semvoc.cuda::HeadNormRope`` (``cuda/head_norm.cu``, kernels
in ``cuda/head_norm_kernel.cuh``) gives each thread two 16-byte vectors of one head, the
elements j and j + hd/2 that the rotation pairs, and writes q and k as two outputs (no Split
after it). ``HeadNorm`` is the same without the rotation and the split (the cross-attention
q-norm). ``HeadNormRopeQkv`` takes q|k|v ``[B, L, 3H*hd]``, the three projections as ONE GEMM, and
also writes v, copied: three outputs. At batch 1 (M = 500 rows) one N = 3072 GEMM takes 7.6 us
against 5.7 + 5.4 us for the q|k and v GEMMs it replaces, replayed from a CUDA graph on an H200
(``benchmarks/device/gemm/run.sh algo_search_bench``); the copy of v costs one more read and
write of it. Statistics and arithmetic in fp32, one rounding at the end.

Exported with ``semvoc-export --cuda-kernels``. The first kernel (one warp per head) stays the
fallback for buffers that are not 16-byte aligned. Both pass ``tests/test_cuda_kernels.py``
against the references below on an H200; there, at the DiT's batch-16 shape (q|k
``[32, 250, 2048]`` fp16), the vectorised kernel takes 19.7 us per call against 55.5 us for the
first one (its bandwidth bound: 16.4 us; ``benchmarks/device/kernel_bench/run.sh head_norm``,
``benchmarks/results/h200-2026-12-02c.md``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from onnx.defs import OpSchema

from semvoc.kernels.onnx_ops import CUDA_DOMAIN, contrib_op, register_translation

# the export switch (SEMVOC_EXPORT_WITHOUT=HeadNormRopeQkv: q|k and v as two GEMMs, HeadNormRope)
QKV_NORM_ROPE = "HeadNormRopeQkv"


def head_norm_reference(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float) -> torch.Tensor:
    """x ``[B, L, n*hd]``; gamma, beta ``[n, hd]`` (per head) or ``[hd]`` (shared) -> fp32 ``[B, L, n, hd]``."""
    batch, length, width = x.shape
    hd = gamma.shape[-1]
    heads = x.float().reshape(batch, length, width // hd, hd)
    return F.layer_norm(heads, (hd,), eps=eps) * gamma.float() + beta.float()


def head_norm_rope_reference(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, cos: torch.Tensor,
                             sin: torch.Tensor, eps: float) -> torch.Tensor:
    """``head_norm`` then the half-split rotation at positions ``0..L-1``; cos, sin ``[>=L, hd/2]``.
    Returns ``[B, L, n*hd]`` (the op splits it into its two halves, q and k)."""
    normed = head_norm_reference(x, gamma, beta, eps)
    length = x.shape[1]
    c, s = cos[:length, None].float(), sin[:length, None].float()  # [L, 1, hd/2]
    x1, x2 = normed.chunk(2, dim=-1)
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).reshape(x.shape).to(x.dtype)


@torch.library.custom_op("semvoc::head_norm", mutates_args=())
def head_norm(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float) -> torch.Tensor:
    return head_norm_reference(x, gamma, beta, eps).reshape(x.shape).to(x.dtype)


@head_norm.register_fake
def _(x, gamma, beta, eps):
    return torch.empty_like(x)


@torch.library.custom_op("semvoc::head_norm_rope", mutates_args=())
def head_norm_rope(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q|k ``[B, L, 2H*hd]`` -> normed and rotated (q, k), ``[B, L, H*hd]`` each."""
    q, k = head_norm_rope_reference(x, gamma, beta, cos, sin, eps).chunk(2, dim=-1)
    return q.contiguous(), k.contiguous()


@head_norm_rope.register_fake
def _(x, gamma, beta, cos, sin, eps):
    shape = (*x.shape[:-1], x.shape[-1] // 2)
    return x.new_empty(shape), x.new_empty(shape)


@torch.library.custom_op("semvoc::head_norm_rope_qkv", mutates_args=())
def head_norm_rope_qkv(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, cos: torch.Tensor,
                       sin: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q|k|v ``[B, L, 3H*hd]`` -> (q, k) normed and rotated as ``head_norm_rope``, and v unchanged,
    ``[B, L, H*hd]`` each; gamma, beta ``[2H, hd]`` (the q and k heads) or ``[hd]``."""
    qk, v = x.split([2 * x.shape[-1] // 3, x.shape[-1] // 3], dim=-1)
    q, k = head_norm_rope_reference(qk, gamma, beta, cos, sin, eps).chunk(2, dim=-1)
    return q.contiguous(), k.contiguous(), v.contiguous()


@head_norm_rope_qkv.register_fake
def _(x, gamma, beta, cos, sin, eps):
    shape = (*x.shape[:-1], x.shape[-1] // 3)
    return x.new_empty(shape), x.new_empty(shape), x.new_empty(shape)


def _onnx_head_norm(x, gamma, beta, eps: float):
    op = contrib_op("HeadNorm", ["x", "gamma", "beta"], ["y"], {"epsilon": OpSchema.AttrType.FLOAT},
                    domain=CUDA_DOMAIN)
    return op(x, gamma, beta, epsilon=eps)


def _onnx_head_norm_rope(x, gamma, beta, cos, sin, eps: float):
    op = contrib_op("HeadNormRope", ["x", "gamma", "beta", "cos", "sin"], ["q", "k"],
                    {"epsilon": OpSchema.AttrType.FLOAT}, domain=CUDA_DOMAIN)
    return op(x, gamma, beta, cos, sin, epsilon=eps)


def _onnx_head_norm_rope_qkv(x, gamma, beta, cos, sin, eps: float):
    op = contrib_op("HeadNormRopeQkv", ["x", "gamma", "beta", "cos", "sin"], ["q", "k", "v"],
                    {"epsilon": OpSchema.AttrType.FLOAT}, domain=CUDA_DOMAIN)
    return op(x, gamma, beta, cos, sin, epsilon=eps)


register_translation(torch.ops.semvoc.head_norm.default, _onnx_head_norm)
register_translation(torch.ops.semvoc.head_norm_rope.default, _onnx_head_norm_rope)
register_translation(torch.ops.semvoc.head_norm_rope_qkv.default, _onnx_head_norm_rope_qkv)
