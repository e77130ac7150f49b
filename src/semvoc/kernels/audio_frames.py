"""A vocoder branch's STFT frames from the waveform as ONE op (semvoc's CUDA kernel).

``frame_halves(x, hop)``: the centred, reflect-padded frames ``[B, L / hop + 1, 2 hop]`` that
``torch.stft`` sees when ``n_fft = 2 hop``. Exported as stock ops this is a Pad, a Gather, two
Slices and a Concat per branch (five small kernels, each a pass over the waveform);
``semvoc.cuda::AudioFrames`` (``cuda/audio_frames.cu``) writes the frames in one pass. Exported
with ``semvoc-export --cuda-kernels`` in the folded vocoder step (``AudioConvNeXt.folded_pieces``);
``SEMVOC_EXPORT_WITHOUT=AudioFrames`` keeps the stock form. With ``EulerOverlapAdd``, on an H200
(reference preset, fp16, 10-s clips; ``benchmarks/results/h200-2026-12-02g.md``): vocoder step
0.879 -> 0.801 ms at batch 1 and 7.16 -> 6.71 ms at batch 16 (whole loops), 158 -> 117 kernels
per step at batch 1; the three ``AudioFrames`` calls take 0.029 ms at batch 16, the passes they
replace took about 0.19 ms.
"""

from __future__ import annotations

import torch
from onnx.defs import OpSchema

from semvoc.kernels.onnx_ops import CUDA_DOMAIN, contrib_op, register_translation
from semvoc.kernels.stft import frame_halves

NAME = "AudioFrames"


def audio_frames_reference(x: torch.Tensor, hop: int) -> torch.Tensor:
    """x ``[B, L]`` (L a multiple of ``hop``, ``hop < L``) -> frames ``[B, L / hop + 1, 2 hop]``."""
    return frame_halves(x, hop)


@torch.library.custom_op("semvoc::audio_frames", mutates_args=())
def audio_frames(x: torch.Tensor, hop: int) -> torch.Tensor:
    return audio_frames_reference(x, hop)


@audio_frames.register_fake
def _(x, hop):
    return x.new_empty(x.shape[0], x.shape[1] // hop + 1, 2 * hop)


def _onnx(x, hop: int):
    op = contrib_op(NAME, ["x"], ["frames"], {"hop": OpSchema.AttrType.INT}, domain=CUDA_DOMAIN)
    return op(x, hop=hop)


register_translation(torch.ops.semvoc.audio_frames.default, _onnx)
