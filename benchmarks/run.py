"""Benchmark semvoc against PyTorch on one machine: latency, throughput, memory, compute floor.

    python -m benchmarks.run --engine engines/reference-fp16 --preset reference \\
        --systems torch-fp32,torch-fp16,torch-compile,semvoc-cuda,tensorrt --batch-sizes 1,4,16

    python -m benchmarks.run --device cpu --preset small --engine engines/small \\
        --systems torch-fp32,semvoc-cpu --batch-sizes 1,4

Systems: torch-fp32 (official-equivalent eager, TF32 off), torch-fp16 (eager + fp16 autocast,
STFT/iSTFT in fp32), torch-compile (fp16 autocast + torch.compile of the DiT and the vocoder's
process_model; --compile-mode, --compile-budget), semvoc-cuda / semvoc-cpu / tensorrt
(``semvoc.runtime.Pipeline`` with onnxruntime-cuda / onnxruntime-cpu / tensorrt).

The PyTorch systems build ``--preset`` with weights seed ``--model-seed`` (0); the engine must be an
export of the same preset and seed (``semvoc-export --preset P --seed 0``), and is refused
otherwise. Every system sees the same prompts (the first B AudioCaps test captions), the same
tokens (the engine's tokenizer.json) and the same seeded noise.

Writes ``<out-dir>/<card>-<YYYY-MM-DD>.{json,md,png}`` (a suffix is added rather than overwrite):
per (system, batch) the median and spread of the request time, per-stage times, time per DiT and
vocoder step, peak GPU memory, real-time factor, clips per second and the distance to the compute
floor (workload FLOPs counted from the engine's graphs / fp16 matmul rate measured on the card),
plus speed-ups computed only from rows of this run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.systems import (
    COMPILE_MODES,
    SYSTEMS,
    TORCH_SYSTEMS,
    BenchmarkError,
    Workload,
    not_measured_rows,
    run_systems,
)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PROMPTS = REPO / "data" / "audiocaps_test_captions.jsonl"
DEFAULT_OUT = REPO / "benchmarks" / "results"
DEFAULT_SYSTEMS = {"cuda": "torch-fp32,torch-fp16,torch-compile,semvoc-cuda,tensorrt", "cpu": "torch-fp32,semvoc-cpu"}
# Run order, and which systems share a worker process (the eager PyTorch systems share one model).
GROUPS = (("semvoc-cuda",), ("tensorrt",), ("semvoc-cpu",), ("torch-fp32", "torch-fp16"), ("torch-compile",))
SCHEMA = "semvoc-benchmark/1"


# ------------------------------------------------------------------------------ arguments


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from err
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--engine", type=Path, required=True, help="engine directory (semvoc-export of --preset)")
    p.add_argument("--preset", choices=["reference", "small", "demo"], default="reference")
    p.add_argument("--model-seed", type=int, default=0, help="weights seed of the preset (default 0)")
    p.add_argument("--systems", default=None,
                   help=f"comma list of {', '.join(SYSTEMS)} (default: {DEFAULT_SYSTEMS['cuda']} on cuda, "
                        f"{DEFAULT_SYSTEMS['cpu']} on cpu)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--device-id", type=int, default=0)
    p.add_argument("--batch-sizes", type=_int_list, default=[1, 4, 16])
    p.add_argument("--duration", type=float, default=10.0, help="seconds per clip (an exported duration)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--vocoder-steps", type=int, default=200)
    p.add_argument("--guidance", type=float, default=3.5)
    p.add_argument("--runs", type=int, default=5, help="measured runs per (system, batch)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up runs per (system, batch), excluded")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS, help="JSON lines with a 'caption' field")
    p.add_argument("--compile-mode", choices=COMPILE_MODES, default="max-autotune")
    p.add_argument("--compile-budget", type=float, default=1800.0,
                   help="seconds the torch-compile warm-up (compiling) may take per batch size; past it the "
                        "row says 'did not finish compiling within N s' (default 1800)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch and onnxruntime")
    p.add_argument("--out-dir", type=Path, default=DEFAULT_OUT)
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=True,
                   help="run each system group in its own process (default): a crash or a stuck compile "
                        "does not take the others down, and semvoc runs without torch imported")
    p.add_argument("--worker-timeout", type=float, default=None,
                   help="with --isolate: seconds a system group may take in all before it is stopped")
    p.add_argument("--worker-out", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--audio-dir", type=Path, default=None, help=argparse.SUPPRESS)
    return p


def parse_systems(text: str | None, device: str) -> list[str]:
    names = [s.strip() for s in (text or DEFAULT_SYSTEMS[device]).split(",") if s.strip()]
    unknown = [s for s in names if s not in SYSTEMS]
    if unknown:
        raise BenchmarkError(f"unknown system(s) {unknown}; choose from {', '.join(SYSTEMS)}")
    return list(dict.fromkeys(names))


# ------------------------------------------------------------------------------ the engine


def check_engine(data: dict, *, preset: str, model_seed: int, systems: list[str], batch_sizes: list[int],
                 duration_s: float, steps: int, vocoder_steps: int) -> None:
    """Refuse an engine that is not an export of what the PyTorch side builds, or lacks a bucket."""
    model = data.get("model", {})
    have_preset, have_seed = model.get("preset"), model.get("seed")
    export = f"semvoc-export --preset {preset} --seed {model_seed} --durations {duration_s:g} --out DIR"
    if have_preset is None:
        raise BenchmarkError(f"the engine was not exported from a preset (source: {model.get('source')!r}); the "
                             f"PyTorch systems build preset {preset!r} with seed {model_seed}, so the two would "
                             f"differ. Export a matching engine: {export}")
    if have_preset != preset or have_seed != model_seed:
        raise BenchmarkError(f"the engine is an export of preset {have_preset!r} seed {have_seed}, but this "
                             f"benchmark builds preset {preset!r} seed {model_seed} for PyTorch: pass "
                             f"--preset {have_preset} --model-seed {have_seed}, or export a matching engine: "
                             f"{export}")
    if model.get("vocoder_snapshot"):
        raise BenchmarkError("the engine's vocoder was replaced by a snapshot (--vocoder-snapshot); the PyTorch "
                             f"preset would differ. Export a plain preset engine: {export}")
    buckets = data.get("buckets", {})
    components = {g.get("component") for g in data.get("graphs", {}).values()}
    missing = sorted({"text", "dit", "vocoder"} - components)
    if missing:
        raise BenchmarkError(f"the engine lacks the {', '.join(missing)} graph(s); export with --components "
                             "text,dit,vocoder")
    durations = buckets.get("durations_s", [])
    if not any(abs(d - duration_s) < 1e-6 for d in durations):
        raise BenchmarkError(f"--duration {duration_s:g} is not an exported duration (the engine has "
                             f"{', '.join(f'{d:g}' for d in durations)} s); pass one of them or re-export "
                             f"with --durations {duration_s:g}")
    if not 1 <= steps <= buckets.get("max_dit_steps", 0):
        raise BenchmarkError(f"--steps {steps} is outside 1..{buckets.get('max_dit_steps')} for this engine "
                             "(re-export with a larger --max-steps)")
    if not 1 <= vocoder_steps <= buckets.get("max_vocoder_steps", 0):
        raise BenchmarkError(f"--vocoder-steps {vocoder_steps} is outside 1..{buckets.get('max_vocoder_steps')} "
                             "for this engine (re-export with a larger --max-vocoder-steps)")
    padded = [s for s in systems if s in ("semvoc-cuda", "tensorrt")]
    outside = [b for b in batch_sizes if b not in buckets.get("batch_sizes", [])]
    if padded and outside:
        raise BenchmarkError(f"batch size(s) {outside} are not exported batch buckets "
                             f"({buckets.get('batch_sizes')}); {', '.join(padded)} would pad them to a larger "
                             "bucket. Benchmark exported sizes, or re-export with --batch-sizes")


def build_workload(args: argparse.Namespace, systems: list[str]) -> Workload:
    from semvoc.runtime.manifest import load_manifest

    engine = args.engine.resolve()
    manifest = load_manifest(engine, verify=False)  # the Pipeline verifies every file's hash itself
    check_engine(manifest.data, preset=args.preset, model_seed=args.model_seed, systems=systems,
                 batch_sizes=args.batch_sizes, duration_s=args.duration, steps=args.steps,
                 vocoder_steps=args.vocoder_steps)
    if args.runs < 1 or args.warmup < 0:
        raise BenchmarkError("--runs must be >= 1 and --warmup >= 0")
    if not args.prompts.is_file():
        raise BenchmarkError(f"prompts file not found: {args.prompts}")
    frames = manifest.frames(args.duration)
    workload = Workload(
        engine=engine, preset=args.preset, model_seed=args.model_seed, noise_seed=args.seed,
        batch_sizes=list(args.batch_sizes), duration_s=args.duration, steps=args.steps,
        vocoder_steps=args.vocoder_steps, guidance=args.guidance, runs=args.runs, warmup=args.warmup,
        device=args.device, device_id=args.device_id, prompts_file=args.prompts.resolve(),
        compile_mode=args.compile_mode, compile_budget_s=args.compile_budget, threads=args.threads,
        sway=manifest.defaults.get("sway"), frames=frames, samples=frames * manifest.shapes["samples_per_frame"],
        sample_rate=int(manifest.defaults["sample_rate"]), latent_channels=manifest.shapes["latent_channels"],
        text_tokens=manifest.buckets["text_tokens"])
    workload.prompts(max(workload.batch_sizes))  # refuse too few prompts now, not mid-run
    return workload


def workload_section(workload: Workload, manifest_data: dict, systems: list[str], isolate: bool) -> dict:
    return {
        "systems": systems, "preset": workload.preset, "model_seed": workload.model_seed,
        "engine": str(workload.engine), "engine_precision": manifest_data.get("precision", {}).get("dtype"),
        "engine_created": manifest_data.get("created"), "engine_producer": manifest_data.get("producer"),
        "batch_sizes": workload.batch_sizes, "duration_s": workload.duration_s, "frames": workload.frames,
        "samples": workload.samples, "sample_rate": workload.sample_rate, "steps": workload.steps,
        "dit_calls_torch": workload.torch_dit_calls(), "vocoder_steps": workload.vocoder_steps,
        "guidance": workload.guidance, "sway": workload.sway, "runs": workload.runs, "warmup": workload.warmup,
        "device": workload.device, "device_id": workload.device_id, "noise_seed": workload.noise_seed,
        "prompts_file": str(workload.prompts_file), "text_tokens": workload.text_tokens,
        "compile_mode": workload.compile_mode, "compile_budget_s": workload.compile_budget_s,
        "threads": workload.threads, "isolate": isolate,
        "timing": ("wall = time.perf_counter around one request of B prompts, tokenization to waveform on the "
                   "host; the noise is drawn before (same arrays for all systems); PyTorch stages separated by "
                   "torch.cuda.synchronize(); semvoc stages from GenerationResult.timings"),
    }


# ------------------------------------------------------------------------------ running


def workload_argv(args: argparse.Namespace) -> list[str]:
    argv = ["--engine", str(args.engine.resolve()), "--preset", args.preset, "--model-seed", str(args.model_seed),
            "--device", args.device, "--device-id", str(args.device_id),
            "--batch-sizes", ",".join(map(str, args.batch_sizes)), "--duration", repr(args.duration),
            "--steps", str(args.steps), "--vocoder-steps", str(args.vocoder_steps), "--guidance", repr(args.guidance),
            "--runs", str(args.runs), "--warmup", str(args.warmup), "--seed", str(args.seed),
            "--prompts", str(args.prompts.resolve()), "--compile-mode", args.compile_mode,
            "--compile-budget", repr(args.compile_budget)]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    return argv


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def run_isolated(args: argparse.Namespace, systems: list[str], workload: Workload, audio_dir: Path,
                 tmp: Path) -> tuple[list[dict], dict]:
    rows: list[dict] = []
    seen: dict[str, Any] = {}
    for group in GROUPS:
        chosen = [s for s in group if s in systems]
        if not chosen:
            continue
        out = tmp / f"worker-{'-'.join(chosen)}.json"
        cmd = [sys.executable, "-m", "benchmarks.run", *workload_argv(args), "--systems", ",".join(chosen),
               "--worker-out", str(out), "--audio-dir", str(audio_dir)]
        print(f"== {', '.join(chosen)} (worker process)", flush=True)
        try:
            proc = subprocess.run(cmd, cwd=REPO, env=_env(), timeout=args.worker_timeout, check=False)
            code: int | None = proc.returncode
        except subprocess.TimeoutExpired:
            code = None
        if out.is_file():
            result = json.loads(out.read_text())
            rows += result["rows"]
            for key, value in result.get("seen", {}).items():
                seen.setdefault(key, value)
            continue
        if code is None:
            status, note = "not measured", f"stopped: the worker exceeded --worker-timeout {args.worker_timeout:g} s"
        else:
            status, note = "failed", f"the worker process exited with code {code} (its output is above)"
        for system in chosen:
            rows += not_measured_rows(system, workload, status, note)
    return rows, seen


def measure_rate(args: argparse.Namespace, tmp: Path) -> tuple[dict | None, str | None]:
    """The matmul rate of this run's device (in a child process with --isolate)."""
    if args.isolate:
        out = tmp / "matmul.json"
        cmd = [sys.executable, "-m", "benchmarks.matmul_rate", "--device", args.device,
               "--device-id", str(args.device_id), "--json", str(out)]
        proc = subprocess.run(cmd, cwd=REPO, env=_env(), check=False, capture_output=True, text=True)
        if out.is_file():
            return json.loads(out.read_text()), None
        return None, (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
    try:
        from benchmarks.matmul_rate import measure_matmul_rate

        return measure_matmul_rate(args.device, device_id=args.device_id), None
    except Exception as err:  # no torch, no GPU
        return None, f"{type(err).__name__}: {err}"


# ------------------------------------------------------------------------------ analysis


def attach_floor(rows: list[dict], flops: dict | None, rate: dict | None) -> dict:
    """The floor section; sets ``floor_s`` and ``x_floor`` (= median / floor) on measured rows."""
    floor: dict[str, Any] = {"matmul": rate, "flops": flops, "per_batch": {}}
    if not flops or not rate or not rate.get("tflops"):
        return floor
    flop_rate = rate["tflops"] * 1e12
    for batch, entry in flops["per_batch"].items():
        floor_s = entry["flop_per_request"] / flop_rate
        floor["per_batch"][batch] = {"tflop_per_clip": entry["tflop_per_clip"], "floor_s": floor_s,
                                     "floor_per_clip_s": floor_s / int(batch),
                                     "floor_clips_per_s": int(batch) / floor_s}
    for row in rows:
        entry = floor["per_batch"].get(str(row["batch"]))
        if row["status"] != "ok" or not entry:
            continue
        if rate.get("device") == "cuda" and row.get("card") == "cpu":
            row["x_floor_note"] = "a CPU row of a GPU run: the floor is the GPU's"
            continue
        row["floor_s"] = entry["floor_s"]
        row["x_floor"] = row["wall_s"]["median"] / entry["floor_s"]
    return floor


def compare_audio(rows: list[dict]) -> None:
    """Each row's last waveform against torch-fp32's for the same batch: max |diff| and SNR."""
    refs = {r["batch"]: r for r in rows if r["system"] == "torch-fp32" and r.get("audio_file")}
    for row in rows:
        ref = refs.get(row["batch"])
        if ref is None or row is ref or not row.get("audio_file"):
            continue
        a, b = np.load(ref["audio_file"]), np.load(row["audio_file"])
        if a.shape != b.shape:
            row["vs_torch_fp32"] = {"error": f"shapes differ: {list(a.shape)} vs {list(b.shape)}"}
            continue
        diff = b.astype(np.float64) - a.astype(np.float64)
        noise = float(np.sum(diff ** 2))
        signal = float(np.sum(a.astype(np.float64) ** 2))
        snr = float("inf") if noise == 0 else 10 * np.log10(signal / noise) if signal > 0 else float("-inf")
        row["vs_torch_fp32"] = {"max_abs": float(np.max(np.abs(diff))) if diff.size else 0.0, "snr_db": snr}


def compute_ratios(rows: list[dict], device: str) -> list[dict]:
    """semvoc speed-ups over each PyTorch system, per batch, from this run's measured rows only.

    On a GPU run: semvoc-cuda (and tensorrt) against the PyTorch systems on the same card;
    on a CPU run: semvoc-cpu against the PyTorch systems on the same CPU.
    """
    ours = ("semvoc-cuda", "tensorrt") if device == "cuda" else ("semvoc-cpu",)
    ok = [r for r in rows if r.get("status") == "ok"]
    ratios = []
    for row in ok:
        if row["system"] not in ours:
            continue
        for base in ok:
            if base["system"] not in TORCH_SYSTEMS or base["batch"] != row["batch"]:
                continue
            entry = {"batch": row["batch"], "system": row["system"], "baseline": base["system"],
                     "speedup": base["wall_s"]["median"] / row["wall_s"]["median"],
                     "card": row.get("card")}
            if row.get("card") and base.get("card") and row["card"] != base["card"]:
                entry["warning"] = f"different cards: {row['card']} vs {base['card']}"
            ratios.append(entry)
    return ratios


def evaluate_targets(results: dict) -> dict:
    """DESIGN.md's targets, checked where this run's workload is the one they are stated for."""
    work = results["workload"]
    rows = {(r["system"], r["batch"]): r for r in results["rows"] if r.get("status") == "ok"}
    ratios = {(r["system"], r["baseline"], r["batch"]): r["speedup"] for r in results["ratios"]}
    default_work = (abs(work["duration_s"] - 10.0) < 1e-6 and work["steps"] == 100 and work["vocoder_steps"] == 200)
    checks = []
    if work["device"] == "cuda" and work["preset"] == "reference" and default_work:
        one = rows.get(("semvoc-cuda", 1))
        if one:
            checks.append({"target": "semvoc-cuda batch 1: <= 0.35 s per clip", "value": one["per_clip_s"],
                           "met": one["per_clip_s"] <= 0.35})
        sixteen = rows.get(("semvoc-cuda", 16))
        if sixteen:
            checks.append({"target": "semvoc-cuda batch 16: >= 4.5 clips/s (half of the fp16 floor's throughput)",
                           "value": sixteen["clips_per_s"], "met": sixteen["clips_per_s"] >= 4.5})
            if sixteen.get("peak_mem_mib") is not None:
                checks.append({"target": "semvoc-cuda batch 16: peak GPU memory <= 8,000 MiB",
                               "value": sixteen["peak_mem_mib"], "met": sixteen["peak_mem_mib"] <= 8000})
        for batch, need in ((1, 4.5), (16, 3.0)):
            value = ratios.get(("semvoc-cuda", "torch-compile", batch))
            if value is not None:
                checks.append({"target": f"semvoc-cuda batch {batch}: >= {need:g}x torch-compile, same run",
                               "value": value, "met": value >= need})
    if work["device"] == "cpu" and work["preset"] == "small":
        for (system, base, batch), value in sorted(ratios.items()):
            if system == "semvoc-cpu" and base == "torch-fp32":
                checks.append({"target": f"semvoc-cpu batch {batch}: >= 1.5x torch-fp32 on the same CPU",
                               "value": value, "met": value >= 1.5})
    note = ("Checked against this run's rows." if checks else
            "DESIGN.md states its targets for the reference preset on a GPU (10 s, 100 + 200 steps) and the "
            "small preset on a CPU; this run's workload is neither, or lacks the rows they need.")
    return {"checks": checks, "note": note}


# ------------------------------------------------------------------------------ main


def run_worker(args: argparse.Namespace, systems: list[str], workload: Workload) -> int:
    rows, seen = run_systems(systems, workload, args.audio_dir, log=lambda m: print(m, flush=True))
    args.worker_out.write_text(json.dumps({"rows": rows, "seen": seen}, default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from semvoc.runtime.manifest import EngineError

    try:
        systems = parse_systems(args.systems, args.device)
        workload = build_workload(args, systems)
    except (BenchmarkError, EngineError) as err:
        print(f"benchmarks.run: error: {err}", file=sys.stderr)
        return 2
    if args.worker_out:
        return run_worker(args, systems, workload)

    from benchmarks.flops import format_cross_check, workload_flops
    from benchmarks.machine import card_slug, machine_info
    from benchmarks.report import write_results
    from semvoc.runtime.manifest import load_manifest

    started = time.time()
    machine = machine_info(args.device, args.device_id)
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    if args.device == "cuda" and not (machine.get("gpu") or {}).get("name"):
        print("benchmarks.run: warning: no GPU name from NVML or nvidia-smi", file=sys.stderr)
    manifest_data = load_manifest(workload.engine, verify=False).data
    notes: list[str] = []
    flops, flops_error = None, None
    try:
        flops = workload_flops(workload.engine, workload.batch_sizes, workload.duration_s, workload.steps,
                               workload.vocoder_steps)
        print(format_cross_check(flops["cross_check"]), flush=True)
        unresolved = sorted({u for e in flops["per_batch"].values() for u in e["unresolved"]})
        if unresolved:
            notes.append(f"FLOP count: {len(unresolved)} node(s) with unresolved shapes were not counted")
    except Exception as err:
        flops_error = f"{type(err).__name__}: {err}"
        print(f"benchmarks.run: warning: FLOP count failed: {flops_error}", file=sys.stderr)

    ordered = [s for group in GROUPS for s in group if s in systems]
    with tempfile.TemporaryDirectory(prefix="semvoc-bench-") as tmp_name:
        tmp = Path(tmp_name)
        audio_dir = tmp / "audio"
        audio_dir.mkdir()
        if args.isolate:
            rows, seen = run_isolated(args, ordered, workload, audio_dir, tmp)
        else:
            rows, seen = run_systems(ordered, workload, audio_dir, log=lambda m: print(m, flush=True))
        rate, rate_error = measure_rate(args, tmp)
        compare_audio(rows)
        for row in rows:
            row.pop("audio_file", None)
    order = {s: i for i, s in enumerate(systems)}
    rows.sort(key=lambda r: (order.get(r["system"], 99), r["batch"]))

    floor = attach_floor(rows, flops, rate)
    if rate_error:
        floor["matmul_error"] = rate_error
    if flops_error:
        floor["flops_error"] = flops_error
    today = dt.datetime.now(dt.timezone.utc).date().isoformat()
    results: dict[str, Any] = {
        "schema": SCHEMA,
        "date": today,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "elapsed_s": None,
        "command": "python -m benchmarks.run " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine,
        "torch_settings": seen.get("torch"),
        "workload": workload_section(workload, manifest_data, systems, args.isolate),
        "rows": rows,
        "ratios": compute_ratios(rows, args.device),
        "floor": floor,
        "notes": notes,
    }
    results["targets"] = evaluate_targets(results)
    cards = {r.get("card") for r in rows if r.get("status") == "ok" and r.get("card") and r.get("card") != "cpu"}
    if len(cards) > 1:
        notes.append(f"rows ran on different cards: {sorted(cards)}")
    load_end = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    machine["load_average_1min"] = {"start": load_start, "end": load_end}
    if load_start is not None and load_start > 0.5 * (os.cpu_count() or 1):
        notes.append(f"the machine was busy before this run started: 1-minute load average {load_start:.1f} on "
                     f"{os.cpu_count()} logical cores; CPU timings (PyTorch's especially) may be inflated")
    results["elapsed_s"] = time.time() - started
    written = write_results(results, args.out_dir, f"{card_slug(machine, args.device)}-{today}")
    print()
    print(written["md"].read_text())
    for path in written.values():
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
