"""onnxruntime session creation shared by the backends (and by export's parity check)."""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from pathlib import Path

import numpy as np

NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "bool": np.bool_}

# onnxruntime's own log: errors only by default (it warns on every session, e.g. "No registered
# plugin EP device found"); --verbose in semvoc-run and semvoc-export shows its warnings and info
QUIET, VERBOSE = 3, 1
_log_severity = QUIET


def set_ort_verbose(verbose: bool) -> None:
    """Show onnxruntime's warnings and info messages (``--verbose``), or errors only."""
    global _log_severity
    _log_severity = VERBOSE if verbose else QUIET
    _onnxruntime()


def _onnxruntime():
    import onnxruntime as ort

    ort.set_default_logger_severity(_log_severity)
    return ort


# Set when an export in this process ran semvoc's CUDA ops on onnxruntime-cuda (its parity checks):
# on an H200, a process that went on to serve such an engine with the vocoder's branches side by
# side crashed after its first requests, for a reason not yet known (with the step whole it ran);
# the CUDA backend warns (``OrtCudaBackend``). Processes that only serve are not affected.
_cuda_ops_exported_here = False


def note_cuda_ops_exported() -> None:
    """Record that this process exported an engine with semvoc's CUDA ops on onnxruntime-cuda."""
    global _cuda_ops_exported_here
    _cuda_ops_exported_here = True


def cuda_ops_exported_here() -> bool:
    return _cuda_ops_exported_here


def available_providers() -> list[str]:
    return _onnxruntime().get_available_providers()


def cuda_available() -> bool:
    """onnxruntime-gpu is installed and a CUDA device answers."""
    if "CUDAExecutionProvider" not in available_providers():
        return False
    try:
        ort = _onnxruntime()
        if hasattr(ort, "preload_dlls"):
            ort.preload_dlls()
        return ort.get_device() == "GPU"
    except Exception:
        return False


def conv_algo_search(path: str | Path) -> str:
    """cuDNN's algorithm choice for a graph's convolutions: HEURISTIC (no timing of every algorithm:
    the text-to-audio graphs' convolutions run once per request, in vocoder_prepare, and an
    exhaustive search cost seconds of the first request), except for the semantic encoder, whose
    fp16 patch convolution (64x4 stride, NHWC) gets no plan from cuDNN's heuristic query on an H200
    (onnxruntime then fell back to the CPU for the whole graph): it keeps the exhaustive search."""
    return "EXHAUSTIVE" if Path(path).stem.startswith("semantic_encoder") else "HEURISTIC"


_shared_arenas: set[int] = set()
_shared_arenas_lock = threading.Lock()


def _register_shared_cuda_arena(ort, device_id: int) -> bool:
    """One CUDA memory arena per device for the sessions that ask for it (``shared_arena``): their
    peaks overlap instead of adding up. Off with ``SEMVOC_ORT_SHARED_ARENA=0``."""
    if os.environ.get("SEMVOC_ORT_SHARED_ARENA", "1") == "0":
        return False
    with _shared_arenas_lock:
        if device_id not in _shared_arenas:
            memory = ort.OrtMemoryInfo("Cuda", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, device_id,
                                       ort.OrtMemType.DEFAULT)
            arena = ort.OrtArenaCfg({"arena_extend_strategy": 1})  # kSameAsRequested
            try:
                ort.create_and_register_allocator_v2("CUDAExecutionProvider", memory,
                                                     {"device_id": str(device_id)}, arena)
            except Exception:  # an onnxruntime without CUDA: each session keeps its own arena
                return False
            _shared_arenas.add(device_id)
    return True


def make_session(path: str | Path, provider: str = "cpu", *, dim_overrides: dict[str, int] | None = None,
                 cuda_graph: bool = False, device_id: int = 0, threads: int | None = None,
                 custom_ops: str | Path | None = None, shared_arena: bool = False,
                 compute_stream: int | None = None, initializers: Mapping[str, object] | None = None,
                 optimized_model: str | Path | None = None):
    """An ``InferenceSession`` for ``path`` on "cpu" or "cuda".

    ``dim_overrides`` fixes symbolic input dimensions (by name) so that onnxruntime folds all
    shape arithmetic at load time: with every node on the GPU, the CUDA EP can capture the
    run in a CUDA graph (``cuda_graph``). ``custom_ops`` is semvoc's CUDA op library
    (``libsemvoc_cuda.so``) for graphs exported with ``--cuda-kernels``. ``shared_arena`` (CUDA)
    draws device memory from one arena per device: never for a session whose runs are captured in
    CUDA graphs (a graph replays the addresses its capture was given, which a shared arena hands
    to other sessions in between; on an H200 the same seed then gave different audio).
    ``compute_stream`` (CUDA) is a ``cudaStream_t`` handle, as an integer, that the session runs
    all its work on (onnxruntime's ``user_compute_stream``) instead of a stream of its own.
    ``initializers`` (name -> non-owning OrtValue, ``shared_weights.SharedWeights.initializers``)
    replace the graph's weights of those names: sessions given the same values share that memory,
    which must outlive them. ``optimized_model``: where onnxruntime saves the graph as optimized
    for this provider (the export checks which weights it keeps as stored).
    """
    ort = _onnxruntime()
    options = ort.SessionOptions()
    # "all" (the default); "extended", "basic" or "disabled" only for experiments
    # (benchmarks/device/session_load.py times session creation at each level)
    level = os.environ.get("SEMVOC_ORT_OPTIMIZATION", "all")
    levels = {"all": "ORT_ENABLE_ALL", "extended": "ORT_ENABLE_EXTENDED", "basic": "ORT_ENABLE_BASIC",
              "disabled": "ORT_DISABLE_ALL"}
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, levels[level])
    options.log_severity_level = _log_severity
    if threads:
        options.intra_op_num_threads = threads
    if custom_ops is not None:
        options.register_custom_ops_library(str(custom_ops))
    for name, value in (dim_overrides or {}).items():
        options.add_free_dimension_override_by_name(name, int(value))
    for name, value in (initializers or {}).items():
        options.add_initializer(name, value)
    if provider == "cuda":
        # same seed, same audio: pick deterministic kernels (cuDNN algorithms, reductions)
        options.use_deterministic_compute = os.environ.get("SEMVOC_NONDETERMINISTIC") is None
        if hasattr(ort, "preload_dlls"):
            ort.preload_dlls()
        # NHWC kernels and [N, C, 1, T] padding of 1-D convs: the vocoder step -30 % on an H100
        # (benchmarks/results/h100-2026-11-25-notes.md)
        # kSameAsRequested: the arena grows by what is asked, not by doubling (peak memory)
        cuda_options = {"device_id": str(device_id), "cudnn_conv_algo_search": conv_algo_search(path),
                        "arena_extend_strategy": "kSameAsRequested",
                        "do_copy_in_default_stream": "1", "prefer_nhwc": "1", "cudnn_conv1d_pad_to_nc1d": "1"}
        if compute_stream is not None:
            # the handle as a decimal string, as onnxruntime parses it (a size_t address)
            cuda_options["user_compute_stream"] = str(int(compute_stream))
        if cuda_graph:
            cuda_options["enable_cuda_graph"] = "1"
        if shared_arena and _register_shared_cuda_arena(ort, device_id):
            options.add_session_config_entry("session.use_env_allocators", "1")
        # extra CUDA EP options for experiments, e.g. "prefer_nhwc=1,cudnn_conv1d_pad_to_nc1d=1"
        for item in filter(None, os.environ.get("SEMVOC_ORT_CUDA_OPTIONS", "").split(",")):
            key, _, value = item.partition("=")
            cuda_options[key.strip()] = value.strip()
        providers = [("CUDAExecutionProvider", cuda_options)]
    else:
        providers = ["CPUExecutionProvider"]
    if optimized_model is not None:
        options.optimized_model_filepath = str(optimized_model)
    if os.environ.get("SEMVOC_ORT_PROFILE"):
        options.enable_profiling = True
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except (ort_errors.InvalidProtobuf, ort_errors.InvalidGraph, ort_errors.NoSuchFile) as err:
        from semvoc.runtime.manifest import EngineError

        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise EngineError(f"onnxruntime cannot load {path}: {detail}. The file is damaged or not an ONNX graph "
                          "of this semvoc: re-export the engine (semvoc-run checks every file's sha256 first "
                          "unless --no-verify is given)") from err
    if provider == "cuda" and session.get_providers()[0] != "CUDAExecutionProvider":
        from semvoc.runtime.backends.base import BackendUnavailable

        # onnxruntime retries a session it cannot create on the GPU on the CPU, with a printed note:
        # a GPU run must not go on many times slower without a word
        raise BackendUnavailable(f"onnxruntime could not create {Path(path).name} on the GPU and fell back to "
                                 "the CPU (its message above says why; --verbose shows more); run on the CPU "
                                 "with --backend onnxruntime-cpu, or report it with that message")
    return session
