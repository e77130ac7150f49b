// Micro-benchmark of LtGemm (src/semvoc/kernels/cuda/ltgemm_kernel.cuh, the library's own code
// path: the same plan, algorithm choice, shared workspace and cublasLtMatmul call) against what the
// engine ran before it: cublasGemmEx (onnxruntime's MatMul), then a separate pass for the bias
// (a bias Add) or for bias + scaled residual (semvoc's BiasResidual), written plainly here.
// Shapes: the step graphs' GEMMs of benchmarks/results/h200-2026-12-02c-raw/run3_gemm_bench.log
// (DiT at M = 500 / 8000, vocoder branches 0 and 2 at batch 1 and 16), fp16, with
//   bias      out = a w + bias                        (the DiT's GEMM + bias Add pairs)
//   bres      out = a w + bias + residual * scale     (the vocoder's down-projection)
// and, for LtGemm, each epilogue level forced (lt/2: bias in the GEMM, residual after; lt/3: GEMM,
// then both) beside the level the op picks by itself (lt). fp32 at two shapes.
// Each variant's output is checked against a double-precision host reference on 48 rows spread
// over M (every column). Weights rotate through copies larger than L2, as in a step. Times: median
// of 25 timings of 20 back-to-back calls, after warm-up. Needs cuBLAS headers (cublas_v2.h for the
// baseline): run.sh finds them as benchmarks/device/gemm/run.sh does.
//   benchmarks/device/kernel_bench/run.sh ltgemm
// (SEMVOC_LTGEMM_TUNE=0: cuBLASLt's first guess for every plan, as onnxruntime's MatMul runs it.)
// SEMVOC-BENCH-NEEDS: cublas
#include <cublas_v2.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "bench_common.cuh"
#include "ltgemm_kernel.cuh"

using namespace semvoc;

#define CB(call)                                                                                  \
  do {                                                                                            \
    cublasStatus_t st_ = (call);                                                                  \
    if (st_ != CUBLAS_STATUS_SUCCESS) {                                                           \
      std::fprintf(stderr, "cuBLAS status %d at %s:%d: %s\n", int(st_), __FILE__, __LINE__, #call); \
      std::exit(1);                                                                               \
    }                                                                                             \
  } while (0)

namespace {

constexpr double kBandwidth = 4.0e12;  // bytes/s: the bound column (H200 HBM3e, 4.8 TB/s peak)
constexpr int kCalls = 20, kTimings = 25, kWarmup = 5, kCheckRows = 48;
constexpr size_t kRotateBytes = size_t{192} << 20;  // weight copies: over 3x the H200's 60 MiB L2

struct Shape {
  const char* name;
  int m, n, k;
  bool residual;  // bres (the vocoder's down-projection) rather than bias
  bool fp32;
};

using semvoc_bench::FromHost;
using semvoc_bench::ToHost;

// The baseline's second kernel, as the engine ran it: out = y + bias (+ residual * scale), 16-byte
// vectors (the pattern of cuda/bias_residual.cu and of onnxruntime's broadcast Add).
template <typename T, int V>
__global__ void BaselineEpilogue(T* __restrict__ out, const T* __restrict__ bias, const T* __restrict__ residual,
                                 const float* __restrict__ scale, int64_t vectors, int channels) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < vectors; i += int64_t(gridDim.x) * blockDim.x) {
    Vec<T, V> y = reinterpret_cast<const Vec<T, V>*>(out)[i];
    Vec<T, V> r;
    if (residual) r = reinterpret_cast<const Vec<T, V>*>(residual)[i];
    const int c0 = int((i * V) % channels);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      float v = ToFloat(y.v[j]) + ToFloat(bias[c0 + j]);
      if (residual) v += ToFloat(r.v[j]) * scale[c0 + j];
      y.v[j] = FromFloat<T>(v);
    }
    reinterpret_cast<Vec<T, V>*>(out)[i] = y;
  }
}

float TimeUs(const std::function<void(int)>& call, cudaStream_t stream) {
  cudaEvent_t start, stop;
  CK(cudaEventCreate(&start));
  CK(cudaEventCreate(&stop));
  for (int i = 0; i < kWarmup; ++i) call(i);
  std::vector<float> times;
  int index = 0;
  for (int rep = 0; rep < kTimings; ++rep) {
    CK(cudaEventRecord(start, stream));
    for (int i = 0; i < kCalls; ++i) call(index++);
    CK(cudaEventRecord(stop, stream));
    CK(cudaEventSynchronize(stop));
    float ms = 0;
    CK(cudaEventElapsedTime(&ms, start, stop));
    times.push_back(ms * 1000.f / kCalls);
  }
  CK(cudaEventDestroy(start));
  CK(cudaEventDestroy(stop));
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

bool g_failed = false;

template <typename T>
void RunShape(const Shape& s, cublasHandle_t blas, cudaStream_t stream) {
  const size_t w_elems = size_t(s.k) * s.n, a_elems = size_t(s.m) * s.k, y_elems = size_t(s.m) * s.n;
  const int copies = int(std::max<size_t>(1, kRotateBytes / (w_elems * sizeof(T))));
  std::mt19937 rng(s.m * 31 + s.n * 7 + s.k);
  std::uniform_real_distribution<float> uni(-1.f, 1.f);
  auto fill = [&](std::vector<T>& v, size_t count, float scale) {
    v.resize(count);
    for (auto& x : v) x = FromHost<T>(uni(rng) * scale);
  };
  std::vector<T> h_a, h_w, h_bias, h_res;
  fill(h_a, a_elems, 1.f);
  fill(h_w, w_elems, 1.f / std::sqrt(float(s.k)));
  fill(h_bias, s.n, 0.5f);
  fill(h_res, y_elems, 1.f);
  std::vector<float> h_scale(s.n);
  for (auto& x : h_scale) x = 0.5f + 0.5f * (uni(rng) + 1.f);
  T *a, *w, *bias, *res, *out;
  float* scale;
  CK(cudaMalloc(&a, a_elems * sizeof(T)));
  CK(cudaMalloc(&w, w_elems * sizeof(T) * copies));
  CK(cudaMalloc(&bias, s.n * sizeof(T)));
  CK(cudaMalloc(&res, y_elems * sizeof(T)));
  CK(cudaMalloc(&out, y_elems * sizeof(T)));
  CK(cudaMalloc(&scale, s.n * sizeof(float)));
  CK(cudaMemcpy(a, h_a.data(), a_elems * sizeof(T), cudaMemcpyHostToDevice));
  for (int c = 0; c < copies; ++c) CK(cudaMemcpy(w + c * w_elems, h_w.data(), w_elems * sizeof(T), cudaMemcpyHostToDevice));
  CK(cudaMemcpy(bias, h_bias.data(), s.n * sizeof(T), cudaMemcpyHostToDevice));
  CK(cudaMemcpy(res, h_res.data(), y_elems * sizeof(T), cudaMemcpyHostToDevice));
  CK(cudaMemcpy(scale, h_scale.data(), s.n * sizeof(float), cudaMemcpyHostToDevice));
  auto weights = [&](int i) { return w + size_t(i % copies) * w_elems; };

  // double-precision reference on kCheckRows rows spread over M
  std::vector<int> rows;
  for (int r = 0; r < kCheckRows; ++r) rows.push_back(int((int64_t(r) * (s.m - 1)) / (kCheckRows - 1)));
  std::vector<double> ref(rows.size() * s.n);
  double ref_max = 0;
  for (size_t r = 0; r < rows.size(); ++r) {
    for (int j = 0; j < s.n; ++j) {
      double acc = 0;
      for (int q = 0; q < s.k; ++q) acc += double(ToHost(h_a[size_t(rows[r]) * s.k + q])) * ToHost(h_w[size_t(q) * s.n + j]);
      acc += ToHost(h_bias[j]);
      if (s.residual) acc += double(ToHost(h_res[size_t(rows[r]) * s.n + j])) * h_scale[j];
      ref[r * s.n + j] = acc;
      ref_max = std::max(ref_max, std::fabs(acc));
    }
  }
  // fp16: the output is rounded once (LtGemm) or twice (GEMM to fp16, then the epilogue), so up to
  // ~1.5 units in the last place of the largest output; fp32 accumulation differs by ~1e-6 relative.
  // 2 ulp of max |ref| (fp16: 2^-10 relative) leaves room for both and fails on any real error.
  const double tolerance = sizeof(T) == 2 ? 2.0 * std::ldexp(1.0, int(std::floor(std::log2(ref_max))) - 10)
                                          : 1e-5 * ref_max;
  auto check = [&]() {
    std::vector<T> got(s.n);
    double err = 0;
    for (size_t r = 0; r < rows.size(); ++r) {
      CK(cudaMemcpy(got.data(), out + size_t(rows[r]) * s.n, s.n * sizeof(T), cudaMemcpyDeviceToHost));
      for (int j = 0; j < s.n; ++j) err = std::max(err, std::fabs(double(ToHost(got[j])) - ref[r * s.n + j]));
    }
    return err;
  };

  const double bytes = double(sizeof(T)) * (a_elems + w_elems + y_elems * (s.residual ? 2 : 1));
  const char* type = sizeof(T) == 2 ? "fp16" : "fp32";
  auto report = [&](const char* variant, float us, double err, const std::string& note) {
    char shape[96];
    std::snprintf(shape, sizeof(shape), "%s %s %dx%dx%d", s.name, type, s.m, s.n, s.k);
    std::printf("%-34s %-9s %9.2f %8.0f %8.2f %10.2e  %s\n", shape, variant, us, bytes / (us * 1e-6) / 1e9,
                bytes / kBandwidth * 1e6, err, note.c_str());
    if (!(err <= tolerance)) {
      std::printf("FAIL %s %s %s: max abs error %.3e above %.3e\n", s.name, type, variant, err, tolerance);
      g_failed = true;
    }
  };

  // baseline: cublasGemmEx (default tensor-op algorithm, as onnxruntime's MatMul) + the epilogue pass
  const float one = 1.f, zero = 0.f;
  const cudaDataType_t dt = sizeof(T) == 2 ? CUDA_R_16F : CUDA_R_32F;
  constexpr int V = WideVector<T>();
  const int64_t vectors = int64_t(y_elems) / V;
  auto baseline = [&](int i) {
    CB(cublasGemmEx(blas, CUBLAS_OP_N, CUBLAS_OP_N, s.n, s.m, s.k, &one, weights(i), dt, s.n, a, dt, s.k, &zero, out,
                    dt, s.n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT_TENSOR_OP));
    BaselineEpilogue<T, V><<<GridFor(vectors, 256), 256, 0, stream>>>(out, bias, s.residual ? res : nullptr, scale,
                                                                      vectors, s.n);
  };
  baseline(0);
  CK(cudaStreamSynchronize(stream));
  report("baseline", TimeUs(baseline, stream), check(), s.residual ? "cublasGemmEx + BiasResidual pass"
                                                                   : "cublasGemmEx + bias Add pass");

  for (LtFusion first : {LtFusion::kAll, LtFusion::kBias, LtFusion::kNone}) {
    if (first == LtFusion::kBias && !s.residual) continue;  // the same as kAll without a residual
    LtGemmInstance<T> op(first);
    LtGemmArgs args;
    args.a = a;
    args.bias = bias;
    args.residual = s.residual ? res : nullptr;
    args.scale = s.residual ? scale : nullptr;
    args.out = out;
    args.m = s.m;
    args.n = s.n;
    args.k = s.k;
    LtPlan<T>* plan = nullptr;
    auto call = [&](int i) {
      args.w = weights(i);
      plan = &op.Run(args, stream);
    };
    const char* variant = first == LtFusion::kAll ? "lt" : first == LtFusion::kBias ? "lt/2" : "lt/3";
    CK(cudaMemset(out, 0, y_elems * sizeof(T)));
    try {
      call(0);
    } catch (const std::exception& e) {  // e.g. no cuBLASLt algorithm: say so, go on with the rest
      std::printf("FAIL %s %s %s: %s\n", s.name, type, variant, e.what());
      g_failed = true;
      continue;
    }
    CK(cudaStreamSynchronize(stream));
    const double err = check();
    const float us = TimeUs(call, stream);
    char note[160];
    std::snprintf(note, sizeof(note), "level %d: %s; workspace %zu B", int(plan->fusion()), LtFusionName(plan->fusion()),
                  plan->heuristic().workspaceSize);
    report(variant, us, err, note);
  }
  CK(cudaFree(a));
  CK(cudaFree(w));
  CK(cudaFree(bias));
  CK(cudaFree(res));
  CK(cudaFree(out));
  CK(cudaFree(scale));
}

}  // namespace

int main() {
  cudaStream_t stream;
  CK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  cublasHandle_t blas;
  CB(cublasCreate(&blas));
  CB(cublasSetStream(blas, stream));
  void* blas_workspace;
  CK(cudaMalloc(&blas_workspace, kLtWorkspaceBytes));
  CB(cublasSetWorkspace(blas, blas_workspace, kLtWorkspaceBytes));
  try {
    const std::string lt =
        ", cuBLASLt " + std::to_string(LtApi().GetVersion()) + " (dlopen " + kCublasLtLibrary + ")";
    semvoc_bench::PrintDevice(lt.c_str());
  } catch (const std::exception& e) {
    std::printf("FAIL %s\n", e.what());
    return 1;
  }
  std::printf("us per call: median of %d timings of %d back-to-back calls; GB/s and bound: a, w, out (+ residual) "
              "at %.1f TB/s\n", kTimings, kCalls, kBandwidth / 1e12);
  std::printf("%-34s %-9s %9s %8s %8s %10s  %s\n", "shape (M x N x K)", "variant", "us/call", "GB/s", "bound us",
              "max abs err", "how");
  const std::vector<Shape> shapes = {
      {"dit q|k b1", 500, 2048, 1024, false, false},      {"dit v/o b1", 500, 1024, 1024, false, false},
      {"dit geglu-up b1", 500, 8192, 1024, false, false}, {"dit down b1", 500, 1024, 4096, false, false},
      {"voc0 up b1", 1000, 2304, 768, false, false},      {"voc0 down b1", 1000, 768, 2304, true, false},
      {"voc2 up b1", 4000, 1152, 384, false, false},      {"voc2 down b1", 4000, 384, 1152, true, false},
      {"dit q|k b16", 8000, 2048, 1024, false, false},    {"dit geglu-up b16", 8000, 8192, 1024, false, false},
      {"dit down b16", 8000, 1024, 4096, false, false},   {"voc0 up b16", 16000, 2304, 768, false, false},
      {"voc0 down b16", 16000, 768, 2304, true, false},   {"voc2 up b16", 64000, 1152, 384, false, false},
      {"voc2 down b16", 64000, 384, 1152, true, false},
      {"voc0 down b1", 1000, 768, 2304, true, true},      {"dit down b1", 500, 1024, 4096, false, true},
  };
  try {
    for (const Shape& s : shapes) {
      if (s.fp32) RunShape<float>(s, blas, stream);
      else RunShape<__half>(s, blas, stream);
    }
  } catch (const std::exception& e) {
    std::printf("FAIL %s\n", e.what());
    g_failed = true;
  }
  std::printf(g_failed ? "some checks FAILED\n" : "all checks passed\n");
  return g_failed ? 1 : 0;
}
