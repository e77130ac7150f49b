"""The TensorRT path where TensorRT is absent: refusals, reasons, and the shapes of its profiles.

TensorRT itself is never imported here (``sys.modules["tensorrt"] = None`` makes the import fail
even on a machine that has it); the plan builder and the backend are unverified (see their
module docstrings).
"""

from __future__ import annotations

import enum
import json
import sys
import types
from types import SimpleNamespace

import pytest

from semvoc.export.trt import graph_profiles, profile_shapes
from semvoc.runtime.backends.base import BackendUnavailable
from semvoc.runtime.backends.tensorrt import profile_index, tensorrt_available
from semvoc.runtime.manifest import EngineError, Manifest
from semvoc.runtime.select import auto_backend, make_backend

NOT_INSTALLED = "tensorrt is not installed (pip install 'semvoc[trt]')"


def _tensor(name, dtype, shape):
    return {"name": name, "dtype": dtype, "shape": shape}


# shaped like graphs.graph_specs: 8 latent channels, 13 time rows of width 64, 2 blocks of 4 heads
DIT_STEP = {
    "kind": "dit_step", "component": "dit", "file": "dit_step.onnx", "duration_s": None,
    "inputs": [_tensor("latent", "float32", ["batch", 8, "frames"]), _tensor("step", "int64", [1]),
               _tensor("time_table", "float16", ["dit_rows", 13, 64]),
               _tensor("sigmas", "float32", ["dit_rows+1"]),
               _tensor("cross_kv", "float16", [2, 2, "2*batch", 4, 128, 16]),
               _tensor("context_mask", "bool", ["batch", 128]), _tensor("guidance", "float32", [1])],
    "outputs": [_tensor("latent_next", "float32", ["batch", 8, "frames"]), _tensor("step_next", "int64", [1])]}

# 960 samples per frame; two branches of hop 240 and 120 (4 and 8 columns per frame, plus one)
VOCODER_STEP = {
    "kind": "vocoder_step", "component": "vocoder", "file": "vocoder_step.onnx", "duration_s": None,
    "inputs": [_tensor("audio", "float32", ["batch", "frames*960"]), _tensor("step", "int64", [1]),
               _tensor("t_span", "float32", ["vocoder_rows+1"]),
               _tensor("cond_bias_0", "float16", [3, "batch", 32, "4*frames + 1"]),
               _tensor("cond_bias_1", "float16", [3, "batch", 16, "frames*8+1"]),
               _tensor("time_scale_0", "float16", ["vocoder_rows", 3, 32])],
    "outputs": [_tensor("audio_next", "float32", ["batch", "frames*960"]), _tensor("step_next", "int64", [1])]}

TEXT_ENCODER = {
    "kind": "text_encoder", "component": "text", "file": "text_encoder.onnx", "duration_s": None,
    "inputs": [_tensor("input_ids", "int64", ["batch", 128]), _tensor("attention_mask", "int64", ["batch", 128])],
    "outputs": [_tensor("context", "float32", ["batch", 128, 32])]}

DIT_TIME = {
    "kind": "dit_time", "component": "dit", "file": "dit_time.onnx", "duration_s": None,
    "inputs": [_tensor("timesteps", "float32", ["dit_rows"])],
    "outputs": [_tensor("time_table", "float16", ["dit_rows", 13, 64])]}

BUCKETS = {"dit_rows": 251, "vocoder_rows": 401}
OPTIONS = SimpleNamespace(batch_sizes=(1, 4), durations=(5.0, 10.0), max_dit_steps=250, max_vocoder_steps=400)


def _manifest(tmp_path, plans: bool) -> Manifest:
    graphs = {name: dict(entry) for name, entry in
              {"text_encoder": TEXT_ENCODER, "dit_time": DIT_TIME, "dit_step": DIT_STEP,
               "vocoder_step": VOCODER_STEP}.items()}
    tensorrt = None
    if plans:
        for name, entry in graphs.items():
            entry["plan_file"] = f"{name}.plan"
        tensorrt = {"plans": {name: f"{name}.plan" for name in graphs}, "verified": False}
    return Manifest(tmp_path, {"graphs": graphs, "tensorrt": tensorrt, "buckets": BUCKETS})


class _CudaError(enum.Enum):
    cudaSuccess = 0
    cudaErrorNoDevice = 100


def _fake_modules(monkeypatch, devices: int | None) -> None:
    """A stand-in ``tensorrt`` module, and cuda-python's runtime answering ``devices`` devices
    (None: cuda-python is missing)."""
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    if devices is None:
        for name in ("cuda", "cuda.bindings", "cuda.bindings.runtime"):
            monkeypatch.setitem(sys.modules, name, None)
        return
    runtime = types.ModuleType("cuda.bindings.runtime")
    runtime.cudaError_t = _CudaError
    runtime.cudaGetDeviceCount = lambda: (
        (_CudaError.cudaSuccess, devices) if devices else (_CudaError.cudaErrorNoDevice, 0))
    bindings = types.ModuleType("cuda.bindings")
    bindings.runtime = runtime
    cuda = types.ModuleType("cuda")
    cuda.bindings = bindings
    for module in (cuda, bindings, runtime):
        monkeypatch.setitem(sys.modules, module.__name__, module)


# ------------------------------------------------------------------------- availability


def test_tensorrt_available_says_tensorrt_is_not_installed(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    assert tensorrt_available(_manifest(tmp_path, plans=True)) == NOT_INSTALLED


@pytest.mark.parametrize("devices,plans,reason", [
    (None, True, "cuda-python is not installed"),
    (1, False, "the engine has no TensorRT plans (export with --trt)"),
    (0, True, "no CUDA device"),
    (1, True, None),
])
def test_tensorrt_available_checks_in_order(monkeypatch, tmp_path, devices, plans, reason):
    """With TensorRT importable: cuda-python, then the engine's plans, then a device."""
    _fake_modules(monkeypatch, devices)
    assert tensorrt_available(_manifest(tmp_path, plans)) == reason


def test_make_backend_refuses_tensorrt_with_the_reason_and_the_alternative(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(BackendUnavailable) as info:
        make_backend("tensorrt", _manifest(tmp_path, plans=True))
    message = str(info.value)
    assert NOT_INSTALLED in message
    assert f"--backend auto would pick {auto_backend()}" in message


def test_export_cli_refuses_trt_without_tensorrt_and_writes_nothing(monkeypatch, tmp_path, capsys):
    from semvoc.export.cli import main

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    out = tmp_path / "engine"
    assert main(["--preset", "demo", "--out", str(out), "--trt"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'semvoc[trt]'" in err
    assert "Nothing was written" in err
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no partial engine beside it either


# ------------------------------------------------------------------------------ profiles


def test_profile_shapes_of_a_dit_step():
    assert profile_shapes(DIT_STEP, batch=4, frames=250, buckets=BUCKETS) == {
        "latent": (4, 8, 250), "step": (1,), "time_table": (251, 13, 64), "sigmas": (252,),
        "cross_kv": (2, 2, 8, 4, 128, 16), "context_mask": (4, 128), "guidance": (1,)}


def test_profile_shapes_of_a_vocoder_step():
    assert profile_shapes(VOCODER_STEP, batch=1, frames=250, buckets=BUCKETS) == {
        "audio": (1, 240000), "step": (1,), "t_span": (402,), "cond_bias_0": (3, 1, 32, 1001),
        "cond_bias_1": (3, 1, 16, 2001), "time_scale_0": (401, 3, 32)}


def test_graph_profiles_keep_only_the_shapes_a_graph_distinguishes():
    """Step graphs: one per (batch, duration); the text encoder: one per batch; tables: one."""
    assert [(p["latent"][0], p["latent"][2]) for p in graph_profiles(DIT_STEP, OPTIONS)] == [
        (1, 125), (1, 250), (4, 125), (4, 250)]
    assert [p["input_ids"] for p in graph_profiles(TEXT_ENCODER, OPTIONS)] == [(1, 128), (4, 128)]
    assert graph_profiles(DIT_TIME, OPTIONS) == [{"timesteps": (251,)}]


def test_runtime_finds_the_profile_the_export_built(tmp_path):
    """The export's profile list, through manifest.json, gives the runtime each bucket's index."""
    profiles = json.loads(json.dumps(graph_profiles(VOCODER_STEP, OPTIONS)))
    graph = _manifest(tmp_path, plans=True).graphs["vocoder_step"]
    symbols = dict(BUCKETS, batch=4, frames=125)
    assert profile_index(profiles, graph, symbols) == 2
    assert profile_index([], graph, symbols) is None
    with pytest.raises(EngineError, match="no profile for batch 16, 125 frames"):
        profile_index(profiles, graph, dict(symbols, batch=16))
