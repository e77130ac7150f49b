"""Time every graph of an engine on onnxruntime CUDA, one call each, inputs resident on the GPU.

    python -m benchmarks.device.graph_times ENGINE_DIR [--batch 1] [--iters 20] [--json OUT.json]

Each graph gets a session with its symbolic dims fixed to the bucket (as the runtime does),
random inputs of the declared dtype and shape (never zeros; step counters at 0, masks all
true), outputs bound to the GPU; the step graphs are also timed replayed from a CUDA graph.
Reported: median and min milliseconds per call, and the export-time parity from parity.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("engine")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--json")
    parser.add_argument("--only", help="comma-separated graph names")
    args = parser.parse_args()

    import onnxruntime as ort

    from semvoc.runtime.backends.ort_common import NUMPY_DTYPES, make_session
    from semvoc.runtime.backends.ort_cuda import OrtCudaBackend
    from semvoc.runtime.manifest import eval_dim, load_manifest

    ort.preload_dlls()
    manifest = load_manifest(args.engine, verify=False)
    helper = OrtCudaBackend(manifest)
    parity = json.loads((manifest.root / "parity.json").read_text())["graphs"]
    rng = np.random.default_rng(0)
    rows = []
    for name, graph in manifest.graphs.items():
        if args.only and name not in args.only.split(","):
            continue
        duration = graph.duration_s or manifest.buckets["durations_s"][0]
        symbols = helper._symbols(args.batch, manifest.frames(duration))
        values = {}
        for t in graph.inputs:
            shape = [eval_dim(s, symbols) for s in t.shape]
            if t.name == "step":
                array = np.zeros(shape, np.int64)
            elif t.dtype == "bool":
                array = np.ones(shape, bool)
            elif t.dtype == "int64":
                array = rng.integers(3, 500, shape).astype(np.int64)
            else:
                array = (rng.standard_normal(shape) * 0.1).astype(NUMPY_DTYPES[t.dtype])
            if t.name == "attention_mask":
                array = np.ones(shape, np.int64)
            values[t.name] = ort.OrtValue.ortvalue_from_numpy(array, "cuda", 0)
        row = {"graph": name, "batch": args.batch, "parity_max_rel_error": parity[name]["max_rel_error"]}
        for captured in ([False, True] if graph.kind.endswith("_step") else [False]):
            session = make_session(manifest.root / graph.file, "cuda", dim_overrides=helper._overrides(graph, symbols),
                                   cuda_graph=captured)
            binding = session.io_binding()
            for t in graph.inputs:
                binding.bind_ortvalue_input(t.name, values[t.name])
            outs = []
            for t in graph.outputs:
                shape = [eval_dim(s, symbols) for s in t.shape]
                outs.append(ort.OrtValue.ortvalue_from_shape_and_type(shape, NUMPY_DTYPES[t.dtype], "cuda", 0))
                binding.bind_ortvalue_output(t.name, outs[-1])
            options = ort.RunOptions()
            options.add_run_config_entry("gpu_graph_id", "1" if captured else "-1")
            try:
                for _ in range(3):
                    session.run_with_iobinding(binding, options)
                times = []
                for _ in range(args.iters):
                    t0 = time.perf_counter()
                    session.run_with_iobinding(binding, options)  # synchronises at the end
                    times.append((time.perf_counter() - t0) * 1e3)
                row["cuda_graph_ms" if captured else "ms"] = statistics.median(times)
                row["cuda_graph_min_ms" if captured else "min_ms"] = min(times)
            except Exception as err:
                row["cuda_graph_error" if captured else "error"] = str(err)[:300]
            del session
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"engine": args.engine, "precision": manifest.data["precision"]["dtype"], "rows": rows}, f,
                      indent=1)


if __name__ == "__main__":
    main()
