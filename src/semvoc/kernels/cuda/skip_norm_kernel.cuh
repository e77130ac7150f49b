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
// One warp per row (per token); a lane keeps its share of the row in registers (16-byte vectors
// where D and the buffers allow), so every input is read once and every output written once.
// Statistics in fp32, two passes over the registers (mean, then squared deviations). No shared
// memory, no allocation, no synchronisation beyond the warp: CUDA-graph safe.
// References: semvoc/kernels/skip_norm.py.
#pragma once

#include <type_traits>

#include "ort_op.h"

namespace semvoc {

constexpr int kSkipNormRowsPerBlock = 4;  // warps (rows) per block of 128 threads

// Statistics of a row held as kHalves x kMaxVec x V floats per lane (entries past `vectors` unused).
template <int kHalves, int kMaxVec, int V>
__device__ __forceinline__ void RowStatistics(const float (&v)[kHalves][kMaxVec][V], int lane, int vectors,
                                              float count, float eps, float& mean, float& rstd) {
  float total = 0.f;
#pragma unroll
  for (int half = 0; half < kHalves; ++half)
#pragma unroll
    for (int i = 0; i < kMaxVec; ++i)
      if (lane + 32 * i < vectors) {
#pragma unroll
        for (int k = 0; k < V; ++k) total += v[half][i][k];
      }
  mean = WarpSum(total) / count;
  float squares = 0.f;
#pragma unroll
  for (int half = 0; half < kHalves; ++half)
#pragma unroll
    for (int i = 0; i < kMaxVec; ++i)
      if (lane + 32 * i < vectors) {
#pragma unroll
        for (int k = 0; k < V; ++k) squares += (v[half][i][k] - mean) * (v[half][i][k] - mean);
      }
  rstd = rsqrtf(WarpSum(squares) / count + eps);
}

// x, out, skip [rows, width]; gate, gbias [width]; gamma, beta [2 width]; h [rows, 2 width].
// Lane `lane` owns vector j = lane + 32 i of both halves: x/out/skip at the same index, so the
// halves never diverge and the concatenation is only an output offset.
template <typename T, int V, int kMaxVec>
__global__ void __launch_bounds__(32 * kSkipNormRowsPerBlock) GatedConcatNormKernel(
    const T* __restrict__ x, const T* __restrict__ out, const T* __restrict__ gate, const T* __restrict__ gbias,
    const T* __restrict__ skip, const T* __restrict__ gamma, const T* __restrict__ beta, T* __restrict__ h,
    int64_t rows, int width, float eps) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kSkipNormRowsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  const int vectors = width / V;
  using Vector = Vec<T, V>;
  const Vector* xr = reinterpret_cast<const Vector*>(x + row * width);
  const Vector* orow = reinterpret_cast<const Vector*>(out + row * width);
  const Vector* sr = reinterpret_cast<const Vector*>(skip + row * width);
  float v[2][kMaxVec][V];  // [0]: the gated sum, [1]: the skip
#pragma unroll
  for (int i = 0; i < kMaxVec; ++i) {
    const int j = lane + 32 * i;
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
  RowStatistics<2, kMaxVec, V>(v, lane, vectors, 2.f * width, eps, mean, rstd);
  Vector* hr = reinterpret_cast<Vector*>(h + row * 2 * width);
  const Vector* gv = reinterpret_cast<const Vector*>(gamma);
  const Vector* bv = reinterpret_cast<const Vector*>(beta);
#pragma unroll
  for (int half = 0; half < 2; ++half)
#pragma unroll
    for (int i = 0; i < kMaxVec; ++i) {
      const int j = lane + 32 * i;
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
template <typename T, int V, int kMaxVec, bool kBias, bool kSum>
__global__ void __launch_bounds__(32 * kSkipNormRowsPerBlock) BiasAddNormKernel(
    const T* __restrict__ y, const T* __restrict__ bias, const T* __restrict__ gamma, const T* __restrict__ beta,
    T* __restrict__ h, T* __restrict__ sum, int64_t rows, int width, float eps) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kSkipNormRowsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  const int vectors = width / V;
  using Vector = Vec<T, V>;
  const Vector* yr = reinterpret_cast<const Vector*>(y + row * width);
  float v[1][kMaxVec][V];
#pragma unroll
  for (int i = 0; i < kMaxVec; ++i) {
    const int j = lane + 32 * i;
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
  RowStatistics<1, kMaxVec, V>(v, lane, vectors, static_cast<float>(width), eps, mean, rstd);
  Vector* hr = reinterpret_cast<Vector*>(h + row * width);
#pragma unroll
  for (int i = 0; i < kMaxVec; ++i) {
    const int j = lane + 32 * i;
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

// Calls launch(V, kMaxVec) (as integral_constants) with the smallest register tile that holds a
// row of `width`; false when none does (wider than SkipNormMaxWidth).
template <typename T, typename Launch>
inline bool DispatchSkipNormWidth(int width, bool vectorized, Launch&& launch) {
  if (width > SkipNormMaxWidth<T>(vectorized)) return false;
  if (!vectorized) {
    launch(std::integral_constant<int, 1>{}, std::integral_constant<int, kSkipNormMaxScalarsPerLane>{});
    return true;
  }
  constexpr int V = static_cast<int>(16 / sizeof(T));
  const int per_lane = (width / V + 31) / 32;
  if (per_lane <= 2) {
    launch(std::integral_constant<int, V>{}, std::integral_constant<int, 2>{});
  } else if (per_lane <= 4) {
    launch(std::integral_constant<int, V>{}, std::integral_constant<int, 4>{});
  } else {
    launch(std::integral_constant<int, V>{}, std::integral_constant<int, kSkipNormMaxVectorsPerLane>{});
  }
  return true;
}

inline unsigned SkipNormBlocks(int64_t rows) {
  return static_cast<unsigned>((rows + kSkipNormRowsPerBlock - 1) / kSkipNormRowsPerBlock);
}

// What the library launches for GatedConcatNorm; false (nothing launched) when `width` is too wide.
template <typename T>
inline bool LaunchGatedConcatNorm(const T* x, const T* out, const T* gate, const T* gbias, const T* skip,
                                  const T* gamma, const T* beta, T* h, int64_t rows, int width, float eps,
                                  cudaStream_t stream) {
  const bool vectorized = Vectorizable<T>(width, {x, out, gate, gbias, skip, gamma, beta, h});
  return DispatchSkipNormWidth<T>(width, vectorized, [&](auto v, auto max_vec) {
    GatedConcatNormKernel<T, decltype(v)::value, decltype(max_vec)::value>
        <<<SkipNormBlocks(rows), 32 * kSkipNormRowsPerBlock, 0, stream>>>(x, out, gate, gbias, skip, gamma, beta, h,
                                                                        rows, width, eps);
  });
}

// What the library launches for BiasAddNorm (kBias, kSum) and LayerNorm (neither; bias and sum
// may be null); false (nothing launched) when `width` is too wide.
template <typename T, bool kBias, bool kSum>
inline bool LaunchBiasAddNorm(const T* y, const T* bias, const T* gamma, const T* beta, T* h, T* sum, int64_t rows,
                              int width, float eps, cudaStream_t stream) {
  const bool vectorized = Vectorizable<T>(width, {y, bias, gamma, beta, h, sum});  // null is aligned
  return DispatchSkipNormWidth<T>(width, vectorized, [&](auto v, auto max_vec) {
    BiasAddNormKernel<T, decltype(v)::value, decltype(max_vec)::value, kBias, kSum>
        <<<SkipNormBlocks(rows), 32 * kSkipNormRowsPerBlock, 0, stream>>>(y, bias, gamma, beta, h, sum, rows, width,
                                                                        eps);
  });
}

}  // namespace semvoc
