"""Parity at export: every graph against its PyTorch module, on fresh random inputs.

The reference is the fp32 PyTorch model on the official code path (``torch.stft``/``istft``
in the vocoder), so the check also covers the convolution lowering and the precision policy.
Step graphs run several consecutive steps, each side feeding its own outputs back. The error
of an output is ``max |graph - torch| / max |torch|``; bounds are per precision. Graphs run on
onnxruntime: CUDA when onnxruntime-gpu and a GPU are present (fp16 numerics as deployed),
else CPU (which runs fp16 graphs by inserting casts, so fp16 rounding is only partly tested
there: the report says which provider ran).
"""

from __future__ import annotations

import numpy as np
import torch

from semvoc.export.graphs import GraphSpec

BOUNDS = {"float32": 1e-3, "float16": 3e-2, "bfloat16": 8e-2}


def relative_error(ours: np.ndarray, ref: np.ndarray) -> float:
    ref64 = ref.astype(np.float64)
    if not np.all(np.isfinite(ours)):
        return float("inf")
    return float(np.abs(ours.astype(np.float64) - ref64).max() / max(np.abs(ref64).max(), 1e-12))


def _as_numpy(x) -> np.ndarray:
    return x.detach().cpu().float().numpy() if x.is_floating_point() else x.detach().cpu().numpy()


@torch.no_grad()
def check_graph(spec: GraphSpec, session, reference: torch.nn.Module, feeds: dict[str, torch.Tensor],
                graph_dtypes: dict[str, np.dtype], steps: int, bound: float) -> dict:
    """Run ``session`` and ``reference`` on ``feeds`` (float32) and compare every output."""
    names = [t.name for t in spec.inputs]
    ort_feeds = {n: feeds[n].cpu().numpy().astype(graph_dtypes[n]) for n in names}
    torch_feeds = {n: (feeds[n].float() if feeds[n].is_floating_point() else feeds[n]) for n in names}
    device = next(reference.parameters()).device
    per_step = []
    for _ in range(steps if spec.loop else 1):
        out_graph = session.run(None, ort_feeds)
        out_ref = reference(*[torch_feeds[n].to(device) for n in names])
        out_ref = out_ref if isinstance(out_ref, tuple) else (out_ref,)
        errors = {o.name: relative_error(np.asarray(g, dtype=np.float32) if g.dtype.kind == "f" else g,
                                         _as_numpy(r))
                  for o, g, r in zip(spec.outputs, out_graph, out_ref, strict=True)}
        per_step.append(errors)
        if spec.loop:  # feed each side its own state: (state, step) -> (state_next, step_next)
            state, step = spec.inputs[0].name, spec.inputs[1].name
            ort_feeds[state], ort_feeds[step] = out_graph[0], out_graph[1]
            torch_feeds[state], torch_feeds[step] = out_ref[0].cpu(), out_ref[1].cpu()
    worst = max(max(e.values()) for e in per_step)
    return {"max_rel_error": worst, "bound": bound, "passed": bool(worst <= bound),
            "steps": len(per_step), "per_step": per_step}
