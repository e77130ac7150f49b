// HeadNorm / HeadNormRope kernels, shared by the library (head_norm.cu) and the micro-benchmark
// (benchmarks/device/kernel_bench/head_norm_bench.cu), so that what the bench times is what ships.
//   y = (x - mean) * rsqrt(var + eps) * gamma[h] + beta[h]       (LayerNorm over each head of hd values)
//   out[j] = y[j] cos[l, j] - y[j + hd/2] sin[l, j];  out[j + hd/2] = y[j + hd/2] cos[l, j] + y[j] sin[l, j]
// x [rows = B*L, n*hd]; gamma, beta [n, hd] (affine_stride hd) or [hd] (affine_stride 0); cos, sin
// [>= L, hd/2]. HeadNormRope writes heads [0, n/2) to out (q) and the rest to out_k, [rows, n/2*hd] each.
// With v_heads > 0 (HeadNormRopeQkv) x rows hold n + v_heads heads, q|k|v from one GEMM: the n
// heads are normed as above, the last v_heads are copied unchanged to out_v [rows, v_heads*hd].
// Statistics and arithmetic in fp32, one rounding at the end.
#pragma once

#include "ort_op.h"

namespace semvoc {

// The first kernel: one warp per (row, head); lane i owns elements i + 32 m, so the rotation's
// pairs (j, j + hd/2) stay in one lane. Scalar 2-byte accesses and 64-bit index arithmetic per
// warp: at hd = 64 a warp runs ~170 instructions to move 256 bytes, so at the DiT's shapes it is
// bound by instruction issue, not memory. Kept as the fallback for buffers that are not 16-byte
// aligned, and as the benchmark's baseline.
template <typename T, int kPerLane, bool kRope>
__global__ void HeadNormWarpKernel(const T* __restrict__ x, const T* __restrict__ gamma, const T* __restrict__ beta,
                                   const T* __restrict__ cos, const T* __restrict__ sin, T* __restrict__ out,
                                   T* __restrict__ out_k, int64_t warps, int heads, int length, int affine_stride,
                                   float eps, int v_heads, T* __restrict__ out_v) {
  constexpr int kWidth = 32 * kPerLane;
  constexpr int kHalf = kWidth / 2;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (warp >= warps) return;
  const int all_heads = heads + v_heads;
  const int head = static_cast<int>(warp % all_heads);
  const T* xr = x + warp * kWidth;
  if (head >= heads) {  // a v head: copied
    T* o = out_v + ((warp / all_heads) * v_heads + head - heads) * kWidth;
#pragma unroll
    for (int m = 0; m < kPerLane; ++m) o[lane + 32 * m] = xr[lane + 32 * m];
    return;
  }
  float v[kPerLane];
  float sum = 0.f;
#pragma unroll
  for (int m = 0; m < kPerLane; ++m) {
    v[m] = ToFloat(xr[lane + 32 * m]);
    sum += v[m];
  }
  sum = WarpSum(sum);
  const float mean = sum / kWidth;
  float squares = 0.f;
#pragma unroll
  for (int m = 0; m < kPerLane; ++m) {
    const float d = v[m] - mean;
    squares += d * d;
  }
  squares = WarpSum(squares);
  const float rstd = rsqrtf(squares / kWidth + eps);
  const T* g = gamma + head * affine_stride;
  const T* b = beta + head * affine_stride;
#pragma unroll
  for (int m = 0; m < kPerLane; ++m) {
    const int e = lane + 32 * m;
    v[m] = (v[m] - mean) * rstd * ToFloat(g[e]) + ToFloat(b[e]);
  }
  if (kRope) {
    const int position = static_cast<int>((warp / all_heads) % length);
#pragma unroll
    for (int m = 0; m < kPerLane / 2; ++m) {
      const int j = lane + 32 * m;
      const float c = ToFloat(cos[position * kHalf + j]), s = ToFloat(sin[position * kHalf + j]);
      const float first = v[m], second = v[m + kPerLane / 2];
      v[m] = first * c - second * s;
      v[m + kPerLane / 2] = second * c + first * s;
    }
  }
  // HeadNormRope: heads [0, n/2) go to out (q), the rest to out_k, each [B, L, n/2 * hd]
  const int64_t row = warp / all_heads;
  const int half = heads / 2;
  T* o = !kRope ? out + row * heads * kWidth + head * kWidth
       : head < half ? out + (row * half + head) * kWidth : out_k + (row * half + head - half) * kWidth;
#pragma unroll
  for (int m = 0; m < kPerLane; ++m) o[lane + 32 * m] = FromFloat<T>(v[m]);
}

// Sum over aligned groups of kLanes lanes (a power of two <= 32), in every lane of the group.
template <int kLanes>
__device__ __forceinline__ float GroupSum(float v) {
#pragma unroll
  for (int offset = kLanes / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// One 16-byte store of 16 / sizeof(T) values, rounded once. fp16 packs pairs with
// __floats2half2_rn into one 4-register value, else ptxas has split some stores into 4-, 4- and 8-byte ones.
__device__ __forceinline__ void StoreVector(float* p, const float (&v)[4]) {
  *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
}
__device__ __forceinline__ void StoreVector(__half* p, const float (&v)[8]) {
  uint4 packed;
  uint32_t* words = &packed.x;
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const __half2 h = __floats2half2_rn(v[2 * k], v[2 * k + 1]);
    words[k] = *reinterpret_cast<const uint32_t*>(&h);
  }
  *reinterpret_cast<uint4*>(p) = packed;
}

// The vectorised kernel. Each thread moves whole 16-byte vectors (kVec elements) of one head:
//  - kPair: the thread owns chunk t and chunk t + hd/2 of its head (two vectors), so the
//    rotation's pairs stay in the thread; else one vector, and the partner half comes from lane
//    t ^ kLanes/2 by shuffles.
//  - kRows consecutive token rows per thread, all loads issued before the first reduction:
//    more bytes in flight per thread, gamma/beta loaded once for all of them.
//  - kOnePass: sum and sum of squares in one reduction (var = E[x^2] - mean^2) instead of two
//    dependent ones; loses accuracy when |mean| >> std, so the library keeps two passes.
// A head is kLanes = hd / (kVec * chunks) adjacent lanes (4 at fp16, hd 64, kPair), so the
// statistics take log2(kLanes) shuffles. Block (x, y): x over the heads' lanes of a row
// (`units` = n * kLanes per row, more than 256 continue in gridDim.y), y over rows.
// Index arithmetic is 32-bit apart from row offsets; the position of row r is r % length,
// one division per thread. Needs 16-byte aligned buffers (rows are: n*hd and hd/2 are
// multiples of kVec).
template <typename T, int kHd, bool kRope, bool kPair, int kRows, bool kOnePass>
__global__ void __launch_bounds__(256) HeadNormVecKernel(
    const T* __restrict__ x, const T* __restrict__ gamma, const T* __restrict__ beta, const T* __restrict__ cos,
    const T* __restrict__ sin, T* __restrict__ out, T* __restrict__ out_k, int rows, int units, int heads,
    int length, int affine_stride, float eps, int v_heads, T* __restrict__ out_v) {
  constexpr int kVec = static_cast<int>(16 / sizeof(T));  // WideVector<T>(), which is host-only
  constexpr int kChunks = kPair ? 2 : 1;
  constexpr int kLanes = kHd / (kVec * kChunks);
  constexpr int kHalf = kHd / 2;
  static_assert(kLanes >= 2 && kLanes <= 32 && (kLanes & (kLanes - 1)) == 0, "a head must span 2..32 lanes");
  using V = Vec<T, kVec>;

  const unsigned unit = blockIdx.y * blockDim.x + threadIdx.x;
  const bool active = unit < static_cast<unsigned>(units);  // whole groups of kLanes lanes are in or out
  // idle threads read unit 0 and the last row instead (and store nothing), so loads need no predicate
  const unsigned read_unit = active ? unit : 0u;
  const int head = static_cast<int>(read_unit / kLanes), t = static_cast<int>(read_unit % kLanes);
  // a v head (HeadNormRopeQkv) is copied: its lanes run the arithmetic with head 0's affine (the
  // group shuffles need every lane) and store what they loaded
  const bool copy = head >= heads;
  const int affine_head = copy ? 0 : head;
  // element offsets of this thread's chunks inside its head
  int offset[kChunks];
  offset[0] = t * kVec;
  if (kPair) offset[kChunks - 1] = offset[0] + kHalf;
  const int row0 = (blockIdx.x * blockDim.y + threadIdx.y) * kRows;
  const int64_t width = static_cast<int64_t>(heads + v_heads) * kHd;  // x's row: q|k (|v) heads

  // loads: every row's x first (independent, all in flight together), then the affine
  float v[kRows][kChunks][kVec];
#pragma unroll
  for (int i = 0; i < kRows; ++i) {
    const T* xr = x + min(row0 + i, rows - 1) * width + head * kHd;
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      const V raw = *reinterpret_cast<const V*>(xr + offset[c]);
#pragma unroll
      for (int e = 0; e < kVec; ++e) v[i][c][e] = ToFloat(raw.v[e]);
    }
  }
  V g[kChunks], b[kChunks];
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
    g[c] = *reinterpret_cast<const V*>(gamma + affine_head * affine_stride + offset[c]);
    b[c] = *reinterpret_cast<const V*>(beta + affine_head * affine_stride + offset[c]);
  }
  int position = 0;
  if (kRope) position = static_cast<int>(static_cast<unsigned>(min(row0, rows - 1)) % static_cast<unsigned>(length));

#pragma unroll
  for (int i = 0; i < kRows; ++i) {
    const int row = row0 + i;
    // rope tables of this row (issued before the reductions so their latency overlaps them)
    V cs, sn;
    if (kRope) {
      const int j = kPair ? offset[0] : (t < kLanes / 2 ? offset[0] : offset[0] - kHalf);
      cs = *reinterpret_cast<const V*>(cos + position * kHalf + j);
      sn = *reinterpret_cast<const V*>(sin + position * kHalf + j);
    }
    float sum = 0.f, squares = 0.f;
#pragma unroll
    for (int c = 0; c < kChunks; ++c)
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        sum += v[i][c][e];
        if (kOnePass) squares += v[i][c][e] * v[i][c][e];
      }
    float mean, var;
    if (kOnePass) {
      sum = GroupSum<kLanes>(sum);
      squares = GroupSum<kLanes>(squares);
      mean = sum / kHd;
      var = fmaxf(squares / kHd - mean * mean, 0.f);
    } else {
      mean = GroupSum<kLanes>(sum) / kHd;
#pragma unroll
      for (int c = 0; c < kChunks; ++c)
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          const float d = v[i][c][e] - mean;
          squares += d * d;
        }
      var = GroupSum<kLanes>(squares) / kHd;
    }
    const float rstd = rsqrtf(var + eps);
#pragma unroll
    for (int c = 0; c < kChunks; ++c)
#pragma unroll
      for (int e = 0; e < kVec; ++e)
        v[i][c][e] = (v[i][c][e] - mean) * rstd * ToFloat(g[c].v[e]) + ToFloat(b[c].v[e]);
    if (kRope) {
      if (kPair) {
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          const float c = ToFloat(cs.v[e]), s = ToFloat(sn.v[e]);
          const float first = v[i][0][e], second = v[i][1][e];
          v[i][0][e] = first * c - second * s;
          v[i][1][e] = second * c + first * s;
        }
      } else {
        // lanes of the first half hold y[j] and need y[j + hd/2] (sign -), the others the reverse
        const float sign = t < kLanes / 2 ? -1.f : 1.f;
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          const float partner = __shfl_xor_sync(0xffffffffu, v[i][0][e], kLanes / 2);
          v[i][0][e] = v[i][0][e] * ToFloat(cs.v[e]) + sign * partner * ToFloat(sn.v[e]);
        }
      }
      position = position + 1 == length ? 0 : position + 1;
    }
    if (!active || row >= rows) continue;
    if (copy) {  // read again (an L1 hit) rather than keep the raw vectors in registers for every lane
      const T* xr = x + row * width + head * kHd;
      T* o = out_v + static_cast<int64_t>(row) * v_heads * kHd + (head - heads) * kHd;
#pragma unroll
      for (int c = 0; c < kChunks; ++c)
        *reinterpret_cast<V*>(o + offset[c]) = *reinterpret_cast<const V*>(xr + offset[c]);
      continue;
    }
    T* o;
    if (!kRope) {
      o = out + static_cast<int64_t>(row) * heads * kHd + head * kHd;
    } else {
      const int half = heads / 2;
      const int64_t out_width = static_cast<int64_t>(half) * kHd;
      o = head < half ? out + row * out_width + head * kHd : out_k + row * out_width + (head - half) * kHd;
    }
#pragma unroll
    for (int c = 0; c < kChunks; ++c) StoreVector(o + offset[c], v[i][c]);
  }
}

// Launch geometry of HeadNormVecKernel for `rows` token rows of `units` threads each: blocks of
// 256 threads, x over a row's units (up to 256, the rest in gridDim.y), y over rows.
struct HeadNormGeometry {
  dim3 grid, block;
};

inline HeadNormGeometry HeadNormVecGeometry(int64_t rows, int units, int rows_per_thread) {
  const int x = std::min(256, (units + 31) / 32 * 32);
  const int y = std::max(1, 256 / x);
  const int64_t row_groups = (rows + rows_per_thread - 1) / rows_per_thread;
  return {dim3(static_cast<unsigned>((row_groups + y - 1) / y), static_cast<unsigned>((units + x - 1) / x)),
          dim3(x, y)};
}

// Launches HeadNormVecKernel for head size hd (64 or 128) over `rows` token rows of `heads` heads.
template <typename T, bool kRope, bool kPair, int kRows, bool kOnePass>
void LaunchHeadNormVec(int hd, const T* x, const T* gamma, const T* beta, const T* cos, const T* sin, T* out,
                       T* out_k, int64_t rows, int heads, int length, int affine_stride, float eps,
                       cudaStream_t stream, int v_heads = 0, T* out_v = nullptr) {
  const int units = (heads + v_heads) * hd / (WideVector<T>() * (kPair ? 2 : 1));
  const HeadNormGeometry geo = HeadNormVecGeometry(rows, units, kRows);
  auto kernel = hd == 64 ? HeadNormVecKernel<T, 64, kRope, kPair, kRows, kOnePass>
                         : HeadNormVecKernel<T, 128, kRope, kPair, kRows, kOnePass>;
  kernel<<<geo.grid, geo.block, 0, stream>>>(x, gamma, beta, cos, sin, out, out_k, static_cast<int>(rows), units,
                                             heads, length, affine_stride, eps, v_heads, out_v);
}

// The library's kernel: false takes the first one (HeadNormWarpKernel) for every launch again.
constexpr bool kHeadNormVectorized = true;

// What the library launches (head_norm.cu): the vectorised kernel with two 16-byte vectors per
// thread (chunks j and j + hd/2 of one head), two-pass statistics, one row per thread (at fp16,
// hd 64: 40 registers, 1536 threads and 48 KB of loads in flight per SM; 2 rows per thread keep
// as many bytes in flight at 76 registers and half the occupancy: `vec2-pair-r2` in the bench);
// HeadNormWarpKernel where a buffer is not 16-byte aligned.
template <typename T, bool kRope>
void LaunchHeadNorm(int hd, const T* x, const T* gamma, const T* beta, const T* cos, const T* sin, T* out, T* out_k,
                    int64_t rows, int heads, int length, int affine_stride, float eps, cudaStream_t stream,
                    int v_heads = 0, T* out_v = nullptr) {
  if (kHeadNormVectorized && Vectorizable<T>(hd, {x, gamma, beta, cos, sin, out, out_k, out_v})) {
    LaunchHeadNormVec<T, kRope, true, 1, false>(hd, x, gamma, beta, cos, sin, out, out_k, rows, heads, length,
                                                affine_stride, eps, stream, v_heads, out_v);
    return;
  }
  const int64_t warps = rows * (heads + v_heads);
  const int threads = 256;
  const unsigned blocks = static_cast<unsigned>((warps * 32 + threads - 1) / threads);
  auto kernel = hd == 64 ? HeadNormWarpKernel<T, 2, kRope> : HeadNormWarpKernel<T, 4, kRope>;
  kernel<<<blocks, threads, 0, stream>>>(x, gamma, beta, cos, sin, out, out_k, warps, heads, length, affine_stride,
                                         eps, v_heads, out_v);
}

}  // namespace semvoc
