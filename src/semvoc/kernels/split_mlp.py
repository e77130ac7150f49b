"""The vocoder block's MLP in the PReLU split form as ONE op, two GEMMs (``semvoc.cuda::SplitMlp``).

The split form (``semvoc.kernels.prelu_split``) ends each ConvNeXt block with three GEMMs on
``y`` (ConvNeXtMix's output) and the block's stored input ``v``:
``r = relu(y W1^T + b1)``, ``t = y M^T + c + v``, ``v' = r R^T + t``. The last two are one GEMM
over the joined rows ``[r | y]`` with the stacked weight ``[R | M]`` (K = H + C):
``v' = [r | y] [R | M]^T + c + v``. ConvNeXtMix writes ``y`` into the last C columns of a wider
output (its attribute ``lead = H``), the op's first GEMM writes ``r`` into the H columns before
it, and the second reads the whole rows: one GEMM call fewer per block, and ``t`` is never stored
or rounded. ``cuda/split_mlp.cu`` makes the two cuBLASLt calls (``cuda/ltgemm_kernel.cuh``).

Exported by ``semvoc-export --cuda-kernels`` wherever the vocoder uses the split form;
``SEMVOC_EXPORT_WITHOUT=SplitMlp`` keeps the three LtGemm calls.
"""

from __future__ import annotations

import torch

from semvoc.kernels.onnx_ops import CUDA_DOMAIN, contrib_op, register_translation

NAME = "SplitMlp"


def split_mlp_reference(wide: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
                        bias: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """wide ``[..., H + C]`` (y in its last C columns; the first H are not read), w1 ``[C, H]``,
    b1 ``[H]``, w2 ``[H + C, C]``, bias ``[C]``, residual ``[..., C]`` -> ``[..., C]`` in wide's
    dtype: r rounded to that dtype once (as the op stores it), the output computed in fp32 and
    rounded once."""
    hidden = w1.shape[1]
    y = wide[..., hidden:]
    r = (y.float() @ w1.float() + b1.float()).clamp_min(0).to(wide.dtype)
    joined = torch.cat([r, y], dim=-1).float()
    return (joined @ w2.float() + bias.float() + residual.float()).to(wide.dtype)


@torch.library.custom_op("semvoc::split_mlp", mutates_args=())
def split_mlp_op(wide: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, bias: torch.Tensor,
                 residual: torch.Tensor) -> torch.Tensor:
    return split_mlp_reference(wide, w1, b1, w2, bias, residual)


@split_mlp_op.register_fake
def _(wide, w1, b1, w2, bias, residual):
    return torch.empty_like(residual)


def _onnx(wide, w1, b1, w2, bias, residual):
    op = contrib_op(NAME, ["wide", "w1", "b1", "w2", "bias", "residual"], ["out"], {}, domain=CUDA_DOMAIN)
    return op(wide, w1, b1, w2, bias, residual)


register_translation(torch.ops.semvoc.split_mlp.default, _onnx)
