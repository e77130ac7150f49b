"""GPU kernels of one engine graph, as the card ran them: CUPTI through ``torch.profiler``.

    python -m benchmarks.device.kernel_profile ENGINE_DIR --graphs dit_step,vocoder_step [--batch 1]

onnxruntime's own profiler times nodes on the host; this records every CUDA kernel launched in
the process (onnxruntime's included) with its GPU duration. Reported per graph and per run:
kernel count, summed kernel time, time by kernel family and the top kernels by name, and the
run's span on the GPU (first kernel's start to last kernel's end, median over the runs) with the
idle time inside it (span minus summed kernel time: gaps between kernels). ``--captured``
profiles the graphs replayed from onnxruntime's CUDA graph, as the runtime's loops run them.
Needs PyTorch with CUDA in the same environment (a measuring tool only; the runtime never
imports torch).
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import statistics

FAMILIES = [  # first match wins
    ("attention", r"flash|fmha|attention|mha"),
    ("gemm", r"gemm|cutlass|sm90_xmma|cublas|matmul|sgemm|hgemm|xmma_gemm|nvjet"),
    ("conv", r"conv|cudnn|implicit|winograd|fft|dgrad|wgrad"),
    ("layernorm", r"layernorm|layer_norm|LayerNorm|skiplayernorm|rmsnorm"),
    ("transpose", r"transpose|Transpose|permute"),
    ("reduce", r"reduce|Reduce"),
    ("cast/copy", r"cast|Cast|copy|Copy|memcpy|Memcpy|concat|Concat|split|Split|slice|Slice|gather|Gather"
                  r"|pad|Pad|expand|Expand"),
    ("elementwise", r"elementwise|Elementwise|binary|Binary|unary|Unary|_Add|_Mul|_Sub|_Div|gelu|Gelu|Pow|Neg"
                    r"|Sin|Cos|PRelu|Sqrt|Rotary|rotary"),
]


def family(name: str) -> str:
    for label, pattern in FAMILIES:
        if re.search(pattern, name):
            return label
    return "other"


def run_spans(kernels, runs: int) -> tuple[float | None, float | None]:
    """Median (span, idle) milliseconds of ``runs`` equal runs: kernels sorted by start, split into
    runs of equal count; span = last end - first start, idle = span - summed durations."""
    intervals = sorted((e.time_range.start, e.time_range.end) for e in kernels if hasattr(e, "time_range"))
    if runs < 1 or not intervals or len(intervals) % runs:
        return None, None
    per_run = len(intervals) // runs
    spans, idles = [], []
    for k in range(runs):
        chunk = intervals[k * per_run:(k + 1) * per_run]
        span = chunk[-1][1] - chunk[0][0]
        spans.append(span / 1e3)
        idles.append((span - sum(end - start for start, end in chunk)) / 1e3)
    return statistics.median(spans), statistics.median(idles)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("engine")
    parser.add_argument("--graphs", default="dit_step,vocoder_step")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--captured", action="store_true",
                        help="replay each graph from onnxruntime's CUDA graph (step graphs, as the loops run)")
    parser.add_argument("--json")
    args = parser.parse_args()

    import onnxruntime as ort
    import torch
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.device.bound_graph import bind_graph
    from semvoc.runtime.manifest import load_manifest

    ort.preload_dlls()
    torch.cuda.init()
    manifest = load_manifest(args.engine, verify=False)
    report = {}
    for name in args.graphs.split(","):
        bound = bind_graph(manifest, name, args.batch, cuda_graph=args.captured)
        for _ in range(5):  # cuDNN search, arena growth
            bound.run()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.runs):
                bound.run()
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        by_name: dict = collections.Counter()
        count: dict = collections.Counter()
        by_family: dict = collections.Counter()
        for e in kernels:
            us = e.device_time if hasattr(e, "device_time") else e.cuda_time
            by_name[e.name] += us / args.runs
            count[e.name] += 1 / args.runs
            by_family[family(e.name)] += us / args.runs
        total = sum(by_name.values())
        span, idle = run_spans(kernels, args.runs)
        row = {"graph": name, "batch": args.batch, "captured": args.captured,
               "kernels_per_run": round(len(kernels) / args.runs), "kernel_ms_per_run": total / 1e3,
               "span_ms_per_run": span, "idle_ms_per_run": idle,
               "families_ms": {k: round(v / 1e3, 4) for k, v in by_family.most_common()},
               "top": [{"kernel": k[:160], "ms": round(v / 1e3, 4), "calls": round(count[k])}
                       for k, v in by_name.most_common(args.top)]}
        report[name] = row
        print(f"\n== {name} (batch {args.batch}): {row['kernels_per_run']} kernels, "
              f"{row['kernel_ms_per_run']:.3f} ms of kernel time per run"
              + (f", span {span:.3f} ms (idle {idle:.3f})" if span is not None else ""))
        for fam, ms in row["families_ms"].items():
            print(f"  {fam:12s} {ms:8.3f} ms")
        for item in row["top"]:
            print(f"  {item['ms']:8.3f} ms {item['calls']:5d}x  {item['kernel'][:110]}")
        del bound
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
