#!/usr/bin/env bash
# Sets everything up (.venv with semvoc[export]), exports the built-in `demo` preset (a tiny
# UNTRAINED model: the audio is noise-like by design) to engines/demo, and generates
# out/demo.wav from it on the CPU with semvoc-run (onnxruntime, no PyTorch at run time).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh export
. .venv/bin/activate
semvoc-export --preset demo --out engines/demo --force
semvoc-run --engine engines/demo --backend onnxruntime-cpu \
    --prompt "a dog barks while rain falls on a tin roof" --out out/demo.wav
