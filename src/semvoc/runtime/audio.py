"""Audio I/O and resampling with numpy and soundfile only (no torch).

``sinc_resample_kernel`` is torchaudio's ``sinc_interp_hann`` resampling filter (the one the
official ``DashengEncoderWrapper`` uses to go from 24 kHz to 16 kHz), computed in float64 and
stored as float32. The exported semantic-encoder graph and this runtime share it.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import numpy as np


def sinc_resample_kernel(orig_freq: int, new_freq: int, lowpass_filter_width: int = 6,
                         rolloff: float = 0.99) -> tuple[np.ndarray, int]:
    """Polyphase filter ``[new, 2 * width + orig]`` (float32) and its half-width ``width``.

    Output phase j of every block of ``new`` samples is the correlation of the input, padded by
    ``width``, with row j, at stride ``orig`` (frequencies reduced by their gcd).
    """
    gcd = math.gcd(int(orig_freq), int(new_freq))
    orig, new = int(orig_freq) // gcd, int(new_freq) // gcd
    base_freq = min(orig, new) * rolloff
    width = math.ceil(lowpass_filter_width * orig / base_freq)
    idx = np.arange(-width, width + orig, dtype=np.float64)[None, :] / orig
    t = np.arange(0, -new, -1, dtype=np.float64)[:, None] / new + idx
    t = np.clip(t * base_freq, -lowpass_filter_width, lowpass_filter_width)
    window = np.cos(t * math.pi / lowpass_filter_width / 2) ** 2
    t = t * math.pi
    with np.errstate(invalid="ignore", divide="ignore"):
        sinc = np.where(t == 0, 1.0, np.sin(t) / t)
    kernel = sinc * window * (base_freq / orig)
    return kernel.astype(np.float32), width


def resample(waveform: np.ndarray, orig_freq: int, new_freq: int) -> np.ndarray:
    """Resample the last axis of ``waveform`` (float32) like ``torchaudio.functional.resample``."""
    if orig_freq == new_freq:
        return waveform.astype(np.float32, copy=False)
    gcd = math.gcd(int(orig_freq), int(new_freq))
    orig, new = int(orig_freq) // gcd, int(new_freq) // gcd
    kernel, width = sinc_resample_kernel(orig_freq, new_freq)
    shape = waveform.shape
    x = waveform.reshape(-1, shape[-1]).astype(np.float32)
    length = x.shape[-1]
    x = np.pad(x, ((0, 0), (width, width + orig)))
    frames = (x.shape[-1] - kernel.shape[-1]) // orig + 1
    # windows[b, f, :] = x[b, f * orig : f * orig + K]; out[b, f, j] = windows . kernel[j]
    windows = np.lib.stride_tricks.sliding_window_view(x, kernel.shape[-1], axis=-1)[:, ::orig][:, :frames]
    out = np.einsum("bfk,jk->bfj", windows, kernel, optimize=True).reshape(x.shape[0], -1)
    target = math.ceil(new * length / orig)
    return out[:, :target].reshape(*shape[:-1], target).astype(np.float32)


def read_audio(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """Read any soundfile-supported file as mono float32 ``[samples]`` and its sample rate.

    Channels are averaged, as the official ``DashengEncoderWrapper`` does.
    """
    import soundfile as sf

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"audio file not found: {path}")
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as err:  # soundfile raises its own LibsndfileError
        raise ValueError(f"cannot read audio file {path}: {err}. Use WAV, FLAC or OGG.") from err
    if data.shape[0] == 0:
        raise ValueError(f"audio file {path} is empty (0 samples)")
    return data.mean(axis=1).astype(np.float32), int(rate)


def write_wav_atomic(path: str | os.PathLike, waveform: np.ndarray, sample_rate: int) -> Path:
    """Write a mono float32 waveform as 16-bit PCM WAV via a temp file + rename.

    A crash or Ctrl-C never leaves a half-written file at ``path``.
    """
    import soundfile as sf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        sf.write(tmp, np.asarray(waveform, dtype=np.float32), sample_rate, format="WAV",
                 subtype="PCM_16")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a wav gets the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
