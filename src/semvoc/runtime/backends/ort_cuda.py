"""onnxruntime CUDA: device-resident loops replayed from CUDA graphs.

Per (batch, frames) bucket, each step graph gets a session whose symbolic dimensions are
fixed at load time (so every node, shape arithmetic included, runs on the GPU and the run can
be captured) and two IOBindings over persistent device buffers: A -> B and B -> A, captured
as ``gpu_graph_id`` 1 and 2. A request then:

- uploads the token ids (host -> device), runs text_encoder and dit_prepare (whose output is
  written straight into the bucket's persistent K/V buffer), resets the step counter and
  copies the initial noise into buffer A;
- replays the two captured graphs alternately; the step counter advances on the device, the
  schedule tables are read by index on the device: nothing crosses to the host in the loop;
- hands the final latent (on the device) to vocoder_prepare and runs the vocoder loop the same
  way; only the finished waveform is copied back.

The step graphs' weights are on the device once per graph, whatever the buckets: every session of
a step graph (each bucket's, the uncaptured one) takes them from ``shared_weights`` (engines
exported before semvoc indexed them: one copy per session, as before).

The schedule tables (``dit_time``/``vocoder_time``) are computed once per step count and kept.
If onnxruntime refuses CUDA-graph capture for a graph, that graph runs uncaptured (still
device-resident) and ``describe()`` says so. NaN/Inf is checked on the loop's final state;
when found, the loop is re-run eagerly step by step to name the first bad step.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
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
)
from semvoc.runtime.backends.ort_common import NUMPY_DTYPES, make_session
from semvoc.runtime.backends.shared_weights import SharedWeights, load_shared_weights, sharing_enabled
from semvoc.runtime.manifest import EngineError, GraphInfo, Manifest, dim_name, eval_dim
from semvoc.runtime.schedules import DitSchedule


@dataclass
class _Loop:
    """A step graph bound for one bucket: persistent buffers and two captured bindings."""

    session: object
    buffers: dict[str, object]
    state: str
    symbols: dict
    bindings: list = field(default_factory=list)
    run_options: list = field(default_factory=list)
    captured: bool = True


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
        self.cuda_graphs = cuda_graphs
        self._sessions: dict[tuple, object] = {}
        self._loops: dict[tuple, _Loop] = {}
        self._tables: dict[str, object] = {}  # persistent schedule tables shared by all buckets
        self._table_keys: dict[str, object] = {}
        self.capture_failures: list[str] = []
        self.load_threads = 8  # sessions created at once by prepare()
        # graph name -> its weights on the device (None: each session loads its own), created once
        # even when prepare() creates several sessions of a graph in parallel threads
        self._weights: dict[str, SharedWeights | None] = {}
        self._weight_locks: dict[str, threading.Lock] = {}
        self._weights_lock = threading.Lock()
        self.sharing_failures: list[str] = []

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

    def _session_key(self, graph: GraphInfo, symbols: dict | None, cuda_graph: bool) -> tuple:
        overrides = self._overrides(graph, symbols) if symbols else None
        return graph.name, tuple(sorted((overrides or {}).items())), cuda_graph

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
        _, overrides, cuda_graph = key
        weights = self._shared_weights(graph)
        # the graphs run once per request share one memory arena; a captured step graph keeps its
        # own: its CUDA graphs replay fixed addresses that a shared arena could hand to another session
        # (the shared weights are allocated once, outside any session, and never move)
        return make_session(self.manifest.root / graph.file, "cuda", dim_overrides=dict(overrides) or None,
                            cuda_graph=cuda_graph, device_id=self.device_id,
                            custom_ops=self.manifest.custom_ops_library, shared_arena=not cuda_graph,
                            initializers=weights.initializers if weights else None)

    def _session(self, graph: GraphInfo, symbols: dict | None = None, cuda_graph: bool = False):
        key = self._session_key(graph, symbols, cuda_graph)
        if key not in self._sessions:
            self._sessions[key] = self._create_session(graph, key)
        return self._sessions[key]

    def prepare(self, batch: int, frames: int, *, text: bool = True, duration_s: float | None = None) -> None:
        """Create every session a request of this bucket needs, in parallel threads (onnxruntime
        releases the GIL while it loads and optimizes a graph): the first request then waits for
        the slowest graph, not for the sum of all of them."""
        manifest, symbols = self.manifest, self._symbols(batch, frames)
        once = ["text_encoder", "dit_prepare", "dit_time"] if text else []
        steps = ["dit_step", "vocoder_step"] if text else ["vocoder_step"]
        specs = [(manifest.graph(kind), None, False) for kind in [*once, "vocoder_prepare", "vocoder_time"]]
        if not text:
            specs.append((manifest.graph("semantic_encoder", duration_s), None, False))
        specs += [(manifest.graph(kind), symbols, self.cuda_graphs) for kind in steps
                  if (kind, batch, frames) not in self._loops]
        todo = {}
        for graph, graph_symbols, capture in specs:
            key = self._session_key(graph, graph_symbols, capture)
            if key not in self._sessions:
                todo[key] = graph
        if not todo:
            return
        with ThreadPoolExecutor(max_workers=min(self.load_threads, len(todo))) as pool:
            futures = {key: pool.submit(self._create_session, graph, key) for key, graph in todo.items()}
        failed = None
        for key, future in futures.items():
            try:
                self._sessions[key] = future.result()
            except Exception as err:
                # a step graph whose capture onnxruntime refused is retried, uncaptured, by _bind_loop
                if not key[2] and failed is None:
                    failed = err
        if failed is not None:
            raise failed

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
        loop = self._bind_loop(graph, symbols, buffers, state, self.cuda_graphs)
        self._loops[key] = loop
        return loop

    def _bind_loop(self, graph: GraphInfo, symbols, buffers, state: str, capture: bool) -> _Loop:
        try:
            session = self._session(graph, symbols, cuda_graph=capture)
        except Exception as err:  # capture refused at load time: run uncaptured
            if not capture:
                raise
            self.capture_failures.append(f"{graph.name}: {err}")
            return self._bind_loop(graph, symbols, buffers, state, capture=False)
        loop = _Loop(session, buffers, state, symbols, captured=capture)
        for graph_id, (x_in, s_in, x_out, s_out) in enumerate(ping_pong_wiring(state), start=1):
            binding = session.io_binding()
            for t in graph.inputs:
                source = {state: x_in, "step": s_in}.get(t.name, t.name)
                binding.bind_ortvalue_input(t.name, buffers[source])
            binding.bind_ortvalue_output(graph.outputs[0].name, buffers[x_out])
            binding.bind_ortvalue_output(graph.outputs[1].name, buffers[s_out])
            options = self.ort.RunOptions()
            options.add_run_config_entry("gpu_graph_id", str(graph_id) if capture else "-1")
            loop.bindings.append(binding)
            loop.run_options.append(options)
        return loop

    def _replay(self, loop: _Loop, kind: str, calls: int, progress: Progress, stage: str) -> None:
        for k in range(calls):
            try:
                loop.session.run_with_iobinding(loop.bindings[k % 2], loop.run_options[k % 2])
            except Exception as err:
                if not loop.captured or k > 2:
                    raise
                # capture refused at run time: rebind uncaptured and carry on from this step
                self.capture_failures.append(f"{kind}: {err}")
                fresh = self._bind_loop(self.manifest.graph(kind), loop.symbols, loop.buffers, loop.state,
                                        False)
                loop.session, loop.bindings, loop.run_options, loop.captured = (
                    fresh.session, fresh.bindings, fresh.run_options, False)
                loop.session.run_with_iobinding(loop.bindings[k % 2], loop.run_options[k % 2])
            if progress:
                progress(stage, k + 1)

    # ------------------------------------------------------------------------------- stages
    def encode_text(self, input_ids, attention_mask):
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
        self._replay(loop, "dit_step", calls, progress, "dit")
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
        self._replay(loop, "vocoder_step", steps, progress, "vocoder")
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
        captured = sorted({k[0] for k, loop in self._loops.items() if loop.captured})
        text = f"{self.name} (CUDA graphs: {', '.join(captured) or 'none yet'})"
        shared = [f"{w.graph} {w.nbytes / 2**20:.0f} MiB" for _, w in sorted(self._weights.items()) if w]
        if shared:
            text += f"; weights shared by all buckets: {', '.join(shared)}"
        if self.sharing_failures:
            text += f"; weights not shared (one copy per session): {'; '.join(self.sharing_failures)}"
        if self.capture_failures:
            text += f"; capture refused for: {'; '.join(self.capture_failures)}"
        return text

    def close(self):
        self._loops.clear()
        self._sessions.clear()
        self._tables.clear()
        self._weights.clear()  # after the sessions that use them

