"""The card's achievable matrix rate: one large matmul, timed.

GPU: torch fp16 ``8192 x 8192 @ 8192 x 8192`` (2 * 8192^3 FLOP per product), timed with CUDA
events, median of 20 after 3 warm-ups. CPU (``--device cpu``): torch fp32 ``2048^3``, timed with
``time.perf_counter``, median of 5: the rate the CPU comparison's floor divides by.

    python -m benchmarks.matmul_rate [--device cuda|cpu] [--n 8192] [--repeats 20] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

DEFAULTS = {"cuda": {"n": 8192, "dtype": "float16", "repeats": 20},
            "cpu": {"n": 2048, "dtype": "float32", "repeats": 5}}


def measure_matmul_rate(device: str = "cuda", n: int | None = None, dtype: str | None = None,
                        repeats: int | None = None, warmup: int = 3, device_id: int = 0) -> dict:
    """``{"tflops", "median_ms", "n", "dtype", "repeats", "device", "method"}`` for one square matmul."""
    import torch

    d = DEFAULTS["cuda" if device == "cuda" else "cpu"]
    n = int(n or d["n"])
    dtype = dtype or str(d["dtype"])
    repeats = int(repeats or d["repeats"])
    torch_dtype = getattr(torch, dtype)
    flop = 2.0 * n ** 3
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda, but PyTorch sees no CUDA GPU")
        dev = torch.device("cuda", device_id)
        gen = torch.Generator(device=dev).manual_seed(0)
        a = torch.randn(n, n, device=dev, dtype=torch_dtype, generator=gen)
        b = torch.randn(n, n, device=dev, dtype=torch_dtype, generator=gen)
        out = torch.empty(n, n, device=dev, dtype=torch_dtype)
        for _ in range(warmup):
            torch.matmul(a, b, out=out)
        torch.cuda.synchronize(dev)
        times_ms = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.matmul(a, b, out=out)
            end.record()
            end.synchronize()
            times_ms.append(start.elapsed_time(end))
        name = torch.cuda.get_device_name(dev)
        method = f"torch {dtype} {n}^3 matmul, CUDA events, median of {repeats} after {warmup} warm-ups"
        del a, b, out
        torch.cuda.empty_cache()
    else:
        gen = torch.Generator().manual_seed(0)
        a = torch.randn(n, n, dtype=torch_dtype, generator=gen)
        b = torch.randn(n, n, dtype=torch_dtype, generator=gen)
        out = torch.empty(n, n, dtype=torch_dtype)
        for _ in range(warmup):
            torch.matmul(a, b, out=out)
        times_ms = []
        for _ in range(repeats):
            t = time.perf_counter()
            torch.matmul(a, b, out=out)
            times_ms.append((time.perf_counter() - t) * 1e3)
        name = "cpu"
        method = (f"torch {dtype} {n}^3 matmul on the CPU ({torch.get_num_threads()} threads), "
                  f"perf_counter, median of {repeats} after {warmup} warm-ups")
    median_ms = statistics.median(times_ms)
    return {"tflops": flop / (median_ms * 1e-3) / 1e12, "median_ms": median_ms, "times_ms": times_ms, "n": n,
            "dtype": dtype, "repeats": repeats, "device": device, "device_name": name, "method": method}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.matmul_rate", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--n", type=int, default=None)
    p.add_argument("--dtype", default=None, help="float16 (GPU default) or float32 (CPU default)")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--device-id", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the result to this file")
    args = p.parse_args(argv)
    result = measure_matmul_rate(args.device, args.n, args.dtype, args.repeats, device_id=args.device_id)
    print(f"{result['device_name']}: {result['tflops']:.1f} TFLOP/s ({result['method']})")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
