"""What a backend does: the four stages of a request, with state kept where the backend wants it.

The pipeline calls, in order:
  ``encode_text``  token ids -> context (a backend handle: numpy on CPU, device memory on GPU);
  ``dit_loop``     context + initial latent -> final latent (handle), ``calls`` CFG Euler steps;
  ``vocoder_loop`` latents (handle) + initial waveform -> waveform, on the host, float32;
  ``encode_audio`` (resynthesis) 16 kHz waveform -> latents (handle).
Schedules arrive as numpy tables; backends turn them into the graphs' time tables once per
schedule and cache them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import numpy as np

from semvoc.runtime.manifest import GraphInfo, Manifest, TensorInfo, eval_dim
from semvoc.runtime.schedules import DitSchedule

Progress = Callable[[str, int], None] | None  # (stage, steps done so far)


class NonFiniteError(RuntimeError):
    """NaN or Inf appeared in an ODE loop. ``precision``: the graph's dtype in the engine, when
    known (the pipeline fills it in), decides what the message blames."""

    def __init__(self, graph: str, step: int, detail: str = "", precision: str | None = None):
        self.graph, self.step, self.detail, self.precision = graph, step, detail, precision
        where = f"non-finite values (NaN/Inf) in {graph} at step {step}{detail}."
        if precision in ("float16", "bfloat16"):
            advice = (f" This graph runs in {precision} in this engine, so this is most likely an overflow: "
                      "re-export without --fp16 (fp32), or with more calibration coverage so that the "
                      "overflowing component falls back to fp32.")
        elif precision == "float32":
            advice = (" This graph runs in fp32 in this engine, so this is not an fp16 overflow: check the "
                      "request (a very large --guidance can diverge) and the engine's parity.json; "
                      "re-export the engine if its weights are damaged.")
        else:
            advice = (" In an fp16 engine this is most likely an fp16 overflow (re-export without --fp16); "
                      "in an fp32 engine, check the request's guidance and the engine's parity.json.")
        super().__init__(where + advice)


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here; the message says why and what would."""


class Backend(ABC):
    name: str = "abstract"
    #: the step graphs need inputs padded to an exported batch bucket (CUDA graphs, TensorRT)
    pads_batches: bool = False

    def __init__(self, manifest: Manifest):
        self.manifest = manifest

    @abstractmethod
    def encode_text(self, input_ids: np.ndarray, attention_mask: np.ndarray): ...

    @abstractmethod
    def dit_loop(self, context, context_mask: np.ndarray, latent: np.ndarray, schedule: DitSchedule,
                 calls: int, guidance: float, progress: Progress = None): ...

    @abstractmethod
    def vocoder_loop(self, latents, audio: np.ndarray, t_span: np.ndarray, steps: int,
                     progress: Progress = None) -> np.ndarray: ...

    @abstractmethod
    def encode_audio(self, waveform: np.ndarray, duration_s: float): ...

    def prepare(self, batch: int, frames: int, *, text: bool = True, duration_s: float | None = None) -> None:  # noqa: B027
        """Load up front what a request of this (batch, frames) bucket needs: text -> audio when
        ``text``, else resynthesis at ``duration_s``. Optional (stages load on demand anyway); a
        backend that can load several graphs at once does it here, in parallel."""

    def to_host(self, handle) -> np.ndarray:
        """A handle returned by a stage, as a numpy array."""
        return np.asarray(handle)

    def close(self) -> None:  # noqa: B027 (an optional hook, not abstract)
        """Release sessions and device memory."""

    def describe(self) -> str:
        return self.name


def padded_table(values: np.ndarray, rows: int, fill: float | None = None) -> np.ndarray:
    """``values`` (float32) padded to ``rows`` with its last value (or ``fill``)."""
    if len(values) > rows:
        raise ValueError(f"schedule of {len(values)} entries exceeds the engine's table of {rows}")
    out = np.full(rows, values[-1] if fill is None else fill, dtype=np.float32)
    out[: len(values)] = values
    return out


# ------------------------------------------------------------- device loops (CUDA, TensorRT)


def bucket_symbols(manifest: Manifest, batch: int = 0, frames: int = 0) -> dict[str, int]:
    """Values of the shape symbols for one (batch, frames) bucket of an engine."""
    b = manifest.buckets
    return {"batch": batch, "frames": frames, "dit_rows": b["dit_rows"], "vocoder_rows": b["vocoder_rows"]}


def tensor_shape(tensor: TensorInfo, symbols: dict[str, int]) -> list[int]:
    return [eval_dim(s, symbols) for s in tensor.shape]


def ping_pong_wiring(state: str) -> list[tuple[str, str, str, str]]:
    """(state in, step in, state out, step out) buffer names of the A->B and B->A bindings."""
    return [(state, "step", state + "_b", "step_b"), (state + "_b", "step_b", state, "step")]


def loop_buffers(graph: GraphInfo, symbols: dict[str, int], state: str, shared: tuple[str, ...],
                 tables: dict[str, Any], alloc: Callable[[list[int], str], Any]) -> dict[str, Any]:
    """Persistent buffers of a step graph for one bucket: one per input (``shared`` schedule
    tables come from, and go into, ``tables`` so every bucket reads the same ones), plus the
    B copies of the loop state and step counter (``<state>_b``, ``step_b``)."""
    buffers = {}
    for t in graph.inputs:
        if t.name in shared:
            if t.name not in tables:
                tables[t.name] = alloc(tensor_shape(t, symbols), t.dtype)
            buffers[t.name] = tables[t.name]
        else:
            buffers[t.name] = alloc(tensor_shape(t, symbols), t.dtype)
    buffers[state + "_b"] = alloc(tensor_shape(graph.input(state), symbols), graph.input(state).dtype)
    buffers["step_b"] = alloc([1], "int64")
    return buffers
