"""Precision policy: fp16 (or bf16) graphs with fp32 islands, chosen by measurement.

Islands built into the model code (always fp32, whatever the engine dtype):
  norm statistics (RMSNorm, BiasNorm; LayerNormalization computes in fp32 in ONNX Runtime),
  RoPE angles (and the rotation itself in the generic DiT form; the fused form rotates in the
  graph's dtype with fp32-computed tables), sinusoidal time features, softmax inside the fused Attention op,
  the Dasheng log-mel front end and its BatchNorm (the official code disables autocast there),
  the vocoder's STFT/iSTFT convolutions (0.5 % of its FLOPs; the waveform never touches fp16),
  and the ODE loop state and updates (latent and waveform stay fp32 across steps).

Measured islands: a calibration run (a short generation in fp32 on built-in captions, with
hooks on every module) records the largest |activation| of each module. When the T5 text
encoder has an activation above ``OVERFLOW_LIMIT`` (a quarter of the fp16 maximum; its
feed-forward output is the known site in trained checkpoints) it runs in fp32 whole: it runs
once per request, so this costs little. The DiT, the vocoder and the semantic encoder stay
fp16; where one of their graphs then misses the parity bound, ``export.islands`` finds the
nodes that diverge (polygraphy, per tensor) and keeps only those in fp32; only if that does
not restore parity does the component run in fp32 whole. bf16 has fp32's range, so nothing
overflows there. The decisions, the measured maxima and the islands go into the manifest.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch

from semvoc.models.model import SemanticVocoderModel

FP16_MAX = 65504.0
OVERFLOW_LIMIT = FP16_MAX / 4

CALIBRATION_CAPTIONS = [
    "Constant rattling noise and sharp vibrations",
    "A rocket flies by followed by a loud explosion and fire crackling as a truck engine runs idle",
    "Humming and vibrating with a man and children speaking and laughing",
    "A woman is speaking from a microphone",
    "A dog barking as a man is talking while birds chirp and wind blows into a microphone",
    "Water splashing and trickling as wind blows into a microphone while a man speaks",
    "An engine revving and then tires squealing",
    "Someone burps and then laughs",
]

COMPONENT_MODULES = {"text": "text_encoder", "dit": "dit", "vocoder": "vocoder",
                     "semantic": "semantic_encoder"}


@dataclass
class PrecisionPlan:
    dtype: str  # engine dtype: "float32" | "float16" | "bfloat16"
    components: dict[str, str] = field(default_factory=dict)  # component -> dtype it runs in
    max_abs: dict[str, float] = field(default_factory=dict)  # component -> largest |activation|
    overflow_sites: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    islands: dict[str, list[str]] = field(default_factory=dict)  # graph -> nodes kept in fp32 (export.islands)

    def to_dict(self) -> dict:
        return {
            "dtype": self.dtype, "components": self.components,
            "calibration_max_abs": {k: float(v) for k, v in self.max_abs.items()},
            "overflow_limit": OVERFLOW_LIMIT, "overflow_sites": self.overflow_sites,
            "fp32_islands_in_code": [
                "norm statistics (RMSNorm, BiasNorm, LayerNormalization)",
                "RoPE angles (rotation too in the generic DiT form)",
                "sinusoidal time features", "softmax inside the fused Attention op",
                "Dasheng log-mel front end and BatchNorm", "vocoder STFT/iSTFT convolutions",
                "ODE loop state and Euler updates"],
            "fp32_islands": self.islands,
            "notes": self.notes,
        }


@torch.no_grad()
def measure_activations(model: SemanticVocoderModel, input_ids: np.ndarray, attention_mask: np.ndarray,
                        frames: int, steps: int = 4, vocoder_steps: int = 3, seed: int = 0) -> dict:
    """Largest |output| of every module during a short fp32 generation (and a resynthesis)."""
    from semvoc.models.pipeline import EagerPipeline, GenerationSettings

    maxima: dict[str, float] = {}

    def hook(name):
        def record(_module, _inputs, output):
            outs = output if isinstance(output, tuple | list) else (output,)
            for o in outs:
                if isinstance(o, torch.Tensor) and o.is_floating_point() and o.numel():
                    maxima[name] = max(maxima.get(name, 0.0), float(o.detach().abs().max()))
                elif hasattr(o, "last_hidden_state"):
                    maxima[name] = max(maxima.get(name, 0.0), float(o.last_hidden_state.abs().max()))
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    try:
        pipe = EagerPipeline(model, device=next(model.parameters()).device)
        settings = GenerationSettings(num_steps=steps, vocoder_steps=vocoder_steps,
                                      duration_s=frames / model.cfg.sampling.latent_frames_per_second)
        audio = pipe.text_to_audio(input_ids=input_ids, attention_mask=attention_mask, seed=seed,
                                   settings=settings)
        if model.semantic_encoder is not None:
            pipe.audio_to_latents(audio)
    finally:
        for h in handles:
            h.remove()
    return maxima


# components that run once per request: fp32 whole costs little there. The loops (DiT, vocoder)
# and the semantic encoder keep fp16 and get fp32 islands per node where their parity needs them.
WHOLE_FP32_ON_OVERFLOW = ("text",)


def plan_precision(dtype: str, maxima: dict[str, float] | None, islands: bool = True) -> PrecisionPlan:
    """Each component's dtype from the calibration maxima. With ``islands``, only the text encoder
    falls back to fp32 whole on overflow; the others are left to parity and per-node islands."""
    plan = PrecisionPlan(dtype=dtype)
    for component, prefix in COMPONENT_MODULES.items():
        plan.components[component] = dtype
        if maxima is None:
            continue
        values = {k: v for k, v in maxima.items() if k == prefix or k.startswith(prefix + ".")}
        if not values:
            continue
        plan.max_abs[component] = max(values.values())
        sites = sorted((k for k, v in values.items() if v > OVERFLOW_LIMIT),
                       key=lambda k: -values[k])
        if dtype == "float16" and sites:
            plan.overflow_sites[component] = sites[:20]
            if islands and component not in WHOLE_FP32_ON_OVERFLOW:
                plan.notes.append(f"{component}: activations up to {plan.max_abs[component]:.3g} exceed the fp16 "
                                  f"limit {OVERFLOW_LIMIT:.0f} (e.g. {sites[0]}); its graphs stay fp16 where "
                                  "parity allows, with fp32 islands per node where it does not")
                continue
            plan.components[component] = "float32"
            message = (f"{component}: activations up to {plan.max_abs[component]:.3g} exceed the fp16 "
                       f"limit {OVERFLOW_LIMIT:.0f} (e.g. {sites[0]}); this component runs in fp32")
            if component in ("dit", "vocoder"):
                message += " (slower: the ODE loop is in fp32)"
            plan.notes.append(message)
    return plan


def cast_for_plan(model: SemanticVocoderModel, plan: PrecisionPlan) -> SemanticVocoderModel:
    """A copy of the model with each component in its planned dtype and the code islands fp32."""
    cast = copy.deepcopy(model)
    for component, attr in COMPONENT_MODULES.items():
        module = getattr(cast, attr)
        if module is None:
            continue
        dtype = {"float32": torch.float32, "float16": torch.float16,
                 "bfloat16": torch.bfloat16}[plan.components.get(component, plan.dtype)]
        module.to(dtype)
    for est in cast.vocoder.estimators:  # STFT/iSTFT bases stay fp32 (see SpectralTransform)
        for transform in (est.fft, est.ifft):
            if transform.impl == "conv":
                transform._conv.float()
    if cast.semantic_encoder is not None:  # front end + BatchNorm stay fp32 (official: autocast off)
        dasheng = cast.semantic_encoder.dasheng_model
        dasheng.front_end.float()
        dasheng.init_bn.float()
    return cast
