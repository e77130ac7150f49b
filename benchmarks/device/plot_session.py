"""The PNG of a manual GPU run's summary JSON (benchmarks/results/<card>-<date>.json).

    python -m benchmarks.device.plot_session benchmarks/results/h100-2026-11-25.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = json.loads(Path(path).read_text())
    rows = {(r["system"], r["batch"], r["config"]): r for r in d["rows"]}
    torch_b1 = next(r for (s, b, _), r in rows.items() if s == "torch-fp32" and b == 1)
    semvoc = [r for (s, _, c), r in rows.items() if s == "semvoc-cuda" and "NHWC" not in c and "nhwc" in c]
    same_run = next(r for (s, b, c), r in rows.items() if s == "semvoc-cuda" and b == 1 and "non-deterministic" in c)
    final_b1 = next(r for r in semvoc if r["batch"] == 1)
    floor = d["floor"]["floor_s_per_clip"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    labels = ["torch fp32 eager\n(TF32 off)", "semvoc fp16\n(same run)", "semvoc fp16\n(final config)", "target"]
    values = [torch_b1["median_s"], same_run["median_s"], final_b1["median_s"], 0.35]
    a.bar(labels, values, color=["#999999", "#4C72B0", "#2a5599", "#55A868"])
    a.axhline(floor, color="k", ls="--", lw=1, label=f"compute floor {floor:.3f} s")
    a.set_yscale("log")
    a.set_ylabel("seconds per 10-s clip (batch 1)")
    a.tick_params(axis="x", labelsize=7)
    a.legend(fontsize=8)
    for i, v in enumerate(values):
        a.text(i, v * 1.08, f"{v:.2f}", ha="center", fontsize=8)
    a.set_title(f"Latency, {d['workload']['preset']} preset, {d['machine']['gpu'].split()[1]}")
    thr = sorted((r["batch"], r["clips_per_s"]) for r in d["rows"]
                 if r["system"] == "semvoc-cuda" and "clips_per_s" in r)
    b.plot([t[0] for t in thr], [t[1] for t in thr], "o-", color="#2a5599", label="semvoc-cuda fp16")
    b.axhline(3.9, color="#55A868", ls=":", label="target 3.9 clips/s")
    b.axhline(1 / floor, color="k", ls="--", lw=1, label=f"floor {1 / floor:.1f} clips/s")
    b.set_xscale("log", base=2)
    b.set_xticks([t[0] for t in thr], [str(t[0]) for t in thr])
    b.set_xlabel("batch")
    b.set_ylabel("clips per second")
    b.set_yscale("log")
    b.legend(fontsize=8)
    b.set_title("Throughput")
    fig.tight_layout()
    fig.savefig(Path(path).with_suffix(".png"), dpi=110)


if __name__ == "__main__":
    main(sys.argv[1])
