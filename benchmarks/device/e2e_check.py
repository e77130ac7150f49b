"""One request end to end on the GPU: semvoc-run (onnxruntime CUDA, CUDA graphs) vs PyTorch fp32.

    python -m benchmarks.device.e2e_check ENGINE_DIR [--runs 5] [--batch 1] [--json OUT.json]

Prints per-stage wall times (median of --runs after one warm-up), whether the loops were
captured in CUDA graphs, and the waveform error against the eager PyTorch fp32 pipeline on the
same card with the same tokens and noise (max abs error and SNR in dB).
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
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--vocoder-steps", type=int)
    parser.add_argument("--json")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
    args = parser.parse_args()

    from semvoc.runtime import Pipeline

    prompts = ["A dog barking as a man is talking while birds chirp and wind blows into a microphone",
               "An engine revving and then tires squealing", "Someone burps and then laughs",
               "Water splashing and trickling"] * 4
    prompts = prompts[: args.batch]
    t0 = time.perf_counter()
    pipe = Pipeline(args.engine, "onnxruntime-cuda")
    load = time.perf_counter() - t0
    kwargs = dict(seed=0, steps=args.steps, vocoder_steps=args.vocoder_steps)
    t0 = time.perf_counter()
    first = pipe.generate(prompts, **kwargs)  # warm-up: session creation, cudnn search, capture
    warm = time.perf_counter() - t0
    runs = [pipe.generate(prompts, **kwargs) for _ in range(args.runs)]
    stages = {k: statistics.median(r.timings[k] for r in runs) for k in runs[0].timings}
    identical = all(np.array_equal(r.audio, first.audio) for r in runs)
    report = {"engine": args.engine, "batch": args.batch, "backend": pipe.backend.describe(),
              "load_s": load, "first_request_s": warm, "median_stage_s": stages,
              "spread_total_s": [min(r.timings["total"] for r in runs), max(r.timings["total"] for r in runs)],
              "dit_calls": first.dit_calls, "bit_identical_across_runs": identical,
              "audio_seconds": first.seconds_of_audio}
    print(json.dumps(report, indent=1))

    if not args.no_torch:
        import torch

        from semvoc.models import build_model, preset
        from semvoc.models.pipeline import EagerPipeline, GenerationSettings

        data = pipe.manifest.data
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        model = build_model(preset(data["model"]["preset"]), seed=data["model"]["seed"])
        eager = EagerPipeline(model, pipe.tokenizer, device="cuda")
        d = pipe.defaults
        settings = GenerationSettings(num_steps=args.steps or d["steps"],
                                      vocoder_steps=args.vocoder_steps or d["vocoder_steps"],
                                      duration_s=data["buckets"]["durations_s"][0])
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        ref = eager.text_to_audio(prompts, seed=0, settings=settings)
        torch.cuda.synchronize()
        torch_s = time.perf_counter() - t0
        err = first.audio - ref
        snr = 10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / max(np.sum(err.astype(np.float64) ** 2), 1e-30))
        cmp = {"torch_fp32_eager_s": torch_s, "max_abs_error": float(np.abs(err).max()), "snr_db": float(snr),
               "nan": bool(np.isnan(first.audio).any()), "speedup_vs_torch_fp32": torch_s / stages["total"]}
        report["vs_torch_fp32"] = cmp
        print(json.dumps(cmp, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
