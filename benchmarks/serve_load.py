"""Load test of semvoc-serve next to offline batch throughput of the same engine, in one run.

    python -m benchmarks.serve_load --engine engines/reference-fp16 --clients 1,4,16 \\
        --offline-batch 16 --out benchmarks/results/serve-h100-2026-12-02.json

    python -m benchmarks.serve_load --engine engines/demo --steps 10 --vocoder-steps 10 \\
        --clients 1,4,16 --requests 32 --offline-batch 2          # CPU smoke run

1. Offline: ``Pipeline.generate`` at batch ``--offline-batch`` in this process (warm-up, then
   ``--offline-repeats`` timed batches): clips/s. The pipeline is closed before the server starts,
   so both never share the device.
2. Online: a local Ray with ``semvoc-serve``'s application (one replica per GPU, else one CPU
   replica) on 127.0.0.1, or an already running server (``--url``). For each client count C,
   C threads send single-prompt requests back to back (``--requests`` in all, at least 2 per
   client) after one warm-up request per client: clips/s, p50/p99 latency, batch sizes formed.
Every request is bounded by ``--timeout``; the run prints a markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def _f(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    rank = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[rank]


def offline_throughput(engine: str, batch: int, repeats: int, settings: dict, backend: str,
                       threads: int | None = None) -> dict:
    from semvoc.runtime.pipeline import Pipeline

    pipe = Pipeline(engine, backend, threads=threads)
    prompts = [f"benchmark prompt {i}: rain on a tin roof" for i in range(batch)]
    pipe.generate(prompts, seed=0, **settings)  # warm-up: sessions, CUDA graphs
    times = []
    for r in range(repeats):
        started = time.perf_counter()
        pipe.generate(prompts, seed=r + 1, **settings)
        times.append(time.perf_counter() - started)
    described = pipe.backend.describe()
    pipe.close()
    median = statistics.median(times)
    return {"batch": batch, "repeats": repeats, "seconds_per_batch": times, "median_s": median,
            "clips_per_s": batch / median, "backend": described}


def post(url: str, body: dict, timeout: float) -> tuple[int, float, int]:
    """(status, seconds, batch size the server formed) for one request."""
    data = json.dumps(body).encode()
    request = urllib.request.Request(f"{url}/v1/generate", data=data, method="POST",
                                     headers={"Content-Type": "application/json"})
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
            return response.status, time.perf_counter() - started, int(response.headers.get("X-Semvoc-Batch-Size", 0))
    except urllib.error.HTTPError as err:
        err.read()
        return err.code, time.perf_counter() - started, 0


def load(url: str, clients: int, requests: int, settings: dict, timeout: float) -> dict:
    """``clients`` threads, each sending its share of ``requests`` back to back."""
    per_client = max(2, -(-requests // clients))
    counter = iter(range(10**9))
    lock = threading.Lock()

    def client(c: int) -> list[tuple[int, float, int]]:
        post(url, {"prompt": f"warm-up {c}", "seed": c, **settings}, timeout)
        barrier.wait(timeout=timeout)
        out = []
        for _ in range(per_client):
            with lock:
                k = next(counter)
            out.append(post(url, {"prompt": f"load test prompt {k}: a dog barks", "seed": k, **settings}, timeout))
        return out

    barrier = threading.Barrier(clients + 1)
    with ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(client, c) for c in range(clients)]
        barrier.wait(timeout=timeout * 2)  # everyone warmed up: the clock starts
        started = time.perf_counter()
        rows = [row for f in futures for row in f.result(timeout=timeout * (per_client + 2))]
        wall = time.perf_counter() - started
    ok = [r for r in rows if r[0] == 200]
    latencies = [r[1] for r in ok]
    return {"clients": clients, "requests": len(rows), "ok": len(ok), "failed": len(rows) - len(ok),
            "wall_s": wall, "clips_per_s": len(ok) / wall,
            "p50_s": percentile(latencies, 50) if ok else None, "p99_s": percentile(latencies, 99) if ok else None,
            "mean_batch": statistics.mean(r[2] for r in ok) if ok else None,
            "max_batch": max((r[2] for r in ok), default=0)}


def start_server(engine: str, port: int, backend: str, batch_wait_ms: float, threads: int | None) -> str:
    import os

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    from semvoc.serve.server import build_app

    ray.init(logging_level="WARNING", log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(engine, backend=backend, threads=threads, batch_wait_ms=batch_wait_ms,
                        max_queued=1024),
              name="semvoc", route_prefix="/")
    return f"http://127.0.0.1:{port}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", required=True, help="engine directory")
    p.add_argument("--url", help="an already running semvoc-serve (default: start one here on 127.0.0.1)")
    p.add_argument("--port", type=int, default=18300, help="port of the server started here")
    p.add_argument("--backend", default="auto", help="runtime backend (offline and replicas)")
    p.add_argument("--threads", type=int,
                   help="onnxruntime CPU threads, offline and per replica alike (default: all cores)")
    p.add_argument("--clients", default="1,4,16", help="concurrent client counts")
    p.add_argument("--requests", type=int, default=64, help="timed requests per client count")
    p.add_argument("--offline-batch", type=int, default=16, help="batch of the offline measurement")
    p.add_argument("--offline-repeats", type=int, default=3)
    p.add_argument("--batch-wait-ms", type=float, default=50.0)
    p.add_argument("--steps", type=int, help="DiT steps (default: the engine's)")
    p.add_argument("--vocoder-steps", type=int, help="vocoder steps (default: the engine's)")
    p.add_argument("--duration", type=float, help="seconds (default: the engine's first bucket)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds one request may take")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    args = p.parse_args(argv)
    settings = {k: v for k, v in (("steps", args.steps), ("vocoder_steps", args.vocoder_steps),
                                  ("duration", args.duration)) if v is not None}
    clients = [int(c) for c in args.clients.split(",")]

    offline = offline_throughput(args.engine, args.offline_batch, args.offline_repeats, settings, args.backend,
                                 args.threads)
    print(f"offline batch {offline['batch']}: {offline['clips_per_s']:.3f} clips/s ({offline['backend']})",
          file=sys.stderr)
    url = args.url or start_server(str(Path(args.engine).resolve()), args.port, args.backend, args.batch_wait_ms,
                                          args.threads)
    try:
        online = []
        for c in clients:
            row = load(url, c, args.requests, settings, args.timeout)
            row["vs_offline"] = row["clips_per_s"] / offline["clips_per_s"]
            online.append(row)
            print(f"{c} client(s): {row['clips_per_s']:.3f} clips/s, p50 {_f(row['p50_s'])} s, "
                  f"p99 {_f(row['p99_s'])} s, mean batch {_f(row['mean_batch'], 2)}, {row['failed']} failed",
                  file=sys.stderr)
    finally:
        if not args.url:
            import ray
            from ray import serve

            serve.shutdown()
            ray.shutdown()
    result = {"engine": str(args.engine), "machine": platform.platform(), "processor": platform.processor(),
              "settings": settings, "threads": args.threads, "batch_wait_ms": args.batch_wait_ms,
              "offline": offline, "online": online,
              "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    print("| clients | requests | failed | clips/s | p50 s | p99 s | mean batch | vs offline batch "
          f"{offline['batch']} ({offline['clips_per_s']:.3f} clips/s) |\n|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in online:
        print(f"| {r['clients']} | {r['requests']} | {r['failed']} | {r['clips_per_s']:.3f} | {_f(r['p50_s'])} | "
              f"{_f(r['p99_s'])} | {_f(r['mean_batch'], 2)} | {100 * r['vs_offline']:.0f} % |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
