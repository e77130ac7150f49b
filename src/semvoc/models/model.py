"""The whole text-to-audio model: text encoder, DiT, vocoder and (optional) semantic encoder."""

from __future__ import annotations

import math

import torch
from torch import nn

from semvoc.models.config import ModelConfig
from semvoc.models.semantic_encoder import SemanticEncoder
from semvoc.models.text_encoder import TextEncoder, t5_config_for
from semvoc.models.udit import UDiT
from semvoc.models.vocoder import Vocoder

# Our submodule -> the prefix of its keys in the released checkpoint (model.safetensors).
OFFICIAL_PREFIXES = {
    "text_encoder": "model.content_encoder.text_encoder.",
    "dit": "model.backbone.",
    "vocoder": "model.autoencoder.generator.",
    "semantic_encoder": "model.autoencoder.cond_module.",
}
OFFICIAL_IGNORED_KEYS = {"model.dummy_param"}  # an empty parameter, shape [0]


class SemanticVocoderModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.text_encoder = TextEncoder(cfg.text.embed_dim, t5_config_for(cfg.text.model_name, cfg.text.t5))
        self.dit = UDiT(cfg.dit)
        self.vocoder = Vocoder(cfg.vocoder)
        self.semantic_encoder = (SemanticEncoder(cfg.semantic, cfg.sampling.sample_rate)
                                 if cfg.semantic is not None else None)
        self._check_shapes()

    def _check_shapes(self) -> None:
        cfg = self.cfg
        if cfg.text.embed_dim != cfg.dit.context_dim:
            raise ValueError(f"text encoder embed_dim {cfg.text.embed_dim} != UDiT context_dim "
                             f"{cfg.dit.context_dim}")
        if cfg.dit.in_chans != cfg.vocoder.latent_dim:
            raise ValueError(f"UDiT in_chans {cfg.dit.in_chans} != vocoder latent_dim "
                             f"{cfg.vocoder.latent_dim}")
        if cfg.semantic is not None and cfg.semantic.embed_dim != cfg.vocoder.latent_dim:
            raise ValueError(f"semantic encoder embed_dim {cfg.semantic.embed_dim} != vocoder "
                             f"latent_dim {cfg.vocoder.latent_dim}")

    def official_state_dict_keys(self) -> dict[str, str]:
        """Official checkpoint key -> our key, for every tensor of this model."""
        mapping = {}
        for ours in self.state_dict():
            sub, rest = ours.split(".", 1)
            mapping[OFFICIAL_PREFIXES[sub] + rest] = ours
        return mapping


def parameter_counts(model: SemanticVocoderModel) -> dict[str, int]:
    """Parameters per component, tied tensors counted once."""
    counts = {}
    for name in ("text_encoder", "dit", "vocoder", "semantic_encoder"):
        module = getattr(model, name)
        if module is not None:
            counts[name] = sum(p.numel() for p in module.parameters())
    return counts


@torch.no_grad()
def init_random_weights(model: nn.Module, seed: int) -> nn.Module:
    """Seeded random weights for presets, scaled so that no output is trivial.

    The official initialisers zero the adaLN layers and cross-attention outputs, which would
    make an untrained DiT output trivial; this instead draws every tensor (Linear/Conv weights
    ~ N(0, 1/fan_in), biases ~ N(0, 0.05^2), norm gains ~ 1 + 0.15 N, ...), like the reference
    fixtures. Buffers (windows, filterbanks, RoPE frequencies) keep their constructed values.
    """
    gen = torch.Generator().manual_seed(seed)

    def normal(t: torch.Tensor, std: float, mean: float = 0.0) -> None:
        t.copy_(torch.randn(t.shape, generator=gen) * std + mean)

    for name, module in model.named_modules():
        params = dict(module.named_parameters(recurse=False))
        if isinstance(module, nn.Linear | nn.Conv1d | nn.Conv2d | nn.Embedding):
            weight = params["weight"]
            fan_in = weight[0].numel() if not isinstance(module, nn.Embedding) else 1
            std = (0.7 if isinstance(module, nn.Embedding) else 1.0) / math.sqrt(fan_in)
            if name.endswith("SelfAttention.q"):
                # T5 does not scale its attention logits; like T5's own initialiser, scale the
                # queries by d_kv^-1/2, or an untrained T5 becomes chaotic (rounding-sensitive)
                std /= math.sqrt(model.get_submodule(name.rsplit(".", 1)[0]).key_value_proj_dim)
            normal(weight, std)
            if "bias" in params and params["bias"] is not None:
                normal(params["bias"], 0.05)
        elif isinstance(module, nn.LayerNorm | nn.BatchNorm2d) or type(module).__name__ in (
                "RMSNorm", "T5LayerNorm"):
            if "weight" in params:
                normal(params["weight"], 0.15, 1.0)
            if "bias" in params and params["bias"] is not None:
                normal(params["bias"], 0.05)
            if isinstance(module, nn.BatchNorm2d):
                normal(module.running_mean, 10.0, -20.0)
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=gen) * 100 + 150)
        elif isinstance(module, nn.PReLU):
            module.weight.copy_(torch.rand(module.weight.shape, generator=gen) * 0.35 + 0.05)
        else:
            for name, p in params.items():
                if name == "bias":  # BiasNorm
                    normal(p, 0.1)
                elif name == "log_scale":
                    p.copy_(torch.rand((), generator=gen) * 0.6 - 0.3)
                elif name == "scale":  # ChannelScale
                    p.copy_(torch.rand(p.shape, generator=gen) * 0.5 + 0.5)
                elif name == "scale_shift_table":
                    normal(p, 0.1)
                elif p.numel():
                    normal(p, 0.1)
    return model


def build_model(cfg: ModelConfig, seed: int | None = None) -> SemanticVocoderModel:
    """Build in eval mode; with ``seed`` also draw random (untrained) weights."""
    model = SemanticVocoderModel(cfg).eval()
    if seed is not None:
        init_random_weights(model, seed)
    return model
