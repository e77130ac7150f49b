// The DiT's U-Net skip path and its LayerNorms, one pass over each row. Shared by the library
// (skip_norm.cu) and the micro-benchmark (benchmarks/device/kernel_bench/skip_norm_bench.cu), so
// that what the bench times is what ships.
//
// GatedConcatNorm (a skip block's input: the previous block's pending MLP output, then skip_norm):
//   sum = x + out * gate[d] + gbias[d]                      (rounded to T: the value the graph held)
//   h   = LayerNorm_2D([sum, skip]) * gamma[c] + beta[c]    (gamma, beta [2D]; h [..., 2D])
// BiasAddNorm (skip_linear's bias, then norm1 with the adaLN modulation folded into its affine):
//   sum = y + bias[d]                                       (the new residual stream, an output)
//   h   = LayerNorm_D(sum) * gamma[d] + beta[d]
// LayerNorm (the first block's norm1): BiasAddNorm without the bias and without the sum output.
//
// kWarps warps per row (per token): one, four rows to a block, or four, a block per row where
// the row is at most 2 x 128 16-byte vectors (the DiT's D = 1024 in fp16: the row's loads all in
// flight at once, where one warp issued 8 vectors per lane one after another). A thread keeps its
// share of the row in registers (16-byte vectors where D and the buffers allow), so every input
// is read once and every output written once. Statistics in fp32, two passes over the registers
// (mean, then squared deviations), across a row's warps through shared memory. No allocation:
// CUDA-graph safe. $SEMVOC_NORM_ROWS=warp keeps one warp per row (A/B measurements).
// References: semvoc/kernels/skip_norm.py.
#pragma once

#include <type_traits>

#include "ort_op.h"

namespace semvoc {

constexpr int kSkipNormRowsPerBlock = 4;  // rows of one warp per block of 128 threads
constexpr int kSkipNormRowWarps = 4;      // warps of a row that takes a block

template <int kWarps>
__host__ __device__ constexpr int SkipNormRowsPerBlock() { return kWarps == 1 ? kSkipNormRowsPerBlock : 1; }
template <int kWarps>
__host__ __device__ constexpr int SkipNormThreads() { return 32 * kWarps * SkipNormRowsPerBlock<kWarps>(); }

// Statistics of a row held as kHalves x kMaxVec x V floats per thread (entries past `vectors`
// unused), over the row's kWarps warps: thread `t` of the row holds vectors t + 32 kWarps i.
// `partial` is the row's 2 x kWarps floats of shared memory (unused for one warp).
template <int kWarps, int kHalves, int kMaxVec, int V>
__device__ __forceinline__ void RowStatistics(const float (&v)[kHalves][kMaxVec][V], int t, int vectors,
                                              float count, float eps, float* partial, float& mean, float& rstd) {
  float total = 0.f;
#pragma unroll
  for (int half = 0; half < kHalves; ++half)
#pragma unroll
    for (int i = 0; i < kMaxVec; ++i)
      if (t + 32 * kWarps * i < vectors) {
#pragma unroll
        for (int k = 0; k < V; ++k) total += v[half][i][k];
      }
  mean = RowSum<kWarps>(total, t, partial) / count;
  float squares = 0.f;
#pragma unroll
  for (int half = 0; half < kHalves; ++half)
#pragma unroll
    for (int i = 0; i < kMaxVec; ++i)
      if (t + 32 * kWarps * i < vectors) {
#pragma unroll
        for (int k = 0; k < V; ++k) squares += (v[half][i][k] - mean) * (v[half][i][k] - mean);
      }
  rstd = rsqrtf(RowSum<kWarps>(squares, t, partial + kWarps) / count + eps);
}

// x, out, skip [rows, width]; gate, gbias [width]; gamma, beta [2 width]; h [rows, 2 width].
// Lane `lane` owns vector j = lane + 32 i of both halves: x/out/skip at the same index, so the
// halves never diverge and the concatenation is only an output offset.
template <typename T, int V, int kMaxVec, int kWarps = 1>
__global__ void __launch_bounds__(SkipNormThreads<kWarps>()) GatedConcatNormKernel(
    const T* __restrict__ x, const T* __restrict__ out, const T* __restrict__ gate, const T* __restrict__ gbias,
    const T* __restrict__ skip, const T* __restrict__ gamma, const T* __restrict__ beta, T* __restrict__ h,
    int64_t rows, int width, float eps) {
  __shared__ float partial[2 * kWarps];
  const int64_t row = static_cast<int64_t>(blockIdx.x) * SkipNormRowsPerBlock<kWarps>() + threadIdx.x / (32 * kWarps);
  const int lane = threadIdx.x % (32 * kWarps);  // the thread's index within its row
  if (kWarps == 1 && row >= rows) return;  // (a row of several warps has a block: row < rows)
  const int vectors = width / V;
  using Vector = Vec<T, V>;
  const Vector* xr = reinterpret_cast<const Vector*>(x + row * width);
  const Vector* orow = reinterpret_cast<const Vector*>(out + row * width);
  const Vector* sr = reinterpret_cast<const Vector*>(skip + row * width);
  float v[2][kMaxVec][V];  // [0]: the gated sum, [1]: the skip
#pragma unroll
  for (int i = 0; i < kMaxVec; ++i) {
    const int j = lane + 32 * kWarps * i;
    if (j < vectors) {
      const Vector a = xr[j], b = orow[j], s = sr[j], g = reinterpret_cast<const Vector*>(gate)[j],
                   c = reinterpret_cast<const Vector*>(gbias)[j];
#pragma unroll
      for (int k = 0; k < V; ++k) {
        v[0][i][k] = ToFloat(FromFloat<T>(ToFloat(a.v[k]) + ToFloat(b.v[k]) * ToFloat(g.v[k]) + ToFloat(c.v[k])));
        v[1][i][k] = ToFloat(s.v[k]);
      }
    }
  }
  float mean, rstd;
  RowStatistics<kWarps, 2, kMaxVec, V>(v, lane, vectors, 2.f * width, eps, partial, mean, rstd);
  Vector* hr = reinterpret_cast<Vector*>(h + row * 2 * width);
  const Vector* gv = reinterpret_cast<const Vector*>(gamma);
  const Vector* bv = reinterpret_cast<const Vector*>(beta);
#pragma unroll
  for (int half = 0; half < 2; ++half)
#pragma unroll
    for (int i = 0; i < kMaxVec; ++i) {
      const int j = lane + 32 * kWarps * i;
      if (j < vectors) {
        const int c = half * vectors + j;
        const Vector g = gv[c], b = bv[c];
        Vector o;
#pragma unroll
        for (int k = 0; k < V; ++k)
          o.v[k] = FromFloat<T>((v[half][i][k] - mean) * rstd * ToFloat(g.v[k]) + ToFloat(b.v[k]));
        hr[c] = o;
      }
    }
}

// y [rows, width]; bias, gamma, beta [width] -> h [rows, width] and (kSum) sum = y + bias.
// Without kBias the row is y itself (the LayerNorm op; bias and sum unused).
template <typename T, int V, int kMaxVec, bool kBias, bool kSum, int kWarps = 1>
__global__ void __launch_bounds__(SkipNormThreads<kWarps>()) BiasAddNormKernel(
    const T* __restrict__ y, const T* __restrict__ bias, const T* __restrict__ gamma, const T* __restrict__ beta,
    T* __restrict__ h, T* __restrict__ sum, int64_t rows, int width, float eps) {
  __shared__ float partial[2 * kWarps];
  const int64_t row = static_cast<int64_t>(blockIdx.x) * SkipNormRowsPerBlock<kWarps>() + threadIdx.x / (32 * kWarps);
  const int lane = threadIdx.x % (32 * kWarps);  // the thread's index within its row
  if (kWarps == 1 && row >= rows) return;  // (a row of several warps has a block: row < rows)
  const int vectors = width / V;
  using Vector = Vec<T, V>;
  const Vector* yr = reinterpret_cast<const Vector*>(y + row * width);
  float v[1][kMaxVec][V];
#pragma unroll
  for (int i = 0; i < kMaxVec; ++i) {
    const int j = lane + 32 * kWarps * i;
    if (j < vectors) {
      const Vector a = yr[j];
      if (kBias) {
        const Vector c = reinterpret_cast<const Vector*>(bias)[j];
        Vector s;
#pragma unroll
        for (int k = 0; k < V; ++k) {
          s.v[k] = FromFloat<T>(ToFloat(a.v[k]) + ToFloat(c.v[k]));
          v[0][i][k] = ToFloat(s.v[k]);
        }
        // stored before the reductions: the write overlaps their latency
        if (kSum) reinterpret_cast<Vector*>(sum + row * width)[j] = s;
      } else {
#pragma unroll
        for (int k = 0; k < V; ++k) v[0][i][k] = ToFloat(a.v[k]);
      }
    }
  }
  float mean, rstd;
  RowStatistics<kWarps, 1, kMaxVec, V>(v, lane, vectors, static_cast<float>(width), eps, partial, mean, rstd);
  Vector* hr = reinterpret_cast<Vector*>(h + row * width);
#pragma unroll
  for (int i = 0; i < kMaxVec; ++i) {
    const int j = lane + 32 * kWarps * i;
    if (j < vectors) {
      const Vector g = reinterpret_cast<const Vector*>(gamma)[j], b = reinterpret_cast<const Vector*>(beta)[j];
      Vector o;
#pragma unroll
      for (int k = 0; k < V; ++k) o.v[k] = FromFloat<T>((v[0][i][k] - mean) * rstd * ToFloat(g.v[k]) + ToFloat(b.v[k]));
      hr[j] = o;
    }
  }
}

// Widest row (per half for GatedConcatNorm) a lane holds in registers: 8 16-byte vectors (2048
// fp16 or 1024 fp32 elements per row), or 32 scalars (1024 elements) where D is not a multiple
// of the vector or a buffer is not 16-byte aligned.
constexpr int kSkipNormMaxVectorsPerLane = 8;
constexpr int kSkipNormMaxScalarsPerLane = 32;

template <typename T>
inline int SkipNormMaxWidth(bool vectorized) {
  return vectorized ? 32 * WideVector<T>() * kSkipNormMaxVectorsPerLane : 32 * kSkipNormMaxScalarsPerLane;
}

// Calls launch(V, kMaxVec, kWarps) (as integral_constants) with the smallest register tile that
// holds a row of `width`: a block of kSkipNormRowWarps warps for a row of at most 2 x 128
// vectors, else one warp; false when none does (wider than SkipNormMaxWidth).
template <typename T, typename Launch>
inline bool DispatchSkipNormWidth(int width, bool vectorized, Launch&& launch) {
  using One = std::integral_constant<int, 1>;
  if (width > SkipNormMaxWidth<T>(vectorized)) return false;
  if (!vectorized) {
    launch(One{}, std::integral_constant<int, kSkipNormMaxScalarsPerLane>{}, One{});
    return true;
  }
  constexpr int V = static_cast<int>(16 / sizeof(T));
  using Wide = std::integral_constant<int, V>;
  using RowWarps = std::integral_constant<int, kSkipNormRowWarps>;
  const int vectors = width / V;
  if (NormRowBlocks() && vectors <= 32 * kSkipNormRowWarps) {
    launch(Wide{}, One{}, RowWarps{});
    return true;
  }
  if (NormRowBlocks() && vectors <= 2 * 32 * kSkipNormRowWarps) {
    launch(Wide{}, std::integral_constant<int, 2>{}, RowWarps{});
    return true;
  }
  const int per_lane = (vectors + 31) / 32;
  if (per_lane <= 2) {
    launch(Wide{}, std::integral_constant<int, 2>{}, One{});
  } else if (per_lane <= 4) {
    launch(Wide{}, std::integral_constant<int, 4>{}, One{});
  } else {
    launch(Wide{}, std::integral_constant<int, kSkipNormMaxVectorsPerLane>{}, One{});
  }
  return true;
}

template <int kWarps>
inline unsigned SkipNormBlocks(int64_t rows) {
  constexpr int per_block = SkipNormRowsPerBlock<kWarps>();
  return static_cast<unsigned>((rows + per_block - 1) / per_block);
}

// What the library launches for GatedConcatNorm; false (nothing launched) when `width` is too wide.
template <typename T>
inline bool LaunchGatedConcatNorm(const T* x, const T* out, const T* gate, const T* gbias, const T* skip,
                                  const T* gamma, const T* beta, T* h, int64_t rows, int width, float eps,
                                  cudaStream_t stream) {
  const bool vectorized = Vectorizable<T>(width, {x, out, gate, gbias, skip, gamma, beta, h});
  return DispatchSkipNormWidth<T>(width, vectorized, [&](auto v, auto max_vec, auto warps) {
    constexpr int kWarps = decltype(warps)::value;
    GatedConcatNormKernel<T, decltype(v)::value, decltype(max_vec)::value, kWarps>
        <<<SkipNormBlocks<kWarps>(rows), SkipNormThreads<kWarps>(), 0, stream>>>(x, out, gate, gbias, skip, gamma,
                                                                                beta, h, rows, width, eps);
  });
}

// What the library launches for BiasAddNorm (kBias, kSum) and LayerNorm (neither; bias and sum
// may be null); false (nothing launched) when `width` is too wide.
template <typename T, bool kBias, bool kSum>
inline bool LaunchBiasAddNorm(const T* y, const T* bias, const T* gamma, const T* beta, T* h, T* sum, int64_t rows,
                              int width, float eps, cudaStream_t stream) {
  const bool vectorized = Vectorizable<T>(width, {y, bias, gamma, beta, h, sum});  // null is aligned
  return DispatchSkipNormWidth<T>(width, vectorized, [&](auto v, auto max_vec, auto warps) {
    constexpr int kWarps = decltype(warps)::value;
    BiasAddNormKernel<T, decltype(v)::value, decltype(max_vec)::value, kBias, kSum, kWarps>
        <<<SkipNormBlocks<kWarps>(rows), SkipNormThreads<kWarps>(), 0, stream>>>(y, bias, gamma, beta, h, sum, rows,
                                                                                width, eps);
  });
}

}  // namespace semvoc
