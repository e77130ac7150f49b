"""``semvoc.runtime.Pipeline``: text -> audio and audio -> audio from an engine directory, no torch.

    from semvoc.runtime import Pipeline
    pipe = Pipeline("engines/demo")                  # backend="auto": CUDA if present, else CPU
    result = pipe.generate(["a dog barks in the rain"], seed=0)
    result.audio        # [B, samples] float32 in [-1, 1] at result.sample_rate
    result.timings      # seconds per stage: text, dit, vocoder, total
    pipe.resynthesize_file("talk.flac", "talk_resynth.wav")   # audio -> audio, any length

Request parameters are checked by ``semvoc.runtime.request`` (a ``RequestError`` names the
parameter and what would be accepted) before any work starts.

The semantics are the official ones (see ``semvoc.models.pipeline``): CFG batch ``[uncond;
cond]`` with zero text, the sway schedule, the vocoder's Euler loop with x1-prediction, clamp
and peak normalisation. One free win is taken: a DiT call whose step size is exactly 0 (the
last call of a sway schedule) changes nothing and is skipped.
"""

from __future__ import annotations

import contextlib
import numbers
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from semvoc.runtime.audio import AudioSource, open_audio, wav_writer
from semvoc.runtime.backends.base import Backend, NonFiniteError, Progress
from semvoc.runtime.manifest import EngineError, Manifest, load_manifest
from semvoc.runtime.noise import batch_noise, prompt_noise
from semvoc.runtime.request import Request, RequestError, check_request
from semvoc.runtime.schedules import dit_schedule, vocoder_t_span
from semvoc.runtime.select import make_backend
from semvoc.runtime.tokenizer import TextTokenizer
from semvoc.runtime.windows import Stitcher, WindowPlan, plan_windows


@dataclass
class GenerationResult:
    audio: np.ndarray  # [B, samples] float32
    sample_rate: int
    timings: dict[str, float] = field(default_factory=dict)
    truncated: list[bool] = field(default_factory=list)  # prompts cut to the text bucket
    dit_calls: int = 0

    @property
    def seconds_of_audio(self) -> float:
        return self.audio.shape[0] * self.audio.shape[1] / self.sample_rate


@dataclass
class FileResult:
    """What ``Pipeline.resynthesize_file`` wrote."""

    path: Path
    samples: int
    sample_rate: int
    windows: int
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def seconds_of_audio(self) -> float:
        return self.samples / self.sample_rate


def finish_waveform(audio: np.ndarray, clamp: bool) -> np.ndarray:
    """Official post-processing: clamp to [-1, 1], then ``w / max(max|w|, 1)`` per row."""
    out = np.clip(audio, -1.0, 1.0) if clamp else audio
    peak = np.maximum(np.abs(out).max(axis=-1, keepdims=True), 1.0)
    return (out / peak).astype(np.float32)


class Pipeline:
    def __init__(self, engine: str | Path, backend: str = "auto", *, device_id: int = 0,
                 verify: bool = True, threads: int | None = None):
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, numbers.Integral)
                                    or threads < 1):
            raise RequestError("threads", threads, "must be a whole number >= 1 (leave it out to use every core)")
        if isinstance(device_id, bool) or not isinstance(device_id, numbers.Integral) or device_id < 0:
            raise RequestError("device_id", device_id, "must be a GPU index >= 0")
        self.manifest: Manifest = load_manifest(engine, verify=verify)
        self.backend: Backend = make_backend(backend, self.manifest, device_id=device_id, threads=threads)
        buckets = self.manifest.buckets
        self.tokenizer = TextTokenizer(self.manifest.root / self.manifest.data["tokenizer"],
                                       buckets["text_tokens"])
        self.defaults = self.manifest.defaults
        self.sample_rate = int(self.defaults["sample_rate"])

    # ---------------------------------------------------------------------------- checks
    def check(self, *, seed=0, steps=None, vocoder_steps=None, guidance=None, duration=None,
              text: bool = True) -> Request:
        """The request's parameters checked against this engine (``RequestError`` names the bad one);
        ``text=False`` for resynthesis (no DiT steps, no guidance)."""
        return check_request(self.manifest, seed=seed, steps=steps, vocoder_steps=vocoder_steps,
                             guidance=guidance, duration=duration, text=text)

    def _batch_bucket(self, batch: int) -> int:
        if not self.backend.pads_batches:
            return batch
        fitting = [b for b in self.manifest.buckets["batch_sizes"] if b >= batch]
        if not fitting:
            raise EngineError(f"batch of {batch} exceeds the largest exported batch bucket "
                              f"{max(self.manifest.buckets['batch_sizes'])}; use --batch-size "
                              f"<= {max(self.manifest.buckets['batch_sizes'])}")
        return min(fitting)

    def _require(self, *components: str) -> None:
        missing = [c for c in components if c not in self.manifest.components]
        if missing:
            raise EngineError(f"this engine lacks the {', '.join(missing)} graph(s); re-export with "
                              f"--components including {','.join(missing)}")

    # ---------------------------------------------------------------------------- requests
    def generate(self, prompts: list[str], *, seed: int = 0, indices: list[int] | None = None,
                 steps: int | None = None, vocoder_steps: int | None = None,
                 guidance: float | None = None, duration: float | None = None,
                 latent_noise: np.ndarray | None = None, audio_noise: np.ndarray | None = None,
                 progress: Progress = None) -> GenerationResult:
        """Text -> audio. Prompt ``j`` draws its noise from ``(seed, indices[j])`` (default ``j``)."""
        self._require("text", "dit", "vocoder")
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise ValueError("no prompts given")
        request = self.check(seed=seed, steps=steps, vocoder_steps=vocoder_steps, guidance=guidance,
                             duration=duration)
        seed, steps, vocoder_steps = request.seed, request.steps, request.vocoder_steps
        guidance, duration = request.guidance, request.duration
        frames = self.manifest.frames(duration)
        samples = frames * self.manifest.shapes["samples_per_frame"]
        channels = self.manifest.shapes["latent_channels"]

        batch = len(prompts)
        tokens = self.tokenizer(list(prompts))
        if latent_noise is None or audio_noise is None:
            drawn = batch_noise(seed, indices or list(range(batch)), (channels, frames), samples)
            latent_noise = drawn[0] if latent_noise is None else latent_noise
            audio_noise = drawn[1] if audio_noise is None else audio_noise
        latent_noise = np.asarray(latent_noise, np.float32).reshape(batch, channels, frames)
        audio_noise = np.asarray(audio_noise, np.float32).reshape(batch, samples)
        ids, mask = tokens.input_ids, tokens.attention_mask

        bucket = self._batch_bucket(batch)
        if bucket > batch:  # pad with copies of the last prompt; their outputs are dropped
            pad = bucket - batch

            def extend(a):
                return np.concatenate([a, np.repeat(a[-1:], pad, axis=0)])

            ids, mask, latent_noise, audio_noise = map(extend, (ids, mask, latent_noise, audio_noise))

        schedule = dit_schedule(steps, self.defaults["sway"])
        calls = schedule.num_calls
        while calls > 0 and schedule.dts[calls - 1] == 0.0:  # dt == 0: the call changes nothing
            calls -= 1
        t_span = vocoder_t_span(vocoder_steps)
        x0 = (audio_noise * np.float32(self.defaults["noise_scale"])).astype(np.float32)

        self.backend.prepare(bucket, frames)  # sessions this bucket needs, loaded together on first use
        timings = {}
        start = time.perf_counter()
        context = self.backend.encode_text(ids, mask)
        timings["text"] = time.perf_counter() - start
        t = time.perf_counter()
        with self._precision_in_errors():
            latent = self.backend.dit_loop(context, mask.astype(bool), latent_noise, schedule, calls, guidance,
                                           progress)
            timings["dit"] = time.perf_counter() - t
            t = time.perf_counter()
            audio = self.backend.vocoder_loop(latent, x0, t_span, vocoder_steps, progress)
        timings["vocoder"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - start
        audio = finish_waveform(audio[:batch], bool(self.defaults["clamp"]))
        return GenerationResult(audio, self.sample_rate, timings, tokens.truncated, calls)

    def resynthesize(self, waveform: np.ndarray, sample_rate: int, *, seed: int = 0,
                     vocoder_steps: int | None = None, duration: float | None = None,
                     audio_noise: np.ndarray | None = None, batch_size: int | None = None,
                     progress: Progress = None) -> GenerationResult:
        """Audio -> semantic latents -> audio, for a mono ``waveform`` ``[samples]`` of any length
        at ``sample_rate``. The output has the input's duration at the engine's rate: a recording
        longer than the ``duration`` bucket goes through overlapping windows of it, crossfaded
        (``semvoc.runtime.windows``); a shorter one is zero-padded for the encoder and trimmed.
        ``audio_noise`` (the vocoder's initial noise) is only accepted for a single window."""
        waveform = np.asarray(waveform, np.float32)
        if waveform.ndim != 1 or waveform.size == 0:
            raise ValueError("resynthesis takes one non-empty mono waveform")
        source = AudioSource.from_array(waveform, int(sample_rate))
        plan, request, batch = self._plan(source, seed, vocoder_steps, duration, batch_size)
        if audio_noise is not None and plan.count > 1:
            raise ValueError(f"audio_noise is only accepted for audio that fits one {request.duration:g}-s window")
        timings: dict[str, float] = {}
        blocks = list(self._windows(source, plan, request, batch, timings, audio_noise, progress))
        audio = np.concatenate(blocks)[None]
        return GenerationResult(audio, self.sample_rate, timings)

    def resynthesize_file(self, audio_path: str | Path, out_path: str | Path, *, seed: int = 0,
                          vocoder_steps: int | None = None, duration: float | None = None,
                          batch_size: int | None = None,
                          on_window: Callable[[int, int], None] | None = None) -> FileResult:
        """``resynthesize`` from an audio file (WAV, FLAC, OGG...) of any length to a 16-bit WAV.

        Reads, resamples and writes block by block: memory holds one batch of windows
        (``batch_size``: default the largest exported batch bucket on a GPU, 1 on the CPU),
        whatever the length. The WAV appears at ``out_path`` only when complete (16-bit PCM;
        RF64 past 4 GiB). ``on_window(done, total)`` follows progress."""
        source = open_audio(audio_path)
        try:
            plan, request, batch = self._plan(source, seed, vocoder_steps, duration, batch_size)
            timings: dict[str, float] = {}
            with wav_writer(out_path, self.sample_rate, plan.out_samples) as out:
                for block in self._windows(source, plan, request, batch, timings, None, None, on_window):
                    out.write(block)
        finally:
            source.close()
        return FileResult(Path(out_path), plan.out_samples, self.sample_rate, plan.count, timings)

    def _plan(self, source: AudioSource, seed, vocoder_steps, duration,
              batch_size) -> tuple[WindowPlan, Request, int]:
        self._require("semantic", "vocoder")
        buckets = self.manifest.buckets["batch_sizes"]
        # GPUs gain from batching windows; on the CPU one window at a time is as fast (measured on
        # the demo engine: 10.0 s per 10-s window alone, 11.9 s in batches of 4) and holds the least
        default = max(buckets) if self.backend.pads_batches else 1
        batch = default if batch_size is None else batch_size
        if isinstance(batch, bool) or not isinstance(batch, numbers.Integral) or batch < 1:
            raise RequestError("batch_size", batch_size, "must be a whole number >= 1")
        if self.backend.pads_batches and batch > max(buckets):
            raise RequestError("batch_size", batch, f"exceeds the largest exported batch bucket {max(buckets)}")
        request = self.check(seed=seed, vocoder_steps=vocoder_steps, duration=duration, text=False)
        shapes = self.manifest.shapes
        plan = plan_windows(source.frames, source.sample_rate, self.sample_rate, self.manifest.frames(request.duration),
                            shapes["frames_per_second"], shapes["samples_per_frame"], shapes["semantic_sample_rate"])
        return plan, request, min(int(batch), plan.count)

    def _windows(self, source: AudioSource, plan: WindowPlan, request: Request, batch: int,
                 timings: dict[str, float], audio_noise=None, progress: Progress = None,
                 on_window: Callable[[int, int], None] | None = None):
        """The final output, block by block, of every window of ``plan`` (``batch`` windows per run)."""
        rate16 = self.manifest.shapes["semantic_sample_rate"]
        channels = self.manifest.shapes["latent_channels"]
        samples = plan.window_samples
        t_span = vocoder_t_span(request.vocoder_steps)
        clamp = bool(self.defaults["clamp"])
        stitcher = Stitcher(plan)
        timings.update(read=0.0, encode=0.0, vocoder=0.0)
        self.backend.prepare(self._batch_bucket(min(batch, plan.count)), plan.window_frames, text=False,
                             duration_s=request.duration)
        started = time.perf_counter()
        for first in range(0, plan.count, batch):
            ks = list(range(first, min(first + batch, plan.count)))
            t = time.perf_counter()
            wav16 = np.stack([source.read_resampled(rate16, *plan.encoder_span(k)) for k in ks])
            if audio_noise is not None:
                noise = np.asarray(audio_noise, np.float32).reshape(1, samples)
            else:
                noise = np.stack([prompt_noise(request.seed, k, (channels, plan.window_frames), samples)[1]
                                  for k in ks])
            x0 = (noise * np.float32(self.defaults["noise_scale"])).astype(np.float32)
            bucket = self._batch_bucket(len(ks))
            if bucket > len(ks):  # pad with copies of the last window; their outputs are dropped
                wav16, x0 = (np.concatenate([a, np.repeat(a[-1:], bucket - len(ks), axis=0)]) for a in (wav16, x0))
            timings["read"] += time.perf_counter() - t
            t = time.perf_counter()
            latents = self.backend.encode_audio(wav16, request.duration)
            timings["encode"] += time.perf_counter() - t
            t = time.perf_counter()
            with self._precision_in_errors():
                audio = self.backend.vocoder_loop(latents, x0, t_span, request.vocoder_steps, progress)
            timings["vocoder"] += time.perf_counter() - t
            for row in finish_waveform(audio[:len(ks)], clamp):
                yield stitcher.add(row)
            if on_window:
                on_window(ks[-1] + 1, plan.count)
        timings["total"] = time.perf_counter() - started

    @contextlib.contextmanager
    def _precision_in_errors(self):
        """NaN/Inf from a loop: say whether the graph runs in fp16 (then overflow is the likely
        cause) or in fp32 (then it is not), from the engine's precision plan."""
        try:
            yield
        except NonFiniteError as err:
            if err.precision is not None:
                raise
            try:
                component = self.manifest.graph(err.graph).component
                precision = self.manifest.data.get("precision", {}).get("components", {}).get(component)
            except EngineError:
                precision = None
            raise NonFiniteError(err.graph, err.step, err.detail, precision=precision or "unknown") from None

    def close(self) -> None:
        self.backend.close()
