"""Results files of a benchmark run: the JSON, a markdown table and a PNG plot.

``python -m benchmarks.report benchmarks/results/X.json`` (re)writes ``X.md`` and ``X.png`` from
the JSON alone -- for a run made where matplotlib was missing, say. Existing files are kept
unless ``--force`` is given.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

RESULT_SUFFIXES = (".json", ".md", ".png")


# ------------------------------------------------------------------------------ names


def unique_base(out_dir: Path, stem: str) -> Path:
    """``out_dir/stem``, or ``stem-2``, ``stem-3``... so that no results file is overwritten."""
    out_dir = Path(out_dir)
    candidate = out_dir / stem
    n = 1
    while any(candidate.with_name(candidate.name + s).exists() for s in RESULT_SUFFIXES):
        n += 1
        candidate = out_dir / f"{stem}-{n}"
    return candidate


# ------------------------------------------------------------------------------ formatting


def fmt(value: Any, digits: int = 3) -> str:
    """Numbers to ``digits`` significant figures; None -> '-'."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value:  # NaN
            return "nan"
        if value == 0:
            return "0"
        if abs(value) >= 10 ** digits:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}" if abs(value) >= 1e-3 else f"{value:.2e}"
    return str(value)


def _stage(row: dict, name: str) -> float | None:
    stages = row.get("stages_s") or {}
    return stages.get(name, {}).get("median") if name in stages else None


def _row_notes(row: dict) -> str:
    notes = []
    if row.get("status") != "ok":
        return row.get("note", "")
    if row.get("compile_s") is not None:
        notes.append(f"compile ~{fmt(row['compile_s'])} s ({row.get('compile_mode')})")
    elif row.get("first_call_s") is not None:
        notes.append(f"first call {fmt(row['first_call_s'])} s")
    if row.get("finite") is False:
        notes.append("NON-FINITE audio")
    cmp = row.get("vs_torch_fp32")
    if cmp:
        if "error" in cmp:
            notes.append(f"vs torch-fp32: {cmp['error']}")
        else:
            notes.append(f"vs torch-fp32: max abs diff {fmt(cmp['max_abs'])}, SNR {fmt(cmp['snr_db'])} dB")
    if row.get("note"):
        notes.append(row["note"])
    return "; ".join(notes)


def render_markdown(results: dict) -> str:
    machine = results.get("machine", {})
    work = results.get("workload", {})
    gpu = machine.get("gpu") or {}
    versions = machine.get("versions", {})
    card = gpu.get("name") if work.get("device") == "cuda" else machine.get("cpu")
    lines = [f"# semvoc benchmark: {card or 'unknown device'}, {results.get('date', '')}", ""]
    lines += ["## Machine", "",
              f"- device: `{work.get('device')}`" + (f" -- GPU {gpu.get('name')}, driver {gpu.get('driver')}"
                                                     if gpu else ""),
              f"- CPU: {machine.get('cpu')} ({machine.get('cpu_count')} logical cores)",
              "- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items() if v),
              ""]
    settings = results.get("torch_settings")
    if settings:
        lines += ["- PyTorch: " + ", ".join(f"{k} {fmt(v)}" for k, v in settings.items()), ""]
    lines += ["## Workload", "",
              f"- preset `{work.get('preset')}` (weights seed {work.get('model_seed')}); engine `{work.get('engine')}` "
              f"({work.get('engine_precision')})",
              f"- {work.get('duration_s')} s clips ({work.get('frames')} latent frames, {work.get('samples')} samples "
              f"at {work.get('sample_rate')} Hz); {work.get('steps')} DiT steps (CFG {work.get('guidance')}, sway "
              f"{work.get('sway')}), {work.get('vocoder_steps')} vocoder steps",
              f"- prompts: the first B captions of `{work.get('prompts_file')}`; noise seed {work.get('noise_seed')}",
              f"- {work.get('warmup')} warm-up run(s) excluded, {work.get('runs')} measured runs per row; "
              f"{'each system group in its own process' if work.get('isolate') else 'all systems in one process'}",
              "- wall = one request of B prompts, tokenization to waveform on the host (noise drawn before); "
              "per clip = wall / B; RTF = wall / seconds of audio produced",
              ""]
    lines += ["## Results", "",
              "| system | batch | status | median s | IQR s | min-max s | s/clip | clips/s | RTF | text s | DiT s "
              "| vocoder s | ms/DiT step | ms/voc. step | peak MiB | x floor | notes |",
              "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for row in results.get("rows", []):
        wall = row.get("wall_s") or {}
        spread = f"{fmt(wall.get('min'))}-{fmt(wall.get('max'))}" if wall else "-"
        lines.append("| " + " | ".join([
            row["system"], str(row["batch"]), row["status"], fmt(wall.get("median")), fmt(wall.get("iqr")), spread,
            fmt(row.get("per_clip_s")), fmt(row.get("clips_per_s")), fmt(row.get("rtf")),
            fmt(_stage(row, "text")), fmt(_stage(row, "dit")), fmt(_stage(row, "vocoder")),
            fmt(row.get("dit_step_ms")), fmt(row.get("vocoder_step_ms")), fmt(row.get("peak_mem_mib")),
            fmt(row.get("x_floor")), _row_notes(row).replace("|", "/")]) + " |")
    lines.append("")
    ratios = results.get("ratios") or []
    lines += ["## Ratios (each from the rows of one run, same device)", ""]
    if ratios:
        lines += ["| batch | system | baseline | speed-up (baseline median / system median) |", "|---:|---|---|---:|"]
        lines += [f"| {r['batch']} | {r['system']} | {r['baseline']} | {fmt(r['speedup'])}x |" for r in ratios]
    else:
        lines.append("No pair of measured rows to compare in this run.")
    lines.append("")
    lines += render_floor(results.get("floor"))
    targets = results.get("targets") or {}
    if targets.get("checks"):
        lines += ["## DESIGN.md targets", "", f"{targets.get('note', '')}", "",
                  "| target | measured | met |", "|---|---:|---|"]
        lines += [f"| {c['target']} | {fmt(c['value'])} | {fmt(c['met'])} |" for c in targets["checks"]]
        lines.append("")
    notes = results.get("notes") or []
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


def render_floor(floor: dict | None) -> list[str]:
    lines = ["## Compute floor", ""]
    if not floor:
        return [*lines, "Not computed.", ""]
    rate = floor.get("matmul") or {}
    if rate.get("tflops"):
        lines.append(f"- matmul rate: {fmt(rate['tflops'])} TFLOP/s ({rate.get('method')}, {rate.get('device_name')})")
    else:
        lines.append(f"- matmul rate: not measured ({floor.get('matmul_error', 'unknown reason')})")
    if floor.get("flops_error"):
        lines.append(f"- FLOP count failed: {floor['flops_error']}")
    per_batch = floor.get("per_batch") or {}
    if per_batch:
        lines += ["", "| batch | TFLOP per clip | floor s per clip | floor clips/s |", "|---:|---:|---:|---:|"]
        for batch, entry in per_batch.items():
            lines.append(f"| {batch} | {fmt(entry.get('tflop_per_clip'))} | {fmt(entry.get('floor_per_clip_s'))} | "
                         f"{fmt(entry.get('floor_clips_per_s'))} |")
    cross = (floor.get("flops") or {}).get("cross_check")
    if cross:
        lines += ["", f"FLOP cross-check against DESIGN.md ({cross.get('preset')} preset, {cross.get('duration_s')} s"
                  + ("" if cross.get("comparable") else "; DESIGN.md's figures are for the reference preset at 10 s")
                  + "):", "",
                  "| step | counted GFLOP | DESIGN.md GFLOP |", "|---|---:|---:|",
                  f"| DiT step (batch 2) | {fmt(cross['dit_step_batch2_gflop'], 4)} | "
                  f"~{fmt(cross['dit_step_batch2_gflop_design'])} |",
                  f"| vocoder step | {fmt(cross['vocoder_step_gflop'], 4)} | "
                  f"~{fmt(cross['vocoder_step_gflop_design'])} |",
                  f"| vocoder step + vocoder prepare | {fmt(cross['vocoder_step_plus_prepare_gflop'], 4)} | |",
                  "", cross.get("note", "")]
    lines.append("")
    return lines


# ------------------------------------------------------------------------------ plot


def plot(results: dict, path: Path) -> str | None:
    """Write the PNG; returns None, or why no plot was written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib; then python -m benchmarks.report JSON)"
    rows = [r for r in results.get("rows", []) if r.get("status") == "ok"]
    if not rows:
        return "no measured rows to plot"
    fig, (ax_lat, ax_thr) = plt.subplots(1, 2, figsize=(12, 4.8))
    systems = list(dict.fromkeys(r["system"] for r in rows))
    for system in systems:
        mine = sorted((r for r in rows if r["system"] == system), key=lambda r: r["batch"])
        batches = [r["batch"] for r in mine]
        ax_lat.plot(batches, [r["per_clip_s"] for r in mine], marker="o", label=system)
        ax_thr.plot(batches, [r["clips_per_s"] for r in mine], marker="o", label=system)
    per_batch = (results.get("floor") or {}).get("per_batch") or {}
    floor_points = sorted((int(b), e) for b, e in per_batch.items() if e.get("floor_per_clip_s"))
    if floor_points:
        ax_lat.plot([b for b, _ in floor_points], [e["floor_per_clip_s"] for _, e in floor_points], "k--x",
                    label="compute floor")
        ax_thr.plot([b for b, _ in floor_points], [e["floor_clips_per_s"] for _, e in floor_points], "k--x",
                    label="compute floor")
    work = results.get("workload", {})
    for ax, title, unit in ((ax_lat, "latency per clip", "seconds per clip"),
                            (ax_thr, "throughput", "clips per second")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.set_xticks(sorted({r["batch"] for r in rows}))
        ax.set_xticklabels([str(b) for b in sorted({r["batch"] for r in rows})])
        ax.grid(True, which="both", alpha=0.3)
    ax_thr.legend(fontsize=8)
    gpu = (results.get("machine") or {}).get("gpu") or {}
    card = gpu.get("name") if work.get("device") == "cuda" else (results.get("machine") or {}).get("cpu")
    fig.suptitle(f"semvoc, {work.get('preset')} preset, {work.get('duration_s')} s clips, {work.get('steps')}+"
                 f"{work.get('vocoder_steps')} steps -- {card} ({results.get('date', '')})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


# ------------------------------------------------------------------------------ files


def write_results(results: dict, out_dir: Path, stem: str) -> dict[str, Any]:
    """Write ``stem.json``/``.md``/``.png`` (suffixed, never overwriting); returns the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = unique_base(out_dir, stem)
    written: dict[str, Any] = {"json": base.with_name(base.name + ".json")}
    md = base.with_name(base.name + ".md")
    png = base.with_name(base.name + ".png")
    results["files"] = {"json": written["json"].name, "md": md.name, "png": png.name}
    why = plot(results, png)
    if why:
        results["files"]["png"] = None
        results.setdefault("notes", []).append(f"no plot: {why}")
    else:
        written["png"] = png
    md.write_text(render_markdown(results))
    written["md"] = md
    written["json"].write_text(json.dumps(results, indent=1, default=str) + "\n")
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.report",
                                description="(Re)write the markdown table and the PNG plot of a results JSON.")
    p.add_argument("json", type=Path)
    p.add_argument("--force", action="store_true", help="overwrite an existing .md/.png of the same name")
    args = p.parse_args(argv)
    results = json.loads(args.json.read_text())
    md = args.json.with_suffix(".md")
    png = args.json.with_suffix(".png")
    if md.exists() and not args.force:
        print(f"{md} exists; kept (--force to rewrite)")
    else:
        md.write_text(render_markdown(results))
        print(f"wrote {md}")
    if png.exists() and not args.force:
        print(f"{png} exists; kept (--force to rewrite)")
    else:
        why = plot(results, png)
        print(f"no plot: {why}" if why else f"wrote {png}")
        if why:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
