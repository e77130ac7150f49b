"""A GEMM with its bias and residual in cuBLASLt's epilogue, as ONE op (``semvoc.cuda::LtGemm``).

``out = a @ w (+ bias) (+ residual (* residual_scale))`` with ``a [..., K]``, ``w [K, N]`` (the
layout of a MatMul's second input: how the graphs hold ``F.linear``'s transposed weight),
``bias [N]``, ``residual [..., N]`` and a float32 ``residual_scale [N]``. onnxruntime's CUDA
MatMul calls ``cublasGemmEx``, which has no fused epilogue in fp16, so a bias Add (the DiT) or
semvoc's ``BiasResidual`` pass (the vocoder's down-projection) followed each GEMM: one more
kernel and one more pass over the output. ``cuda/ltgemm.cu`` makes one ``cublasLtMatmul`` call
instead (code path in ``cuda/ltgemm_kernel.cuh``): the bias as ``CUBLASLT_EPILOGUE_BIAS``, the
residual as C with beta 1, or with per-channel alpha/beta vectors when it is scaled; where
cuBLASLt offers no algorithm for that, the rest runs in one small kernel after the GEMM. fp32
accumulation, one rounding. Exported with ``semvoc-export --cuda-kernels``;
``SEMVOC_EXPORT_WITHOUT=LtGemm`` exports the previous MatMul + bias form instead.

Unverified on a GPU so far: ``tests/test_cuda_kernels.py::test_lt_gemm_matches_its_reference`` and
``benchmarks/device/kernel_bench/run.sh ltgemm`` are written for an H200 and have not run yet.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from semvoc.kernels.onnx_ops import CUDA_DOMAIN, contrib_op, fusion_enabled, register_translation

NAME = "LtGemm"


def lt_gemm_reference(a: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
                      residual: torch.Tensor | None = None,
                      residual_scale: torch.Tensor | None = None) -> torch.Tensor:
    """a ``[..., K]``, w ``[K, N]``, bias ``[N]``, residual ``[..., N]``, residual_scale ``[N]``
    -> ``[..., N]`` in a's dtype, computed in fp32 and rounded once."""
    y = a.float() @ w.float()
    if bias is not None:
        y = y + bias.float()
    if residual is not None:
        y = y + (residual.float() if residual_scale is None else residual.float() * residual_scale.float())
    return y.to(a.dtype)


@torch.library.custom_op("semvoc::lt_gemm", mutates_args=())
def lt_gemm(a: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, residual: torch.Tensor | None = None,
            residual_scale: torch.Tensor | None = None) -> torch.Tensor:
    return lt_gemm_reference(a, w, bias, residual, residual_scale)


@lt_gemm.register_fake
def _(a, w, bias=None, residual=None, residual_scale=None):
    return a.new_empty((*a.shape[:-1], w.shape[1]))


def linear(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           residual: torch.Tensor | None = None, residual_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(h, weight, bias) (+ residual (* residual_scale))`` with ``weight [N, K]`` (nn.Linear's
    layout): one ``LtGemm`` unless ``SEMVOC_EXPORT_WITHOUT`` names it, then a MatMul and the adds."""
    if fusion_enabled(NAME):
        scale = None if residual_scale is None else residual_scale.float()
        return lt_gemm(h, weight.t(), bias, residual, scale)
    y = F.linear(h, weight, bias)
    if residual is None:
        return y
    return y + (residual if residual_scale is None else residual * residual_scale)


def _onnx(a, w, bias=None, residual=None, residual_scale=None):
    op = contrib_op(NAME, ["a", "w", "bias?", "residual?", "residual_scale?"], ["out"], {}, domain=CUDA_DOMAIN)
    return op(a, w, bias, residual, residual_scale)


register_translation(torch.ops.semvoc.lt_gemm.default, _onnx)
