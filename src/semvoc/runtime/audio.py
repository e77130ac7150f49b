"""Audio I/O and resampling with numpy and soundfile only (no torch).

``sinc_resample_kernel`` is torchaudio's ``sinc_interp_hann`` resampling filter (the one the
official ``DashengEncoderWrapper`` uses to go from 24 kHz to 16 kHz), computed in float64 and
stored as float32. The exported semantic-encoder graph and this runtime share it.
"""

from __future__ import annotations

import contextlib
import functools
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


@functools.lru_cache(maxsize=8)
def _shared_kernel(orig_freq: int, new_freq: int) -> tuple[np.ndarray, int]:
    """``sinc_resample_kernel`` computed once per rate pair for span-by-span resampling (read-only)."""
    kernel, width = sinc_resample_kernel(orig_freq, new_freq)
    kernel.setflags(write=False)
    return kernel, width


def resample(waveform: np.ndarray, orig_freq: int, new_freq: int) -> np.ndarray:
    """Resample the last axis of ``waveform`` (float32) like ``torchaudio.functional.resample``."""
    if orig_freq == new_freq:
        return waveform.astype(np.float32, copy=False)
    shape = waveform.shape
    x = waveform.reshape(-1, shape[-1]).astype(np.float32)
    target = resampled_length(shape[-1], orig_freq, new_freq)
    out = resample_span(lambda a, b: _zero_padded(x, a, b), orig_freq, new_freq, 0, target)
    return out.reshape(*shape[:-1], target)


def resampled_length(length: int, orig_freq: int, new_freq: int) -> int:
    """How many samples ``resample`` makes of ``length`` input samples."""
    gcd = math.gcd(int(orig_freq), int(new_freq))
    return math.ceil(int(new_freq) // gcd * int(length) / (int(orig_freq) // gcd))


def resample_span(read, orig_freq: int, new_freq: int, start: int, count: int) -> np.ndarray:
    """Output samples ``[start, start + count)`` of ``resample`` without the whole input.

    ``read(a, b)`` returns input samples ``[a, b)`` as ``[rows, b - a]`` float32, zeros outside
    the signal. The polyphase filter is shift-invariant per block of ``orig`` input samples, so
    a span computed from the input it needs (its blocks plus the filter's half-width on both
    sides) equals the same span of the whole-signal result.
    """
    gcd = math.gcd(int(orig_freq), int(new_freq))
    orig, new = int(orig_freq) // gcd, int(new_freq) // gcd
    kernel, width = _shared_kernel(int(orig_freq), int(new_freq))
    first, last = start // new, -(-(start + count) // new)  # output blocks covering the span
    # output block f reads input [f * orig - width, f * orig - width + K), K = 2 * width + orig
    x = read(first * orig - width, last * orig + width)
    windows = np.lib.stride_tricks.sliding_window_view(x, kernel.shape[-1], axis=-1)[:, ::orig][:, :last - first]
    out = (windows @ kernel.T).reshape(x.shape[0], -1)  # [rows, blocks, new] -> [rows, samples]
    offset = start - first * new
    return np.ascontiguousarray(out[:, offset:offset + count], dtype=np.float32)


def _zero_padded(x: np.ndarray, a: int, b: int) -> np.ndarray:
    """``x[:, a:b]`` with zeros where ``[a, b)`` leaves ``[0, len)``."""
    out = np.zeros((x.shape[0], b - a), np.float32)
    lo, hi = max(a, 0), min(b, x.shape[-1])
    if hi > lo:
        out[:, lo - a:hi - a] = x[:, lo:hi]
    return out


def _check_finite(samples: np.ndarray, offset: int, sample_rate: int, name: str) -> None:
    bad = np.flatnonzero(~np.isfinite(samples))
    if bad.size:
        at = (offset + int(bad[0])) / sample_rate
        raise ValueError(f"{name} holds NaN or infinite samples (the first at {at:.3f} s): "
                         "repair or re-export the recording")


class AudioSource:
    """A mono signal read forward in blocks: from a file (bounded memory) or from an array.

    ``read(a, b)`` returns samples ``[a, b)`` (zeros outside the signal); successive calls must
    not start before an earlier call's start, so only the span still needed stays in memory.
    ``read16(start, count)`` is the same signal resampled to another rate, span by span.
    """

    def __init__(self, frames: int, sample_rate: int, reader=None, array: np.ndarray | None = None,
                 name: str = "the waveform"):
        self.frames, self.sample_rate, self.name = int(frames), int(sample_rate), name
        self._reader = reader  # a soundfile.SoundFile, read sequentially (no seeking)
        self._array = array
        self._buffer = np.zeros(0, np.float32)
        self._buffer_start = 0  # signal index of self._buffer[0]

    @classmethod
    def from_array(cls, waveform: np.ndarray, sample_rate: int) -> AudioSource:
        waveform = np.asarray(waveform, np.float32)
        _check_finite(waveform, 0, sample_rate, "the waveform")
        return cls(waveform.shape[-1], sample_rate, array=waveform)

    def read(self, a: int, b: int) -> np.ndarray:
        if self._array is not None:
            return _zero_padded(self._array[None], a, b)[0]
        if min(max(a, 0), self.frames) < self._buffer_start:  # samples outside the signal are zeros anyway
            raise ValueError(f"AudioSource reads forward only ({a} < {self._buffer_start})")
        end = self._buffer_start + self._buffer.size
        want = min(b, self.frames)
        if want > end:
            block = self._reader.read(want - end, dtype="float32", always_2d=True)
            if block.shape[0] < want - end:  # the header promised more than the file holds
                self.frames = end + block.shape[0]
            mono = block.mean(axis=1, dtype=np.float32)
            _check_finite(mono, end, self.sample_rate, self.name)
            self._buffer = np.concatenate([self._buffer, mono])
        drop = max(0, min(a, self._buffer_start + self._buffer.size) - self._buffer_start)
        self._buffer, self._buffer_start = self._buffer[drop:], self._buffer_start + drop
        out = np.zeros(b - a, np.float32)
        lo, hi = max(a, self._buffer_start), min(b, self._buffer_start + self._buffer.size)
        if hi > lo:
            out[lo - a:hi - a] = self._buffer[lo - self._buffer_start:hi - self._buffer_start]
        return out

    def read_resampled(self, new_rate: int, start: int, count: int) -> np.ndarray:
        """Samples ``[start, start + count)`` of the signal at ``new_rate`` (zeros past its end)."""
        if new_rate == self.sample_rate:
            return self.read(start, start + count)
        out = resample_span(lambda a, b: self.read(a, b)[None], self.sample_rate, new_rate, start, count)[0]
        end = resampled_length(self.frames, self.sample_rate, new_rate)
        out[max(0, end - start):] = 0.0  # past the signal: silence, as when the whole file is resampled
        return out

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()


def open_audio(path: str | os.PathLike) -> AudioSource:
    """A soundfile-supported file as a mono :class:`AudioSource` (channels averaged, as the
    official ``DashengEncoderWrapper`` does); nothing but the header is read yet."""
    import soundfile as sf

    path = Path(path)
    if path.is_dir():
        raise ValueError(f"--audio {path} is a directory; give one audio file (WAV, FLAC or OGG)")
    if path.exists() and not path.is_file():
        raise ValueError(f"--audio {path} is not a regular file (a device or a pipe?); give an audio file")
    if not path.is_file():
        raise FileNotFoundError(f"audio file not found: {path}")
    try:
        reader = sf.SoundFile(str(path))
    except Exception as err:  # soundfile raises its own LibsndfileError
        raise ValueError(f"cannot read audio file {path}: {err}. Use WAV, FLAC or OGG.") from err
    if reader.frames <= 0:
        reader.close()
        raise ValueError(f"audio file {path} is empty (0 samples)")
    return AudioSource(reader.frames, reader.samplerate, reader=reader, name=str(path))


def read_audio(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """A whole file as mono float32 ``[samples]`` and its sample rate (``open_audio`` reads it in
    blocks instead). Channels are averaged, as the official ``DashengEncoderWrapper`` does."""
    source = open_audio(path)
    try:
        return source.read(0, source.frames), source.sample_rate
    finally:
        source.close()


def write_wav_atomic(path: str | os.PathLike, waveform: np.ndarray, sample_rate: int) -> Path:
    """Write a mono float32 waveform as 16-bit PCM WAV via a temp file + rename.

    A crash or Ctrl-C never leaves a half-written file at ``path``.
    """
    waveform = np.asarray(waveform, dtype=np.float32)
    with wav_writer(path, sample_rate, waveform.shape[-1]) as out:
        out.write(waveform)
    return Path(path)


#: WAV's 32-bit size fields end at 4 GiB; longer outputs are written as RF64 (the WAV successor)
WAV_MAX_BYTES = 2**32 - 2**20


@contextlib.contextmanager
def wav_writer(path: str | os.PathLike, sample_rate: int, expected_samples: int = 0):
    """A mono 16-bit WAV (RF64 past 4 GiB) written block by block into a temp file beside
    ``path`` and renamed into place when the block exits cleanly; on any error or Ctrl-C the
    temp file is removed and ``path`` is left as it was."""
    import soundfile as sf

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:  # name the output, not the temp file
        raise OSError(f"cannot write {path} ({err.strerror}); choose another output") from err
    os.close(fd)
    try:
        container = "RF64" if 2 * expected_samples + 44 > WAV_MAX_BYTES else "WAV"
        with sf.SoundFile(tmp, "w", samplerate=sample_rate, channels=1, format=container,
                          subtype="PCM_16") as out:
            yield out
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a wav gets the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
