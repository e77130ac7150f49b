"""Loading official checkpoints, strictly, from local files (nothing is downloaded).

Layouts:

- the Hugging Face ``ZeyuXie/SemanticVocoder`` folder: ``config.json`` (hydra ``model_config``)
  and ``model.safetensors`` (or a sharded ``model.safetensors.index.json``) with keys
  ``model.backbone.*``, ``model.content_encoder.text_encoder.*``,
  ``model.autoencoder.generator.*``, ``model.autoencoder.cond_module.dasheng_model.*``;
- the vocoder snapshot ``ZeyuXie/SemanticVocoderSnapshot``: a ``.pt`` with key ``model`` (the
  generator's state dict) and a ``config.json`` holding the generator's arguments;
- separate weight files: a T5 encoder (``shared.weight``, ``encoder.*``; a full T5 with
  ``decoder.*`` is accepted and its decoder ignored) and a Dasheng ``.pt`` (``model`` +
  ``config``) or safetensors.

Any missing, unexpected or mis-shaped key is reported in one ``CheckpointError`` that lists
them all.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from semvoc.models.config import ConfigError, ModelConfig, from_official_config, vocoder_config
from semvoc.models.model import OFFICIAL_IGNORED_KEYS, SemanticVocoderModel, build_model
from semvoc.models.vocoder import Vocoder

HF_REPO = "ZeyuXie/SemanticVocoder"
SNAPSHOT_REPO = "ZeyuXie/SemanticVocoderSnapshot"


class CheckpointError(ValueError):
    """A checkpoint that does not match the model; the message lists every problem."""


def read_json(path: Path, what: str) -> dict:
    """A JSON object from ``path``, or a ``CheckpointError`` that names the file."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} ({what}) is not valid JSON ({err}); download it again") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} ({what}) does not hold a JSON object; download it again")
    return data


def _fetch_hint(path: Path, what: str, repo: str) -> str:
    return (f"{what} not found at {path}. semvoc never downloads: fetch it first, e.g. "
            f"`huggingface-cli download {repo} --local-dir DIR`, then pass DIR.")


def read_tensors(path: str | Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, a sharded safetensors index, or a torch ``.pt``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.name.endswith(".index.json"):
        index = read_json(path, "sharded weights index")
        if not isinstance(index.get("weight_map"), dict):
            raise CheckpointError(f"{path} has no \"weight_map\": not a safetensors index; re-download it")
        tensors: dict[str, torch.Tensor] = {}
        for shard in sorted(set(index["weight_map"].values())):
            tensors.update(read_tensors(path.parent / shard))
        return tensors
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:  # safetensors raises SafetensorError (and OSError) for damaged files
            raise CheckpointError(f"cannot read {path} ({err}): the file is damaged or incomplete; "
                                  "download it again") from err
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=not allow_pickle)
    except Exception as err:
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if not allow_pickle and "weights only" in str(err).lower():
            raise CheckpointError(
                f"{path} holds pickled Python objects besides tensors, which a weights-only load refuses. "
                "If you trust this file, rerun with --trust-checkpoint to allow them.") from err
        raise CheckpointError(f"cannot read {path} as torch weights ({type(err).__name__}: {detail}): pass a "
                              ".pt or .safetensors file of weights") from err
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} holds no state dict (expected a dict of tensors or {{'model': ...}})")
    return obj


def load_strict(module: torch.nn.Module, tensors: dict[str, torch.Tensor], what: str) -> None:
    """``load_state_dict(strict=True)`` with one error that lists every mismatch."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    shapes = sorted(f"{k}: checkpoint {tuple(tensors[k].shape)} vs model {tuple(expected[k].shape)}"
                    for k in set(expected) & set(tensors) if tensors[k].shape != expected[k].shape)
    if missing or unexpected or shapes:
        def block(title, items):
            if not items:
                return ""
            shown = "\n    ".join(items[:40])
            more = f"\n    ... and {len(items) - 40} more" if len(items) > 40 else ""
            return f"\n  {title} ({len(items)}):\n    {shown}{more}"
        raise CheckpointError(
            f"{what} does not match the configured model:"
            + block("missing keys", missing) + block("unexpected keys", unexpected)
            + block("mis-shaped keys", shapes)
            + "\n  Check that config.json belongs to these weights.")
    module.load_state_dict({k: v.to(expected[k].dtype) for k, v in tensors.items()}, strict=True)


def _weights_file(folder: Path) -> Path:
    for name in ("model.safetensors", "model.safetensors.index.json"):
        if (folder / name).exists():
            return folder / name
    raise FileNotFoundError(_fetch_hint(folder / "model.safetensors", "model.safetensors", HF_REPO))


def load_official(folder: str | Path, t5_config: dict | None = None) -> SemanticVocoderModel:
    """The HF ``ZeyuXie/SemanticVocoder`` folder -> our model, every key checked."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(_fetch_hint(config_path, "config.json", HF_REPO))
    cfg = from_official_config(read_json(config_path, "the model's config.json"))
    if t5_config is not None:
        cfg = _with_t5(cfg, t5_config)
    model = build_model(cfg)
    tensors = {k: v for k, v in read_tensors(_weights_file(folder)).items()
               if k not in OFFICIAL_IGNORED_KEYS}
    load_strict(_OfficialView(model), tensors, str(_weights_file(folder)))
    return model


class _OfficialView(torch.nn.Module):
    """Presents the model's state dict under the official key names (for loading/messages)."""

    def __init__(self, model: SemanticVocoderModel):
        super().__init__()
        self._model = [model]  # not a submodule: keep our own key names out of state_dict()
        self._mapping = model.official_state_dict_keys()

    def state_dict(self, *args, **kwargs):
        ours = self._model[0].state_dict()
        return {official: ours[mine] for official, mine in self._mapping.items()}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        ours = {self._mapping[k]: v for k, v in state_dict.items()}
        return self._model[0].load_state_dict(ours, strict=strict)


def _with_t5(cfg: ModelConfig, t5_config: dict) -> ModelConfig:
    import dataclasses

    return dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, t5=dict(t5_config)))


def _generator_kwargs(config: dict) -> dict:
    """Find the generator's arguments in a snapshot config.json."""
    for key in ("generator", "vocoder", "model", "model_config"):
        if isinstance(config.get(key), dict):
            return _generator_kwargs(config[key])
    if str(config.get("_target_", "")).endswith("MaeAudioGenerator"):
        return {k: v for k, v in config.items() if not k.startswith("_")}
    if "latent_dim" in config and "hop_length" in config:
        return config
    raise ConfigError("vocoder snapshot config.json does not hold MaeAudioGenerator arguments "
                      "(expected latent_dim, hop_length, n_ffts, ...)")


def load_vocoder_snapshot(path: str | Path, allow_pickle: bool = False) -> Vocoder:
    """``ZeyuXie/SemanticVocoderSnapshot``: a folder (or its ``.pt``) with ``config.json``."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    config_path = folder / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(_fetch_hint(config_path, "vocoder config.json", SNAPSHOT_REPO))
    if path.is_dir():
        candidates = sorted(folder.glob("*.pt")) + sorted(folder.glob("*.safetensors"))
        if not candidates:
            raise FileNotFoundError(_fetch_hint(folder / "*.pt", "vocoder weights (.pt)", SNAPSHOT_REPO))
        path = candidates[0]
    vocoder = Vocoder(vocoder_config(_generator_kwargs(read_json(config_path, "the vocoder's config.json")))).eval()
    load_strict(vocoder, read_tensors(path, allow_pickle), str(path))
    return vocoder


def load_t5_weights(model: SemanticVocoderModel, path: str | Path, proj: dict | None = None) -> None:
    """Load a T5 encoder (or full T5: the decoder is ignored) into the text encoder."""
    tensors = read_tensors(path)
    t5 = {k: v for k, v in tensors.items() if not k.startswith(("decoder.", "lm_head."))}
    if "encoder.embed_tokens.weight" not in t5 and "shared.weight" in t5:
        t5["encoder.embed_tokens.weight"] = t5["shared.weight"]
    load_strict(model.text_encoder.model, t5, f"T5 weights {path}")
    if proj is not None:
        load_strict(model.text_encoder.proj, proj, "text projection")


def load_dasheng_weights(model: SemanticVocoderModel, path: str | Path, allow_pickle: bool = False) -> None:
    if model.semantic_encoder is None:
        raise ConfigError("this model has no semantic encoder (encoder_name='none')")
    load_strict(model.semantic_encoder.dasheng_model, read_tensors(path, allow_pickle),
                f"Dasheng weights {path}")
