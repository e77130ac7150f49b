// Micro-benchmark of ConvNeXtMix's kernels at the reference vocoder's shapes (10-s clip, fp16):
// x [B, L, C] with (L, C) = (1000, 768), (2000, 512), (4000, 384), K = 7, B = 1 and 16, cond_bias a
// table [8, B, L, C], time_scale a table [B, 8, C]. The kernels are the op's own
// (src/semvoc/kernels/cuda/convnext_mix_kernel.cuh). Every variant is checked against the first kernel
// ("first", also checked against a double-precision host reference on sampled frames) and timed with
// CUDA events: the median over 25 timings of 20 back-to-back launches, each launch reading the next
// table entry (layer = i % 8) as the step graph does, so cond_bias comes from memory, not L2.
//   benchmarks/device/kernel_bench/run.sh convnext_mix
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "bench_common.cuh"
#include "convnext_mix_kernel.cuh"

using namespace semvoc;

constexpr int kTaps = 7, kTable = 8, kCheckLayer = 3;
constexpr double kBandwidth = 4.0e12;  // bytes per second for the bound column

// deterministic pseudo-normal values (sum of 4 hashed uniforms, unit variance) * sd + mean
__global__ void Fill(__half* p, int64_t n, uint32_t seed, float mean, float sd) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    float s = 0.f;
    for (uint32_t r = 0; r < 4; ++r) {
      uint32_t h = static_cast<uint32_t>(i) * 0x9E3779B1u ^ (seed + r * 0x85EBCA77u) ^ static_cast<uint32_t>(i >> 32);
      h ^= h >> 16; h *= 0x7FEB352Du; h ^= h >> 15; h *= 0x846CA68Bu; h ^= h >> 16;
      s += (h >> 8) * (1.f / 16777216.f) - 0.5f;
    }
    p[i] = __float2half_rn(mean + sd * s * 1.7320508f);
  }
}

__global__ void ToFloatKernel(const __half* in, float* out, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    out[i] = __half2float(in[i]);
  }
}

template <typename T>
struct Buffers {
  T *x, *weight, *bias, *norm_bias, *log_scale, *cond, *scale, *out;
};

template <typename T>
MixArgs<T> ArgsFor(const Buffers<T>& d, int batch, int length, int channels, int layer, T* out) {
  const int64_t plane = int64_t(batch) * length * channels;
  return MixArgs<T>{d.x, d.weight, d.bias, d.norm_bias, d.log_scale, d.cond + layer * plane,
                    d.scale + int64_t(layer) * channels, out, channels, length,
                    int64_t(length) * channels, int64_t(kTable) * channels};
}

template <typename T>
using LaunchFn = void (*)(const MixArgs<T>&, int, cudaStream_t);

template <typename T>
struct Variant {
  const char* name;
  const char* tests;  // the hypothesis it isolates
  LaunchFn<T> launch;
};

template <typename T>
std::vector<Variant<T>> Variants() {
  return {
      {"first", "the op's first kernel (A/B baseline)", LaunchMixFirst<T, kTaps>},
      {"run_v1_f8_late", "block fitted to C, 1 ch/thread, cond after barrier", LaunchMixRuns<T, kTaps, 1, 8, false>},
      {"run_v1_f8", "+ cond prefetched before the barrier", LaunchMixRuns<T, kTaps, 1, 8, true>},
      {"run_v4_f8 *", "+ 4 ch/thread, vector loads, <= 128 regs (shipped)", LaunchMixShipped<T, kTaps>},
      {"run_v4_f8_1b", "the same without the register cap", LaunchMixRuns<T, kTaps, 4, 8, true, 1>},
      {"run_v4_f8_3b", "registers capped for 3 blocks/SM (occupancy)", LaunchMixRuns<T, kTaps, 4, 8, true, 3>},
      {"run_v8_f8", "8 ch/thread (16-byte fp16 accesses)", LaunchMixRuns<T, kTaps, 8, 8, true>},
      {"run_v8_f4", "8 ch/thread, 4 frames (fewer registers)", LaunchMixRuns<T, kTaps, 8, 4, true>},
      {"run_v4_f16", "16 frames/thread: halo reads 1.375x, not 1.75x", LaunchMixRuns<T, kTaps, 4, 16, true>},
      {"run_v4_f4", "4 frames/thread: fewer registers, halo 2.5x", LaunchMixRuns<T, kTaps, 4, 4, true>},
  };
}

// y for frame t of batch row b from host copies (double precision), compared with `got` [C]
double HostCheck(const std::vector<float>& x, const std::vector<float>& w, const std::vector<float>& bias,
                 const std::vector<float>& nb, float log_scale, const std::vector<float>& cond,
                 const std::vector<float>& scale, const std::vector<float>& got, int b, int t, int length,
                 int channels) {
  std::vector<double> y(channels);
  double sumsq = 0;
  for (int c = 0; c < channels; ++c) {
    double acc = bias[c];
    for (int k = 0; k < kTaps; ++k) {
      const int s = t - kTaps / 2 + k;
      if (s >= 0 && s < length) acc += double(w[c * kTaps + k]) * x[(int64_t(b) * length + s) * channels + c];
    }
    y[c] = acc;
    sumsq += (acc - nb[c]) * (acc - nb[c]);
  }
  const double inv = std::exp(double(log_scale)) / std::sqrt(sumsq / channels);
  double err = 0;
  for (int c = 0; c < channels; ++c) {
    const int64_t i = (int64_t(b) * length + t) * channels + c;
    const double want = (y[c] * inv + cond[i]) * scale[(int64_t(b) * kTable + kCheckLayer) * channels + c];
    err = std::max(err, std::abs(want - got[i]));
  }
  return err;
}

std::vector<float> Download(const __half* d, int64_t n) {
  float* tmp;
  CK(cudaMalloc(&tmp, n * sizeof(float)));
  ToFloatKernel<<<1024, 256>>>(d, tmp, n);
  std::vector<float> h(n);
  CK(cudaMemcpy(h.data(), tmp, n * sizeof(float), cudaMemcpyDeviceToHost));
  CK(cudaFree(tmp));
  return h;
}

int failures = 0;

void RunShape(int batch, int length, int channels, cudaStream_t stream) {
  const int64_t n = int64_t(batch) * length * channels;
  Buffers<__half> d;
  CK(cudaMalloc(&d.x, n * 2));
  CK(cudaMalloc(&d.cond, kTable * n * 2));
  CK(cudaMalloc(&d.scale, int64_t(batch) * kTable * channels * 2));
  CK(cudaMalloc(&d.weight, channels * kTaps * 2));
  CK(cudaMalloc(&d.bias, channels * 2));
  CK(cudaMalloc(&d.norm_bias, channels * 2));
  CK(cudaMalloc(&d.log_scale, 2));
  __half *ref, *out;
  CK(cudaMalloc(&ref, n * 2));
  CK(cudaMalloc(&out, n * 2));
  Fill<<<1024, 256>>>(d.x, n, 1, 0.f, 1.f);
  Fill<<<1024, 256>>>(d.cond, kTable * n, 2, 0.f, 1.f);
  Fill<<<1024, 256>>>(d.scale, int64_t(batch) * kTable * channels, 3, 1.f, 0.1f);
  Fill<<<64, 256>>>(d.weight, channels * kTaps, 4, 0.f, 0.4f);
  Fill<<<64, 256>>>(d.bias, channels, 5, 0.f, 0.1f);
  Fill<<<64, 256>>>(d.norm_bias, channels, 6, 0.f, 0.5f);
  Fill<<<1, 1>>>(d.log_scale, 1, 7, 0.3f, 0.f);
  CK(cudaGetLastError());

  // the first kernel against a host reference on sampled frames (edges included)
  LaunchMixFirst<__half, kTaps>(ArgsFor(d, batch, length, channels, kCheckLayer, ref), batch, stream);
  CK(cudaStreamSynchronize(stream));
  const std::vector<float> hx = Download(d.x, n), hw = Download(d.weight, channels * kTaps),
                           hb = Download(d.bias, channels), hnb = Download(d.norm_bias, channels),
                           hls = Download(d.log_scale, 1), hcond = Download(d.cond + kCheckLayer * n, n),
                           hscale = Download(d.scale, int64_t(batch) * kTable * channels),
                           href = Download(ref, n);
  double max_ref = 0;
  for (float v : href) max_ref = std::max(max_ref, double(std::abs(v)));
  // fp16 output: both kernels compute in fp32 from the same fp16 inputs, so they may differ by the
  // rounding of the last step, one fp16 ulp at the largest magnitude (2^-10 relative, doubled for margin)
  const double tol = 2.0 * max_ref / 1024.0;
  double host_err = 0;
  for (int b : {0, batch - 1}) {
    for (int t : {0, 1, 2, 3, length / 2, length - 4, length - 3, length - 2, length - 1}) {
      host_err = std::max(host_err, HostCheck(hx, hw, hb, hnb, hls[0], hcond, hscale, href, b, t, length, channels));
    }
  }
  char shape[64];
  std::snprintf(shape, sizeof(shape), "B=%d L=%d C=%d", batch, length, channels);
  if (host_err > tol) {
    std::printf("FAIL %s first kernel vs host reference: max abs error %.3g > %.3g\n", shape, host_err, tol);
    ++failures;
  }

  const double bytes = 3.0 * n * 2 + double(batch) * channels * 2 + channels * (kTaps + 2) * 2;
  const double bound_us = bytes / kBandwidth * 1e6;
  cudaEvent_t start, stop;
  CK(cudaEventCreate(&start));
  CK(cudaEventCreate(&stop));
  for (const Variant<__half>& v : Variants<__half>()) {
    CK(cudaMemset(out, 0, n * 2));
    v.launch(ArgsFor(d, batch, length, channels, kCheckLayer, out), batch, stream);
    CK(cudaGetLastError());
    CK(cudaStreamSynchronize(stream));
    const std::vector<float> got = Download(out, n);
    double err = 0;
    for (int64_t i = 0; i < n; ++i) err = std::max(err, double(std::abs(got[i] - href[i])));
    if (!(err <= tol)) {
      std::printf("FAIL %s %s: max abs error %.3g against the first kernel > %.3g\n", shape, v.name, err, tol);
      ++failures;
    }
    const int calls = 20, reps = 25;
    for (int i = 0; i < calls; ++i) v.launch(ArgsFor(d, batch, length, channels, i % kTable, out), batch, stream);
    std::vector<float> per_call;
    for (int r = 0; r < reps; ++r) {
      CK(cudaEventRecord(start, stream));
      for (int i = 0; i < calls; ++i) v.launch(ArgsFor(d, batch, length, channels, i % kTable, out), batch, stream);
      CK(cudaEventRecord(stop, stream));
      CK(cudaEventSynchronize(stop));
      float ms = 0;
      CK(cudaEventElapsedTime(&ms, start, stop));
      per_call.push_back(ms * 1000.f / calls);
    }
    CK(cudaGetLastError());
    std::sort(per_call.begin(), per_call.end());
    const double us = per_call[per_call.size() / 2];
    std::printf("%-22s %-12s %9.2f %8.0f %9.2f %10.2e  %s\n", shape, v.name, us, bytes / (us * 1e-6) / 1e9, bound_us,
                err, v.tests);
  }
  CK(cudaEventDestroy(start));
  CK(cudaEventDestroy(stop));
  for (void* p : {static_cast<void*>(d.x), static_cast<void*>(d.cond), static_cast<void*>(d.scale),
                  static_cast<void*>(d.weight), static_cast<void*>(d.bias), static_cast<void*>(d.norm_bias),
                  static_cast<void*>(d.log_scale), static_cast<void*>(ref), static_cast<void*>(out)}) {
    CK(cudaFree(p));
  }
}

// fp32: the shipped dispatch (vector and scalar paths) against the first kernel, untimed
void CheckFloat(int batch, int length, int channels, cudaStream_t stream) {
  const int64_t n = int64_t(batch) * length * channels;
  __half* tmp;
  CK(cudaMalloc(&tmp, kTable * n * 2));
  Buffers<float> d;
  float *ref, *out;
  const int64_t sizes[] = {n, kTable * n, int64_t(batch) * kTable * channels, channels * kTaps, channels, channels, 1};
  float** ptrs[] = {&d.x, &d.cond, &d.scale, &d.weight, &d.bias, &d.norm_bias, &d.log_scale};
  const float means[] = {0.f, 0.f, 1.f, 0.f, 0.f, 0.f, 0.3f}, sds[] = {1.f, 1.f, 0.1f, 0.4f, 0.1f, 0.5f, 0.f};
  for (int i = 0; i < 7; ++i) {
    CK(cudaMalloc(ptrs[i], sizes[i] * 4));
    Fill<<<1024, 256>>>(tmp, sizes[i], 11 + i, means[i], sds[i]);
    ToFloatKernel<<<1024, 256>>>(tmp, *ptrs[i], sizes[i]);
  }
  CK(cudaMalloc(&ref, n * 4));
  CK(cudaMalloc(&out, n * 4));
  LaunchMixFirst<float, kTaps>(ArgsFor(d, batch, length, channels, kCheckLayer, ref), batch, stream);
  LaunchMixShipped<float, kTaps>(ArgsFor(d, batch, length, channels, kCheckLayer, out), batch, stream);
  CK(cudaGetLastError());
  std::vector<float> a(n), b(n);
  CK(cudaMemcpy(a.data(), ref, n * 4, cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(b.data(), out, n * 4, cudaMemcpyDeviceToHost));
  double err = 0, max_ref = 0;
  for (int64_t i = 0; i < n; ++i) {
    err = std::max(err, double(std::abs(a[i] - b[i])));
    max_ref = std::max(max_ref, double(std::abs(a[i])));
  }
  const double tol = 1e-5 * max_ref;  // fp32 summation order only
  std::printf("fp32 B=%d L=%d C=%d shipped vs first: max abs error %.3g (tolerance %.3g)%s\n", batch, length,
              channels, err, tol, err <= tol ? "" : "  FAIL");
  failures += !(err <= tol);
  for (float** p : ptrs) CK(cudaFree(*p));
  CK(cudaFree(tmp));
  CK(cudaFree(ref));
  CK(cudaFree(out));
}

int main() {
  semvoc_bench::PrintDevice();
  cudaStream_t stream;
  CK(cudaStreamCreate(&stream));
  std::printf("ConvNeXtMix fp16, K=%d, cond/time_scale tables of %d; bytes = x + cond + out (+ scale, weights); "
              "bound at %.1f TB/s; * = what the op launches (LaunchMixShipped)\n", kTaps, kTable, kBandwidth / 1e12);
  std::printf("%-22s %-12s %9s %8s %9s %10s  %s\n", "shape", "variant", "us/call", "GB/s", "bound us", "max err",
              "tests");
  for (int batch : {16, 1}) {
    for (auto [length, channels] : {std::pair{1000, 768}, std::pair{2000, 512}, std::pair{4000, 384}}) {
      RunShape(batch, length, channels, stream);
    }
  }
  // fp32 and the scalar fallback (C not a multiple of 4), odd lengths
  CheckFloat(2, 1001, 384, stream);
  CheckFloat(2, 37, 77, stream);
  CheckFloat(1, 1003, 1000, stream);
  std::printf(failures ? "FAILED: %d check(s)\n" : "all checks passed\n", failures);
  return failures ? 1 : 0;
}
