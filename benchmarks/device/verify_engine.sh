#!/usr/bin/env bash
# On a CUDA machine with onnxruntime-gpu: semvoc's CUDA-op tests, a reference-preset fp16 engine
# with the ops, per-graph times, kernel profiles and one request end to end at batch 1 and 16.
# ENGINE (default /tmp/engines/ref16k) is exported unless it exists; results go to ${OUT:-results}/.
#   OUT=results bash benchmarks/device/verify_engine.sh
set -u
OUT=${OUT:-results}
ENGINE=${ENGINE:-/tmp/engines/ref16k}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt"
if [ -z "${SKIP_TESTS:-}" ]; then
  timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -q -p no:cacheprovider tests/test_cuda_kernels.py tests/test_gpu.py \
      > "$OUT/pytest_gpu.log" 2>&1
  tail -4 "$OUT/pytest_gpu.log"
fi
if [ ! -f "$ENGINE/manifest.json" ]; then
  ( time python3 -m semvoc.export.cli --preset reference --fp16 --device cuda --cuda-kernels --out "$ENGINE" ) \
      > "$OUT/export.log" 2>&1 || { tail -30 "$OUT/export.log"; exit 1; }
  tail -3 "$OUT/export.log"
  cp "$ENGINE/parity.json" "$OUT/parity.json"
fi
for b in ${BATCHES:-1 16}; do
  python3 -m benchmarks.device.graph_times "$ENGINE" --batch "$b" --only dit_step,vocoder_step --iters 30 \
      --json "$OUT/graphs_b$b.json" 2>&1 | grep '"graph"\|ms'
  python3 -m benchmarks.device.kernel_profile "$ENGINE" --graphs dit_step,vocoder_step --batch "$b" --top 16 \
      --json "$OUT/kernels_b$b.json" > "$OUT/kernels_b$b.log" 2>&1
  grep -v Warn "$OUT/kernels_b$b.log" | head -40
  torch_flag=$([ "$b" = 1 ] && echo "" || echo "--no-torch")
  python3 -m benchmarks.device.e2e_check "$ENGINE" --batch "$b" --runs 3 $torch_flag --json "$OUT/e2e_b$b.json" \
      > "$OUT/e2e_b$b.log" 2>&1
  tail -25 "$OUT/e2e_b$b.log"
done
