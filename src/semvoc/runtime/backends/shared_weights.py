"""One copy of a step graph's weights for all of its onnxruntime sessions.

Why: the CUDA backend creates one session per (step graph, batch bucket), with the bucket's
dimensions fixed at load so that every node runs on the GPU and the loop can be captured in a
CUDA graph. Each session would load its own copy of the graph's weights: a server using batch
buckets 1, 4 and 16 would hold the DiT's weights three times (plus once more for the uncaptured
session that names a NaN's step).

How: onnxruntime takes initializers from the caller (``SessionOptions.add_initializer``); when
the value lives on the device where the session plans that initializer, the session uses its
memory as it is, with no copy (``use_user_supplied_initializer`` in onnxruntime's
``session_state_utils.cc``), CUDA-graph capture included. The exporter writes the step graphs'
weights to ``<graph>.onnx.data`` and indexes them in the manifest (name, dtype, shape, offset,
length; checked by ``semvoc.runtime.manifest``), so no ONNX parser is needed here: each tensor is
read from a memory map of the file, uploaded once to the device, and every session of the graph
gets it. ``add_initializer`` refuses a value that owns its buffer (what ``ortvalue_from_numpy``
returns for CUDA), so sessions get a non-owning DLPack view of it; the owned value is kept for
as long as this object lives, which must outlast the sessions.

onnxruntime substitutes a given weight for whatever its graph optimizations left under that name,
unchecked, so the exporter indexes only the weights that the graph, optimized on the export's
provider, still reads as stored (``onnx_export.weights_used_as_stored``: the transpose optimizer
rewrites some in place). Sessions still get their own copies of what onnxruntime derives from a
weight at load (a constant-folded cast, weights a kernel pre-packs, as the CPU's MatMul does).

Verified: on the CPU with onnxruntime 1.32 (views accepted, two sessions read the one buffer and
give the plain session's outputs: ``tests/test_shared_weights.py``). Not yet run: the CUDA path
(device upload, onnxruntime-gpu 1.31's low-level ``from_dlpack`` form, sessions with CUDA-graph
capture, the export's check on onnxruntime-cuda); ``tests/test_gpu.py`` checks it against the
CPU and ``benchmarks/device/cold_start.py --then-batches 4,16`` measures the memory
(``SEMVOC_SHARED_WEIGHTS=0`` turns sharing off for comparison).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from semvoc.runtime.manifest import EngineError, GraphInfo

if TYPE_CHECKING:
    from onnxruntime import OrtValue


def sharing_enabled() -> bool:
    """Off with ``SEMVOC_SHARED_WEIGHTS=0`` (each session then loads its own copy)."""
    return os.environ.get("SEMVOC_SHARED_WEIGHTS", "1") != "0"


def non_owning_view(owned: OrtValue) -> OrtValue:
    """A view of an OrtValue's buffer that does not own it (what ``add_initializer`` accepts).

    onnxruntime >= 1.32 has ``OrtValue.from_dlpack``; older versions (e.g. onnxruntime-gpu
    1.31) only the low-level ``from_dlpack(capsule, is_bool_tensor)``."""
    import onnxruntime as ort

    if hasattr(ort.OrtValue, "from_dlpack"):
        return ort.OrtValue.from_dlpack(owned)
    from onnxruntime.capi import _pybind_state as C

    capsule = owned._ortvalue.to_dlpack()
    try:
        view = C.OrtValue.from_dlpack(capsule, owned.data_type() == "tensor(bool)")
    except TypeError:  # a version whose low-level form takes the capsule alone
        view = C.OrtValue.from_dlpack(capsule)
    return ort.OrtValue(view)


class SharedWeights:
    """A graph's indexed weights on one device: ``initializers`` goes to ``make_session``."""

    def __init__(self, graph: str, owned: dict[str, OrtValue], views: dict[str, OrtValue], host: list[np.ndarray],
                 nbytes: int):
        self.graph = graph
        self._owned = owned  # name -> OrtValue owning the memory (kept alive for the views)
        self._host = host  # CPU values wrap these arrays' memory
        self.initializers = views  # name -> non-owning OrtValue view
        self.nbytes = nbytes

    def owned(self, name: str) -> OrtValue:
        """The value that owns a weight's memory (tests overwrite it to see every session change)."""
        return self._owned[name]

    def __len__(self) -> int:
        return len(self.initializers)


def load_shared_weights(root: str | Path, graph: GraphInfo, device: str = "cuda",
                        device_id: int = 0) -> SharedWeights | None:
    """Read ``graph``'s indexed weights from its data file and place each once on ``device``
    ("cuda" or "cpu"); None when the engine has no index for it (exported before semvoc wrote
    one: its sessions then load their own copies, as before)."""
    import onnxruntime as ort

    if not graph.weights or not graph.data_file:
        return None
    path = Path(root) / graph.data_file
    try:
        mapped = np.memmap(path, dtype=np.uint8, mode="r")
    except (OSError, ValueError) as err:
        raise EngineError(f"cannot read {path} ({err}); re-export the engine") from err
    owned, views, host = {}, {}, []
    for w in graph.weights:
        raw = mapped[w.offset:w.offset + w.length]
        if raw.size != w.length:  # the manifest checked this against the file's size at load
            raise EngineError(f"{path} is shorter than its weight index says ({w.name}); re-export the engine")
        array = raw.view(np.dtype(w.dtype))  # the index uses numpy's dtype names
        array = array.reshape(w.shape)
        if device == "cpu":
            # a CPU OrtValue wraps the array's memory: a private, aligned copy, not the read-only map
            array = np.array(array)
            host.append(array)
            value = ort.OrtValue.ortvalue_from_numpy(array, "cpu", 0)
        else:  # copied host -> device here; the map is not needed afterwards
            value = ort.OrtValue.ortvalue_from_numpy(np.require(array, requirements="CA"), device, device_id)
        owned[w.name] = value
        views[w.name] = non_owning_view(value)
    probe = ort.SessionOptions()  # onnxruntime's checks of a shared initializer, here rather than per session
    for name, view in views.items():
        probe.add_initializer(name, view)
    return SharedWeights(graph.name, owned, views, host, sum(w.length for w in graph.weights))
