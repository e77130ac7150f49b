#!/usr/bin/env bash
# On a CUDA machine with onnxruntime-gpu: semvoc's GPU tests (in the background, beside the
# export), a reference-preset fp16 engine exported with the defaults (which use the CUDA ops), cold start and memory under two
# onnxruntime settings, session-creation times, per-graph times, kernel profiles and one batch-1 request against PyTorch
# fp32. ENGINE (default /tmp/engines/ref16k) is exported unless it exists; results go to
# ${OUT:-results}/ (a handful of files: pass KEEP_LOGS=1 for every log).
#   OUT=results bash benchmarks/device/verify_engine.sh
set -u
OUT=${OUT:-results}
ENGINE=${ENGINE:-/tmp/engines/ref16k}
LOGS=${LOGS:-/tmp/semvoc-logs}
mkdir -p "$OUT" "$LOGS"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$LOGS/gpu.txt"
tests=""
if [ -z "${SKIP_TESTS:-}" ]; then
  timeout "${TEST_TIMEOUT:-400}" python3 -m pytest -q -p no:cacheprovider tests/test_cuda_kernels.py \
      tests/test_gpu.py > "$LOGS/pytest_gpu.log" 2>&1 &
  tests=$!
fi
if [ ! -f "$ENGINE/manifest.json" ]; then
  # the default export: semvoc's CUDA ops whenever they can be built (--cuda-kernels auto)
  ( time python3 -m semvoc.export.cli --preset reference --fp16 --device cuda --out "$ENGINE" ) \
      > "$LOGS/export.log" 2>&1 || { tail -30 "$LOGS/export.log"; }
  tail -4 "$LOGS/export.log"
  python3 -c "import json, sys; ops = json.load(open(sys.argv[1]))['custom_ops']; print('custom ops:', ops)" \
      "$ENGINE/manifest.json" 2>/dev/null
fi
[ -n "$tests" ] && { wait "$tests"; tail -3 "$LOGS/pytest_gpu.log"; grep -E "^(FAILED|ERROR)" "$LOGS/pytest_gpu.log"; }
if [ ! -f "$ENGINE/manifest.json" ] && [ -n "${FALLBACK_SOURCES:-}" ]; then  # kernel sources to retry with
  echo "export failed: retrying with the kernel sources in $FALLBACK_SOURCES"
  cp "$FALLBACK_SOURCES"/*.cu "$FALLBACK_SOURCES"/*.h src/semvoc/kernels/cuda/
  python3 -m semvoc.export.cli --preset reference --fp16 --device cuda --out "$ENGINE" \
      > "$LOGS/export_fallback.log" 2>&1 || tail -20 "$LOGS/export_fallback.log"
fi
[ -f "$ENGINE/manifest.json" ] || exit 1
cold() {  # cold start and memory in a fresh process: NAME BATCH [ENV=VALUE ...] [-- cold_start flags]
  local name=$1 batch=$2; shift 2
  local envs=() flags=()
  while [ $# -gt 0 ]; do
    if [ "$1" = "--" ]; then shift; flags=("$@"); break; fi
    envs+=("$1"); shift
  done
  env "${envs[@]}" python3 -m benchmarks.device.cold_start "$ENGINE" --batch "$batch" "${flags[@]}" \
      --json "$LOGS/cold_$name.json" > "$LOGS/cold_$name.log" 2>&1 || tail -5 "$LOGS/cold_$name.log"
}
# the previous release's settings: exhaustive cuDNN search, arenas doubling, one arena per session,
# sessions created one after another
old=(SEMVOC_ORT_CUDA_OPTIONS=cudnn_conv_algo_search=EXHAUSTIVE,arena_extend_strategy=kNextPowerOfTwo
     SEMVOC_ORT_SHARED_ARENA=0)
cold b1 1; cold b16 16; cold b16_sequential 16 -- --sequential; cold b16_old 16 "${old[@]}" -- --sequential
python3 -m benchmarks.device.session_load "$ENGINE" --json "$LOGS/session_load.json" > "$LOGS/session_load.log" 2>&1 \
    || tail -5 "$LOGS/session_load.log"
for b in 1 16; do  # whole loops of 251/401 steps per iteration: few iterations
  iters=$([ "$b" = 1 ] && echo 5 || echo 2)
  python3 -m benchmarks.device.graph_times "$ENGINE" --batch "$b" --only dit_step,vocoder_step --iters "$iters" \
      --json "$LOGS/graphs_b$b.json" > "$LOGS/graphs_b$b.log" 2>&1
  python3 -m benchmarks.device.kernel_profile "$ENGINE" --graphs dit_step,vocoder_step --batch "$b" --top 16 \
      --json "$LOGS/kernels_b$b.json" > "$LOGS/kernels_b$b.log" 2>&1
done
python3 -m benchmarks.device.e2e_check "$ENGINE" --batch 1 --runs 3 --json "$LOGS/e2e_b1.json" > "$LOGS/e2e_b1.log" 2>&1
python3 - "$LOGS" <<'PY'
import json, pathlib, sys
logs = pathlib.Path(sys.argv[1])
summary = {"gpu": (logs / "gpu.txt").read_text().strip()}
for f in sorted(logs.glob("*.json")):
    summary[f.stem] = json.loads(f.read_text())
for name in ("cold_b1", "cold_b16", "cold_b16_sequential", "cold_b16_old"):
    c = summary.get(name, {})
    print(name, {k: c.get(k) for k in ("pipeline_s", "first_request_s", "cold_start_s", "session_creation_s",
                                         "warm_request_s", "used_mib_before", "used_mib_after_warm",
                                         "first_request_stages_s_mib")})
print("session_load", summary.get("session_load"))
for b in (1, 16):
    for r in summary.get(f"graphs_b{b}", {}).get("rows", []):
        loops = {m: (round(r[f"loop_{m}_step_ms"], 3), r[f"loop_{m}_ran_as"]) for m in ("onnxruntime", "semvoc")
                 if f"loop_{m}_step_ms" in r}
        print(f"b{b}", r["graph"], "cuda graph ms", round(r["cuda_graph_ms"], 3), "loop ms/step", loops,
              "parity", r["parity_max_rel_error"])
e = summary.get("e2e_b1", {})
print("e2e b1", e.get("median_stage_s"), e.get("vs_torch_fp32"), e.get("bit_identical_across_runs"))
pathlib.Path(sys.argv[1], "summary.json").write_text(json.dumps(summary, indent=1))
PY
cp "$LOGS/summary.json" "$OUT/" ; for f in kernels_b1.log kernels_b16.log export.log pytest_gpu.log; do cp "$LOGS/$f" "$OUT/" 2>/dev/null; done
[ -n "${KEEP_LOGS:-}" ] && cp "$LOGS"/* "$OUT/" 2>/dev/null
exit 0
