"""Text encoder: transformers' ``T5EncoderModel`` + a Linear ``proj`` (official ``T5TextEncoder``).

Keys ``model.*`` (the T5 encoder, ``shared`` and ``encoder.embed_tokens`` tied) and ``proj.*``.
``forward(input_ids, attention_mask)`` returns ``proj(last_hidden_state)``; padded positions
are computed, not zeroed, exactly as the official module (the DiT masks them out).
"""

from __future__ import annotations

import torch
from torch import nn

# Hyper-parameters of the T5 checkpoints the official code names, so that nothing has to be
# downloaded to build the module (``T5Config.from_pretrained(model_name)`` in the official code).
KNOWN_T5_CONFIGS: dict[str, dict] = {
    "google/flan-t5-large": {
        "vocab_size": 32128, "d_model": 1024, "d_kv": 64, "d_ff": 2816, "num_layers": 24,
        "num_decoder_layers": 24, "num_heads": 16, "relative_attention_num_buckets": 32,
        "relative_attention_max_distance": 128, "dropout_rate": 0.1, "layer_norm_epsilon": 1e-6,
        "feed_forward_proj": "gated-gelu", "is_encoder_decoder": True,
        "tie_word_embeddings": False, "pad_token_id": 0, "eos_token_id": 1,
        "decoder_start_token_id": 0,
    },
}


def t5_config_for(model_name: str, t5_config: dict | None = None):
    """A ``transformers.T5Config`` from an explicit dict, or from the built-in table."""
    from transformers import T5Config

    if t5_config is None:
        if model_name not in KNOWN_T5_CONFIGS:
            raise ValueError(
                f"no T5 configuration for {model_name!r}: nothing is downloaded, so pass the T5 "
                f"config.json (e.g. `semvoc-export --t5-config DIR/config.json`); built in: "
                f"{sorted(KNOWN_T5_CONFIGS)}")
        t5_config = KNOWN_T5_CONFIGS[model_name]
    return T5Config(**t5_config)


class TextEncoder(nn.Module):
    def __init__(self, embed_dim: int, t5_config):
        super().__init__()
        from transformers import T5EncoderModel

        t5_config.dropout_rate = 0.0  # inference only; dropout is inactive in eval anyway
        self.model = T5EncoderModel(t5_config).eval()
        self.proj = nn.Linear(t5_config.d_model, embed_dim)

    @property
    def hidden_size(self) -> int:
        return self.model.config.d_model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``[B, S]`` int64 ids and mask (1 = token) -> ``[B, S, embed_dim]``."""
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.proj(hidden)
