"""onnxruntime CUDA backend (CUDA graphs) against the CPU backend. Skipped without a CUDA GPU
and onnxruntime-gpu (CI has neither; the H100 measurements are in benchmarks/results/)."""

from __future__ import annotations

import numpy as np
import pytest

from semvoc.runtime.backends.ort_common import cuda_available

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not cuda_available(), reason="needs a CUDA GPU with onnxruntime-gpu")]


def test_cuda_backend_matches_cpu_and_captures_cuda_graphs(demo_engine):
    from semvoc.runtime import Pipeline

    prompts = ["a dog barks while rain falls", "church bells ring"]
    cpu = Pipeline(demo_engine, "onnxruntime-cpu").generate(prompts, seed=2, steps=8, vocoder_steps=6)
    gpu_pipe = Pipeline(demo_engine, "onnxruntime-cuda")
    first = gpu_pipe.generate(prompts, seed=2, steps=8, vocoder_steps=6)
    again = gpu_pipe.generate(prompts, seed=2, steps=8, vocoder_steps=6)
    assert np.abs(first.audio - cpu.audio).max() <= 1e-3
    assert np.array_equal(first.audio, again.audio)  # deterministic kernels, replayed graphs
    assert "dit_step" in gpu_pipe.backend.describe() and "vocoder_step" in gpu_pipe.backend.describe()
    assert not gpu_pipe.backend.capture_failures


def test_cuda_resynthesis_matches_cpu(demo_engine):
    from semvoc.runtime import Pipeline

    wav = np.random.default_rng(1).uniform(-0.3, 0.3, 24000).astype(np.float32)
    cpu = Pipeline(demo_engine, "onnxruntime-cpu").resynthesize(wav, 24000, vocoder_steps=4)
    gpu = Pipeline(demo_engine, "onnxruntime-cuda").resynthesize(wav, 24000, vocoder_steps=4)
    assert np.abs(gpu.audio - cpu.audio).max() <= 1e-3
