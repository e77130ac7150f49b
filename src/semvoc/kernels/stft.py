"""``torch.stft`` / ``torch.istft`` lowered to matrix products (or convolutions) with DFT bases.

ONNX has no inverse STFT and TensorRT has no DFT, so the vocoder's spectral transforms are
written with ops every runtime runs fast. Two lowerings, same numbers:

- **framed** (``n_fft`` a multiple of ``hop``, as in every released configuration): the
  reflect-padded signal is cut into ``hop``-sized blocks; ``n_fft / hop`` shifted slices of the
  blocks form the frames, and one GEMM with the windowed DFT basis gives the spectrum. The
  inverse is one GEMM with the windowed inverse basis, then overlap-add as ``n_fft / hop``
  padded, shifted additions. Only GEMMs, slices and adds: tensor-core friendly.
- **conv** (any hop): a strided Conv1d with the basis as kernel, and a ConvTranspose1d for the
  inverse (measured slow on cuDNN for kernel 480 / stride 240, hence the framed default).

Both divide by the overlap-added squared window and trim ``n_fft // 2`` as
``torch.istft(center=True)`` does. The spectrum layout is the official ``fft_to_real`` one:
``[Re_0..Re_{N/2}, Im_0..Im_{N/2}]`` along channels. Bases are computed in float64. The
references are ``torch.stft`` / ``torch.istft`` themselves (``stft_reference`` etc.).
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


def _overlap_add(blocks: torch.Tensor, ratio: int) -> torch.Tensor:
    """``[B, frames, ratio, hop]`` frame pieces -> ``[B, (frames + ratio - 1) * hop]`` summed."""
    batch, frames, _, hop = blocks.shape
    total = None
    for i in range(ratio):  # piece i of frame f lands in block f + i
        shifted = F.pad(blocks[:, :, i], (0, 0, i, ratio - 1 - i))
        total = shifted if total is None else total + shifted
    return total.reshape(batch, (frames + ratio - 1) * hop)


class ConvSTFT(torch.nn.Module):
    """``[B, L]`` -> ``[B, n_fft + 2, 1 + L // hop]``: centred, reflect-padded, onesided."""

    def __init__(self, window: torch.Tensor, hop_length: int, framed: bool | None = None):
        super().__init__()
        self.n_fft = window.shape[0]
        self.hop_length = hop_length
        self.framed = self.n_fft % hop_length == 0 if framed is None else framed
        forward, _ = _dft_bases(window)
        # framed: [n_fft, n_fft + 2] for frames @ basis; conv: [n_fft + 2, 1, n_fft]
        basis = forward.t().contiguous() if self.framed else forward[:, None, :]
        self.register_buffer("basis", basis.to(window.dtype), persistent=False)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        pad = self.n_fft // 2
        x = F.pad(audio[:, None, :], (pad, pad), mode="reflect")
        basis = self.basis.to(x.dtype)
        if not self.framed:
            return F.conv1d(x, basis, stride=self.hop_length)
        hop, ratio = self.hop_length, self.n_fft // self.hop_length
        frames = 1 + audio.shape[-1] // hop
        blocks = x[:, 0, : (frames + ratio - 1) * hop].reshape(x.shape[0], frames + ratio - 1, hop)
        framed = torch.cat([blocks[:, i : i + frames] for i in range(ratio)], dim=-1)  # [B, F, n_fft]
        return (framed @ basis).transpose(1, 2)


class ConvISTFT(torch.nn.Module):
    """``[B, n_fft + 2, frames]`` (real parts, then imaginary) -> ``[B, hop * (frames - 1)]``."""

    def __init__(self, window: torch.Tensor, hop_length: int, framed: bool | None = None):
        super().__init__()
        self.n_fft = window.shape[0]
        self.hop_length = hop_length
        self.framed = self.n_fft % hop_length == 0 if framed is None else framed
        _, inverse = _dft_bases(window)
        basis = inverse if self.framed else inverse[:, None, :]  # framed: [n_fft + 2, n_fft]
        self.register_buffer("basis", basis.to(window.dtype), persistent=False)
        self.register_buffer("window_sq", (window.to(torch.float64) ** 2).to(window.dtype), persistent=False)

    def _envelope(self, frames: int, device) -> torch.Tensor:
        """The overlap-added squared window that torch.istft divides by."""
        if self.framed:
            ratio = self.n_fft // self.hop_length
            pieces = self.window_sq.reshape(1, 1, ratio, self.hop_length).expand(1, frames, -1, -1)
            return _overlap_add(pieces, ratio)
        ones = torch.ones(1, 1, frames, dtype=self.window_sq.dtype, device=device)
        return F.conv_transpose1d(ones, self.window_sq[None, None], stride=self.hop_length)[:, 0]

    def forward(self, spec: torch.Tensor) -> torch.Tensor:
        frames = spec.shape[-1]
        basis = self.basis.to(spec.dtype)
        if self.framed:
            ratio = self.n_fft // self.hop_length
            pieces = (spec.transpose(1, 2) @ basis).reshape(spec.shape[0], frames, ratio, self.hop_length)
            audio = _overlap_add(pieces, ratio)
        else:
            audio = F.conv_transpose1d(spec, basis, stride=self.hop_length)[:, 0]
        start = self.n_fft // 2
        length = self.hop_length * (frames - 1)
        envelope = self._envelope(frames, spec.device)[:, start : start + length]
        return audio[:, start : start + length] / envelope.to(audio.dtype)


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


# ------------------------------------------------------------------ folded form (export)


def foldable(n_fft: int, hop_length: int) -> bool:
    """Whether ``fold_projections`` applies: frames overlap by half (``n_fft = 2 hop``, every
    released configuration), so every kept sample is covered by exactly two frames and the
    squared-window envelope is periodic with period ``hop``."""
    return n_fft == 2 * hop_length


def fold_projections(window: torch.Tensor, hop_length: int, in_weight: torch.Tensor, in_bias: torch.Tensor,
                     out_weight: torch.Tensor, out_bias: torch.Tensor, scale: float = 1.0):
    """The STFT folded into the linear map after it, the iSTFT into the one before it.

    ``in_proj(stft(x))`` is linear in the frames, so it is one GEMM with ``in_weight @ basis``
    (``[C, n_fft]``); likewise ``istft(out_proj(h))`` is one GEMM to frame pieces followed by
    overlap-add, and with half-overlapping frames the envelope ``torch.istft`` divides by is
    ``w^2[j] + w^2[j + hop]`` at every kept sample (period ``hop``), so it divides the columns of
    the folded weight instead (and so does ``scale``, e.g. the mean over branches). Returns float64
    ``(w_in [C, n_fft], b_in [C], w_out [n_fft, C], b_out [n_fft])``: ``h = frames @ w_in.T + b_in``,
    ``pieces = h @ w_out.T + b_out``, then ``overlap_add_halves(pieces)``.
    """
    n_fft = window.shape[0]
    if not foldable(n_fft, hop_length):
        raise ValueError(f"folded STFT needs n_fft = 2 * hop, got n_fft {n_fft}, hop {hop_length}")
    forward, inverse = _dft_bases(window)  # [n_fft + 2, n_fft] each
    square = window.to(torch.float64) ** 2
    envelope = (square[:hop_length] + square[hop_length:]).repeat(2)  # [n_fft], period hop
    w_in = in_weight.to(torch.float64) @ forward
    w_out = (inverse.t() @ out_weight.to(torch.float64)) * (scale / envelope)[:, None]
    b_out = (out_bias.to(torch.float64) @ inverse) * (scale / envelope)
    return w_in, in_bias.to(torch.float64), w_out, b_out


def frame_halves(audio: torch.Tensor, hop_length: int) -> torch.Tensor:
    """``[B, L]`` (L a multiple of hop) -> ``[B, 1 + L // hop, 2 hop]``: the centred,
    reflect-padded frames ``torch.stft`` sees when ``n_fft = 2 hop``."""
    batch, frames = audio.shape[0], 1 + audio.shape[-1] // hop_length
    padded = F.pad(audio[:, None, :], (hop_length, hop_length), mode="reflect")[:, 0]
    blocks = padded.reshape(batch, frames + 1, hop_length)
    return torch.cat([blocks[:, :frames], blocks[:, 1:]], dim=-1)


def overlap_add_halves(pieces: torch.Tensor) -> torch.Tensor:
    """``[B, F, 2 hop]`` frame pieces -> ``[B, (F - 1) hop]``: sample ``k hop + j`` is the first
    half of frame ``k + 1`` plus the second half of frame ``k`` (``torch.istft``'s centre trim)."""
    batch, frames, width = pieces.shape
    halves = pieces.reshape(batch, frames, 2, width // 2)
    return (halves[:, 1:, 0] + halves[:, :-1, 1]).reshape(batch, (frames - 1) * (width // 2))
