// ConvNeXtMix's kernels, shared by the op (convnext_mix.cu) and its micro-benchmark
// (benchmarks/device/kernel_bench/convnext_mix_bench.cu), so that the benchmark times the shipped code.
//   y   = depthwise_conv1d(x, weight, bias) along L        (kernel K, "same" zero padding)
//   y   = y * mean_c((y - norm_bias)^2) ** -0.5 * exp(log_scale)   (BiasNorm over channels)
//   out = (y + cond_bias) * time_scale
// x, cond are [B, L, C] channels-last (cond of batch row b at cond + b * cond_stride, stride 0
// for a broadcast row); scale is one [C] row per batch row at scale + b * scale_stride. out has
// rows of out_row >= C elements (0: C): the op's `lead` columns come before each row's C.
#pragma once

#include <type_traits>

#include "ort_op.h"

namespace semvoc {

template <typename T>
struct MixArgs {
  const T* x;
  const T* weight;     // [C, 1, K]
  const T* bias;       // [C]
  const T* norm_bias;  // [C]
  const T* log_scale;  // [1]
  const T* cond;       // entry `layer` of the table, [B|1, L, C]
  const T* scale;      // entry `layer` of the table, rows of [C]
  T* out;              // the first output row's C values (after its lead columns)
  int channels, length;
  int64_t cond_stride, scale_stride;
  int out_row = 0;     // elements from one output row to the next; 0: channels

  __host__ __device__ int OutRow() const { return out_row > 0 ? out_row : channels; }
};

// ----------------------------------------------------------------------------------------------
// The first kernel (kept for A/B runs: convnext_mix.cu's kMixUseFirstKernel switches the op back).
// One block of 256 threads per (8 frames, batch row). A thread owns up to 4 channels (C <= 1024):
// it reads each channel's 8 + K - 1 input frames once, keeps the 8 conv outputs in registers, and
// the block reduces the per-frame sums of squares before cond_bias is read and the outputs written.

constexpr int kMixFrames = 8;
constexpr int kMixThreads = 256;
constexpr int kMixChannelsPerThread = 4;
constexpr int kMixMaxChannels = kMixThreads * kMixChannelsPerThread;

template <typename T, int K>
__global__ void __launch_bounds__(kMixThreads)
ConvNeXtMixKernel(const T* __restrict__ x, const T* __restrict__ weight, const T* __restrict__ bias,
                  const T* __restrict__ norm_bias, const T* __restrict__ log_scale, const T* __restrict__ cond,
                  const T* __restrict__ scale, T* __restrict__ out, int channels, int length,
                  int64_t cond_stride, int64_t scale_stride, int out_row) {
  __shared__ float partial[kMixThreads / 32][kMixFrames];
  __shared__ float inv_norm[kMixFrames];
  const int b = blockIdx.y;
  const int t0 = blockIdx.x * kMixFrames;
  const int64_t row = static_cast<int64_t>(channels);
  const T* xb = x + static_cast<int64_t>(b) * length * row;

  float y[kMixChannelsPerThread][kMixFrames];
  float sumsq[kMixFrames];
#pragma unroll
  for (int f = 0; f < kMixFrames; ++f) sumsq[f] = 0.f;

#pragma unroll
  for (int j = 0; j < kMixChannelsPerThread; ++j) {
    const int c = threadIdx.x + j * kMixThreads;
    if (c < channels) {
      float window[kMixFrames + K - 1];
#pragma unroll
      for (int i = 0; i < kMixFrames + K - 1; ++i) {
        const int s = t0 - K / 2 + i;
        window[i] = (s >= 0 && s < length) ? ToFloat(xb[s * row + c]) : 0.f;
      }
      float w[K];
#pragma unroll
      for (int k = 0; k < K; ++k) w[k] = ToFloat(weight[c * K + k]);
      const float conv_bias = ToFloat(bias[c]), centre = ToFloat(norm_bias[c]);
#pragma unroll
      for (int f = 0; f < kMixFrames; ++f) {
        float acc = conv_bias;
#pragma unroll
        for (int k = 0; k < K; ++k) acc += w[k] * window[f + k];
        y[j][f] = acc;
        const float d = acc - centre;
        sumsq[f] += d * d;
      }
    }
  }

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int f = 0; f < kMixFrames; ++f) {
    const float v = WarpSum(sumsq[f]);
    if (lane == 0) partial[warp][f] = v;
  }
  __syncthreads();
  if (threadIdx.x < kMixFrames) {
    float total = 0.f;
#pragma unroll
    for (int w = 0; w < kMixThreads / 32; ++w) total += partial[w][threadIdx.x];
    inv_norm[threadIdx.x] = rsqrtf(total / channels) * expf(ToFloat(log_scale[0]));
  }
  __syncthreads();

  const T* cb = cond + b * cond_stride;
  const T* sb = scale + b * scale_stride;
  T* ob = out + static_cast<int64_t>(b) * length * out_row;
#pragma unroll
  for (int j = 0; j < kMixChannelsPerThread; ++j) {
    const int c = threadIdx.x + j * kMixThreads;
    if (c < channels) {
      const float time_scale = ToFloat(sb[c]);
#pragma unroll
      for (int f = 0; f < kMixFrames; ++f) {
        const int t = t0 + f;
        if (t < length) {
          const int64_t i = t * row + c;
          ob[t * int64_t{out_row} + c] = FromFloat<T>((y[j][f] * inv_norm[f] + ToFloat(cb[i])) * time_scale);
        }
      }
    }
  }
}

template <typename T, int K>
inline void LaunchMixFirst(const MixArgs<T>& a, int batch, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((a.length + kMixFrames - 1) / kMixFrames), static_cast<unsigned>(batch));
  ConvNeXtMixKernel<T, K><<<grid, kMixThreads, 0, stream>>>(a.x, a.weight, a.bias, a.norm_bias, a.log_scale,
                                                             a.cond, a.scale, a.out, a.channels, a.length,
                                                             a.cond_stride, a.scale_stride, a.OutRow());
}

// ----------------------------------------------------------------------------------------------
// The run kernel. A thread owns V adjacent channels (one V-wide vector access) and a run of F
// consecutive frames. The first kernel held one channel's loads in flight at a time (64 registers
// leave no room for more), read cond_bias only after the block barrier (a second exposed memory
// round trip), and left half its 256 threads idle at C = 384 and 512. Here:
//  - every global load of the thread (F + K - 1 input frames, F cond frames, the time scale, the
//    weights) is issued before the first use, in V-wide accesses, so the barrier waits on one
//    round trip only;
//  - a run is ceil(C / V) threads rounded up to whole warps, and a block holds 256 / run of them,
//    so no warp straddles two runs (C = 384, 512, 768 with V = 4: 96, 128, 192 threads, no idle lane);
//  - one barrier: each warp's per-frame partial sums go to shared memory, and every thread adds
//    its own run's partials (broadcast reads) instead of waiting on a second barrier.
// PREFETCH = false reads cond after the barrier as the first kernel did, MIN_BLOCKS > 1 caps the
// registers so that many blocks fit on a multiprocessor (benchmark ablations).

constexpr int kMixRunThreads = 256;  // threads per block aimed at (whole runs: a block has at least one)

template <int V>
__host__ __device__ constexpr int MixRunMaxThreads() { return V == 1 ? 1024 : (V == 2 ? 512 : 256); }  // one run of C <= 1024

// V elements at p when ok, else zeros. Loaded as 32-bit words (a 2-byte scalar for one fp16), so
// the zeros cost one register move per word, not a byte permute per fp16 element.
template <typename T, int V>
__device__ __forceinline__ Vec<T, V> LoadOrZero(const T* p, bool ok) {
  constexpr int kBytes = sizeof(T) * V;
  using Word = typename std::conditional<kBytes == 2, unsigned short, unsigned>::type;
  struct alignas(kBytes) Raw {
    Word w[kBytes / sizeof(Word)];
  };
  Raw raw{};
  if (ok) raw = *reinterpret_cast<const Raw*>(p);
  Vec<T, V> r;
  memcpy(&r, &raw, kBytes);
  return r;
}

template <typename T, int K, int V, int F, bool PREFETCH, int MIN_BLOCKS>
__global__ void __launch_bounds__(MixRunMaxThreads<V>(), MIN_BLOCKS)
ConvNeXtMixRunKernel(const MixArgs<T> a, const int run_threads) {
  using VT = Vec<T, V>;
  __shared__ float partial[MixRunMaxThreads<V>() / 32][F];  // [warp][frame]
  const int run = threadIdx.x / run_threads, c0 = (threadIdx.x % run_threads) * V;
  const bool active = c0 < a.channels;
  const int b = blockIdx.y;
  const int t0 = (blockIdx.x * (blockDim.x / run_threads) + run) * F;
  // Row offsets in 32 bits (the op checks L * C < 2^31); a frame before the start wraps to a
  // large unsigned value, so one unsigned compare tests both ends.
  const unsigned length = a.length, row = a.channels;
  const T* __restrict__ xb = a.x + static_cast<int64_t>(b) * a.length * a.channels + c0;
  const T* __restrict__ cb = a.cond + b * a.cond_stride + c0;
  const T* __restrict__ sb = a.scale + b * a.scale_stride + c0;
  const unsigned s0 = static_cast<unsigned>(t0 - K / 2);

  VT window[F + K - 1];
#pragma unroll
  for (int i = 0; i < F + K - 1; ++i) {
    const unsigned s = s0 + i;
    window[i] = LoadOrZero<T, V>(xb + s * row, active && s < length);
  }
  VT cond[F], time_scale;
  if (PREFETCH) {
#pragma unroll
    for (int f = 0; f < F; ++f) {
      const unsigned t = t0 + f;
      cond[f] = LoadOrZero<T, V>(cb + t * row, active && t < length);
    }
    time_scale = LoadOrZero<T, V>(sb, active);
  }
  // the V channels' K taps are V * K adjacent weights: K vector loads
  VT taps[K];
#pragma unroll
  for (int k = 0; k < K; ++k) taps[k] = LoadOrZero<T, V>(a.weight + c0 * K + k * V, active);
  const VT conv_bias = LoadOrZero<T, V>(a.bias + c0, active), centre = LoadOrZero<T, V>(a.norm_bias + c0, active);
  const float gain = expf(ToFloat(a.log_scale[0]));

  float y[F][V], sumsq[F];
#pragma unroll
  for (int f = 0; f < F; ++f) sumsq[f] = 0.f;
#pragma unroll
  for (int v = 0; v < V; ++v) {
    if (active) {  // an inactive lane adds nothing to the sums of squares
      float w[K];
#pragma unroll
      for (int k = 0; k < K; ++k) w[k] = ToFloat(taps[(v * K + k) / V].v[(v * K + k) % V]);
      const float bias_v = ToFloat(conv_bias.v[v]), centre_v = ToFloat(centre.v[v]);
#pragma unroll
      for (int f = 0; f < F; ++f) {
        float acc = bias_v;
#pragma unroll
        for (int k = 0; k < K; ++k) acc += w[k] * ToFloat(window[f + k].v[v]);
        y[f][v] = acc;
        const float d = acc - centre_v;
        sumsq[f] += d * d;
      }
    }
  }

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int f = 0; f < F; ++f) {
    const float s = WarpSum(sumsq[f]);
    if (lane == 0) partial[warp][f] = s;
  }
  __syncthreads();
  if (!active) return;  // after the barrier: every thread took part in it
  const int run_warps = run_threads / 32, first = run * run_warps;
  float total[F];
#pragma unroll
  for (int f = 0; f < F; ++f) total[f] = 0.f;
  for (int w = 0; w < run_warps; ++w) {
#pragma unroll
    for (int f = 0; f < F; ++f) total[f] += partial[first + w][f];
  }

  if (!PREFETCH) {
#pragma unroll
    for (int f = 0; f < F; ++f) {
      const unsigned t = t0 + f;
      cond[f] = LoadOrZero<T, V>(cb + t * row, t < length);
    }
    time_scale = LoadOrZero<T, V>(sb, true);
  }
  const unsigned out_row = a.OutRow();
  T* __restrict__ ob = a.out + static_cast<int64_t>(b) * a.length * out_row + c0;
#pragma unroll
  for (int f = 0; f < F; ++f) {
    const unsigned t = t0 + f;
    if (t < length) {
      const float inv_norm = rsqrtf(total[f] / a.channels) * gain;
      VT o;
#pragma unroll
      for (int v = 0; v < V; ++v) {
        o.v[v] = FromFloat<T>((y[f][v] * inv_norm + ToFloat(cond[f].v[v])) * ToFloat(time_scale.v[v]));
      }
      *reinterpret_cast<VT*>(ob + t * out_row) = o;
    }
  }
}

// Whether the run kernel may use V-wide accesses: C and the output row a multiple of V, every
// buffer but the scalars aligned.
template <typename T, int V>
inline bool MixVectorizable(const MixArgs<T>& a) {
  if (a.channels % V != 0 || a.OutRow() % V != 0) return false;
  for (const void* p : {static_cast<const void*>(a.x), static_cast<const void*>(a.cond),
                        static_cast<const void*>(a.scale), static_cast<const void*>(a.out),
                        static_cast<const void*>(a.weight), static_cast<const void*>(a.bias),
                        static_cast<const void*>(a.norm_bias)}) {
    if (reinterpret_cast<uintptr_t>(p) % (V * sizeof(T)) != 0) return false;
  }
  return true;
}

// Needs C <= 1024 and MixVectorizable<T, V> (the op checks both).
template <typename T, int K, int V, int F, bool PREFETCH = true, int MIN_BLOCKS = 1>
inline void LaunchMixRuns(const MixArgs<T>& a, int batch, cudaStream_t stream) {
  const int run_threads = ((a.channels + V - 1) / V + 31) / 32 * 32;
  const int runs = std::max(1, kMixRunThreads / run_threads);
  const int frames = runs * F;
  const dim3 grid(static_cast<unsigned>((a.length + frames - 1) / frames), static_cast<unsigned>(batch));
  ConvNeXtMixRunKernel<T, K, V, F, PREFETCH, MIN_BLOCKS><<<grid, runs * run_threads, 0, stream>>>(a, run_threads);
}

// What the op launches: 4 channels per thread (8-byte fp16, 16-byte fp32 accesses) and runs of 8
// frames where the layout allows, else one channel per thread. In fp16, registers are capped at
// 128 so that two blocks of 256 threads fit on a multiprocessor (C = 512: two runs of 128 threads);
// fp32 would spill under that cap.
template <typename T, int K>
inline void LaunchMixShipped(const MixArgs<T>& a, int batch, cudaStream_t stream) {
  if (MixVectorizable<T, 4>(a)) {
    LaunchMixRuns<T, K, 4, 8, true, sizeof(T) == 2 ? 2 : 1>(a, batch, stream);
  } else {
    LaunchMixRuns<T, K, 1, 8>(a, batch, stream);
  }
}

}  // namespace semvoc
