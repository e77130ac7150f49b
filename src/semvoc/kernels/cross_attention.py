"""The DiT's masked cross-attention on packed heads as ONE op (semvoc's CUDA kernel).

q ``[R, L, H*hd]`` (the normed query of the latent frames), k and v ``[R, S, H*hd]`` (the text's,
prepared once per request), a bool key mask ``[R', S]`` (True = attend) with R a multiple of R':
row r reads mask row ``r % R'``, so the CFG batch ``[uncond; cond]`` can pass its ``[batch, S]``
text mask as it is, or the ``[2 batch, S]`` concatenation. Softmax over the true keys with scale
``hd ** -0.5``; a row with no true key gets zeros (what onnxruntime's and PyTorch's fused attention
give such a row, instead of NaN).

In onnxruntime's stock ops this is an ``Attention`` node fed by an additive mask bias
``[R, 1, L, S]`` (``attention.key_mask_bias``): on a GPU a memory-efficient CUTLASS kernel over all
S keys plus a kernel that zeroes fully masked rows. ``semvoc.cuda::CrossAttention``
(``cuda/cross_attention.cu``, kernels in ``cuda/cross_attention_kernel.cuh``) reads the bool mask
itself and, for fp16 with hd 64 and S <= 128, runs one tensor-core kernel that skips the key tiles
past the row's last true key (texts are short, the padding is masked). Exported with
``semvoc-export --cuda-kernels``; ``SEMVOC_EXPORT_WITHOUT=CrossAttention`` keeps the stock form.

With ``q_gamma``/``q_beta`` (and ``eps``) the op also applies the query's per-head LayerNorm (the
DiT's cross-attention q-norm, ``head_norm``) as its kernels load q, in fp32 with one rounding to
q's dtype, instead of a separate ``HeadNorm`` pass over q (``FUSED_NORM``;
``SEMVOC_EXPORT_WITHOUT=CrossAttentionQNorm`` keeps that pass). On an H200 (reference preset, fp16;
``benchmarks/results/h200-2026-12-02g.md``) this pays at batch 1 (DiT step 2.81 -> 2.74 ms, the
25 ``HeadNorm`` launches gone) but not at batch 16: the kernel's extra time (0.92 -> 1.03 ms per
step) takes most of what the pass took (0.20 ms), and the step loop is unchanged.
"""

from __future__ import annotations

import torch
from onnx.defs import OpSchema

from semvoc.kernels.head_norm import head_norm_reference
from semvoc.kernels.onnx_ops import CUDA_DOMAIN, contrib_op, register_translation

FUSED_NORM = "CrossAttentionQNorm"  # SEMVOC_EXPORT_WITHOUT=CrossAttentionQNorm: the q-norm as its own op


def expand_mask_rows(key_mask: torch.Tensor, rows: int) -> torch.Tensor:
    """``[R', S]`` -> ``[rows, S]`` bool, row r = mask row ``r % R'``."""
    if key_mask.dim() != 2 or key_mask.shape[0] == 0 or rows % key_mask.shape[0]:
        raise ValueError(f"cross_attention: key_mask {tuple(key_mask.shape)} must be [R', S] with R' dividing "
                         f"the {rows} rows of q")
    return key_mask.bool().repeat(rows // key_mask.shape[0], 1)


def cross_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor,
                              num_heads: int, q_gamma: torch.Tensor | None = None, q_beta: torch.Tensor | None = None,
                              eps: float = 0.0) -> torch.Tensor:
    """The op's function in fp32 (rounded to q's dtype at the end); shapes as in the module docstring.
    With q_gamma/q_beta (``[hd]`` or ``[H, hd]``): q normed first, rounded to its dtype."""
    if q_gamma is not None:
        q = head_norm_reference(q, q_gamma, q_beta, eps).reshape(q.shape).to(q.dtype)
    rows, length, width = q.shape
    hd = width // num_heads
    mask = expand_mask_rows(key_mask, rows)

    def heads(x: torch.Tensor) -> torch.Tensor:
        return x.float().reshape(rows, x.shape[1], num_heads, hd).transpose(1, 2)

    logits = (heads(q) @ heads(k).transpose(-2, -1)) * hd**-0.5
    logits = logits.masked_fill(~mask[:, None, None, :], float("-inf"))
    weights = torch.softmax(logits, dim=-1)
    weights = torch.where(mask.any(-1)[:, None, None, None], weights, 0.0)  # no true key: zeros, not NaN
    return (weights @ heads(v)).transpose(1, 2).reshape(rows, length, width).to(q.dtype)


@torch.library.custom_op("semvoc::cross_attention", mutates_args=())
def cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor, num_heads: int,
                    q_gamma: torch.Tensor | None = None, q_beta: torch.Tensor | None = None,
                    eps: float = 0.0) -> torch.Tensor:
    """q ``[R, L, H*hd]``, k/v ``[R, S, H*hd]``, key_mask ``[R', S]`` bool -> ``[R, L, H*hd]``;
    q_gamma/q_beta: the query's LayerNorm affine (see the module docstring)."""
    return cross_attention_reference(q, k, v, key_mask, num_heads, q_gamma, q_beta, eps)


@cross_attention.register_fake
def _(q, k, v, key_mask, num_heads, q_gamma=None, q_beta=None, eps=0.0):
    return torch.empty_like(q)


def _onnx_cross_attention(q, k, v, key_mask, num_heads: int, q_gamma=None, q_beta=None, eps: float = 0.0):
    op = contrib_op("CrossAttention", ["q", "k", "v", "key_mask", "q_gamma?", "q_beta?"], ["y"],
                    {"num_heads": OpSchema.AttrType.INT, "epsilon": OpSchema.AttrType.FLOAT}, domain=CUDA_DOMAIN)
    if q_gamma is None:
        return op(q, k, v, key_mask, num_heads=num_heads, epsilon=0.0)
    return op(q, k, v, key_mask, q_gamma, q_beta, num_heads=num_heads, epsilon=eps)


register_translation(torch.ops.semvoc.cross_attention.default, _onnx_cross_attention)
