"""The onnxruntime CUDA backend's two CUDA-graph modes, without a GPU.

cuda-python and onnxruntime's CUDA sessions are replaced by fakes that model what the backend
relies on: a run on a capturing stream is recorded into the graph instead of executed, a launch
executes the recorded runs in order, and a run that synchronises at its end while the stream is
capturing breaks the capture (as onnxruntime's does). The fake step graph adds 1 to the loop state
and to the step counter, so the final buffer tells how many steps ran and in which buffer they
ended. What runs on a real GPU is checked by tests/test_gpu.py.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from semvoc.runtime.backends import cuda_graph, ort_cuda
from semvoc.runtime.backends.base import BackendUnavailable, bucket_symbols, tensor_shape
from semvoc.runtime.backends.ort_common import NUMPY_DTYPES
from semvoc.runtime.manifest import load_manifest

FRAMES = 25  # the demo engine's 1-second bucket


class _Enum:
    """Stand-in for a cuda-python enum: members compared by identity, each with a ``name``."""

    def __init__(self, *names: str):
        for name in names:
            setattr(self, name, SimpleNamespace(name=name))


class FakeStream:
    def __init__(self, handle: int = 140_000_123):
        self.handle = handle

    def __int__(self) -> int:
        return self.handle


class FakeEvent:
    stream: int | None = None  # the capturing stream it was recorded on (None: not in a capture)


class FakeCudart:
    """The part of cuda-python's runtime the backend calls, recording what happens in ``events``."""

    cudaError_t = _Enum("cudaSuccess", "cudaErrorStreamCaptureInvalidated")
    cudaStreamCaptureMode = _Enum("cudaStreamCaptureModeGlobal", "cudaStreamCaptureModeThreadLocal")
    cudaGraphNodeType = _Enum(*(f"cudaGraphNodeType{n}" for n in (
        "Kernel", "Memcpy", "Memset", "Host", "Graph", "Empty", "WaitEvent", "EventRecord", "MemAlloc", "MemFree")))
    cudaMemcpyKind = _Enum("cudaMemcpyHostToDevice", "cudaMemcpyDeviceToHost", "cudaMemcpyDeviceToDevice",
                           "cudaMemcpyDefault")
    cudaMemoryType = _Enum("cudaMemoryTypeUnregistered", "cudaMemoryTypeHost", "cudaMemoryTypeDevice",
                           "cudaMemoryTypeManaged")
    DEVICE_POINTERS = range(1000, 2000)

    cudaEventDisableTiming = 2

    def __init__(self):
        self.events: list[str] = []
        self.capturing: dict | None = None
        self.ok = self.cudaError_t.cudaSuccess
        self.streams_made = 0

    def cudaGetErrorName(self, err):
        return self.ok, err.name.encode()

    def cudaGetLastError(self):
        return (self.ok,)

    def cudaSetDevice(self, device):
        return (self.ok,)

    def cudaStreamCreate(self):
        self.events.append("stream")
        self.streams_made += 1
        return self.ok, FakeStream(140_000_123 + 1000 * (self.streams_made - 1))

    # a stream joins a capture by waiting for an event recorded in it, and must join back (an event
    # of its own that the capture's first stream waits for) before the capture ends
    def cudaEventCreateWithFlags(self, flags):
        assert flags == self.cudaEventDisableTiming
        return self.ok, FakeEvent()

    def cudaEventDestroy(self, event):
        self.events.append("event destroyed")
        return (self.ok,)

    def cudaEventRecord(self, event, stream):
        capturing = self.capturing is not None and int(stream) in self.capturing["streams"]
        event.stream = int(stream) if capturing else None
        return (self.ok,)

    def cudaStreamWaitEvent(self, stream, event, flags):
        if self.capturing is not None and event.stream is not None:
            self.capturing["streams"].add(int(stream))
            if int(stream) == self.capturing["origin"]:
                self.capturing["joined"].add(event.stream)
        return (self.ok,)

    def captures(self, stream: int | None) -> bool:
        """Whether work queued on ``stream`` now goes into the capture."""
        return self.capturing is not None and stream in self.capturing["streams"]

    def cudaStreamDestroy(self, stream):
        self.events.append("stream destroyed")
        return (self.ok,)

    def cudaStreamSynchronize(self, stream):
        assert self.capturing is None, "a synchronisation while capturing"
        self.events.append("sync")
        return (self.ok,)

    def cudaStreamBeginCapture(self, stream, mode):
        assert self.capturing is None and mode is self.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        self.events.append("begin capture")
        self.capturing = {"nodes": [], "invalid": False, "origin": int(stream), "streams": {int(stream)},
                          "joined": set()}
        return (self.ok,)

    def cudaStreamEndCapture(self, stream):
        graph, self.capturing = self.capturing, None
        self.events.append("end capture")
        if graph["invalid"] or graph["streams"] - graph["joined"] - {graph["origin"]}:  # unjoined
            return self.cudaError_t.cudaErrorStreamCaptureInvalidated, None
        return self.ok, graph

    def record(self, node_type: str, run=None, params=None, child=None) -> None:
        self.capturing["nodes"].append(SimpleNamespace(type=node_type, run=run, params=params, child=child))

    def cudaGraphGetNodes(self, graph, count=0):
        return self.ok, graph["nodes"][:count], len(graph["nodes"])

    def cudaGraphNodeGetType(self, node):
        return self.ok, getattr(self.cudaGraphNodeType, f"cudaGraphNodeType{node.type}")

    def cudaGraphMemcpyNodeGetParams(self, node):
        return self.ok, node.params

    def cudaGraphMemAllocNodeGetParams(self, node):  # params: the address (None: unreadable, as 0)
        return self.ok, SimpleNamespace(dptr=node.params or 0)

    def cudaGraphMemFreeNodeGetParams(self, node):
        return self.ok, node.params or 0

    def cudaPointerGetAttributes(self, pointer):
        kind = "Device" if pointer in self.DEVICE_POINTERS else "Host"
        return self.ok, SimpleNamespace(type=getattr(self.cudaMemoryType, f"cudaMemoryType{kind}"))

    def cudaGraphChildGraphNodeGetGraph(self, node):
        return self.ok, node.child

    def cudaGraphInstantiate(self, graph, flags):
        self.events.append("instantiate")
        return self.ok, SimpleNamespace(graph=graph, steps=sum(n.type == "Kernel" for n in graph["nodes"]))

    def cudaGraphDestroy(self, graph):
        return (self.ok,)

    def cudaGraphExecDestroy(self, executable):
        self.events.append("graph destroyed")
        return (self.ok,)

    def cudaGraphLaunch(self, executable, stream):
        self.events.append(f"launch {executable.steps}")
        for node in executable.graph["nodes"]:
            if node.run:
                node.run()
        return (self.ok,)


class FakeValue:
    """A device buffer: a numpy array."""

    def __init__(self, array: np.ndarray):
        self.array = array

    def update_inplace(self, array) -> None:
        self.array[...] = array

    def numpy(self) -> np.ndarray:
        return self.array.copy()


class FakeBinding:
    def __init__(self):
        self.inputs: dict[str, FakeValue] = {}
        self.outputs: dict[str, FakeValue] = {}

    def bind_ortvalue_input(self, name, value):
        self.inputs[name] = value

    def bind_ortvalue_output(self, name, value):
        self.outputs[name] = value

    def bind_output(self, name, device, device_id):
        self.outputs[name] = FakeValue(np.zeros(1, np.float32))

    def get_outputs(self):
        return list(self.outputs.values())


def _entry(options, key: str) -> str | None:
    try:
        return options.get_run_config_entry(key)
    except RuntimeError:
        return None


class FakeSession:
    """A step graph adds 1 to its state and its step counter; other graphs leave their outputs."""

    def __init__(self, world: World, name: str, kwargs: dict):
        self.world, self.name, self.kwargs = world, name, kwargs

    def io_binding(self):
        return FakeBinding()

    def run_with_iobinding(self, binding, options=None):
        cudart, world = self.world.cudart, self.world
        capturing = cudart is not None and cudart.captures(self.kwargs.get("compute_stream"))
        if cudart is not None and cudart.capturing is not None and not capturing:
            cudart.capturing["invalid"] = True  # work that ran at once while the loop was being captured
            raise RuntimeError("a run on a stream outside the capture")
        world.runs.append((self.name, "captured" if capturing else "run"))
        world.graph_ids.append((self.name, _entry(options, "gpu_graph_id") if options is not None else None))
        if ".branch" in self.name:  # a branch of the vocoder step: the state + 1, as the tail reads it
            x_in, (out,) = binding.inputs["audio"], binding.outputs.values()

            def run():
                out.array[...] = (x_in.array + 1).reshape(out.array.shape)
        elif self.name.endswith(".tail"):  # the mean of the branches, the step counter + 1
            results = [v for name, v in binding.inputs.items() if name not in ("audio", "step", "t_span")]
            step_in = binding.inputs["step"]
            x_out, step_out = binding.outputs.values()

            def run():
                x_out.array[...] = (sum(r.array for r in results) / len(results)).reshape(x_out.array.shape)
                step_out.array[...] = step_in.array + 1
        elif self.name.endswith("_step"):
            state = "latent" if self.name.startswith("dit") else "audio"
            x_in, step_in = binding.inputs[state], binding.inputs["step"]
            x_out, step_out = binding.outputs.values()

            def run():
                bad = int(step_in.array[0]) == world.nan_at_step.get(self.name)
                x_out.array[...] = np.nan if bad else x_in.array + 1
                step_out.array[...] = step_in.array + 1
        else:
            def run():
                pass
        if not capturing:
            run()
            return
        if self.name in world.fail_capture:
            cudart.capturing["invalid"] = True
            raise RuntimeError("CUDA failure 901: operation failed due to a previous error during capture")
        cudart.record("Kernel", run)
        for node in world.extra_nodes.get(self.name, []):
            cudart.record(*node)
        if _entry(options, "disable_synchronize_execution_providers") != "1":
            # onnxruntime synchronises the stream at the end of a run: illegal while capturing
            cudart.capturing["invalid"] = True
            raise RuntimeError("CUDA failure 900: operation not permitted when stream is capturing")


class World:
    """The fakes of one test: cuda-python (or its absence) and onnxruntime's CUDA sessions."""

    def __init__(self, monkeypatch, demo_engine, mode: str, *, cudart: bool = True):
        self.cudart = FakeCudart() if cudart else None
        self.sessions: list[tuple[str, dict]] = []
        self.runs: list[tuple[str, str]] = []
        self.graph_ids: list[tuple[str, str | None]] = []  # (graph, the run's gpu_graph_id entry)
        self.fail_capture: set[str] = set()
        self.extra_nodes: dict[str, list[tuple]] = {}  # graph -> nodes its captured runs add
        self.nan_at_step: dict[str, int] = {}  # graph -> the step that writes NaN

        def import_cudart():
            if self.cudart is None:
                raise ImportError("No module named 'cuda'")
            return self.cudart

        def make_session(path, provider, **kwargs):
            name = Path(path).stem
            self.sessions.append((name, kwargs))
            return FakeSession(self, name, kwargs)

        def empty(backend, shape, dtype):
            return FakeValue(np.zeros([int(s) for s in shape], NUMPY_DTYPES[dtype]))

        def upload(backend, array, dtype):
            return FakeValue(np.array(array, NUMPY_DTYPES[dtype]))

        monkeypatch.setattr(ort_cuda, "import_cudart", import_cudart)
        monkeypatch.setattr(ort_cuda, "make_session", make_session)
        monkeypatch.setattr(ort_cuda.OrtCudaBackend, "_empty", empty)
        monkeypatch.setattr(ort_cuda.OrtCudaBackend, "_upload", upload)
        # no real device memory behind the fakes, on a GPU machine either
        monkeypatch.setattr(ort_cuda.OrtCudaBackend, "_shared_weights", lambda backend, graph: None)
        monkeypatch.setenv(ort_cuda.GRAPHS_ENV, mode)
        self.manifest = load_manifest(demo_engine, verify=False)
        self.backend = ort_cuda.OrtCudaBackend(self.manifest)

    def made(self, name: str) -> list[dict]:
        return [kwargs for session, kwargs in self.sessions if session == name]

    def shape(self, graph: str, tensor: str, batch: int = 1) -> list[int]:
        return tensor_shape(self.manifest.graph(graph).input(tensor), bucket_symbols(self.manifest, batch, FRAMES))

    def dit(self, calls: int, latent: np.ndarray, progress=None) -> np.ndarray:
        schedule = SimpleNamespace(embedded=np.linspace(1, 0, calls, dtype=np.float32),
                                   sigmas=np.linspace(1, 0, calls + 1, dtype=np.float32))
        mask = np.ones(self.shape("dit_step", "context_mask"), bool)
        final = self.backend.dit_loop(FakeValue(np.zeros(1, np.float32)), mask, latent, schedule, calls, 3.5,
                                      progress)
        return final.numpy()

    def vocoder(self, steps: int, audio: np.ndarray) -> np.ndarray:
        t_span = np.linspace(0, 1, steps + 1, dtype=np.float32)
        return self.backend.vocoder_loop(FakeValue(np.zeros(1, np.float32)), audio, t_span, steps)

    def audio(self, batch: int = 1) -> np.ndarray:
        return np.random.default_rng(1).integers(-9, 9, self.shape("vocoder_step", "audio", batch)).astype(np.float32)

    def latent(self) -> np.ndarray:
        # whole numbers, so that adding 1 per step is exact
        return np.random.default_rng(0).integers(-9, 9, self.shape("dit_step", "latent")).astype(np.float32)


def _copy(cudart: FakeCudart, kind: str, src: int, dst: int) -> tuple:
    """A copy node of the given kind between two pointers (1000-1999 are device memory)."""
    return ("Memcpy", None, SimpleNamespace(kind=getattr(cudart.cudaMemcpyKind, f"cudaMemcpy{kind}"),
                                            srcPtr=SimpleNamespace(ptr=src), dstPtr=SimpleNamespace(ptr=dst)))


def test_launch_plan_covers_every_step_count():
    assert cuda_graph.launch_plan(100) == (50, 0)
    assert cuda_graph.launch_plan(7) == (3, 1)
    assert cuda_graph.launch_plan(1) == (0, 1)
    assert cuda_graph.launch_plan(0) == (0, 0)
    for calls in range(60):
        pairs, single = cuda_graph.launch_plan(calls)
        assert 2 * pairs + single == calls and single in (0, 1)
    with pytest.raises(ValueError, match="-1 steps"):
        cuda_graph.launch_plan(-1)


def test_the_mode_variable_is_checked(monkeypatch):
    monkeypatch.setenv(ort_cuda.GRAPHS_ENV, " ONNXRuntime ")
    assert ort_cuda.cuda_graphs_mode() == "onnxruntime"
    monkeypatch.setenv(ort_cuda.GRAPHS_ENV, "semvoc")
    assert ort_cuda.cuda_graphs_mode() == "semvoc"
    monkeypatch.delenv(ort_cuda.GRAPHS_ENV)
    monkeypatch.setattr(ort_cuda, "import_cudart", lambda: object())  # unset: whole loops where cuda-python is
    assert ort_cuda.cuda_graphs_mode() == "semvoc"

    def missing():
        raise ImportError("No module named 'cuda'")

    monkeypatch.setattr(ort_cuda, "import_cudart", missing)
    assert ort_cuda.cuda_graphs_mode() == "onnxruntime"
    monkeypatch.setenv(ort_cuda.GRAPHS_ENV, "torch")
    with pytest.raises(BackendUnavailable, match=r"SEMVOC_CUDA_GRAPHS='torch' is not a CUDA-graph mode: .*'semvoc'"):
        ort_cuda.cuda_graphs_mode()


def test_whole_loops_are_captured_once_and_launched_without_a_sync_per_step(demo_engine, monkeypatch):
    world = World(monkeypatch, demo_engine, "semvoc")
    backend, cudart = world.backend, world.cudart
    backend.prepare(1, FRAMES)
    # every session runs on the backend's stream (but the vocoder's side branches); none uses
    # onnxruntime's own graphs
    handle = str(int(backend.stream))
    side = ("text_encoder", "vocoder_step.branch1", "vocoder_step.branch2")
    others = [kwargs for name, kwargs in world.sessions if name not in side]
    assert others and all(kwargs["compute_stream"] == int(handle) for kwargs in others)
    assert not any(kwargs.get("cuda_graph") for kwargs in others)
    # prepare() made the vocoder step's parts' sessions, not the whole graph's
    assert all(world.made(name) for name in BRANCHES) and not world.made("vocoder_step")
    # the text encoder replays onnxruntime's own graph, on onnxruntime's stream
    assert [(k["cuda_graph"], k["compute_stream"]) for k in world.made("text_encoder")] == [(True, None)]
    assert world.made("dit_step")[0]["shared_arena"] is False and world.made("dit_prepare")[0]["shared_arena"]

    latent, reports = world.latent(), []
    final = world.dit(7, latent, lambda stage, done: reports.append((stage, done)))
    assert np.array_equal(final, latent + 7)  # 7 steps, ending in buffer B
    assert reports == [("dit", 7)]  # one report, when the loop is done
    loop = backend._loops[("dit_step", 1, FRAMES)]
    assert loop.mode == "semvoc" and int(loop.buffers["step_b"].array[0]) == 7
    # warm-up A and B uncaptured, then the pair captured; the one-step graph when an odd count first comes
    step_runs = [kind for name, kind in world.runs if name == "dit_step"]
    assert step_runs == ["run", "run", "captured", "captured", "captured"]
    events = cudart.events
    first = events.index("launch 2")
    assert events[first:] == ["launch 2"] * 3 + ["launch 1", "sync"]
    assert events.count("begin capture") == 2
    assert all(_entry(options, "disable_synchronize_execution_providers") == "1" for options in loop.run_options)

    cudart.events.clear()
    assert np.array_equal(world.dit(8, latent), latent + 8)  # even: the state is back in buffer A
    assert cudart.events == ["launch 2"] * 4 + ["sync"]  # nothing captured again, one sync
    assert "whole-loop CUDA graphs: dit_step" in backend.describe() and not backend.capture_failures

    backend.close()
    # the graphs, then the side streams prepare() made for the vocoder's branches, then the stream
    assert cudart.events[-5:] == ["graph destroyed", "graph destroyed"] + ["stream destroyed"] * 3
    assert backend.stream is None


def test_without_cuda_python_the_loops_use_onnxruntimes_graphs(demo_engine, monkeypatch):
    world = World(monkeypatch, demo_engine, "semvoc", cudart=False)
    backend = world.backend
    assert backend.graphs_mode == "onnxruntime" and backend.stream is None
    assert "cuda-python is not installed" in backend.capture_failures[0]
    latent = world.latent()
    assert np.array_equal(world.dit(5, latent), latent + 5)
    step = world.made("dit_step")[0]
    assert step["cuda_graph"] is True and step["compute_stream"] is None and step["shared_arena"] is False
    assert world.made("dit_prepare")[0]["compute_stream"] is None
    loop = backend._loops[("dit_step", 1, FRAMES)]
    assert [_entry(options, "gpu_graph_id") for options in loop.run_options] == ["1", "2"]
    assert "onnxruntime's per-step CUDA graphs: dit_step" in backend.describe()


def test_onnxruntime_mode_is_todays_path_and_needs_no_cuda_python(demo_engine, monkeypatch):
    world = World(monkeypatch, demo_engine, "onnxruntime", cudart=False)  # cuda-python is never asked for
    backend = world.backend
    assert backend.graphs_mode == "onnxruntime" and not backend.capture_failures
    latent = world.latent()
    assert np.array_equal(world.dit(4, latent), latent + 4)
    assert all(kwargs["compute_stream"] is None for _, kwargs in world.sessions)
    assert world.made("dit_step")[0]["cuda_graph"] is True


@pytest.mark.parametrize("failure", ["inside the capture", "host function", "host copy"])
def test_a_capture_that_fails_or_is_unsafe_falls_back_to_onnxruntimes_graphs(demo_engine, monkeypatch, failure):
    world = World(monkeypatch, demo_engine, "semvoc")
    if failure == "inside the capture":
        world.fail_capture.add("dit_step")
    elif failure == "host function":  # onnxruntime frees pinned staging buffers from the stream
        world.extra_nodes["dit_step"] = [("Host",)]
    else:  # a kernel's parameters copied from a pinned staging buffer
        world.extra_nodes["dit_step"] = [_copy(world.cudart, "HostToDevice", 5, 1001)]
    latent = world.latent()
    assert np.array_equal(world.dit(3, latent), latent + 3)
    backend = world.backend
    loop = backend._loops[("dit_step", 1, FRAMES)]
    assert loop.mode == "onnxruntime"
    expected = {"inside the capture": "onnxruntime failed inside the capture: CUDA failure 901",
                "host function": "holds a host function, which a replay would repeat",
                "host copy": "holds a host<->device copy"}[failure]
    assert len(backend.capture_failures) == 1 and expected in backend.capture_failures[0]
    assert backend.capture_failures[0].startswith("dit_step (whole-loop CUDA graphs): ")
    assert [kwargs["cuda_graph"] for kwargs in world.made("dit_step")] == [False, True]
    # the refused session is dropped; the fallback runs on onnxruntime's stream, as before
    assert [key[2] for key in backend._sessions if key[0] == "dit_step"] == ["onnxruntime"]
    assert world.made("dit_step")[1]["compute_stream"] is None
    assert world.cudart.capturing is None  # the capture was ended
    assert "capture refused for: dit_step" in backend.describe()


def _tokens(world: World, batch: int = 1) -> tuple[np.ndarray, np.ndarray]:
    shape = tensor_shape(world.manifest.graph("text_encoder").input("input_ids"), bucket_symbols(world.manifest, batch))
    ids = np.arange(np.prod(shape), dtype=np.int64).reshape(shape) % 50
    return ids, np.ones(shape, np.int64)


@pytest.mark.parametrize("mode", ["onnxruntime", "semvoc"])
def test_the_text_encoder_replays_from_onnxruntimes_graph(demo_engine, monkeypatch, mode):
    world = World(monkeypatch, demo_engine, mode)
    backend = world.backend
    backend.prepare(1, FRAMES)
    (kwargs,) = world.made("text_encoder")
    assert kwargs["cuda_graph"] and kwargs["dim_overrides"] == {"batch": 1} and kwargs["shared_arena"] is False
    # prepare: a warm run outside any graph (a loading thread), then, on this thread, the run that
    # onnxruntime counts and the run it captures
    assert [graph_id for name, graph_id in world.graph_ids if name == "text_encoder"] == ["-1", None, None]
    encoder = backend._captured[1]
    assert encoder.captured and int(encoder.buffers["attention_mask"].array.min()) == 1
    ids, mask = _tokens(world)
    context = backend.encode_text(ids, mask)
    assert context is encoder.buffers["context"] and np.array_equal(encoder.buffers["input_ids"].array, ids)
    assert backend.encode_text(ids + 1, mask) is context  # the same buffers every request: a replay
    assert np.array_equal(encoder.buffers["input_ids"].array, ids + 1)
    assert len(world.made("text_encoder")) == 1 and not backend.capture_failures
    assert "text_encoder from onnxruntime's CUDA graph (batch 1)" in backend.describe()
    backend.close()


def test_a_refused_text_encoder_capture_runs_uncaptured(demo_engine, monkeypatch):
    world = World(monkeypatch, demo_engine, "onnxruntime")
    make = ort_cuda.make_session

    def refusing(path, provider, **kwargs):
        if Path(path).stem == "text_encoder" and kwargs["cuda_graph"]:
            raise RuntimeError("This session cannot use the graph capture feature as requested by the user")
        return make(path, provider, **kwargs)

    monkeypatch.setattr(ort_cuda, "make_session", refusing)
    backend = world.backend
    backend.prepare(1, FRAMES)
    ids, mask = _tokens(world)
    context = backend.encode_text(ids, mask)
    assert backend._captured[1] is None and context is not None
    assert [k["cuda_graph"] for k in world.made("text_encoder")] == [False]  # the uncaptured session
    assert backend.capture_failures == ["text_encoder (onnxruntime's CUDA graph, batch 1): This session cannot use "
                                        "the graph capture feature as requested by the user; it runs uncaptured"]
    backend.encode_text(ids, mask)
    assert len(backend.capture_failures) == 1 and len(world.made("text_encoder")) == 1  # not tried again


def test_without_cuda_graphs_the_text_encoder_runs_uncaptured(demo_engine, monkeypatch):
    world = World(monkeypatch, demo_engine, "onnxruntime")
    backend = ort_cuda.OrtCudaBackend(world.manifest, cuda_graphs=False)
    backend.prepare(1, FRAMES)
    backend.encode_text(*_tokens(world))
    assert [k["cuda_graph"] for k in world.made("text_encoder")] == [False] and not backend._captured


def test_a_refused_one_step_graph_ends_an_odd_loop_uncaptured(demo_engine, monkeypatch):
    world = World(monkeypatch, demo_engine, "semvoc")
    latent = world.latent()
    assert np.array_equal(world.dit(2, latent), latent + 2)
    world.extra_nodes["dit_step"] = [("MemAlloc",)]  # only the one-step capture sees it
    world.cudart.events.clear()
    assert np.array_equal(world.dit(5, latent), latent + 5)
    assert world.cudart.events[-3:] == ["launch 2", "launch 2", "sync"]
    assert world.runs[-1] == ("dit_step", "run")  # the odd step, queued before the one sync
    assert "one-step graph" in world.backend.capture_failures[0]
    assert "a MemAlloc or MemFree whose address could not be read" in world.backend.capture_failures[0]
    assert world.backend._loops[("dit_step", 1, FRAMES)].mode == "semvoc"


def test_graph_check_names_the_nodes_a_replay_cannot_repeat():
    cudart = FakeCudart()

    def graph(*nodes):
        stream = FakeStream()
        cudart.cudaStreamBeginCapture(stream, cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal)
        for node in nodes:
            cudart.record(*(node if isinstance(node, tuple) else (node,)))
        return cudart.cudaStreamEndCapture(stream)[1]

    def copy(kind: str, src: int, dst: int):
        return _copy(cudart, kind, src, dst)

    safe = graph("Kernel", "Memset", "Empty", "EventRecord", copy("DeviceToDevice", 1, 2), copy("Default", 1001, 1002))
    assert cuda_graph.graph_hazards(cudart, safe) == []
    child = graph("Kernel", "Host")
    unsafe = graph("Kernel", copy("HostToDevice", 5, 1001), copy("Default", 5, 1001), "MemFree",
                   ("Graph", None, None, child))
    assert cuda_graph.graph_hazards(cudart, unsafe) == ["a host<->device copy", "a host<->device copy",
                                                        "a host function",
                                                        "a MemAlloc or MemFree whose address could not be read"]
    # stream-ordered allocations (cuBLAS's workspace): safe when the graph frees what it allocates
    paired = graph(("MemAlloc", None, 1500), "Kernel", ("MemAlloc", None, 1600), ("MemFree", None, 1600),
                   ("MemFree", None, 1500))
    assert cuda_graph.graph_hazards(cudart, paired) == []
    kept = graph(("MemAlloc", None, 1500), "Kernel", ("MemAlloc", None, 1600), ("MemFree", None, 1600))
    assert cuda_graph.graph_hazards(cudart, kept) == ["a MemAlloc that the graph does not free"]
    foreign = graph(("MemAlloc", None, 1500), ("MemFree", None, 1500), ("MemFree", None, 1700))
    assert cuda_graph.graph_hazards(cudart, foreign) == ["a MemFree of memory that the graph did not allocate"]


def test_make_session_passes_the_stream_to_onnxruntime(demo_engine, monkeypatch):
    """The CUDA provider options as onnxruntime receives them (its CUDA provider is not needed)."""
    import onnxruntime

    from semvoc.runtime.backends.ort_common import make_session

    seen = []

    class Stop(Exception):
        pass

    def recorder(path, sess_options=None, providers=None):
        seen.append(dict(providers[0][1]))
        raise Stop

    monkeypatch.setattr(onnxruntime, "InferenceSession", recorder)
    for kwargs in ({"compute_stream": 140_000_123}, {"cuda_graph": True}):
        with pytest.raises(Stop):
            make_session(demo_engine / "dit_time.onnx", "cuda", **kwargs)
    assert seen[0]["user_compute_stream"] == "140000123" and "enable_cuda_graph" not in seen[0]
    assert seen[1]["enable_cuda_graph"] == "1" and "user_compute_stream" not in seen[1]


def test_graph_times_runs_a_whole_loop_in_each_mode(demo_engine, monkeypatch):
    """benchmarks/device/graph_times.py times the loops through the backend's own code."""
    from benchmarks.device.graph_times import time_loop

    world = World(monkeypatch, demo_engine, "onnxruntime")
    rows = world.manifest.buckets["dit_rows"]
    for mode in ("semvoc", "onnxruntime"):
        world.runs.clear()
        row = time_loop(world.manifest, "dit_step", 1, mode, iters=2)
        assert row[f"loop_{mode}_ran_as"] == mode and row[f"loop_{mode}_steps"] == rows
        assert row[f"loop_{mode}_step_ms"] > 0 and row[f"loop_{mode}_fallbacks"] == []
        eager = [name for name, kind in world.runs if kind == "run"]
        # semvoc: only the warm-up runs eagerly; onnxruntime: every step of the 3 loops is a run of its own
        assert len(eager) == (2 if mode == "semvoc" else 3 * rows)
    assert os.environ[ort_cuda.GRAPHS_ENV] == "onnxruntime"  # restored


def test_a_nan_in_a_whole_loop_is_traced_to_its_step(demo_engine, monkeypatch):
    from semvoc.runtime.backends.base import NonFiniteError

    world = World(monkeypatch, demo_engine, "semvoc")
    latent = world.latent()
    assert np.array_equal(world.dit(6, latent), latent + 6)
    world.nan_at_step["dit_step"] = 3
    with pytest.raises(NonFiniteError, match="dit_step at step 3"):
        world.dit(6, latent)
    # the diagnosis re-ran the loop step by step with an uncaptured session of its own
    assert [kwargs["dim_overrides"] for kwargs in world.made("dit_step")][-1] is None
    assert world.runs[-4:] == [("dit_step", "run")] * 4


BRANCHES = ["vocoder_step.branch0", "vocoder_step.branch1", "vocoder_step.branch2"]


def test_the_vocoder_steps_branches_run_side_by_side_in_its_whole_loop_graph(demo_engine, monkeypatch):
    world = World(monkeypatch, demo_engine, "semvoc")
    backend, cudart = world.backend, world.cudart
    assert [p.role for p in world.manifest.graph("vocoder_step").parts] == ["branch"] * 3 + ["tail"]
    audio = world.audio()
    assert np.array_equal(world.vocoder(5, audio), audio + 5)  # each step: the branches' mean of x + 1
    assert not backend.capture_failures and not world.made("vocoder_step")  # never run whole
    # branch 0 and the tail on the backend's stream, branches 1 and 2 on streams of their own
    streams = {name: world.made(name)[0]["compute_stream"] for name in [*BRANCHES, "vocoder_step.tail"]}
    main = int(backend.stream)
    assert streams["vocoder_step.branch0"] == streams["vocoder_step.tail"] == main
    assert len({streams[name] for name in BRANCHES}) == 3
    # warm-up A and B uncaptured, then the pair captured (4 parts a step), then the one-step graph
    runs = [(name, kind) for name, kind in world.runs if name.startswith("vocoder_step.")]
    order = [*BRANCHES, "vocoder_step.tail"]
    assert runs == [(n, "run") for n in order * 2] + [(n, "captured") for n in order * 3]
    loop = backend._loops[("vocoder_step", 1, FRAMES)]
    assert loop.parts is not None and loop.mode == "semvoc"
    assert "branches side by side on CUDA streams: vocoder_step" in backend.describe()

    cudart.events.clear()
    assert np.array_equal(world.vocoder(6, audio), audio + 6)
    assert cudart.events == ["launch 8"] * 3 + ["sync"]  # 3 launches of the captured pair, one sync
    backend.close()
    assert cudart.events.count("stream destroyed") == 3 and cudart.events.count("event destroyed") == 3


def test_a_branch_outside_the_capture_runs_the_step_whole(demo_engine, monkeypatch):
    world = World(monkeypatch, demo_engine, "semvoc")
    # a cuda-python whose streams cannot wait for events: the branches' runs would not be captured
    monkeypatch.setattr(FakeCudart, "cudaStreamWaitEvent", lambda self, stream, event, flags: (self.ok,))
    audio = world.audio()
    assert np.array_equal(world.vocoder(4, audio), audio + 4)
    loop = world.backend._loops[("vocoder_step", 1, FRAMES)]
    assert loop.parts is None and loop.mode == "semvoc" and world.made("vocoder_step")
    assert "vocoder_step (branches side by side): " in world.backend.capture_failures[0]
    assert "run whole" in world.backend.capture_failures[0]


@pytest.mark.parametrize("how", ["switched off", "onnxruntime's graphs"])
def test_the_vocoder_step_runs_whole_when_asked_or_in_onnxruntimes_graphs(demo_engine, monkeypatch, how):
    if how == "switched off":
        monkeypatch.setenv(ort_cuda.BRANCH_STREAMS_ENV, "0")
    world = World(monkeypatch, demo_engine, "semvoc" if how == "switched off" else "onnxruntime")
    audio = world.audio()
    assert np.array_equal(world.vocoder(3, audio), audio + 3)
    assert world.made("vocoder_step") and not any(world.made(name) for name in BRANCHES)
    assert not world.backend.capture_failures


def test_buckets_past_the_branch_streams_batch_run_the_step_whole(demo_engine, monkeypatch):
    monkeypatch.setenv(ort_cuda.BRANCH_STREAMS_ENV, "1")  # the demo engine's buckets: batch 1 and 2
    world = World(monkeypatch, demo_engine, "semvoc")
    for batch in (1, 2):
        audio = world.audio(batch)
        assert np.array_equal(world.vocoder(4, audio), audio + 4)
    loops = world.backend._loops
    assert loops[("vocoder_step", 1, FRAMES)].parts is not None and loops[("vocoder_step", 2, FRAMES)].parts is None
    assert len(world.made("vocoder_step")) == 1 and not world.backend.capture_failures
    monkeypatch.setenv(ort_cuda.BRANCH_STREAMS_ENV, "all")
    with pytest.raises(BackendUnavailable, match=r"SEMVOC_BRANCH_STREAMS='all': set it to the largest batch"):
        ort_cuda.branch_streams_max_batch()
    monkeypatch.delenv(ort_cuda.BRANCH_STREAMS_ENV)
    assert ort_cuda.branch_streams_max_batch() == ort_cuda.BRANCH_STREAMS_MAX_BATCH
