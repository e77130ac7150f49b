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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("engine")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--json")
    parser.add_argument("--only", help="comma-separated graph names")
    args = parser.parse_args()

    import onnxruntime as ort

    from benchmarks.device.bound_graph import bind_graph
    from semvoc.runtime.manifest import load_manifest

    ort.preload_dlls()
    manifest = load_manifest(args.engine, verify=False)
    parity = json.loads((manifest.root / "parity.json").read_text())["graphs"]
    rows = []
    for name, graph in manifest.graphs.items():
        if args.only and name not in args.only.split(","):
            continue
        row = {"graph": name, "batch": args.batch, "parity_max_rel_error": parity[name]["max_rel_error"]}
        for captured in ([False, True] if graph.kind.endswith("_step") else [False]):
            try:
                bound = bind_graph(manifest, name, args.batch, cuda_graph=captured)
                for _ in range(3):
                    bound.run()
                times = []
                for _ in range(args.iters):
                    t0 = time.perf_counter()
                    bound.run()  # synchronises at the end
                    times.append((time.perf_counter() - t0) * 1e3)
                row["cuda_graph_ms" if captured else "ms"] = statistics.median(times)
                row["cuda_graph_min_ms" if captured else "min_ms"] = min(times)
            except Exception as err:
                row["cuda_graph_error" if captured else "error"] = str(err)[:300]
            bound = None
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"engine": args.engine, "precision": manifest.data["precision"]["dtype"], "rows": rows}, f,
                      indent=1)


if __name__ == "__main__":
    main()
