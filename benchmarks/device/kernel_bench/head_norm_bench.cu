// Micro-benchmark of HeadNormRope / HeadNorm (src/semvoc/kernels/cuda/head_norm_kernel.cuh, the
// library's own kernel source) at the reference DiT's shapes:
//   HeadNormRope: q|k [R, 250, 2*16*64] -> q, k [R, 250, 16*64], gamma/beta [32, 64], cos/sin [253, 32]
//   HeadNorm (cross-attention q-norm): q [R, 250, 16*64], gamma/beta [64] shared by the heads
// R = 2 (batch 1 with classifier-free guidance) and 32 (batch 16); fp16, and fp32 at R = 32.
// Variants: `baseline` (HeadNormWarpKernel, the first kernel: one warp per head), `library` (what
// head_norm.cu launches now), and HeadNormVecKernel configurations that each test one idea.
// Every variant's output is checked against the baseline's and against a double-precision CPU
// reference. Times: CUDA-graph replays of 20 back-to-back calls, median of 25 replays; `us/call`
// rotates through enough buffer copies (>= 256 MB) that inputs come from HBM, `us L2-hot` reuses
// one set. Run: benchmarks/device/kernel_bench/run.sh head_norm
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

using namespace semvoc;

namespace {

constexpr double kBandwidth = 4.0e12;  // bytes/s: the bound column (H200 HBM3e, 4.8 TB/s peak)
constexpr int kCallsPerGraph = 20, kReplays = 25, kWarmup = 3;

struct Shape {
  const char* op;
  int rows_per_batch;  // R
  int length, heads, hd;
  bool rope, per_head_affine;
};

template <typename T>
struct Buffers {  // one set of per-call tensors
  T *x, *out, *out_k;
};

using semvoc_bench::FromHost;
using semvoc_bench::ToHost;

template <typename T>
using Launch = std::function<void(const T* x, T* out, T* out_k, cudaStream_t stream)>;

template <typename T>
struct Variant {
  std::string name;
  Launch<T> launch;
};

template <typename T>
void RunShape(const Shape& s, const char* type_name) {
  const int64_t rows = static_cast<int64_t>(s.rows_per_batch) * s.length;
  const int64_t row_width = static_cast<int64_t>(s.heads) * s.hd;
  const int64_t n_x = rows * row_width, n_out = s.rope ? n_x / 2 : n_x;
  const int affine_n = s.per_head_affine ? s.heads * s.hd : s.hd, table_rows = s.length + 3;
  const int affine_stride = s.per_head_affine ? s.hd : 0;
  const float eps = 1e-6f;

  // inputs: per-head offsets so that the mean matters, a real rope table, gamma ~ 1, beta ~ 0
  std::mt19937 rng(1234);
  std::normal_distribution<float> normal(0.f, 1.f);
  std::uniform_real_distribution<float> uniform(-1.f, 1.f);
  std::vector<T> hx(n_x), hg(affine_n), hb(affine_n), hc(static_cast<size_t>(table_rows) * s.hd / 2),
      hs(hc.size());
  for (int64_t r = 0; r < rows; ++r)
    for (int h = 0; h < s.heads; ++h) {
      const float shift = 0.5f * uniform(rng), scale = 1.f + 0.5f * uniform(rng);
      for (int e = 0; e < s.hd; ++e) hx[(r * s.heads + h) * s.hd + e] = FromHost<T>(shift + 2.f * scale * normal(rng));
    }
  for (int i = 0; i < affine_n; ++i) {
    hg[i] = FromHost<T>(1.f + 0.5f * uniform(rng));
    hb[i] = FromHost<T>(0.2f * uniform(rng));
  }
  for (int p = 0; p < table_rows; ++p)
    for (int j = 0; j < s.hd / 2; ++j) {
      const double angle = p * std::pow(10000.0, -2.0 * j / s.hd);
      hc[p * s.hd / 2 + j] = FromHost<T>(static_cast<float>(std::cos(angle)));
      hs[p * s.hd / 2 + j] = FromHost<T>(static_cast<float>(std::sin(angle)));
    }

  // CPU reference in double, from the rounded inputs
  std::vector<double> ref(n_x), y(s.hd);  // ref: [rows, heads, hd] before the q/k split
  for (int64_t r = 0; r < rows; ++r)
    for (int h = 0; h < s.heads; ++h) {
      const T* xv = &hx[(r * s.heads + h) * s.hd];
      double mean = 0, var = 0;
      for (int e = 0; e < s.hd; ++e) mean += ToHost(xv[e]);
      mean /= s.hd;
      for (int e = 0; e < s.hd; ++e) var += (ToHost(xv[e]) - mean) * (ToHost(xv[e]) - mean);
      var /= s.hd;
      for (int e = 0; e < s.hd; ++e)
        y[e] = (ToHost(xv[e]) - mean) / std::sqrt(var + eps) * ToHost(hg[h * affine_stride + e]) +
               ToHost(hb[h * affine_stride + e]);
      double* o = &ref[(r * s.heads + h) * s.hd];
      if (!s.rope) {
        for (int e = 0; e < s.hd; ++e) o[e] = y[e];
        continue;
      }
      const int p = static_cast<int>(r % s.length), half = s.hd / 2;
      for (int j = 0; j < half; ++j) {
        const double c = ToHost(hc[p * half + j]), sn = ToHost(hs[p * half + j]);
        o[j] = y[j] * c - y[j + half] * sn;
        o[j + half] = y[j + half] * c + y[j] * sn;
      }
    }

  // device buffers: the constant inputs once, enough (x, out, out_k) sets to leave the L2 behind
  T *dg, *db, *dc = nullptr, *ds = nullptr;
  CK(cudaMalloc(&dg, affine_n * sizeof(T)));
  CK(cudaMalloc(&db, affine_n * sizeof(T)));
  CK(cudaMemcpy(dg, hg.data(), affine_n * sizeof(T), cudaMemcpyHostToDevice));
  CK(cudaMemcpy(db, hb.data(), affine_n * sizeof(T), cudaMemcpyHostToDevice));
  if (s.rope) {
    CK(cudaMalloc(&dc, hc.size() * sizeof(T)));
    CK(cudaMalloc(&ds, hs.size() * sizeof(T)));
    CK(cudaMemcpy(dc, hc.data(), hc.size() * sizeof(T), cudaMemcpyHostToDevice));
    CK(cudaMemcpy(ds, hs.data(), hs.size() * sizeof(T), cudaMemcpyHostToDevice));
  }
  const int64_t n_written = s.rope ? 2 * n_out : n_out;
  const double set_bytes = static_cast<double>(n_x + n_written) * sizeof(T);
  const int sets = static_cast<int>(std::min(64.0, std::max(2.0, std::ceil(256e6 / set_bytes))));
  std::vector<Buffers<T>> buf(sets);
  for (auto& b : buf) {
    CK(cudaMalloc(&b.x, n_x * sizeof(T)));
    CK(cudaMalloc(&b.out, n_out * sizeof(T)));
    b.out_k = nullptr;
    if (s.rope) CK(cudaMalloc(&b.out_k, n_out * sizeof(T)));
    CK(cudaMemcpy(b.x, hx.data(), n_x * sizeof(T), cudaMemcpyHostToDevice));
  }

  const int length = s.length, heads = s.heads, hd = s.hd;
  const bool rope = s.rope;
  // one launcher per HeadNormVecKernel configuration, for this shape's rope flag
  auto vec = [&](auto pair, auto rows_per_thread, auto one_pass) -> Launch<T> {
    constexpr bool kPair = decltype(pair)::value, kOnePass = decltype(one_pass)::value;
    constexpr int kRows = decltype(rows_per_thread)::value;
    return [=](const T* x, T* out, T* out_k, cudaStream_t stream) {
      if (rope)
        LaunchHeadNormVec<T, true, kPair, kRows, kOnePass>(hd, x, dg, db, dc, ds, out, out_k, rows, heads, length,
                                                          affine_stride, eps, stream);
      else
        LaunchHeadNormVec<T, false, kPair, kRows, kOnePass>(hd, x, dg, db, dc, ds, out, out_k, rows, heads, length,
                                                           affine_stride, eps, stream);
    };
  };
  using std::false_type, std::true_type;
  using One = std::integral_constant<int, 1>;
  using Two = std::integral_constant<int, 2>;
  using Four = std::integral_constant<int, 4>;
  std::vector<Variant<T>> variants = {
      {"baseline", [=](const T* x, T* out, T* out_k, cudaStream_t stream) {
         // the first library launch: 256 threads, one warp per (row, head)
         const int64_t warps = rows * heads;
         const unsigned blocks = static_cast<unsigned>((warps * 32 + 255) / 256);
         auto kernel = rope ? (hd == 64 ? HeadNormWarpKernel<T, 2, true> : HeadNormWarpKernel<T, 4, true>)
                            : (hd == 64 ? HeadNormWarpKernel<T, 2, false> : HeadNormWarpKernel<T, 4, false>);
         kernel<<<blocks, 256, 0, stream>>>(x, dg, db, dc, ds, out, out_k, warps, heads, length, affine_stride, eps, 0,
                                            nullptr);
       }},
      {"library", [=](const T* x, T* out, T* out_k, cudaStream_t stream) {
         if (rope) LaunchHeadNorm<T, true>(hd, x, dg, db, dc, ds, out, out_k, rows, heads, length, affine_stride, eps, stream);
         else LaunchHeadNorm<T, false>(hd, x, dg, db, dc, ds, out, out_k, rows, heads, length, affine_stride, eps, stream);
       }},
      {"vec1-shfl-r1", vec(false_type{}, One{}, false_type{})},
      {"vec2-pair-r1", vec(true_type{}, One{}, false_type{})},
      {"vec2-pair-r2", vec(true_type{}, Two{}, false_type{})},
      {"vec2-pair-r4", vec(true_type{}, Four{}, false_type{})},
      {"vec2-pair-r2-1pass", vec(true_type{}, Two{}, true_type{})},
  };

  cudaStream_t stream;
  CK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  const double bytes = static_cast<double>(n_x + n_written) * sizeof(T) +
                       2.0 * affine_n * sizeof(T) + (s.rope ? 2.0 * s.length * s.hd / 2 * sizeof(T) : 0.0);
  const double bound_us = bytes / kBandwidth * 1e6;
  const bool half_type = sizeof(T) == 2;

  std::vector<T> base_q, base_k;
  for (size_t vi = 0; vi < variants.size(); ++vi) {
    const Variant<T>& var = variants[vi];
    // correctness, on set 0
    CK(cudaMemset(buf[0].out, 0xff, n_out * sizeof(T)));
    if (s.rope) CK(cudaMemset(buf[0].out_k, 0xff, n_out * sizeof(T)));
    var.launch(buf[0].x, buf[0].out, buf[0].out_k, stream);
    CK(cudaGetLastError());
    CK(cudaStreamSynchronize(stream));
    std::vector<T> q(n_out), k(s.rope ? n_out : 0);
    CK(cudaMemcpy(q.data(), buf[0].out, n_out * sizeof(T), cudaMemcpyDeviceToHost));
    if (s.rope) CK(cudaMemcpy(k.data(), buf[0].out_k, n_out * sizeof(T), cudaMemcpyDeviceToHost));
    if (vi == 0) {
      base_q = q;
      base_k = k;
    }
    // errors: vs the baseline's output and vs the CPU; the tolerance (see the FAIL line) is one
    // rounding step of T at the value plus 1e-6 of the largest value (fp32 arithmetic noise)
    double max_ref = 0;
    for (double v : ref) max_ref = std::max(max_ref, std::fabs(v));
    double err_base = 0, err_cpu = 0, worst_base = 0, worst_cpu = 0;
    const int half_heads = s.heads / 2;
    for (int64_t i = 0; i < n_x; ++i) {
      const int64_t r = i / row_width, h = (i / s.hd) % s.heads, e = i % s.hd;
      const std::vector<T>& got = !s.rope || h < half_heads ? q : k;
      const std::vector<T>& base = !s.rope || h < half_heads ? base_q : base_k;
      const int64_t hh = s.rope && h >= half_heads ? h - half_heads : h;
      const int64_t o = (r * (s.rope ? half_heads : s.heads) + hh) * s.hd + e;
      const double g = ToHost(got[o]), b = ToHost(base[o]), c = ref[i];
      const double step = half_type ? semvoc_bench::Ulp16(c) : std::fabs(c) * 1.2e-7;
      const double tol = step + 1e-6 * max_ref;
      const double db_ = std::fabs(g - b), dc_ = std::isnan(g) ? INFINITY : std::fabs(g - c);
      err_base = std::max(err_base, std::isnan(g) != std::isnan(b) ? INFINITY : db_);
      err_cpu = std::max(err_cpu, dc_);
      worst_base = std::max(worst_base, (std::isnan(g) != std::isnan(b) ? INFINITY : db_) / tol);
      worst_cpu = std::max(worst_cpu, dc_ / tol);
    }
    // timing: graphs of kCallsPerGraph calls, over rotating sets (HBM) and over set 0 (L2-hot)
    double us[2];
    for (int hot = 0; hot < 2; ++hot) {
      auto launch = [&](int c, cudaStream_t st) {
        const Buffers<T>& b = buf[hot ? 0 : c % sets];
        var.launch(b.x, b.out, b.out_k, st);
      };
      us[hot] = semvoc_bench::GraphUsPerCall(launch, kCallsPerGraph, kReplays, kWarmup, stream);
    }
    char shape[96];
    std::snprintf(shape, sizeof shape, "%s %s R=%d L=%d n=%d hd=%d", s.op, type_name, s.rows_per_batch, s.length,
                  s.heads, s.hd);
    std::printf("%-40s %-20s %9.2f %9.2f %8.0f %8.2f %9.2e %9.2e %6.2f\n", shape, var.name.c_str(), us[0], us[1],
                bytes / (us[0] * 1e-6) / 1e9, bound_us, err_base, err_cpu, std::max(worst_base, worst_cpu));
    if (worst_base > 1.0 || worst_cpu > 1.0)
      std::printf("FAIL %s %s: error %.3g x the tolerance (vs baseline %.3g, vs CPU %.3g)\n", shape,
                  var.name.c_str(), std::max(worst_base, worst_cpu), worst_base, worst_cpu);
    std::fflush(stdout);
  }
  for (auto& b : buf) {
    CK(cudaFree(b.x));
    CK(cudaFree(b.out));
    if (b.out_k) CK(cudaFree(b.out_k));
  }
  CK(cudaFree(dg));
  CK(cudaFree(db));
  if (dc) CK(cudaFree(dc));
  if (ds) CK(cudaFree(ds));
  CK(cudaStreamDestroy(stream));
}

}  // namespace

int main() {
  semvoc_bench::PrintDevice();
  std::printf("us/call: median of %d CUDA-graph replays of %d calls, inputs rotated through >= 256 MB (from HBM); "
              "L2-hot: one buffer set.\nGB/s from us/call; bound = bytes / %.1f TB/s; err = max abs error vs the "
              "baseline and vs a CPU double reference; tol = worst error / tolerance (fp16: one rounding step at "
              "the value + 1e-6 x max|y|), > 1 is a FAIL\n",
              kReplays, kCallsPerGraph, kBandwidth / 1e12);
  std::printf("%-40s %-20s %9s %9s %8s %8s %9s %9s %6s\n", "shape", "variant", "us/call", "us L2-hot", "GB/s",
              "bound us", "err base", "err cpu", "tol");
  const Shape shapes[] = {
      {"HeadNormRope", 2, 250, 32, 64, true, true},  {"HeadNormRope", 32, 250, 32, 64, true, true},
      {"HeadNorm", 2, 250, 16, 64, false, false},    {"HeadNorm", 32, 250, 16, 64, false, false},
  };
  for (const Shape& s : shapes) RunShape<__half>(s, "fp16");
  RunShape<float>(shapes[1], "fp32");
  RunShape<float>(shapes[3], "fp32");
  // odd sizes (correctness of the edges: 3 heads of 128, 37 rows, a shared affine)
  RunShape<__half>({"HeadNormRope", 1, 37, 6, 128, true, false}, "fp16");
  RunShape<__half>({"HeadNorm", 3, 37, 3, 128, false, true}, "fp16");
  return 0;
}
