#!/usr/bin/env bash
# A/B of semvoc's CUDA ops on a slice of the reference model (release widths, 2 DiT blocks,
# 2 vocoder layers per branch), then their GPU tests. FORMS: any of cuda (--cuda-kernels: vocoder
# and DiT), cudavoc (--cuda-kernels vocoder), fused (neither); default "cuda fused". Needs onnxruntime-gpu,
# nvcc (pip install 'semvoc[cuda-kernels]', or a CUDA toolkit). Results go to ${OUT:-results}/.
set -u
OUT=${OUT:-results}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt"
for form in ${FORMS:-cuda fused}; do
  case "$form" in cuda) extra="--cuda-kernels";; cudavoc) extra="--cuda-kernels vocoder";; *) extra="";; esac
  ( time python3 -m benchmarks.device.export_slice --out /tmp/slice_$form --fp16 $extra ) \
      > "$OUT/export_slice_$form.log" 2>&1 || { tail -30 "$OUT/export_slice_$form.log"; continue; }
  python3 -m benchmarks.device.graph_times /tmp/slice_$form --only dit_step,vocoder_step --iters 50 \
      --json "$OUT/slice_${form}_graphs.json" 2>&1 | grep '"graph"'
  if [ "$form" != fused ]; then
    python3 -m benchmarks.device.kernel_profile /tmp/slice_$form --graphs dit_step,vocoder_step --top 14 \
        --json "$OUT/slice_${form}_kernels.json" > "$OUT/slice_${form}_kernels.log" 2>&1
    grep -v Warn "$OUT/slice_${form}_kernels.log" | head -24
  fi
done
timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -q -p no:cacheprovider tests/test_cuda_kernels.py \
    > "$OUT/pytest_cuda_kernels.log" 2>&1
tail -4 "$OUT/pytest_cuda_kernels.log"
