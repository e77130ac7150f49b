// What the GEMM benches of this folder share: the CUDA and cuBLAS error checks, the workspace and
// weight-rotation sizes, the timing loops (back-to-back calls, or calls replayed from a CUDA
// graph), a cuBLASLt plan and its heuristic query, a pseudo-random fp16 fill and the largest
// difference of two fp16 buffers. Included as "gemm_common.cuh" (looked up beside the including file).
#pragma once

#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_fp16.h>
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

// A cuBLAS handle (what onnxruntime's MatMul calls) and a cuBLASLt handle, both on `stream`, each
// with a workspace of kWorkspace bytes; kept for the process
struct BlasHandles {
  cublasHandle_t blas = nullptr;
  cublasLtHandle_t lt = nullptr;
  void* workspace = nullptr;  // cuBLASLt's, passed to each cublasLtMatmul
  explicit BlasHandles(cudaStream_t stream) {
    void* blas_workspace;
    CHECK_BLAS(cublasCreate(&blas));
    CHECK_BLAS(cublasSetStream(blas, stream));
    CHECK_CUDA(cudaMalloc(&blas_workspace, kWorkspace));
    CHECK_BLAS(cublasSetWorkspace(blas, blas_workspace, kWorkspace));
    CHECK_BLAS(cublasLtCreate(&lt));
    CHECK_CUDA(cudaMalloc(&workspace, kWorkspace));
  }
};

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

// p[i] = a pseudo-random value in [-scale/2, scale/2] from (i, seed)
__global__ void RandomFillKernel(__half* p, size_t n, unsigned seed, float scale) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    unsigned h = unsigned(i) * 2654435761u ^ seed;
    h ^= h >> 13; h *= 0x5bd1e995u; h ^= h >> 15;
    p[i] = __float2half(((h & 0xffff) / 65535.f - 0.5f) * scale);
  }
}

__global__ void MaxDiffKernel(const __half* a, const __half* b, size_t n, float* out) {
  float local = 0.f;
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
    local = fmaxf(local, fabsf(__half2float(a[i]) - __half2float(b[i])));
  for (int o = 16; o; o >>= 1) local = fmaxf(local, __shfl_xor_sync(0xffffffffu, local, o));
  if ((threadIdx.x & 31) == 0) atomicMax(reinterpret_cast<int*>(out), __float_as_int(local));  // >= 0
}

// max |a - b| over n fp16 values (synchronises the device)
inline float MaxDiff(const __half* a, const __half* b, size_t n) {
  float* d;
  CHECK_CUDA(cudaMalloc(&d, sizeof(float)));
  CHECK_CUDA(cudaMemset(d, 0, sizeof(float)));
  MaxDiffKernel<<<1024, 256>>>(a, b, n, d);
  float h = 0;
  CHECK_CUDA(cudaMemcpy(&h, d, sizeof(float), cudaMemcpyDeviceToHost));
  CHECK_CUDA(cudaFree(d));
  return h;
}

// Median microseconds per repetition of `body(i)`, i = 0..calls-1 captured in one CUDA graph (the
// figure a step graph sees: no host launch cost), over `replays` replays after one warm-up; -1
// when `body` returns false (the capture is abandoned).
inline float GraphUs(const std::function<bool(int)>& body, cudaStream_t stream, int calls = 20, int replays = 5) {
  cudaGraph_t graph = nullptr;
  CHECK_CUDA(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  bool ok = true;
  for (int i = 0; i < calls && ok; ++i) ok = body(i);
  const cudaError_t end = cudaStreamEndCapture(stream, &graph);
  if (!ok || end != cudaSuccess) {
    if (graph) cudaGraphDestroy(graph);
    cudaGetLastError();
    return -1.f;
  }
  cudaGraphExec_t exec;
  CHECK_CUDA(cudaGraphInstantiate(&exec, graph, 0));
  cudaEvent_t start, stop;
  CHECK_CUDA(cudaEventCreate(&start));
  CHECK_CUDA(cudaEventCreate(&stop));
  CHECK_CUDA(cudaGraphLaunch(exec, stream));  // warm-up
  std::vector<float> times;
  for (int rep = 0; rep < replays; ++rep) {
    CHECK_CUDA(cudaEventRecord(start, stream));
    CHECK_CUDA(cudaGraphLaunch(exec, stream));
    CHECK_CUDA(cudaEventRecord(stop, stream));
    CHECK_CUDA(cudaEventSynchronize(stop));
    float ms = 0;
    CHECK_CUDA(cudaEventElapsedTime(&ms, start, stop));
    times.push_back(ms * 1000.f / calls);
  }
  CHECK_CUDA(cudaEventDestroy(start));
  CHECK_CUDA(cudaEventDestroy(stop));
  CHECK_CUDA(cudaGraphExecDestroy(exec));
  CHECK_CUDA(cudaGraphDestroy(graph));
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

}  // namespace gemm_bench
