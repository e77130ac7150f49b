"""Cold start and GPU memory of one engine on onnxruntime CUDA, in this (fresh) process.

    python -m benchmarks.device.cold_start ENGINE_DIR [--batch 1] [--sequential] [--no-warm-up]
        [--then 4,16] [--json OUT.json]

Reports ``Pipeline(engine)`` (manifest, file verification), the first request (its sessions
created together by ``prepare``, then cuDNN algorithm search and CUDA-graph capture) with the
time spent creating each onnxruntime session (and ``first_request_timeline``: which thread created
which session, uploaded which shared weights and ran which warm-up run, when, from the request's
start), a warm request, and the device memory in use
(NVML) before loading, after ``prepare``, after each stage of the first request and after the
warm one. ``--sequential`` creates the sessions one at a time (the memory after each one is then
that session's own). ``--then-batches`` then runs one request per further batch size (a new
bucket each: its own sessions and CUDA graphs, the step graphs' weights shared with the first
bucket's) with the memory after each. Run it once per setting in separate processes, e.g. with
``SEMVOC_ORT_CUDA_OPTIONS=cudnn_conv_algo_search=EXHAUSTIVE``, ``SEMVOC_ORT_SHARED_ARENA=0``,
``SEMVOC_SHARED_WEIGHTS=0`` (one copy of the step graphs' weights per session, for comparison)
or ``SEMVOC_WARM_UP_SHRINK=0`` (the shared arena keeps the warm-up runs' regions).
``audio_sha256`` of the first clip must be the same across settings and processes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import threading
import time


def _used_mib() -> float | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(int(os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]))
        return pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20
    except Exception:  # no NVML here: memory not reported
        return None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("engine")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--sequential", action="store_true", help="create the sessions one at a time")
    parser.add_argument("--no-warm-up", action="store_true",
                        help="prepare() only creates the sessions (no first run of the once-per-request graphs)")
    parser.add_argument("--then", default="",
                        help="batch sizes to run after the warm request, in this process (e.g. 4,16): the "
                             "memory in use after each says what every further bucket costs")
    parser.add_argument("--json")
    args = parser.parse_args()

    from semvoc.runtime import Pipeline
    from semvoc.runtime.backends import ort_cuda

    sessions: list[tuple[str, float]] = []
    make_session = ort_cuda.make_session

    def timed(path, *a, **k):
        t0 = time.perf_counter()
        session = make_session(path, *a, **k)
        entry = (os.path.basename(str(path)), round(time.perf_counter() - t0, 3))
        sessions.append((*entry, _used_mib()) if args.sequential else entry)
        return session

    ort_cuda.make_session = timed
    prompts = ["A dog barking as a man is talking while birds chirp"] * args.batch
    report = {"engine": args.engine, "batch": args.batch, "sequential": args.sequential,
              "warm_up": not args.no_warm_up,
              "cuda_options_env": os.environ.get("SEMVOC_ORT_CUDA_OPTIONS", ""),
              "shared_arena_env": os.environ.get("SEMVOC_ORT_SHARED_ARENA", ""),
              "shared_weights_env": os.environ.get("SEMVOC_SHARED_WEIGHTS", ""),
              "warm_up_shrink_env": os.environ.get("SEMVOC_WARM_UP_SHRINK", ""), "used_mib_before": _used_mib()}
    t0 = time.perf_counter()
    pipe = Pipeline(args.engine, "onnxruntime-cuda")
    report["pipeline_s"] = time.perf_counter() - t0
    report["sessions_at_load"] = list(sessions)
    backend = pipe.backend
    if args.sequential:
        backend.load_threads = 1
    backend.warm_up = not args.no_warm_up
    stages: dict[str, list] = {}

    def traced(name, method):  # wall time and memory after each stage of the first request
        def call(*a, **k):
            t = time.perf_counter()
            out = method(*a, **k)
            if name not in stages:
                stages[name] = [round(time.perf_counter() - t, 3), _used_mib()]
            return out
        return call

    for name in ("prepare", "encode_text", "dit_loop", "vocoder_loop"):
        setattr(backend, name, traced(name, getattr(backend, name)))
    timelines: dict[str, list] = {"first": [], "warm": []}
    now = {"request": "first", "start": 0.0}

    def on_timeline(what, method, name_of):  # which thread did what when, from the request's start
        def call(*a, **k):
            start = time.perf_counter()
            try:
                return method(*a, **k)
            finally:
                timelines[now["request"]].append({
                    "what": what, "graph": name_of(*a), "thread": threading.current_thread().name,
                    "start_s": round(start - now["start"], 3), "s": round(time.perf_counter() - start, 3)})
        return call

    backend._create_session = on_timeline("session", backend._create_session, lambda graph, key: graph.name)
    backend._warm_run = on_timeline("warm-up run", backend._warm_run, lambda session, graph, symbols: graph.name)
    backend._shared_weights = on_timeline("shared weights", backend._shared_weights, lambda graph: graph.name)
    if hasattr(backend, "_run_once"):  # the CUDA backend: each uncaptured graph run and each loop
        backend._run_once = on_timeline("run", backend._run_once, lambda kind, *a: kind)
        backend._run_loop = on_timeline("loop", backend._run_loop, lambda loop, kind, *a: kind)
    t1 = now["start"] = time.perf_counter()
    first = pipe.generate(prompts, seed=0)
    report["first_request_stages_s_mib"] = stages
    report["first_request_timeline"] = sorted(timelines["first"], key=lambda e: e["start_s"])
    report["first_request_s"] = time.perf_counter() - t1
    report["cold_start_s"] = time.perf_counter() - t0
    report["sessions_in_first_request"] = sessions[len(report["sessions_at_load"]):]
    report["session_creation_s"] = round(sum(s[1] for s in sessions), 3)
    report["used_mib_after_first"] = _used_mib()
    now.update(request="warm", start=time.perf_counter())
    warm = pipe.generate(prompts, seed=0)
    report["warm_request_timeline"] = timelines["warm"]
    timelines["later"] = []  # the requests below are not reported
    now["request"] = "later"
    report["warm_request_s"] = warm.timings["total"]
    report["warm_stages_s"] = warm.timings
    report["used_mib_after_warm"] = _used_mib()
    report["bit_identical"] = bool((first.audio == warm.audio).all())
    # equal across processes and settings
    report["audio_sha256"] = hashlib.sha256(first.audio.tobytes()).hexdigest()
    report["then"] = []
    for batch in filter(None, args.then.split(",")):
        t = time.perf_counter()
        pipe.generate(prompts[:1] * int(batch), seed=0)
        report["then"].append({"batch": int(batch), "first_request_s": round(time.perf_counter() - t, 3),
                               "used_mib": _used_mib()})
    again = pipe.generate(prompts, seed=0)  # back to the first bucket: its CUDA graphs still replay the same
    report["bit_identical_after_other_buckets"] = bool((first.audio == again.audio).all())
    report["backend"] = backend.describe()
    print(json.dumps(report, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
