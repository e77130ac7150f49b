#!/usr/bin/env bash
# LtGemm on a GPU in one go (about 5 minutes on an H200):
#   1. its micro-benchmark (kernel_bench/run.sh ltgemm: LtGemm against cublasGemmEx + a separate
#      pass at the step graphs' GEMM shapes, every epilogue level, float64 checks);
#   2. its GPU tests, with the other CUDA ops' and the demo engine's (tests/test_cuda_kernels.py);
#   3. an A/B of the reference slice (release widths, 2 DiT blocks, 2 vocoder layers per branch,
#      fp16, --cuda-kernels, batch 1): exported with LtGemm and with SEMVOC_EXPORT_WITHOUT=LtGemm,
#      ms per step graph call of each.
# Needs onnxruntime-gpu, nvcc and cuBLAS headers for the bench (CUBLAS_INCLUDE, or the
# nvidia-cublas wheel). Results go to ${OUT:-results}/; the summary is printed.
set -u
OUT=${OUT:-results}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
timeout "${BENCH_TIMEOUT:-150}" bash benchmarks/device/kernel_bench/run.sh ltgemm > "$OUT/ltgemm_bench.log" 2>&1
echo "ltgemm bench rc=$?"
cat "$OUT/ltgemm_bench.log"
timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -q -p no:cacheprovider tests/test_cuda_kernels.py \
    > "$OUT/pytest_cuda_kernels.log" 2>&1
echo "pytest rc=$?"
tail -3 "$OUT/pytest_cuda_kernels.log"
grep -E "^(FAILED|ERROR)" "$OUT/pytest_cuda_kernels.log"
for form in ltgemm without; do
  without=""
  [ "$form" = without ] && without=LtGemm
  ( time env SEMVOC_EXPORT_WITHOUT=$without python3 -m benchmarks.device.export_slice --out "/tmp/slice_$form" \
      --fp16 --cuda-kernels ) > "$OUT/export_slice_$form.log" 2>&1 || { tail -30 "$OUT/export_slice_$form.log"; continue; }
  echo "slice $form: $(python3 - "/tmp/slice_$form" <<'PY'
import collections, glob, onnx, sys
ops = collections.Counter()
for path in glob.glob(f"{sys.argv[1]}/**/*step*.onnx", recursive=True):
    ops.update(n.op_type for n in onnx.load(path, load_external_data=False).graph.node)
print({k: ops[k] for k in ("LtGemm", "BiasResidual", "MatMul", "Add")})
PY
)"
  python3 -m benchmarks.device.graph_times "/tmp/slice_$form" --only dit_step,vocoder_step --iters 50 \
      --json "$OUT/slice_${form}_graphs.json" 2>&1 | grep '"graph"'
done
