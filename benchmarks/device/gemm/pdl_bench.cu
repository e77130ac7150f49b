// What programmatic dependent launch (PDL) buys at batch 1, where a DiT step is ~440 short kernels:
// a GEMM followed by a row-norm kernel, the pair the step repeats (o-projection -> GatedSkipNorm,
// down-projection -> GatedSkipNorm, ...), 20 pairs captured in one CUDA graph and replayed.
//
//   benchmarks/device/gemm/run.sh pdl_bench [M, default 500]
//
// Variants (the norm kernel is the shape of semvoc's GatedSkipNorm: x + y * gate + bias, then a
// LayerNorm, D = 1024):
//   gemm only         the 20 GEMMs alone (Y = X W, K = N = 1024, weights rotating through copies
//                     larger than L2)
//   norm only         the 20 norm kernels alone
//   pair              GEMM then norm, plain launches
//   pair+pdl          the norm kernel launched with cudaLaunchAttributeProgrammaticStreamSerialization;
//                     it waits (griddepcontrol.wait) before touching the GEMM's output
//   pair+pdl+early    as pair+pdl, and the norm kernel loads its per-channel parameters (gate,
//                     bias, gamma, beta: independent of the GEMM) before the wait
// and for the norm kernel the rows per 128-thread block: 4 (one warp per row) or 1 (a block per row).
#include <cublasLt.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <vector>

#include "gemm_common.cuh"

using namespace gemm_bench;

namespace {

constexpr int kWidth = 1024;

__device__ __forceinline__ float Sum(float v, float* shared, int threads) {
  for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (threads <= 32) return v;
  const int warp = threadIdx.x / 32, warps = threads / 32;
  __syncthreads();
  if (threadIdx.x % 32 == 0) shared[warp] = v;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < warps; ++w) total += shared[w];
  return total;
}

// x + y * gate + bias, LayerNorm(gamma, beta): kThreads threads per row, 8 halves per vector.
// kPdl: wait for the preceding kernel (griddepcontrol.wait) before reading y; kEarly: read the
// per-channel vectors before that wait.
template <int kThreads, bool kPdl, bool kEarly>
__global__ void NormKernel(const __half* __restrict__ x, const __half* __restrict__ y, const __half* __restrict__ gate,
                           const __half* __restrict__ bias, const __half* __restrict__ gamma,
                           const __half* __restrict__ beta, __half* __restrict__ h, __half* __restrict__ sum, int rows) {
  constexpr int kVectors = kWidth / 8 / kThreads;  // per thread
  __shared__ float shared[32];
  const int rows_per_block = blockDim.x / kThreads;
  const int row = blockIdx.x * rows_per_block + threadIdx.x / kThreads;
  const int t = threadIdx.x % kThreads;
  uint4 g[kVectors], c[kVectors], ga[kVectors], be[kVectors];
  auto load_params = [&] {
#pragma unroll
    for (int i = 0; i < kVectors; ++i) {
      const int j = t + kThreads * i;
      g[i] = reinterpret_cast<const uint4*>(gate)[j];
      c[i] = reinterpret_cast<const uint4*>(bias)[j];
      ga[i] = reinterpret_cast<const uint4*>(gamma)[j];
      be[i] = reinterpret_cast<const uint4*>(beta)[j];
    }
  };
  if (kEarly) load_params();
  if (kPdl) asm volatile("griddepcontrol.wait;" ::: "memory");
  if (!kEarly) load_params();
  if (row >= rows) return;
  float s[kVectors][8];
  float total = 0.f;
#pragma unroll
  for (int i = 0; i < kVectors; ++i) {
    const int j = t + kThreads * i;
    uint4 a = reinterpret_cast<const uint4*>(x + size_t(row) * kWidth)[j];
    uint4 b = reinterpret_cast<const uint4*>(y + size_t(row) * kWidth)[j];
    const __half* ah = reinterpret_cast<const __half*>(&a);
    const __half* bh = reinterpret_cast<const __half*>(&b);
    const __half* gh = reinterpret_cast<const __half*>(&g[i]);
    const __half* ch = reinterpret_cast<const __half*>(&c[i]);
    uint4 o;
    __half* oh = reinterpret_cast<__half*>(&o);
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      oh[k] = __float2half(__half2float(ah[k]) + __half2float(bh[k]) * __half2float(gh[k]) + __half2float(ch[k]));
      s[i][k] = __half2float(oh[k]);
      total += s[i][k];
    }
    reinterpret_cast<uint4*>(sum + size_t(row) * kWidth)[j] = o;
  }
  const float mean = Sum(total, shared, kThreads) / kWidth;
  float squares = 0.f;
#pragma unroll
  for (int i = 0; i < kVectors; ++i)
#pragma unroll
    for (int k = 0; k < 8; ++k) squares += (s[i][k] - mean) * (s[i][k] - mean);
  const float rstd = rsqrtf(Sum(squares, shared + 16, kThreads) / kWidth + 1e-6f);
#pragma unroll
  for (int i = 0; i < kVectors; ++i) {
    const int j = t + kThreads * i;
    const __half* gh = reinterpret_cast<const __half*>(&ga[i]);
    const __half* bh = reinterpret_cast<const __half*>(&be[i]);
    uint4 o;
    __half* oh = reinterpret_cast<__half*>(&o);
#pragma unroll
    for (int k = 0; k < 8; ++k)
      oh[k] = __float2half((s[i][k] - mean) * rstd * __half2float(gh[k]) + __half2float(bh[k]));
    reinterpret_cast<uint4*>(h + size_t(row) * kWidth)[j] = o;
  }
}

}  // namespace

int main(int argc, char** argv) {
  const int m = argc > 1 ? std::atoi(argv[1]) : 500;
  PrintDevice();
  std::printf("M = %d rows, D = %d\n", m, kWidth);
  cudaStream_t stream;
  CHECK_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  cublasLtHandle_t lt;
  CHECK_BLAS(cublasLtCreate(&lt));
  void* workspace;
  CHECK_CUDA(cudaMalloc(&workspace, kWorkspace));
  const size_t w_elems = size_t(kWidth) * kWidth, a_elems = size_t(m) * kWidth;
  const int copies = int(kRotateBytes / (w_elems * 2));
  __half *w, *x, *y, *h, *sum, *params;
  CHECK_CUDA(cudaMalloc(&w, w_elems * 2 * copies));
  CHECK_CUDA(cudaMalloc(&x, a_elems * 2));
  CHECK_CUDA(cudaMalloc(&y, a_elems * 2));
  CHECK_CUDA(cudaMalloc(&h, a_elems * 2));
  CHECK_CUDA(cudaMalloc(&sum, a_elems * 2));
  CHECK_CUDA(cudaMalloc(&params, 4 * kWidth * 2));
  RandomFillKernel<<<1024, 256>>>(w, w_elems * copies, 1u, 2.f / std::sqrt(float(kWidth)));
  RandomFillKernel<<<1024, 256>>>(x, a_elems, 2u, 2.f);
  RandomFillKernel<<<1024, 256>>>(h, a_elems, 3u, 2.f);
  RandomFillKernel<<<64, 256>>>(params, 4 * kWidth, 4u, 1.f);
  CHECK_CUDA(cudaDeviceSynchronize());

  LtPlan plan;
  CHECK_BLAS(cublasLtMatmulDescCreate(&plan.op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  CHECK_BLAS(cublasLtMatrixLayoutCreate(&plan.a, CUDA_R_16F, kWidth, kWidth, kWidth));
  CHECK_BLAS(cublasLtMatrixLayoutCreate(&plan.b, CUDA_R_16F, kWidth, m, kWidth));
  CHECK_BLAS(cublasLtMatrixLayoutCreate(&plan.c, CUDA_R_16F, kWidth, m, kWidth));
  const auto heuristics = Heuristics(lt, plan, 1);
  if (heuristics.empty()) return 1;
  const float one = 1.f, zero = 0.f;
  // y = h W: the GEMM reads the previous norm's output, as in the step
  auto gemm = [&](int i) {
    CHECK_BLAS(cublasLtMatmul(lt, plan.op, &one, w + size_t(i % copies) * w_elems, plan.a, h, plan.b, &zero, y, plan.c,
                              y, plan.c, &heuristics[0].algo, workspace, kWorkspace, stream));
  };
  const __half *gate = params, *bias = params + kWidth, *gamma = params + 2 * kWidth, *beta = params + 3 * kWidth;
  auto norm = [&](auto kernel, int rows_per_block, int threads_per_row, bool pdl) {
    cudaLaunchConfig_t config{};
    config.gridDim = dim3((m + rows_per_block - 1) / rows_per_block);
    config.blockDim = dim3(rows_per_block * threads_per_row);
    config.stream = stream;
    cudaLaunchAttribute attribute{};
    attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attribute.val.programmaticStreamSerializationAllowed = 1;
    config.attrs = &attribute;
    config.numAttrs = pdl ? 1 : 0;
    CHECK_CUDA(cudaLaunchKernelEx(&config, kernel, (const __half*)x, (const __half*)y, gate, bias, gamma, beta, h, sum,
                                  m));
  };
  std::printf("%-34s %9s\n", "variant", "us/rep");
  auto row = [&](const char* name, const std::function<void(int)>& body) {
    std::printf("%-34s %9.2f\n", name, GraphUs([&](int i) { body(i); return true; }, stream, 20, 7));
  };
  row("gemm only", gemm);
  row("norm only (warp per row)", [&](int) { norm(NormKernel<32, false, false>, 4, 32, false); });
  row("norm only (block of 128 per row)", [&](int) { norm(NormKernel<128, false, false>, 1, 128, false); });
  row("pair (warp per row)", [&](int i) { gemm(i); norm(NormKernel<32, false, false>, 4, 32, false); });
  row("pair+pdl (warp per row)", [&](int i) { gemm(i); norm(NormKernel<32, true, false>, 4, 32, true); });
  row("pair+pdl+early (warp per row)", [&](int i) { gemm(i); norm(NormKernel<32, true, true>, 4, 32, true); });
  row("pair (block per row)", [&](int i) { gemm(i); norm(NormKernel<128, false, false>, 1, 128, false); });
  row("pair+pdl (block per row)", [&](int i) { gemm(i); norm(NormKernel<128, true, false>, 1, 128, true); });
  row("pair+pdl+early (block per row)", [&](int i) { gemm(i); norm(NormKernel<128, true, true>, 1, 128, true); });
  row("norm, norm+pdl (warp per row)", [&](int) {
    norm(NormKernel<32, false, false>, 4, 32, false);
    norm(NormKernel<32, true, false>, 4, 32, true);
  });
  row("norm, norm (warp per row)", [&](int) {
    norm(NormKernel<32, false, false>, 4, 32, false);
    norm(NormKernel<32, false, false>, 4, 32, false);
  });
  CHECK_CUDA(cudaDeviceSynchronize());
  return 0;
}
