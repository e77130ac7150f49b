"""Configurations: the official hydra-style ``config.json`` mapped to our modules, and presets.

The released ``ZeyuXie/SemanticVocoder/config.json`` holds ``model_config``: a hydra dict whose
``_target_`` keys name the official classes. We read it without hydra: find each component
by the class name at the end of its ``_target_``, check its keyword arguments against the
official constructor's, and build our modules from them. Unknown arguments are errors, so a
configuration we do not understand is never silently mis-built.

Presets build the same modules at three sizes with seeded random weights. They are UNTRAINED
(the engine manifest and every output say so) and exist for demos, tests and benchmarks:

- ``demo``: tiny, exports and runs on a laptop CPU in seconds;
- ``small``: a size a 2-core CPU benchmarks in seconds per step;
- ``reference``: the shapes of the release (DiT 600 M, vocoder 80 M, T5 342 M parameters).
"""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass, field

from semvoc.models.semantic_encoder import SemanticEncoderConfig
from semvoc.models.text_encoder import KNOWN_T5_CONFIGS
from semvoc.models.udit import UDiTConfig
from semvoc.models.vocoder import VocoderConfig


class ConfigError(ValueError):
    """A configuration we cannot build faithfully; the message says what to change."""


# Official constructor arguments that only matter for training: accepted and ignored.
_VOCODER_TRAINING_ONLY = {
    "loss_power", "loss_eps", "loss_scale_min", "loss_scale_max", "branch_dropout",
    "max_add_noise_scale", "mel_n_fft",
}
_DASHENG_IGNORED = {"drop_rate", "attn_drop_rate", "time_patch_out", "freq_patch_out",
                    "block_type", "attention_type", "eval_avg", "group_masking", "norm_layer",
                    "act_layer"}

DASHENG_SIZES = {
    "dasheng_base": {"embed_dim": 768, "depth": 12, "num_heads": 12},
    "dasheng_audioset": {"embed_dim": 768, "depth": 12, "num_heads": 12},
    "dasheng_06B": {"embed_dim": 1280, "depth": 32, "num_heads": 16},
    "dasheng_12B": {"embed_dim": 1536, "depth": 40, "num_heads": 24},
}


def _dataclass_from(cls, kwargs: dict, what: str, ignore: set[str] = frozenset()):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(kwargs) - names - set(ignore))
    if unknown:
        raise ConfigError(f"{what}: unsupported argument(s) {unknown}; semvoc understands "
                          f"{sorted(names - {'extra'})}")
    values = {}
    for key, value in kwargs.items():
        if key not in names:
            continue
        values[key] = tuple(value) if isinstance(value, list) else value
    return cls(**values)


def udit_config(kwargs: dict) -> UDiTConfig:
    cfg = _dataclass_from(UDiTConfig, kwargs, "UDiT")
    if isinstance(cfg.img_size, tuple | list):
        raise ConfigError("UDiT: 2-D img_size is not supported (latents are 1-D)")
    return cfg


def vocoder_config(kwargs: dict) -> VocoderConfig:
    """Arguments of ``MaeAudioGenerator`` (``latent_dim``, ``hop_length`` + the base class's)."""
    kwargs = dict(kwargs)
    for official, ours in (("n_mels", "latent_dim"), ("mel_hop_length", "hop_length"),
                           ("cond_dim", "latent_dim"), ("cond_hop_length", "hop_length")):
        if official in kwargs:
            if ours in kwargs and kwargs[ours] != kwargs[official]:
                raise ConfigError(f"vocoder: {official}={kwargs[official]} contradicts {ours}={kwargs[ours]}")
            kwargs[ours] = kwargs.pop(official)
    extra = {k: kwargs.pop(k) for k in list(kwargs) if k in _VOCODER_TRAINING_ONLY}
    cfg = _dataclass_from(VocoderConfig, kwargs, "MaeAudioGenerator")
    return dataclasses.replace(cfg, extra=extra)


def semantic_encoder_config(kwargs: dict) -> SemanticEncoderConfig:
    kwargs = dict(kwargs)
    if "hop_size" not in kwargs and "hop_length" in kwargs:
        kwargs["hop_size"] = kwargs.pop("hop_length")
    return _dataclass_from(SemanticEncoderConfig, kwargs, "Dasheng", ignore=_DASHENG_IGNORED)


@dataclass(frozen=True)
class TextEncoderConfig:
    embed_dim: int = 1024
    model_name: str = "google/flan-t5-large"
    t5: dict = field(default_factory=lambda: dict(KNOWN_T5_CONFIGS["google/flan-t5-large"]))


@dataclass(frozen=True)
class SamplingDefaults:
    """Official inference defaults (``inference.py`` / the HF wrapper / ``SemanticVocoder``)."""

    num_steps: int = 100
    guidance_scale: float = 3.5
    sway_sampling_coef: float | None = -1.0
    vocoder_steps: int = 200
    clamp_pred: bool = True
    sample_rate: int = 24000
    latent_frames_per_second: int = 25
    encoder_sampling_rate: int = 16000


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build the whole text-to-audio model."""

    text: TextEncoderConfig
    dit: UDiTConfig
    vocoder: VocoderConfig
    semantic: SemanticEncoderConfig | None
    sampling: SamplingDefaults = field(default_factory=SamplingDefaults)

    @property
    def latent_channels(self) -> int:
        return self.dit.in_chans

    @property
    def samples_per_latent_frame(self) -> int:
        return self.vocoder.hop_length

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        return cls(
            text=TextEncoderConfig(**d["text"]),
            dit=udit_config(d["dit"]),
            vocoder=vocoder_config({k: v for k, v in d["vocoder"].items() if k != "extra"}),
            semantic=semantic_encoder_config(d["semantic"]) if d.get("semantic") else None,
            sampling=SamplingDefaults(**d.get("sampling", {})),
        )


# ------------------------------------------------------------------ official config.json


def _class_name(node: dict) -> str:
    return str(node.get("_target_", "")).rsplit(".", 1)[-1]


def _resolve_interpolations(node, root):
    """Resolve OmegaConf absolute interpolations ``${a.b.c}`` against the config root."""
    if isinstance(node, dict):
        return {k: _resolve_interpolations(v, root) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve_interpolations(v, root) for v in node]
    if isinstance(node, str):
        match = re.fullmatch(r"\$\{([A-Za-z0-9_.]+)\}", node)
        if match:
            value = root
            for part in match.group(1).split("."):
                if not isinstance(value, dict) or part not in value:
                    raise ConfigError(f"cannot resolve interpolation {node!r} in config.json")
                value = value[part]
            return _resolve_interpolations(value, root)
        if "${" in node:
            raise ConfigError(f"unsupported interpolation {node!r} in config.json")
    return node


def _find(node, class_names: tuple[str, ...]) -> dict | None:
    if isinstance(node, dict):
        if _class_name(node) in class_names:
            return node
        for value in node.values():
            found = _find(value, class_names)
            if found is not None:
                return found
    elif isinstance(node, list):
        for value in node:
            found = _find(value, class_names)
            if found is not None:
                return found
    return None


def _kwargs(node: dict) -> dict:
    return {k: v for k, v in node.items() if not k.startswith("_")}


def from_official_config(config: dict) -> ModelConfig:
    """``ZeyuXie/SemanticVocoder/config.json`` (or its ``model_config``) -> ``ModelConfig``."""
    root = config.get("model_config", config)
    if not isinstance(root, dict) or "_target_" not in root:
        raise ConfigError("config.json has no hydra `model_config` with `_target_` keys; is this "
                          "the ZeyuXie/SemanticVocoder config.json?")
    root = _resolve_interpolations(root, root)

    backbone = root.get("backbone")
    if not isinstance(backbone, dict):
        raise ConfigError("model_config has no `backbone`")
    if _class_name(backbone) == "MaskDiT":
        raise ConfigError("backbone is a MaskDiT wrapper; semvoc supports the bare UDiT backbone "
                          "(keys model.backbone.*) that the release uses")
    if _class_name(backbone) != "UDiT":
        raise ConfigError(f"unsupported backbone {backbone.get('_target_')!r}: expected ...UDiT")
    dit = udit_config(_kwargs(backbone))

    text_node = _find(root.get("content_encoder", {}), ("T5TextEncoder",))
    if text_node is None:
        raise ConfigError("content_encoder has no T5TextEncoder: semvoc supports text-to-audio")
    text_kwargs = _kwargs(text_node)
    model_name = text_kwargs.get("model_name", "google/flan-t5-large")
    t5 = text_kwargs.get("t5_config") or KNOWN_T5_CONFIGS.get(model_name)
    if t5 is None:
        raise ConfigError(f"unknown T5 {model_name!r}: pass its config.json with --t5-config")
    text = TextEncoderConfig(embed_dim=text_kwargs["embed_dim"], model_name=model_name, t5=dict(t5))

    autoencoder = root.get("autoencoder")
    if not isinstance(autoencoder, dict) or _class_name(autoencoder) != "SemanticVocoder":
        raise ConfigError("model_config.autoencoder is not a SemanticVocoder")
    generator = autoencoder.get("vocoder")
    if not isinstance(generator, dict) or _class_name(generator) != "MaeAudioGenerator":
        raise ConfigError("SemanticVocoder.vocoder is not a MaeAudioGenerator")
    vocoder = vocoder_config(_kwargs(generator))

    encoder_name = autoencoder.get("encoder_name", "dasheng_base")
    if encoder_name == "none":
        semantic = None
    elif encoder_name in DASHENG_SIZES:
        semantic = SemanticEncoderConfig(**DASHENG_SIZES[encoder_name])
    else:
        raise ConfigError(f"unknown encoder_name {encoder_name!r}: expected one of "
                          f"{sorted(DASHENG_SIZES)} or 'none'")
    sampling = SamplingDefaults(
        vocoder_steps=int(autoencoder.get("n_timesteps", 200)),
        clamp_pred=bool(autoencoder.get("clamp_pred", True)),
        sample_rate=int(autoencoder.get("sample_rate", vocoder.sampling_rate)),
        encoder_sampling_rate=int(autoencoder.get("encoder_sampling_rate", 16000)),
    )
    return ModelConfig(text=text, dit=dit, vocoder=vocoder, semantic=semantic, sampling=sampling)


# -------------------------------------------------------------------------------- presets

_REFERENCE_DIT = dict(
    img_size=250, patch_size=1, in_chans=768, input_type="1d", out_chans=768, embed_dim=1024,
    depth=24, num_heads=16, mlp_ratio=4.0, qkv_bias=False, qk_norm="layernorm", act_layer="geglu",
    norm_layer="layernorm", context_norm=True, time_fusion="ada_sola_bias", ada_sola_rank=32,
    ada_sola_alpha=32, context_dim=1024, context_fusion="cross", context_max_length=None,
    context_pe_method="none", pe_method="none", rope_mode="shared", use_conv=True, skip=True,
    skip_norm=True)
_REFERENCE_VOCODER = dict(
    latent_dim=768, hop_length=960, sampling_rate=24000, n_ffts=(480, 240, 120),
    hop_lengths=(240, 120, 60), channels=(768, 512, 384), time_embed_channels=512, hidden_factor=3,
    conv_kernel_sizes=(7, 7, 7), num_layers=(8, 8, 8), use_cond_encoder=True, cond_enc_channels=512,
    cond_enc_hidden_factor=3, cond_enc_conv_kernel_size=7, cond_enc_num_layers=4,
    residual_scale=1.0, init_noise_scale=0.1, pred_x1=True, branch_reduction="mean",
    spec_scaling_loss=False)


def _preset(dit: dict, vocoder: dict, t5: dict, text_dim: int, semantic: dict) -> ModelConfig:
    return ModelConfig(
        text=TextEncoderConfig(embed_dim=text_dim, model_name="preset", t5=t5),
        dit=udit_config({**_REFERENCE_DIT, **dit}),
        vocoder=vocoder_config({**_REFERENCE_VOCODER, **vocoder}),
        semantic=SemanticEncoderConfig(**semantic),
    )


_T5_LARGE = KNOWN_T5_CONFIGS["google/flan-t5-large"]

PRESETS: dict[str, ModelConfig] = {
    "reference": dataclasses.replace(
        _preset({}, {}, dict(_T5_LARGE), 1024, DASHENG_SIZES["dasheng_base"]),
        text=TextEncoderConfig(embed_dim=1024, model_name="google/flan-t5-large", t5=dict(_T5_LARGE))),
    "small": _preset(
        dict(in_chans=128, out_chans=128, embed_dim=384, depth=8, num_heads=6, ada_sola_rank=16,
             ada_sola_alpha=16, context_dim=256),
        dict(latent_dim=128, channels=(192, 128, 96), time_embed_channels=128, num_layers=(4, 4, 4),
             cond_enc_channels=128, cond_enc_num_layers=2),
        {**_T5_LARGE, "vocab_size": 1024, "d_model": 256, "d_kv": 32, "d_ff": 512, "num_layers": 4,
         "num_decoder_layers": 4, "num_heads": 8},
        256, {"embed_dim": 128, "depth": 4, "num_heads": 4}),
    "demo": _preset(
        dict(in_chans=32, out_chans=32, embed_dim=64, depth=4, num_heads=4, ada_sola_rank=4,
             ada_sola_alpha=4, context_dim=64),
        dict(latent_dim=32, channels=(48, 32, 24), time_embed_channels=32, num_layers=(2, 2, 2),
             cond_enc_channels=32, cond_enc_num_layers=2),
        {**_T5_LARGE, "vocab_size": 1024, "d_model": 64, "d_kv": 16, "d_ff": 128, "num_layers": 2,
         "num_decoder_layers": 2, "num_heads": 4},
        64, {"embed_dim": 32, "depth": 2, "num_heads": 4}),
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}: choose one of {sorted(PRESETS)}")
    return copy.deepcopy(PRESETS[name])
