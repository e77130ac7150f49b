"""``semvoc.runtime.Pipeline``: text -> audio and audio -> audio from an engine directory, no torch.

    from semvoc.runtime import Pipeline
    pipe = Pipeline("engines/demo")                  # backend="auto": CUDA if present, else CPU
    result = pipe.generate(["a dog barks in the rain"], seed=0)
    result.audio        # [B, samples] float32 in [-1, 1] at result.sample_rate
    result.timings      # seconds per stage: text, dit, vocoder, total

The semantics are the official ones (see ``semvoc.models.pipeline``): CFG batch ``[uncond;
cond]`` with zero text, the sway schedule, the vocoder's Euler loop with x1-prediction, clamp
and peak normalisation. One free win is taken: a DiT call whose step size is exactly 0 (the
last call of a sway schedule) changes nothing and is skipped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from semvoc.runtime.audio import resample
from semvoc.runtime.backends.base import Backend, Progress
from semvoc.runtime.manifest import EngineError, Manifest, load_manifest
from semvoc.runtime.noise import batch_noise
from semvoc.runtime.schedules import dit_schedule, vocoder_t_span
from semvoc.runtime.select import make_backend
from semvoc.runtime.tokenizer import TextTokenizer


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


def finish_waveform(audio: np.ndarray, clamp: bool) -> np.ndarray:
    """Official post-processing: clamp to [-1, 1], then ``w / max(max|w|, 1)`` per row."""
    out = np.clip(audio, -1.0, 1.0) if clamp else audio
    peak = np.maximum(np.abs(out).max(axis=-1, keepdims=True), 1.0)
    return (out / peak).astype(np.float32)


class Pipeline:
    def __init__(self, engine: str | Path, backend: str = "auto", *, device_id: int = 0,
                 verify: bool = True, threads: int | None = None):
        self.manifest: Manifest = load_manifest(engine, verify=verify)
        self.backend: Backend = make_backend(backend, self.manifest, device_id=device_id, threads=threads)
        buckets = self.manifest.buckets
        self.tokenizer = TextTokenizer(self.manifest.root / self.manifest.data["tokenizer"],
                                       buckets["text_tokens"])
        self.defaults = self.manifest.defaults
        self.sample_rate = int(self.defaults["sample_rate"])

    # ---------------------------------------------------------------------------- checks
    def _duration(self, duration_s: float | None) -> float:
        durations = self.manifest.buckets["durations_s"]
        if duration_s is None:
            return float(durations[0])
        for d in durations:
            if abs(d - duration_s) < 1e-6:
                return float(d)
        raise EngineError(f"duration {duration_s:g} s is not an exported bucket; this engine has "
                          f"{', '.join(f'{d:g}' for d in durations)} s (re-export with --durations)")

    def _batch_bucket(self, batch: int) -> int:
        if not self.backend.pads_batches:
            return batch
        fitting = [b for b in self.manifest.buckets["batch_sizes"] if b >= batch]
        if not fitting:
            raise EngineError(f"batch of {batch} exceeds the largest exported batch bucket "
                              f"{max(self.manifest.buckets['batch_sizes'])}; use --batch-size "
                              f"<= {max(self.manifest.buckets['batch_sizes'])}")
        return min(fitting)

    def _steps(self, value, default_key: str, limit_key: str, flag: str) -> int:
        steps = int(self.defaults[default_key] if value is None else value)
        limit = self.manifest.buckets[limit_key]
        if not 1 <= steps <= limit:
            raise EngineError(f"{flag} {steps} is outside 1..{limit} (the engine's tables hold {limit} "
                              f"steps; re-export with a larger --max-{flag.lstrip('-')})")
        return steps

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
        duration = self._duration(duration)
        steps = self._steps(steps, "steps", "max_dit_steps", "--steps")
        vocoder_steps = self._steps(vocoder_steps, "vocoder_steps", "max_vocoder_steps", "--vocoder-steps")
        guidance = float(self.defaults["guidance"] if guidance is None else guidance)
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

        timings = {}
        start = time.perf_counter()
        context = self.backend.encode_text(ids, mask)
        timings["text"] = time.perf_counter() - start
        t = time.perf_counter()
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
                     audio_noise: np.ndarray | None = None, progress: Progress = None) -> GenerationResult:
        """Audio -> semantic latents -> audio. ``waveform`` is mono ``[samples]`` at ``sample_rate``:
        resampled to 16 kHz and fitted to the duration bucket (cut, or zero-padded: the encoder
        then sees trailing silence); the output is trimmed to the input's length."""
        self._require("semantic", "vocoder")
        waveform = np.asarray(waveform, np.float32)
        if waveform.ndim != 1 or waveform.size == 0:
            raise ValueError("resynthesis takes one non-empty mono waveform")
        duration = self._duration(duration)
        vocoder_steps = self._steps(vocoder_steps, "vocoder_steps", "max_vocoder_steps", "--vocoder-steps")
        rate16 = self.manifest.shapes["semantic_sample_rate"]
        wav16 = resample(waveform, sample_rate, rate16)
        need = round(duration * rate16)
        wav16 = np.pad(wav16[:need], (0, max(0, need - wav16.size)))[None]
        frames = self.manifest.frames(duration)
        samples = frames * self.manifest.shapes["samples_per_frame"]
        if audio_noise is None:
            channels = self.manifest.shapes["latent_channels"]
            audio_noise = batch_noise(seed, [0], (channels, frames), samples)[1]
        x0 = (np.asarray(audio_noise, np.float32).reshape(1, samples)
              * np.float32(self.defaults["noise_scale"])).astype(np.float32)
        bucket = self._batch_bucket(1)
        wav16, x0 = np.repeat(wav16, bucket, axis=0), np.repeat(x0, bucket, axis=0)
        timings = {}
        start = time.perf_counter()
        latents = self.backend.encode_audio(wav16, duration)
        timings["encode"] = time.perf_counter() - start
        t = time.perf_counter()
        audio = self.backend.vocoder_loop(latents, x0, vocoder_t_span(vocoder_steps), vocoder_steps, progress)
        timings["vocoder"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - start
        keep = min(samples, round(waveform.size * self.sample_rate / sample_rate))
        audio = finish_waveform(audio[:1, :keep], bool(self.defaults["clamp"]))
        return GenerationResult(audio, self.sample_rate, timings)

    def close(self) -> None:
        self.backend.close()
