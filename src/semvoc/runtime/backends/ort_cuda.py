"""onnxruntime CUDA: device-resident loops replayed from CUDA graphs.

Per (batch, frames) bucket, each step graph gets a session whose symbolic dimensions are
fixed at load time (so every node, shape arithmetic included, runs on the GPU and the run can
be captured) and two IOBindings over persistent device buffers: A -> B and B -> A. A request then:

- copies the token ids into the bucket's text-encoder buffers and replays the text encoder from
  onnxruntime's CUDA graph (its session has the bucket's dims fixed; without CUDA graphs, or where
  the capture is refused, it runs uncaptured), runs dit_prepare (whose output is written straight
  into the bucket's persistent K/V buffer), resets the step counter and copies the initial noise
  into buffer A;
- runs the loop from CUDA graphs (below); the step counter advances on the device, the
  schedule tables are read by index on the device: nothing crosses to the host in the loop;
- hands the final latent (on the device) to vocoder_prepare and runs the vocoder loop the same
  way; only the finished waveform is copied back.

Two ways to run a loop from CUDA graphs, chosen by ``SEMVOC_CUDA_GRAPHS``:

``semvoc`` (the default where cuda-python is installed: ``cuda-bindings``, part of the ``gpu``
extra): whole loops launched at once, below. On an H200 (reference preset, onnxruntime-gpu
1.31.1, ``benchmarks/device/graph_times.py --graphs-mode onnxruntime,semvoc``) both loops are
captured at batch 1 and 16; at batch 1 the DiT step takes 2.279 ms against 2.291 with
onnxruntime's graphs, the vocoder step 0.663 against 0.673; at batch 16 the two are within 0.2 %.

``onnxruntime`` (the default without cuda-python): onnxruntime's own CUDA graphs
(``enable_cuda_graph``, the two bindings captured as ``gpu_graph_id`` 1 and 2) and one
``run_with_iobinding`` per step; onnxruntime synchronises the stream after every replay, so the
GPU idles while the next step is prepared on the host.

semvoc captures the two runs A and B of a step graph into ONE CUDA graph on a stream of its own
and launches that graph ``calls // 2`` times (plus a one-step graph of A for an odd count) with
no synchronisation in between, then synchronises once: the GPU goes from step to step without
waiting for Python. The sessions are created without onnxruntime's ``enable_cuda_graph`` and with the provider option
``user_compute_stream`` (the stream handle as a decimal string); the runs inside a capture carry
the run option ``disable_synchronize_execution_providers=1``, since onnxruntime otherwise
synchronises the stream at the end of every run, which is illegal while capturing. Before
capturing, A and B each run once uncaptured: onnxruntime allocates from its arena, picks
algorithms and creates cuBLAS workspaces on a session's first run and allocates its memory
pattern on the second, and nothing may be allocated during a capture. The capture is
thread-local (a CUDA call from another thread does not break it). A captured graph is checked
before it is kept: a node that is not a kernel, memset, device-to-device copy or event (e.g. the
host function onnxruntime enqueues to free pinned staging buffers, which a replay would free
again, or a copy from such a buffer) refuses it. Each step session keeps its own memory arena:
the graph replays the addresses of the intermediate tensors of the captured runs, which only
runs of that session, on the same stream, ever reuse.

**Branches side by side.** A step graph that the export cut into parts (the manifest's
``parts``: the vocoder step's branches and a tail, ``export/step_parts.py``) runs, in the
``semvoc`` way, as one fork/join per step (``_BranchParts``): each part has a session of its own,
branch 0 and the tail on the backend's stream, every other branch on a side stream of its own;
the side streams wait for an event the backend's stream records before the branches, and the
backend's stream waits for an event each side stream records after its branch. Captured, the branches become parallel
paths of the loop's CUDA graph; only their results, persistent buffers, pass between the parts.
The first (uncaptured) runs go one part at a time, so semvoc's ops time their GEMM algorithms
alone. Where binding or capturing the parts fails, the step runs whole (``capture_failures`` says
why). Buckets of up to ``SEMVOC_BRANCH_STREAMS`` (default 1) run the parts, larger ones and every
bucket with ``SEMVOC_BRANCH_STREAMS=0`` the whole step: on an H200 the parts took the vocoder step
from 0.647 to 0.557 ms at batch 1 (same run), while at batch 4 they gave 1.97 ms against 2.01
(0.6 % of a request) for 700 MiB more peak memory, and at batch 16 7.0 ms (7.05 whole, in an
earlier run) for 1.2 GiB more (each part's session keeps its own arena). The other modes always run the whole graph.

Anything that stops the ``semvoc`` way (cuda-python missing, no stream, a session refused, a
capture that fails or holds an unsafe node) falls back to ``onnxruntime`` for that loop, and if
onnxruntime refuses its capture too, the loop runs uncaptured (still device-resident);
``capture_failures`` and ``describe()`` say which and why.

Ordering, in the ``semvoc`` way. Every CUDA session of the backend (text encoder, prepare and
table graphs, semantic encoder, step graphs) runs on the backend's one stream, so onnxruntime's
work is ordered on it; the one-text graphs run with onnxruntime's end-of-run synchronisation, so
the host continues only when their results are there. ``do_copy_in_default_stream`` stays 1:
copies onnxruntime makes inside a run go on the compute stream, i.e. this one. The host <-> device
copies outside runs (``OrtValue.update_inplace``, ``ortvalue_from_numpy``, ``.numpy()``) are
synchronous ``cudaMemcpy`` calls on the legacy default stream, so the stream is created blocking
(no ``cudaStreamNonBlocking``): the legacy default stream then waits for work queued on it
before a copy starts, and work queued after a copy waits for the copy to finish, which a
pageable host -> device ``cudaMemcpy`` does not guarantee on return. Handles returned by a
stage are device buffers owned by the backend, valid until that stage runs again (the
pipeline serves one request at a time).

The step graphs' weights are on the device once per graph, whatever the buckets: every session of
a step graph (each bucket's, the uncaptured one) takes them from ``shared_weights`` (engines
exported before semvoc indexed them: one copy per session, as before).

The schedule tables (``dit_time``/``vocoder_time``) are computed once per step count and kept.
Progress is reported when a loop is done: its launches are queued in microseconds, so a count
per launch would report work queued, not done, and knowing when a launch is done takes a
synchronisation the loop exists to avoid. NaN/Inf is checked on the loop's final state; when
found, the loop is re-run eagerly step by step to name the first bad step.
"""

from __future__ import annotations

import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from semvoc.runtime.backends.base import (
    Backend,
    BackendUnavailable,
    NonFiniteError,
    Progress,
    bucket_symbols,
    loop_buffers,
    padded_table,
    ping_pong_wiring,
    tensor_shape,
)
from semvoc.runtime.backends.cuda_graph import check, graph_hazards, import_cudart, launch_plan
from semvoc.runtime.backends.ort_common import NUMPY_DTYPES, cuda_ops_exported_here, make_session
from semvoc.runtime.backends.shared_weights import SharedWeights, load_shared_weights, sharing_enabled
from semvoc.runtime.gemm_algorithms import use_algorithms_file
from semvoc.runtime.manifest import EngineError, GraphInfo, Manifest, dim_name, eval_dim
from semvoc.runtime.schedules import DitSchedule

GRAPHS_ENV = "SEMVOC_CUDA_GRAPHS"
#: how the loops run from CUDA graphs: whole loops launched by semvoc, or onnxruntime's graph per step
GRAPH_MODES = ("semvoc", "onnxruntime")
_MODE_NAMES = {"semvoc": "whole-loop CUDA graphs", "onnxruntime": "onnxruntime's per-step CUDA graphs",
               "": "uncaptured"}
_FALLBACK = {"semvoc": "onnxruntime", "onnxruntime": ""}
#: the largest batch bucket whose step graph cut into branches (the vocoder's) runs them side by side;
#: "0": every bucket runs the step whole, its branches one after another
BRANCH_STREAMS_ENV = "SEMVOC_BRANCH_STREAMS"
#: on an H200 (reference preset): batch 1 -14 % per vocoder step; batch 4 -2 % for 700 MiB and batch 16
#: about -1 % for 1.2 GiB more memory (each part's session keeps its own arena)
BRANCH_STREAMS_MAX_BATCH = 1


#: said when an engine with semvoc's CUDA ops is served by the process that exported one
SAME_PROCESS_WARNING = (
    "this process exported an engine with semvoc's CUDA ops, and a process that went on to serve such an "
    "engine with the vocoder's branches side by side has crashed after its first requests (cause not yet "
    "known): serve it from a new process (semvoc-run, or a fresh Python interpreter)")


def branch_streams_max_batch() -> int:
    """The largest batch that runs a step's branches side by side (``SEMVOC_BRANCH_STREAMS``)."""
    value = os.environ.get(BRANCH_STREAMS_ENV, "").strip()
    if not value:
        return BRANCH_STREAMS_MAX_BATCH
    if not value.isdigit():
        raise BackendUnavailable(f"{BRANCH_STREAMS_ENV}={value!r}: set it to the largest batch that runs the "
                                 f"vocoder's branches side by side (default {BRANCH_STREAMS_MAX_BATCH}), or 0 for none")
    return int(value)


def _cuda_python_installed() -> bool:
    try:
        import_cudart()
    except ImportError:
        return False
    return True


def cuda_graphs_mode() -> str:
    """The CUDA-graph mode asked for with ``SEMVOC_CUDA_GRAPHS``; when unset, ``semvoc`` (whole
    loops) where cuda-python is installed, else ``onnxruntime`` (a graph per step)."""
    value = os.environ.get(GRAPHS_ENV, "").strip().lower()
    if not value:
        return "semvoc" if _cuda_python_installed() else "onnxruntime"
    if value not in GRAPH_MODES:
        raise BackendUnavailable(f"{GRAPHS_ENV}={value!r} is not a CUDA-graph mode: set it to 'semvoc' (whole "
                                 "loops launched at once, the default with cuda-python) or 'onnxruntime' "
                                 "(onnxruntime's graph per step)")
    return value


class CaptureRefused(RuntimeError):
    """A loop could not be captured into a CUDA graph that is safe to replay; the message says why."""


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


@dataclass
class _Captured:
    """A graph that runs once per request (the text encoder), replayed from onnxruntime's CUDA graph
    of a session with the bucket's dims fixed, on persistent input and output buffers: its ~600
    kernels then cost one launch instead of one host round of onnxruntime's executor each."""

    session: object
    binding: object
    buffers: dict[str, object]
    runs: int = 0  # onnxruntime counts the first run and captures the second

    @property
    def captured(self) -> bool:
        return self.runs >= 2


@dataclass
class _Loop:
    """A step graph bound for one bucket: persistent buffers, the A and B bindings, and how they run:
    ``mode`` "semvoc" (``graphs``: steps per launch -> instantiated CUDA graph, None for a one-step
    graph that was refused), "onnxruntime" (onnxruntime replays its own graph per step) or ""."""

    session: object
    buffers: dict[str, object]
    state: str
    symbols: dict
    mode: str
    bindings: list = field(default_factory=list)
    run_options: list = field(default_factory=list)
    graphs: dict[int, object] = field(default_factory=dict)
    parts: _BranchParts | None = None  # the step's branches side by side (``semvoc`` mode)

    def run(self, k: int, one_at_a_time: bool = False) -> None:
        """Queue step ``k`` of the loop (binding A for even ``k``, B for odd) on the backend's stream;
        ``one_at_a_time``: see ``_BranchParts.run``."""
        if self.parts is not None:
            self.parts.run(k % 2, one_at_a_time)
        else:
            self.session.run_with_iobinding(self.bindings[k % 2], self.run_options[k % 2])


@dataclass
class _BranchParts:
    """A step graph run as its parts (the manifest's ``parts``, ``export/step_parts.py``): per step,
    the backend's stream records ``fork``, which every side stream waits for; branch 0 runs on the
    backend's stream and branch ``i`` on side stream ``i - 1``; each side stream records its
    ``joins`` event, which the backend's stream waits for; then the tail runs on the backend's
    stream. Captured, this is one CUDA graph in which the branches are parallel paths; uncaptured
    it runs the same way."""

    cudart: object
    stream: object
    side_streams: list
    fork: object
    joins: list
    sessions: list  # branch 0, branch 1, ..., tail
    bindings: list  # per part: [A, B]
    run_options: object

    def run(self, k: int, one_at_a_time: bool = False) -> None:
        """Queue step ``k`` (0: A, 1: B). ``one_at_a_time``: each part runs alone, the host waiting
        for it (the first runs, where semvoc's ops time their algorithms)."""
        cudart = self.cudart
        check(cudart, cudart.cudaEventRecord(self.fork, self.stream))
        for side in self.side_streams:
            check(cudart, cudart.cudaStreamWaitEvent(side, self.fork, 0))
        streams = [self.stream, *self.side_streams]
        for stream, session, bindings in zip(streams, self.sessions[:-1], self.bindings[:-1], strict=True):
            session.run_with_iobinding(bindings[k], self.run_options)
            if one_at_a_time:
                check(cudart, cudart.cudaStreamSynchronize(stream))
        for side, join in zip(self.side_streams, self.joins, strict=True):
            check(cudart, cudart.cudaEventRecord(join, side))
            check(cudart, cudart.cudaStreamWaitEvent(self.stream, join, 0))
        self.sessions[-1].run_with_iobinding(self.bindings[-1][k], self.run_options)


class OrtCudaBackend(Backend):
    name = "onnxruntime-cuda"
    pads_batches = True

    def __init__(self, manifest: Manifest, device_id: int = 0, cuda_graphs: bool = True):
        super().__init__(manifest)
        import onnxruntime as ort

        if hasattr(ort, "preload_dlls"):
            ort.preload_dlls()
        self.ort = ort
        self.device_id = device_id
        if manifest.custom_ops_library and cuda_ops_exported_here():
            warnings.warn(SAME_PROCESS_WARNING, RuntimeWarning, stacklevel=2)
        # semvoc's LtGemm records its cuBLASLt algorithm choices beside the engine (before any
        # session: the op reads where on its first call)
        self.gemm_algorithms = use_algorithms_file(manifest.root) if manifest.custom_ops_library else None
        self._sessions: dict[tuple, object] = {}
        self._loops: dict[tuple, _Loop] = {}
        self._captured: dict[int, _Captured | None] = {}  # batch -> the captured text encoder (None: refused)
        self._tables: dict[str, object] = {}  # persistent schedule tables shared by all buckets
        self._table_keys: dict[str, object] = {}
        self.capture_failures: list[str] = []
        self.load_threads = 8  # sessions created at once by prepare()
        self.warm_up = True  # prepare() also runs each once-per-request graph once at the bucket's shapes
        self._warmed: set[tuple[str, int]] = set()
        self._prepared: set[tuple] = set()  # (batch, frames, text, duration) that prepare() has done
        self._shrink_after_warm_up = os.environ.get("SEMVOC_WARM_UP_SHRINK", "1") != "0"
        # prepare() also runs each step graph once, uncaptured, in its loading thread
        self._step_warm_runs = os.environ.get("SEMVOC_STEP_WARM_RUN", "0") == "1"
        self.memory_notes: list[str] = []
        # "semvoc", "onnxruntime" or "" (no capture); "semvoc" needs cuda-python and a stream
        self.graphs_mode = cuda_graphs_mode() if cuda_graphs else ""
        self.branch_streams_max_batch = branch_streams_max_batch()
        # graph name -> its weights on the device (None: each session loads its own), created once
        # even when prepare() creates several sessions of a graph in parallel threads
        self._weights: dict[str, SharedWeights | None] = {}
        self._weight_locks: dict[str, threading.Lock] = {}
        self._weights_lock = threading.Lock()
        self.sharing_failures: list[str] = []
        self.cudart = None
        self.stream = None
        self._side_streams: list = []  # for the branches of a step cut into parts (created on first use)
        self._events: list = []
        if self.graphs_mode == "semvoc":
            self._open_stream()

    # ------------------------------------------------------------------------------- stream
    def _open_stream(self) -> None:
        try:
            cudart = import_cudart()
        except ImportError:
            self._without_stream("cuda-python is not installed (pip install 'semvoc[gpu]')")
            return
        try:
            check(cudart, cudart.cudaSetDevice(self.device_id))
            # blocking (no cudaStreamNonBlocking): ordered with the legacy default stream's copies
            self.stream = check(cudart, cudart.cudaStreamCreate())
        except Exception as err:
            self._without_stream(f"no CUDA stream ({_first_line(err)})")
            return
        self.cudart = cudart

    def _without_stream(self, reason: str) -> None:
        self.capture_failures.append(f"whole-loop CUDA graphs: {reason}; onnxruntime's per-step graphs instead")
        self.graphs_mode = "onnxruntime"

    def _stream_handle(self) -> int | None:
        return None if self.stream is None else int(self.stream)

    def _sync(self) -> None:
        check(self.cudart, self.cudart.cudaStreamSynchronize(self.stream))

    # ------------------------------------------------------------------------------ helpers
    def _empty(self, shape, dtype: str):
        return self.ort.OrtValue.ortvalue_from_shape_and_type(
            [int(s) for s in shape], NUMPY_DTYPES[dtype], "cuda", self.device_id)

    def _upload(self, array: np.ndarray, dtype: str):
        return self.ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array, NUMPY_DTYPES[dtype]),
                                                     "cuda", self.device_id)

    def _symbols(self, batch: int, frames: int) -> dict[str, int]:
        return bucket_symbols(self.manifest, batch, frames)

    def _overrides(self, graph: GraphInfo, symbols) -> dict[str, int]:
        """Every symbolic input dim of the ONNX file (by its dim_param name) -> its value."""
        overrides = {}
        for t in graph.inputs:
            names = t.onnx_dims or [dim_name(s) if isinstance(s, str) else s for s in t.shape]
            for name, expression in zip(names, t.shape, strict=True):
                if isinstance(name, str) and name:
                    overrides[name] = eval_dim(expression, symbols)
        return overrides

    def _session_key(self, graph: GraphInfo, symbols: dict | None, graphs: str) -> tuple:
        """``graphs``: "" for a graph run uncaptured, else the CUDA-graph mode its session is made for."""
        overrides = self._overrides(graph, symbols) if symbols else None
        return graph.name, tuple(sorted((overrides or {}).items())), graphs

    def _shared_weights(self, graph: GraphInfo) -> SharedWeights | None:
        """The graph's weights on the device, uploaded by the first session that needs them."""
        if not graph.weights or not sharing_enabled():
            return None
        with self._weights_lock:
            lock = self._weight_locks.setdefault(graph.name, threading.Lock())
        with lock:
            if graph.name not in self._weights:
                try:
                    self._weights[graph.name] = load_shared_weights(self.manifest.root, graph, "cuda",
                                                                    self.device_id)
                except EngineError:
                    raise
                except (AttributeError, TypeError, RuntimeError) as err:
                    # an onnxruntime that cannot make or take the views: one copy per session, said by describe()
                    self._weights[graph.name] = None
                    self.sharing_failures.append(f"{graph.name}: {str(err).strip().splitlines()[0]}")
            return self._weights[graph.name]

    def _create_session(self, graph: GraphInfo, key: tuple):
        _, overrides, graphs = key
        weights = self._shared_weights(graph)
        # the graphs run once per request share one memory arena; a captured step graph keeps its
        # own: its CUDA graphs replay fixed addresses that a shared arena hands to other sessions
        # between replays (measured on an H200: the same seed then gave different audio).
        # onnxruntime's own graphs run on onnxruntime's stream, everything else on the backend's (if
        # any). The shared weights are allocated once, outside any session, and never move
        shared = not graphs
        return make_session(self.manifest.root / graph.file, "cuda", dim_overrides=dict(overrides) or None,
                            cuda_graph=graphs == "onnxruntime", device_id=self.device_id,
                            custom_ops=self.manifest.custom_ops_library, shared_arena=shared,
                            compute_stream=None if graphs == "onnxruntime" else self._stream_handle(),
                            initializers=weights.initializers if weights else None)

    def _session(self, graph: GraphInfo, symbols: dict | None = None, graphs: str = ""):
        key = self._session_key(graph, symbols, graphs)
        if key not in self._sessions:
            self._sessions[key] = self._create_session(graph, key)
        return self._sessions[key]

    def prepare(self, batch: int, frames: int, *, text: bool = True, duration_s: float | None = None) -> None:
        """Create every session a request of this bucket needs, in parallel threads (onnxruntime
        releases the GIL while it loads and optimizes a graph), and run each graph that runs once
        per request one time on zeros at this bucket's shapes in the same thread (cuBLAS and cuDNN
        initialise and choose their algorithms on a graph's first run at a shape: about a second
        for the vocoder's prepare graph on an H200). The first request then waits for the slowest
        of these, not for their sum. Captured step graphs are only created here (the first tasks
        submitted: they take longest), and with ``SEMVOC_STEP_WARM_RUN=1`` run once uncaptured; the
        runs onnxruntime counts before it captures, and the captures, happen in the request, on
        this thread alone (a capture must not overlap other work on the GPU)."""
        request = (batch, frames, text, duration_s)
        if request in self._prepared:  # every later request of this kind: nothing to look up
            return
        manifest, symbols = self.manifest, self._symbols(batch, frames)
        once = ["text_encoder", "dit_prepare", "dit_time"] if text else []
        steps = ["dit_step", "vocoder_step"] if text else ["vocoder_step"]
        graphs = [manifest.graph(kind) for kind in [*once, "vocoder_prepare", "vocoder_time"]]
        if not text:
            graphs.append(manifest.graph("semantic_encoder", duration_s))
        # the step graphs first: their sessions take longest to create (the vocoder step's
        # ~1.3 s on an H200), and a task submitted later starts later (up to 0.3 s for the last)
        tasks, part_tasks = {}, {}
        for kind in steps:
            graph = manifest.graph(kind)
            if (kind, batch, frames) in self._loops:
                continue
            if self._runs_as_parts(graph, batch):  # the parts' sessions, not the whole graph's
                for part, stream in zip(graph.parts, self._part_streams(graph), strict=True):
                    key = self._part_key(graph, part, symbols)
                    if key not in self._sessions:
                        part_tasks[key] = (graph, part, symbols, stream)
                continue
            key = self._session_key(graph, symbols, self.graphs_mode)
            if key not in self._sessions:
                tasks[key] = (graph, self._step_warm_runs and self.graphs_mode == "onnxruntime")
        for graph in graphs:
            captured = graph.kind == "text_encoder" and self._captures_text(batch)
            key = self._session_key(graph, symbols if captured else None, "onnxruntime" if captured else "")
            warm = self.warm_up and (graph.name, batch) not in self._warmed
            if key not in self._sessions or warm:
                tasks[key] = (graph, warm)
        if not tasks and not part_tasks:
            self._prepared.add(request)
            return

        def load(key: tuple, graph: GraphInfo, warm: bool):
            session = self._sessions.get(key) or self._create_session(graph, key)
            if warm:
                self._warm_run(session, graph, symbols, captured=bool(key[2]))
            return session

        with ThreadPoolExecutor(max_workers=min(self.load_threads, len(tasks) + len(part_tasks))) as pool:
            parts = {key: pool.submit(self._create_part_session, *task) for key, task in part_tasks.items()}
            futures = {key: pool.submit(load, key, *task) for key, task in tasks.items()}
        for key, future in parts.items():
            if future.exception() is None:  # else binding the loop tries again, and runs the step whole
                self._sessions[key] = future.result()
        failed, refused = None, False
        for key, future in futures.items():
            try:
                self._sessions[key] = future.result()
                if tasks[key][1]:
                    self._warmed.add((tasks[key][0].name, batch))
            except Exception as err:
                # a step graph whose session was refused is retried in the fallback mode by _bind_loop
                refused = refused or bool(key[2])
                if not key[2] and failed is None:
                    failed = err
        if failed is not None:
            raise failed
        if text:
            self._capture_text(batch)  # on this thread: the request's (onnxruntime's graphs are per thread)
        if not refused:
            self._prepared.add(request)

    def _warm_run(self, session, graph: GraphInfo, symbols: dict[str, int], captured: bool = False) -> None:
        """One run of ``graph`` on zeros (attention masks of ones) at the bucket's shapes; the
        outputs are dropped. The run then gives the arena's free regions back to the device
        (``memory.enable_memory_arena_shrinkage``): the warm-up runs of a bucket run at once, in
        parallel threads, so their peaks add up in the shared arena, while a request runs these
        graphs one after another (on an H200 at batch 16: 1.2 GiB less after ``prepare``, 840 MiB
        less at the end of the request; ``SEMVOC_WARM_UP_SHRINK=0`` keeps the regions).

        A step graph's capture session (``SEMVOC_STEP_WARM_RUN=1``) runs uncaptured
        (``gpu_graph_id`` -1): its own arena grows to its peak and the kernels' modules load
        before the request's thread runs the runs that onnxruntime counts before it captures
        (those must run on the thread that replays, see ``_bind_loop``); that arena keeps its
        regions, which the captured runs reuse. The same holds for the text encoder's capture
        session (``captured``)."""
        binding = session.io_binding()
        for t in graph.inputs:
            shape = tensor_shape(t, symbols)
            fill = np.ones if t.name.endswith("mask") else np.zeros
            binding.bind_ortvalue_input(t.name, self._upload(fill(shape, NUMPY_DTYPES[t.dtype]), t.dtype))
        for t in graph.outputs:
            binding.bind_output(t.name, "cuda", self.device_id)
        options = None
        if captured or graph.kind in ("dit_step", "vocoder_step"):
            options = self.ort.RunOptions()
            options.add_run_config_entry("gpu_graph_id", "-1")
            session.run_with_iobinding(binding, options)
            return
        if self._shrink_after_warm_up:
            options = self.ort.RunOptions()
            options.add_run_config_entry("memory.enable_memory_arena_shrinkage", f"gpu:{self.device_id}")
        try:
            session.run_with_iobinding(binding, options)
        except Exception as err:
            if options is None or "arena" not in str(err).lower():
                raise
            # an onnxruntime whose arena cannot shrink: keep the regions, say so in describe()
            self._shrink_after_warm_up = False
            self.memory_notes.append(f"arena not shrunk after warm-up ({_first_line(err)})")
            session.run_with_iobinding(binding)

    def _run_once(self, kind: str, inputs: dict, outputs: dict | None = None, duration_s=None) -> list:
        """Run an uncaptured graph: numpy inputs are uploaded, OrtValues bound as they are;
        outputs go to the given OrtValues, or to new device buffers (returned in order)."""
        graph = self.manifest.graph(kind, duration_s)
        session = self._session(graph)
        binding = session.io_binding()
        for t in graph.inputs:
            value = inputs[t.name]
            if isinstance(value, np.ndarray):
                binding.bind_ortvalue_input(t.name, self._upload(value, t.dtype))
            else:
                binding.bind_ortvalue_input(t.name, value)
        for t in graph.outputs:
            if outputs and t.name in outputs:
                binding.bind_ortvalue_output(t.name, outputs[t.name])
            else:
                binding.bind_output(t.name, "cuda", self.device_id)
        session.run_with_iobinding(binding)
        return binding.get_outputs()

    # --------------------------------------------------------------------------- step loops
    def _loop(self, kind: str, batch: int, frames: int, state: str, shared: tuple[str, ...]) -> _Loop:
        key = (kind, batch, frames)
        if key in self._loops:
            return self._loops[key]
        graph = self.manifest.graph(kind)
        symbols = self._symbols(batch, frames)
        buffers = loop_buffers(graph, symbols, state, shared, self._tables, self._empty)
        loop = self._bind_loop(graph, symbols, buffers, state, self.graphs_mode)
        self._loops[key] = loop
        return loop

    def _bind_loop(self, graph: GraphInfo, symbols, buffers, state: str, mode: str) -> _Loop:
        if mode == "semvoc" and self._runs_as_parts(graph, symbols["batch"]):
            try:
                return self._bind_parts(graph, symbols, buffers, state)
            except Exception as err:  # the whole graph, in the same mode
                self.capture_failures.append(f"{graph.name} (branches side by side): {_first_line(err)}; "
                                             "run whole")
                for part in graph.parts:
                    self._sessions.pop(self._part_key(graph, part, symbols), None)
        try:
            session = self._session(graph, symbols, mode)
        except Exception as err:  # e.g. onnxruntime refused capture at load time
            if not mode:
                raise
            return self._fall_back(graph, symbols, buffers, state, mode, err)
        loop = _Loop(session, buffers, state, symbols, mode)
        for graph_id, (x_in, s_in, x_out, s_out) in enumerate(ping_pong_wiring(state), start=1):
            binding = session.io_binding()
            for t in graph.inputs:
                source = {state: x_in, "step": s_in}.get(t.name, t.name)
                binding.bind_ortvalue_input(t.name, buffers[source])
            binding.bind_ortvalue_output(graph.outputs[0].name, buffers[x_out])
            binding.bind_ortvalue_output(graph.outputs[1].name, buffers[s_out])
            options = self.ort.RunOptions()
            if mode == "semvoc":
                # queued on the backend's stream, never synchronised by onnxruntime: a run inside a
                # capture must not synchronise, and a loop synchronises once, at its end
                options.add_run_config_entry("disable_synchronize_execution_providers", "1")
            else:
                options.add_run_config_entry("gpu_graph_id", str(graph_id) if mode else "-1")
            loop.bindings.append(binding)
            loop.run_options.append(options)
        if mode == "semvoc":
            try:
                self._warm_up(loop)
                loop.graphs[2] = self._capture(loop, 2)
            except Exception as err:
                return self._fall_back(graph, symbols, buffers, state, mode, err)
        return loop

    def _runs_as_parts(self, graph: GraphInfo, batch: int) -> bool:
        return self.graphs_mode == "semvoc" and bool(graph.parts) and batch <= self.branch_streams_max_batch

    def _part_key(self, graph: GraphInfo, part, symbols) -> tuple:
        return part.file, tuple(sorted(self._overrides(graph, symbols).items())), "semvoc"

    def _part_streams(self, graph: GraphInfo) -> list:
        """The stream of each part: branch 0 and the tail on the backend's, branch i on side stream i - 1."""
        branches = sum(p.role == "branch" for p in graph.parts)
        return [self.stream, *(self._side_stream(i) for i in range(branches - 1)), self.stream]

    def _create_part_session(self, graph: GraphInfo, part, symbols, stream):
        weights = self._shared_weights(graph)
        shared = weights.initializers if weights else {}
        return make_session(self.manifest.root / part.file, "cuda", dim_overrides=self._overrides(graph, symbols),
                            device_id=self.device_id, custom_ops=self.manifest.custom_ops_library,
                            compute_stream=int(stream),
                            initializers={n: shared[n] for n in part.weights if n in shared} or None)

    def _side_stream(self, i: int):
        while len(self._side_streams) <= i:  # blocking, as the backend's stream (see the module docstring)
            self._side_streams.append(check(self.cudart, self.cudart.cudaStreamCreate()))
        return self._side_streams[i]

    def _event(self):
        flags = self.cudart.cudaEventDisableTiming
        event = check(self.cudart, self.cudart.cudaEventCreateWithFlags(flags))
        self._events.append(event)
        return event

    def _bind_parts(self, graph: GraphInfo, symbols, buffers, state: str) -> _Loop:
        """Bind ``graph`` as its parts, its branches on streams side by side (``_BranchParts``),
        warm it up and capture it; raises where any of it fails."""
        streams = self._part_streams(graph)
        for part in graph.parts[:-1]:  # the branches' results, which the tail reads
            for t in part.outputs:
                buffers[t.name] = self._empty(tensor_shape(t, symbols), t.dtype)
        sessions, bindings = [], []
        wiring = ping_pong_wiring(state)
        for part, stream in zip(graph.parts, streams, strict=True):
            key = self._part_key(graph, part, symbols)
            if key not in self._sessions:
                self._sessions[key] = self._create_part_session(graph, part, symbols, stream)
            session = self._sessions[key]
            pair = []
            for x_in, s_in, x_out, s_out in wiring:
                binding = session.io_binding()
                for name in part.inputs:
                    binding.bind_ortvalue_input(name, buffers[{state: x_in, "step": s_in}.get(name, name)])
                for t in part.outputs:
                    target = {graph.outputs[0].name: x_out, graph.outputs[1].name: s_out}.get(t.name, t.name)
                    binding.bind_ortvalue_output(t.name, buffers[target])
                pair.append(binding)
            sessions.append(session)
            bindings.append(pair)
        options = self.ort.RunOptions()  # queued, never synchronised by onnxruntime (see _bind_loop)
        options.add_run_config_entry("disable_synchronize_execution_providers", "1")
        side = streams[1:-1]
        parts = _BranchParts(self.cudart, self.stream, side, self._event(), [self._event() for _ in side],
                             sessions, bindings, options)
        loop = _Loop(None, buffers, state, symbols, "semvoc", parts=parts)
        self._warm_up(loop)
        loop.graphs[2] = self._capture(loop, 2)
        return loop

    def _fall_back(self, graph: GraphInfo, symbols, buffers, state: str, mode: str, err: BaseException) -> _Loop:
        """Record why ``mode`` failed for this loop and bind it in the next mode down."""
        self.capture_failures.append(f"{graph.name} ({_MODE_NAMES[mode]}): {_first_line(err)}")
        self._sessions.pop(self._session_key(graph, symbols, mode), None)  # its memory goes with it
        return self._bind_loop(graph, symbols, buffers, state, _FALLBACK[mode])

    def _warm_up(self, loop: _Loop) -> None:
        """Run A and B once each, uncaptured: onnxruntime's first runs of a session allocate (arena,
        memory pattern, cuBLAS workspace), which must not happen inside a capture."""
        for name in ("step", "step_b"):  # the warm-up reads row 0 of the tables, whatever they hold
            loop.buffers[name].update_inplace(np.zeros(1, np.int64))
        for k in range(2):  # the parts one at a time: semvoc's ops time their algorithms alone
            loop.run(k, one_at_a_time=True)
        self._sync()

    def _capture(self, loop: _Loop, steps: int):
        """Capture ``steps`` runs (A, B, A, ...) into one instantiated CUDA graph, or raise CaptureRefused."""
        cudart = self.cudart
        # thread-local: an unsafe call (cudaMalloc, a sync) from this thread breaks the capture,
        # one from another thread does not
        check(cudart, cudart.cudaStreamBeginCapture(
            self.stream, cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal))
        failure = None
        try:
            for k in range(steps):
                loop.run(k)
        except Exception as err:
            failure = f"onnxruntime failed inside the capture: {_first_line(err)}"
        err, graph = cudart.cudaStreamEndCapture(self.stream)  # ends the capture even after a failure
        if failure is None and err != cudart.cudaError_t.cudaSuccess:
            failure = f"the capture failed ({cudart.cudaGetErrorName(err)[1].decode()})"
        executable = None
        if err == cudart.cudaError_t.cudaSuccess:
            try:
                if failure is None:
                    hazards = graph_hazards(cudart, graph)
                    if hazards:
                        failure = (f"the captured graph holds {', '.join(sorted(set(hazards)))}, which a replay "
                                   "would repeat")
                if failure is None:
                    err, executable = cudart.cudaGraphInstantiate(graph, 0)
                    if err != cudart.cudaError_t.cudaSuccess:
                        failure = f"the graph could not be instantiated ({cudart.cudaGetErrorName(err)[1].decode()})"
                        executable = None
            finally:
                check(cudart, cudart.cudaGraphDestroy(graph))
        if failure is not None:
            cudart.cudaGetLastError()  # clear the capture error so later calls do not report it
            raise CaptureRefused(failure)
        return executable

    def _run_loop(self, loop: _Loop, kind: str, calls: int, progress: Progress, stage: str) -> None:
        if loop.mode == "semvoc":
            self._launch(loop, kind, calls)
            if progress:
                progress(stage, calls)
            return
        for k in range(calls):
            try:
                loop.session.run_with_iobinding(loop.bindings[k % 2], loop.run_options[k % 2])
            except Exception as err:
                if loop.mode != "onnxruntime" or k > 2:
                    raise
                # onnxruntime refused its capture at run time: rebind uncaptured and carry on from this step
                fresh = self._fall_back(self.manifest.graph(kind), loop.symbols, loop.buffers, loop.state,
                                        loop.mode, err)
                loop.session, loop.bindings, loop.run_options, loop.mode = (
                    fresh.session, fresh.bindings, fresh.run_options, fresh.mode)
                loop.session.run_with_iobinding(loop.bindings[k % 2], loop.run_options[k % 2])
            if progress:
                progress(stage, k + 1)

    def _launch(self, loop: _Loop, kind: str, calls: int) -> None:
        """``calls`` steps from the captured graphs, queued back to back, then one synchronisation."""
        pairs, single = launch_plan(calls)
        if single and 1 not in loop.graphs:
            try:
                loop.graphs[1] = self._capture(loop, 1)
            except Exception as err:  # CaptureRefused, or a CUDA call that failed
                loop.graphs[1] = None
                self.capture_failures.append(f"{kind} (one-step graph): {err}; an odd step count ends uncaptured")
        for _ in range(pairs):
            check(self.cudart, self.cudart.cudaGraphLaunch(loop.graphs[2], self.stream))
        if single:
            if loop.graphs[1] is not None:
                check(self.cudart, self.cudart.cudaGraphLaunch(loop.graphs[1], self.stream))
            else:  # queued after the launches, on the same stream
                loop.run(0)
        self._sync()

    # ------------------------------------------------------------------------------- stages
    def _captures_text(self, batch: int) -> bool:
        """Whether the text encoder runs from onnxruntime's CUDA graph at this batch: with CUDA
        graphs on, until a capture of it was refused."""
        return bool(self.graphs_mode) and self._captured.get(batch, True) is not None

    def _text_graph(self, batch: int) -> _Captured | None:
        """The text encoder's capture session at this batch, bound to its persistent buffers
        (created on first use); None where it was refused (``capture_failures`` says why)."""
        if not self._captures_text(batch):
            return None
        if batch in self._captured:
            return self._captured[batch]
        graph = self.manifest.graph("text_encoder")
        symbols = self._symbols(batch, 0)  # token dims are fixed by the engine; no frames
        try:
            session = self._session(graph, symbols, "onnxruntime")
            buffers = {t.name: self._empty(tensor_shape(t, symbols), t.dtype) for t in (*graph.inputs, *graph.outputs)}
            binding = session.io_binding()
            for t in graph.inputs:
                binding.bind_ortvalue_input(t.name, buffers[t.name])
            for t in graph.outputs:
                binding.bind_ortvalue_output(t.name, buffers[t.name])
            self._captured[batch] = _Captured(session, binding, buffers)
        except Exception as err:
            self._refuse_text(batch, err)
        return self._captured[batch]

    def _refuse_text(self, batch: int, err: Exception) -> None:
        self._captured[batch] = None
        self.capture_failures.append(f"text_encoder (onnxruntime's CUDA graph, batch {batch}): {_first_line(err)}; "
                                     "it runs uncaptured")

    def _run_text(self, text: _Captured, input_ids: np.ndarray, attention_mask: np.ndarray) -> None:
        dtypes = {t.name: NUMPY_DTYPES[t.dtype] for t in self.manifest.graph("text_encoder").inputs}
        text.buffers["input_ids"].update_inplace(np.ascontiguousarray(input_ids, dtypes["input_ids"]))
        text.buffers["attention_mask"].update_inplace(np.ascontiguousarray(attention_mask, dtypes["attention_mask"]))
        text.session.run_with_iobinding(text.binding)
        text.runs += 1

    def _capture_text(self, batch: int) -> None:
        """Run the text encoder's capture session twice on placeholder tokens: onnxruntime counts
        the first run and captures the second, so the first request already replays."""
        text = self._text_graph(batch)
        if text is None or text.captured:
            return
        shape = tensor_shape(self.manifest.graph("text_encoder").input("input_ids"), self._symbols(batch, 0))
        try:
            while not text.captured:
                self._run_text(text, np.zeros(shape, np.int64), np.ones(shape, np.int64))
        except Exception as err:
            self._refuse_text(batch, err)

    def encode_text(self, input_ids, attention_mask):
        """The context on the device: the captured text encoder's output buffer (valid until the
        next request of this batch encodes its text), else a new buffer."""
        batch = len(input_ids)
        text = self._text_graph(batch)
        if text is not None:
            try:
                self._run_text(text, input_ids, attention_mask)
                return text.buffers["context"]
            except Exception as err:
                self._refuse_text(batch, err)
        return self._run_once("text_encoder", {"input_ids": input_ids, "attention_mask": attention_mask})[0]

    def _set_dit_tables(self, schedule: DitSchedule) -> None:
        key = schedule.embedded.tobytes() + schedule.sigmas.tobytes()
        if self._table_keys.get("dit") == key:
            return
        rows = self.manifest.buckets["dit_rows"]
        self._run_once("dit_time", {"timesteps": padded_table(schedule.embedded, rows)},
                       {"time_table": self._tables["time_table"]})
        self._tables["sigmas"].update_inplace(padded_table(schedule.sigmas, rows + 1, fill=0.0))
        self._table_keys["dit"] = key

    def dit_loop(self, context, context_mask, latent, schedule, calls, guidance, progress: Progress = None):
        batch, _, frames = latent.shape
        loop = self._loop("dit_step", batch, frames, "latent", shared=("time_table", "sigmas"))
        self._set_dit_tables(schedule)
        b = loop.buffers
        prepare = self.manifest.graph("dit_prepare")  # K/V straight into the loop's buffers
        self._run_once("dit_prepare", {"context": context}, {t.name: b[t.name] for t in prepare.outputs})
        b["context_mask"].update_inplace(np.ascontiguousarray(context_mask, np.bool_))
        b["guidance"].update_inplace(np.array([guidance], np.float32))
        b["latent"].update_inplace(np.ascontiguousarray(latent, np.float32))
        b["step"].update_inplace(np.zeros(1, np.int64))
        self._run_loop(loop, "dit_step", calls, progress, "dit")
        final = b["latent"] if calls % 2 == 0 else b["latent_b"]
        if not np.isfinite(final.numpy()).all():
            self._diagnose(loop, "dit_step", "latent", latent, calls)
        return final

    def _set_vocoder_tables(self, t_span: np.ndarray) -> None:
        key = t_span.tobytes()
        if self._table_keys.get("vocoder") == key:
            return
        rows = self.manifest.buckets["vocoder_rows"]
        names = [t.name for t in self.manifest.graph("vocoder_time").outputs]
        self._run_once("vocoder_time", {"t": padded_table(t_span[:-1], rows)},
                       {n: self._tables[n] for n in names})
        self._tables["t_span"].update_inplace(padded_table(t_span, rows + 1, fill=1.0))
        self._table_keys["vocoder"] = key

    def vocoder_loop(self, latents, audio, t_span, steps, progress: Progress = None):
        batch, samples = audio.shape
        frames = samples // self.manifest.shapes["samples_per_frame"]
        step_graph = self.manifest.graph("vocoder_step")
        shared = ("t_span", *[t.name for t in step_graph.inputs if t.name.startswith("time_scale_")])
        loop = self._loop("vocoder_step", batch, frames, "audio", shared=shared)
        self._set_vocoder_tables(t_span)
        b = loop.buffers
        latents_value = latents if not isinstance(latents, np.ndarray) else self._upload(latents, "float32")
        prepare = self.manifest.graph("vocoder_prepare")
        self._run_once("vocoder_prepare", {"latents": latents_value}, {t.name: b[t.name] for t in prepare.outputs})
        b["audio"].update_inplace(np.ascontiguousarray(audio, np.float32))
        b["step"].update_inplace(np.zeros(1, np.int64))
        self._run_loop(loop, "vocoder_step", steps, progress, "vocoder")
        out = (b["audio"] if steps % 2 == 0 else b["audio_b"]).numpy()
        if not np.isfinite(out).all():
            self._diagnose(loop, "vocoder_step", "audio", audio, steps)
        return out

    def encode_audio(self, waveform, duration_s):
        return self._run_once("semantic_encoder", {"waveform": waveform}, duration_s=duration_s)[0]

    def to_host(self, handle) -> np.ndarray:
        return handle if isinstance(handle, np.ndarray) else handle.numpy()

    # --------------------------------------------------------------------------- diagnosis
    def _diagnose(self, loop: _Loop, kind: str, state: str, initial: np.ndarray, calls: int) -> None:
        """Re-run the loop uncaptured, checking the state after every step, to name the step."""
        graph = self.manifest.graph(kind)
        session = self._session(graph)
        b = dict(loop.buffers)
        b[state].update_inplace(np.ascontiguousarray(initial, np.float32))
        b["step"].update_inplace(np.zeros(1, np.int64))
        for k in range(calls):
            binding = session.io_binding()
            src, dst = (state, state + "_b") if k % 2 == 0 else (state + "_b", state)
            s_src, s_dst = ("step", "step_b") if k % 2 == 0 else ("step_b", "step")
            for t in graph.inputs:
                binding.bind_ortvalue_input(t.name, b[{state: src, "step": s_src}.get(t.name, t.name)])
            binding.bind_ortvalue_output(graph.outputs[0].name, b[dst])
            binding.bind_ortvalue_output(graph.outputs[1].name, b[s_dst])
            session.run_with_iobinding(binding)
            if not np.isfinite(b[dst].numpy()).all():
                raise NonFiniteError(kind, k)
        raise NonFiniteError(kind, calls - 1, " (only when replayed from the CUDA graph)")

    def describe(self) -> str:
        parts = []
        for mode in ("semvoc", "onnxruntime"):
            names = sorted({key[0] for key, loop in self._loops.items() if loop.mode == mode})
            if names:
                parts.append(f"{_MODE_NAMES[mode]}: {', '.join(names)}")
        if not parts:
            parts.append(f"{_MODE_NAMES[self.graphs_mode]}: none yet" if self.graphs_mode else "CUDA graphs off")
        split = sorted({key[0] for key, loop in self._loops.items() if loop.parts is not None})
        if split:
            parts.append(f"branches side by side on CUDA streams: {', '.join(split)}")
        text_batches = sorted(batch for batch, c in self._captured.items() if c is not None and c.captured)
        if text_batches:
            parts.append(f"text_encoder from onnxruntime's CUDA graph (batch {', '.join(map(str, text_batches))})")
        text = f"{self.name} ({'; '.join(parts)})"
        shared = [f"{w.graph} {w.nbytes / 2**20:.0f} MiB{'' if w.packed else ' (a buffer per tensor)'}"
                  for _, w in sorted(self._weights.items()) if w]
        if shared:
            text += f"; weights shared by all buckets: {', '.join(shared)}"
        if self.sharing_failures:
            text += f"; weights not shared (one copy per session): {'; '.join(self.sharing_failures)}"
        if self.memory_notes:
            text += f"; {'; '.join(self.memory_notes)}"
        if self.gemm_algorithms is not None:
            text += f"; GEMM algorithm choices in {self.gemm_algorithms}"
        if self.capture_failures:
            text += f"; capture refused for: {'; '.join(self.capture_failures)}"
        return text

    def close(self):
        if self.stream is not None:
            self._sync()
        for loop in self._loops.values():
            for executable in loop.graphs.values():
                if executable is not None:
                    check(self.cudart, self.cudart.cudaGraphExecDestroy(executable))
        # the sessions run on the stream: they go first
        self._loops.clear()
        self._captured.clear()
        self._sessions.clear()
        self._tables.clear()
        for event in self._events:
            check(self.cudart, self.cudart.cudaEventDestroy(event))
        for side in self._side_streams:
            check(self.cudart, self.cudart.cudaStreamDestroy(side))
        self._events.clear()
        self._side_streams.clear()
        if self.stream is not None:
            check(self.cudart, self.cudart.cudaStreamDestroy(self.stream))
            self.stream = None
        for weights in self._weights.values():  # after the sessions that use them
            if weights is not None:
                weights.close()
        self._weights.clear()

