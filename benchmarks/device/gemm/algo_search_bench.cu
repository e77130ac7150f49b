// How far a wider cuBLASLt algorithm search goes at the step graphs' batch-1 GEMM shapes, timed as
// the step graphs run them: replayed from a CUDA graph (no host launch cost in the figure).
//
//   benchmarks/device/gemm/run.sh algo_search_bench [max candidates per shape, default 1500] [hot]
//
// With `hot` the weights do not rotate: every call finds them in L2 (what a GEMM whose weights
// were prefetched into L2 would see).
// For each shape Y[M, N] = X[M, K] @ W[K, N] (fp16 in and out, fp32 accumulation, row-major) it
// times, each as 20 back-to-back calls captured in one CUDA graph (weights rotating through copies
// larger than L2; median of 5 replays):
//   gemmex       cublasGemmEx, CUBLAS_GEMM_DEFAULT_TENSOR_OP (onnxruntime's MatMul)
//   heur1        cuBLASLt's first heuristic algorithm (what semvoc's LtGemm runs)
//   heur_best    the fastest of cuBLASLt's first 128 heuristic algorithms
//   by_id_best   the fastest of the heuristic's picks per algorithm id (CUBLASLT_SEARCH_LIMITED_BY_ALGO_ID)
//   split_best   the fastest of every algorithm id's tiles with split-K 2..8 (configured by hand,
//                accepted by cublasLtMatmulAlgoCheck)
// and prints the winner's configuration. Every timed variant's output is checked against gemmex's.
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <set>
#include <string>
#include <tuple>
#include <vector>

#include "gemm_common.cuh"

using namespace gemm_bench;

namespace {

struct Shape {
  const char* name;
  int m, n, k;
};

template <typename V>
V Config(const cublasLtMatmulAlgo_t& algo, cublasLtMatmulAlgoConfigAttributes_t attribute) {
  V value{};
  size_t written = 0;
  cublasLtMatmulAlgoConfigGetAttribute(&algo, attribute, &value, sizeof(value), &written);
  return value;
}

using ConfigKey = std::tuple<int, int, int, int, int, int, int, int, int>;

ConfigKey KeyOf(const cublasLtMatmulAlgo_t& algo) {
  return {Config<int32_t>(algo, CUBLASLT_ALGO_CONFIG_ID), int(Config<uint32_t>(algo, CUBLASLT_ALGO_CONFIG_TILE_ID)),
          int(Config<uint32_t>(algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM)),
          int(Config<uint32_t>(algo, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME)),
          int(Config<uint32_t>(algo, CUBLASLT_ALGO_CONFIG_CTA_SWIZZLING)),
          int(Config<uint32_t>(algo, CUBLASLT_ALGO_CONFIG_CUSTOM_OPTION)),
          int(Config<uint32_t>(algo, CUBLASLT_ALGO_CONFIG_STAGES_ID)),
          int(Config<uint16_t>(algo, CUBLASLT_ALGO_CONFIG_INNER_SHAPE_ID)),
          int(Config<uint16_t>(algo, CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID))};
}

std::string AlgoText(const cublasLtMatmulAlgo_t& algo) {
  const auto [id, tile, splitk, reduction, swizzle, custom, stages, inner, cluster] = KeyOf(algo);
  char text[160];
  std::snprintf(text, sizeof(text), "id %d tile %d splitK %d red %d swz %d custom %d stages %d inner %d cluster %d",
                id, tile, splitk, reduction, swizzle, custom, stages, inner, cluster);
  return text;
}

template <typename V>
std::vector<V> CapList(const cublasLtMatmulAlgo_t& algo, cublasLtMatmulAlgoCapAttributes_t attribute) {
  size_t bytes = 0;
  if (cublasLtMatmulAlgoCapGetAttribute(&algo, attribute, nullptr, 0, &bytes) != CUBLAS_STATUS_SUCCESS) return {};
  std::vector<V> values(bytes / sizeof(V));
  if (!values.empty()) cublasLtMatmulAlgoCapGetAttribute(&algo, attribute, values.data(), bytes, &bytes);
  return values;
}

}  // namespace

int main(int argc, char** argv) {
  const int max_candidates = argc > 1 ? std::atoi(argv[1]) : 1500;
  const bool hot = argc > 2 && std::string(argv[2]) == "hot";
  PrintDevice();
  // DiT (D 1024, GEGLU 2 x 4096; M = 2 x 250 tokens of one clip with guidance): q|k, v|o, q|k|v
  // merged, GEGLU up, down, U-Net skip; the vocoder's branches (C 768 / 512 / 384 at 1001 / 2001 /
  // 4001 frames, hidden 3C): up, down, and the C x C linear part of the split form
  const std::vector<Shape> shapes = {
      {"dit q|k", 500, 2048, 1024},    {"dit v/o", 500, 1024, 1024},     {"dit q|k|v", 500, 3072, 1024},
      {"dit geglu-up", 500, 8192, 1024}, {"dit down", 500, 1024, 4096},  {"dit skip", 500, 1024, 2048},
      {"voc0 up", 1001, 2304, 768},    {"voc0 down", 1001, 768, 2304},   {"voc0 lin", 1001, 768, 768},
      {"voc1 up", 2001, 1536, 512},    {"voc1 down", 2001, 512, 1536},   {"voc1 lin", 2001, 512, 512},
      {"voc2 up", 4001, 1152, 384},    {"voc2 down", 4001, 384, 1152},   {"voc2 lin", 4001, 384, 384},
  };
  cudaStream_t stream;
  CHECK_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  const BlasHandles handles(stream);
  cublasHandle_t blas = handles.blas;
  cublasLtHandle_t lt = handles.lt;
  void* workspace = handles.workspace;
  int ids[512];
  int id_count = 0;
  CHECK_BLAS(cublasLtMatmulAlgoGetIds(lt, CUBLAS_COMPUTE_32F, CUDA_R_32F, CUDA_R_16F, CUDA_R_16F, CUDA_R_16F,
                                      CUDA_R_16F, 512, ids, &id_count));
  std::printf("cuBLASLt algorithm ids for fp16 (fp32 accumulation): %d; weights %s\n", id_count,
              hot ? "hot (one copy, in L2)" : "rotating through copies larger than L2");
  double total_gemmex = 0, total_heur1 = 0, total_best = 0;

  std::printf("%-13s %5s %5s %5s  %-11s %8s %8s %7s  %s\n", "shape", "M", "N", "K", "variant", "us/call", "TFLOP/s",
              "tried", "configuration");
  for (const Shape& s : shapes) {
    const size_t w_elems = size_t(s.k) * s.n, x_elems = size_t(s.m) * s.k, y_elems = size_t(s.m) * s.n;
    const int copies = hot ? 1 : int(std::max<size_t>(1, kRotateBytes / (w_elems * 2)));
    __half *w, *x, *y, *y_ref;
    CHECK_CUDA(cudaMalloc(&w, w_elems * 2 * copies));
    CHECK_CUDA(cudaMalloc(&x, x_elems * 2));
    CHECK_CUDA(cudaMalloc(&y, y_elems * 2));
    CHECK_CUDA(cudaMalloc(&y_ref, y_elems * 2));
    RandomFillKernel<<<1024, 256>>>(w, w_elems * copies, 1u, 2.f / std::sqrt(float(s.k)));
    RandomFillKernel<<<1024, 256>>>(x, x_elems, 2u, 2.f);
    CHECK_CUDA(cudaDeviceSynchronize());
    const double flop = 2.0 * s.m * s.n * s.k;
    auto weights = [&](int i) { return w + size_t(i % copies) * w_elems; };
    const float one = 1.f, zero = 0.f;
    auto gemmex = [&](int i) {
      return cublasGemmEx(blas, CUBLAS_OP_N, CUBLAS_OP_N, s.n, s.m, s.k, &one, weights(i), CUDA_R_16F, s.n, x,
                          CUDA_R_16F, s.k, &zero, y, CUDA_R_16F, s.n, CUBLAS_COMPUTE_32F,
                          CUBLAS_GEMM_DEFAULT_TENSOR_OP) == CUBLAS_STATUS_SUCCESS;
    };
    const float tolerance = 8e-3f;  // fp16 outputs of O(1), fp32 sums in different orders (split-K)
    auto report = [&](const char* variant, float us, int tried, const std::string& what) {
      std::printf("%-13s %5d %5d %5d  %-11s %8.2f %8.1f %7d  %s\n", s.name, s.m, s.n, s.k, variant, us,
                  flop / (us * 1e-6) / 1e12, tried, what.c_str());
    };
    gemmex(0);
    CHECK_CUDA(cudaMemcpyAsync(y_ref, y, y_elems * 2, cudaMemcpyDeviceToDevice, stream));
    CHECK_CUDA(cudaStreamSynchronize(stream));
    const float gemmex_us = GraphUs(gemmex, stream);
    report("gemmex", gemmex_us, 1, "(cublasGemmEx default)");

    LtPlan plan;
    CHECK_BLAS(cublasLtMatmulDescCreate(&plan.op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    CHECK_BLAS(cublasLtMatrixLayoutCreate(&plan.a, CUDA_R_16F, s.n, s.k, s.n));
    CHECK_BLAS(cublasLtMatrixLayoutCreate(&plan.b, CUDA_R_16F, s.k, s.m, s.k));
    CHECK_BLAS(cublasLtMatrixLayoutCreate(&plan.c, CUDA_R_16F, s.n, s.m, s.n));
    auto run = [&](const cublasLtMatmulAlgo_t& algo, int i) {
      return cublasLtMatmul(lt, plan.op, &one, weights(i), plan.a, x, plan.b, &zero, y, plan.c, y, plan.c, &algo,
                            workspace, kWorkspace, stream) == CUBLAS_STATUS_SUCCESS;
    };
    std::set<ConfigKey> seen;
    int tried = 0;
    // Times one candidate (once per configuration); checks its output; returns its time or -1.
    auto time_candidate = [&](const cublasLtMatmulAlgo_t& algo) -> float {
      if (!seen.insert(KeyOf(algo)).second || tried >= max_candidates) return -1.f;
      ++tried;
      if (!run(algo, 0) || cudaStreamSynchronize(stream) != cudaSuccess) {
        cudaGetLastError();
        return -1.f;
      }
      const float diff = MaxDiff(y, y_ref, y_elems);
      if (!(diff <= tolerance)) {
        std::printf("  rejected (max diff %.3e): %s\n", diff, AlgoText(algo).c_str());
        return -1.f;
      }
      return GraphUs([&](int i) { return run(algo, i); }, stream);
    };
    struct Best {
      float us = 1e30f;
      cublasLtMatmulAlgo_t algo{};
      int tried = 0;
      void Offer(float t, const cublasLtMatmulAlgo_t& a) {
        if (t > 0 && t < us) { us = t; algo = a; }
      }
    };
    // heuristic, best fit
    auto results = Heuristics(lt, plan, 128);
    Best heur;
    float heur1 = -1.f;
    for (size_t r = 0; r < results.size(); ++r) {
      const float t = time_candidate(results[r].algo);
      if (r == 0) heur1 = t;
      heur.Offer(t, results[r].algo);
    }
    if (heur1 > 0) report("heur1", heur1, 1, AlgoText(results[0].algo));
    if (heur.us < 1e29f) report("heur_best", heur.us, int(results.size()), AlgoText(heur.algo));
    // the heuristic limited to each algorithm id in turn
    Best by_id;
    const int before_by_id = tried;
    for (int a = 0; a < id_count; ++a) {
      std::vector<cublasLtMatmulHeuristicResult_t> limited(16);
      for (auto& r : limited) {
        if (cublasLtMatmulAlgoInit(lt, CUBLAS_COMPUTE_32F, CUDA_R_32F, CUDA_R_16F, CUDA_R_16F, CUDA_R_16F, CUDA_R_16F,
                                   ids[a], &r.algo) != CUBLAS_STATUS_SUCCESS) limited.clear();
      }
      if (limited.empty()) continue;
      cublasLtMatmulPreference_t pref;
      CHECK_BLAS(cublasLtMatmulPreferenceCreate(&pref));
      size_t ws = kWorkspace;
      uint32_t mode = CUBLASLT_SEARCH_LIMITED_BY_ALGO_ID;
      cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws));
      const bool mode_set = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_SEARCH_MODE, &mode,
                                                                 sizeof(mode)) == CUBLAS_STATUS_SUCCESS;
      int found = 0;
      if (mode_set && cublasLtMatmulAlgoGetHeuristic(lt, plan.op, plan.a, plan.b, plan.c, plan.c, pref, 16,
                                                     limited.data(), &found) == CUBLAS_STATUS_SUCCESS) {
        for (int r = 0; r < found; ++r) by_id.Offer(time_candidate(limited[r].algo), limited[r].algo);
      }
      cublasLtMatmulPreferenceDestroy(pref);
    }
    if (by_id.us < 1e29f) report("by_id_best", by_id.us, tried - before_by_id, AlgoText(by_id.algo));
    // split-K by hand: every id's tiles (default stages) with 2..8 splits
    Best split;
    const int before_split = tried;
    for (int a = 0; a < id_count && tried < max_candidates; ++a) {
      cublasLtMatmulAlgo_t algo;
      if (cublasLtMatmulAlgoInit(lt, CUBLAS_COMPUTE_32F, CUDA_R_32F, CUDA_R_16F, CUDA_R_16F, CUDA_R_16F, CUDA_R_16F,
                                 ids[a], &algo) != CUBLAS_STATUS_SUCCESS) continue;
      int32_t splitk_support = 0;
      size_t written = 0;
      cublasLtMatmulAlgoCapGetAttribute(&algo, CUBLASLT_ALGO_CAP_SPLITK_SUPPORT, &splitk_support,
                                        sizeof(splitk_support), &written);
      uint32_t reduction_mask = 0;
      cublasLtMatmulAlgoCapGetAttribute(&algo, CUBLASLT_ALGO_CAP_REDUCTION_SCHEME_MASK, &reduction_mask,
                                        sizeof(reduction_mask), &written);
      if (!splitk_support) continue;
      std::vector<uint32_t> tiles = CapList<uint32_t>(algo, CUBLASLT_ALGO_CAP_TILE_IDS);
      if (tiles.empty()) tiles.push_back(CUBLASLT_MATMUL_TILE_UNDEFINED);
      for (uint32_t tile : tiles) {
        for (uint32_t splits : {2u, 3u, 4u, 6u, 8u}) {
          for (uint32_t scheme : {uint32_t(CUBLASLT_REDUCTION_SCHEME_INPLACE), uint32_t(CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE),
                                  uint32_t(CUBLASLT_REDUCTION_SCHEME_OUTPUT_TYPE)}) {
            if (!(reduction_mask & scheme)) continue;
            cublasLtMatmulAlgo_t c = algo;
            cublasLtMatmulAlgoConfigSetAttribute(&c, CUBLASLT_ALGO_CONFIG_TILE_ID, &tile, sizeof(tile));
            cublasLtMatmulAlgoConfigSetAttribute(&c, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &splits, sizeof(splits));
            cublasLtMatmulAlgoConfigSetAttribute(&c, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME, &scheme, sizeof(scheme));
            cublasLtMatmulHeuristicResult_t check{};
            if (cublasLtMatmulAlgoCheck(lt, plan.op, plan.a, plan.b, plan.c, plan.c, &c, &check) !=
                    CUBLAS_STATUS_SUCCESS || check.workspaceSize > kWorkspace) continue;
            split.Offer(time_candidate(c), c);
          }
        }
      }
    }
    if (split.us < 1e29f) report("split_best", split.us, tried - before_split, AlgoText(split.algo));
    float best = std::min({gemmex_us, heur.us, by_id.us, split.us});
    std::printf("%-13s best %.2f us: %.2fx of gemmex, %.2fx of heur1\n", s.name, best, best / gemmex_us,
                heur1 > 0 ? best / heur1 : 0.f);
    total_gemmex += gemmex_us;
    total_heur1 += heur1 > 0 ? heur1 : gemmex_us;
    total_best += best;
    CHECK_CUDA(cudaFree(w));
    CHECK_CUDA(cudaFree(x));
    CHECK_CUDA(cudaFree(y));
    CHECK_CUDA(cudaFree(y_ref));
  }
  std::printf("sum over shapes: gemmex %.1f us, heur1 %.1f us, best %.1f us\n", total_gemmex, total_heur1, total_best);
  return 0;
}
