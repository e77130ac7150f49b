"""Merge results JSONs of several runs on one machine into one results file.

Where a command's run time is capped, the harness runs once per batch size (each run measures
its systems side by side). This writes those runs as one
``<card>-<date>`` file: rows and ratios are concatenated as measured (every ratio stays within
its own run, every row keeps the ``x_floor`` of its own run's matmul rate), the floor's per-batch
entries are joined, the targets re-checked. Runs of different cards, drivers, engines or
workloads are refused, as is a (system, batch) measured twice.

    python -m benchmarks.merge run_b1.json run_b4.json run_b16.json --out-dir benchmarks/results
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

# what must be equal across the merged runs (workload keys; systems and batch sizes may differ)
SAME_WORKLOAD = ("preset", "model_seed", "engine", "engine_created", "engine_precision", "duration_s", "steps",
                 "vocoder_steps", "guidance", "sway", "runs", "warmup", "device", "noise_seed", "prompts_file")


class MergeError(ValueError):
    """The runs cannot be shown as one results file; the message says which field differs."""


def _card(results: dict) -> tuple:
    gpu = (results.get("machine") or {}).get("gpu") or {}
    return gpu.get("name"), gpu.get("driver"), (results.get("machine") or {}).get("cpu")


def merge_results(runs: list[dict]) -> dict:
    if len(runs) < 2:
        raise MergeError("give at least two results files to merge")
    first = runs[0]
    for index, run in enumerate(runs[1:], start=2):
        if _card(run) != _card(first):
            raise MergeError(f"run {index} is from {_card(run)}, run 1 from {_card(first)}: only runs of one "
                             "machine can share a results file")
        for key in SAME_WORKLOAD:
            if run["workload"].get(key) != first["workload"].get(key):
                raise MergeError(f"run {index} has workload {key}={run['workload'].get(key)!r}, run 1 "
                                 f"{first['workload'].get(key)!r}")
    merged = copy.deepcopy(first)
    merged["rows"], merged["ratios"], merged["notes"] = [], [], []
    seen = set()
    per_batch, rates = {}, []
    for index, run in enumerate(runs, start=1):
        for row in run["rows"]:
            key = (row["system"], row["batch"])
            if key in seen:
                raise MergeError(f"{row['system']} at batch {row['batch']} is measured in more than one run")
            seen.add(key)
            merged["rows"].append({**row, "run": index})
        merged["ratios"] += [{**r, "run": index} for r in run.get("ratios", [])]
        floor = run.get("floor") or {}
        per_batch.update(floor.get("per_batch") or {})
        rates.append((floor.get("matmul") or {}).get("tflops"))
        merged["notes"] += [f"run {index}: {note}" for note in run.get("notes", [])]
    merged["rows"].sort(key=lambda r: (r["batch"], r["run"]))
    merged["ratios"].sort(key=lambda r: (r["batch"], r["run"]))
    work = merged["workload"]
    work["batch_sizes"] = sorted({r["batch"] for r in merged["rows"]})
    work["systems"] = list(dict.fromkeys(s for run in runs for s in run["workload"].get("systems", [])))
    if merged.get("floor"):
        merged["floor"]["per_batch"] = {str(b): per_batch[str(b)] for b in sorted(map(int, per_batch))}
    merged["runs"] = [{"run": i, "command": run.get("command"), "created": run.get("created"),
                       "elapsed_s": run.get("elapsed_s"), "matmul_tflops": rate}
                      for i, (run, rate) in enumerate(zip(runs, rates, strict=True), start=1)]
    merged["command"] = " ;\n".join(str(run.get("command")) for run in runs)
    merged["created"] = max(str(run.get("created")) for run in runs)
    rate_text = ", ".join("n/a" if r is None else f"{r:.0f}" for r in rates)
    merged["notes"].insert(0, f"merged from {len(runs)} runs on this machine, one after another (python -m "
                              f"benchmarks.merge); each ratio compares rows of one run; each row's x floor uses its "
                              f"own run's matmul rate ({rate_text} TFLOP/s; the floor section shows run 1's)")
    from benchmarks.run import evaluate_targets

    merged["targets"] = evaluate_targets(merged)
    return merged


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.merge", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", type=Path, nargs="+", help="results JSONs of benchmarks.run")
    p.add_argument("--out-dir", type=Path, required=True)
    p.add_argument("--stem", help="file name without suffix (default <card>-<date> of the first run)")
    args = p.parse_args(argv)
    from benchmarks.report import write_results

    try:
        merged = merge_results([json.loads(path.read_text()) for path in args.runs])
    except (MergeError, OSError, json.JSONDecodeError, KeyError) as err:
        print(f"benchmarks.merge: error: {err}", file=sys.stderr)
        return 2
    stem = args.stem or Path(merged["files"]["json"]).stem
    for kind, path in write_results(merged, args.out_dir, stem).items():
        print(f"wrote {kind}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
