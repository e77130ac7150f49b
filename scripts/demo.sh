#!/usr/bin/env bash
# Sets everything up (.venv with semvoc[export]) and generates out/demo.wav on the CPU from the
# built-in `demo` preset (a tiny UNTRAINED model: the audio is noise-like by design).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh export
. .venv/bin/activate
python - <<'PY'
from semvoc.export.tokenizer import demo_tokenizer_path
from semvoc.models import build_model, preset
from semvoc.models.pipeline import EagerPipeline, GenerationSettings
from semvoc.runtime.audio import write_wav_atomic
from semvoc.runtime.tokenizer import TextTokenizer

pipe = EagerPipeline(build_model(preset("demo"), seed=0), TextTokenizer(demo_tokenizer_path(), 32))
wav = pipe.text_to_audio(["a dog barks while rain falls"], seed=0,
                         settings=GenerationSettings(num_steps=10, vocoder_steps=10, duration_s=2.0))
print("wrote", write_wav_atomic("out/demo.wav", wav[0], 24000))
PY
