"""Every graph of an engine, declared in one place (like optimum's per-model ONNX configs).

A ``GraphSpec`` names the graph's file, its component, its wrapper, and each input/output with
dtype and shape (symbols: ``batch`` and ``frames`` are dynamic axes; the rest are numbers
fixed by the model and the export options). Sample inputs for tracing and parity are derived
from the same declaration, so shapes are written once.

Symbols: ``batch`` prompts in the request; ``frames`` latent frames (25 per second);
``dit_rows`` rows of the DiT schedule tables; ``vocoder_rows`` rows of the vocoder tables.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from semvoc.export import wrappers as W
from semvoc.export.fused_dit import fused_time_rows, supports_fused
from semvoc.models.model import SemanticVocoderModel

FLOAT, INT64, BOOL = "float32", "int64", "bool"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # "float32" | "float16" | "int64" | "bool" ("compute" resolves to the engine dtype)
    shape: tuple  # ints, or str expressions of the symbols


@dataclass(frozen=True)
class GraphSpec:
    name: str
    component: str  # "text" | "dit" | "vocoder" | "semantic"
    wrapper: Callable[[SemanticVocoderModel], torch.nn.Module]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    per_duration: bool = False  # one file per duration bucket (static time axis)
    attention_checked: bool = False  # must hold fused Attention ops and no Softmax
    loop: bool = False  # a step graph: (state, step) -> (state_next, step_next)
    notes: str = ""
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Dims:
    """Every number a graph's shapes use, for one model and export configuration."""

    text_tokens: int
    context_dim: int
    latent_channels: int
    embed_dim: int
    blocks: int
    heads: int
    head_dim: int
    time_rows: int
    samples_per_frame: int
    branch_hops: tuple[int, ...]
    branch_layers: tuple[int, ...]
    branch_channels: tuple[int, ...]
    semantic_dim: int
    semantic_samples_per_second: int
    frames_per_second: int
    dit_rows: int
    vocoder_rows: int
    fused_dit: bool = False  # the DiT graphs use ``export.fused_dit`` (packed K/V, 8-row tables)
    vocoder_channels_last: bool = False  # cond_bias tables [n, B, L, C] (--cuda-kernels)
    dit_cuda_ops: bool = False  # the fused DiT on semvoc's CUDA ops (--cuda-kernels)

    @property
    def semantic_samples_per_frame(self) -> int:
        """16 kHz samples per latent frame (640: the encoder's 4 hops of 160)."""
        return self.semantic_samples_per_second // self.frames_per_second

    @classmethod
    def of(cls, model: SemanticVocoderModel, text_tokens: int, max_dit_steps: int,
           max_vocoder_steps: int, fused: bool | None = None, vocoder_channels_last: bool = False,
           dit_cuda_ops: bool = False) -> Dims:
        """``fused``: the fused DiT form (default: wherever ``supports_fused`` allows it)."""
        cfg = model.cfg
        voc = cfg.vocoder
        fused = supports_fused(model.dit) if fused is None else fused
        return cls(
            text_tokens=text_tokens, context_dim=cfg.text.embed_dim, latent_channels=cfg.dit.in_chans,
            embed_dim=cfg.dit.embed_dim, blocks=len(model.dit.blocks), heads=cfg.dit.num_heads,
            head_dim=cfg.dit.embed_dim // cfg.dit.num_heads,
            time_rows=fused_time_rows(model.dit) if fused else W.time_rows(model.dit),
            samples_per_frame=voc.hop_length, branch_hops=tuple(voc.hop_lengths),
            branch_layers=tuple(voc.num_layers), branch_channels=tuple(voc.channels),
            semantic_dim=cfg.semantic.embed_dim if cfg.semantic else 0,
            semantic_samples_per_second=cfg.semantic.sample_rate if cfg.semantic else 16000,
            frames_per_second=cfg.sampling.latent_frames_per_second,
            dit_rows=max_dit_steps + 1, vocoder_rows=max_vocoder_steps + 1, fused_dit=fused,
            vocoder_channels_last=vocoder_channels_last, dit_cuda_ops=dit_cuda_ops)


def _branches(d: Dims, fmt: str) -> list[str]:
    return [fmt.format(i=i) for i in range(len(d.branch_hops))]


def cross_kv_names(d: Dims) -> list[str]:
    """dit_prepare's outputs (dit_step's K/V inputs): one packed table, or per block in the fused form."""
    if not d.fused_dit:
        return ["cross_kv"]
    return [f"cross_{kv}_{i}" for i in range(d.blocks) for kv in ("k", "v")]


def graph_specs(d: Dims) -> list[GraphSpec]:
    """The graphs of an engine for the given dimensions, in execution order."""
    compute = "compute"
    if d.fused_dit:  # every block's K and V as its own tensor (slicing a table copies it)
        cross_kv = tuple(TensorSpec(name, compute, ("2*batch", d.text_tokens, d.embed_dim))
                         for name in cross_kv_names(d))
        prepare, time = W.FusedDitPrepare, W.FusedDitTime
        step = functools.partial(W.FusedDitStep, cuda_ops=d.dit_cuda_ops)
    else:
        cross_kv = (TensorSpec("cross_kv", compute, (d.blocks, 2, "2*batch", d.heads, d.text_tokens, d.head_dim)),)
        prepare, time, step = W.DitPrepare, W.DitTime, W.DitStep
    def cond_shape(i: int) -> tuple:
        frames = f"frames*{d.samples_per_frame // d.branch_hops[i]}+1"
        if d.vocoder_channels_last:
            return (d.branch_layers[i], "batch", frames, d.branch_channels[i])
        return (d.branch_layers[i], "batch", d.branch_channels[i], frames)

    cond_bias = [TensorSpec(f"cond_bias_{i}", compute, cond_shape(i)) for i in range(len(d.branch_hops))]
    time_scale = [TensorSpec(f"time_scale_{i}", compute, ("vocoder_rows", d.branch_layers[i],
                                                          d.branch_channels[i]))
                  for i in range(len(d.branch_hops))]
    return [
        GraphSpec(
            "text_encoder", "text", W.TextEncoderGraph,
            inputs=(TensorSpec("input_ids", INT64, ("batch", d.text_tokens)),
                    TensorSpec("attention_mask", INT64, ("batch", d.text_tokens))),
            outputs=(TensorSpec("context", FLOAT, ("batch", d.text_tokens, d.context_dim)),),
            notes="T5 encoder + proj; padded positions computed (masked downstream)"),
        GraphSpec(
            "dit_prepare", "dit", lambda m: prepare(m.dit),
            inputs=(TensorSpec("context", FLOAT, ("batch", d.text_tokens, d.context_dim)),),
            outputs=cross_kv,
            notes="cross-attention K/V of every block for [uncond (zero context); cond]"),
        GraphSpec(
            "dit_time", "dit", lambda m: time(m.dit),
            inputs=(TensorSpec("timesteps", FLOAT, ("dit_rows",)),),
            outputs=(TensorSpec("time_table", compute, ("dit_rows", d.time_rows, d.embed_dim)),),
            notes="adaLN modulation of every block (+ final layer) for every scheduled timestep"),
        GraphSpec(
            "dit_step", "dit", lambda m: step(m.dit), loop=True, attention_checked=True,
            inputs=(TensorSpec("latent", FLOAT, ("batch", d.latent_channels, "frames")),
                    TensorSpec("step", INT64, (1,)),
                    TensorSpec("time_table", compute, ("dit_rows", d.time_rows, d.embed_dim)),
                    TensorSpec("sigmas", FLOAT, ("dit_rows+1",)),
                    *cross_kv,
                    TensorSpec("context_mask", BOOL, ("batch", d.text_tokens)),
                    TensorSpec("guidance", FLOAT, (1,))),
            outputs=(TensorSpec("latent_next", FLOAT, ("batch", d.latent_channels, "frames")),
                     TensorSpec("step_next", INT64, (1,))),
            notes="one CFG Euler step: x += (sigma[k+1]-sigma[k]) (u + w (c - u))"),
        GraphSpec(
            "vocoder_prepare", "vocoder", lambda m: W.VocoderPrepare(m.vocoder, d.vocoder_channels_last),
            inputs=(TensorSpec("latents", FLOAT, ("batch", d.latent_channels, "frames")),),
            outputs=tuple(cond_bias),
            notes="condition encoder, cond_mlp and every block's cond_proj, per branch"),
        GraphSpec(
            "vocoder_time", "vocoder", lambda m: W.VocoderTime(m.vocoder),
            inputs=(TensorSpec("t", FLOAT, ("vocoder_rows",)),),
            outputs=tuple(time_scale),
            notes="every block's time FiLM scale 1 + proj(time_mlp(pe(t))), per branch"),
        GraphSpec(
            "vocoder_step", "vocoder", lambda m: W.VocoderStep(m.vocoder, d.vocoder_channels_last), loop=True,
            inputs=(TensorSpec("audio", FLOAT, ("batch", f"frames*{d.samples_per_frame}")),
                    TensorSpec("step", INT64, (1,)),
                    TensorSpec("t_span", FLOAT, ("vocoder_rows+1",)),
                    *cond_bias, *time_scale),
            outputs=(TensorSpec("audio_next", FLOAT, ("batch", f"frames*{d.samples_per_frame}")),
                     TensorSpec("step_next", INT64, (1,))),
            notes="one Euler step with x1-prediction; STFT/iSTFT as convolutions"),
        GraphSpec(
            "semantic_encoder", "semantic", W.SemanticEncoderGraph, per_duration=True,
            attention_checked=True,
            inputs=(TensorSpec("waveform", FLOAT, ("batch", "samples16k")),),
            outputs=(TensorSpec("latents", FLOAT, ("batch", d.semantic_dim, "frames")),),
            notes="16 kHz waveform -> Dasheng latents (log-mel front end as convolutions)"),
    ]


# ------------------------------------------------------------------ shapes and samples


def resolve_shape(shape: tuple, symbols: dict[str, int]) -> tuple[int, ...]:
    return tuple(int(eval(str(s), {}, symbols)) if not isinstance(s, int) else s for s in shape)


TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "int64": torch.int64, "bool": torch.bool}


def torch_dtype(spec: TensorSpec, compute_dtype: str) -> torch.dtype:
    return TORCH_DTYPES[compute_dtype if spec.dtype == "compute" else spec.dtype]


def export_dynamic_shapes(spec: GraphSpec) -> dict:
    """``torch.export`` dynamic shapes: ``batch`` and ``frames`` (and table rows) are dynamic;
    expressions such as ``frames*4+1`` become derived dims."""
    dims = {
        "batch": torch.export.Dim("batch", min=1, max=256),
        "frames": torch.export.Dim("frames", min=2, max=25 * 120),
        "dit_rows": torch.export.Dim("dit_rows", min=2, max=4096),
        "vocoder_rows": torch.export.Dim("vocoder_rows", min=2, max=4096),
    }
    out = {}
    for t in spec.inputs:
        axes = {}
        for axis, s in enumerate(t.shape):
            if isinstance(s, int) or s == "samples16k":
                continue
            if spec.per_duration and "frames" in s:
                continue
            axes[axis] = eval(s, {}, dims)
        out[t.name] = axes or None
    return out
