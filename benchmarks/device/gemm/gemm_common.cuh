// What the GEMM benches of this folder (gemm_bench.cu, fp8_bench.cu) share: the CUDA and cuBLAS
// error checks, the workspace and weight-rotation sizes, the timing loop, a cuBLASLt plan and its
// heuristic query. Included as "gemm_common.cuh" (looked up beside the including file).
#pragma once

#include <cublasLt.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <vector>

#define CHECK_CUDA(x)                                                                           \
  do {                                                                                          \
    cudaError_t error_ = (x);                                                                   \
    if (error_ != cudaSuccess) {                                                                \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(error_)); \
      std::exit(1);                                                                             \
    }                                                                                           \
  } while (0)
#define CHECK_BLAS(x)                                                                            \
  do {                                                                                           \
    cublasStatus_t status_ = (x);                                                                \
    if (status_ != CUBLAS_STATUS_SUCCESS) {                                                      \
      std::fprintf(stderr, "%s:%d %s: cuBLAS status %d\n", __FILE__, __LINE__, #x, (int)status_); \
      std::exit(1);                                                                              \
    }                                                                                            \
  } while (0)

namespace gemm_bench {

constexpr size_t kWorkspace = 32u << 20;  // what onnxruntime's CUDA EP gives cuBLASLt
constexpr size_t kRotateBytes = 192u << 20;  // weight copies: over 3x the H200's 60 MiB L2

// Prints "device: <name> (sm_XY, N SMs), cuBLASLt V" for device 0, the line each bench starts with
inline cudaDeviceProp PrintDevice() {
  cudaDeviceProp prop{};
  CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s (sm_%d%d, %d SMs), cuBLASLt %zu\n", prop.name, prop.major, prop.minor,
              prop.multiProcessorCount, cublasLtGetVersion());
  return prop;
}

// Median microseconds per call of `call(i)`, i counting up: 15 timings of 20 back-to-back calls
// after 5 warm-up calls (the caller rotates buffers with i)
inline float TimeUs(const std::function<void(int)>& call, cudaStream_t stream) {
  cudaEvent_t start, stop;
  CHECK_CUDA(cudaEventCreate(&start));
  CHECK_CUDA(cudaEventCreate(&stop));
  for (int i = 0; i < 5; ++i) call(i);
  std::vector<float> times;
  int index = 0;
  for (int rep = 0; rep < 15; ++rep) {
    CHECK_CUDA(cudaEventRecord(start, stream));
    for (int i = 0; i < 20; ++i) call(index++);
    CHECK_CUDA(cudaEventRecord(stop, stream));
    CHECK_CUDA(cudaEventSynchronize(stop));
    float ms = 0;
    CHECK_CUDA(cudaEventElapsedTime(&ms, start, stop));
    times.push_back(ms * 1000.f / 20.f);
  }
  CHECK_CUDA(cudaEventDestroy(start));
  CHECK_CUDA(cudaEventDestroy(stop));
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

// A cuBLASLt matmul description and its A, B and C (= D) layouts, destroyed with the plan
struct LtPlan {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  ~LtPlan() {
    if (op) cublasLtMatmulDescDestroy(op);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (c) cublasLtMatrixLayoutDestroy(c);
  }
};

// Up to `count` of cuBLASLt's heuristic algorithms for a plan (none if the query fails: said)
inline std::vector<cublasLtMatmulHeuristicResult_t> Heuristics(cublasLtHandle_t lt, const LtPlan& plan, int count) {
  cublasLtMatmulPreference_t pref;
  CHECK_BLAS(cublasLtMatmulPreferenceCreate(&pref));
  size_t workspace = kWorkspace;
  CHECK_BLAS(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &workspace,
                                                  sizeof(workspace)));
  std::vector<cublasLtMatmulHeuristicResult_t> results(count);
  int found = 0;
  const cublasStatus_t status = cublasLtMatmulAlgoGetHeuristic(lt, plan.op, plan.a, plan.b, plan.c, plan.c, pref,
                                                               count, results.data(), &found);
  cublasLtMatmulPreferenceDestroy(pref);
  if (status != CUBLAS_STATUS_SUCCESS) std::printf("    (cublasLtMatmulAlgoGetHeuristic: status %d)\n", int(status));
  results.resize(status == CUBLAS_STATUS_SUCCESS ? found : 0);
  return results;
}

}  // namespace gemm_bench
