// Would an FP8 (E4M3) form of the DiT's GEMMs pay? The reference DiT block's GEMMs through cuBLASLt
// in fp16 (what the engine runs) and in FP8, standalone, on Hopper or newer.
//
//   benchmarks/device/gemm/run.sh fp8_bench      (builds this file against cuBLAS and runs it)
//
// Row-major Y[M, N] = X[M, K] W^T with W stored [N, K] (K contiguous): cuBLASLt's FP8 GEMMs want
// A transposed ("TN"), which is this layout. Per shape, each the fastest of cuBLASLt's first 16
// heuristic algorithms (timed here):
//   fp16          X, W fp16, Y fp16, fp32 accumulation (the engine's GEMM)
//   fp8           X, W E4M3 with per-tensor scales (A/B scale pointers), Y fp16, fp32 accumulation
//   fp8_fast      the same with CUBLASLT_MATMUL_DESC_FAST_ACCUM (Hopper's faster, coarser accumulation)
//   quant         a pass X fp16 -> E4M3 (x / scale, saturated): what an activation costs to quantize
//                 when no kernel before the GEMM writes it in FP8
// and the FP8 outputs' error against the fp16 GEMM's (max |diff| / max |fp16|) for inputs drawn
// uniform in [-1, 1] (X) and [-2/sqrt(K), 2/sqrt(K)] (W), each quantized with its amax / 448.
// Weights rotate through copies larger than L2, as in a step. Each time is the median of 15 timings
// of 20 back-to-back calls. Then, per DiT block at batch 1 and 16, the seven GEMMs summed (q|k, v,
// out, cross q, cross out, GEGLU up, down) and the six activations an FP8 block would quantize.
// The A and B scale pointers each sit on their own 256-byte line: cuBLASLt 13.1 on an H200 refused
// every FP8 algorithm (CUBLAS_STATUS_NOT_SUPPORTED, nothing in its log) while the weights' scale was
// the second float of a two-float buffer. Where cuBLASLt returns no FP8 algorithm,
// CUBLASLT_LOG_MASK=63 makes it log what it can.
#include <cublasLt.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
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

constexpr float kE4M3Max = 448.f;

struct Shape {
  const char* name;
  int m, n, k;
  int per_block;  // how many of these GEMMs one DiT block runs
  int quants;     // how many of their inputs an FP8 block quantizes (v reads q|k's input)
};

__device__ float Uniform(size_t i, unsigned seed) {
  unsigned h = unsigned(i) * 2654435761u ^ seed;
  h ^= h >> 13; h *= 0x5bd1e995u; h ^= h >> 15;
  return (h & 0xffff) / 32767.5f - 1.f;  // [-1, 1]
}

__global__ void FillKernel(__half* p, size_t n, unsigned seed, float scale) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
    p[i] = __float2half(Uniform(i, seed) * scale);
}

// q = saturate(x / scale) in E4M3, 8 elements per thread (n a multiple of 8)
__global__ void QuantizeKernel(const __half* __restrict__ x, __nv_fp8_e4m3* __restrict__ q, size_t n,
                               const float* __restrict__ scale) {
  const float inv = 1.f / *scale;
  for (size_t v = blockIdx.x * size_t(blockDim.x) + threadIdx.x; v < n / 8; v += size_t(gridDim.x) * blockDim.x) {
    const uint4 in = reinterpret_cast<const uint4*>(x)[v];
    const __half* h = reinterpret_cast<const __half*>(&in);
    __align__(8) __nv_fp8_e4m3 out[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) out[j] = __nv_fp8_e4m3(fminf(fmaxf(__half2float(h[j]) * inv, -kE4M3Max), kE4M3Max));
    reinterpret_cast<uint2*>(q)[v] = *reinterpret_cast<const uint2*>(out);
  }
}

__global__ void MaxAbsKernel(const __half* a, const __half* b, size_t n, float* out) {  // out[0] max|a-b|, out[1] max|b|
  float diff = 0.f, ref = 0.f;
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    diff = fmaxf(diff, fabsf(__half2float(a[i]) - __half2float(b[i])));
    ref = fmaxf(ref, fabsf(__half2float(b[i])));
  }
  for (int o = 16; o; o >>= 1) {
    diff = fmaxf(diff, __shfl_xor_sync(0xffffffffu, diff, o));
    ref = fmaxf(ref, __shfl_xor_sync(0xffffffffu, ref, o));
  }
  if ((threadIdx.x & 31) == 0) {
    atomicMax(reinterpret_cast<int*>(out), __float_as_int(diff));  // both >= 0
    atomicMax(reinterpret_cast<int*>(out + 1), __float_as_int(ref));
  }
}

float RelativeError(const __half* y, const __half* reference, size_t n) {
  float* d;
  CHECK_CUDA(cudaMalloc(&d, 2 * sizeof(float)));
  CHECK_CUDA(cudaMemset(d, 0, 2 * sizeof(float)));
  MaxAbsKernel<<<1024, 256>>>(y, reference, n, d);
  float h[2] = {0, 0};
  CHECK_CUDA(cudaMemcpy(h, d, sizeof(h), cudaMemcpyDeviceToHost));
  CHECK_CUDA(cudaFree(d));
  return h[1] > 0 ? h[0] / h[1] : h[0];
}

// Column-major Y^T[N, M] = W[N, K] X^T[K, M]: A = W stored K x N (ld K) transposed, B = X stored
// K x M (ld K), C = D = Y stored N x M (ld N).
void MakePlan(LtPlan& plan, const Shape& s, cudaDataType_t in_type, const float* a_scale, const float* b_scale,
              bool fast_accum, cudaDataType_t out_type = CUDA_R_16F) {
  CHECK_BLAS(cublasLtMatmulDescCreate(&plan.op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const cublasOperation_t transpose = CUBLAS_OP_T, none = CUBLAS_OP_N;
  CHECK_BLAS(cublasLtMatmulDescSetAttribute(plan.op, CUBLASLT_MATMUL_DESC_TRANSA, &transpose, sizeof(transpose)));
  CHECK_BLAS(cublasLtMatmulDescSetAttribute(plan.op, CUBLASLT_MATMUL_DESC_TRANSB, &none, sizeof(none)));
  if (a_scale) {
    CHECK_BLAS(cublasLtMatmulDescSetAttribute(plan.op, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &a_scale,
                                              sizeof(a_scale)));
    CHECK_BLAS(cublasLtMatmulDescSetAttribute(plan.op, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &b_scale,
                                              sizeof(b_scale)));
    const int8_t fast = fast_accum ? 1 : 0;
    CHECK_BLAS(cublasLtMatmulDescSetAttribute(plan.op, CUBLASLT_MATMUL_DESC_FAST_ACCUM, &fast, sizeof(fast)));
  }
  CHECK_BLAS(cublasLtMatrixLayoutCreate(&plan.a, in_type, s.k, s.n, s.k));
  CHECK_BLAS(cublasLtMatrixLayoutCreate(&plan.b, in_type, s.k, s.m, s.k));
  CHECK_BLAS(cublasLtMatrixLayoutCreate(&plan.c, out_type, s.n, s.m, s.n));
}

struct Timed {
  float us = -1.f;
  float error = 0.f;
};

}  // namespace

int main() {
  const cudaDeviceProp prop = PrintDevice();
  if (prop.major < 9) {
    std::printf("FP8 GEMMs need compute capability 9.0 or newer\n");
    return 2;
  }
  // The reference DiT (D 1024, GEGLU 2 x 4096); M = 2 x 250 tokens per clip with guidance
  std::vector<Shape> shapes;
  for (int m : {500, 8000}) {
    shapes.push_back({"q|k", m, 2048, 1024, 1, 1});
    shapes.push_back({"v/out/cross", m, 1024, 1024, 4, 3});
    shapes.push_back({"geglu-up", m, 8192, 1024, 1, 1});
    shapes.push_back({"down", m, 1024, 4096, 1, 1});
  }
  cudaStream_t stream;
  CHECK_CUDA(cudaStreamCreate(&stream));
  cublasLtHandle_t lt;
  CHECK_BLAS(cublasLtCreate(&lt));
  void* workspace;
  CHECK_CUDA(cudaMalloc(&workspace, kWorkspace));
  float* scales;  // the x scale, and 256 bytes on the w scale (each scale pointer on its own 256-byte line)
  CHECK_CUDA(cudaMalloc(&scales, 128 * sizeof(float)));
  float* const w_scale = scales + 64;
  bool failed = false;

  std::printf("%-12s %5s %5s %5s  %-9s %9s %8s  %-10s\n", "gemm", "M", "N", "K", "variant", "us/call", "TFLOP/s",
              "rel. error");
  struct BlockSum { double fp16 = 0, fp8 = 0, fp8_fast = 0, quant = 0; };
  BlockSum block[2];
  for (const Shape& s : shapes) {
    const size_t w_elems = size_t(s.k) * s.n, x_elems = size_t(s.m) * s.k, y_elems = size_t(s.m) * s.n;
    const int copies = int(std::max<size_t>(1, kRotateBytes / (w_elems * 2)));
    __half *w, *x, *y, *y_ref;
    __nv_fp8_e4m3 *w8, *x8;
    CHECK_CUDA(cudaMalloc(&w, w_elems * 2 * copies));
    CHECK_CUDA(cudaMalloc(&w8, w_elems * copies));
    CHECK_CUDA(cudaMalloc(&x, x_elems * 2));
    CHECK_CUDA(cudaMalloc(&x8, x_elems));
    CHECK_CUDA(cudaMalloc(&y, y_elems * 2));
    CHECK_CUDA(cudaMalloc(&y_ref, y_elems * 2));
    const float w_amax = 2.f / std::sqrt(float(s.k)), x_amax = 1.f;
    FillKernel<<<1024, 256>>>(w, w_elems * copies, 1u, w_amax);
    FillKernel<<<1024, 256>>>(x, x_elems, 2u, x_amax);
    const float host_scales[2] = {x_amax / kE4M3Max, w_amax / kE4M3Max};
    CHECK_CUDA(cudaMemcpy(scales, host_scales, sizeof(float), cudaMemcpyHostToDevice));
    CHECK_CUDA(cudaMemcpy(w_scale, host_scales + 1, sizeof(float), cudaMemcpyHostToDevice));
    QuantizeKernel<<<1024, 256>>>(w, w8, w_elems * copies, w_scale);
    QuantizeKernel<<<1024, 256>>>(x, x8, x_elems, scales);
    CHECK_CUDA(cudaDeviceSynchronize());
    const double flop = 2.0 * s.m * s.n * s.k;
    const float one = 1.f, zero = 0.f;

    auto best_of = [&](LtPlan& plan, const void* a, size_t a_bytes, const void* b, bool check = true) {
      Timed best;
      const auto results = Heuristics(lt, plan, 16);
      int refused = 0;
      cublasStatus_t first_refusal = CUBLAS_STATUS_SUCCESS;
      for (const auto& result : results) {
        auto run = [&](int i) {
          return cublasLtMatmul(lt, plan.op, &one, static_cast<const char*>(a) + size_t(i % copies) * a_bytes,
                                plan.a, b, plan.b, &zero, y, plan.c, y, plan.c, &result.algo, workspace, kWorkspace,
                                stream);
        };
        const cublasStatus_t status = run(0);
        if (status != CUBLAS_STATUS_SUCCESS) {
          if (refused++ == 0) first_refusal = status;
          continue;
        }
        CHECK_CUDA(cudaStreamSynchronize(stream));
        const float us = TimeUs([&](int i) { run(i); }, stream);
        if (best.us < 0 || us < best.us) {
          run(0);
          CHECK_CUDA(cudaStreamSynchronize(stream));
          best.us = us;
          best.error = check ? RelativeError(y, y_ref, y_elems) : 0.f;
        }
      }
      if (best.us < 0)  // say whether the heuristic offered nothing or cublasLtMatmul refused what it offered
        std::printf("    (%zu heuristic algorithm(s), %d refused by cublasLtMatmul, first status %d)\n",
                    results.size(), refused, int(first_refusal));
      return best;
    };
    auto report = [&](const char* variant, const Timed& t, bool gemm) {
      if (t.us < 0) {
        std::printf("%-12s %5d %5d %5d  %-9s  no cuBLASLt algorithm\n", s.name, s.m, s.n, s.k, variant);
        return;
      }
      std::printf("%-12s %5d %5d %5d  %-9s %9.2f %8.1f  %-10.2e\n", s.name, s.m, s.n, s.k, variant, t.us,
                  gemm ? flop / (t.us * 1e-6) / 1e12 : 0.0, t.error);
    };

    LtPlan fp16;
    MakePlan(fp16, s, CUDA_R_16F, nullptr, nullptr, false);
    {  // the reference output: fp16, first heuristic algorithm, copy 0 of the weights
      auto results = Heuristics(lt, fp16, 1);
      if (results.empty()) {
        std::printf("%s: no fp16 algorithm\n", s.name);
        return 1;
      }
      CHECK_BLAS(cublasLtMatmul(lt, fp16.op, &one, w, fp16.a, x, fp16.b, &zero, y_ref, fp16.c, y_ref, fp16.c,
                                &results[0].algo, workspace, kWorkspace, stream));
      CHECK_CUDA(cudaStreamSynchronize(stream));
    }
    const Timed t16 = best_of(fp16, w, w_elems * 2, x);
    report("fp16", t16, true);
    LtPlan fp8, fp8_fast;
    // A = the weights (their scale: w_scale), B = the activations (scales[0])
    MakePlan(fp8, s, CUDA_R_8F_E4M3, w_scale, scales, false);
    MakePlan(fp8_fast, s, CUDA_R_8F_E4M3, w_scale, scales, true);
    const Timed t8 = best_of(fp8, w8, w_elems, x8);
    report("fp8", t8, true);
    const Timed t8f = best_of(fp8_fast, w8, w_elems, x8);
    report("fp8_fast", t8f, true);
    // bf16 output (C and D), the combination cuBLAS's FP8 sample uses: not what an fp16 engine
    // needs, timed to tell an unsupported fp16 output apart from no FP8 GEMM at all (no error check)
    LtPlan fp8_bf16;
    MakePlan(fp8_bf16, s, CUDA_R_8F_E4M3, w_scale, scales, false, CUDA_R_16BF);
    report("fp8_bf16", best_of(fp8_bf16, w8, w_elems, x8, false), true);
    const int quant_blocks = int(std::min<size_t>(prop.multiProcessorCount * 8, (x_elems / 8 + 255) / 256));
    Timed quant;
    quant.us = TimeUs([&](int) { QuantizeKernel<<<quant_blocks, 256, 0, stream>>>(x, x8, x_elems, scales); }, stream);
    report("quant", quant, false);
    if (t16.us < 0 || t8.us < 0 || t8.error > 0.1f || t8f.error > 0.1f) failed = true;

    BlockSum& sum = block[s.m == 500 ? 0 : 1];
    sum.fp16 += s.per_block * t16.us;
    sum.fp8 += s.per_block * t8.us;
    sum.fp8_fast += s.per_block * (t8f.us < 0 ? t8.us : t8f.us);
    sum.quant += s.quants * quant.us;
    CHECK_CUDA(cudaFree(w));
    CHECK_CUDA(cudaFree(w8));
    CHECK_CUDA(cudaFree(x));
    CHECK_CUDA(cudaFree(x8));
    CHECK_CUDA(cudaFree(y));
    CHECK_CUDA(cudaFree(y_ref));
  }
  std::printf("\nper DiT block (7 GEMMs; an FP8 block also quantizes 6 activations, unless the kernels "
              "before its GEMMs write FP8), us:\n");
  for (int b = 0; b < 2; ++b)
    std::printf("  M %5d: fp16 %8.1f   fp8 %8.1f   fp8_fast %8.1f   quant passes %7.1f   "
                "(fp8 + quant) / fp16 %.2f\n", b == 0 ? 500 : 8000, block[b].fp16, block[b].fp8, block[b].fp8_fast,
                block[b].quant, (block[b].fp8 + block[b].quant) / block[b].fp16);
  std::printf(failed ? "some checks FAILED (no algorithm, or an FP8 error above 0.1)\n" : "all checks passed\n");
  return failed ? 1 : 0;
}
