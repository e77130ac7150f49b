// Would the vocoder step's three branches gain from running side by side? The reference vocoder at
// batch 1 (10-s clip) runs, per block and branch, the PReLU split's three GEMMs (semvoc's LtGemm:
// the ReLU GEMM [M, C] x [C, 3C], the linear part [M, C] x [C, C], the down-projection
// [M, 3C] x [3C, C]) with M = 1001, 2001, 4001 frames and C = 768, 512, 384 for the three branches,
// 8 blocks each. The step graph runs them on one stream, one after another, though the branches
// share nothing until their outputs are summed.
//
//   benchmarks/device/gemm/run.sh branch_streams_bench [batch]      (default batch 1)
//
// Times the 72 GEMMs (each cuBLASLt's first heuristic algorithm, what LtGemm runs; fp16, fp32
// accumulation; every block with its own weights, so that they stream from HBM as in a step)
// replayed from a CUDA graph, in two orders:
//   serial     one stream: block by block, branch by branch (the step graph's order)
//   streams    each branch on its own stream (forked from and joined to the first with events),
//              its 8 blocks in order: one graph whose three branches may overlap
// Only the GEMMs: the ConvNeXtMix kernel before each block's GEMMs (about 5 us each at batch 1)
// is left out, so this bounds what side-by-side branches could save.
#include <cublasLt.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>
#include <vector>

#include "gemm_common.cuh"

using namespace gemm_bench;

namespace {

constexpr int kBranches = 3, kBlocks = 8;
constexpr int kChannels[kBranches] = {768, 512, 384};
constexpr int kHops[kBranches] = {240, 120, 60};
constexpr int kSamples = 240000;  // 10 s at 24 kHz

__global__ void FillKernel(__half* p, size_t n, unsigned seed, float amplitude) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    const unsigned h = (unsigned(i) * 2654435761u) ^ (seed * 40503u);
    p[i] = __float2half(amplitude * (float(h % 2001u) / 1000.f - 1.f));
  }
}

// Row-major Y[M, N] = X[M, K] W^T with W [N, K]: cuBLASLt's column-major Y^T = W X^T (A = W, "TN")
struct Gemm {
  LtPlan plan;
  cublasLtMatmulAlgo_t algo{};
  const __half *w = nullptr, *x = nullptr;
  __half* y = nullptr;
};

void MakeGemm(cublasLtHandle_t lt, Gemm& g, int m, int n, int k) {
  CHECK_BLAS(cublasLtMatmulDescCreate(&g.plan.op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const cublasOperation_t transpose = CUBLAS_OP_T;
  CHECK_BLAS(cublasLtMatmulDescSetAttribute(g.plan.op, CUBLASLT_MATMUL_DESC_TRANSA, &transpose, sizeof(transpose)));
  CHECK_BLAS(cublasLtMatrixLayoutCreate(&g.plan.a, CUDA_R_16F, k, n, k));
  CHECK_BLAS(cublasLtMatrixLayoutCreate(&g.plan.b, CUDA_R_16F, k, m, k));
  CHECK_BLAS(cublasLtMatrixLayoutCreate(&g.plan.c, CUDA_R_16F, n, m, n));
  const auto results = Heuristics(lt, g.plan, 1);
  if (results.empty()) {
    std::fprintf(stderr, "no cuBLASLt algorithm for M=%d N=%d K=%d\n", m, n, k);
    std::exit(1);
  }
  g.algo = results[0].algo;
}

}  // namespace

int main(int argc, char** argv) {
  const int batch = argc > 1 ? std::atoi(argv[1]) : 1;
  PrintDevice();
  cublasLtHandle_t lt;
  CHECK_BLAS(cublasLtCreate(&lt));
  cudaStream_t streams[kBranches];
  void* workspace[kBranches];  // one per stream: concurrent GEMMs must not share one
  for (int b = 0; b < kBranches; ++b) {
    CHECK_CUDA(cudaStreamCreateWithFlags(&streams[b], cudaStreamNonBlocking));
    CHECK_CUDA(cudaMalloc(&workspace[b], kWorkspace));
  }
  // per branch: activations x [M, C], h [M, 3C], t [M, C]; per block: its three weights
  std::vector<Gemm> gemms(kBranches * kBlocks * 3);
  double flop = 0;
  for (int b = 0; b < kBranches; ++b) {
    const int c = kChannels[b], m = batch * (1 + kSamples / kHops[b]);
    __half *x, *h, *t;
    CHECK_CUDA(cudaMalloc(&x, size_t(m) * c * 2));
    CHECK_CUDA(cudaMalloc(&h, size_t(m) * 3 * c * 2));
    CHECK_CUDA(cudaMalloc(&t, size_t(m) * c * 2));
    FillKernel<<<1024, 256>>>(x, size_t(m) * c, 1u + b, 1.f);
    for (int layer = 0; layer < kBlocks; ++layer) {
      __half* w;
      const size_t sizes[3] = {size_t(3) * c * c, size_t(c) * c, size_t(3) * c * c};
      CHECK_CUDA(cudaMalloc(&w, (sizes[0] + sizes[1] + sizes[2]) * 2));
      FillKernel<<<1024, 256>>>(w, sizes[0] + sizes[1] + sizes[2], 7u + layer, 2.f / c);
      Gemm* g = &gemms[(b * kBlocks + layer) * 3];
      MakeGemm(lt, g[0], m, 3 * c, c);  // relu part: h = x W1^T
      g[0].w = w, g[0].x = x, g[0].y = h;
      MakeGemm(lt, g[1], m, c, c);  // linear part: t = x M^T
      g[1].w = w + sizes[0], g[1].x = x, g[1].y = t;
      MakeGemm(lt, g[2], m, c, 3 * c);  // down: x' = h R^T (+ t, the residual, in LtGemm's epilogue)
      g[2].w = w + sizes[0] + sizes[1], g[2].x = h, g[2].y = x;
      flop += 2.0 * m * c * c * (3 + 1 + 3);
    }
  }
  CHECK_CUDA(cudaDeviceSynchronize());
  const float one = 1.f, zero = 0.f;
  auto run = [&](const Gemm& g, int stream) {
    CHECK_BLAS(cublasLtMatmul(lt, g.plan.op, &one, g.w, g.plan.a, g.x, g.plan.b, &zero, g.y, g.plan.c, g.y,
                              g.plan.c, &g.algo, workspace[stream], kWorkspace, streams[stream]));
  };

  cudaEvent_t fork, joins[kBranches];
  CHECK_CUDA(cudaEventCreateWithFlags(&fork, cudaEventDisableTiming));
  for (auto& e : joins) CHECK_CUDA(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
  auto capture = [&](bool side_by_side) {
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    CHECK_CUDA(cudaStreamBeginCapture(streams[0], cudaStreamCaptureModeGlobal));
    if (!side_by_side) {
      for (int layer = 0; layer < kBlocks; ++layer)
        for (int b = 0; b < kBranches; ++b)
          for (int i = 0; i < 3; ++i) run(gemms[(b * kBlocks + layer) * 3 + i], 0);
    } else {
      CHECK_CUDA(cudaEventRecord(fork, streams[0]));
      for (int b = 1; b < kBranches; ++b) CHECK_CUDA(cudaStreamWaitEvent(streams[b], fork));
      for (int b = 0; b < kBranches; ++b)
        for (int layer = 0; layer < kBlocks; ++layer)
          for (int i = 0; i < 3; ++i) run(gemms[(b * kBlocks + layer) * 3 + i], b);
      for (int b = 1; b < kBranches; ++b) {
        CHECK_CUDA(cudaEventRecord(joins[b], streams[b]));
        CHECK_CUDA(cudaStreamWaitEvent(streams[0], joins[b]));
      }
    }
    CHECK_CUDA(cudaStreamEndCapture(streams[0], &graph));
    CHECK_CUDA(cudaGraphInstantiate(&exec, graph, 0));
    CHECK_CUDA(cudaGraphDestroy(graph));
    return exec;
  };
  const cudaGraphExec_t serial = capture(false), side_by_side = capture(true);
  const float serial_us = TimeUs([&](int) { CHECK_CUDA(cudaGraphLaunch(serial, streams[0])); }, streams[0]);
  const float streams_us = TimeUs([&](int) { CHECK_CUDA(cudaGraphLaunch(side_by_side, streams[0])); }, streams[0]);
  std::printf("vocoder step GEMMs at batch %d (%d blocks x %d branches x 3, %.1f GFLOP), CUDA-graph replays:\n",
              batch, kBlocks, kBranches, flop / 1e9);
  std::printf("  serial    %8.1f us  (%6.1f TFLOP/s)\n", serial_us, flop / (serial_us * 1e-6) / 1e12);
  std::printf("  streams   %8.1f us  (%6.1f TFLOP/s)  %.2fx the serial time\n", streams_us,
              flop / (streams_us * 1e-6) / 1e12, streams_us / serial_us);
  return 0;
}
