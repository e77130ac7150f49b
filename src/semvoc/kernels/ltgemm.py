"""A GEMM with its bias, residual and relu in cuBLASLt's epilogue, as ONE op (``semvoc.cuda::LtGemm``).

``out = act(a @ w (+ bias) (+ residual (* residual_scale)))`` with ``a [..., K]``, ``w [K, N]`` (the
layout of a MatMul's second input: how the graphs hold ``F.linear``'s transposed weight),
``bias [N]``, ``residual [..., N]``, a float32 ``residual_scale [N]``, and ``act`` max(., 0) where
the node's int attribute ``relu`` is 1 (else the identity). onnxruntime's CUDA
MatMul calls ``cublasGemmEx``, which has no fused epilogue in fp16, so a bias Add (the DiT) or
semvoc's ``BiasResidual`` pass (the vocoder's down-projection) followed each GEMM: one more
kernel and one more pass over the output. ``cuda/ltgemm.cu`` makes one ``cublasLtMatmul`` call
instead (code path in ``cuda/ltgemm_kernel.cuh``): the bias as ``CUBLASLT_EPILOGUE_BIAS``, the
residual as C with beta 1, or with per-channel alpha/beta vectors when it is scaled, the relu
as ``CUBLASLT_EPILOGUE_RELU(_BIAS)``; where
cuBLASLt offers no algorithm for that, the rest runs in one small kernel after the GEMM. fp32
accumulation, one rounding. Exported with ``semvoc-export --cuda-kernels``;
``SEMVOC_EXPORT_WITHOUT=LtGemm`` exports the previous MatMul + bias form instead.

"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from onnx.defs import OpSchema

from semvoc.kernels.onnx_ops import CUDA_DOMAIN, contrib_op, fusion_enabled, register_translation

NAME = "LtGemm"


def lt_gemm_reference(a: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
                      residual: torch.Tensor | None = None, residual_scale: torch.Tensor | None = None,
                      relu: bool = False) -> torch.Tensor:
    """a ``[..., K]``, w ``[K, N]``, bias ``[N]``, residual ``[..., N]``, residual_scale ``[N]``
    -> ``[..., N]`` in a's dtype, computed in fp32 and rounded once; ``relu``: max(., 0) last."""
    y = a.float() @ w.float()
    if bias is not None:
        y = y + bias.float()
    if residual is not None:
        y = y + (residual.float() if residual_scale is None else residual.float() * residual_scale.float())
    return (y.clamp_min(0) if relu else y).to(a.dtype)


@torch.library.custom_op("semvoc::lt_gemm", mutates_args=())
def lt_gemm(a: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, residual: torch.Tensor | None = None,
            residual_scale: torch.Tensor | None = None, relu: bool = False) -> torch.Tensor:
    return lt_gemm_reference(a, w, bias, residual, residual_scale, relu)


@lt_gemm.register_fake
def _(a, w, bias=None, residual=None, residual_scale=None, relu=False):
    return a.new_empty((*a.shape[:-1], w.shape[1]))


def linear(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           residual: torch.Tensor | None = None, residual_scale: torch.Tensor | None = None,
           relu: bool = False) -> torch.Tensor:
    """``F.linear(h, weight, bias) (+ residual (* residual_scale))``, then ``relu`` if asked, with
    ``weight [N, K]`` (nn.Linear's layout): one ``LtGemm`` unless ``SEMVOC_EXPORT_WITHOUT`` names it,
    then a MatMul and the adds."""
    if fusion_enabled(NAME):
        scale = None if residual_scale is None else residual_scale.float()
        return lt_gemm(h, weight.t(), bias, residual, scale, relu)
    y = F.linear(h, weight, bias)
    if residual is not None:
        y = y + (residual if residual_scale is None else residual * residual_scale)
    return F.relu(y) if relu else y


def _onnx(a, w, bias=None, residual=None, residual_scale=None, relu: bool = False):
    op = contrib_op(NAME, ["a", "w", "bias?", "residual?", "residual_scale?"], ["out"],
                    {"relu": OpSchema.AttrType.INT}, domain=CUDA_DOMAIN)
    return op(a, w, bias, residual, residual_scale, relu=int(relu))


register_translation(torch.ops.semvoc.lt_gemm.default, _onnx)
