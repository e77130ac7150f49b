"""T5-style tokenization with the ``tokenizers`` library (no transformers, no torch).

Prompts are encoded to a fixed length ``max_tokens`` (the engine's text bucket): ids with
``</s>`` appended by the tokenizer's post-processor, padded with ``<pad>`` (id 0), and an
attention mask (1 = token). The official code pads to the longest prompt instead; since the
DiT masks padded keys, the result is the same function. A prompt longer than the bucket is
truncated (keeping ``</s>``), as the official tokenizer truncates at its maximum length, and
the caller is told so.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class TokenBatch:
    input_ids: np.ndarray  # [B, S] int64
    attention_mask: np.ndarray  # [B, S] int64
    truncated: list[bool]


class TextTokenizer:
    def __init__(self, tokenizer_json: str | Path, max_tokens: int):
        from tokenizers import Tokenizer

        path = Path(tokenizer_json)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer not found: {path}")
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises a bare Exception for any parse error
            raise ValueError(f"cannot read the tokenizer {path} ({err}): it must be the tokenizer.json of a "
                             "T5 tokenizer (tokenizers format)") from err
        self.max_tokens = int(max_tokens)
        self.pad_id = self.tokenizer.token_to_id("<pad>")
        if self.pad_id is None:
            self.pad_id = 0
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()

    def __call__(self, prompts: list[str], warn: bool = True) -> TokenBatch:
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f"prompt #{i + 1} is empty: give a text description of the audio")
        encodings = self.tokenizer.encode_batch(list(prompts))
        batch = len(prompts)
        ids = np.full((batch, self.max_tokens), self.pad_id, dtype=np.int64)
        mask = np.zeros((batch, self.max_tokens), dtype=np.int64)
        truncated = []
        for row, enc in enumerate(encodings):
            tokens = list(enc.ids)
            cut = len(tokens) > self.max_tokens
            if cut:  # keep the closing special token (</s>), as HF truncation does
                tokens = tokens[: self.max_tokens - 1] + tokens[-1:]
                if warn:
                    warnings.warn(
                        f"prompt #{row + 1} has {len(enc.ids)} tokens; truncated to the engine's "
                        f"text bucket of {self.max_tokens} (export with a larger "
                        "--max-text-tokens to keep it whole)", stacklevel=2)
            ids[row, : len(tokens)] = tokens
            mask[row, : len(tokens)] = 1
            truncated.append(cut)
        return TokenBatch(ids, mask, truncated)
