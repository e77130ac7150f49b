"""Where the time of creating an onnxruntime CUDA session goes, per graph of an engine.

    python -m benchmarks.device.session_load ENGINE_DIR [--graphs text_encoder,dit_step] [--batch 1]

For each graph, in this process: the time to create its session at each graph-optimization
level (all, extended, basic, disabled; ``SEMVOC_ORT_OPTIMIZATION``), and the time to create it
from a copy that onnxruntime already optimized (saved with ``optimized_model_filepath``, loaded
with optimizations off), which is what an engine carrying pre-optimized graphs would pay. Step
graphs get the bucket's fixed dims, as the runtime gives them. Then all the graphs of a request,
created one after another and in parallel threads. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("engine")
    parser.add_argument("--graphs", default="text_encoder,dit_step")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--json")
    args = parser.parse_args()

    import onnxruntime as ort

    from semvoc.runtime.backends.ort_common import make_session
    from semvoc.runtime.backends.ort_cuda import OrtCudaBackend
    from semvoc.runtime.manifest import load_manifest

    manifest = load_manifest(args.engine, verify=False)
    backend = OrtCudaBackend(manifest)
    symbols = backend._symbols(args.batch, manifest.buckets["frames"][0])
    steps = ("dit_step", "vocoder_step")

    def spec(kind: str) -> tuple[Path, dict | None, bool]:
        graph = manifest.graph(kind)
        fixed = backend._overrides(graph, symbols) if kind in steps else None
        return manifest.root / graph.file, fixed, kind in steps

    def create(kind: str) -> float | str:
        path, fixed, capture = spec(kind)
        t0 = time.perf_counter()
        try:
            make_session(path, "cuda", dim_overrides=fixed, cuda_graph=capture,
                         custom_ops=manifest.custom_ops_library, shared_arena=not capture)
        except Exception as err:  # e.g. capture refused: without optimizations shape nodes stay on the CPU
            return f"failed: {str(err).strip().splitlines()[-1][:200]}"
        return round(time.perf_counter() - t0, 3)

    report: dict = {"engine": args.engine, "batch": args.batch, "levels": {}, "preoptimized": {}}
    create("dit_time")  # CUDA context, cuBLAS/cuDNN libraries: paid once, before any timing
    for kind in args.graphs.split(","):
        times = {}
        for level in ("all", "extended", "basic", "disabled"):
            os.environ["SEMVOC_ORT_OPTIMIZATION"] = level
            times[level] = create(kind)
        report["levels"][kind] = times
        os.environ["SEMVOC_ORT_OPTIMIZATION"] = "all"
        path, fixed, capture = spec(kind)
        with tempfile.TemporaryDirectory() as tmp:
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.optimized_model_filepath = str(Path(tmp) / f"{kind}.opt.onnx")
            options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                             f"{kind}.opt.onnx.data")
            if manifest.custom_ops_library:
                options.register_custom_ops_library(str(manifest.custom_ops_library))
            for name, value in (fixed or {}).items():
                options.add_free_dimension_override_by_name(name, int(value))
            ort.InferenceSession(str(path), options, providers=[("CUDAExecutionProvider", {})])
            os.environ["SEMVOC_ORT_OPTIMIZATION"] = "disabled"
            t0 = time.perf_counter()
            try:
                make_session(Path(tmp) / f"{kind}.opt.onnx", "cuda", dim_overrides=fixed, cuda_graph=capture,
                             custom_ops=manifest.custom_ops_library, shared_arena=not capture)
                report["preoptimized"][kind] = round(time.perf_counter() - t0, 3)
            except Exception as err:  # e.g. a saved graph onnxruntime cannot load back
                report["preoptimized"][kind] = f"failed: {str(err).splitlines()[0][:300]}"
            os.environ["SEMVOC_ORT_OPTIMIZATION"] = "all"
    request = ["text_encoder", "dit_prepare", "dit_time", "dit_step", "vocoder_prepare", "vocoder_time", "vocoder_step"]
    t0 = time.perf_counter()
    report["one_by_one"] = {kind: create(kind) for kind in request}
    report["one_by_one_total_s"] = round(time.perf_counter() - t0, 3)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(request)) as pool:
        report["parallel"] = dict(zip(request, pool.map(create, request), strict=True))
    report["parallel_total_s"] = round(time.perf_counter() - t0, 3)
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
