"""Consistent sample inputs for every graph, made by running the PyTorch wrappers in order.

Used to trace the export and, with fresh seeds, to check parity: the step graphs see real
tables (from the prepare/time wrappers) rather than arbitrary noise.
"""

from __future__ import annotations

import numpy as np
import torch

from semvoc.export import wrappers as W
from semvoc.export.graphs import Dims, cross_kv_names
from semvoc.models.model import SemanticVocoderModel
from semvoc.runtime.backends.base import padded_table
from semvoc.runtime.schedules import dit_schedule, vocoder_t_span


def padded(values: np.ndarray, length: int, fill: float | None = None) -> torch.Tensor:
    """``values`` padded to ``length`` as the runtime pads its schedule tables."""
    return torch.from_numpy(padded_table(values, length, fill))


@torch.no_grad()
def pipeline_feeds(model: SemanticVocoderModel, dims: Dims, batch: int, frames: int, seed: int,
                   compute_dtype: torch.dtype, dit_steps: int = 8, vocoder_steps: int = 8,
                   components: set[str] | None = None, loop_steps: int = 1) -> dict[str, torch.Tensor]:
    """Every graph input (by name) for a request of ``batch`` prompts and ``frames`` frames.

    ``loop_steps``: how many consecutive steps the caller runs from the drawn ``step``; the draw
    keeps them inside the schedule (the vocoder's x1-prediction divides by ``1 - t``, infinite
    at the schedule's end, where the official loop never evaluates it)."""
    dev = next(model.parameters()).device

    def run(wrapper, *args):  # wrappers run where the model lives; feeds stay on the CPU
        out = wrapper(*[a.to(dev) for a in args])
        return tuple(o.cpu() for o in out) if isinstance(out, tuple) else out.cpu()

    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    feeds: dict[str, torch.Tensor] = {}
    components = components or {"text", "dit", "vocoder", "semantic"}
    vocab = model.text_encoder.model.config.vocab_size
    s = dims.text_tokens
    lengths = rng.integers(2, s + 1, size=batch)
    ids = torch.zeros(batch, s, dtype=torch.int64)
    mask = torch.zeros(batch, s, dtype=torch.int64)
    for row, n in enumerate(lengths):
        ids[row, : n - 1] = torch.from_numpy(rng.integers(3, vocab, size=n - 1))
        ids[row, n - 1] = 1  # </s>
        mask[row, :n] = 1
    feeds["input_ids"], feeds["attention_mask"] = ids, mask
    context = run(W.TextEncoderGraph(model), ids, mask)
    feeds["context"], feeds["context_mask"] = context, mask.bool()

    if "dit" in components:
        sched = dit_schedule(min(max(dit_steps, loop_steps), dims.dit_rows - 1))
        prepare, time = (W.FusedDitPrepare, W.FusedDitTime) if dims.fused_dit else (W.DitPrepare, W.DitTime)
        kv = run(prepare(model.dit), context)
        for name, tensor in zip(cross_kv_names(dims), kv if isinstance(kv, tuple) else (kv,), strict=True):
            feeds[name] = tensor.to(compute_dtype)
        feeds["timesteps"] = padded(sched.embedded, dims.dit_rows)
        feeds["time_table"] = run(time(model.dit), feeds["timesteps"]).to(compute_dtype)
        feeds["sigmas"] = padded(sched.sigmas, dims.dit_rows + 1, fill=0.0)
        feeds["latent"] = torch.randn(batch, dims.latent_channels, frames, generator=gen)
        feeds["step"] = torch.tensor([int(rng.integers(0, max(1, sched.num_calls - loop_steps)))],
                                     dtype=torch.int64)
        feeds["guidance"] = torch.tensor([3.5])

    if "vocoder" in components:
        feeds["latents"] = torch.randn(batch, dims.latent_channels, frames, generator=gen)
        prepare = W.VocoderPrepare(model.vocoder, dims.vocoder_channels_last)
        for i, bias in enumerate(run(prepare, feeds["latents"])):
            feeds[f"cond_bias_{i}"] = bias.to(compute_dtype)
        t_span = vocoder_t_span(min(max(vocoder_steps, loop_steps), dims.vocoder_rows - 1))
        feeds["t_span"] = padded(t_span, dims.vocoder_rows + 1, fill=1.0)
        feeds["t"] = feeds["t_span"][: dims.vocoder_rows].clone()
        for i, scale in enumerate(run(W.VocoderTime(model.vocoder), feeds["t"])):
            feeds[f"time_scale_{i}"] = scale.to(compute_dtype)
        feeds["audio"] = torch.randn(batch, frames * dims.samples_per_frame, generator=gen) * 0.1
        last_start = max(1, len(t_span) - 1 - loop_steps + 1)  # steps use t_span[0 .. n-1], never t = 1
        feeds.setdefault("step", torch.tensor([int(rng.integers(0, last_start))], dtype=torch.int64))

    if "semantic" in components and model.semantic_encoder is not None:
        samples = frames * dims.semantic_samples_per_frame
        feeds["waveform"] = (torch.rand(batch, samples, generator=gen) - 0.5) * 0.8
    return feeds
