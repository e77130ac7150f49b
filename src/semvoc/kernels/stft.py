"""``torch.stft`` / ``torch.istft`` lowered to Conv1d / ConvTranspose1d with DFT bases.

ONNX has no inverse STFT and TensorRT has no DFT, but both run convolutions well, so the
vocoder's spectral transforms become one convolution each:

- analysis: reflect-pad by ``n_fft // 2``, then a strided Conv1d whose ``n_fft + 2`` output
  channels are the windowed cosine (real) and negative-sine (imaginary) bases. The channel
  order ``[Re_0..Re_{N/2}, Im_0..Im_{N/2}]`` is the official ``fft_to_real`` layout.
- synthesis: a strided ConvTranspose1d with the windowed inverse real-DFT bases (overlap-add
  is what a transposed convolution does), divided by the overlap-added squared window, then
  trimmed by ``n_fft // 2`` as ``torch.istft(center=True)`` does.

Bases are computed in float64 and stored in the module's dtype. The reference
implementations are ``torch.stft`` / ``torch.istft`` themselves (see ``stft_reference``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _dft_bases(window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Windowed forward and inverse real-DFT bases, each ``[n_fft + 2, n_fft]`` float64."""
    n_fft = window.shape[0]
    bins = n_fft // 2 + 1
    n = torch.arange(n_fft, dtype=torch.float64)
    k = torch.arange(bins, dtype=torch.float64)
    angle = 2 * math.pi * torch.outer(k, n) / n_fft  # [bins, n_fft]
    cos, sin = torch.cos(angle), torch.sin(angle)
    sin[0] = 0.0  # exact zeros for DC and Nyquist (sin(pi n) is ~1e-16 in float64)
    if n_fft % 2 == 0:
        sin[-1] = 0.0
    w = window.to(torch.float64)
    forward = torch.cat([cos, -sin], dim=0) * w  # Re = sum x w cos, Im = -sum x w sin
    # irfft: y[n] = 1/N (Re_0 + Re_{N/2} (-1)^n) + 2/N sum_{0<k<N/2} (Re_k cos - Im_k sin)
    scale = torch.full((bins, 1), 2.0 / n_fft, dtype=torch.float64)
    scale[0] = 1.0 / n_fft
    if n_fft % 2 == 0:
        scale[-1] = 1.0 / n_fft
    inverse = torch.cat([cos * scale, -sin * scale], dim=0) * w
    return forward, inverse


class ConvSTFT(torch.nn.Module):
    """``[B, L]`` -> ``[B, n_fft + 2, 1 + L // hop]``: centred, reflect-padded, onesided."""

    def __init__(self, window: torch.Tensor, hop_length: int):
        super().__init__()
        self.n_fft = window.shape[0]
        self.hop_length = hop_length
        forward, _ = _dft_bases(window)
        self.register_buffer("basis", forward.to(window.dtype)[:, None, :], persistent=False)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        pad = self.n_fft // 2
        x = F.pad(audio[:, None, :], (pad, pad), mode="reflect")
        return F.conv1d(x, self.basis.to(x.dtype), stride=self.hop_length)


class ConvISTFT(torch.nn.Module):
    """``[B, n_fft + 2, frames]`` (real parts, then imaginary) -> ``[B, hop * (frames - 1)]``."""

    def __init__(self, window: torch.Tensor, hop_length: int):
        super().__init__()
        self.n_fft = window.shape[0]
        self.hop_length = hop_length
        _, inverse = _dft_bases(window)
        self.register_buffer("basis", inverse.to(window.dtype)[:, None, :], persistent=False)
        self.register_buffer("window_sq", (window.to(torch.float64) ** 2).to(window.dtype)[None, None, :],
                             persistent=False)

    def forward(self, spec: torch.Tensor) -> torch.Tensor:
        frames = spec.shape[-1]
        frames_out = F.conv_transpose1d(spec, self.basis.to(spec.dtype), stride=self.hop_length)
        # Overlap-added squared window: the normaliser torch.istft divides by.
        ones = torch.ones(1, 1, frames, dtype=self.window_sq.dtype, device=spec.device)
        envelope = F.conv_transpose1d(ones, self.window_sq, stride=self.hop_length)
        start = self.n_fft // 2
        length = self.hop_length * (frames - 1)
        audio = frames_out[:, 0, start : start + length]
        return audio / envelope[:, 0, start : start + length].to(audio.dtype)


def stft_reference(audio: torch.Tensor, window: torch.Tensor, hop_length: int) -> torch.Tensor:
    """What ``ConvSTFT`` must equal: ``torch.stft`` in the official real layout."""
    n_fft = window.shape[0]
    spec = torch.stft(audio, n_fft, hop_length, win_length=n_fft, window=window, center=True,
                      pad_mode="reflect", onesided=True, return_complex=True)
    return torch.cat([spec.real, spec.imag], dim=1)


def istft_reference(spec: torch.Tensor, window: torch.Tensor, hop_length: int) -> torch.Tensor:
    """What ``ConvISTFT`` must equal: ``torch.istft`` of the official real layout."""
    n_fft = window.shape[0]
    bins = n_fft // 2 + 1
    complex_spec = torch.complex(spec[:, :bins], spec[:, bins:])
    return torch.istft(complex_spec, n_fft, hop_length, win_length=n_fft, window=window,
                       center=True, onesided=True)
