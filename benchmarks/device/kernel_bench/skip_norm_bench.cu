// Micro-benchmark of the DiT's U-Net skip path ops (src/semvoc/kernels/cuda/skip_norm_kernel.cuh,
// the library's own kernel source) at the reference DiT's shapes: rows = R x 250 latent frames,
// R = 2 (batch 1 with classifier-free guidance: 500 rows) and 32 (batch 16: 8000 rows), D = 1024.
//   GatedConcatNorm: x, out, skip [rows, D]; gate, gbias [D]; gamma, beta [2D] -> h [rows, 2D]
//   BiasAddNorm:     y [rows, D]; bias, gamma, beta [D] -> h, sum [rows, D]
//   LayerNorm:       x [rows, D]; gamma, beta [D] -> h [rows, D]
// Variants: `library` (what skip_norm.cu launches) and `baseline`, the sequence the engine ran
// before, one plain kernel per stock op: Mul, Add, Add, Concat, LayerNorm over 2D (GatedConcatNorm);
// Add, LayerNorm (BiasAddNorm); LayerNorm. The baseline's LayerNorm is one 256-thread block per row
// reading the row three times (mean, variance, output), scalar accesses.
// Every variant is checked against a double-precision CPU reference computed from the rounded
// inputs (with the gated or biased sum rounded to T, as the module and the graph hold it). Times: CUDA-graph replays of 20 back-to-back calls, median of 25 replays after 3 warm-up
// replays; `us/call` rotates through buffer copies of >= 256 MB (inputs come from HBM), `L2-hot`
// reuses one set (at batch 1 the engine's inputs were just written by the GEMM before).
// Run: benchmarks/device/kernel_bench/run.sh skip_norm
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <initializer_list>
#include <random>
#include <string>
#include <vector>

#include "bench_common.cuh"
#include "skip_norm_kernel.cuh"

using namespace semvoc;

namespace {

constexpr double kBandwidth = 4.0e12;  // bytes/s: the bound column (H200 HBM3e, 4.8 TB/s peak)
constexpr int kCallsPerGraph = 20, kReplays = 25, kWarmup = 3;
constexpr float kEps = 1e-5f;
int g_failures = 0;

enum class Op { kGatedConcatNorm, kBiasAddNorm, kLayerNorm };
const char* OpName(Op op) {
  return op == Op::kGatedConcatNorm ? "GatedConcatNorm" : op == Op::kBiasAddNorm ? "BiasAddNorm" : "LayerNorm";
}

// ------------------------------------------------------------------ baseline: plain kernels

template <typename T>  // o = a * row[c]
__global__ void MulRowKernel(const T* a, const T* row, T* o, int64_t n, int width) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) o[i] = FromFloat<T>(ToFloat(a[i]) * ToFloat(row[i % width]));
}
template <typename T>  // o = a + b
__global__ void AddKernel(const T* a, const T* b, T* o, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) o[i] = FromFloat<T>(ToFloat(a[i]) + ToFloat(b[i]));
}
template <typename T>  // o = a + row[c]
__global__ void AddRowKernel(const T* a, const T* row, T* o, int64_t n, int width) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) o[i] = FromFloat<T>(ToFloat(a[i]) + ToFloat(row[i % width]));
}
template <typename T>  // o [rows, 2 width] = [a, b]
__global__ void ConcatKernel(const T* a, const T* b, T* o, int64_t n_out, int width) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n_out) return;
  const int64_t r = i / (2 * width);
  const int c = static_cast<int>(i % (2 * width));
  o[i] = c < width ? a[r * width + c] : b[r * width + c - width];
}

__device__ float BlockSum(float v, float* shared) {  // 256 threads
  v = WarpSum(v);
  if (threadIdx.x % 32 == 0) shared[threadIdx.x / 32] = v;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < 8; ++w) total += shared[w];
  __syncthreads();
  return total;
}
template <typename T>  // one block of 256 threads per row
__global__ void PlainLayerNormKernel(const T* x, const T* gamma, const T* beta, T* o, int width, float eps) {
  __shared__ float shared[8];
  const T* xr = x + static_cast<int64_t>(blockIdx.x) * width;
  float sum = 0.f;
  for (int c = threadIdx.x; c < width; c += blockDim.x) sum += ToFloat(xr[c]);
  const float mean = BlockSum(sum, shared) / width;
  float squares = 0.f;
  for (int c = threadIdx.x; c < width; c += blockDim.x) squares += (ToFloat(xr[c]) - mean) * (ToFloat(xr[c]) - mean);
  const float rstd = rsqrtf(BlockSum(squares, shared) / width + eps);
  T* orow = o + static_cast<int64_t>(blockIdx.x) * width;
  for (int c = threadIdx.x; c < width; c += blockDim.x)
    orow[c] = FromFloat<T>((ToFloat(xr[c]) - mean) * rstd * ToFloat(gamma[c]) + ToFloat(beta[c]));
}

unsigned Grid(int64_t n) { return static_cast<unsigned>((n + 255) / 256); }

// ------------------------------------------------------------------ host side

using semvoc_bench::FromHost;
using semvoc_bench::ToHost;

// One unit in the last place of T at |v| (the smallest subnormal step below the normal range).
template <typename T>
double Ulp(double v) {
  const bool half = sizeof(T) == 2;
  v = std::fabs(v);
  const double min_normal = half ? 6.103515625e-05 : 1.1754943508222875e-38;
  if (v < min_normal) return half ? 5.9604644775390625e-08 : 1.401298464324817e-45;
  int exponent;
  std::frexp(v, &exponent);  // v = m 2^exponent, m in [0.5, 1)
  return std::ldexp(1.0, exponent - (half ? 11 : 24));
}

template <typename T>
struct Set {  // one call's tensors (null where the op has none)
  T *x = nullptr, *out = nullptr, *skip = nullptr, *h = nullptr, *sum = nullptr;
};

template <typename T>
using Launch = std::function<void(const Set<T>&, cudaStream_t)>;

template <typename T>
void Upload(T* dst, const std::vector<T>& src) {
  CK(cudaMemcpy(dst, src.data(), src.size() * sizeof(T), cudaMemcpyHostToDevice));
}
template <typename T>
T* Alloc(int64_t n) {
  T* p;
  CK(cudaMalloc(&p, n * sizeof(T)));
  return p;
}

template <typename T>
void RunShape(Op op, int rows, int width, const char* type_name) {
  const int64_t n = static_cast<int64_t>(rows) * width;
  const bool concat = op == Op::kGatedConcatNorm;
  const int out_width = concat ? 2 * width : width;
  const int64_t n_h = static_cast<int64_t>(rows) * out_width;

  // inputs as the DiT meets them: residual streams (x, skip, y) of large mean and spread, a gated
  // MLP output near zero, a gate near 1, the modulated affine around (1, 0)
  std::mt19937 rng(1234);
  std::normal_distribution<float> normal(0.f, 1.f);
  std::uniform_real_distribution<float> uniform(-1.f, 1.f);
  auto stream_values = [&](std::vector<T>& v) {
    v.resize(n);
    for (int r = 0; r < rows; ++r) {
      const float offset = 8.f * normal(rng);
      for (int c = 0; c < width; ++c) v[static_cast<int64_t>(r) * width + c] = FromHost<T>(offset + 20.f * normal(rng));
    }
  };
  auto vector_of = [&](int size, float center, float spread) {
    std::vector<T> v(size);
    for (auto& e : v) e = FromHost<T>(center + spread * uniform(rng));
    return v;
  };
  std::vector<T> hx, hout, hskip;
  stream_values(hx);
  if (concat) {
    hout.resize(n);
    for (auto& e : hout) e = FromHost<T>(0.5f * normal(rng));
    stream_values(hskip);
  }
  const std::vector<T> hgate = vector_of(width, 1.f, 0.1f), hgbias = vector_of(width, 0.f, 0.5f),
                       hgamma = vector_of(out_width, 1.f, 0.3f), hbeta = vector_of(out_width, 0.f, 0.1f);

  // double reference from the rounded inputs, the module's math: pre = the value before the norm,
  // the gated sum (y + bias) rounded to T as the graph holds it; pre_scale = the largest
  // intermediate of that sum (the baseline also rounds x + out * gate, which gbias may cancel)
  std::vector<double> ref(n_h), ref_sum(op == Op::kBiasAddNorm ? n : 0), pre(out_width), pre_scale(out_width),
      pre_rounding(n_h, 0.0), row_shift(rows, 0.0);
  auto round_t = [](double v) { return static_cast<double>(ToHost(FromHost<T>(static_cast<float>(v)))); };
  for (int r = 0; r < rows; ++r) {
    const int64_t base = static_cast<int64_t>(r) * width;
    for (int c = 0; c < width; ++c) {
      const double xv = ToHost(hx[base + c]);
      if (op == Op::kGatedConcatNorm) {
        const double partial = xv + ToHost(hout[base + c]) * ToHost(hgate[c]);
        pre[c] = round_t(partial + ToHost(hgbias[c]));
        pre_scale[c] = std::max(std::fabs(pre[c]), std::fabs(partial));
        pre[width + c] = ToHost(hskip[base + c]);
      } else if (op == Op::kBiasAddNorm) {
        ref_sum[base + c] = xv + ToHost(hgbias[c]);  // gbias serves as skip_linear's bias here
        pre[c] = round_t(ref_sum[base + c]);
        pre_scale[c] = std::fabs(pre[c]);
      } else {
        pre[c] = xv;
      }
    }
    double mean = 0, var = 0;
    for (int c = 0; c < out_width; ++c) mean += pre[c];
    mean /= out_width;
    for (int c = 0; c < out_width; ++c) var += (pre[c] - mean) * (pre[c] - mean);
    const double rstd = 1.0 / std::sqrt(var / out_width + kEps);
    const bool rounded_op = op != Op::kLayerNorm;  // columns [0, width) hold a rounded sum
    if (rounded_op) {
      for (int c = 0; c < width; ++c) row_shift[r] += Ulp<T>(pre_scale[c]);
      row_shift[r] *= rstd / out_width;
    }
    for (int c = 0; c < out_width; ++c) {
      const int64_t i = static_cast<int64_t>(r) * out_width + c;
      ref[i] = (pre[c] - mean) * rstd * ToHost(hgamma[c]) + ToHost(hbeta[c]);
      // the sum may round to its neighbour (fp32 arithmetic before the rounding) or carry the
      // baseline's extra roundings: that moves this h by gamma * rstd * ulp, and the row's mean
      double moved = row_shift[r];
      if (rounded_op && c < width) moved += rstd * Ulp<T>(pre_scale[c]);
      pre_rounding[i] = std::fabs(ToHost(hgamma[c])) * moved;
    }
  }

  // device: constants once, enough per-call sets to leave the L2 (50 MB) behind, baseline scratch
  T *dgate = Alloc<T>(width), *dgbias = Alloc<T>(width), *dgamma = Alloc<T>(out_width), *dbeta = Alloc<T>(out_width);
  Upload(dgate, hgate);
  Upload(dgbias, hgbias);
  Upload(dgamma, hgamma);
  Upload(dbeta, hbeta);
  const int64_t set_elems = n * (concat ? 3 : 1) + n_h + (op == Op::kBiasAddNorm ? n : 0);
  const double set_bytes = static_cast<double>(set_elems) * sizeof(T);
  const int sets = static_cast<int>(std::min(64.0, std::max(2.0, std::ceil(256e6 / set_bytes))));
  std::vector<Set<T>> buf(sets);
  for (auto& b : buf) {
    b.x = Alloc<T>(n);
    Upload(b.x, hx);
    if (concat) {
      b.out = Alloc<T>(n);
      b.skip = Alloc<T>(n);
      Upload(b.out, hout);
      Upload(b.skip, hskip);
    }
    b.h = Alloc<T>(n_h);
    if (op == Op::kBiasAddNorm) b.sum = Alloc<T>(n);
  }
  T *t1 = Alloc<T>(n), *t2 = Alloc<T>(n), *t3 = Alloc<T>(n), *joined = Alloc<T>(n_h);

  std::vector<std::pair<std::string, Launch<T>>> variants;
  if (op == Op::kGatedConcatNorm) {
    variants.push_back({"baseline", [=](const Set<T>& s, cudaStream_t st) {
      MulRowKernel<T><<<Grid(n), 256, 0, st>>>(s.out, dgate, t1, n, width);
      AddKernel<T><<<Grid(n), 256, 0, st>>>(s.x, t1, t2, n);
      AddRowKernel<T><<<Grid(n), 256, 0, st>>>(t2, dgbias, t3, n, width);
      ConcatKernel<T><<<Grid(n_h), 256, 0, st>>>(t3, s.skip, joined, n_h, width);
      PlainLayerNormKernel<T><<<rows, 256, 0, st>>>(joined, dgamma, dbeta, s.h, out_width, kEps);
    }});
    variants.push_back({"library", [=](const Set<T>& s, cudaStream_t st) {
      if (!LaunchGatedConcatNorm<T>(s.x, s.out, dgate, dgbias, s.skip, dgamma, dbeta, s.h, rows, width, kEps, st))
        std::printf("FAIL GatedConcatNorm: width %d refused\n", width);
    }});
  } else if (op == Op::kBiasAddNorm) {
    variants.push_back({"baseline", [=](const Set<T>& s, cudaStream_t st) {
      AddRowKernel<T><<<Grid(n), 256, 0, st>>>(s.x, dgbias, s.sum, n, width);
      PlainLayerNormKernel<T><<<rows, 256, 0, st>>>(s.sum, dgamma, dbeta, s.h, width, kEps);
    }});
    variants.push_back({"library", [=](const Set<T>& s, cudaStream_t st) {
      if (!LaunchBiasAddNorm<T, true, true>(s.x, dgbias, dgamma, dbeta, s.h, s.sum, rows, width, kEps, st))
        std::printf("FAIL BiasAddNorm: width %d refused\n", width);
    }});
  } else {
    variants.push_back({"baseline", [=](const Set<T>& s, cudaStream_t st) {
      PlainLayerNormKernel<T><<<rows, 256, 0, st>>>(s.x, dgamma, dbeta, s.h, width, kEps);
    }});
    variants.push_back({"library", [=](const Set<T>& s, cudaStream_t st) {
      if (!LaunchBiasAddNorm<T, false, false>(s.x, nullptr, dgamma, dbeta, s.h, nullptr, rows, width, kEps, st))
        std::printf("FAIL LayerNorm: width %d refused\n", width);
    }});
  }

  // the op's own traffic: per-row tensors read and written once, the [D] vectors once
  const double bytes = static_cast<double>(set_elems) * sizeof(T) +
                       static_cast<double>(concat ? 2 * width + 2 * out_width
                                                  : (op == Op::kBiasAddNorm ? 3 * width : 2 * width)) * sizeof(T);
  const double bound_us = bytes / kBandwidth * 1e6;
  double max_ref = 0;
  for (double v : ref) max_ref = std::max(max_ref, std::fabs(v));

  cudaStream_t stream;
  CK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  for (const auto& [name, launch] : variants) {
    // correctness on set 0 (outputs poisoned with NaN first)
    CK(cudaMemset(buf[0].h, 0xff, n_h * sizeof(T)));
    if (buf[0].sum) CK(cudaMemset(buf[0].sum, 0xff, n * sizeof(T)));
    launch(buf[0], stream);
    CK(cudaGetLastError());
    CK(cudaStreamSynchronize(stream));
    std::vector<T> h(n_h), sum(buf[0].sum ? n : 0);
    CK(cudaMemcpy(h.data(), buf[0].h, n_h * sizeof(T), cudaMemcpyDeviceToHost));
    if (buf[0].sum) CK(cudaMemcpy(sum.data(), buf[0].sum, n * sizeof(T), cudaMemcpyDeviceToHost));
    // tolerance per element: the rounding of the output (half an ulp of T at the value; 1 ulp
    // allowed); 2 ulp of the pre-norm sum's largest intermediate (the library's fp32 sum may round
    // to the other neighbour; the baseline rounds after each of its three ops: <= 1.5 ulp) times
    // gamma * rstd, plus the row mean's worst shift from those (1 ulp of each rounded column / the
    // row width); and 1e-6 of the largest |h| for the fp32 arithmetic of the statistics
    double err = 0, worst = 0;
    for (int64_t i = 0; i < n_h; ++i) {
      const double g = ToHost(h[i]), d = std::isnan(g) ? INFINITY : std::fabs(g - ref[i]);
      const double tol = Ulp<T>(ref[i]) + 2.0 * pre_rounding[i] + 1e-6 * max_ref;
      err = std::max(err, d);
      worst = std::max(worst, d / tol);
    }
    for (int64_t i = 0; i < static_cast<int64_t>(sum.size()); ++i) {  // sum = y + bias: one rounding
      const double g = ToHost(sum[i]), d = std::isnan(g) ? INFINITY : std::fabs(g - ref_sum[i]);
      err = std::max(err, d);
      worst = std::max(worst, d / Ulp<T>(ref_sum[i]));
    }
    // timing: graphs of kCallsPerGraph calls over rotating sets (HBM) and over set 0 (L2-hot)
    double us[2];
    for (int hot = 0; hot < 2; ++hot) {
      // C++17 lambdas cannot capture a structured binding by name: bind a reference to it
      auto call = [&, &launch = launch](int c, cudaStream_t st) { launch(buf[hot ? 0 : c % sets], st); };
      us[hot] = semvoc_bench::GraphUsPerCall(call, kCallsPerGraph, kReplays, kWarmup, stream);
    }
    char shape[96];
    std::snprintf(shape, sizeof shape, "%s %s rows=%d D=%d", OpName(op), type_name, rows, width);
    std::printf("%-36s %-9s %9.2f %9.2f %8.0f %8.2f %10.3e %7.2f\n", shape, name.c_str(), us[0], us[1],
                bytes / (us[0] * 1e-6) / 1e9, bound_us, err, worst);
    if (!(worst <= 1.0)) {
      std::printf("FAIL %s %s: error %.3g x the tolerance (max abs error %.3g)\n", shape, name.c_str(), worst, err);
      ++g_failures;
    }
    std::fflush(stdout);
  }
  for (auto& b : buf)
    for (T* p : std::initializer_list<T*>{b.x, b.out, b.skip, b.h, b.sum})
      if (p) CK(cudaFree(p));
  for (T* p : std::initializer_list<T*>{dgate, dgbias, dgamma, dbeta, t1, t2, t3, joined}) CK(cudaFree(p));
  CK(cudaStreamDestroy(stream));
}

}  // namespace

int main() {
  semvoc_bench::PrintDevice();
  std::printf("us/call: median of %d CUDA-graph replays of %d calls, inputs rotated through >= 256 MB (from HBM); "
              "L2-hot: one buffer set.\nGB/s: the op's own bytes (inputs read once, outputs written once) / us/call;"
              " bound = those bytes / %.1f TB/s; err = max abs error vs a CPU double reference; tol = worst error / "
              "its tolerance (1 ulp of the output, 2 ulp of the rounded pre-norm sum and of the mean's shift x gamma x rstd, "
              "+ 1e-6 max|h|),"
              " > 1 is a FAIL\n",
              kReplays, kCallsPerGraph, kBandwidth / 1e12);
  std::printf("%-36s %-9s %9s %9s %8s %8s %10s %7s\n", "shape", "variant", "us/call", "us L2-hot", "GB/s", "bound us",
              "err", "tol");
  const int kRows[] = {500, 8000};  // R = 2 and 32 CFG rows x 250 frames
  for (Op op : {Op::kGatedConcatNorm, Op::kBiasAddNorm, Op::kLayerNorm}) {
    for (int rows : kRows) RunShape<__half>(op, rows, 1024, "fp16");
    for (int rows : kRows) RunShape<float>(op, rows, 1024, "fp32");
    // edges: a partly idle last block of 4 rows and the small preset's D = 384 (idle lanes in the
    // second register tile); D = 1020 is no multiple of 8 halves (the scalar path)
    RunShape<__half>(op, 249, 384, "fp16");
    RunShape<__half>(op, 37, 1020, "fp16");
  }
  if (g_failures == 0) {
    std::printf("all checks passed\n");
    return 0;
  }
  std::printf("FAIL: %d check(s) failed\n", g_failures);
  return 1;
}
