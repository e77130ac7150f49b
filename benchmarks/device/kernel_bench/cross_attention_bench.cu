// Micro-benchmark of CrossAttention (src/semvoc/kernels/cuda/cross_attention_kernel.cuh, the library's
// own kernel source) at the reference DiT's shapes: q, out [R, 250, 16*64], k, v [R, 128, 16*64] fp16,
// key_mask [R/2, 128] bool (the CFG batch reads its text mask twice), R = 2 (batch 1) and 32 (batch
// 16), with 8, 32 and 128 true keys per text, and at R = 32 texts of 5 to 30 tokens (AudioCaps-like).
// Variants:
//   baseline  the function as onnxruntime's graph computes it today, written plainly: an additive
//             mask bias (0 / fp16 lowest) over all S keys, fp32 logits to memory, a softmax kernel
//             (fully masked rows -> zeros), a PV kernel: 3 launches, every padded key's work done
//   library   what cross_attention.cu launches (the tensor-core kernel, 64 queries per block)
//   mma-32q   the same kernel with 2 warps (32 queries) per block: twice the blocks at R = 2
//   general   the general kernel (one warp per query and head), the fallback for other shapes
// Every variant is checked against a double-precision host reference (max abs error; FAIL above
// the tolerance below). Times: CUDA-graph replays of 20 back-to-back calls, median of 25 replays,
// inputs rotated through >= 256 MB of copies (from HBM, not L2). bytes = q + out + the K/V rows up
// to each text's last true key + the mask (what a kernel must move); bound = bytes / 4.0 TB/s.
//   benchmarks/device/kernel_bench/run.sh cross_attention
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "bench_common.cuh"
#include "cross_attention_kernel.cuh"

using namespace semvoc;

namespace {

constexpr double kBandwidth = 4.0e12;  // bytes/s: the bound column (H200 HBM3e, 4.8 TB/s peak)
constexpr int kCallsPerGraph = 20, kReplays = 25, kWarmup = 3;
constexpr int kLength = 250, kKeys = 128, kHeads = 16, kHd = 64, kWidth = kHeads * kHd;
int g_failures = 0;

// ---------------------------------------------------------------- baseline: today's sequence, plainly
// logits[r, h, l, j] = q . k * scale + bias[r % mask_rows, j] (fp32, all S keys)
__global__ void BaselineLogits(const __half* q, const __half* k, const __half* bias, float* logits, int rows,
                               int mask_rows, float scale) {
  const int64_t n = static_cast<int64_t>(rows) * kHeads * kLength * kKeys;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int j = static_cast<int>(i % kKeys), l = static_cast<int>(i / kKeys % kLength);
    const int h = static_cast<int>(i / (int64_t(kKeys) * kLength) % kHeads);
    const int r = static_cast<int>(i / (int64_t(kKeys) * kLength * kHeads));
    const __half* qv = q + (int64_t(r) * kLength + l) * kWidth + h * kHd;
    const __half* kv = k + (int64_t(r) * kKeys + j) * kWidth + h * kHd;
    float dot = 0.f;
    for (int d = 0; d < kHd; ++d) dot += __half2float(qv[d]) * __half2float(kv[d]);
    logits[i] = dot * scale + __half2float(bias[(r % mask_rows) * kKeys + j]);
  }
}

// softmax over each row of S logits in place (one warp per row); a row whose keys are all masked
// gets zeros (onnxruntime's ZeroFullyMaskedRows)
__global__ void BaselineSoftmax(float* logits, const bool* mask, int rows, int mask_rows) {
  const int64_t warp = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (warp >= int64_t(rows) * kHeads * kLength) return;
  const int r = static_cast<int>(warp / (int64_t(kHeads) * kLength));
  float* row = logits + warp * kKeys;
  float m = -INFINITY;
  bool any = false;
  for (int j = lane; j < kKeys; j += 32) {
    m = fmaxf(m, row[j]);
    any |= mask[(r % mask_rows) * kKeys + j];
  }
  for (int o = 16; o; o /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
  any = __any_sync(0xffffffffu, any);
  float sum = 0.f;
  for (int j = lane; j < kKeys; j += 32) sum += expf(row[j] - m);
  sum = WarpSum(sum);
  for (int j = lane; j < kKeys; j += 32) row[j] = any ? expf(row[j] - m) / sum : 0.f;
}

// out[r, l, h, d] = sum_j p[r, h, l, j] v[r, j, h, d] (all S keys)
__global__ void BaselinePv(const float* p, const __half* v, __half* out, int rows) {
  const int64_t n = static_cast<int64_t>(rows) * kLength * kWidth;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int d = static_cast<int>(i % kHd), h = static_cast<int>(i / kHd % kHeads);
    const int l = static_cast<int>(i / kWidth % kLength), r = static_cast<int>(i / (int64_t(kWidth) * kLength));
    const float* pr = p + ((int64_t(r) * kHeads + h) * kLength + l) * kKeys;
    const __half* vv = v + int64_t(r) * kKeys * kWidth + h * kHd + d;
    float acc = 0.f;
    for (int j = 0; j < kKeys; ++j) acc += pr[j] * __half2float(vv[int64_t(j) * kWidth]);
    out[i] = __float2half_rn(acc);
  }
}

struct Set {  // one copy of the per-call tensors
  __half *q, *k, *v, *out;
};

using Launch = std::function<void(const Set&, cudaStream_t)>;

// valid[m]: true keys (a prefix) of mask row m
void RunShape(int rows, const std::vector<int>& valid, const char* label) {
  const int mask_rows = static_cast<int>(valid.size());
  const int64_t n_q = int64_t(rows) * kLength * kWidth, n_kv = int64_t(rows) * kKeys * kWidth;
  std::mt19937 rng(1234 + rows);
  std::normal_distribution<float> normal(0.f, 1.f);
  std::vector<__half> hq(n_q), hk(n_kv), hv(n_kv);
  for (auto& x : hq) x = __float2half_rn(normal(rng));
  for (auto& x : hk) x = __float2half_rn(normal(rng));
  for (auto& x : hv) x = __float2half_rn(normal(rng));
  std::vector<uint8_t> hmask(size_t(mask_rows) * kKeys, 0);
  std::vector<__half> hbias(hmask.size(), __float2half_rn(-65504.f));  // fp16 lowest, as key_mask_bias
  for (int m = 0; m < mask_rows; ++m)
    for (int j = 0; j < valid[m]; ++j) {
      hmask[m * kKeys + j] = 1;
      hbias[m * kKeys + j] = __float2half_rn(0.f);
    }

  // double reference over the true keys
  std::vector<double> ref(n_q);
  double max_v = 0;
  for (const auto& x : hv) max_v = std::max(max_v, std::fabs(double(__half2float(x))));
  std::vector<double> w(kKeys);
  for (int r = 0; r < rows; ++r)
    for (int h = 0; h < kHeads; ++h)
      for (int l = 0; l < kLength; ++l) {
        const int n = valid[r % mask_rows];
        const __half* qv = &hq[(int64_t(r) * kLength + l) * kWidth + h * kHd];
        double m = -INFINITY, sum = 0;
        for (int j = 0; j < n; ++j) {
          const __half* kv = &hk[(int64_t(r) * kKeys + j) * kWidth + h * kHd];
          double dot = 0;
          for (int d = 0; d < kHd; ++d) dot += double(__half2float(qv[d])) * __half2float(kv[d]);
          w[j] = dot / std::sqrt(double(kHd));
          m = std::max(m, w[j]);
        }
        for (int j = 0; j < n; ++j) sum += (w[j] = std::exp(w[j] - m));
        double* o = &ref[(int64_t(r) * kLength + l) * kWidth + h * kHd];
        for (int d = 0; d < kHd; ++d) {
          double acc = 0;
          for (int j = 0; j < n; ++j) acc += w[j] * __half2float(hv[(int64_t(r) * kKeys + j) * kWidth + h * kHd + d]);
          o[d] = n ? acc / sum : 0.0;
        }
      }

  // device buffers
  bool* dmask;
  __half* dbias;
  float* dlogits;
  CK(cudaMalloc(&dmask, hmask.size()));
  CK(cudaMalloc(&dbias, hbias.size() * 2));
  CK(cudaMalloc(&dlogits, int64_t(rows) * kHeads * kLength * kKeys * 4));
  CK(cudaMemcpy(dmask, hmask.data(), hmask.size(), cudaMemcpyHostToDevice));
  CK(cudaMemcpy(dbias, hbias.data(), hbias.size() * 2, cudaMemcpyHostToDevice));
  const double set_bytes = double(2 * n_q + 2 * n_kv) * 2;
  const int sets = static_cast<int>(std::min(64.0, std::max(2.0, std::ceil(256e6 / set_bytes))));
  std::vector<Set> buf(sets);
  for (auto& b : buf) {
    CK(cudaMalloc(&b.q, n_q * 2));
    CK(cudaMalloc(&b.out, n_q * 2));
    CK(cudaMalloc(&b.k, n_kv * 2));
    CK(cudaMalloc(&b.v, n_kv * 2));
    CK(cudaMemcpy(b.q, hq.data(), n_q * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(b.k, hk.data(), n_kv * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(b.v, hv.data(), n_kv * 2, cudaMemcpyHostToDevice));
  }

  const float scale = 1.f / std::sqrt(float(kHd));
  std::vector<std::pair<std::string, Launch>> variants = {
      {"baseline", [=](const Set& s, cudaStream_t st) {
         BaselineLogits<<<4096, 256, 0, st>>>(s.q, s.k, dbias, dlogits, rows, mask_rows, scale);
         const int64_t warps = int64_t(rows) * kHeads * kLength;
         BaselineSoftmax<<<static_cast<unsigned>((warps * 32 + 255) / 256), 256, 0, st>>>(dlogits, dmask, rows,
                                                                                          mask_rows);
         BaselinePv<<<4096, 256, 0, st>>>(dlogits, s.v, s.out, rows);
       }},
      {"library", [=](const Set& s, cudaStream_t st) {
         LaunchCrossAttention<__half>(s.q, s.k, s.v, dmask, s.out, rows, kLength, kKeys, kHeads, kHd, mask_rows, st);
       }},
      {"mma-32q", [=](const Set& s, cudaStream_t st) {
         LaunchCrossAttentionMma<2>(s.q, s.k, s.v, dmask, s.out, rows, kLength, kKeys, kHeads, mask_rows, st);
       }},
      {"general", [=](const Set& s, cudaStream_t st) {
         LaunchCrossAttentionWarp<__half>(s.q, s.k, s.v, dmask, s.out, rows, kLength, kKeys, kHeads, kHd, mask_rows,
                                          st);
       }},
  };

  // bytes a kernel must move: q, out, K and V rows up to each text's last true key, the mask
  double kv_rows = 0;
  for (int r = 0; r < rows; ++r) kv_rows += valid[r % mask_rows];
  const double bytes = 2.0 * n_q * 2 + 2.0 * kv_rows * kWidth * 2 + double(hmask.size());
  const double bound_us = bytes / kBandwidth * 1e6;

  cudaStream_t stream;
  CK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  std::vector<__half> got(n_q);
  char shape[96];
  std::snprintf(shape, sizeof shape, "R=%d L=%d S=%d H=%d hd=%d %s", rows, kLength, kKeys, kHeads, kHd, label);
  for (const auto& [name, launch] : variants) {
    CK(cudaMemset(buf[0].out, 0xff, n_q * 2));  // NaN everywhere: an unwritten element fails
    launch(buf[0], stream);
    CK(cudaGetLastError());
    CK(cudaStreamSynchronize(stream));
    CK(cudaMemcpy(got.data(), buf[0].out, n_q * 2, cudaMemcpyDeviceToHost));
    // Tolerance: the tensor-core kernel rounds P (in [0, 1]) to fp16 before PV, a relative error
    // <= 2^-11 per weight, so |sum p v / sum p - exact| <= 2^-11 max|v|; plus one rounding of the
    // output (<= 1 fp16 ulp at the value). fp32 accumulation adds ~1e-6 relative.
    semvoc_bench::Fp16Errors errors;
    for (int64_t i = 0; i < n_q; ++i) errors.Add(__half2float(got[i]), ref[i], std::ldexp(max_v, -11));
    // C++17 lambdas cannot capture a structured binding by name: bind a reference to it
    auto call = [&, &launch = launch](int c, cudaStream_t st) { launch(buf[c % sets], st); };
    const double us = semvoc_bench::GraphUsPerCall(call, kCallsPerGraph, kReplays, kWarmup, stream);
    std::printf("%-42s %-9s %9.2f %8.0f %9.2f %10.3g %6.2f\n", shape, name.c_str(), us, bytes / (us * 1e-6) / 1e9,
                bound_us, errors.err, errors.worst);
    if (!(errors.worst <= 1.0)) {
      std::printf("FAIL %s %s: max abs error %.3g is %.3g x the tolerance\n", shape, name.c_str(), errors.err,
                  errors.worst);
      ++g_failures;
    }
    std::fflush(stdout);
  }
  for (auto& b : buf) {
    CK(cudaFree(b.q));
    CK(cudaFree(b.k));
    CK(cudaFree(b.v));
    CK(cudaFree(b.out));
  }
  CK(cudaFree(dmask));
  CK(cudaFree(dbias));
  CK(cudaFree(dlogits));
  CK(cudaStreamDestroy(stream));
}

// The general kernel in fp32 (fp32 engines) against the same double reference, at a small shape.
void CheckFloat() {
  const int rows = 2, length = 37, keys = 45, heads = 3, hd = 40, width = heads * hd;
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.f, 1.f);
  std::vector<float> q(rows * length * width), k(rows * keys * width), v(k.size()), out(q.size());
  for (auto& x : q) x = normal(rng);
  for (auto& x : k) x = normal(rng);
  for (auto& x : v) x = normal(rng);
  std::vector<uint8_t> mask(rows * keys, 0);
  for (int j = 0; j < keys; j += 3) mask[j] = 1;  // row 0: every third key; row 1: none (zeros)
  float *dq, *dk, *dv, *dout;
  bool* dmask;
  CK(cudaMalloc(&dq, q.size() * 4));
  CK(cudaMalloc(&dk, k.size() * 4));
  CK(cudaMalloc(&dv, v.size() * 4));
  CK(cudaMalloc(&dout, out.size() * 4));
  CK(cudaMalloc(&dmask, mask.size()));
  CK(cudaMemcpy(dq, q.data(), q.size() * 4, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(dk, k.data(), k.size() * 4, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(dv, v.data(), v.size() * 4, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(dmask, mask.data(), mask.size(), cudaMemcpyHostToDevice));
  LaunchCrossAttention<float>(dq, dk, dv, dmask, dout, rows, length, keys, heads, hd, rows, nullptr);
  CK(cudaGetLastError());
  CK(cudaMemcpy(out.data(), dout, out.size() * 4, cudaMemcpyDeviceToHost));
  double err = 0, max_ref = 0;
  std::vector<double> w(keys);
  for (int r = 0; r < rows; ++r)
    for (int l = 0; l < length; ++l)
      for (int h = 0; h < heads; ++h) {
        double m = -INFINITY, sum = 0;
        for (int j = 0; j < keys; ++j) {
          if (!mask[r * keys + j]) continue;
          double dot = 0;
          for (int d = 0; d < hd; ++d) dot += double(q[(r * length + l) * width + h * hd + d]) * k[(r * keys + j) * width + h * hd + d];
          m = std::max(m, w[j] = dot / std::sqrt(double(hd)));
        }
        for (int j = 0; j < keys; ++j)
          if (mask[r * keys + j]) sum += (w[j] = std::exp(w[j] - m));
        for (int d = 0; d < hd; ++d) {
          double acc = 0;
          for (int j = 0; j < keys; ++j)
            if (mask[r * keys + j]) acc += w[j] * v[(r * keys + j) * width + h * hd + d];
          const double want = sum > 0 ? acc / sum : 0.0, g = out[(r * length + l) * width + h * hd + d];
          err = std::max(err, std::isfinite(g) ? std::fabs(g - want) : INFINITY);
          max_ref = std::max(max_ref, std::fabs(want));
        }
      }
  const double tol = 1e-5 * std::max(1.0, max_ref);  // fp32 arithmetic, a different summation order
  std::printf("fp32 general kernel R=%d L=%d S=%d H=%d hd=%d (a row without true keys): max abs error %.3g "
              "(tolerance %.3g)%s\n", rows, length, keys, heads, hd, err, tol, err <= tol ? "" : "  FAIL");
  if (!(err <= tol)) {
    std::printf("FAIL fp32 general kernel: max abs error %.3g > %.3g\n", err, tol);
    ++g_failures;
  }
  for (void* p : {static_cast<void*>(dq), static_cast<void*>(dk), static_cast<void*>(dv), static_cast<void*>(dout),
                  static_cast<void*>(dmask)})
    CK(cudaFree(p));
}

}  // namespace

int main() {
  semvoc_bench::PrintDevice();
  std::printf("CrossAttention fp16, mask [R/2, S]; us/call: median of %d CUDA-graph replays of %d calls, inputs "
              "rotated through >= 256 MB; bytes = q + out + K/V rows up to the last true key + mask; bound = bytes "
              "/ %.1f TB/s;\nerr = max abs error vs a double host reference; tol = worst error / (1 fp16 ulp + "
              "2^-11 max|v|), > 1 is a FAIL\n", kReplays, kCallsPerGraph, kBandwidth / 1e12);
  std::printf("%-42s %-9s %9s %8s %9s %10s %6s\n", "shape", "variant", "us/call", "GB/s", "bound us", "err", "tol");
  for (int rows : {2, 32}) {
    for (int n : {8, 32, 128}) {
      char label[32];
      std::snprintf(label, sizeof label, "keys=%d", n);
      RunShape(rows, std::vector<int>(rows / 2, n), label);
    }
  }
  // batch 16 with texts of 5 to 30 tokens (typical captions)
  std::vector<int> mixed(16);
  for (int i = 0; i < 16; ++i) mixed[i] = 5 + (i * 7) % 26;
  RunShape(32, mixed, "keys=5..30");
  CheckFloat();
  std::printf(g_failures ? "FAILED: %d check(s)\n" : "all checks passed\n", g_failures);
  return g_failures ? 1 : 0;
}
