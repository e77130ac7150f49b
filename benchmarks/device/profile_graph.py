"""onnxruntime's per-node profile of one graph on CUDA: the top node types and nodes by time.

    python -m benchmarks.device.profile_graph ENGINE_DIR GRAPH [--batch 1] [--iters 10]
"""

from __future__ import annotations

import argparse
import collections
import json

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("engine")
    parser.add_argument("graph")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args()

    import onnxruntime as ort

    from semvoc.runtime.backends.ort_common import NUMPY_DTYPES
    from semvoc.runtime.backends.ort_cuda import OrtCudaBackend
    from semvoc.runtime.manifest import eval_dim, load_manifest

    ort.preload_dlls()
    manifest = load_manifest(args.engine, verify=False)
    graph = manifest.graphs[args.graph]
    helper = OrtCudaBackend(manifest, cuda_graphs=False)  # only its shape helpers
    symbols = helper._symbols(args.batch, manifest.frames(graph.duration_s or manifest.buckets["durations_s"][0]))
    options = ort.SessionOptions()
    options.enable_profiling = True
    for name, value in helper._overrides(graph, symbols).items():
        options.add_free_dimension_override_by_name(name, value)
    session = ort.InferenceSession(str(manifest.root / graph.file), options,
                                   providers=[("CUDAExecutionProvider", {"cudnn_conv_algo_search": "EXHAUSTIVE"})])
    rng = np.random.default_rng(0)
    feeds = {}
    for t in graph.inputs:
        shape = [eval_dim(s, symbols) for s in t.shape]
        if t.name == "step":
            feeds[t.name] = np.zeros(shape, np.int64)
        elif t.dtype == "bool":
            feeds[t.name] = np.ones(shape, bool)
        elif t.dtype == "int64":
            feeds[t.name] = np.ones(shape, np.int64)
        else:
            feeds[t.name] = (rng.standard_normal(shape) * 0.1).astype(NUMPY_DTYPES[t.dtype])
    for _ in range(3 + args.iters):
        session.run(None, feeds)
    profile = session.end_profiling()
    events = json.load(open(profile))
    by_type: dict = collections.Counter()
    by_node: dict = collections.Counter()
    providers = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            op = e["args"].get("op_name", "?")
            by_type[op] += e["dur"]
            by_node[e["name"]] += e["dur"]
            providers[(op, e["args"].get("provider", "?"))] += 1
    total = sum(by_type.values()) / (3 + args.iters)
    print(f"{args.graph}: {total / 1e3:.2f} ms of kernel time per run")
    for op, dur in by_type.most_common(12):
        print(f"  {op:24s} {dur / (3 + args.iters) / 1e3:8.3f} ms")
    for node, dur in by_node.most_common(8):
        print(f"  {node[:70]:70s} {dur / (3 + args.iters) / 1e3:8.3f} ms")
    cpu = sorted({op for (op, prov) in providers if "CPU" in prov})
    print("  nodes on the CPU provider:", cpu or "none")


if __name__ == "__main__":
    main()
