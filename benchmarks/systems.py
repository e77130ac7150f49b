"""The systems under test and how one (system, batch size) row is measured.

PyTorch systems (``semvoc.models``, weights ``build_model(preset(name), seed)``, the engine's
``tokenizer.json``, the same seeded noise as the runtime):

- ``torch-fp32``: official-equivalent eager fp32 with TF32 off (as the official inference
  script sets it); it runs the official loop, including the sway schedule's last DiT call (dt = 0);
- ``torch-fp16``: the same under ``torch.autocast("cuda", dtype=torch.float16)``, with the
  vocoder's ``torch.stft``/``torch.istft`` kept in fp32 (cuFFT refuses half precision for
  n_fft that is not a power of two): each ``SpectralTransform`` runs outside autocast on a
  float32 input;
- ``torch-compile``: fp16 autocast as above, plus ``torch.compile(mode=...)`` of the DiT and of
  the vocoder's ``process_model`` (``max-autotune``, which uses CUDA graphs, or
  ``reduce-overhead``); compiling happens in the warm-up, under a time budget.

semvoc systems: ``semvoc.runtime.Pipeline(engine, backend)`` with ``onnxruntime-cuda``
(``semvoc-cuda``), ``onnxruntime-cpu`` (``semvoc-cpu``) or ``tensorrt``.

Timing: warm-up runs are excluded; each measured run is one request of ``batch`` prompts,
timed with ``time.perf_counter`` from tokenization to the waveform on the host (the initial
noise is drawn before, the same arrays for every system). Stages: PyTorch stages are separated by
``torch.cuda.synchronize()``; semvoc's come from ``GenerationResult.timings``.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.stats import summarize

SYSTEMS = ("torch-fp32", "torch-fp16", "torch-compile", "semvoc-cuda", "semvoc-cpu", "tensorrt")
TORCH_SYSTEMS = ("torch-fp32", "torch-fp16", "torch-compile")
SEMVOC_BACKENDS = {"semvoc-cuda": "onnxruntime-cuda", "semvoc-cpu": "onnxruntime-cpu", "tensorrt": "tensorrt"}
GPU_ONLY = ("torch-fp16", "torch-compile", "semvoc-cuda", "tensorrt")
COMPILE_MODES = ("max-autotune", "reduce-overhead", "max-autotune-no-cudagraphs", "default")

GenerateFn = Callable[[], tuple[np.ndarray, dict[str, float], int]]  # audio, stage seconds, DiT calls


class BenchmarkError(RuntimeError):
    """A benchmark request the harness refuses (wrong engine, bucket, options); says what to do."""


@dataclass
class Workload:
    """What every system generates: the same prompts, tokens, noise and settings."""

    engine: Path
    preset: str
    model_seed: int
    noise_seed: int
    batch_sizes: list[int]
    duration_s: float
    steps: int
    vocoder_steps: int
    guidance: float
    runs: int
    warmup: int
    device: str
    device_id: int
    prompts_file: Path
    compile_mode: str = "max-autotune"
    compile_budget_s: float = 1800.0
    threads: int | None = None
    # from the engine's manifest
    sway: float | None = -1.0
    frames: int = 0
    samples: int = 0
    sample_rate: int = 24000
    latent_channels: int = 0
    text_tokens: int = 0
    _captions: list[str] = field(default_factory=list, repr=False)

    def captions(self) -> list[str]:
        if not self._captions:
            import json

            lines = Path(self.prompts_file).read_text().splitlines()
            self._captions = [json.loads(line)["caption"] for line in lines if line.strip()]
        return self._captions

    def prompts(self, batch: int) -> list[str]:
        captions = self.captions()
        if batch > len(captions):
            raise BenchmarkError(f"batch {batch} needs {batch} prompts; {self.prompts_file} has {len(captions)}")
        return captions[:batch]

    def noise(self, batch: int) -> tuple[np.ndarray, np.ndarray]:
        from semvoc.runtime.noise import batch_noise

        return batch_noise(self.noise_seed, list(range(batch)), (self.latent_channels, self.frames), self.samples)

    @property
    def audio_seconds_per_clip(self) -> float:
        return self.samples / self.sample_rate

    def torch_dit_calls(self) -> int:
        """Backbone calls of the official loop (the sway schedule's dt = 0 call included)."""
        from semvoc.runtime.schedules import dit_schedule

        return dit_schedule(self.steps, self.sway).num_calls


# ------------------------------------------------------------------------------ rows


def base_row(system: str, batch: int, status: str, note: str = "") -> dict:
    return {"system": system, "batch": batch, "status": status, "note": note}


def not_measured_rows(system: str, workload: Workload, status: str, note: str) -> list[dict]:
    return [base_row(system, b, status, note) for b in workload.batch_sizes]


def measured_row(system: str, batch: int, workload: Workload, walls: list[float],
                 stages: list[dict[str, float]], dit_calls: int) -> dict:
    """The figures of one (system, batch) from its measured runs."""
    wall = summarize(walls)
    stage_stats = {k: summarize([s[k] for s in stages]) for k in ("text", "dit", "vocoder")}
    median = wall["median"]
    audio_s = batch * workload.audio_seconds_per_clip
    row = base_row(system, batch, "ok")
    row.update({
        "runs": len(walls),
        "wall_s": wall,
        "stages_s": stage_stats,
        "per_clip_s": median / batch,
        "clips_per_s": batch / median,
        "rtf": median / audio_s,
        "dit_calls": dit_calls,
        "vocoder_steps": workload.vocoder_steps,
        "dit_step_ms": stage_stats["dit"]["median"] / dit_calls * 1e3 if dit_calls else None,
        "vocoder_step_ms": stage_stats["vocoder"]["median"] / workload.vocoder_steps * 1e3,
    })
    return row


class CompileBudgetExceeded(BaseException):
    """Raised by the alarm inside a compile warm-up (a BaseException: nothing in the compiler
    that catches ``Exception`` to fall back may swallow it)."""


@contextlib.contextmanager
def time_budget(seconds: float | None) -> Iterator[None]:
    """Raise ``CompileBudgetExceeded`` in the main thread after ``seconds`` (POSIX alarm).

    Where no alarm can be set (not the main thread, no SIGALRM), the caller's own elapsed-time
    check is the only guard.
    """
    usable = (seconds is not None and seconds > 0 and hasattr(signal, "setitimer")
              and threading.current_thread() is threading.main_thread())
    if not usable:
        yield
        return

    def on_alarm(signum, frame):
        raise CompileBudgetExceeded()

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, float(seconds))  # type: ignore[arg-type]
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0.0)
        signal.signal(signal.SIGALRM, previous)


def warm_up(generate: GenerateFn, count: int) -> float | None:
    """``count`` untimed calls; returns the first one's seconds (None when count is 0)."""
    first = None
    for i in range(count):
        t = time.perf_counter()
        generate()
        if i == 0:
            first = time.perf_counter() - t
    return first


def measure(generate: GenerateFn, runs: int, warmup: int, before_runs: Callable[[], None] | None = None
            ) -> tuple[list[float], list[dict[str, float]], int, np.ndarray, float | None]:
    """Warm-up (excluded), then ``runs`` timed calls: walls, stages, DiT calls, last audio, first call."""
    first = warm_up(generate, warmup)
    if before_runs:
        before_runs()
    walls, stages = [], []
    audio, calls = np.zeros(0, np.float32), 0
    for _ in range(runs):
        t = time.perf_counter()
        audio, stage, calls = generate()
        walls.append(time.perf_counter() - t)
        stages.append(stage)
    return walls, stages, calls, audio, first


def audio_checks(row: dict, audio: np.ndarray, audio_dir: Path | None) -> None:
    row["finite"] = bool(np.isfinite(audio).all())
    row["audio_shape"] = list(audio.shape)
    if audio_dir is not None:
        path = Path(audio_dir) / f"{row['system']}-b{row['batch']}.npy"
        np.save(path, audio.astype(np.float32))
        row["audio_file"] = str(path)


# ------------------------------------------------------------------------------ PyTorch


class TorchRunner:
    """The PyTorch systems over one model (built once, shared by the systems of a process)."""

    def __init__(self, workload: Workload):
        import torch

        from semvoc.models import build_model, preset
        from semvoc.models.pipeline import EagerPipeline
        from semvoc.runtime.tokenizer import TextTokenizer

        self.torch = torch
        self.workload = workload
        if workload.device == "cuda":
            if not torch.cuda.is_available():
                raise BenchmarkError("--device cuda, but PyTorch sees no CUDA GPU")
            self.device = torch.device("cuda", workload.device_id)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        # The official inference script turns TF32 off; every PyTorch system here runs so.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
        if workload.threads:
            torch.set_num_threads(workload.threads)
        t = time.perf_counter()
        model = build_model(preset(workload.preset), seed=workload.model_seed)
        model.semantic_encoder = None  # text-to-audio does not use it; keep it off the card
        tokenizer = TextTokenizer(workload.engine / "tokenizer.json", workload.text_tokens)
        self.pipe = EagerPipeline(model, tokenizer, self.device)
        self.model = self.pipe.model
        self.build_s = time.perf_counter() - t
        self.card = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"

    def settings(self) -> dict:
        t = self.torch
        return {"torch": t.__version__, "cuda": t.version.cuda, "cudnn": t.backends.cudnn.version(),
                "threads": t.get_num_threads(), "tf32_matmul": t.backends.cuda.matmul.allow_tf32,
                "tf32_cudnn": t.backends.cudnn.allow_tf32,
                "float32_matmul_precision": t.get_float32_matmul_precision(), "model_build_s": self.build_s}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def _autocast(self, enabled: bool):
        if not enabled:
            return contextlib.nullcontext()
        return self.torch.autocast(self.device.type, dtype=self.torch.float16)

    @contextlib.contextmanager
    def _fp32_spectral(self) -> Iterator[None]:
        """Run every STFT/iSTFT of the vocoder outside autocast, on float32 input."""
        from semvoc.models.vocoder import SpectralTransform

        torch = self.torch
        patched = []
        for module in self.model.vocoder.modules():
            if isinstance(module, SpectralTransform):
                original = module.forward

                def forward(x, _original=original):
                    with torch.autocast(x.device.type, enabled=False):
                        return _original(x.float())

                module.forward = forward  # type: ignore[method-assign]
                patched.append(module)
        try:
            yield
        finally:
            for module in patched:
                del module.forward

    def _generate_fn(self, batch: int, autocast: bool, dit: Any) -> GenerateFn:
        from semvoc.models.sampling import dit_sample

        torch, w = self.torch, self.workload
        prompts = w.prompts(batch)
        latent_noise, audio_noise = w.noise(batch)
        tokenizer = self.pipe.tokenizer
        calls = w.torch_dit_calls()

        def generate() -> tuple[np.ndarray, dict[str, float], int]:
            tokens = tokenizer(prompts, warn=False)
            with torch.no_grad(), self._autocast(autocast):
                t0 = time.perf_counter()
                context, mask = self.pipe.encode_text(tokens.input_ids, tokens.attention_mask)
                self._sync()
                t1 = time.perf_counter()
                latent = dit_sample(dit, context, mask, torch.as_tensor(latent_noise, device=self.device),
                                    w.steps, w.guidance, w.sway)
                self._sync()
                t2 = time.perf_counter()
                audio = self.pipe.latents_to_audio(latent, audio_noise, w.vocoder_steps).float().cpu().numpy()
                t3 = time.perf_counter()
            return audio, {"text": t1 - t0, "dit": t2 - t1, "vocoder": t3 - t2}, calls

        return generate

    def _reset_peak(self) -> None:
        if self.device.type == "cuda":
            self._sync()
            self.torch.cuda.reset_peak_memory_stats(self.device)

    def _memory(self, row: dict) -> None:
        if self.device.type == "cuda":
            row["peak_mem_mib"] = self.torch.cuda.max_memory_allocated(self.device) / 2**20
            row["peak_mem_reserved_mib"] = self.torch.cuda.max_memory_reserved(self.device) / 2**20
            row["peak_mem_method"] = ("torch.cuda.max_memory_allocated over the measured runs "
                                      "(weights included)")
        else:
            row["peak_mem_mib"] = None
            row["peak_mem_method"] = "not recorded: CPU run (no GPU memory)"

    def run(self, system: str, audio_dir: Path | None, log: Callable[[str], None]) -> list[dict]:
        if system == "torch-compile":
            return self._run_compiled(audio_dir, log)
        autocast = system == "torch-fp16"
        rows = []
        with self._fp32_spectral() if autocast else contextlib.nullcontext():
            for batch in self.workload.batch_sizes:
                log(f"{system} batch {batch}: {self.workload.warmup} warm-up + {self.workload.runs} runs")
                fn = self._generate_fn(batch, autocast, self.model.dit)
                walls, stages, calls, audio, first = measure(fn, self.workload.runs, self.workload.warmup,
                                                             self._reset_peak)
                row = measured_row(system, batch, self.workload, walls, stages, calls)
                row.update(first_call_s=first, card=self.card, precision="fp16 autocast" if autocast else "fp32")
                self._memory(row)
                audio_checks(row, audio, audio_dir)
                rows.append(row)
                log(f"  median {row['wall_s']['median']:.3f} s")
        return rows

    def _run_compiled(self, audio_dir: Path | None, log: Callable[[str], None]) -> list[dict]:
        torch, w = self.torch, self.workload
        mode = w.compile_mode
        for name in ("recompile_limit", "cache_size_limit"):  # one static graph per batch size
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 8 * len(w.batch_sizes)))
        vocoder = self.model.vocoder
        compiled_dit = torch.compile(self.model.dit, mode=mode, dynamic=False)
        vocoder.process_model = torch.compile(vocoder.process_model, mode=mode, dynamic=False)
        rows: list[dict] = []
        try:
            with self._fp32_spectral():
                for batch in w.batch_sizes:
                    if rows and rows[-1]["status"] != "ok":
                        rows.append(base_row("torch-compile", batch, "not measured",
                                             f"skipped: compiling did not finish for batch {rows[-1]['batch']}"))
                        continue
                    rows.append(self._compiled_row(batch, compiled_dit, audio_dir, log))
        finally:
            del vocoder.process_model
            torch._dynamo.reset()
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        return rows

    def _compiled_row(self, batch: int, compiled_dit: Any, audio_dir: Path | None,
                      log: Callable[[str], None]) -> dict:
        w = self.workload
        budget = w.compile_budget_s
        warmups = max(1, w.warmup)
        log(f"torch-compile ({w.compile_mode}) batch {batch}: compiling in {warmups} warm-up run(s), "
            f"budget {budget:g} s")
        fn = self._generate_fn(batch, True, compiled_dit)
        start = time.perf_counter()
        first = None
        try:
            with time_budget(budget):
                first = warm_up(fn, warmups)
        except CompileBudgetExceeded:
            self._sync()
            row = base_row("torch-compile", batch, "not measured",
                           f"did not finish compiling within {budget:g} s (mode {w.compile_mode})")
            row.update(compile_mode=w.compile_mode, compile_budget_s=budget)
            log(f"  {row['note']}")
            return row
        warm_s = time.perf_counter() - start
        if warm_s > budget:  # the alarm could not interrupt (a long call outside Python)
            row = base_row("torch-compile", batch, "not measured",
                           f"did not finish compiling within {budget:g} s (took {warm_s:.0f} s; "
                           f"mode {w.compile_mode})")
            row.update(compile_mode=w.compile_mode, compile_budget_s=budget, warmup_s=warm_s)
            return row
        walls, stages, calls, audio, _ = measure(fn, w.runs, 0, self._reset_peak)
        row = measured_row("torch-compile", batch, w, walls, stages, calls)
        row.update(first_call_s=first, warmup_s=warm_s, compile_mode=w.compile_mode, compile_budget_s=budget,
                   compile_s=(first - row["wall_s"]["median"]) if first is not None else None,
                   card=self.card, precision="fp16 autocast")
        row["compile_note"] = ("compile_s = first warm-up call - median measured call: Dynamo + Inductor "
                               "(+ autotuning) + CUDA-graph recording for this batch size")
        self._memory(row)
        audio_checks(row, audio, audio_dir)
        log(f"  compiled in ~{row['compile_s']:.1f} s; median {row['wall_s']['median']:.3f} s")
        return row


# ------------------------------------------------------------------------------ semvoc


def run_semvoc(system: str, workload: Workload, audio_dir: Path | None, log: Callable[[str], None]) -> list[dict]:
    """One semvoc system (runtime ``Pipeline``) over every batch size."""
    backend = SEMVOC_BACKENDS[system]
    if system == "tensorrt" and importlib.util.find_spec("tensorrt") is None:
        return not_measured_rows(system, workload, "not installed", "TensorRT is not installed (pip install "
                                 "'semvoc[trt]' on a machine with an NVIDIA GPU)")
    from benchmarks.machine import NvmlMemorySampler
    from semvoc.runtime import Pipeline

    gpu = backend != "onnxruntime-cpu"
    sampler = NvmlMemorySampler(workload.device_id) if gpu else None
    torch = sys.modules.get("torch")
    if gpu and torch is not None and torch.cuda.is_available():  # a process that also ran torch (--no-isolate)
        torch.cuda.empty_cache()
    baseline = sampler.used() if sampler else None
    t = time.perf_counter()
    try:
        pipe = Pipeline(workload.engine, backend, device_id=workload.device_id, threads=workload.threads)
    except Exception as err:  # BackendUnavailable, EngineError, a missing backend module...
        return not_measured_rows(system, workload, "unavailable", f"{type(err).__name__}: {err}")
    load_s = time.perf_counter() - t
    card = _gpu_name(workload.device_id) if gpu else "cpu"
    rows = []
    try:
        for batch in workload.batch_sizes:
            prompts = workload.prompts(batch)
            latent_noise, audio_noise = workload.noise(batch)

            def generate(prompts=prompts, latent_noise=latent_noise, audio_noise=audio_noise):
                result = pipe.generate(prompts, seed=workload.noise_seed, steps=workload.steps,
                                       vocoder_steps=workload.vocoder_steps, guidance=workload.guidance,
                                       duration=workload.duration_s, latent_noise=latent_noise,
                                       audio_noise=audio_noise)
                return result.audio, dict(result.timings), result.dit_calls

            log(f"{system} batch {batch}: {workload.warmup} warm-up + {workload.runs} runs")
            peak: dict[str, int | None] = {}

            def before_runs() -> None:
                if sampler and sampler.available:
                    sampler.start()

            try:
                walls, stages, calls, audio, first = measure(generate, workload.runs, workload.warmup, before_runs)
            finally:
                peak["used"] = sampler.stop() if sampler else None
            row = measured_row(system, batch, workload, walls, stages, calls)
            row.update(first_call_s=first, load_s=load_s, card=card, backend=pipe.backend.describe(),
                       precision=pipe.manifest.data.get("precision", {}).get("dtype"))
            if not gpu:
                row.update(peak_mem_mib=None, peak_mem_method="not recorded: CPU run (no GPU memory)")
            elif peak["used"] is not None and baseline is not None:
                row.update(peak_mem_mib=(peak["used"] - baseline) / 2**20,
                           peak_mem_method=("NVML device used memory: peak during the measured runs minus "
                                            "before the Pipeline was created (device-wide; includes the "
                                            "buffers of earlier batch buckets and onnxruntime's arena)"))
            else:
                row.update(peak_mem_mib=None, peak_mem_method=f"not recorded: {sampler.reason if sampler else ''}")
            audio_checks(row, audio, audio_dir)
            rows.append(row)
            log(f"  median {row['wall_s']['median']:.3f} s")
    except Exception as err:
        done = {r["batch"] for r in rows}
        rows += [base_row(system, b, "failed", f"{type(err).__name__}: {err}")
                 for b in workload.batch_sizes if b not in done]
    finally:
        pipe.close()
        gc.collect()
    return rows


def _gpu_name(device_id: int) -> str | None:
    from benchmarks.machine import gpu_info

    return gpu_info(device_id).get("name")


def run_systems(systems: list[str], workload: Workload, audio_dir: Path | None,
                log: Callable[[str], None] = print) -> tuple[list[dict], dict]:
    """Run ``systems`` in this process; returns rows and what the process saw (card, torch settings)."""
    rows: list[dict] = []
    seen: dict[str, Any] = {}
    runner: TorchRunner | None = None
    for system in systems:
        if workload.device == "cpu" and system in GPU_ONLY:
            rows += not_measured_rows(system, workload, "not applicable", "needs a GPU (--device cuda)")
            continue
        if system in TORCH_SYSTEMS:
            if importlib.util.find_spec("torch") is None:
                rows += not_measured_rows(system, workload, "not installed", "PyTorch is not installed")
                continue
            try:
                if runner is None:
                    log(f"building the {workload.preset} model (seed {workload.model_seed}) for PyTorch")
                    runner = TorchRunner(workload)
                    seen["torch"] = runner.settings()
                    seen["card"] = runner.card
                rows += runner.run(system, audio_dir, log)
            except Exception as err:
                done = {r["batch"] for r in rows if r["system"] == system}
                rows += [base_row(system, b, "failed", f"{type(err).__name__}: {err}")
                         for b in workload.batch_sizes if b not in done]
                log(f"{system} failed: {type(err).__name__}: {err}")
        else:
            rows += run_semvoc(system, workload, audio_dir, log)
    if runner is not None:
        del runner
        gc.collect()
    return rows, seen
