"""TensorRT plans for an engine directory (``semvoc-export --trt``). UNVERIFIED.

Written against the TensorRT 10.14+/11 Python API and never run by semvoc's authors: TensorRT
cannot be installed on their machines. The result says so (``"verified": False``), and the
runtime uses these plans only when asked for (``--backend tensorrt``).

Built with polygraphy's TensorRT loaders: each graph's ONNX file is parsed from its path
(``NetworkFromOnnxPath``, so ``.data`` files next to it resolve) into a strongly typed network and
built (``CreateConfig`` + ``EngineBytesFromNetwork``) into ``<graph>.plan`` with one
optimization profile per (batch bucket, duration) the graph's shapes distinguish. Every
profile has min = opt = max: the runtime only ever runs these exact shapes, and fixed shapes
let it capture whole ODE loops in CUDA graphs. The table rows are fixed to the export's
``dit_rows``/``vocoder_rows``. A timing cache (``trt_timing.cache``) is shared by all graphs of
the export, so layers repeated across profiles and graphs are timed once.
"""

from __future__ import annotations

from pathlib import Path

from semvoc.runtime.manifest import eval_dim

TIMING_CACHE = "trt_timing.cache"
FRAMES_PER_SECOND = 25  # as engine._graph_entries folds durations into frames
NOTE = "built by semvoc but never run in semvoc's CI or on its benchmark machine"

Shapes = dict[str, tuple[int, ...]]


def table_buckets(options) -> dict[str, int]:
    """The fixed row counts of the schedule tables (one more row than the largest step count)."""
    return {"dit_rows": options.max_dit_steps + 1, "vocoder_rows": options.max_vocoder_steps + 1}


def profile_shapes(entry: dict, batch: int, frames: int, buckets: dict[str, int]) -> Shapes:
    """Concrete shape of every input of a manifest graph entry for one (batch, frames) bucket."""
    symbols = {"batch": batch, "frames": frames, **buckets}
    return {t["name"]: tuple(eval_dim(s, symbols) for s in t["shape"]) for t in entry["inputs"]}


def graph_profiles(entry: dict, options) -> list[Shapes]:
    """The distinct input shapes of a graph over all (batch bucket, duration) pairs, in order.

    Graphs that do not depend on the clip length (text encoder, per-duration semantic encoders)
    get one profile per batch bucket; the time tables get one.
    """
    buckets = table_buckets(options)
    profiles: list[Shapes] = []
    for batch in options.batch_sizes:
        for duration in options.durations:
            shapes = profile_shapes(entry, batch, round(duration * FRAMES_PER_SECOND), buckets)
            if shapes not in profiles:
                profiles.append(shapes)
    return profiles


def build_plans(engine_dir: Path, graphs: dict, options) -> dict:
    """Build ``<graph>.plan`` for every graph in ``graphs`` (manifest entries, updated in place
    with ``plan_file``) and return the manifest's ``tensorrt`` section."""
    import tensorrt as trt

    engine_dir = Path(engine_dir)
    plans, profiles = {}, {}
    for name, entry in graphs.items():
        plan, used = _build_plan(engine_dir, name, entry, graph_profiles(entry, options))
        (engine_dir / f"{name}.plan").write_bytes(plan)
        entry["plan_file"] = plans[name] = f"{name}.plan"
        # the runtime selects a context's profile by the index of its shapes in this list
        profiles[name] = [{k: list(v) for k, v in shapes.items()} for shapes in used]
    return {"version": trt.__version__, "gpu": _gpu_name(), "plans": plans, "profiles": profiles,
            "verified": False, "note": NOTE}


def _build_plan(engine_dir: Path, name: str, entry: dict, profiles: list[Shapes]) -> tuple[bytes, list[Shapes]]:
    from polygraphy.backend.trt import CreateConfig, Profile, engine_bytes_from_network, network_from_onnx_path

    # Strongly typed: every tensor keeps the type the ONNX gives it. semvoc's fp16 graphs
    # already carry their precision plan (fp16 weights and activations, fp32 islands chosen by
    # calibration and per node by export.islands, explicit Casts between them). A weakly typed
    # build with fp16 enabled would let TensorRT re-pick precisions per layer and could drop
    # those islands. TensorRT deprecated weak typing in 10.12 and 11.x builds every network
    # strongly typed.
    try:
        builder, network, parser = network_from_onnx_path(str(engine_dir / entry["file"]), strongly_typed=True)
    except Exception as err:  # polygraphy reports the parser's errors and raises
        raise RuntimeError(f"TensorRT could not parse graph {name!r} ({entry['file']}): {err}") from err
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    dynamic = [t.name for t in inputs if any(d < 0 for d in t.shape)]
    trt_profiles = []
    for shapes in profiles if dynamic else []:
        profile = Profile()
        for tensor in dynamic:
            if tensor not in shapes:
                raise RuntimeError(f"graph {name!r}: network input {tensor!r} is not in the manifest")
            profile.add(tensor, min=shapes[tensor], opt=shapes[tensor], max=shapes[tensor])
        trt_profiles.append(profile)
    # one timing cache for all graphs of the export: layers repeated across graphs are timed once
    cache_path = engine_dir / TIMING_CACHE
    config = CreateConfig(profiles=trt_profiles or None,
                          load_timing_cache=str(cache_path) if cache_path.is_file() else None)
    try:
        plan = engine_bytes_from_network((builder, network, parser), config=config,
                                         save_timing_cache=str(cache_path))
    except Exception as err:
        raise RuntimeError(f"TensorRT could not build graph {name!r} ({entry['file']}): {err}") from err
    return bytes(plan), profiles if dynamic else []


def _gpu_name() -> str:
    try:
        from semvoc.runtime.backends.cuda_graph import import_cudart

        cudart = import_cudart()
    except ImportError:
        return "unknown (cuda-python is not installed)"
    err, prop = cudart.cudaGetDeviceProperties(0)
    if err != cudart.cudaError_t.cudaSuccess:
        return f"unknown ({err})"
    return prop.name.decode(errors="replace").rstrip("\x00")
