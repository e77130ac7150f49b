"""torchaudio's ``functional.resample`` (``sinc_interp_hann``) as one strided Conv1d.

The kernel itself is computed by ``semvoc.runtime.audio.sinc_resample_kernel`` (numpy), so
the torch-free runtime and the exported graphs share one definition; this module applies it
the way torchaudio does: pad ``(width, width + orig)``, Conv1d with stride ``orig``, interleave
the ``new`` phases, and keep ``ceil(new * length / orig)`` samples.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from semvoc.runtime.audio import sinc_resample_kernel


class SincResample(torch.nn.Module):
    """``[..., L]`` at ``orig_freq`` -> ``[..., ceil(L * new / orig)]`` at ``new_freq``."""

    def __init__(self, orig_freq: int, new_freq: int, lowpass_filter_width: int = 6,
                 rolloff: float = 0.99):
        super().__init__()
        gcd = math.gcd(orig_freq, new_freq)
        self.orig, self.new = orig_freq // gcd, new_freq // gcd
        kernel, self.width = sinc_resample_kernel(orig_freq, new_freq, lowpass_filter_width, rolloff)
        self.register_buffer("kernel", torch.from_numpy(kernel)[:, None, :], persistent=False)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        if self.orig == self.new:
            return waveform
        shape = waveform.shape
        x = waveform.reshape(-1, shape[-1])
        length = x.shape[-1]
        x = F.pad(x, (self.width, self.width + self.orig))
        y = F.conv1d(x[:, None], self.kernel.to(x.dtype), stride=self.orig)  # [N, new, frames]
        y = y.transpose(1, 2).reshape(x.shape[0], -1)
        target = math.ceil(self.new * length / self.orig)
        return y[:, :target].reshape(*shape[:-1], target)
