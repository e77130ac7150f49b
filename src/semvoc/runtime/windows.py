"""Audio of any length through a fixed-duration engine: overlapping windows and crossfades.

The semantic encoder and the vocoder are exported for fixed durations (the engine's buckets,
10 s by default). A longer recording is resynthesised window by window: each window is one
bucket long, consecutive windows overlap by ``overlap`` latent frames (1 s, at most a quarter
of the window), and the overlaps are crossfaded with complementary raised-cosine gains
(``sin²`` in, ``cos²`` out, summing to 1 at every sample). Why these choices:

- the window is a whole exported bucket, so every window runs the graphs as exported (and as
  parity-checked), and the longest bucket (``--duration``) gives the fewest seams;
- the encoder sees a window's edges without context and the vocoder's STFT frames are
  incomplete there; in a crossfade a window's first and last samples carry almost no weight,
  so what is heard at each instant comes mostly from the window it lies deeper inside;
- the two windows' waveforms in an overlap come from the same recording and the same latents
  (up to the encoder's context), so they are largely coherent: gains that sum to 1 keep the
  level constant, as in overlap-add resynthesis (equal-power gains would lift coherent audio by
  up to 3 dB mid-seam).

Window starts fall on latent frames (40 ms at 25 frames/s), so the 16-kHz encoder input and the
24-kHz output of a window start at the same instant exactly. Each window draws its vocoder
noise from ``(seed, window index)``; a recording that fits one window is resynthesised exactly
as before windowing existed. Memory holds one batch of windows whatever the input's length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: the crossfade between windows, in seconds, before it is capped at a quarter of the window
OVERLAP_S = 1.0


@dataclass(frozen=True)
class WindowPlan:
    """Where each window of an input lies, in latent frames and in samples of both rates."""

    window_frames: int  # latent frames per window (one duration bucket)
    overlap_frames: int  # latent frames shared by consecutive windows
    count: int  # windows
    out_samples: int  # output length at the engine's rate: the input's duration
    samples_per_frame: int  # output samples per latent frame (960 at 24 kHz)
    encoder_samples_per_frame: int  # 16-kHz samples per latent frame (640)

    @property
    def hop_frames(self) -> int:
        return self.window_frames - self.overlap_frames

    @property
    def window_samples(self) -> int:
        return self.window_frames * self.samples_per_frame

    @property
    def overlap_samples(self) -> int:
        return self.overlap_frames * self.samples_per_frame

    def encoder_span(self, k: int) -> tuple[int, int]:
        """(start, length) of window ``k`` in the 16-kHz encoder input."""
        return k * self.hop_frames * self.encoder_samples_per_frame, self.window_frames * self.encoder_samples_per_frame


def plan_windows(in_samples: int, in_rate: int, out_rate: int, window_frames: int, frames_per_second: float,
                 samples_per_frame: int, encoder_rate: int) -> WindowPlan:
    """The windows covering ``in_samples`` samples at ``in_rate``, output at ``out_rate``."""
    if window_frames < 1:
        raise ValueError("a window needs at least one latent frame")
    overlap = min(round(OVERLAP_S * frames_per_second), window_frames // 4)
    out_samples = max(1, round(in_samples * out_rate / in_rate))
    window = window_frames * samples_per_frame
    hop = (window_frames - overlap) * samples_per_frame
    count = 1 if out_samples <= window else 1 + math.ceil((out_samples - window) / hop)
    return WindowPlan(window_frames, overlap, count, out_samples, samples_per_frame,
                      round(encoder_rate / frames_per_second))


def crossfade_gains(samples: int) -> np.ndarray:
    """Fade-in gains ``sin²(π/2 · (i + ½)/n)``; the fade-out is ``1 -`` these (``cos²``)."""
    phase = (np.arange(samples, dtype=np.float64) + 0.5) / max(samples, 1)
    return (np.sin(0.5 * np.pi * phase) ** 2).astype(np.float32)


class Stitcher:
    """Joins window outputs in order; ``add`` returns the samples that are final so far."""

    def __init__(self, plan: WindowPlan):
        self.plan = plan
        self.fade_in = crossfade_gains(plan.overlap_samples)
        self.pending = np.zeros(0, np.float32)  # the previous window's tail, waiting for its crossfade
        self.written = 0
        self.added = 0

    def add(self, audio: np.ndarray) -> np.ndarray:
        plan = self.plan
        audio = np.asarray(audio, np.float32).copy()
        if self.added:
            n = self.pending.size
            audio[:n] = self.pending * (1.0 - self.fade_in) + audio[:n] * self.fade_in
        self.added += 1
        last = self.added == plan.count
        cut = audio.size if last else audio.size - plan.overlap_samples
        final, self.pending = audio[:cut], audio[cut:]
        final = final[:max(0, plan.out_samples - self.written)]
        self.written += final.size
        return final
