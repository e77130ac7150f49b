"""onnxruntime CUDA backend (CUDA graphs) against the CPU backend. Skipped without a CUDA GPU
and onnxruntime-gpu (CI has neither; the H100 measurements are in benchmarks/results/)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from semvoc.runtime.backends.cuda_graph import import_cudart
from semvoc.runtime.backends.ort_common import cuda_available
from semvoc.runtime.backends.ort_cuda import BRANCH_STREAMS_ENV, GRAPHS_ENV

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not cuda_available(), reason="needs a CUDA GPU with onnxruntime-gpu")]


def _has_cuda_python() -> bool:
    try:
        import_cudart()
    except ImportError:
        return False
    return True


needs_cuda_python = pytest.mark.skipif(not _has_cuda_python(), reason="needs cuda-python (pip install 'semvoc[gpu]')")
MODE_TEXT = {"semvoc": "whole-loop CUDA graphs", "onnxruntime": "onnxruntime's per-step CUDA graphs"}


def _check_loop_modes(backend, mode: str) -> None:
    """Both loops ran from CUDA graphs: onnxruntime's always; whole-loop ones where the capture
    was safe, else onnxruntime's, with the reason recorded (onnxruntime-gpu 1.31.1 on an H200
    allocates and copies inside most captured runs, which the whole-loop check refuses)."""
    described = backend.describe()
    ran = {key[0]: loop.mode for key, loop in backend._loops.items()}
    assert set(ran) == {"dit_step", "vocoder_step"}, described
    if mode == "onnxruntime":
        assert set(ran.values()) == {"onnxruntime"} and not backend.capture_failures, described
    else:
        for graph, how in ran.items():
            assert how in ("semvoc", "onnxruntime"), described
            if how == "onnxruntime":
                reasons = [f for f in backend.capture_failures if f.startswith(f"{graph} (whole-loop CUDA graphs)")]
                assert reasons, described


@pytest.mark.parametrize("mode", ["onnxruntime", pytest.param("semvoc", marks=needs_cuda_python)])
def test_cuda_backend_matches_cpu_and_captures_cuda_graphs(demo_engine, monkeypatch, mode):
    from semvoc.runtime import Pipeline

    monkeypatch.setenv(GRAPHS_ENV, mode)
    prompts = ["a dog barks while rain falls", "church bells ring"]
    cpu = Pipeline(demo_engine, "onnxruntime-cpu").generate(prompts, seed=2, steps=8, vocoder_steps=6)
    gpu_pipe = Pipeline(demo_engine, "onnxruntime-cuda")
    first = gpu_pipe.generate(prompts, seed=2, steps=8, vocoder_steps=6)
    again = gpu_pipe.generate(prompts, seed=2, steps=8, vocoder_steps=6)
    assert np.abs(first.audio - cpu.audio).max() <= 1e-3
    assert np.array_equal(first.audio, again.audio)  # deterministic kernels, replayed graphs
    _check_loop_modes(gpu_pipe.backend, mode)
    # both requests replayed the text encoder's graph, captured by prepare()
    assert "text_encoder from onnxruntime's CUDA graph (batch 2)" in gpu_pipe.backend.describe()


@needs_cuda_python
def test_whole_loop_graphs_give_the_audio_of_onnxruntimes_graphs_bit_for_bit(demo_engine, monkeypatch):
    """The same seed gives the same samples whether semvoc launches whole loops or onnxruntime
    replays one graph per step; odd step counts end with the one-step graph."""
    from semvoc.runtime import Pipeline

    prompts = ["a dog barks while rain falls", "church bells ring"]
    audio = {}
    for mode in ("onnxruntime", "semvoc"):
        monkeypatch.setenv(GRAPHS_ENV, mode)
        pipe = Pipeline(demo_engine, "onnxruntime-cuda")
        audio[mode] = [pipe.generate(prompts, seed=5, steps=steps, vocoder_steps=vocoder_steps).audio
                       for steps, vocoder_steps in ((7, 5), (8, 6), (7, 5))]
        _check_loop_modes(pipe.backend, mode)
        pipe.close()
    for reference, whole_loop in zip(audio["onnxruntime"], audio["semvoc"], strict=True):
        assert np.array_equal(reference, whole_loop)
    assert np.array_equal(audio["semvoc"][0], audio["semvoc"][2])  # the graphs replay the same way again


@pytest.fixture(scope="module")
def kernels_engine(tmp_path_factory):
    """The demo model exported for the GPU with semvoc's vocoder ops (fp16), as GPU engines are: its
    vocoder step is captured whole in the whole-loop graphs (the fp32 demo engine's is not: it
    copies from the host)."""
    torch = pytest.importorskip("torch")
    from semvoc.export.cli import main
    from semvoc.kernels import cuda_build

    if not torch.cuda.is_available():
        pytest.skip("needs PyTorch with CUDA to export on the GPU")
    try:
        cuda_build.find_nvcc()
    except cuda_build.KernelBuildError as err:
        pytest.skip(f"needs nvcc to build semvoc's CUDA ops: {err}")
    out = tmp_path_factory.mktemp("engines") / "demo-kernels"
    assert main(["--preset", "demo", "--durations", "1", "--max-text-tokens", "24", "--max-steps", "16",
                 "--max-vocoder-steps", "16", "--batch-sizes", "1,2", "--fp16", "--cuda-kernels", "vocoder",
                 "--device", "cuda", "--out", str(out)]) == 0
    return out


# One process per setting (the parts side by side, or the step whole): a crash in one is reported
# with its output, and the other setting still runs. The child says which request it is on.
_BRANCHES_PROCESS = """
import json, sys
import numpy as np
from semvoc.runtime import Pipeline
engine, streams, out = sys.argv[1:4]
pipe = Pipeline(engine, "onnxruntime-cuda")
prompts = ["a dog barks while rain falls", "church bells ring"]
audio, parts = {}, {}
for batch in (1, 2):
    for vocoder_steps in (6, 5):  # an odd count ends with the one-step graph
        print(f"request: batch {batch}, {vocoder_steps} vocoder steps", flush=True)
        audio[f"b{batch}_v{vocoder_steps}"] = pipe.generate(prompts[:batch], seed=3, steps=4,
                                                          vocoder_steps=vocoder_steps).audio
    loop = pipe.backend._loops[("vocoder_step", batch, pipe.manifest.frames(1.0))]
    parts[batch] = [loop.mode, loop.parts is not None]
if streams != "0":  # the parts read the one device copy of the step's weights: zero it
    print("request: zeroed weights", flush=True)
    shared = pipe.backend._weights["vocoder_step"]
    for w in pipe.manifest.graph("vocoder_step").weights:
        shared.initializers[w.name].update_inplace(np.zeros(w.shape, w.dtype))
    audio["zeroed"] = pipe.generate(prompts, seed=3, steps=4, vocoder_steps=5).audio
np.savez(out, **audio)
print(json.dumps({"parts": parts, "described": pipe.backend.describe(), "failures": pipe.backend.capture_failures}))
pipe.close()
"""


def _run_branches_process(engine, streams: str, out) -> dict:
    env = {**os.environ, GRAPHS_ENV: "semvoc", BRANCH_STREAMS_ENV: streams}
    done = subprocess.run([sys.executable, "-X", "faulthandler", "-c", _BRANCHES_PROCESS, str(engine), streams,
                           str(out)], capture_output=True, text=True, env=env, cwd=Path(__file__).parents[1])
    assert done.returncode == 0, (f"SEMVOC_BRANCH_STREAMS={streams}: exit {done.returncode}\n"
                                  f"{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


@needs_cuda_python
def test_the_vocoder_branches_side_by_side_give_the_audio_of_the_whole_step(kernels_engine, tmp_path):
    """The vocoder step run as its parts, branches on streams of their own in the captured loop,
    gives the samples of the step run whole (``SEMVOC_BRANCH_STREAMS=0``) bit for bit, at batch 1
    and 2, with even and odd step counts; and its parts read the one device copy of the step's
    weights."""
    whole = _run_branches_process(kernels_engine, "0", tmp_path / "whole.npz")
    split = _run_branches_process(kernels_engine, "2", tmp_path / "split.npz")
    assert whole["parts"] == {"1": ["semvoc", False], "2": ["semvoc", False]}, whole
    assert split["parts"] == {"1": ["semvoc", True], "2": ["semvoc", True]}, split
    assert "branches side by side on CUDA streams: vocoder_step" in split["described"]
    expected, got = np.load(tmp_path / "whole.npz"), np.load(tmp_path / "split.npz")
    for case in expected.files:
        assert np.array_equal(got[case], expected[case]), case
    assert not np.allclose(got["zeroed"], got["b2_v5"])


def test_cuda_resynthesis_matches_cpu(demo_engine):
    from semvoc.runtime import Pipeline

    wav = np.random.default_rng(1).uniform(-0.3, 0.3, 24000).astype(np.float32)
    cpu = Pipeline(demo_engine, "onnxruntime-cpu").resynthesize(wav, 24000, vocoder_steps=4)
    gpu = Pipeline(demo_engine, "onnxruntime-cuda").resynthesize(wav, 24000, vocoder_steps=4)
    assert np.abs(gpu.audio - cpu.audio).max() <= 1e-3


def test_cuda_buckets_share_one_copy_of_the_step_weights(demo_engine):
    """Sessions of two batch buckets (and their CUDA graphs) read one device copy of the DiT's
    weights: overwriting it changes both buckets' audio."""
    from semvoc.runtime import Pipeline

    one, two = ["a dog barks while rain falls"], ["a dog barks while rain falls", "church bells ring"]
    request = {"seed": 2, "steps": 8, "vocoder_steps": 6}
    cpu = Pipeline(demo_engine, "onnxruntime-cpu")
    pipe = Pipeline(demo_engine, "onnxruntime-cuda")
    before = [pipe.generate(p, **request).audio for p in (one, two)]
    for prompts, audio in zip((one, two), before, strict=True):
        assert np.abs(audio - cpu.generate(prompts, **request).audio).max() <= 1e-3
    backend = pipe.backend
    assert "weights shared by all buckets: dit_step" in backend.describe() and not backend.sharing_failures
    shared = backend._weights["dit_step"]
    for w in pipe.manifest.graph("dit_step").weights:
        shared.initializers[w.name].update_inplace(np.zeros(w.shape, w.dtype))
    after = [pipe.generate(p, **request).audio for p in (one, two)]
    assert all(not np.allclose(a, b) for a, b in zip(after, before, strict=True))
