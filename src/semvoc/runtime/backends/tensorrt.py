"""TensorRT: the ODE loops replayed as whole CUDA graphs. UNVERIFIED.

UNVERIFIED: written against the TensorRT 10.14+/11 Python API and cuda-python 12.x/13.x, and
never executed with TensorRT by semvoc's authors, because TensorRT cannot be installed on their
machines. Tested without TensorRT: ``tensorrt_available``, the refusal in
``select.make_backend`` and the profile shapes and lookup (tests/test_tensorrt_path.py). Run
once by hand on an H100 (cuda-python 13.3) against a stand-in for ``tensorrt`` whose contexts
launched CuPy kernels: the CUDA half (buffers, copies, capture and replay of the A/B sequence
per step count, the uncaptured fallback, the NaN diagnosis, ``close``). The design mirrors
``ort_cuda.py``; on a TensorRT machine, check in this order:

1. ``semvoc-export --trt`` parses every graph (the ONNX ``Attention`` op needs TensorRT >= 10.14)
   and builds strongly typed plans; fp16 engines keep their fp32 islands (compare with
   ``parity.json``).
2. ``set_optimization_profile_async`` accepts two contexts (the A and B of a loop) on the same
   profile: TensorRT requires separate profiles only for contexts in *concurrent* use, and A
   and B run one after the other on one stream. If it refuses, build each step-graph profile
   twice and give B the copy.
3. ``execute_async_v3`` succeeds inside ``cudaStreamBeginCapture`` after the warm-up run, and
   the captured graph gives the same audio as the uncaptured fallback (``describe()`` lists
   any capture that failed). Graph instantiation time for 250+ steps is acceptable.
4. Waveforms match the onnxruntime backends for the same seed within the parity bounds;
   int64 (``step``, ``input_ids``) and bool (``context_mask``) inputs bind as the manifest says.
5. ``close()`` releases all device memory (contexts before engines, graphs before buffers).

Design. Every graph's plan is deserialized once. Per (batch, frames) bucket, each step graph
has persistent device buffers for all its inputs, a second state/step pair, and two execution
contexts on the bucket's profile whose tensor addresses are set once: A reads (state, step)
and writes (state_b, step_b), B the reverse. The step counter advances on the device and the
graph gathers its schedule row by it, so a whole loop of K steps is the fixed sequence
A, B, A, ... of K enqueues with nothing crossing to the host.

That sequence is captured once per (bucket, K) into one CUDA graph and replayed once per
request. TensorRT's ``enqueueV3`` only launches kernels and async copies on the given stream
(trtexec's ``--useCudaGraph`` captures it the same way), so it can be captured, provided
(a) each context ran once before capture, so one-time setup stays out of the graph; (b) the
input shapes and every tensor address stay fixed for the graph's lifetime, since the graph
bakes in the addresses: here each context's addresses are set once at bucket creation and only
buffer contents change between requests (new noise, new prompts, new schedule tables). If
enqueue fails while capturing (an engine with operations that cannot be captured), the loop
runs uncaptured, still device-resident, and ``describe()`` says so.

Per request only the token ids, the mask, the noise and the guidance go to the device, and
only the final latent (for the NaN check) and the waveform come back. The schedule tables are
computed by the ``dit_time``/``vocoder_time`` plans once per schedule and kept. Handles
returned by a stage are device buffers owned by the backend, valid until that stage runs
again (the pipeline serves one request at a time).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from semvoc.runtime.backends.base import (
    Backend,
    NonFiniteError,
    Progress,
    bucket_symbols,
    loop_buffers,
    padded_table,
    ping_pong_wiring,
    tensor_shape,
)
from semvoc.runtime.backends.cuda_graph import import_cudart
from semvoc.runtime.backends.ort_common import NUMPY_DTYPES
from semvoc.runtime.manifest import EngineError, GraphInfo, Manifest
from semvoc.runtime.schedules import DitSchedule

ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "bool": 1}


def tensorrt_available(manifest: Manifest) -> str | None:
    """None when the TensorRT backend can run this engine here, else the reason it cannot."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "tensorrt is not installed (pip install 'semvoc[trt]')"
    try:
        cudart = import_cudart()
    except ImportError:
        return "cuda-python is not installed"
    if not manifest.data.get("tensorrt") or not any(g.plan_file for g in manifest.graphs.values()):
        return "the engine has no TensorRT plans (export with --trt)"
    err, count = cudart.cudaGetDeviceCount()
    if err != cudart.cudaError_t.cudaSuccess or count == 0:
        return "no CUDA device"
    return None


def profile_index(profiles: list[dict], graph: GraphInfo, symbols: dict[str, int]) -> int | None:
    """Index of the optimization profile whose input shapes are those of ``graph`` for ``symbols``.

    ``profiles`` is the graph's list in ``manifest["tensorrt"]["profiles"]`` (written by
    ``semvoc.export.trt.build_plans`` in profile order); empty for a graph with static shapes (None).
    """
    if not profiles:
        return None
    wanted = {t.name: tensor_shape(t, symbols) for t in graph.inputs}
    for index, shapes in enumerate(profiles):
        if shapes == wanted:
            return index
    raise EngineError(f"the TensorRT plan of {graph.name} has no profile for batch {symbols['batch']}, "
                      f"{symbols['frames']} frames; re-export with that batch size and duration")


@dataclass
class _Buffer:
    """Device memory holding one tensor."""

    ptr: int
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * ITEMSIZE[self.dtype]


@dataclass
class _Loop:
    """A step graph bound for one bucket: buffers, contexts A and B, captured graphs by step count."""

    buffers: dict[str, _Buffer]
    state: str
    contexts: list
    graphs: dict[int, object] = field(default_factory=dict)
    captured: bool = True


class TensorRTBackend(Backend):
    name = "tensorrt"
    pads_batches = True

    def __init__(self, manifest: Manifest, device_id: int = 0):
        super().__init__(manifest)
        import tensorrt as trt

        self.trt = trt
        self.cudart = import_cudart()
        self._check(self.cudart.cudaSetDevice(device_id))
        self.stream = self._check(self.cudart.cudaStreamCreateWithFlags(self.cudart.cudaStreamNonBlocking))
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self._profiles: dict[str, list[dict]] = manifest.data["tensorrt"].get("profiles", {})
        self._engines: dict[str, object] = {}
        self._contexts: dict[tuple, object] = {}  # one-shot graphs: (graph, profile) -> context
        self._scratch: dict[tuple, _Buffer] = {}  # one-shot graphs' inputs and outputs
        self._loops: dict[tuple, _Loop] = {}
        self._tables: dict[str, _Buffer] = {}  # schedule tables shared by all buckets
        self._table_keys: dict[str, bytes] = {}
        self._allocations: list[_Buffer] = []
        self.capture_failures: list[str] = []

    # ------------------------------------------------------------------------------ CUDA
    def _check(self, result):
        """Unpack a cuda-python ``(error, *values)`` tuple, raising on an error."""
        err, *values = result
        if err != self.cudart.cudaError_t.cudaSuccess:
            raise RuntimeError(f"CUDA error {self.cudart.cudaGetErrorName(err)[1].decode()}")
        return values[0] if len(values) == 1 else None

    def _alloc(self, shape, dtype: str) -> _Buffer:
        buf = _Buffer(0, tuple(int(s) for s in shape), dtype)
        buf.ptr = int(self._check(self.cudart.cudaMalloc(max(buf.nbytes, 1))))
        self._allocations.append(buf)
        # zeroed, so that warm-up runs read a valid step counter (row 0 of the tables)
        self._check(self.cudart.cudaMemsetAsync(buf.ptr, 0, buf.nbytes, self.stream))
        return buf

    def _upload(self, buf: _Buffer, array: np.ndarray) -> None:
        host = np.ascontiguousarray(array, NUMPY_DTYPES[buf.dtype])
        if host.nbytes != buf.nbytes:
            raise ValueError(f"array of shape {array.shape} does not fit a buffer of shape {buf.shape}")
        # from pageable memory the copy is staged before the call returns, so `host` may go
        self._check(self.cudart.cudaMemcpyAsync(buf.ptr, host.ctypes.data, host.nbytes,
                                                self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream))

    def _download(self, buf: _Buffer) -> np.ndarray:
        out = np.empty(buf.shape, NUMPY_DTYPES[buf.dtype])
        self._check(self.cudart.cudaMemcpyAsync(out.ctypes.data, buf.ptr, buf.nbytes,
                                                self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream))
        self._sync()
        return out

    def _sync(self) -> None:
        self._check(self.cudart.cudaStreamSynchronize(self.stream))

    # ------------------------------------------------------------------------- TensorRT
    def _symbols(self, batch: int = 0, frames: int = 0) -> dict[str, int]:
        return bucket_symbols(self.manifest, batch, frames)

    def _engine(self, graph: GraphInfo):
        if graph.name not in self._engines:
            if not graph.plan_file:
                raise EngineError(f"graph {graph.name} has no TensorRT plan; re-export with --trt")
            engine = self.runtime.deserialize_cuda_engine((self.manifest.root / graph.plan_file).read_bytes())
            if engine is None:
                raise EngineError(f"TensorRT could not load {graph.plan_file} (a plan runs only on the TensorRT "
                                  "version and GPU model that built it); re-export with --trt on this machine")
            self._engines[graph.name] = engine
        return self._engines[graph.name]

    def _profile(self, graph: GraphInfo, symbols) -> int | None:
        return profile_index(self._profiles.get(graph.name, []), graph, symbols)

    def _new_context(self, graph: GraphInfo, symbols):
        context = self._engine(graph).create_execution_context()
        profile = self._profile(graph, symbols)
        if profile is not None:
            context.set_optimization_profile_async(profile, int(self.stream))
        for t in graph.inputs:
            if not context.set_input_shape(t.name, tensor_shape(t, symbols)):
                raise RuntimeError(f"TensorRT refused shape {tensor_shape(t, symbols)} for {graph.name}.{t.name}")
        return context

    @staticmethod
    def _bind(context, name: str, buf: _Buffer) -> None:
        if not context.set_tensor_address(name, buf.ptr):
            raise RuntimeError(f"TensorRT refused the address of {name}")

    def _enqueue(self, context, what: str) -> None:
        if not context.execute_async_v3(int(self.stream)):
            raise RuntimeError(f"TensorRT could not enqueue {what}")

    def _run_once(self, kind: str, inputs: dict, outputs: dict | None = None, *, batch: int = 0,
                  frames: int = 0, duration_s=None) -> dict[str, _Buffer]:
        """Run an uncaptured graph. Inputs are numpy arrays (uploaded) or device buffers; outputs go
        to the given buffers, else to buffers kept for this graph and bucket (returned by name)."""
        graph = self.manifest.graph(kind, duration_s)
        symbols = self._symbols(batch, frames)
        key = (graph.name, self._profile(graph, symbols))
        if key not in self._contexts:
            self._contexts[key] = self._new_context(graph, symbols)
        context = self._contexts[key]

        def scratch(t) -> _Buffer:
            if (*key, t.name) not in self._scratch:
                self._scratch[(*key, t.name)] = self._alloc(tensor_shape(t, symbols), t.dtype)
            return self._scratch[(*key, t.name)]

        for t in graph.inputs:
            value = inputs[t.name]
            if isinstance(value, np.ndarray):
                buf = scratch(t)
                self._upload(buf, value)
            else:
                buf = value
            self._bind(context, t.name, buf)
        result = {}
        for t in graph.outputs:
            result[t.name] = outputs[t.name] if outputs and t.name in outputs else scratch(t)
            self._bind(context, t.name, result[t.name])
        self._enqueue(context, graph.name)
        return result

    # --------------------------------------------------------------------------- step loops
    def _loop(self, kind: str, batch: int, frames: int, state: str, shared: tuple[str, ...]) -> _Loop:
        key = (kind, batch, frames)
        if key in self._loops:
            return self._loops[key]
        graph = self.manifest.graph(kind)
        symbols = self._symbols(batch, frames)
        buffers = loop_buffers(graph, symbols, state, shared, self._tables, self._alloc)
        x_next, step_next = graph.outputs[0].name, graph.outputs[1].name
        contexts = []
        for x_in, s_in, x_out, s_out in ping_pong_wiring(state):
            context = self._new_context(graph, symbols)
            for t in graph.inputs:
                self._bind(context, t.name, buffers[{state: x_in, "step": s_in}.get(t.name, t.name)])
            self._bind(context, x_next, buffers[x_out])
            self._bind(context, step_next, buffers[s_out])
            contexts.append(context)
        loop = _Loop(buffers, state, contexts)
        # warm-up: each context's first enqueue does one-time setup that must stay out of a capture
        self._enqueue_steps(loop, 2, kind)
        self._sync()
        self._loops[key] = loop
        return loop

    def _enqueue_steps(self, loop: _Loop, steps: int, kind: str) -> None:
        """Reset the step counter, then A, B, A, ... for ``steps`` steps (the body of a captured loop)."""
        self._check(self.cudart.cudaMemsetAsync(loop.buffers["step"].ptr, 0, 8, self.stream))
        for k in range(steps):
            self._enqueue(loop.contexts[k % 2], f"{kind} step {k}")

    def _capture(self, loop: _Loop, kind: str, steps: int):
        """Capture ``steps`` steps into an instantiated CUDA graph; None if the engine refuses capture."""
        cudart = self.cudart
        # thread-local: an unsafe call (cudaMalloc, a sync) from this thread breaks the capture,
        # one from another thread (another backend in the process) does not
        self._check(cudart.cudaStreamBeginCapture(self.stream,
                                                  cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal))
        try:
            self._enqueue_steps(loop, steps, kind)
            failure = None
        except RuntimeError as err:
            failure = str(err)
        err, graph = cudart.cudaStreamEndCapture(self.stream)  # ends the capture even after a failure
        if failure is None and err == cudart.cudaError_t.cudaSuccess:
            err, executable = cudart.cudaGraphInstantiate(graph, 0)
            self._check(cudart.cudaGraphDestroy(graph))
            if err == cudart.cudaError_t.cudaSuccess:
                return executable
        cudart.cudaGetLastError()  # clear the capture error so later calls do not report it
        self.capture_failures.append(f"{kind}: {failure or cudart.cudaGetErrorName(err)[1].decode()}")
        loop.captured = False
        return None

    def _run_loop(self, loop: _Loop, kind: str, steps: int, progress: Progress, stage: str) -> _Buffer:
        """Run ``steps`` steps (one graph launch when captured); returns the buffer of the final state."""
        if steps > 0:
            if loop.captured and steps not in loop.graphs:
                executable = self._capture(loop, kind, steps)
                if executable is not None:
                    loop.graphs[steps] = executable
            if steps in loop.graphs:
                self._check(self.cudart.cudaGraphLaunch(loop.graphs[steps], self.stream))
            else:
                self._enqueue_steps(loop, steps, kind)
            self._sync()
        if progress:
            progress(stage, steps)  # one launch: progress is reported when the loop is done
        return loop.buffers[loop.state if steps % 2 == 0 else loop.state + "_b"]

    # ------------------------------------------------------------------------------- stages
    def encode_text(self, input_ids, attention_mask):
        return self._run_once("text_encoder", {"input_ids": input_ids, "attention_mask": attention_mask},
                              batch=input_ids.shape[0])["context"]

    def _set_dit_tables(self, schedule: DitSchedule) -> None:
        key = schedule.embedded.tobytes() + schedule.sigmas.tobytes()
        if self._table_keys.get("dit") == key:
            return
        rows = self.manifest.buckets["dit_rows"]
        self._run_once("dit_time", {"timesteps": padded_table(schedule.embedded, rows)},
                       {"time_table": self._tables["time_table"]})
        self._upload(self._tables["sigmas"], padded_table(schedule.sigmas, rows + 1, fill=0.0))
        self._table_keys["dit"] = key

    def dit_loop(self, context, context_mask, latent, schedule, calls, guidance, progress: Progress = None):
        batch, _, frames = latent.shape
        loop = self._loop("dit_step", batch, frames, "latent", shared=("time_table", "sigmas"))
        self._set_dit_tables(schedule)
        b = loop.buffers
        prepare = self.manifest.graph("dit_prepare")
        self._run_once("dit_prepare", {"context": context}, {t.name: b[t.name] for t in prepare.outputs}, batch=batch)
        self._upload(b["context_mask"], context_mask)
        self._upload(b["guidance"], np.array([guidance], np.float32))
        self._upload(b["latent"], latent)
        final = self._run_loop(loop, "dit_step", calls, progress, "dit")
        if not np.isfinite(self._download(final)).all():
            self._diagnose(loop, "dit_step", latent, calls)
        return final

    def _set_vocoder_tables(self, t_span: np.ndarray) -> None:
        key = t_span.tobytes()
        if self._table_keys.get("vocoder") == key:
            return
        rows = self.manifest.buckets["vocoder_rows"]
        names = [t.name for t in self.manifest.graph("vocoder_time").outputs]
        self._run_once("vocoder_time", {"t": padded_table(t_span[:-1], rows)}, {n: self._tables[n] for n in names})
        self._upload(self._tables["t_span"], padded_table(t_span, rows + 1, fill=1.0))
        self._table_keys["vocoder"] = key

    def vocoder_loop(self, latents, audio, t_span, steps, progress: Progress = None):
        batch, samples = audio.shape
        frames = samples // self.manifest.shapes["samples_per_frame"]
        step_graph = self.manifest.graph("vocoder_step")
        shared = ("t_span", *[t.name for t in step_graph.inputs if t.name.startswith("time_scale_")])
        loop = self._loop("vocoder_step", batch, frames, "audio", shared=shared)
        self._set_vocoder_tables(t_span)
        b = loop.buffers
        prepare = self.manifest.graph("vocoder_prepare")
        self._run_once("vocoder_prepare", {"latents": latents}, {t.name: b[t.name] for t in prepare.outputs},
                       batch=batch, frames=frames)
        self._upload(b["audio"], audio)
        out = self._download(self._run_loop(loop, "vocoder_step", steps, progress, "vocoder"))
        if not np.isfinite(out).all():
            self._diagnose(loop, "vocoder_step", audio, steps)
        return out

    def encode_audio(self, waveform, duration_s):
        return self._run_once("semantic_encoder", {"waveform": waveform}, batch=waveform.shape[0],
                              duration_s=duration_s)["latents"]

    def to_host(self, handle) -> np.ndarray:
        return handle if isinstance(handle, np.ndarray) else self._download(handle)

    # --------------------------------------------------------------------------- diagnosis
    def _diagnose(self, loop: _Loop, kind: str, initial: np.ndarray, steps: int) -> None:
        """Re-run the loop uncaptured from its initial state, checking the state after every step."""
        state = loop.state
        self._upload(loop.buffers[state], initial)
        self._check(self.cudart.cudaMemsetAsync(loop.buffers["step"].ptr, 0, 8, self.stream))
        for k in range(steps):
            self._enqueue(loop.contexts[k % 2], f"{kind} step {k}")
            if not np.isfinite(self._download(loop.buffers[state + "_b" if k % 2 == 0 else state])).all():
                raise NonFiniteError(kind, k)
        raise NonFiniteError(kind, steps - 1, " (only when replayed from the CUDA graph)")

    def describe(self) -> str:
        captured = sorted({key[0] for key, loop in self._loops.items() if loop.captured})
        text = f"{self.name} {self.trt.__version__} (UNVERIFIED path; CUDA graphs: {', '.join(captured) or 'none yet'})"
        if self.capture_failures:
            text += f"; capture refused for: {'; '.join(self.capture_failures)}"
        return text

    def close(self):
        if self.stream is None:
            return
        self._sync()
        for loop in self._loops.values():
            for executable in loop.graphs.values():
                self._check(self.cudart.cudaGraphExecDestroy(executable))
        # TensorRT objects go in dependency order: contexts, then engines
        self._loops.clear()
        self._contexts.clear()
        self._engines.clear()
        for buf in self._allocations:
            self._check(self.cudart.cudaFree(buf.ptr))
        self._allocations.clear()
        self._scratch.clear()
        self._tables.clear()
        self._check(self.cudart.cudaStreamDestroy(self.stream))
        self.stream = None
