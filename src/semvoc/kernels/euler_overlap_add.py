"""The end of a vocoder step as ONE op (semvoc's CUDA kernel): overlap-add, branch sum, Euler update.

Each branch's decoder ends in a GEMM to frame pieces ``[B, L / hop_i + 1, 2 hop_i]`` (the iSTFT
folded into its projection, ``AudioConvNeXt.folded_pieces``); the prediction is the sum over the
branches of their overlap-added pieces (``overlap_add_halves``, in fp32), and the step returns
the fp32 waveform's Euler update with x1-prediction, ``x + (pred - x) / (1 - t) * dt`` (or
``x + pred * dt``). Exported as stock ops that is, per branch, a Cast, two Slices, two Gathers and
an Add, then the branch sums and five ops of the update: some 25 small kernels per step, each a
pass over the waveform. ``semvoc.cuda::EulerOverlapAdd`` (``cuda/euler_overlap_add.cu``) does it in
one pass, in fp32 and in the graph's order of operations. Exported with ``semvoc-export
--cuda-kernels`` (at most ``MAX_BRANCHES`` branches); ``SEMVOC_EXPORT_WITHOUT=EulerOverlapAdd``
keeps the stock form. Measured with ``AudioFrames`` (see there); 0.037 ms per call at batch 16 on
an H200, where the passes it replaces took about 0.34 ms.
"""

from __future__ import annotations

import torch
from onnx.defs import OpSchema

from semvoc.kernels.onnx_ops import CUDA_DOMAIN, contrib_op, register_translation
from semvoc.kernels.stft import overlap_add_halves

NAME = "EulerOverlapAdd"
MAX_BRANCHES = 4  # inputs pieces_0 .. pieces_3 (cuda/euler_overlap_add.cu's kMaxBranches)


def euler_overlap_add_reference(audio: torch.Tensor, step: torch.Tensor, t_span: torch.Tensor,
                                pieces: list[torch.Tensor], pred_x1: bool) -> torch.Tensor:
    """audio ``[B, L]`` fp32, step ``[1]`` int64, t_span ``[N + 1]`` fp32, pieces (one per branch)
    ``[B, L / hop_i + 1, 2 hop_i]`` -> the next waveform ``[B, L]`` fp32."""
    pred = sum(overlap_add_halves(p.float()) for p in pieces)
    t, dt = t_span[step], t_span[1] - t_span[0]
    velocity = (pred - audio) / (1 - t) if pred_x1 else pred
    return audio + velocity * dt


@torch.library.custom_op("semvoc::euler_overlap_add", mutates_args=())
def euler_overlap_add(audio: torch.Tensor, step: torch.Tensor, t_span: torch.Tensor, pieces: list[torch.Tensor],
                      pred_x1: bool) -> torch.Tensor:
    return euler_overlap_add_reference(audio, step, t_span, pieces, pred_x1)


@euler_overlap_add.register_fake
def _(audio, step, t_span, pieces, pred_x1):
    return torch.empty_like(audio)


def _onnx(audio, step, t_span, pieces, pred_x1: bool):
    names = ["audio", "step", "t_span", "pieces_0", *(f"pieces_{i}?" for i in range(1, MAX_BRANCHES))]
    op = contrib_op(NAME, names, ["audio_next"], {"pred_x1": OpSchema.AttrType.INT}, domain=CUDA_DOMAIN)
    return op(audio, step, t_span, *pieces, pred_x1=int(pred_x1))


register_translation(torch.ops.semvoc.euler_overlap_add.default, _onnx)
