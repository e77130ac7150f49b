"""Recount the compute floor of a results JSON from an engine's graphs, keeping the measured rows.

    python -m benchmarks.recount_floor RESULTS.json ENGINE_DIR --reason "..." [--out-dir DIR]

For a run whose FLOP count was wrong (a counter that missed ops: the run's notes list the
unresolved nodes). ENGINE_DIR must be an export of the same preset and configuration (any
dtype, any DiT form: the FLOPs are the same; ``tests/test_benchmarks.py`` checks the forms
agree). The matmul rate measured in the run is kept; ``floor_s``/``x_floor`` of the rows and
the target checks are recomputed; the JSON records what was recounted and why. Writes a new
results set (``<stem>-recounted``), never over the original.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.recount_floor", description=__doc__.split("\n\n")[0])
    p.add_argument("results", type=Path)
    p.add_argument("engine", type=Path)
    p.add_argument("--reason", required=True, help="why the original count was wrong (recorded)")
    p.add_argument("--out-dir", type=Path, help="default: next to RESULTS")
    args = p.parse_args(argv)

    from benchmarks.flops import workload_flops
    from benchmarks.report import write_results
    from benchmarks.run import attach_floor, evaluate_targets
    from semvoc.runtime.manifest import load_manifest

    results = json.loads(args.results.read_text())
    work = results["workload"]
    model = load_manifest(args.engine, verify=False).data["model"]
    if (model.get("preset"), model.get("seed")) != (work["preset"], work["model_seed"]):
        print(f"recount_floor: error: {args.engine} is not an export of preset {work['preset']!r} seed "
              f"{work['model_seed']} (it is {model.get('preset')!r} seed {model.get('seed')})", file=sys.stderr)
        return 2
    old = results.get("floor") or {}
    flops = workload_flops(args.engine, sorted({r["batch"] for r in results["rows"]}), work["duration_s"],
                           work["steps"], work["vocoder_steps"])
    unresolved = sorted({u for e in flops["per_batch"].values() for u in e["unresolved"]})
    floor = attach_floor(results["rows"], flops, old.get("matmul"))
    floor["recounted"] = {"engine": str(args.engine), "reason": args.reason, "unresolved_after": unresolved,
                          "tflop_per_clip_before": {b: e.get("tflop_per_clip") for b, e in
                                                    (old.get("per_batch") or {}).items()}}
    results["floor"] = floor
    results["notes"] = [n for n in results.get("notes", []) if not n.startswith("FLOP count:")]
    results["notes"].append(f"floor recounted from {args.engine}: {args.reason}")
    results["targets"] = evaluate_targets(results)
    written = write_results(results, args.out_dir or args.results.parent, args.results.stem + "-recounted")
    for path in written.values():
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
