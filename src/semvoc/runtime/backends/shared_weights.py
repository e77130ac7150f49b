"""One copy of a graph's weights for all of its onnxruntime sessions (the step graphs, the text encoder).

Why: the CUDA backend creates one session per (step graph, batch bucket), with the bucket's
dimensions fixed at load so that every node runs on the GPU and the loop can be captured in a
CUDA graph, and so it does for the text encoder (captured once per request). Each session would
load its own copy of the graph's weights: a server using batch buckets 1, 4 and 16 would hold the
DiT's weights three times (plus once more for the uncaptured session that names a NaN's step).

How: onnxruntime takes initializers from the caller (``SessionOptions.add_initializer``); when
the value lives on the device where the session plans that initializer, the session uses its
memory as it is, with no copy (``use_user_supplied_initializer`` in onnxruntime's
``session_state_utils.cc``), CUDA-graph capture included. The exporter writes these graphs'
weights to ``<graph>.onnx.data`` and indexes them in the manifest (name, dtype, shape, offset,
length; checked by ``semvoc.runtime.manifest``), so no ONNX parser is needed here.

A graph's indexed weights are packed into ONE buffer of exactly their size (each tensor at a
256-byte aligned offset): on the GPU a ``cudaMalloc`` through the CUDA runtime that onnxruntime's
CUDA provider loads, filled tensor by tensor from a memory map of the data file; on the CPU a
numpy array. Sessions get non-owning DLPack views of the tensors inside it (``add_initializer``
refuses a value that owns its buffer). One exact allocation rather than an ``OrtValue`` per
tensor: onnxruntime's Python-side CUDA allocator is an arena whose regions double (1, 2, 4, ...
MiB), so ~1 GB uploaded tensor by tensor ends in whichever power-of-two region comes next. Where
no CUDA runtime can be found by name, each tensor gets its own ``OrtValue`` as before
(``SharedWeights.packed`` says which). The buffer is freed by ``close()``, after the sessions.

onnxruntime substitutes a given weight for whatever its graph optimizations left under that name,
unchecked, so the exporter indexes only the weights that the graph, optimized on the export's
provider, still reads as stored (``onnx_export.weights_used_as_stored``: the transpose optimizer
rewrites some in place). Sessions still get their own copies of what onnxruntime derives from a
weight at load (a constant-folded cast, weights a kernel pre-packs, as the CPU's MatMul does).

Verified on the CPU with onnxruntime 1.31 and 1.32 (packed views, two sessions read the one buffer
and give the plain session's outputs: ``tests/test_shared_weights.py``) and on an H200 with
onnxruntime-gpu 1.31.1 (``tests/test_gpu.py``: buckets read the one copy; the process's memory,
``benchmarks/device/cold_start.py``, in ``benchmarks/results/h200-2026-12-02f.md``: 1 GB less than
tensor by tensor for the reference engine at batch 1). ``SEMVOC_SHARED_WEIGHTS=0`` turns sharing
off for comparison.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from semvoc.runtime.manifest import EngineError, GraphInfo

if TYPE_CHECKING:
    from onnxruntime import OrtValue

#: offset alignment of each tensor in a packed buffer (cuBLASLt and 16-byte vector loads need 16)
ALIGNMENT = 256
_CUDART_NAMES = ("libcudart.so.13", "libcudart.so.12", "libcudart.so")  # when none is loaded yet
_HOST_TO_DEVICE = 1  # cudaMemcpyHostToDevice


def sharing_enabled() -> bool:
    """Off with ``SEMVOC_SHARED_WEIGHTS=0`` (each session then loads its own copy)."""
    return os.environ.get("SEMVOC_SHARED_WEIGHTS", "1") != "0"


def _ortvalue_from_capsule(capsule, is_bool: bool) -> OrtValue:
    """onnxruntime >= 1.32 has ``OrtValue.from_dlpack``; older versions (e.g. onnxruntime-gpu
    1.31) only the low-level ``from_dlpack(capsule, is_bool_tensor)``."""
    import onnxruntime as ort

    if hasattr(ort.OrtValue, "from_dlpack"):
        return ort.OrtValue.from_dlpack(capsule)
    from onnxruntime.capi import _pybind_state as C

    try:
        view = C.OrtValue.from_dlpack(capsule, is_bool)
    except TypeError:  # a version whose low-level form takes the capsule alone
        view = C.OrtValue.from_dlpack(capsule)
    return ort.OrtValue(view)


def non_owning_view(owned: OrtValue) -> OrtValue:
    """A view of an OrtValue's buffer that does not own it (what ``add_initializer`` accepts)."""
    import onnxruntime as ort

    if hasattr(ort.OrtValue, "from_dlpack"):
        return ort.OrtValue.from_dlpack(owned)
    return _ortvalue_from_capsule(owned._ortvalue.to_dlpack(), owned.data_type() == "tensor(bool)")


# --- DLPack views at an address (dlpack.h's structs, legacy unversioned capsule "dltensor") ---
class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", _DLDevice), ("ndim", ctypes.c_int32),
                ("dtype", _DLDataType), ("shape", ctypes.POINTER(ctypes.c_int64)),
                ("strides", ctypes.POINTER(ctypes.c_int64)), ("byte_offset", ctypes.c_uint64)]


class _DLManagedTensor(ctypes.Structure):
    pass


_Deleter = ctypes.CFUNCTYPE(None, ctypes.POINTER(_DLManagedTensor))
_DLManagedTensor._fields_ = [("dl_tensor", _DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", _Deleter)]
# onnxruntime calls the deleter when its OrtValue goes; the buffer belongs to SharedWeights
_KEEP_BUFFER = _Deleter(lambda _: None)
_DL_DEVICES = {"cpu": 1, "cuda": 2}  # kDLCPU, kDLCUDA
_DL_CODES = {"i": 0, "u": 1, "f": 2, "b": 6}  # kDLInt, kDLUInt, kDLFloat, kDLBool
_new_capsule = ctypes.pythonapi.PyCapsule_New
_new_capsule.restype, _new_capsule.argtypes = ctypes.py_object, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]


def _dl_dtype(dtype: np.dtype, legacy_bool: bool) -> _DLDataType:
    if dtype.kind not in _DL_CODES or dtype.itemsize > 8:
        raise TypeError(f"no DLPack view for weights of dtype {dtype}")
    code = _DL_CODES[dtype.kind]
    if code == 6 and legacy_bool:  # onnxruntime < 1.32 reads bool as uint8 with a flag
        code = 1
    return _DLDataType(code, dtype.itemsize * 8, 1)


def view_at(address: int, dtype: np.dtype, shape: tuple[int, ...], device: str, device_id: int,
            keep: list) -> OrtValue:
    """A non-owning OrtValue of ``shape``/``dtype`` at ``address`` (host or device memory).
    The ctypes structs go into ``keep``, which must outlive the value."""
    import onnxruntime as ort

    legacy = not hasattr(ort.OrtValue, "from_dlpack")
    dims = (ctypes.c_int64 * max(len(shape), 1))(*shape)
    managed = _DLManagedTensor()
    managed.dl_tensor = _DLTensor(ctypes.c_void_p(address), _DLDevice(_DL_DEVICES[device], device_id), len(shape),
                                  _dl_dtype(np.dtype(dtype), legacy), dims, None, 0)
    managed.deleter = _KEEP_BUFFER
    keep.extend((managed, dims))
    capsule = _new_capsule(ctypes.addressof(managed), b"dltensor", None)
    return _ortvalue_from_capsule(capsule, np.dtype(dtype) == np.bool_)


def packed_offsets(lengths: list[int], alignment: int = ALIGNMENT) -> tuple[list[int], int]:
    """Each tensor's offset in one buffer (every offset a multiple of ``alignment``) and its size."""
    offsets, end = [], 0
    for length in lengths:
        offsets.append(end)
        end += -(-length // alignment) * alignment
    return offsets, end


def loaded_cudart(maps: str = "/proc/self/maps") -> str | None:
    """The path of a CUDA runtime library already mapped into this process (the one onnxruntime's
    CUDA provider uses), or None."""
    try:
        with open(maps) as f:
            for line in f:
                path = line.split(maxsplit=5)[-1].strip()
                if "/libcudart.so" in path:
                    return path
    except OSError:
        pass
    return None


class _CudaRuntime:
    """The few CUDA runtime calls a packed buffer needs, from the libcudart already in the process
    (else the first found by name)."""

    def __init__(self):
        errors = []
        loaded = loaded_cudart()
        for name in ([loaded] if loaded else []) + list(_CUDART_NAMES):
            try:
                self.lib = ctypes.CDLL(name)
                break
            except OSError as err:
                errors.append(str(err))
        else:
            raise OSError("no CUDA runtime library found by name: " + "; ".join(errors))
        self.lib.cudaMalloc.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t]
        self.lib.cudaMemcpy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        self.lib.cudaFree.argtypes = [ctypes.c_void_p]
        self.lib.cudaSetDevice.argtypes = [ctypes.c_int]

    def check(self, status: int, what: str) -> None:
        if status != 0:
            raise RuntimeError(f"{what} failed (CUDA error {status})")

    def malloc(self, nbytes: int, device_id: int) -> int:
        self.check(self.lib.cudaSetDevice(device_id), "cudaSetDevice")
        pointer = ctypes.c_void_p()
        self.check(self.lib.cudaMalloc(ctypes.byref(pointer), max(nbytes, 1)), f"cudaMalloc of {nbytes} bytes")
        return int(pointer.value)

    def upload(self, address: int, array: np.ndarray) -> None:
        self.check(self.lib.cudaMemcpy(address, array.ctypes.data, array.nbytes, _HOST_TO_DEVICE), "cudaMemcpy")

    def free(self, address: int) -> None:
        self.lib.cudaFree(address)


class SharedWeights:
    """A graph's indexed weights on one device: ``initializers`` goes to ``make_session``."""

    def __init__(self, graph: str, views: dict[str, OrtValue], nbytes: int, keep: list,
                 packed: bool, free=None):
        self.graph = graph
        self.initializers = views  # name -> non-owning OrtValue view
        self.nbytes = nbytes  # the weights' bytes (the packed buffer adds alignment padding)
        self.packed = packed  # one buffer for all (False: one OrtValue per tensor)
        self._keep = keep  # what the views point into or describe them: alive as long as they are
        self._free = free

    def close(self) -> None:
        """Free the device buffer; only once no session that was given the views is left."""
        self.initializers = {}
        self._keep = []
        if self._free is not None:
            free, self._free = self._free, None
            free()

    def __del__(self):
        self.close()

    def __len__(self) -> int:
        return len(self.initializers)


def _tensor_arrays(root: Path, graph: GraphInfo) -> list[np.ndarray]:
    """Each indexed weight as an array over a memory map of the graph's data file."""
    path = Path(root) / graph.data_file
    try:
        mapped = np.memmap(path, dtype=np.uint8, mode="r")
    except (OSError, ValueError) as err:
        raise EngineError(f"cannot read {path} ({err}); re-export the engine") from err
    arrays = []
    for w in graph.weights:
        raw = mapped[w.offset:w.offset + w.length]
        if raw.size != w.length:  # the manifest checked this against the file's size at load
            raise EngineError(f"{path} is shorter than its weight index says ({w.name}); re-export the engine")
        arrays.append(raw)
    return arrays


def load_shared_weights(root: str | Path, graph: GraphInfo, device: str = "cuda",
                        device_id: int = 0) -> SharedWeights | None:
    """Read ``graph``'s indexed weights from its data file and place them once on ``device``
    ("cuda" or "cpu"), packed into one buffer; None when the engine has no index for it (exported
    before semvoc wrote one: its sessions then load their own copies, as before)."""
    if not graph.weights or not graph.data_file:
        return None
    arrays = _tensor_arrays(Path(root), graph)
    offsets, total = packed_offsets([w.length for w in graph.weights])
    keep: list = []
    free = None
    if device == "cpu":
        buffer = np.empty(total + ALIGNMENT, np.uint8)  # a private copy, not the read-only map
        base = -buffer.ctypes.data % ALIGNMENT
        for raw, offset in zip(arrays, offsets, strict=True):
            buffer[base + offset:base + offset + raw.size] = raw
        keep.append(buffer)
        address = buffer.ctypes.data + base
    else:
        try:
            cudart = _CudaRuntime()
        except OSError:
            cudart = None
        if cudart is None:
            return _load_tensor_by_tensor(graph, arrays, device, device_id)
        address = cudart.malloc(total, device_id)
        free = lambda: cudart.free(address)  # noqa: E731
        try:
            for raw, offset in zip(arrays, offsets, strict=True):
                cudart.upload(address + offset, raw)
        except Exception:
            free()
            raise
    views = {}
    try:
        for w, offset in zip(graph.weights, offsets, strict=True):
            views[w.name] = view_at(address + offset, np.dtype(w.dtype), tuple(w.shape), device, device_id, keep)
        _probe(views)
    except Exception:
        if free is not None:
            free()
        raise
    return SharedWeights(graph.name, views, sum(w.length for w in graph.weights), keep, True, free)


def _load_tensor_by_tensor(graph: GraphInfo, arrays: list[np.ndarray], device: str, device_id: int) -> SharedWeights:
    """One ``OrtValue`` per weight (onnxruntime allocates each from its arena), views of them."""
    import onnxruntime as ort

    owned, views = [], {}
    for w, raw in zip(graph.weights, arrays, strict=True):
        array = np.require(raw.view(np.dtype(w.dtype)).reshape(w.shape), requirements="CA")
        value = ort.OrtValue.ortvalue_from_numpy(array, device, device_id)
        owned.append(value)
        views[w.name] = non_owning_view(value)
    _probe(views)
    return SharedWeights(graph.name, views, sum(w.length for w in graph.weights), owned, False)


def _probe(views: dict[str, OrtValue]) -> None:
    """onnxruntime's checks of a shared initializer, here once rather than per session."""
    import onnxruntime as ort

    probe = ort.SessionOptions()
    for name, view in views.items():
        probe.add_initializer(name, view)
