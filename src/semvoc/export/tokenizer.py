"""Tokenizers for engine directories: a user's T5 tokenizer, or the built-in demo tokenizer.

- ``convert_t5_tokenizer(folder)``: a Hugging Face T5 tokenizer folder (``tokenizer.json``, or
  ``spiece.model`` converted by transformers) -> the ``tokenizer.json`` the runtime reads.
- ``build_demo_tokenizer()``: a small T5-style Unigram tokenizer (``<pad>`` 0, ``</s>`` 1,
  ``<unk>`` 2, ``</s>`` appended) trained offline on the AudioCaps test captions in
  ``data/``; the committed copy lives in ``semvoc/assets/demo_tokenizer.json`` and is what the
  presets (untrained models) use. Rebuild it with ``python -m semvoc.export.tokenizer``.
"""

from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path

DEMO_VOCAB_SIZE = 1000
REPO_CAPTIONS = Path(__file__).resolve().parents[3] / "data" / "audiocaps_test_captions.jsonl"


def demo_tokenizer_path() -> Path:
    return Path(str(resources.files("semvoc") / "assets" / "demo_tokenizer.json"))


def build_demo_tokenizer(captions_jsonl: Path = REPO_CAPTIONS):
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram
    from tokenizers.trainers import UnigramTrainer

    lines = captions_jsonl.read_text().splitlines()
    captions = [json.loads(line)["caption"] for line in lines if line.strip()]
    tok = Tokenizer(Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace("  ", " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = UnigramTrainer(vocab_size=DEMO_VOCAB_SIZE, special_tokens=["<pad>", "</s>", "<unk>"],
                             unk_token="<unk>", show_progress=False)
    tok.train_from_iterator(captions, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))])
    return tok


def convert_t5_tokenizer(folder: str | Path, out_file: Path) -> None:
    """Write ``out_file`` (tokenizer.json) from a T5 tokenizer folder or file."""
    folder = Path(folder)
    if folder.is_file() and folder.name.endswith(".json"):
        shutil.copyfile(folder, out_file)
        return
    if (folder / "tokenizer.json").exists():
        shutil.copyfile(folder / "tokenizer.json", out_file)
        return
    if not (folder / "spiece.model").exists():
        raise FileNotFoundError(f"{folder} holds neither tokenizer.json nor spiece.model: pass the "
                                "folder of a T5 tokenizer (e.g. google/flan-t5-large)")
    try:
        from transformers import T5TokenizerFast
    except ImportError as err:
        raise RuntimeError("converting spiece.model needs transformers: "
                           "pip install 'semvoc[export]'") from err
    T5TokenizerFast.from_pretrained(str(folder)).backend_tokenizer.save(str(out_file))


if __name__ == "__main__":
    path = demo_tokenizer_path()
    build_demo_tokenizer().save(str(path))
    print(f"wrote {path}")
