"""Time every graph of an engine on onnxruntime CUDA, one call each, inputs resident on the GPU.

    python -m benchmarks.device.graph_times ENGINE_DIR [--batch 1] [--iters 20] [--json OUT.json]
        [--graphs-mode onnxruntime,semvoc] [--only dit_step,vocoder_step]

Each graph gets a session with its symbolic dims fixed to the bucket (as the runtime does),
random inputs of the declared dtype and shape (never zeros; step counters at 0, masks all
true), outputs bound to the GPU; the step graphs are also timed replayed from a CUDA graph
(``cuda_graph_ms``: one onnxruntime replay, which synchronises at its end).
Reported: median and min milliseconds per call, and the export-time parity from parity.json.

``--graphs-mode`` also times each step graph the way the runtime runs its loop, once per
CUDA-graph mode (``SEMVOC_CUDA_GRAPHS``, see semvoc/runtime/backends/ort_cuda.py): a whole loop
of as many steps as the engine's schedule table holds, through the backend's own code, timed
from the first step queued to the end of the loop's synchronisation; ``loop_<mode>_step_ms`` is
that time divided by the steps (median over ``--iters`` loops after one untimed loop), and
``loop_<mode>_ran_as`` the mode the loop actually ran in (a mode that falls back says so, with
the reason in ``loop_<mode>_fallbacks``). In ``semvoc`` mode the vocoder loop runs its branches
side by side where the engine has the step's parts and the batch is at most
``SEMVOC_BRANCH_STREAMS`` (default 1); run again with ``SEMVOC_BRANCH_STREAMS=0`` for the step
whole, as ``benchmarks/results/h200-2026-12-03b.md`` did.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np


def time_loop(manifest, kind: str, batch: int, mode: str, iters: int) -> dict:
    """Per-step milliseconds of a whole ``kind`` loop run by the CUDA backend in ``mode``."""
    from benchmarks.device.bound_graph import random_inputs
    from semvoc.runtime.backends.ort_cuda import GRAPHS_ENV, OrtCudaBackend

    before = os.environ.get(GRAPHS_ENV)
    os.environ[GRAPHS_ENV] = mode
    try:
        backend = OrtCudaBackend(manifest)
    finally:
        if before is None:
            os.environ.pop(GRAPHS_ENV)
        else:
            os.environ[GRAPHS_ENV] = before
    try:
        graph = manifest.graph(kind)
        frames = manifest.frames(manifest.buckets["durations_s"][0])
        state = "latent" if kind == "dit_step" else "audio"
        shared = ("time_table", "sigmas") if kind == "dit_step" else (
            "t_span", *[t.name for t in graph.inputs if t.name.startswith("time_scale_")])
        loop = backend._loop(kind, batch, frames, state, shared)  # warm-up and capture
        arrays = random_inputs(graph, backend._symbols(batch, frames), np.random.default_rng(0))
        for name, array in arrays.items():
            loop.buffers[name].update_inplace(array)
        loop.buffers[state + "_b"].update_inplace(arrays[state])
        steps = manifest.buckets["dit_rows" if kind == "dit_step" else "vocoder_rows"]
        times = []
        for _ in range(iters + 1):
            loop.buffers["step"].update_inplace(np.zeros(1, np.int64))
            t0 = time.perf_counter()
            backend._run_loop(loop, kind, steps, None, kind)  # ends with the stream synchronised
            times.append((time.perf_counter() - t0) * 1e3)
        times = times[1:]  # the first loop of onnxruntime's mode captures its graphs
        return {f"loop_{mode}_step_ms": statistics.median(times) / steps, f"loop_{mode}_steps": steps,
                f"loop_{mode}_ran_as": loop.mode or "uncaptured", f"loop_{mode}_fallbacks": backend.capture_failures}
    finally:
        backend.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("engine")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--json")
    parser.add_argument("--only", help="comma-separated graph names")
    parser.add_argument("--graphs-mode", default="onnxruntime,semvoc",
                        help="CUDA-graph modes to time whole step loops in, comma-separated ('' for none)")
    args = parser.parse_args()
    modes = [m.strip() for m in args.graphs_mode.split(",") if m.strip()]
    unknown = sorted(set(modes) - {"onnxruntime", "semvoc"})
    if unknown:
        parser.error(f"--graphs-mode: unknown mode {', '.join(unknown)}; use onnxruntime and/or semvoc")

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
        if graph.kind.endswith("_step"):
            for mode in modes:
                try:
                    row.update(time_loop(manifest, graph.kind, args.batch, mode, args.iters))
                except Exception as err:
                    row[f"loop_{mode}_error"] = str(err)[:300]
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"engine": args.engine, "precision": manifest.data["precision"]["dtype"], "rows": rows}, f,
                      indent=1)


if __name__ == "__main__":
    main()
