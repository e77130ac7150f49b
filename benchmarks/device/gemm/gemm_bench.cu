// GEMMs of the reference model's step graphs: what cuBLASLt can do at their shapes against the
// call onnxruntime's CUDA MatMul makes (cublasGemmEx, default algorithm), standalone.
//
//   benchmarks/device/gemm/run.sh            (builds this file against cuBLAS and runs it)
//
// For each shape Y[M, N] = X[M, K] @ W[K, N] (fp16 in and out, fp32 accumulation, row-major as
// in the ONNX graphs) it times:
//   gemmex        cublasGemmEx, CUBLAS_GEMM_DEFAULT_TENSOR_OP (onnxruntime's MatMul)
//   lt_heur1      cublasLtMatmul with cuBLASLt's first heuristic algorithm
//   lt_best       the fastest of cuBLASLt's first 16 heuristic algorithms, timed here (what an
//                 export-time search would keep), with its tile and split-K
//   gemmex+bias   gemmex, then a bias-add kernel (a GEMM followed by onnxruntime's Add)
//   lt_bias       lt_best's search with the BIAS epilogue (the bias inside the GEMM)
//   gemmex+bres   gemmex, then bias + residual in one kernel (semvoc's BiasResidual)
//   lt_bias_res   BIAS epilogue and the residual as C with beta = 1 (BiasResidual gone)
// Weights rotate through copies larger than L2, as in a step where every GEMM's weights come
// from HBM. Each time is the median of 15 timings of 20 back-to-back calls. Every variant's
// output is checked against gemmex (+ the same epilogue) on the device.
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

#include "gemm_common.cuh"

using namespace gemm_bench;

namespace {

struct Shape {
  const char* name;
  int m, n, k;
};

// y[m, n] += bias[n] (and + residual[m, n]): what a separate elementwise kernel costs
__global__ void BiasKernel(__half* y, const __half* bias, const __half* residual, size_t total, int n) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < total; i += size_t(gridDim.x) * blockDim.x) {
    float v = __half2float(y[i]) + __half2float(bias[i % n]);
    if (residual) v += __half2float(residual[i]);
    y[i] = __float2half(v);
  }
}

// Row-major Y[M,N] = X[M,K] W[K,N] is column-major Y^T[N,M] = W^T[N,K] X^T[K,M]: A = W (N x K,
// ld N), B = X (K x M, ld K), C = D = Y (N x M, ld N), no transposes.
void MakePlan(LtPlan& plan, const Shape& s, cublasLtEpilogue_t epilogue, const __half* bias) {
  CHECK_BLAS(cublasLtMatmulDescCreate(&plan.op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  CHECK_BLAS(cublasLtMatmulDescSetAttribute(plan.op, CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue, sizeof(epilogue)));
  if (bias) {
    CHECK_BLAS(cublasLtMatmulDescSetAttribute(plan.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof(bias)));
    cudaDataType_t bias_type = CUDA_R_16F;
    CHECK_BLAS(cublasLtMatmulDescSetAttribute(plan.op, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bias_type,
                                              sizeof(bias_type)));
  }
  CHECK_BLAS(cublasLtMatrixLayoutCreate(&plan.a, CUDA_R_16F, s.n, s.k, s.n));
  CHECK_BLAS(cublasLtMatrixLayoutCreate(&plan.b, CUDA_R_16F, s.k, s.m, s.k));
  CHECK_BLAS(cublasLtMatrixLayoutCreate(&plan.c, CUDA_R_16F, s.n, s.m, s.n));
}

std::string AlgoText(const cublasLtMatmulAlgo_t& algo) {
  int tile = 0, splitk = 0, stages = 0, id = 0;
  size_t written = 0;
  cublasLtMatmulAlgoConfigGetAttribute(&algo, CUBLASLT_ALGO_CONFIG_ID, &id, sizeof(id), &written);
  cublasLtMatmulAlgoConfigGetAttribute(&algo, CUBLASLT_ALGO_CONFIG_TILE_ID, &tile, sizeof(tile), &written);
  cublasLtMatmulAlgoConfigGetAttribute(&algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &splitk, sizeof(splitk), &written);
  cublasLtMatmulAlgoConfigGetAttribute(&algo, CUBLASLT_ALGO_CONFIG_STAGES_ID, &stages, sizeof(stages), &written);
  char text[96];
  std::snprintf(text, sizeof(text), "algo %d tile %d splitK %d stages %d", id, tile, splitk, stages);
  return text;
}

}  // namespace

int main() {
  const cudaDeviceProp prop = PrintDevice();
  // DiT (D 1024, 16 heads, GEGLU 2 x 4096; M = 2 x 250 tokens per clip with guidance) and the
  // vocoder's branches (C 768 / 512 / 384 at L 1000 / 2000 / 4000 frames, hidden 3C)
  const std::vector<Shape> shapes = {
      {"dit q|k b1", 500, 2048, 1024},        {"dit v/o b1", 500, 1024, 1024},
      {"dit geglu-up b1", 500, 8192, 1024},   {"dit down b1", 500, 1024, 4096},
      {"voc0 up b1", 1000, 2304, 768},        {"voc0 down b1", 1000, 768, 2304},
      {"voc2 up b1", 4000, 1152, 384},        {"voc2 down b1", 4000, 384, 1152},
      {"dit q|k b16", 8000, 2048, 1024},      {"dit geglu-up b16", 8000, 8192, 1024},
      {"dit down b16", 8000, 1024, 4096},     {"voc0 up b16", 16000, 2304, 768},
      {"voc0 down b16", 16000, 768, 2304},    {"voc2 up b16", 64000, 1152, 384},
      {"voc2 down b16", 64000, 384, 1152},
  };
  cudaStream_t stream;
  CHECK_CUDA(cudaStreamCreate(&stream));
  const BlasHandles handles(stream);
  cublasHandle_t blas = handles.blas;
  cublasLtHandle_t lt = handles.lt;
  void* workspace = handles.workspace;
  bool failed = false;

  std::printf("%-18s %6s %5s %5s  %-12s %9s %8s  %-9s  %s\n", "shape", "M", "N", "K", "variant", "us/call",
              "TFLOP/s", "max diff", "cuBLASLt algorithm");
  for (const Shape& s : shapes) {
    const size_t w_elems = size_t(s.k) * s.n, x_elems = size_t(s.m) * s.k, y_elems = size_t(s.m) * s.n;
    const int copies = int(std::max<size_t>(1, kRotateBytes / (w_elems * 2)));
    __half *w, *x, *y, *y_ref, *bias, *residual;
    CHECK_CUDA(cudaMalloc(&w, w_elems * 2 * copies));
    CHECK_CUDA(cudaMalloc(&x, x_elems * 2));
    CHECK_CUDA(cudaMalloc(&y, y_elems * 2));
    CHECK_CUDA(cudaMalloc(&y_ref, y_elems * 2));
    CHECK_CUDA(cudaMalloc(&bias, size_t(s.n) * 2));
    CHECK_CUDA(cudaMalloc(&residual, y_elems * 2));
    RandomFillKernel<<<1024, 256>>>(w, w_elems * copies, 1u, 2.f / std::sqrt(float(s.k)));
    RandomFillKernel<<<1024, 256>>>(x, x_elems, 2u, 2.f);
    RandomFillKernel<<<64, 256>>>(bias, s.n, 3u, 1.f);
    RandomFillKernel<<<1024, 256>>>(residual, y_elems, 4u, 1.f);
    CHECK_CUDA(cudaDeviceSynchronize());
    const double flop = 2.0 * s.m * s.n * s.k;
    auto weights = [&](int i) { return w + size_t(i % copies) * w_elems; };
    const float one = 1.f, zero = 0.f;
    auto gemmex = [&](int i) {
      CHECK_BLAS(cublasGemmEx(blas, CUBLAS_OP_N, CUBLAS_OP_N, s.n, s.m, s.k, &one, weights(i), CUDA_R_16F, s.n, x,
                              CUDA_R_16F, s.k, &zero, y, CUDA_R_16F, s.n, CUBLAS_COMPUTE_32F,
                              CUBLAS_GEMM_DEFAULT_TENSOR_OP));
    };
    auto report = [&](const char* variant, float us, float diff, const std::string& algo, float tolerance) {
      std::printf("%-18s %6d %5d %5d  %-12s %9.2f %8.1f  %-9.2e  %s\n", s.name, s.m, s.n, s.k, variant, us,
                  flop / (us * 1e-6) / 1e12, diff, algo.c_str());
      if (!(diff <= tolerance)) {
        std::printf("FAIL %s %s: max diff %.3e above %.3e\n", s.name, variant, diff, tolerance);
        failed = true;
      }
    };
    // fp16 outputs of O(1): both paths accumulate in fp32 and round once, but in different orders
    // (split-K), so they may differ by a few units in the last place
    const float tolerance = 8e-3f;

    // the reference outputs, with copy 0 of the weights
    gemmex(0);
    CHECK_CUDA(cudaMemcpyAsync(y_ref, y, y_elems * 2, cudaMemcpyDeviceToDevice, stream));
    CHECK_CUDA(cudaStreamSynchronize(stream));
    report("gemmex", TimeUs(gemmex, stream), 0.f, "(cublasGemmEx default)", tolerance);

    // plain GEMM through cuBLASLt: first heuristic, then the fastest of 16
    auto run_lt = [&](const LtPlan& plan, const cublasLtMatmulAlgo_t& algo, const __half* c, float beta, int i) {
      return cublasLtMatmul(lt, plan.op, &one, weights(i), plan.a, x, plan.b, &beta, c, plan.c, y, plan.c, &algo,
                            workspace, kWorkspace, stream);
    };
    auto search = [&](const char* heur_name, const char* best_name, cublasLtEpilogue_t epilogue, const __half* b,
                      const __half* c, float beta, const __half* expected) {
      LtPlan plan;
      MakePlan(plan, s, epilogue, b);
      auto results = Heuristics(lt, plan, 16);
      if (results.empty()) {
        std::printf("%-18s %6d %5d %5d  %-12s  no cuBLASLt algorithm\n", s.name, s.m, s.n, s.k, best_name);
        return;
      }
      float best_us = 1e30f;
      int best = -1;
      for (size_t r = 0; r < results.size(); ++r) {
        if (run_lt(plan, results[r].algo, c, beta, 0) != CUBLAS_STATUS_SUCCESS) continue;
        CHECK_CUDA(cudaStreamSynchronize(stream));
        const float us = TimeUs([&](int i) { run_lt(plan, results[r].algo, c, beta, i); }, stream);
        if (r == 0 && heur_name) {
          run_lt(plan, results[0].algo, c, beta, 0);
          CHECK_CUDA(cudaStreamSynchronize(stream));
          report(heur_name, us, MaxDiff(y, expected, y_elems), AlgoText(results[0].algo), tolerance);
        }
        if (us < best_us) {
          best_us = us;
          best = int(r);
        }
      }
      if (best < 0) return;
      run_lt(plan, results[best].algo, c, beta, 0);
      CHECK_CUDA(cudaStreamSynchronize(stream));
      report(best_name, best_us, MaxDiff(y, expected, y_elems),
             AlgoText(results[best].algo) + " (#" + std::to_string(best) + " of " + std::to_string(results.size()) +
                 ")", tolerance);
    };
    search("lt_heur1", "lt_best", CUBLASLT_EPILOGUE_DEFAULT, nullptr, y, 0.f, y_ref);

    // GEMM, then bias (+ residual) in a separate kernel, against the same inside the GEMM
    __half* y_bias_ref;
    __half* y_res_ref;
    CHECK_CUDA(cudaMalloc(&y_bias_ref, y_elems * 2));
    CHECK_CUDA(cudaMalloc(&y_res_ref, y_elems * 2));
    const int elementwise_blocks = int(std::min<size_t>(prop.multiProcessorCount * 8, (y_elems + 255) / 256));
    auto gemmex_bias = [&](int i) {
      gemmex(i);
      BiasKernel<<<elementwise_blocks, 256, 0, stream>>>(y, bias, nullptr, y_elems, s.n);
    };
    auto gemmex_bias_res = [&](int i) {
      gemmex(i);
      BiasKernel<<<elementwise_blocks, 256, 0, stream>>>(y, bias, residual, y_elems, s.n);
    };
    gemmex_bias(0);
    CHECK_CUDA(cudaMemcpyAsync(y_bias_ref, y, y_elems * 2, cudaMemcpyDeviceToDevice, stream));
    gemmex_bias_res(0);
    CHECK_CUDA(cudaMemcpyAsync(y_res_ref, y, y_elems * 2, cudaMemcpyDeviceToDevice, stream));
    CHECK_CUDA(cudaStreamSynchronize(stream));
    report("gemmex+bias", TimeUs(gemmex_bias, stream), 0.f, "(GEMM, then a bias kernel)", tolerance);
    search(nullptr, "lt_bias", CUBLASLT_EPILOGUE_BIAS, bias, y, 0.f, y_bias_ref);
    report("gemmex+bres", TimeUs(gemmex_bias_res, stream), 0.f, "(GEMM, then bias + residual)", tolerance);
    search(nullptr, "lt_bias_res", CUBLASLT_EPILOGUE_BIAS, bias, residual, 1.f, y_res_ref);

    CHECK_CUDA(cudaFree(y_bias_ref));
    CHECK_CUDA(cudaFree(y_res_ref));
    CHECK_CUDA(cudaFree(w));
    CHECK_CUDA(cudaFree(x));
    CHECK_CUDA(cudaFree(y));
    CHECK_CUDA(cudaFree(y_ref));
    CHECK_CUDA(cudaFree(bias));
    CHECK_CUDA(cudaFree(residual));
  }
  std::printf(failed ? "some checks FAILED\n" : "all checks passed\n");
  return failed ? 1 : 0;
}
