"""PyTorch definitions of the SemanticVocoder family; official checkpoints load unchanged.

- ``udit``: the text-to-latent DiT (``UDiT``), ``sampling``: its CFG flow-matching loop;
- ``vocoder``: the Flow2GAN-style generator and its Euler loop;
- ``text_encoder``: T5 encoder + projection; ``semantic_encoder``: Dasheng;
- ``config``: official ``config.json`` -> our configs, and the presets;
- ``model``/``checkpoint``: the whole model, random presets, strict checkpoint loading;
- ``pipeline``: eager text -> audio, audio -> latents, latents -> audio.
"""

from semvoc.models.config import ModelConfig, from_official_config, preset
from semvoc.models.model import SemanticVocoderModel, build_model

__all__ = ["ModelConfig", "SemanticVocoderModel", "build_model", "from_official_config", "preset"]
