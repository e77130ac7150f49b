// Micro-benchmark of QkvAttention (src/semvoc/kernels/cuda/qkv_attention_kernel.cuh, the library's own
// kernel source) at the reference DiT's shapes: qkv [R, 250, 3*16*64] fp16 (the q|k|v GEMM's output),
// per-head affine [32, 64], RoPE tables [250, 32]; R = 2 (batch 1 with CFG), 32 (batch 16), 4 and 8;
// then R = 2 at shorter L (37 to 256: one to four key tiles, mostly for the checks).
// Variants:
//   library    what qkv_attention.cu launches: split keys where its blocks fit one per SM (R = 2),
//              4w-resident where the grid is larger, 8-warp blocks in the ring of two tile buffers
//              where it is large (R = 32); with SEMVOC_QKV_SPLIT_KEYS=0, 4w-resident for split keys
//   8w-split   split keys: blocks of 8 warps for 64 queries, every key tile resident, each query group
//              run by two warps over half the tiles each, then merged (L <= 256), at every size
//   8w-split-min2  the same built for 2 resident blocks per SM (as its shared memory allows): ptxas
//              caps it at 128 registers instead of 134, spilling a little (CUDA 13.0: 12 bytes); one
//              block per SM suffices for batch 1, two fit twice the blocks where the grid is larger
//   4w-resident  blocks of 4 warps, every key tile resident (L <= 256), at every size
//   4-warp     blocks of 4 warps (64 queries) in the ring of two tile buffers at every size
//   8-warp     blocks of 8 warps (128 queries) at every size
//   4w-min4, 8w-min2  the ring's kernel body (4-warp, 8-warp) built for 4 (2) resident blocks per SM:
//              ptxas caps its registers at 128 (the library's build takes 168 with 4 warps, 3 blocks
//              per SM, and 158 with 8, one block per SM), spilling a little (CUDA 13.0: about 100 and
//              40 bytes)
//   norm-pass  HeadNormRopeQkv's kernel alone (head_norm_kernel.cuh): the pass the separate form ran
//              before onnxruntime's attention (it writes q, k and v); no attention, not checked
// The attention variants are checked against a double-precision host reference on the rows listed
// below (q and k normed and rotated in double, then rounded to fp16 as the kernel holds them; FAIL
// above the tolerance). Times: CUDA-graph replays of 20 back-to-back calls, median of 25 replays,
// inputs rotated through >= 256 MB of copies (from HBM, not L2).
//   benchmarks/device/kernel_bench/run.sh qkv_attention
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "bench_common.cuh"
#include "head_norm_kernel.cuh"
#include "qkv_attention_kernel.cuh"

using namespace semvoc;

namespace {

constexpr int kCallsPerGraph = 20, kReplays = 25, kWarmup = 3;
constexpr int kHeads = 16, kHd = 64, kWidth = kHeads * kHd, kInWidth = 3 * kWidth;
constexpr float kEps = 1e-6f;
int g_failures = 0;

// The library's kernel body under a register limit: at least kMinBlocks resident blocks per SM.
template <int kWarps, int kMinBlocks, int kStages = 2, bool kSplitKeys = false>
__global__ void __launch_bounds__(kWarps * 32, kMinBlocks) QkvAttentionMinBlocks(const __half* __restrict__ qkv,
                                                                                  __half* __restrict__ out,
                                                                                  int length, int heads,
                                                                                  NormRopeTables tables,
                                                                                  float scale_log2) {
  QkvAttentionBlock<kWarps, kStages, kSplitKeys>(qkv, out, length, heads, tables, scale_log2);
}

template <int kWarps, int kMinBlocks, int kStages = 2, bool kSplitKeys = false>
void LaunchMinBlocks(const __half* qkv, __half* out, int rows, int length, const NormRopeTables& tables,
                     cudaStream_t stream) {
  constexpr int kBytes = QkvSharedBytes<kWarps, kStages, kSplitKeys>();
  constexpr int kQueries = 16 * (kSplitKeys ? kWarps / 2 : kWarps);
  static const bool opted = [] {
    CK(cudaFuncSetAttribute(QkvAttentionMinBlocks<kWarps, kMinBlocks, kStages, kSplitKeys>,
                            cudaFuncAttributeMaxDynamicSharedMemorySize, kBytes));
    return true;
  }();
  (void)opted;
  const dim3 grid((length + kQueries - 1) / kQueries, kHeads, rows);
  const float scale_log2 = 1.4426950408889634f / std::sqrt(static_cast<float>(kHd));
  QkvAttentionMinBlocks<kWarps, kMinBlocks, kStages, kSplitKeys>
      <<<grid, kWarps * 32, kBytes, stream>>>(qkv, out, length, kHeads, tables, scale_log2);
}

struct Set {  // one copy of the per-call tensors
  __half *qkv, *out, *q, *k, *v;
};
using Launch = std::function<void(const Set&, cudaStream_t)>;

double Half(const __half& x) { return __half2float(x); }

// q or k head `head` (of 2H) of one row, normed (the head's affine) and rotated at `position`,
// rounded to fp16 as the kernel holds it
void NormRope(const __half* x, const std::vector<__half>& gamma, const std::vector<__half>& beta,
              const std::vector<__half>& cos, const std::vector<__half>& sin, int head, int position, double* y) {
  double mean = 0, var = 0, n[kHd];
  for (int d = 0; d < kHd; ++d) mean += Half(x[d]);
  mean /= kHd;
  for (int d = 0; d < kHd; ++d) var += (Half(x[d]) - mean) * (Half(x[d]) - mean);
  const double rstd = 1.0 / std::sqrt(var / kHd + kEps);
  for (int d = 0; d < kHd; ++d) n[d] = (Half(x[d]) - mean) * rstd * Half(gamma[head * kHd + d]) + Half(beta[head * kHd + d]);
  for (int j = 0; j < kHd / 2; ++j) {
    const double c = Half(cos[position * kHd / 2 + j]), s = Half(sin[position * kHd / 2 + j]);
    y[j] = Half(__float2half_rn(static_cast<float>(n[j] * c - n[j + kHd / 2] * s)));
    y[j + kHd / 2] = Half(__float2half_rn(static_cast<float>(n[j + kHd / 2] * c + n[j] * s)));
  }
}

void RunShape(int rows, int length, const std::vector<int>& checked_rows) {
  const int64_t n_in = int64_t(rows) * length * kInWidth, n_out = int64_t(rows) * length * kWidth;
  std::mt19937 rng(4321 + rows);
  std::normal_distribution<float> normal(0.f, 1.f);
  std::vector<__half> hqkv(n_in), gamma(2 * kHeads * kHd), beta(gamma.size()), cos(length * kHd / 2),
      sin(cos.size());
  for (int64_t i = 0; i < n_in; i += kHd) {  // per head: an offset (the norm's mean matters) and a spread
    const float offset = normal(rng), spread = 1.f + std::fabs(normal(rng));
    for (int d = 0; d < kHd; ++d) hqkv[i + d] = __float2half_rn(offset + spread * normal(rng));
  }
  for (size_t i = 0; i < gamma.size(); ++i) {
    gamma[i] = __float2half_rn(1.f + 0.3f * normal(rng));
    beta[i] = __float2half_rn(0.2f * normal(rng));
  }
  for (int l = 0; l < length; ++l)
    for (int j = 0; j < kHd / 2; ++j) {
      const double angle = l * std::pow(10000.0, -2.0 * j / kHd);
      cos[l * kHd / 2 + j] = __float2half_rn(static_cast<float>(std::cos(angle)));
      sin[l * kHd / 2 + j] = __float2half_rn(static_cast<float>(std::sin(angle)));
    }

  // double reference on the checked rows
  std::vector<double> ref(n_out, NAN);
  double max_v = 0;
  for (int64_t i = 0; i < n_in; ++i)
    if (i % kInWidth >= 2 * kWidth) max_v = std::max(max_v, std::fabs(Half(hqkv[i])));
  std::vector<double> qn(size_t(length) * kHd), kn(qn.size()), w(length);
  for (int r : checked_rows)
    for (int h = 0; h < kHeads; ++h) {
      for (int l = 0; l < length; ++l) {
        const __half* x = &hqkv[(int64_t(r) * length + l) * kInWidth];
        NormRope(x + h * kHd, gamma, beta, cos, sin, h, l, &qn[l * kHd]);
        NormRope(x + (kHeads + h) * kHd, gamma, beta, cos, sin, kHeads + h, l, &kn[l * kHd]);
      }
      for (int l = 0; l < length; ++l) {
        double m = -INFINITY, sum = 0;
        for (int j = 0; j < length; ++j) {
          double dot = 0;
          for (int d = 0; d < kHd; ++d) dot += qn[l * kHd + d] * kn[j * kHd + d];
          m = std::max(m, w[j] = dot / std::sqrt(double(kHd)));
        }
        for (int j = 0; j < length; ++j) sum += (w[j] = std::exp(w[j] - m));
        for (int d = 0; d < kHd; ++d) {
          double acc = 0;
          for (int j = 0; j < length; ++j)
            acc += w[j] * Half(hqkv[(int64_t(r) * length + j) * kInWidth + 2 * kWidth + h * kHd + d]);
          ref[(int64_t(r) * length + l) * kWidth + h * kHd + d] = acc / sum;
        }
      }
    }

  __half *dgamma, *dbeta, *dcos, *dsin;
  CK(cudaMalloc(&dgamma, gamma.size() * 2));
  CK(cudaMalloc(&dbeta, beta.size() * 2));
  CK(cudaMalloc(&dcos, cos.size() * 2));
  CK(cudaMalloc(&dsin, sin.size() * 2));
  CK(cudaMemcpy(dgamma, gamma.data(), gamma.size() * 2, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(dbeta, beta.data(), beta.size() * 2, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(dcos, cos.data(), cos.size() * 2, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(dsin, sin.data(), sin.size() * 2, cudaMemcpyHostToDevice));
  const double set_bytes = double(n_in + 4 * n_out) * 2;
  const int sets = static_cast<int>(std::min(64.0, std::max(2.0, std::ceil(256e6 / set_bytes))));
  std::vector<Set> buf(sets);
  for (auto& b : buf) {
    CK(cudaMalloc(&b.qkv, n_in * 2));
    for (__half** p : {&b.out, &b.q, &b.k, &b.v}) CK(cudaMalloc(p, n_out * 2));
    CK(cudaMemcpy(b.qkv, hqkv.data(), n_in * 2, cudaMemcpyHostToDevice));
  }
  NormRopeTables tables;
  tables.gamma = dgamma;
  tables.beta = dbeta;
  tables.affine_stride = kHd;
  tables.eps = kEps;
  tables.cos = dcos;
  tables.sin = dsin;

  const std::vector<std::pair<std::string, Launch>> variants = {
      {"library", [=](const Set& s, cudaStream_t st) { LaunchQkvAttention(s.qkv, s.out, rows, length, kHeads, tables, st); }},
      {"8w-split", [=](const Set& s, cudaStream_t st) {
         LaunchQkvAttentionBlocks<8, kQkvResidentTiles, true>(s.qkv, s.out, rows, length, kHeads, tables, st);
       }},
      {"4w-resident", [=](const Set& s, cudaStream_t st) {
         LaunchQkvAttentionBlocks<4, kQkvResidentTiles>(s.qkv, s.out, rows, length, kHeads, tables, st);
       }},
      {"4-warp", [=](const Set& s, cudaStream_t st) {
         LaunchQkvAttentionBlocks<4>(s.qkv, s.out, rows, length, kHeads, tables, st);
       }},
      {"8-warp", [=](const Set& s, cudaStream_t st) {
         LaunchQkvAttentionBlocks<8>(s.qkv, s.out, rows, length, kHeads, tables, st);
       }},
      {"8w-split-min2", [=](const Set& s, cudaStream_t st) {
         LaunchMinBlocks<8, 2, kQkvResidentTiles, true>(s.qkv, s.out, rows, length, tables, st);
       }},
      {"4w-min4", [=](const Set& s, cudaStream_t st) {
         LaunchMinBlocks<4, 4>(s.qkv, s.out, rows, length, tables, st);
       }},
      {"8w-min2", [=](const Set& s, cudaStream_t st) {
         LaunchMinBlocks<8, 2>(s.qkv, s.out, rows, length, tables, st);
       }},
      {"norm-pass", [=](const Set& s, cudaStream_t st) {
         LaunchHeadNorm<__half, true>(kHd, s.qkv, dgamma, dbeta, dcos, dsin, s.q, s.k, int64_t(rows) * length,
                                      2 * kHeads, length, kHd, kEps, st, kHeads, s.v);
       }},
  };

  cudaStream_t stream;
  CK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  std::vector<__half> got(n_out);
  char shape[64];
  std::snprintf(shape, sizeof shape, "R=%d L=%d H=%d hd=%d", rows, length, kHeads, kHd);
  for (const auto& [name, launch] : variants) {
    const bool checked = name != "norm-pass";
    CK(cudaMemset(buf[0].out, 0xff, n_out * 2));  // NaN everywhere: an unwritten element fails
    launch(buf[0], stream);
    CK(cudaGetLastError());
    CK(cudaStreamSynchronize(stream));
    semvoc_bench::Fp16Errors errors;
    if (checked) {
      CK(cudaMemcpy(got.data(), buf[0].out, n_out * 2, cudaMemcpyDeviceToHost));
      // Tolerance: P rounded to fp16 before PV (<= 2^-11 max|v|), the output rounded once (1 ulp), and
      // a q or k element whose fp32 norm rounds to the other fp16 neighbour than the double one: the
      // logits move by about 2^-11 of |q||k| / 8, so twice the P term
      for (int r : checked_rows)
        for (int64_t i = int64_t(r) * length * kWidth; i < int64_t(r + 1) * length * kWidth; ++i)
          errors.Add(Half(got[i]), ref[i], std::ldexp(max_v, -9));
    }
    auto call = [&, &launch = launch](int c, cudaStream_t st) { launch(buf[c % sets], st); };
    const double us = semvoc_bench::GraphUsPerCall(call, kCallsPerGraph, kReplays, kWarmup, stream);
    if (checked)
      std::printf("%-24s %-13s %9.2f %10.3g %6.2f\n", shape, name.c_str(), us, errors.err, errors.worst);
    else
      std::printf("%-24s %-13s %9.2f %10s %6s\n", shape, name.c_str(), us, "-", "-");
    if (checked && !(errors.worst <= 1.0)) {
      std::printf("FAIL %s %s: max abs error %.3g is %.3g x the tolerance\n", shape, name.c_str(), errors.err,
                  errors.worst);
      ++g_failures;
    }
    std::fflush(stdout);
  }
  for (auto& b : buf)
    for (__half* p : {b.qkv, b.out, b.q, b.k, b.v}) CK(cudaFree(p));
  for (__half* p : {dgamma, dbeta, dcos, dsin}) CK(cudaFree(p));
  CK(cudaStreamDestroy(stream));
}

}  // namespace

int main() {
  semvoc_bench::PrintDevice();
  std::printf("%-24s %-13s %9s %10s %6s\n", "shape", "variant", "us/call", "max err", "x tol");
  RunShape(2, 250, {0, 1});    // batch 1 with CFG: every row checked
  RunShape(32, 250, {0, 31});  // batch 16 with CFG: the first and last rows checked
  // batch 2 and 4 with CFG: grids between (the largest the library still runs resident on an H200)
  RunShape(4, 250, {0, 3});
  RunShape(8, 250, {0, 7});
  // shorter clips, every row checked: one key tile, partial and full (split keys: the second half
  // empty), two (a tile per half), three and four (the last holding one key), four full ones
  for (int length : {37, 64, 100, 129, 193, 256}) RunShape(2, length, {0, 1});
  if (g_failures) {
    std::printf("%d check(s) failed\n", g_failures);
    return 1;
  }
  std::printf("all checks passed\n");
  return 0;
}
