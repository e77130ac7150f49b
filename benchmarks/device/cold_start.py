"""Cold start and GPU memory of one engine on onnxruntime CUDA, in this (fresh) process.

    python -m benchmarks.device.cold_start ENGINE_DIR [--batch 1] [--json OUT.json]

Reports ``Pipeline(engine)`` (manifest, file verification, sessions created up front), the first
request (sessions created on demand, cuDNN algorithm search, CUDA-graph capture) with the time
spent creating each onnxruntime session, a warm request, and the device memory in use (NVML)
before loading, after the first request and after the warm one. Run it once per setting in
separate processes, e.g. with ``SEMVOC_ORT_CUDA_OPTIONS=cudnn_conv_algo_search=EXHAUSTIVE``.
"""

from __future__ import annotations

import argparse
import json
import os
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
    parser.add_argument("--json")
    args = parser.parse_args()

    from semvoc.runtime import Pipeline
    from semvoc.runtime.backends import ort_cuda

    sessions: list[tuple[str, float]] = []
    make_session = ort_cuda.make_session

    def timed(path, *a, **k):
        t0 = time.perf_counter()
        session = make_session(path, *a, **k)
        sessions.append((os.path.basename(str(path)), round(time.perf_counter() - t0, 3)))
        return session

    ort_cuda.make_session = timed
    prompts = ["A dog barking as a man is talking while birds chirp"] * args.batch
    report = {"engine": args.engine, "batch": args.batch,
              "cuda_options_env": os.environ.get("SEMVOC_ORT_CUDA_OPTIONS", ""), "used_mib_before": _used_mib()}
    t0 = time.perf_counter()
    pipe = Pipeline(args.engine, "onnxruntime-cuda")
    report["pipeline_s"] = time.perf_counter() - t0
    report["sessions_at_load"] = list(sessions)
    t1 = time.perf_counter()
    first = pipe.generate(prompts, seed=0)
    report["first_request_s"] = time.perf_counter() - t1
    report["cold_start_s"] = time.perf_counter() - t0
    report["sessions_in_first_request"] = sessions[len(report["sessions_at_load"]):]
    report["session_creation_s"] = round(sum(s for _, s in sessions), 3)
    report["used_mib_after_first"] = _used_mib()
    warm = pipe.generate(prompts, seed=0)
    report["warm_request_s"] = warm.timings["total"]
    report["warm_stages_s"] = warm.timings
    report["used_mib_after_warm"] = _used_mib()
    report["bit_identical"] = bool((first.audio == warm.audio).all())
    print(json.dumps(report, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
